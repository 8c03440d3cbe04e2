"""Backward of the training path's BatchNorm+ReLU-on-load, alone and behind a 2x2 max-pool.

In training a conv writes its raw pre-BatchNorm output ``z``; whoever reads ``z`` next applies

    T(z)[n, c, h, w] = max(z[n, c, h, w] * scale[c] + shift[c], 0)

in fp32 as it loads ``z`` and rounds the result to ``z.dtype`` (``norm_act.affine_relu``; the
``IN_NORM`` flag of ``maxpool2x2``, ``upconv2x2`` and ``head1x1``). Its backward, given the
gradient ``g`` of ``T(z)`` and with ``mask = not (z*scale + shift <= 0)`` in fp32, is

    dz         = g * mask * scale                 (fp32 math, stored in z's dtype)
    dscale[c]  = sum_{n,h,w} g * mask * z          (fp32)
    dshift[c]  = sum_{n,h,w} g * mask              (fp32)

``affine_relu_backward`` computes exactly that; ``maxpool2x2_backward`` first routes the
gradient of ``maxpool2x2(T(z))`` to each window's argmax (recomputed from ``z``, with torch's
tie and NaN rule), so the pooled tensor is never materialized in either direction.

The per-channel sums are deterministic without atomics: every program writes fp32 partial sums
for its pixel tile into a ``[2, rows, C]`` workspace and ``_sum_partials_kernel`` adds the rows
in a fixed order. A tile of ``BLOCK_P`` pixels owns ``BLOCK_P // P_GRAIN`` rows (its sums in the
first, zeros in the rest), so the workspace is sized before the autotuner picks ``BLOCK_P``.
Repeated calls with the same config give bitwise equal results; two configs may round
differently.

NaN: like torch's ReLU backward (``threshold_backward``: zero where the output is <= 0), the
mask is ``not (relu(z*scale + shift) <= 0)``, so an element whose transform is NaN passes its
gradient on, as it does in the reference model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _specs
from ._common import (
    KernelSpec,
    can_launch,
    cdiv,
    device_arch,
    interpreting,
    launch,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Plans, Tuner, bucket, launch_meta
from .norm_act import affine_relu, check_norm_affine

__all__ = ["affine_relu_backward", "maxpool2x2_backward", "compile_specs"]

# Pixel indices are int32 in the kernels; headroom keeps the last tile's lanes from wrapping.
_MAX_PIXELS = 2**31 - 2**16


@triton.jit
def _store_partials(
    dscale_part_ptr,  # [ROWS, C] fp32, contiguous
    dshift_part_ptr,  # [ROWS, C] fp32, contiguous
    dscale,  # [BLOCK_C] fp32: this tile's sum
    dshift,  # [BLOCK_C] fp32
    pid_p,
    offs_c,  # [BLOCK_C]
    ROWS,
    C,
    BLOCK_P: tl.constexpr,
    P_GRAIN: tl.constexpr,
):
    """Write one pixel tile's sums to the first of its ``BLOCK_P // P_GRAIN`` rows, zeros to the
    others: rows the tile owns but does not fill must not keep stale values from another call."""
    R: tl.constexpr = BLOCK_P // P_GRAIN
    offs_r = tl.arange(0, R)  # [R]
    rows = pid_p.to(tl.int64) * R + offs_r  # [R]
    offs = rows[:, None] * C + offs_c[None, :]  # [R, BLOCK_C]
    mask = (rows < ROWS)[:, None] & (offs_c < C)[None, :]
    first = (offs_r == 0)[:, None]
    tl.store(dscale_part_ptr + offs, tl.where(first, dscale[None, :], 0.0), mask=mask)
    tl.store(dshift_part_ptr + offs, tl.where(first, dshift[None, :], 0.0), mask=mask)


@triton.jit
def _transform_center(scale, shift):
    """Where ``x*scale + shift`` crosses 0, per channel (0 where scale is 0), fp32. For a
    BatchNorm+ReLU it is ``mean - beta/scale``, inside the data: ``sum g*(x - center)`` there
    keeps the digits ``sum g*x`` loses when the mean dwarfs the spread."""
    return tl.where(scale != 0.0, -shift / tl.where(scale != 0.0, scale, 1.0), 0.0)


@triton.jit
def _center(center_ptr, scale, shift, offs_c, mask_c, TRANSFORM_CENTER: tl.constexpr):
    if TRANSFORM_CENTER:
        center = _transform_center(scale, shift)
    else:
        center = tl.load(center_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return center


@triton.jit
def _argmax_step(m, idx, v, k: tl.constexpr):
    # torch's max-pool rule, scanning the window row-major: v takes over when it is larger or
    # NaN, so ties keep the first element and a NaN window routes to its last NaN.
    take = (v > m) | (v != v)
    return tl.where(take, v, m), tl.where(take, k, idx)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("N", "ROWS"))
def _affine_relu_bwd_kernel(
    g_ptr,  # [N, C, H, W], any strides, x's dtype: gradient of T(x)
    x_ptr,  # [N, C, H, W], any strides (channels_last is the fast layout)
    scale_ptr,  # [C] fp32, contiguous
    shift_ptr,  # [C] fp32, contiguous
    center_ptr,  # [C] fp32, contiguous: dscale is taken about it (see the launcher)
    dx_ptr,  # [N, C, H, W], any strides, x's dtype
    dscale_part_ptr,  # [ROWS, C] fp32, contiguous: per-row partial sums of g*mask*(x - center)
    dshift_part_ptr,  # [ROWS, C] fp32, contiguous: per-row partial sums of g*mask
    N,
    C,
    H,
    W,
    ROWS,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_dn,
    stride_dc,
    stride_dh,
    stride_dw,
    TRANSFORM_CENTER: tl.constexpr,  # dscale about where x*scale + shift crosses 0 (center_ptr unused)
    P_GRAIN: tl.constexpr,  # pixels per workspace row; divides BLOCK_P
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dx = g*mask*scale`` and the partial channel sums for one ``[BLOCK_P, BLOCK_C]`` tile.

    FLOPs: about ``6 * N*C*H*W``. Minimum bytes moved: ``3 * N*C*H*W * elem`` (g and x read,
    dx written) plus ``8 * ROWS*C`` for the workspace.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    hw = H * W
    P = N * hw  # < 2**31, checked by the launcher
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] pixel index
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    mask = (offs_p < P)[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]

    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_p // hw).to(tl.int64)
    rem = offs_p % hw
    h_idx = (rem // W).to(tl.int64)
    w_idx = (rem % W).to(tl.int64)

    g_row = n_idx * stride_gn + h_idx * stride_gh + w_idx * stride_gw  # [BLOCK_P]
    x_row = n_idx * stride_xn + h_idx * stride_xh + w_idx * stride_xw
    d_row = n_idx * stride_dn + h_idx * stride_dh + w_idx * stride_dw
    # Masked lanes load g = 0, so they add nothing to the sums below.
    g = tl.load(g_ptr + (g_row[:, None] + offs_c[None, :] * stride_gc), mask=mask, other=0.0)
    x = tl.load(x_ptr + (x_row[:, None] + offs_c[None, :] * stride_xc), mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    center = _center(center_ptr, scale, shift, offs_c, mask_c, TRANSFORM_CENTER)

    gm = tl.where(affine_relu(x, scale, shift) <= 0.0, 0.0, g.to(tl.float32))  # [BLOCK_P, BLOCK_C]
    tl.store(
        dx_ptr + (d_row[:, None] + offs_c[None, :] * stride_dc),
        (gm * scale[None, :]).to(dx_ptr.dtype.element_ty),
        mask=mask,
    )
    _store_partials(
        dscale_part_ptr,
        dshift_part_ptr,
        tl.sum(gm * (x.to(tl.float32) - center[None, :]), axis=0),
        tl.sum(gm, axis=0),
        pid_p,
        offs_c,
        ROWS,
        C,
        BLOCK_P,
        P_GRAIN,
    )


@triton.jit(do_not_specialize=("N", "ROWS"))
def _maxpool2x2_bwd_kernel(
    g_ptr,  # [N, C, H//2, W//2], any strides, x's dtype: gradient of the pooled output
    x_ptr,  # [N, C, H, W], any strides (channels_last is the fast layout)
    scale_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    shift_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    center_ptr,  # [C] fp32, contiguous (unused unless IN_NORM): dscale is taken about it
    dx_ptr,  # [N, C, H, W], any strides, x's dtype; every element is written
    dscale_part_ptr,  # [ROWS, C] fp32, contiguous (unused unless IN_NORM)
    dshift_part_ptr,  # [ROWS, C] fp32, contiguous (unused unless IN_NORM)
    N,
    C,
    H_out,
    W_out,
    ROWS,
    stride_gn,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_dn,
    stride_dc,
    stride_dh,
    stride_dw,
    IN_NORM: tl.constexpr,  # the forward pooled T(x) rather than x
    TRANSFORM_CENTER: tl.constexpr,  # with IN_NORM: as in _affine_relu_bwd_kernel
    P_GRAIN: tl.constexpr,  # output pixels per workspace row; divides BLOCK_P
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward of ``maxpool2x2(T(x))`` (or of ``maxpool2x2(x)``) for ``BLOCK_P`` output pixels
    (``4 * BLOCK_P`` input pixels) by ``BLOCK_C`` channels.

    FLOPs: about ``(3 + 6*IN_NORM) * N*C*H*W``. Minimum bytes moved:
    ``2.25 * N*C*H*W * elem`` (x read, g read, dx written) plus ``8 * ROWS*C`` with IN_NORM.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    hw_out = H_out * W_out
    P = N * hw_out  # < 2**31, checked by the launcher
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixel index
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    mask = (offs_p < P)[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]

    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_p // hw_out).to(tl.int64)
    rem = offs_p % hw_out
    p_idx = (rem // W_out).to(tl.int64)
    q_idx = (rem % W_out).to(tl.int64)

    x_row = n_idx * stride_xn + (2 * p_idx) * stride_xh + (2 * q_idx) * stride_xw  # [BLOCK_P]
    x_ptrs = x_ptr + (x_row[:, None] + offs_c[None, :] * stride_xc)  # [BLOCK_P, BLOCK_C]
    x00 = tl.load(x_ptrs, mask=mask, other=0.0)
    x01 = tl.load(x_ptrs + stride_xw, mask=mask, other=0.0)
    x10 = tl.load(x_ptrs + stride_xh, mask=mask, other=0.0)
    x11 = tl.load(x_ptrs + stride_xh + stride_xw, mask=mask, other=0.0)
    if IN_NORM:
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        r00 = affine_relu(x00, scale, shift)  # [BLOCK_P, BLOCK_C] fp32
        r01 = affine_relu(x01, scale, shift)
        r10 = affine_relu(x10, scale, shift)
        r11 = affine_relu(x11, scale, shift)
        # The forward pooled T rounded to x's dtype: compare those values so that values tied
        # only after rounding pick the same winner.
        v00 = r00.to(x_ptr.dtype.element_ty)
        v01 = r01.to(x_ptr.dtype.element_ty)
        v10 = r10.to(x_ptr.dtype.element_ty)
        v11 = r11.to(x_ptr.dtype.element_ty)
    else:
        v00 = x00
        v01 = x01
        v10 = x10
        v11 = x11
    m = v00
    idx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)  # [BLOCK_P, BLOCK_C] tap 0..3
    m, idx = _argmax_step(m, idx, v01, 1)
    m, idx = _argmax_step(m, idx, v10, 2)
    m, idx = _argmax_step(m, idx, v11, 3)

    g_row = n_idx * stride_gn + p_idx * stride_gh + q_idx * stride_gw
    g = tl.load(g_ptr + (g_row[:, None] + offs_c[None, :] * stride_gc), mask=mask, other=0.0).to(tl.float32)
    d_row = n_idx * stride_dn + (2 * p_idx) * stride_dh + (2 * q_idx) * stride_dw
    d_ptrs = dx_ptr + (d_row[:, None] + offs_c[None, :] * stride_dc)  # [BLOCK_P, BLOCK_C]
    d_ty = dx_ptr.dtype.element_ty
    g00 = tl.where(idx == 0, g, 0.0)  # [BLOCK_P, BLOCK_C] fp32, routed gradient per tap
    g01 = tl.where(idx == 1, g, 0.0)
    g10 = tl.where(idx == 2, g, 0.0)
    g11 = tl.where(idx == 3, g, 0.0)
    if IN_NORM:
        g00 = tl.where(r00 <= 0.0, 0.0, g00)
        g01 = tl.where(r01 <= 0.0, 0.0, g01)
        g10 = tl.where(r10 <= 0.0, 0.0, g10)
        g11 = tl.where(r11 <= 0.0, 0.0, g11)
        tl.store(d_ptrs, (g00 * scale[None, :]).to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dw, (g01 * scale[None, :]).to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dh, (g10 * scale[None, :]).to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dh + stride_dw, (g11 * scale[None, :]).to(d_ty), mask=mask)
        # At most one tap per window carries gradient, so these sums lose nothing by being
        # formed per tile before the reduction over pixels.
        center = _center(center_ptr, scale, shift, offs_c, mask_c, TRANSFORM_CENTER)[None, :]
        gx = g00 * (x00.to(tl.float32) - center) + g01 * (x01.to(tl.float32) - center)
        gx += g10 * (x10.to(tl.float32) - center) + g11 * (x11.to(tl.float32) - center)
        _store_partials(
            dscale_part_ptr,
            dshift_part_ptr,
            tl.sum(gx, axis=0),
            tl.sum(g00 + g01 + g10 + g11, axis=0),
            pid_p,
            offs_c,
            ROWS,
            C,
            BLOCK_P,
            P_GRAIN,
        )
    else:
        tl.store(d_ptrs, g00.to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dw, g01.to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dh, g10.to(d_ty), mask=mask)
        tl.store(d_ptrs + stride_dh + stride_dw, g11.to(d_ty), mask=mask)


@triton.jit(do_not_specialize=("ROWS",))
def _sum_partials_kernel(
    part_ptr,  # [2, ROWS, C] fp32, contiguous: dscale partials, then dshift partials
    out_ptr,  # [2, C] fp32, contiguous: dscale, dshift
    ROWS,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[j, c] = sum_r part[j, r, c]``, rows added in a fixed order (deterministic).

    Bytes moved: ``8 * ROWS*C`` read, ``8 * C`` written.
    """
    pid_c = tl.program_id(0)
    j = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    plane = part_ptr + j.to(tl.int64) * ROWS * C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # [BLOCK_R, BLOCK_C]
    for r0 in range(0, ROWS, BLOCK_R):
        rows = (r0 + offs_r).to(tl.int64)
        ptrs = plane + (rows[:, None] * C + offs_c[None, :])
        acc += tl.load(ptrs, mask=(rows < ROWS)[:, None] & mask_c[None, :], other=0.0)
    tl.store(out_ptr + j * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit(do_not_specialize=("ROWS",))
def _sum_uncenter_kernel(
    part_ptr,  # [2, ROWS, C] fp32, contiguous: dscale partials about the centre, dshift partials
    scale_ptr,  # [C] fp32 or fp64: the transform the centre is derived from
    shift_ptr,  # [C] fp32 or fp64
    dscale_ptr,  # [C] fp64 out: sum g*mask*x, formed as sum g*mask*(x - center) + center*sum g*mask
    dshift_ptr,  # [C] fp64 out: sum g*mask
    ROWS,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Both partial planes summed in a fixed order (fp32, as ``_sum_partials_kernel``), then the
    centre added back in fp64, where the BatchNorm weight's chain rule can cancel against it.
    Bytes moved: ``8 * ROWS*C`` read, ``16 * C`` written."""
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    plane = ROWS.to(tl.int64) * C
    for r0 in range(0, ROWS, BLOCK_R):
        rows = (r0 + offs_r).to(tl.int64)
        offs = rows[:, None] * C + offs_c[None, :]
        m = (rows < ROWS)[:, None] & mask_c[None, :]
        acc_s += tl.load(part_ptr + offs, mask=m, other=0.0)
        acc_t += tl.load(part_ptr + plane + offs, mask=m, other=0.0)
    dscale_c = tl.sum(acc_s, axis=0)
    dshift = tl.sum(acc_t, axis=0)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    center = _transform_center(scale, shift)
    dscale = dscale_c.to(tl.float64) + center.to(tl.float64) * dshift.to(tl.float64)
    tl.store(dscale_ptr + offs_c, dscale, mask=mask_c)
    tl.store(dshift_ptr + offs_c, dshift.to(tl.float64), mask=mask_c)


# --------------------------------------------------------------------------------------
# Configs: a few per architecture. No loops, so num_stages is irrelevant (1). Tiles of 16 or
# 32 elements per thread: with 32, fp32 sits at about 128 registers (affine) and 160 (pool with
# a norm, which holds four input tiles per output tile, hence its smaller BLOCK_P) without
# spilling; 16 trades bytes in flight for occupancy and the autotuner picks. Every BLOCK_P of a
# list is a multiple of the list's smallest, which is the workspace grain (pixels per row).
# --------------------------------------------------------------------------------------


def _cfg(bp: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


_CONFIGS = {
    "affine_relu": {
        90: [_cfg(64, 64, 4), _cfg(64, 64, 8), _cfg(128, 64, 8), _cfg(64, 128, 8)],
        80: [_cfg(64, 64, 4), _cfg(64, 64, 8), _cfg(128, 64, 8)],
    },
    "maxpool": {
        90: [_cfg(32, 64, 4), _cfg(32, 64, 8), _cfg(64, 64, 8), _cfg(32, 128, 8)],
        80: [_cfg(32, 64, 4), _cfg(32, 64, 8), _cfg(64, 64, 8)],
    },
}

# The interpreter does not autotune; a grain below BLOCK_P exercises the multi-row tiles.
_INTERPRETER_CONFIG = {"BLOCK_P": 16, "BLOCK_C": 16}
_INTERPRETER_GRAIN = 8

# One fixed config for the row sum, so its addition order never depends on tuning.
_SUM_CONFIG = {"BLOCK_R": 64, "BLOCK_C": 32}
_SUM_WARPS = 4
_INTERPRETER_SUM_CONFIG = {"BLOCK_R": 4, "BLOCK_C": 16}

_KERNELS = {"affine_relu": _affine_relu_bwd_kernel, "maxpool": _maxpool2x2_bwd_kernel}
_KERNEL_NAMES = {"affine_relu": "_affine_relu_bwd_kernel", "maxpool": "_maxpool2x2_bwd_kernel"}


def _config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BP{k['BLOCK_P']}_BC{k['BLOCK_C']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _grain(kind: str, arch: int) -> int:
    return min(c.kwargs["BLOCK_P"] for c in _CONFIGS[kind][tuned_arch(arch)])


def _prune_configs(configs, shape: dict, arch: int) -> list:
    # A channel block wider than C only loads masked lanes: prefer one that fits.
    narrow = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= max(shape["C"], 64)]
    return narrow or list(configs)


def _tiles(cfg, shape: dict) -> int:
    return cdiv(shape["P"], cfg.kwargs["BLOCK_P"]) * cdiv(shape["C"], cfg.kwargs["BLOCK_C"])


_TUNERS = {
    kind: Tuner(
        f"norm_act_bwd.{kind}",
        _CONFIGS[kind],
        _prune_configs,
        _tiles,
        lambda shape: triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1),
    )
    for kind in ("affine_relu", "maxpool")
}


def _workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The partial-sum buffer; uninitialized, since the kernels write every row of it."""
    return torch.empty(shape, device=device, dtype=torch.float32)


# Launch plans per operand signature (``_tuning.Plans``): pick, grids, workspace rows.
_PLANS = Plans()


def _launch(kind: str, tensors: tuple, dims: tuple, strides: tuple, with_sums: bool, transform: bool, **flags):
    """Run kernel ``kind`` on ``tensors = (g, x, scale, shift, center, dx)`` with sizes ``dims`` (its
    ``N, C`` and two pixel dims) and the g, x, dx ``strides``. Returns ``(dscale, dshift)`` [C] if
    ``with_sums`` (fp32; fp64 with ``transform``: the centre is the transform's own and is added
    back in fp64, see ``_sum_uncenter_kernel``), else None.

    The workspace is allocated here: its row count follows the grain of the config list in use.
    """
    device = tensors[1].device
    flags["TRANSFORM_CENTER"] = transform
    plan_key = (kind, tensors[1].dtype, device, dims, strides, with_sums, *flags.values())
    plan = _PLANS.get(plan_key)
    if plan is None:
        N, C, d2, d3 = dims
        P = N * d2 * d3
        arch = tuned_arch(device_arch(device))
        grain = _INTERPRETER_GRAIN if interpreting() else _grain(kind, arch)
        rows = cdiv(P, grain) if with_sums else 0
        p_bucket = bucket(P)

        def plan_for(cfg):
            grid = (cdiv(P, cfg.kwargs["BLOCK_P"]), cdiv(C, cfg.kwargs["BLOCK_C"]))
            return grid, {**flags, "P_GRAIN": grain, **launch_meta(cfg)}, rows

        def run(cfg):
            _launch_main(kind, plan_for(cfg), tensors, dims, strides, part)

        part = _workspace((2, rows, C), device) if with_sums else None
        key = (tensors[1].dtype, p_bucket, C, with_sums, *flags.values())
        tuner = _TUNERS[kind]
        cfg = tuner.pick(device, key, lambda: {"P": p_bucket, "C": C}, run)
        plan = plan_for(cfg)
        _PLANS.put(plan_key, tuner, device, key, cfg, plan)
    else:
        part = _workspace((2, plan[2], dims[1]), device) if with_sums else None
    _launch_main(kind, plan, tensors, dims, strides, part)
    if not with_sums:
        return None
    C, rows = dims[1], plan[2]
    cfg = _INTERPRETER_SUM_CONFIG if interpreting() else _SUM_CONFIG
    meta = {**cfg, "num_warps": _SUM_WARPS}
    if transform:
        dscale = torch.empty(C, device=device, dtype=torch.float64)
        dshift = torch.empty_like(dscale)
        uncenter_args = (part, tensors[2], tensors[3], dscale, dshift, rows, C)
        launch(_sum_uncenter_kernel, (cdiv(C, cfg["BLOCK_C"]),), uncenter_args, meta)
        return dscale, dshift
    sums = torch.empty((2, C), device=device, dtype=torch.float32)
    launch(_sum_partials_kernel, (cdiv(C, cfg["BLOCK_C"]), 2), (part, sums, rows, C), meta)
    return sums[0], sums[1]


def _launch_main(kind: str, plan: tuple, tensors: tuple, dims: tuple, strides: tuple, part) -> None:
    """The main kernel's launch of ``plan`` ``(grid, meta, rows)``, writing its partial sums to
    ``part`` ([2, rows, C] fp32, or None without the sums)."""
    grid, meta, rows = plan
    dx = tensors[5]
    # unbind: both planes in one torch call (they never leave the launch); dx is never touched
    # without the sums
    parts = part.unbind(0) if part is not None else (dx, dx)
    launch(_KERNELS[kind], grid, (*tensors, *parts, *dims, rows, *strides), meta)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _check_center(center, C: int, x: torch.Tensor) -> torch.Tensor:
    """The fp32 ``[C]`` centre of the dscale sums (zeros when None; x when "transform": the
    kernels derive it then)."""
    if isinstance(center, str):
        if center != "transform":
            raise ValueError(f'center must be a tensor, None or "transform", got {center!r}')
        return x  # never read with TRANSFORM_CENTER
    if center is None:
        return torch.zeros(C, device=x.device, dtype=torch.float32)
    if not isinstance(center, torch.Tensor) or center.dtype != torch.float32:
        raise TypeError("center must be a float32 tensor")
    if tuple(center.shape) != (C,):
        raise ValueError(f"center must be [{C}], got {tuple(center.shape)}")
    if center.device != x.device:
        raise ValueError(f"center is on {center.device}, expected {x.device}")
    return center.contiguous()


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_out(out, shape: tuple[int, ...], x: torch.Tensor, g: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must be {list(shape)}, got shape {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out dtype {out.dtype} must match x dtype {x.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
    # The autotuner runs the kernel several times on the same arguments: dx must not be an input.
    if out.data_ptr() in (x.data_ptr(), g.data_ptr()):
        raise ValueError("out must not share storage with g or x")


def _check_common(g, x, op: str) -> tuple[int, int, int, int]:
    _check_tensor("g", g)
    _check_tensor("x", x)
    triton_dtype(x.dtype)  # TypeError for anything but fp32/fp16/bf16
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if g.dtype != x.dtype:
        raise TypeError(f"g dtype {g.dtype} must match x dtype {x.dtype}")
    if not can_launch(x.device):
        raise ValueError(f"{op} runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if g.device != x.device:
        raise ValueError(f"g is on {g.device}, x on {x.device}")
    return tuple(x.shape)


def affine_relu_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    center: torch.Tensor | str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``y = max(x*scale[c] + shift[c], 0)`` (fp32 math) w.r.t. x, scale and shift.

    Args:
        g: ``[N, C, H, W]`` gradient of ``y``, ``x.dtype``, any strides.
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (channels_last is fast).
        scale, shift: ``[C]`` fp32 or fp64 (read as fp32).
        center: optional fp32 ``[C]``: ``dscale`` is returned about it (below). When x's mean
            dwarfs its spread (a raw pre-BatchNorm activation of mean 1000), ``sum g*mask*x`` in
            fp32 holds the BatchNorm weight's gradient only to ~eps*|mean|/std; about a centre
            inside the data the sum keeps its digits, and the caller adds ``center*dshift`` in
            higher precision. ``"transform"``: the kernels take the sums about where
            ``x*scale + shift`` crosses 0 and add ``center*dshift`` back in fp64 themselves:
            dscale is then the plain ``sum g*mask*x`` and both sums come back fp64.
        out: optional ``[N, C, H, W]`` destination for dx in ``x.dtype``, any strides, not
            sharing storage with g or x. Default: a new channels_last tensor.

    With ``mask = not (relu(x*scale + shift) <= 0)`` in fp32: ``dx = g*mask*scale`` (fp32 math,
    stored in ``x.dtype``), ``dscale[c] = sum g*mask*(x - center)`` (center 0 when omitted; with
    "transform", ``sum g*mask*x``) and ``dshift[c] = sum g*mask`` over N, H, W (fp32, or fp64
    with "transform"; deterministic). Returns ``(dx, dscale, dshift)``.
    """
    N, C, H, W = _check_common(g, x, "affine_relu_backward")
    if tuple(g.shape) != (N, C, H, W):
        raise ValueError(f"g must have x's shape {[N, C, H, W]}, got {tuple(g.shape)}")
    if scale is None or shift is None:
        raise ValueError("affine_relu_backward needs both scale and shift")
    scale, shift = check_norm_affine(scale, shift, C, x, ("scale", "shift"))
    if isinstance(center, str):
        _check_center(center, C, x)
    else:
        center = _check_center(center, C, x)
    _check_out(out, (N, C, H, W), x, g)
    if N * H * W > _MAX_PIXELS:
        raise ValueError(f"N*H*W = {N * H * W} pixels exceeds the int32 pixel index")
    dx = out
    if dx is None:
        dx = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    P = N * H * W
    if P == 0 or C == 0:
        dtype = torch.float64 if isinstance(center, str) else torch.float32
        return dx, torch.zeros(C, device=x.device, dtype=dtype), torch.zeros(C, device=x.device, dtype=dtype)
    strides = (*g.stride(), *x.stride(), *dx.stride())
    transform = isinstance(center, str)
    dscale, dshift = _launch("affine_relu", (g, x, scale, shift, _check_center(center, C, x), dx), (N, C, H, W),
                             strides, True, transform)  # fmt: skip
    return dx, dscale, dshift


def maxpool2x2_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    center: torch.Tensor | str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``y = maxpool2x2(T(x))``, ``T`` the affine-ReLU (identity without scale/shift).

    Args:
        g: ``[N, C, H//2, W//2]`` gradient of ``y``, ``x.dtype``, any strides.
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (channels_last is fast); H and
            W even.
        scale, shift: fp32 ``[C]``, both or neither.
        center: optional fp32 ``[C]`` (with a norm): ``dscale`` is taken about it, as in
            ``affine_relu_backward``.
        out: optional ``[N, C, H, W]`` destination for dx in ``x.dtype``, any strides, not
            sharing storage with g or x. Default: a new channels_last tensor.

    Each window's gradient goes to the element ``F.max_pool2d`` would pick on ``T(x)`` rounded to
    ``x.dtype`` (the first of tied maxima; the last NaN of a window holding NaN); every other
    element of dx is 0. With a norm that element then gets ``g*mask*scale`` and the routed
    gradients are reduced into ``dscale``/``dshift`` as in ``affine_relu_backward``.

    Returns ``(dx, dscale, dshift)``; ``dscale``/``dshift`` are None without a norm.
    """
    N, C, H, W = _check_common(g, x, "maxpool2x2_backward")
    if H % 2 or W % 2:
        raise ValueError(f"maxpool2x2_backward needs even H and W, got H={H}, W={W}")
    H_out, W_out = H // 2, W // 2
    if tuple(g.shape) != (N, C, H_out, W_out):
        raise ValueError(f"g must be [{N}, {C}, {H_out}, {W_out}], got shape {tuple(g.shape)}")
    norm = check_norm_affine(scale, shift, C, x, ("scale", "shift"))
    if norm is None and center is not None:
        raise ValueError("maxpool2x2_backward: center needs scale and shift")
    transform = isinstance(center, str)
    center = _check_center(center, C, x) if norm is not None else x  # never read without IN_NORM
    _check_out(out, (N, C, H, W), x, g)
    if N * H_out * W_out > _MAX_PIXELS:
        raise ValueError("N*(H/2)*(W/2) output pixels exceed the int32 pixel index")
    dx = out
    if dx is None:
        dx = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    P = N * H_out * W_out
    if P == 0 or C == 0:
        if norm is None:
            return dx, None, None
        dtype = torch.float64 if transform else torch.float32
        return dx, torch.zeros(C, device=x.device, dtype=dtype), torch.zeros(C, device=x.device, dtype=dtype)
    s, t = norm if norm is not None else (x, x)  # never read without IN_NORM
    strides = (*g.stride(), *x.stride(), *dx.stride())
    dims = (N, C, H_out, W_out)
    sums = _launch(
        "maxpool", (g, x, s, t, center, dx), dims, strides, norm is not None, transform, IN_NORM=norm is not None
    )
    if sums is None:
        return dx, None, None
    return dx, sums[0], sums[1]


# --------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (kernel, config, dtype, IN_NORM) the launchers can run on ``arch``.

    The signature describes the fast path: channels_last g, x and dx, whose channel strides
    Triton specializes to the constant 1; every other size and stride is an ``i32``.
    ``extra["attrs"]`` holds the divisibility-by-16 hints the JIT would add at U-Net sizes
    (pass it as ``ASTSource``'s fourth argument).
    """
    arch = tuned_arch(arch)
    specs = []
    pixel_dims = {"affine_relu": ("N", "C", "H", "W"), "maxpool": ("N", "C", "H_out", "W_out")}
    # Every pixel bucket and channel count the tuners can be shown (``_specs``).
    channels = (*_specs.SMALL_CHANNELS, *_specs.CHANNELS)
    shapes = list(_specs.shape_grid({}, P=_specs.PIXEL_BUCKETS, C=channels))
    tuned = {kind: _specs.tuned_configs(_TUNERS[kind], arch, shapes) for kind in _KERNELS}
    for kind, fn in _KERNELS.items():
        strides = [f"stride_{t}{d}" for t in "gxd" for d in "nhw"]
        ints = (*pixel_dims[kind], "ROWS", *strides)
        aligned = (
            "g_ptr",
            "x_ptr",
            "scale_ptr",
            "shift_ptr",
            "center_ptr",
            "dx_ptr",
            "dscale_part_ptr",
            "dshift_part_ptr",
        )
        aligned += ("C", *strides)
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tt = triton_dtype(dtype)
            for in_norm in (False, True) if kind == "maxpool" else (None,):
                # The training path: fp64 BatchNorm vectors, the transform's own centre.
                transform = in_norm is not False
                for cfg in tuned[kind]:
                    vec = "*fp64" if transform else "*fp32"
                    signature = {"g_ptr": f"*{tt}", "x_ptr": f"*{tt}", "scale_ptr": vec, "shift_ptr": vec}
                    signature["center_ptr"] = f"*{tt}" if transform else "*fp32"
                    signature.update({"dx_ptr": f"*{tt}", "dscale_part_ptr": "*fp32", "dshift_part_ptr": "*fp32"})
                    signature.update({n: "i32" for n in ints})
                    constexprs = {"stride_gc": 1, "stride_xc": 1, "stride_dc": 1}
                    if in_norm is not None:
                        constexprs["IN_NORM"] = in_norm
                    constexprs.update({"TRANSFORM_CENTER": transform, "P_GRAIN": _grain(kind, arch), **cfg.kwargs})
                    signature.update({n: "constexpr" for n in constexprs})
                    signature = {n: signature[n] for n in fn.arg_names}
                    name = _config_name(cfg) + ("" if in_norm is None else ("_norm" if in_norm else "_plain"))
                    specs.append(
                        KernelSpec(
                            kernel=_KERNEL_NAMES[kind],
                            fn=fn,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            dtype=tt,
                            config=name,
                            extra={"label": tt, "attrs": attrs, "expect_hgmma": False},
                        )
                    )
    sum_attrs = {(_sum_partials_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("part_ptr", "out_ptr")}
    specs.append(
        KernelSpec(
            kernel="_sum_partials_kernel",
            fn=_sum_partials_kernel,
            signature={"part_ptr": "*fp32", "out_ptr": "*fp32", "ROWS": "i32", "C": "i32"}
            | {n: "constexpr" for n in _SUM_CONFIG},
            constexprs=dict(_SUM_CONFIG),
            num_warps=_SUM_WARPS,
            num_stages=1,
            dtype="fp32",
            config=f"BR{_SUM_CONFIG['BLOCK_R']}_BC{_SUM_CONFIG['BLOCK_C']}_w{_SUM_WARPS}",
            extra={"label": "fp32", "attrs": sum_attrs, "expect_hgmma": False},
        )
    )
    unc = _sum_uncenter_kernel
    specs.append(
        KernelSpec(
            kernel="_sum_uncenter_kernel",
            fn=unc,
            signature={"part_ptr": "*fp32", "scale_ptr": "*fp64", "shift_ptr": "*fp64", "dscale_ptr": "*fp64"}
            | {"dshift_ptr": "*fp64", "ROWS": "i32", "C": "i32"}
            | {n: "constexpr" for n in _SUM_CONFIG},
            constexprs=dict(_SUM_CONFIG),
            num_warps=_SUM_WARPS,
            num_stages=1,
            dtype="fp32",
            config=f"BR{_SUM_CONFIG['BLOCK_R']}_BC{_SUM_CONFIG['BLOCK_C']}_w{_SUM_WARPS}_uncenter",
            extra={"label": "fp32", "attrs": {}, "expect_hgmma": False},
        )
    )
    return specs
