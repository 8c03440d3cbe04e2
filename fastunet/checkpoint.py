"""Checkpoints as a directory: ``config.json`` (the architecture) + ``model.safetensors`` (the weights).

``save_pretrained(model, dir)`` / ``load_pretrained(dir, cls=...)`` work for ``fastunet.UNet``
and ``fastunet.UNetReference`` alike (they share the module tree and the state_dict), and
``UNet.save_pretrained`` / ``UNet.from_pretrained`` delegate here. A directory written from
either class loads into either.

Why safetensors and not ``torch.save``: loading a pickle runs code from the file; a
safetensors file is tensors and a JSON header, nothing else. The weights are the full
``state_dict``: parameters and every BatchNorm buffer (``running_mean``, ``running_var``,
``num_batches_tracked``), each in the dtype it had, so a round trip is bitwise.

``config.json``::

    {"format": "fastunet", "format_version": 1, "fastunet_version": "0.1.0",
     "class": "UNet", "in_ch": 3, "out_ch": 1, "base_channels": 64, "depth": 4,
     "out_activation": "sigmoid", "dtype": "float32"}

A ``UNet`` built with ``recompute=True`` (``fastunet.recompute``) adds ``"recompute": true``: how it
trains, not its architecture, so a top-level key that ``UNet.from_pretrained`` restores and a
``UNetReference`` (or an older fastunet) ignores.

A model with architecture options other than the classic ones (``model.options``, e.g. a
``preset="keras"`` model) adds them all under ``"options"``::

    "options": {"upsampling": "nearest_conv", "norm": "none", "conv_bias": true,
                "concat": "skip_up", "dropout": 0.5, "pre_head": 2, "odd_sizes": "error",
                "init": "he_normal"}

and ``load_pretrained`` builds the model from them. A classic model's config is the one written
before options existed, so every config from then loads (as the classic model it was), and the
classic files this version writes read the same everywhere. An option name this version does not
know is refused (it would change the architecture silently otherwise).

``format_version`` is what a reader checks: a directory written by a newer format is refused
with an error that says so, rather than half-loaded.

Loading checks before it allocates: ``config.json``'s size (``config_bytes``), its depth and widths
(``depth``, ``channels``; see ``fastunet.limits``), then the weights' names and shapes against
the model built on the meta device, then their values (``check_state_dict``: finite, BatchNorm
variances >= 0, one floating-point dtype). Both files are written under temporary names and
renamed into place, so an interrupted save leaves the previous checkpoint (or none), never half
of one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .limits import check_architecture, check_limit
from .reference import DEFAULT_OPTIONS, UNetReference

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_pretrained",
    "load_pretrained",
    "check_state_dict",
    "describe_mismatch",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The newest checkpoint format this fastunet writes and reads.
FORMAT_VERSION = 1
_ARCH_KEYS = ("in_ch", "out_ch", "base_channels", "depth", "out_activation")
#: The architecture options recorded under "options" (the others are top-level keys).
_OPTION_KEYS = tuple(k for k in DEFAULT_OPTIONS if k not in _ARCH_KEYS)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # a dependency of the package; only a broken install lacks it
        raise ImportError("fastunet checkpoints need the safetensors package: pip install safetensors") from e
    return safetensors.torch


def _version() -> str:
    from . import __version__

    return __version__


def model_config(model: UNetReference) -> dict:
    """The ``config.json`` contents for ``model`` (architecture options, dtype, format versions)."""
    if not isinstance(model, UNetReference):
        raise TypeError(f"expected a fastunet.UNet or fastunet.UNetReference, got {type(model).__name__}")
    first = model.conv1.conv[0].weight
    config = {
        "format": "fastunet",
        "format_version": FORMAT_VERSION,
        "fastunet_version": _version(),
        "class": type(model).__name__,
        **{key: getattr(model, key) for key in _ARCH_KEYS},
    }
    options = {key: model.options[key] for key in _OPTION_KEYS}
    if options != {key: DEFAULT_OPTIONS[key] for key in _OPTION_KEYS}:
        config["options"] = options  # all of them: the file says what it is, whatever the defaults become
    config["dtype"] = str(first.dtype).removeprefix("torch.")
    if getattr(model, "recompute", False):
        # How the model trains, not what it is: a top-level key (a reader that does not know it
        # loads the same model), never under "options" (which an older reader refuses).
        config["recompute"] = True
    return config


def save_pretrained(model: UNetReference, directory: str | os.PathLike) -> Path:
    """Write ``model``'s ``config.json`` and ``model.safetensors`` into ``directory``.

    ``model``: a ``UNet`` or ``UNetReference`` on any device, in any dtype; the weights are
    written as they are (device copied to host, layout made contiguous, values untouched).
    ``directory`` is created if needed; existing files of those two names are replaced.
    Returns the directory as a ``Path``.
    """
    config = model_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Detached host copies: safetensors stores dense row-major data only (a channels_last
    # parameter is written in the standard layout; the values are the same).
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "fastunet_version": config["fastunet_version"]}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        _safetensors().save_file(state, str(tmp), metadata=metadata)
    # The config last: a directory with a config always has its weights.
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """``directory``'s ``config.json``, checked: a fastunet config of a format this version reads,
    with every architecture key. Raises ``FileNotFoundError`` / ``CheckpointError``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        what = "a directory" if Path(directory).is_dir() else "no such directory"
        raise FileNotFoundError(
            f"{path}: no {CONFIG_NAME} ({directory!s} is {what}); a fastunet checkpoint directory holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by model.save_pretrained(directory)"
        )
    check_limit("config_bytes", path.stat().st_size, f"{path}: size in bytes")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): not a fastunet config"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a fastunet config (JSON nested too deeply to read)") from None
    if not isinstance(config, dict) or config.get("format") != "fastunet":
        raise CheckpointError(f'{path} is not a fastunet config (no "format": "fastunet")')
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version}, written by fastunet {config.get('fastunet_version', '?')}; "
            f"this fastunet ({_version()}) reads format_version <= {FORMAT_VERSION}: upgrade fastunet to load it"
        )
    missing = [key for key in _ARCH_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks the architecture option(s) {', '.join(missing)}")
    sizes = {key: config[key] for key in ("in_ch", "out_ch", "base_channels", "depth")}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    check_architecture(str(path), **sizes)
    options = config.get("options", {})
    if not isinstance(options, dict):
        raise CheckpointError(f'{path}: "options" must be a JSON object of architecture options, got {options!r}')
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise CheckpointError(
            f"{path} has the architecture option(s) {', '.join(unknown)}, which this fastunet ({_version()}) does not "
            f"know (it knows {', '.join(_OPTION_KEYS)}): upgrade fastunet to load it"
        )
    if not isinstance(config.get("recompute", False), bool):
        raise CheckpointError(f'{path}: "recompute" must be true or false, got {config["recompute"]!r}')
    return config


def describe_mismatch(expected: dict, got: dict, model: str = "the config's model") -> str | None:
    """What differs between two ``{name: tensor}`` maps (the model's, the file's): the first
    missing, unexpected and mis-shaped tensor (in the model's order), with how many more of each
    kind; None if the names and shapes agree. ``model`` names the model in the message."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    problems = []
    for kind, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            problems.append(f"{kind} tensor '{names[0]}'{more}")
    if shaped:
        k = shaped[0]
        more = f" (and {len(shaped) - 1} more)" if len(shaped) > 1 else ""
        problems.append(f"tensor '{k}' has shape {list(got[k].shape)}, {model} needs {list(expected[k].shape)}{more}")
    return "; ".join(problems) or None


def check_state_dict(state: dict, where: str, *, one_dtype: bool = True) -> None:
    """Raise ``CheckpointError`` naming the first tensor of ``state`` that no trained model has:
    a value that is not a tensor, a complex tensor, (``one_dtype``) a floating-point tensor whose
    dtype differs from most of the others' (a model is one dtype; a mixed one fails only when it
    trains), NaN or Inf in a floating-point tensor, or a negative BatchNorm ``running_var``.
    ``where`` names the file in the message. Integer tensors (``num_batches_tracked``) are left
    alone; meta tensors are checked for type and dtype only."""
    floats = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: '{name}' is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise CheckpointError(f"{where}: tensor '{name}' is {t.dtype}: a U-Net's weights are real")
        if t.is_floating_point():
            floats[name] = t
    dtypes = Counter(t.dtype for t in floats.values())
    if one_dtype and len(dtypes) > 1:
        (common, count), *_ = dtypes.most_common()
        name = next(name for name, t in floats.items() if t.dtype != common)
        raise CheckpointError(
            f"{where}: tensor '{name}' is {_dtype_name(floats[name].dtype)} while {count} of the "
            f"{len(floats)} floating-point tensors are {_dtype_name(common)}: a checkpoint is one dtype (convert the "
            "whole model, e.g. model.float(), before saving it)"
        )
    for name, t in floats.items():
        if t.is_meta:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(
                f"{where}: tensor '{name}' holds {bad:,} NaN or Inf value(s) of {t.numel():,}: damaged weights (a "
                "diverged training run?); the model would output NaN"
            )
        if name.endswith("running_var") and t.numel() and bool((t < 0).any()):
            raise CheckpointError(
                f"{where}: tensor '{name}' (a BatchNorm running variance) has negative values (min "
                f"{t.min().item():.3g}): damaged weights; a variance is >= 0"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_pretrained(
    directory: str | os.PathLike,
    cls: type[UNetReference] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> UNetReference:
    """The model saved in ``directory`` (see ``save_pretrained``), in eval mode.

    ``cls``: the class to build, ``fastunet.UNet`` (default) or ``fastunet.UNetReference`` (or a
    subclass); either loads a directory written from either. ``map_location``: the device the
    weights land on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``). Tensors keep the
    dtype they were saved in (bitwise); parameters require grad, as in a new model. Call
    ``.train()`` on the result to fine-tune it.

    Raises ``FileNotFoundError`` for a missing ``config.json`` / ``model.safetensors``,
    ``CheckpointError`` (a ``ValueError``) for a malformed config, an unknown future
    ``format_version``, unreadable weights, weights that do not fit the config (naming the first
    missing, unexpected or mis-shaped tensor) or invalid values (``check_state_dict``), and
    ``LimitError`` for a config whose size, depth or width is over its limit.
    """
    from .formats import build, read_pretrained  # deferred: formats imports this module

    return build(read_pretrained(directory, map_location), cls=cls, map_location=map_location)
