"""The training conv (``conv3x3_bn_stats``: BatchNorm+ReLU of the sources on load, raw output
and its batch statistics) and the statistics finalize kernel, against float64 torch."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, poisoned_like, tolerance_name

from fastunet import kernels

pytestmark = pytest.mark.conv3x3

DTYPES = [torch.float32, torch.float16]


def transform(x, norm):
    """relu(x * scale + shift) rounded to x's dtype: what the kernel convolves."""
    if norm is None:
        return x
    scale, shift = norm
    y = torch.relu(x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    return y.to(x.dtype)


def random_norm(c, device):
    """Scales of both signs and shifts that leave part of every channel below zero."""
    scale = torch.randn(c, device=device)
    return scale, torch.randn(c, device=device) * 0.5


def expected(x, x2, weight, bias, x_norm, x2_norm, dtype):
    xin = transform(x, x_norm).double()
    if x2 is not None:
        xin = torch.cat([xin, transform(x2, x2_norm).double()], 1)
    z = F.conv2d(xin, weight.double(), bias.double(), padding=1)
    return z


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "c1, c2, c_out, n, h, w, norm1, norm2",
    [
        (3, 0, 8, 2, 5, 7, False, False),  # the first conv: small C, raw image
        (20, 0, 9, 1, 3, 3, True, False),  # encoder: previous BN+ReLU on load
        (5, 6, 17, 2, 4, 3, False, True),  # decoder: upsample as is, raw skip normalized
        (16, 16, 16, 3, 1, 6, True, True),
    ],
)
def test_conv_stats_match_float64(device, dtype, c1, c2, c_out, n, h, w, norm1, norm2):
    x = torch.randn(n, c1, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(n, c2, h, w, device=device).to(dtype) if c2 else None
    weight = (torch.randn(c_out, c1 + c2, 3, 3, device=device) * 0.3).to(dtype)
    bias = torch.randn(c_out, device=device)
    x_norm = random_norm(c1, device) if norm1 else None
    x2_norm = random_norm(c2, device) if norm2 else None
    out = poisoned_like(torch.empty(n, c_out, h, w, device=device, dtype=dtype))
    z, mean, var = kernels.conv3x3_bn_stats(
        x, kernels.pack_conv3x3_weight(weight), bias, x2=x2, x_norm=x_norm, x2_norm=x2_norm, out=out
    )
    assert z is out and mean.dtype == var.dtype == torch.float32
    tol = tolerance_name(dtype)
    assert_close(z, expected(x, x2, weight, bias, x_norm, x2_norm, dtype), tol, "z")
    # Statistics of z as stored: float64 of the kernel's own (rounded) output.
    zs = z.double()
    assert_close(mean, zs.mean((0, 2, 3)), "fp32", "mean", scale=zs.abs().max().item())
    assert_close(var, zs.var((0, 2, 3), unbiased=False), "fp32", "var")


def test_large_mean_keeps_variance(device):
    """Outputs of mean 10^4 and spread ~0.1: Σz² - n·mean² would lose every digit in fp32
    (it is off by a factor of ~2000 here); the pair-and-offset merge stays at ~1e-7."""
    x = torch.randn(4, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 16, 3, 3, device=device) * 0.01
    bias = torch.full((8,), 1e4, device=device)
    z, mean, var = kernels.conv3x3_bn_stats(x, kernels.pack_conv3x3_weight(weight), bias)
    zs = z.double()
    true_var = zs.var((0, 2, 3), unbiased=False)
    assert true_var.min() > 1e-3  # the spread is real, and tiny next to the mean
    assert_close(var, true_var, "fp32", "large-mean variance")
    assert_close(mean, zs.mean((0, 2, 3)), "fp32", "large-mean mean")  # fp32 rounding of 1e4


@pytest.mark.parametrize("norm1", [False, True], ids=["raw", "norm-on-load"])
def test_nan_propagates_like_torch(device, norm1):
    """A NaN input pixel: torch's relu keeps it (relu(NaN) is NaN), so its 3x3 neighbourhood of z
    is NaN in every channel, and BatchNorm's batch statistics of those channels are NaN. A GPU's
    plain max.f32 would make the on-load ReLU of NaN 0 and the tile M2 clamp drop the NaN;
    Triton 3.9's interpreter runs a plain tl.maximum as np.fmax, so this sees it on CPU too."""
    n, c1, c_out, h, w = 2, 6, 5, 5, 6
    x = torch.randn(n, c1, h, w, device=device).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4] = float("nan")
    weight = torch.randn(c_out, c1, 3, 3, device=device) * 0.3
    bias = torch.randn(c_out, device=device)
    x_norm = random_norm(c1, device) if norm1 else None
    out = poisoned_like(torch.empty(n, c_out, h, w, device=device))
    z, mean, var = kernels.conv3x3_bn_stats(x, kernels.pack_conv3x3_weight(weight), bias, x_norm=x_norm, out=out)
    ref = expected(x, None, weight, bias, x_norm, None, torch.float32)
    assert ref[1, :, 2:5, 3:6].isnan().all() and ref.isnan().sum() == c_out * 9
    assert_close(z, ref, "fp32", "z with a NaN input")  # NaN exactly where torch has it
    assert mean.isnan().all() and var.isnan().all()


def test_deterministic(device):
    x = torch.randn(3, 8, 6, 6, device=device)
    weight = kernels.pack_conv3x3_weight(torch.randn(5, 8, 3, 3, device=device))
    bias = torch.randn(5, device=device)
    first = kernels.conv3x3_bn_stats(x, weight, bias)
    second = kernels.conv3x3_bn_stats(x, weight, bias)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _partials(z: torch.Tensor, tile_rows: int, extra_rows: int = 0) -> torch.Tensor:
    """The conv epilogue's partials for ``z`` viewed as [M, C], built in float64 by hand."""
    m, c = z.shape
    tiles = -(-m // tile_rows)
    part = torch.full((3, tiles + extra_rows, c), float("nan"), dtype=torch.float32)
    for t in range(tiles):
        rows = z[t * tile_rows : (t + 1) * tile_rows]
        mean = rows.mean(0)
        part[0, t] = mean.float()
        part[1, t] = (mean - mean.float().double()).float()  # the mean as an fp32 pair
        part[2, t] = (rows - mean).pow(2).sum(0).float()
    return part


@pytest.mark.parametrize("m, c, tile_rows", [(1000, 3, 16), (37, 70, 8), (5, 1, 32)])
def test_finalize_merges_tiles(device, m, c, tile_rows):
    """Many chunks of tiles (more than the kernel's BLOCK_T), a ragged last tile, channel
    counts across BLOCK_C, and unused (NaN) rows past the last tile that must not be read."""
    z = torch.randn(m, c, dtype=torch.float64) * 3 + 50
    part = _partials(z, tile_rows, extra_rows=3).to(device)
    mean, var = kernels.bn_stats_finalize(part, m, tile_rows)
    assert_close(mean, z.mean(0), "fp32", "mean", scale=50.0)
    assert_close(var, z.var(0, unbiased=False), "fp32", "var")


def test_bad_arguments(device):
    x = torch.randn(1, 4, 3, 3, device=device)
    w = kernels.pack_conv3x3_weight(torch.randn(2, 4, 3, 3, device=device))
    b = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match=r"x_norm scale must be \[4\]"):
        kernels.conv3x3_bn_stats(x, w, b, x_norm=(torch.ones(3, device=device), torch.ones(3, device=device)))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.conv3x3_bn_stats(x, w, b, x_norm=(torch.ones(4, device=device).half(), torch.ones(4, device=device)))
    with pytest.raises(ValueError, match="x2_norm given without x2"):
        ones = torch.ones(4, device=device)
        kernels.conv3x3_bn_stats(x, w, b, x2_norm=(ones, ones))
    with pytest.raises(ValueError, match="at least one output pixel"):
        kernels.conv3x3_bn_stats(x[:0], w, b)
    with pytest.raises(ValueError, match="partial rows"):
        kernels.bn_stats_finalize(torch.zeros(3, 3, 4, device=device), rows=100, tile_rows=16)
    with pytest.raises(TypeError, match="float32"):
        kernels.bn_stats_finalize(torch.zeros(3, 3, 4, device=device, dtype=torch.float64), rows=3, tile_rows=1)


@pytest.mark.cuda
def test_bf16_on_gpu():
    device = torch.device("cuda")
    x = torch.randn(2, 32, 16, 16, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(64, 32, 3, 3, device=device) * 0.1).to(torch.bfloat16)
    bias = torch.randn(64, device=device)
    norm = random_norm(32, device)
    z, mean, var = kernels.conv3x3_bn_stats(x, kernels.pack_conv3x3_weight(weight), bias, x_norm=norm)
    assert_close(z, expected(x, None, weight, bias, norm, None, torch.bfloat16), "bf16", "z")
    zs = z.double()
    assert_close(mean, zs.mean((0, 2, 3)), "fp32", "mean", scale=zs.abs().max().item())
    assert_close(var, zs.var((0, 2, 3), unbiased=False), "fp32", "var")
