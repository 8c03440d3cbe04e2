"""``maxpool2x2`` (``kernels/maxpool2x2.py``): 2x2 max-pool with optional BN+ReLU on load, and its
autograd formula (which calls ``maxpool2x2_backward``, in ``norm_act_bwd``).

Odd H or W floor like ``nn.MaxPool2d(2)`` (the ``odd_sizes="pad"`` models): the forward never
reads the last row/column, and the backward runs ``maxpool2x2_backward`` on the even part (a
view) and gives the dropped row/column a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    affine_relu,
    as_nhwc,
    check_pool,
    empty_nhwc,
    grads_for,
    use_kernels,
    with_norm_defaults,
)
from .op import AUTO, declare


# =========================================================================== maxpool2x2
@torch.library.custom_op("fastunet::maxpool2x2", mutates_args=())
def maxpool2x2(x: Tensor, in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> Tensor:
    """2x2 max-pool, stride 2, NaN-propagating like ``torch.max_pool2d``:
    ``[N, C, H, W] -> [N, C, H//2, W//2]`` (odd H or W floor: the last row/column is dropped and
    gets a zero gradient). ``in_scale``/``in_shift`` ``[C]``
    (both or neither): pool ``relu(x * in_scale + in_shift)`` instead of x (x is a raw
    pre-BatchNorm tensor). Returns channels_last."""
    raise AssertionError("unreachable: every device has its own implementation")


@maxpool2x2.register_fake
def _(x, in_scale=None, in_shift=None):
    check_pool(x, in_scale, in_shift)
    return empty_nhwc((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2), x)


def _maxpool2x2_impl(x, in_scale=None, in_shift=None):
    k = use_kernels(x)
    if k:
        if in_scale is None:
            return k.maxpool2x2(x)
        return k.maxpool2x2(x, in_scale=in_scale, in_shift=in_shift)
    check_pool(x, in_scale, in_shift)
    return as_nhwc(F.max_pool2d(affine_relu(x, in_scale, in_shift), 2), x.dtype)


def _pool_setup(ctx, inputs, output):
    ctx.save_for_backward(*with_norm_defaults(inputs, 3))


def _pool_backward(ctx, grad):
    x, in_scale, in_shift = ctx.saved_tensors
    h, w = x.shape[2], x.shape[3]
    he, we = h - h % 2, w - w % 2
    if (he, we) == (h, w):
        gx, gs, gt = AUTO.maxpool2x2_backward(grad, x, in_scale, in_shift)
    else:
        # Floor pooling: the dropped row/column never reached the output, so its gradient is 0
        # (and it adds nothing to dscale/dshift). The even part is a view; one copy places it.
        ge, gs, gt = AUTO.maxpool2x2_backward(grad, x[:, :, :he, :we], in_scale, in_shift)
        gx = empty_nhwc(x.shape, ge)
        gx[:, :, he:] = 0
        gx[:, :, :he, we:] = 0
        gx[:, :, :he, :we] = ge
    if in_scale is None:
        gs = gt = None
    return grads_for(ctx, (gx, gs, gt))


declare(maxpool2x2, _maxpool2x2_impl, setup=_pool_setup, backward=_pool_backward)
