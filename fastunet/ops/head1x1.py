"""``head1x1`` (``kernels/head1x1.py``): the 1x1 head conv + output activation with optional
BN+ReLU on load, its autograd formula, and its backward ops ``head1x1_input_grad`` and
``head1x1_weight_grad`` (``kernels/head1x1AUTO.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    acc_dtype,
    affine_relu,
    affine_relu_grads,
    as_nhwc,
    check_head,
    check_norm,
    empty_nhwc,
    grads_for,
    head_composite,
    head_grads,
    norm_arg,
    use_kernels,
    with_norm_defaults,
)
from .derived import derived
from .op import declare


# =========================================================================== head1x1
@torch.library.custom_op("fastunet::head1x1", mutates_args=())
def head1x1(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    activation: str,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
) -> Tensor:
    """1x1 conv + output activation: ``[N, C, H, W] -> [N, K, H, W]`` with weight ``[K, C, 1, 1]``
    (any float dtype: cast to x's inside, its gradient returned in its own),
    bias ``[K]``, activation ``"sigmoid" | "none" | "softmax"`` (over K). ``in_scale``/``in_shift``
    ``[C]`` (both or neither): the head reads ``relu(x * in_scale + in_shift)`` (x raw,
    pre-BatchNorm). Returns channels_last."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1.register_fake
def _(x, weight, bias, activation, in_scale=None, in_shift=None):
    k = check_head("head1x1", x.shape[1], weight, bias, activation)
    check_norm("head1x1", x.shape[1], in_scale, in_shift)
    return empty_nhwc((x.shape[0], k, x.shape[2], x.shape[3]), x)


def _head1x1_impl(x, weight, bias, activation, in_scale=None, in_shift=None):
    check_head("head1x1", x.shape[1], weight, bias, activation)
    check_norm("head1x1", x.shape[1], in_scale, in_shift)
    k = use_kernels(x)
    if k:
        weight = derived(weight, ("cast", x.dtype), lambda w: w.detach().to(x.dtype))
        if in_scale is None:
            return k.head1x1(x, weight, bias.float(), activation=activation)
        return k.head1x1(x, weight, bias.float(), activation=activation, in_scale=in_scale, in_shift=in_shift)
    return as_nhwc(head_composite(affine_relu(x, in_scale, in_shift), weight, bias, activation), x.dtype)


def _head_setup(ctx, inputs, output):
    x, weight, bias, activation, in_scale, in_shift = with_norm_defaults(inputs, 6)
    ctx.activation = activation
    ctx.save_for_backward(x, weight, bias, in_scale, in_shift, output)


def _head_backward(ctx, grad):
    x, weight, bias, in_scale, in_shift, y = ctx.saved_tensors
    need_x, need_w, need_b, _, need_s, need_t = with_norm_defaults(ctx.needs_input_grad, 6)
    need_in = need_x or need_s or need_t
    gin, gw, gb = head_grads(grad, x, in_scale, in_shift, weight, bias, y, ctx.activation, (need_in, need_w, need_b))
    gx = gs = gt = None
    if need_in:
        gx, gs, gt = affine_relu_grads(gin, x, in_scale, in_shift)
    return grads_for(ctx, (gx, gw, gb, None, gs, gt))


declare(head1x1, _head1x1_impl, setup=_head_setup, backward=_head_backward)


@torch.library.custom_op("fastunet::head1x1_input_grad", mutates_args=())
def head1x1_input_grad(gz: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of a 1x1 conv: gz ``[N, K, H, W]`` (gradient of the logits), weight
    ``[K, C, 1, 1]`` (any float dtype) -> ``[N, C, H, W]`` channels_last in gz's dtype."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1_input_grad.register_fake
def _(gz, weight):
    return empty_nhwc((gz.shape[0], weight.shape[1], gz.shape[2], gz.shape[3]), gz)


def _head1x1_input_grad_impl(gz, weight):
    k = use_kernels(gz)
    if k:
        return k.head1x1_input_grad(gz, weight)
    return as_nhwc(F.conv2d(gz, weight.to(gz.dtype).transpose(0, 1)), gz.dtype)


declare(head1x1_input_grad, _head1x1_input_grad_impl)


@torch.library.custom_op("fastunet::head1x1_weight_grad", mutates_args=())
def head1x1_weight_grad(gz: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None) -> Tensor:
    """Weight gradient of a 1x1 conv applied to ``T(x)``: gz ``[N, K, H, W]``, raw x
    ``[N, C, H, W]`` -> ``[K, C, 1, 1]`` float32 (float64 for float64 gz), deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1_weight_grad.register_fake
def _(gz, x, in_scale, in_shift):
    return gz.new_empty((gz.shape[1], x.shape[1], 1, 1), dtype=acc_dtype(gz.dtype))


def _head1x1_weight_grad_impl(gz, x, in_scale, in_shift):
    k = use_kernels(x)
    if k:
        gw = k.head1x1_weight_grad(gz.to(x.dtype), x, x_norm=norm_arg(in_scale, in_shift))
        return gw.reshape(gw.shape[0], gw.shape[1], 1, 1).contiguous()
    acc = acc_dtype(gz.dtype)
    xin = affine_relu(x, in_scale, in_shift)
    gw = torch.einsum("nkhw,nchw->kc", gz.to(acc), xin.to(acc))
    return gw.reshape(gw.shape[0], gw.shape[1], 1, 1).contiguous()


declare(head1x1_weight_grad, _head1x1_weight_grad_impl, ref=1)
