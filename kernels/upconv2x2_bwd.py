"""Backward of the transposed conv 2x2/s2 (``upconv2x2``): its input and weight gradients.

Notation (see ``_split_k``): ``T(x)`` is the BatchNorm+ReLU the forward applies on load when a
norm ``(scale, shift)`` is given, the identity otherwise.

* ``upconv2x2_input_grad(g, weight)``: ``dX[n, ci, i, j] = sum_{co,di,dj} g[n, co, 2i+di, 2j+dj]
  * weight[ci, co, di, dj]``. A GEMM ``[M = N*h*w, K = 4*C_out] @ [4*C_out, C_in]`` whose A load
  gathers the four output phases of each input pixel (K runs phase-major, then ``co``).
* ``upconv2x2_weight_grad(g, x, x_norm=)``: ``dW[ci, co, di, dj] = sum_{n,i,j} T(x)[n, ci, i, j]
  * g[n, co, 2i+di, 2j+dj]``. A GEMM ``[M = C_out, K = pixels] @ [pixels, N = C_in]`` per phase,
  the transform applied to the x tile between its load and the dot; the pixel range is split
  over ``SPLIT_K`` programs and the partials summed in a fixed order (``_split_k``).

Offline compile report: ``compile_specs(arch)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import KernelSpec, cdiv, dot_precision, tuned_arch
from ._split_k import (
    INT32_MAX,
    MAX_SPLIT_K,
    UNIT_STRIDES,
    Cfg,
    check_activation,
    check_device,
    check_grad,
    check_norm,
    check_out,
    check_pixels,
    check_same_device,
    check_tensor,
    expect_wgmma,
    make_tuner,
    pick_split_k,
    reduce_splits,
    run_tuned,
    spec,
    triton_config,
)
from ._split_k import usable_configs as usable_from
from ._tuning import bucket
from .norm_act import affine_relu

__all__ = ["upconv2x2_input_grad", "upconv2x2_weight_grad", "compile_specs"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("N",))
def _upconv2x2_dgrad_kernel(
    g_ptr,  # [N, C_out, 2h, 2w], any strides (channels_last is the fast layout)
    w_ptr,  # [C_in, C_out, 2, 2], any strides, g's dtype (packed [C_in, 2, 2, C_out] is fast)
    out_ptr,  # [N, C_in, h, w], any strides, g's dtype
    N,
    h,
    w,
    C_in,
    C_out,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_wi,
    stride_wo,
    stride_wh,
    stride_ww,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M pixels, BLOCK_N input channels]`` tile of the upconv's input gradient.

    GEMM: M = N*h*w input pixels, N = C_in, K = 4*C_out as (phase, co), phase-major: step t
    reads phase ``t // cdiv(C_out, BLOCK_K)``, so every A tile is ``g`` at output pixels
    ``(2i+di, 2j+dj)`` over a contiguous ``co`` run, and its B tile is
    ``weight[ci, co:co+BLOCK_K, di, dj]`` (contiguous along ``co`` once packed).
    FLOPs: ``2 * N*h*w * 4*C_out * C_in``. Minimum bytes moved:
    ``(4*N*h*w*C_out + 4*C_out*C_in + N*h*w*C_in) * elem``; g tiles are re-read once per
    C_in block, mostly from L2 (column tiles of one pixel tile run on neighbouring program ids).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(C_in, BLOCK_N)
    # Column tiles vary fastest so the programs that share an A tile run together (L2 reuse).
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    hw = h * w
    M = N * hw  # < 2**31, checked by the launcher
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] input pixel index
    mask_m = offs_m < M
    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    i_idx = (rem // w).to(tl.int64)
    j_idx = (rem % w).to(tl.int64)
    g_row = n_idx * stride_gn + (2 * i_idx) * stride_gh + (2 * j_idx) * stride_gw  # [BLOCK_M] phase (0, 0)

    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_ci = offs_ci < C_in
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_col = offs_ci * stride_wi  # [BLOCK_N] (the weight is far below 2**31 elements)

    num_kb = tl.cdiv(C_out, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for t in range(0, 4 * num_kb):
        phase = t // num_kb  # di * 2 + dj
        di = phase // 2
        dj = phase % 2
        offs_co = (t - phase * num_kb) * BLOCK_K + offs_k  # [BLOCK_K]
        mask_co = offs_co < C_out
        g_ptrs = g_ptr + (
            (g_row + (di * stride_gh + dj * stride_gw))[:, None] + (offs_co.to(tl.int64) * stride_gc)[None, :]
        )  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + (
            (offs_co * stride_wo + (di * stride_wh + dj * stride_ww))[:, None] + w_col[None, :]
        )  # [BLOCK_K, BLOCK_N]
        a = tl.load(g_ptrs, mask=mask_m[:, None] & mask_co[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_co[:, None] & mask_ci[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_row = n_idx * stride_on + i_idx * stride_oh + j_idx * stride_ow  # [BLOCK_M]
    out_ptrs = out_ptr + (out_row[:, None] + (offs_ci.to(tl.int64) * stride_oc)[None, :])  # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@triton.jit(do_not_specialize=("N", "SPLIT_K"))
def _upconv2x2_wgrad_kernel(
    g_ptr,  # [N, C_out, 2h, 2w], any strides (channels_last is the fast layout)
    x_ptr,  # [N, C_in, h, w], any strides, g's dtype
    scale_ptr,  # [C_in] fp32, contiguous (unused unless X_NORM)
    shift_ptr,  # [C_in] fp32, contiguous (unused unless X_NORM)
    out_ptr,  # fp32 [C_in, C_out, 2, 2], strides (stride_oi, stride_oo, stride_oh, stride_ow);
    # with SPLIT_K > 1 a workspace of SPLIT_K such slices, stride_os apart
    N,
    h,
    w,
    C_in,
    C_out,
    SPLIT_K,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_oi,
    stride_oo,
    stride_oh,
    stride_ow,
    stride_os,
    X_NORM: tl.constexpr,  # multiply T(x) = max(x*scale + shift, 0) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M output channels, BLOCK_N input channels]`` tile of one phase's dW over one
    split of the pixels.

    GEMM per phase (di, dj): M = C_out, N = C_in, K = N*h*w input pixels (< 2^31). A is
    ``g[n, co, 2i+di, 2j+dj]`` (``[BLOCK_M, BLOCK_K]``, co-contiguous in NHWC), B is
    ``T(x)[n, ci, i, j]`` (``[BLOCK_K, BLOCK_N]``, ci-contiguous in NHWC), transformed in fp32
    and rounded to x's dtype before the dot.
    FLOPs: ``2 * N*h*w * C_in * 4*C_out``. Minimum bytes moved:
    ``(4*N*h*w*C_out + N*h*w*C_in) * elem + 4*C_in*C_out*4*SPLIT_K``; x tiles are re-read once
    per (phase, C_out block), mostly from L2 (those programs have neighbouring ids).

    Grid: ``(4 * cdiv(C_out, BLOCK_M) * cdiv(C_in, BLOCK_N), SPLIT_K)``.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Row tiles (phase, co block) vary fastest: neighbouring programs share their x tile.
    num_co_blocks = tl.cdiv(C_out, BLOCK_M)
    num_pid_m = 4 * num_co_blocks
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    phase = pid_m // num_co_blocks  # di * 2 + dj
    di = phase // 2
    dj = phase % 2

    offs_co = (pid_m % num_co_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    co_mask = offs_co < C_out
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ci_mask = offs_ci < C_in
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    # Split boundaries fall on BLOCK_K steps, so every split runs whole steps (some may run none).
    hw = h * w
    P = N * hw
    per_split = tl.cdiv(tl.cdiv(P, BLOCK_K), SPLIT_K) * BLOCK_K
    p_lo = pid_k * per_split
    p_hi = min(p_lo + per_split, P)

    if X_NORM:
        scale = tl.load(scale_ptr + offs_ci, mask=ci_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        shift = tl.load(shift_ptr + offs_ci, mask=ci_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    g_col = offs_co.to(tl.int64) * stride_gc + (di * stride_gh + dj * stride_gw)  # [BLOCK_M]
    x_col = offs_ci.to(tl.int64) * stride_xc  # [BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for p0 in range(p_lo, p_hi, BLOCK_K):
        offs_p = p0 + offs_k  # [BLOCK_K] flat input pixels (int32: N*h*w < 2^31)
        p_ok = offs_p < p_hi
        img = offs_p // hw
        rem = offs_p - img * hw
        i_idx = (rem // w).to(tl.int64)
        j_idx = (rem % w).to(tl.int64)
        img64 = img.to(tl.int64)
        g_pix = img64 * stride_gn + (2 * i_idx) * stride_gh + (2 * j_idx) * stride_gw  # [BLOCK_K]
        x_pix = img64 * stride_xn + i_idx * stride_xh + j_idx * stride_xw  # [BLOCK_K]
        a = tl.load(g_ptr + g_col[:, None] + g_pix[None, :], mask=co_mask[:, None] & p_ok[None, :], other=0.0)
        b_mask = p_ok[:, None] & ci_mask[None, :]
        b = tl.load(x_ptr + x_pix[:, None] + x_col[None, :], mask=b_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if X_NORM:
            # Masked lanes are 0, not T(0) = relu(shift): a non-finite shift must not leak in.
            b = tl.where(b_mask, affine_relu(b, scale, shift), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # a: [BLOCK_M, BLOCK_K]

    dst_ptr = out_ptr + pid_k.to(tl.int64) * stride_os
    o_ptrs = dst_ptr + (
        (offs_co.to(tl.int64) * stride_oo + (di * stride_oh + dj * stride_ow))[:, None]
        + (offs_ci.to(tl.int64) * stride_oi)[None, :]
    )  # [BLOCK_M, BLOCK_N]
    tl.store(o_ptrs, acc, mask=co_mask[:, None] & ci_mask[None, :])


# --------------------------------------------------------------------------------------------
# Configs: short explicit lists per architecture, pruned per call by shared memory (dtype), by
# register footprint for 4-byte operands, and by tiles far wider than the problem. BLOCK_M >= 64
# with 4/8 warps keeps 16-bit (and TF32) dots on wgmma on sm_90.
# --------------------------------------------------------------------------------------------


# Upconv input grad: the forward's GEMM shape (pixels x channels, K = 4*C_out), no transform.
_DGRAD_CONFIGS = {
    90: (
        Cfg(128, 128, 64, 8, 3),
        Cfg(128, 128, 32, 8, 4),
        Cfg(128, 64, 64, 4, 4),
        Cfg(64, 128, 64, 4, 4),
        Cfg(64, 64, 64, 4, 3),
    ),
    80: (
        Cfg(128, 128, 32, 4, 4),
        Cfg(128, 128, 32, 8, 3),
        # 8 warps: on 4, triton 3.6's ptxas spilled 12 B in TF32 (168 registers; sm_80 report).
        Cfg(128, 64, 32, 8, 4),
        Cfg(64, 128, 32, 4, 4),
        # 64x64x64 on 4 warps spilled 8 B in TF32 on sm_80 (168 registers): K steps of 32.
        Cfg(64, 64, 32, 4, 4),
    ),
}
# Upconv weight grad: conv3x3_wgrad's lists (the same GEMM orientation, with the transformed
# operand B passing through registers).
_WGRAD_CONFIGS = {
    90: (
        Cfg(128, 128, 64, 8, 3),
        Cfg(128, 64, 32, 4, 4),
        Cfg(64, 128, 64, 8, 3),
        Cfg(64, 64, 64, 4, 4),
    ),
    # triton 3.6's ptxas spilled 128x128x32 (16-bit, 56 B at 128 registers) and 64x128x32 (TF32,
    # 16 B at 80 registers) on 8 warps; these four compile clean on 3.6 and 3.9.
    80: (
        Cfg(128, 128, 64, 8, 3),
        Cfg(128, 64, 32, 4, 4),
        Cfg(64, 128, 16, 8, 4),
        Cfg(64, 64, 32, 4, 4),
    ),
}
# fp32 with allow_tf32=False: tl.dot runs on FMA units with both operand slices in registers;
# one stage for the weight grad (its B tile passes through registers for the transform).
_DGRAD_IEEE_CONFIGS = (
    Cfg(128, 128, 16, 8, 3),
    Cfg(128, 64, 16, 4, 3),
    Cfg(64, 64, 32, 4, 3),
)
_WGRAD_IEEE_CONFIGS = (
    Cfg(128, 128, 16, 8, 1),
    Cfg(128, 64, 32, 8, 1),
    Cfg(64, 64, 32, 4, 1),
)


def _config_list(kind: str, arch: int, elem: int, precision: str) -> tuple[Cfg, ...]:
    """The tuned list of kernel ``kind`` ("dgrad" or "wgrad")."""
    ieee32 = elem == 4 and precision == "ieee"
    arch = tuned_arch(arch)
    if kind == "dgrad":
        return _DGRAD_IEEE_CONFIGS if ieee32 else _DGRAD_CONFIGS[arch]
    return _WGRAD_IEEE_CONFIGS if ieee32 else _WGRAD_CONFIGS[arch]


def _usable_configs(kind: str, arch: int, elem: int, precision: str, block_cls: int = 16) -> list[Cfg]:
    """``kind``'s configs a device of compute capability ``arch`` may run (see ``_split_k``)."""
    return usable_from(kind, _config_list(kind, arch, elem, precision), arch, elem, block_cls)


_KERNELS = {"dgrad": _upconv2x2_dgrad_kernel, "wgrad": _upconv2x2_wgrad_kernel}
_TUNERS = {kind: make_tuner(kind, _config_list, _usable_configs) for kind in _KERNELS}


def _run(kind: str, ref: Tensor, key: tuple, grid, args: tuple, flags: dict, shape: dict, exact: tuple = ()) -> None:
    """Launch kernel ``kind`` with its tuner's config for ``key`` (see ``_split_k.run_tuned``)."""
    run_tuned(_KERNELS[kind], _TUNERS[kind], ref, key, grid, args, flags, shape, exact)


def _upconv_g_dims(g: Tensor) -> tuple[int, int, int, int]:
    N, C_out, H2, W2 = g.shape
    if H2 % 2 or W2 % 2:
        raise ValueError(f"g must be [N, C_out, 2h, 2w] with even spatial dims, got {tuple(g.shape)}")
    return N, C_out, H2 // 2, W2 // 2


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def upconv2x2_input_grad(g: Tensor, weight: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Input gradient of ``upconv2x2`` (``conv_transpose2d`` with a 2x2 kernel, stride 2).

    Args:
        g: ``[N, C_out, 2h, 2w]`` float32/float16/bfloat16, the gradient of the upconv output;
            any strides (channels_last is fast).
        weight: ``[C_in, C_out, 2, 2]`` (``nn.ConvTranspose2d`` layout) in ``g.dtype``, any
            strides; ``pack_upconv2x2_weight``'s ``[C_in, 2, 2, C_out]`` storage is fast.
        out: optional ``[N, C_in, h, w]`` destination in ``g.dtype``, any strides. Default: a
            new channels_last tensor.

    Returns ``dX[n, ci, i, j] = sum_{co, di, dj} g[n, co, 2i+di, 2j+dj] * weight[ci, co, di, dj]``
    (fp32 accumulation; fp32 dots use TF32 iff ``torch.backends.cudnn.allow_tf32``). It is the
    gradient of the upconv's input, i.e. of ``T(x)`` when the forward ran with a norm.
    """
    check_grad("g", g, "[N, C_out, 2h, 2w]")
    N, C_out, h, w = _upconv_g_dims(g)
    check_tensor("weight", weight)
    if weight.dim() != 4 or weight.shape[1] != C_out or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must be [C_in, C_out={C_out}, 2, 2], got shape {tuple(weight.shape)}")
    if weight.dtype != g.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match g dtype {g.dtype}")
    C_in = weight.shape[0]
    check_device(g, "upconv2x2_input_grad")
    check_same_device("g", g, weight=weight)
    check_out(out, (N, C_in, h, w), g.dtype, g)
    check_pixels(N * h * w)
    if out is None:
        out = torch.empty((N, C_in, h, w), device=g.device, dtype=g.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    if C_out == 0:
        return out.zero_()
    M = N * h * w
    args = (g, weight, out, N, h, w, C_in, C_out, *g.stride(), *weight.stride(), *out.stride())

    def grid(meta, m=M):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]),)

    flags = {"INPUT_PRECISION": dot_precision(g.dtype)}
    m = bucket(M)
    shape = {"C_in": C_in, "C_out": C_out, "tiles": lambda meta: grid(meta, m)}
    _run("dgrad", g, (m, C_in, C_out), grid, args, flags, shape, (M,))
    return out


def upconv2x2_weight_grad(
    g: Tensor,
    x: Tensor,
    *,
    x_norm: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weight gradient of ``upconv2x2`` on ``T(x)``.

    Args:
        g: ``[N, C_out, 2h, 2w]`` float32/float16/bfloat16, the gradient of the upconv output;
            any strides (channels_last is fast).
        x: ``[N, C_in, h, w]``, the upconv's input, in ``g.dtype``, any strides.
        x_norm: None or ``(scale, shift)`` fp32 ``[C_in]``: the upconv's input is then
            ``T(x) = max(x*scale[ci] + shift[ci], 0)`` (fp32 math, rounded to ``x.dtype``).
        out: optional fp32 ``[C_in, C_out, 2, 2]`` destination, any strides; fully overwritten.

    Returns fp32 ``dW[ci, co, di, dj] = sum_{n,i,j} T(x)[n, ci, i, j] * g[n, co, 2i+di, 2j+dj]``
    (fp32 accumulation; fp32 dots use TF32 iff ``torch.backends.cudnn.allow_tf32``).
    Deterministic: pixel splits are summed in a fixed order.
    """
    check_grad("g", g, "[N, C_out, 2h, 2w]")
    N, C_out, h, w = _upconv_g_dims(g)
    check_activation("x", x, g.dtype, "[N, C_in, h, w]")
    if (x.shape[0], x.shape[2], x.shape[3]) != (N, h, w):
        raise ValueError(f"x must be [N={N}, C_in, h={h}, w={w}] for g of shape {tuple(g.shape)}, got {tuple(x.shape)}")
    C_in = x.shape[1]
    check_device(g, "upconv2x2_weight_grad")
    check_same_device("g", g, x=x)
    norm = check_norm(x_norm, C_in, x)
    check_out(out, (C_in, C_out, 2, 2), torch.float32, g)
    check_pixels(N * h * w)
    if C_in * C_out * 4 > INT32_MAX:
        raise ValueError("C_in*C_out*4 must stay below 2^31 (int32 weight indices)")
    if out is None:
        out = torch.empty((C_in, C_out, 2, 2), device=g.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    P = N * h * w
    if P == 0:
        return out.zero_()

    tiles = 4 * cdiv(C_out, 64) * cdiv(C_in, 64)
    split_k = pick_split_k(g.device, P, tiles, 16 * C_in * C_out, MAX_SPLIT_K)
    ws = None
    if split_k > 1:
        ws = torch.empty((split_k, C_in, C_out, 2, 2), device=g.device, dtype=torch.float32)
        dst, dst_strides, stride_os = ws, ws.stride()[1:], ws.stride(0)
    else:
        dst, dst_strides, stride_os = out, out.stride(), 0
    scale, shift = norm if norm is not None else (dst, dst)  # never read without X_NORM
    args = (g, x, scale, shift, dst, N, h, w, C_in, C_out, split_k, *g.stride(), *x.stride(), *dst_strides, stride_os)
    flags = {"X_NORM": norm is not None, "INPUT_PRECISION": dot_precision(g.dtype)}

    def grid(meta):
        return (4 * cdiv(C_out, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]), split_k)

    shape = {"C_in": C_in, "C_out": C_out, "tiles": grid}
    _run("wgrad", g, (C_in, C_out, split_k), grid, args, flags, shape)
    if ws is not None:
        reduce_splits(ws, out, (C_in, C_out, 2, 2), out.stride())
    return out


# --------------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (kernel, config, dtype, precision, flags) the two launchers can run on ``arch`` (80 or
    90) after pruning (the split reduction's spec is ``_split_k``'s).

    Signatures describe the fast path: channels_last activations, the packed upconv weight and
    contiguous dW / workspace, whose unit strides Triton specializes to the constant 1; every
    other size and stride is an ``i32``. ``extra["attrs"]`` holds the divisibility-by-16 hints
    the JIT would add at U-Net sizes (pass it as ``ASTSource``'s fourth argument).
    ``extra["expect_hgmma"]``: 16-bit and TF32 dots with >= 64-row tiles and whole warpgroups
    lower to wgmma on sm_90; IEEE fp32 dots run on FMA units.
    """
    arch = tuned_arch(arch)
    specs: list[KernelSpec] = []
    for dtype in ("fp32", "fp16", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        for precision in ("tf32", "ieee") if dtype == "fp32" else ("ieee",):
            ptag = f"_{precision}" if dtype == "fp32" else ""
            for cfg in _usable_configs("dgrad", arch, elem, precision):
                constexprs = {n: 1 for n in UNIT_STRIDES["dgrad"]}
                constexprs.update(INPUT_PRECISION=precision, **triton_config("dgrad", cfg).kwargs)
                specs.append(
                    spec("dgrad", _upconv2x2_dgrad_kernel, dtype, dtype, constexprs, cfg, cfg.name + ptag,
                          hgmma=expect_wgmma(arch, dtype, precision, cfg), variant="upconv_dgrad")
                )  # fmt: skip
            for cfg in _usable_configs("wgrad", arch, elem, precision):
                for x_norm in (False, True):
                    constexprs = {n: 1 for n in UNIT_STRIDES["wgrad"]}
                    constexprs.update(X_NORM=x_norm, INPUT_PRECISION=precision, **triton_config("wgrad", cfg).kwargs)
                    specs.append(
                        spec("wgrad", _upconv2x2_wgrad_kernel, dtype, dtype, constexprs, cfg,
                              cfg.name + ptag + ("_norm" if x_norm else ""),
                              hgmma=expect_wgmma(arch, dtype, precision, cfg), variant="upconv_wgrad")
                    )  # fmt: skip
    return specs
