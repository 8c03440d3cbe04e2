"""Helpers the op families share: dtype and layout helpers, input checks, the eager composites
used by several families and the backward helpers. How an op is declared and called (the
registry, the device guard, ``kernel_package``) is ``fastunet.ops.op``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import interpreting
from ..reference import ACTIVATIONS, apply_out_activation
from . import _verify
from .op import AUTO, direct_ok_mutation, kernel_package

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
    """Whether this call runs the Triton kernels (see the module docstring). An empty tensor
    (a rank's empty batch in synchronised BatchNorm training) has nothing to launch for: the
    composites return the empty results and zero sums."""
    if x.dtype not in _KERNEL_DTYPES or x.numel() == 0 or (_verify._EAGER_THREADS and _verify.eager_now()):
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


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


def _check_norm(op: str, c: int, scale: Tensor | None, shift: Tensor | None, what: str = "in") -> None:
    """An input transform is both ``{what}_scale`` and ``{what}_shift`` (``[c]``), or neither."""
    if (scale is None) != (shift is None):
        raise ValueError(f"fastunet::{op}: give both {what}_scale and {what}_shift, or neither")
    if scale is not None and (scale.shape != (c,) or shift.shape != (c,)):
        raise ValueError(
            f"fastunet::{op}: {what}_scale and {what}_shift must be [{c}], "
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
def _affine_relu(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """``relu(x * scale[c] + shift[c])`` rounded to x's dtype (what the kernels apply on load);
    the identity when ``scale`` is None."""
    if scale is None:
        return x
    acc = _acc_dtype(x.dtype)
    return torch.relu(x.to(acc) * _channel_vec(scale, acc) + _channel_vec(shift, acc)).to(x.dtype)


def _packed_conv_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The conv kernel's B operand layout in ``dtype`` (a no-op for an already packed weight)."""
    if weight.dtype == dtype and weight.stride(0) == 1:
        return weight
    return kernel_package().pack_conv3x3_weight(weight.detach(), dtype)


def _packed_upconv_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    if weight.dtype == dtype and weight.stride(1) == 1:
        return weight
    return kernel_package().pack_upconv2x2_weight(weight.detach(), dtype)


_UNIT_AFFINE: dict[tuple, tuple[Tensor, Tensor]] = {}


def unit_affine(c: int, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(ones, zeros)`` [c]: the identity scale/shift, made once per (c, device, dtype) and only
    ever read (so sharing them across calls and streams is safe). Made fresh, not cached, when
    ``like`` is not a plain tensor (a trace's fake tensor) or a CUDA graph is being captured
    (the graph's memory pool would own them)."""
    device = like.device
    fresh = not direct_ok_mutation(like) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    key = (c, device, dtype)
    hit = None if fresh else _UNIT_AFFINE.get(key)
    if hit is None:
        hit = (torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype))
        if not fresh:
            _UNIT_AFFINE[key] = hit
    return hit


def _norm_arg(scale: Tensor | None, shift: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """A launcher's ``x_norm``: the kernels read fp32 or fp64 vectors (as fp32), so no copy."""
    return None if scale is None else (scale, shift)


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
def _affine_relu_grads(g: Tensor, x: Tensor, scale: Tensor | None, shift: Tensor | None):
    """Backward of ``_affine_relu``: ``(dx, dscale, dshift)`` from ``g`` = dL/dT(x), through the
    ``affine_relu_backward`` op. Without a transform: ``(g, None, None)``."""
    if scale is None:
        return g.to(x.dtype), None, None
    return AUTO.affine_relu_backward(g, x, scale, shift)


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
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    # torch's ReLU backward rule (zero where the output is <= 0): NaN passes its gradient on.
    dead = torch.relu(xf * _channel_vec(scale, acc) + _channel_vec(shift, acc)) <= 0
    gm = torch.where(dead, torch.zeros((), dtype=acc, device=g.device), g.to(acc))
    dx = (gm * _channel_vec(scale, acc)).to(x.dtype)
    center = _transform_center(scale, shift)
    dshift = gm.sum((0, 2, 3))
    dscale = _uncenter((gm * (xf - _channel_vec(center, acc))).sum((0, 2, 3)), dshift, center, scale.dtype)
    return dx, dscale, dshift.to(shift.dtype)


def _head_grads(grad, x, in_scale, in_shift, weight, bias, y, activation, needs):
    """Gradients of ``y = act(conv1x1(T(x), weight) + bias)`` (T = BN+ReLU on load, or the
    identity when ``in_scale`` is None); returns (dL/dT(x), gweight, gbias)."""
    need_in, need_w, need_b = needs
    acc = _acc_dtype(x.dtype)
    g = grad.to(acc)
    ya = y.to(acc)
    if activation == "sigmoid":
        gz = g * ya * (1 - ya)
    elif activation == "softmax":
        gz = ya * (g - (g * ya).sum(1, keepdim=True))
    else:
        gz = g
    gb = gz.sum((0, 2, 3)).to(bias.dtype) if need_b else None
    gz = gz.to(x.dtype)
    gin = AUTO.head1x1_input_grad(gz, weight) if need_in else None
    gw = AUTO.head1x1_weight_grad(gz, x, in_scale, in_shift).to(weight.dtype) if need_w else None
    return gin, gw, gb


def _with_norm_defaults(inputs: tuple, n: int) -> tuple:
    """``inputs`` padded with None up to the schema's ``n`` arguments (a call may omit defaults)."""
    return (*inputs, *([None] * (n - len(inputs))))


def _grads_for(ctx, grads: tuple) -> tuple:
    """One gradient per input the call actually passed."""
    return grads[: len(ctx.needs_input_grad)]
