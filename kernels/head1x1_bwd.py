"""Backward of the 1x1 head (``head1x1``): its weight and input gradients.

Notation (see ``_split_k``): ``T(x)`` is the BatchNorm+ReLU the forward applies on load when a
norm ``(scale, shift)`` is given, the identity otherwise.

* ``head1x1_weight_grad(gz, x, x_norm=)``: ``dW[k, c] = sum_{n,h,w} gz[n, k, h, w] * T(x)[n, c, h, w]``,
  a thin GEMM ``[K classes, pixels] @ [pixels, C]`` (classes padded to a dot width); the pixel
  range is split over ``SPLIT_K`` programs and the partials summed in a fixed order (``_split_k``).
* ``head1x1_input_grad(gz, weight)``: ``dX[n, c, h, w] = sum_k gz[n, k, h, w] * weight[k, c]``,
  an outer-product loop over the few classes (no dot).

Offline compile report: ``compile_specs(arch)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import KernelSpec, cdiv, dot_precision, next_pow2, tuned_arch
from ._split_k import (
    MAX_SPLIT_K_HEAD,
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
from .head1x1 import MAX_CLASSES
from .norm_act import affine_relu

__all__ = ["head1x1_weight_grad", "head1x1_input_grad", "compile_specs"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


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
            b = tl.where(b_mask, affine_relu(b, scale, shift), 0.0).to(x_ptr.dtype.element_ty)
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


# --------------------------------------------------------------------------------------------
# Configs: short explicit lists per architecture, pruned per call by shared memory (dtype), by
# register footprint for 4-byte operands, and by tiles far wider than the problem.
# --------------------------------------------------------------------------------------------


# Head weight grad: BLOCK_M is the class tile (from K, not tuned), BLOCK_N the channels and
# BLOCK_K the pixels per step. Memory-bound: the list only trades tile width for occupancy.
# sm_80 spilled a few bytes on the 128-pixel step with a norm (16-bit too) and on 128-channel
# tiles in TF32 (8 warps, 32- and 64-pixel steps alike), so it keeps 64-channel tiles.
_HEAD_WGRAD_CONFIGS = {
    90: (
        Cfg(0, 64, 64, 4, 3),
        Cfg(0, 128, 64, 8, 3),
        Cfg(0, 64, 128, 4, 3),
    ),
    80: (
        Cfg(0, 64, 64, 4, 3),
        Cfg(0, 64, 32, 4, 3),
    ),
}
_HEAD_WGRAD_IEEE_CONFIGS = (
    Cfg(0, 64, 32, 4, 1),
    Cfg(0, 128, 32, 8, 1),
)
# Head input grad: no dot, no shared memory; BLOCK_M pixels x BLOCK_N channels. 128-channel
# tiles (64x128 on 4 warps, 128x128 on 8) reached 255 registers and spilled on sm_90.
_HEAD_DGRAD_CONFIGS = (
    Cfg(64, 64, 0, 4, 1),
    Cfg(128, 64, 0, 4, 1),
)


def _config_list(kind: str, arch: int, elem: int, precision: str) -> tuple[Cfg, ...]:
    """The tuned list of kernel ``kind`` ("head_wgrad" or "head_dgrad")."""
    if kind == "head_wgrad":
        return _HEAD_WGRAD_IEEE_CONFIGS if elem == 4 and precision == "ieee" else _HEAD_WGRAD_CONFIGS[tuned_arch(arch)]
    return _HEAD_DGRAD_CONFIGS


def _usable_configs(kind: str, arch: int, elem: int, precision: str, block_cls: int = 16) -> list[Cfg]:
    """``kind``'s configs a device of compute capability ``arch`` may run (see ``_split_k``);
    ``block_cls`` is the weight grad's class tile."""
    return usable_from(kind, _config_list(kind, arch, elem, precision), arch, elem, block_cls)


_KERNELS = {"head_wgrad": _head1x1_wgrad_kernel, "head_dgrad": _head1x1_dgrad_kernel}
_TUNERS = {kind: make_tuner(kind, _config_list, _usable_configs) for kind in _KERNELS}


def _run(kind: str, ref: Tensor, key: tuple, grid, args: tuple, flags: dict, shape: dict, exact: tuple = ()) -> None:
    """Launch kernel ``kind`` with its tuner's config for ``key`` (see ``_split_k.run_tuned``)."""
    run_tuned(_KERNELS[kind], _TUNERS[kind], ref, key, grid, args, flags, shape, exact)


def _head_weight_2d(weight, C: int | None) -> Tensor:
    """``weight`` as ``[K, C]`` (a view of ``[K, C, 1, 1]``)."""
    check_tensor("weight", weight)
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
    check_grad("gz", gz, "[N, K, H, W]")
    N, K, H, W = gz.shape
    _check_classes(K)
    check_activation("x", x, gz.dtype, "[N, C, H, W]")
    if (x.shape[0], x.shape[2], x.shape[3]) != (N, H, W):
        raise ValueError(f"x must be [N={N}, C, H={H}, W={W}] like gz, got {tuple(x.shape)}")
    C = x.shape[1]
    check_device(gz, "head1x1_weight_grad")
    check_same_device("gz", gz, x=x)
    norm = check_norm(x_norm, C, x)
    check_out(out, (K, C), torch.float32, gz)
    check_pixels(N * H * W)
    if out is None:
        out = torch.empty((K, C), device=gz.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    P = N * H * W
    if P == 0:
        return out.zero_()

    split_k = pick_split_k(gz.device, P, cdiv(C, 64), 4 * K * C, MAX_SPLIT_K_HEAD)
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
        reduce_splits(ws, out, (1, 1, K, C), (0, 0, *out.stride()))
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
    check_grad("gz", gz, "[N, K, H, W]")
    N, K, H, W = gz.shape
    _check_classes(K)
    w2 = _head_weight_2d(weight, None)
    if w2.shape[0] != K:
        raise ValueError(f"weight has {w2.shape[0]} classes, gz has K={K}")
    C = w2.shape[1]
    check_device(gz, "head1x1_input_grad")
    check_same_device("gz", gz, weight=weight)
    check_out(out, (N, C, H, W), gz.dtype, gz)
    check_pixels(N * H * W)
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
    _run("head_dgrad", gz, (p_bucket, C, K), grid, args, {}, shape, (P,))
    return out


# --------------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (kernel, config, dtype, precision, flags) the two launchers can run on ``arch`` (80 or
    90) after pruning (the split reduction's spec is ``_split_k``'s).

    Signatures describe the fast path (channels_last activations, contiguous dW / workspace, unit
    strides specialized to 1; see ``_split_k``). ``extra["expect_hgmma"]``: the weight grad's
    class tile (16..64 rows) only reaches a wgmma shape at 64 classes; the input grad has no dot.
    """
    arch = tuned_arch(arch)
    specs: list[KernelSpec] = []
    for dtype in ("fp32", "fp16", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        for precision in ("tf32", "ieee") if dtype == "fp32" else ("ieee",):
            ptag = f"_{precision}" if dtype == "fp32" else ""
            for block_cls in (16, 32, 64):
                for cfg in _usable_configs("head_wgrad", arch, elem, precision, block_cls):
                    for x_norm in (False, True):
                        constexprs = {n: 1 for n in UNIT_STRIDES["head_wgrad"]}
                        constexprs.update(
                            X_NORM=x_norm, INPUT_PRECISION=precision, BLOCK_K=block_cls,
                            **triton_config("head_wgrad", cfg).kwargs,
                        )  # fmt: skip
                        specs.append(
                            spec("head_wgrad", _head1x1_wgrad_kernel, dtype, dtype, constexprs, cfg,
                                  cfg.name + ptag + ("_norm" if x_norm else ""),
                                  hgmma=expect_wgmma(arch, dtype, precision, cfg), variant="head_wgrad")
                        )  # fmt: skip
        # The head's weight is the model parameter: fp32, or the activations' dtype.
        for w_dtype in sorted({dtype, "fp32"}):
            for cfg in _usable_configs("head_dgrad", arch, elem, "ieee"):
                constexprs = {n: 1 for n in UNIT_STRIDES["head_dgrad"]}
                constexprs.update(triton_config("head_dgrad", cfg).kwargs)
                specs.append(
                    spec("head_dgrad", _head1x1_dgrad_kernel, dtype, w_dtype, constexprs, cfg,
                          f"P{cfg.BLOCK_M}_C{cfg.BLOCK_N}_w{cfg.num_warps}_W{w_dtype}",
                          hgmma=False, variant="head_dgrad")
                )  # fmt: skip

    return specs
