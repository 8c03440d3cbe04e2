"""Keras' nearest x2 upsample + 2x2 'same' conv (``upconv_nearest2x2``) vs the float64 eager
``conv2d(pad(interpolate(x, 2, 'nearest'), (0, 1, 0, 1)), W, b)``: the launcher (interpreter on
CPU), the op ``torch.ops.fastunet.upconv_nearest2x2`` (opcheck, ``torch.compile``, gradients vs
float64 autograd of the reference) and the kernel's offline sm_90 compile (slow).

Every launcher case writes into a NaN-poisoned output, so an element the kernel skips fails the
comparison; channel-slice outputs also check that the neighbouring channels stay NaN. Odd h, w
put the zero padding row/column next to real pixels of every phase; C_in and C_out are not
multiples of the interpreter's 16/32 blocks.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import RING2_FULL, assert_close, max_rel_error, poisoned_like, ring2_lock, tolerance_name

# The submodule (``fastunet.kernels.upconv_nearest2x2`` as an attribute is the launcher the package exports).
kernel_module = importlib.import_module("fastunet.kernels.upconv_nearest2x2")
compile_specs = kernel_module.compile_specs
pack = kernel_module.pack_upconv_nearest2x2_weight
upconv_nearest2x2 = kernel_module.upconv_nearest2x2
input_grad = kernel_module.upconv_nearest2x2_input_grad
weight_grad = kernel_module.upconv_nearest2x2_weight_grad

# importlib: ``fastunet.ops.upconv_nearest2x2`` as an attribute is the op the package exports.
op_module = importlib.import_module("fastunet.ops.upconv_nearest2x2")  # registers the ops

pytestmark = pytest.mark.upconv

OP = torch.ops.fastunet.upconv_nearest2x2
DGRAD_OP = torch.ops.fastunet.upconv_nearest2x2_input_grad
WGRAD_OP = torch.ops.fastunet.upconv_nearest2x2_weight_grad
# Kernels run compiled, not interpreted: on a GPU, and under the simulated GPU that
# benchmarks/gpu_plan.py records ring 3's launches with (it must parametrize as a GPU does).
ON_GPU = not importlib.import_module("fastunet.kernels._common").interpreting()
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter's bf16 tl.dot is broken; CUDA only"),
    ),
]
ROOT = Path(__file__).resolve().parents[2]


def quick_first(values, n_quick=1, ids=None):
    """Parametrize values of which the first ``n_quick`` run in quick mode and the rest only in
    the full suite (``slow``): the interpreter costs about a second a launch, so quick mode
    takes one point per axis. Tuples are spread over several argnames."""
    out = []
    for i, v in enumerate(values):
        marks = [] if i < n_quick else [pytest.mark.slow]
        vid = None if ids is None else ids[i]
        if hasattr(v, "values") and hasattr(v, "marks"):  # already a pytest.param
            out.append(pytest.param(*v.values, marks=[*v.marks, *marks], id=v.id or vid))
        else:
            out.append(pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=marks, id=vid))
    return out


def reference(x, weight, bias, relu=False, scale=None, shift=None):
    """The definition, in float64: nearest x2, TF 'same' (bottom/right) zero pad, 2x2 conv."""
    x = x.double()
    if scale is not None:
        x = torch.relu(x * scale.double()[None, :, None, None] + shift.double()[None, :, None, None])
    u = F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))
    y = F.conv2d(u, weight.double(), None if bias is None else bias.double())
    return torch.relu(y) if relu else y


def make_input(shape, dtype, device, layout):
    """``shape`` (NCHW) in ``layout``: "nhwc", "nchw", or "slice" (channels 2.. of a wider
    channels_last buffer)."""
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


def make_norm(c, device):
    """fp32 ``(scale, shift)``, scales of both signs and shifts of both signs: relu(shift) > 0 on
    some channels, so a padding row filled before the transform would show."""
    sign = torch.where(torch.arange(c, device=device) % 2 == 0, 1.0, -1.0)
    return (torch.rand(c, device=device) + 0.25) * sign, torch.randn(c, device=device)


def materialized_norm(x, scale, shift):
    """``T(x)`` in fp32 (fp64 for fp64 x) rounded to x's dtype, as a separate BatchNorm+ReLU would store it."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.relu(x.to(acc) * scale.to(acc)[None, :, None, None] + shift.to(acc)[None, :, None, None]).to(x.dtype)


def run_case(shape, c_out, dtype, device, *, in_layout="nhwc", out_layout="nhwc", packed=True, bias=True,
             relu=True, norm=False):  # fmt: skip
    n, c_in, h, w = shape
    x = make_input(shape, dtype, device, in_layout)
    weight = torch.randn(c_out, c_in, 2, 2, device=device).mul_((4 * c_in) ** -0.5).to(dtype)
    b = torch.randn(c_out, device=device) if bias else None
    out, buf = make_output((n, c_out, 2 * h, 2 * w), dtype, device, out_layout)
    kwargs, xin = {}, x
    if norm:
        kwargs["in_scale"], kwargs["in_shift"] = make_norm(c_in, device)
        xin = materialized_norm(x, kwargs["in_scale"], kwargs["in_shift"])
    w_arg = pack(weight, dtype) if packed else weight
    got = upconv_nearest2x2(x, w_arg, b, relu=relu, **kwargs, out=out)
    assert got is out
    what = f"upconv_nearest2x2 {tuple(shape)}->{c_out} {dtype} in={in_layout} out={out_layout} norm={norm}"
    # The packed blocks are sums of up to 4 weights rounded once to x's dtype; the reference
    # convolves the unrounded sum of the rounded weights: within a 16-bit dot's own rounding.
    assert_close(got, reference(xin, weight, b, relu), tolerance_name(dtype), what)
    if out_layout == "slice":
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + c_out :]).all(), "wrote outside its slice"


# --------------------------------------------------------------------------------------------- launcher
@pytest.mark.parametrize("packed", quick_first([True, False], ids=["packed", "unpacked"]))
@pytest.mark.parametrize(
    "shape, c_out",
    quick_first(
        [((2, 37, 3, 5), 3), ((1, 3, 5, 7), 37), ((1, 19, 4, 6), 33), ((1, 1, 1, 1), 2)],
        ids=["b2-c37-3x5", "b1-c3-5x7", "b1-c19-4x6", "1x1"],
    ),
)
@pytest.mark.parametrize("dtype", quick_first(DTYPES))
def test_matches_reference(shape, c_out, dtype, packed, device):
    run_case(shape, c_out, dtype, device, packed=packed)


@pytest.mark.parametrize("out_layout", quick_first(["slice", "nhwc"]))
@pytest.mark.parametrize("in_layout", quick_first(["slice", "nhwc", "nchw"]))
def test_layouts(in_layout, out_layout, device):
    run_case((2, 19, 3, 5), 7, torch.float16, device, in_layout=in_layout, out_layout=out_layout)


@pytest.mark.parametrize("in_layout", quick_first(["slice", "nhwc"]))
@pytest.mark.parametrize("dtype", quick_first(DTYPES, 2))
def test_norm_matches_reference(in_layout, dtype, device):
    # relu(shift) > 0 on half the channels: the padding row/column must stay 0 after the transform.
    run_case((2, 37, 3, 5), 5, dtype, device, in_layout=in_layout, out_layout=in_layout, norm=True)


@pytest.mark.parametrize("bias, relu", quick_first([(False, False), (True, False), (False, True)]))
def test_bias_and_relu_flags(bias, relu, device):
    run_case((1, 5, 3, 3), 6, torch.float32, device, bias=bias, relu=relu)


def _all_gpu_tiles():
    lists = [*kernel_module._CONFIGS.values(), *kernel_module._IEEE_CONFIGS.values()]
    tiles = {tuple(sorted(c.kwargs.items())) for configs in lists for c in configs}
    return [dict(t) for t in sorted(tiles)]


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
@pytest.mark.parametrize("tile", _all_gpu_tiles(), ids=lambda t: "-".join(map(str, t.values())))
def test_every_gpu_tile_in_interpreter(tile, device, monkeypatch):
    # Each GPU tile size once: partial M, K and N tiles and BLOCK_N > C_out for every shape a GPU uses.
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", tile)
    run_case((2, 70, 5, 7), 70, torch.float16, device, norm=True)


def reference_input_grad(g, weight):
    """dL/dx of ``reference`` (no bias, no ReLU) for the output gradient g, by float64 autograd."""
    n, _, h2, w2 = g.shape
    x = torch.zeros(n, weight.shape[1], h2 // 2, w2 // 2, dtype=torch.float64, device=g.device, requires_grad=True)
    (gx,) = torch.autograd.grad(reference(x, weight, None), x, g.double())
    return gx


@pytest.mark.parametrize("layout", quick_first(["slice", "nhwc"]))
@pytest.mark.parametrize(
    "shape, c_in",
    quick_first([((2, 37, 6, 10), 5), ((1, 3, 8, 6), 19), ((1, 2, 2, 2), 1)], ids=["c37to5", "c3to19", "1x1"]),
)
@pytest.mark.parametrize("dtype", quick_first(DTYPES, 2))
def test_input_grad_matches_reference(shape, c_in, dtype, layout, device):
    """The dgrad kernel vs float64 autograd of the reference: g (channel slice of a wider buffer
    or plain NHWC) into a NaN-poisoned output; the weight in the dgrad's fast storage."""
    n, c_out, h2, w2 = shape
    g = make_input(shape, dtype, device, layout)
    weight = torch.randn(c_out, c_in, 2, 2, device=device).mul_((4 * c_in) ** -0.5).to(dtype)
    packed = pack(weight, dtype).transpose(1, 2).contiguous().transpose(1, 2)
    out, buf = make_output((n, c_in, h2 // 2, w2 // 2), dtype, device, layout)
    assert input_grad(g, packed, out=out) is out
    assert_close(out, reference_input_grad(g, weight), tolerance_name(dtype), f"input grad {shape} {dtype} {layout}")
    if layout == "slice":
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + c_in :]).all(), "wrote outside its slice"


def reference_block_grad(g, x):
    """dL/dP of the packed blocks P for output gradient g and input x (float64 autograd through
    the per-phase composite of P)."""
    c_in, c_out = x.shape[1], g.shape[1]
    blocks = torch.zeros(9, c_in, c_out, dtype=torch.float64, device=x.device, requires_grad=True)
    y = op_module._composite(x.double(), blocks, None, False, None, None)
    (gp,) = torch.autograd.grad(y, blocks, g.double())
    return gp


@pytest.mark.parametrize("norm", quick_first([True, False], ids=["norm", "plain"]))
@pytest.mark.parametrize("layout", quick_first(["slice", "nhwc"]))
@pytest.mark.parametrize(
    "shape, c_out",
    quick_first([((2, 37, 3, 5), 19), ((1, 3, 4, 6), 37), ((1, 1, 1, 1), 2)], ids=["c37to19", "c3to37", "1x1"]),
)
@pytest.mark.parametrize("dtype", quick_first(DTYPES, 2))
def test_weight_grad_matches_reference(shape, c_out, dtype, layout, norm, device):
    """The wgrad kernel (split over pixels: 2 splits in the interpreter, summed in order) vs float64
    autograd; x a channel slice or plain NHWC; NaN-poisoned fp32 output."""
    n, c_in, h, w = shape
    x = make_input(shape, dtype, device, layout)
    g = make_input((n, c_out, 2 * h, 2 * w), dtype, device, "nhwc")
    x_norm = make_norm(c_in, device) if norm else None
    out = torch.full((9, c_in, c_out), float("nan"), device=device)
    assert weight_grad(g, x, x_norm=x_norm, out=out) is out
    xin = materialized_norm(x, *x_norm) if norm else x
    assert_close(out, reference_block_grad(g, xin), tolerance_name(dtype), f"weight grad {shape} {dtype} {layout}")


def test_weight_grad_is_deterministic(device):
    # Split partials are summed in a fixed order: the same inputs give the same bits.
    x = make_input((2, 5, 3, 5), torch.float32, device, "nhwc")
    g = make_input((2, 6, 6, 10), torch.float32, device, "nhwc")
    norm = make_norm(5, device)
    assert torch.equal(weight_grad(g, x, x_norm=norm), weight_grad(g, x, x_norm=norm))


def test_weight_grad_rejects_bad_arguments(device):
    g, x = torch.randn(1, 5, 4, 4, device=device), torch.randn(1, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match="x must be"):
        weight_grad(g, torch.randn(1, 3, 3, 2, device=device))
    with pytest.raises(TypeError):
        weight_grad(g, x.half())
    with pytest.raises(ValueError, match="out must be"):
        weight_grad(g, x, out=torch.empty(9, 3, 5, dtype=torch.float16, device=device))
    with pytest.raises(ValueError):
        weight_grad(g, x, x_norm=(torch.ones(3, device=device), torch.ones(5, device=device)))


def test_input_grad_rejects_bad_arguments(device):
    g, w = torch.randn(1, 5, 4, 4, device=device), torch.randn(9, 3, 5, device=device)
    with pytest.raises(ValueError, match="even"):
        input_grad(torch.randn(1, 5, 3, 4, device=device), w)
    with pytest.raises(ValueError, match="C_out=5"):
        input_grad(g, torch.randn(9, 3, 4, device=device))
    with pytest.raises(TypeError):
        input_grad(g, w.half())
    with pytest.raises(ValueError, match="out must be"):
        input_grad(g, w, out=torch.empty(1, 3, 4, 4, device=device))


def test_pack_layout_and_values():
    weight = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    packed = pack(weight)
    assert packed.shape == (9, 3, 5) and packed.is_contiguous()
    W = lambda a, b: weight[:, :, a, b].T  # noqa: E731  [C_in, C_out]
    expected = [
        W(0, 0) + W(0, 1) + W(1, 0) + W(1, 1),  # phase (0, 0)
        W(0, 0) + W(1, 0), W(0, 1) + W(1, 1),  # phase (0, 1): taps (0, 0), (0, 1)
        W(0, 0) + W(0, 1), W(1, 0) + W(1, 1),  # phase (1, 0): taps (0, 0), (1, 0)
        W(0, 0), W(0, 1), W(1, 0), W(1, 1),  # phase (1, 1)
    ]  # fmt: skip
    torch.testing.assert_close(packed, torch.stack(expected), rtol=0, atol=0)
    assert kernel_module.PHASE_BASE == op_module._PHASE_BASE
    assert [kernel_module.PHASE_BASE[p] + kernel_module.PHASE_TAPS[p] for p in range(3)] == list(
        kernel_module.PHASE_BASE[1:]
    )
    torch.testing.assert_close(op_module._pack(weight, torch.float64), packed, rtol=0, atol=0)
    packed.sum().backward()  # differentiable: W00 appears in 4 blocks, W11 in 4, W01 and W10 in 4
    assert torch.equal(weight.grad, torch.full_like(weight, 4.0))


def test_default_output_is_channels_last(device):
    x = make_input((1, 3, 5, 7), torch.float32, device, "nchw")
    out = upconv_nearest2x2(x, torch.randn(4, 3, 2, 2, device=device), None)
    assert out.shape == (1, 4, 10, 14) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"x": torch.randn(2, 3, 4)}, ValueError),
        ({"x": torch.randn(1, 3, 4, 4, dtype=torch.float64)}, TypeError),
        ({"weight": torch.randn(5, 4, 2, 2)}, ValueError),
        ({"weight": torch.randn(5, 3, 3, 3)}, ValueError),
        ({"weight": torch.randn(8, 3, 5)}, ValueError),
        ({"weight": torch.randn(9, 3, 5, dtype=torch.float16)}, TypeError),
        ({"bias": torch.randn(4)}, ValueError),
        ({"bias": torch.ones(5, dtype=torch.int32)}, TypeError),
        ({"out": torch.empty(1, 5, 4, 4)}, ValueError),
        ({"out": torch.empty(1, 5, 8, 8, dtype=torch.float16)}, TypeError),
        ({"in_scale": torch.ones(3)}, ValueError),
        ({"in_scale": torch.ones(5), "in_shift": torch.ones(5)}, ValueError),
    ],
    ids=["x-3d", "x-fp64", "w-cin", "w-3x3", "packed-9", "packed-dtype", "bias-shape", "bias-int", "out-shape",
         "out-dtype", "scale-only", "norm-c-out"],  # fmt: skip
)
def test_launcher_rejects_bad_arguments(change, error, device):
    args = {"x": torch.randn(1, 3, 4, 4), "weight": torch.randn(9, 3, 5), "bias": torch.randn(5), "out": None}
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error):
        upconv_nearest2x2(x, weight, bias, **args)


def test_compile_specs_cover_every_dtype():
    for arch in (80, 90):
        specs = compile_specs(arch)
        assert len(specs) <= 70, "keep ring 2 to tens of specs"
        fwd = [s for s in specs if s.kernel == "_upconv_nearest2x2_kernel"]
        assert {(s.dtype, s.constexprs["IN_NORM"]) for s in fwd} == {
            (d, n) for d in ("fp32", "fp16", "bf16") for n in (False, True)
        }
        dgrad = [s for s in specs if s.kernel == "_upconv_nearest2x2_dgrad_kernel"]
        assert {s.dtype for s in dgrad} == {"fp32", "fp16", "bf16"}
        wgrad = [s for s in specs if s.kernel == "_upconv_nearest2x2_wgrad_kernel"]
        assert {(s.dtype, s.constexprs["X_NORM"]) for s in wgrad} == {
            (d, n) for d in ("fp32", "fp16", "bf16") for n in (False, True)
        }
        assert len(fwd) + len(dgrad) + len(wgrad) == len(specs)
        for s in specs:
            assert set(s.signature) == set(s.fn.arg_names)
            assert all(s.signature[k] == "constexpr" for k in s.constexprs)


# --------------------------------------------------------------------------------------------- the op
def op_args(shape, c_out, dtype, *, packed=False, norm=False, bias=True, requires_grad=False):
    """Op arguments: parameters in float32 (float64 for float64 x), as the model holds them."""
    n, c_in, h, w = shape
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 2, 2, dtype=pdt).mul_((4 * c_in) ** -0.5)
    if packed:
        weight = pack(weight, dtype)
    b = torch.randn(c_out, dtype=pdt) if bias else None
    scale, shift = [v.to(pdt) for v in make_norm(c_in, "cpu")] if norm else (None, None)
    tensors = [x, weight, b, scale, shift]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("packed", quick_first([False, True], ids=["param", "packed"]))
@pytest.mark.parametrize(
    "dtype", quick_first([torch.float64, torch.float32, torch.float16], 2, ids=["fp64", "fp32", "fp16"])
)
def test_op_forward(dtype, packed, norm):
    # float32/float16 run the kernel (interpreter), float64 the eager per-phase composite.
    x, weight, b, s, t = op_args((2, 5, 3, 5), 7, dtype, packed=packed, norm=norm)
    y = OP(x, weight, b, True, s, t)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    xin = x if s is None else materialized_norm(x, s, t)
    if packed:  # no 2x2 kernel to compare with: the float64 composite of the same packed blocks
        expected = op_module._composite(xin.double(), weight.double(), b.double(), True, None, None)
    else:
        expected = reference(xin, weight.to(dtype), b, relu=True)
    assert_close(y, expected, tolerance_name(dtype), f"op {dtype} packed={packed} norm={norm}")


def test_op_composite_matches_reference_without_interpreter(monkeypatch):
    # CPU without TRITON_INTERPRET (and float64 anywhere): the eager per-phase composite.
    monkeypatch.setattr(op_module, "use_kernels", lambda x: False)
    x, weight, b, s, t = op_args((2, 4, 3, 5), 6, torch.float32, norm=True)
    y = OP(x, weight, b, False, s, t)
    assert_close(y, reference(materialized_norm(x, s, t), weight, b), "fp32", "composite")


@pytest.mark.parametrize("norm", quick_first([False, True], ids=["plain", "norm"]))
@pytest.mark.parametrize("packed", quick_first([False, True], ids=["param", "packed"]))
def test_opcheck(packed, norm):
    args = op_args((1, 3, 3, 3), 4, torch.float32, packed=packed, norm=norm, requires_grad=True)
    torch.library.opcheck(OP, (args[0], args[1], args[2], True, args[3], args[4]))
    torch.library.opcheck(OP, (args[0].detach(), args[1].detach(), None, False))


@pytest.mark.parametrize("packed", quick_first([False, True], ids=["param", "packed"]))
def test_opcheck_input_grad(packed):
    weight = torch.randn(4, 3, 2, 2)
    g = torch.randn(1, 4, 6, 4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(DGRAD_OP, (g, pack(weight) if packed else weight))


@pytest.mark.parametrize("packed", quick_first([False, True], ids=["param", "packed"]))
def test_opcheck_weight_grad(packed):
    x = torch.randn(1, 3, 3, 2).contiguous(memory_format=torch.channels_last)
    g = torch.randn(1, 4, 6, 4).contiguous(memory_format=torch.channels_last)
    norm = make_norm(3, "cpu") if packed else (None, None)
    torch.library.opcheck(WGRAD_OP, (g, x, *norm))


@pytest.mark.parametrize("dtype", quick_first([torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"]))
def test_weight_grad_op(dtype, monkeypatch):
    # float32/float16: the Triton wgrad (interpreter); float64 and CPU without the interpreter: the composite.
    x = torch.randn(2, 5, 3, 5).to(dtype)
    g = torch.randn(2, 6, 6, 10).to(dtype)
    s, t = make_norm(5, "cpu")
    expected = reference_block_grad(g, materialized_norm(x, s, t))
    got = WGRAD_OP(g, x, s, t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, tolerance_name(dtype), f"weight grad op {dtype}")
    monkeypatch.setattr(op_module, "use_kernels", lambda t: False)
    assert_close(WGRAD_OP(g, x, s, t), expected, tolerance_name(dtype), f"composite {dtype}")


@pytest.mark.parametrize("dtype", quick_first([torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"]))
def test_input_grad_op(dtype, monkeypatch):
    # float32/float16: the Triton dgrad (interpreter); float64 and CPU without the interpreter: the composite.
    weight = torch.randn(6, 5, 2, 2, dtype=torch.float64)
    g = torch.randn(2, 6, 6, 10).to(dtype)
    expected = reference_input_grad(g, weight.to(dtype))
    assert_close(DGRAD_OP(g, weight), expected, tolerance_name(dtype), f"input grad op {dtype}")
    monkeypatch.setattr(op_module, "use_kernels", lambda t: False)
    assert_close(DGRAD_OP(g, pack(weight, dtype)), expected, tolerance_name(dtype), f"composite {dtype}")


@pytest.mark.parametrize("norm", quick_first([True, False], ids=["norm", "plain"]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gradients_match_reference(dtype, norm):
    """x, weight, bias (and in_scale, in_shift) gradients vs float64 autograd of the reference,
    with ReLU on (its mask comes from the op's own output)."""
    x, weight, b, s, t = op_args((2, 5, 3, 5), 6, dtype, norm=norm, requires_grad=True)
    y = OP(x, weight, b, True, s, t)
    g = torch.randn_like(y, dtype=torch.float64)
    grads = torch.autograd.grad(y, [v for v in (x, weight, b, s, t) if v is not None], g.to(dtype))
    leaves = [v.detach().double().requires_grad_() for v in (x, weight, b, s, t) if v is not None]
    ref = reference(leaves[0], leaves[1], leaves[2], True, *(leaves[3:] if norm else (None, None)))
    ref_grads = torch.autograd.grad(ref, leaves, g)
    names = ["x", "weight", "bias", "in_scale", "in_shift"]
    for name, got, exp in zip(names, grads, ref_grads, strict=False):
        assert_close(got, exp, "fp64" if dtype == torch.float64 else "fp32", f"d{name} {dtype} norm={norm}")


def test_packed_weight_gradient():
    """A packed weight's gradient is its blocks' gradient: chained through ``pack`` it equals the
    parameter's."""
    x, weight, b, _, _ = op_args((1, 3, 3, 5), 4, torch.float64, requires_grad=True)
    packed = pack(weight)
    g = torch.randn(1, 4, 6, 10, dtype=torch.float64)
    (gp,) = torch.autograd.grad(OP(x, packed, b, False), packed, g)
    (gw_chain,) = torch.autograd.grad(packed, weight, gp)
    (gw,) = torch.autograd.grad(OP(x, weight, b, False), weight, g)
    assert_close(gw_chain, gw, "fp64", "packed -> parameter chain")


def test_torch_compile_fullgraph():
    x, weight, b, s, t = op_args((1, 3, 3, 5), 4, torch.float32, norm=True, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, weight, b, s, t):
        return OP(x, weight, b, True, s, t).sum()

    f(x, weight, b, s, t).backward()
    got = [v.grad.clone() for v in (x, weight, b, s, t)]
    for v in (x, weight, b, s, t):
        v.grad = None
    OP(x, weight, b, True, s, t).sum().backward()
    for got_g, v in zip(got, (x, weight, b, s, t), strict=True):
        torch.testing.assert_close(got_g, v.grad, rtol=0, atol=0)


def test_op_rejects_bad_arguments():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="weight must be"):
        OP(x, torch.randn(5, 4, 2, 2), None, False)
    with pytest.raises(ValueError, match="bias must be"):
        OP(x, torch.randn(5, 3, 2, 2), torch.randn(4), False)
    with pytest.raises(ValueError, match="in_scale"):
        OP(x, torch.randn(5, 3, 2, 2), None, False, torch.ones(3), None)


@pytest.mark.slow
def test_reports_worst_errors(capsys):
    """The figures for the closing notes: worst relative error per dtype of kernel and op backward."""
    rows = {}
    for dtype in (torch.float32, torch.float16):
        x, weight, b, s, t = op_args((2, 37, 5, 7), 19, dtype, norm=True)
        y = OP(x, weight, b, True, s, t)
        rows[str(dtype)] = max_rel_error(y, reference(materialized_norm(x, s, t), weight.to(dtype), b, True))
    with capsys.disabled():
        print("\nupconv_nearest2x2 worst max|err|/max|ref|:", json.dumps(rows))
    assert rows["torch.float32"] < 1e-5 and rows["torch.float16"] < 1e-2


# --------------------------------------------------------------------------------------------- ring 2
@pytest.mark.slow
@pytest.mark.compile
def test_offline_compile_sm90(tmp_path):
    """The specs compiled for sm_90 offline: no spills, shared memory within the limit, HGMMA in
    every 16-bit and TF32 spec (``benchmarks/kernel_report.py``'s checks). Every spec with
    FASTUNET_RING2_FULL=1; else ``--sample 1``: the first spec of each kernel and dtype, the 9
    that test_kernel_report's real-kernel run compiles too (under one lock, the second finds them
    in Triton's cache). The last spec of each (``--sample 2``) is compiled with the same checks by
    CI's ring-2 step (``.ci/run``: sm_90 ``--sample 2`` on both tritons)."""
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--arch", "90", "--quiet", "--no-modules",
        "--provider", f"{kernel_module.__name__}:compile_specs", "--json", str(out), "--sample", "0" if RING2_FULL else "1",
    ]  # fmt: skip
    with ring2_lock():  # test_kernel_report's real-kernel run compiles these 9 specs too
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{proc.stdout[-1000:]}"
    rows = json.loads(out.read_text())
    specs = compile_specs(90)
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(s.kernel, s.dtype) for s in specs}, "every kernel and dtype"
    assert not RING2_FULL or len(rows) == len(specs)
    assert all(r["spills"] == 0 for r in rows), [r for r in rows if r["spills"]]
    assert all(r["hgmma"] for r in rows if r["dtype"] in ("fp16", "bf16")), "16-bit specs without HGMMA"



# --------------------------------------------------------------------------------------------- ring 3
# The Keras U-Net's four up-sampling steps (C_in -> C_out at h x w) at batch 2, real sizes.
KERAS_UPCONVS = [(1024, 512, 16, 16), (512, 256, 32, 32), (256, 128, 64, 64), (128, 64, 128, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("c_in, c_out, h, w", KERAS_UPCONVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keras_sizes_cuda(c_in, c_out, h, w, dtype, norm):
    device = torch.device("cuda")
    run_case((2, c_in, h, w), c_out, dtype, device, norm=norm)
    g = make_input((2, c_out, 2 * h, 2 * w), dtype, device, "nhwc")
    x = make_input((2, c_in, h, w), dtype, device, "nhwc")
    weight = torch.randn(c_out, c_in, 2, 2, device=device).mul_((4 * c_in) ** -0.5).to(dtype)
    packed = pack(weight, dtype).transpose(1, 2).contiguous().transpose(1, 2)
    assert_close(input_grad(g, packed), reference_input_grad(g, weight), tolerance_name(dtype), "dgrad")
    x_norm = make_norm(c_in, device) if norm else None
    xin = materialized_norm(x, *x_norm) if norm else x
    assert_close(weight_grad(g, x, x_norm=x_norm), reference_block_grad(g, xin), tolerance_name(dtype), "wgrad")


def test_the_phase_matrix_is_made_once_and_usable_by_autograd():
    # A per-step torch.tensor(list, device=cuda) waits for the GPU and breaks a CUDA graph
    # capture: both layers keep one matrix per dtype and device.
    for make in (kernel_module._phase_matrix, op_module._phase_matrix):
        with torch.inference_mode():
            first = make(torch.float64, torch.empty(0))
        assert make(torch.float64, torch.empty(0)) is first and not first.is_inference()
        assert torch.equal(first, kernel_module._phase_matrix(torch.float64, torch.empty(0)))
        assert first.shape == (9, 4) and first.sum(1).tolist() == [4, 2, 2, 2, 2, 1, 1, 1, 1]
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    pack(w).sum().backward()  # the cached matrix, made under inference mode, saved for backward
    assert w.grad is not None and torch.isfinite(w.grad).all()
