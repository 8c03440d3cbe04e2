"""Spec for ``kernels/head1x1_bwd.py``: input and weight gradients of the 1x1 head, with the
BatchNorm+ReLU-on-load transform on the weight gradient's input.

Results are compared with an einsum in float64 on the same rounded inputs: ``T(x) = max(x*scale
+ shift, 0)`` is computed in fp32 and rounded to the input dtype before the upcast. Outputs go
into NaN-poisoned buffers so unwritten elements fail. Without a GPU the kernels run in Triton's
interpreter, so shapes are tiny and the grid is a spread, not a cartesian product.
"""

from __future__ import annotations

import pytest
import torch
from fastunet.kernels import head1x1_bwd as K
from fastunet.kernels._common import interpreting, smem_limit
from helpers import assert_close, poisoned_like, tolerance_name

pytestmark = pytest.mark.upconv

BF16_SKIP = pytest.mark.skipif(
    interpreting(), reason="Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA"
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


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
    raise ValueError(layout)


def _norm(c, device):
    """(scale, shift) with both signs of scale and shifts that leave some ReLUs closed."""
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0)
    scale = sign * (torch.rand(c) + 0.5)
    shift = 0.5 * torch.randn(c)
    return scale.to(device), shift.to(device)


def transform(x, norm):
    """T(x) in x.dtype: fp32 scale/shift/ReLU, then rounded, as the kernels must do."""
    if norm is None:
        return x
    scale, shift = norm
    return (x.float() * scale[:, None, None] + shift[:, None, None]).clamp_min(0).to(x.dtype)


def head_reference(gz, x, weight, x_norm=None):
    """(dX, dW [K, C]) of conv2d(T(x), weight 1x1) in float64 on CPU."""
    gz64 = gz.cpu().double()
    dx = torch.einsum("nkhw,kc->nchw", gz64, weight.reshape(weight.shape[0], -1).cpu().double())
    dw = torch.einsum("nkhw,nchw->kc", gz64, transform(x, x_norm).cpu().double())
    return dx, dw


def head_case(n, k, c, h, w, dtype, device, layout="channels_last", norm=False):
    gz = _activation(n, k, h, w, dtype, device, layout)
    x = _activation(n, c, h, w, dtype, device, layout)
    weight = torch.randn(k, c, 1, 1).to(device)  # the fp32 parameter
    return gz, x, weight, (_norm(c, device) if norm else None)


def poisoned(shape, device, dtype=torch.float32, memory_format=torch.contiguous_format):
    return poisoned_like(torch.empty(shape, device=device, dtype=dtype), memory_format)


# ------------------------------------------------------------------------------------ head


HEAD_SHAPES = [
    # n, k, c, h, w, layout, norm
    (2, 1, 7, 3, 2, "channels_last", True),
    (1, 3, 7, 1, 1, "nchw", False),
    (2, 3, 20, 2, 5, "channel_slice", True),  # two C blocks
    (1, 17, 5, 4, 3, "nchw", True),  # a 32-wide class tile
]


@pytest.mark.parametrize("n, k, c, h, w, layout, norm", HEAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_grads_match_einsum(n, k, c, h, w, layout, norm, dtype, device):
    gz, x, weight, x_norm = head_case(n, k, c, h, w, dtype, device, layout, norm)
    dx_ref, dw_ref = head_reference(gz, x, weight, x_norm)
    tol = tolerance_name(dtype)
    what = f"{n}x{c}x{h}x{w} -> {k} {layout} norm={norm}"

    out = poisoned((n, c, h, w), device, dtype, torch.channels_last)
    dx = K.head1x1_input_grad(gz, weight, out=out)
    assert dx is out
    assert_close(dx, dx_ref, tol, "dX " + what)

    out_w = poisoned((k, c), device)
    dw = K.head1x1_weight_grad(gz, x, x_norm=x_norm, out=out_w)
    assert dw is out_w
    assert_close(dw, dw_ref, tol, "dW " + what)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.float64])
def test_head_input_grad_weight_dtypes_and_views(w_dtype, device):
    gz, x, weight, _ = head_case(2, 3, 6, 2, 3, torch.float16, device)
    weight = weight.to(w_dtype)
    dx_ref, _ = head_reference(gz, x, weight)
    # A [K, C] view with transposed storage, and the [K, C, 1, 1] conv weight itself.
    transposed = weight[:, :, 0, 0].t().contiguous().t()
    for wt in (weight, transposed):
        dx = K.head1x1_input_grad(gz, wt)
        assert dx.dtype == torch.float16 and dx.is_contiguous(memory_format=torch.channels_last)
        assert_close(dx, dx_ref, tolerance_name(torch.float16), f"weight {w_dtype} {tuple(wt.stride())}")


@pytest.mark.parametrize("split_k", [1, 3, 7])
def test_head_weight_grad_splits_are_deterministic(split_k, monkeypatch, device):
    monkeypatch.setattr(K, "pick_split_k", lambda *args: split_k)
    gz, x, weight, x_norm = head_case(2, 3, 7, 4, 5, torch.float32, device, norm=True)  # 40 pixels
    _, dw_ref = head_reference(gz, x, weight, x_norm)
    out = poisoned((7, 3), device).t()  # a transposed destination
    got = K.head1x1_weight_grad(gz, x, x_norm=x_norm, out=out)
    assert got is out
    assert_close(got, dw_ref, tolerance_name(torch.float32), f"split_k={split_k}")
    assert torch.equal(K.head1x1_weight_grad(gz, x, x_norm=x_norm), got)


def test_head_empty_batch(device):
    gz, x, weight, _ = head_case(0, 2, 5, 3, 3, torch.float32, device)
    assert K.head1x1_input_grad(gz, weight).shape == (0, 5, 3, 3)
    dw = K.head1x1_weight_grad(gz, x, out=poisoned((2, 5), device))
    assert torch.equal(dw, torch.zeros_like(dw))


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "case, exc",
    [
        ("gz_dtype", TypeError),
        ("too_many_classes", ValueError),
        ("x_dtype", TypeError),
        ("x_spatial", ValueError),
        ("norm_length", ValueError),
        ("weight_classes", ValueError),
        ("weight_shape", ValueError),
        ("weight_int", TypeError),
        ("out_dtype", TypeError),
    ],
)
def test_head_grads_reject_bad_inputs(case, exc, device):
    gz, x, weight, x_norm = head_case(1, 2, 5, 2, 3, torch.float32, device, norm=True)
    call = "wgrad"
    kwargs = {}
    if case == "gz_dtype":
        gz, x = gz.double(), x.double()
        x_norm = None
    elif case == "too_many_classes":
        gz = torch.zeros(1, K.MAX_CLASSES + 1, 2, 3, device=device)
    elif case == "x_dtype":
        x = x.half()
    elif case == "x_spatial":
        x = x[:, :, :1]
    elif case == "norm_length":
        x_norm = (x_norm[0][:4], x_norm[1][:4])
    elif case == "weight_classes":
        call, weight = "dgrad", weight[:1]
    elif case == "weight_shape":
        call, weight = "dgrad", weight.expand(2, 5, 3, 3)
    elif case == "weight_int":
        call, weight = "dgrad", weight.long()
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(2, 5, device=device).half()
    with pytest.raises(exc):
        if call == "wgrad":
            K.head1x1_weight_grad(gz, x, x_norm=x_norm, **kwargs)
        else:
            K.head1x1_input_grad(gz, weight, **kwargs)


# -------------------------------------------------------------------------- configs and specs


def _check_specs(specs, arch):
    """Unique, matching the kernels' signatures, fitting in shared memory."""
    assert len({(s.kernel, s.config, s.dtype) for s in specs}) == len(specs)
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names)
        for name, ty in s.signature.items():
            assert (ty == "constexpr") == (name in s.constexprs), (s.kernel, name)
        c = s.constexprs
        if "BLOCK_M" in c and "BLOCK_K" in c:
            elem = 4 if s.dtype == "fp32" else 2
            smem = s.num_stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elem
            assert smem <= smem_limit(arch), s.config
        if s.extra["expect_hgmma"]:
            assert arch == 90 and s.num_warps in (4, 8)


def _check_norm_dtype_precision(specs, kernel):
    mine = [s for s in specs if s.kernel == kernel]
    assert {s.constexprs["X_NORM"] for s in mine} == {False, True}
    assert {s.dtype for s in mine} == {"fp32", "fp16", "bf16"}
    assert {s.constexprs["INPUT_PRECISION"] for s in mine if s.dtype == "fp32"} == {"tf32", "ieee"}


def test_compile_specs_cover_every_kernel():
    """Specs are unique, match the kernels' signatures, fit in shared memory, and cover both
    norm flags, every dtype, both fp32 precisions and every class tile."""
    for arch in (80, 90):
        specs = K.compile_specs(arch)
        assert {s.kernel for s in specs} == {"_head1x1_wgrad_kernel", "_head1x1_dgrad_kernel"}
        _check_specs(specs, arch)
        _check_norm_dtype_precision(specs, "_head1x1_wgrad_kernel")
        assert {s.constexprs["BLOCK_K"] for s in specs if s.kernel == "_head1x1_wgrad_kernel"} == {16, 32, 64}


def test_autotune_pruning_keeps_narrow_tiles():
    for arch in (80, 90):
        shape = dict(elem=4, C=16, INPUT_PRECISION="ieee", BLOCK_K=64)
        kept = K._TUNERS["head_wgrad"].candidates(arch, shape)
        assert kept and all(c.kwargs["BLOCK_C"] <= 64 for c in kept)


# ------------------------------------------------------------------------- ring 3: real sizes


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP), torch.float16, torch.float32]
)
def test_real_sizes_on_cuda(dtype, norm):
    device = torch.device("cuda")
    tol = tolerance_name(dtype)
    gz, x, weight, x_norm = head_case(2, 3, 64, 128, 128, dtype, device, norm=norm)
    dx_ref, dw_ref = head_reference(gz, x, weight, x_norm)
    assert_close(K.head1x1_input_grad(gz, weight), dx_ref, tol, "head dX")
    dw = K.head1x1_weight_grad(gz, x, x_norm=x_norm)
    assert_close(dw, dw_ref, tol, "head dW")
    assert torch.equal(K.head1x1_weight_grad(gz, x, x_norm=x_norm), dw)
