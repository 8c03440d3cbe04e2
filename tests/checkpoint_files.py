"""Small checkpoints of every format fastunet reads (widths 4-8), written the way each ecosystem
writes them, for tests/test_load.py and tests/test_checkpoint_cli.py.

``make(kind, folder)`` writes one and returns ``(path, expected)``: ``expected`` maps each of
fastunet's state_dict keys to the tensor the loaded model must hold, bit for bit, computed here
independently of ``fastunet.load`` (the milesial key map and the Keras HWIO->OIHW transpose are
written out again). The Keras kinds copy the files real Keras wrote (tests/data/keras_unet/,
width 2; see make_fixtures.py there): the ``.keras`` kind zips the Keras 3 weights as Keras does.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import torch
from milesial_unet import MilesialUNet

import fastunet

KERAS_DATA = Path(__file__).parent / "data" / "keras_unet"

#: kind -> (file name, what it is). The formats x commands table of the closing note uses these.
KINDS = {
    "folder": ("saved", "save_pretrained folder (classic)"),
    "folder-keras": ("saved_keras", "save_pretrained folder (keras preset, width 4)"),
    "folder-nnunet": ("saved_nnunet", "save_pretrained folder (nnunet preset: InstanceNorm, LeakyReLU)"),
    "pt": ("unet.pt", "classic state_dict, torch.save"),
    "safetensors": ("unet.safetensors", "classic state_dict, safetensors"),
    "pt-state_dict": ("wrapped.pth", "{'state_dict': ...} wrapper"),
    "pt-model": ("wrapped_model.pt", "{'model': ...} wrapper"),
    "pt-module": ("ddp.pt", "module.-prefixed keys (DataParallel)"),
    "milesial": ("milesial.pth", "milesial UNet(3, 2), transposed-conv ups"),
    "milesial-bilinear": ("milesial_bilinear.pth", "milesial UNet(3, 2, bilinear=True)"),
    "keras3": ("unet.weights.h5", "Keras 3 model.save_weights"),
    "keras3-archive": ("unet.keras", "Keras 3 .keras archive"),
    "tf-keras-model": ("unet_full.h5", "tf.keras model.save (.h5)"),
    "tf-keras-weights": ("unet_weights_legacy.h5", "tf.keras save_weights (.h5)"),
}


def classic_model(seed: int = 3, **options) -> fastunet.UNetReference:
    """UNetReference(3, 1, base_channels=4, depth=2) with random BatchNorm statistics and
    InstanceNorm affines (so a lost buffer or parameter shows), in eval mode."""
    torch.manual_seed(seed)
    model = fastunet.UNetReference(3, 1, base_channels=4, depth=2, **options)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            if isinstance(m, torch.nn.InstanceNorm2d):  # affine (nnU-Net's): its parameters start at 1, 0
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model.eval()


def _own(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def milesial_model(bilinear: bool, seed: int = 5) -> MilesialUNet:
    torch.manual_seed(seed)
    model = MilesialUNet(3, 2, bilinear=bilinear, base=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def milesial_to_ours(state: dict[str, torch.Tensor], depth: int = 4) -> dict[str, torch.Tensor]:
    """milesial's keys as fastunet's, written out from his module names (independent of
    fastunet.convert's map)."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "inc":
            name = "conv1.conv." + rest.removeprefix("double_conv.")
        elif head.startswith("down"):
            i = int(head[4:])
            name = f"conv{i + 1}.conv." + rest.removeprefix("maxpool_conv.1.double_conv.")
        elif head.startswith("up"):
            j = int(head[2:])
            if rest.startswith("up."):
                name = f"up{j + depth + 1}." + rest.removeprefix("up.")
            else:
                name = f"conv{j + depth + 1}.conv." + rest.removeprefix("conv.double_conv.")
        else:  # outc.conv.*
            name = f"conv{2 * depth + 2}." + rest.removeprefix("conv.")
        out[name] = value.detach().clone()
    return out


def keras_expected(path: Path) -> dict[str, torch.Tensor]:
    """The fastunet state_dict of a Keras file of zhixuhao's unet(), from the HDF5 datasets
    (HWIO kernels transposed to OIHW), in zhixuhao's layer order."""
    import h5py

    with h5py.File(path, "r") as f:
        if "layers" in f:
            names = sorted((n for n in f["layers"] if n.startswith("conv2d")),
                           key=lambda n: int(n.rpartition("_")[2]) if "_" in n[6:] else 0)  # fmt: skip
            arrays = [(f[f"layers/{n}/vars/0"][()], f[f"layers/{n}/vars/1"][()]) for n in names]
        else:
            g = f["model_weights"] if "model_weights" in f else f
            arrays = []
            for layer in g.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else layer
                wn = [w.decode() if isinstance(w, bytes) else w for w in g[layer].attrs["weight_names"]]
                if wn:
                    arrays.append((g[layer][wn[0]][()], g[layer][wn[1]][()]))
    depth = (len(arrays) - 4) // 5
    modules = []
    for i in range(1, depth + 2):
        modules += [f"conv{i}.conv.0", f"conv{i}.conv.3"]
    for k in range(depth + 2, 2 * depth + 2):
        modules += [f"up{k}.conv", f"conv{k}.conv.0", f"conv{k}.conv.3"]
    modules += ["pre_head.0", f"conv{2 * depth + 2}"]
    out = {}
    for module, (kernel, bias) in zip(modules, arrays, strict=True):
        out[f"{module}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        out[f"{module}.bias"] = torch.from_numpy(bias.copy())
    return out


def make(kind: str, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the checkpoint ``kind`` (a key of ``KINDS``) into ``folder``; returns its path and
    the fastunet state_dict a load must give (bit-exact)."""
    from safetensors.torch import save_file

    path = Path(folder) / KINDS[kind][0]
    if kind.startswith("folder"):
        presets = {"folder": {}, "folder-keras": {"preset": "keras", "out_activation": "none"},
                   "folder-nnunet": {"preset": "nnunet"}}  # fmt: skip
        model = classic_model(**presets[kind])
        fastunet.save_pretrained(model, path)
        return path, _own(model)
    if kind.startswith("milesial"):
        model = milesial_model(bilinear=kind == "milesial-bilinear")
        state = model.state_dict()
        torch.save({**state, "mask_values": [0, 1]}, path)  # milesial's train.py stores mask_values
        return path, milesial_to_ours(state)
    if kind.startswith("keras3-archive"):
        buf = io.BytesIO((KERAS_DATA / "unet.weights.h5").read_bytes())
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
            zf.writestr("config.json", json.dumps({"class_name": "Functional"}))
            zf.writestr("model.weights.h5", buf.getvalue())
        return path, keras_expected(KERAS_DATA / "unet.weights.h5")
    if kind in ("keras3", "tf-keras-model", "tf-keras-weights"):
        shutil.copyfile(KERAS_DATA / path.name, path)
        return path, keras_expected(path)
    model = classic_model()
    state = _own(model)
    if kind == "pt":
        torch.save(state, path)
    elif kind == "safetensors":
        save_file(state, str(path))
    elif kind == "pt-state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif kind == "pt-model":
        torch.save({"model": state, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    elif kind == "pt-module":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        raise KeyError(kind)
    return path, state
