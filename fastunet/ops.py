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

Backward formulas call the backward ops at the end of this module (``conv3x3_weight_grad``,
``affine_relu_backward``, ...), which run Triton kernels where the forward does and eager
composites elsewhere; they recompute what is cheap (BatchNorm+ReLU of a raw input, an
unstored intermediate) instead of saving it. The eval path's ``conv3x3_bn_act`` backward stays
an eager composite: training runs ``conv3x3_bn_stats``.

Layout contract: every op returns a channels_last (NHWC) tensor; inputs may have any strides.
Scale, shift and biases are read in float32 (float64 for float64 inputs).

The decoder's concat is fused by giving ``conv3x3_bn_act`` a second input ``x2``: the conv
reads its K range from ``x`` then ``x2``, i.e. it convolves ``cat([x, x2], 1)`` without the
concatenated tensor ever existing. See ``kernels/conv3x3.py`` for the byte count behind that
choice.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
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
    """Whether this call runs the Triton kernels (see the module docstring). An empty tensor
    (a rank's empty batch in synchronised BatchNorm training) has nothing to launch for: the
    composites return the empty results and zero sums."""
    if x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


_KERNELS = None


def _kernels():
    """``fastunet.kernels``, imported on first use: CPU-only installs never need triton."""
    global _KERNELS
    if _KERNELS is None:
        from . import kernels

        _KERNELS = kernels
    return _KERNELS


def _device_guard(device: torch.device):
    """The context that makes ``device`` the current CUDA device, or None when it already is (or
    is not a CUDA device). Triton launches on the current device and its current stream, so
    this is what sends every kernel of an op to its tensors' GPU."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)


def _on_input_device(impl):
    """Run an op's device implementation with its first tensor's device current (the one device
    guard of the package: every kernel launch happens inside some op's implementation)."""

    @functools.wraps(impl)
    def guarded(*args, **kwargs):
        guard = _device_guard(args[0].device)
        if guard is None:
            return impl(*args, **kwargs)
        with guard:
            return impl(*args, **kwargs)

    return guarded


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
    return _kernels().pack_conv3x3_weight(weight.detach(), dtype)


def _packed_upconv_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    if weight.dtype == dtype and weight.stride(1) == 1:
        return weight
    return _kernels().pack_upconv2x2_weight(weight.detach(), dtype)


_UNIT_AFFINE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _unit_affine(c: int, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
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
    return _bwd.affine_relu_backward(g, x, scale, shift)


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
    gin = _bwd.head1x1_input_grad(gz, weight) if need_in else None
    gw = _bwd.head1x1_weight_grad(gz, x, in_scale, in_shift).to(weight.dtype) if need_w else None
    return gin, gw, gb


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
@_on_input_device
def _conv3x3_bn_act_impl(x, x2, weight, scale, shift, relu):
    # On the kernel path the launcher validates (one check per call on the hot path).
    if _use_kernels(x):
        return _kernels().conv3x3_bn_act(x, weight, scale.float(), shift.float(), x2=x2, relu=relu)
    _check_conv3x3(x, x2, weight, scale, shift)
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
@_on_input_device
def _conv3x3_bn_act_head_impl(x, x2, weight, scale, shift, relu, head_weight, head_bias, activation):
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
    _check_conv3x3(x, x2, weight, scale, shift)
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
    gh, ghw, ghb = _head_grads(grad, h, None, None, head_weight, head_bias, y, ctx.activation, (True, *needs[6:8]))
    conv_grads = _conv3x3_grads(gh, x, x2, weight, scale, h, ctx.relu, needs)
    return (*conv_grads, None, ghw, ghb, None)


conv3x3_bn_act_head.register_autograd(_conv3x3_head_backward, setup_context=_conv3x3_head_setup)


# =========================================================================== conv3x3_bn_stats
@torch.library.custom_op("fastunet::conv3x3_bn_stats", mutates_args=())
def conv3x3_bn_stats(
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x2_scale: Tensor | None,
    x2_shift: Tensor | None,
    min_count: int = 2,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training-mode conv: ``z = conv3x3(cat([T(x), T2(x2)], 1), weight, pad=1) + bias`` and
    the BatchNorm batch statistics of z.

    x ``[N, C1, H, W]``, x2 ``[N, C2, H, W]`` or None, weight ``[C_out, C1+C2, 3, 3]``, bias
    ``[C_out]``; the weight may have any float dtype and layout (it is cast to x's dtype and
    packed inside, so autograd saves the parameter itself, not a copy; its gradient comes back
    in its own dtype). ``x_scale``/``x_shift`` ``[C1]`` (and ``x2_*`` ``[C2]``), both or neither: the
    source is a previous layer's raw output and ``T(s) = relu(s * scale + shift)`` (its
    BatchNorm and ReLU, applied as the conv loads it) is what gets convolved; without them T is
    the identity. Returns ``(z, mean, var)``: z ``[N, C_out, H, W]`` channels_last in x's dtype,
    not normalized; mean and biased var ``[C_out]`` (float32; float64 for float64 x) of z as
    stored, over N*H*W values (NaN for none). Gradients flow into all three outputs, so
    BatchNorm's backward is exact when the caller normalizes with mean and var.

    ``min_count``: BatchNorm's rule, a ``ValueError`` ("more than 1 value per channel") when
    N*H*W is below it. The model passes 0 where the rule does not apply to this batch alone:
    statistics merged across ranks (``bn_stats_sync`` applies it to the global count; a rank's
    batch may be empty) or not used (a BatchNorm in eval mode).
    """
    raise AssertionError("unreachable: every device has its own implementation")


def _check_conv3x3_stats(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count=2):
    if not weight.is_floating_point():
        raise TypeError(f"fastunet::conv3x3_bn_stats: weight must be floating point, got {weight.dtype}")
    _check_conv3x3(x, x2, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bias, bias)
    _check_norm("conv3x3_bn_stats", x.shape[1], x_scale, x_shift, "x")
    if x2 is None and x2_scale is not None:
        raise ValueError("fastunet::conv3x3_bn_stats: x2_scale given without x2")
    if x2 is not None:
        _check_norm("conv3x3_bn_stats", x2.shape[1], x2_scale, x2_shift, "x2")
    if x.shape[0] * x.shape[2] * x.shape[3] < min_count:
        # nn.BatchNorm2d's own rule: one value per channel has no variance to normalize by.
        raise ValueError(
            "fastunet::conv3x3_bn_stats: expected more than 1 value per channel when training, "
            f"got input size {tuple(x.shape)}"
        )


@conv3x3_bn_stats.register_fake
def _(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count=2):
    _check_conv3x3_stats(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count)
    c_out = weight.shape[0]
    acc = _acc_dtype(x.dtype)
    z = _empty_nhwc((x.shape[0], c_out, x.shape[2], x.shape[3]), x)
    return z, x.new_empty(c_out, dtype=acc), x.new_empty(c_out, dtype=acc)


@conv3x3_bn_stats.register_kernel(("cpu", "cuda"))
@_on_input_device
def _conv3x3_bn_stats_impl(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count=2):
    _check_conv3x3_stats(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count)
    if _use_kernels(x):
        return _kernels().conv3x3_bn_stats(
            x, _packed_conv_weight(weight, x.dtype), bias.float(), x2=x2,
            x_norm=_norm_arg(x_scale, x_shift), x2_norm=_norm_arg(x2_scale, x2_shift),
        )  # fmt: skip
    acc = _acc_dtype(x.dtype)
    xin = _affine_relu(x, x_scale, x_shift)
    if x2 is not None:
        xin = torch.cat([xin, _affine_relu(x2, x2_scale, x2_shift)], 1)
    z = _as_nhwc(F.conv2d(xin, weight.to(x.dtype), padding=1).to(acc) + _channel_vec(bias, acc), x.dtype)
    zf = z.to(acc)
    if zf.numel() == 0:  # an empty batch: no statistics (what torch.mean of nothing gives)
        nan = zf.new_full((zf.shape[1],), float("nan"))
        return z, nan, nan.clone()
    return z, zf.mean((0, 2, 3)), zf.var((0, 2, 3), unbiased=False)


def _conv3x3_stats_setup(ctx, inputs, output):
    x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift = inputs[:8]
    z, mean, _ = output
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, x2, weight, x_scale, x_shift, x2_scale, x2_shift, z, mean)


def _conv3x3_input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """dL/d(conv input) ``[N, C_in, H, W]`` of a pad-1 3x3 conv, from g = dL/dz ``[N, C_out, H, W]``:
    the forward conv op itself on the transposed, flipped weight (a 3x3 pad-1 conv's input
    gradient is such a conv), so the kernels compute it and ``torch.compile`` can trace it."""
    flipped = weight.detach().to(g.dtype).transpose(0, 1).flip(2, 3)
    if _use_kernels(g):
        flipped = _kernels().pack_conv3x3_weight(flipped)
    ones, zeros = _unit_affine(flipped.shape[0], g, _acc_dtype(g.dtype))
    return _bwd.conv3x3_bn_act(g, None, flipped, ones, zeros, False)


def _conv3x3_stats_backward(ctx, gz, gmean, gvar):
    x, x2, weight, x_scale, x_shift, x2_scale, x2_shift, z, mean = ctx.saved_tensors
    need_x, need_x2, need_w, need_b, need_xs, need_xt, need_x2s, need_x2t = ctx.needs_input_grad[:8]
    # The statistics' gradients reach z directly: d mean/dz = 1/n, d var/dz = 2(z - mean)/n.
    g, g_sum = _bwd.bn_stats_backward(gz.to(z.dtype) if gz is not None else None, z, mean, gmean, gvar)
    gb = g_sum.to(ctx.bias_dtype) if need_b else None
    c1 = x.shape[1]
    gw = None
    if need_w:
        gw = _bwd.conv3x3_weight_grad(g, x, x2, x_scale, x_shift, x2_scale, x2_shift)
        gw = gw.to(weight.dtype)
    gx = gxs = gxt = gx2 = gx2s = gx2t = None
    if need_x or need_x2 or need_xs or need_xt or need_x2s or need_x2t:
        gin = _conv3x3_input_grad(g, weight)
        gx, gxs, gxt = _affine_relu_grads(gin[:, :c1], x, x_scale, x_shift)
        if x2 is not None:
            gx2, gx2s, gx2t = _affine_relu_grads(gin[:, c1:], x2, x2_scale, x2_shift)
    return _grads_for(ctx, (gx, gx2, gw, gb, gxs, gxt, gx2s, gx2t, None))


conv3x3_bn_stats.register_autograd(_conv3x3_stats_backward, setup_context=_conv3x3_stats_setup)


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
    _check_norm("upconv2x2", x.shape[1], in_scale, in_shift)


@upconv2x2.register_fake
def _(x, weight, bias, in_scale=None, in_shift=None):
    _check_upconv(x, weight, bias, in_scale, in_shift)
    return _empty_nhwc((x.shape[0], weight.shape[1], 2 * x.shape[2], 2 * x.shape[3]), x)


@upconv2x2.register_kernel(("cpu", "cuda"))
@_on_input_device
def _upconv2x2_impl(x, weight, bias, in_scale=None, in_shift=None):
    if _use_kernels(x):
        w = _packed_upconv_weight(weight, x.dtype)
        if in_scale is None:
            return _kernels().upconv2x2(x, w, bias.float())
        return _kernels().upconv2x2(x, w, bias.float(), in_scale=in_scale, in_shift=in_shift)
    _check_upconv(x, weight, bias, in_scale, in_shift)
    acc = _acc_dtype(x.dtype)
    y = F.conv_transpose2d(_affine_relu(x, in_scale, in_shift), weight.to(x.dtype), stride=2)
    y = y.to(acc) + _channel_vec(bias, acc)
    return _as_nhwc(y, x.dtype)


def _with_norm_defaults(inputs: tuple, n: int) -> tuple:
    """``inputs`` padded with None up to the schema's ``n`` arguments (a call may omit defaults)."""
    return (*inputs, *([None] * (n - len(inputs))))


def _grads_for(ctx, grads: tuple) -> tuple:
    """One gradient per input the call actually passed."""
    return grads[: len(ctx.needs_input_grad)]


def _upconv_setup(ctx, inputs, output):
    x, weight, bias, in_scale, in_shift = _with_norm_defaults(inputs, 5)
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, weight, in_scale, in_shift)


def _upconv_backward(ctx, grad):
    x, weight, in_scale, in_shift = ctx.saved_tensors
    need_x, need_w, need_b, need_s, need_t = _with_norm_defaults(ctx.needs_input_grad, 5)
    grad = grad.to(x.dtype)
    gb = grad.to(_acc_dtype(x.dtype)).sum((0, 2, 3)).to(ctx.bias_dtype) if need_b else None
    gw = _bwd.upconv2x2_weight_grad(grad, x, in_scale, in_shift).to(weight.dtype) if need_w else None
    gx = gs = gt = None
    if need_x or need_s or need_t:
        gin = _bwd.upconv2x2_input_grad(grad, weight)
        gx, gs, gt = _affine_relu_grads(gin, x, in_scale, in_shift)
    return _grads_for(ctx, (gx, gw, gb, gs, gt))


upconv2x2.register_autograd(_upconv_backward, setup_context=_upconv_setup)


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
    k = _check_head("head1x1", x.shape[1], weight, bias, activation)
    _check_norm("head1x1", x.shape[1], in_scale, in_shift)
    return _empty_nhwc((x.shape[0], k, x.shape[2], x.shape[3]), x)


@head1x1.register_kernel(("cpu", "cuda"))
@_on_input_device
def _head1x1_impl(x, weight, bias, activation, in_scale=None, in_shift=None):
    _check_head("head1x1", x.shape[1], weight, bias, activation)
    _check_norm("head1x1", x.shape[1], in_scale, in_shift)
    if _use_kernels(x):
        weight = weight.to(x.dtype)
        if in_scale is None:
            return _kernels().head1x1(x, weight, bias.float(), activation=activation)
        return _kernels().head1x1(
            x, weight, bias.float(), activation=activation, in_scale=in_scale, in_shift=in_shift
        )
    return _as_nhwc(_head_composite(_affine_relu(x, in_scale, in_shift), weight, bias, activation), x.dtype)


def _head_setup(ctx, inputs, output):
    x, weight, bias, activation, in_scale, in_shift = _with_norm_defaults(inputs, 6)
    ctx.activation = activation
    ctx.save_for_backward(x, weight, bias, in_scale, in_shift, output)


def _head_backward(ctx, grad):
    x, weight, bias, in_scale, in_shift, y = ctx.saved_tensors
    need_x, need_w, need_b, _, need_s, need_t = _with_norm_defaults(ctx.needs_input_grad, 6)
    need_in = need_x or need_s or need_t
    gin, gw, gb = _head_grads(grad, x, in_scale, in_shift, weight, bias, y, ctx.activation, (need_in, need_w, need_b))
    gx = gs = gt = None
    if need_in:
        gx, gs, gt = _affine_relu_grads(gin, x, in_scale, in_shift)
    return _grads_for(ctx, (gx, gw, gb, None, gs, gt))


head1x1.register_autograd(_head_backward, setup_context=_head_setup)


# =========================================================================== BatchNorm (training)
# What nn.BatchNorm2d does with the batch statistics of a training conv, as three ops whose
# kernels each replace a dozen tiny torch ops per layer (see kernels/bn_train.py). The affine
# and the statistics' backward are functional with autograd; the running-statistics update
# mutates the module's buffers and has no gradient (torch.library allows autograd only on
# functional ops, hence the split).


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


@bn_affine.register_kernel(("cpu", "cuda"))
@_on_input_device
def _bn_affine_impl(mean, var, weight, bias, eps):
    if _use_kernels(mean):
        return _kernels().bn_affine(mean, var, weight, bias, eps)
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
    zeros = torch.zeros(mean.shape, dtype=torch.float64, device=mean.device)
    gscale = zeros if gscale is None else gscale
    gshift = zeros if gshift is None else gshift
    gmean, gvar, gw, gb = _bwd.bn_affine_backward(gscale, gshift, mean, var, weight, ctx.eps)
    w_dtype, b_dtype = ctx.dtypes
    gw = gw.to(w_dtype) if w_dtype is not None else None
    gb = gb.to(b_dtype) if b_dtype is not None else None
    return gmean, gvar, gw, gb, None


bn_affine.register_autograd(_bn_affine_backward, setup_context=_bn_affine_setup)


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


@bn_affine_backward.register_kernel(("cpu", "cuda"))
@_on_input_device
def _bn_affine_backward_impl(gscale, gshift, mean, var, weight, eps):
    if _use_kernels(mean):
        return _kernels().bn_affine_backward(gscale, gshift, mean, var, weight, eps)
    gs, gt = gscale.double(), gshift.double()
    rstd = torch.rsqrt(var.double() + eps)
    w = weight.double() if weight is not None else torch.ones_like(rstd)
    centred = gs - gt * mean.double()
    gvar = -0.5 * w * centred * rstd.pow(3)
    return (-gt * w * rstd).to(mean.dtype), gvar.to(var.dtype), centred * rstd, gt.clone()


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


@bn_running_update_.register_kernel(("cpu", "cuda"))
@_on_input_device
def _bn_running_update_impl(mean, var, running_mean, running_var, num_batches_tracked, momentum, count, count_all=None):
    mean, var = mean.detach(), var.detach()
    if _use_kernels(mean):
        return _kernels().bn_running_update_(
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
        unbiased = var * (count / (count - 1))
    else:
        n = count_all.to(torch.float64)
        unbiased = (var.to(torch.float64) * (n / (n - 1))).to(var.dtype)
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return None


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
    return _empty_nhwc(z.shape, z), z.new_empty(z.shape[1], dtype=_acc_dtype(z.dtype))


@bn_stats_backward.register_kernel(("cpu", "cuda"))
@_on_input_device
def _bn_stats_backward_impl(gz, z, mean, gmean, gvar):
    if _use_kernels(z):
        return _kernels().bn_stats_backward(gz, z, mean, gmean, gvar)
    acc = _acc_dtype(z.dtype)
    n = z.numel() // z.shape[1]
    if n == 0:  # an empty batch (a rank's, in synchronised BatchNorm): nothing reaches z
        return _empty_nhwc(z.shape, z), z.new_zeros(z.shape[1], dtype=acc)
    g = gz.to(acc) if gz is not None else torch.zeros(z.shape, dtype=acc, device=z.device)
    if gmean is not None:
        g = g + _channel_vec(gmean.to(acc) / n, acc)
    if gvar is not None:
        g = g + _channel_vec(gvar.to(acc) * (2.0 / n), acc) * (z.to(acc) - _channel_vec(mean, acc))
    return _as_nhwc(g, z.dtype), g.sum((0, 2, 3))


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


@bn_stats_sync.register_kernel(("cpu", "cuda"))
@_on_input_device
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
    gm, gv = _bwd.bn_stats_sync_backward(gmean, gvar, mean, mean_all, count_all, ctx.count, ctx.group)
    return gm, gv.to(ctx.var_dtype), None, None


bn_stats_sync.register_autograd(_bn_stats_sync_backward, setup_context=_bn_stats_sync_setup)


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


@bn_stats_sync_backward.register_kernel(("cpu", "cuda"))
@_on_input_device
def _bn_stats_sync_backward_impl(gmean, gvar, mean, mean_all, count_all, count, group):
    return distributed.sync_stats_backward(gmean, gvar, mean, mean_all, count_all, count, group)


# =========================================================================== pad_channels_nhwc
@torch.library.custom_op("fastunet::pad_channels_nhwc", mutates_args=())
def pad_channels_nhwc(x: Tensor, dtype: torch.dtype, channels: int) -> Tensor:
    """The model's entrance: ``x`` ``[N, C, H, W]`` (any strides, any float dtype) cast to
    ``dtype`` and zero-padded to ``channels`` >= C channels, as a dense channels_last tensor
    ``[N, channels, H, W]``: 16-byte pixels the first conv loads as vectors (see
    ``kernels/entry.py``). The gradient of the padding is dropped."""
    raise AssertionError("unreachable: every device has its own implementation")


def _check_pad(x, dtype, channels):
    if x.dim() != 4 or channels < x.shape[1]:
        raise ValueError(
            f"fastunet::pad_channels_nhwc: needs a 4-D input with at most {channels} channels, got {tuple(x.shape)}"
        )


@pad_channels_nhwc.register_fake
def _(x, dtype, channels):
    _check_pad(x, dtype, channels)
    return _empty_nhwc((x.shape[0], channels, x.shape[2], x.shape[3]), x, dtype)


@pad_channels_nhwc.register_kernel(("cpu", "cuda"))
@_on_input_device
def _pad_channels_nhwc_impl(x, dtype, channels):
    _check_pad(x, dtype, channels)
    if dtype in _KERNEL_DTYPES and _use_kernels(x):
        return _kernels().pad_cast_nhwc(x, dtype, channels)
    out = _empty_nhwc((x.shape[0], channels, x.shape[2], x.shape[3]), x, dtype)
    out[:, x.shape[1] :].zero_()
    out[:, : x.shape[1]].copy_(x)
    return out


def _pad_setup(ctx, inputs, output):
    x, _, _ = inputs
    ctx.in_dtype, ctx.in_ch = x.dtype, x.shape[1]


def _pad_backward(ctx, grad):
    return grad[:, : ctx.in_ch].to(ctx.in_dtype), None, None


pad_channels_nhwc.register_autograd(_pad_backward, setup_context=_pad_setup)


# =========================================================================== backward ops
# The autograd formulas above call these, not the Triton launchers: an op with a fake
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
    _check_norm("affine_relu_backward", x.shape[1], scale, shift, "")
    return _empty_nhwc(x.shape, x), scale.new_empty(scale.shape), shift.new_empty(shift.shape)


@affine_relu_backward.register_kernel(("cpu", "cuda"))
@_on_input_device
def _affine_relu_backward_impl(g, x, scale, shift):
    _check_norm("affine_relu_backward", x.shape[1], scale, shift, "")
    if _use_kernels(x):
        # The kernels take dscale about the transform's zero crossing and add it back in fp64
        # (see _transform_center): two separate fp64 [C] sums, no aliasing between the outputs.
        dx, ds, dt = _kernels().affine_relu_backward(g.to(x.dtype), x, scale, shift, center="transform")
        return dx, ds.to(scale.dtype), dt.to(shift.dtype)
    dx, ds, dt = _affine_relu_grads_composite(g, x, scale, shift)
    return _as_nhwc(dx, x.dtype), ds, dt


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
    _check_pool(x, in_scale, in_shift)
    c = 0 if in_scale is None else x.shape[1]
    vec = in_scale if in_scale is not None else x
    return _empty_nhwc(x.shape, x), vec.new_empty(c), vec.new_empty(c)


@maxpool2x2_backward.register_kernel(("cpu", "cuda"))
@_on_input_device
def _maxpool2x2_backward_impl(g, x, in_scale, in_shift):
    _check_pool(x, in_scale, in_shift)
    vec = in_scale if in_scale is not None else x
    if _use_kernels(x):
        if in_scale is None:
            return _kernels().maxpool2x2_backward(g.to(x.dtype), x)[0], vec.new_empty(0), vec.new_empty(0)
        dx, ds, dt = _kernels().maxpool2x2_backward(g.to(x.dtype), x, in_scale, in_shift, center="transform")
        return dx, ds.to(in_scale.dtype), dt.to(in_shift.dtype)
    xin = _affine_relu(x, in_scale, in_shift)
    # torch's own argmax, so ties and NaNs route gradients exactly as the reference does.
    _, idx = F.max_pool2d(xin, 2, return_indices=True)
    gin = torch.ops.aten.max_pool2d_with_indices_backward(
        g.to(x.dtype), xin, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
    )
    if in_scale is None:
        return _as_nhwc(gin, x.dtype), vec.new_empty(0), vec.new_empty(0)
    dx, ds, dt = _affine_relu_grads_composite(gin, x, in_scale, in_shift)
    return _as_nhwc(dx, x.dtype), ds, dt


@torch.library.custom_op("fastunet::conv3x3_weight_grad", mutates_args=())
def conv3x3_weight_grad(
    g: Tensor,
    x: Tensor,
    x2: Tensor | None,
    x_scale: Tensor | None,
    x_shift: Tensor | None,
    x2_scale: Tensor | None,
    x2_shift: Tensor | None,
) -> Tensor:
    """Weight gradient of ``conv3x3(cat([T(x), T2(x2)], 1))`` (pad 1) for g = dL/dz
    ``[N, C_out, H, W]``: ``[C_out, C1+C2, 3, 3]`` in float32 (float64 for float64 g),
    deterministic. T as in ``conv3x3_bn_stats``."""
    raise AssertionError("unreachable: every device has its own implementation")


@conv3x3_weight_grad.register_fake
def _(g, x, x2, x_scale, x_shift, x2_scale, x2_shift):
    c_in = x.shape[1] + (0 if x2 is None else x2.shape[1])
    return g.new_empty((g.shape[1], c_in, 3, 3), dtype=_acc_dtype(g.dtype))


@conv3x3_weight_grad.register_kernel(("cpu", "cuda"))
@_on_input_device
def _conv3x3_weight_grad_impl(g, x, x2, x_scale, x_shift, x2_scale, x2_shift):
    if _use_kernels(x):
        return _kernels().conv3x3_weight_grad(
            g.to(x.dtype), x, x2, x_norm=_norm_arg(x_scale, x_shift), x2_norm=_norm_arg(x2_scale, x2_shift)
        )
    xin = _affine_relu(x, x_scale, x_shift)
    if x2 is not None:
        xin = torch.cat([xin, _affine_relu(x2, x2_scale, x2_shift)], 1)
    w_shape = [g.shape[1], xin.shape[1], 3, 3]
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.to(x.dtype), xin, xin.new_empty(w_shape), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )  # fmt: skip
    return gw.to(_acc_dtype(g.dtype)).contiguous()


@torch.library.custom_op("fastunet::upconv2x2_input_grad", mutates_args=())
def upconv2x2_input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of ``ConvTranspose2d(k=2, s=2)``: g ``[N, C_out, 2h, 2w]``, weight
    ``[C_in, C_out, 2, 2]`` (any float dtype) -> ``[N, C_in, h, w]`` channels_last in g's dtype."""
    raise AssertionError("unreachable: every device has its own implementation")


@upconv2x2_input_grad.register_fake
def _(g, weight):
    return _empty_nhwc((g.shape[0], weight.shape[0], g.shape[2] // 2, g.shape[3] // 2), g)


@upconv2x2_input_grad.register_kernel(("cpu", "cuda"))
@_on_input_device
def _upconv2x2_input_grad_impl(g, weight):
    if _use_kernels(g):
        return _kernels().upconv2x2_input_grad(g, _packed_upconv_weight(weight, g.dtype))
    return _as_nhwc(F.conv2d(g, weight.to(g.dtype), stride=2), g.dtype)


@torch.library.custom_op("fastunet::upconv2x2_weight_grad", mutates_args=())
def upconv2x2_weight_grad(g: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None) -> Tensor:
    """Weight gradient of ``ConvTranspose2d(k=2, s=2)`` applied to ``T(x)``: g ``[N, C_out, 2h,
    2w]``, raw x ``[N, C_in, h, w]`` -> ``[C_in, C_out, 2, 2]`` float32 (float64 for float64 g),
    deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@upconv2x2_weight_grad.register_fake
def _(g, x, in_scale, in_shift):
    return g.new_empty((x.shape[1], g.shape[1], 2, 2), dtype=_acc_dtype(g.dtype))


@upconv2x2_weight_grad.register_kernel(("cpu", "cuda"))
@_on_input_device
def _upconv2x2_weight_grad_impl(g, x, in_scale, in_shift):
    if _use_kernels(x):
        return _kernels().upconv2x2_weight_grad(g.to(x.dtype), x, x_norm=_norm_arg(in_scale, in_shift))
    xin = _affine_relu(x, in_scale, in_shift)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.to(x.dtype), xin, xin.new_empty((x.shape[1], g.shape[1], 2, 2)), None, [2, 2], [0, 0], [1, 1], True,
        [0, 0], 1, [False, True, False],
    )  # fmt: skip
    return gw.to(_acc_dtype(g.dtype)).contiguous()


@torch.library.custom_op("fastunet::head1x1_input_grad", mutates_args=())
def head1x1_input_grad(gz: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of a 1x1 conv: gz ``[N, K, H, W]`` (gradient of the logits), weight
    ``[K, C, 1, 1]`` (any float dtype) -> ``[N, C, H, W]`` channels_last in gz's dtype."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1_input_grad.register_fake
def _(gz, weight):
    return _empty_nhwc((gz.shape[0], weight.shape[1], gz.shape[2], gz.shape[3]), gz)


@head1x1_input_grad.register_kernel(("cpu", "cuda"))
@_on_input_device
def _head1x1_input_grad_impl(gz, weight):
    if _use_kernels(gz):
        return _kernels().head1x1_input_grad(gz, weight)
    return _as_nhwc(F.conv2d(gz, weight.to(gz.dtype).transpose(0, 1)), gz.dtype)


@torch.library.custom_op("fastunet::head1x1_weight_grad", mutates_args=())
def head1x1_weight_grad(gz: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None) -> Tensor:
    """Weight gradient of a 1x1 conv applied to ``T(x)``: gz ``[N, K, H, W]``, raw x
    ``[N, C, H, W]`` -> ``[K, C, 1, 1]`` float32 (float64 for float64 gz), deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@head1x1_weight_grad.register_fake
def _(gz, x, in_scale, in_shift):
    return gz.new_empty((gz.shape[1], x.shape[1], 1, 1), dtype=_acc_dtype(gz.dtype))


@head1x1_weight_grad.register_kernel(("cpu", "cuda"))
@_on_input_device
def _head1x1_weight_grad_impl(gz, x, in_scale, in_shift):
    if _use_kernels(x):
        gw = _kernels().head1x1_weight_grad(gz.to(x.dtype), x, x_norm=_norm_arg(in_scale, in_shift))
        return gw.reshape(gw.shape[0], gw.shape[1], 1, 1).contiguous()
    acc = _acc_dtype(gz.dtype)
    xin = _affine_relu(x, in_scale, in_shift)
    gw = torch.einsum("nkhw,nchw->kc", gz.to(acc), xin.to(acc))
    return gw.reshape(gw.shape[0], gw.shape[1], 1, 1).contiguous()


# =========================================================================== direct calls
# The dispatcher costs about 10 us per custom-op call (autograd key, redispatch, the Python
# custom-op machinery) while a launch's own host work is a few us: 26 ops per inference forward
# would spend more in dispatch than in launching. When nothing needs the dispatcher the model
# calls the implementations directly (``direct``); they are the same functions the dispatcher
# would reach, so the numbers are identical.


def direct_ok(x: Tensor) -> bool:
    """Whether ``direct`` may bypass the dispatcher for a forward on ``x``: no autograd graph to
    record (grad mode off), a plain tensor (no fake, functional or subclass tensor), and nobody
    watching at the dispatcher: no ``torch.compile`` trace, no ``TorchDispatchMode``, no functorch
    transform, no profiler (so a profile still names every ``fastunet::`` op)."""
    return (
        not torch.is_grad_enabled()
        and type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch.autograd._profiler_enabled()
    )


def direct_ok_mutation(x: Tensor) -> bool:
    """``direct_ok`` for an op without a gradient (a buffer update): grad mode does not matter."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch.autograd._profiler_enabled()
    )


class _OpOrImpl:
    """Calls ``impl`` directly when ``direct_ok`` holds for the argument at ``ref``, else the
    registered op (through the dispatcher, which a trace or a dispatch mode must see)."""

    __slots__ = ("op", "impl", "ref")

    def __init__(self, op, impl, ref: int = 0):
        self.op, self.impl, self.ref = op, impl, ref

    def __call__(self, *args):
        if direct_ok(args[self.ref]):
            return self.impl(*args)
        return self.op(*args)


class _Backward:
    """The ops backward formulas call: during ``loss.backward()`` grad mode is off, so outside a
    trace they skip the dispatcher as the inference forward does (see ``direct_ok``)."""

    def __init__(self):
        ops = torch.ops.fastunet
        self.affine_relu_backward = _OpOrImpl(ops.affine_relu_backward, _affine_relu_backward_impl, 1)
        self.maxpool2x2_backward = _OpOrImpl(ops.maxpool2x2_backward, _maxpool2x2_backward_impl, 1)
        self.conv3x3_weight_grad = _OpOrImpl(ops.conv3x3_weight_grad, _conv3x3_weight_grad_impl, 1)
        self.conv3x3_bn_act = _OpOrImpl(ops.conv3x3_bn_act, _conv3x3_bn_act_impl, 0)
        self.upconv2x2_input_grad = _OpOrImpl(ops.upconv2x2_input_grad, _upconv2x2_input_grad_impl, 0)
        self.upconv2x2_weight_grad = _OpOrImpl(ops.upconv2x2_weight_grad, _upconv2x2_weight_grad_impl, 1)
        self.head1x1_input_grad = _OpOrImpl(ops.head1x1_input_grad, _head1x1_input_grad_impl, 0)
        self.head1x1_weight_grad = _OpOrImpl(ops.head1x1_weight_grad, _head1x1_weight_grad_impl, 1)
        self.bn_affine_backward = _OpOrImpl(ops.bn_affine_backward, _bn_affine_backward_impl, 2)
        self.bn_stats_backward = _OpOrImpl(ops.bn_stats_backward, _bn_stats_backward_impl, 1)
        self.bn_stats_sync_backward = _OpOrImpl(ops.bn_stats_sync_backward, _bn_stats_sync_backward_impl, 0)


class _Direct:
    """The inference ops' implementations, called without the dispatcher (see ``direct_ok``)."""

    conv3x3_bn_act = staticmethod(_conv3x3_bn_act_impl)
    conv3x3_bn_act_head = staticmethod(_conv3x3_bn_act_head_impl)
    upconv2x2 = staticmethod(_upconv2x2_impl)
    maxpool2x2 = staticmethod(_maxpool2x2_impl)
    head1x1 = staticmethod(_head1x1_impl)
    pad_channels_nhwc = staticmethod(_pad_channels_nhwc_impl)
    bn_running_update_ = staticmethod(_bn_running_update_impl)


direct = _Direct()
_bwd = _Backward()


# =========================================================================== the tape
# A training forward through the ops above makes one autograd node per op (about 45 for the
# classic model) and the dispatcher and torch.library's Python autograd wrapper cost tens of us
# per op on the host, forward and backward. In plain eager mode (``direct_ok_mutation``) the
# model instead runs its training forward inside ONE ``torch.autograd.Function``: every op runs
# its implementation directly and its ``setup_context`` records what it saves; the Function's
# backward replays the ops' own backward formulas in reverse, adding gradients where a tensor
# has several readers (a skip connection, a BatchNorm's scale). Same implementations, same
# formulas, so the same numbers; the tensors the ops save go through the Function's
# ``save_for_backward``, so ``saved_tensors_hooks`` (memory accounting, offloading) see them.
# Under torch.compile, a dispatch mode, functorch or the profiler the per-op path runs.


class _TapeCtx:
    """What an op's ``setup_context`` and backward formula see in place of autograd's ctx."""

    def __init__(self, tape: Tape, needs: tuple):
        self._tape = tape
        self._span = (0, 0)
        self.needs_input_grad = needs

    def save_for_backward(self, *tensors):
        start = len(self._tape.saved)
        self._tape.saved.extend(tensors)
        self._span = (start, len(self._tape.saved))

    @property
    def saved_tensors(self):
        start, stop = self._span
        return tuple(self._tape.unpacked[start:stop])


class Tape:
    """Records the training ops of one forward (see the comment above); ``run_taped`` replays it."""

    def __init__(self):
        self.records: list = []
        self.saved: list = []
        self.pinned: list = []
        self.unpacked: list | tuple = ()
        self._grad_ids: set[int] = set()

    def mark(self, tensors) -> None:
        """The leaves gradients flow to (the Function's inputs that require grad)."""
        self._grad_ids.update(id(t) for t in tensors if isinstance(t, Tensor) and t.requires_grad)

    def _run(self, impl, setup, backward, *args):
        out = impl(*args)
        needs = tuple(isinstance(a, Tensor) and id(a) in self._grad_ids for a in args)
        if any(needs):
            ctx = _TapeCtx(self, needs)
            setup(ctx, args, out)
            outs = out if isinstance(out, tuple) else (out,)
            self._grad_ids.update(id(o) for o in outs)
            self.records.append((backward, ctx, args, outs))
        return out

    def finish(self, output: Tensor) -> None:
        """After the forward: outputs are kept by id, and every one but ``output`` stays pinned
        (with the inputs) so that no id is reused while the tape lives; ``output`` is not held,
        since it holds the autograd node that holds this tape (a reference cycle)."""
        self.pinned = [o for *_, outs in self.records for o in outs if o is not output]
        self.records = [(b, ctx, args, tuple(map(id, outs))) for b, ctx, args, outs in self.records]

    def conv3x3_bn_stats(self, *args):
        return self._run(_conv3x3_bn_stats_impl, _conv3x3_stats_setup, _conv3x3_stats_backward, *args)

    def bn_affine(self, *args):
        return self._run(_bn_affine_impl, _bn_affine_setup, _bn_affine_backward, *args)

    def bn_stats_sync(self, *args):
        return self._run(_bn_stats_sync_impl, _bn_stats_sync_setup, _bn_stats_sync_backward, *args)

    def maxpool2x2(self, *args):
        return self._run(_maxpool2x2_impl, _pool_setup, _pool_backward, *args)

    def upconv2x2(self, *args):
        return self._run(_upconv2x2_impl, _upconv_setup, _upconv_backward, *args)

    def head1x1(self, *args):
        return self._run(_head1x1_impl, _head_setup, _head_backward, *args)

    def pad_channels_nhwc(self, *args):
        return self._run(_pad_channels_nhwc_impl, _pad_setup, _pad_backward, *args)

    def pad_weight_in(self, weight: Tensor, channels: int) -> Tensor:
        return self._run(_pad_weight_in, _pad_weight_setup, _pad_weight_backward, weight, channels)

    bn_running_update_ = staticmethod(_bn_running_update_impl)

    def backward(self, out_id: int, grad: Tensor, leaf_ids: tuple) -> tuple:
        """Gradients of the leaves (ids; None for a leaf that needs none) from ``grad`` = dL/d of
        the output ``out_id``, through the records in reverse."""
        grads = {out_id: grad}
        for backward, ctx, args, out_ids in reversed(self.records):
            gouts = [grads.pop(i, None) for i in out_ids]
            if all(g is None for g in gouts):
                continue
            for g_in, a, need in zip(backward(ctx, *gouts), args, ctx.needs_input_grad, strict=False):
                if g_in is None or not need:  # only tensors on the tape (or leaves) get gradients
                    continue
                key = id(a)
                grads[key] = g_in if key not in grads else grads[key] + g_in
        return tuple(None if i is None else grads.get(i) for i in leaf_ids)


def _pad_weight_in(weight: Tensor, channels: int) -> Tensor:
    """``weight`` ``[C_out, C_in, k, k]`` with zero input channels added up to ``channels``."""
    return F.pad(weight, (0, 0, 0, 0, 0, channels - weight.shape[1]))


def _pad_weight_setup(ctx, inputs, output):
    ctx.in_ch = inputs[0].shape[1]


def _pad_weight_backward(ctx, grad):
    return grad[:, : ctx.in_ch], None


class _Untaped(_Direct):
    """The tape's interface without recording (nothing needs a gradient): the direct calls plus
    the training-only ops."""

    conv3x3_bn_stats = staticmethod(_conv3x3_bn_stats_impl)
    bn_affine = staticmethod(_bn_affine_impl)
    bn_stats_sync = staticmethod(_bn_stats_sync_impl)
    pad_weight_in = staticmethod(_pad_weight_in)


class OpsNamespace:
    """The per-op path: the registered ops (one autograd node each), for traces and modes."""

    def __getattr__(self, name):
        if name == "pad_weight_in":
            return _pad_weight_in  # plain torch ops: autograd records them itself
        return getattr(torch.ops.fastunet, name)


class _TapeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *leaves):
        tape = Tape()
        tape.mark(leaves)
        out = fn(tape)
        tape.finish(out)
        ctx.save_for_backward(*tape.saved)
        tape.saved = []  # autograd holds them now (through any saved-tensor hooks)
        ctx.tape, ctx.out_id = tape, id(out)
        ctx.leaf_ids = tuple(id(t) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves)
        return out

    @staticmethod
    def backward(ctx, grad):
        tape = ctx.tape
        tape.unpacked = ctx.saved_tensors
        grads = tape.backward(ctx.out_id, grad, ctx.leaf_ids)
        ctx.tape = None  # the activations go with it
        return (None, *grads)


def run_taped(fn, leaves: tuple) -> Tensor:
    """``fn(ops)`` (a training forward written against the ops' interface) with one autograd
    node for all of it (see the comment above). ``leaves``: every tensor gradients may flow to
    (the input and the parameters). Without any leaf requiring grad (or grad mode off) nothing
    is recorded."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in leaves):
        return fn(_Untaped)
    return _TapeFunction.apply(fn, *leaves)


__all__ = [
    "affine_relu_backward",
    "bn_affine",
    "bn_affine_backward",
    "bn_running_update_",
    "bn_stats_backward",
    "bn_stats_sync",
    "bn_stats_sync_backward",
    "direct",
    "direct_ok",
    "direct_ok_mutation",
    "conv3x3_bn_act",
    "conv3x3_bn_act_head",
    "conv3x3_bn_stats",
    "conv3x3_weight_grad",
    "head1x1",
    "head1x1_input_grad",
    "head1x1_weight_grad",
    "maxpool2x2",
    "maxpool2x2_backward",
    "pad_channels_nhwc",
    "upconv2x2",
    "upconv2x2_input_grad",
    "upconv2x2_weight_grad",
]
