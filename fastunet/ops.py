"""The fused path's operators, registered with ``torch.library`` in the ``fastunet`` namespace.

Each op has a schema, a fake (meta) implementation for ``torch.compile``, a CPU and a CUDA
implementation, and an autograd formula, so ``loss.backward()``, ``torch.compile`` and
``torch.library.opcheck`` all work through them.

Implementations:

* **CUDA**: the Triton kernels of ``fastunet.kernels``.
* **CPU**: the same Triton kernels when Triton's interpreter is on (``TRITON_INTERPRET=1``,
  how the tests run the kernels without a GPU); otherwise an eager composite of plain torch ops.
* **float64** on any device: the eager composite (the kernels cover fp32, fp16 and bf16), which
  keeps float64 gradient checks through the op layer possible.

Backward formulas are eager composites (``aten.convolution_backward`` and friends); they
recompute what is cheap instead of saving it.

Layout contract: every op returns a channels_last (NHWC) tensor; inputs may have any strides.
Scale, shift and biases are read in float32 (float64 for float64 inputs).

The decoder's concat is fused by giving ``conv3x3_bn_act`` a second input ``x2``: the conv
reads its K range from ``x`` then ``x2``, i.e. it convolves ``cat([x, x2], 1)`` without the
concatenated tensor ever existing. See ``kernels/conv3x3.py`` for the byte count behind that
choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import interpreting
from .reference import ACTIVATIONS, apply_out_activation

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_nhwc(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)


def _as_nhwc(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh channels_last copy, so every implementation returns the strides the fake one promises."""
    out = _empty_nhwc(t.shape, t, dtype)
    out.copy_(t)
    return out


def _use_kernels(x: Tensor) -> bool:
    """Whether this call runs the Triton kernels (see the module docstring)."""
    if x.dtype not in _KERNEL_DTYPES:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


def _kernels():
    from . import kernels  # deferred: CPU-only installs never need triton

    return kernels


def _channel_vec(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def _check_same_dtype(op: str, **tensors: Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"fastunet::{op}: tensors must share one dtype, got {dtypes}")


def _check_conv3x3(x: Tensor, x2: Tensor | None, weight: Tensor, scale: Tensor, shift: Tensor):
    if x.dim() != 4 or (x2 is not None and x2.dim() != 4) or weight.dim() != 4:
        raise ValueError("fastunet::conv3x3_bn_act: x, x2 and weight must be 4-D")
    _check_same_dtype("conv3x3_bn_act", x=x, x2=x2, weight=weight)
    c_in = x.shape[1] + (0 if x2 is None else x2.shape[1])
    if x2 is not None and (x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:]):
        raise ValueError(
            f"fastunet::conv3x3_bn_act: x2 {tuple(x2.shape)} must match x {tuple(x.shape)} in batch and spatial size"
        )
    c_out = weight.shape[0]
    if tuple(weight.shape[1:]) != (c_in, 3, 3):
        raise ValueError(f"fastunet::conv3x3_bn_act: weight must be [C_out, {c_in}, 3, 3], got {tuple(weight.shape)}")
    if scale.shape != (c_out,) or shift.shape != (c_out,):
        raise ValueError(
            f"fastunet::conv3x3_bn_act: scale and shift must be [{c_out}], "
            f"got {tuple(scale.shape)} and {tuple(shift.shape)}"
        )


def _check_head(op: str, c: int, weight: Tensor, bias: Tensor, activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastunet::{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c, 1, 1):
        raise ValueError(f"fastunet::{op}: head weight must be [K, {c}, 1, 1], got {tuple(weight.shape)}")
    k = weight.shape[0]
    if bias.shape != (k,):
        raise ValueError(f"fastunet::{op}: head bias must be [{k}], got {tuple(bias.shape)}")
    return k


# --------------------------------------------------------------------------- composites
def _conv3x3_composite(x, x2, weight, scale, shift, relu) -> Tensor:
    """Eager ``act(scale * conv3x3(cat([x, x2]), weight) + shift)`` in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    xin = x if x2 is None else torch.cat([x, x2], 1)
    y = F.conv2d(xin, weight, padding=1).to(acc) * _channel_vec(scale, acc) + _channel_vec(shift, acc)
    return torch.relu(y) if relu else y


def _head_composite(h, weight, bias, activation) -> Tensor:
    acc = _acc_dtype(h.dtype)
    z = F.conv2d(h, weight.to(h.dtype)).to(acc) + _channel_vec(bias, acc)
    return apply_out_activation(z, activation)


# --------------------------------------------------------------------------- backward helpers
def _conv3x3_grads(grad, x, x2, weight, scale, y, relu, needs):
    """Gradients of ``y = act(scale * conv(cat([x, x2])) + shift)``; ``needs`` = needs_input_grad."""
    need_x, need_x2, need_w, need_scale, need_shift = needs[:5]
    acc = _acc_dtype(x.dtype)
    g = grad.to(acc)
    if relu:
        g = torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))
    xin = x if x2 is None else torch.cat([x, x2], 1)
    gz = (g * _channel_vec(scale, acc)).to(x.dtype)
    gxin, gw, _ = torch.ops.aten.convolution_backward(
        gz, xin, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [need_x or need_x2, need_w, False],
    )  # fmt: skip
    gx = gx2 = None
    if gxin is not None:
        gx = gxin[:, : x.shape[1]] if need_x else None
        gx2 = gxin[:, x.shape[1] :] if (need_x2 and x2 is not None) else None
    gscale = gshift = None
    if need_scale:
        z = F.conv2d(xin, weight, padding=1).to(acc)  # recomputed: cheaper than saving it
        gscale = (g * z).sum((0, 2, 3)).to(scale.dtype)
    if need_shift:
        gshift = g.sum((0, 2, 3)).to(scale.dtype)
    return gx, gx2, gw, gscale, gshift


def _head_grads(grad, h, weight, bias, y, activation, needs):
    """Gradients of ``y = act(conv1x1(h, weight) + bias)``; returns (gh, gweight, gbias)."""
    need_h, need_w, need_b = needs
    acc = _acc_dtype(h.dtype)
    g = grad.to(acc)
    ya = y.to(acc)
    if activation == "sigmoid":
        gz = g * ya * (1 - ya)
    elif activation == "softmax":
        gz = ya * (g - (g * ya).sum(1, keepdim=True))
    else:
        gz = g
    gh, gw, _ = torch.ops.aten.convolution_backward(
        gz.to(h.dtype), h, weight.to(h.dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_h, need_w, False],
    )  # fmt: skip
    gb = gz.sum((0, 2, 3)).to(bias.dtype) if need_b else None
    return gh, (gw.to(weight.dtype) if gw is not None else None), gb


# =========================================================================== conv3x3_bn_act
@torch.library.custom_op("fastunet::conv3x3_bn_act", mutates_args=())
def conv3x3_bn_act(x: Tensor, x2: Tensor | None, weight: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``act(scale * conv3x3(cat([x, x2], 1), weight, pad=1) + shift)`` in one pass.

    x ``[N, C1, H, W]``, x2 ``[N, C2, H, W]`` or None, weight ``[C_out, C1+C2, 3, 3]`` (any
    strides; ``kernels.pack_conv3x3_weight`` gives the fast one), scale/shift ``[C_out]``
    (eval BatchNorm and conv bias folded), ``act`` = ReLU if ``relu``. Returns
    ``[N, C_out, H, W]`` channels_last in x's dtype.
    """
    raise AssertionError("unreachable: every device has its own implementation")


@conv3x3_bn_act.register_fake
def _(x, x2, weight, scale, shift, relu):
    _check_conv3x3(x, x2, weight, scale, shift)
    return _empty_nhwc((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x)


@conv3x3_bn_act.register_kernel(("cpu", "cuda"))
def _(x, x2, weight, scale, shift, relu):
    _check_conv3x3(x, x2, weight, scale, shift)
    if _use_kernels(x):
        return _kernels().conv3x3_bn_act(x, weight, scale.float(), shift.float(), x2=x2, relu=relu)
    return _as_nhwc(_conv3x3_composite(x, x2, weight, scale, shift, relu), x.dtype)


def _conv3x3_setup(ctx, inputs, output):
    x, x2, weight, scale, shift, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, x2, weight, scale, output)


def _conv3x3_backward(ctx, grad):
    x, x2, weight, scale, y = ctx.saved_tensors
    grads = _conv3x3_grads(grad, x, x2, weight, scale, y, ctx.relu, ctx.needs_input_grad)
    return (*grads, None)


conv3x3_bn_act.register_autograd(_conv3x3_backward, setup_context=_conv3x3_setup)


# =========================================================================== conv3x3_bn_act_head
@torch.library.custom_op("fastunet::conv3x3_bn_act_head", mutates_args=())
def conv3x3_bn_act_head(
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
    head_weight: Tensor,
    head_bias: Tensor,
    activation: str,
) -> Tensor:
    """The last decoder conv with the 1x1 head in its epilogue.

    ``head_act(conv1x1(conv3x3_bn_act(x, x2, weight, scale, shift, relu), head_weight) + head_bias)``
    where the ``[N, C_out, H, W]`` intermediate is never written. head_weight ``[K, C_out, 1, 1]``,
    head_bias ``[K]``, activation ``"sigmoid" | "none" | "softmax"`` (over K). Returns
    ``[N, K, H, W]`` channels_last in x's dtype.
    """
    raise AssertionError("unreachable: every device has its own implementation")


@conv3x3_bn_act_head.register_fake
def _(x, x2, weight, scale, shift, relu, head_weight, head_bias, activation):
    _check_conv3x3(x, x2, weight, scale, shift)
    k = _check_head("conv3x3_bn_act_head", weight.shape[0], head_weight, head_bias, activation)
    return _empty_nhwc((x.shape[0], k, x.shape[2], x.shape[3]), x)


@conv3x3_bn_act_head.register_kernel(("cpu", "cuda"))
def _(x, x2, weight, scale, shift, relu, head_weight, head_bias, activation):
    _check_conv3x3(x, x2, weight, scale, shift)
    _check_head("conv3x3_bn_act_head", weight.shape[0], head_weight, head_bias, activation)
    if _use_kernels(x):
        k = _kernels()
        if head_weight.shape[0] <= k.MAX_HEAD_K and weight.shape[0] <= k.MAX_HEAD_C_OUT:
            return k.conv3x3_bn_act_head(
                x, weight, scale.float(), shift.float(), head_weight, head_bias.float(),
                activation=activation, x2=x2, relu=relu,
            )  # fmt: skip
        # Too wide for one epilogue tile: two kernels, the intermediate written once.
        h = k.conv3x3_bn_act(x, weight, scale.float(), shift.float(), x2=x2, relu=relu)
        return k.head1x1(h, head_weight, head_bias.float(), activation=activation)
    h = _conv3x3_composite(x, x2, weight, scale, shift, relu).to(x.dtype)
    return _as_nhwc(_head_composite(h, head_weight, head_bias, activation), x.dtype)


def _conv3x3_head_setup(ctx, inputs, output):
    x, x2, weight, scale, shift, relu, head_weight, head_bias, activation = inputs
    ctx.relu, ctx.activation = relu, activation
    ctx.save_for_backward(x, x2, weight, scale, shift, head_weight, head_bias, output)


def _conv3x3_head_backward(ctx, grad):
    x, x2, weight, scale, shift, head_weight, head_bias, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # The intermediate was never stored: recompute it (one conv) rather than keep N*C*H*W alive.
    h = _conv3x3_composite(x, x2, weight, scale, shift, ctx.relu).to(x.dtype)
    gh, ghw, ghb = _head_grads(grad, h, head_weight, head_bias, y, ctx.activation, (True, *needs[6:8]))
    conv_grads = _conv3x3_grads(gh, x, x2, weight, scale, h, ctx.relu, needs)
    return (*conv_grads, None, ghw, ghb, None)


conv3x3_bn_act_head.register_autograd(_conv3x3_head_backward, setup_context=_conv3x3_head_setup)


# =========================================================================== upconv2x2
@torch.library.custom_op("fastunet::upconv2x2", mutates_args=())
def upconv2x2(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``ConvTranspose2d(kernel_size=2, stride=2)``: ``[N, C_in, h, w] -> [N, C_out, 2h, 2w]``.

    weight ``[C_in, C_out, 2, 2]`` (any strides; ``kernels.pack_upconv2x2_weight`` gives the fast
    one), bias ``[C_out]``. Returns channels_last in x's dtype.
    """
    raise AssertionError("unreachable: every device has its own implementation")


def _check_upconv(x, weight, bias):
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError("fastunet::upconv2x2: x must be 4-D and weight [C_in, C_out, 2, 2]")
    _check_same_dtype("upconv2x2", x=x, weight=weight)
    if weight.shape[0] != x.shape[1] or bias.shape != (weight.shape[1],):
        raise ValueError(
            f"fastunet::upconv2x2: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
            f"do not fit an input with {x.shape[1]} channels"
        )


@upconv2x2.register_fake
def _(x, weight, bias):
    _check_upconv(x, weight, bias)
    return _empty_nhwc((x.shape[0], weight.shape[1], 2 * x.shape[2], 2 * x.shape[3]), x)


@upconv2x2.register_kernel(("cpu", "cuda"))
def _(x, weight, bias):
    _check_upconv(x, weight, bias)
    if _use_kernels(x):
        return _kernels().upconv2x2(x, weight, bias.float())
    acc = _acc_dtype(x.dtype)
    y = F.conv_transpose2d(x, weight, stride=2).to(acc) + _channel_vec(bias, acc)
    return _as_nhwc(y, x.dtype)


def _upconv_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, weight)


def _upconv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad.to(x.dtype), x, weight, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1,
        [need_x, need_w, False],
    )  # fmt: skip
    gb = grad.to(_acc_dtype(x.dtype)).sum((0, 2, 3)).to(ctx.bias_dtype) if need_b else None
    return gx, gw, gb


upconv2x2.register_autograd(_upconv_backward, setup_context=_upconv_setup)


# =========================================================================== maxpool2x2
@torch.library.custom_op("fastunet::maxpool2x2", mutates_args=())
def maxpool2x2(x: Tensor) -> Tensor:
    """2x2 max-pool, stride 2, NaN-propagating like ``torch.max_pool2d``:
    ``[N, C, H, W] -> [N, C, H//2, W//2]`` (H and W even). Returns channels_last."""
    raise AssertionError("unreachable: every device has its own implementation")


def _check_pool(x):
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"fastunet::maxpool2x2: needs a 4-D input with even H and W, got {tuple(x.shape)}")


@maxpool2x2.register_fake
def _(x):
    _check_pool(x)
    return _empty_nhwc((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2), x)


@maxpool2x2.register_kernel(("cpu", "cuda"))
def _(x):
    _check_pool(x)
    if _use_kernels(x):
        return _kernels().maxpool2x2(x)
    return _as_nhwc(F.max_pool2d(x, 2), x.dtype)


def _pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    # Recompute torch's own argmax so ties and NaNs route gradients exactly as the reference does.
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad.to(x.dtype), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
    )


maxpool2x2.register_autograd(_pool_backward, setup_context=_pool_setup)


# =========================================================================== head1x1
@torch.library.custom_op("fastunet::head1x1", mutates_args=())
def head1x1(x: Tensor, weight: Tensor, bias: Tensor, activation: str) -> Tensor:
    """1x1 conv + output activation: ``[N, C, H, W] -> [N, K, H, W]`` with weight ``[K, C, 1, 1]``,
    bias ``[K]``, activation ``"sigmoid" | "none" | "softmax"`` (over K). Returns channels_last."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1.register_fake
def _(x, weight, bias, activation):
    k = _check_head("head1x1", x.shape[1], weight, bias, activation)
    _check_same_dtype("head1x1", x=x, weight=weight)
    return _empty_nhwc((x.shape[0], k, x.shape[2], x.shape[3]), x)


@head1x1.register_kernel(("cpu", "cuda"))
def _(x, weight, bias, activation):
    _check_head("head1x1", x.shape[1], weight, bias, activation)
    _check_same_dtype("head1x1", x=x, weight=weight)
    if _use_kernels(x):
        return _kernels().head1x1(x, weight, bias.float(), activation=activation)
    return _as_nhwc(_head_composite(x, weight, bias, activation), x.dtype)


def _head_setup(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, weight, bias, output)


def _head_backward(ctx, grad):
    x, weight, bias, y = ctx.saved_tensors
    gx, gw, gb = _head_grads(grad, x, weight, bias, y, ctx.activation, ctx.needs_input_grad[:3])
    return gx, gw, gb, None


head1x1.register_autograd(_head_backward, setup_context=_head_setup)

__all__ = ["conv3x3_bn_act", "conv3x3_bn_act_head", "upconv2x2", "maxpool2x2", "head1x1"]
