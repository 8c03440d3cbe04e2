"""BatchNorm's per-channel arithmetic on the training path: affine, running statistics and the
backward through the batch statistics, each one launch instead of a dozen tiny torch ops.

A training conv (``conv3x3.conv3x3_bn_stats``) returns its raw output ``z`` and the batch
``mean``/``var`` of it. What a ``BatchNorm2d`` does with those is vector arithmetic over C
channels, and elementwise arithmetic over z in the backward:

* ``bn_train_fold_``: the whole forward finalize of a training BatchNorm in one launch
  (``_bn_fold_kernel``): the affine ``scale = w * rstd``, ``shift = b - mean * scale`` with
  ``rstd = 1/sqrt(var + eps)``, so ``bn(z) = z * scale + shift``, and ``nn.BatchNorm2d``'s
  running-statistics update in place (momentum, or the cumulative average when momentum is
  None, from ``num_batches_tracked``, which it increments), with the unbiased variance ``var *
  n / (n - 1)``. All in fp64: C numbers, and the chain rule of the BatchNorm weight's gradient
  cancels against ``mean * dshift``, which fp64 keeps harmless. ``bn_affine`` and
  ``bn_running_update_`` are the same kernel with one half switched off (the per-op path of
  ``torch.compile``, where autograd needs the affine as a functional op of its own);
* ``bn_affine_backward``: from ``dL/dscale`` and ``dL/dshift`` (fp64) the gradients of mean,
  var, w and b (the chain rule of the affine);
* ``bn_stats_backward``: the statistics' gradients reaching z, ``g = gz + dmean/n + dvar * 2 *
  (z - mean)/n`` in fp32, stored in z's dtype, and ``sum g`` per channel (the conv bias's
  gradient) as deterministic tile partials summed in a fixed order.

Each of the vector kernels is one program walking every channel (C <= a few thousand: the
launch, not the arithmetic, is the cost); the elementwise one tiles pixels x channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import KernelSpec, can_launch, cdiv, interpreting, launch, next_pow2, triton_dtype
from .norm_act_bwd import _sum_partials_kernel

__all__ = [
    "bn_affine",
    "bn_affine_backward",
    "bn_running_update_",
    "bn_stats_backward",
    "bn_train_fold_",
    "compile_specs",
]

_BLOCK_C, _WARPS = 256, 4  # vector kernels: one program, channel blocks of this size
_EW_BLOCK_P, _EW_BLOCK_C, _EW_WARPS = 64, 64, 4  # bn_stats_backward's tile (memory bound, fixed)
_INTERPRETER_EW = (16, 16)
_SUM_BLOCK_R, _SUM_BLOCK_C = 64, 32
_MAX_PIXELS = 2**31 - 2**16
_NBT_DTYPES = (torch.int64, torch.int32)


@triton.jit(do_not_specialize=("count",))
def _bn_fold_kernel(
    mean_ptr, var_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, count_ptr, scale_ptr, shift_ptr,
    C, count, eps, momentum,
    AFFINE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_PTR: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """What ``nn.BatchNorm2d`` does in training with a batch ``mean`` and biased ``var``, in fp64:

        AFFINE:       scale = w / sqrt(var + eps),  shift = b - mean * scale
        HAS_NBT:      nbt += 1
        HAS_RUNNING:  f = momentum, or 1 / nbt when CUMULATIVE (momentum=None)
                      running_mean = (1 - f) * running_mean + f * mean
                      running_var  = (1 - f) * running_var + f * var * n / (n - 1)

    mean_ptr, var_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr [C] any float dtype (w, b read only with
    HAS_W / HAS_B: absent means 1 / 0; running buffers keep their dtype); nbt_ptr [1] int64;
    scale_ptr, shift_ptr [C] fp64 outputs. n: ``count`` (an integer argument, i64 past 2^31), or
    with COUNT_PTR the fp64 at count_ptr [1] (a synchronised BatchNorm's global count, known only
    on the device; n = 1 gives an infinite factor, as torch's). One program (grid (1,)): it
    reads num_batches_tracked before any write, so every channel uses the same factor; no max or
    min anywhere, so a NaN statistic stays NaN in every output.
    """
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
    if HAS_RUNNING:
        one = tl.full(
            [], 1.0, tl.float64
        )  # scalar arguments times this: fp64 (a .to() would not run in the interpreter)
        if CUMULATIVE:
            f = one / nbt.to(tl.float64)
        else:
            f = momentum * one
        if COUNT_PTR:
            n = tl.load(count_ptr).to(tl.float64)
        else:
            n = count * one
        unbias = n / (n - one)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        var = tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float64)
        if AFFINE:
            scale = 1.0 / tl.sqrt(var + eps)
            if HAS_W:
                scale = scale * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            shift = -mean * scale
            if HAS_B:
                shift = shift + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            tl.store(scale_ptr + offs, scale, mask=mask)
            tl.store(shift_ptr + offs, shift, mask=mask)
        if HAS_RUNNING:
            rm = tl.load(rm_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            rv = tl.load(rv_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            rm = rm * (1.0 - f) + mean * f
            rv = rv * (1.0 - f) + (var * unbias) * f
            tl.store(rm_ptr + offs, rm.to(rm_ptr.dtype.element_ty), mask=mask)
            tl.store(rv_ptr + offs, rv.to(rv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_affine_backward_kernel(
    gs_ptr, gt_ptr, mean_ptr, var_ptr, w_ptr, gmean_ptr, gvar_ptr, gw_ptr, gb_ptr, C, eps,
    HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The chain rule of ``_bn_fold_kernel``'s affine in fp64, from gs = dL/dscale and gt = dL/dshift:

        gb = gt,  gw = (gs - gt * mean) * rstd,  gmean = -gt * scale,
        gvar = -w * (gs - gt * mean) * rstd^3 / 2          (w = 1 without HAS_W)

    gs_ptr, gt_ptr [C] fp64; mean_ptr, var_ptr, w_ptr [C] any float dtype; outputs gmean_ptr,
    gvar_ptr in the dtype of mean/var (their pointers' element type), gw_ptr, gb_ptr fp64. Grid: (1,).
    """
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        gt = tl.load(gt_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        var = tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float64)
        rstd = 1.0 / tl.sqrt(var + eps)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float64)
        centred = gs - gt * mean
        tl.store(gb_ptr + offs, gt, mask=mask)
        tl.store(gw_ptr + offs, centred * rstd, mask=mask)
        tl.store(gmean_ptr + offs, (-gt * w * rstd).to(gmean_ptr.dtype.element_ty), mask=mask)
        gvar = -0.5 * w * centred * rstd * rstd * rstd
        tl.store(gvar_ptr + offs, gvar.to(gvar_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("N", "ROWS"))
def _bn_stats_backward_kernel(
    gz_ptr, z_ptr, mean_ptr, gmean_ptr, gvar_ptr, g_ptr, part_ptr,
    N, C, H, W, ROWS, inv_n,
    stride_gzn, stride_gzc, stride_gzh, stride_gzw,
    stride_zn, stride_zc, stride_zh, stride_zw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    HAS_GZ: tl.constexpr, HAS_GMEAN: tl.constexpr, HAS_GVAR: tl.constexpr, SUMS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """g = gz + gmean/n + gvar * 2 * (z - mean)/n per element (fp32, stored in g's dtype), and
    with SUMS this tile's per-channel sum of g into row ``pid_p`` of part_ptr [ROWS, C] fp32.

    gz_ptr, z_ptr, g_ptr [N, C, H, W] any strides; mean_ptr [C]; gmean_ptr, gvar_ptr [C] any
    float dtype (absent terms: HAS_*). Grid: (cdiv(N*H*W, BLOCK_P), cdiv(C, BLOCK_C)).
    Moves (2 + 1) * N*C*H*W elements (+ 4*ROWS*C bytes of partials).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    p_mask = offs_p < N * HW
    c_mask = offs_c < C
    mask = p_mask[:, None] & c_mask[None, :]
    img = offs_p // HW
    rem = offs_p - img * HW
    h = rem // W
    w = rem - h * W
    img64, h64, w64, c64 = img.to(tl.int64), h.to(tl.int64), w.to(tl.int64), offs_c.to(tl.int64)
    z_off = (img64 * stride_zn + h64 * stride_zh + w64 * stride_zw)[:, None] + (c64 * stride_zc)[None, :]
    g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if HAS_GZ:
        gz_off = (img64 * stride_gzn + h64 * stride_gzh + w64 * stride_gzw)[:, None] + (c64 * stride_gzc)[None, :]
        g += tl.load(gz_ptr + gz_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GMEAN:
        g += (tl.load(gmean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * inv_n)[None, :]
    if HAS_GVAR:
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        coef = tl.load(gvar_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * (2.0 * inv_n)
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        g += coef[None, :] * (z - mean[None, :])
    g_off = (img64 * stride_gn + h64 * stride_gh + w64 * stride_gw)[:, None] + (c64 * stride_gc)[None, :]
    g_out = g.to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + g_off, g_out, mask=mask)
    if SUMS:
        # The fp32 values before rounding, as the eager composite sums them.
        s = tl.sum(tl.where(mask, g, 0.0), axis=0)  # [BLOCK_C]
        tl.store(part_ptr + pid_p.to(tl.int64) * C + offs_c, s, mask=c_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _vec(name: str, t, c: int, device: torch.device) -> Tensor:
    """``t`` checked as a floating-point [c] vector on ``device`` (the first vector of a call is
    checked against ``can_launch`` by ``_first``); contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (c,):
        raise ValueError(f"{name} must be [{c}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t if t.is_contiguous() else t.contiguous()


def _first(name: str, t) -> tuple[Tensor, int]:
    """The call's first vector: a 1-D floating tensor on a device the kernels run on; returns it
    contiguous and its length."""
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [C]")
    if not can_launch(t.device):
        raise ValueError(f"{name}: BatchNorm kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1)")
    return _vec(name, t, t.shape[0], t.device), t.shape[0]


def bn_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` [C] fp64 with ``bn(z) = z * scale + shift`` for a BatchNorm of ``weight``,
    ``bias`` (None: 1 and 0) and ``eps`` normalizing with ``mean``, biased ``var`` [C]."""
    return bn_train_fold_(mean, var, weight, bias, eps, None, None, None, 0.0, 0)


def bn_affine_backward(
    gscale: Tensor, gshift: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``bn_affine``'s inputs from ``gscale``, ``gshift`` [C] fp64: returns
    ``(gmean, gvar, gweight, gbias)``: gmean/gvar in mean's/var's dtype, gweight/gbias fp64."""
    mean, c = _first("mean", mean)
    gs = _vec("gscale", gscale, c, mean.device)
    gt = _vec("gshift", gshift, c, mean.device)
    var = _vec("var", var, c, mean.device)
    w = _vec("weight", weight, c, mean.device) if weight is not None else mean
    gmean, gvar = torch.empty_like(mean), torch.empty_like(var)
    gw = torch.empty(c, device=mean.device, dtype=torch.float64)
    gb = torch.empty_like(gw)
    block = min(_BLOCK_C, next_pow2(max(c, 16)))
    args = (gs, gt, mean, var, w, gmean, gvar, gw, gb, c, float(eps))
    launch(_bn_affine_backward_kernel, (1,), args, dict(HAS_W=weight is not None, BLOCK_C=block))
    return gmean, gvar, gw, gb


def bn_running_update_(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    count: int,
    *,
    count_all: Tensor | None = None,
) -> None:
    """``nn.BatchNorm2d``'s running-statistics update from a batch ``mean`` and biased ``var``
    over ``count`` values per channel, in place (see ``_bn_fold_kernel``). ``momentum``
    None: the cumulative average over ``num_batches_tracked`` (then required). ``count_all``: a
    one-element float64 tensor on mean's device that replaces ``count`` (read by the kernel)."""
    _fold(mean, var, None, None, 0.0, running_mean, running_var, num_batches_tracked, momentum, count, count_all, False)


def bn_train_fold_(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    count: int,
    *,
    count_all: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``bn_running_update_`` and ``bn_affine`` in one launch: updates the running buffers (those
    given) in place and returns ``(scale, shift)`` [C] fp64. Arguments as those two take them;
    ``count`` (an int, any size) is only read for the running variance (>= 2 there)."""
    return _fold(mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, count,
                 count_all, True)  # fmt: skip


def _fold(mean, var, weight, bias, eps, running_mean, running_var, nbt, momentum, count, count_all, affine):
    """Check the arguments of ``bn_train_fold_`` (``affine``: scale/shift wanted) and launch
    ``_bn_fold_kernel``; ``(scale, shift)`` or None."""
    mean, c = _first("mean", mean)
    dev = mean.device
    var = _vec("var", var, c, dev)
    has_running = running_mean is not None
    if has_running != (running_var is not None):
        raise ValueError("give both running_mean and running_var, or neither")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and _vec(name, t, c, dev) is not t:
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if nbt is not None and (
        not isinstance(nbt, Tensor) or nbt.numel() != 1 or nbt.dtype not in _NBT_DTYPES or nbt.device != dev
    ):
        raise ValueError(f"num_batches_tracked must be a one-element int64 or int32 tensor on {dev}")
    if momentum is None and has_running and nbt is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if count_all is not None:
        if not isinstance(count_all, Tensor) or count_all.numel() != 1 or count_all.dtype != torch.float64:
            raise ValueError("count_all must be a one-element float64 tensor")
        if count_all.device != dev:
            raise ValueError(f"count_all is on {count_all.device}, expected {dev}")
    elif has_running and count < 2:
        # nn.BatchNorm2d refuses one value per channel in training (its unbiased variance is inf)
        raise ValueError(f"the unbiased running variance needs more than 1 value per channel, got {count}")
    scale = shift = None
    if affine:
        w = _vec("weight", weight, c, dev) if weight is not None else mean
        b = _vec("bias", bias, c, dev) if bias is not None else mean
        scale = torch.empty(c, device=dev, dtype=torch.float64)
        shift = torch.empty_like(scale)
    elif not has_running and nbt is None:
        return None
    flags = dict(
        AFFINE=affine, HAS_W=affine and weight is not None, HAS_B=affine and bias is not None,
        HAS_RUNNING=has_running, HAS_NBT=nbt is not None, CUMULATIVE=momentum is None,
        COUNT_PTR=count_all is not None, BLOCK_C=min(_BLOCK_C, next_pow2(max(c, 16))), num_warps=_WARPS,
    )  # fmt: skip
    args = (
        mean, var, w if affine else mean, b if affine else mean, running_mean if has_running else mean,
        running_var if has_running else mean, nbt if nbt is not None else mean,
        count_all if count_all is not None else mean, scale if affine else mean, shift if affine else mean,
        c, int(count), float(eps), float(momentum or 0.0),
    )  # fmt: skip
    launch(_bn_fold_kernel, (1,), args, flags)
    return (scale, shift) if affine else None


def bn_stats_backward(
    gz: Tensor | None,
    z: Tensor,
    mean: Tensor,
    gmean: Tensor | None,
    gvar: Tensor | None,
    *,
    with_sum: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gradient reaching z [N, C, H, W] through its batch statistics, plus its own gradient gz:
    ``g = gz + gmean/n + gvar * 2 * (z - mean)/n`` (n = N*H*W; absent terms are zero), stored
    channels_last in z's dtype, and, with ``with_sum``, ``sum g`` per channel [C] fp32
    (deterministic). Returns ``(g, sum_g or None)``."""
    if not isinstance(z, Tensor) or z.dim() != 4:
        raise ValueError("z must be a 4-D tensor [N, C, H, W]")
    triton_dtype(z.dtype)
    n, c, h, w = z.shape
    if gz is not None and (tuple(gz.shape) != tuple(z.shape) or gz.device != z.device):
        raise ValueError(f"gz must be like z {tuple(z.shape)}, got {tuple(gz.shape)}")
    mean = _vec("mean", mean, c, z.device)
    gmean = _vec("gmean", gmean, c, z.device) if gmean is not None else None
    gvar = _vec("gvar", gvar, c, z.device) if gvar is not None else None
    p = n * h * w
    if p > _MAX_PIXELS:
        raise ValueError(f"N*H*W = {p} pixels exceeds the int32 pixel index")
    g = torch.empty((n, c, h, w), device=z.device, dtype=z.dtype, memory_format=torch.channels_last)
    if p == 0 or c == 0:
        return g, torch.zeros(c, device=z.device, dtype=torch.float32) if with_sum else None
    block_p, block_c = _INTERPRETER_EW if interpreting() else (_EW_BLOCK_P, _EW_BLOCK_C)
    rows = cdiv(p, block_p)
    part = torch.empty((1, rows, c), device=z.device, dtype=torch.float32) if with_sum else g
    gz_t = gz if gz is not None else z
    args = (
        gz_t, z, mean, gmean if gmean is not None else mean, gvar if gvar is not None else mean, g, part,
        n, c, h, w, rows, 1.0 / p, *gz_t.stride(), *z.stride(), *g.stride(),
    )  # fmt: skip
    flags = dict(
        HAS_GZ=gz is not None, HAS_GMEAN=gmean is not None, HAS_GVAR=gvar is not None, SUMS=with_sum,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_EW_WARPS,
    )  # fmt: skip
    launch(_bn_stats_backward_kernel, (rows, cdiv(c, block_c)), args, flags)
    if not with_sum:
        return g, None
    total = torch.empty(c, device=z.device, dtype=torch.float32)  # the kernel's [1, C] out plane
    sum_cfg = dict(BLOCK_R=_SUM_BLOCK_R, BLOCK_C=_SUM_BLOCK_C, num_warps=4)
    launch(_sum_partials_kernel, (cdiv(c, _SUM_BLOCK_C), 1), (part, total, rows, c), sum_cfg)
    return g, total


# --------------------------------------------------------------------------------------------
# Offline compile specs
# --------------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every kernel here as the training path launches it: fp32 statistics, fp32 parameters,
    fp64 affine vectors; the elementwise kernel per activation dtype with every term."""
    specs = []

    def spec(fn, sig, constexprs, dtype, config, warps):
        full = {name: "constexpr" if name in constexprs else sig[name] for name in fn.arg_names}
        return KernelSpec(
            kernel=fn.__name__, fn=fn, signature=full, constexprs=constexprs, num_warps=warps, num_stages=1,
            dtype=dtype, config=config, extra={"attrs": {}, "variant": "bn_train", "expect_hgmma": False},
        )  # fmt: skip

    vec = {"C": "i32", "eps": "fp32"}
    fold = {n: "*fp32" for n in ("mean_ptr", "var_ptr", "w_ptr", "b_ptr", "rm_ptr", "rv_ptr")}
    fold |= {"nbt_ptr": "*i64", "scale_ptr": "*fp64", "shift_ptr": "*fp64", "count": "i32", "momentum": "fp32"}
    # (affine, running, cumulative, synced): the training fold, bn_affine alone (frozen or
    # untracked statistics), the update alone (the per-op path), the cumulative average, and a
    # SyncBatchNorm's, whose global count is read from an fp64 pointer; and a count past 2^31.
    for affine, running, cumulative, synced, count in (
        (True, True, False, False, "i32"), (True, False, False, False, "i32"), (False, True, False, False, "i32"),
        (True, True, True, False, "i32"), (True, True, False, True, "i32"), (True, True, False, False, "i64"),
    ):  # fmt: skip
        sig = fold | vec | {"count_ptr": "*fp64" if synced else "*fp32", "count": count}
        constexprs = dict(AFFINE=affine, HAS_W=affine, HAS_B=affine, HAS_RUNNING=running, HAS_NBT=running,
                          CUMULATIVE=cumulative, COUNT_PTR=synced, BLOCK_C=_BLOCK_C)  # fmt: skip
        config = f"fold_a{int(affine)}_r{int(running)}_cum{int(cumulative)}" + ("_synced" if synced else "")
        config += "_n64" if count == "i64" else ""
        specs.append(spec(_bn_fold_kernel, sig, constexprs, "fp32", config, _WARPS))
    sig = {"gs_ptr": "*fp64", "gt_ptr": "*fp64", "mean_ptr": "*fp32", "var_ptr": "*fp32", "w_ptr": "*fp32"}
    sig |= {"gmean_ptr": "*fp32", "gvar_ptr": "*fp32", "gw_ptr": "*fp64", "gb_ptr": "*fp64"}
    specs.append(
        spec(_bn_affine_backward_kernel, sig | vec, dict(HAS_W=True, BLOCK_C=_BLOCK_C), "fp32", "affine_bwd", _WARPS)
    )
    ints = ("N", "C", "H", "W", "ROWS") + tuple(
        f"stride_{t}{d}" for t in ("gz", "z", "g") for d in ("n", "c", "h", "w")
    )
    for dtype in ("fp32", "fp16", "bf16"):
        sig = {"gz_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "mean_ptr": "*fp32", "gmean_ptr": "*fp32"}
        sig |= {"gvar_ptr": "*fp32", "g_ptr": f"*{dtype}", "part_ptr": "*fp32", "inv_n": "fp32"}
        sig |= {n: "i32" for n in ints}
        constexprs = dict(HAS_GZ=True, HAS_GMEAN=True, HAS_GVAR=True, SUMS=True, BLOCK_P=_EW_BLOCK_P,
                          BLOCK_C=_EW_BLOCK_C)  # fmt: skip
        for unit in ("stride_gzc", "stride_zc", "stride_gc"):
            sig.pop(unit)
            constexprs[unit] = 1
        specs.append(spec(_bn_stats_backward_kernel, sig, constexprs, dtype, "stats_bwd", _EW_WARPS))
    return specs
