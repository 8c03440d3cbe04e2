"""``upconv2x2`` (``kernels/upconv2x2.py``): ConvTranspose2d(k=2, s=2) + bias with optional
BN+ReLU on load, its autograd formula, and its backward ops ``upconv2x2_input_grad`` and
``upconv2x2_weight_grad`` (``kernels/upconv2x2AUTO.py``).
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
    channel_vec,
    check_norm,
    empty_nhwc,
    grads_for,
    norm_arg,
    use_kernels,
    with_norm_defaults,
)
from .derived import derived, untracked
from .op import AUTO, declare, kernel_package


def _packed_upconv_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    if weight.dtype == dtype and weight.stride(1) == 1:
        return weight
    return derived(weight, ("upconv2x2", dtype), lambda w: kernel_package().pack_upconv2x2_weight(untracked(w), dtype))


# =========================================================================== upconv2x2
@torch.library.custom_op("fastunet::upconv2x2", mutates_args=())
def upconv2x2(
    x: Tensor, weight: Tensor, bias: Tensor, in_scale: Tensor | None = None, in_shift: Tensor | None = None
) -> Tensor:
    """``ConvTranspose2d(kernel_size=2, stride=2)``: ``[N, C_in, h, w] -> [N, C_out, 2h, 2w]``.

    weight ``[C_in, C_out, 2, 2]`` (any strides; ``kernels.pack_upconv2x2_weight`` gives the fast
    one; another float dtype is cast to x's, its gradient returned in its own dtype), bias
    ``[C_out]``. ``in_scale``/``in_shift`` ``[C_in]`` (both or neither): x is a raw
    pre-BatchNorm tensor and ``relu(x * in_scale + in_shift)`` is what gets upsampled. Returns
    channels_last in x's dtype.
    """
    raise AssertionError("unreachable: every device has its own implementation")


def _check_upconv(x, weight, bias, in_scale=None, in_shift=None):
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError("fastunet::upconv2x2: x must be 4-D and weight [C_in, C_out, 2, 2]")
    if not weight.is_floating_point():
        raise TypeError(f"fastunet::upconv2x2: weight must be floating point, got {weight.dtype}")
    if weight.shape[0] != x.shape[1] or bias.shape != (weight.shape[1],):
        raise ValueError(
            f"fastunet::upconv2x2: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
            f"do not fit an input with {x.shape[1]} channels"
        )
    check_norm("upconv2x2", x.shape[1], in_scale, in_shift)


@upconv2x2.register_fake
def _(x, weight, bias, in_scale=None, in_shift=None):
    _check_upconv(x, weight, bias, in_scale, in_shift)
    return empty_nhwc((x.shape[0], weight.shape[1], 2 * x.shape[2], 2 * x.shape[3]), x)


def _upconv2x2_impl(x, weight, bias, in_scale=None, in_shift=None):
    k = use_kernels(x)
    if k:
        w = _packed_upconv_weight(weight, x.dtype)
        if in_scale is None:
            return k.upconv2x2(x, w, bias.float())
        return k.upconv2x2(x, w, bias.float(), in_scale=in_scale, in_shift=in_shift)
    _check_upconv(x, weight, bias, in_scale, in_shift)
    acc = acc_dtype(x.dtype)
    y = F.conv_transpose2d(affine_relu(x, in_scale, in_shift), weight.to(x.dtype), stride=2)
    y = y.to(acc) + channel_vec(bias, acc)
    return as_nhwc(y, x.dtype)


def _upconv_setup(ctx, inputs, output):
    x, weight, bias, in_scale, in_shift = with_norm_defaults(inputs, 5)
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, weight, in_scale, in_shift)


def _upconv_backward(ctx, grad):
    x, weight, in_scale, in_shift = ctx.saved_tensors
    need_x, need_w, need_b, need_s, need_t = with_norm_defaults(ctx.needs_input_grad, 5)
    grad = grad.to(x.dtype)
    gb = grad.to(acc_dtype(x.dtype)).sum((0, 2, 3)).to(ctx.bias_dtype) if need_b else None
    gw = AUTO.upconv2x2_weight_grad(grad, x, in_scale, in_shift).to(weight.dtype) if need_w else None
    gx = gs = gt = None
    if need_x or need_s or need_t:
        gin = AUTO.upconv2x2_input_grad(grad, weight)
        gx, gs, gt = affine_relu_grads(gin, x, in_scale, in_shift)
    return grads_for(ctx, (gx, gw, gb, gs, gt))


declare(upconv2x2, _upconv2x2_impl, setup=_upconv_setup, backward=_upconv_backward)


@torch.library.custom_op("fastunet::upconv2x2_input_grad", mutates_args=())
def upconv2x2_input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of ``ConvTranspose2d(k=2, s=2)``: g ``[N, C_out, 2h, 2w]``, weight
    ``[C_in, C_out, 2, 2]`` (any float dtype) -> ``[N, C_in, h, w]`` channels_last in g's dtype."""
    raise AssertionError("unreachable: every device has its own implementation")


@upconv2x2_input_grad.register_fake
def _(g, weight):
    return empty_nhwc((g.shape[0], weight.shape[0], g.shape[2] // 2, g.shape[3] // 2), g)


def _upconv2x2_input_grad_impl(g, weight):
    k = use_kernels(g)
    if k:
        return k.upconv2x2_input_grad(g, _packed_upconv_weight(weight, g.dtype))
    return as_nhwc(F.conv2d(g, weight.to(g.dtype), stride=2), g.dtype)


declare(upconv2x2_input_grad, _upconv2x2_input_grad_impl)


@torch.library.custom_op("fastunet::upconv2x2_weight_grad", mutates_args=())
def upconv2x2_weight_grad(g: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None) -> Tensor:
    """Weight gradient of ``ConvTranspose2d(k=2, s=2)`` applied to ``T(x)``: g ``[N, C_out, 2h,
    2w]``, raw x ``[N, C_in, h, w]`` -> ``[C_in, C_out, 2, 2]`` float32 (float64 for float64 g),
    deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@upconv2x2_weight_grad.register_fake
def _(g, x, in_scale, in_shift):
    return g.new_empty((x.shape[1], g.shape[1], 2, 2), dtype=acc_dtype(g.dtype))


def _upconv2x2_weight_grad_impl(g, x, in_scale, in_shift):
    k = use_kernels(x)
    if k:
        return k.upconv2x2_weight_grad(g.to(x.dtype), x, x_norm=norm_arg(in_scale, in_shift))
    xin = affine_relu(x, in_scale, in_shift)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.to(x.dtype), xin, xin.new_empty((x.shape[1], g.shape[1], 2, 2)), None, [2, 2], [0, 0], [1, 1], True,
        [0, 0], 1, [False, True, False],
    )  # fmt: skip
    return gw.to(acc_dtype(g.dtype)).contiguous()


declare(upconv2x2_weight_grad, _upconv2x2_weight_grad_impl, ref=1)
