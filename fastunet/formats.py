"""Every checkpoint fastunet reads, through one loader: ``fastunet.load(path)``.

A checkpoint is *read* into a ``Checkpoint`` (its tensors under fastunet's keys, what their
shapes say about the architecture, what the file records), then *built* into a model. The
per-format readers are the pieces ``read`` dispatches to, by the file's content (not its
suffix, ``fastunet.loaders.sniff``):

=====================  =======================================================  ==================
format                 what it is                                               reader
=====================  =======================================================  ==================
``pretrained``         a ``save_pretrained`` folder: config.json + safetensors  ``read_pretrained``
``classic``            a state_dict in fastunet's keys (``conv1.conv.0.weight``)  ``read_state``
                       in a ``.safetensors`` or ``torch.save`` file, bare or in
                       a ``{'state_dict'|'model'|'model_state_dict': ...}``
                       wrapper, keys maybe under ``module.`` or one other prefix
``milesial``           milesial's ``Pytorch-UNet`` state_dict, either mode      ``convert.read_milesial``
``keras``              zhixuhao's Keras ``unet()``: Keras 3 ``.weights.h5`` /   ``convert.read_keras``
                       ``.keras``, tf.keras ``.h5`` (model or weights)
=====================  =======================================================  ==================

Where each architecture option comes from, first match wins:

1. the caller's ``**options`` (checked against the weights: a contradiction is an error naming
   the first tensor that does not fit);
2. the shapes of the weights, for the options they show (``WEIGHT_OPTIONS``: channels, width,
   depth, up-sampling kind, conv bias, norm, pre-head), except in a ``save_pretrained`` folder,
   whose config.json is checked against them instead;
3. what the file records: config.json; the preset a milesial or Keras file implies;
4. ``preset`` given by the caller, for what the file does not record: its up-sampling and norm
   must be the weights', and it must agree with what the file records (a milesial or Keras
   file's preset, a config's options that change the output) unless options say otherwise:
   a contradiction is an error, never a silent choice;
5. for a bare state_dict in fastunet's keys, which records nothing and was given no preset: the
   classic defaults, or the preset whose shapes the weights have. When that preset and the
   classic defaults differ in an option that changes the output and that no weight shows (the
   concatenation order, the head's activation), the file is ambiguous: ``CheckpointError``
   naming both and what to pass.

Nothing is read with ``weights_only=False``; every size is bounded (``fastunet.limits``) and
the names and shapes are checked on the meta device before a tensor is allocated, then the
values (``checkpoint.check_state_dict``). The loaded tensors are assigned to the model as they
are: dtype and bits as in the file.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, describe_mismatch, read_config
from .errors import CheckpointError
from .limits import check_architecture
from .loaders import KERAS_SUFFIXES, TORCH_SUFFIXES, read_safetensors, read_torch_file, sniff, unwrap
from .reference import DEFAULT_OPTIONS, PRESETS

__all__ = ["Checkpoint", "Resolved", "WEIGHT_OPTIONS", "load", "read", "read_pretrained", "read_state", "resolve",
           "build", "infer_options", "describe_model", "matching_preset"]  # fmt: skip

#: The options the weights' names and shapes show (a checkpoint that contradicts one fails to fit).
WEIGHT_OPTIONS = ("in_ch", "out_ch", "base_channels", "depth", "upsampling", "norm", "conv_bias", "pre_head")
#: Options no weight shows that do not change the output of a forward on a valid input
#: (training only, initialization, which input sizes are accepted): never a reason to call a
#: file ambiguous.
_NO_OUTPUT_EFFECT = ("dropout", "init", "odd_sizes")
_SIZES = ("in_ch", "out_ch", "base_channels", "depth")
_LEVEL_KEY = re.compile(r"conv(\d{1,6})\.conv\.0\.weight")
_UP_KEY = re.compile(r"up(\d{1,6})(\.conv)?\.weight")
#: The suffixes of weight files a folder without config.json is searched for (to name them).
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, *KERAS_SUFFIXES)


@dataclass
class Checkpoint:
    """A checkpoint read and put in fastunet's terms, before any model exists.

    ``path``: what was read (a file, a folder, or a description of an in-memory source).
    ``where``: the name errors use (the weights file of a folder). ``format``: ``"pretrained"``,
    ``"classic"``, ``"milesial"`` or ``"keras"``; ``container``: how it is stored, in words.
    ``state``: the tensors under fastunet's state_dict keys. ``inferred``: the ``WEIGHT_OPTIONS``
    the shapes show. ``recorded``: the options the file records (config.json) or its format
    implies (its preset's); None for a bare state_dict. ``preset``: the preset the format
    implies. ``names``: fastunet key -> the file's own name, where they differ (errors name the
    file's). ``notes``: what was taken off or ignored while reading. ``owned``: the tensors were
    read from a file for this load (an in-memory source's are copied, never shared). ``recompute``:
    the config's ``"recompute"`` (a ``save_pretrained`` folder of a ``UNet(..., recompute=True)``).
    """

    path: str
    where: str
    format: str
    container: str
    state: dict[str, torch.Tensor]
    inferred: dict
    recorded: dict | None = None
    preset: str | None = None
    names: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    owned: bool = True
    recompute: bool = False


@dataclass
class Resolved:
    """The architecture a checkpoint is built as: ``options`` (every option, sizes included),
    ``preset`` (the one whose every option these are, else the one they came from, or None)
    and ``origin`` (option -> where its value came from: ``"weights"``, ``"config.json"``,
    ``"format"``, ``"preset"``, ``"argument"``, ``"default"``)."""

    options: dict
    preset: str | None
    origin: dict


# --------------------------------------------------------------------------- what the shapes say
def infer_options(state: dict, where: str) -> dict:
    """The ``WEIGHT_OPTIONS`` a state_dict in fastunet's keys shows: ``conv1.conv.0.weight``
    ``[base, in_ch, 3, 3]``; the deepest ``conv{k}.conv.0.weight`` gives ``depth = (k - 1) // 2``;
    the head ``conv{2*depth+2}.weight`` ``[out_ch, ...]`` (``out_ch`` absent when there is none);
    ``up{k}.weight`` a transposed conv, ``up{k}.conv.weight`` a nearest_conv up, neither
    bilinear; the norm whose tensors ``conv1.conv.1`` holds (``_norm_of``); a bias at ``conv1.conv.0``; the
    pre-head's width from ``pre_head.0.weight``. Raises ``CheckpointError`` when
    ``conv1.conv.0.weight`` is not a conv weight or no deeper level exists."""
    first = state.get("conv1.conv.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        got = list(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise CheckpointError(
            f"{where}: 'conv1.conv.0.weight' is {got}, not the first 3x3 conv's weight [width, in_ch, 3, 3]"
        )
    levels = [int(m.group(1)) for k in state if (m := _LEVEL_KEY.fullmatch(k))]
    depth = (max(levels) - 1) // 2
    if depth < 1:
        raise CheckpointError(
            f"{where} has no conv3.conv.0.weight or deeper level: not a U-Net state_dict (a depth-d U-Net has "
            "conv1..conv{2d+1}.conv and the head conv{2d+2})"
        )
    inferred = {"in_ch": int(first.shape[1]), "base_channels": int(first.shape[0]), "depth": depth}
    head = state.get(f"conv{2 * depth + 2}.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 4:
        inferred["out_ch"] = int(head.shape[0])
    ups = {m.group(2) or "" for k in state if (m := _UP_KEY.fullmatch(k))}
    inferred["upsampling"] = "transpose" if "" in ups else "nearest_conv" if ".conv" in ups else "bilinear"
    inferred["norm"] = _norm_of({k.removeprefix("conv1.conv.1.") for k in state if k.startswith("conv1.conv.1.")})
    inferred["conv_bias"] = "conv1.conv.0.bias" in state
    pre = state.get("pre_head.0.weight")
    inferred["pre_head"] = int(pre.shape[0]) if isinstance(pre, torch.Tensor) and pre.dim() == 4 else 0
    return inferred


def _shape_signature(options: dict) -> tuple:
    """What of an architecture the weights' names show beyond the sizes."""
    return options["upsampling"], options["norm"], options["conv_bias"], options["pre_head"] > 0


def _deciding(key: str) -> bool:
    """Whether an option changes what a network computes without showing in its weights."""
    return key not in WEIGHT_OPTIONS and key not in _NO_OUTPUT_EFFECT


def matching_preset(options: dict) -> str | None:
    """The preset of the network ``options`` (every option) describe: the one with their shapes
    (up-sampling, norm, conv bias, a pre-head or not) and their other options that change the
    computation (the concatenation order), the head aside; the one they differ from in the
    fewest options if several; None when no preset is that network."""
    options = {**DEFAULT_OPTIONS, **options}
    same = [
        name for name, p in PRESETS.items()
        if _shape_signature(p) == _shape_signature(options)
        and all(options[k] == p[k] for k in p if _deciding(k) and k != "out_activation")
    ]  # fmt: skip
    return min(same, key=lambda name: sum(options.get(k) != v for k, v in PRESETS[name].items()), default=None)


# --------------------------------------------------------------------------- readers
def read_pretrained(directory: str | os.PathLike, map_location=None) -> Checkpoint:
    """A ``save_pretrained`` folder (``config.json`` + ``model.safetensors``). Raises
    ``FileNotFoundError`` for a missing file, ``CheckpointError``/``LimitError`` for a bad config."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no {WEIGHTS_NAME} next to {CONFIG_NAME} (an interrupted save?)")
    state = read_safetensors(weights, torch.device(map_location or "cpu"))
    # A config without "options" is a classic model's (written before options existed, or classic).
    recorded = {
        **DEFAULT_OPTIONS,
        **{key: config[key] for key in (*_SIZES, "out_activation")},
        **config.get("options", {}),
    }
    return Checkpoint(
        path=str(directory), where=str(weights), format="pretrained",
        container=f"save_pretrained folder ({CONFIG_NAME} + {WEIGHTS_NAME})", state=state,
        inferred=_infer_lenient(state, str(weights)), recorded=recorded, recompute=config.get("recompute", False),
    )  # fmt: skip


def _infer_lenient(state: dict, where: str) -> dict:
    # A folder's config is the truth and the fit check names what the weights lack; the shapes
    # are only reported (fastunet info), so weights too damaged to show them show nothing.
    try:
        return infer_options(state, where)
    except CheckpointError:
        return {}


def _family(state: dict) -> str | None:
    classic, milesial = "conv1.conv.0.weight" in state, "inc.double_conv.0.weight" in state
    if classic and milesial:
        return "both"
    return "classic" if classic else "milesial" if milesial else None


def _strip_common_prefix(state: dict) -> tuple[dict, str] | None:
    """``state`` with the one dotted prefix every key shares removed (a LightningModule's
    ``model.``, ``net.``, ...), when that leaves a state_dict fastunet recognises."""
    first = next(iter(state), "")
    prefix = first.partition(".")[0] + "."
    if prefix == "." or not all(k.startswith(prefix) for k in state):
        return None
    stripped = {k[len(prefix) :]: v for k, v in state.items()}
    return (stripped, prefix) if _family(stripped) in ("classic", "milesial") else None


def read_state(state: dict, where: str, *, container: str, notes: list[str] | None = None, owned: bool = True,
               bilinear: bool | None = None) -> Checkpoint:  # fmt: skip
    """A state_dict (already unwrapped) as a ``Checkpoint``: fastunet's keys (``classic``) or
    milesial's (``convert.read_milesial``), recognised by ``conv1.conv.0.weight`` /
    ``inc.double_conv.0.weight``, under one shared prefix or none. ``bilinear`` goes to the
    milesial reader. Raises ``CheckpointError`` for keys of neither or of both families."""
    notes = list(notes or [])
    family = _family(state)
    if family is None and (found := _strip_common_prefix(state)) is not None:
        state, prefix = found
        notes.append(f"the {prefix!r} prefix removed")
        family = _family(state)
    if family == "both":
        raise CheckpointError(
            f"{where} holds both fastunet's keys (conv1.conv.0.weight) and milesial's (inc.double_conv.0.weight): "
            "two models in one state_dict; save the one to load alone"
        )
    if family is None:
        raise CheckpointError(
            f"{where} holds a state_dict of {len(state)} entries whose keys are neither fastunet's / the classic "
            "U-Net's (conv1.conv.0.weight, ..., the head conv{2*depth+2}.weight) nor milesial's "
            f"(inc.double_conv.0.weight, down1..., outc.conv.weight); its first keys: {list(state)[:4]}. For another "
            "U-Net's module tree, build that model and use fastunet.accelerate(model)"
        )
    if family == "milesial":
        from .convert import read_milesial  # deferred: convert imports the model

        ck = read_milesial(state, where, bilinear=bilinear, owned=owned)
        ck.container, ck.notes = container, notes + ck.notes
        return ck
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor: not a state_dict"
            )
    return Checkpoint(path=where, where=where, format="classic", container=container, state=state,
                      inferred=infer_options(state, where), notes=notes, owned=owned)  # fmt: skip


def read_weights_file(path: Path, kind: str, map_location=None) -> tuple[dict, str, list[str]]:
    """``(state_dict, container, notes)`` of a ``.safetensors`` or ``torch.save`` file
    (``kind``: ``sniff``'s answer)."""
    device = torch.device(map_location or "cpu")
    if kind == "safetensors":
        return read_safetensors(path, device), "safetensors file", []
    state, notes = unwrap(read_torch_file(path, device), str(path))
    return state, "torch.save file", notes


def read(path: str | os.PathLike, *, map_location=None) -> Checkpoint:
    """The checkpoint at ``path`` (a file or a folder), detected by content (see the module
    docstring), read and checked as far as the file alone allows. Raises ``FileNotFoundError``,
    ``CheckpointError`` (unreadable, unknown or ambiguous; one line saying what was found and
    what would load) or ``LimitError``."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return read_pretrained(path, map_location)
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_WEIGHT_SUFFIXES))
        hint = (
            f"; it holds {', '.join(found[:4])}: pass the file itself (e.g. {path / found[0]}) to build the model "
            "from its weights"
            if found
            else " and no weights file"
        )
        raise CheckpointError(
            f"{path} is a folder without {CONFIG_NAME}, so not a save_pretrained checkpoint (config.json + "
            f"{WEIGHTS_NAME}){hint}"
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = sniff(path)
    if kind in ("hdf5", "keras-archive"):
        from .convert import read_keras  # deferred: convert imports the model

        return read_keras(path, map_location=map_location)
    state, container, notes = read_weights_file(path, kind, map_location)
    ck = read_state(state, str(path), container=container, notes=notes)
    ck.path = str(path)
    return ck


# --------------------------------------------------------------------------- architecture
def _preset_conflict(ck: Checkpoint, preset: str) -> str | None:
    wants = PRESETS[preset]
    bad = [k for k in ("upsampling", "norm") if k in ck.inferred and wants[k] != ck.inferred[k]]
    if not bad:
        return None
    has = ", ".join(f"{k}={ck.inferred[k]!r}" for k in bad)
    says = ", ".join(f"{k}={wants[k]!r}" for k in bad)
    return f"preset {preset!r} has {says} but the weights in {ck.where} have {has}"


@functools.cache
def _norm_tensors() -> dict[str, frozenset[str]]:
    """``norm`` -> the names of the tensors its layer holds, from the reference's modules
    (``"batch"``: weight, bias, the running statistics, num_batches_tracked; ``"instance"``:
    weight, bias; ``"none"``: nothing)."""
    from .reference import NORMS, DoubleConv

    with torch.device("meta"):
        layers = {n: DoubleConv(1, 1, norm=n).conv[1] for n in NORMS}
    return {n: frozenset(layer.state_dict()) for n, layer in layers.items()}


def _norm_of(held: set[str]) -> str:
    """The ``norm`` whose layer holds the tensors named ``held`` (names under ``conv1.conv.1``):
    the one holding exactly those, else the one sharing most of them (the fit check then names
    what is missing or extra: a BatchNorm saved without ``num_batches_tracked`` stays BatchNorm)."""
    norms = _norm_tensors()
    exact = [n for n, names in norms.items() if names == held]
    return exact[0] if exact else max(norms, key=lambda n: (len(norms[n] & held), -len(norms[n] - held)))


def _tensorless_norms() -> tuple[str, ...]:
    """The ``norm`` values whose layers hold no tensors: a state_dict cannot tell them apart
    (``("none",)`` today: BatchNorm and InstanceNorm(affine) hold tensors)."""
    return tuple(n for n, names in _norm_tensors().items() if not names)


def _ambiguity(ck: Checkpoint, candidate: str, options: dict) -> str | None:
    differ = [
        k for k in DEFAULT_OPTIONS if _deciding(k) and k not in options and PRESETS[candidate][k] != DEFAULT_OPTIONS[k]
    ]
    if not differ:
        return None
    shown = ", ".join(f"{k}={ck.inferred[k]!r}" for k in ("upsampling", "norm", "conv_bias", "pre_head"))
    both = "; ".join(f"{k}: {PRESETS[candidate][k]!r} or {DEFAULT_OPTIONS[k]!r}" for k in differ)
    given = ", ".join(f"{k}=..." for k in differ)
    return (
        f"{ck.where} is ambiguous: a state_dict in fastunet's keys with {shown}, the shapes of preset {candidate!r}, "
        f"and it does not record what no weight shows ({both}). Pass preset={candidate!r} (--preset {candidate}) "
        f"or the options ({given}); save_pretrained folders record them"
    )


def resolve(ck: Checkpoint, preset: str | None = None, options: dict | None = None) -> Resolved:
    """The architecture ``ck`` is built as (see the module docstring for the order). Raises
    ``CheckpointError`` for an ambiguous bare state_dict, a preset that contradicts the weights
    or the file's format, and ``ValueError`` for an unknown preset."""
    options = dict(options or {})
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; the presets are {', '.join(map(repr, PRESETS))}")
    if preset is not None:
        if ck.format in ("milesial", "keras") and preset != ck.preset:
            raise CheckpointError(
                f"{ck.where} is a {ck.format} checkpoint (preset {ck.preset!r}); preset={preset!r} does not apply to it"
            )
        conflict = _preset_conflict(ck, preset)
        if conflict:
            raise CheckpointError(conflict)
        if ck.format == "pretrained":
            wants = PRESETS[preset]
            differ = [k for k in wants if _deciding(k) and k not in options and wants[k] != ck.recorded.get(k)]
            if differ:
                says = ", ".join(f"{k}={wants[k]!r}" for k in differ)
                has = ", ".join(f"{k}={ck.recorded.get(k)!r}" for k in differ)
                raise CheckpointError(
                    f"preset {preset!r} has {says} but {Path(ck.path) / CONFIG_NAME} records {has}: leave the preset "
                    "out (the folder records every option) or pass the option itself"
                )
    resolved = dict(DEFAULT_OPTIONS)
    origin = dict.fromkeys(resolved, "default")

    def take(values: dict, source: str, keys=None) -> None:
        for key, value in values.items():
            if keys is None or key in keys:
                resolved[key], origin[key] = value, source

    chosen = preset
    if ck.recorded is not None:
        take(ck.recorded, "config.json" if ck.format == "pretrained" else "format")
        chosen = chosen or ck.preset
    elif preset is None:
        tensorless = _tensorless_norms()
        if ck.inferred.get("norm") in tensorless and len(tensorless) > 1 and "norm" not in options:
            raise CheckpointError(
                f"{ck.where} is ambiguous: a state_dict in fastunet's keys without norm tensors, so its norm may be "
                f"any of {', '.join(map(repr, tensorless))}, which it does not record. Pass norm=... (or a preset); "
                "save_pretrained folders record it"
            )
        signature = _shape_signature({**DEFAULT_OPTIONS, **ck.inferred})
        matches = [name for name, p in PRESETS.items() if _shape_signature(p) == signature]
        if matches and "classic" not in matches:
            problem = _ambiguity(ck, matches[0], options)
            if problem:
                raise CheckpointError(problem)
            chosen = matches[0]
            take(PRESETS[chosen], "weights' preset")
    if preset is not None and ck.recorded is None:
        take(PRESETS[preset], "preset", keys=[k for k in PRESETS[preset] if k not in WEIGHT_OPTIONS])
    if ck.format != "pretrained":  # a folder's config is checked against its weights instead
        take(ck.inferred, "weights")
    take(options, "argument")
    if chosen is None:
        chosen = matching_preset(resolved)
    return Resolved(resolved, chosen, origin)


def describe_model(cls_name: str, options: dict, preset: str | None = None) -> str:
    """``UNet(3, 1, base_channels=4, depth=2)``: the sizes, then ``preset=`` and the options that
    differ from it (from the classic defaults without one)."""
    base = PRESETS[preset] if preset else DEFAULT_OPTIONS
    text = f"{cls_name}({options['in_ch']}, {options['out_ch']}"
    text += f", preset={preset!r}" if preset and preset != "classic" else ""
    text += f", base_channels={options['base_channels']}, depth={options['depth']}"
    extra = [k for k in DEFAULT_OPTIONS if k in options and options[k] != base.get(k, DEFAULT_OPTIONS[k])]
    return text + "".join(f", {k}={options[k]!r}" for k in extra) + ")"


# --------------------------------------------------------------------------- the model
def build(ck: Checkpoint, *, cls: type | None = None, preset: str | None = None, map_location=None,
          **options):  # fmt: skip
    """``cls`` (default ``fastunet.UNet``) holding ``ck``'s weights, in eval mode: the architecture
    from ``resolve``, bounded by the limits, built on the meta device, the names and shapes
    checked, then the values, then the tensors assigned (the file's dtype and bits; on
    ``map_location`` when given). Raises ``CheckpointError``/``LimitError`` naming the file and
    the first problem, ``TypeError`` for an option no model has."""
    from .model import UNet  # deferred: the model imports the ops
    from .reference import UNetReference

    cls = UNet if cls is None else cls
    if not (isinstance(cls, type) and issubclass(cls, UNetReference)):
        raise TypeError(f"cls must be fastunet.UNet, fastunet.UNetReference or a subclass, got {cls!r}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS) - set(_SIZES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join((*_SIZES, *DEFAULT_OPTIONS))}"
        )
    res = resolve(ck, preset, options)
    opts = dict(res.options)
    if opts.get("out_ch") is None:
        sizes = {k: opts[k] for k in ("in_ch", "base_channels", "depth")}
        check_architecture(ck.where, out_ch=1, **sizes)
        head = f"conv{2 * opts['depth'] + 2}.weight"
        raise CheckpointError(
            f"{ck.where} has no head tensor {head!r} (the 1x1 output conv of the depth-{opts['depth']} U-Net its "
            "deepest key implies): not a complete U-Net state_dict (give out_ch, --out-ch, to check the rest)"
        )
    check_architecture(ck.where, **{k: opts[k] for k in _SIZES})
    described = describe_model(cls.__name__, opts, res.preset)
    whose = f"{CONFIG_NAME}'s " if ck.format == "pretrained" else ""
    in_ch, out_ch = opts.pop("in_ch"), opts.pop("out_ch")
    try:
        with torch.device("meta"):  # names and shapes only: nothing is allocated before they fit
            model = cls(in_ch, out_ch, preset=res.preset, **opts)
    except (TypeError, ValueError) as exc:
        source = Path(ck.path) / CONFIG_NAME if ck.format == "pretrained" else ck.where
        raise CheckpointError(f"{source}: {exc}") from None
    expected = model.state_dict()
    theirs = {ck.names.get(k, k): v for k, v in ck.state.items()}
    model_name = "the config's model" if whose else "the model"
    problem = describe_mismatch({ck.names.get(k, k): v for k, v in expected.items()}, theirs, model_name)
    if problem:
        raise CheckpointError(f"{ck.where} does not fit {whose}{described}: {problem}")
    check_state_dict(theirs, ck.where)
    device = None if map_location is None else torch.device(map_location)
    state = {}
    for key, tensor in ck.state.items():
        tensor = tensor if device is None else tensor.to(device)
        # An in-memory source keeps its tensors; a file's are the model's own.
        state[key] = tensor.contiguous() if ck.owned else tensor.clone(memory_format=torch.contiguous_format)
    model.load_state_dict(state, strict=True, assign=True)
    if ck.recompute and isinstance(model, UNet):  # the reference has no fused path to recompute on
        model.recompute = True
    return model.eval()


def load(path: str | os.PathLike, *, preset: str | None = None, map_location=None, **options):
    """The ``fastunet.UNet`` in the checkpoint at ``path``, whatever its format, in eval mode.

    ``path``: a ``save_pretrained`` folder; a ``.safetensors`` or ``torch.save`` file of a state_dict
    in fastunet's (the classic U-Net's) keys or milesial's ``Pytorch-UNet`` keys (either
    up-sampling mode), bare, in a ``{'state_dict'|'model'|'model_state_dict': ...}`` wrapper or under
    ``module.``; a Keras 3 ``.weights.h5`` / ``.keras`` or tf.keras ``.h5`` file of zhixuhao's
    ``unet()``. The format is detected from the content. ``preset``: a key of ``fastunet.PRESETS``
    for the options no weight shows (needed only for an ambiguous bare state_dict, see the module
    docstring). ``map_location``: the device of the weights (default: the CPU). ``**options``:
    architecture options (``out_activation="none"``, ``odd_sizes="pad"``, ...) over what the file
    says; sizes given (``in_ch``, ...) must be the weights'.

    The weights keep the dtype they were saved in, bit for bit (Keras files: float32). Raises
    ``FileNotFoundError``; ``CheckpointError`` (a ``ValueError``) for an unreadable, unknown or
    ambiguous file or weights that do not fit (one line: what was found, what would load);
    ``LimitError`` for sizes over the limits (``fastunet.limits``); ``TypeError`` for an unknown
    option.
    """
    return build(read(path, map_location=map_location), preset=preset, map_location=map_location, **options)
