"""The BN+ReLU-on-load backward ops (``kernels/norm_act_bwd.py``): ``affine_relu_backward`` and
``maxpool2x2_backward`` (the pool's backward with that transform's backward fused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import acc_dtype, affine_relu, as_nhwc, channel_vec, check_norm, check_pool, empty_nhwc, use_kernels
from .op import declare


def _transform_center(scale: Tensor, shift: Tensor) -> Tensor:
    """Where ``x * scale + shift`` crosses 0, per channel (0 where scale is 0), in float32: the
    point the dscale sums are taken about. For a BatchNorm+ReLU it is ``mean - beta / scale``,
    inside the data, so ``sum(g * (x - center))`` keeps the digits that ``sum(g * x)`` loses when
    the mean dwarfs the spread (see ``kernels.affine_relu_backward``)."""
    s, t = scale.float(), shift.float()
    return torch.where(s != 0, -t / torch.where(s != 0, s, 1.0), 0.0)


def _uncenter(dscale_c: Tensor, dshift: Tensor, center: Tensor, dtype: torch.dtype) -> Tensor:
    """``dscale = dscale_c + center * dshift`` formed in float64, then cast to ``dtype``: in the
    parameters' float64 (what the model passes) the BatchNorm weight's gradient survives the
    cancellation its chain rule makes against ``mean * dshift``."""
    return (dscale_c.double() + center.double() * dshift.double()).to(dtype)


def _affine_relu_grads_composite(g: Tensor, x: Tensor, scale: Tensor, shift: Tensor):
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    # torch's ReLU backward rule (zero where the output is <= 0): NaN passes its gradient on.
    dead = torch.relu(xf * channel_vec(scale, acc) + channel_vec(shift, acc)) <= 0
    gm = torch.where(dead, torch.zeros((), dtype=acc, device=g.device), g.to(acc))
    dx = (gm * channel_vec(scale, acc)).to(x.dtype)
    center = _transform_center(scale, shift)
    dshift = gm.sum((0, 2, 3))
    dscale = _uncenter((gm * (xf - channel_vec(center, acc))).sum((0, 2, 3)), dshift, center, scale.dtype)
    return dx, dscale, dshift.to(shift.dtype)


# =========================================================================== backward ops
# The autograd formulas call these (through ``AUTO``), not the Triton launchers: an op with a fake
# implementation is what AOTAutograd (torch.compile, opcheck) can trace through a backward.
# No autograd of their own (no double backward).


@torch.library.custom_op("fastunet::affine_relu_backward", mutates_args=())
def affine_relu_backward(g: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``T(x) = relu(x * scale + shift)`` (per channel): g = dL/dT(x) and the raw x
    ``[N, C, H, W]``, scale/shift ``[C]``. Returns ``(dx, dscale, dshift)``: dx channels_last in
    x's dtype, dscale/dshift in scale's dtype (sums over N, H, W, deterministic). The ReLU mask
    follows torch's rule (zero where ``T(x) <= 0``)."""
    raise AssertionError("unreachable: every device has its own implementation")


@affine_relu_backward.register_fake
def _(g, x, scale, shift):
    check_norm("affine_relu_backward", x.shape[1], scale, shift, "")
    return empty_nhwc(x.shape, x), scale.new_empty(scale.shape), shift.new_empty(shift.shape)


def _affine_relu_backward_impl(g, x, scale, shift):
    check_norm("affine_relu_backward", x.shape[1], scale, shift, "")
    k = use_kernels(x)
    if k:
        # The kernels take dscale about the transform's zero crossing and add it back in fp64
        # (see _transform_center): two separate fp64 [C] sums, no aliasing between the outputs.
        dx, ds, dt = k.affine_relu_backward(g.to(x.dtype), x, scale, shift, center="transform")
        return dx, ds.to(scale.dtype), dt.to(shift.dtype)
    dx, ds, dt = _affine_relu_grads_composite(g, x, scale, shift)
    return as_nhwc(dx, x.dtype), ds, dt


declare(affine_relu_backward, _affine_relu_backward_impl, ref=1)


@torch.library.custom_op("fastunet::maxpool2x2_backward", mutates_args=())
def maxpool2x2_backward(
    g: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``maxpool2x2(x, in_scale, in_shift)``: g ``[N, C, H/2, W/2]``, raw x
    ``[N, C, H, W]``. Returns ``(dx, dscale, dshift)``; each window's gradient goes to torch's
    argmax (first of ties, NaN wins). Without a transform dscale/dshift are empty ``[0]``."""
    raise AssertionError("unreachable: every device has its own implementation")


@maxpool2x2_backward.register_fake
def _(g, x, in_scale, in_shift):
    check_pool(x, in_scale, in_shift, even=True)
    c = 0 if in_scale is None else x.shape[1]
    vec = in_scale if in_scale is not None else x
    return empty_nhwc(x.shape, x), vec.new_empty(c), vec.new_empty(c)


def _maxpool2x2_backward_impl(g, x, in_scale, in_shift):
    check_pool(x, in_scale, in_shift, even=True)
    vec = in_scale if in_scale is not None else x
    k = use_kernels(x)
    if k:
        if in_scale is None:
            return k.maxpool2x2_backward(g.to(x.dtype), x)[0], vec.new_empty(0), vec.new_empty(0)
        dx, ds, dt = k.maxpool2x2_backward(g.to(x.dtype), x, in_scale, in_shift, center="transform")
        return dx, ds.to(in_scale.dtype), dt.to(in_shift.dtype)
    xin = affine_relu(x, in_scale, in_shift)
    # torch's own argmax, so ties and NaNs route gradients exactly as the reference does.
    _, idx = F.max_pool2d(xin, 2, return_indices=True)
    gin = torch.ops.aten.max_pool2d_with_indices_backward(
        g.to(x.dtype), xin, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
    )
    if in_scale is None:
        return as_nhwc(gin, x.dtype), vec.new_empty(0), vec.new_empty(0)
    dx, ds, dt = _affine_relu_grads_composite(gin, x, in_scale, in_shift)
    return as_nhwc(dx, x.dtype), ds, dt


declare(maxpool2x2_backward, _maxpool2x2_backward_impl, ref=1)
