"""A fastunet model's weights in the other ecosystems' files, the inverses of the readers
(``convert.read_keras``, ``convert.read_milesial``), so that writing and reading back is
bit-exact:

* ``save_keras_h5(model, path)``: zhixuhao's Keras ``unet()`` weights, in the layout Keras
  3.15 writes (tests/data/keras_unet/ holds files Keras wrote): ``X.weights.h5`` in Keras 3's
  (``model.load_weights`` of Keras 3), any other ``X.h5`` in the tf.keras ``save_weights`` one
  (``model.load_weights`` of tf.keras 2 and of Keras 3). Kernels HWIO, float32.
* ``save_milesial(model, path)``: milesial's ``Pytorch-UNet`` state_dict (his ``predict.py``
  loads it; ``mask_values`` is his training script's and not written), ``torch.save`` or, for a
  ``.safetensors`` path, safetensors.

``incompatibility(model, target)`` says why a model cannot be written in a format (None: it
can), and ``unrecorded(model, target)`` which of its options the file cannot hold and will read
back differently. Both writers write to a temporary name and rename (``fastunet.atomic``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .convert import keras_targets, map_key, milesial_paths
from .formats import WEIGHT_OPTIONS
from .reference import DEFAULT_OPTIONS, PRESETS

__all__ = ["TARGETS", "incompatibility", "unrecorded", "save_keras_h5", "save_milesial"]

#: target -> (what it is, the options its architecture must have, the preset its reader uses).
TARGETS = {
    "keras-h5": ("zhixuhao's Keras unet()", {"upsampling": ("nearest_conv",), "norm": ("none",), "act": ("relu",),
                 "concat": ("skip_up",)}, "keras"),
    "milesial": ("milesial's Pytorch-UNet", {"upsampling": ("transpose", "bilinear"), "norm": ("batch",),
                 "act": ("relu",), "concat": ("skip_up",), "pre_head": (0,)}, "milesial"),
}  # fmt: skip


def incompatibility(model, target: str) -> str | None:
    """Why ``model`` (a ``UNet``/``UNetReference``) has no ``target`` file (``"keras-h5"``,
    ``"milesial"``), in one sentence; None when it has one."""
    what, needs, _ = TARGETS[target]
    options = model.options
    bad = [f"{k}={options[k]!r}" for k, allowed in needs.items() if options[k] not in allowed]
    if not bad:
        return None
    has = ", ".join(f"{k}={' or '.join(map(repr, v))}" for k, v in needs.items())
    return f"{what} has {has}; this model has {', '.join(bad)}"


def unrecorded(model, target: str) -> list[str]:
    """The options of ``model`` a ``target`` file does not hold and that its reader would set
    otherwise (``"out_activation='sigmoid' (read back as 'none')"``), for the message that
    says how to load it back the same."""
    preset = TARGETS[target][2]
    if target == "milesial" and model.upsampling == "bilinear":
        preset = "milesial-bilinear"
    reads = PRESETS[preset]
    options = model.options
    return [
        f"{k}={options[k]!r} (read back as {reads[k]!r})"
        for k in DEFAULT_OPTIONS
        if k not in WEIGHT_OPTIONS and options[k] != reads[k]
    ]


def _keras_layers(depth: int, pre_head: bool) -> list[str]:
    """zhixuhao's ``model.layers`` as Keras names them: the class in snake case with a counter
    per class (``conv2d``, ``conv2d_1``, ...), in model order."""
    classes = ["input_layer"]
    for level in range(1, depth + 1):
        classes += ["conv2d", "conv2d", *(["dropout"] if level == depth else []), "max_pooling2d"]
    classes += ["conv2d", "conv2d", "dropout"]
    for _ in range(depth):
        classes += ["up_sampling2d", "conv2d", "concatenate", "conv2d", "conv2d"]
    classes += ["conv2d"] * (2 if pre_head else 1)
    counts: dict[str, int] = {}
    names = []
    for cls in classes:
        n = counts.get(cls, 0)
        counts[cls] = n + 1
        names.append(f"{cls}_{n}" if n else cls)
    return names


def save_keras_h5(model, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights (a keras-shaped ``UNet``: ``incompatibility(model, "keras-h5")``
    None) to ``path`` as Keras does: the Keras 3 layout for a ``.weights.h5`` name
    (``layers/conv2d_N/vars/0`` kernel, ``/1`` bias), else tf.keras' (``layer_names``, per layer
    ``weight_names``). Float32 HWIO kernels. Needs h5py. Returns ``path``."""
    problem = incompatibility(model, "keras-h5")
    if problem:
        raise ValueError(f"cannot write a Keras file: {problem}")
    import h5py

    path = Path(path)
    names = _keras_layers(model.depth, model.pre_head_channels > 0)
    convs = iter(module for _, module in keras_targets(model))
    weights = {}
    for name in names:
        if name.startswith("conv2d"):
            conv = next(convs)
            kernel = conv.weight.detach().to("cpu", torch.float32).permute(2, 3, 1, 0).numpy()
            weights[name] = [np.ascontiguousarray(kernel)]
            if conv.bias is not None:
                weights[name].append(conv.bias.detach().to("cpu", torch.float32).numpy())
    from . import __version__

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if path.name.endswith(".weights.h5"):
            for name in names:
                group = f.create_group(f"layers/{name}/vars")
                group.attrs["name"] = name
                for i, array in enumerate(weights.get(name, [])):
                    group[str(i)] = array
            f.create_group("vars").attrs["name"] = "functional"
        else:
            f.attrs["backend"] = "tensorflow"
            f.attrs["keras_version"] = "3.15.1"  # the layout of that version's legacy save_weights
            f.attrs["layer_names"] = names
            for name in [*names, "top_level_model_weights"]:
                group = f.create_group(name)
                parts = ("kernel", "bias")[: len(weights.get(name, []))]
                # Keras writes an empty list of names as an empty float64 array
                group.attrs["weight_names"] = [f"{name}/{p}" for p in parts] or np.array([], np.float64)
                for part, array in zip(parts, weights.get(name, []), strict=True):
                    group[f"{name}/{part}"] = array
        f.attrs["fastunet_version"] = __version__
    return path


def milesial_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s state_dict under milesial's keys (``inc.double_conv.0.weight``, ...), in his
    module order; the tensors detached, on the CPU, as they are."""
    problem = incompatibility(model, "milesial")
    if problem:
        raise ValueError(f"cannot write a milesial checkpoint: {problem}")
    paths = milesial_paths(model.depth)
    return {map_key(k, paths): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_milesial(model, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights (a milesial-shaped ``UNet``: ``incompatibility(model,
    "milesial")`` None) to ``path`` as milesial's state_dict: ``torch.save`` (what his
    ``predict.py`` loads), or safetensors for a ``.safetensors`` path. Returns ``path``."""
    state = milesial_state_dict(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return path
