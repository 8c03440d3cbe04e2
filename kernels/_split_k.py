"""What the backward GEMMs of ``upconv2x2_bwd.py`` and ``head1x1_bwd.py`` share.

Notation: ``T(x)[n, c, h, w] = max(x*scale[c] + shift[c], 0)`` in fp32, rounded to ``x.dtype``,
when a norm ``(scale, shift)`` (fp32 ``[C]``) is given -- the BatchNorm+ReLU the forward kernels
apply on load (``IN_NORM``) -- and the identity otherwise.

The weight gradients reduce over every pixel, so the pixel range is split across ``SPLIT_K``
programs per output tile. Each split writes its fp32 partial to its own slice of a workspace and
``_sum_splits_kernel`` adds the slices in a fixed order (no atomics): the result does not depend
on scheduling, so repeated calls give the same bits (for one config).

Here: the split reduction (kernel, split count, compile spec), the config filters and the tuner
glue for the four kernel kinds ("dgrad", "wgrad": the upconv's; "head_wgrad", "head_dgrad": the
head's), the launchers' input checks, and the compile-spec helpers. Each family module keeps its
own kernels, config lists, launchers and ``compile_specs``.

Offline compile report: ``compile_specs(arch)`` (the split reduction).
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
    interpreting,
    launch,
    next_pow2,
    sm_count,
    smem_limit,
    triton_dtype,
)
from ._tuning import Plans, Tuner, launch_meta
from .norm_act import check_norm_affine

# Pixel indices are int32 in the kernels; the headroom covers the last tile's lanes and the last
# split's overshoot (at most SPLIT_K * BLOCK_K past the pixel count).
_MAX_PIXELS = 2**31 - 2**20
INT32_MAX = 2**31 - 1
# Weight-gradient splits: at most MAX_SPLIT_K, each with at least _MIN_K_STEPS steps of 64
# pixels, and a workspace of at most _WS_BYTES.
MAX_SPLIT_K = 128
MAX_SPLIT_K_HEAD = 512  # the head's dW is one or a few tiles: more splits are needed to fill SMs
_MIN_K_STEPS = 16
_WS_BYTES = 256 * 2**20
# In the interpreter a fixed split of 2 keeps the workspace and reduction path under test.
_INTERPRETER_SPLIT_K = 2
# Split reduction tile (elementwise over the weight; not tuned, so its order never changes).
_RED_BLOCK, _RED_WARPS = 1024, 4


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
# Config filters and tuner glue: each family keeps its own lists; these prune them per call by
# shared memory (dtype), by register footprint for 4-byte operands, and by tiles far wider than
# the problem.
# --------------------------------------------------------------------------------------------


Cfg = GemmConfig

# 4-byte operands take twice the registers of 16-bit ones; past this many accumulator plus
# operand words per thread ptxas spills (the forward's measured limit).
_MAX_WORDS_PER_THREAD_FP32 = 96
# The weight gradients' B tile (pixels x channels) passes through registers for the transform;
# with 4-byte operands past this many of its words per thread ptxas spilled on sm_90 (the head's
# 64-channel x 128-pixel tile on 4 warps in TF32: 64 words, 276 B to 7.5 KiB of spills).
_MAX_B_WORDS_PER_THREAD_FP32 = 32

# The interpreter runs one small fixed tile per kernel: autotuning there would only cost time.
_INTERPRETER_CFG = Cfg(16, 16, 16, 4, 1)


def usable_configs(kind: str, candidates, arch: int, elem: int, block_cls: int = 16) -> list[Cfg]:
    """The ``candidates`` (kind ``kind``'s tuned list) a device of compute capability ``arch`` may
    run for this element size: the list minus what overflows shared memory or (4-byte operands)
    the register budget. ``block_cls`` is the head weight grad's class tile. Never empty."""
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


def triton_config(kind: str, c: Cfg) -> triton.Config:
    if kind == "head_wgrad":
        meta = {"BLOCK_C": c.BLOCK_N, "BLOCK_P": c.BLOCK_K}
    elif kind == "head_dgrad":
        meta = {"BLOCK_P": c.BLOCK_M, "BLOCK_C": c.BLOCK_N}
    else:
        meta = {"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K}
    return triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages)


def _prune(configs, shape: dict, arch: int, *, kind: str, usable) -> list:
    """Keep what fits ``usable`` (the family's ``usable_configs(kind, arch, elem, precision,
    block_cls)``), minus tiles far wider than the problem. ``shape``: ``elem``,
    ``INPUT_PRECISION``, the channel counts and (head_wgrad) ``BLOCK_K``."""
    if kind == "head_dgrad":
        elem, precision, caps = 2, "ieee", {"BLOCK_C": shape["C"]}
        usable = [triton_config(kind, c) for c in usable(kind, arch, elem, precision)]
    else:
        elem, precision = shape["elem"], shape["INPUT_PRECISION"]
        block_cls = shape.get("BLOCK_K", 16) if kind == "head_wgrad" else 16
        usable = [triton_config(kind, c) for c in usable(kind, arch, elem, precision, block_cls)]
        if kind == "dgrad":
            caps = {"BLOCK_N": shape["C_in"]}
        elif kind == "wgrad":
            caps = {"BLOCK_M": shape["C_out"], "BLOCK_N": shape["C_in"]}
        else:
            caps = {"BLOCK_C": shape["C"]}
    usable = [c for c in configs if any(c.kwargs == u.kwargs and c.num_warps == u.num_warps for u in usable)]
    narrow = [c for c in usable if all(c.kwargs[k] <= max(64, next_pow2(v)) for k, v in caps.items())]
    return narrow or usable or list(configs)[:1]


def _all_configs(kind: str, arch: int, config_list) -> list:
    """Every tile of ``kind`` on ``arch`` over the element sizes and precisions, each once
    (``config_list(kind, arch, elem, precision)``: the family's tuned lists)."""
    configs = []
    for elem, precision in ((2, "ieee"), (4, "tf32"), (4, "ieee")):
        for c in config_list(kind, arch, elem, precision):
            tc = triton_config(kind, c)
            if not any(tc.kwargs == o.kwargs and tc.num_warps == o.num_warps for o in configs):
                configs.append(tc)
    return configs


def make_tuner(kind: str, config_list, usable) -> Tuner:
    """The tuner of kernel ``kind``, named after the module that launches it (``upconv2x2_bwd.dgrad``,
    ``head1x1_bwd.wgrad``, ...): the name keys persisted tuning caches and
    ``tests/test_tuned_configs.py``."""

    def prune(configs, shape, arch):
        return _prune(configs, shape, arch, kind=kind, usable=usable)

    return Tuner(
        f"head1x1_bwd.{kind[len('head_') :]}" if kind.startswith("head_") else f"upconv2x2_bwd.{kind}",
        {arch: _all_configs(kind, arch, config_list) for arch in (80, 90)},
        prune,
        lambda cfg, shape: math.prod(shape["tiles"](cfg.kwargs)),
        lambda shape: triton_config(kind, _INTERPRETER_CFG),
    )


def run_tuned(
    kernel, tuner: Tuner, ref: Tensor, key: tuple, grid, args: tuple, flags: dict, shape: dict, exact: tuple = ()
) -> None:
    """Launch ``kernel`` with ``tuner``'s config for ``key`` (see ``_tuning``); ``grid(meta)``
    gives the launch grid; ``shape`` the pruning inputs (channel counts) and ``tiles(meta)``, the
    grid at the bucketed pixel count (for the rule). ``exact``: the sizes ``grid`` reads that
    ``key`` only buckets (the pixel count); with the key, dtype, device and flags they decide the
    launch plan (grid and meta-parameters, ``_PLANS``)."""
    tuning_key = (ref.dtype, *key, *flags.values())
    plan_key = (tuner.name, ref.device, tuning_key, exact)

    def make():
        pruning = {**shape, "elem": ref.element_size(), **flags}

        def plan_for(cfg):
            return grid(cfg.kwargs), {**flags, **launch_meta(cfg)}

        return _PLANS.make(plan_key, tuner, ref.device, tuning_key, lambda: pruning, kernel, args, plan_for)

    grid_now, meta = _PLANS.get(plan_key) or make()
    launch(kernel, grid_now, args, meta)


# Launch plans per operand signature (``_tuning.Plans``) of every kernel launched by ``run_tuned``.
_PLANS = Plans()


def pick_split_k(device: torch.device, p: int, tiles: int, slice_bytes: int, cap: int) -> int:
    """How many pixel splits: about two programs per SM over ``tiles`` output tiles, while every
    split keeps at least _MIN_K_STEPS steps of 64 pixels and the workspace stays under _WS_BYTES."""
    if interpreting():
        return _INTERPRETER_SPLIT_K
    sms = sm_count(device)
    want = cdiv(2 * sms, max(tiles, 1))
    by_k = cdiv(p, 64) // _MIN_K_STEPS
    by_ws = _WS_BYTES // max(slice_bytes, 1)
    return max(1, min(want, by_k, by_ws, cap))


def reduce_splits(ws: Tensor, out: Tensor, dims: tuple[int, int, int, int], out_strides: tuple) -> None:
    """``out`` (viewed as ``dims`` with ``out_strides``) = sum of ws's slices, in order."""
    total = dims[0] * dims[1] * dims[2] * dims[3]
    launch(
        _sum_splits_kernel, (cdiv(total, _RED_BLOCK),),
        (ws, out, *dims, ws.shape[0], ws.stride(0), *out_strides), dict(BLOCK=_RED_BLOCK, num_warps=_RED_WARPS),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_device(ref: Tensor, op: str) -> None:
    if not can_launch(ref.device):
        raise ValueError(f"{op} runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {ref.device}")


def check_same_device(ref_name: str, ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, {ref_name} on {ref.device}")


def check_activation(name: str, t, dtype: torch.dtype, dims: str) -> None:
    check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} must match the gradient's dtype {dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be {dims}, got shape {tuple(t.shape)}")


def check_grad(name: str, t, dims: str) -> None:
    check_tensor(name, t)
    triton_dtype(t.dtype)  # TypeError for anything but fp32/fp16/bf16
    if t.dim() != 4:
        raise ValueError(f"{name} must be {dims}, got shape {tuple(t.shape)}")


def check_norm(norm, C: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Validate ``x_norm``: None or ``(scale, shift)`` fp32 ``[C]``; returns contiguous copies."""
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"x_norm must be None or a (scale, shift) tuple of tensors, got {type(norm).__name__}")
    if norm[0] is None or norm[1] is None:
        raise TypeError("x_norm must hold two tensors (scale, shift), got None")
    return check_norm_affine(norm[0], norm[1], C, x, names=("x_norm scale", "x_norm shift"))


def check_out(out, shape: tuple[int, ...], dtype: torch.dtype, ref: Tensor) -> None:
    if out is None:
        return
    check_tensor("out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out dtype {out.dtype} must be {dtype}")
    if out.device != ref.device:
        raise ValueError(f"out is on {out.device}, expected {ref.device}")


def check_pixels(p: int) -> None:
    if p > _MAX_PIXELS:
        raise ValueError(f"{p} pixels exceed the int32 pixel index (at most {_MAX_PIXELS})")


# --------------------------------------------------------------------------------------------
# Offline compile specs (benchmarks/kernel_report.py)
# --------------------------------------------------------------------------------------------

# In the fast layout (NHWC activations, packed upconv weight, contiguous dW or workspace) these
# strides are 1, and Triton's launcher specializes an int equal to 1 into a constexpr.
UNIT_STRIDES = {
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


def _signature(fn, act: str, w_dtype: str, constexprs: dict, *, out_act: bool) -> dict[str, str]:
    """``out_act``: the kernel writes ``out_ptr`` in the activations' dtype (the input grads);
    the weight grads write fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("g_ptr", "gz_ptr", "x_ptr") or (name == "out_ptr" and out_act):
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


def spec(kind, fn, act, w_dtype, constexprs, cfg, config, *, hgmma, variant) -> KernelSpec:
    sig = _signature(fn, act, w_dtype, constexprs, out_act=kind in ("dgrad", "head_dgrad"))
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


def expect_wgmma(arch: int, dtype: str, precision: str, cfg: Cfg) -> bool:
    """16-bit and TF32 dots with >= 64-row tiles and whole warpgroups lower to wgmma on sm_90;
    IEEE fp32 dots run on FMA units."""
    fast = dtype != "fp32" or precision == "tf32"
    return arch >= 90 and fast and cfg.BLOCK_M >= 64 and cfg.num_warps in (4, 8)


def compile_specs(arch: int) -> list[KernelSpec]:
    """The split reduction's spec (one: fp32 workspace whatever the activations' dtype)."""
    specs: list[KernelSpec] = []
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
