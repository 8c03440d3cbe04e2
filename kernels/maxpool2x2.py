"""2x2, stride-2 max-pool over NHWC (or any strided) activations.

Odd H or W floor like ``nn.MaxPool2d(2)``: the output is ``[H // 2, W // 2]`` and the last row
(column) of an odd input is never read, so no tile ever reaches past ``2 * H_out`` rows.

Memory-bound: each program owns a ``[BLOCK_P output pixels, BLOCK_C channels]`` tile, reads
its four input taps (channels contiguous in channels_last, so every load is a run of
``BLOCK_C`` consecutive elements) and writes the maximum. NaN handling matches
``torch.max_pool2d``: a window holding a NaN yields NaN.

Training path (``IN_NORM``): the input is a conv's raw pre-BatchNorm output ``z`` and the kernel
pools ``T(z) = max(z*scale[c] + shift[c], 0)``, computed in fp32 per tap and rounded to z's
dtype before the comparison, so the result equals pooling a materialized BN+ReLU output.
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
    launch,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Plans, Tuner, bucket, launch_meta
from .norm_act import affine_relu, check_norm_affine

__all__ = ["maxpool2x2", "compile_specs"]

# Pixel indices are int32 in the kernel; headroom keeps the last tile's lanes from wrapping.
_MAX_PIXELS = 2**31 - 2**16


@triton.jit
def _max_nan(m, v):
    # torch's rule: take v when it is larger *or NaN*; once m is NaN nothing replaces it
    # (v > NaN is false and a later v is NaN only if it too propagates NaN).
    return tl.where((v > m) | (v != v), v, m)


@triton.jit(do_not_specialize=("N",))
def _maxpool2x2_kernel(
    x_ptr,  # [N, C, H, W], any strides (channels_last is the fast layout)
    out_ptr,  # [N, C, H//2, W//2], any strides, same dtype as x
    scale_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    shift_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    N,
    C,
    H_out,
    W_out,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    IN_NORM: tl.constexpr,  # pool T(x) = max(x*scale + shift, 0) instead of x
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[n, c, p, q] = max(x[n, c, 2p:2p+2, 2q:2q+2])`` for one [BLOCK_P, BLOCK_C] tile
    (of ``T(x)`` with IN_NORM).

    FLOPs: ``3 * N*C*H_out*W_out`` comparisons. Minimum bytes moved:
    ``5 * N*C*H_out*W_out * elem`` (every input element read once, every output written once).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    hw_out = H_out * W_out
    P = N * hw_out  # < 2**31, checked by the launcher
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixel index
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = (offs_p < P)[:, None] & (offs_c < C)[None, :]  # [BLOCK_P, BLOCK_C]

    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_p // hw_out).to(tl.int64)
    rem = offs_p % hw_out
    p_idx = (rem // W_out).to(tl.int64)
    q_idx = (rem % W_out).to(tl.int64)

    x_row = n_idx * stride_xn + (2 * p_idx) * stride_xh + (2 * q_idx) * stride_xw  # [BLOCK_P]
    x_ptrs = x_ptr + (x_row[:, None] + offs_c[None, :] * stride_xc)  # [BLOCK_P, BLOCK_C]
    # Masked lanes are never stored; any fill value works.
    v00 = tl.load(x_ptrs, mask=mask, other=0.0)
    v01 = tl.load(x_ptrs + stride_xw, mask=mask, other=0.0)
    v10 = tl.load(x_ptrs + stride_xh, mask=mask, other=0.0)
    v11 = tl.load(x_ptrs + stride_xh + stride_xw, mask=mask, other=0.0)
    if IN_NORM:
        mask_c = offs_c < C
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        # Rounded to x's dtype before comparing: ties must be those of the materialized T(x)
        # (maxpool2x2_backward recomputes the argmax the same way).
        v00 = affine_relu(v00, scale, shift).to(x_ptr.dtype.element_ty)
        v01 = affine_relu(v01, scale, shift).to(x_ptr.dtype.element_ty)
        v10 = affine_relu(v10, scale, shift).to(x_ptr.dtype.element_ty)
        v11 = affine_relu(v11, scale, shift).to(x_ptr.dtype.element_ty)
    # Same scan order as torch (row-major over the window) so ties, including -0.0 vs +0.0,
    # resolve to the same element.
    m = _max_nan(_max_nan(_max_nan(v00, v01), v10), v11)  # [BLOCK_P, BLOCK_C]

    out_row = n_idx * stride_on + p_idx * stride_oh + q_idx * stride_ow  # [BLOCK_P]
    out_ptrs = out_ptr + (out_row[:, None] + offs_c[None, :] * stride_oc)
    tl.store(out_ptrs, m, mask=mask)


# --------------------------------------------------------------------------------------
# Configs: a couple per architecture. No loop, so num_stages is irrelevant (1). Tiles of
# 4096 elements keep enough bytes in flight per SM without register pressure.
# --------------------------------------------------------------------------------------


def _cfg(bp: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


_CONFIGS = {
    90: [_cfg(64, 64, 4), _cfg(32, 128, 4), _cfg(128, 64, 8)],
    80: [_cfg(64, 64, 4), _cfg(32, 128, 4)],
}

_INTERPRETER_CONFIG = {"BLOCK_P": 16, "BLOCK_C": 16}


def _config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BP{k['BLOCK_P']}_BC{k['BLOCK_C']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _prune_configs(configs, shape: dict, arch: int) -> list:
    # A channel block wider than C only loads masked lanes: prefer one that fits.
    narrow = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= max(shape["C"], 64)]
    return narrow or list(configs)


def _tiles(cfg, shape: dict) -> int:
    return cdiv(shape["P"], cfg.kwargs["BLOCK_P"]) * cdiv(shape["C"], cfg.kwargs["BLOCK_C"])


# Launch plans per operand signature (``_tuning.Plans``): the pick's grid and meta-parameters.
_PLANS = Plans()
_TUNER = Tuner(
    "maxpool2x2",
    _CONFIGS,
    _prune_configs,
    _tiles,
    lambda shape: triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1),
)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _check_inputs(x, in_scale, in_shift, out):
    """Validate the launcher's arguments; returns ``(N, C, H, W)`` and the norm pair (or None)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    triton_dtype(x.dtype)  # TypeError for anything but fp32/fp16/bf16
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if not can_launch(x.device):
        raise ValueError(f"maxpool2x2 runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (N, C, H // 2, W // 2):
            raise ValueError(f"out must be [{N}, {C}, {H // 2}, {W // 2}], got shape {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out dtype {out.dtype} must match x dtype {x.dtype}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, x on {x.device}")
    if N * (H // 2) * (W // 2) > _MAX_PIXELS:
        raise ValueError("N*(H/2)*(W/2) output pixels exceed the int32 pixel index")
    return (N, C, H, W), check_norm_affine(in_scale, in_shift, C, x)


def maxpool2x2(
    x: torch.Tensor,
    *,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, NaN-propagating like torch; odd H or W floor (the last row or
    column is dropped, as ``nn.MaxPool2d(2)`` does).

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (channels_last is fast; a
            channel slice of a larger NHWC buffer is fine); any H, W (the output is empty for
            H or W below 2).
        in_scale, in_shift: optional fp32 ``[C]`` (both or neither): pool
            ``T(x) = max(x*in_scale[c] + in_shift[c], 0)`` (fp32 math, rounded to ``x.dtype``)
            instead of x -- a BatchNorm+ReLU applied as x is read. A NaN in x stays NaN.
        out: optional ``[N, C, H//2, W//2]`` destination in ``x.dtype``, any strides.
            Default: a new channels_last tensor.

    Returns ``out``.
    """
    (N, C, H, W), norm = _check_inputs(x, in_scale, in_shift, out)
    H_out, W_out = H // 2, W // 2
    if out is None:
        out = torch.empty((N, C, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    P = N * H_out * W_out
    scale, shift = norm if norm is not None else (x, x)  # never read without IN_NORM
    args = (x, out, scale, shift, N, C, H_out, W_out, *x.stride(), *out.stride())
    plan_key = (x.dtype, x.device, P, C, norm is None)

    def make():
        flags = {"IN_NORM": norm is not None}
        p_bucket = bucket(P)

        def plan_for(cfg):
            grid = (cdiv(P, cfg.kwargs["BLOCK_P"]), cdiv(C, cfg.kwargs["BLOCK_C"]))
            return grid, {**flags, **launch_meta(cfg)}

        key = (x.dtype, p_bucket, C, *flags.values())
        shape = lambda: {"P": p_bucket, "C": C}  # noqa: E731
        return _PLANS.make(plan_key, _TUNER, x.device, key, shape, _maxpool2x2_kernel, args, plan_for)

    grid, meta = _PLANS.get(plan_key) or make()
    launch(_maxpool2x2_kernel, grid, args, meta)
    return out


# --------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (config, dtype, IN_NORM) the launcher can run on ``arch``.

    The signature describes the fast path: channels_last tensors, whose channel strides Triton
    specializes to the constant 1; every other size and stride is an ``i32``.
    ``extra["attrs"]`` holds the divisibility-by-16 hints the JIT would add at U-Net sizes
    (pass it as ``ASTSource``'s fourth argument).
    """
    arch = tuned_arch(arch)
    # What the tuner can pick over every pixel bucket and channel count (``_specs``).
    channels = (*_specs.SMALL_CHANNELS, *_specs.CHANNELS)
    configs = _specs.tuned_configs(_TUNER, arch, _specs.shape_grid({}, P=_specs.PIXEL_BUCKETS, C=channels))
    ints = ("N", "C", "H_out", "W_out", "stride_xn", "stride_xh", "stride_xw")
    ints += ("stride_on", "stride_oh", "stride_ow")
    aligned = ("x_ptr", "out_ptr", "scale_ptr", "shift_ptr", "C", "stride_xn", "stride_xh", "stride_xw")
    aligned += ("stride_on", "stride_oh", "stride_ow")
    attrs = {(_maxpool2x2_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        for in_norm in (False, True):
            for cfg in configs:
                vec = "*fp64" if in_norm else "*fp32"  # the training path's BatchNorm vectors are fp64
                signature = {"x_ptr": f"*{tt}", "out_ptr": f"*{tt}", "scale_ptr": vec, "shift_ptr": vec}
                signature.update({n: "i32" for n in ints})
                constexprs = {"stride_xc": 1, "stride_oc": 1, "IN_NORM": in_norm, **cfg.kwargs}
                signature.update({n: "constexpr" for n in constexprs})
                specs.append(
                    KernelSpec(
                        kernel="_maxpool2x2_kernel",
                        fn=_maxpool2x2_kernel,
                        signature=signature,
                        constexprs=constexprs,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        dtype=tt,
                        config=_config_name(cfg) + ("_norm" if in_norm else ""),
                        extra={"label": tt, "attrs": attrs, "expect_hgmma": False},
                    )
                )
    return specs
