"""BatchNorm in training (``kernels/bn_train.py``): ``bn_train_fold`` (the forward finalize in
one launch: ``bn_train_fold_``), ``bn_affine`` and ``bn_affine_backward``, ``bn_running_update_``,
``bn_stats_backward``, and synchronised BatchNorm's ``bn_stats_sync`` and
``bn_stats_sync_backward`` (collectives of ``fastunet.distributed``, no kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ._common import acc_dtype, as_nhwc, channel_vec, empty_nhwc, use_kernels
from .op import AUTO, DIRECT, DISPATCH, declare, declare_composite, direct_ok_mutation

# =========================================================================== BatchNorm (training)
# What nn.BatchNorm2d does with the batch statistics of a training conv (see kernels/bn_train.py).
# The affine and the statistics' backward are functional with autograd; the running-statistics
# update mutates the module's buffers and has no gradient. torch.library allows autograd only on
# functional ops, so the registered ops are split that way, and ``bn_train_fold`` (what the
# training forward calls) joins them into one launch (``bn_train_fold_``) wherever autograd does
# not record the call: on the tape (which records the affine's formula itself) and without grad.


@torch.library.custom_op("fastunet::bn_affine", mutates_args=())
def bn_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` ``[C]`` float64 with ``batchnorm(z) == z * scale + shift`` for a BatchNorm
    of ``weight``/``bias`` ``[C]`` (None: 1 and 0) and ``eps`` normalizing with ``mean`` and biased
    ``var`` ``[C]``. Differentiable in mean, var, weight and bias."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_affine.register_fake
def _(mean, var, weight, bias, eps):
    return mean.new_empty(mean.shape, dtype=torch.float64), mean.new_empty(mean.shape, dtype=torch.float64)


def _bn_affine_impl(mean, var, weight, bias, eps):
    k = use_kernels(mean)
    if k:
        return k.bn_affine(mean, var, weight, bias, eps)
    scale = torch.rsqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def _bn_affine_setup(ctx, inputs, output):
    mean, var, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(mean, var, weight)


def _bn_affine_backward(ctx, gscale, gshift):
    mean, var, weight = ctx.saved_tensors
    if gscale is None or gshift is None:  # made only when needed: one torch op fewer per BatchNorm
        zeros = torch.zeros(mean.shape, dtype=torch.float64, device=mean.device)
        gscale = zeros if gscale is None else gscale
        gshift = zeros if gshift is None else gshift
    gmean, gvar, gw, gb = AUTO.bn_affine_backward(gscale, gshift, mean, var, weight, ctx.eps)
    w_dtype, b_dtype = ctx.dtypes
    gw = gw.to(w_dtype) if w_dtype is not None else None
    gb = gb.to(b_dtype) if b_dtype is not None else None
    return gmean, gvar, gw, gb, None


declare(bn_affine, _bn_affine_impl, setup=_bn_affine_setup, backward=_bn_affine_backward)


@torch.library.custom_op("fastunet::bn_affine_backward", mutates_args=())
def bn_affine_backward(
    gscale: Tensor, gshift: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``bn_affine`` from ``gscale``/``gshift`` ``[C]`` float64: ``(gmean, gvar,
    gweight, gbias)``, the first two in mean's/var's dtype, the last two float64."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_affine_backward.register_fake
def _(gscale, gshift, mean, var, weight, eps):
    f64 = torch.float64
    return (
        torch.empty_like(mean),
        torch.empty_like(var),
        mean.new_empty(mean.shape, dtype=f64),
        mean.new_empty(mean.shape, dtype=f64),
    )


def _bn_affine_backward_impl(gscale, gshift, mean, var, weight, eps):
    k = use_kernels(mean)
    if k:
        return k.bn_affine_backward(gscale, gshift, mean, var, weight, eps)
    gs, gt = gscale.double(), gshift.double()
    rstd = torch.rsqrt(var.double() + eps)
    w = weight.double() if weight is not None else torch.ones_like(rstd)
    centred = gs - gt * mean.double()
    gvar = -0.5 * w * centred * rstd.pow(3)
    return (-gt * w * rstd).to(mean.dtype), gvar.to(var.dtype), centred * rstd, gt.clone()


declare(bn_affine_backward, _bn_affine_backward_impl, ref=2)


@torch.library.custom_op(
    "fastunet::bn_running_update_", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def bn_running_update_(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    count: int,
    count_all: Tensor | None = None,
) -> None:
    """``nn.BatchNorm2d``'s training-mode buffer update, in place: ``num_batches_tracked += 1``;
    running mean and var (unbiased: ``var * count / (count - 1)``) averaged in with ``momentum``,
    or cumulatively (``momentum=None``). ``mean``/biased ``var`` ``[C]``: the batch's, over
    ``count`` values per channel. ``count_all``: a one-element float64 tensor that replaces
    ``count``, read on the device (a synchronised BatchNorm's global count, ``bn_stats_sync``,
    which is not known on the host). No gradient."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_running_update_.register_fake
def _(mean, var, running_mean, running_var, num_batches_tracked, momentum, count, count_all=None):
    return None


def _bn_running_update_impl(mean, var, running_mean, running_var, num_batches_tracked, momentum, count, count_all=None):
    mean, var = mean.detach(), var.detach()
    k = use_kernels(mean)
    if k:
        return k.bn_running_update_(
            mean, var, running_mean, running_var, num_batches_tracked, momentum, count, count_all=count_all
        )
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            factor = 1.0 / float(num_batches_tracked)
    if running_mean is None:
        return None
    if count_all is None:
        if count < 2:  # as nn.BatchNorm2d (and the kernel's launcher) refuses it
            raise ValueError(f"the unbiased running variance needs more than 1 value per channel, got {count}")
        unbiased = var * (count / (count - 1))
    else:
        n = count_all.to(torch.float64)
        unbiased = (var.to(torch.float64) * (n / (n - 1))).to(var.dtype)
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return None


declare(bn_running_update_, _bn_running_update_impl)


_FOLD_MUTATES = ("running_mean", "running_var", "num_batches_tracked")


@torch.library.custom_op("fastunet::bn_train_fold_", mutates_args=_FOLD_MUTATES)
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
    count_all: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``bn_running_update_`` then ``bn_affine`` in one launch: the buffers given (None: not
    updated) updated in place as ``bn_running_update_`` does, and ``(scale, shift)`` ``[C]``
    float64 as ``bn_affine`` returns. No gradient (a mutating op cannot have one: the
    differentiable entry is ``bn_train_fold``)."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_train_fold_.register_fake
def _(mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, count, count_all=None):
    return mean.new_empty(mean.shape, dtype=torch.float64), mean.new_empty(mean.shape, dtype=torch.float64)


def _bn_train_fold_impl(mean, var, weight, bias, eps, running_mean, running_var, nbt, momentum, count, count_all=None):
    k = use_kernels(mean)
    if k:
        return k.bn_train_fold_(
            mean, var, weight, bias, eps, running_mean, running_var, nbt, momentum, count, count_all=count_all
        )
    if running_mean is not None or nbt is not None:
        _bn_running_update_impl(mean, var, running_mean, running_var, nbt, momentum, count, count_all)
    return _bn_affine_impl(mean, var, weight, bias, eps)


declare(bn_train_fold_, _bn_train_fold_impl)


def bn_train_fold(mean, var, weight, bias, eps, *update) -> tuple[Tensor, Tensor]:
    """A training BatchNorm's forward finalize: ``(scale, shift)`` ``[C]`` float64 of
    ``bn_affine(mean, var, weight, bias, eps)``, differentiable in mean, var, weight and bias,
    and ``bn_running_update_`` with ``update = (running_mean, running_var, num_batches_tracked,
    momentum, count[, count_all])`` (the buffers all None: no update), arguments as
    ``bn_train_fold_`` takes them. One launch (``bn_train_fold_``) unless autograd records this
    call (grad mode on and an input requiring grad: the per-op path under torch.compile or a
    dispatch mode), where the update and the affine run as their two registered ops so that
    autograd sees a functional affine."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (mean, var, weight, bias)):
        if update[0] is not None or update[2] is not None:
            DISPATCH.bn_running_update_(mean, var, *update)
        return DISPATCH.bn_affine(mean, var, weight, bias, eps)
    calls = DIRECT if direct_ok_mutation(mean) else DISPATCH
    return calls.bn_train_fold_(mean, var, weight, bias, eps, *update)


def _bn_train_fold_setup(ctx, inputs, output):
    _bn_affine_setup(ctx, inputs[:5], output)


def _bn_train_fold_backward(ctx, gscale, gshift):
    return (*_bn_affine_backward(ctx, gscale, gshift), None, None, None, None, None, None)


declare_composite("bn_train_fold", bn_train_fold, setup=_bn_train_fold_setup, backward=_bn_train_fold_backward)


@torch.library.custom_op("fastunet::bn_stats_backward", mutates_args=())
def bn_stats_backward(
    gz: Tensor | None, z: Tensor, mean: Tensor, gmean: Tensor | None, gvar: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The gradient reaching ``z`` ``[N, C, H, W]`` through its own batch statistics (``mean``,
    biased var, over n = N*H*W values per channel) on top of ``gz``: ``g = gz + gmean/n +
    gvar * 2 * (z - mean)/n`` in float32 (float64 for float64 z), returned channels_last in z's
    dtype, and ``sum g`` per channel ``[C]`` (float32; float64 for float64 z), deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_stats_backward.register_fake
def _(gz, z, mean, gmean, gvar):
    return empty_nhwc(z.shape, z), z.new_empty(z.shape[1], dtype=acc_dtype(z.dtype))


def _bn_stats_backward_impl(gz, z, mean, gmean, gvar):
    k = use_kernels(z)
    if k:
        return k.bn_stats_backward(gz, z, mean, gmean, gvar)
    acc = acc_dtype(z.dtype)
    n = z.numel() // z.shape[1]
    if n == 0:  # an empty batch (a rank's, in synchronised BatchNorm): nothing reaches z
        return empty_nhwc(z.shape, z), z.new_zeros(z.shape[1], dtype=acc)
    g = gz.to(acc) if gz is not None else torch.zeros(z.shape, dtype=acc, device=z.device)
    if gmean is not None:
        g = g + channel_vec(gmean.to(acc) / n, acc)
    if gvar is not None:
        g = g + channel_vec(gvar.to(acc) * (2.0 / n), acc) * (z.to(acc) - channel_vec(mean, acc))
    return as_nhwc(g, z.dtype), g.sum((0, 2, 3))


declare(bn_stats_backward, _bn_stats_backward_impl, ref=1)


# =========================================================================== synchronised BatchNorm
# nn.SyncBatchNorm on the fused path: the local statistics of conv3x3_bn_stats merged across a
# process group in the forward, and the gradients of the merged statistics all-reduced in the
# backward, one collective each (see fastunet/distributed.py for the flow and the numerics).
# The collectives run inside these ops' implementations, so a torch.compile graph holds the ops
# as opaque calls (fake implementations give the shapes) and the collective runs when they do.


@torch.library.custom_op("fastunet::bn_stats_sync", mutates_args=())
def bn_stats_sync(mean: Tensor, var: Tensor, count: int, group: str) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's BatchNorm batch statistics ``mean``, biased ``var`` ``[C]`` over ``count``
    values per channel (0: an empty batch, whose statistics are ignored) merged with those of
    every rank of the process group named ``group`` (``ProcessGroup.group_name``): one
    all_gather, merged in float64. Returns the global ``(mean, var)`` ``[C]`` in the inputs'
    dtypes and the global count ``[1]`` float64 (the running update's ``count_all``).
    Differentiable in mean and var; its backward all-reduces once (``bn_stats_sync_backward``).
    Every rank of the group must call it, in the same order."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_stats_sync.register_fake
def _(mean, var, count, group):
    return torch.empty_like(mean), torch.empty_like(var), mean.new_empty(1, dtype=torch.float64)


def _bn_stats_sync_impl(mean, var, count, group):
    return distributed.sync_stats(mean.detach(), var.detach(), count, group)


def _bn_stats_sync_setup(ctx, inputs, output):
    mean, var, count, group = inputs
    mean_all, _, count_all = output
    ctx.count, ctx.group, ctx.var_dtype = count, group, var.dtype
    ctx.save_for_backward(mean, mean_all, count_all)


def _bn_stats_sync_backward(ctx, gmean, gvar, gcount):
    mean, mean_all, count_all = ctx.saved_tensors
    # Every rank must take part in the all_reduce, whatever reached it: zeros for no gradient.
    gmean = torch.zeros_like(mean_all) if gmean is None else gmean
    gvar = torch.zeros_like(mean_all) if gvar is None else gvar
    gm, gv = AUTO.bn_stats_sync_backward(gmean, gvar, mean, mean_all, count_all, ctx.count, ctx.group)
    return gm, gv.to(ctx.var_dtype), None, None


declare(bn_stats_sync, _bn_stats_sync_impl, setup=_bn_stats_sync_setup, backward=_bn_stats_sync_backward)


@torch.library.custom_op("fastunet::bn_stats_sync_backward", mutates_args=())
def bn_stats_sync_backward(
    gmean: Tensor,
    gvar: Tensor,
    mean: Tensor,
    mean_all: Tensor,
    count_all: Tensor,
    count: int,
    group: str,
) -> tuple[Tensor, Tensor]:
    """Backward of ``bn_stats_sync``: ``gmean``/``gvar`` ``[C]`` (this rank's gradients of the
    global statistics) summed over the group (one all_reduce, float64), then the
    gradient of this rank's ``mean`` and ``var`` over ``count`` of the global ``count_all``
    values around the global ``mean_all``: ``(count/N·(GM + 2(mean - M)·GV), count/N·GV)``,
    both ``[C]`` in mean's dtype. Every rank of the group must call it, in the same order."""
    raise AssertionError("unreachable: every device has its own implementation")


@bn_stats_sync_backward.register_fake
def _(gmean, gvar, mean, mean_all, count_all, count, group):
    return torch.empty_like(mean), torch.empty_like(mean)


def _bn_stats_sync_backward_impl(gmean, gvar, mean, mean_all, count_all, count, group):
    return distributed.sync_stats_backward(gmean, gvar, mean, mean_all, count_all, count, group)


declare(bn_stats_sync_backward, _bn_stats_sync_backward_impl)
