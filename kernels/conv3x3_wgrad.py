"""Weight gradient of a 3x3 convolution (pad 1, stride 1), with BatchNorm+ReLU fused on its input.

``conv3x3_weight_grad`` computes

    dW[co, ci, kh, kw] = sum_{n, h, w} dy[n, co, h, w] * Xin[n, ci, h+kh-1, w+kw-1]

(out-of-image taps are 0) where ``Xin = cat([T1(x), T2(x2)], 1)`` and each ``T`` is either the
identity or ``max(x * scale[c] + shift[c], 0)`` in fp32, rounded to the input dtype. The
transform lets the backward pass of a conv that follows a BatchNorm+ReLU read the
pre-normalization tensor it keeps anyway instead of a materialized activation (one activation
map less to store and read per layer), with the values such an activation would hold in that
dtype (up to the rounding of a fused multiply-add).

GEMM view, one program per ``[BLOCK_M, BLOCK_N]`` output tile:
M = C_out, N = input channels of one tap (or, in small-C mode, the flat ``(tap, ci)`` index of
one source), K = N*H*W pixels. In NHWC both operands are contiguous along M / N, which 16-bit
wgmma reads from shared memory directly.

The output is small (``C_out x 9*C_in``) and K long (up to millions of pixels), so the pixel
range is split across ``SPLIT_K`` programs per tile. Every split writes its fp32 partial to its
own slice of a workspace and ``_conv3x3_wgrad_reduce_kernel`` adds the slices in a fixed order:
the result does not depend on scheduling (no atomics), so two calls give the same bits.

Launcher: ``conv3x3_weight_grad``; the offline compile report uses ``compile_specs``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _specs
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
from ._tuning import Plans, Tuner, launch_meta

__all__ = ["compile_specs", "conv3x3_weight_grad"]

# Pixel indices are int32 in the kernel; the headroom covers the last split's overshoot
# (at most SPLIT_K * BLOCK_K past N*H*W).
_MAX_PIXELS = 2**31 - 2**20
_INT32_MAX = 2**31 - 1
# Splits per tile: at most this many, each with at least _MIN_K_STEPS steps of 64 pixels, and a
# workspace of at most _WS_BYTES; beyond those the reduction costs more than idle SMs do.
_MAX_SPLIT_K = 128
_MIN_K_STEPS = 16
_WS_BYTES = 256 * 2**20
# In the interpreter a fixed split of 2 keeps the workspace and reduction path under test.
_INTERPRETER_SPLIT_K = 2
# Reduction kernel tile (elementwise over C_out * C_in * 9; not tuned).
_RED_BLOCK, _RED_WARPS = 1024, 4


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# Batch-dependent ints stay unspecialized: one compiled kernel serves every batch size.
_BATCH_ARGS = ("N", "SPLIT_K")


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _conv3x3_wgrad_kernel(
    dy_ptr,
    x_ptr,
    x2_ptr,
    scale1_ptr,
    shift1_ptr,
    scale2_ptr,
    shift2_ptr,
    out_ptr,
    N,
    H,
    W,
    C1,
    C2,
    C_out,
    SPLIT_K,
    stride_dyn,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_x2n,
    stride_x2c,
    stride_x2h,
    stride_x2w,
    stride_oo,
    stride_oi,
    stride_oh,
    stride_ow,
    stride_os,
    HAS_X2: tl.constexpr,
    X_NORM: tl.constexpr,
    X2_NORM: tl.constexpr,
    SMALL_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW tile of a 3x3 conv (pad 1, stride 1) over one split of the pixels, input transform fused.

    Fuses: the ``torch.cat([x, x2], 1)`` of the conv input (column tiles past source 1 read x2),
    and per source an optional BatchNorm+ReLU ``max(x * scale + shift, 0)`` applied to the B tile
    in fp32 and rounded to the input dtype before the dot (``X_NORM``, ``X2_NORM``).

    Pointers (element strides passed for every tensor, so any layout works; NHWC is the fast
    one because the channel, the GEMM's M or N, is then contiguous):
        dy_ptr   [N, C_out, H, W]     x_ptr [N, C1, H, W]     x2_ptr [N, C2, H, W] (if HAS_X2)
        scale1_ptr, shift1_ptr [C1] fp32 (if X_NORM); scale2_ptr, shift2_ptr [C2] fp32 (if X2_NORM)
        out_ptr  fp32 [C_out, C1+C2, 3, 3] with strides (stride_oo, stride_oi, stride_oh,
                 stride_ow); with SPLIT_K > 1 a workspace of SPLIT_K such slices, ``stride_os``
                 apart, that ``_conv3x3_wgrad_reduce_kernel`` sums.

    GEMM: M = C_out, N = 9*(C1+C2) as (tap, channel), K = N*H*W pixels (< 2^31).
    General mode: column tile = one tap x one BLOCK_N channel block of one source, so a B row is
    a contiguous channel run and the padding mask is per pixel. SMALL_C mode: a source's columns
    are its flat ``(tap, ci)`` index into 9*C, decoded per column, so a 3-channel input fills a
    dot instead of wasting 13/16 of it.
    FLOPs: 2*N*H*W*9*(C1+C2)*C_out. Minimum bytes moved: N*H*W*(C_out + C1 + C2) * elem_size +
    9*(C1+C2)*C_out*4*SPLIT_K (+ 8*(C1+C2) for the norms); dy tiles are re-read once per column
    tile and x tiles once per row tile, mostly from L2 (all programs of a split sweep the same
    pixel range).

    Grid: (cdiv(C_out, BLOCK_M) * column tiles, SPLIT_K); column tiles are 9*cdiv(C, BLOCK_N)
    per source (cdiv(9*C, BLOCK_N) in SMALL_C mode).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Row tiles vary fastest: neighbouring programs share their x tile (the gathered operand).
    num_pid_m = tl.cdiv(C_out, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    co_mask = offs_co < C_out
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    # Split boundaries fall on BLOCK_K steps, so every split runs whole steps.
    HW = H * W
    P = N * HW
    per_split = tl.cdiv(tl.cdiv(P, BLOCK_K), SPLIT_K) * BLOCK_K
    p_lo = pid_k * per_split
    p_hi = min(p_lo + per_split, P)

    # Which source this program reads. A column tile never straddles the two, so the choice is
    # per program: selecting scalars keeps one loop body (two copies cost registers).
    src_ptr = x_ptr
    C = C1
    c_base = 0
    col = pid_n
    stride_n = stride_xn
    stride_c = stride_xc
    stride_h = stride_xh
    stride_w = stride_xw
    scale_ptr = scale1_ptr
    shift_ptr = shift1_ptr
    norm_on = X_NORM
    if HAS_X2:
        if SMALL_C:
            n1 = tl.cdiv(9 * C1, BLOCK_N)
        else:
            n1 = 9 * tl.cdiv(C1, BLOCK_N)
        on_x2 = pid_n >= n1
        src_ptr = tl.where(on_x2, x2_ptr, x_ptr)
        C = tl.where(on_x2, C2, C1)
        c_base = tl.where(on_x2, C1, 0)
        col = tl.where(on_x2, pid_n - n1, pid_n)
        stride_n = tl.where(on_x2, stride_x2n, stride_xn)
        stride_c = tl.where(on_x2, stride_x2c, stride_xc)
        stride_h = tl.where(on_x2, stride_x2h, stride_xh)
        stride_w = tl.where(on_x2, stride_x2w, stride_xw)
        scale_ptr = tl.where(on_x2, scale2_ptr, scale1_ptr)
        shift_ptr = tl.where(on_x2, shift2_ptr, shift1_ptr)
        norm_on = tl.where(on_x2, X2_NORM, X_NORM)

    if SMALL_C:
        kf = col * BLOCK_N + offs_n  # [BLOCK_N] flat (tap, ci)
        n_ok = kf < 9 * C
        tap = kf // C
        ci = kf - tap * C
        kh = tap // 3
        kw = tap - kh * 3
        # Each column's tap shift from the output pixel, in elements (int64 like every offset).
        col_off = (kh - 1).to(tl.int64) * stride_h + (kw - 1).to(tl.int64) * stride_w + ci.to(tl.int64) * stride_c
    else:
        n_cb = tl.cdiv(C, BLOCK_N)
        tap = col // n_cb
        ci = (col - tap * n_cb) * BLOCK_N + offs_n  # [BLOCK_N]
        n_ok = ci < C
        kh = tap // 3
        kw = tap - kh * 3
        col_off = ci.to(tl.int64) * stride_c  # [BLOCK_N]
    if X_NORM or X2_NORM:
        # A source without a norm gets scale 1, shift 0 and a -inf floor: x*1 + 0 is exact, so
        # both sources share one transform in the loop.
        scale = tl.load(scale_ptr + ci, mask=n_ok & norm_on, other=1.0).to(tl.float32)  # [BLOCK_N]
        shift = tl.load(shift_ptr + ci, mask=n_ok & norm_on, other=0.0).to(tl.float32)  # [BLOCK_N]
        floor = tl.where(norm_on, 0.0, float("-inf"))
    dy_co = offs_co.to(tl.int64) * stride_dyc  # [BLOCK_M]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for p0 in range(p_lo, p_hi, BLOCK_K):
        offs_p = p0 + offs_k  # [BLOCK_K] flat pixels (int32: N*H*W < 2^31)
        p_ok = offs_p < p_hi
        img = offs_p // HW
        rem = offs_p - img * HW
        oh = rem // W
        ow = rem - oh * W
        img64 = img.to(tl.int64)
        dy_pix = img64 * stride_dyn + oh.to(tl.int64) * stride_dyh + ow.to(tl.int64) * stride_dyw  # [BLOCK_K]
        a_mask = co_mask[:, None] & p_ok[None, :]
        a = tl.load(dy_ptr + dy_co[:, None] + dy_pix[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
        if SMALL_C:
            ih = oh[:, None] + (kh[None, :] - 1)  # [BLOCK_K, BLOCK_N]
            iw = ow[:, None] + (kw[None, :] - 1)  # [BLOCK_K, BLOCK_N]
            # This mask is the zero padding (and the ragged pixel / column edges).
            b_mask = p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = img64 * stride_n + oh.to(tl.int64) * stride_h + ow.to(tl.int64) * stride_w  # [BLOCK_K]
        else:
            ih = oh + (kh - 1)  # [BLOCK_K]
            iw = ow + (kw - 1)  # [BLOCK_K]
            row_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_mask = row_ok[:, None] & n_ok[None, :]
            x_pix = img64 * stride_n + ih.to(tl.int64) * stride_h + iw.to(tl.int64) * stride_w  # [BLOCK_K]
        b = tl.load(src_ptr + x_pix[:, None] + col_off[None, :], mask=b_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if X_NORM or X2_NORM:
            # NaN-propagating max, like torch's relu on a materialized activation.
            t = b.to(tl.float32) * scale[None, :] + shift[None, :]  # [BLOCK_K, BLOCK_N]
            t = tl.maximum(t, floor, propagate_nan=tl.PropagateNan.ALL)
            # Padding comes after the transform: an out-of-image tap is 0, not relu(shift).
            b = tl.where(b_mask, t, 0.0).to(src_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if SMALL_C:
        w_col = (c_base + ci).to(tl.int64) * stride_oi + kh * stride_oh + kw * stride_ow  # [BLOCK_N]
    else:
        w_col = (c_base + ci).to(tl.int64) * stride_oi + (kh * stride_oh + kw * stride_ow)  # [BLOCK_N]
    dst_ptr = out_ptr + pid_k.to(tl.int64) * stride_os
    o_ptrs = dst_ptr + (offs_co.to(tl.int64) * stride_oo)[:, None] + w_col[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(o_ptrs, acc, mask=co_mask[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=("SPLIT_K",))
def _conv3x3_wgrad_reduce_kernel(
    ws_ptr,
    out_ptr,
    C_out,
    C_in,
    SPLIT_K,
    stride_ws,
    stride_oo,
    stride_oi,
    stride_oh,
    stride_ow,
    BLOCK: tl.constexpr,
):
    """out[co, ci, kh, kw] = sum_s ws[s, co, ci, kh, kw], slices added in order s = 0, 1, ...

    ws_ptr fp32 [SPLIT_K, C_out, C_in, 3, 3] contiguous per slice (slices ``stride_ws`` apart);
    out_ptr fp32 [C_out, C_in, 3, 3], any strides. The fixed order makes the sum independent of
    scheduling. Moves (SPLIT_K + 1) * C_out*C_in*9*4 bytes; no FLOPs worth counting.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat (co, ci, tap), < 2^31
    mask = offs < C_out * C_in * 9
    ws_ptrs = ws_ptr + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # [BLOCK]
    for _ in range(SPLIT_K):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_ws  # pointer steps: no int32 product s * stride_ws to overflow
    co = offs // (C_in * 9)
    rem = offs - co * (C_in * 9)
    ci = rem // 9
    tap = rem - ci * 9
    kh = tap // 3
    kw = tap - kh * 3
    o_off = co.to(tl.int64) * stride_oo + ci.to(tl.int64) * stride_oi + kh * stride_oh + kw * stride_ow
    tl.store(out_ptr + o_off, acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


_Cfg = GemmConfig


# Hopper: BLOCK_M >= 64 and 4/8 warps so 16-bit (and TF32) dots lower to wgmma. With a norm the
# B tile passes through registers ([BLOCK_K, BLOCK_N] fp32 for the transform), so 4-warp tiles
# take K steps of 32 or 64x64 tiles, and 128-wide ones 8 warps: 128x64x64 on 4 warps reached
# 254 registers in TF32 (and 128x256 spilled even on 8). The split count fills the SMs.
_CONFIGS_SM90 = (
    _Cfg(128, 128, 64, 8, 3),
    _Cfg(128, 128, 64, 8, 4),
    _Cfg(128, 64, 32, 4, 4),
    _Cfg(64, 128, 64, 8, 3),
    _Cfg(64, 64, 64, 4, 4),
)
# Ampere: mma.sync tiles, K steps of 32 (64 spilled a few bytes at 64x64 on 4 warps, with a
# norm in 16-bit and without one in TF32), 8 warps where a tile is 128 wide in N.
_CONFIGS_SM80 = (
    _Cfg(128, 128, 32, 8, 4),
    _Cfg(128, 128, 32, 8, 3),
    _Cfg(128, 64, 32, 4, 4),
    # K steps of 16 here: at 32, triton 3.6's ptxas held this tile at 80 registers and spilled
    # 16 B in TF32 with two sources (offline sm_80 report), as upconv2x2_bwd's weight grad did.
    _Cfg(64, 128, 16, 8, 4),
    _Cfg(64, 64, 32, 4, 4),
)
# Small-C mode (fewer than 16 channels per source, e.g. the RGB input): N = 9*C is 9 to 135
# columns, so narrow N tiles; every B element is a gather, which bounds these more than the MMA:
# see ``_fits_small_c``. Ampere keeps K steps of 32 here too (64 spilled in TF32 with x2).
_SMALLC_CONFIGS_SM90 = (
    _Cfg(64, 32, 32, 4, 3),
    _Cfg(64, 16, 64, 4, 3),
    _Cfg(128, 32, 64, 8, 3),
    _Cfg(64, 64, 16, 4, 3),
    _Cfg(128, 64, 32, 8, 3),
)
_SMALLC_CONFIGS_SM80 = (
    # 2 stages: at 3, triton 3.6's ptxas spilled 12 B (128 registers) in TF32 with two sources.
    _Cfg(64, 32, 32, 4, 2),
    _Cfg(64, 16, 32, 4, 3),
    _Cfg(128, 32, 32, 8, 3),
    _Cfg(64, 64, 16, 4, 3),
    _Cfg(128, 64, 32, 8, 3),
)
# Small-C registers per thread (32-bit words): the gathered B tile (transformed in fp32 with a
# norm) and the accumulator. triton 3.6 (the GPU image's) spilled 8 to 400 B on every small-C
# tile above either budget on sm_90: B at 16 words (64x32x64 and 64x64x32 on 4 warps, 128x128x32
# on 8) and the accumulator at 64 (128x128x16 IEEE on 8 warps), where 3.9 compiled them clean;
# none at or below (the most: 169 registers).
_SMALL_C_B_WORDS, _SMALL_C_ACC_WORDS = 8, 32
# fp32 with allow_tf32=False: tl.dot runs on FMA units with both operand slices in registers.
# One stage: the B tile passes through registers for the transform, so deeper pipelines hold
# the prefetched tiles there too and spill (64x64x32 with a norm: 90 registers at 1 stage,
# 1 KiB of spills at 2, on sm_90).
_IEEE_CONFIGS_SM90 = (
    _Cfg(128, 128, 16, 8, 1),
    _Cfg(128, 64, 32, 8, 1),
    _Cfg(64, 64, 32, 4, 1),
)
# Ampere without the 128x64 tile: ptxas held it at 80 registers on 8 warps and spilled (K steps
# of 32: 8 B with a norm, triton 3.6; of 16: 16-44 B without, 3.6 and 3.9), and on 4 warps it
# sat at the 255-register cap with 48-612 B of spills (offline sm_80 reports). 64x32 is the
# tile that fits the small-C budgets in its place (without one every tile was tried there, and
# 128x128x16 spilled 16 B at 253 registers with triton 3.6).
_IEEE_CONFIGS_SM80 = (
    _Cfg(128, 128, 16, 8, 1),
    _Cfg(64, 64, 32, 4, 1),
    _Cfg(64, 32, 32, 4, 1),
)
_CONFIGS = {
    ("main", 90): _CONFIGS_SM90,
    ("main", 80): _CONFIGS_SM80,
    ("smallc", 90): _SMALLC_CONFIGS_SM90,
    ("smallc", 80): _SMALLC_CONFIGS_SM80,
    ("ieee", 90): _IEEE_CONFIGS_SM90,
    ("ieee", 80): _IEEE_CONFIGS_SM80,
}
# The interpreter runs one small fixed tile: autotuning there would only cost time.
_INTERPRETER_CFG = _Cfg(16, 16, 16, 4, 1)


def _fits(cfg: _Cfg, arch: int, elem_size: int) -> bool:
    return cfg.smem(elem_size) <= smem_limit(arch)


def _fits_small_c(cfg: _Cfg) -> bool:
    """Whether ``cfg``'s gathered B tile and accumulator fit the small-C register budgets."""
    threads = 32 * cfg.num_warps
    return cfg.BLOCK_K * cfg.BLOCK_N <= _SMALL_C_B_WORDS * threads and cfg.BLOCK_M * cfg.BLOCK_N <= (
        _SMALL_C_ACC_WORDS * threads
    )


def _variant(small_c: bool, precision: str, elem_size: int) -> str:
    if elem_size == 4 and precision == "ieee":
        return "ieee"
    return "smallc" if small_c else "main"


def _prune(configs, shape: dict, arch: int) -> list:
    """Drop configs that cannot fit in shared memory or only multiply masked zeros here.
    ``shape``: ``elem`` (bytes), ``C1``, ``C2``, ``C_out``, ``SMALL_C``."""
    elem = shape["elem"]
    c_out = shape["C_out"]
    c_max = max(shape["C1"], shape["C2"])
    fitting = [c for c in configs if _fits(c, arch, elem)]
    if shape["SMALL_C"]:
        fitting = [c for c in fitting if _fits_small_c(c)] or fitting
    cols = 9 * c_max if shape["SMALL_C"] else c_max
    m_cap = max(64, next_pow2(c_out))
    n_cap = max(16 if shape["SMALL_C"] else 64, next_pow2(cols))
    keep = [c for c in fitting if c.BLOCK_M <= m_cap and c.BLOCK_N <= n_cap]
    return keep or [min(fitting or list(configs), key=lambda c: c.smem(elem))]


def _tiles(cfg: _Cfg, shape: dict) -> int:
    rows = cdiv(shape["C_out"], cfg.BLOCK_M)
    return rows * _col_tiles(shape["C1"], shape["C2"], shape["SMALL_C"], cfg.BLOCK_N) * shape["SPLIT_K"]


_TUNERS = {
    variant: Tuner(
        f"conv3x3_wgrad.{variant}",
        {arch: _CONFIGS[(variant, arch)] for arch in (80, 90)},
        _prune,
        _tiles,
        lambda shape: _INTERPRETER_CFG,
    )
    for variant in ("main", "smallc", "ieee")
}


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check_activation(name, t, dtype, n, h, w):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} differs from dy dtype {dtype}")
    if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (n, h, w):
        raise ValueError(f"{name} must be [N, C, H, W] = [{n}, C, {h}, {w}] like dy, got {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one channel")


def _check_norm(name, norm, c):
    """Validate ``(scale, shift)``; returns it as two tensors."""
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"{name} must be None or a (scale, shift) tuple of tensors, got {type(norm).__name__}")
    for part, t in zip(("scale", "shift"), norm, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} {part} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} {part} must be float32 or float64 (read as fp32), got {t.dtype}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} {part} must be [{c}] (one per channel), got {tuple(t.shape)}")
    return norm[0], norm[1]


def _check_inputs(dy, x, x2, x_norm, x2_norm):
    """Validate the operands; returns (N, C1, C2, H, W, C_out). Raises TypeError/ValueError."""
    if not isinstance(dy, Tensor):
        raise TypeError(f"dy must be a torch.Tensor, got {type(dy).__name__}")
    triton_dtype(dy.dtype)  # raises TypeError for unsupported dtypes
    if dy.dim() != 4:
        raise ValueError(f"dy must be [N, C_out, H, W], got shape {tuple(dy.shape)}")
    n, c_out, h, w = dy.shape
    if c_out < 1:
        raise ValueError("dy must have at least one channel")
    _check_activation("x", x, dy.dtype, n, h, w)
    c1 = x.shape[1]
    c2 = 0
    if x2 is not None:
        _check_activation("x2", x2, dy.dtype, n, h, w)
        c2 = x2.shape[1]
    if x_norm is not None:
        _check_norm("x_norm", x_norm, c1)
    if x2_norm is not None:
        if x2 is None:
            raise ValueError("x2_norm given without x2")
        _check_norm("x2_norm", x2_norm, c2)
    if n * h * w > _MAX_PIXELS or c_out * (c1 + c2) * 9 > _INT32_MAX:
        raise ValueError("N*H*W and C_out*(C1+C2)*9 must stay below 2^31 (int32 GEMM indices)")
    tensors = [("dy", dy), ("x", x)]
    if x2 is not None:
        tensors.append(("x2", x2))
    for name, norm in (("x_norm", x_norm), ("x2_norm", x2_norm)):
        if norm is not None:
            tensors += [(f"{name} scale", norm[0]), (f"{name} shift", norm[1])]
    for name, t in tensors:
        if t.device != dy.device:
            raise ValueError(f"{name} is on {t.device}, expected {dy.device} like dy")
    if not can_launch(dy.device):
        raise ValueError(
            f"conv3x3 kernels need CUDA tensors (got {dy.device}); set TRITON_INTERPRET=1 to run "
            "them on CPU through Triton's interpreter"
        )
    return n, c1, c2, h, w, c_out


def _use_small_c(c1: int, c2: int) -> bool:
    """Flatten N = 9*C when a source has fewer channels than the smallest useful dot N (16):
    per-tap channel blocks would then be mostly padding."""
    return max(c1, c2) < 16


def _col_tiles(c1: int, c2: int, small_c: bool, block_n: int) -> int:
    if small_c:
        return cdiv(9 * c1, block_n) + cdiv(9 * c2, block_n)
    return 9 * (cdiv(c1, block_n) + cdiv(c2, block_n))


def _pick_split_k(device: torch.device, p: int, c_out: int, c1: int, c2: int, small_c: bool) -> int:
    """How many pixel splits: enough programs for about two per SM at nominal 64x64 tiles, while
    every split keeps at least _MIN_K_STEPS steps of 64 pixels and the workspace stays small."""
    if interpreting():
        return _INTERPRETER_SPLIT_K
    sms = sm_count(device)
    tiles = cdiv(c_out, 64) * _col_tiles(c1, c2, small_c, 64)
    want = cdiv(2 * sms, tiles)
    by_k = cdiv(p, 64) // _MIN_K_STEPS
    by_ws = _WS_BYTES // (4 * 9 * c_out * (c1 + c2))
    return max(1, min(want, by_k, by_ws, _MAX_SPLIT_K))


def conv3x3_weight_grad(
    dy: Tensor,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    x_norm: tuple[Tensor, Tensor] | None = None,
    x2_norm: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weight gradient of ``conv3x3(cat([T1(x), T2(x2)], 1), W)`` (pad 1, stride 1).

    dy      [N, C_out, H, W], the output gradient; float32/float16/bfloat16, any strides
            (channels_last is the fast layout).
    x       [N, C1, H, W], same dtype and device, any strides.
    x2      optional [N, C2, H, W]: a second input source read in place of a concat.
    x_norm, x2_norm  None or ``(scale, shift)`` float32 [C1] / [C2]: the conv input is then
            ``max(x * scale[c] + shift[c], 0)`` computed in fp32 and rounded to x.dtype (what a
            materialized BatchNorm+ReLU output would hold); zero padding applies after it.
    out     optional float32 [C_out, C1+C2, 3, 3] destination with any strides; fully
            overwritten and returned. Allocated contiguous when omitted.

    Returns dW float32 [C_out, C1+C2, 3, 3]: ``dW[co, ci, kh, kw] = sum_{n,h,w} dy[n, co, h, w] *
    Xin[n, ci, h+kh-1, w+kw-1]``, i.e. ``aten.convolution_backward(...)[1]`` of the conv on
    ``Xin``. fp32 accumulation; fp32 dots use TF32 iff ``torch.backends.cudnn.allow_tf32``.
    Deterministic: the pixel splits are summed in a fixed order.
    """
    n, c1, c2, h, w, c_out = _check_inputs(dy, x, x2, x_norm, x2_norm)
    c_in = c1 + c2
    if out is None:
        out = torch.empty((c_out, c_in, 3, 3), device=dy.device, dtype=torch.float32)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (c_out, c_in, 3, 3):
            raise ValueError(f"out must have shape {(c_out, c_in, 3, 3)}, got {tuple(out.shape)}")
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32 (the gradient is accumulated in fp32), got {out.dtype}")
        if out.device != dy.device:
            raise ValueError(f"out is on {out.device}, expected {dy.device}")
    p = n * h * w
    if p == 0:
        return out.zero_()
    # The kernel picks a source's vectors with a select, so both pairs share one dtype.
    if x_norm is not None and x2_norm is not None and len({t.dtype for t in (*x_norm, *x2_norm)}) > 1:
        x_norm = tuple(t.float() for t in x_norm)
        x2_norm = tuple(t.float() for t in x2_norm)
    plan_key = (
        dy.dtype, dy.device, (n, c1, c2, h, w, c_out), dy.stride(), x.stride(), None if x2 is None else x2.stride(),
        out.stride(), x_norm is None, x2_norm is None,
        dot_precision(dy.dtype),
    )  # fmt: skip
    plan = _PLANS.get(plan_key)
    if plan is None:
        plan = _plan(plan_key, dy, x, x2, x_norm, x2_norm, out)
    ws = None
    if plan.workspace is not None:
        ws = torch.empty(plan.workspace, device=dy.device, dtype=torch.float32)
    _launch_main(plan, dy, x, x2, x_norm, x2_norm, ws if ws is not None else out)
    if ws is not None:
        grid, ints, meta = plan.reduce
        launch(_conv3x3_wgrad_reduce_kernel, grid, (ws, out, *ints), meta)
    return out


# Launch plans per operand signature (``_tuning.Plans``): split count, pick, grid, integers.
_PLANS = Plans()


class _Plan(NamedTuple):
    """What a launch of ``conv3x3_weight_grad`` derives from metadata (see ``_PLANS``)."""

    grid: tuple
    meta: dict
    ints: tuple  # the kernel's integer arguments after the tensors
    workspace: tuple | None  # the pixel splits' partial sums' shape, else None
    reduce: tuple | None  # the splits' reduction launch (grid, integer arguments, meta), else None


def _plan(plan_key: tuple, dy, x, x2, x_norm, x2_norm, out) -> _Plan:
    """The launch plan of ``conv3x3_weight_grad`` on these (checked) operands: the tuner's pick
    (timing candidates on them when it must), kept in ``_PLANS`` when the pick is settled."""
    n, c1, c2, h, w, c_out = plan_key[2]
    c_in = c1 + c2
    p = n * h * w
    small_c = _use_small_c(c1, c2)
    split_k = _pick_split_k(dy.device, p, c_out, c1, c2, small_c)
    workspace = reduce = None
    if split_k > 1:
        workspace = (split_k, c_out, c_in, 3, 3)
        dst_strides, stride_os = (c_in * 9, 9, 3, 1), c_out * c_in * 9
        reduce = (
            (cdiv(c_out * c_in * 9, _RED_BLOCK),), (c_out, c_in, split_k, stride_os, *out.stride()),
            dict(BLOCK=_RED_BLOCK, num_warps=_RED_WARPS),
        )  # fmt: skip
    else:
        dst_strides, stride_os = out.stride(), 0
    # Absent operands alias present ones (never read): the signature, strides included, then
    # matches the fast-path specialization whatever is missing.
    x2_t = x2 if x2 is not None else x
    ints = (
        n, h, w, c1, c2, c_out, split_k, *dy.stride(), *x.stride(), *x2_t.stride(), *dst_strides, stride_os,
    )  # fmt: skip
    precision = dot_precision(dy.dtype)
    flags = dict(
        HAS_X2=x2 is not None, X_NORM=x_norm is not None, X2_NORM=x2_norm is not None,
        SMALL_C=small_c, DOT_PRECISION=precision,
    )  # fmt: skip
    variant = _variant(small_c, precision, dy.element_size())

    def plan_for(cfg) -> _Plan:
        grid = (cdiv(c_out, cfg.BLOCK_M) * _col_tiles(c1, c2, small_c, cfg.BLOCK_N), split_k)
        return _Plan(grid, {**flags, **launch_meta(cfg)}, ints, workspace, reduce)

    def shape():
        return {"elem": dy.element_size(), "C1": c1, "C2": c2, "C_out": c_out, "SMALL_C": small_c, "SPLIT_K": split_k}

    timing_dst = []  # what the timed candidates write: the workspace (made on the first) or out

    def run(cfg):
        if not timing_dst:
            timing_dst.append(out if workspace is None else torch.empty(workspace, device=dy.device, dtype=out.dtype))
        _launch_main(plan_for(cfg), dy, x, x2, x_norm, x2_norm, timing_dst[0])

    # The pixel count only sets the split count (part of the key): the tile is chosen by the
    # GEMM's M and N, which are channel counts.
    key = (dy.dtype, c1, c2, c_out, split_k, *flags.values())
    tuner = _TUNERS[variant]
    cfg = tuner.pick(dy.device, key, shape, run)
    plan = plan_for(cfg)
    _PLANS.put(plan_key, tuner, dy.device, key, cfg, plan)
    return plan


def _launch_main(plan: _Plan, dy, x, x2, x_norm, x2_norm, dst) -> None:
    """The weight-gradient kernel's launch of ``plan``, writing ``dst`` (dW or the workspace)."""
    scale1, shift1 = x_norm if x_norm is not None else (x2_norm if x2_norm is not None else (dst, dst))
    scale2, shift2 = x2_norm if x2_norm is not None else (scale1, shift1)
    args = (dy, x, x2 if x2 is not None else x, scale1, shift1, scale2, shift2, dst, *plan.ints)
    launch(_conv3x3_wgrad_kernel, plan.grid, args, plan.meta)


# --------------------------------------------------------------------------------------------
# Offline compile specs
# --------------------------------------------------------------------------------------------

# In the fast layout (NHWC activations, contiguous dW or workspace) these strides are 1, and
# Triton's launcher specializes an int equal to 1 into a constexpr; the specs do the same.
_UNIT_STRIDES = ("stride_dyc", "stride_xc", "stride_x2c", "stride_ow")
# Never multiples of 16: dW's per-channel and per-row strides (9 and 3), and the split count.
_RAGGED = ("N", "SPLIT_K", "stride_oi", "stride_oh")
# Small-C mode runs on few-channel inputs (the RGB image): their channel counts, pixel strides
# and dW's C_in*9 row stride are not multiples of 16 either.
_RAGGED_SMALL_C = ("C1", "stride_xw", "C2", "stride_x2w", "stride_oo")


def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("dy_ptr", "x_ptr", "x2_ptr"):
            sig[name] = f"*{dtype}"
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


def _tuned_configs(arch: int, elem: int, precision: str, small_c: bool) -> list:
    """What the launcher's tuner for this dtype, precision and K mode can pick on ``arch``, over
    every channel count it can be shown (``_specs``; the pixel count only sets the split)."""
    channels = _specs.SMALL_CHANNELS if small_c else _specs.CHANNELS
    shapes = _specs.shape_grid(  # C2: pruning reads max(C1, C2), so C1 covers both
        {"elem": elem, "SMALL_C": small_c, "SPLIT_K": 1, "C2": 0}, C1=channels,
        C_out=(*_specs.SMALL_CHANNELS, *_specs.CHANNELS),
    )  # fmt: skip
    return _specs.tuned_configs(_TUNERS[_variant(small_c, precision, elem)], arch, shapes)


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (kernel, config, dtype) the autotuner can pick on ``arch`` (80 or 90).

    Configs from the tuners (``_tuned_configs``); dtypes fp32 (TF32 dots, and IEEE with its own list), fp16,
    bf16; both K modes; with and without x2, each source with and without its norm; and the
    split reduction. Signatures assume the fast layout (unit channel and dW kw strides are
    constexpr 1, as the runtime specializes them; every other int is ``i32``).
    ``extra["attrs"]`` holds the divisibility attributes of 16-byte aligned operands.
    """
    arch = tuned_arch(arch)
    fn = _conv3x3_wgrad_kernel
    specs: list[KernelSpec] = []
    sources = [(False, xn, False) for xn in (False, True)]
    sources += [(True, xn, x2n) for xn in (False, True) for x2n in (False, True)]
    for dtype in ("fp32", "fp16", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        for precision in ("tf32", "ieee") if dtype == "fp32" else ("ieee",):
            for small_c in (False, True):
                for cfg in _tuned_configs(arch, elem, precision, small_c):
                    for has_x2, x_norm, x2_norm in sources:
                        constexprs = {name: 1 for name in _UNIT_STRIDES}
                        constexprs.update(
                            HAS_X2=has_x2, X_NORM=x_norm, X2_NORM=x2_norm, SMALL_C=small_c,
                            DOT_PRECISION=precision, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                            BLOCK_K=cfg.BLOCK_K,
                        )  # fmt: skip
                        sig = _signature(fn, dtype, constexprs)
                        if x_norm or x2_norm:  # the training path's fp64 BatchNorm vectors
                            sig.update(dict.fromkeys(("scale1_ptr", "shift1_ptr", "scale2_ptr", "shift2_ptr"), "*fp64"))
                        tags = (
                            precision if dtype == "fp32" else "",
                            "smallc" if small_c else "blockc",
                            "x2" if has_x2 else "x",
                            "norm" if x_norm else "",
                            "norm2" if x2_norm else "",
                        )
                        specs.append(
                            KernelSpec(
                                kernel=fn.__name__,
                                fn=fn,
                                signature=sig,
                                constexprs=constexprs,
                                num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages,
                                dtype=dtype,
                                config="_".join([cfg.name, *(t for t in tags if t)]),
                                extra={
                                    "smem_estimate": cfg.smem(elem),
                                    "attrs": _divisibility_attrs(
                                        fn, sig, _RAGGED + (_RAGGED_SMALL_C if small_c else ())
                                    ),
                                    "variant": "smallc" if small_c else "main",
                                    # wgmma needs 16-bit operands, 64-row tiles and whole warpgroups.
                                    "expect_hgmma": arch >= 90
                                    and elem == 2
                                    and cfg.BLOCK_M >= 64
                                    and cfg.num_warps in (4, 8),
                                },
                            )
                        )
    red = _conv3x3_wgrad_reduce_kernel
    constexprs = {"stride_ow": 1, "BLOCK": _RED_BLOCK}
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
                "attrs": _divisibility_attrs(red, sig, ("C_in", "SPLIT_K", "stride_oi", "stride_oh")),
                "variant": "reduce",
                "expect_hgmma": False,  # elementwise: no dot
            },
        )
    )
    return specs
