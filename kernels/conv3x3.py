"""Fused 3x3 convolution (pad 1, stride 1) + per-channel scale/shift + optional ReLU.

One implicit-GEMM Triton kernel, ``_conv3x3_bn_act_kernel``, computes

    y[n, co, h, w] = act(scale[co] * sum_{ci, kh, kw} x[n, ci, h+kh-1, w+kw-1] * wt[co, ci, kh, kw]
                         + shift[co])

with eval-mode BatchNorm and the conv bias folded into ``scale``/``shift`` by the caller. The
GEMM view: M = N*H*W output pixels, N = C_out, K = 9 taps x C_in with the channel fastest. Two
optional fusions ride on the same kernel:

* a second K source ``x2`` (the decoder's ``torch.cat([up, skip], 1)`` without a concat pass);
* the U-Net's 1x1 head (+ sigmoid/softmax) in the epilogue, so the last feature map is never
  written (``conv3x3_bn_act_head``).

Why a second K source instead of a concat. A decoder conv convolves ``cat([up, skip], 1)``; its
reads are the same bytes whichever way the two halves are stored. ``torch.cat`` adds a read
and a write of the whole concatenated tensor: for the 4-level U-Net on one 256x256 image that is
1024x32x32 + 512x64x64 + 256x128x128 + 128x256x256 = 15.7 M elements, so 2 x 15.7 M x 2 B =
63 MB per image in fp16 (about 19 us of H100 HBM time), for nothing. Both fused options move
zero extra bytes: (a) this kernel's two sources, (b) the upsample writing into a channel slice
of a buffer the encoder conv already wrote its skip into. At equal bytes (a) wins on
simplicity: every tensor stays dense and owned by one op, with no buffer planned across the
network and no in-place op for autograd or ``torch.compile`` to track. Its cost is a second
pipelined K loop per tile: one more pipeline fill and drain.

The decoder's first conv of milesial's U-Net convolves ``cat([skip, pad(up(x))])`` where up(x) is
smaller than the skip by a row/column at odd sizes and, in the bilinear variant, is
``interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)``. Materializing it costs a
write and a read of the up-sampled map (4x the low-res map's elements when interpolating, plus
a padded copy); ``conv3x3_up_bn_act`` / ``conv3x3_up_bn_stats`` instead read that source
through a geometry (``UP1``/``UP2``): the pad is the load mask of a shifted window, and the
interpolation is done on the load from four low-res neighbours (which L1/L2 serve: each is
reused by about four output pixels and nine taps). Offline sm_90 SASS (fp16, 64x64x64, 4 warps):
the padded source's K loop issues the plain loop's instructions (209 vs 210 per step); the
bilinear one 998 (25 loads instead of 10, four fp32 tiles), so it is issue-bound and gets
smaller tiles (``_UP_REG_BUDGET``); the fp32 one (64x64x16) 410 vs 157.

Small-M, deep layers may split K across programs (``SPLIT_K``): every split writes its fp32
partial tile to its own slice of a workspace and ``_conv3x3_splitk_epilogue_kernel`` sums the
slices in a fixed order, so the result is deterministic (no atomics).

Launchers: ``pack_conv3x3_weight``, ``conv3x3_bn_act``, ``conv3x3_bn_act_head``,
``conv3x3_bn_stats``, ``conv3x3_up_bn_act``, ``conv3x3_up_bn_stats``; the offline compile report
uses ``compile_specs``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _specs
from . import conv3x3_tma as _tma
from ._common import (
    GemmConfig,
    KernelSpec,
    can_launch,
    cdiv,
    dot_precision,
    gemm_smem,
    interpreting,
    launch,
    next_pow2,
    sm_count,
    smem_limit,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Plans, Tuner, bucket, config_name, forced_config, launch_meta
from .bn_stats import bn_stats_finalize

__all__ = [
    "compile_specs",
    "conv3x3_bn_act",
    "conv3x3_bn_act_head",
    "conv3x3_bn_stats",
    "conv3x3_up_bn_act",
    "conv3x3_up_bn_stats",
    "pack_conv3x3_weight",
]

_INT32_MAX = 2**31 - 1
# Consecutive programs cover GROUP_M row tiles x every column tile, so the activation rows and
# the weight columns they read are both still in L2 when the next program needs them.
GROUP_M = 8
# The head's output channels are unrolled in the epilogue; more classes than this belong in a
# separate 1x1 GEMM.
MAX_HEAD_K = 64
MAX_HEAD_C_OUT = 256
HEAD_ACTIVATIONS = {"none": 0, "sigmoid": 1, "softmax": 2}
# Split-K epilogue tile (elementwise over [M, C_out]; not tuned).
_EPI_BLOCK_M, _EPI_BLOCK_N, _EPI_WARPS, _EPI_STAGES = 64, 64, 4, 1
# Split counts the launcher uses (powers of two: each count is a compiled variant of both kernels).
_SPLIT_COUNTS = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bilinear_tile(
    src_ptr, s_ptr, t_ptr, img_off, uh, uw, c, c_ok, a_mask, ratio_h, ratio_w, low_h, low_w,
    stride_c, stride_h, stride_w, NORM: tl.constexpr,
):  # fmt: skip
    """A ``[BLOCK_M, BLOCK_K]`` tile of U = bilinear x2 (align_corners=True) of the source, in the
    source's dtype, zero where ``a_mask`` is false (the pad and the conv's padding).

    img_off [BLOCK_M] int64 image offsets, uh/uw [BLOCK_M] U coordinates, c/c_ok [BLOCK_K] the
    channels. torch's formula (upsample_bilinear2d): src = dst * ratio, i0 = min(int(src),
    low - 1), i1 = i0 + (i0 < low - 1), l1 = clamp(src - i0, 0, 1), l0 = 1 - l1, and
    out = l0h * (l0w * v00 + l1w * v01) + l1h * (l0w * v10 + l1w * v11) in fp32. With NORM each
    neighbour goes through ``relu(v * s + t)`` first: the network interpolates the activated map.
    """
    # Masked rows may hold negative coordinates: clamp so the index math stays in range (their
    # loads are masked off anyway).
    sh = tl.maximum(uh, 0).to(tl.float32) * ratio_h  # [BLOCK_M]
    sw = tl.maximum(uw, 0).to(tl.float32) * ratio_w  # [BLOCK_M]
    h0 = tl.minimum(sh.to(tl.int32), low_h - 1)
    w0 = tl.minimum(sw.to(tl.int32), low_w - 1)
    h1 = h0 + (h0 < low_h - 1).to(tl.int32)
    w1 = w0 + (w0 < low_w - 1).to(tl.int32)
    # torch's clamp of the weights. The coordinates are finite (ratio = (low - 1) / (2 * low - 1)),
    # so NaN never reaches it; propagating anyway costs nothing (max.NaN.f32, one instruction) and
    # leaves no NaN-dropping max/min in the PTX for ring 2 to explain (3.6 emitted them in every
    # bilinear spec, 3.9 in most).
    lh1 = tl.maximum(sh - h0.to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
    lw1 = tl.maximum(sw - w0.to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
    lh1 = tl.minimum(lh1, 1.0, propagate_nan=tl.PropagateNan.ALL)[:, None]  # [BLOCK_M, 1]
    lw1 = tl.minimum(lw1, 1.0, propagate_nan=tl.PropagateNan.ALL)[:, None]
    lh0 = 1.0 - lh1
    lw0 = 1.0 - lw1
    r0 = img_off + h0.to(tl.int64) * stride_h  # [BLOCK_M]
    r1 = img_off + h1.to(tl.int64) * stride_h
    q0 = w0.to(tl.int64) * stride_w
    q1 = w1.to(tl.int64) * stride_w
    col = (c.to(tl.int64) * stride_c)[None, :]  # [1, BLOCK_K]
    v00 = tl.load(src_ptr + (r0 + q0)[:, None] + col, mask=a_mask, other=0.0).to(tl.float32)
    v01 = tl.load(src_ptr + (r0 + q1)[:, None] + col, mask=a_mask, other=0.0).to(tl.float32)
    v10 = tl.load(src_ptr + (r1 + q0)[:, None] + col, mask=a_mask, other=0.0).to(tl.float32)
    v11 = tl.load(src_ptr + (r1 + q1)[:, None] + col, mask=a_mask, other=0.0).to(tl.float32)
    if NORM:
        s = tl.load(s_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_K]
        t = tl.load(t_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        # ReLU as a select: NaN passes, as in torch.relu.
        v00 = v00 * s + t
        v00 = tl.where(v00 < 0.0, 0.0, v00)
        v01 = v01 * s + t
        v01 = tl.where(v01 < 0.0, 0.0, v01)
        v10 = v10 * s + t
        v10 = tl.where(v10 < 0.0, 0.0, v10)
        v11 = v11 * s + t
        v11 = tl.where(v11 < 0.0, 0.0, v11)
    v = lh0 * (lw0 * v00 + lw1 * v01) + lh1 * (lw0 * v10 + lw1 * v11)  # [BLOCK_M, BLOCK_K]
    # Zero padding after the transform: relu(0 * s + t) is not 0.
    return tl.where(a_mask, v, 0.0).to(src_ptr.dtype.element_ty)


@triton.jit
def _accumulate_source(
    acc,
    src_ptr,
    w_ptr,
    s_ptr,
    t_ptr,
    C,
    c_base,
    k_lo,
    k_hi,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    stride_wo,
    stride_wi,
    stride_wh,
    stride_ww,
    img,
    oh,
    ow,
    m_mask,
    offs_co,
    co_mask,
    H,
    W,
    up_h,
    up_w,
    pad_top,
    pad_left,
    low_h,
    low_w,
    SMALL_C: tl.constexpr,
    DENSE_C: tl.constexpr,
    NORM: tl.constexpr,
    GEO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Add one K source's contribution, iterations ``[k_lo, k_hi)`` of its flat K loop, to acc.

    ``c_base`` is the source's first input channel in the weight (0 for x, C1 for x2).
    General mode: iteration kk covers tap ``kk // cdiv(C, BLOCK_K)`` and one BLOCK_K channel
    block, so each A row is a contiguous channel run (vector loads in NHWC).
    SMALL_C mode: iteration kk covers flat k in [kk*BLOCK_K, (kk+1)*BLOCK_K) of the 9*C taps x
    channels, decoded per k; a 3-channel input then fills a dot instead of wasting 13/16 of it.
    DENSE_C > 0 (with SMALL_C): the source is a dense NHWC tensor of exactly DENSE_C channels
    (the model's zero-padded entry, 16 bytes per pixel); its strides are then compile-time
    multiples of DENSE_C and the channel index a constant-divisor remainder, so each pixel's
    DENSE_C channels of a tap load as one 16-byte vector instead of DENSE_C scalar loads.

    GEO (general mode only; 0 for a source of the output's size): the source is the decoder's
    up-sampled map U, which never exists as a tensor. U is ``up_h x up_w`` and sits at
    (pad_top, pad_left) of the H x W output grid, zero outside (milesial's odd-size pad), so a
    tap reads U[ih - pad_top, iw - pad_left] under that window's mask. GEO == 1: U is the source
    itself (``low_h x low_w`` = ``up_h x up_w``). GEO == 2: U = bilinear x2 (align_corners=True)
    of the ``low_h x low_w`` source, computed on the load from its four neighbours (NORM applied
    to each before interpolating, as the network interpolates the activated map).
    """
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # The pixel part of every A address in int64: a batch of feature maps can exceed 2^31
    # elements even though each index fits in int32.
    if DENSE_C > 0:
        pix_off = ((img.to(tl.int64) * H + oh) * W + ow) * DENSE_C
    elif GEO == 1:
        # The window's origin: U[oh - pad_top, ow - pad_left] (masked where it falls outside).
        pix_off = (
            img.to(tl.int64) * stride_n + (oh - pad_top).to(tl.int64) * stride_h
            + (ow - pad_left).to(tl.int64) * stride_w
        )  # fmt: skip
    elif GEO == 2:
        img_off = img.to(tl.int64) * stride_n  # [BLOCK_M]
        # align_corners=True: U row r samples source row r * (low_h - 1) / (up_h - 1) (up_h =
        # 2 * low_h >= 2), as torch computes it: an fp32 scale times the integer index.
        ratio_h = (low_h - 1).to(tl.float32) / (up_h - 1).to(tl.float32)
        ratio_w = (low_w - 1).to(tl.float32) / (up_w - 1).to(tl.float32)
    else:
        pix_off = img.to(tl.int64) * stride_n + oh.to(tl.int64) * stride_h + ow.to(tl.int64) * stride_w
    w_co = offs_co * stride_wo  # [BLOCK_N]
    n_cb = tl.cdiv(C, BLOCK_K)
    for kk in range(k_lo, k_hi):
        if SMALL_C:
            k = kk * BLOCK_K + offs_k  # [BLOCK_K] flat (tap, ci)
            if DENSE_C > 0:
                k_ok = k < 9 * DENSE_C
                tap = k // DENSE_C
                ci = k % DENSE_C
            else:
                k_ok = k < 9 * C
                tap = k // C
                ci = k - tap * C
            kh = tap // 3
            kw = tap - kh * 3
            ih = oh[:, None] + (kh[None, :] - 1)  # [BLOCK_M, BLOCK_K]
            iw = ow[:, None] + (kw[None, :] - 1)  # [BLOCK_M, BLOCK_K]
            a_mask = m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if DENSE_C > 0:
                tap_off = ((kh - 1) * W + (kw - 1)) * DENSE_C + ci
            else:
                tap_off = (kh - 1) * stride_h + (kw - 1) * stride_w + ci.to(tl.int64) * stride_c
            a_ptrs = src_ptr + pix_off[:, None] + tap_off[None, :]  # [BLOCK_M, BLOCK_K]
            w_k = (c_base + ci) * stride_wi + kh * stride_wh + kw * stride_ww  # [BLOCK_K]
            b_mask = k_ok[:, None] & co_mask[None, :]
            ch, ch_ok = ci, k_ok
        else:
            tap = kk // n_cb
            c = (kk - tap * n_cb) * BLOCK_K + offs_k  # [BLOCK_K] input channels
            c_ok = c < C
            kh = tap // 3
            kw = tap - kh * 3
            ih = oh + (kh - 1)  # [BLOCK_M]
            iw = ow + (kw - 1)  # [BLOCK_M]
            if GEO == 0:
                # Out-of-image taps read as zero: this mask is the padding.
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            else:
                # U's window inside the image: outside it both the odd-size pad and the conv's
                # own padding read as zero (pad_top, pad_left >= 0 and the window fits in H x W).
                uh = ih - pad_top  # [BLOCK_M] row of U
                uw = iw - pad_left  # [BLOCK_M]
                row_ok = m_mask & (uh >= 0) & (uh < up_h) & (uw >= 0) & (uw < up_w)
            a_mask = row_ok[:, None] & c_ok[None, :]
            if GEO != 2:
                row_off = pix_off + ((kh - 1) * stride_h + (kw - 1) * stride_w)  # [BLOCK_M]
                a_ptrs = src_ptr + row_off[:, None] + (c.to(tl.int64) * stride_c)[None, :]
            w_k = (c_base + c) * stride_wi + (kh * stride_wh + kw * stride_ww)  # [BLOCK_K]
            b_mask = c_ok[:, None] & co_mask[None, :]
            ch, ch_ok = c, c_ok
        if GEO == 2:
            a = _bilinear_tile(
                src_ptr, s_ptr, t_ptr, img_off, uh, uw, c, c_ok, a_mask, ratio_h, ratio_w, low_h, low_w,
                stride_c, stride_h, stride_w, NORM,
            )  # fmt: skip
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
            if NORM:
                s = tl.load(s_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
                t = tl.load(t_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
                a_n = a.to(tl.float32) * s[None, :] + t[None, :]
                # ReLU as a select: NaN passes, as in torch.relu (a GPU's max.f32 would make it 0).
                a_n = tl.where(a_n < 0.0, 0.0, a_n)
                a = tl.where(a_mask, a_n, 0.0).to(src_ptr.dtype.element_ty)
        b = tl.load(w_ptr + w_k[:, None] + w_co[None, :], mask=b_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


# The batch size changes with every batch: left unspecialized, one compiled kernel serves them
# all (Triton would otherwise compile again whenever N becomes or stops being 1 or a multiple of
# 16). What scales with it (M, the split-K slice stride M * C_out) stays a multiple of 16 at U-Net
# sizes whatever N is, so its specialization holds across batches and is kept.
_BATCH_ARGS = ("N",)
# The decoder geometry (odd-size pads of 0 or 1, odd map sizes): specializing on 1 or on
# divisibility by 16 would only multiply compiled variants; the index math does not gain from it.
_GEOMETRY_ARGS = ("up_h", "up_w", "pad_top", "pad_left", "low_h", "low_w")


@triton.jit(do_not_specialize=_BATCH_ARGS + _GEOMETRY_ARGS)
def _conv3x3_bn_act_kernel(
    x_ptr,
    x2_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    hw_ptr,
    hb_ptr,
    xs_ptr,
    xt_ptr,
    x2s_ptr,
    x2t_ptr,
    stat_ptr,
    N,
    H,
    W,
    C1,
    C2,
    C_out,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_x2n,
    stride_x2c,
    stride_x2h,
    stride_x2w,
    stride_wo,
    stride_wi,
    stride_wh,
    stride_ww,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    stride_os,
    stride_hk,
    up_h,
    up_w,
    pad_top,
    pad_left,
    low_h,
    low_w,
    HAS_X2: tl.constexpr,
    SMALL_C: tl.constexpr,
    DENSE_C: tl.constexpr,
    NORM1: tl.constexpr,
    NORM2: tl.constexpr,
    UP1: tl.constexpr,
    UP2: tl.constexpr,
    STATS: tl.constexpr,
    RELU: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HEAD_K: tl.constexpr,
    HEAD_KP: tl.constexpr,
    HEAD_ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Implicit-GEMM 3x3 conv (pad 1, stride 1) fused with scale/shift (+ReLU) in the epilogue.

    Fuses: the convolution, the ``torch.cat([x, x2], 1)`` that feeds it (``HAS_X2``: the K loop
    reads channels [0, C1) from x and [C1, C1+C2) from x2), eval BatchNorm + conv bias
    (``scale``, ``shift``), ReLU, and optionally the 1x1 head with its activation. Training:
    the previous layers' BatchNorm+ReLU on the sources' loads (``NORM1``/``NORM2``) and this
    layer's BatchNorm partial statistics in the epilogue (``STATS``).

    Pointers (element strides passed for every tensor, so any layout works; NHWC is the fast
    one because the channel, the GEMM's K, is then contiguous):
        x_ptr     [N, C1, H, W]          x2_ptr [N, C2, H, W] (ignored unless HAS_X2)
        w_ptr     [C_out, C1+C2, 3, 3]   fast when packed with C_out contiguous
        scale_ptr, shift_ptr [C_out] fp32
        out_ptr   [N, C_out, H, W] in the input dtype; with SPLIT_K > 1 an fp32 workspace
                  [SPLIT_K, N, H, W, C_out] (slice stride ``stride_os``) of raw accumulators;
                  with HEAD_K > 0, [N, HEAD_K, H, W] head outputs
        hw_ptr    [HEAD_K, C_out] fp32 (row stride ``stride_hk``), hb_ptr [HEAD_K] fp32
        xs_ptr, xt_ptr [C1] / x2s_ptr, x2t_ptr [C2] fp32: per-channel BatchNorm scale/shift
                  applied with a ReLU to a raw source as it is loaded (NORM1 / NORM2)
        stat_ptr  [3, cdiv(M, BLOCK_M), C_out] fp32 (STATS): per row tile, the mean of the
                  stored outputs as mu0 + corr, and the sum of squared deviations from it

    The decoder's up-sampled source (``UP1`` for x, ``UP2`` for x2; at most one set; general K
    mode only): 1 = that source is ``[N, C, up_h, up_w]``, read zero-padded to H x W with
    ``pad_top`` rows above and ``pad_left`` columns left of it; 2 = that source is the low-res
    ``[N, C, low_h, low_w]`` map and U = its bilinear x2 (align_corners=True, up_h = 2 low_h,
    up_w = 2 low_w), computed on the load, then placed the same way. Neither U nor the padded
    map is ever written. ``up_h`` .. ``low_w`` are ignored when both are 0.

    GEMM: M = N*H*W (< 2^31), N = C_out, K = 9*(C1+C2) ordered (tap, channel), channel fastest.
    FLOPs: 2*N*H*W*9*(C1+C2)*C_out. Minimum bytes moved: (N*H*W*(C1+C2) + 9*(C1+C2)*C_out +
    N*H*W*C_out) * elem_size + 8*C_out (the head writes N*H*W*HEAD_K outputs instead).

    Grid: (cdiv(M, BLOCK_M) * cdiv(C_out, BLOCK_N), SPLIT_K), grouped along M by GROUP_M.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    HW = H * W
    M = N * HW
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels
    m_mask = offs_m < M
    img = offs_m // HW
    rem = offs_m - img * HW
    oh = rem // W
    ow = rem - oh * W
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    co_mask = offs_co < C_out

    # One flat iteration space over both sources; a split takes a contiguous range of it.
    if SMALL_C:
        iters1 = tl.cdiv(9 * C1, BLOCK_K)
        iters2 = tl.cdiv(9 * C2, BLOCK_K)
    else:
        iters1 = 9 * tl.cdiv(C1, BLOCK_K)
        iters2 = 9 * tl.cdiv(C2, BLOCK_K)
    if SPLIT_K > 1:
        total = iters1 + iters2 if HAS_X2 else iters1
        per_split = tl.cdiv(total, SPLIT_K)
        lo = pid_k * per_split
        hi = min(lo + per_split, total)
    else:
        lo = 0
        hi = iters1 + iters2 if HAS_X2 else iters1

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    acc = _accumulate_source(
        acc, x_ptr, w_ptr, xs_ptr, xt_ptr, C1, 0, min(lo, iters1), min(hi, iters1),
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wo, stride_wi, stride_wh, stride_ww,
        img, oh, ow, m_mask, offs_co, co_mask, H, W, up_h, up_w, pad_top, pad_left, low_h, low_w,
        SMALL_C, DENSE_C, NORM1, UP1, DOT_PRECISION, BLOCK_K,
    )  # fmt: skip
    if HAS_X2:
        acc = _accumulate_source(
            acc, x2_ptr, w_ptr, x2s_ptr, x2t_ptr, C2, C1, max(lo, iters1) - iters1, max(hi, iters1) - iters1,
            stride_x2n, stride_x2c, stride_x2h, stride_x2w,
            stride_wo, stride_wi, stride_wh, stride_ww,
            img, oh, ow, m_mask, offs_co, co_mask, H, W, up_h, up_w, pad_top, pad_left, low_h, low_w,
            SMALL_C, 0, NORM2, UP2, DOT_PRECISION, BLOCK_K,
        )  # fmt: skip

    out_row = img.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow  # [BLOCK_M]
    if SPLIT_K > 1:
        # Raw partial sums; the epilogue kernel adds the slices in order and applies scale/shift.
        ws_ptrs = out_ptr + pid_k.to(tl.int64) * stride_os + out_row[:, None] + offs_co[None, :]
        tl.store(ws_ptrs, acc, mask=m_mask[:, None] & co_mask[None, :])
    else:
        # Padded columns load scale = shift = 0, so they stay exactly 0 (the head relies on it).
        scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        y = acc * scale[None, :] + shift[None, :]  # [BLOCK_M, BLOCK_N]
        if RELU:
            # torch.relu keeps NaN; a plain tl.maximum (max.f32) would return 0 for it. max.NaN
            # rather than a select: same registers as max.f32, where the select spilled 64 B
            # (fp32 128x256 tile, sm_80).
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if HEAD_K > 0:
            offs_hk = tl.arange(0, HEAD_KP)  # [HEAD_KP]
            logits = tl.zeros([BLOCK_M, HEAD_KP], dtype=tl.float32)  # [BLOCK_M, HEAD_KP]
            for k in tl.static_range(HEAD_K):
                hw_row = tl.load(hw_ptr + k * stride_hk + offs_co, mask=co_mask, other=0.0)
                s = tl.sum(y * hw_row[None, :], axis=1) + tl.load(hb_ptr + k)  # [BLOCK_M]
                logits = tl.where(offs_hk[None, :] == k, s[:, None], logits)
            if HEAD_ACT == 1:
                logits = tl.sigmoid(logits)
            elif HEAD_ACT == 2:
                logits = tl.where(offs_hk[None, :] < HEAD_K, logits, float("-inf"))
                # tl.max drops NaN on a GPU (max.f32), harmlessly: a NaN logit's exp is NaN, so
                # the row's sum and every output of the row are NaN, as in torch.softmax.
                e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
                logits = e / tl.sum(e, axis=1)[:, None]
            o_ptrs = out_ptr + out_row[:, None] + (offs_hk.to(tl.int64) * stride_oc)[None, :]
            o_mask = m_mask[:, None] & (offs_hk < HEAD_K)[None, :]
            tl.store(o_ptrs, logits.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            o_ptrs = out_ptr + out_row[:, None] + (offs_co.to(tl.int64) * stride_oc)[None, :]
            o_mask = m_mask[:, None] & co_mask[None, :]
            y_out = y.to(out_ptr.dtype.element_ty)
            tl.store(o_ptrs, y_out, mask=o_mask)
            if STATS:
                # BatchNorm batch statistics of exactly what was stored (rounded), as this tile's
                # mean and sum of squared deviations from it (M2), by the corrected two-pass
                # formula: the first mean's rounding error (large when |mean| >> spread) is
                # measured on the centred values and removed, so nothing cancels. The mean is
                # kept as the pair (mu0, corr) because fp32 cannot hold mu0 + corr to the
                # precision the tile-to-tile spread needs. The finalize kernel merges tiles in a
                # fixed order (deterministic, no atomics).
                y_st = tl.where(o_mask, y_out.to(tl.float32), 0.0)  # [BLOCK_M, BLOCK_N]
                cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
                mu0 = tl.sum(y_st, axis=0) / cnt  # [BLOCK_N]
                dev = tl.where(o_mask, y_st - mu0[None, :], 0.0)  # [BLOCK_M, BLOCK_N]
                corr = tl.sum(dev, axis=0) / cnt  # [BLOCK_N]
                # The clamp keeps NaN: a NaN output must give NaN statistics, as in torch.
                t_m2 = tl.maximum(tl.sum(dev * dev, axis=0) - cnt * corr * corr, 0.0, propagate_nan=tl.PropagateNan.ALL)
                st_ptrs = stat_ptr + pid_m.to(tl.int64) * C_out + offs_co
                st_plane = num_pid_m.to(tl.int64) * C_out
                tl.store(st_ptrs, mu0, mask=co_mask)
                tl.store(st_ptrs + st_plane, corr, mask=co_mask)
                tl.store(st_ptrs + 2 * st_plane, t_m2, mask=co_mask)


@triton.jit
def _conv3x3_splitk_epilogue_kernel(
    ws_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    M,
    H,
    W,
    C_out,
    stride_ws,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    SPLIT_K: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = act(scale * sum_s ws[s] + shift) for the split-K path.

    ws_ptr [SPLIT_K, M, C_out] fp32 contiguous (slice stride ``stride_ws``), summed in split
    order so the result does not depend on scheduling; out_ptr [N, C_out, H, W] any strides.
    Moves SPLIT_K*M*C_out*4 + M*C_out*elem_size bytes; no FLOPs worth counting.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask = offs_m < M
    co_mask = offs_co < C_out
    mask = m_mask[:, None] & co_mask[None, :]
    ws_ptrs = ws_ptr + (offs_m.to(tl.int64) * C_out)[:, None] + offs_co[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for _ in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_ws  # pointer steps: no int32 product s * stride_ws to overflow
    scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = acc * scale[None, :] + shift[None, :]
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # torch.relu keeps NaN
    HW = H * W
    img = offs_m // HW
    rem = offs_m - img * HW
    oh = rem // W
    ow = rem - oh * W
    out_row = img.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    o_ptrs = out_ptr + out_row[:, None] + (offs_co.to(tl.int64) * stride_oc)[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


_Cfg = GemmConfig


# Hopper (132 SMs, 227 KiB smem): BLOCK_M >= 64 and 4/8 warps so 16-bit dots lower to wgmma.
# 128x256 for the wide full-resolution layers, 64x64 for the deep ones (1024 channels at H/16
# have few output pixels; smaller tiles mean more programs).
_CONFIGS_SM90 = (
    _Cfg(128, 256, 64, 8, 3),
    _Cfg(128, 128, 64, 8, 3),
    _Cfg(128, 128, 32, 4, 4),
    _Cfg(128, 64, 64, 4, 4),
    _Cfg(64, 128, 64, 4, 4),
    _Cfg(64, 64, 64, 4, 4),
    _Cfg(64, 64, 32, 4, 5),
)
# Ampere (108 SMs, 163 KiB smem): mma.sync tiles, smaller K steps and more stages.
_CONFIGS_SM80 = (
    _Cfg(128, 256, 32, 8, 3),
    _Cfg(128, 128, 32, 8, 4),
    _Cfg(128, 128, 64, 8, 3),
    # 8 warps: on 4, ptxas held this tile at 168 registers and spilled 8-16 B in the 16-bit
    # training forms (triton 3.6, offline sm_80 report; with 3 stages too). On 8 it used at most
    # 128 (3.6) and 140 (3.9) registers in every form, no spill.
    _Cfg(128, 64, 32, 8, 4),
    _Cfg(64, 128, 32, 4, 4),
    _Cfg(64, 64, 64, 4, 3),
    _Cfg(64, 64, 32, 4, 4),
)
# Small-C mode (fewer than 16 input channels, e.g. the RGB input): K = 9*C fits in one or a few
# BLOCK_K steps and every A element is a separate gather (the per-k tap decode defeats vector
# loads), so the A tile, not the accumulator, sets the register budget: short K steps, few stages.
# The gather, not the MMA, bounds them, so both architectures take the same tiles but one.
_SMALLC_CONFIGS_SM90 = (
    _Cfg(128, 64, 32, 4, 2),
    _Cfg(128, 64, 16, 4, 2),
    _Cfg(128, 128, 32, 8, 2),
    _Cfg(64, 64, 32, 4, 3),
    _Cfg(64, 128, 32, 4, 2),
)
# Ampere: the 8-warp tile with K steps of 16, not 32: at 32 triton 3.6's ptxas held it at 128
# registers and spilled 16 B (16-bit, one small-C source; offline sm_80 report), at 16 it did not.
_SMALLC_CONFIGS_SM80 = (
    _Cfg(128, 64, 32, 4, 2),
    _Cfg(128, 64, 16, 4, 2),
    _Cfg(128, 128, 16, 8, 2),
    _Cfg(64, 64, 32, 4, 3),
    _Cfg(64, 128, 32, 4, 2),
)
# Split-K partial kernel: only chosen when even 64x64 tiles leave most SMs idle.
_SPLIT_CONFIGS_SM90 = (
    _Cfg(64, 64, 64, 4, 4),
    _Cfg(64, 128, 64, 4, 4),
    _Cfg(128, 64, 64, 4, 4),
)
_SPLIT_CONFIGS_SM80 = (
    # 2 stages: on 3, triton 3.6's ptxas held it at 128 registers and spilled 20 B (16-bit, two
    # sources); 64x64x32 on 4 warps spilled 24 B in fp32 with triton 3.9 (offline sm_80 reports).
    _Cfg(64, 64, 64, 4, 2),
    _Cfg(64, 128, 32, 4, 4),
    _Cfg(128, 64, 32, 4, 4),
)
# Head variant: one N tile holds every C_out, so BLOCK_N is the smallest of these >= C_out.
_HEAD_CONFIGS_SM90 = (
    _Cfg(128, 64, 64, 8, 3),
    _Cfg(64, 64, 64, 4, 4),
    _Cfg(128, 64, 32, 4, 3),
    _Cfg(128, 128, 64, 8, 3),
    _Cfg(64, 128, 64, 4, 4),
    _Cfg(128, 128, 32, 8, 3),
    _Cfg(128, 256, 64, 8, 3),
    _Cfg(64, 256, 32, 8, 3),
)
_HEAD_CONFIGS_SM80 = (
    _Cfg(128, 64, 32, 8, 3),
    _Cfg(64, 64, 64, 4, 3),
    _Cfg(128, 128, 32, 8, 3),
    _Cfg(64, 128, 32, 8, 3),
    _Cfg(64, 256, 32, 8, 3),
)
# The decoder conv reading an up-sampled source: the main tiles (pruned by ``_fits_up``) and one
# narrow K step for the fp32 bilinear load, whose four fp32 neighbour tiles spill every main tile.
# On sm_80 without the 64-wide K step: 64x64x64 on 4 warps, 3 stages spilled there (offline
# report: fp32 padded 50 spill instructions, fp16 padded training form 10) where every
# 32-wide K step did not.
_UP_EXTRA = (_Cfg(64, 64, 16, 4, 4),)
_CONFIGS = {
    # Then the TMA-fed variant's configs (conv3x3_tma), tuned candidates of the same launches.
    ("main", 90): _tma.with_tma_configs(_CONFIGS_SM90, 90),
    ("main", 80): _CONFIGS_SM80,
    ("up", 90): _CONFIGS_SM90 + _UP_EXTRA,
    ("up", 80): tuple(c for c in _CONFIGS_SM80 if c.BLOCK_K < 64) + _UP_EXTRA,
    ("smallc", 90): _SMALLC_CONFIGS_SM90,
    ("smallc", 80): _SMALLC_CONFIGS_SM80,
    ("split", 90): _SPLIT_CONFIGS_SM90,
    ("split", 80): _SPLIT_CONFIGS_SM80,
    ("head", 90): _HEAD_CONFIGS_SM90,
    ("head", 80): _HEAD_CONFIGS_SM80,
}
# The interpreter runs one small fixed tile: autotuning there would only cost time.
_INTERPRETER_CFG = _Cfg(32, 32, 16, 4, 1)
_HEAD_BLOCK_N = (64, 128, 256)
# Small-C mode never takes wider K steps than this (every head BLOCK_N has such a config).
_SMALL_C_MAX_BLOCK_K = 32


def _smem_need(cfg, elem: int, bilinear: bool, stats: bool) -> int:
    """The shared memory a pick of ``cfg`` may take: the pointer kernel's (a TMA config's tiles
    run there too when TMA cannot read a launch's operands) and, for a TMA config, the TMA
    kernel's."""
    need = conv_smem(_pointer_tiles(cfg), elem, bilinear, stats)
    if _tma.is_tma_config(cfg):
        need = max(need, _tma.tma_smem(cfg, elem, stats))
    return need


def _fits(cfg, arch: int, shape: dict) -> bool:
    """Whether ``cfg`` fits ``arch``'s shared memory for ``shape`` (its statistics form counted
    whenever the shape trains)."""
    stats = shape.get("stats", shape["training"])
    return _smem_need(cfg, shape["elem"], shape.get("bilinear", False), stats) <= smem_limit(arch)


# The training forms transform the A tile in registers (NORM) and reduce the accumulator
# (STATS), so the A tile and the accumulator are live together. Budget in 32-bit registers per
# thread for both, per element size: above it ptxas spilled in the offline report (16-bit:
# 128x256x64 at 8 warps, 144; fp32: 64x128x32 at 4 warps on sm_80, 80), at or below it none did.
# fp32 loads its A tile at twice the registers and converts it for TF32, hence its lower budget.
_TRAINING_REG_BUDGET = {2: 96, 4: 64}


# The statistics epilogue reduces its three per-column partials across warps in shared memory:
# 3 fp32 values per column per warp (sm_90 reports: 3072 B at 64 columns on 4 warps).
_STATS_SMEM_PER_WARP_COL = 12


def _training_regs(cfg: _Cfg, elem_size: int) -> int:
    threads = 32 * cfg.num_warps
    return (cfg.BLOCK_M * cfg.BLOCK_N + cfg.BLOCK_M * cfg.BLOCK_K * elem_size // 4) // threads


def _fits_training(cfg: _Cfg, elem_size: int) -> bool:
    return _training_regs(cfg, elem_size) <= _TRAINING_REG_BUDGET[elem_size]


# The decoder's up-sampled source ("up" tuner): 32-bit registers per thread for the accumulator
# plus the A operand as loaded: one tile in the source dtype when padding, four fp32 neighbour
# tiles when interpolating. Budgets from the offline sm_90 report (ptxas spills above them):
# padding spilled fp32 at 128x64x64 on 4 warps (128: 2 B), and fp16 at 128x256x64 on 8 warps
# (144: 96 B) with triton 3.6 (3.9 did not; 80 and below never did); bilinear spilled fp16 at
# 64x128x64 on 4 warps (192: 14 B) but not at 64x64x64 (160), its training form at 160 (22 B) but
# not at 96, and fp32 already at 64x64x32 (96: 14 B), hence the 64x64x16 tile below.
_UP_REG_BUDGET = {
    # (bilinear, training): {elem_size: budget}
    (False, False): {2: 128, 4: 96},
    (False, True): {2: 128, 4: 96},
    (True, False): {2: 160, 4: 64},
    (True, True): {2: 96, 4: 64},
}


def _up_regs(cfg: _Cfg, elem_size: int, bilinear: bool) -> int:
    threads = 32 * cfg.num_warps
    a = cfg.BLOCK_M * cfg.BLOCK_K * (16 if bilinear else elem_size) // 4
    return (cfg.BLOCK_M * cfg.BLOCK_N + a) // threads


def _fits_up(cfg: _Cfg, elem_size: int, bilinear: bool, training: bool) -> bool:
    return _up_regs(cfg, elem_size, bilinear) <= _UP_REG_BUDGET[(bilinear, training)][elem_size]


# fp32 tiles: the accumulator's words per thread. Above 64 ptxas sat at the 255-register cap:
# 128x128x32 on 4 warps (128) spilled 48 B in the input-gradient form with triton 3.6 (sm_90), and
# 128x256x32 on 8 warps (128) used 255 registers on sm_80 (3.9); 64 never came near.
_FP32_ACC_WORDS = 64


def _fits_fp32(cfg) -> bool:
    return cfg.BLOCK_M * cfg.BLOCK_N <= _FP32_ACC_WORDS * 32 * cfg.num_warps


def _fits_dense(cfg: _Cfg, elem_size: int) -> bool:
    """The dense entry's vector loads hold a whole fp32 A tile in registers: at 64x128 on 4 warps
    ptxas spilled (8 bytes, sm_80, offline report); every other small-C tile fits."""
    return not (elem_size == 4 and cfg.num_warps == 4 and cfg.BLOCK_M * cfg.BLOCK_N > 64 * 64 and cfg.BLOCK_M < 128)


def _head_block_n(c_out: int) -> int:
    return next(b for b in _HEAD_BLOCK_N if b >= c_out)


def _prune(configs, shape: dict, arch: int) -> list:
    """Drop configs that cannot fit in shared memory (or, for the training forms, the register
    budget) or cannot pay off on this shape. ``shape``: ``variant``, ``elem`` (bytes), ``M``
    (bucketed pixels), ``C1``, ``C2``, ``C_out``, ``SMALL_C``, ``training``."""
    elem, c_out, m = shape["elem"], shape["C_out"], shape["M"]
    c_max = max(shape["C1"], shape["C2"])
    fitting = [c for c in configs if _fits(c, arch, shape)]
    if elem == 4:
        fitting = [c for c in fitting if _fits_fp32(c)] or fitting
    if shape["training"]:
        fitting = [c for c in fitting if _fits_training(c, elem)] or fitting
    if shape.get("dense"):
        fitting = [c for c in fitting if _fits_dense(c, elem)] or fitting
    if shape["variant"] == "up":
        fitting = [c for c in fitting if _fits_up(c, elem, shape["bilinear"], shape["training"])] or fitting
    # A tile much taller than M or wider than C_out only multiplies masked zeros.
    m_cap = max(64, next_pow2(m))
    keep = [c for c in fitting if c.BLOCK_M <= m_cap]
    if shape["variant"] == "head":
        keep = [c for c in keep if c.BLOCK_N == _head_block_n(c_out)]
    else:
        n_cap = max(64, next_pow2(c_out))
        keep = [c for c in keep if c.BLOCK_N <= n_cap]
    if shape["SMALL_C"]:
        # Every A element is its own gather here, so wide K steps cost registers (they spill) and
        # multiply padding: K = 9*C is at most 135.
        k_cap = min(_SMALL_C_MAX_BLOCK_K, max(16, next_pow2(9 * c_max)))
        keep = [c for c in keep if c.BLOCK_K <= k_cap] or [c for c in keep if c.BLOCK_K <= _SMALL_C_MAX_BLOCK_K]
    if not keep:  # never empty: the smallest tile that fits (the head's BLOCK_N is not optional)
        keep = fitting or list(configs)
        if shape["variant"] == "head":
            keep = [c for c in keep if c.BLOCK_N >= c_out] or keep
        if shape["SMALL_C"]:
            keep = [c for c in keep if c.BLOCK_K <= _SMALL_C_MAX_BLOCK_K] or keep
        keep = [min(keep, key=lambda c: _smem_need(c, elem, shape.get("bilinear", False), shape["training"]))]
    return keep


def _tiles(cfg: _Cfg, shape: dict) -> int:
    return cdiv(shape["M"], cfg.BLOCK_M) * cdiv(shape["C_out"], cfg.BLOCK_N)


def _interpreter_config(shape: dict) -> _Cfg:
    if shape["variant"] == "head":  # one N tile holds every output channel
        return _INTERPRETER_CFG._replace(BLOCK_N=max(16, next_pow2(shape["C_out"])))
    return _INTERPRETER_CFG


_TUNERS = {
    variant: Tuner(
        f"conv3x3.{variant}",
        {arch: _CONFIGS[(variant, arch)] for arch in (80, 90)},
        _tma.tuned_prune(_prune),
        _tiles,
        _interpreter_config,
    )
    for variant in ("main", "smallc", "split", "head", "up")
}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def pack_conv3x3_weight(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Repack an ``nn.Conv2d`` weight for the kernel's B operand, cast to ``dtype`` (default: its own).

    weight [C_out, C_in, 3, 3] -> a tensor of the same logical shape whose storage is
    ``[3, 3, C_in, C_out]`` contiguous, so the GEMM's B = [K = (tap, ci), N = co] has co
    contiguous. One copy (cast and permute together); plain torch ops, so gradients flow back
    to ``weight``. Do it once per weight.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a [C_out, C_in, 3, 3] weight, got {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    # The strides of a contiguous [3, 3, C_in, C_out] seen as [C_out, C_in, 3, 3]: two torch ops
    # (an allocation and the copy) where allocating the storage order and permuting it took four.
    packed = weight.new_empty_strided(
        (c_out, c_in, 3, 3), (1, c_out, 3 * c_in * c_out, c_in * c_out), dtype=dtype or weight.dtype
    )
    return packed.copy_(weight)


def _check_conv_inputs(x, weight, scale, shift, x2, hw=None):
    """Validate the conv operands; returns (N, C1, C2, H, W, C_out). Raises ValueError/TypeError.

    ``hw``: the output's (H, W) when one source is the decoder's up-sampled map (its own spatial
    size differs; ``_up_operands`` has checked its geometry): the sources' spatial sizes are then
    not compared. On every launch's path: comparisons first, messages only when something is wrong."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(scale, Tensor)):
        for name, t in (("x", x), ("weight", weight), ("scale", scale)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(shift, Tensor):
        raise TypeError(f"shift must be a torch.Tensor, got {type(shift).__name__}")
    if x2 is not None and not isinstance(x2, Tensor):
        raise TypeError(f"x2 must be a torch.Tensor or None, got {type(x2).__name__}")
    triton_dtype(x.dtype)  # raises TypeError for unsupported dtypes
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    n, c1, h, w = x.shape
    if hw is not None:
        h, w = hw
    c2 = 0
    dev = x.device
    if x2 is not None:
        if x2.dtype != x.dtype:
            raise TypeError(f"x2 dtype {x2.dtype} differs from x dtype {x.dtype}")
        if x2.dim() != 4 or x2.shape[0] != n or (hw is None and (x2.shape[2], x2.shape[3]) != (h, w)):
            raise ValueError(f"x2 must be [N, C2, H, W] = [{n}, C2, {h}, {w}], got {tuple(x2.shape)}")
        c2 = x2.shape[1]
        if x2.device != dev:
            raise ValueError(f"x2 is on {x2.device}, expected {dev} like x")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.dim() != 4 or weight.shape[1:] != (c1 + c2, 3, 3):
        raise ValueError(f"weight must be [C_out, C1+C2, 3, 3] = [C_out, {c1 + c2}, 3, 3], got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.shape != (c_out,):
            raise ValueError(f"{name} must be [C_out] = [{c_out}], got {tuple(t.shape)}")
    if min(c1, c_out) < 1 or (x2 is not None and c2 < 1):
        raise ValueError("every channel count must be >= 1")
    # Pixel indices of a whole tile (up to BLOCK_M past M) and weight offsets are int32.
    if n * h * w > _INT32_MAX - 256 or weight.numel() > _INT32_MAX:
        raise ValueError("N*H*W and the weight's element count must stay below 2^31 (int32 GEMM indices)")
    if weight.device != dev or scale.device != dev or shift.device != dev:
        _check_devices([("x", x), ("weight", weight), ("scale", scale), ("shift", shift)])
    if not can_launch(dev):
        _check_devices([("x", x)])
    return n, c1, c2, h, w, c_out


def _check_devices(tensors):
    dev = tensors[0][1].device
    for name, t in tensors:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, expected {dev} like {tensors[0][0]}")
    if not can_launch(dev):
        raise ValueError(
            f"conv3x3 kernels need CUDA tensors (got {dev}); set TRITON_INTERPRET=1 to run "
            "them on CPU through Triton's interpreter"
        )


def _check_out(out, shape, dtype, device):
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out dtype {out.dtype} differs from the input dtype {dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")


def _use_small_c(c1: int, c2: int) -> bool:
    """Flatten K = 9*C when a source has fewer channels than the smallest useful dot K (16):
    per-tap blocks would then be mostly padding."""
    return max(c1, c2) < 16


def _dense_channels(x: Tensor, c1: int, eligible: bool) -> int:
    """C1 when x is a dense NHWC tensor whose pixels are 16 bytes (the model's zero-padded entry:
    8 channels in 16-bit, 4 in fp32), else 0: the kernel's ``DENSE_C`` vector-load mode."""
    if not eligible or c1 * x.element_size() != 16:
        return 0
    n, _, h, w = x.shape
    return c1 if x.stride() == (h * w * c1, 1, w * c1, c1) else 0


def _pick_split_k(device: torch.device, m: int, c_out: int, k_iters: int) -> int:
    """How many K slices: > 1 only if even 64x64 tiles would fill under half of the SMs and every
    slice keeps at least 16 iterations of K (so the workspace round trip stays a small cost)."""
    if interpreting():
        return 1
    sms = sm_count(device)
    tiles = cdiv(m, 64) * cdiv(c_out, 64)
    if 2 * tiles > sms:
        return 1
    split = max(1, min(sms // tiles, k_iters // 16, _SPLIT_COUNTS[-1]))
    return 1 << (split.bit_length() - 1)  # a power of two: one of _SPLIT_COUNTS (or 1)


# Launch plans per operand signature (``_tuning.Plans``): the pick, flags, grid and integer
# arguments of a pointer-kernel launch; a TMA pick is never planned (whether it can run depends
# on the operands' addresses, see ``_tma.runnable``).
_PLANS = Plans()


class _Plan(NamedTuple):
    """What a pointer-kernel launch of ``_launch`` derives from metadata (see ``_PLANS``)."""

    cfg: _Cfg
    grid: tuple
    meta: dict
    ints: tuple  # the kernel's integer arguments after the tensors
    rows: int  # BatchNorm partial rows (one per BLOCK_M rows of pixels)
    workspace: tuple | None  # split-K partial sums' shape, else None
    epilogue: tuple | None  # split-K epilogue (grid, integer arguments, meta), else None


def _launch(
    x, x2, weight, scale, shift, out, dims, *, relu, head=None, split_k=None, norms=(None, None), stats=None, up=None
):
    """Launch the conv kernel with the tuner's config (a fixed small tile in the interpreter).

    ``up``: None, or ``(source, mode, up_h, up_w, pad_top, pad_left, low_h, low_w)`` from
    ``_up_operands``: source 1 (x) or 2 (x2) is the decoder's up-sampled map read through that
    geometry (mode 1: padded, 2: bilinear x2 then padded; the kernel's ``UP1``/``UP2``).
    ``norms``: (scale, shift) or None per source; ``stats``: a callable ``rows -> [3, rows, C_out]``
    fp32 workspace when the epilogue must write BatchNorm partials. Returns ``(out, partials,
    BLOCK_M)`` when ``stats`` is given (BLOCK_M of the config this launch used: the rows per
    partial), else ``out``. Launches on the current CUDA device (the op layer's device guard).
    """
    n, c1, c2, h, w, c_out = dims
    m = n * h * w
    if m == 0:
        return out
    device = x.device
    norm1, norm2 = norms
    hw = head[0] if head is not None else scale
    plan_key = (
        x.dtype, device, dims, x.stride(), None if x2 is None else x2.stride(), weight.stride(), out.stride(),
        hw.stride(0), relu, None if head is None else head[2:], split_k, norm1 is None, norm2 is None, stats is None,
        up, dot_precision(x.dtype),
    )  # fmt: skip
    plan = _PLANS.get(plan_key)
    if plan is not None:
        return _run_plan(plan, x, x2, weight, scale, shift, out, head, norms, stats)
    # The geometry is read per pixel row in the general K mode only (channel runs per tap).
    small_c = up is None and _use_small_c(c1, c2 if x2 is not None else 0)
    if up is None:
        up_src, up_mode, geometry = 0, 0, (h, w, 0, 0, h, w)
    else:
        up_src, up_mode, geometry = up[0], up[1], up[2:]
    x2_strides = x2.stride() if x2 is not None else (0, 0, 0, 0)
    if head is not None:
        head_k, head_act = head[2], head[3]
        split_k = 1
    else:
        head_k, head_act = 0, 0
    if stats is not None:
        split_k = 1  # the partial statistics are taken in the main kernel's epilogue
    if up is not None:
        split_k = 1  # the geometry's register budget is tuned on the "up" tiles only
    if split_k is None:
        k_iters = 9 * cdiv(c1 + c2, 64)
        split_k = _pick_split_k(device, m, c_out, k_iters)
    if head is not None:
        variant = "head"
    else:
        variant = "split" if split_k > 1 else ("smallc" if small_c else ("up" if up is not None else "main"))
    workspace = epilogue = None
    if split_k > 1:
        workspace = (split_k, m, c_out)
        dst_strides, stride_os = (h * w * c_out, 1, w * c_out, c_out), m * c_out
        epilogue = (
            (cdiv(m, _EPI_BLOCK_M), cdiv(c_out, _EPI_BLOCK_N)),
            (m, h, w, c_out, stride_os, *out.stride()),
            dict(
                SPLIT_K=split_k, RELU=relu, BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N, num_warps=_EPI_WARPS,
                num_stages=_EPI_STAGES,
            ),
        )  # fmt: skip
    else:
        dst_strides, stride_os = out.stride(), 0
    flags = dict(
        HAS_X2=x2 is not None, SMALL_C=small_c, DENSE_C=_dense_channels(x, c1, small_c and x2 is None),
        NORM1=norm1 is not None, NORM2=norm2 is not None,
        STATS=stats is not None, RELU=relu and split_k == 1, SPLIT_K=split_k, HEAD_K=head_k,
        HEAD_KP=next_pow2(max(head_k, 1)), HEAD_ACT=head_act,
        DOT_PRECISION=dot_precision(x.dtype), GROUP_M=GROUP_M,
    )  # fmt: skip
    up_flags = {"UP1": up_mode if up_src == 1 else 0, "UP2": up_mode if up_src == 2 else 0}
    ints = (
        n, h, w, c1, c2, c_out, *x.stride(), *x2_strides, *weight.stride(), *dst_strides, stride_os, hw.stride(0),
        *geometry,
    )  # fmt: skip
    m_bucket = bucket(m)

    def plan_for(cfg) -> _Plan:
        grid = (cdiv(m, cfg.BLOCK_M) * cdiv(c_out, cfg.BLOCK_N), split_k)
        meta = {**flags, **up_flags, **launch_meta(cfg)}
        return _Plan(cfg, grid, meta, ints, cdiv(m, cfg.BLOCK_M), workspace, epilogue)

    def shape():
        return {
            "variant": variant, "elem": x.element_size(), "M": m_bucket, "C1": c1, "C2": c2, "C_out": c_out,
            "SMALL_C": small_c, "training": norm1 is not None or norm2 is not None or stats is not None,
            "dense": flags["DENSE_C"] > 0, "bilinear": up_mode == 2,
            **_tma.shape_fields(variant == "main" and up is None, x, x2, weight, out, norms, stats is not None),
        }  # fmt: skip

    timing_ws = []  # the split-K workspace the timed candidates write (made on the first)

    def run(cfg):
        """A launch of the main kernel with ``cfg`` (the tuner times candidates through this)."""
        if _tma.is_tma_config(cfg):
            if up is None and _tma.runnable(cfg, x, x2, weight, out, stats is not None):
                partials = stats(cdiv(m, cfg.BLOCK_M)) if stats is not None else None
                _tma.conv3x3_tma_launch(
                    cfg, x, x2, weight, scale, shift, out, relu=relu, dot_precision=flags["DOT_PRECISION"],
                    norms=norms, partials=partials,
                )  # fmt: skip
                return partials
            tuner = _TUNERS[variant].name
            if forced_config(tuner) == config_name(cfg):
                # A forced config is a test of that kernel: running another would pass it untested.
                raise ValueError(
                    f"{tuner}: forced config {config_name(cfg)} cannot run these operands (the TMA variant "
                    f"needs 16-byte aligned NHWC operands of >= 16 channels, a packed weight, and for the "
                    f"statistics forms a tile geometry of whole rows; {h}x{w} image, stats={stats is not None})"
                )
            cfg = _Cfg(*cfg[:5])  # a TMA pick reused on operands TMA cannot read: same tiles, pointer kernel
        if workspace is not None and not timing_ws:
            timing_ws.append(torch.empty(workspace, device=device, dtype=torch.float32))
        dst = timing_ws[0] if workspace is not None else out
        return _launch_main(plan_for(cfg), x, x2, weight, scale, shift, head, norms, stats, dst)

    key = (x.dtype, m_bucket, c1, c2, c_out, *flags.values())
    if up is not None:  # the plain convs keep their tuning keys
        key += (f"up{up_src}.{up_mode}",)
    tuner = _TUNERS[variant]
    cfg = tuner.pick(device, key, shape, run)
    if _tma.is_tma_config(cfg):
        partials = run(cfg)
        return (out, partials, cfg.BLOCK_M) if stats is not None else out
    plan = plan_for(cfg)
    _PLANS.put(plan_key, tuner, device, key, cfg, plan)
    return _run_plan(plan, x, x2, weight, scale, shift, out, head, norms, stats)


def _launch_main(plan: _Plan, x, x2, weight, scale, shift, head, norms, stats, dst):
    """The main kernel's launch of ``plan`` into ``dst`` (the output, or the split-K workspace);
    returns the BatchNorm partials it wrote (``scale`` when there are none: unread)."""
    norm1, norm2 = norms
    xs, xt = norm1 if norm1 is not None else (scale, shift)
    x2s, x2t = norm2 if norm2 is not None else (scale, shift)
    hw, hb = (head[0], head[1]) if head is not None else (scale, shift)
    partials = stats(plan.rows) if stats is not None else scale
    args = (
        x, x2 if x2 is not None else x, weight, scale, shift, dst, hw, hb, xs, xt, x2s, x2t, partials, *plan.ints
    )  # fmt: skip
    launch(_conv3x3_bn_act_kernel, plan.grid, args, plan.meta)
    return partials


def _run_plan(plan: _Plan, x, x2, weight, scale, shift, out, head, norms, stats):
    """``_launch``'s launches of a pointer-kernel ``plan``: the main kernel (into the split-K
    workspace when there is one, then the split-K epilogue) and ``_launch``'s return value."""
    if plan.workspace is None:
        partials = _launch_main(plan, x, x2, weight, scale, shift, head, norms, stats, out)
    else:
        ws = torch.empty(plan.workspace, device=x.device, dtype=torch.float32)
        partials = _launch_main(plan, x, x2, weight, scale, shift, head, norms, stats, ws)
        grid, ints, meta = plan.epilogue
        launch(_conv3x3_splitk_epilogue_kernel, grid, (ws, scale, shift, out, *ints), meta)
    if stats is not None:
        return out, partials, plan.cfg.BLOCK_M
    return out


def conv3x3_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    x2: Tensor | None = None,
    relu: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """``act(scale * conv3x3(cat([x, x2], 1), weight) + shift)`` in one pass (pad 1, stride 1).

    x      [N, C1, H, W], any strides; NHWC (channels_last) is the fast layout, and a channel
           slice of a larger NHWC buffer is fine.
    x2     optional [N, C2, H, W], same dtype: a second K source read in place of a concat.
    weight [C_out, C1+C2, 3, 3], any strides; ``pack_conv3x3_weight`` gives the fast one.
    scale, shift [C_out] float32 (eval BatchNorm with the conv bias folded in).
    out    optional [N, C_out, H, W] destination with any strides (e.g. a channel slice);
           allocated channels_last in x.dtype when omitted. Returned.

    float32/float16/bfloat16 inputs, fp32 accumulation; fp32 dots use TF32 iff
    ``torch.backends.cudnn.allow_tf32``.
    """
    dims = _check_conv_inputs(x, weight, scale, shift, x2)
    n, _, _, h, w, c_out = dims
    if out is None:
        out = torch.empty((n, c_out, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        _check_out(out, (n, c_out, h, w), x.dtype, x.device)
    return _launch(x, x2, weight, scale, shift, out, dims, relu=relu)


def conv3x3_bn_act_head(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    head_weight: Tensor,
    head_bias: Tensor,
    *,
    activation: str,
    x2: Tensor | None = None,
    relu: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """The conv of ``conv3x3_bn_act`` with the U-Net's 1x1 head fused into its epilogue.

    z = act(scale * conv + shift) [N, C_out, H, W] stays in registers;
    out[n, k, h, w] = head_act(sum_c z[n, c, h, w] * head_weight[k, c] + head_bias[k]).

    head_weight [K, C_out] or [K, C_out, 1, 1] and head_bias [K], any float dtype (used in
    fp32); activation is "none", "sigmoid" or "softmax" (over the K channels). One N tile must
    hold all of C_out, so C_out <= 256. Returns ``out`` [N, K, H, W] (channels_last, x.dtype when
    allocated here).
    """
    dims = _check_conv_inputs(x, weight, scale, shift, x2)
    n, _, _, h, w, c_out = dims
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(HEAD_ACTIVATIONS)}, got {activation!r}")
    if c_out > MAX_HEAD_C_OUT:
        raise ValueError(f"the fused head needs C_out <= {MAX_HEAD_C_OUT} (one tile per pixel), got {c_out}")
    for name, t in (("head_weight", head_weight), ("head_bias", head_bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if head_weight.dim() == 4 and tuple(head_weight.shape[2:]) == (1, 1):
        head_weight = head_weight.reshape(head_weight.shape[0], head_weight.shape[1])
    if head_weight.dim() != 2 or head_weight.shape[1] != c_out:
        raise ValueError(
            f"head_weight must be [K, C_out] or [K, C_out, 1, 1] with C_out = {c_out}, got {tuple(head_weight.shape)}"
        )
    k = head_weight.shape[0]
    if not 1 <= k <= MAX_HEAD_K:
        raise ValueError(f"the fused head supports 1..{MAX_HEAD_K} output channels, got {k}")
    if tuple(head_bias.shape) != (k,):
        raise ValueError(f"head_bias must be [K] = [{k}], got {tuple(head_bias.shape)}")
    _check_devices([("x", x), ("head_weight", head_weight), ("head_bias", head_bias)])
    # A few hundred floats: normalizing here keeps one kernel signature (fp32, rows contiguous).
    head_weight = _fp32_contiguous(head_weight)
    head_bias = _fp32_contiguous(head_bias)
    if out is None:
        out = torch.empty((n, k, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        _check_out(out, (n, k, h, w), x.dtype, x.device)
    head = (head_weight, head_bias, k, HEAD_ACTIVATIONS[activation])
    return _launch(x, x2, weight, scale, shift, out, dims, relu=relu, head=head)


def _fp32_contiguous(t: Tensor) -> Tensor:
    """``t`` as a contiguous fp32 tensor outside autograd: detached only where autograd would
    record the cast (a detach is a torch op; under ``no_grad`` or for a tensor without grad it
    changes nothing the kernel reads)."""
    if t.requires_grad and torch.is_grad_enabled():
        t = t.detach()
    return t.to(torch.float32).contiguous()


def _check_norm(name: str, norm, channels: int, device: torch.device):
    """``norm`` is None or (scale, shift), both fp32 or fp64 [channels] on ``device`` (read as fp32;
    the training path's BatchNorm vectors are fp64)."""
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"{name} must be None or a (scale, shift) pair")
    for part, t in zip(("scale", "shift"), norm, strict=True):
        if not isinstance(t, Tensor) or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} {part} must be a float32 or float64 tensor")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} {part} must be [{channels}], got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} {part} is on {t.device}, expected {device}")
    return tuple(t.contiguous() for t in norm)


def conv3x3_bn_stats(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    x2: Tensor | None = None,
    x_norm: tuple[Tensor, Tensor] | None = None,
    x2_norm: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training conv: ``z = conv3x3(cat([T1(x), T2(x2)], 1), weight) + bias`` and the
    BatchNorm batch statistics of z, in one conv pass plus a tiny finalize kernel.

    x [N, C1, H, W], optional x2 [N, C2, H, W], weight [C_out, C1+C2, 3, 3]: as in
    ``conv3x3_bn_act``. bias [C_out] float32 (zeros for a bias-free conv).
    x_norm / x2_norm: None or (scale, shift) fp32/fp64 [C1] / [C2]: the source is the previous
    layer's raw output and ``T(s) = relu(s * scale + shift)`` (its BatchNorm and ReLU) is applied
    as it is loaded, padding after the transform. Without a norm T is the identity.
    out: optional [N, C_out, H, W] destination (any strides); channels_last x.dtype otherwise.

    Returns ``(z, mean, var)``: z [N, C_out, H, W] in x.dtype, not normalized; mean and biased
    var [C_out] float32 of z *as stored* (after rounding to x.dtype), over N*H*W values,
    deterministic. N*H*W must be >= 1.
    """
    return _bn_stats(x, x2, weight, bias, x_norm, x2_norm, out)


#: (device, C) -> a [C] fp32 tensor of ones: the statistics convs' scale (see ``_unit_scale``).
_UNIT_SCALES: dict[tuple, Tensor] = {}


def _unit_scale(bias: Tensor) -> Tensor:
    """Ones like the 1-d fp32 ``bias`` [C], made once per (device, C) and kept: the kernels only read
    it, so one tensor serves every call and stream (a torch op fewer per training conv). Made afresh,
    not kept, while a CUDA graph is captured: its fill would run only when the graph is replayed.
    On CUDA the fill is waited for once before the tensor is kept: the next reader may be a kernel on
    another stream, which would not wait for this stream's fill."""
    key = (bias.device, bias.shape[0])
    ones = _UNIT_SCALES.get(key)
    if ones is None:
        ones = torch.ones_like(bias)
        if bias.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return ones
            _wait_for_fill(bias.device)
        _UNIT_SCALES[key] = ones
    return ones


def _wait_for_fill(device: torch.device) -> None:
    """Block until ``device``'s current stream has run what was queued on it (once per kept tensor)."""
    torch.cuda.current_stream(device).synchronize()


def _bn_stats(x, x2, weight, bias, x_norm, x2_norm, out, up=None, hw=None):
    """``conv3x3_bn_stats`` (and, with ``up``/``hw`` from ``_up_operands``, ``conv3x3_up_bn_stats``)."""
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.dtype != torch.float32:
        ones = bias  # the scale check reports the dtype
    else:
        ones = _unit_scale(bias) if bias.dim() == 1 else torch.ones_like(bias)
    dims = _check_conv_inputs(x, weight, ones, bias, x2, hw)
    n, c1, c2, h, w, c_out = dims
    if n * h * w == 0:
        raise ValueError("batch statistics need at least one output pixel (N*H*W >= 1)")
    norms = (
        _check_norm("x_norm", x_norm, c1, x.device),
        _check_norm("x2_norm", x2_norm, c2, x.device) if x2 is not None else None,
    )
    if x2 is None and x2_norm is not None:
        raise ValueError("x2_norm given without x2")
    if out is None:
        out = torch.empty((n, c_out, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        _check_out(out, (n, c_out, h, w), x.dtype, x.device)

    def workspace(rows: int) -> Tensor:
        return torch.empty((3, rows, c_out), device=x.device, dtype=torch.float32)

    out, partials, block_m = _launch(
        x, x2, weight, ones, bias, out, dims, relu=False, norms=norms, stats=workspace, up=up
    )  # fmt: skip
    mean, var = bn_stats_finalize(partials, n * h * w, block_m)
    return out, mean, var


# --------------------------------------------------------------------------------------------
# The decoder's first conv: an up-sampled source that never exists
# --------------------------------------------------------------------------------------------


def _up_operands(skip, up, up_first, bilinear):
    """Map ``(skip, up)`` to the kernel's ``(x, x2, up, hw)``: the sources in concat order, the
    geometry tuple ``_launch`` takes (None when U is ``up`` itself at the skip's size: the plain
    two-source conv, whose code and tuning are then exactly ``conv3x3_bn_act``'s) and the output size.

    U = bilinear_x2(up) if ``bilinear`` else up, ``[N, C_up, Hu, Wu]`` with Hu <= H, Wu <= W of
    the skip; milesial's pad puts ``(H - Hu) // 2`` zero rows above it and ``(W - Wu) // 2``
    columns left of it (the rest below / right)."""
    for name, t in (("skip", skip), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(t.shape)}")
    n, _, h, w = skip.shape
    low_h, low_w = up.shape[2], up.shape[3]
    up_h, up_w = (2 * low_h, 2 * low_w) if bilinear else (low_h, low_w)
    if up.shape[0] != n:
        raise ValueError(f"up has batch {up.shape[0]}, skip has {n}")
    if min(low_h, low_w) < 1 or up_h > h or up_w > w:
        what = "bilinear x2 of up" if bilinear else "up"
        raise ValueError(
            f"the {what} must be non-empty and fit in the skip's {h}x{w}, got {up_h}x{up_w} (up {low_h}x{low_w})"
        )
    x, x2 = (up, skip) if up_first else (skip, up)
    if not bilinear and (up_h, up_w) == (h, w):
        return x, x2, None, (h, w)
    geometry = (1 if up_first else 2, 2 if bilinear else 1, up_h, up_w, (h - up_h) // 2, (w - up_w) // 2, low_h, low_w)
    return x, x2, geometry, (h, w)


def conv3x3_up_bn_act(
    skip: Tensor,
    up: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    up_first: bool,
    bilinear: bool,
    relu: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """The decoder's first conv, ``act(scale * conv3x3(cat(...), weight) + shift)``, reading its
    up-sampled half U through a geometry instead of a tensor.

    skip   [N, C_s, H, W]; up [N, C_u, h, w]: the up-sampled source when ``bilinear`` is false
           (h <= H, w <= W), else the low-res map whose bilinear x2 (align_corners=True) is U
           (2h <= H, 2w <= W). Any strides; NHWC is fast, channel slices are fine.
    U is zero-padded to H x W, ``(H - Hu) // 2`` rows on top and ``(W - Wu) // 2`` columns on the
    left (milesial's ``F.pad``), as a load mask; the conv input is ``cat([U, skip])`` if
    ``up_first`` else ``cat([skip, U])``. Neither U nor the padded map is ever written.
    weight [C_out, C_s + C_u, 3, 3] in concat order (``pack_conv3x3_weight`` for speed),
    scale/shift [C_out] float32, out optional [N, C_out, H, W] (channels_last x.dtype when
    omitted). Returns out. Cost over the plain two-source conv: the mask only when padding; four
    loads and a lerp per element of U's K range when bilinear (see ``compile_specs``' tags).
    """
    x, x2, geometry, hw = _up_operands(skip, up, up_first, bilinear)
    dims = _check_conv_inputs(x, weight, scale, shift, x2, hw)
    n, _, _, h, w, c_out = dims
    if out is None:
        out = torch.empty((n, c_out, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        _check_out(out, (n, c_out, h, w), x.dtype, x.device)
    return _launch(x, x2, weight, scale, shift, out, dims, relu=relu, up=geometry)


def conv3x3_up_bn_stats(
    skip: Tensor,
    up: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    up_first: bool,
    bilinear: bool,
    skip_norm: tuple[Tensor, Tensor] | None = None,
    up_norm: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training form of ``conv3x3_up_bn_act``: ``z = conv3x3(cat(...), weight) + bias`` and
    z's BatchNorm batch statistics, as ``conv3x3_bn_stats``.

    skip, up, up_first, bilinear: as in ``conv3x3_up_bn_act``. skip_norm [C_s] / up_norm [C_u]:
    None or (scale, shift) fp32/fp64; ``relu(v * scale + shift)`` is applied to every value read
    (for up: to each low-res neighbour before interpolating, as the network up-samples the
    activated map), the zero padding after it. bias [C_out] float32. Returns ``(z, mean, var)``:
    z [N, C_out, H, W] in x.dtype, mean and biased var [C_out] float32 of z as stored.
    """
    x, x2, geometry, hw = _up_operands(skip, up, up_first, bilinear)
    x_norm, x2_norm = (up_norm, skip_norm) if up_first else (skip_norm, up_norm)
    return _bn_stats(x, x2, weight, bias, x_norm, x2_norm, out, geometry, hw)


# --------------------------------------------------------------------------------------------
# Offline compile specs
# --------------------------------------------------------------------------------------------

_ARG_NAMES = tuple(_conv3x3_bn_act_kernel.arg_names)
# In the fast layout (NHWC activations, packed weight) these strides are 1, and Triton's launcher
# specializes an int equal to 1 into a constexpr; the specs do the same so they compile what runs.
_UNIT_STRIDES = ("stride_xc", "stride_x2c", "stride_wo", "stride_oc")


def _spec_signature(fn, dtype: str, out_dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in ("x_ptr", "x2_ptr", "w_ptr"):
                sig[name] = f"*{dtype}"
            elif name == "out_ptr":
                sig[name] = f"*{out_dtype}"
            else:
                sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility_attrs(fn, signature: dict[str, str], not_divisible=()) -> dict:
    """``tt.divisibility=16`` on every pointer and int except ``not_divisible``: what the launcher
    derives for 16-byte aligned NHWC tensors whose channel counts are multiples of 16 (the U-Net's
    inner layers). The batch-dependent ints are left out: the kernel does not specialize them."""
    skip = {*_BATCH_ARGS, *_GEOMETRY_ARGS, *not_divisible}
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] != "constexpr" and name not in skip
    }


class _Form(NamedTuple):
    """One set of the main kernel's flags a launcher passes (what, with the config and the dtype,
    makes a compiled variant). ``up``: (UP1, UP2); head: (HEAD_K, HEAD_ACT)."""

    variant: str
    has_x2: bool = False
    small_c: bool = False
    dense: bool = False
    norm1: bool = False
    norm2: bool = False
    stats: bool = False
    relu: bool = True
    split_k: int = 1
    head: tuple[int, int] = (0, 0)
    up: tuple[int, int] = (0, 0)

    @property
    def training(self) -> bool:
        return self.norm1 or self.norm2 or self.stats

    @property
    def tags(self) -> str:
        if self.variant == "up":
            tags = ["up", "pad" if max(self.up) == 1 else "bilinear"] + (["first"] if self.up[0] else [])
        else:
            tags = [self.variant, "x2" if self.has_x2 else "x", "smallc" if self.small_c else "blockc"]
        tags += ["dense"] if self.dense else []
        tags += [t for t, on in (("norm1", self.norm1), ("norm2", self.norm2), ("stats", self.stats)) if on]
        tags += [f"k{self.split_k}"] if self.split_k > 1 else []
        tags += [f"head{self.head[0]}{_HEAD_ACT_NAMES[self.head[1]]}"] if self.head[0] else []
        tags += ["norelu"] if not (self.relu or self.stats or self.split_k > 1) else []
        return "_".join(tags)


_HEAD_ACT_NAMES = {v: k for k, v in HEAD_ACTIVATIONS.items()}
# What the U-Net's layers launch (tests/test_compile_specs.py records them for every preset).
# Inference: relu on (a layer) or off (the input-gradient conv, a plain conv on dy); training:
# STATS (relu off) with the previous layer's BatchNorm+ReLU on the load of each raw source: the
# encoder's second conv (NORM1), the decoder's first conv reading the raw skip as x2 (NORM2,
# concat up_skip) or as x (NORM1, skip_up), and the first conv of a block on a finished input
# (no norm). The first conv (small C) reads the image, zero-padded to 16-byte pixels (DENSE) or
# as it is. Split-K partials are raw sums (the epilogue kernel applies the ReLU), one form per
# split count the launcher picks. The fused head: 1 class (sigmoid, or none) and 2 classes
# (none, sigmoid, softmax); other class counts compile at their first use. The decoder's
# up-sampled source (milesial's cat([skip, U]): U second): padded or interpolated, inference and
# training (the padded form with the skip normalized: the transpose conv's output is final).
_FORMS = (
    *(_Form("main", relu=relu) for relu in (True, False)),
    _Form("main", has_x2=True),
    *(_Form("main", has_x2=x2, norm1=n1, stats=True, relu=False) for x2 in (False, True) for n1 in (False, True)),
    _Form("main", has_x2=True, norm2=True, stats=True, relu=False),
    *(_Form("smallc", small_c=True, relu=relu) for relu in (True, False)),
    _Form("smallc", has_x2=True, small_c=True),
    _Form("smallc", small_c=True, stats=True, relu=False),
    _Form("smallc", small_c=True, dense=True),
    _Form("smallc", small_c=True, dense=True, stats=True, relu=False),
    *(_Form("split", has_x2=x2, relu=False, split_k=k) for x2 in (False, True) for k in (2, 4, 8)),
    *(_Form("head", head=h) for h in ((1, 1), (1, 0), (2, 0), (2, 1), (2, 2))),
    _Form("head", small_c=True, head=(1, 1)),
    *(_Form("up", has_x2=True, up=(0, mode)) for mode in (1, 2)),
    _Form("up", has_x2=True, up=(0, 1), norm1=True, stats=True, relu=False),
    _Form("up", has_x2=True, up=(0, 2), norm1=True, norm2=True, stats=True, relu=False),
)


def main_forms() -> tuple[_Form, ...]:
    """The main variant's forms: the TMA kernel (``conv3x3_tma.compile_specs``) runs them too."""
    return tuple(f for f in _FORMS if f.variant == "main")


# The pixel buckets and channel counts the spec generator shows the tuners (``_specs``): every
# threshold of ``_prune`` (tile heights up to 256 pixels, C_out against BLOCK_N and the head's
# widths, 9 * C against the small-C K step) falls inside them.
_SPEC_PIXELS = (1, 32, 64, 128, 256, 512, 1 << 16, 1 << 26)
_SPEC_CHANNELS = (*_specs.SMALL_CHANNELS, 16, 33, 64, 65, 128, 129, 256, 257, 1024)


def _prune_shapes(form: _Form, elem: int, tma: bool):
    """Every prune dict ``_launch`` can build for ``form`` (``tma``: with TMA-readable operands
    and a tile geometry for every BLOCK_M)."""
    base = {
        "variant": form.variant, "elem": elem, "SMALL_C": form.small_c, "training": form.training,
        "dense": form.dense, "bilinear": max(form.up) == 2, "tma": tma, "norm1": form.norm1,
        "norm2": form.norm2, "stats": form.stats, "geometry": dict.fromkeys(_tma.BLOCK_MS, tma),
    }  # fmt: skip
    channels = [c for c in _SPEC_CHANNELS if (c < 16) == form.small_c][:4]  # C1 only counts below 16
    c_outs = [c for c in _SPEC_CHANNELS if form.variant != "head" or c <= MAX_HEAD_C_OUT]
    return _specs.shape_grid(
        base, M=_SPEC_PIXELS, C1=channels, C_out=c_outs, C2=lambda s: s["C1"] if form.has_x2 else 0
    )


def _pointer_tiles(cfg) -> _Cfg:
    """The pointer kernel's config for a pick: a TMA config runs its tiles on the pointer kernel
    when a launch of the same key has operands TMA cannot read (``_launch``'s ``run``)."""
    return _Cfg(*cfg[:5])


def tuned_configs(form: _Form, arch: int, elem: int, *, tma: bool = False) -> list:
    """The configs ``form``'s tuner can pick on ``arch`` for ``elem``-byte operands, over every
    shape bucket (``_specs.tuned_configs``); with ``tma`` also the TMA configs of 16-bit launches
    whose operands TMA can read."""
    key = (form.variant, form.small_c, form.dense, form.training, form.norm1, form.norm2, form.stats,
           max(form.up), arch, elem, tma)  # fmt: skip
    hit = _TUNED.get(key)
    if hit is None:
        shapes = [*_prune_shapes(form, elem, False), *(_prune_shapes(form, elem, True) if tma else ())]
        hit = _TUNED[key] = _specs.tuned_configs(_TUNERS[form.variant], arch, shapes)
    return hit


_TUNED: dict[tuple, list] = {}


def conv_smem(cfg, elem: int, bilinear: bool, stats: bool) -> int:
    """The shared memory the pruning allows pointer-kernel config ``cfg``, an upper bound of what
    it compiles to (the offline report checks it against every spec): the A/B pipeline (the
    bilinear A operand as four fp32 neighbour tiles), or the fp32 accumulator staged for the
    epilogue when larger, plus the statistics' cross-warp partials."""
    scratch = _STATS_SMEM_PER_WARP_COL * cfg.BLOCK_N * cfg.num_warps if stats else 0
    return gemm_smem(cfg, 16 if bilinear else elem, elem, out_bytes=4, scratch=scratch)


def _spec(form: _Form, cfg, dtype: str, arch: int) -> KernelSpec:
    fn = _conv3x3_bn_act_kernel
    elem = 4 if dtype == "fp32" else 2
    precision = "tf32" if dtype == "fp32" else "ieee"
    head_k, head_act = form.head
    constexprs = {name: 1 for name in _UNIT_STRIDES}
    constexprs.update(
        HAS_X2=form.has_x2, SMALL_C=form.small_c, DENSE_C=16 // elem if form.dense else 0, NORM1=form.norm1,
        NORM2=form.norm2, UP1=form.up[0], UP2=form.up[1], STATS=form.stats, RELU=form.relu,
        SPLIT_K=form.split_k, HEAD_K=head_k, HEAD_KP=next_pow2(max(head_k, 1)), HEAD_ACT=head_act,
        DOT_PRECISION=precision, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=GROUP_M,
    )  # fmt: skip
    sig = _spec_signature(fn, dtype, "fp32" if form.split_k > 1 else dtype, constexprs)
    # The training path's BatchNorm vectors are fp64 (read as fp32).
    for on, names in ((form.norm1, ("xs_ptr", "xt_ptr")), (form.norm2, ("x2s_ptr", "x2t_ptr"))):
        if on:
            sig.update(dict.fromkeys(names, "*fp64"))
    # Small-C mode runs on few-channel inputs (the RGB image): their channel counts and pixel
    # strides are not multiples of 16; the skip's size is odd at odd inputs.
    ragged = ("C1", "stride_xw", "C2", "stride_x2w") if form.small_c else ("H", "W") if form.variant == "up" else ()
    extra = {
        "attrs": _divisibility_attrs(fn, sig, ragged),
        "variant": form.variant,
        # Every tile here is wgmma-shaped (BLOCK_M >= 64, 4/8 warps).
        "expect_hgmma": arch >= 90 and dtype != "fp32",
        "smem_estimate": conv_smem(cfg, elem, max(form.up) == 2, form.stats),
    }
    if head_act == HEAD_ACTIVATIONS["softmax"]:
        extra["nan_dropping_ok"] = "softmax row max: a NaN logit still makes the row NaN"
    return KernelSpec.of_config(
        fn, cfg, signature=sig, constexprs=constexprs, dtype=dtype, config=f"{cfg.name}_{form.tags}", extra=extra
    )


def _epilogue_spec(dtype: str, split_k: int, relu: bool) -> KernelSpec:
    epi = _conv3x3_splitk_epilogue_kernel
    constexprs = {"stride_oc": 1, "SPLIT_K": split_k, "RELU": relu, "BLOCK_M": _EPI_BLOCK_M, "BLOCK_N": _EPI_BLOCK_N}
    sig = {
        name: (
            "constexpr" if name in constexprs
            else "*fp32" if name in ("ws_ptr", "scale_ptr", "shift_ptr")
            else f"*{dtype}" if name == "out_ptr"
            else "i32"
        )
        for name in epi.arg_names
    }  # fmt: skip
    return KernelSpec(
        kernel=epi.__name__,
        fn=epi,
        signature=sig,
        constexprs=constexprs,
        num_warps=_EPI_WARPS,
        num_stages=_EPI_STAGES,
        dtype=dtype,
        config=f"M{_EPI_BLOCK_M}_N{_EPI_BLOCK_N}_w{_EPI_WARPS}_splitk{split_k}" + ("" if relu else "_norelu"),
        extra={"attrs": _divisibility_attrs(epi, sig), "variant": "split_epilogue", "expect_hgmma": False},
    )


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (config, form, dtype) of the pointer kernel the tuners can pick on ``arch`` (80 or
    90), and the split-K epilogue's forms.

    Forms: ``_FORMS`` (what the U-Net's layers launch); configs: each form's tuner over every shape
    bucket (``tuned_configs``), so the pruning is the tuner's own; on sm_90 the main variant's TMA
    configs appear with their pointer tiles (the fallback for operands TMA cannot read; the TMA
    kernel's own specs are ``conv3x3_tma.compile_specs``). Dtypes fp32 (TF32 dots), fp16, bf16.
    Signatures assume the fast layout: unit channel/C_out strides are constexpr 1 (as the runtime
    specializes them), every other int is ``i32``. ``extra["attrs"]`` holds the divisibility
    attributes of 16-byte aligned operands; ``extra["smem_estimate"]`` what the pruning assumed.
    """
    arch = tuned_arch(arch)
    specs: list[KernelSpec] = []
    for dtype in ("fp32", "fp16", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        for form in _FORMS:
            tma = form.variant == "main" and elem == 2
            tiles = {_pointer_tiles(c): None for c in tuned_configs(form, arch, elem, tma=tma)}
            specs += [_spec(form, cfg, dtype, arch) for cfg in tiles]
        specs += [_epilogue_spec(dtype, k, relu) for k in _SPLIT_COUNTS for relu in (True, False)]
    return specs
