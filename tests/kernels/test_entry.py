"""The model's entrance (``kernels/entry.py``): cast + zero-pad to 16-byte NHWC pixels, and the
first conv's DENSE_C mode that reads them as vectors; against eager torch in float64 on fresh
random data, outputs NaN-poisoned first."""

from __future__ import annotations

import pytest
import torch
from fastunet.kernels import conv3x3 as C
from fastunet.kernels import entry as K
from fastunet.kernels._common import interpreting
from helpers import assert_close, poisoned_like, tolerance_name

import fastunet  # noqa: F401  (registers torch.ops.fastunet)

pytestmark = pytest.mark.conv3x3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 16, 9), (3, 2, 1, 33)])
def test_pad_cast_matches_torch(device, dtype, layout, shape):
    n, c, h, w = shape
    src = torch.randn(n, c + 2, h, w, device=device)
    x = src[:, 1 : 1 + c] if layout == "slice" else src[:, :c].contiguous()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = 16 // torch.empty((), dtype=dtype).element_size()
    out = poisoned_like(torch.empty(n, channels, h, w, device=device, dtype=dtype))
    y = K.pad_cast_nhwc(x, dtype, channels, out=out)
    assert y is out and y.stride() == (h * w * channels, 1, w * channels, channels)
    if dtype == torch.bfloat16 and interpreting():
        # The interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even, as
        # torch does): within one bf16 ulp there.
        assert_close(y[:, :c], x.double(), "bf16", "bf16 cast (interpreter)")
    else:
        assert torch.equal(y[:, :c], x.to(dtype)), "cast differs from torch's .to()"
    assert torch.count_nonzero(y[:, c:]) == 0 and not torch.isnan(y).any()


def test_entry_channels_rule():
    assert K.entry_channels(3, torch.bfloat16) == 8
    assert K.entry_channels(3, torch.float16) == 8
    assert K.entry_channels(3, torch.float32) == 4
    assert K.entry_channels(7, torch.float16) == 8
    for in_ch, dtype in (
        (1, torch.float16),
        (2, torch.bfloat16),
        (8, torch.float16),
        (4, torch.float32),
        (64, torch.float32),
    ):
        assert K.entry_channels(in_ch, dtype) == in_ch


@pytest.mark.parametrize(
    "case, exc",
    [
        ("channels_small", ValueError),
        ("channels_odd", ValueError),
        ("int", ValueError),
        ("dtype", TypeError),
        ("out", ValueError),
    ],
)
def test_pad_cast_rejects_bad_arguments(device, case, exc):
    x = torch.randn(1, 3, 4, 4, device=device)
    kwargs = {}
    channels, dtype = 8, torch.float16
    if case == "channels_small":
        channels = 2
    elif case == "channels_odd":
        channels = 6
    elif case == "int":
        x = x.to(torch.int32)
    elif case == "dtype":
        dtype = torch.float64
    elif case == "out":
        kwargs["out"] = torch.empty(1, 8, 4, 4, device=device, dtype=torch.float16)  # NCHW: not dense NHWC
    with pytest.raises(exc):
        K.pad_cast_nhwc(x, dtype, channels, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("in_ch", [3, 1])
def test_dense_first_conv_matches_conv2d(device, dtype, in_ch):
    """The padded entry through the conv's DENSE_C mode: the same numbers as conv2d on the
    unpadded image (the zero channels add nothing), for the eval and the training form."""
    channels = 16 // torch.empty((), dtype=dtype).element_size()
    x = torch.randn(2, in_ch, 9, 13, device=device)
    xp = K.pad_cast_nhwc(x, dtype, channels)
    assert C._dense_channels(xp, channels, True) == channels
    w = torch.randn(24, in_ch, 3, 3, device=device) / 3
    wp = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, channels - in_ch))
    scale, shift = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
    xr, wr = x.to(dtype).double(), w.to(dtype).double()
    expected = torch.relu(
        torch.nn.functional.conv2d(xr, wr, padding=1) * scale.double()[:, None, None] + shift.double()[:, None, None]
    )
    out = poisoned_like(torch.empty(2, 24, 9, 13, device=device, dtype=dtype))
    y = C.conv3x3_bn_act(xp, C.pack_conv3x3_weight(wp.to(dtype)), scale, shift, out=out)
    assert_close(y, expected, tolerance_name(dtype), "dense first conv")
    z, mean, var = C.conv3x3_bn_stats(xp, C.pack_conv3x3_weight(wp.to(dtype)), torch.zeros(24, device=device))
    z_ref = torch.nn.functional.conv2d(xr, wr, padding=1)
    assert_close(z, z_ref, tolerance_name(dtype), "dense first conv, training form")
    assert_close(mean, z.double().mean((0, 2, 3)), "fp32", "batch mean")


def test_dense_mode_only_for_dense_16_byte_pixels(device):
    x8 = torch.zeros(1, 8, 4, 4, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert C._dense_channels(x8, 8, True) == 8
    assert C._dense_channels(x8, 8, False) == 0  # not small-C (or a second source)
    assert C._dense_channels(x8.contiguous(), 8, True) == 0  # NCHW
    assert C._dense_channels(x8.float(), 8, True) == 0  # 32-byte pixels
    wide = torch.zeros(1, 16, 4, 4, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert C._dense_channels(wide[:, :8], 8, True) == 0  # a channel slice: pixels 32 bytes apart


def test_op_pads_casts_and_backpropagates(device):
    x = torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.ops.fastunet.pad_channels_nhwc(x, torch.float64, 4)
    assert y.shape == (2, 4, 5, 6) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[:, :3], x.detach()) and torch.count_nonzero(y[:, 3:]) == 0
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g[:, :3])
    xf = torch.randn(1, 3, 4, 4, device=device)
    assert torch.equal(torch.ops.fastunet.pad_channels_nhwc(xf, torch.float16, 8)[:, :3], xf.half())
    torch.library.opcheck(torch.ops.fastunet.pad_channels_nhwc, (xf.requires_grad_(), torch.float16, 8))
