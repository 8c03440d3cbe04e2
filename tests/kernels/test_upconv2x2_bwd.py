"""Spec for ``kernels/upconv2x2_bwd.py``: input and weight gradients of the 2x2/s2 upconv, with
the BatchNorm+ReLU-on-load transform on the weight gradient's input (and the split reduction of
``kernels/_split_k.py`` it shares with the head's weight gradient).

Results are compared with ``aten.convolution_backward`` (transposed, stride 2) in float64 on the
same rounded inputs: ``T(x) = max(x*scale + shift, 0)`` is computed in fp32 and rounded to the
input dtype before the upcast. Outputs go into NaN-poisoned buffers so unwritten elements fail.
Without a GPU the kernels run in Triton's interpreter, so shapes are tiny and the grid is a
spread, not a cartesian product.
"""

from __future__ import annotations

import pytest
import torch
from fastunet.kernels import _split_k
from fastunet.kernels import upconv2x2_bwd as K
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


def upconv_reference(g, x, weight, x_norm=None):
    """(dX, dW) of conv_transpose2d(T(x), weight, stride=2) in float64 on CPU."""
    grads = torch.ops.aten.convolution_backward(
        g.cpu().double(),
        transform(x, x_norm).cpu().double(),
        weight.cpu().double(),
        None,
        [2, 2],
        [0, 0],
        [1, 1],
        True,
        [0, 0],
        1,
        [True, True, False],
    )
    return grads[0], grads[1]


def upconv_case(n, c_in, c_out, h, w, dtype, device, layout="channels_last", norm=False):
    g = _activation(n, c_out, 2 * h, 2 * w, dtype, device, layout)
    x = _activation(n, c_in, h, w, dtype, device, layout)
    weight = torch.randn(c_in, c_out, 2, 2).to(dtype).to(device)
    return g, x, weight, (_norm(c_in, device) if norm else None)


def poisoned(shape, device, dtype=torch.float32, memory_format=torch.contiguous_format):
    return poisoned_like(torch.empty(shape, device=device, dtype=dtype), memory_format)


# ---------------------------------------------------------------------------------- upconv


UPCONV_SHAPES = [
    # n, c_in, c_out, h, w, layout, norm
    (2, 3, 5, 1, 1, "channels_last", True),
    (1, 3, 5, 3, 2, "nchw", False),
    (2, 7, 20, 2, 3, "channels_last", False),  # two K blocks per phase (C_out > 16)
    (1, 18, 3, 3, 3, "channel_slice", True),  # two C_in blocks
    (3, 5, 5, 2, 2, "nchw", True),
]


@pytest.mark.parametrize("n, c_in, c_out, h, w, layout, norm", UPCONV_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_upconv_grads_match_convolution_backward(n, c_in, c_out, h, w, layout, norm, dtype, device):
    g, x, weight, x_norm = upconv_case(n, c_in, c_out, h, w, dtype, device, layout, norm)
    dx_ref, dw_ref = upconv_reference(g, x, weight, x_norm)
    tol = tolerance_name(dtype)
    what = f"{n}x{c_in}x{h}x{w} -> {c_out} {layout} norm={norm}"

    out = poisoned((n, c_in, h, w), device, dtype, torch.channels_last)
    dx = K.upconv2x2_input_grad(g, weight, out=out)
    assert dx is out
    assert_close(dx, dx_ref, tol, "dX " + what)

    out_w = poisoned((c_in, c_out, 2, 2), device)
    dw = K.upconv2x2_weight_grad(g, x, x_norm=x_norm, out=out_w)
    assert dw is out_w
    assert_close(dw, dw_ref, tol, "dW " + what)


def test_upconv_default_outputs_and_packed_weight(device):
    g, x, weight, x_norm = upconv_case(2, 6, 4, 3, 2, torch.float32, device, norm=True)
    dx_ref, dw_ref = upconv_reference(g, x, weight, x_norm)
    packed = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # pack_upconv2x2_weight
    dx = K.upconv2x2_input_grad(g, packed)
    assert dx.dtype == g.dtype and dx.is_contiguous(memory_format=torch.channels_last)
    assert_close(dx, dx_ref, tolerance_name(torch.float32), "dX packed weight")
    dw = K.upconv2x2_weight_grad(g, x, x_norm=x_norm)
    assert dw.shape == (6, 4, 2, 2) and dw.dtype == torch.float32 and dw.is_contiguous()
    assert_close(dw, dw_ref, tolerance_name(torch.float32), "dW default out")


def test_upconv_weight_grad_into_packed_out(device):
    """dW written straight into the forward's packed layout (storage [C_in, 2, 2, C_out])."""
    g, x, weight, x_norm = upconv_case(1, 4, 6, 2, 3, torch.float32, device, norm=True)
    _, dw_ref = upconv_reference(g, x, weight, x_norm)
    out = poisoned((4, 2, 2, 6), device).permute(0, 3, 1, 2)
    got = K.upconv2x2_weight_grad(g, x, x_norm=x_norm, out=out)
    assert got is out
    assert_close(got, dw_ref, tolerance_name(torch.float32), "packed dW")


@pytest.mark.parametrize("split_k", [1, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_upconv_weight_grad_splits_are_deterministic(split_k, dtype, monkeypatch, device):
    """Direct writes (1 split) and the workspace path (7 splits over 3 pixel steps: some empty)
    match the reference, and repeated calls give the same bits."""
    monkeypatch.setattr(K, "pick_split_k", lambda *args: split_k)
    g, x, weight, x_norm = upconv_case(2, 5, 3, 3, 6, dtype, device, norm=True)  # 36 pixels
    _, dw_ref = upconv_reference(g, x, weight, x_norm)
    got = K.upconv2x2_weight_grad(g, x, x_norm=x_norm, out=poisoned((5, 3, 2, 2), device))
    assert_close(got, dw_ref, tolerance_name(dtype), f"split_k={split_k}")
    assert torch.equal(K.upconv2x2_weight_grad(g, x, x_norm=x_norm), got)


def test_upconv_input_grad_is_deterministic(device):
    g, _, weight, _ = upconv_case(2, 7, 20, 2, 3, torch.float16, device)
    assert torch.equal(K.upconv2x2_input_grad(g, weight), K.upconv2x2_input_grad(g, weight))


def test_upconv_empty_batch(device):
    g, x, weight, x_norm = upconv_case(0, 3, 4, 2, 2, torch.float16, device, norm=True)
    dx = K.upconv2x2_input_grad(g, weight)
    assert dx.shape == (0, 3, 2, 2)
    dw = K.upconv2x2_weight_grad(g, x, x_norm=x_norm, out=poisoned((3, 4, 2, 2), device))
    assert torch.equal(dw, torch.zeros_like(dw))


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "case, exc",
    [
        ("g_dtype", TypeError),  # float64 is not a kernel dtype
        ("g_not_tensor", TypeError),
        ("g_odd", ValueError),
        ("g_dim", ValueError),
        ("weight_dtype", TypeError),
        ("weight_shape", ValueError),
        ("out_shape", ValueError),
        ("out_dtype", TypeError),
    ],
)
def test_upconv_input_grad_rejects_bad_inputs(case, exc, device):
    g, _, weight, _ = upconv_case(1, 3, 4, 2, 2, torch.float32, device)
    kwargs = {}
    if case == "g_dtype":
        g, weight = g.double(), weight.double()
    elif case == "g_not_tensor":
        g = g.tolist()
    elif case == "g_odd":
        g = g[:, :, :3]
    elif case == "g_dim":
        g = g[0]
    elif case == "weight_dtype":
        weight = weight.half()
    elif case == "weight_shape":
        weight = weight[:, :3]
    elif case == "out_shape":
        kwargs["out"] = torch.empty(1, 3, 2, 3, device=device)
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(1, 3, 2, 2, device=device).half()
    with pytest.raises(exc):
        K.upconv2x2_input_grad(g, weight, **kwargs)


@pytest.mark.parametrize(
    "case, exc",
    [
        ("x_dtype", TypeError),
        ("x_spatial", ValueError),
        ("x_batch", ValueError),
        ("norm_length", ValueError),
        ("norm_dtype", TypeError),
        ("norm_not_pair", TypeError),
        ("out_shape", ValueError),
        ("out_dtype", TypeError),
    ],
)
def test_upconv_weight_grad_rejects_bad_inputs(case, exc, device):
    g, x, _, x_norm = upconv_case(1, 3, 4, 2, 2, torch.float32, device, norm=True)
    kwargs = {}
    if case == "x_dtype":
        x = x.half()
    elif case == "x_spatial":
        x = x[:, :, :1]
    elif case == "x_batch":
        x = torch.cat([x, x])
    elif case == "norm_length":
        x_norm = (x_norm[0][:2], x_norm[1][:2])
    elif case == "norm_dtype":
        x_norm = (x_norm[0].half(), x_norm[1])
    elif case == "norm_not_pair":
        x_norm = x_norm[0]
    elif case == "out_shape":
        kwargs["out"] = torch.empty(4, 3, 2, 2, device=device)
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(3, 4, 2, 2, device=device).half()
    with pytest.raises(exc):
        K.upconv2x2_weight_grad(g, x, x_norm=x_norm, **kwargs)


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
    norm flags, every dtype and both fp32 precisions."""
    for arch in (80, 90):
        specs = K.compile_specs(arch)
        assert {s.kernel for s in specs} == {"_upconv2x2_dgrad_kernel", "_upconv2x2_wgrad_kernel"}
        _check_specs(specs, arch)
        _check_norm_dtype_precision(specs, "_upconv2x2_wgrad_kernel")


def test_split_reduction_spec():
    """The split reduction (shared with the head's weight grad) has its one spec in ``_split_k``."""
    for arch in (80, 90):
        specs = _split_k.compile_specs(arch)
        assert [s.kernel for s in specs] == ["_sum_splits_kernel"]
        _check_specs(specs, arch)


def test_autotune_pruning_keeps_narrow_tiles():
    for arch in (80, 90):
        shape = dict(elem=2, C_in=8, C_out=8, INPUT_PRECISION="ieee")
        kept = K._TUNERS["wgrad"].candidates(arch, shape)
        assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)


# ------------------------------------------------------------------------- ring 3: real sizes


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP), torch.float16, torch.float32]
)
def test_real_sizes_on_cuda(dtype, norm):
    device = torch.device("cuda")
    g, x, weight, x_norm = upconv_case(2, 128, 64, 32, 32, dtype, device, norm=norm)
    dx_ref, dw_ref = upconv_reference(g, x, weight, x_norm)
    tol = tolerance_name(dtype)
    assert_close(K.upconv2x2_input_grad(g, weight), dx_ref, tol, "upconv dX")
    dw = K.upconv2x2_weight_grad(g, x, x_norm=x_norm)
    assert_close(dw, dw_ref, tol, "upconv dW")
    assert torch.equal(K.upconv2x2_weight_grad(g, x, x_norm=x_norm), dw)
