"""2x2 max-pool kernel vs ``F.max_pool2d`` in float64.

A max is exact, so besides the tolerance comparison on NaN-poisoned outputs the special-value
cases (NaN, -inf, ties, signed zeros) demand bit-for-bit agreement with torch.

With ``in_scale``/``in_shift`` the kernel pools ``T(x) = relu(x*scale + shift)``; the reference
pools a materialized ``T(x)`` (fp32 math, rounded to x's dtype, as a separate BN+ReLU stores it).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, poisoned_like, tolerance_name

# The submodule (``fastunet.kernels.maxpool2x2`` as an attribute is the launcher the package exports).
kernel_module = importlib.import_module("fastunet.kernels.maxpool2x2")
compile_specs = kernel_module.compile_specs
maxpool2x2 = kernel_module.maxpool2x2

pytestmark = pytest.mark.maxpool

# Kernels run compiled, not interpreted: on a GPU, and under the simulated GPU that
# benchmarks/gpu_plan.py records ring 3's launches with (it must parametrize as a GPU does).
ON_GPU = not importlib.import_module("fastunet.kernels._common").interpreting()
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter compares bf16 as raw integers; CUDA only"),
    ),
]


def make_input(shape, dtype, device, layout):
    """``shape`` (NCHW) in ``layout``: "nhwc", "nchw", or "slice" (channels 2.. of a wider
    channels_last buffer, so channel stride 1 but pixel strides larger than C)."""
    n, c, h, w = shape
    if layout == "slice":
        buf = torch.randn(n, c + 5, h, w, device=device).to(dtype, memory_format=torch.channels_last)
        return buf[:, 2 : 2 + c]
    x = torch.randn(shape, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def make_output(shape, dtype, device, layout):
    """A NaN-filled destination and the buffer that holds it (wider for "slice")."""
    n, c, h, w = shape
    if layout == "slice":
        buf = torch.full((n, c + 4, h, w), float("nan"), device=device, dtype=dtype)
        buf = buf.contiguous(memory_format=torch.channels_last)
        return buf[:, 1 : 1 + c], buf
    out = poisoned_like(torch.empty(shape, device=device, dtype=dtype))
    return out, out


def assert_bitwise_equal(got, x):
    """``got`` equals torch's max-pool of ``x`` exactly: values, NaN positions, zero signs."""
    expected = F.max_pool2d(x.double(), 2)
    g = got.double()
    both_nan = torch.isnan(g) & torch.isnan(expected)
    assert torch.equal(torch.isnan(g), torch.isnan(expected)), "NaN positions differ"
    assert bool(((g == expected) | both_nan).all()), "values differ"
    assert torch.equal(torch.signbit(g[~both_nan]), torch.signbit(expected[~both_nan])), "signs of zero differ"


def make_norm(c, device):
    """fp32 ``(scale, shift)`` with scales of both signs, so the ReLU zeroes different taps per
    channel, and shifts that keep a good share of each channel alive."""
    sign = torch.where(torch.arange(c, device=device) % 2 == 0, 1.0, -1.0)
    scale = (torch.rand(c, device=device) + 0.25) * sign
    shift = torch.randn(c, device=device) * 0.5
    return scale, shift


def materialized_norm(x, scale, shift):
    """``T(x)`` as a separate BatchNorm+ReLU in x's dtype would store it."""
    return torch.relu(x.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def run_case(shape, dtype, device, *, in_layout="nhwc", out_layout="nhwc", norm=False):
    n, c, h, w = shape
    x = make_input(shape, dtype, device, in_layout)
    out, buf = make_output((n, c, h // 2, w // 2), dtype, device, out_layout)
    kwargs = {}
    pooled = x  # what the kernel should pool
    if norm:
        kwargs["in_scale"], kwargs["in_shift"] = make_norm(c, device)
        pooled = materialized_norm(x, kwargs["in_scale"], kwargs["in_shift"])
    got = maxpool2x2(x, **kwargs, out=out)
    assert got is out
    what = f"maxpool2x2 {tuple(shape)} {dtype} in={in_layout} out={out_layout} norm={norm}"
    assert_close(got, F.max_pool2d(pooled.double(), 2), tolerance_name(dtype), what)
    if not norm:
        assert_bitwise_equal(got, x)
    if out_layout == "slice":
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + c :]).all(), "wrote outside its channel slice"


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 6, 10), (3, 37, 18, 18), (3, 3, 2, 2), (1, 64, 8, 4)],
    ids=["b1-c3-6x10", "b3-c37-18x18", "b3-c3-2x2", "b1-c64-8x4"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(shape, dtype, device):
    run_case(shape, dtype, device)


@pytest.mark.parametrize("out_layout", ["nhwc", "slice"])
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(in_layout, out_layout, dtype, device):
    run_case((3, 37, 6, 10), dtype, device, in_layout=in_layout, out_layout=out_layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(dtype, device):
    x = torch.randn(2, 37, 6, 10, device=device).to(dtype, memory_format=torch.channels_last)
    # One NaN in each of the four window positions, plus a random sprinkle.
    x[0, 0, 0, 0] = x[0, 1, 0, 3] = x[0, 2, 3, 0] = x[0, 3, 3, 3] = float("nan")
    x[torch.rand(x.shape, device=device) < 0.05] = float("nan")
    got = maxpool2x2(x)
    assert torch.isnan(got[0, 0, 0, 0]) and torch.isnan(got[0, 1, 0, 1])
    assert torch.isnan(got[0, 2, 1, 0]) and torch.isnan(got[0, 3, 1, 1])
    assert_bitwise_equal(got, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities(dtype, device):
    x = torch.randn(1, 5, 6, 6, device=device).to(dtype, memory_format=torch.channels_last)
    x[:, :, :2, :2] = float("-inf")  # a window of nothing but -inf stays -inf
    x[:, :, 2, 2] = float("-inf")  # -inf beside finite values loses
    x[:, 1, 4, 5] = float("inf")
    x[:, 2, 4:, 4:] = float("-inf")
    x[:, 2, 5, 5] = float("nan")  # NaN beats -inf
    got = maxpool2x2(x)
    assert torch.isneginf(got[:, :, 0, 0]).all()
    assert_bitwise_equal(got, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_and_signed_zeros(dtype, device):
    # Small integers tie often; zeros of both signs must resolve as torch does (first wins).
    x = torch.randint(-2, 3, (2, 37, 6, 10), device=device).to(dtype)
    x = torch.where(torch.rand(x.shape, device=device) < 0.5, x, -x)  # 0 becomes -0.0 here
    x = x.contiguous(memory_format=torch.channels_last)
    assert_bitwise_equal(maxpool2x2(x), x)


@pytest.mark.parametrize(
    "shape", [(1, 3, 6, 10), (2, 5, 2, 2), (3, 17, 4, 6)], ids=["b1-c3-6x10", "b2-c5-2x2", "b3-c17-4x6"]
)
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_torch(shape, in_layout, dtype, device):
    run_case(
        shape, dtype, device, in_layout=in_layout, out_layout="slice" if in_layout == "slice" else "nhwc", norm=True
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_nan_propagates(dtype, device):
    # T(NaN) = relu(NaN) = NaN in torch, so a NaN still wins its window through the transform,
    # even in a channel whose other taps are all clamped to 0.
    x = torch.randn(2, 37, 6, 10, device=device).to(dtype, memory_format=torch.channels_last)
    x[0, 0, 0, 0] = x[0, 1, 0, 3] = x[0, 2, 3, 0] = x[0, 3, 3, 3] = float("nan")
    x[torch.rand(x.shape, device=device) < 0.05] = float("nan")
    scale, shift = make_norm(37, device)
    got = maxpool2x2(x, in_scale=scale, in_shift=shift)
    expected = F.max_pool2d(materialized_norm(x, scale, shift).double(), 2)
    assert torch.isnan(got[0, 0, 0, 0]) and torch.isnan(got[0, 3, 1, 1])
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), "NaN positions differ"
    finite = ~torch.isnan(expected)  # the RMS that scales atol must not be NaN
    assert_close(got[finite], expected[finite], tolerance_name(dtype), "maxpool2x2 norm with NaN")


def test_norm_ties_match_materialized(device):
    # Integer inputs with scale +-1 and shift 0.5 tie often, and whole windows clamp to 0: the
    # pooled values are exact, so the transform must agree bit for bit with the materialized one.
    x = torch.randint(-2, 3, (2, 17, 6, 10), device=device).to(torch.float16, memory_format=torch.channels_last)
    scale = torch.where(torch.arange(17, device=device) % 2 == 0, 1.0, -1.0)
    shift = torch.full((17,), 0.5, device=device)
    got = maxpool2x2(x, in_scale=scale, in_shift=shift)
    assert torch.equal(got, F.max_pool2d(materialized_norm(x, scale, shift), 2))


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("in_layout", ["nhwc", "slice"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 6), (2, 17, 6, 7), (2, 5, 7, 9)], ids=["5x6", "6x7", "7x9"])
def test_odd_sizes_floor(shape, in_layout, norm, device):
    # nn.MaxPool2d(2)'s floor: the last row/column of an odd input is ignored. A NaN placed
    # there must not reach the output (it would if the kernel read past 2*H_out).
    n, c, h, w = shape
    x = make_input(shape, torch.float32, device, in_layout)
    x[:, :, -1] = float("nan") if h % 2 else x[:, :, -1]
    x[:, :, :, -1] = float("nan") if w % 2 else x[:, :, :, -1]
    out, buf = make_output((n, c, h // 2, w // 2), torch.float32, device, in_layout)
    kwargs = dict(zip(("in_scale", "in_shift"), make_norm(c, device), strict=True)) if norm else {}
    pooled = materialized_norm(x, kwargs["in_scale"], kwargs["in_shift"]) if norm else x
    got = maxpool2x2(x, **kwargs, out=out)
    assert not torch.isnan(got).any(), "read the dropped row/column of an odd input"
    assert torch.equal(got, F.max_pool2d(pooled, 2))


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1)], ids=str)
def test_below_one_window_is_empty(hw, device):
    # H or W of 1 floors to an empty map (nothing launched; torch raises instead, the U-Net's
    # input rule never gets there).
    x = torch.randn(1, 3, *hw, device=device)
    out = maxpool2x2(x)
    assert out.shape == (1, 3, hw[0] // 2, hw[1] // 2) and out.numel() == 0


@pytest.mark.parametrize(
    "x, out, error",
    [
        (torch.randn(3, 4, 4), None, ValueError),
        (torch.randn(1, 3, 4, 4, dtype=torch.float64), None, TypeError),
        (torch.randn(1, 3, 4, 4), torch.empty(1, 3, 4, 4), ValueError),
        (torch.randn(1, 3, 4, 4), torch.empty(1, 3, 2, 2, dtype=torch.float16), TypeError),
    ],
    ids=["x-3d", "x-fp64", "out-shape", "out-dtype"],
)
def test_rejects_bad_arguments(x, out, error, device):
    with pytest.raises(error):
        maxpool2x2(x.to(device), out=None if out is None else out.to(device))


@pytest.mark.parametrize(
    "in_scale, in_shift, error",
    [
        (torch.ones(3), None, ValueError),
        (None, torch.ones(3), ValueError),
        (torch.ones(4), torch.ones(4), ValueError),
        (torch.ones(3, 1), torch.ones(3), ValueError),
        (torch.ones(3, dtype=torch.float16), torch.ones(3), TypeError),
        (torch.ones(3), torch.ones(3, dtype=torch.int32), TypeError),  # fp32 and fp64 are both read
        (torch.ones(3), [1.0, 1.0, 1.0], TypeError),
    ],
    ids=["scale-only", "shift-only", "wrong-c", "2d", "scale-fp16", "shift-int", "shift-list"],
)
def test_rejects_bad_norm(in_scale, in_shift, error, device):
    x = torch.randn(1, 3, 4, 4, device=device)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    with pytest.raises(error):
        maxpool2x2(x, in_scale=move(in_scale), in_shift=move(in_shift))


def _all_gpu_tiles():
    tiles = {tuple(sorted(c.kwargs.items())) for cs in kernel_module._CONFIGS.values() for c in cs}
    return [dict(t) for t in sorted(tiles)]


@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("tile", _all_gpu_tiles(), ids=lambda t: "-".join(map(str, t.values())))
def test_every_gpu_tile_in_interpreter(tile, norm, device, monkeypatch):
    # The interpreter normally runs one small tile; run each GPU tile size once as well.
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", tile)
    run_case((3, 70, 18, 22), torch.float16, device, in_layout="slice", out_layout="slice", norm=norm)


def test_default_output_is_channels_last(device):
    out = maxpool2x2(torch.randn(1, 3, 6, 10, device=device))
    assert out.shape == (1, 3, 3, 5) and out.is_contiguous(memory_format=torch.channels_last)


def test_compile_specs_cover_every_dtype():
    for arch in (80, 90):
        specs = compile_specs(arch)
        assert {s.dtype for s in specs} == {"fp32", "fp16", "bf16"}
        assert {(s.dtype, s.constexprs["IN_NORM"]) for s in specs} == {
            (d, n) for d in ("fp32", "fp16", "bf16") for n in (False, True)
        }
        for s in specs:
            assert set(s.signature) == set(s.fn.arg_names)
            assert all(s.signature[k] == "constexpr" for k in s.constexprs)


# The U-Net's four pooling steps (C at H x W) at batch 4, real sizes.
UNET_POOLS = [(64, 256, 256), (128, 128, 128), (256, 64, 64), (512, 32, 32)]


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("c, h, w", UNET_POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unet_sizes_cuda(c, h, w, dtype, norm):
    run_case((4, c, h, w), dtype, torch.device("cuda"), norm=norm)


# ------------------------------------------------------------------ the op at odd sizes
# ``torch.ops.fastunet.maxpool2x2`` floors odd H/W (the odd_sizes="pad" models): forward and
# backward through the kernels (interpreter/CUDA) against float64 autograd of F.max_pool2d, with
# the dropped row/column getting a zero gradient.


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 3, 6, 9), (2, 4, 5, 5)], ids=["7x6", "6x9", "5x5"])
def test_op_odd_sizes_forward_backward(shape, norm, device):
    import fastunet.ops  # noqa: F401  (registers torch.ops.fastunet)

    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)
    args = ()
    if norm:
        scale, shift = make_norm(shape[1], device)
        args = (scale.double().requires_grad_(), shift.double().requires_grad_())
    y = torch.ops.fastunet.maxpool2x2(x, *args)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    ref_args = tuple(a.detach().clone().requires_grad_() for a in args)
    src = x64
    if norm:
        src = torch.relu(x64 * ref_args[0][None, :, None, None] + ref_args[1][None, :, None, None])
    expected = F.max_pool2d(src, 2)
    expected.backward(g.double())
    assert_close(y, expected, "fp32", "maxpool2x2 op odd forward")
    assert_close(x.grad, x64.grad, "fp32", "maxpool2x2 op odd dx")
    assert not x.grad[:, :, 2 * (shape[2] // 2) :].any() and not x.grad[:, :, :, 2 * (shape[3] // 2) :].any()
    for got, ref, name in zip(args, ref_args, ("dscale", "dshift")[: len(args)], strict=True):
        assert_close(got.grad, ref.grad, "fp32", f"maxpool2x2 op odd {name}")


@pytest.mark.slow
def test_op_odd_sizes_opcheck(device):
    import fastunet.ops  # noqa: F401

    x = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    scale, shift = (t.double().requires_grad_() for t in make_norm(3, device))
    torch.library.opcheck(torch.ops.fastunet.maxpool2x2.default, (x,))
    torch.library.opcheck(torch.ops.fastunet.maxpool2x2.default, (x, scale, shift))
