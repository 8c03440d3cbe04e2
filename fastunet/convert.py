"""Other U-Nets' weights and modules in fastunet's layout: the Keras loaders, milesial's
``Pytorch-UNet`` loader and ``accelerate``.

* ``from_keras(source)``: zhixuhao's Keras ``unet()`` (24 ``Conv2D`` layers: two 3x3 per level,
  four 2x2 "up" convs after ``UpSampling2D``, a 2-channel 3x3 pre-head, the 1x1 head) from a
  Keras 3 ``.weights.h5`` or ``.keras`` archive, a tf.keras 2 full-model or weights-only
  ``.h5``, or ``keras_model.get_weights()``; read with h5py alone (no TensorFlow, no Keras).
  The result is ``UNet(preset="keras")``.
* ``from_milesial(state_dict_or_path)``: a checkpoint of milesial's ``UNet`` (``inc``,
  ``down1..4``, ``up1..4``, ``outc``) as ``UNet(preset="milesial" | "milesial-bilinear")``.
* ``accelerate(model)``: a ``fastunet.UNet`` that *shares* the parameters and buffers of a
  classic U-Net instance or of a milesial ``UNet`` instance, and keeps the original's
  state_dict keys (``own_keys(model)``: fastunet's keys inside the block).

``read_keras`` and ``read_milesial`` turn a source into a ``fastunet.formats.Checkpoint`` (the
tensors under fastunet's keys, what their shapes say); ``from_keras``, ``from_milesial`` and
``fastunet.load`` build the model from it with ``fastunet.formats.build``, the one builder.

How Keras stores a model's weights (the layouts read here, from Keras' saving code):

* **Keras 3** (``model.save_weights("x.weights.h5")``; ``model.weights.h5`` inside a ``.keras``
  zip): ``/layers/<class>[_<n>]/vars/<i>``. Layers are named by their *class* in snake case with
  a per-class counter in ``model.layers`` order (``conv2d``, ``conv2d_1``, ..., ``conv2d_23``),
  not by their layer names; ``vars/0`` is a conv's kernel, ``vars/1`` its bias. HDF5 lists
  groups alphabetically (``conv2d_10`` before ``conv2d_2``), so the order is the counter's.
  Keras 2.13's format has ``/_layer_checkpoint_dependencies/<layer name>/vars/<i>`` instead.
* **tf.keras 2 / legacy H5** (``model.save("x.h5")``, ``model.save_weights("x.h5")``): the
  weights under ``/model_weights`` (full model) or the root (weights only); that group's
  ``layer_names`` attribute lists the layers in ``model.layers`` order, each layer's group a
  ``weight_names`` attribute naming its datasets (``conv2d/kernel:0``, ``conv2d/bias:0``). An
  attribute too large for an HDF5 object header is split into ``layer_names0``, ``layer_names1``...
* **get_weights()**: the arrays in ``model.weights`` order: per layer, kernel then bias.

Kernels are HWIO (``[kh, kw, in, out]``) for NHWC inputs; a torch conv weight is OIHW, so
``weight = kernel.transpose(3, 2, 0, 1)``. Keras' ``Conv2D`` is a cross-correlation like
torch's; its ``padding="same"`` pads ``k - 1`` in total with the extra row/column at the
bottom/right (what ``NearestConvUp`` does for the 2x2 up conv), and 1 on each side for 3x3.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, FastUNetError
from .formats import Checkpoint, build, read_weights_file
from .limits import check_architecture, check_limit
from .loaders import check_zip_size, sniff
from .model import UNet
from .reference import PRESETS, UNetReference

# --------------------------------------------------------------------------- Keras


class _KerasConv:
    """One Keras conv layer as read from the source: name, HWIO kernel, bias (or None)."""

    __slots__ = ("name", "kernel", "bias")

    def __init__(self, name: str, kernel: np.ndarray, bias: np.ndarray | None):
        self.name, self.kernel, self.bias = name, kernel, bias


def _conv_from_arrays(name: str, arrays: list[np.ndarray]) -> _KerasConv:
    """A layer's weights as ``_KerasConv``: a 4-D kernel, optionally a 1-D bias of its width."""
    shapes = [tuple(a.shape) for a in arrays]
    ok = (
        len(arrays) in (1, 2)
        and arrays[0].ndim == 4
        and (len(arrays) == 1 or (arrays[1].ndim == 1 and arrays[1].shape[0] == arrays[0].shape[3]))
    )
    if not ok:
        raise CheckpointError(
            f"Keras layer {name!r} holds weights of shapes {shapes}; from_keras reads a U-Net of Conv2D layers "
            "only (a [kh, kw, in, out] kernel and an optional [out] bias each)"
        )
    return _KerasConv(name, arrays[0], arrays[1] if len(arrays) == 2 else None)


def _h5_attr_list(group, name: str) -> list[str] | None:
    """A list-of-strings attribute, joined from ``name0``, ``name1``, ... chunks if split; None if absent."""
    if name in group.attrs:
        values = list(group.attrs[name])
    elif f"{name}0" in group.attrs:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


class _ReadBudget:
    """Bytes read from an HDF5 file so far, against the ``file_bytes`` limit: a dataset's shape
    is read from the file, and a compressed one inflates to any size."""

    def __init__(self, where: str):
        self.where, self.used = where, 0

    def read(self, dataset) -> np.ndarray:
        if not hasattr(dataset, "shape") or not hasattr(dataset, "dtype"):
            raise CheckpointError(f"{self.where}: {getattr(dataset, 'name', dataset)!r} is not a dataset of weights")
        self.used += int(np.prod(dataset.shape, dtype=np.int64)) * dataset.dtype.itemsize
        check_limit("file_bytes", self.used, f"{self.where}: weights in bytes (up to {dataset.name!r})")
        return np.asarray(dataset)


def _h5_array(dataset, budget: _ReadBudget) -> np.ndarray:
    """A dataset as a float numpy array. Keras 3 stores bfloat16 variables as raw 16-bit words
    with ``attrs["dtype"] == "bfloat16"``; their bits are the top half of a float32's."""
    value = budget.read(dataset)
    if dataset.attrs.get("dtype") in ("bfloat16", b"bfloat16"):
        value = (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return value


def _natural_key(name: str) -> tuple[str, int]:
    """``conv2d`` -> ("conv2d", 0), ``conv2d_12`` -> ("conv2d", 12): Keras 3's per-class counter."""
    m = re.fullmatch(r"(.*?)_(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def _read_legacy(group, where: str, budget: _ReadBudget) -> list[_KerasConv]:
    """tf.keras 2 layout: ``layer_names`` in model order, per layer ``weight_names``."""
    convs = []
    for layer in _h5_attr_list(group, "layer_names"):
        if layer not in group:
            raise CheckpointError(f"{where}: layer {layer!r} is listed in 'layer_names' but has no group")
        g = group[layer]
        names = _h5_attr_list(g, "weight_names") or []
        arrays = []
        for wn in names:
            if wn not in g:
                raise CheckpointError(f"{where}: weight {wn!r} of layer {layer!r} is listed but missing")
            arrays.append(budget.read(g[wn]))
        if arrays:
            convs.append(_conv_from_arrays(layer, arrays))
    return convs


def _read_keras3(root, where: str, by_class: bool, budget: _ReadBudget) -> list[_KerasConv]:
    """Keras 3 layout: ``<root>/<layer>/vars/<i>``; layers ordered by Keras' per-class counter."""
    convs = []
    for layer in sorted(root.keys(), key=_natural_key):
        g = root[layer]
        vars_ = g["vars"] if "vars" in g else None
        if vars_ is None or len(vars_) == 0:
            continue  # input, pooling, upsampling, dropout, concatenate: no weights
        if not all(k.isdigit() for k in vars_.keys()):
            raise CheckpointError(f"{where}: layer {layer!r} has variables {sorted(vars_.keys())}, expected 0, 1, ...")
        arrays = [_h5_array(vars_[k], budget) for k in sorted(vars_.keys(), key=int)]
        # Keras 3 names groups per class, so the order across classes is lost: only Conv2D layers
        # ("conv2d", "conv2d_1", ...) can be put in model order. (Keras 2.13's layout uses layer names.)
        if by_class and not re.fullmatch(r"conv2d(_\d+)?", layer):
            raise CheckpointError(
                f"{where}: layer {layer!r} holds weights but is not a Conv2D; from_keras reads a U-Net of "
                "Conv2D layers only"
            )
        convs.append(_conv_from_arrays(layer, arrays))
    return convs


def _read_h5(f, where: str) -> tuple[list[_KerasConv], str]:
    """``(conv layers in model order, the layout in words)`` of an open Keras HDF5 file (any of
    the three layouts). A malformed file (h5py's own errors, a group where a dataset belongs) is
    a ``CheckpointError``."""
    try:
        return _read_h5_layout(f, where, _ReadBudget(where))
    except (FastUNetError, MemoryError):
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/TypeError/... for damaged or odd files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{where} cannot be read as Keras weights: {first}") from None


def _read_h5_layout(f, where: str, budget: _ReadBudget) -> tuple[list[_KerasConv], str]:
    if _h5_attr_list(f, "layer_names") is not None:
        return _read_legacy(f, where, budget), "tf.keras .h5 weights (save_weights)"
    if "model_weights" in f and _h5_attr_list(f["model_weights"], "layer_names") is not None:
        return _read_legacy(f["model_weights"], where, budget), "tf.keras .h5 model (model.save)"
    layouts = {"layers": "Keras 3 .weights.h5", "_layer_checkpoint_dependencies": "Keras 2.13 .weights.h5"}
    for root, layout in layouts.items():
        if root in f:
            return _read_keras3(f[root], where, by_class=root == "layers", budget=budget), layout
    raise CheckpointError(
        f"{where} is an HDF5 file but not a Keras model or weights file: it has neither a 'layer_names' "
        "attribute (tf.keras 2 weights), a 'model_weights' group (tf.keras 2 model) nor a 'layers' group "
        f"(Keras 3 .weights.h5); its top level holds {sorted(f.keys())[:8]}"
    )


def _read_keras_source(source) -> tuple[list[_KerasConv], str, str]:
    """``(conv layers in model order, a name for messages, the layout in words)`` from any
    supported source."""
    try:
        import h5py
    except ImportError as exc:  # only the file sources need it
        h5py = None
        h5py_error = exc
    if h5py is not None and isinstance(source, h5py.Group):
        convs, layout = _read_h5(source, "the HDF5 group")
        return convs, "the HDF5 group", layout
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such Keras weights file: {path!r}")
        if h5py is None:
            raise ImportError(
                "from_keras needs h5py to read Keras files: pip install 'fastunet[keras]'"
            ) from h5py_error
        if zipfile.is_zipfile(path):  # a Keras 3 .keras archive: its weights are model.weights.h5
            check_zip_size(path)
            try:
                with zipfile.ZipFile(path) as zf:
                    if "model.weights.h5" not in zf.namelist():
                        raise CheckpointError(
                            f"{path!r} is a zip archive without model.weights.h5: not a Keras 3 .keras file"
                        )
                    data = io.BytesIO(zf.read("model.weights.h5"))
                f = h5py.File(data, "r")
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                if isinstance(exc, FastUNetError):
                    raise
                raise CheckpointError(f"{path!r} cannot be read as a .keras archive: {exc}") from None
            with f:
                return _read_h5(f, f"{path!r} (model.weights.h5)")[0], path, "Keras 3 .keras archive"
        if not h5py.is_hdf5(path):
            raise CheckpointError(
                f"{path!r} is not an HDF5 file (nor a .keras archive): from_keras reads Keras .h5 files"
            )
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise CheckpointError(f"{path!r} cannot be read as HDF5 (truncated or corrupt): {exc}") from None
        with f:
            convs, layout = _read_h5(f, repr(path))
        return convs, path, layout
    if isinstance(source, (list, tuple)):
        convs, arrays = [], [np.asarray(a) for a in source]
        i = 0
        while i < len(arrays):
            if arrays[i].ndim != 4:
                raise CheckpointError(
                    f"get_weights()[{i}] has shape {tuple(arrays[i].shape)} where a Conv2D kernel [kh, kw, in, out] "
                    "was expected: from_keras reads a U-Net of Conv2D layers only (kernel, bias, kernel, bias, ...)"
                )
            take = 2 if i + 1 < len(arrays) and arrays[i + 1].ndim == 1 else 1
            convs.append(_conv_from_arrays(f"get_weights()[{i}]", arrays[i : i + take]))
            i += take
        return convs, "the weights list", "keras_model.get_weights() list"
    raise TypeError(
        "from_keras expects a path to a Keras .weights.h5 / .h5 / .keras file, an open h5py File, or the list "
        f"of numpy arrays keras_model.get_weights() returns; got {type(source).__name__}"
    )


def keras_targets(model: UNetReference) -> list[tuple[str, nn.Module]]:
    """Our modules in the order of zhixuhao's ``unet()`` conv layers: two 3x3 per encoder level
    and the bottleneck, per decoder level the 2x2 up conv then two 3x3, the pre-head, the head."""
    d = model.depth
    out = []
    for i in range(1, d + 2):
        out += [
            (f"conv{i}.conv.0", getattr(model, f"conv{i}").conv[0]),
            (f"conv{i}.conv.3", getattr(model, f"conv{i}").conv[3]),
        ]
    for k in range(d + 2, 2 * d + 2):
        dc = getattr(model, f"conv{k}").conv
        out += [(f"up{k}.conv", getattr(model, f"up{k}").conv), (f"conv{k}.conv.0", dc[0]), (f"conv{k}.conv.3", dc[3])]
    if getattr(model, "pre_head", None) is not None:
        out.append(("pre_head.0", model.pre_head[0]))
    out.append((f"conv{2 * d + 2}", model.head))
    return out


def from_keras(source, *, cls: type = UNet, **options) -> UNet:
    """zhixuhao's Keras U-Net (``unet()`` of ``zhixuhao/unet``) as ``cls(..., preset="keras")``.

    Args:
        source: a Keras 3 ``.weights.h5`` or ``.keras`` file, a tf.keras 2 full-model or
            weights-only ``.h5`` file (paths, or an open ``h5py.File``), or the list of numpy
            arrays ``keras_model.get_weights()`` returns (HWIO kernels, biases). Needs h5py for
            files (``pip install 'fastunet[keras]'``); TensorFlow and Keras are never imported.
        cls: the class to build (``fastunet.UNet``, ``fastunet.UNetReference``, a subclass).
        **options: architecture options passed on to ``cls`` over the keras preset (e.g.
            ``out_activation="none"``, ``odd_sizes="pad"``); the shape options (``in_ch``,
            ``out_ch``, ``base_channels``, ``depth``, ``pre_head``, ``conv_bias``) come from the
            weights.

    The conv layers are taken in model order; their count gives the depth (``5*depth + 4``
    with the pre-head conv, 24 for the original; ``5*depth + 3`` without), the first kernel
    ``[3, 3, in_ch, base]`` the input channels and the width, the last ``[1, 1, w, out_ch]``
    the classes. The model takes NCHW inputs ``[N, in_ch, H, W]`` (Keras took NHWC) and returns
    ``[N, out_ch, H, W]``; Keras' sigmoid head is the preset's ``out_activation="sigmoid"``.

    Raises ``fastunet.CheckpointError`` (a ``ValueError``) naming the first layer whose count,
    kernel size or shape does not fit that U-Net, or a non-finite weight, or saying the file is not
    a (readable) Keras weights file; ``fastunet.LimitError`` for a depth, width or decompressed
    size over its limit (``fastunet.limits``), checked before the model is allocated.
    """
    bad = sorted(_KERAS_INFERRED & set(options))
    if bad:
        raise TypeError(f"from_keras: {bad} come from the weights (the keras preset); leave them out")
    return build(read_keras(source), cls=cls, **options)


_KERAS_INFERRED = {"in_ch", "out_ch", "base_channels", "depth", "pre_head", "conv_bias", "preset"}


def read_keras(source, *, map_location=None) -> Checkpoint:
    """A Keras U-Net (any source ``from_keras`` takes) as a ``fastunet.formats.Checkpoint``:
    its convs in zhixuhao's order under fastunet's keys (kernels HWIO -> OIHW, float32), the
    sizes, pre-head and bias their shapes show, the keras preset for the rest. Raises
    ``CheckpointError`` / ``LimitError`` as ``from_keras`` documents, before a model exists."""
    convs, where, layout = _read_keras_source(source)
    n = len(convs)
    has_pre_head = n % 5 == 4
    depth = (n - 4) // 5 if has_pre_head else (n - 3) // 5
    if n % 5 not in (3, 4) or depth < 1:
        raise CheckpointError(
            f"{where} holds {n} conv layers; zhixuhao's unet() has 24 (5*depth + 4 with the 3x3 pre-head conv, "
            "5*depth + 3 without: two 3x3 convs per level and in the bottleneck, a 2x2 up conv per decoder level, "
            "the 1x1 head)"
        )
    first, head = convs[0].kernel, convs[-1].kernel
    in_ch, base, out_ch = int(first.shape[2]), int(first.shape[3]), int(head.shape[3])
    pre_head = int(convs[-2].kernel.shape[3]) if has_pre_head else 0
    biased = [c.bias is not None for c in convs[:-1]]
    if any(biased) and not all(biased):
        odd = convs[biased.index(not biased[0])]
        raise CheckpointError(
            f"{where}: layer {odd.name!r} {'has' if odd.bias is not None else 'lacks'} a bias unlike layer "
            f"{convs[0].name!r}; the U-Net's convs either all have one or none do (conv_bias)"
        )
    if convs[-1].bias is None:
        raise CheckpointError(f"{where}: the 1x1 head {convs[-1].name!r} has no bias; the U-Net's head always has one")
    check_architecture(where, in_ch=in_ch, out_ch=out_ch, base_channels=base, depth=depth)
    arch = dict(in_ch=in_ch, out_ch=out_ch, base_channels=base, depth=depth, upsampling="nearest_conv", norm="none",
                conv_bias=all(biased), pre_head=pre_head)  # fmt: skip
    options = {k: v for k, v in arch.items() if k not in ("in_ch", "out_ch")}
    desc = f"UNet({in_ch}, {out_ch}, preset='keras', base_channels={base}, depth={depth}, pre_head={pre_head})"
    with torch.device("meta"):  # shapes only: a file's sizes are checked before a model is allocated
        targets = keras_targets(UNetReference(in_ch, out_ch, preset="keras", **options))
    if len(targets) != n:  # cannot happen: depth and pre_head come from n
        raise AssertionError(f"{desc} has {len(targets)} convs but {where} holds {n} conv layers")
    state, names = {}, {}
    for i, (conv, (name, module)) in enumerate(zip(convs, targets, strict=True)):
        want = tuple(module.weight.shape)
        hwio = (want[2], want[3], want[1], want[0])
        if tuple(conv.kernel.shape) != hwio:
            raise CheckpointError(
                f"{where}: Keras layer {conv.name!r} (conv layer {i + 1} of {n}) has a kernel of shape "
                f"{tuple(conv.kernel.shape)} (HWIO) but {name} of {desc} needs {hwio}"
            )
        kernel = np.asarray(conv.kernel, dtype=np.float32).transpose(3, 2, 0, 1)
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
        names[f"{name}.weight"] = f"{conv.name}.kernel"
        if conv.bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(np.array(conv.bias, dtype=np.float32))
            names[f"{name}.bias"] = f"{conv.name}.bias"
    if map_location is not None:
        state = {k: v.to(map_location) for k, v in state.items()}
    return Checkpoint(path=str(where), where=where, format="keras", container=layout, state=state, inferred=arch,
                      recorded=dict(PRESETS["keras"]), preset="keras", names=names)  # fmt: skip


# --------------------------------------------------------------------------- milesial


def milesial_paths(depth: int) -> dict[str, str]:
    """Our module path -> milesial's, for every module holding parameters or buffers and the
    pools: a key ``p.rest`` of ours is ``q.rest`` of milesial's (``rest`` as in ``0.weight``)."""
    paths = {"conv1.conv": "inc.double_conv"}
    for i in range(1, depth + 1):
        paths[f"pool{i}"] = f"down{i}.maxpool_conv.0"
        paths[f"conv{i + 1}.conv"] = f"down{i}.maxpool_conv.1.double_conv"
    for j in range(1, depth + 1):
        paths[f"up{j + depth + 1}"] = f"up{j}.up"
        paths[f"conv{j + depth + 1}.conv"] = f"up{j}.conv.double_conv"
    paths[f"conv{2 * depth + 2}"] = "outc.conv"
    return paths


def map_key(key: str, paths: dict[str, str]) -> str | None:
    """``key`` with its module path mapped through ``paths`` (None: no path covers it)."""
    module, _, name = key.rpartition(".")
    while module:
        if module in paths:
            return f"{paths[module]}.{name}"
        module, _, last = module.rpartition(".")
        name = f"{last}.{name}"
    return None


def _milesial_depth(keys) -> int:
    downs = {int(m.group(1)) for k in keys if isinstance(k, str) and (m := re.match(r"down(\d{1,9})\.", k))}
    return max(downs) if downs else 0


def from_milesial(
    state_dict_or_path, *, bilinear: bool | None = None, cls: type = UNet, map_location="cpu", **options
) -> UNet:
    """A checkpoint of milesial's ``Pytorch-UNet`` ``UNet`` as ``cls(..., preset="milesial")``
    (``"milesial-bilinear"`` for its ``bilinear=True`` mode).

    Args:
        state_dict_or_path: a state_dict, or the path of one saved with ``torch.save`` (read with
            ``torch.load(..., weights_only=True)``). A ``mask_values`` entry (milesial's
            ``train.py`` stores one) is ignored, and a ``module.`` prefix on every key (a model
            saved from ``nn.DataParallel``) is removed.
        bilinear: the checkpoint's upsampling mode; None detects it (a transposed-conv checkpoint
            has ``up1.up.weight``), a value that contradicts the keys is an error.
        cls: the class to build, in the checkpoint's dtype and on its device.
        map_location: passed to ``torch.load``.
        **options: architecture options passed on to ``cls`` over the preset, e.g.
            ``out_activation="sigmoid"`` (milesial's model returns logits, the preset's
            ``"none"``).

    ``n_channels``, ``n_classes`` and the width come from the shapes (``inc.double_conv.0.weight``
    ``[64, n_channels, 3, 3]``, ``outc.conv.weight`` ``[n_classes, 64, 1, 1]``). The model keeps
    milesial's behaviour: ``cat([skip, up])``, BatchNorm, bias-free 3x3 convs (biased ones for a
    checkpoint of his code before v3.0, which has ``inc.double_conv.0.bias``), and any H, W
    (``odd_sizes="pad"``). Key map: ``inc.double_conv.X`` -> ``conv1.conv.X``,
    ``down{i}.maxpool_conv.1.double_conv.X`` -> ``conv{i+1}.conv.X``, ``up{j}.up.*`` ->
    ``up{j+5}.*``, ``up{j}.conv.double_conv.X`` -> ``conv{j+5}.conv.X``, ``outc.conv.*`` ->
    ``conv10.*``.

    Raises ``fastunet.CheckpointError`` (a ``ValueError``) for an unreadable file and naming the
    first missing, unexpected or mis-shaped key or invalid tensor (``check_state_dict``), and
    ``fastunet.LimitError`` for a depth or width over its limit; both before the model is
    allocated.
    """
    bad = sorted(_MILESIAL_INFERRED & set(options))
    if bad:
        raise TypeError(f"from_milesial: {bad} come from the checkpoint; leave them out")
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        sd, container, notes = read_weights_file(path, sniff(path), map_location)
        ck = read_milesial(sd, str(path), bilinear=bilinear)
        ck.container, ck.notes = container, notes + ck.notes
    elif isinstance(state_dict_or_path, dict):
        ck = read_milesial(state_dict_or_path, "the state_dict", bilinear=bilinear, owned=False)
    else:
        raise TypeError(
            "from_milesial expects a state_dict (a dict of tensors) or its path; got "
            f"{type(state_dict_or_path).__name__}"
        )
    return build(ck, cls=cls, **options)


_MILESIAL_INFERRED = {"in_ch", "out_ch", "base_channels", "depth", "preset", "upsampling", "conv_bias"}


def read_milesial(sd: dict, where: str, *, bilinear: bool | None = None, owned: bool = True) -> Checkpoint:
    """milesial's state_dict ``sd`` as a ``fastunet.formats.Checkpoint``: its tensors under
    fastunet's keys (``milesial_paths``), the sizes, mode and conv bias from its shapes, the
    milesial preset of that mode for the rest. A ``mask_values`` entry is ignored and a
    ``module.`` prefix removed. Raises ``CheckpointError`` naming the first missing,
    unexpected or mis-shaped key in milesial's names, ``LimitError`` for sizes over the limits;
    nothing is allocated. ``owned=False``: the tensors are the caller's (a model copies them)."""
    notes = []
    if "mask_values" in sd:
        notes.append("milesial's 'mask_values' entry ignored")
    sd = {k: v for k, v in sd.items() if k != "mask_values"}
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        sd.pop("mask_values", None)
        notes.append("the 'module.' prefix (DataParallel) removed")
    for key in ("inc.double_conv.0.weight", "outc.conv.weight"):
        if not isinstance(sd.get(key), torch.Tensor) or sd[key].dim() != 4:
            raise CheckpointError(
                f"{where} is not a milesial UNet state_dict: it has no 4-D tensor {key!r} (its first keys: "
                f"{list(sd)[:4]})"
            )
    has_up_weight = "up1.up.weight" in sd
    if bilinear is None:
        bilinear = not has_up_weight
    elif bool(bilinear) == has_up_weight:
        raise CheckpointError(
            f"bilinear={bilinear} contradicts {where}: it "
            + ("has up1.up.weight (a transposed-conv checkpoint, bilinear=False)" if has_up_weight
               else "has no up1.up.weight (a bilinear checkpoint, bilinear=True)")
        )  # fmt: skip
    depth = _milesial_depth(sd)
    if depth < 1:
        raise CheckpointError(f"{where} has no down1.* keys: not a milesial UNet state_dict")
    first, head = sd["inc.double_conv.0.weight"], sd["outc.conv.weight"]
    in_ch, base, out_ch = int(first.shape[1]), int(first.shape[0]), int(head.shape[0])
    check_architecture(where, in_ch=in_ch, out_ch=out_ch, base_channels=base, depth=depth)
    preset = "milesial-bilinear" if bilinear else "milesial"
    # Versions of his DoubleConv before v3.0 gave the 3x3 convs a bias.
    conv_bias = "inc.double_conv.0.bias" in sd
    arch = dict(in_ch=in_ch, out_ch=out_ch, base_channels=base, depth=depth, upsampling=PRESETS[preset]["upsampling"],
                norm="batch", conv_bias=conv_bias, pre_head=0)  # fmt: skip
    desc = f"milesial UNet(n_channels={in_ch}, n_classes={out_ch}, bilinear={bool(bilinear)})"
    paths = milesial_paths(depth)
    with torch.device("meta"):  # names and shapes first: a file's sizes are checked before allocating
        ours = UNetReference(in_ch, out_ch, preset=preset, base_channels=base, depth=depth, conv_bias=conv_bias)
    shapes = ours.state_dict()
    expected = {map_key(k, paths): k for k in shapes}
    if None in expected:
        raise AssertionError(f"unmapped key of ours: {expected[None]}")
    for k in expected:
        if k not in sd:
            raise CheckpointError(f"{where} is missing key {k!r} of a {desc}")
    for k, v in sd.items():
        if k not in expected:
            raise CheckpointError(f"{where} has unexpected key {k!r}: a {desc} has no such key")
        want = tuple(shapes[expected[k]].shape)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise CheckpointError(f"{where}: {k!r} has shape {got} but a {desc} needs {want}")
    state = {expected[k]: v for k, v in sd.items()}
    names = {ours: theirs for theirs, ours in expected.items()}
    return Checkpoint(path=where, where=where, format="milesial", container="state_dict", state=state, inferred=arch,
                      recorded=dict(PRESETS[preset]), preset=preset, names=names, notes=notes, owned=owned)  # fmt: skip


# --------------------------------------------------------------------------- accelerate

# Per leaf type, the attributes that must agree for our module to compute what the original's
# does (eps, momentum and Dropout's p are copied from the original instead).
_CONFIG_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    nn.ConvTranspose2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "dilation",
        "groups",
    ),  # fmt: skip
    nn.BatchNorm2d: ("num_features", "affine", "track_running_stats"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.Upsample: ("size", "mode", "align_corners"),
    nn.ReLU: (),
    nn.Identity: (),
    nn.Dropout: (),
}
_COPIED_ATTRS = {nn.BatchNorm2d: ("eps", "momentum"), nn.Dropout: ("p",)}


def _leaf_difference(path: str, theirs_path: str, ours: nn.Module, theirs: nn.Module) -> str | None:
    """What makes ``theirs`` compute differently from ``ours`` (None: nothing)."""
    if type(theirs) is not type(ours):
        return f"{theirs_path} is a {type(theirs).__name__} where {type(ours).__name__} was expected (our {path})"
    for attr in _CONFIG_ATTRS.get(type(ours), ()):
        a, b = getattr(ours, attr), getattr(theirs, attr)
        if a != b:
            return f"{theirs_path}.{attr} is {b!r} where {a!r} was expected"
    if isinstance(ours, nn.Upsample) and float(np.mean(theirs.scale_factor or 0)) != 2.0:
        return f"{theirs_path}.scale_factor is {theirs.scale_factor!r} where 2 was expected"
    for kind in ("_parameters", "_buffers"):
        mine, other = getattr(ours, kind), getattr(theirs, kind)
        for name in mine.keys() | other.keys():
            if (mine.get(name) is None) != (other.get(name) is None):
                has = "has" if other.get(name) is not None else "has no"
                return f"{theirs_path} {has} {name!r} unlike the U-Net's {type(ours).__name__}"
    return None


def _recognise(model: nn.Module) -> tuple[int, int, dict, dict[str, str], str]:
    """``(in_ch, out_ch, options, our path -> theirs, kind)`` for a model ``accelerate`` takes."""
    children = dict(model.named_children())
    if isinstance(model, UNetReference):
        return model.in_ch, model.out_ch, {**model.options, "preset": model.preset}, {}, "fastunet"
    if {"inc", "outc", "down1", "up1"} <= children.keys():
        try:
            first = model.inc.double_conv[0]
            head = model.outc.conv
            up = model.up1.up
        except (AttributeError, IndexError, TypeError) as exc:
            raise TypeError(
                f"{type(model).__name__} has milesial's module names but not its structure ({exc}); expected "
                "inc.double_conv (Conv2d, BatchNorm2d, ReLU, ...), up1.up, outc.conv"
            ) from None
        depth = sum(1 for name in children if re.fullmatch(r"down\d+", name))
        bilinear = isinstance(up, nn.Upsample)
        options = {"preset": "milesial-bilinear" if bilinear else "milesial", "base_channels": first.out_channels,
                   "depth": depth, "conv_bias": first.bias is not None}  # fmt: skip
        return first.in_channels, head.out_channels, options, milesial_paths(depth), "milesial"
    if "conv1" in children and "pool1" in children:
        depth = sum(1 for name in children if re.fullmatch(r"pool\d+", name))
        try:
            first = model.conv1.conv[0]
            head = getattr(model, f"conv{2 * depth + 2}")
        except (AttributeError, IndexError, TypeError) as exc:
            raise TypeError(
                f"{type(model).__name__} has the classic U-Net's names but not its structure ({exc}); expected "
                f"conv1.conv (Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU), ..., the head conv{2 * depth + 2}"
            ) from None
        options = {"base_channels": first.out_channels, "depth": depth}
        return first.in_channels, head.out_channels, options, {}, "classic"
    raise TypeError(
        "accelerate expects the classic U-Net's module tree (conv1, pool1, ..., conv5, up6, conv6, ..., conv10, "
        "as fastunet.UNetReference) or milesial's UNet (inc, down1..down4, up1..up4, outc); got a "
        f"{type(model).__name__} with children {list(children)[:8]}"
    )


class _RenameKeys:
    """A state-dict hook that renames the keys below ``prefix`` through ``mapping`` (picklable,
    unlike a closure). As a state_dict post-hook ours -> the original's, in the original's
    order; as a load_state_dict pre-hook the original's -> ours (other keys are left alone, so
    a state_dict with our keys loads too)."""

    def __init__(self, mapping: dict[str, str], order: Sequence[str] | None = None, metadata: dict | None = None):
        self.mapping, self.metadata = mapping, metadata or {}
        self.rank = {k: i for i, k in enumerate(order)} if order is not None else None
        self.enabled = True  # off inside own_keys()

    def _rename(self, state_dict, prefix: str) -> None:
        hits = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] in self.mapping]
        moved = [(prefix + self.mapping[k[len(prefix) :]], state_dict.pop(k)) for k in hits]
        if self.rank is not None:
            moved.sort(key=lambda kv: self.rank.get(kv[0][len(prefix) :], len(self.rank)))
        for k, v in moved:
            state_dict[k] = v
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None and self.metadata:
            # BatchNorm's version entry is looked up by module path: rename those too.
            for ours, theirs in self.metadata.items():
                key = (prefix + ours) if ours else prefix[:-1]
                if key in meta:
                    meta[(prefix + theirs) if theirs else prefix[:-1]] = meta.pop(key)

    def __call__(self, module, state_dict, prefix, *args) -> None:
        if self.enabled:
            self._rename(state_dict, prefix)


@contextlib.contextmanager
def own_keys(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``state_dict()`` / ``load_state_dict()`` of a model from ``accelerate`` use
    fastunet's own keys (``conv1.conv.0.weight``, ...) instead of the original's: what a
    fastunet checkpoint needs (``with own_keys(fast): fast.save_pretrained(path)``). A no-op for
    any other model."""
    hooks = getattr(model, "_fastunet_key_hooks", ())
    before = [h.enabled for h in hooks]
    for h in hooks:
        h.enabled = False
    try:
        yield model
    finally:
        for h, was in zip(hooks, before, strict=True):
            h.enabled = was


def accelerate(model: nn.Module, *, out_activation: str | None = None) -> UNet:
    """A ``fastunet.UNet`` computing what ``model`` computes, sharing its parameters and buffers.

    ``model``: an instance of the classic U-Net (the module names and types of
    ``fastunet.UNetReference``'s classic tree: ``conv1..conv{2d+2}``, ``pool1..``, ``up{d+2}..``,
    any class; a ``UNetReference`` with options keeps them) or of milesial's ``UNet`` (``inc``,
    ``down1..4``, ``up1..4``, ``outc``, either upsampling mode), recognised by module names,
    types and attributes, not by class name. Its forward cannot be inspected: a classic tree is
    assumed to compute the classic forward (``cat([up, skip])``) and a milesial tree milesial's.

    The returned model holds the *same* ``Parameter`` and buffer objects as ``model``: an
    optimizer built on ``model.parameters()`` trains it, and its BatchNorm running statistics
    land in ``model``'s buffers. Its ``state_dict()`` has ``model``'s keys and
    ``load_state_dict`` takes them (and ours; ``own_keys(model)`` switches to ours, e.g. around
    ``save_pretrained``); ``named_parameters()`` shows our names. It is in ``model``'s
    train/eval mode, module by module (a frozen BatchNorm stays in eval). Move ``model`` to its
    device before calling this: ``.to()`` afterwards replaces buffers (not parameters) on
    whichever model it is called on. Hooks registered on the original's modules are not carried
    over (the returned model has its own modules around the shared tensors).

    out_activation: the classic tree's activation is not visible in its modules, so it is
    ``"sigmoid"`` (the classic model's) unless given; milesial's is ``"none"`` (logits).

    Raises ``TypeError`` saying what was expected and the first difference found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate expects an nn.Module (a U-Net), got {type(model).__name__}")
    in_ch, out_ch, options, paths, kind = _recognise(model)
    if out_activation is not None:
        options["out_activation"] = out_activation
    elif kind == "classic":
        options["out_activation"] = "sigmoid"
    with torch.device("meta"):  # shapes only: every tensor is replaced by the original's below
        ours = UNet(in_ch, out_ch, **options)
    theirs_modules = dict(model.named_modules())
    mapping: dict[str, str] = {}
    meta_map: dict[str, str] = {"": ""}
    used: set[str] = set()
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for path, mine in ours.named_modules():
        if next(mine.children(), None) is not None:
            continue  # containers: the leaves carry the computation and the tensors
        theirs_path = map_key(f"{path}.x", paths)
        theirs_path = theirs_path[:-2] if theirs_path is not None else path
        other = theirs_modules.get(theirs_path)
        if other is None:
            raise TypeError(
                f"{type(model).__name__} ({kind} U-Net) has no module {theirs_path!r} ({type(mine).__name__})"
            )
        if next(other.children(), None) is not None:
            raise TypeError(
                f"{theirs_path} of {type(model).__name__} is a container where a {type(mine).__name__} was expected"
            )
        diff = _leaf_difference(path, theirs_path, mine, other)
        if diff is not None:
            raise TypeError(f"accelerate: not the {kind} U-Net's structure: {diff}")
        used.add(theirs_path)
        pairs.append((mine, other))
        meta_map[path] = theirs_path
        for attr in _COPIED_ATTRS.get(type(mine), ()):
            setattr(mine, attr, getattr(other, attr))
        for store in ("_parameters", "_buffers"):
            for name, tensor in getattr(other, store).items():
                getattr(mine, store)[name] = tensor
                if tensor is not None:
                    mapping[f"{path}.{name}"] = f"{theirs_path}.{name}"
    for theirs_path, other in theirs_modules.items():
        own = [n for n, t in (*other._parameters.items(), *other._buffers.items()) if t is not None]
        container = next(other.children(), None) is not None
        if theirs_path in used or (container and not own):
            continue
        what = f"tensors {own}" if container else f"a module {theirs_path!r} ({type(other).__name__})"
        raise TypeError(
            f"accelerate: {type(model).__name__} has {what}{' at ' + repr(theirs_path) if container else ''} "
            f"that the {kind} U-Net does not have"
        )
    left = [n for n, t in (*ours.named_parameters(), *ours.named_buffers()) if t.is_meta]
    if left:
        raise TypeError(f"accelerate: {type(model).__name__} provides no tensor for our {left[0]}")
    ours.train(model.training)
    for mine, other in pairs:  # e.g. a BatchNorm frozen in eval mode inside a training model
        mine.training = other.training
    if any(k != v for k, v in mapping.items()):
        order = list(model.state_dict().keys())
        reverse = {v: k for k, v in mapping.items()}
        hooks = (_RenameKeys(mapping, order, meta_map), _RenameKeys(reverse))
        ours.register_state_dict_post_hook(hooks[0])
        ours.register_load_state_dict_pre_hook(hooks[1])
        ours._fastunet_key_hooks = hooks  # for own_keys()
    return ours


__all__ = ["from_keras", "from_milesial", "read_keras", "read_milesial", "accelerate", "own_keys"]
