"""Keras' ``UpSampling2D(2)`` + ``Conv2D(k=2, padding='same')`` (+ ReLU) as one phase GEMM.

TensorFlow's 'same' padding of an even kernel puts the extra row and column at the bottom and
right, so with ``U[p, q] = x[p // 2, q // 2]`` (zero outside ``[0, 2h) x [0, 2w)``)

    out[co, i, j] = bias[co] + sum_{a, b in {0, 1}} sum_ci W[co, ci, a, b] * U[ci, i + a, j + b].

Output pixel ``(2r + di, 2c + dj)`` (phase ``(di, dj)``) reads low-res rows ``r`` and ``r + 1``:
for ``di = 0`` both kernel rows land on row ``r`` (their weights add), for ``di = 1`` row
``a = 0`` lands on ``r`` and ``a = 1`` on ``r + 1`` (zero when ``r + 1 = h``); columns alike. So
each phase is a small convolution of the low-res map with phase-combined weights, and the
upsampled tensor never exists:

| phase (di, dj) | low-res taps (dr, dc) | combined weight of each tap |
|---|---|---|
| (0, 0) | (0, 0) | W00 + W01 + W10 + W11 |
| (0, 1) | (0, 0), (0, 1) | W00 + W10, W01 + W11 |
| (1, 0) | (0, 0), (1, 0) | W00 + W01, W10 + W11 |
| (1, 1) | (0, 0), (0, 1), (1, 0), (1, 1) | W00, W01, W10, W11 |

``pack_upconv_nearest2x2_weight`` stores these 9 tap blocks once as ``[9, C_in, C_out]``
(block ``PHASE_BASE[phase] + tap``, taps row-major within a phase, ``C_out`` contiguous), so
the GEMM for phase p is ``A [M = N*h*w, K = taps_p * C_in] @ B [K, C_out]`` with K ordered
(tap, channel), channel fastest, exactly as ``conv3x3``'s implicit GEMM.

FLOPs: ``2 * N*h*w * 9 * C_in * C_out`` against ``2 * N*4hw * 4 * C_in * C_out`` for the
upsample followed by the 2x2 conv: 9/16 = 56 % of the naive count, and no ``[N, C_in, 2h, 2w]``
intermediate (4x the input) is written and read back.

Training path (``IN_NORM``): x is a conv's raw pre-BatchNorm output and each A tile is replaced
by ``T(x) = relu(x*scale + shift)`` (fp32, rounded back to x's dtype for the dot) *before* the
zero fill of the bottom/right padding row and column: ``T(0) = relu(shift) != 0``, and the
padding is zero in the upsampled activated map.

Backward, in the same phase form (no upsampled tensor either):

* ``upconv_nearest2x2_input_grad``: ``dT(x)[r, c] = sum_blk g[2(r-dr)+di, 2(c-dc)+dj] @ P[blk]^T``,
  an implicit GEMM over low-res pixels with K = 9 * C_out; each pixel written once.
* ``upconv_nearest2x2_weight_grad``: ``dP[blk] = sum_pixels T(x)[r+dr, c+dc]^T g[2r+di, 2c+dj]``,
  one GEMM per block (C_out x C_in over the pixels), split over pixels with the partials summed in
  a fixed order (``_split_k``): deterministic. The 2x2 kernel's gradient is ``P``'s chain rule,
  ``dW_ab = sum_blk M[blk, ab] dP[blk]`` (``_phase_matrix``), formed by the op layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import _specs
from ._common import (
    KernelSpec,
    can_launch,
    cdiv,
    check_bias,
    check_out,
    dot_precision,
    gemm_smem,
    launch,
    smem_limit,
    triton_dtype,
    tuned_arch,
)
from ._split_k import MAX_SPLIT_K, pick_split_k, reduce_splits
from ._tuning import Tuner, bucket, launch_meta
from .norm_act import affine_relu, check_norm_affine

__all__ = [
    "PHASE_BASE",
    "PHASE_TAPS",
    "pack_upconv_nearest2x2_weight",
    "upconv_nearest2x2",
    "upconv_nearest2x2_input_grad",
    "upconv_nearest2x2_weight_grad",
    "compile_specs",
]

# Pixel indices are int32 in the kernel; headroom keeps the last tile's lanes from wrapping.
_MAX_PIXELS = 2**31 - 2**16

#: First tap block of each phase ``di*2 + dj`` in the packed weight, and its tap count.
PHASE_BASE = (0, 1, 3, 5)
PHASE_TAPS = (1, 2, 2, 4)


@triton.jit(do_not_specialize=("N",))
def _upconv_nearest2x2_kernel(
    x_ptr,  # [N, C_in, h, w], any strides (channels_last is the fast layout)
    w_ptr,  # [9, C_in, C_out] packed tap blocks, any strides (C_out contiguous is the fast one)
    b_ptr,  # [C_out], any float dtype, read as fp32 (unused unless HAS_BIAS)
    out_ptr,  # [N, C_out, 2h, 2w], any strides, same dtype as x
    scale_ptr,  # [C_in] fp32/fp64, contiguous (unused unless IN_NORM)
    shift_ptr,  # [C_in] fp32/fp64, contiguous (unused unless IN_NORM)
    N,
    h,
    w,
    C_in,
    C_out,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wt,
    stride_wi,
    stride_wo,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    IN_NORM: tl.constexpr,  # multiply T(x) = relu(x*scale + shift) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M low-res pixels, BLOCK_N output channels]`` tile of one phase.

    Minimum bytes moved: ``(N*h*w*C_in + 9*C_in*C_out + N*4*h*w*C_out) * elem``; each program
    reads ``taps_p`` shifted A tiles, mostly from L2 since the phases and channel blocks of one
    pixel tile run on neighbouring program ids.
    """
    pid = tl.program_id(0)
    num_co_blocks = tl.cdiv(C_out, BLOCK_N)
    num_pid_n = 4 * num_co_blocks
    # Column tiles (phase, channel block) vary fastest so programs sharing A tiles run together.
    # The heaviest phase (4 taps) first: a wave's tail then holds the light tiles.
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    phase = 3 - pid_n // num_co_blocks  # di * 2 + dj
    di = phase // 2
    dj = phase % 2
    n_tap_cols = dj + 1
    n_taps = (di + 1) * n_tap_cols
    blk_base = tl.maximum(2 * phase - 1, 0)  # PHASE_BASE = (0, 1, 3, 5)

    hw = h * w
    M = N * hw  # < 2**31, checked by the launcher
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] low-res pixel index
    mask_m = offs_m < M
    n_idx = offs_m // hw
    rem = offs_m % hw
    i_idx = rem // w
    j_idx = rem % w
    # int64 before the stride products: activations can exceed 2**31 elements.
    x_pix = n_idx.to(tl.int64) * stride_xn + i_idx.to(tl.int64) * stride_xh + j_idx.to(tl.int64) * stride_xw

    offs_co = (pid_n % num_co_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_co = offs_co < C_out
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_co = offs_co * stride_wo  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    n_cb = tl.cdiv(C_in, BLOCK_K)
    # One flat loop over (tap, channel block): one pipelined loop rather than nested ones.
    for kk in range(0, n_taps * n_cb):
        tap = kk // n_cb
        c = (kk - tap * n_cb) * BLOCK_K + offs_k  # [BLOCK_K] input channels
        c_ok = c < C_in
        dr = tap // n_tap_cols
        dc = tap - dr * n_tap_cols
        # Row h / column w is TensorFlow's bottom/right 'same' padding: zero.
        row_ok = mask_m & (i_idx + dr < h) & (j_idx + dc < w)  # [BLOCK_M]
        a_mask = row_ok[:, None] & c_ok[None, :]  # [BLOCK_M, BLOCK_K]
        row_off = x_pix + (dr * stride_xh + dc * stride_xw)  # [BLOCK_M]
        a = tl.load(x_ptr + row_off[:, None] + (c.to(tl.int64) * stride_xc)[None, :], mask=a_mask, other=0.0)
        if IN_NORM:
            s = tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            t = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a_n = a.to(tl.float32) * s[None, :] + t[None, :]
            # ReLU as a select: NaN passes, as in torch.relu (a GPU's max.f32 would make it 0).
            a_n = tl.where(a_n < 0.0, 0.0, a_n)
            # The zero fill after the transform: relu(shift) is not 0.
            a = tl.where(a_mask, a_n, 0.0).to(x_ptr.dtype.element_ty)
        w_k = (blk_base + tap) * stride_wt + c * stride_wi  # [BLOCK_K]
        b = tl.load(w_ptr + w_k[:, None] + w_co[None, :], mask=c_ok[:, None] & mask_co[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=mask_co, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc += bias[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN-propagating, like torch.relu

    # Low-res pixel (r, c) of phase (di, dj) is output pixel (2r+di, 2c+dj).
    out_row = (
        n_idx.to(tl.int64) * stride_on
        + (2 * i_idx + di).to(tl.int64) * stride_oh
        + (2 * j_idx + dj).to(tl.int64) * stride_ow
    )  # [BLOCK_M]
    out_ptrs = out_ptr + (out_row[:, None] + offs_co.to(tl.int64)[None, :] * stride_oc)  # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_co[None, :])


@triton.jit(do_not_specialize=("N",))
def _upconv_nearest2x2_dgrad_kernel(
    g_ptr,  # [N, C_out, 2h, 2w], any strides (channels_last is the fast layout)
    w_ptr,  # [9, C_in, C_out] packed tap blocks, any strides (C_in contiguous is the fast one here)
    out_ptr,  # [N, C_in, h, w], any strides, same dtype as g
    N,
    h,
    w,
    C_in,
    C_out,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_wt,
    stride_wi,
    stride_wo,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M low-res pixels, BLOCK_N input channels]`` tile of the input gradient.

    The forward's phase p tap (dr, dc) sends low-res pixel (r, c) to output pixel
    (2(r - dr) + di, 2(c - dc) + dj) through block ``P[blk]``, so
    ``dx[r, c] = sum_blk g[2(r - dr) + di, 2(c - dc) + dj] @ P[blk]^T`` over the 9 blocks whose
    source pixel exists (r >= dr, c >= dc): an implicit GEMM with K = 9 * C_out, one output
    write per pixel, no atomics. FLOPs: ``2 * N*h*w * 9 * C_out * C_in`` (56 % of the
    upsampled conv's dgrad plus the 2x2 sum that folds it back to low resolution).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(C_in, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    hw = h * w
    M = N * hw  # < 2**31, checked by the launcher
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] low-res pixel index
    mask_m = offs_m < M
    n_idx = offs_m // hw
    rem = offs_m % hw
    i_idx = rem // w
    j_idx = rem % w
    # int64 before the stride products: the full-resolution gradient can exceed 2**31 elements.
    g_pix = n_idx.to(tl.int64) * stride_gn + (2 * i_idx).to(tl.int64) * stride_gh + (2 * j_idx).to(tl.int64) * stride_gw

    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_ci = offs_ci < C_in
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_ci = offs_ci * stride_wi  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    n_cb = tl.cdiv(C_out, BLOCK_K)
    for kk in range(0, 9 * n_cb):
        blk = kk // n_cb
        co = (kk - blk * n_cb) * BLOCK_K + offs_k  # [BLOCK_K] output channels
        co_ok = co < C_out
        # Block -> (phase, tap): PHASE_BASE = (0, 1, 3, 5), PHASE_TAPS = (1, 2, 2, 4).
        phase = tl.where(blk >= 5, 3, (blk + 1) // 2)
        tap = blk - tl.maximum(2 * phase - 1, 0)
        di = phase // 2
        dj = phase % 2
        dr = tap // (dj + 1)
        dc = tap - dr * (dj + 1)
        row_ok = mask_m & (i_idx >= dr) & (j_idx >= dc)  # [BLOCK_M]
        row_off = g_pix + ((di - 2 * dr) * stride_gh + (dj - 2 * dc) * stride_gw)  # [BLOCK_M]
        a_mask = row_ok[:, None] & co_ok[None, :]  # [BLOCK_M, BLOCK_K]
        a = tl.load(g_ptr + row_off[:, None] + (co.to(tl.int64) * stride_gc)[None, :], mask=a_mask, other=0.0)
        w_k = blk * stride_wt + co * stride_wo  # [BLOCK_K]
        b = tl.load(w_ptr + w_k[:, None] + w_ci[None, :], mask=co_ok[:, None] & mask_ci[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]

    out_row = n_idx.to(tl.int64) * stride_on + i_idx.to(tl.int64) * stride_oh + j_idx.to(tl.int64) * stride_ow
    out_ptrs = out_ptr + (out_row[:, None] + offs_ci.to(tl.int64)[None, :] * stride_oc)  # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@triton.jit(do_not_specialize=("N", "SPLIT_K"))
def _upconv_nearest2x2_wgrad_kernel(
    g_ptr,  # [N, C_out, 2h, 2w], any strides (channels_last is the fast layout)
    x_ptr,  # [N, C_in, h, w], any strides, g's dtype
    scale_ptr,  # [C_in] fp32/fp64, contiguous (unused unless X_NORM)
    shift_ptr,  # [C_in] fp32/fp64, contiguous (unused unless X_NORM)
    out_ptr,  # fp32 [9, C_in, C_out] (strides stride_ot, stride_oi, stride_oo); with SPLIT_K > 1
    # a workspace of SPLIT_K such slices, stride_os apart
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
    stride_ot,
    stride_oi,
    stride_oo,
    stride_os,
    X_NORM: tl.constexpr,  # multiply T(x) = relu(x*scale + shift) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M output channels, BLOCK_N input channels]`` tile of one tap block's gradient
    over one split of the pixels.

    Per block (phase (di, dj), tap (dr, dc)): M = C_out, N = C_in, K = N*h*w low-res pixels.
    A is ``g[n, co, 2r+di, 2c+dj]`` (``[BLOCK_M, BLOCK_K]``), B is ``T(x)[n, ci, r+dr, c+dc]``
    (``[BLOCK_K, BLOCK_N]``, zero in the bottom/right padding, after the transform).
    FLOPs: ``2 * N*h*w * 9 * C_in * C_out``. Grid: ``(9 * cdiv(C_out, BLOCK_M) * cdiv(C_in,
    BLOCK_N), SPLIT_K)``; the splits' partials are summed in a fixed order afterwards.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Row tiles (block, co block) vary fastest: neighbouring programs share their x tile.
    num_co_blocks = tl.cdiv(C_out, BLOCK_M)
    num_pid_m = 9 * num_co_blocks
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    blk = pid_m // num_co_blocks
    # Block -> (phase, tap): PHASE_BASE = (0, 1, 3, 5), PHASE_TAPS = (1, 2, 2, 4).
    phase = tl.where(blk >= 5, 3, (blk + 1) // 2)
    tap = blk - tl.maximum(2 * phase - 1, 0)
    di = phase // 2
    dj = phase % 2
    dr = tap // (dj + 1)
    dc = tap - dr * (dj + 1)

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
    x_col = offs_ci.to(tl.int64) * stride_xc + (dr * stride_xh + dc * stride_xw)  # [BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for p0 in range(p_lo, p_hi, BLOCK_K):
        offs_p = p0 + offs_k  # [BLOCK_K] flat low-res pixels (int32: N*h*w < 2^31)
        p_ok = offs_p < p_hi
        img = offs_p // hw
        rem = offs_p - img * hw
        i_idx = rem // w
        j_idx = rem % w
        img64 = img.to(tl.int64)
        g_pix = img64 * stride_gn + (2 * i_idx).to(tl.int64) * stride_gh + (2 * j_idx).to(tl.int64) * stride_gw
        x_pix = img64 * stride_xn + i_idx.to(tl.int64) * stride_xh + j_idx.to(tl.int64) * stride_xw  # [BLOCK_K]
        a = tl.load(g_ptr + g_col[:, None] + g_pix[None, :], mask=co_mask[:, None] & p_ok[None, :], other=0.0)
        # Row h / column w is the 'same' padding: zero, also after the transform.
        x_ok = p_ok & (i_idx + dr < h) & (j_idx + dc < w)  # [BLOCK_K]
        b_mask = x_ok[:, None] & ci_mask[None, :]
        b = tl.load(x_ptr + x_pix[:, None] + x_col[None, :], mask=b_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if X_NORM:
            b = tl.where(b_mask, affine_relu(b, scale, shift), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # a: [BLOCK_M, BLOCK_K]

    dst_ptr = out_ptr + pid_k.to(tl.int64) * stride_os + blk * stride_ot
    o_ptrs = dst_ptr + (
        (offs_co.to(tl.int64) * stride_oo)[:, None] + (offs_ci.to(tl.int64) * stride_oi)[None, :]
    )  # [BLOCK_M, BLOCK_N]
    tl.store(o_ptrs, acc, mask=co_mask[:, None] & ci_mask[None, :])


# --------------------------------------------------------------------------------------
# Configs: upconv2x2's lists, shortened (one GEMM shape family, K = taps * C_in). BLOCK_M >= 64
# with 4/8 warps keeps 16-bit and TF32 dots on wgmma on sm_90. Pruned per call by shared memory,
# by register footprint for 4-byte operands and the fp32 A tile of IN_NORM, and by
# BLOCK_N > C_out.
# --------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Tensor-core dots: fp16/bf16, and fp32 as TF32.
_CONFIGS = {
    90: [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 64, 32, 4, 3),  # the training form's fp32 tile (see _NORM_SPILLS)
    ],
    80: [
        _cfg(128, 128, 32, 4, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 64, 32, 4, 3),  # the training form's fp32 tile (see _NORM_SPILLS)
    ],
}

# fp32 with allow_tf32=False runs tl.dot on FMA units, where every thread holds its slice of
# both operand tiles in registers: wide BLOCK_K spills there, so IEEE gets its own list.
_IEEE_CONFIGS = {
    90: [
        _cfg(128, 64, 16, 4, 3),
        _cfg(64, 128, 16, 4, 3),
        _cfg(64, 64, 32, 4, 3),
    ],
    80: [
        # 2 stages: at 3, triton 3.6's ptxas spilled 128 B at 255 registers (sm_80 report).
        _cfg(128, 64, 16, 4, 2),
        _cfg(64, 128, 16, 4, 3),
        _cfg(64, 64, 32, 4, 3),
    ],
}

# As in upconv2x2: past this many accumulator plus A-fragment words per thread, 4-byte operands
# spill; and the fp32 A tile of IN_NORM is held in registers between its load and the dot.
_MAX_WORDS_PER_THREAD_FP32 = 96
_MAX_NORM_A_WORDS_PER_THREAD = 32
# 4-byte operands with IN_NORM (the per-tap row masks and the transform's fp32 tile on top):
# the sm_90 compile report spilled at 80 words (BM128_BN64_BK16 IEEE, 255 registers) and 96
# (BM64_BN128_BK64 TF32) with 4 warps, and reached 254 registers at 72; 64 leaves headroom
# for other Triton versions.
_MAX_NORM_WORDS_PER_THREAD_FP32 = 64
# IN_NORM tiles the sm_80 compile report found spilling, as (tuned arch, config name, element
# bytes): below the register limit with triton 3.9 (168 registers, 12-24 bytes), and the
# 128x128 tile at the limit with triton 3.6 (255 registers, 20 bytes).
_NORM_SPILLS = {
    (80, "BM64_BN128_BK32_w4_s4", 2),
    (80, "BM64_BN64_BK64_w4_s3", 4),
    (80, "BM128_BN128_BK32_w4_s4", 2),
}
# The dgrad kernel leaves out the small BM64_BN64_BK32 tile: ptxas capped it at 96 registers and
# spilled (sm_80 16-bit: 8 bytes; sm_90 IEEE fp32: 28 bytes), and the dgrad has no transform that
# would need it.
_DGRAD_SKIP = frozenset({"BM64_BN64_BK32_w4_s3"})

# The interpreter does not autotune: one small config keeps CPU runs quick.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


def _config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BM{k['BLOCK_M']}_BN{k['BLOCK_N']}_BK{k['BLOCK_K']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _smem_bytes(cfg: triton.Config, elem_bytes: int, in_norm: bool = False) -> int:
    """The pruning's shared-memory estimate (``gemm_smem``: pipeline or staged fp32 result), plus
    what the forward's BatchNorm+ReLU on the load adds (sm_90 report, triton 3.6: 1 to 3 KiB
    at K steps of 32 to 64)."""
    return gemm_smem(cfg, elem_bytes, out_bytes=4, scratch=_NORM_SMEM_PER_K * cfg.kwargs["BLOCK_K"] if in_norm else 0)


_NORM_SMEM_PER_K = 64


def _usable_configs(
    arch: int, elem_bytes: int, precision: str, in_norm: bool = False, dgrad: bool = False
) -> list[triton.Config]:
    """The configs a device of compute capability ``arch`` may run for this element size, dot
    precision and input transform (forward) or for the dgrad kernel: its list minus what
    overflows shared memory or the register budget. Never empty: the smallest tile is kept as a
    last resort."""
    ieee32 = elem_bytes == 4 and precision == "ieee"
    candidates = (_IEEE_CONFIGS if ieee32 else _CONFIGS)[tuned_arch(arch)]
    if dgrad:
        candidates = [c for c in candidates if _config_name(c) not in _DGRAD_SKIP]
    usable = []
    for c in candidates:
        k = c.kwargs
        if _smem_bytes(c, elem_bytes, in_norm) > smem_limit(arch):
            continue
        words = (k["BLOCK_M"] * k["BLOCK_N"] + k["BLOCK_M"] * k["BLOCK_K"]) // (32 * c.num_warps)
        if elem_bytes == 4 and words > _MAX_WORDS_PER_THREAD_FP32:
            continue
        if in_norm and k["BLOCK_M"] * k["BLOCK_K"] > _MAX_NORM_A_WORDS_PER_THREAD * 32 * c.num_warps:
            continue
        if in_norm and elem_bytes == 4 and words > _MAX_NORM_WORDS_PER_THREAD_FP32:
            continue
        if in_norm and (tuned_arch(arch), _config_name(c), elem_bytes) in _NORM_SPILLS:
            continue
        usable.append(c)
    return usable or [min(candidates, key=lambda c: _smem_bytes(c, elem_bytes))]


def _prune_configs(configs, shape: dict, arch: int) -> list:
    usable = _usable_configs(arch, shape["elem"], shape["INPUT_PRECISION"], shape["IN_NORM"], shape["dgrad"])
    usable = [c for c in configs if c in usable]
    narrow = [c for c in usable if c.kwargs["BLOCK_N"] <= max(shape["cols"], 64)]
    return narrow or usable


def _tiles(cfg, shape: dict) -> int:
    """Programs of a launch: pixel tiles x column tiles (x 4 phases for the forward)."""
    return cdiv(shape["M"], cfg.kwargs["BLOCK_M"]) * shape["phases"] * cdiv(shape["cols"], cfg.kwargs["BLOCK_N"])


def _interpreter_config(shape: dict) -> triton.Config:
    return triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1)


def _without_dgrad_skips(lists: dict) -> dict:
    return {arch: [c for c in cfgs if _config_name(c) not in _DGRAD_SKIP] for arch, cfgs in lists.items()}


_DGRAD_CONFIGS = _without_dgrad_skips(_CONFIGS)
_DGRAD_IEEE_CONFIGS = _without_dgrad_skips(_IEEE_CONFIGS)

# Weight gradient: upconv2x2's wgrad lists (the same GEMM orientation: C_out x C_in over pixels,
# the transformed operand B passing through registers), shortened.
_WGRAD_CONFIGS = {
    90: [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 64, 4, 4)],
    80: [_cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4)],
}
# IEEE fp32: one stage (B passes through registers for the transform), as upconv2x2's wgrad.
_WGRAD_IEEE_CONFIGS = {arch: [_cfg(128, 64, 32, 8, 1), _cfg(64, 64, 32, 4, 1)] for arch in (80, 90)}
# 4-byte B tiles past this many words per thread spilled in upconv2x2's and the head's wgrad.
_MAX_WGRAD_B_WORDS_FP32 = 32


def _wgrad_usable_configs(arch: int, elem_bytes: int, precision: str) -> list[triton.Config]:
    """The weight-gradient configs for ``arch``, element size and dot precision: the list minus
    what overflows shared memory or (4-byte operands) the register budget. Never empty."""
    ieee32 = elem_bytes == 4 and precision == "ieee"
    candidates = (_WGRAD_IEEE_CONFIGS if ieee32 else _WGRAD_CONFIGS)[tuned_arch(arch)]
    usable = []
    for c in candidates:
        k = c.kwargs
        words = (k["BLOCK_M"] * k["BLOCK_N"] + k["BLOCK_M"] * k["BLOCK_K"]) // (32 * c.num_warps)
        b_words = k["BLOCK_K"] * k["BLOCK_N"] // (32 * c.num_warps)
        if _smem_bytes(c, elem_bytes) > smem_limit(arch):
            continue
        if elem_bytes == 4 and (words > _MAX_WORDS_PER_THREAD_FP32 or b_words > _MAX_WGRAD_B_WORDS_FP32):
            continue
        usable.append(c)
    return usable or [min(candidates, key=lambda c: _smem_bytes(c, elem_bytes))]


def _wgrad_prune(configs, shape: dict, arch: int) -> list:
    usable = _wgrad_usable_configs(arch, shape["elem"], shape["INPUT_PRECISION"])
    usable = [c for c in configs if c in usable]
    caps = {"BLOCK_M": max(shape["C_out"], 64), "BLOCK_N": max(shape["C_in"], 64)}
    narrow = [c for c in usable if all(c.kwargs[k] <= v for k, v in caps.items())]
    return narrow or usable


def _wgrad_tiles(cfg, shape: dict) -> int:
    k = cfg.kwargs
    return 9 * cdiv(shape["C_out"], k["BLOCK_M"]) * cdiv(shape["C_in"], k["BLOCK_N"]) * shape["SPLIT_K"]


# fp32 IEEE dots have their own list (see _IEEE_CONFIGS), so they get their own tuner.
_TUNERS = {
    "tc": Tuner("upconv_nearest2x2", _CONFIGS, _prune_configs, _tiles, _interpreter_config),
    "ieee": Tuner("upconv_nearest2x2.ieee", _IEEE_CONFIGS, _prune_configs, _tiles, _interpreter_config),
    # The input gradient: the same GEMM shape family (K = 9 * C_out, N = C_in), its own picks.
    "dgrad": Tuner("upconv_nearest2x2.dgrad", _DGRAD_CONFIGS, _prune_configs, _tiles, _interpreter_config),
    "dgrad.ieee": Tuner(
        "upconv_nearest2x2.dgrad.ieee", _DGRAD_IEEE_CONFIGS, _prune_configs, _tiles, _interpreter_config
    ),
    "wgrad": Tuner("upconv_nearest2x2.wgrad", _WGRAD_CONFIGS, _wgrad_prune, _wgrad_tiles, _interpreter_config),
    "wgrad.ieee": Tuner(
        "upconv_nearest2x2.wgrad.ieee", _WGRAD_IEEE_CONFIGS, _wgrad_prune, _wgrad_tiles, _interpreter_config
    ),
}


def _tuner(kind: str, elem_bytes: int, precision: str) -> Tuner:
    """The tuner of ``kind`` ("tc": the forward, "dgrad", "wgrad") for this dtype and precision:
    fp32 IEEE dots have their own lists."""
    ieee32 = elem_bytes == 4 and precision == "ieee"
    return _TUNERS[{"tc": "ieee"}.get(kind, f"{kind}.ieee") if ieee32 else kind]


def _tuned_configs(kind: str, arch: int, elem_bytes: int, precision: str, in_norm: bool = False) -> list:
    """What ``kind``'s tuner can pick on ``arch`` over every channel count (``_specs``; the pruning
    does not read the pixel count or the split)."""
    channels = (*_specs.SMALL_CHANNELS, *_specs.CHANNELS)
    base = {"elem": elem_bytes, "INPUT_PRECISION": precision}
    if kind == "wgrad":
        shapes = _specs.shape_grid({**base, "SPLIT_K": 1}, C_in=channels, C_out=channels)
    else:
        base.update(IN_NORM=in_norm, dgrad=kind == "dgrad", phases=1 if kind == "dgrad" else 4)
        shapes = _specs.shape_grid(base, M=_specs.FEW_PIXEL_BUCKETS, cols=channels)
    return _specs.tuned_configs(_tuner(kind, elem_bytes, precision), arch, shapes)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


_PHASE_MATRICES: dict = {}


def _phase_matrix(dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """``[9, 4]`` 0/1: tap block k of the packed weight is ``sum_ab P[k, a*2 + b] * W[:, :, a, b]``.

    Phase ``(di, dj)``'s tap ``(dr, dc)`` collects kernel row a iff ``a*di == dr`` (di = 0: every
    row lands on low-res row r) and kernel column b iff ``b*dj == dc``. Made once per dtype and
    device: building it from a Python list is a host-to-device copy that waits for the GPU, which
    a training step must not do every time (nor could a captured CUDA graph hold it). Made
    outside inference mode, so that a packing autograd records can save it.
    """
    device = like.device
    # Under a trace (fake tensors) a constant is made in the trace's mode, never kept.
    traced = is_fake(like)
    matrix = None if traced else _PHASE_MATRICES.get((dtype, device))
    if matrix is None:
        rows = []
        for di in (0, 1):
            for dj in (0, 1):
                for dr in range(di + 1):
                    for dc in range(dj + 1):
                        rows.append([float(a * di == dr and b * dj == dc) for a in (0, 1) for b in (0, 1)])
        if traced:
            return torch.tensor(rows, dtype=dtype, device=device)
        with torch.inference_mode(False), torch.no_grad():
            matrix = _PHASE_MATRICES[(dtype, device)] = torch.tensor(rows, dtype=dtype, device=device)
    return matrix


def pack_upconv_nearest2x2_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 9 phase-combined tap blocks of a 2x2 'same' conv after a nearest x2 upsample.

    ``weight`` is the ``nn.Conv2d`` weight ``[C_out, C_in, 2, 2]``. Returns ``[9, C_in, C_out]``
    contiguous in ``dtype`` (default: the weight's own): block ``PHASE_BASE[di*2 + dj] + tap``
    holds phase ``(di, dj)``'s tap (taps row-major over ``(dr, dc)``; see the module docstring).
    The sums are formed in float32 (float64 for a float64 weight) and rounded once.
    Differentiable (a fixed linear map of the weight).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must be [C_out, C_in, 2, 2], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    c_out, c_in = weight.shape[:2]
    w_ab = weight.to(acc).permute(2, 3, 1, 0).reshape(4, c_in, c_out)  # [(a, b), C_in, C_out]
    packed = torch.einsum("ka,aio->kio", _phase_matrix(acc, weight), w_ab)
    return packed.to(dtype or weight.dtype).contiguous()


def _check_inputs(x, weight, bias, in_scale, in_shift, out):
    """Validate the launcher's arguments; returns ``(N, C_in, h, w, C_out)`` and the norm pair
    (or None)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    triton_dtype(x.dtype)  # TypeError for anything but fp32/fp16/bf16
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C_in, h, w], got shape {tuple(x.shape)}")
    N, C_in, h, w = x.shape
    if weight.dim() != 3 or weight.shape[0] != 9 or weight.shape[1] != C_in:
        raise ValueError(
            f"weight must be packed [9, C_in={C_in}, C_out] (pack_upconv_nearest2x2_weight) or "
            f"[C_out, C_in={C_in}, 2, 2], got shape {tuple(weight.shape)}"
        )
    C_out = weight.shape[2]
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if not can_launch(x.device):
        raise ValueError(f"upconv_nearest2x2 runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    check_bias(bias, C_out, x)
    check_out(out, (N, C_out, 2 * h, 2 * w), x)
    if N * h * w > _MAX_PIXELS:
        raise ValueError(f"N*h*w = {N * h * w} pixels exceeds the int32 pixel index")
    return (N, C_in, h, w, C_out), check_norm_affine(in_scale, in_shift, C_in, x)


def upconv_nearest2x2(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    relu: bool = False,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(conv2d(pad(upsample_nearest_x2(x), bottom/right 1), weight) + bias)``, one launch.

    Keras' ``Conv2D(C_out, 2, padding='same')(UpSampling2D(2)(x))``, computed per output phase on
    the low-res map (9 tap blocks of GEMM, 56 % of the naive FLOPs; see the module docstring).

    Args:
        x: ``[N, C_in, h, w]`` float32/float16/bfloat16, any strides (channels_last is fast; a
            channel slice of a larger NHWC buffer is fine).
        weight: the packed ``[9, C_in, C_out]`` from ``pack_upconv_nearest2x2_weight(w, x.dtype)``
            (any strides; ``C_out`` contiguous is fast), or the ``nn.Conv2d`` weight
            ``[C_out, C_in, 2, 2]``, then packed on every call.
        bias: ``[C_out]`` of any float dtype (read as fp32), or None.
        relu: apply ReLU (NaN-propagating) in the epilogue.
        in_scale, in_shift: optional fp32/fp64 ``[C_in]`` (both or neither): upsample
            ``T(x) = relu(x*in_scale[ci] + in_shift[ci])`` (fp32 math, rounded to ``x.dtype``)
            instead of x; the padding stays zero.
        out: optional ``[N, C_out, 2h, 2w]`` destination in ``x.dtype``, any strides (e.g. a
            channel slice of a larger NHWC buffer). Default: a new channels_last tensor.

    Accumulates in fp32; fp32 inputs use TF32 dots iff ``torch.backends.cudnn.allow_tf32``.
    Returns ``out``.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        weight = pack_upconv_nearest2x2_weight(weight, x.dtype if isinstance(x, torch.Tensor) else None)
    (N, C_in, h, w, C_out), norm = _check_inputs(x, weight, bias, in_scale, in_shift, out)
    if out is None:
        out = torch.empty(
            (N, C_out, 2 * h, 2 * w),
            device=x.device,
            dtype=x.dtype,
            memory_format=torch.channels_last,
        )
    if out.numel() == 0:
        return out
    M = N * h * w
    scale, shift = norm if norm is not None else (x, x)  # never read without IN_NORM
    args = (
        x,
        weight,
        bias if bias is not None else x,  # never read without HAS_BIAS
        out,
        scale,
        shift,
        N,
        h,
        w,
        C_in,
        C_out,
        *x.stride(),
        *weight.stride(),
        *out.stride(),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "RELU": bool(relu),
        "IN_NORM": norm is not None,
        "INPUT_PRECISION": dot_precision(x.dtype),
    }

    m_bucket = bucket(M)

    def run(cfg):
        grid = (cdiv(M, cfg.kwargs["BLOCK_M"]) * 4 * cdiv(C_out, cfg.kwargs["BLOCK_N"]),)
        launch(_upconv_nearest2x2_kernel, grid, args, {**flags, **launch_meta(cfg)})

    def shape():
        return {
            "M": m_bucket, "cols": C_out, "phases": 4, "dgrad": False, "elem": x.element_size(),
            "INPUT_PRECISION": flags["INPUT_PRECISION"], "IN_NORM": flags["IN_NORM"],
        }  # fmt: skip

    key = (x.dtype, m_bucket, C_in, C_out, *flags.values())
    run(_tuner("tc", x.element_size(), flags["INPUT_PRECISION"]).pick(x.device, key, shape, run))
    return out


def upconv_nearest2x2_input_grad(
    g: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The input gradient of ``upconv_nearest2x2`` (of ``T(x)`` in the training form): one launch.

    Args:
        g: ``[N, C_out, 2h, 2w]`` float32/float16/bfloat16, the gradient of the conv's output
            (after the ReLU's mask), any strides (channels_last is fast).
        weight: packed ``[9, C_in, C_out]`` in ``g.dtype``, any strides; storage
            ``[9, C_out, C_in]`` (``packed.transpose(1, 2).contiguous().transpose(1, 2)``) is the
            fast one here, since the GEMM's B rows run along ``C_in``. A ``[C_out, C_in, 2, 2]``
            weight is packed on every call.
        out: optional ``[N, C_in, h, w]`` destination in ``g.dtype``, any strides. Default: a new
            channels_last tensor.

    Deterministic (each input pixel written once, no atomics); accumulates in fp32. Returns ``out``.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        weight = pack_upconv_nearest2x2_weight(weight, g.dtype if isinstance(g, torch.Tensor) else None)
    for name, t in (("g", g), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    triton_dtype(g.dtype)
    if g.dim() != 4 or g.shape[2] % 2 or g.shape[3] % 2:
        raise ValueError(f"g must be [N, C_out, 2h, 2w] (even height and width), got shape {tuple(g.shape)}")
    N, C_out, h, w = g.shape[0], g.shape[1], g.shape[2] // 2, g.shape[3] // 2
    if weight.dim() != 3 or weight.shape[0] != 9 or weight.shape[2] != C_out:
        raise ValueError(f"weight must be packed [9, C_in, C_out={C_out}], got shape {tuple(weight.shape)}")
    C_in = weight.shape[1]
    if weight.dtype != g.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match g dtype {g.dtype}")
    if not can_launch(g.device):
        raise ValueError(f"upconv_nearest2x2_input_grad runs on CUDA (or CPU under TRITON_INTERPRET=1), got {g.device}")
    if weight.device != g.device:
        raise ValueError(f"weight is on {weight.device}, g on {g.device}")
    if out is None:
        out = torch.empty((N, C_in, h, w), device=g.device, dtype=g.dtype, memory_format=torch.channels_last)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (N, C_in, h, w) or out.dtype != g.dtype:
        raise ValueError(f"out must be a [{N}, {C_in}, {h}, {w}] {g.dtype} tensor")
    elif out.device != g.device:
        raise ValueError(f"out is on {out.device}, g on {g.device}")
    if N * h * w > _MAX_PIXELS:
        raise ValueError(f"N*h*w = {N * h * w} pixels exceeds the int32 pixel index")
    if out.numel() == 0:
        return out
    if C_out == 0:
        return out.zero_()
    M = N * h * w
    args = (g, weight, out, N, h, w, C_in, C_out, *g.stride(), *weight.stride(), *out.stride())
    precision = dot_precision(g.dtype)
    m_bucket = bucket(M)

    def run(cfg):
        grid = (cdiv(M, cfg.kwargs["BLOCK_M"]) * cdiv(C_in, cfg.kwargs["BLOCK_N"]),)
        launch(_upconv_nearest2x2_dgrad_kernel, grid, args, {"INPUT_PRECISION": precision, **launch_meta(cfg)})

    def shape():
        return {
            "M": m_bucket, "cols": C_in, "phases": 1, "dgrad": True, "elem": g.element_size(),
            "INPUT_PRECISION": precision, "IN_NORM": False,
        }  # fmt: skip

    tuner = _tuner("dgrad", g.element_size(), precision)
    run(tuner.pick(g.device, (g.dtype, m_bucket, C_in, C_out, precision), shape, run))
    return out


def upconv_nearest2x2_weight_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    *,
    x_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of ``upconv_nearest2x2``'s packed tap blocks.

    Args:
        g: ``[N, C_out, 2h, 2w]`` float32/float16/bfloat16, the gradient of the conv's output
            (after the ReLU's mask), any strides (channels_last is fast).
        x: ``[N, C_in, h, w]`` in ``g.dtype``, the conv's (raw) input, any strides.
        x_norm: None or ``(scale, shift)`` fp32/fp64 ``[C_in]``: the input is then
            ``T(x) = relu(x*scale + shift)`` (fp32 math, rounded to x's dtype).
        out: optional fp32 ``[9, C_in, C_out]`` destination, any strides; fully overwritten.

    Returns fp32 ``dP[blk, ci, co] = sum_{n,r,c} T(x)[n, ci, r+dr, c+dc] * g[n, co, 2r+di, 2c+dj]``
    for block ``blk`` = phase (di, dj)'s tap (dr, dc) (zero beyond the bottom/right edge). The
    2x2 kernel's gradient is ``dW[:, :, a, b] = sum_blk M[blk, a*2+b] dP[blk]^T`` with the phase
    matrix M of ``pack_upconv_nearest2x2_weight``. Deterministic: pixel splits are summed in a
    fixed order (no atomics); fp32 accumulation.
    """
    for name, t in (("g", g), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    triton_dtype(g.dtype)
    if g.dim() != 4 or g.shape[2] % 2 or g.shape[3] % 2:
        raise ValueError(f"g must be [N, C_out, 2h, 2w] (even height and width), got shape {tuple(g.shape)}")
    N, C_out, h, w = g.shape[0], g.shape[1], g.shape[2] // 2, g.shape[3] // 2
    if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (N, h, w):
        raise ValueError(f"x must be [N={N}, C_in, h={h}, w={w}] for g of shape {tuple(g.shape)}, got {tuple(x.shape)}")
    if x.dtype != g.dtype:
        raise TypeError(f"x dtype {x.dtype} must match g dtype {g.dtype}")
    C_in = x.shape[1]
    if not can_launch(g.device):
        raise ValueError(f"upconv_nearest2x2_weight_grad runs on CUDA (or CPU, interpreted), got {g.device}")
    if x.device != g.device:
        raise ValueError(f"x is on {x.device}, g on {g.device}")
    norm = None if x_norm is None else check_norm_affine(x_norm[0], x_norm[1], C_in, x)
    if out is None:
        out = torch.empty((9, C_in, C_out), device=g.device, dtype=torch.float32)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (9, C_in, C_out) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 [9, {C_in}, {C_out}] tensor")
    elif out.device != g.device:
        raise ValueError(f"out is on {out.device}, g on {g.device}")
    P = N * h * w
    if P > _MAX_PIXELS:
        raise ValueError(f"N*h*w = {P} pixels exceeds the int32 pixel index")
    if out.numel() == 0:
        return out
    if P == 0:
        return out.zero_()

    split_k = pick_split_k(g.device, P, 9 * cdiv(C_out, 64) * cdiv(C_in, 64), 36 * C_in * C_out, MAX_SPLIT_K)
    ws = None
    if split_k > 1:
        ws = torch.empty((split_k, 9, C_in, C_out), device=g.device, dtype=torch.float32)
        dst, dst_strides, stride_os = ws, ws.stride()[1:], ws.stride(0)
    else:
        dst, dst_strides, stride_os = out, out.stride(), 0
    scale, shift = norm if norm is not None else (dst, dst)  # never read without X_NORM
    args = (g, x, scale, shift, dst, N, h, w, C_in, C_out, split_k, *g.stride(), *x.stride(), *dst_strides, stride_os)
    flags = {"X_NORM": norm is not None, "INPUT_PRECISION": dot_precision(g.dtype)}

    def run(cfg):
        k = cfg.kwargs
        grid = (9 * cdiv(C_out, k["BLOCK_M"]) * cdiv(C_in, k["BLOCK_N"]), split_k)
        launch(_upconv_nearest2x2_wgrad_kernel, grid, args, {**flags, **launch_meta(cfg)})

    def shape():
        return {
            "C_in": C_in, "C_out": C_out, "SPLIT_K": split_k, "elem": g.element_size(),
            "INPUT_PRECISION": flags["INPUT_PRECISION"],
        }  # fmt: skip

    tuner = _tuner("wgrad", g.element_size(), flags["INPUT_PRECISION"])
    run(tuner.pick(g.device, (g.dtype, C_in, C_out, split_k, *flags.values()), shape, run))
    if ws is not None:
        reduce_splits(ws, out, (1, 9, C_in, C_out), (0, *out.stride()))
    return out


# --------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------

_I32_ARGS = (
    "N", "h", "w", "C_in", "C_out",
    "stride_xn", "stride_xh", "stride_xw", "stride_wt", "stride_wi", "stride_on", "stride_oh", "stride_ow",
)  # fmt: skip
_UNIT_STRIDES = ("stride_xc", "stride_wo", "stride_oc")


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (config, dtype, precision, IN_NORM) the launcher can run on ``arch`` after pruning,
    with bias and ReLU on (the Keras decoder's form).

    The signature describes the fast path: channels_last activations and a packed weight, whose
    unit strides Triton specializes to the constant 1; every other stride and size is an
    ``i32``; bias is fp32. ``extra["attrs"]`` holds the divisibility-by-16 hints the JIT would
    add at U-Net sizes (``ASTSource``'s fourth argument).
    """
    aligned = (
        "x_ptr", "w_ptr", "b_ptr", "out_ptr", "scale_ptr", "shift_ptr", "C_in", "C_out",
        "stride_xn", "stride_xh", "stride_xw", "stride_wt", "stride_wi", "stride_on", "stride_oh", "stride_ow",
    )  # fmt: skip
    attrs = {(_upconv_nearest2x2_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    flags = ("HAS_BIAS", "RELU", "IN_NORM", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K")
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            for in_norm in (False, True):
                for cfg in _tuned_configs("tc", arch, elem, precision, in_norm):
                    signature = {
                        "x_ptr": f"*{tt}",
                        "w_ptr": f"*{tt}",
                        "b_ptr": "*fp32",
                        "out_ptr": f"*{tt}",
                        # the training path's BatchNorm vectors are fp64
                        "scale_ptr": "*fp64" if in_norm else "*fp32",
                        "shift_ptr": "*fp64" if in_norm else "*fp32",
                        **{n: "i32" for n in _I32_ARGS},
                        **{n: "constexpr" for n in _UNIT_STRIDES + flags},
                    }
                    constexprs = {
                        **{n: 1 for n in _UNIT_STRIDES},
                        "HAS_BIAS": True,
                        "RELU": True,
                        "IN_NORM": in_norm,
                        "INPUT_PRECISION": precision,
                        **cfg.kwargs,
                    }
                    fp32 = dtype == torch.float32
                    label = f"fp32-{precision}" if fp32 else tt
                    specs.append(
                        KernelSpec(
                            kernel="_upconv_nearest2x2_kernel",
                            fn=_upconv_nearest2x2_kernel,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            dtype=tt,
                            config=_config_name(cfg) + (f"_{precision}" if fp32 else "") + ("_norm" if in_norm else ""),
                            extra={
                                "precision": precision if fp32 else None,
                                "label": label,
                                "smem_estimate": _smem_bytes(cfg, elem, in_norm),
                                # 16-bit and TF32 dots run on wgmma on Hopper; IEEE fp32 on FMA.
                                "expect_hgmma": tuned_arch(arch) == 90 and label != "fp32-ieee",
                                "attrs": attrs,
                            },
                        )
                    )
    return specs + _dgrad_specs(arch) + _wgrad_specs(arch)


_DGRAD_I32_ARGS = (
    "N", "h", "w", "C_in", "C_out",
    "stride_gn", "stride_gh", "stride_gw", "stride_wt", "stride_wo", "stride_on", "stride_oh", "stride_ow",
)  # fmt: skip
_DGRAD_UNIT_STRIDES = ("stride_gc", "stride_wi", "stride_oc")


def _dgrad_specs(arch: int) -> list[KernelSpec]:
    """The input-gradient kernel's specs: channels_last g and out, weight stored ``[9, C_out, C_in]``."""
    aligned = ("g_ptr", "w_ptr", "out_ptr", "C_in", "C_out", *_DGRAD_I32_ARGS[5:])
    attrs = {(_upconv_nearest2x2_dgrad_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    flags = ("INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K")
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        fp32 = dtype == torch.float32
        for precision in ("tf32", "ieee") if fp32 else ("ieee",):
            label = f"fp32-{precision}" if fp32 else tt
            for cfg in _tuned_configs("dgrad", arch, elem, precision):
                specs.append(
                    KernelSpec(
                        kernel="_upconv_nearest2x2_dgrad_kernel",
                        fn=_upconv_nearest2x2_dgrad_kernel,
                        signature={
                            "g_ptr": f"*{tt}",
                            "w_ptr": f"*{tt}",
                            "out_ptr": f"*{tt}",
                            **{n: "i32" for n in _DGRAD_I32_ARGS},
                            **{n: "constexpr" for n in _DGRAD_UNIT_STRIDES + flags},
                        },
                        constexprs={**{n: 1 for n in _DGRAD_UNIT_STRIDES}, "INPUT_PRECISION": precision, **cfg.kwargs},
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        dtype=tt,
                        config=_config_name(cfg) + (f"_{precision}" if fp32 else ""),
                        extra={
                            "precision": precision if fp32 else None,
                            "label": label,
                            "smem_estimate": _smem_bytes(cfg, elem),
                            "expect_hgmma": tuned_arch(arch) == 90 and label != "fp32-ieee",
                            "attrs": attrs,
                        },
                    )
                )
    return specs


_WGRAD_I32_ARGS = (
    "N", "h", "w", "C_in", "C_out", "SPLIT_K",
    "stride_gn", "stride_gh", "stride_gw", "stride_xn", "stride_xh", "stride_xw", "stride_ot", "stride_oi", "stride_os",
)  # fmt: skip
_WGRAD_UNIT_STRIDES = ("stride_gc", "stride_xc", "stride_oo")


def _wgrad_specs(arch: int) -> list[KernelSpec]:
    """The weight-gradient kernel's specs: channels_last g and x, a contiguous fp32 workspace."""
    ragged = ("N", "h", "w", "SPLIT_K")
    aligned = ("g_ptr", "x_ptr", "scale_ptr", "shift_ptr", "out_ptr", *(n for n in _WGRAD_I32_ARGS if n not in ragged))
    attrs = {(_upconv_nearest2x2_wgrad_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    flags = ("X_NORM", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K")
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        fp32 = dtype == torch.float32
        for precision in ("tf32", "ieee") if fp32 else ("ieee",):
            label = f"fp32-{precision}" if fp32 else tt
            for x_norm in (False, True):
                for cfg in _tuned_configs("wgrad", arch, elem, precision):
                    specs.append(
                        KernelSpec(
                            kernel="_upconv_nearest2x2_wgrad_kernel",
                            fn=_upconv_nearest2x2_wgrad_kernel,
                            signature={
                                "g_ptr": f"*{tt}",
                                "x_ptr": f"*{tt}",
                                "scale_ptr": "*fp64" if x_norm else "*fp32",
                                "shift_ptr": "*fp64" if x_norm else "*fp32",
                                "out_ptr": "*fp32",
                                **{n: "i32" for n in _WGRAD_I32_ARGS},
                                **{n: "constexpr" for n in _WGRAD_UNIT_STRIDES + flags},
                            },
                            constexprs={
                                **{n: 1 for n in _WGRAD_UNIT_STRIDES},
                                "X_NORM": x_norm,
                                "INPUT_PRECISION": precision,
                                **cfg.kwargs,
                            },
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            dtype=tt,
                            config=_config_name(cfg) + (f"_{precision}" if fp32 else "") + ("_norm" if x_norm else ""),
                            extra={
                                "precision": precision if fp32 else None,
                                "label": label,
                                "smem_estimate": _smem_bytes(cfg, elem),
                                "expect_hgmma": tuned_arch(arch) == 90 and label != "fp32-ieee",
                                "attrs": attrs,
                            },
                        )
                    )
    return specs
