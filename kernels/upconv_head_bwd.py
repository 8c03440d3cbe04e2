"""Backward of the transposed conv 2x2/s2 (``upconv2x2``) and of the 1x1 head (``head1x1``).

Notation: ``T(x)[n, c, h, w] = max(x*scale[c] + shift[c], 0)`` in fp32, rounded to ``x.dtype``,
when a norm ``(scale, shift)`` (fp32 ``[C]``) is given -- the BatchNorm+ReLU the forward kernels
apply on load (``IN_NORM``) -- and the identity otherwise.

Four launchers, one kernel each (plus a shared split reduction):

* ``upconv2x2_input_grad(g, weight)``: ``dX[n, ci, i, j] = sum_{co,di,dj} g[n, co, 2i+di, 2j+dj]
  * weight[ci, co, di, dj]``. A GEMM ``[M = N*h*w, K = 4*C_out] @ [4*C_out, C_in]`` whose A load
  gathers the four output phases of each input pixel (K runs phase-major, then ``co``).
* ``upconv2x2_weight_grad(g, x, x_norm=)``: ``dW[ci, co, di, dj] = sum_{n,i,j} T(x)[n, ci, i, j]
  * g[n, co, 2i+di, 2j+dj]``. A GEMM ``[M = C_out, K = pixels] @ [pixels, N = C_in]`` per phase,
  the transform applied to the x tile between its load and the dot.
* ``head1x1_weight_grad(gz, x, x_norm=)``: ``dW[k, c] = sum_{n,h,w} gz[n, k, h, w] * T(x)[n, c, h, w]``,
  a thin GEMM ``[K classes, pixels] @ [pixels, C]`` (classes padded to a dot width).
* ``head1x1_input_grad(gz, weight)``: ``dX[n, c, h, w] = sum_k gz[n, k, h, w] * weight[k, c]``,
  an outer-product loop over the few classes (no dot).

The two weight gradients reduce over every pixel, so the pixel range is split across
``SPLIT_K`` programs per output tile. Each split writes its fp32 partial to its own slice of a
workspace and ``_sum_splits_kernel`` adds the slices in a fixed order (no atomics): the result
does not depend on scheduling, so repeated calls give the same bits (for one config).

Offline compile report: ``compile_specs(arch)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    GemmConfig,
    KernelSpec,
    can_launch,
    cdiv,
    dot_precision,
    interpreting,
    launch,
    next_pow2,
    sm_count,
    smem_limit,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Tuner, bucket, launch_meta
from .head1x1 import MAX_CLASSES
from .norm_act_bwd import _affine_relu, check_norm_affine

__all__ = [
    "upconv2x2_input_grad",
    "upconv2x2_weight_grad",
    "head1x1_weight_grad",
    "head1x1_input_grad",
    "compile_specs",
]

# Pixel indices are int32 in the kernels; the headroom covers the last tile's lanes and the last
# split's overshoot (at most SPLIT_K * BLOCK_K past the pixel count).
_MAX_PIXELS = 2**31 - 2**20
_INT32_MAX = 2**31 - 1
# Weight-gradient splits: at most _MAX_SPLIT_K, each with at least _MIN_K_STEPS steps of 64
# pixels, and a workspace of at most _WS_BYTES.
_MAX_SPLIT_K = 128
_MAX_SPLIT_K_HEAD = 512  # the head's dW is one or a few tiles: more splits are needed to fill SMs
_MIN_K_STEPS = 16
_WS_BYTES = 256 * 2**20
# In the interpreter a fixed split of 2 keeps the workspace and reduction path under test.
_INTERPRETER_SPLIT_K = 2
# Split reduction tile (elementwise over the weight; not tuned, so its order never changes).
_RED_BLOCK, _RED_WARPS = 1024, 4


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
            b = tl.where(b_mask, _affine_relu(b, scale, shift), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # a: [BLOCK_M, BLOCK_K]

    dst_ptr = out_ptr + pid_k.to(tl.int64) * stride_os
    o_ptrs = dst_ptr + (
        (offs_co.to(tl.int64) * stride_oo + (di * stride_oh + dj * stride_ow))[:, None]
        + (offs_ci.to(tl.int64) * stride_oi)[None, :]
    )  # [BLOCK_M, BLOCK_N]
    tl.store(o_ptrs, acc, mask=co_mask[:, None] & ci_mask[None, :])


@triton.jit(do_not_specialize=("N", "SPLIT_K"))
def _head1x1_wgrad_kernel(
    gz_ptr,  # [N, K, H, W], any strides (channels_last is the fast layout)
    x_ptr,  # [N, C, H, W], any strides, gz's dtype
    scale_ptr,  # [C] fp32, contiguous (unused unless X_NORM)
    shift_ptr,  # [C] fp32, contiguous (unused unless X_NORM)
    out_ptr,  # fp32 [K, C], strides (stride_ok, stride_oc); with SPLIT_K > 1 a workspace of
    # SPLIT_K such slices, stride_os apart
    N,
    H,
    W,
    C,
    K,
    SPLIT_K,
    stride_gn,
    stride_gk,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ok,
    stride_oc,
    stride_os,
    X_NORM: tl.constexpr,  # multiply T(x) = max(x*scale + shift, 0) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_K: tl.constexpr,  # classes: next power of two >= max(K, 16), the smallest dot width
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """``[BLOCK_K classes, BLOCK_C channels]`` of the head's dW over one split of the pixels.

    GEMM: M = K classes (one tile), N = C, K = N*H*W pixels (< 2^31). A is ``gz`` transposed
    (``[BLOCK_K, BLOCK_P]``), B is ``T(x)`` (``[BLOCK_P, BLOCK_C]``, c-contiguous in NHWC).
    FLOPs: ``2 * N*H*W * K * C``. Minimum bytes moved:
    ``N*H*W*(K + C) * elem + K*C*4*SPLIT_K``; gz is re-read once per C block (few).

    Grid: ``(cdiv(C, BLOCK_C), SPLIT_K)``.
    """
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_cls = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    cls_mask = offs_cls < K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_mask = offs_c < C
    offs_pp = tl.arange(0, BLOCK_P)  # [BLOCK_P]

    HW = H * W
    P = N * HW
    per_split = tl.cdiv(tl.cdiv(P, BLOCK_P), SPLIT_K) * BLOCK_P
    p_lo = pid_k * per_split
    p_hi = min(p_lo + per_split, P)

    if X_NORM:
        scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)  # [BLOCK_C]
        shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)  # [BLOCK_C]
    g_col = offs_cls.to(tl.int64) * stride_gk  # [BLOCK_K]
    x_col = offs_c.to(tl.int64) * stride_xc  # [BLOCK_C]

    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)  # [BLOCK_K, BLOCK_C]
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + offs_pp  # [BLOCK_P] flat pixels (int32: N*H*W < 2^31)
        p_ok = offs_p < p_hi
        img = offs_p // HW
        rem = offs_p - img * HW
        y_idx = (rem // W).to(tl.int64)
        x_idx = (rem % W).to(tl.int64)
        img64 = img.to(tl.int64)
        g_pix = img64 * stride_gn + y_idx * stride_gh + x_idx * stride_gw  # [BLOCK_P]
        x_pix = img64 * stride_xn + y_idx * stride_xh + x_idx * stride_xw  # [BLOCK_P]
        a = tl.load(
            gz_ptr + g_col[:, None] + g_pix[None, :], mask=cls_mask[:, None] & p_ok[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_P]
        b_mask = p_ok[:, None] & c_mask[None, :]
        b = tl.load(x_ptr + x_pix[:, None] + x_col[None, :], mask=b_mask, other=0.0)  # [BLOCK_P, BLOCK_C]
        if X_NORM:
            # Masked lanes are 0, not T(0) = relu(shift): a non-finite shift must not leak in.
            b = tl.where(b_mask, _affine_relu(b, scale, shift), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    dst_ptr = out_ptr + pid_k.to(tl.int64) * stride_os
    o_ptrs = dst_ptr + (offs_cls * stride_ok)[:, None] + (offs_c * stride_oc)[None, :]  # [BLOCK_K, BLOCK_C]
    tl.store(o_ptrs, acc, mask=cls_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=("N",))
def _head1x1_dgrad_kernel(
    gz_ptr,  # [N, K, H, W], any strides (channels_last is the fast layout)
    w_ptr,  # [K, C] (a [K, C, 1, 1] conv weight viewed as 2-D), any strides, any float dtype
    out_ptr,  # [N, C, H, W], any strides, gz's dtype
    N,
    H,
    W,
    C,
    K,
    stride_gn,
    stride_gk,
    stride_gh,
    stride_gw,
    stride_wk,
    stride_wc,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dX[p, c] = sum_k gz[p, k] * W[k, c]`` for ``[BLOCK_P pixels, BLOCK_C channels]``.

    K is tiny (1..64 classes): a loop of fp32 outer products, classes added in order 0..K-1
    (no dot: a padded 16-wide dot would mostly multiply zeros).
    FLOPs: ``2 * N*H*W * K * C``. Minimum bytes moved: ``N*H*W*(K + C) * elem + K*C*w_elem``;
    gz is re-read once per C block (few).

    Grid: ``(cdiv(N*H*W, BLOCK_P), cdiv(C, BLOCK_C))``.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    HW = H * W
    P = N * HW  # < 2**31, checked by the launcher
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    p_mask = offs_p < P
    n_idx = (offs_p // HW).to(tl.int64)
    rem = offs_p % HW
    y_idx = (rem // W).to(tl.int64)
    x_idx = (rem % W).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_mask = offs_c < C

    g_ptrs = gz_ptr + (n_idx * stride_gn + y_idx * stride_gh + x_idx * stride_gw)  # [BLOCK_P]
    w_ptrs = w_ptr + offs_c * stride_wc  # [BLOCK_C]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    for _ in range(0, K):
        gk = tl.load(g_ptrs, mask=p_mask, other=0.0).to(tl.float32)  # [BLOCK_P]
        wk = tl.load(w_ptrs, mask=c_mask, other=0.0).to(tl.float32)  # [BLOCK_C]
        acc += gk[:, None] * wk[None, :]
        g_ptrs += stride_gk
        w_ptrs += stride_wk

    out_row = n_idx * stride_on + y_idx * stride_oh + x_idx * stride_ow  # [BLOCK_P]
    out_ptrs = out_ptr + (out_row[:, None] + (offs_c.to(tl.int64) * stride_oc)[None, :])  # [BLOCK_P, BLOCK_C]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=("SPLIT_K",))
def _sum_splits_kernel(
    ws_ptr,  # fp32 [SPLIT_K, D0, D1, D2, D3], each slice contiguous, slices stride_ws apart
    out_ptr,  # fp32 [D0, D1, D2, D3], any strides
    D0,
    D1,
    D2,
    D3,
    SPLIT_K,
    stride_ws,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_o3,
    BLOCK: tl.constexpr,
):
    """``out = sum_s ws[s]``, slices added in order s = 0, 1, ... (independent of scheduling).

    Moves ``(SPLIT_K + 1) * D0*D1*D2*D3 * 4`` bytes; no FLOPs worth counting. The upconv's dW
    is ``[C_in, C_out, 2, 2]``; the head's ``[K, C]`` runs as ``[1, 1, K, C]``.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index, < 2^31
    mask = offs < D0 * D1 * D2 * D3
    ws_ptrs = ws_ptr + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # [BLOCK]
    for _ in range(SPLIT_K):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_ws  # pointer steps: no int32 product s * stride_ws to overflow
    i3 = offs % D3
    r = offs // D3
    i2 = r % D2
    r = r // D2
    i1 = r % D1
    i0 = r // D1
    o_off = i0.to(tl.int64) * stride_o0 + i1.to(tl.int64) * stride_o1 + i2 * stride_o2 + i3 * stride_o3
    tl.store(out_ptr + o_off, acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Configs: short explicit lists per architecture, pruned per call by shared memory (dtype), by
# register footprint for 4-byte operands, and by tiles far wider than the problem. BLOCK_M >= 64
# with 4/8 warps keeps 16-bit (and TF32) dots on wgmma on sm_90.
# --------------------------------------------------------------------------------------------


_Cfg = GemmConfig


# Upconv input grad: the forward's GEMM shape (pixels x channels, K = 4*C_out), no transform.
_DGRAD_CONFIGS = {
    90: (
        _Cfg(128, 128, 64, 8, 3),
        _Cfg(128, 128, 32, 8, 4),
        _Cfg(128, 64, 64, 4, 4),
        _Cfg(64, 128, 64, 4, 4),
        _Cfg(64, 64, 64, 4, 3),
    ),
    80: (
        _Cfg(128, 128, 32, 4, 4),
        _Cfg(128, 128, 32, 8, 3),
        _Cfg(128, 64, 32, 4, 4),
        _Cfg(64, 128, 32, 4, 4),
        # 64x64x64 on 4 warps spilled 8 B in TF32 on sm_80 (168 registers): K steps of 32.
        _Cfg(64, 64, 32, 4, 4),
    ),
}
# Upconv weight grad: conv3x3_wgrad's lists (the same GEMM orientation, with the transformed
# operand B passing through registers).
_WGRAD_CONFIGS = {
    90: (
        _Cfg(128, 128, 64, 8, 3),
        _Cfg(128, 64, 32, 4, 4),
        _Cfg(64, 128, 64, 8, 3),
        _Cfg(64, 64, 64, 4, 4),
    ),
    80: (
        _Cfg(128, 128, 32, 8, 4),
        _Cfg(128, 64, 32, 4, 4),
        _Cfg(64, 128, 32, 8, 4),
        _Cfg(64, 64, 32, 4, 4),
    ),
}
# fp32 with allow_tf32=False: tl.dot runs on FMA units with both operand slices in registers;
# one stage for the weight grad (its B tile passes through registers for the transform).
_DGRAD_IEEE_CONFIGS = (
    _Cfg(128, 128, 16, 8, 3),
    _Cfg(128, 64, 16, 4, 3),
    _Cfg(64, 64, 32, 4, 3),
)
_WGRAD_IEEE_CONFIGS = (
    _Cfg(128, 128, 16, 8, 1),
    _Cfg(128, 64, 32, 8, 1),
    _Cfg(64, 64, 32, 4, 1),
)
# Head weight grad: BLOCK_M is the class tile (from K, not tuned), BLOCK_N the channels and
# BLOCK_K the pixels per step. Memory-bound: the list only trades tile width for occupancy.
# sm_80 spilled a few bytes on the 128-pixel step with a norm (16-bit too) and on 128-channel
# tiles in TF32 (8 warps, 32- and 64-pixel steps alike), so it keeps 64-channel tiles.
_HEAD_WGRAD_CONFIGS = {
    90: (
        _Cfg(0, 64, 64, 4, 3),
        _Cfg(0, 128, 64, 8, 3),
        _Cfg(0, 64, 128, 4, 3),
    ),
    80: (
        _Cfg(0, 64, 64, 4, 3),
        _Cfg(0, 64, 32, 4, 3),
    ),
}
_HEAD_WGRAD_IEEE_CONFIGS = (
    _Cfg(0, 64, 32, 4, 1),
    _Cfg(0, 128, 32, 8, 1),
)
# Head input grad: no dot, no shared memory; BLOCK_M pixels x BLOCK_N channels. 128-channel
# tiles (64x128 on 4 warps, 128x128 on 8) reached 255 registers and spilled on sm_90.
_HEAD_DGRAD_CONFIGS = (
    _Cfg(64, 64, 0, 4, 1),
    _Cfg(128, 64, 0, 4, 1),
)

# 4-byte operands take twice the registers of 16-bit ones; past this many accumulator plus
# operand words per thread ptxas spills (the forward's measured limit).
_MAX_WORDS_PER_THREAD_FP32 = 96
# The weight gradients' B tile (pixels x channels) passes through registers for the transform;
# with 4-byte operands past this many of its words per thread ptxas spilled on sm_90 (the head's
# 64-channel x 128-pixel tile on 4 warps in TF32: 64 words, 276 B to 7.5 KiB of spills).
_MAX_B_WORDS_PER_THREAD_FP32 = 32

# The interpreter runs one small fixed tile per kernel: autotuning there would only cost time.
_INTERPRETER_CFG = _Cfg(16, 16, 16, 4, 1)


def _config_list(kind: str, arch: int, elem: int, precision: str) -> tuple[_Cfg, ...]:
    """The tuned list of kernel ``kind`` ("dgrad", "wgrad", "head_wgrad", "head_dgrad")."""
    ieee32 = elem == 4 and precision == "ieee"
    arch = tuned_arch(arch)
    if kind == "dgrad":
        return _DGRAD_IEEE_CONFIGS if ieee32 else _DGRAD_CONFIGS[arch]
    if kind == "wgrad":
        return _WGRAD_IEEE_CONFIGS if ieee32 else _WGRAD_CONFIGS[arch]
    if kind == "head_wgrad":
        return _HEAD_WGRAD_IEEE_CONFIGS if ieee32 else _HEAD_WGRAD_CONFIGS[arch]
    return _HEAD_DGRAD_CONFIGS


def _usable_configs(kind: str, arch: int, elem: int, precision: str, block_cls: int = 16) -> list[_Cfg]:
    """The configs of ``kind`` a device of compute capability ``arch`` may run for this element
    size and dot precision: its list minus what overflows shared memory or (4-byte operands) the
    register budget. ``block_cls`` is the head weight grad's class tile. Never empty."""
    candidates = _config_list(kind, arch, elem, precision)
    if kind == "head_dgrad":
        return list(candidates)
    if kind == "head_wgrad":
        candidates = tuple(c._replace(BLOCK_M=block_cls) for c in candidates)
    usable = []
    for c in candidates:
        if c.smem(elem) > smem_limit(arch):
            continue
        words = (c.BLOCK_M * c.BLOCK_N + c.BLOCK_M * c.BLOCK_K) // (32 * c.num_warps)
        if elem == 4 and words > _MAX_WORDS_PER_THREAD_FP32:
            continue
        b_words = c.BLOCK_K * c.BLOCK_N // (32 * c.num_warps)
        if kind in ("wgrad", "head_wgrad") and elem == 4 and b_words > _MAX_B_WORDS_PER_THREAD_FP32:
            continue
        usable.append(c)
    return usable or [min(candidates, key=lambda c: c.smem(elem))]


def _triton_config(kind: str, c: _Cfg) -> triton.Config:
    if kind == "head_wgrad":
        meta = {"BLOCK_C": c.BLOCK_N, "BLOCK_P": c.BLOCK_K}
    elif kind == "head_dgrad":
        meta = {"BLOCK_P": c.BLOCK_M, "BLOCK_C": c.BLOCK_N}
    else:
        meta = {"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K}
    return triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages)


_KERNELS = {
    "dgrad": _upconv2x2_dgrad_kernel,
    "wgrad": _upconv2x2_wgrad_kernel,
    "head_wgrad": _head1x1_wgrad_kernel,
    "head_dgrad": _head1x1_dgrad_kernel,
}


def _prune(configs, shape: dict, arch: int, *, kind: str) -> list:
    """Keep what fits ``_usable_configs``, minus tiles far wider than the problem. ``shape``:
    ``elem``, ``INPUT_PRECISION``, the channel counts and (head_wgrad) ``BLOCK_K``."""
    if kind == "head_dgrad":
        elem, precision, caps = 2, "ieee", {"BLOCK_C": shape["C"]}
        usable = [_triton_config(kind, c) for c in _usable_configs(kind, arch, elem, precision)]
    else:
        elem, precision = shape["elem"], shape["INPUT_PRECISION"]
        block_cls = shape.get("BLOCK_K", 16) if kind == "head_wgrad" else 16
        usable = [_triton_config(kind, c) for c in _usable_configs(kind, arch, elem, precision, block_cls)]
        if kind == "dgrad":
            caps = {"BLOCK_N": shape["C_in"]}
        elif kind == "wgrad":
            caps = {"BLOCK_M": shape["C_out"], "BLOCK_N": shape["C_in"]}
        else:
            caps = {"BLOCK_C": shape["C"]}
    usable = [c for c in configs if any(c.kwargs == u.kwargs and c.num_warps == u.num_warps for u in usable)]
    narrow = [c for c in usable if all(c.kwargs[k] <= max(64, next_pow2(v)) for k, v in caps.items())]
    return narrow or usable or list(configs)[:1]


def _all_configs(kind: str, arch: int) -> list:
    """Every tile of ``kind`` on ``arch`` over the element sizes and precisions, each once."""
    configs = []
    for elem, precision in ((2, "ieee"), (4, "tf32"), (4, "ieee")):
        for c in _config_list(kind, arch, elem, precision):
            tc = _triton_config(kind, c)
            if not any(tc.kwargs == o.kwargs and tc.num_warps == o.num_warps for o in configs):
                configs.append(tc)
    return configs


def _make_tuner(kind: str) -> Tuner:
    def prune(configs, shape, arch):
        return _prune(configs, shape, arch, kind=kind)

    return Tuner(
        f"upconv_head_bwd.{kind}",
        {arch: _all_configs(kind, arch) for arch in (80, 90)},
        prune,
        lambda cfg, shape: math.prod(shape["tiles"](cfg.kwargs)),
        lambda shape: _triton_config(kind, _INTERPRETER_CFG),
    )


_TUNERS = {kind: _make_tuner(kind) for kind in _KERNELS}


def _run(kind: str, ref: Tensor, key: tuple, grid, args: tuple, flags: dict, shape: dict) -> None:
    """Launch kernel ``kind`` with its tuner's config for ``key`` (see ``_tuning``); ``grid(meta)``
    gives the launch grid; ``shape`` the pruning inputs (channel counts) and ``tiles(meta)``, the
    grid at the bucketed pixel count (for the rule)."""
    shape = {**shape, "elem": ref.element_size(), **flags}

    def run(cfg):
        launch(_KERNELS[kind], grid(cfg.kwargs), args, {**flags, **launch_meta(cfg)})

    run(_TUNERS[kind].pick(ref.device, (ref.dtype, *key, *flags.values()), lambda: shape, run))


def _pick_split_k(device: torch.device, p: int, tiles: int, slice_bytes: int, cap: int) -> int:
    """How many pixel splits: about two programs per SM over ``tiles`` output tiles, while every
    split keeps at least _MIN_K_STEPS steps of 64 pixels and the workspace stays under _WS_BYTES."""
    if interpreting():
        return _INTERPRETER_SPLIT_K
    sms = sm_count(device)
    want = cdiv(2 * sms, max(tiles, 1))
    by_k = cdiv(p, 64) // _MIN_K_STEPS
    by_ws = _WS_BYTES // max(slice_bytes, 1)
    return max(1, min(want, by_k, by_ws, cap))


def _reduce_splits(ws: Tensor, out: Tensor, dims: tuple[int, int, int, int], out_strides: tuple) -> None:
    """``out`` (viewed as ``dims`` with ``out_strides``) = sum of ws's slices, in order."""
    total = dims[0] * dims[1] * dims[2] * dims[3]
    launch(
        _sum_splits_kernel, (cdiv(total, _RED_BLOCK),),
        (ws, out, *dims, ws.shape[0], ws.stride(0), *out_strides), dict(BLOCK=_RED_BLOCK, num_warps=_RED_WARPS),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_device(ref: Tensor, op: str) -> None:
    if not can_launch(ref.device):
        raise ValueError(f"{op} runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {ref.device}")


def _check_same_device(ref_name: str, ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, {ref_name} on {ref.device}")


def _check_activation(name: str, t, dtype: torch.dtype, dims: str) -> None:
    _check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} must match the gradient's dtype {dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be {dims}, got shape {tuple(t.shape)}")


def _check_grad(name: str, t, dims: str) -> None:
    _check_tensor(name, t)
    triton_dtype(t.dtype)  # TypeError for anything but fp32/fp16/bf16
    if t.dim() != 4:
        raise ValueError(f"{name} must be {dims}, got shape {tuple(t.shape)}")


def _check_norm(norm, C: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Validate ``x_norm``: None or ``(scale, shift)`` fp32 ``[C]``; returns contiguous copies."""
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"x_norm must be None or a (scale, shift) tuple of tensors, got {type(norm).__name__}")
    if norm[0] is None or norm[1] is None:
        raise TypeError("x_norm must hold two tensors (scale, shift), got None")
    return check_norm_affine(norm[0], norm[1], C, x, names=("x_norm scale", "x_norm shift"))


def _check_out(out, shape: tuple[int, ...], dtype: torch.dtype, ref: Tensor) -> None:
    if out is None:
        return
    _check_tensor("out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out dtype {out.dtype} must be {dtype}")
    if out.device != ref.device:
        raise ValueError(f"out is on {out.device}, expected {ref.device}")


def _check_pixels(p: int) -> None:
    if p > _MAX_PIXELS:
        raise ValueError(f"{p} pixels exceed the int32 pixel index (at most {_MAX_PIXELS})")


def _upconv_g_dims(g: Tensor) -> tuple[int, int, int, int]:
    N, C_out, H2, W2 = g.shape
    if H2 % 2 or W2 % 2:
        raise ValueError(f"g must be [N, C_out, 2h, 2w] with even spatial dims, got {tuple(g.shape)}")
    return N, C_out, H2 // 2, W2 // 2


def _head_weight_2d(weight, C: int | None) -> Tensor:
    """``weight`` as ``[K, C]`` (a view of ``[K, C, 1, 1]``)."""
    _check_tensor("weight", weight)
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        w2 = weight[:, :, 0, 0]
    elif weight.dim() == 2:
        w2 = weight
    else:
        raise ValueError(f"weight must be [K, C, 1, 1] or [K, C], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if C is not None and w2.shape[1] != C:
        raise ValueError(f"weight has {w2.shape[1]} input channels, expected C={C}")
    return w2


def _check_classes(K: int) -> None:
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"the head supports 1..{MAX_CLASSES} classes, got K={K}")


def _block_cls(K: int) -> int:
    return max(16, next_pow2(K))


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
    _check_grad("g", g, "[N, C_out, 2h, 2w]")
    N, C_out, h, w = _upconv_g_dims(g)
    _check_tensor("weight", weight)
    if weight.dim() != 4 or weight.shape[1] != C_out or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must be [C_in, C_out={C_out}, 2, 2], got shape {tuple(weight.shape)}")
    if weight.dtype != g.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match g dtype {g.dtype}")
    C_in = weight.shape[0]
    _check_device(g, "upconv2x2_input_grad")
    _check_same_device("g", g, weight=weight)
    _check_out(out, (N, C_in, h, w), g.dtype, g)
    _check_pixels(N * h * w)
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
    _run("dgrad", g, (m, C_in, C_out), grid, args, flags, shape)
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
    _check_grad("g", g, "[N, C_out, 2h, 2w]")
    N, C_out, h, w = _upconv_g_dims(g)
    _check_activation("x", x, g.dtype, "[N, C_in, h, w]")
    if (x.shape[0], x.shape[2], x.shape[3]) != (N, h, w):
        raise ValueError(f"x must be [N={N}, C_in, h={h}, w={w}] for g of shape {tuple(g.shape)}, got {tuple(x.shape)}")
    C_in = x.shape[1]
    _check_device(g, "upconv2x2_weight_grad")
    _check_same_device("g", g, x=x)
    norm = _check_norm(x_norm, C_in, x)
    _check_out(out, (C_in, C_out, 2, 2), torch.float32, g)
    _check_pixels(N * h * w)
    if C_in * C_out * 4 > _INT32_MAX:
        raise ValueError("C_in*C_out*4 must stay below 2^31 (int32 weight indices)")
    if out is None:
        out = torch.empty((C_in, C_out, 2, 2), device=g.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    P = N * h * w
    if P == 0:
        return out.zero_()

    tiles = 4 * cdiv(C_out, 64) * cdiv(C_in, 64)
    split_k = _pick_split_k(g.device, P, tiles, 16 * C_in * C_out, _MAX_SPLIT_K)
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
        _reduce_splits(ws, out, (C_in, C_out, 2, 2), out.stride())
    return out


def head1x1_weight_grad(
    gz: Tensor,
    x: Tensor,
    *,
    x_norm: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weight gradient of the 1x1 head on ``T(x)``.

    Args:
        gz: ``[N, K, H, W]`` float32/float16/bfloat16, the gradient of the head's
            pre-activation logits; ``1 <= K <= 64``; any strides (channels_last is fast).
        x: ``[N, C, H, W]``, the head's input, in ``gz.dtype``, any strides.
        x_norm: None or ``(scale, shift)`` fp32 ``[C]``: the head's input is then
            ``T(x) = max(x*scale[c] + shift[c], 0)`` (fp32 math, rounded to ``x.dtype``).
        out: optional fp32 ``[K, C]`` destination, any strides; fully overwritten.

    Returns fp32 ``dW[k, c] = sum_{n,h,w} gz[n, k, h, w] * T(x)[n, c, h, w]`` (view it as
    ``[K, C, 1, 1]`` for a conv weight). Deterministic: pixel splits are summed in a fixed order.
    """
    _check_grad("gz", gz, "[N, K, H, W]")
    N, K, H, W = gz.shape
    _check_classes(K)
    _check_activation("x", x, gz.dtype, "[N, C, H, W]")
    if (x.shape[0], x.shape[2], x.shape[3]) != (N, H, W):
        raise ValueError(f"x must be [N={N}, C, H={H}, W={W}] like gz, got {tuple(x.shape)}")
    C = x.shape[1]
    _check_device(gz, "head1x1_weight_grad")
    _check_same_device("gz", gz, x=x)
    norm = _check_norm(x_norm, C, x)
    _check_out(out, (K, C), torch.float32, gz)
    _check_pixels(N * H * W)
    if out is None:
        out = torch.empty((K, C), device=gz.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    P = N * H * W
    if P == 0:
        return out.zero_()

    split_k = _pick_split_k(gz.device, P, cdiv(C, 64), 4 * K * C, _MAX_SPLIT_K_HEAD)
    ws = None
    if split_k > 1:
        ws = torch.empty((split_k, K, C), device=gz.device, dtype=torch.float32)
        dst, dst_strides, stride_os = ws, ws.stride()[1:], ws.stride(0)
    else:
        dst, dst_strides, stride_os = out, out.stride(), 0
    scale, shift = norm if norm is not None else (dst, dst)  # never read without X_NORM
    args = (gz, x, scale, shift, dst, N, H, W, C, K, split_k, *gz.stride(), *x.stride(), *dst_strides, stride_os)
    flags = {"X_NORM": norm is not None, "INPUT_PRECISION": dot_precision(gz.dtype), "BLOCK_K": _block_cls(K)}

    def grid(meta):
        return (cdiv(C, meta["BLOCK_C"]), split_k)

    _run("head_wgrad", gz, (C, K, split_k), grid, args, flags, {"C": C, "tiles": grid})
    if ws is not None:
        _reduce_splits(ws, out, (1, 1, K, C), (0, 0, *out.stride()))
    return out


def head1x1_input_grad(gz: Tensor, weight: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Input gradient of the 1x1 head.

    Args:
        gz: ``[N, K, H, W]`` float32/float16/bfloat16, the gradient of the head's
            pre-activation logits; ``1 <= K <= 64``; any strides (channels_last is fast).
        weight: ``[K, C]`` or ``[K, C, 1, 1]``, any float dtype (read as fp32), any strides.
        out: optional ``[N, C, H, W]`` destination in ``gz.dtype``, any strides. Default: a new
            channels_last tensor.

    Returns ``dX[n, c, h, w] = sum_k gz[n, k, h, w] * weight[k, c]`` in ``gz.dtype`` (fp32 math,
    classes added in order) -- the gradient of the head's input, i.e. of ``T(x)`` when the
    forward ran with a norm.
    """
    _check_grad("gz", gz, "[N, K, H, W]")
    N, K, H, W = gz.shape
    _check_classes(K)
    w2 = _head_weight_2d(weight, None)
    if w2.shape[0] != K:
        raise ValueError(f"weight has {w2.shape[0]} classes, gz has K={K}")
    C = w2.shape[1]
    _check_device(gz, "head1x1_input_grad")
    _check_same_device("gz", gz, weight=weight)
    _check_out(out, (N, C, H, W), gz.dtype, gz)
    _check_pixels(N * H * W)
    if out is None:
        out = torch.empty((N, C, H, W), device=gz.device, dtype=gz.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    P = N * H * W
    args = (gz, w2, out, N, H, W, C, K, *gz.stride(), *w2.stride(), *out.stride())

    def grid(meta, p=P):
        return (cdiv(p, meta["BLOCK_P"]), cdiv(C, meta["BLOCK_C"]))

    p_bucket = bucket(P)
    shape = {"C": C, "tiles": lambda meta: grid(meta, p_bucket)}
    _run("head_dgrad", gz, (p_bucket, C, K), grid, args, {}, shape)
    return out


# --------------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------------

# In the fast layout (NHWC activations, packed upconv weight, contiguous dW or workspace) these
# strides are 1, and Triton's launcher specializes an int equal to 1 into a constexpr.
_UNIT_STRIDES = {
    "dgrad": ("stride_gc", "stride_wo", "stride_oc"),
    "wgrad": ("stride_gc", "stride_xc", "stride_ow"),
    "head_wgrad": ("stride_gk", "stride_xc", "stride_oc"),
    # gz's classes are contiguous per pixel (its pixel strides are multiples of K).
    "head_dgrad": ("stride_gk", "stride_wc", "stride_oc"),
}
# Ints that are not multiples of 16 at U-Net sizes: pixel counts, split counts, dW strides of
# the 2x2 taps, and everything that scales with the head's class count K.
_RAGGED = {
    "dgrad": ("N", "h", "w"),
    "wgrad": ("N", "h", "w", "SPLIT_K", "stride_oo", "stride_oh"),
    "head_wgrad": ("N", "H", "W", "K", "SPLIT_K", "stride_gn", "stride_gh", "stride_gw", "stride_os"),
    "head_dgrad": ("N", "H", "W", "K", "stride_gn", "stride_gh", "stride_gw"),
}


def _signature(fn, act: str, w_dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("g_ptr", "gz_ptr", "x_ptr") or (
            name == "out_ptr" and fn in (_upconv2x2_dgrad_kernel, _head1x1_dgrad_kernel)
        ):
            sig[name] = f"*{act}"
        elif name == "w_ptr":
            sig[name] = f"*{w_dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility_attrs(fn, signature: dict[str, str], not_divisible=()) -> dict:
    """``tt.divisibility=16`` on every pointer and int except ``not_divisible``: what the JIT
    derives for 16-byte aligned NHWC tensors whose channel counts are multiples of 16."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] != "constexpr" and name not in not_divisible
    }


def _spec(kind, fn, act, w_dtype, constexprs, cfg, config, *, hgmma, variant) -> KernelSpec:
    sig = _signature(fn, act, w_dtype, constexprs)
    if constexprs.get("X_NORM"):  # the training path's BatchNorm vectors are fp64
        sig.update(scale_ptr="*fp64", shift_ptr="*fp64")
    return KernelSpec(
        kernel=fn.__name__,
        fn=fn,
        signature=sig,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        dtype=act,
        config=config,
        extra={
            "attrs": _divisibility_attrs(fn, sig, _RAGGED[kind]),
            "variant": variant,
            "expect_hgmma": hgmma,
        },
    )


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (kernel, config, dtype, precision, flags) the launchers can run on ``arch`` (80 or 90)
    after pruning, plus the split reduction.

    Signatures describe the fast path: channels_last activations, the packed upconv weight and
    contiguous dW / workspace, whose unit strides Triton specializes to the constant 1; every
    other size and stride is an ``i32``. ``extra["attrs"]`` holds the divisibility-by-16 hints
    the JIT would add at U-Net sizes (pass it as ``ASTSource``'s fourth argument).
    ``extra["expect_hgmma"]``: 16-bit and TF32 dots with >= 64-row tiles and whole warpgroups
    lower to wgmma on sm_90; IEEE fp32 dots run on FMA units, and the head's class tile
    (16..64 rows) only reaches a wgmma shape at 64 classes.
    """
    arch = tuned_arch(arch)
    specs: list[KernelSpec] = []

    def wgmma(dtype: str, precision: str, cfg: _Cfg) -> bool:
        fast = dtype != "fp32" or precision == "tf32"
        return arch >= 90 and fast and cfg.BLOCK_M >= 64 and cfg.num_warps in (4, 8)

    for dtype in ("fp32", "fp16", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        for precision in ("tf32", "ieee") if dtype == "fp32" else ("ieee",):
            ptag = f"_{precision}" if dtype == "fp32" else ""
            for cfg in _usable_configs("dgrad", arch, elem, precision):
                constexprs = {n: 1 for n in _UNIT_STRIDES["dgrad"]}
                constexprs.update(INPUT_PRECISION=precision, **_triton_config("dgrad", cfg).kwargs)
                specs.append(
                    _spec("dgrad", _upconv2x2_dgrad_kernel, dtype, dtype, constexprs, cfg, cfg.name + ptag,
                          hgmma=wgmma(dtype, precision, cfg), variant="upconv_dgrad")
                )  # fmt: skip
            for cfg in _usable_configs("wgrad", arch, elem, precision):
                for x_norm in (False, True):
                    constexprs = {n: 1 for n in _UNIT_STRIDES["wgrad"]}
                    constexprs.update(X_NORM=x_norm, INPUT_PRECISION=precision, **_triton_config("wgrad", cfg).kwargs)
                    specs.append(
                        _spec("wgrad", _upconv2x2_wgrad_kernel, dtype, dtype, constexprs, cfg,
                              cfg.name + ptag + ("_norm" if x_norm else ""),
                              hgmma=wgmma(dtype, precision, cfg), variant="upconv_wgrad")
                    )  # fmt: skip
            for block_cls in (16, 32, 64):
                for cfg in _usable_configs("head_wgrad", arch, elem, precision, block_cls):
                    for x_norm in (False, True):
                        constexprs = {n: 1 for n in _UNIT_STRIDES["head_wgrad"]}
                        constexprs.update(
                            X_NORM=x_norm, INPUT_PRECISION=precision, BLOCK_K=block_cls,
                            **_triton_config("head_wgrad", cfg).kwargs,
                        )  # fmt: skip
                        specs.append(
                            _spec("head_wgrad", _head1x1_wgrad_kernel, dtype, dtype, constexprs, cfg,
                                  cfg.name + ptag + ("_norm" if x_norm else ""),
                                  hgmma=wgmma(dtype, precision, cfg), variant="head_wgrad")
                        )  # fmt: skip
        # The head's weight is the model parameter: fp32, or the activations' dtype.
        for w_dtype in sorted({dtype, "fp32"}):
            for cfg in _usable_configs("head_dgrad", arch, elem, "ieee"):
                constexprs = {n: 1 for n in _UNIT_STRIDES["head_dgrad"]}
                constexprs.update(_triton_config("head_dgrad", cfg).kwargs)
                specs.append(
                    _spec("head_dgrad", _head1x1_dgrad_kernel, dtype, w_dtype, constexprs, cfg,
                          f"P{cfg.BLOCK_M}_C{cfg.BLOCK_N}_w{cfg.num_warps}_W{w_dtype}",
                          hgmma=False, variant="head_dgrad")
                )  # fmt: skip

    red = _sum_splits_kernel
    constexprs = {"stride_o3": 1, "BLOCK": _RED_BLOCK}
    sig = {
        name: "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr") else "i32"
        for name in red.arg_names
    }
    specs.append(
        KernelSpec(
            kernel=red.__name__,
            fn=red,
            signature=sig,
            constexprs=constexprs,
            num_warps=_RED_WARPS,
            num_stages=1,
            dtype="fp32",  # workspace and dW are fp32 whatever the activations' dtype
            config=f"B{_RED_BLOCK}_w{_RED_WARPS}",
            extra={
                "attrs": _divisibility_attrs(
                    red, sig, ("D0", "D1", "D2", "D3", "SPLIT_K", "stride_o0", "stride_o1", "stride_o2")
                ),
                "variant": "reduce",
                "expect_hgmma": False,  # elementwise: no dot
            },
        )
    )
    return specs
