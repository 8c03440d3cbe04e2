"""Backward kernels of the training path vs float64 torch autograd on the same rounded inputs.

``affine_relu_backward`` is the gradient of ``relu(x*scale + shift)``; ``maxpool2x2_backward``
the gradient of ``max_pool2d(T(x), 2)`` (of ``max_pool2d(x, 2)`` without a norm). For the pool
the reference differentiates through ``T(x)`` in float64 but pools the values the forward
kernel pools (``T(x)`` rounded to x's dtype), so both pick the same argmax.

dx goes into NaN-poisoned buffers, so an element the kernel skips fails the comparison.
"""

import pytest
import torch
import torch.nn.functional as F
from fastunet.kernels import norm_act_bwd as kernel_module
from fastunet.kernels._common import interpreting
from helpers import assert_close, poisoned_like, tolerance_name

affine_relu_backward = kernel_module.affine_relu_backward
maxpool2x2_backward = kernel_module.maxpool2x2_backward
compile_specs = kernel_module.compile_specs

# Kernels run compiled, not interpreted: on a GPU, and under the simulated GPU that
# benchmarks/gpu_plan.py records ring 3's launches with (it must parametrize as a GPU does).
ON_GPU = not interpreting()
# bf16 only on CUDA (the interpreter's bf16 handling is unreliable); see test_unet_size_cuda.
DTYPES = [torch.float32, torch.float16]
SHAPES = [(2, 3, 2, 2), (1, 5, 4, 6), (2, 17, 6, 2), (3, 5, 10, 12)]
SHAPE_IDS = ["b2-c3-2x2", "b1-c5-4x6", "b2-c17-6x2", "b3-c5-10x12"]


def bcast(v):
    return v[None, :, None, None]


def make_input(shape, dtype, device, layout, *, values="randn"):
    """``shape`` (NCHW) in ``layout`` ("nhwc" or "nchw"); ``values="int"`` gives small integers,
    which tie often inside pool windows and include zeros of both signs."""
    if values == "int":
        x = torch.randint(-2, 3, shape, device=device).float()
        x = torch.where(torch.rand(shape, device=device) < 0.5, x, -x)  # 0 becomes -0.0 here
    else:
        x = torch.randn(shape, device=device)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def make_norm(c, device):
    """fp32 ``(scale, shift)`` with scales of both signs and shifts that keep a good share of each
    channel above zero, so the ReLU mask is active both ways."""
    sign = torch.where(torch.arange(c, device=device) % 2 == 0, 1.0, -1.0)
    scale = (torch.rand(c, device=device) + 0.25) * sign
    shift = torch.randn(c, device=device) * 0.5
    return scale, shift


def materialized_norm(x, scale, shift):
    """``T(x)`` as a separate BatchNorm+ReLU in x's dtype would store it."""
    return torch.relu(x.float() * bcast(scale) + bcast(shift)).to(x.dtype)


def reference_affine_relu(g, x, scale, shift):
    xd, sd, td = (t.double().requires_grad_() for t in (x, scale, shift))
    torch.relu(xd * bcast(sd) + bcast(td)).backward(g.double())
    return xd.grad, sd.grad, td.grad


def reference_pool(g, x, scale=None, shift=None):
    xd = x.double().requires_grad_()
    if scale is None:
        F.max_pool2d(xd, 2).backward(g.double())
        return xd.grad, None, None
    sd, td = (t.double().requires_grad_() for t in (scale, shift))
    t = torch.relu(xd * bcast(sd) + bcast(td))
    # Values of the rounded T(x) (exact: they differ from t by less than t), gradient of t.
    pooled_in = t + (materialized_norm(x, scale, shift).double() - t).detach()
    F.max_pool2d(pooled_in, 2).backward(g.double())
    return xd.grad, sd.grad, td.grad


def check(got, expected, dtype, what):
    dx, ds, dt = got
    ex, es, et = expected
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last), what
    tol = tolerance_name(dtype)
    assert_close(dx, ex, tol, f"{what}: dx")
    if es is None:
        assert ds is None and dt is None, what
        return
    assert ds.dtype == torch.float32 and dt.dtype == torch.float32, what
    assert ds.shape == es.shape and dt.shape == et.shape, what
    assert_close(ds, es, tol, f"{what}: dscale")
    assert_close(dt, et, tol, f"{what}: dshift")


# --------------------------------------------------------------------------------------
# affine_relu_backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 3, 5)], ids=SHAPE_IDS + ["b1-c3-3x5"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_relu_matches_autograd(shape, layout, dtype, device):
    x = make_input(shape, dtype, device, layout)
    g = make_input(shape, dtype, device, "nchw" if layout == "nhwc" else "nhwc")  # mixed layouts
    scale, shift = make_norm(shape[1], device)
    out = poisoned_like(x)
    got = affine_relu_backward(g, x, scale, shift, out=out)
    assert got[0] is out
    check(got, reference_affine_relu(g, x, scale, shift), dtype, f"affine_relu_backward {shape} {dtype} {layout}")


def test_affine_relu_default_output(device):
    x = make_input((1, 5, 4, 6), torch.float16, device, "nchw")
    g = make_input((1, 5, 4, 6), torch.float16, device, "nchw")
    scale, shift = make_norm(5, device)
    check(affine_relu_backward(g, x, scale, shift), reference_affine_relu(g, x, scale, shift), torch.float16, "")


def test_affine_relu_deterministic(device):
    x = make_input((3, 17, 10, 12), torch.float32, device, "nhwc")
    g = make_input((3, 17, 10, 12), torch.float32, device, "nhwc")
    scale, shift = make_norm(17, device)
    first = affine_relu_backward(g, x, scale, shift)
    for _ in range(2):
        again = affine_relu_backward(g, x, scale, shift)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# --------------------------------------------------------------------------------------
# maxpool2x2_backward
# --------------------------------------------------------------------------------------


def run_pool(shape, dtype, device, *, layout="nhwc", norm=True, values="randn"):
    n, c, h, w = shape
    x = make_input(shape, dtype, device, layout, values=values)
    g = make_input((n, c, h // 2, w // 2), dtype, device, layout)
    scale, shift = make_norm(c, device) if norm else (None, None)
    out = poisoned_like(x)
    got = maxpool2x2_backward(g, x, scale, shift, out=out)
    assert got[0] is out
    expected = reference_pool(g, x, scale, shift)
    check(got, expected, dtype, f"maxpool2x2_backward {shape} {dtype} {layout} norm={norm} {values}")
    return got, expected


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_matches_autograd(shape, layout, norm, dtype, device):
    run_pool(shape, dtype, device, layout=layout, norm=norm)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_ties_route_like_torch(norm, dtype, device):
    # Small integers tie in most windows (and zeros of both signs tie too); with a norm the ReLU
    # adds windows of nothing but zeros. Routing is a copy, so dx must match exactly.
    (dx, _, _), (ex, _, _) = run_pool((2, 17, 6, 10), dtype, device, norm=norm, values="int")
    if not norm:
        assert torch.equal(dx.double(), ex)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_norm_ties_after_rounding(dtype, device):
    # scale +-1 and shift 0.5 on integers: every T value is exact and ties are everywhere, so the
    # routed gradient (before the scale) must be bit-exact.
    x = make_input((2, 5, 6, 4), dtype, device, "nhwc", values="int")
    g = make_input((2, 5, 3, 2), dtype, device, "nhwc")
    scale = torch.where(torch.arange(5, device=device) % 2 == 0, 1.0, -1.0)
    shift = torch.full((5,), 0.5, device=device)
    got = maxpool2x2_backward(g, x, scale, shift)
    expected = reference_pool(g, x, scale, shift)
    check(got, expected, dtype, "pool ties after the transform")
    assert torch.equal(got[0].double(), expected[0])


def test_pool_norm_ties_only_after_rounding(device):
    # 1.0 and the next fp16 above it map to 1.25 and 1.25 + 2**-12 in fp32, which both round to
    # 1.25 in fp16: the forward pooled a tie, so the gradient goes to the first element.
    x = torch.zeros(1, 2, 2, 2, device=device)
    x[0, :, 0, 0] = 1.0
    x[0, :, 0, 1] = 1.0 + 2.0**-10
    x = x.to(torch.float16, memory_format=torch.channels_last)
    scale = torch.full((2,), 0.25, device=device)
    shift = torch.ones(2, device=device)
    g = torch.ones(1, 2, 1, 1, device=device, dtype=torch.float16)
    dx, ds, dt = maxpool2x2_backward(g, x, scale, shift)
    assert dx[0, :, 0, 0].tolist() == [0.25, 0.25] and dx[0, :, 0, 1].tolist() == [0.0, 0.0]
    check((dx, ds, dt), reference_pool(g, x, scale, shift), torch.float16, "tie after rounding")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_nan_and_inf_route_like_torch(dtype, device):
    # torch takes a NaN over anything and a later NaN over an earlier one, so a window holding
    # NaNs routes to its last NaN; a window of -inf routes to its first element.
    x = make_input((2, 5, 6, 4), dtype, device, "nhwc")
    x[0, 0, 0, 0] = x[0, 1, 0, 3] = x[0, 2, 3, 0] = x[0, 3, 3, 3] = float("nan")
    x[1, 0, 0:2, 0:2] = float("nan")  # four NaNs in one window
    x[1, 1, 2, 2] = x[1, 1, 3, 2] = float("nan")  # two, in the left column
    x[1, 2, 4:6, 2:4] = float("-inf")
    x[torch.rand(x.shape, device=device) < 0.05] = float("nan")
    g = make_input((2, 5, 3, 2), dtype, device, "nhwc")
    dx, ds, dt = maxpool2x2_backward(g, x)
    ex, _, _ = reference_pool(g, x)
    assert ds is None and dt is None
    assert torch.equal(dx.double(), ex)


def test_pool_deterministic(device):
    x = make_input((3, 17, 10, 12), torch.float32, device, "nhwc")
    g = make_input((3, 17, 5, 6), torch.float32, device, "nhwc")
    scale, shift = make_norm(17, device)
    first = maxpool2x2_backward(g, x, scale, shift)
    for _ in range(2):
        again = maxpool2x2_backward(g, x, scale, shift)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_pool_default_output_without_norm(device):
    x = make_input((1, 3, 4, 6), torch.float16, device, "nchw")
    g = make_input((1, 3, 2, 3), torch.float16, device, "nchw")
    got = maxpool2x2_backward(g, x)
    check(got, reference_pool(g, x), torch.float16, "pool default output")


# --------------------------------------------------------------------------------------
# Both: workspace, tiles, empty inputs, argument checks, compile specs
# --------------------------------------------------------------------------------------


def test_every_workspace_row_is_written(device, monkeypatch):
    # Every row of the partial-sum workspace is written before it is summed, including the rows
    # a tile owns beyond its first (BLOCK_P > P_GRAIN): a NaN-filled workspace changes nothing.
    workspace = kernel_module._workspace
    monkeypatch.setattr(kernel_module, "_workspace", lambda *a: workspace(*a).fill_(float("nan")))
    run_pool((3, 5, 10, 12), torch.float32, device)
    x = make_input((3, 5, 10, 12), torch.float32, device, "nhwc")
    g = make_input((3, 5, 10, 12), torch.float32, device, "nhwc")
    scale, shift = make_norm(5, device)
    got = affine_relu_backward(g, x, scale, shift)
    check(got, reference_affine_relu(g, x, scale, shift), torch.float32, "affine with a NaN workspace")


def _all_gpu_tiles():
    tiles = {
        tuple(sorted(c.kwargs.items())) for kind in kernel_module._CONFIGS.values() for cs in kind.values() for c in cs
    }
    return [dict(t) for t in sorted(tiles)]


@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
@pytest.mark.parametrize("tile", _all_gpu_tiles(), ids=lambda t: "-".join(map(str, t.values())))
def test_every_gpu_tile_in_interpreter(tile, device, monkeypatch):
    # The interpreter normally runs one small tile; run each GPU tile size once as well (partial
    # pixel and channel tiles, several workspace rows per tile).
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", tile)
    run_pool((3, 70, 6, 10), torch.float16, device)
    x = make_input((3, 70, 5, 7), torch.float16, device, "nhwc")
    g = make_input((3, 70, 5, 7), torch.float16, device, "nhwc")
    scale, shift = make_norm(70, device)
    got = affine_relu_backward(g, x, scale, shift)
    check(got, reference_affine_relu(g, x, scale, shift), torch.float16, f"affine tile {tile}")


def test_empty_batch(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    scale, shift = make_norm(3, device)
    dx, ds, dt = affine_relu_backward(x, x.clone(), scale, shift)
    assert dx.shape == x.shape and torch.equal(ds, torch.zeros(3, device=device)) and torch.equal(dt, ds)
    dx, ds, dt = maxpool2x2_backward(torch.empty(0, 3, 2, 2, device=device), x, scale, shift)
    assert dx.shape == x.shape and torch.equal(ds, torch.zeros(3, device=device))
    assert maxpool2x2_backward(torch.empty(0, 3, 2, 2, device=device), x)[1:] == (None, None)


def _args(**change):
    args = {
        "g": torch.randn(1, 3, 2, 2),
        "x": torch.randn(1, 3, 4, 4),
        "scale": torch.ones(3),
        "shift": torch.zeros(3),
        "out": None,
    }
    args.update(change)
    return args


BAD_ARGUMENTS = [
    ({"x": torch.randn(3, 4, 4)}, ValueError),
    ({"x": torch.randn(1, 3, 4, 4, dtype=torch.float64)}, TypeError),
    ({"x": [1.0]}, TypeError),
    ({"g": torch.randn(1, 3, 2, 2, dtype=torch.float16)}, TypeError),
    ({"scale": torch.ones(4), "shift": torch.ones(4)}, ValueError),
    ({"scale": torch.ones(3, dtype=torch.float16)}, TypeError),
    ({"shift": torch.zeros(3, dtype=torch.int32)}, TypeError),  # fp32 and fp64 are both read
    ({"shift": None}, ValueError),
    ({"out": torch.empty(1, 3, 4, 4, dtype=torch.float16)}, TypeError),
    ({"out": torch.empty(1, 3, 4, 5)}, ValueError),
]
BAD_IDS = ["x-3d", "x-fp64", "x-list", "g-dtype", "norm-c", "scale-fp16", "shift-int", "scale-only"]
BAD_IDS += ["out-dtype", "out-shape"]


@pytest.mark.parametrize(
    "change, error", BAD_ARGUMENTS + [({"g": torch.randn(1, 3, 4, 4)}, ValueError)], ids=BAD_IDS + ["g-shape"]
)
def test_pool_rejects_bad_arguments(change, error, device):
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _args(**change).items()}
    with pytest.raises(error):
        maxpool2x2_backward(a["g"], a["x"], a["scale"], a["shift"], out=a["out"])


def test_pool_rejects_odd_sizes_and_aliasing(device):
    x = torch.randn(1, 3, 5, 4, device=device)
    with pytest.raises(ValueError, match="even"):
        maxpool2x2_backward(torch.randn(1, 3, 2, 2, device=device), x)
    x = torch.randn(1, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="storage"):
        maxpool2x2_backward(torch.randn(1, 3, 2, 2, device=device), x, out=x)


@pytest.mark.parametrize(
    "change, error",
    BAD_ARGUMENTS + [({"g": torch.randn(1, 3, 2, 2)}, ValueError), ({"scale": None, "shift": None}, ValueError)],
    ids=BAD_IDS + ["g-shape", "no-norm"],
)
def test_affine_relu_rejects_bad_arguments(change, error, device):
    base = _args(g=torch.randn(1, 3, 4, 4))
    base.update(change)
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    with pytest.raises(error):
        affine_relu_backward(a["g"], a["x"], a["scale"], a["shift"], out=a["out"])


def test_affine_relu_rejects_aliasing(device):
    g = torch.randn(1, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="storage"):
        affine_relu_backward(g, torch.randn_like(g), torch.ones(3, device=device), torch.ones(3, device=device), out=g)


def test_compile_specs_cover_every_combination():
    for arch in (80, 90):
        specs = compile_specs(arch)
        combos = {(s.kernel, s.dtype, s.constexprs.get("IN_NORM")) for s in specs}
        for dtype in ("fp32", "fp16", "bf16"):
            assert ("_affine_relu_bwd_kernel", dtype, None) in combos
            assert ("_maxpool2x2_bwd_kernel", dtype, False) in combos
            assert ("_maxpool2x2_bwd_kernel", dtype, True) in combos
        assert any(s.kernel == "_sum_partials_kernel" for s in specs)
        labels = [(s.kernel, s.config, s.dtype) for s in specs]
        assert len(labels) == len(set(labels))
        for s in specs:
            assert set(s.signature) == set(s.fn.arg_names)
            assert all(s.signature[k] == "constexpr" for k in s.constexprs)
            if "P_GRAIN" in s.constexprs:
                assert s.constexprs["BLOCK_P"] % s.constexprs["P_GRAIN"] == 0


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unet_size_cuda(dtype):
    # bf16 is checked only here (not in the interpreter); the U-Net's first pooling step, batch 2.
    dev = torch.device("cuda")
    run_pool((2, 64, 128, 128), dtype, dev)
    run_pool((2, 64, 128, 128), dtype, dev, norm=False)
    x = make_input((2, 64, 128, 128), dtype, dev, "nhwc")
    g = make_input((2, 64, 128, 128), dtype, dev, "nhwc")
    scale, shift = make_norm(64, dev)
    check(affine_relu_backward(g, x, scale, shift), reference_affine_relu(g, x, scale, shift), dtype, "affine cuda")


@pytest.mark.parametrize("kind", ["affine", "pool"])
def test_dscale_about_a_center_keeps_its_digits(kind, device):
    """A raw activation of mean 1000 and spread 0.5: sum(g*mask*x) in fp32 cannot hold the
    BatchNorm weight's gradient sum(g*mask*(x - mean)) (it is ~1000x smaller than either term);
    taken about a centre inside the data, the kernel's sum matches float64 to fp32 precision."""
    shape = (2, 4, 8, 8)
    x = (1000.0 + 0.5 * torch.randn(shape, device=device)).contiguous(memory_format=torch.channels_last)
    mean = x.double().mean((0, 2, 3))
    scale = torch.full((4,), 2.0, device=device)
    shift = (-mean * 2.0 + 0.3).float()  # the BatchNorm of x: relu((x - mean) * 2 + 0.3)
    center = mean.float()
    if kind == "affine":
        g = torch.randn(shape, device=device)
        _, dscale, dshift = affine_relu_backward(g, x, scale, shift, center=center)
        gr = g.double()
    else:
        g = torch.randn(2, 4, 4, 4, device=device)
        _, dscale, dshift = maxpool2x2_backward(g, x, scale, shift, center=center)
        xr = x.double().requires_grad_()
        F.max_pool2d(torch.relu(xr * 2.0 + bcast(shift.double())), 2).backward(g.double())
        gr = xr.grad / 2.0  # dL/dT routed through the pool, before the ReLU mask and the scale
    live = (x.double() * 2.0 + bcast(shift.double())) > 0
    gm = torch.where(live, gr, torch.zeros_like(gr))
    expected = (gm * (x.double() - bcast(center.double()))).sum((0, 2, 3))
    assert_close(dscale, expected, "fp32", "dscale about the centre", scale=gm.abs().sum().item() * 0.5)
    assert_close(dshift, gm.sum((0, 2, 3)), "fp32", "dshift")


def test_center_validation(device):
    x = torch.randn(1, 3, 2, 2, device=device)
    s, t = make_norm(3, device)
    with pytest.raises(ValueError, match=r"center must be \[3\]"):
        affine_relu_backward(x, x, s, t, center=torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="float32"):
        affine_relu_backward(x, x, s, t, center=torch.zeros(3, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="center needs scale and shift"):
        maxpool2x2_backward(x[:, :, :1, :1], x, center=torch.zeros(3, device=device))
