"""Helpers the op families share: dtype and layout helpers, input checks, the eager composites
used by several families and the backward helpers. How an op is declared and called (the
registry, the device guard, ``kernel_package``) is ``fastunet.ops.op``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ..reference import ACTIVATIONS, apply_out_activation
from . import _verify, op
from .op import AUTO, direct_ok_mutation, kernel_package

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_nhwc(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)


def as_nhwc(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh channels_last copy, so every implementation returns the strides the fake one promises."""
    out = empty_nhwc(t.shape, t, dtype)
    out.copy_(t)
    return out


def use_kernels(x: Tensor):
    """The ``fastunet.kernels`` package when this call runs the Triton kernels, else None (an op
    implementation's one question: ``k = use_kernels(x)``, then ``if k: k.<launcher>(...)``). An
    empty tensor (a rank's empty batch in synchronised BatchNorm training) has nothing to launch
    for: the composites return the empty results and zero sums."""
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0 or (_verify._EAGER_THREADS and _verify.eager_now()):
        return None
    # backend._INTERPRETING is interpreting()'s answer, read here without the call (every op call);
    # the device flags, not ``x.device.type`` (about a microsecond: a new string each read).
    if x.is_cuda or (backend._INTERPRETING and x.is_cpu):
        return op._KERNELS or kernel_package()  # the package once loaded, without the call
    return None


def channel_vec(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def check_norm(op: str, c: int, scale: Tensor | None, shift: Tensor | None, what: str = "in") -> None:
    """An input transform is both ``{what}_scale`` and ``{what}_shift`` (``[c]``), or neither."""
    if (scale is None) != (shift is None):
        raise ValueError(f"fastunet::{op}: give both {what}_scale and {what}_shift, or neither")
    if scale is not None and (scale.shape != (c,) or shift.shape != (c,)):
        raise ValueError(
            f"fastunet::{op}: {what}_scale and {what}_shift must be [{c}], "
            f"got {tuple(scale.shape)} and {tuple(shift.shape)}"
        )


def check_pool(x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None, even: bool = False) -> None:
    """``maxpool2x2``'s input rule; ``even``: ``maxpool2x2_backward``'s (its kernel takes even H and
    W: the forward's backward hands it the even part of an odd input)."""
    if x.dim() != 4:
        raise ValueError(f"fastunet::maxpool2x2: needs a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if even and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"fastunet::maxpool2x2: needs a 4-D input with even H and W, got {tuple(x.shape)}")
    check_norm("maxpool2x2", x.shape[1], in_scale, in_shift)


def check_head(op: str, c: int, weight: Tensor, bias: Tensor, activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastunet::{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c, 1, 1):
        raise ValueError(f"fastunet::{op}: head weight must be [K, {c}, 1, 1], got {tuple(weight.shape)}")
    k = weight.shape[0]
    if bias.shape != (k,):
        raise ValueError(f"fastunet::{op}: head bias must be [{k}], got {tuple(bias.shape)}")
    return k


# --------------------------------------------------------------------------- composites
def affine_relu(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """``relu(x * scale[c] + shift[c])`` rounded to x's dtype (what the kernels apply on load);
    the identity when ``scale`` is None."""
    if scale is None:
        return x
    acc = acc_dtype(x.dtype)
    return torch.relu(x.to(acc) * channel_vec(scale, acc) + channel_vec(shift, acc)).to(x.dtype)


_UNIT_AFFINE: dict[tuple, tuple[Tensor, Tensor]] = {}


def unit_affine(c: int, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(ones, zeros)`` [c]: the identity scale/shift, made once per (c, device, dtype) and only
    ever read (so sharing them across calls and streams is safe). Made fresh, not cached, when
    ``like`` is not a plain tensor (a trace's fake tensor) or a CUDA graph is being captured
    (the graph's memory pool would own them)."""
    device = like.device
    fresh = not direct_ok_mutation(like) or (like.is_cuda and torch.cuda.is_current_stream_capturing())
    key = (c, device, dtype)
    hit = None if fresh else _UNIT_AFFINE.get(key)
    if hit is None:
        hit = (torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype))
        if not fresh:
            _UNIT_AFFINE[key] = hit
    return hit


def norm_arg(scale: Tensor | None, shift: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """A launcher's ``x_norm``: the kernels read fp32 or fp64 vectors (as fp32), so no copy."""
    return None if scale is None else (scale, shift)


def head_composite(h, weight, bias, activation) -> Tensor:
    acc = acc_dtype(h.dtype)
    z = F.conv2d(h, weight.to(h.dtype)).to(acc) + channel_vec(bias, acc)
    return apply_out_activation(z, activation)


# --------------------------------------------------------------------------- backward helpers
def affine_relu_grads(g: Tensor, x: Tensor, scale: Tensor | None, shift: Tensor | None):
    """Backward of ``affine_relu``: ``(dx, dscale, dshift)`` from ``g`` = dL/dT(x), through the
    ``affine_relu_backward`` op. Without a transform: ``(g, None, None)``."""
    if scale is None:
        return g.to(x.dtype), None, None
    return AUTO.affine_relu_backward(g, x, scale, shift)


def head_grads(grad, x, in_scale, in_shift, weight, bias, y, activation, needs):
    """Gradients of ``y = act(conv1x1(T(x), weight) + bias)`` (T = BN+ReLU on load, or the
    identity when ``in_scale`` is None); returns (dL/dT(x), gweight, gbias)."""
    need_in, need_w, need_b = needs
    acc = acc_dtype(x.dtype)
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


def with_norm_defaults(inputs: tuple, n: int) -> tuple:
    """``inputs`` padded with None up to the schema's ``n`` arguments (a call may omit defaults)."""
    return (*inputs, *([None] * (n - len(inputs))))


def grads_for(ctx, grads: tuple) -> tuple:
    """One gradient per input the call actually passed."""
    return grads[: len(ctx.needs_input_grad)]
