"""The U-Net head: a 1x1 conv from C channels to K classes, plus bias and an activation.

Memory-bound (K is small, C is 64 in the U-Net): each program owns ``BLOCK_M`` pixels, walks
their ``C`` channels in ``BLOCK_C`` chunks (contiguous in channels_last), multiplies by the
``[C, K]`` weight with ``tl.dot`` (K padded to ``BLOCK_K >= 16``, the smallest dot width),
then applies the bias and the activation in fp32 -- softmax over the K channels needs all of
a pixel's classes in one tile, which is why K is not tiled. The fused path also folds the head
into the last conv's epilogue; this kernel is the general fallback.

Training path (``IN_NORM``): x is the last conv's raw pre-BatchNorm output ``z`` and each x tile
is replaced by ``T(z) = max(z*scale[c] + shift[c], 0)`` (fp32, rounded back to z's dtype for the
dot) between its load and the dot, so the result equals the head of a materialized BN+ReLU output.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import _specs
from ._common import (
    GemmConfig,
    KernelSpec,
    can_launch,
    cdiv,
    dot_precision,
    gemm_smem,
    launch,
    next_pow2,
    smem_limit,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Plans, Tuner, bucket, launch_meta
from .norm_act import affine_relu, check_norm_affine

__all__ = ["head1x1", "compile_specs", "ACTIVATIONS", "MAX_CLASSES"]

ACTIVATIONS = ("none", "sigmoid", "softmax")
MAX_CLASSES = 64  # one BLOCK_K tile holds every class of a pixel (softmax needs them all)

# Pixel indices are int32 in the kernel; headroom keeps the last tile's lanes from wrapping.
_MAX_PIXELS = 2**31 - 2**16


@triton.jit(do_not_specialize=("N",))
def _head1x1_kernel(
    x_ptr,  # [N, C, H, W], any strides (channels_last is the fast layout)
    w_ptr,  # [K, C] (a [K, C, 1, 1] conv weight viewed as 2-D), any strides, x's dtype
    b_ptr,  # [K], any float dtype, read as fp32 (unused unless HAS_BIAS)
    out_ptr,  # [N, K, H, W], any strides, x's dtype
    scale_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    shift_ptr,  # [C] fp32, contiguous (unused unless IN_NORM)
    N,
    H,
    W,
    C,
    K,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wk,
    stride_wc,
    stride_on,
    stride_ok,
    stride_oh,
    stride_ow,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "sigmoid" or "softmax" (over the K classes)
    IN_NORM: tl.constexpr,  # multiply T(x) = max(x*scale + shift, 0) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= max(K, 16)
):
    """``out[n, :, y, x] = act(W @ x[n, :, y, x] + b)`` (``T(x)`` with IN_NORM) for ``BLOCK_M``
    pixels.

    FLOPs: ``2 * N*H*W * C * K`` (plus the activation). Minimum bytes moved:
    ``(N*H*W*(C + K) + K*C) * elem`` (x read once, out written once, the weight once).
    """
    pid = tl.program_id(0)
    hw = H * W
    M = N * hw  # < 2**31, checked by the launcher
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] pixel index
    mask_m = offs_m < M
    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    y_idx = (rem // W).to(tl.int64)
    x_idx = (rem % W).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_k = offs_k < K

    x_row = n_idx * stride_xn + y_idx * stride_xh + x_idx * stride_xw  # [BLOCK_M]
    x_ptrs = x_ptr + (x_row[:, None] + offs_c[None, :] * stride_xc)  # [BLOCK_M, BLOCK_C]
    w_ptrs = w_ptr + (offs_c[:, None] * stride_wc + offs_k[None, :] * stride_wk)  # [BLOCK_C, BLOCK_K]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # [BLOCK_M, BLOCK_K]
    for c0 in range(0, C, BLOCK_C):
        mask_c = offs_c < C - c0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        if IN_NORM:
            scale = tl.load(scale_ptr + c0 + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
            shift = tl.load(shift_ptr + c0 + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            # Padded C lanes become T(0) = 0 here (scale = shift = 0), and b is 0 there anyway.
            a = affine_relu(a, scale, shift).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_C * stride_xc
        w_ptrs += BLOCK_C * stride_wc

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BLOCK_K]
        acc += bias[None, :]

    if ACTIVATION == "sigmoid":
        acc = tl.sigmoid(acc)
    elif ACTIVATION == "softmax":
        # Padding classes get -inf so they add exp(-inf) = 0 to the denominator.
        acc = tl.where(mask_k[None, :], acc, float("-inf"))
        # tl.max drops NaN on a GPU (max.f32), harmlessly: a NaN logit's exp is NaN, so the row's
        # sum and every output of the row are NaN, as in torch.softmax (an all-NaN row too).
        row_max = tl.max(acc, axis=1)  # [BLOCK_M]
        e = tl.exp(acc - row_max[:, None])  # [BLOCK_M, BLOCK_K]
        acc = e / tl.sum(e, axis=1)[:, None]

    out_row = n_idx * stride_on + y_idx * stride_oh + x_idx * stride_ow  # [BLOCK_M]
    out_ptrs = out_ptr + (out_row[:, None] + offs_k[None, :] * stride_ok)  # [BLOCK_M, BLOCK_K]
    tl.store(
        out_ptrs,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )


# --------------------------------------------------------------------------------------
# Configs: a few per architecture. BLOCK_M >= 64 with 4/8 warps keeps 16-bit (and TF32)
# dots on wgmma on sm_90. Which ones a call may use depends on BLOCK_K (from K): see
# _usable_configs.
# --------------------------------------------------------------------------------------


def _cfg(bm: int, bc: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


_CONFIGS = {
    90: [_cfg(128, 32, 4, 3), _cfg(64, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 8, 3)],
    80: [_cfg(128, 32, 4, 3), _cfg(64, 32, 4, 3), _cfg(64, 32, 8, 3)],
}

# Accumulator words per thread (BLOCK_M * BLOCK_K / threads) past which the compile report
# showed ptxas at 255 registers or spilling (the fp32 FMA dot and the softmax epilogue are the
# tightest): a memory-bound kernel wants the registers for loads in flight instead.
_MAX_ACC_WORDS_PER_THREAD = 16

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 16}


def _block_k(K: int) -> int:
    return max(16, next_pow2(K))


def _config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BM{k['BLOCK_M']}_BC{k['BLOCK_C']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _usable_configs(arch: int, elem_bytes: int, block_k: int) -> list[triton.Config]:
    """The configs a device of compute capability ``arch`` may run: its tuned list, minus
    tiles whose pipelined buffers overflow its shared memory or whose accumulator overflows
    the register budget for this ``BLOCK_K``. Never empty: the smallest tile is kept as a
    last resort."""
    candidates = _CONFIGS[tuned_arch(arch)]
    usable = []
    for c in candidates:
        bm = c.kwargs["BLOCK_M"]
        if _smem(c, elem_bytes, block_k) > smem_limit(arch):
            continue
        if bm * block_k > _MAX_ACC_WORDS_PER_THREAD * 32 * c.num_warps:
            continue
        usable.append(c)
    return usable or [min(candidates, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"])]


def _smem(cfg: triton.Config, elem_bytes: int, block_k: int) -> int:
    """The pruning's shared-memory estimate: the pipelined x [BLOCK_M, BLOCK_C] and weight
    [BLOCK_K, BLOCK_C] tiles (the GEMM's K is the channel block), or the fp32 [BLOCK_M, BLOCK_K]
    result staged by the epilogue."""
    k = cfg.kwargs
    tile = GemmConfig(k["BLOCK_M"], block_k, k["BLOCK_C"], cfg.num_warps, cfg.num_stages)
    return gemm_smem(tile, elem_bytes, out_bytes=4)


def _tuned_configs(arch: int, elem_bytes: int, block_k: int) -> list[triton.Config]:
    """What the tuner can pick on ``arch`` for this element size and class tile, over every pixel
    bucket (``_specs``)."""
    shapes = _specs.shape_grid({"elem": elem_bytes, "BLOCK_K": block_k}, M=_specs.PIXEL_BUCKETS)
    return _specs.tuned_configs(_TUNER, arch, shapes)


def _prune_configs(configs, shape: dict, arch: int) -> list:
    usable = _usable_configs(arch, shape["elem"], shape["BLOCK_K"])
    return [c for c in configs if c in usable]


_TUNER = Tuner(
    "head1x1",
    _CONFIGS,
    _prune_configs,
    lambda cfg, shape: cdiv(shape["M"], cfg.kwargs["BLOCK_M"]),
    lambda shape: triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1),
)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _check_inputs(x, weight, bias, activation, in_scale, in_shift, out):
    """Validate the launcher's arguments; returns ``(N, C, H, W, K)`` and the norm pair (or None)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    triton_dtype(x.dtype)  # TypeError for anything but fp32/fp16/bf16
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        wshape = tuple(weight.shape[:2])
    elif weight.dim() == 2:
        wshape = tuple(weight.shape)
    else:
        raise ValueError(f"weight must be [K, C, 1, 1] or [K, C], got {tuple(weight.shape)}")
    K = wshape[0]
    if wshape[1] != C:
        raise ValueError(f"weight has {wshape[1]} input channels, x has C={C}")
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"head1x1 supports 1..{MAX_CLASSES} classes, got K={K}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not can_launch(x.device):
        raise ValueError(f"head1x1 runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (K,):
            raise ValueError(f"bias must be [K={K}], got shape {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (N, K, H, W):
            raise ValueError(f"out must be [{N}, {K}, {H}, {W}], got shape {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out dtype {out.dtype} must match x dtype {x.dtype}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, x on {x.device}")
    if N * H * W > _MAX_PIXELS:
        raise ValueError(f"N*H*W = {N * H * W} pixels exceeds the int32 pixel index")
    return (N, C, H, W, K), check_norm_affine(in_scale, in_shift, C, x)


def head1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias))`` for a 1x1 conv with few output classes.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (channels_last is fast; a
            channel slice of a larger NHWC buffer is fine).
        weight: ``[K, C, 1, 1]`` or ``[K, C]`` in ``x.dtype``, any strides; ``1 <= K <= 64``.
        bias: ``[K]`` of any float dtype (read as fp32), or None.
        activation: ``"none"``, ``"sigmoid"`` or ``"softmax"`` (over the K classes),
            computed in fp32.
        in_scale, in_shift: optional fp32 ``[C]`` (both or neither): apply the head to
            ``T(x) = max(x*in_scale[c] + in_shift[c], 0)`` (fp32 math, rounded to ``x.dtype``)
            instead of x -- a BatchNorm+ReLU applied as x is read.
        out: optional ``[N, K, H, W]`` destination in ``x.dtype``, any strides.
            Default: a new channels_last tensor.

    Accumulates in fp32; fp32 inputs use TF32 dots iff ``torch.backends.cudnn.allow_tf32``.
    Returns ``out``.
    """
    (N, C, H, W, K), norm = _check_inputs(x, weight, bias, activation, in_scale, in_shift, out)
    if out is None:
        out = torch.empty((N, K, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    M = N * H * W
    scale, shift = norm if norm is not None else (x, x)  # never read without IN_NORM
    args = (
        x,
        weight,
        bias if bias is not None else x,  # never read without HAS_BIAS
        out,
        scale,
        shift,
        N,
        H,
        W,
        C,
        K,
        *x.stride(),
        weight.stride(0),
        weight.stride(1),
        *out.stride(),
    )
    plan_key = (
        x.dtype, x.device, M, C, K, bias is None, activation, norm is None,
        dot_precision(x.dtype),
    )  # fmt: skip
    grid, meta = _PLANS.get(plan_key) or _plan(plan_key, x, args)
    launch(_head1x1_kernel, grid, args, meta)
    return out


# Launch plans per operand signature (``_tuning.Plans``): the pick's grid and meta-parameters.
_PLANS = Plans()


def _plan(plan_key: tuple, x: torch.Tensor, args: tuple) -> tuple:
    """``(grid, meta)`` of ``head1x1``'s launch on ``args`` (the tuner times candidates on them
    when it must), kept in ``_PLANS`` when the pick is settled."""
    _, _, M, C, K, no_bias, activation, no_norm, precision = plan_key
    flags = {
        "HAS_BIAS": not no_bias,
        "ACTIVATION": activation,
        "IN_NORM": not no_norm,
        "INPUT_PRECISION": precision,
        "BLOCK_K": _block_k(K),
    }
    m_bucket = bucket(M)

    def plan_for(cfg):
        return (cdiv(M, cfg.kwargs["BLOCK_M"]),), {**flags, **launch_meta(cfg)}

    def shape():
        return {"M": m_bucket, "elem": x.element_size(), "BLOCK_K": flags["BLOCK_K"]}

    key = (x.dtype, m_bucket, C, *flags.values())
    return _PLANS.make(plan_key, _TUNER, x.device, key, shape, _head1x1_kernel, args, plan_for)


# --------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (config, dtype, precision, activation, BLOCK_K, IN_NORM) the launcher can run on
    ``arch``.

    The signature describes the fast path: channels_last activations and a contiguous
    ``[K, C]`` weight, whose unit strides (``stride_xc``, ``stride_wc``, ``stride_ok``) Triton
    specializes to the constant 1; every other size and stride is an ``i32``; bias is fp32.
    ``extra["attrs"]`` holds the divisibility-by-16 hints the JIT would add at U-Net sizes
    (pass it as ``ASTSource``'s fourth argument).
    """
    ints = ("N", "H", "W", "C", "K", "stride_xn", "stride_xh", "stride_xw", "stride_wk")
    ints += ("stride_on", "stride_oh", "stride_ow")
    # K (classes) and the output strides, multiples of K, are usually not multiples of 16.
    aligned = ("x_ptr", "w_ptr", "b_ptr", "out_ptr", "C", "stride_xn", "stride_xh", "stride_xw")
    aligned += ("stride_wk", "scale_ptr", "shift_ptr")
    attrs = {(_head1x1_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            for block_k in (16, 32, 64):
                for cfg in _tuned_configs(arch, elem, block_k):
                    for activation, in_norm in itertools.product(ACTIVATIONS, (False, True)):
                        signature = {
                            "x_ptr": f"*{tt}",
                            "w_ptr": f"*{tt}",
                            "b_ptr": "*fp32",
                            "out_ptr": f"*{tt}",
                            "scale_ptr": "*fp64" if in_norm else "*fp32",
                            "shift_ptr": "*fp64" if in_norm else "*fp32",
                        }
                        signature.update({n: "i32" for n in ints})
                        constexprs = {
                            "stride_xc": 1,
                            "stride_wc": 1,
                            "stride_ok": 1,
                            "HAS_BIAS": True,
                            "ACTIVATION": activation,
                            "IN_NORM": in_norm,
                            "INPUT_PRECISION": precision,
                            "BLOCK_K": block_k,
                            **cfg.kwargs,
                        }
                        signature.update({n: "constexpr" for n in constexprs})
                        fp32 = dtype == torch.float32
                        label = f"fp32-{precision}" if fp32 else tt
                        name = f"{_config_name(cfg)}_BK{block_k}_{activation}"
                        specs.append(
                            KernelSpec(
                                kernel="_head1x1_kernel",
                                fn=_head1x1_kernel,
                                signature=signature,
                                constexprs=constexprs,
                                num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages,
                                dtype=tt,
                                config=name + (f"_{precision}" if fp32 else "") + ("_norm" if in_norm else ""),
                                extra={
                                    "label": label,
                                    "precision": precision if fp32 else None,
                                    "attrs": attrs,
                                    "smem_estimate": _smem(cfg, elem, block_k),
                                    # 16-bit and TF32 dots run on wgmma on Hopper.
                                    "expect_hgmma": tuned_arch(arch) == 90 and label != "fp32-ieee",
                                    # The softmax's row max is NaN-dropping max.f32; the result is
                                    # still torch's (see the kernel's comment at tl.max).
                                    **(
                                        {"nan_dropping_ok": "softmax row max: a NaN logit still makes the row NaN"}
                                        if activation == "softmax"
                                        else {}
                                    ),
                                },
                            )
                        )
    return specs
