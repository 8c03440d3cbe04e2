"""The eager reference: architecture, parameter count and state_dict names of the classic U-Net."""

import pytest
import torch

from fastunet import UNet, UNetReference

pytestmark = pytest.mark.model

DOUBLE_CONV_KEYS = [
    "conv.0.weight", "conv.0.bias",
    "conv.1.weight", "conv.1.bias", "conv.1.running_mean", "conv.1.running_var", "conv.1.num_batches_tracked",
    "conv.3.weight", "conv.3.bias",
    "conv.4.weight", "conv.4.bias", "conv.4.running_mean", "conv.4.running_var", "conv.4.num_batches_tracked",
]  # fmt: skip


def classic_keys(depth=4):
    """The state_dict keys the classic model has, written from the architecture description."""
    keys = []
    for i in range(1, depth + 2):
        keys += [f"conv{i}.{k}" for k in DOUBLE_CONV_KEYS]
    for k in range(depth + 2, 2 * depth + 2):
        keys += [f"up{k}.weight", f"up{k}.bias"] + [f"conv{k}.{key}" for key in DOUBLE_CONV_KEYS]
    keys += [f"conv{2 * depth + 2}.weight", f"conv{2 * depth + 2}.bias"]
    return keys


@pytest.mark.parametrize("cls", [UNetReference, UNet])
def test_classic_parameter_count_and_keys(cls):
    model = cls(3, 1)
    assert sum(p.numel() for p in model.parameters()) == 31_043_521
    assert list(model.state_dict().keys()) == classic_keys()


def test_classic_layer_shapes():
    model = UNetReference(3, 1)
    sd = model.state_dict()
    assert sd["conv1.conv.0.weight"].shape == (64, 3, 3, 3)
    assert sd["conv5.conv.3.weight"].shape == (1024, 1024, 3, 3)
    assert sd["up6.weight"].shape == (1024, 512, 2, 2)  # ConvTranspose2d(2C, C): [in, out, 2, 2]
    assert sd["conv6.conv.0.weight"].shape == (512, 1024, 3, 3)
    assert sd["up9.weight"].shape == (128, 64, 2, 2)
    assert sd["conv10.weight"].shape == (1, 64, 1, 1)


def test_depth_generalises_names():
    model = UNetReference(2, 3, base_channels=8, depth=2)
    assert list(model.state_dict().keys()) == classic_keys(depth=2)
    assert model.head is model.conv6
    assert model(torch.randn(1, 2, 8, 12)).shape == (1, 3, 8, 12)


def test_upsampled_comes_first_in_concat():
    """cat([up, skip]): the decoder conv's first input channels see the upsampled tensor."""
    model = UNetReference(1, 1, base_channels=2, depth=1).eval()
    seen = {}
    model.conv3.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.up3.register_forward_hook(lambda m, args, out: seen.setdefault("up", out))
    model.conv1.register_forward_hook(lambda m, args, out: seen.setdefault("skip", out))
    model(torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(seen["x"], torch.cat([seen["up"], seen["skip"]], 1))


@pytest.mark.parametrize("activation", ["sigmoid", "none", "softmax"])
def test_out_activation(activation):
    model = UNetReference(3, 4, base_channels=4, depth=1, out_activation=activation).eval()
    x = torch.randn(2, 3, 4, 4)
    y = model(x)
    logits = model.head(
        model.conv3(torch.cat([model.up3(model.conv2(model.pool1(model.conv1(x)))), model.conv1(x)], 1))
    )
    expected = {"sigmoid": logits.sigmoid(), "none": logits, "softmax": logits.softmax(1)}[activation]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 0}, "depth"),
        ({"base_channels": 0}, "base_channels"),
        ({"out_activation": "tanh"}, "out_activation"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetReference(3, 1, **kwargs)


def test_bad_channel_counts():
    with pytest.raises(ValueError, match="in_ch"):
        UNetReference(0, 1)
    with pytest.raises(ValueError, match="out_ch"):
        UNet(3, 1.5)


# ------------------------------------------------------------------ input checks, shared with UNet
def _bad_inputs():
    return [
        ("3d", torch.randn(3, 16, 16)),
        ("5d", torch.randn(1, 1, 3, 16, 16)),
        ("channels", torch.randn(1, 4, 16, 16)),
        ("not-divisible-by-16", torch.randn(1, 3, 250, 250)),
        ("width", torch.randn(1, 3, 16, 24)),
        ("dtype", torch.randn(1, 3, 16, 16, dtype=torch.float16)),
        ("float64", torch.randn(1, 3, 16, 16, dtype=torch.float64)),
        ("integer", torch.zeros(1, 3, 16, 16, dtype=torch.uint8)),
        ("device", torch.empty(1, 3, 16, 16, device="meta")),
        ("not-a-tensor", [[1.0]]),
    ]


@pytest.mark.parametrize("name, x", _bad_inputs(), ids=[name for name, _ in _bad_inputs()])
def test_reference_rejects_bad_input_like_unet(name, x):
    """UNetReference raises what UNet raises (type and message), before anything reaches
    ``torch.cat`` (a 250x250 input used to fail there with a size mismatch)."""
    errors = []
    for cls in (UNetReference, UNet):
        model = cls(3, 1, base_channels=4).eval()  # depth 4: H and W multiples of 16
        with pytest.raises((TypeError, ValueError)) as info:
            model(x)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    if name == "not-divisible-by-16":
        assert "divisible by 16" in errors[0][1] and "H=256, W=256" in errors[0][1]


def test_empty_batch_same_on_both():
    """UNet does not reject an empty batch; neither does the reference: both return one."""
    x = torch.randn(0, 3, 16, 16)
    ref = UNetReference(3, 1, base_channels=4).eval()
    model = UNet(3, 1, base_channels=4).eval()
    with torch.no_grad():
        assert ref(x).shape == model(x).shape == (0, 1, 16, 16)


@pytest.mark.parametrize("cls", [UNetReference, UNet])
def test_meta_device_forward(cls):
    """Shape and FLOP counting run the model on the meta device, where autocast does not exist:
    the input checks must not ask it."""
    with torch.device("meta"):
        model = cls(3, 2, base_channels=4, depth=2)
        assert model(torch.empty(2, 3, 16, 16)).shape == (2, 2, 16, 16)
