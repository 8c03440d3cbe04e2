"""``maxpool2x2`` (``kernels/maxpool2x2.py``): 2x2 max-pool with optional BN+ReLU on load, and its
autograd formula (which calls ``maxpool2x2_backward``, in ``norm_act_bwd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _affine_relu,
    _as_nhwc,
    _bwd,
    _check_norm,
    _empty_nhwc,
    _grads_for,
    _kernels,
    _on_input_device,
    _use_kernels,
    _with_norm_defaults,
)


# =========================================================================== maxpool2x2
@torch.library.custom_op("fastunet::maxpool2x2", mutates_args=())
def maxpool2x2(x: Tensor, in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> Tensor:
    """2x2 max-pool, stride 2, NaN-propagating like ``torch.max_pool2d``:
    ``[N, C, H, W] -> [N, C, H//2, W//2]`` (H and W even). ``in_scale``/``in_shift`` ``[C]``
    (both or neither): pool ``relu(x * in_scale + in_shift)`` instead of x (x is a raw
    pre-BatchNorm tensor). Returns channels_last."""
    raise AssertionError("unreachable: every device has its own implementation")


def _check_pool(x, in_scale=None, in_shift=None):
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"fastunet::maxpool2x2: needs a 4-D input with even H and W, got {tuple(x.shape)}")
    _check_norm("maxpool2x2", x.shape[1], in_scale, in_shift)


@maxpool2x2.register_fake
def _(x, in_scale=None, in_shift=None):
    _check_pool(x, in_scale, in_shift)
    return _empty_nhwc((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2), x)


@maxpool2x2.register_kernel(("cpu", "cuda"))
@_on_input_device
def _maxpool2x2_impl(x, in_scale=None, in_shift=None):
    if _use_kernels(x):
        if in_scale is None:
            return _kernels().maxpool2x2(x)
        return _kernels().maxpool2x2(x, in_scale=in_scale, in_shift=in_shift)
    _check_pool(x, in_scale, in_shift)
    return _as_nhwc(F.max_pool2d(_affine_relu(x, in_scale, in_shift), 2), x.dtype)


def _pool_setup(ctx, inputs, output):
    ctx.save_for_backward(*_with_norm_defaults(inputs, 3))


def _pool_backward(ctx, grad):
    x, in_scale, in_shift = ctx.saved_tensors
    gx, gs, gt = _bwd.maxpool2x2_backward(grad, x, in_scale, in_shift)
    if in_scale is None:
        gs = gt = None
    return _grads_for(ctx, (gx, gs, gt))


maxpool2x2.register_autograd(_pool_backward, setup_context=_pool_setup)
