"""ConvTranspose2d(kernel_size=2, stride=2) as one GEMM with a scattering epilogue.

With stride equal to the kernel size every output pixel receives exactly one tap, so

    out[n, co, 2i+di, 2j+dj] = bias[co] + sum_ci x[n, ci, i, j] * weight[ci, co, di, dj]

is a GEMM ``A [M = N*h*w, K = C_in] @ B [K = C_in, 4*C_out]`` whose column index is the
phase ``(di, dj)`` followed by ``co``; the epilogue adds the bias and writes each phase to
its own ``(2i+di, 2j+dj)`` pixel. Nothing is concatenated here: the decoder conv reads the
upsampled tensor and the skip tensor as two K sources, so this kernel is a pure upsample.

Each program owns one ``(BLOCK_M pixels) x (one phase, BLOCK_N output channels)`` tile, so
its B tile is ``weight[:, co:co+BLOCK_N, di, dj]`` -- contiguous along ``co`` once the weight
is packed ``[C_in, 2, 2, C_out]`` (``pack_upconv2x2_weight``) -- and its stores are
contiguous along ``co`` in a channels_last output.

Training path (``IN_NORM``): x is a conv's raw pre-BatchNorm output ``z`` and each A tile is
replaced by ``T(z) = max(z*scale[ci] + shift[ci], 0)`` (fp32, rounded back to z's dtype for the
dot) between its load and the dot, so the result equals upsampling a materialized BN+ReLU output.
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
    check_bias,
    check_out,
    dot_precision,
    gemm_smem,
    launch,
    smem_limit,
    triton_dtype,
    tuned_arch,
)
from ._tuning import Plans, Tuner, bucket, launch_meta
from .norm_act import affine_relu, check_norm_affine

__all__ = ["pack_upconv2x2_weight", "upconv2x2", "compile_specs"]

# Pixel indices are int32 in the kernel; headroom keeps the last tile's lanes from wrapping.
_MAX_PIXELS = 2**31 - 2**16


@triton.jit(do_not_specialize=("N",))
def _upconv2x2_kernel(
    x_ptr,  # [N, C_in, h, w], any strides (channels_last is the fast layout)
    w_ptr,  # [C_in, C_out, 2, 2], any strides (packed [C_in, 2, 2, C_out] is the fast one)
    b_ptr,  # [C_out], any float dtype, read as fp32 (unused unless HAS_BIAS)
    out_ptr,  # [N, C_out, 2h, 2w], any strides, same dtype as x
    scale_ptr,  # [C_in] fp32, contiguous (unused unless IN_NORM)
    shift_ptr,  # [C_in] fp32, contiguous (unused unless IN_NORM)
    N,
    h,
    w,
    C_in,
    C_out,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wi,
    stride_wo,
    stride_wh,
    stride_ww,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    HAS_BIAS: tl.constexpr,
    IN_NORM: tl.constexpr,  # multiply T(x) = max(x*scale + shift, 0) instead of x
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; only read for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``out = x @ W + bias`` (``T(x)`` with IN_NORM)
    scattered to stride-2 pixels.

    FLOPs: ``2 * N*h*w * C_in * 4*C_out``. Minimum bytes moved:
    ``(N*h*w*C_in + C_in*4*C_out + N*4*h*w*C_out) * elem`` (x read, weight read, out written
    once); A tiles are re-read once per (phase, channel block), mostly from L2 because the
    column tiles of one pixel tile run on neighbouring program ids.
    """
    pid = tl.program_id(0)
    num_co_blocks = tl.cdiv(C_out, BLOCK_N)
    num_pid_n = 4 * num_co_blocks
    # Column tiles vary fastest so the programs that share an A tile run together (L2 reuse).
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    phase = pid_n // num_co_blocks  # di * 2 + dj
    di = phase // 2
    dj = phase % 2

    hw = h * w
    M = N * hw  # < 2**31, checked by the launcher
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] input pixel index
    mask_m = offs_m < M
    # int64 before the stride products: activations can exceed 2**31 elements.
    n_idx = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    i_idx = (rem // w).to(tl.int64)
    j_idx = (rem % w).to(tl.int64)
    x_row = n_idx * stride_xn + i_idx * stride_xh + j_idx * stride_xw  # [BLOCK_M]

    offs_co = (pid_n % num_co_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_co = offs_co < C_out
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    x_ptrs = x_ptr + (x_row[:, None] + offs_k[None, :] * stride_xc)  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + (
        offs_k[:, None] * stride_wi + (di * stride_wh + dj * stride_ww + offs_co * stride_wo)[None, :]
    )  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, C_in, BLOCK_K):
        mask_k = offs_k < C_in - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        if IN_NORM:
            scale = tl.load(scale_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BLOCK_K]
            shift = tl.load(shift_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            # Padded K lanes become T(0) = 0 here (scale = shift = 0), and b is 0 there anyway.
            a = affine_relu(a, scale, shift).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xc
        w_ptrs += BLOCK_K * stride_wi

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=mask_co, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc += bias[None, :]

    # Scatter: input pixel (i, j) of phase (di, dj) lands on output pixel (2i+di, 2j+dj).
    out_row = n_idx * stride_on + (2 * i_idx + di) * stride_oh + (2 * j_idx + dj) * stride_ow
    out_ptrs = out_ptr + (out_row[:, None] + offs_co[None, :] * stride_oc)  # [BLOCK_M, BLOCK_N]
    tl.store(
        out_ptrs,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_co[None, :],
    )


# --------------------------------------------------------------------------------------
# Configs: short explicit lists per architecture. BLOCK_M >= 64 with 4/8 warps keeps 16-bit
# (and TF32) dots on wgmma on sm_90. Pruned per call by shared memory (dtype), by register
# footprint for 4-byte operands, and by BLOCK_N > C_out (a wider tile only multiplies zeros).
# --------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Tensor-core dots: fp16/bf16, and fp32 as TF32.
_CONFIGS = {
    90: [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 32, 8, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 3),
    ],
    80: [
        _cfg(128, 128, 32, 4, 4),
        _cfg(128, 128, 32, 8, 3),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 3),
    ],
}

# fp32 with allow_tf32=False runs tl.dot on FMA units, where every thread holds its slice of
# both operand tiles in registers: BLOCK_K 32/64 spills there, so IEEE gets its own list.
_IEEE_CONFIGS = {
    90: [
        _cfg(128, 128, 16, 8, 3),
        _cfg(128, 64, 16, 4, 3),
        _cfg(64, 128, 16, 4, 3),
        _cfg(64, 64, 32, 4, 3),
    ],
    80: [
        _cfg(128, 128, 16, 8, 3),
        _cfg(128, 64, 16, 4, 3),
        _cfg(64, 128, 16, 4, 3),
        _cfg(64, 64, 32, 4, 3),
    ],
}

# TF32 operands take twice the registers of 16-bit ones; past this many accumulator plus
# A-fragment words per thread ptxas spills (measured with the sm_80/sm_90 compile report).
_MAX_WORDS_PER_THREAD_FP32 = 96

# IN_NORM holds the A tile in fp32 registers between its load and the dot: at 64 such words
# per thread (BLOCK_M=128, BLOCK_K=64, 4 warps) ptxas spilled on sm_90 for 16-bit inputs.
_MAX_NORM_A_WORDS_PER_THREAD = 32

# IN_NORM tiles the sm_80 compile report (triton 3.6) found at the 255-register limit with
# spills (8-32 B for 16-bit at 128x128x32 on 4 warps; 48 B for TF32 at 64x64x64), as (tuned arch,
# config name, element bytes). upconv_nearest2x2 excludes the same tiles.
_NORM_SPILLS = {(80, "BM128_BN128_BK32_w4_s4", 2), (80, "BM64_BN64_BK64_w4_s3", 4)}

# The interpreter does not autotune: one small config keeps CPU runs quick.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


def _config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BM{k['BLOCK_M']}_BN{k['BLOCK_N']}_BK{k['BLOCK_K']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _smem_bytes(cfg: triton.Config, elem_bytes: int) -> int:
    """The pruning's shared-memory estimate (``gemm_smem``: pipeline or staged fp32 result)."""
    return gemm_smem(cfg, elem_bytes, out_bytes=4)


def _usable_configs(arch: int, elem_bytes: int, precision: str, in_norm: bool = False) -> list[triton.Config]:
    """The configs a device of compute capability ``arch`` may run for this dtype (element
    size), dot precision and input transform: its tuned list, minus what overflows its shared
    memory or the register budget (4-byte operands; the fp32 A tile of IN_NORM). Never empty:
    the smallest tile is kept as a last resort."""
    ieee32 = elem_bytes == 4 and precision == "ieee"
    candidates = (_IEEE_CONFIGS if ieee32 else _CONFIGS)[tuned_arch(arch)]
    usable = []
    for c in candidates:
        k = c.kwargs
        if _smem_bytes(c, elem_bytes) > smem_limit(arch):
            continue
        words = (k["BLOCK_M"] * k["BLOCK_N"] + k["BLOCK_M"] * k["BLOCK_K"]) // (32 * c.num_warps)
        if elem_bytes == 4 and words > _MAX_WORDS_PER_THREAD_FP32:
            continue
        if in_norm and k["BLOCK_M"] * k["BLOCK_K"] > _MAX_NORM_A_WORDS_PER_THREAD * 32 * c.num_warps:
            continue
        if in_norm and (tuned_arch(arch), _config_name(c), elem_bytes) in _NORM_SPILLS:
            continue
        usable.append(c)
    return usable or [min(candidates, key=lambda c: _smem_bytes(c, elem_bytes))]


def _prune_configs(configs, shape: dict, arch: int) -> list:
    usable = _usable_configs(arch, shape["elem"], shape["INPUT_PRECISION"], shape["IN_NORM"])
    usable = [c for c in configs if c in usable]
    narrow = [c for c in usable if c.kwargs["BLOCK_N"] <= max(shape["C_out"], 64)]
    return narrow or usable


def _tiles(cfg, shape: dict) -> int:
    return cdiv(shape["M"], cfg.kwargs["BLOCK_M"]) * 4 * cdiv(shape["C_out"], cfg.kwargs["BLOCK_N"])


def _interpreter_config(shape: dict) -> triton.Config:
    return triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1)


# fp32 IEEE dots have their own list (see _IEEE_CONFIGS), so they get their own tuner.
_TUNERS = {
    "tc": Tuner("upconv2x2", _CONFIGS, _prune_configs, _tiles, _interpreter_config),
    "ieee": Tuner("upconv2x2.ieee", _IEEE_CONFIGS, _prune_configs, _tiles, _interpreter_config),
}


def _tuner(elem_bytes: int, precision: str) -> Tuner:
    return _TUNERS["ieee" if elem_bytes == 4 and precision == "ieee" else "tc"]


def _tuned_configs(arch: int, elem_bytes: int, precision: str, in_norm: bool) -> list[triton.Config]:
    """What the launcher's tuner can pick on ``arch`` for this dtype, precision and transform,
    over every output width (``_specs``; the pruning does not read the pixel count)."""
    base = {"elem": elem_bytes, "INPUT_PRECISION": precision, "IN_NORM": in_norm}
    shapes = _specs.shape_grid(base, M=_specs.FEW_PIXEL_BUCKETS, C_out=(*_specs.SMALL_CHANNELS, *_specs.CHANNELS))
    return _specs.tuned_configs(_tuner(elem_bytes, precision), arch, shapes)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def pack_upconv2x2_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Repack a ConvTranspose2d weight for the fast path, cast to ``dtype`` (default: its own).

    ``weight`` is ``[C_in, C_out, 2, 2]`` (``nn.ConvTranspose2d`` layout). Returns a tensor of
    the same logical shape and values whose storage is ``[C_in, 2, 2, C_out]`` contiguous, so
    the GEMM B operand ``[C_in, (di, dj, co)]`` is read along contiguous ``co``.
    Differentiable (one copy: cast and permute together).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must be [C_in, C_out, 2, 2], got {tuple(weight.shape)}")
    c_in, c_out = weight.shape[:2]
    # The strides of a contiguous [C_in, 2, 2, C_out] seen as [C_in, C_out, 2, 2]: allocated so
    # (two torch ops, not four).
    packed = weight.new_empty_strided(
        (c_in, c_out, 2, 2), (4 * c_out, 1, 2 * c_out, c_out), dtype=dtype or weight.dtype
    )
    return packed.copy_(weight)


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
    if weight.dim() != 4 or weight.shape[0] != C_in or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must be [C_in={C_in}, C_out, 2, 2], got shape {tuple(weight.shape)}")
    C_out = weight.shape[1]
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if not can_launch(x.device):
        raise ValueError(f"upconv2x2 runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    check_bias(bias, C_out, x)
    check_out(out, (N, C_out, 2 * h, 2 * w), x)
    if N * h * w > _MAX_PIXELS:
        raise ValueError(f"N*h*w = {N * h * w} pixels exceeds the int32 pixel index")
    return (N, C_in, h, w, C_out), check_norm_affine(in_scale, in_shift, C_in, x)


def upconv2x2(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for a 2x2 kernel, as one GEMM.

    Args:
        x: ``[N, C_in, h, w]`` float32/float16/bfloat16, any strides (channels_last is fast;
            a channel slice of a larger NHWC buffer is fine).
        weight: ``[C_in, C_out, 2, 2]`` in ``x.dtype``, any strides; packed by
            ``pack_upconv2x2_weight`` (storage ``[C_in, 2, 2, C_out]``) is the fast layout.
        bias: ``[C_out]`` of any float dtype (read as fp32), or None.
        in_scale, in_shift: optional fp32 ``[C_in]`` (both or neither): upsample
            ``T(x) = max(x*in_scale[ci] + in_shift[ci], 0)`` (fp32 math, rounded to ``x.dtype``)
            instead of x -- a BatchNorm+ReLU applied as x is read.
        out: optional ``[N, C_out, 2h, 2w]`` destination in ``x.dtype``, any strides (e.g. a
            channel slice of a larger NHWC buffer). Default: a new channels_last tensor.

    Accumulates in fp32; fp32 inputs use TF32 dots iff ``torch.backends.cudnn.allow_tf32``.
    Returns ``out``.
    """
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
    plan_key = (
        x.dtype, x.device, M, C_in, C_out, bias is None, norm is None,
        dot_precision(x.dtype),
    )  # fmt: skip
    grid, meta = _PLANS.get(plan_key) or _plan(plan_key, x, args)
    launch(_upconv2x2_kernel, grid, args, meta)
    return out


# Launch plans per operand signature (``_tuning.Plans``): the pick's grid and meta-parameters.
_PLANS = Plans()


def _plan(plan_key: tuple, x: torch.Tensor, args: tuple) -> tuple:
    """``(grid, meta)`` of ``upconv2x2``'s launch on ``args`` (the tuner times candidates on
    them when it must), kept in ``_PLANS`` when the pick is settled."""
    _, _, M, C_in, C_out, no_bias, no_norm, precision = plan_key
    flags = {"HAS_BIAS": not no_bias, "IN_NORM": not no_norm, "INPUT_PRECISION": precision}
    m_bucket = bucket(M)

    def plan_for(cfg):
        grid = (cdiv(M, cfg.kwargs["BLOCK_M"]) * 4 * cdiv(C_out, cfg.kwargs["BLOCK_N"]),)
        return grid, {**flags, **launch_meta(cfg)}

    def shape():
        return {
            "M": m_bucket, "C_out": C_out, "elem": x.element_size(),
            "INPUT_PRECISION": flags["INPUT_PRECISION"], "IN_NORM": flags["IN_NORM"],
        }  # fmt: skip

    key = (x.dtype, m_bucket, C_in, C_out, *flags.values())
    tuner = _tuner(x.element_size(), flags["INPUT_PRECISION"])
    return _PLANS.make(plan_key, tuner, x.device, key, shape, _upconv2x2_kernel, args, plan_for)


# --------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (config, dtype, precision, IN_NORM) the launcher can run on ``arch`` after pruning.

    The signature describes the fast path: channels_last activations and a packed weight,
    whose unit strides (``stride_xc``, ``stride_wo``, ``stride_oc``) Triton specializes to
    the constant 1; every other stride and size is an ``i32``; bias is fp32.
    ``extra["attrs"]`` holds the divisibility-by-16 hints the JIT would add at U-Net sizes
    (pass it as ``ASTSource``'s fourth argument; without it 16-bit loads are not pipelined).
    """
    # What the JIT sees at U-Net sizes: 16-byte aligned pointers, channel counts and every
    # non-unit stride divisible by 16 (that is what lets 16-bit tiles load with cp.async).
    aligned = (
        "x_ptr",
        "w_ptr",
        "b_ptr",
        "out_ptr",
        "scale_ptr",
        "shift_ptr",
        "C_in",
        "C_out",
        "stride_xn",
        "stride_xh",
        "stride_xw",
        "stride_wi",
        "stride_wh",
        "stride_ww",
        "stride_on",
        "stride_oh",
        "stride_ow",
    )
    attrs = {(_upconv2x2_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tt = triton_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            for in_norm in (False, True):
                for cfg in _tuned_configs(arch, elem, precision, in_norm):
                    signature = {
                        "x_ptr": f"*{tt}",
                        "w_ptr": f"*{tt}",
                        "b_ptr": "*fp32",
                        "out_ptr": f"*{tt}",
                        "scale_ptr": "*fp64" if in_norm else "*fp32",
                        "shift_ptr": "*fp64" if in_norm else "*fp32",
                        **{n: "i32" for n in ("N", "h", "w", "C_in", "C_out")},
                        **{
                            n: "i32"
                            for n in (
                                "stride_xn",
                                "stride_xh",
                                "stride_xw",
                                "stride_wi",
                                "stride_wh",
                                "stride_ww",
                                "stride_on",
                                "stride_oh",
                                "stride_ow",
                            )
                        },
                        **{
                            n: "constexpr"
                            for n in ("stride_xc", "stride_wo", "stride_oc")
                            + ("HAS_BIAS", "IN_NORM", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K")
                        },
                    }
                    constexprs = {
                        "stride_xc": 1,
                        "stride_wo": 1,
                        "stride_oc": 1,
                        "HAS_BIAS": True,
                        "IN_NORM": in_norm,
                        "INPUT_PRECISION": precision,
                        **cfg.kwargs,
                    }
                    fp32 = dtype == torch.float32
                    label = f"fp32-{precision}" if fp32 else tt
                    specs.append(
                        KernelSpec(
                            kernel="_upconv2x2_kernel",
                            fn=_upconv2x2_kernel,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            dtype=tt,
                            config=_config_name(cfg) + (f"_{precision}" if fp32 else "") + ("_norm" if in_norm else ""),
                            extra={
                                "precision": precision if fp32 else None,
                                "label": label,
                                "smem_estimate": _smem_bytes(cfg, elem),
                                # 16-bit and TF32 dots run on wgmma on Hopper; IEEE fp32 on FMA.
                                "expect_hgmma": tuned_arch(arch) == 90 and label != "fp32-ieee",
                                "attrs": attrs,  # ASTSource(fn, signature, constexprs, attrs)
                            },
                        )
                    )
    return specs
