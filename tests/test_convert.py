"""Loaders for other U-Nets' weights (``fastunet.convert``): zhixuhao's Keras ``unet()`` from the
three Keras layouts (written here with h5py, as Keras lays them out), milesial's ``Pytorch-UNet``
checkpoints, and ``fastunet.accelerate`` of a milesial or classic model instance.

The Keras tests start from a ``UNetReference(preset="keras")`` with random weights, write its
convs in Keras' layout (HWIO kernels, Keras' layer order and names), load them back and require
the same tensors and the same outputs. An independent numpy forward of zhixuhao's network (NHWC,
HWIO, TensorFlow's 'same' padding) checks that the layout itself is understood right.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from milesial_unet import MDoubleConv, MilesialUNet
from torch import nn

import fastunet
from fastunet import UNetReference
from fastunet.convert import accelerate, from_keras, from_milesial, own_keys

# --------------------------------------------------------------------------- Keras side


def _keras_model(base=4, depth=4, in_ch=1, out_ch=1, seed=0) -> UNetReference:
    torch.manual_seed(seed)
    model = UNetReference(in_ch, out_ch, preset="keras", base_channels=base, depth=depth).eval()
    with torch.no_grad():  # non-zero biases (he_normal zeroes them), so a dropped bias shows
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def _zhixuhao_convs(model: UNetReference) -> list[nn.Conv2d]:
    """The model's convs in the order zhixuhao's unet() creates its Conv2D layers (written out
    here independently of fastunet.convert)."""
    d = model.depth
    convs = []
    for i in range(1, d + 2):
        seq = getattr(model, f"conv{i}").conv
        convs += [seq[0], seq[3]]
    for k in range(d + 2, 2 * d + 2):
        seq = getattr(model, f"conv{k}").conv
        convs += [getattr(model, f"up{k}").conv, seq[0], seq[3]]
    return [*convs, model.pre_head[0], model.head]


def _get_weights(model: UNetReference) -> list[np.ndarray]:
    """What ``keras_model.get_weights()`` returns for the same network: HWIO kernel, bias, ..."""
    out = []
    for conv in _zhixuhao_convs(model):
        out.append(conv.weight.detach().permute(2, 3, 1, 0).numpy().copy())
        out.append(conv.bias.detach().numpy().copy())
    return out


def _keras_layer_classes(depth: int) -> list[str]:
    """zhixuhao's ``model.layers`` classes in order (the Conv2D entries hold the weights)."""
    seq = ["InputLayer"]
    for level in range(1, depth + 1):
        seq += ["Conv2D", "Conv2D"] + (["Dropout"] if level == depth else []) + ["MaxPooling2D"]
    seq += ["Conv2D", "Conv2D", "Dropout"]
    for _ in range(depth):
        seq += ["UpSampling2D", "Conv2D", "Concatenate", "Conv2D", "Conv2D"]
    return seq + ["Conv2D", "Conv2D"]


_SNAKE = {"InputLayer": "input_layer", "Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d", "Dropout": "dropout",
          "UpSampling2D": "up_sampling2d", "Concatenate": "concatenate"}  # fmt: skip


def _layer_names(depth: int, offset: int = 0) -> list[str]:
    """Per-class counter names (``conv2d``, ``conv2d_1``, ...), the counters starting at ``offset``
    (tf.keras keeps counting across models in a session)."""
    counts: dict[str, int] = {}
    names = []
    for cls in _keras_layer_classes(depth):
        n = counts.get(cls, offset)
        counts[cls] = n + 1
        names.append(_SNAKE[cls] + (f"_{n}" if n else ""))
    return names


def _write_keras3(f: h5py.File, weights: list[np.ndarray], depth: int) -> None:
    """Keras 3's ``save_weights`` layout: /layers/<class>[_n]/vars/<i>, /vars, /optimizer/vars."""
    f.create_group("vars")
    it = iter(weights)
    for cls, name in zip(_keras_layer_classes(depth), _layer_names(depth), strict=True):
        g = f.create_group(f"layers/{name}/vars")
        if cls == "Conv2D":
            g["0"], g["1"] = next(it), next(it)
    f.create_group("optimizer/vars")


def _write_legacy(g: h5py.Group, weights: list[np.ndarray], depth: int, offset: int) -> None:
    """tf.keras 2's layout: layer_names in model order, weight_names per layer."""
    names = _layer_names(depth, offset)
    g.attrs["layer_names"] = [n.encode() for n in names]
    g.attrs["backend"] = b"tensorflow"
    g.attrs["keras_version"] = b"2.15.0"
    it = iter(weights)
    for cls, name in zip(_keras_layer_classes(depth), names, strict=True):
        lg = g.create_group(name)
        if cls == "Conv2D":
            wn = [f"{name}/kernel:0", f"{name}/bias:0"]
            lg.attrs["weight_names"] = [w.encode() for w in wn]
            lg[wn[0]], lg[wn[1]] = next(it), next(it)
        else:
            lg.attrs["weight_names"] = np.array([], dtype="S1")


def _write(layout: str, path, model: UNetReference):
    """Write ``model``'s weights as a Keras file of ``layout``; returns what to pass to from_keras."""
    weights, d = _get_weights(model), model.depth
    if layout == "get_weights":
        return weights
    if layout == "keras3_zip":
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            _write_keras3(f, weights, d)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("config.json", "{}")
            zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
            zf.writestr("model.weights.h5", buf.getvalue())
        return path
    with h5py.File(path, "w") as f:
        if layout == "keras3":
            _write_keras3(f, weights, d)
        elif layout == "legacy_weights":
            # Counters from 7: alphabetical order (conv2d_10 < conv2d_7) is not the model's.
            _write_legacy(f, weights, d, offset=7)
        elif layout == "legacy_model":
            f.attrs["model_config"] = json.dumps({"class_name": "Functional"}).encode()
            f.attrs["keras_version"] = b"2.15.0"
            _write_legacy(f.create_group("model_weights"), weights, d, offset=3)
            f.create_group("optimizer_weights")
    return path


def _tf_conv_same(x: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TensorFlow's Conv2D, stride 1, 'same': NHWC input, HWIO kernel; padding k-1 in total, the
    extra row/column at the bottom/right. Plain numpy, float64."""
    kh, kw = k.shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + w, :], k[i, j])
    return out + b


def _numpy_zhixuhao(weights: list[np.ndarray], x: np.ndarray, depth: int) -> np.ndarray:
    """zhixuhao's unet() forward in numpy (NHWC) from get_weights(): relu convs, 2x2 max-pool,
    nearest x2 upsampling + 2x2 'same' conv, concatenate([skip, up]), sigmoid 1x1 head."""
    it = iter(zip(weights[0::2], weights[1::2], strict=True))

    def conv(t, act=True):
        k, b = next(it)
        y = _tf_conv_same(t, k.astype(np.float64), b.astype(np.float64))
        return np.maximum(y, 0) if act else y

    skips = []
    for _ in range(depth):
        x = conv(conv(x))
        skips.append(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = conv(conv(x))
    for _ in range(depth):
        up = conv(x.repeat(2, axis=1).repeat(2, axis=2))
        x = conv(conv(np.concatenate([skips.pop(), up], axis=3)))
    x = conv(x)  # the 2-channel pre-head
    return 1 / (1 + np.exp(-conv(x, act=False)))


def test_keras_layout_forward_in_numpy_matches_the_loaded_model():
    """Independent check of the layout: a numpy NHWC/HWIO forward of zhixuhao's network with
    TensorFlow's 'same' padding (bottom/right for the 2x2 up conv) equals the loaded model."""
    model = _keras_model(base=4, in_ch=2, out_ch=1, seed=1).double()
    weights = _get_weights(model)
    loaded = from_keras(weights, cls=UNetReference).double().eval()
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    want = _numpy_zhixuhao(weights, x.permute(0, 2, 3, 1).numpy(), depth=4)
    with torch.no_grad():
        got = loaded(x)
    assert_close(got, torch.from_numpy(want).permute(0, 3, 1, 2), "fp64", "loaded keras U-Net vs numpy NHWC forward")


def test_tf_same_padding_of_a_2x2_conv_is_bottom_right():
    """One 2x2 'same' conv: numpy TensorFlow rule vs torch with F.pad(0, 1, 0, 1), and not the
    top/left variant (a wrong side would shift the output by one pixel)."""
    x = np.random.default_rng(0).standard_normal((1, 5, 6, 3))
    k = np.random.default_rng(1).standard_normal((2, 2, 3, 4))
    want = _tf_conv_same(x, k, np.zeros(4))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    wt = torch.from_numpy(k).permute(3, 2, 0, 1)
    got = F.conv2d(F.pad(xt, (0, 1, 0, 1)), wt)
    assert_close(got, torch.from_numpy(want).permute(0, 3, 1, 2), "fp64", "2x2 same conv")
    wrong = F.conv2d(F.pad(xt, (1, 0, 1, 0)), wt)
    assert not torch.allclose(wrong, got)


@pytest.mark.parametrize("layout", ["keras3", "keras3_zip", "legacy_weights", "legacy_model", "get_weights"])
def test_from_keras_loads_each_layout_exactly(tmp_path, layout):
    model = _keras_model(base=4, in_ch=1, out_ch=1)
    source = _write(layout, tmp_path / ("m.keras" if layout == "keras3_zip" else "m.weights.h5"), model)
    loaded = from_keras(source, cls=UNetReference).eval()
    assert loaded.preset == "keras"
    assert (loaded.in_ch, loaded.out_ch, loaded.base_channels, loaded.depth) == (1, 1, 4, 4)
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert list(got_sd) == list(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(got_sd[k], v), k
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


KERAS_FILES = Path(__file__).resolve().parent / "data" / "keras_unet"


@pytest.mark.parametrize("name", ["unet.weights.h5", "unet_full.h5", "unet_weights_legacy.h5"])
def test_from_keras_reads_files_written_by_keras(name):
    """Files saved by real Keras 3.15.1 (zhixuhao's unet() at depth 2, width 2, 2 input channels;
    see data/keras_unet/make_fixtures.py): the loaded model reproduces Keras' own predictions."""
    model = fastunet.UNet.from_keras(KERAS_FILES / name).eval()
    assert (model.in_ch, model.out_ch, model.base_channels, model.depth, model.preset) == (2, 1, 2, 2, "keras")
    x = torch.from_numpy(np.load(KERAS_FILES / "x_nhwc.npy")).permute(0, 3, 1, 2)
    want = torch.from_numpy(np.load(KERAS_FILES / "y_nhwc.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert_close(model(x), want.double(), "fp32", f"from_keras({name}) vs Keras' predict")


def test_from_keras_other_widths_depths_and_the_default_class(tmp_path):
    model = _keras_model(base=8, depth=2, in_ch=3, out_ch=2, seed=3)
    loaded = fastunet.UNet.from_keras(_write("keras3", tmp_path / "m.weights.h5", model))
    assert type(loaded) is fastunet.UNet
    assert (loaded.in_ch, loaded.out_ch, loaded.base_channels, loaded.depth) == (3, 2, 8, 2)
    assert loaded.options["pre_head"] == 2 and loaded.options["upsampling"] == "nearest_conv"
    x = torch.randn(1, 3, 8, 12)
    with torch.no_grad():
        assert_close(loaded.eval()(x), model(x), "fp32", "from_keras depth 2 vs source")


def test_from_keras_reads_keras3_bfloat16_variables(tmp_path):
    """Keras 3 writes a bfloat16 variable as raw 16-bit words tagged attrs['dtype'] = 'bfloat16'."""
    model = _keras_model(base=4, depth=1, seed=4)
    weights = [torch.from_numpy(w).to(torch.bfloat16) for w in _get_weights(model)]
    path = tmp_path / "bf16.weights.h5"
    with h5py.File(path, "w") as f:
        _write_keras3(f, [w.view(torch.int16).numpy() for w in weights], depth=1)
        for name in f["layers"]:
            for ds in f[f"layers/{name}/vars"].values():
                ds.attrs["dtype"] = "bfloat16"
    loaded = from_keras(path, cls=UNetReference)
    convs = _zhixuhao_convs(loaded)
    for conv, kernel, bias in zip(convs, weights[0::2], weights[1::2], strict=True):
        assert torch.equal(conv.weight, kernel.float().permute(3, 2, 0, 1))
        assert torch.equal(conv.bias, bias.float())


def test_from_keras_passes_options_on_and_refuses_inferred_ones():
    weights = _get_weights(_keras_model())
    loaded = from_keras(weights, cls=UNetReference, out_activation="none", dropout=0.0)
    assert loaded.out_activation == "none" and loaded.options["dropout"] == 0.0
    with pytest.raises(TypeError, match="base_channels"):
        from_keras(weights, base_channels=8)


def test_from_keras_errors_name_the_problem(tmp_path):
    weights = _get_weights(_keras_model())
    with pytest.raises(ValueError, match="holds 22 conv layers"):
        from_keras(weights[:10] + weights[14:])
    # 23 layers read as depth 4 without the pre-head; the first layer that then does not fit is named
    with pytest.raises(ValueError, match=r"get_weights\(\)\[10\].*conv layer 6 of 23.*pre_head=0"):
        from_keras(weights[:10] + weights[12:])
    bad = [w.copy() for w in weights]
    bad[8] = np.zeros((3, 3, 8, 5), np.float32)  # conv3's first kernel: wrong output width
    bad[9] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"get_weights\(\)\[8\].*conv layer 5 of 24.*conv3.conv.0"):
        from_keras(bad)
    with pytest.raises(ValueError, match=r"get_weights\(\)\[2\] has shape \(4,\)"):
        from_keras(weights[:2] + [weights[3]] + weights[2:])
    not_keras = tmp_path / "data.h5"
    with h5py.File(not_keras, "w") as f:
        f["images"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="not a Keras model or weights file"):
        from_keras(not_keras)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        from_keras(text)
    with pytest.raises(FileNotFoundError):
        from_keras(tmp_path / "missing.h5")
    with pytest.raises(TypeError, match="get_weights"):
        from_keras(123)
    bn = tmp_path / "bn.weights.h5"
    with h5py.File(bn, "w") as f:
        _write_keras3(f, weights, 4)
        for i in range(4):
            f[f"layers/batch_normalization/vars/{i}"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="'batch_normalization' holds weights but is not a Conv2D"):
        from_keras(bn)
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as f:
        _write_legacy(f, weights, 4, offset=0)
        del f["conv2d_5"]["conv2d_5/bias:0"]
    with pytest.raises(ValueError, match="'conv2d_5/bias:0' of layer 'conv2d_5' is listed but missing"):
        from_keras(legacy)


# --------------------------------------------------------------------------- milesial side


def _milesial(bilinear: bool, seed=0, base=4, n_channels=3, n_classes=2) -> MilesialUNet:
    """A milesial UNet with every BatchNorm non-trivial (statistics from a training batch,
    perturbed affine parameters), in float64."""
    torch.manual_seed(seed)
    m = MilesialUNet(n_channels, n_classes, bilinear=bilinear, base=base).double()
    with torch.no_grad():
        m.train()(torch.randn(4, n_channels, 32, 32, dtype=torch.float64))
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.add_(0.2 * torch.randn_like(bn.weight))
                bn.bias.add_(0.2 * torch.randn_like(bn.bias))
    return m.eval()


@pytest.mark.parametrize("bilinear", [False, True])
def test_from_milesial_matches_milesial_forward(tmp_path, bilinear):
    src = _milesial(bilinear)
    sd = src.state_dict()
    sd["mask_values"] = [0, 1]
    torch.save(sd, tmp_path / "checkpoint.pth")
    for source in (
        sd,
        tmp_path / "checkpoint.pth",
        {f"module.{k}" if k != "mask_values" else k: v for k, v in sd.items()},
    ):
        model = from_milesial(source, cls=UNetReference).eval()
        assert model.preset == ("milesial-bilinear" if bilinear else "milesial")
        assert (model.in_ch, model.out_ch, model.base_channels, model.out_activation) == (3, 2, 4, "none")
        for size in ((32, 32), (37, 45)):  # milesial pads odd sizes (odd_sizes="pad")
            x = torch.randn(2, 3, *size, dtype=torch.float64)
            with torch.no_grad():
                assert_close(model(x), src(x), "fp64", f"from_milesial bilinear={bilinear} {size}")


def test_milesial_before_v3_with_conv_biases(monkeypatch):
    """Checkpoints and models of milesial's code before v3.0 have biased 3x3 convs: conv_bias=True."""
    monkeypatch.setattr(MDoubleConv, "bias", True)
    src = _milesial(False, seed=7)
    assert "inc.double_conv.0.bias" in src.state_dict()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for model in (from_milesial(src.state_dict(), cls=UNetReference).eval(), accelerate(src)):
        assert model.conv_bias is True
        with torch.no_grad():
            assert_close(model(x), src(x), "fp64", f"biased milesial via {type(model).__name__}")


def test_from_milesial_detects_the_mode_and_checks_an_explicit_one():
    sd = _milesial(True).state_dict()
    loaded = fastunet.UNet.from_milesial(sd)
    assert type(loaded) is fastunet.UNet and loaded.preset == "milesial-bilinear"
    assert type(from_milesial(sd)) is fastunet.UNet
    assert from_milesial(sd, cls=UNetReference).options["upsampling"] == "bilinear"
    with pytest.raises(ValueError, match="bilinear=False contradicts.*no up1.up.weight"):
        from_milesial(sd, bilinear=False)
    sd_t = _milesial(False).state_dict()
    assert from_milesial(sd_t, bilinear=False, cls=UNetReference).options["upsampling"] == "transpose"
    with pytest.raises(ValueError, match="bilinear=True contradicts.*has up1.up.weight"):
        from_milesial(sd_t, bilinear=True)
    assert from_milesial(sd_t, cls=UNetReference, out_activation="sigmoid").out_activation == "sigmoid"


def test_from_milesial_errors_name_the_first_bad_key():
    sd = _milesial(False).state_dict()
    missing = dict(sd)
    del missing["down2.maxpool_conv.1.double_conv.4.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'down2.maxpool_conv.1.double_conv.4.running_var'"):
        from_milesial(missing)
    extra = dict(sd, **{"up1.attention.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected key 'up1.attention.weight'"):
        from_milesial(extra)
    wrong = dict(sd, **{"up2.conv.double_conv.0.weight": torch.zeros(16, 32, 5, 5, dtype=torch.float64)})
    with pytest.raises(
        ValueError, match=r"'up2.conv.double_conv.0.weight' has shape \(16, 32, 5, 5\).*needs \(16, 32, 3, 3\)"
    ):
        from_milesial(wrong)
    with pytest.raises(ValueError, match="not a milesial UNet state_dict"):
        from_milesial(UNetReference(3, 1, base_channels=4).state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        from_milesial(42)


# --------------------------------------------------------------------------- accelerate


def _train_step(model, params, x, probe):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        (model(x) * probe).sum().backward()
        opt.step()


@pytest.mark.parametrize("bilinear", [False, True])
def test_accelerate_milesial_shares_tensors_and_trains_the_same(bilinear):
    src = _milesial(bilinear, seed=1)
    twin = copy.deepcopy(src)
    fast = accelerate(src)
    assert type(fast) is fastunet.UNet and not fast.training
    assert fast.out_activation == "none"
    assert {id(p) for p in fast.parameters()} == {id(p) for p in src.parameters()}
    assert {id(b) for b in fast.buffers()} == {id(b) for b in src.buffers()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), twin(x), "fp64", "accelerate eval")
    # Training: same outputs and gradients, running statistics land in the original's buffers,
    # and an optimizer built on the original's parameters trains both identically.
    src.train(), twin.train(), fast.train()
    src.inc.double_conv[1].eval(), twin.inc.double_conv[1].eval()  # a frozen BatchNorm ...
    fast = accelerate(src)  # ... stays frozen in the accelerated model
    assert fast.training and not fast.conv1.conv[1].training and fast.conv1.conv[4].training
    probe = torch.randn(2, 2, 32, 32, dtype=torch.float64)
    y_fast, y_twin = fast(x), twin(x)
    assert_close(y_fast, y_twin, "fp64", "accelerate train forward")
    (y_fast * probe).sum().backward()
    (y_twin * probe).sum().backward()
    for (name, p), q in zip(src.named_parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, "fp64", f"grad {name}")
    for (name, b), c in zip(src.named_buffers(), twin.buffers(), strict=True):
        assert_close(b, c, "fp64", f"buffer {name}")
    _train_step(fast, list(src.parameters()), x, probe)
    _train_step(twin, list(twin.parameters()), x, probe)
    for (name, p), q in zip(src.state_dict().items(), twin.state_dict().values(), strict=True):
        assert_close(p, q, "fp64", f"after 2 SGD steps: {name}")


@pytest.mark.parametrize("bilinear", [False, True])
def test_accelerate_keeps_the_originals_state_dict_keys(bilinear):
    src = _milesial(bilinear, seed=2)
    fast = accelerate(src)
    sd = fast.state_dict()
    assert list(sd) == list(src.state_dict())
    other = _milesial(bilinear, seed=3)
    fast.load_state_dict(other.state_dict(), strict=True)  # milesial keys into the accelerated model
    for k, v in other.state_dict().items():
        assert torch.equal(src.state_dict()[k], v), k  # ... land in the shared tensors
    fresh = _milesial(bilinear, seed=4)
    fresh.load_state_dict(fast.state_dict(), strict=True)  # and back
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), fresh(x), "fp64", "after the state_dict round trip")
    ours_sd = from_milesial(other.state_dict(), cls=UNetReference).double().state_dict()
    fast.load_state_dict(ours_sd, strict=True)  # our own keys load too
    with own_keys(fast):  # fastunet's keys, e.g. for save_pretrained
        assert list(fast.state_dict()) == list(ours_sd)
    assert list(fast.state_dict()) == list(src.state_dict())  # and back to the original's after


class _ClassicCopy(nn.Module):
    """A user's own classic U-Net class: the classic module names and types, its own classes."""

    def __init__(self, in_ch, out_ch, base=4, depth=2):
        super().__init__()
        self.depth = depth
        widths = [base * 2**i for i in range(depth + 1)]

        def block(i, o):
            mod = nn.Module()
            mod.conv = nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                     nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # fmt: skip
            mod.forward = lambda x: mod.conv(x)
            return mod

        prev = in_ch
        for i, w in enumerate(widths, start=1):
            setattr(self, f"conv{i}", block(prev, w))
            if i <= depth:
                setattr(self, f"pool{i}", nn.MaxPool2d(2))
            prev = w
        for k in range(depth + 2, 2 * depth + 2):
            w = widths[2 * depth + 1 - k]
            setattr(self, f"up{k}", nn.ConvTranspose2d(2 * w, w, 2, stride=2))
            setattr(self, f"conv{k}", block(2 * w, w))
        setattr(self, f"conv{2 * depth + 2}", nn.Conv2d(base, out_ch, 1))

    def forward(self, x):
        d, skips = self.depth, []
        for i in range(1, d + 1):
            x = getattr(self, f"conv{i}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i}")(x)
        x = getattr(self, f"conv{d + 1}")(x)
        for k in range(d + 2, 2 * d + 2):
            x = getattr(self, f"conv{k}")(torch.cat([getattr(self, f"up{k}")(x), skips.pop()], 1))
        return torch.sigmoid(getattr(self, f"conv{2 * d + 2}")(x))


def test_accelerate_a_classic_tree_of_another_class():
    torch.manual_seed(5)
    src = _ClassicCopy(2, 3).double().train()
    fast = accelerate(src)
    assert fast.training and fast.out_activation == "sigmoid" and fast.depth == 2
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    twin = copy.deepcopy(src)
    assert_close(fast(x), twin(x), "fp64", "classic copy, train")
    src.eval(), twin.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(x), twin(x), "fp64", "classic copy, eval")
    assert list(fast.state_dict()) == list(src.state_dict())
    assert accelerate(src, out_activation="none").out_activation == "none"


def test_accelerated_model_saves_a_fastunet_checkpoint_under_own_keys(tmp_path):
    src = _milesial(True, seed=8)
    fast = accelerate(src)
    with own_keys(fast):
        fast.save_pretrained(tmp_path)
    loaded = fastunet.load_pretrained(tmp_path)
    assert loaded.options == fast.options
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(loaded.double().eval()(x), src(x), "fp64", "load_pretrained of an accelerated milesial model")


def test_accelerate_a_fastunet_reference_keeps_its_options():
    ref = UNetReference(1, 2, preset="milesial", base_channels=4).double().eval()
    fast = accelerate(ref)
    assert fast.options == ref.options and fast.preset == "milesial"
    x = torch.randn(1, 1, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), ref(x), "fp64", "accelerate(UNetReference(preset='milesial'))")


def test_accelerate_refuses_what_it_does_not_recognise():
    with pytest.raises(TypeError, match="classic U-Net's module tree.*milesial"):
        accelerate(nn.Sequential(nn.Conv2d(3, 3, 3)))
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate("unet")
    m = _milesial(False)
    m.down2.maxpool_conv[1].double_conv[3] = nn.Conv2d(16, 16, 5, padding=2, bias=False).double()
    with pytest.raises(TypeError, match=r"down2.maxpool_conv.1.double_conv.3.kernel_size is \(5, 5\)"):
        accelerate(m)
    m = _milesial(False)
    m.up3.conv.double_conv[1] = nn.GroupNorm(2, 8)
    with pytest.raises(TypeError, match="up3.conv.double_conv.1 is a GroupNorm where BatchNorm2d was expected"):
        accelerate(m)
    m = _milesial(False)
    m.extra = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="'extra' \\(Linear\\)"):
        accelerate(m)
    m = _milesial(True)
    m.up2.up = nn.Upsample(scale_factor=2, mode="nearest")
    with pytest.raises(TypeError, match="up2.up.mode is 'nearest'"):
        accelerate(m)
    m = _ClassicCopy(1, 1)
    m.conv2.conv[0] = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    with pytest.raises(TypeError, match="conv2.conv.0 has no 'bias'"):
        accelerate(m)


def test_docs_convert_block_runs(tmp_path):
    """docs/families.md's 'Other U-Nets' example runs as written: shared tensors, one optimizer step moves
    both models, and the saved state_dict loads into the original with strict=True."""
    from test_readme import doc_blocks, run_block

    (code,) = doc_blocks("convert")
    ns, _ = run_block(code, tmp_path)
    net, fast = ns["net"], ns["fast"]
    assert all(p is q for p, q in zip(net.parameters(), fast.parameters(), strict=True))
    net.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True), strict=True)
