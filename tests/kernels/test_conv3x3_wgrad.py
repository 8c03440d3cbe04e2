"""Spec for ``kernels/conv3x3_wgrad.py``: the 3x3 conv weight gradient with a fused input transform.

Every result is compared with ``aten.convolution_backward`` in float64 on the same rounded
inputs: the transformed input ``T(x) = max(x * scale + shift, 0)`` is computed in fp32 and
rounded to the input dtype (what a materialized BatchNorm+ReLU output holds), then upcast.
Outputs go into NaN-poisoned buffers so unwritten elements fail. Without a GPU the kernels run
in Triton's interpreter, so shapes are tiny and the grid is a spread, not a cartesian product.
"""

from __future__ import annotations

import pytest
import torch
from fastunet.kernels import conv3x3_wgrad as K
from fastunet.kernels._common import interpreting
from helpers import assert_close, poisoned_like, tolerance_name

pytestmark = pytest.mark.conv3x3

BF16_SKIP = pytest.mark.skipif(
    interpreting(), reason="Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP),
]


# ------------------------------------------------------------------------------------ helpers


def _activation(n, c, h, w, dtype, device, layout="channels_last"):
    if layout == "channels_last":
        return torch.randn(n, c, h, w).to(dtype).to(device, memory_format=torch.channels_last)
    if layout == "nchw":
        return torch.randn(n, c, h, w).to(dtype).to(device).contiguous()
    if layout == "channel_slice":
        # A slice [:, 2:2+c] of a wider NHWC buffer: the pixel stride is not c.
        big = torch.randn(n, c + 5, h, w).to(dtype).to(device, memory_format=torch.channels_last)
        return big[:, 2 : 2 + c]
    if layout == "strided":
        # Every other column of a wider NCHW tensor: no dimension is contiguous but the row.
        return torch.randn(n, c, h, 2 * w).to(dtype).to(device)[..., ::2]
    raise ValueError(layout)


def _norm(c, device):
    """(scale, shift) with both signs of scale and shifts that leave some ReLUs closed."""
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0)
    scale = sign * (torch.rand(c) + 0.5)
    shift = 0.5 * torch.randn(c)
    return scale.to(device), shift.to(device)


def transform(x, norm):
    """T(x) in x.dtype: fp32 scale/shift/ReLU, then rounded, as the kernel must do."""
    if norm is None:
        return x
    scale, shift = norm
    return (x.float() * scale[:, None, None] + shift[:, None, None]).clamp_min(0).to(x.dtype)


def reference(dy, x, x2=None, x_norm=None, x2_norm=None):
    """dW of conv3x3(cat([T1(x), T2(x2)]), W) in float64 on CPU."""
    xin = transform(x, x_norm)
    if x2 is not None:
        xin = torch.cat([xin, transform(x2, x2_norm)], 1)
    xin = xin.cpu().double()
    weight = torch.zeros(dy.shape[1], xin.shape[1], 3, 3, dtype=torch.float64)
    grads = torch.ops.aten.convolution_backward(
        dy.cpu().double(), xin, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    return grads[1]


def make_case(n, c1, c2, c_out, h, w, dtype, device, *, norms="none", layout="channels_last"):
    dy = _activation(n, c_out, h, w, dtype, device, layout)
    x = _activation(n, c1, h, w, dtype, device, layout)
    x2 = _activation(n, c2, h, w, dtype, device, layout) if c2 else None
    x_norm = _norm(c1, device) if norms in ("x", "both") else None
    x2_norm = _norm(c2, device) if norms in ("x2", "both") else None
    return dy, x, x2, x_norm, x2_norm


def poisoned_out(c_out, c_in, device, memory_format=torch.contiguous_format):
    return poisoned_like(torch.empty(c_out, c_in, 3, 3, device=device), memory_format)


# ------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "n, c1, c2, c_out, h, w, norms",
    [
        (2, 3, 5, 7, 3, 5, "both"),  # small-C mode over both sources
        (1, 5, 0, 7, 1, 1, "x"),  # one pixel: only the centre tap sees data
        (2, 19, 0, 10, 7, 2, "none"),  # per-tap channel blocks, ragged in C_in and C_out
        (1, 20, 3, 9, 4, 4, "x2"),  # only the second source normalized
        (2, 17, 6, 5, 3, 3, "x"),  # only the first source normalized
        (2, 3, 0, 16, 5, 3, "none"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_convolution_backward(n, c1, c2, c_out, h, w, norms, dtype, device):
    dy, x, x2, x_norm, x2_norm = make_case(n, c1, c2, c_out, h, w, dtype, device, norms=norms)
    out = poisoned_out(c_out, c1 + c2, device)
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm, out=out)
    assert got is out
    expected = reference(dy, x, x2, x_norm, x2_norm)
    assert_close(got, expected, tolerance_name(dtype), f"dW {n}x({c1}+{c2})x{h}x{w}->{c_out} norms={norms}")


def test_padding_comes_after_the_transform(device):
    """Out-of-image taps contribute 0, not relu(shift): with x = 0 and shift > 0 every in-image
    tap sees relu(shift) and the border taps of a 1-pixel image see nothing."""
    dy = torch.ones(1, 2, 1, 1, device=device)
    x = torch.zeros(1, 3, 1, 1, device=device)
    norm = (torch.ones(3, device=device), torch.tensor([1.0, 2.0, -1.0], device=device))
    got = K.conv3x3_weight_grad(dy, x, x_norm=norm)
    expected = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    expected[:, :, 1, 1] = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert_close(got, expected, tolerance_name(torch.float32), "1x1 image")


def test_nan_propagates_through_both_transforms(device):
    """A NaN input poisons the dW entries it touches, with or without a norm (torch's relu keeps
    NaN, so a materialized activation would too)."""
    dy, x, x2, x_norm, _ = make_case(1, 4, 3, 5, 3, 4, torch.float32, device, norms="x")
    x[0, 1, 0, 2] = float("nan")
    x2[0, 2, 2, 3] = float("nan")
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm)
    expected = reference(dy, x, x2, x_norm)
    nan = torch.isnan(expected)
    assert nan[:, 1].any() and nan[:, 4 + 2].any() and not nan.all()
    # assert_close's bound is NaN wherever expected is, so the NaN pattern is compared on its own.
    assert torch.equal(torch.isnan(got).cpu(), nan)
    assert_close(got.cpu()[~nan], expected[~nan], tolerance_name(torch.float32), "NaN inputs, finite part")


@pytest.mark.parametrize(
    "dy_layout, x_layout, x2_layout",
    [
        ("nchw", "nchw", "nchw"),
        ("channels_last", "channel_slice", "nchw"),
        ("strided", "channels_last", "channel_slice"),
        ("channel_slice", "strided", "strided"),
    ],
)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
def test_any_layout(dy_layout, x_layout, x2_layout, dtype, device):
    n, c1, c2, c_out, h, w = 2, 6, 4, 7, 4, 3
    dy = _activation(n, c_out, h, w, dtype, device, dy_layout)
    x = _activation(n, c1, h, w, dtype, device, x_layout)
    x2 = _activation(n, c2, h, w, dtype, device, x2_layout)
    x_norm, x2_norm = _norm(c1, device), _norm(c2, device)
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm)
    assert got.shape == (c_out, c1 + c2, 3, 3) and got.dtype == torch.float32 and got.is_contiguous()
    expected = reference(dy, x, x2, x_norm, x2_norm)
    assert_close(got, expected, tolerance_name(dtype), f"{dy_layout}/{x_layout}/{x2_layout}")


@pytest.mark.parametrize("out_layout", ["packed", "channel_slice", "transposed"])
def test_out_any_strides_fully_overwritten(out_layout, device):
    n, c1, c2, c_out, h, w = 1, 4, 3, 5, 3, 4
    dy, x, x2, x_norm, _ = make_case(n, c1, c2, c_out, h, w, torch.float32, device, norms="x")
    c_in = c1 + c2
    expected = reference(dy, x, x2, x_norm)
    if out_layout == "packed":
        # The conv3x3 forward's fast weight layout: storage [3, 3, C_in, C_out].
        out = poisoned_like(torch.empty(3, 3, c_in, c_out, device=device)).permute(3, 2, 0, 1)
    elif out_layout == "transposed":
        out = poisoned_like(torch.empty(c_in, c_out, 3, 3, device=device), torch.contiguous_format).transpose(0, 1)
    else:
        big = poisoned_like(torch.empty(c_out, c_in + 6, 3, 3, device=device), torch.contiguous_format)
        out = big[:, 2 : 2 + c_in]
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, out=out)
    assert got is out
    assert_close(got, expected, tolerance_name(torch.float32), f"{out_layout} out")
    if out_layout == "channel_slice":
        # Neighbouring channels of the buffer must stay untouched.
        assert torch.isnan(big[:, :2]).all() and torch.isnan(big[:, 2 + c_in :]).all()


@pytest.mark.parametrize("c1, c2, small_c", [(3, 0, False), (20, 5, True), (5, 4, True)])
def test_both_k_modes(c1, c2, small_c, monkeypatch, device):
    """Each column mode is right on shapes the heuristic would hand to the other one."""
    monkeypatch.setattr(K, "_use_small_c", lambda c1, c2: small_c)
    dy, x, x2, x_norm, x2_norm = make_case(2, c1, c2, 6, 3, 4, torch.float32, device, norms="both" if c2 else "x")
    out = poisoned_out(6, c1 + c2, device)
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm, out=out)
    expected = reference(dy, x, x2, x_norm, x2_norm)
    assert_close(got, expected, tolerance_name(torch.float32), f"small_c={small_c}")


@pytest.mark.parametrize("split_k", [1, 3, 7])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
def test_split_k_is_deterministic(split_k, dtype, monkeypatch, device):
    """Direct writes (1 split) and the workspace path (7 splits of 3 pixel steps: some empty)
    match, and repeated calls give the same bits."""
    monkeypatch.setattr(K, "_pick_split_k", lambda *args: split_k)
    dy, x, x2, x_norm, x2_norm = make_case(1, 5, 3, 9, 6, 6, dtype, device, norms="both")
    out = poisoned_out(9, 8, device)
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm, out=out)
    expected = reference(dy, x, x2, x_norm, x2_norm)
    assert_close(got, expected, tolerance_name(dtype), f"split_k={split_k}")
    again = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm)
    assert torch.equal(again, got)


def test_empty_batch_gives_zeros(device):
    dy, x, _, _, _ = make_case(0, 3, 0, 4, 3, 3, torch.float16, device)
    out = poisoned_out(4, 3, device)
    got = K.conv3x3_weight_grad(dy, x, out=out)
    assert torch.equal(got, torch.zeros_like(got))


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "case, exc",
    [
        ("dy_dtype", TypeError),  # float64 is not a kernel dtype
        ("x_dtype", TypeError),
        ("x2_dtype", TypeError),
        ("dy_dim", ValueError),
        ("x_spatial", ValueError),
        ("x_batch", ValueError),
        ("x2_spatial", ValueError),
        ("norm_length", ValueError),
        ("norm_dtype", TypeError),
        ("norm_not_pair", TypeError),
        ("norm2_length", ValueError),
        ("norm2_without_x2", ValueError),
        ("out_shape", ValueError),
        ("out_dtype", TypeError),
        ("x_not_tensor", TypeError),
    ],
)
def test_rejects_bad_inputs(case, exc, device):
    dy, x, x2, x_norm, x2_norm = make_case(1, 4, 3, 6, 5, 5, torch.float32, device, norms="both")
    kwargs = {}
    if case == "dy_dtype":
        dy, x, x2 = dy.double(), x.double(), x2.double()
        x_norm = x2_norm = None
    elif case == "x_dtype":
        x = x.half()
    elif case == "x2_dtype":
        x2 = x2.half()
    elif case == "dy_dim":
        dy = dy[0]
    elif case == "x_spatial":
        x = x[:, :, :4]
    elif case == "x_batch":
        x = torch.cat([x, x])
    elif case == "x2_spatial":
        x2 = x2[:, :, :, :4]
    elif case == "norm_length":
        x_norm = (x_norm[0][:3], x_norm[1][:3])
    elif case == "norm_dtype":
        x_norm = (x_norm[0].half(), x_norm[1])
    elif case == "norm_not_pair":
        x_norm = x_norm[0]
    elif case == "norm2_length":
        x2_norm = (x2_norm[0], torch.zeros(4, device=device))
    elif case == "norm2_without_x2":
        x2 = None
    elif case == "out_shape":
        kwargs["out"] = torch.empty(6, 6, 3, 3, device=device)
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(6, 7, 3, 3, device=device).half()
    elif case == "x_not_tensor":
        x = x.tolist()
    with pytest.raises(exc):
        K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm, **kwargs)


# ------------------------------------------------------------------------ configs and specs


@pytest.mark.parametrize("arch", [80, 90])
def test_autotune_pruning(arch):
    """What the autotuner may try: fits in shared memory, no tiles far wider than the problem."""

    def kept(dtype, c1, c2, c_out, precision="tf32"):
        elem = torch.empty(0, dtype=dtype).element_size()
        small_c = K._use_small_c(c1, c2)
        variant = K._variant(small_c, precision, elem)
        shape = dict(elem=elem, C1=c1, C2=c2, C_out=c_out, SMALL_C=small_c, SPLIT_K=1)
        configs = K._TUNERS[variant].candidates(arch, shape)
        assert configs, (dtype, c1, c2, c_out)
        for c in configs:
            smem = c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem
            assert smem <= K.smem_limit(arch)
        return [c.kwargs for c in configs]

    for dtype in (torch.float32, torch.float16):
        assert all(c["BLOCK_M"] <= 64 and c["BLOCK_N"] <= 64 for c in kept(dtype, 64, 0, 64))
        assert any(c["BLOCK_M"] == 128 and c["BLOCK_N"] == 128 for c in kept(dtype, 512, 512, 512))
        assert all(c["BLOCK_N"] <= 32 for c in kept(dtype, 3, 0, 64))  # 27 columns
        assert all(c["BLOCK_N"] == 16 for c in kept(dtype, 1, 0, 64))  # 9 columns
    assert all(c["BLOCK_K"] <= 32 for c in kept(torch.float32, 256, 0, 256, precision="ieee"))


def test_split_choice_on_cuda_shapes():
    """The split count the GPU path would pick (a simulated 132-SM GPU): many splits for few
    tiles, bounded by the pixel count and the workspace; none once the tiles alone fill the SMs.
    The interpreter always takes its fixed split, so the reduction path stays under test."""
    from fastunet.kernels._common import SimulatedGPU, simulate_gpu

    dev = torch.device("cpu")
    assert K._pick_split_k(dev, 2 * 256 * 256, 64, 3, 0, True) == K._INTERPRETER_SPLIT_K
    with simulate_gpu(SimulatedGPU(sms=132)):
        assert K._pick_split_k(dev, 2 * 256 * 256, 64, 3, 0, True) == K._MAX_SPLIT_K
        assert K._pick_split_k(dev, 2 * 256 * 256, 64, 64, 0, False) == 30  # 9 tiles -> 2*132/9
        assert K._pick_split_k(dev, 2 * 16 * 16, 64, 64, 0, False) == 1  # 8 steps of 64 pixels
        assert K._pick_split_k(dev, 2 * 32 * 32, 512, 512, 512, False) == 1  # 1152 tiles


def test_compile_specs_cover_the_autotune_lists():
    """Specs are complete, fit in shared memory, and match the kernels' signatures."""
    for arch in (80, 90):
        specs = K.compile_specs(arch)
        main = [s for s in specs if s.kernel == "_conv3x3_wgrad_kernel"]
        assert {s.dtype for s in main} == {"fp32", "fp16", "bf16"}
        combos = {(s.constexprs["HAS_X2"], s.constexprs["X_NORM"], s.constexprs["X2_NORM"]) for s in main}
        assert len(combos) == 6
        assert {s.constexprs["SMALL_C"] for s in main} == {False, True}
        assert {s.constexprs["DOT_PRECISION"] for s in main if s.dtype == "fp32"} == {"tf32", "ieee"}
        assert any(s.kernel == "_conv3x3_wgrad_reduce_kernel" for s in specs)
        assert len({(s.kernel, s.config, s.dtype) for s in specs}) == len(specs)
        for s in specs:
            assert list(s.signature) == list(s.fn.arg_names)
            for name, ty in s.signature.items():
                assert (ty == "constexpr") == (name in s.constexprs), name
        for s in main:
            c = s.constexprs
            elem = 4 if s.dtype == "fp32" else 2
            smem = s.num_stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elem
            assert smem <= K.smem_limit(arch), s.config
            assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16, s.config
            wgmma_shaped = c["BLOCK_M"] >= 64 and s.num_warps in (4, 8)
            assert s.extra["expect_hgmma"] == (arch == 90 and s.dtype != "fp32" and wgmma_shaped)


# ------------------------------------------------------------------------- ring 3: real sizes


@pytest.mark.cuda
@pytest.mark.parametrize(
    "n, c1, c2, c_out, hw, norms",
    [
        (2, 3, 0, 64, 64, "none"),  # first layer: small-C mode, many splits
        (2, 64, 0, 64, 64, "x"),
        (2, 256, 0, 512, 16, "x"),
        (2, 128, 128, 128, 32, "both"),  # decoder conv reading [up, skip]
        (1, 512, 512, 512, 8, "x2"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_unet_sizes(n, c1, c2, c_out, hw, norms, dtype):
    device = torch.device("cuda")
    dy, x, x2, x_norm, x2_norm = make_case(n, c1, c2, c_out, hw, hw, dtype, device, norms=norms)
    out = poisoned_out(c_out, c1 + c2, device)
    got = K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm, out=out)
    expected = reference(dy, x, x2, x_norm, x2_norm)
    assert_close(got, expected, tolerance_name(dtype), f"{n}x({c1}+{c2})x{hw}^2->{c_out} norms={norms}")
    assert torch.equal(K.conv3x3_weight_grad(dy, x, x2, x_norm=x_norm, x2_norm=x2_norm), got)
