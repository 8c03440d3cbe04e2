"""The architecture options and presets of the eager reference (issue 10), checked against
independent transcriptions of the U-Nets they stand for:

* milesial's ``Pytorch-UNet`` ``UNet(n_channels, n_classes, bilinear)``, written here with its own
  module names (``inc``, ``down*``, ``up*``, ``outc``) and its own forward (``F.pad`` of the
  upsampled map, ``torch.cat([x2, x1])``), loaded with our weights through the agreed key map;
* zhixuhao's Keras ``unet()``, written here as channels-first functional torch code.

Equal outputs (eval and train mode), equal gradients, in float64 on fresh random data; then
the option errors, presets and overrides, the classic state_dict, and checkpoints with options.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_live, max_rel_error, randomize_batchnorm
from milesial_unet import MilesialUNet
from torch import nn

import fastunet
from fastunet import PRESETS, NearestConvUp, UNet, UNetReference
from fastunet.checkpoint import CONFIG_NAME, CheckpointError

pytestmark = pytest.mark.model

TOL = "fp64"


# ---------------------------------------------------------------- milesial's UNet (tests/milesial_unet.py)
def milesial_name(ours: str) -> str:
    """The agreed key map (depth 4), ours -> milesial's."""
    head, _, rest = ours.partition(".")
    n = int(head[-1] if head[-2:] != "10" else 10)
    if head.startswith("conv") and n == 1:
        return f"inc.double_conv.{rest.removeprefix('conv.')}"
    if head.startswith("conv") and 2 <= n <= 5:
        return f"down{n - 1}.maxpool_conv.1.double_conv.{rest.removeprefix('conv.')}"
    if head.startswith("up"):
        return f"up{n - 5}.up.{rest}"
    if head.startswith("conv") and 6 <= n <= 9:
        return f"up{n - 5}.conv.double_conv.{rest.removeprefix('conv.')}"
    assert head == "conv10", ours
    return f"outc.conv.{rest}"


def _milesial_pair(bilinear: bool, base: int):
    preset = "milesial-bilinear" if bilinear else "milesial"
    # calibrated on a 64 x 64 batch (4 x 4 at the bottleneck): live in eval too, see model_pair
    ours = randomize_batchnorm(UNetReference(3, 2, preset=preset, base_channels=base), torch.randn(2, 3, 64, 64))
    assert_live(ours.double(), 3, 64)
    theirs = MilesialUNet(3, 2, bilinear=bilinear, base=base).double()
    theirs.load_state_dict({milesial_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


def compare_milesial(bilinear: bool, base: int, size: tuple[int, int]) -> dict[str, float]:
    """Ours vs the transcription: eval output, train output (BatchNorm batch statistics) and the
    running statistics it leaves, gradients of the input and every parameter. Asserts within the
    fp64 tolerance; returns the worst ``max_rel_error`` of each kind."""
    ours, theirs = _milesial_pair(bilinear, base)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    errors = {}
    with torch.no_grad():
        y_ours, y_theirs = ours.eval()(x), theirs.eval()(x)
    assert_close(y_ours, y_theirs, TOL, "eval output")
    errors["eval"] = max_rel_error(y_ours, y_theirs)

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours.train()(xa), theirs.train()(xb)
    assert_close(y_ours, y_theirs, TOL, "train output")
    errors["train"] = max_rel_error(y_ours, y_theirs)
    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_theirs.backward(grad_out)
    theirs_state = theirs.state_dict()
    for name, buf in ours.named_buffers():
        assert_close(buf, theirs_state[milesial_name(name)], TOL, f"buffer {name}")
    pairs = [("input", xa.grad, xb.grad)]
    theirs_params = dict(theirs.named_parameters())
    pairs += [(n, p.grad, theirs_params[milesial_name(n)].grad) for n, p in ours.named_parameters()]
    errors["grad"] = 0.0
    for name, g_ours, g_theirs in pairs:
        assert g_ours is not None and g_theirs is not None, name
        assert_close(g_ours, g_theirs, TOL, f"grad {name}")
        errors["grad"] = max(errors["grad"], max_rel_error(g_ours, g_theirs))
    return errors


# 23x29 is odd at most levels (23 -> 11 -> 5 -> 2 -> 1, 29 -> 14 -> 7 -> 3 -> 1). Quick mode runs one
# narrow case per variant; the full suite (slow tests) runs every variant at every size.
_MILESIAL_CASES = [
    (bilinear, base, size)
    for bilinear, base in ((False, 4), (True, 4), (True, 3))
    for size in ((32, 32), (23, 29), (64, 64), (37, 53))
] + [(False, 2, (23, 29)), (True, 2, (32, 32))]
_MILESIAL_QUICK = {(False, 2, (23, 29)), (True, 3, (23, 29))}


def _milesial_id(case):
    bilinear, base, (h, w) = case
    return f"{'bilinear' if bilinear else 'transpose'}-base{base}-{h}x{w}"


@pytest.mark.parametrize(
    "bilinear, base, size",
    [
        pytest.param(*c, marks=() if c in _MILESIAL_QUICK else pytest.mark.slow, id=_milesial_id(c))
        for c in _MILESIAL_CASES
    ],
)
def test_milesial_preset_equals_transcription(bilinear, base, size):
    """An odd base width is fine for bilinear too: every decoder conv halves a width
    ``base * 2**i`` with i >= 1, which is always even (milesial's ``// factor`` never rounds)."""
    compare_milesial(bilinear, base, size)


@pytest.mark.parametrize("bilinear", [False, True], ids=["transpose", "bilinear"])
def test_milesial_parameter_count_and_key_map(bilinear):
    with torch.device("meta"):  # shapes only: no time spent initializing 2 x 31M parameters
        ours = UNetReference(3, 1, preset="milesial-bilinear" if bilinear else "milesial")
        theirs = MilesialUNet(3, 1, bilinear=bilinear)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    # the map is a bijection onto milesial's state_dict, shapes included
    mapped = {milesial_name(k): tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


# ---------------------------------------------------------------- zhixuhao's Keras unet(), transcribed
KERAS_NAMES = (
    [f"conv{i}_{j}" for i in range(1, 6) for j in (1, 2)]
    + [name for k in range(6, 10) for name in (f"up{k}", f"conv{k}_1", f"conv{k}_2")]
    + ["conv9_3", "conv10"]
)


def keras_to_ours(name: str) -> str:
    """Keras layer name -> our module path (its ``.weight``/``.bias`` are the layer's kernel/bias)."""
    if name == "conv9_3":
        return "pre_head.0"
    if name == "conv10":
        return "conv10"
    if name.startswith("up"):
        return f"{name}.conv"
    level, j = name.removeprefix("conv").split("_")
    return f"conv{level}.conv.{0 if j == '1' else 3}"


def keras_unet(x: torch.Tensor, p: dict, *, training: bool) -> torch.Tensor:
    """zhixuhao's ``unet()`` channels-first: ``p[name] = (kernel [out, in, k, k], bias [out])``.

    Conv2D(..., padding='same'): 3x3 pads one pixel each side; 2x2 pads one row/column after
    (TensorFlow splits an odd total padding with the extra at the end); 1x1 pads nothing.
    """

    def conv(t, name, relu=True):
        kernel, bias = p[name]
        k = kernel.shape[-1]
        t = F.pad(t, (1, 1, 1, 1) if k == 3 else (0, 1, 0, 1) if k == 2 else (0, 0, 0, 0))
        y = F.conv2d(t, kernel, bias)
        return F.relu(y) if relu else y

    def up(t, name):  # Conv2D(w, 2, relu, 'same')(UpSampling2D(size=(2, 2))(t))
        return conv(F.interpolate(t, scale_factor=2, mode="nearest"), name)

    def drop(t):
        return F.dropout(t, 0.5, training=training)

    conv1 = conv(conv(x, "conv1_1"), "conv1_2")
    pool1 = F.max_pool2d(conv1, 2)
    conv2 = conv(conv(pool1, "conv2_1"), "conv2_2")
    pool2 = F.max_pool2d(conv2, 2)
    conv3 = conv(conv(pool2, "conv3_1"), "conv3_2")
    pool3 = F.max_pool2d(conv3, 2)
    conv4 = conv(conv(pool3, "conv4_1"), "conv4_2")
    drop4 = drop(conv4)
    pool4 = F.max_pool2d(drop4, 2)
    conv5 = conv(conv(pool4, "conv5_1"), "conv5_2")
    drop5 = drop(conv5)
    up6 = up(drop5, "up6")
    conv6 = conv(conv(torch.cat([drop4, up6], 1), "conv6_1"), "conv6_2")
    up7 = up(conv6, "up7")
    conv7 = conv(conv(torch.cat([conv3, up7], 1), "conv7_1"), "conv7_2")
    up8 = up(conv7, "up8")
    conv8 = conv(conv(torch.cat([conv2, up8], 1), "conv8_1"), "conv8_2")
    up9 = up(conv8, "up9")
    conv9 = conv(conv(torch.cat([conv1, up9], 1), "conv9_1"), "conv9_2")
    conv9 = conv(conv9, "conv9_3")
    return torch.sigmoid(conv(conv9, "conv10", relu=False))


def keras_parameter_count(in_ch: int, out_ch: int, base: int = 64) -> int:
    """Parameters of zhixuhao's ``unet()`` counted from its layer list: (kernel, in, out) per Conv2D."""
    widths = [base * 2**i for i in range(5)]
    layers, c = [], in_ch
    for w in widths:
        layers += [(3, c, w), (3, w, w)]
        c = w
    for w in reversed(widths[:-1]):
        layers += [(2, c, w), (3, 2 * w, w), (3, w, w)]
        c = w
    layers += [(3, base, 2), (1, 2, out_ch)]
    return sum(k * k * ci * co + co for k, ci, co in layers)


def compare_keras(base: int, size: tuple[int, int], out_ch: int = 1) -> dict[str, float]:
    """``UNetReference(preset="keras")`` vs ``keras_unet`` with the same weights: eval, train with
    dropout (both seeded alike: the two dropouts draw their masks in the same order), gradients."""
    ours = UNetReference(1, out_ch, preset="keras", base_channels=base).double()
    for p in ours.parameters():  # he_normal leaves the biases zero: give them values to check
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.1)
    modules = dict(ours.named_modules())
    params = {
        name: (
            modules[keras_to_ours(name)].weight.detach().clone().requires_grad_(),
            modules[keras_to_ours(name)].bias.detach().clone().requires_grad_(),
        )
        for name in KERAS_NAMES
    }
    assert sum(w.numel() + b.numel() for w, b in params.values()) == sum(p.numel() for p in ours.parameters())
    x = torch.rand(2, 1, *size, dtype=torch.float64)
    errors = {}
    with torch.no_grad():
        y_ours, y_keras = ours.eval()(x), keras_unet(x, params, training=False)
    # the sigmoid squeezes the differences a wrong wiring makes: compare the logits as well
    assert_close(y_ours, y_keras, TOL, "eval output")
    assert_close(torch.logit(y_ours), torch.logit(y_keras), TOL, "eval logits")
    errors["eval"] = max_rel_error(torch.logit(y_ours), torch.logit(y_keras))

    ours.train()
    torch.manual_seed(1234)
    y_ours = ours(x)
    torch.manual_seed(1234)
    y_keras = keras_unet(x, params, training=True)
    assert_close(y_ours, y_keras, TOL, "train output (dropout)")
    assert_close(torch.logit(y_ours), torch.logit(y_keras), TOL, "train logits (dropout)")
    errors["train"] = max_rel_error(torch.logit(y_ours), torch.logit(y_keras))
    # dropout was active: the same weights without it give something else
    with torch.no_grad():
        assert not torch.allclose(y_keras, keras_unet(x, params, training=False))
    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_keras.backward(grad_out)
    errors["grad"] = 0.0
    for name in KERAS_NAMES:
        module = modules[keras_to_ours(name)]
        for ours_p, keras_p, what in (
            (module.weight, params[name][0], "kernel"),
            (module.bias, params[name][1], "bias"),
        ):
            assert_close(ours_p.grad, keras_p.grad, TOL, f"grad {name} {what}")
            errors["grad"] = max(errors["grad"], max_rel_error(ours_p.grad, keras_p.grad))
    return errors


@pytest.mark.parametrize(
    "base, size",
    [
        (2, (32, 32)),
        pytest.param(4, (32, 32), marks=pytest.mark.slow),
        pytest.param(4, (48, 64), marks=pytest.mark.slow),
    ],
    ids=["base2-32x32", "base4-32x32", "base4-48x64"],
)
def test_keras_preset_equals_transcription(base, size):
    compare_keras(base=base, size=size)


def test_keras_parameter_count():
    """zhixuhao's model summary says 31,031,685 parameters (1 -> 1 channel, base 64); the count
    from the layer list agrees, and so does ours."""
    assert keras_parameter_count(1, 1) == 31_031_685
    for in_ch, out_ch, base in ((1, 1, 64), (3, 2, 8)):
        with torch.device("meta"):
            ours = UNetReference(in_ch, out_ch, preset="keras", base_channels=base)
        assert sum(p.numel() for p in ours.parameters()) == keras_parameter_count(in_ch, out_ch, base)


def test_nearest_conv_up_is_tensorflow_same():
    """NearestConvUp on a tiny input, written out by hand: nearest x2, one zero row/column at the
    bottom/right, a 2x2 valid conv, ReLU."""
    up = NearestConvUp(1, 1).double()
    with torch.no_grad():
        up.conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
        up.conv.bias.fill_(-3.0)
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)  # 1x2 -> 2x4
    # upsampled and padded: [[1, 1, 2, 2, 0], [1, 1, 2, 2, 0], [0, 0, 0, 0, 0]]; out[i, j] =
    # relu(p[i, j] + 2 p[i, j+1] + 3 p[i+1, j] + 4 p[i+1, j+1] - 3)
    expected = torch.tensor([[[[7.0, 13.0, 17.0, 5.0], [0.0, 2.0, 3.0, 0.0]]]], dtype=torch.float64)
    y = up(x)
    assert_close(y, expected, TOL, "NearestConvUp")


def test_he_normal_statistics():
    """Keras' he_normal: samples' standard deviation sqrt(2 / fan_in), cut at 2 standard deviations
    of the underlying normal, zero biases; BatchNorm left as torch's (ones and zeros)."""
    model = UNetReference(1, 1, base_channels=16, depth=3, init="he_normal")
    w = model.conv3.conv[3].weight  # [64, 64, 3, 3]: 36,864 samples
    fan_in = w.shape[1] * 9
    target = math.sqrt(2 / fan_in)
    # std of a sample standard deviation is about std / sqrt(2n): allow five of those
    assert abs(w.std().item() - target) < 5 * target / math.sqrt(2 * w.numel())
    assert w.abs().max().item() <= 2 * target / 0.87962566103423978
    assert abs(w.mean().item()) < 5 * target / math.sqrt(w.numel())
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 2 * 7 + 3 + 1
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    assert torch.equal(model.conv1.conv[1].weight, torch.ones(16))


# ---------------------------------------------------------------- option errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"preset": "unet++"},
            r"unknown preset 'unet\+\+'; the presets are 'classic', 'keras', 'milesial', 'milesial-bilinear', 'nnunet'",
        ),
        ({"preset": 4}, "unknown preset 4"),
        (
            {"upsampling": "deconv"},
            r"upsampling must be one of \('transpose', 'nearest_conv', 'bilinear'\), got 'deconv'",
        ),
        ({"norm": "group"}, r"norm must be one of \('batch', 'instance', 'none'\)"),
        ({"act": "gelu"}, r"act must be one of \('relu', 'leaky_relu'\), got 'gelu'"),
        ({"act": None, "norm": "layer", "preset": "nnunet"}, r"norm must be one of"),
        ({"conv_bias": 1}, "conv_bias must be True or False, got 1"),
        ({"concat": "sum"}, r"concat must be one of \('up_skip', 'skip_up'\)"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": float("nan")}, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": "0.5"}, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": True}, r"dropout must be a float in \[0, 1\)"),
        ({"pre_head": -1}, r"pre_head must be an int >= 0"),
        ({"pre_head": 2.0}, r"pre_head must be an int >= 0"),
        ({"odd_sizes": "crop"}, r"odd_sizes must be one of \('error', 'pad'\)"),
        ({"init": "xavier"}, r"init must be one of \('torch', 'he_normal'\)"),
        ({"out_activation": "tanh", "preset": "keras"}, "out_activation"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetReference(3, 1, base_channels=4, **kwargs)


def test_double_conv_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        fastunet.DoubleConv(3, 4, norm="layer")
    with pytest.raises(ValueError, match="act must be one of"):
        fastunet.DoubleConv(3, 4, act="elu")


def test_nnunet_block_is_nnunets_conv_norm_nonlin():
    """``DoubleConv(norm="instance", act="leaky_relu")`` is two of nnU-Net's ConvDropoutNormReLU
    (dynamic_network_architectures) as nnU-Net configures them for 2D: ``nn.Conv2d(k=3, padding
    1, bias=True)``, no dropout, ``nn.InstanceNorm2d(eps=1e-5, affine=True)``,
    ``nn.LeakyReLU(inplace=True)`` (slope 0.01): the same modules, the same state_dict, and per
    sample and channel statistics in eval as in training."""
    ours = fastunet.DoubleConv(3, 5, norm="instance", act="leaky_relu").double()
    norm_kwargs, nonlin_kwargs = {"eps": 1e-5, "affine": True}, {"inplace": True}
    theirs = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.InstanceNorm2d(5, **norm_kwargs), nn.LeakyReLU(**nonlin_kwargs),
        nn.Conv2d(5, 5, 3, padding=1, bias=True), nn.InstanceNorm2d(5, **norm_kwargs), nn.LeakyReLU(**nonlin_kwargs),
    ).double()  # fmt: skip
    assert [repr(m) for m in ours.conv] == [repr(m) for m in theirs]
    randomize_batchnorm(theirs)
    ours.conv.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64) * 3 + 1
    for train in (True, False):
        ours.train(train), theirs.train(train)
        y = ours(x)
        assert_close(y, theirs(x), TOL, f"nnU-Net block, train={train}")
    with torch.no_grad():  # in eval: sample 1's norm output is its own standardized conv output
        z, norm = ours.conv[0](x)[1], ours.conv[1]
        standard = (ours.conv[:2](x)[1] - norm.bias[:, None, None]) / norm.weight[:, None, None]
        var = z.var((1, 2), unbiased=False)
        assert_close(standard.mean((1, 2)), torch.zeros(5, dtype=torch.float64), TOL, "per-sample mean", scale=1.0)
        assert_close(standard.var((1, 2), unbiased=False), var / (var + norm.eps), TOL, "per-sample variance")
    model = UNetReference(3, 2, base_channels=4, depth=2, preset="nnunet")
    assert {type(m) for m in model.modules()} >= {nn.InstanceNorm2d, nn.LeakyReLU, nn.ConvTranspose2d}
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in model.modules())


@pytest.mark.parametrize("cls", [UNetReference, UNet])
def test_pad_mode_input_sizes(cls):
    """odd_sizes="pad": any H, W >= 2**depth; smaller is refused naming the minimum. "error"
    keeps the classic rule (multiples of 2**depth)."""
    model = UNetReference(3, 1, base_channels=2, depth=3, odd_sizes="pad").eval()
    assert model(torch.randn(1, 3, 8, 13)).shape == (1, 1, 8, 13)
    with pytest.raises(ValueError, match=r"at least 8 .*got H=7, W=13; the smallest valid size is H=8, W=13"):
        model(torch.randn(1, 3, 7, 13))
    classic = cls(3, 1, base_channels=2, depth=3).eval()
    with pytest.raises(ValueError, match="divisible by 8"):
        classic(torch.randn(1, 3, 8, 13))


# ---------------------------------------------------------------- presets, overrides, module tree
AGREED_PRESETS = {
    "keras": dict(upsampling="nearest_conv", norm="none", conv_bias=True, concat="skip_up", dropout=0.5, pre_head=2,
                  out_activation="sigmoid", init="he_normal"),
    "milesial": dict(upsampling="transpose", norm="batch", conv_bias=False, concat="skip_up", odd_sizes="pad",
                     out_activation="none"),
    "milesial-bilinear": dict(upsampling="bilinear", norm="batch", conv_bias=False, concat="skip_up", odd_sizes="pad",
                              out_activation="none"),
    "nnunet": dict(norm="instance", act="leaky_relu", out_activation="none", init="he_normal"),
}  # fmt: skip
CLASSIC = dict(out_activation="sigmoid", upsampling="transpose", norm="batch", act="relu", conv_bias=True,
               concat="up_skip", dropout=0.0, pre_head=0, odd_sizes="error", init="torch")  # fmt: skip


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_the_agreed_option_sets(name):
    assert set(PRESETS) == {"classic", *AGREED_PRESETS}
    expected = {**CLASSIC, **AGREED_PRESETS.get(name, {})}
    assert PRESETS[name] == expected
    model = UNetReference(3, 1, base_channels=4, preset=name)
    assert model.options == {"base_channels": 4, "depth": 4, **expected}
    for key, value in expected.items():  # each option is an attribute too (pre_head's is the module)
        if key != "pre_head":
            assert getattr(model, key) == value, key
    # the options rebuild the architecture, for both classes
    for cls in (UNetReference, UNet):
        rebuilt = cls(3, 1, **model.options)
        assert rebuilt.options == model.options
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }


def test_explicit_options_override_the_preset():
    model = UNetReference(3, 1, base_channels=4, preset="keras", dropout=0.0, out_activation="none", depth=3)
    assert model.options == {"base_channels": 4, "depth": 3, **CLASSIC, **AGREED_PRESETS["keras"],
                             "dropout": 0.0, "out_activation": "none"}  # fmt: skip
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    # an explicit classic value wins over the preset's too
    model = UNetReference(3, 1, base_channels=4, preset="milesial", odd_sizes="error", conv_bias=True)
    assert model.odd_sizes == "error" and model.conv1.conv[0].bias is not None
    assert UNetReference(3, 1, base_channels=4, preset=None).options == UNetReference(3, 1, base_channels=4).options
    options = model.options
    options["norm"] = "none"  # a copy: the model's options do not change
    assert model.options["norm"] == "batch"


def test_option_module_tree():
    """What each option puts where (the agreed module tree)."""
    m = UNetReference(3, 2, base_channels=4, depth=3, norm="none", conv_bias=False, dropout=0.25, pre_head=5,
                      upsampling="nearest_conv")  # fmt: skip
    for i in range(1, 8):
        seq = getattr(m, f"conv{i}").conv
        assert [type(layer) for layer in seq[:6]] == [nn.Conv2d, nn.Identity, nn.ReLU] * 2
        assert seq[0].bias is None and seq[3].bias is None
        has_dropout = i in (3, 4)  # conv{depth} and the bottleneck conv{depth+1}
        assert len(seq) == (7 if has_dropout else 6), i
        if has_dropout:
            assert isinstance(seq[6], nn.Dropout) and seq[6].p == 0.25
    assert isinstance(m.up5, NearestConvUp) and m.up5.conv.bias is None and m.up5.conv.kernel_size == (2, 2)
    assert [n for n, _ in m.named_children()][-3:] == ["conv7", "pre_head", "conv8"]
    assert m.pre_head[0].out_channels == 5 and m.pre_head[0].bias is None and m.head.in_channels == 5
    assert m.head.bias is not None
    keys = list(m.state_dict())
    assert "up5.conv.weight" in keys and "pre_head.0.weight" in keys and not any("running" in k for k in keys)
    b = UNetReference(3, 2, base_channels=4, upsampling="bilinear")
    assert isinstance(b.up6, nn.Upsample) and b.up6.mode == "bilinear" and b.up6.align_corners
    assert not any(k.startswith("up") for k in b.state_dict())
    widths = [(getattr(b, f"conv{i}").conv[0].in_channels, getattr(b, f"conv{i}").conv[0].out_channels,
               getattr(b, f"conv{i}").conv[3].out_channels) for i in range(5, 10)]  # fmt: skip
    assert widths == [(32, 32, 32), (64, 32, 16), (32, 16, 8), (16, 8, 4), (8, 4, 4)]


def test_skip_up_concat_order():
    """concat="skip_up": the decoder conv's first input channels see the skip."""
    model = UNetReference(1, 1, base_channels=2, depth=1, concat="skip_up").eval()
    seen = {}
    model.conv3.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.up3.register_forward_hook(lambda m, args, out: seen.setdefault("up", out))
    model.conv1.register_forward_hook(lambda m, args, out: seen.setdefault("skip", out))
    model(torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(seen["x"], torch.cat([seen["skip"], seen["up"]], 1))


def test_pad_centres_the_upsampled_map():
    """odd_sizes="pad" at depth 1: the upsampled map is at most one row/column short of the skip,
    so it lands at the top left (diff // 2 = 0 before, the rest after); ``pad_to`` splits a larger
    difference as milesial does."""
    model = UNetReference(1, 1, base_channels=2, depth=1, odd_sizes="pad").eval()
    seen = {}
    model.conv3.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    model.up3.register_forward_hook(lambda m, args, out: seen.__setitem__("up", out))
    for h, w, top, left in ((5, 7, 0, 0), (6, 9, 0, 0), (7, 11, 0, 0)):
        model(torch.randn(1, 1, h, w))
        up = seen["up"]
        expected = torch.zeros(1, up.shape[1], h, w)
        expected[:, :, top : top + up.shape[2], left : left + up.shape[3]] = up
        torch.testing.assert_close(seen["x"][:, : up.shape[1]], expected)
    # 2x2 into 5x6: dy = 3 -> 1 row before, 2 after; dx = 4 -> 2 columns each side
    padded = fastunet.reference.pad_to(torch.ones(1, 1, 2, 2), torch.empty(1, 1, 5, 6))
    assert padded[0, 0].nonzero().min(0).values.tolist() == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["keras", "milesial", "milesial-bilinear", "nnunet"])
def test_presets_compile_fullgraph(preset):
    """Every option's forward traces as one graph (the odd-size padding included) and computes
    what the eager model does."""
    model = UNetReference(3, 2, preset=preset, base_channels=2).double().eval()
    size = (23, 29) if model.odd_sizes == "pad" else (32, 16)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), model(x), TOL, f"torch.compile {preset}")


# ---------------------------------------------------------------- the classic model unchanged
def test_classic_state_dict_and_init_unchanged():
    from test_reference import classic_keys

    for kwargs in ({}, {"preset": "classic"}, dict(CLASSIC)):
        model = UNetReference(3, 1, base_channels=4, **kwargs)
        assert list(model.state_dict()) == classic_keys()
        assert [n for n, _ in model.named_parameters()] == [k for k in classic_keys() if "running" not in k
                                                             and "num_batches" not in k]  # fmt: skip
    # same parameter order and creation order: the same seed gives the same weights
    torch.manual_seed(0)
    a = UNetReference(3, 1, base_channels=4)
    torch.manual_seed(0)
    b = UNetReference(3, 1, base_channels=4, preset="classic")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ---------------------------------------------------------------- checkpoints with options
@pytest.mark.parametrize("preset", list(PRESETS))
def test_checkpoint_round_trip_with_options(tmp_path, preset):
    model = randomize_batchnorm(UNetReference(3, 2, base_channels=4, depth=2, preset=preset, dropout=0.25)).eval()
    fastunet.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    extra = {k: v for k, v in model.options.items() if k not in ("base_channels", "depth", "out_activation")}
    assert config["options"] == extra and config["out_activation"] == model.out_activation
    for cls in (UNetReference, UNet):
        loaded = fastunet.load_pretrained(tmp_path, cls=cls)
        assert type(loaded) is cls and loaded.options == model.options
        assert list(loaded.state_dict()) == list(model.state_dict())
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    loaded = fastunet.load_pretrained(tmp_path, cls=UNetReference)
    x = torch.randn(1, 3, 9, 13) if model.odd_sizes == "pad" else torch.randn(1, 3, 8, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_classic_config_has_no_options_and_old_configs_load(tmp_path):
    fastunet.save_pretrained(UNetReference(3, 1, base_channels=4, depth=2), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert "options" not in config  # the config classic checkpoints always had
    assert (
        fastunet.load_pretrained(tmp_path, cls=UNetReference).options
        == UNetReference(3, 1, base_channels=4, depth=2).options
    )


def test_checkpoint_refuses_unknown_options(tmp_path):
    fastunet.save_pretrained(UNetReference(3, 1, base_channels=4, depth=2, preset="milesial"), tmp_path)
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    config["options"]["attention"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="option.*attention.*does not know.*upgrade fastunet"):
        fastunet.load_pretrained(tmp_path)
    config["options"] = ["keras"]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='"options" must be a JSON object'):
        fastunet.load_pretrained(tmp_path)
    config["options"] = {"norm": "group"}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="norm must be one of"):
        fastunet.load_pretrained(tmp_path)
