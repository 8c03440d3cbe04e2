"""The 3x3 conv ops (``kernels/conv3x3.py``): ``conv3x3_bn_act`` (eval conv + folded BN + ReLU,
with the decoder's concat fused as a second input ``x2``), ``conv3x3_bn_act_head`` (the same
with the 1x1 head in the epilogue) and ``conv3x3_bn_stats`` (the training conv with the
previous BN+ReLU on load and this BN's batch statistics), with their autograd formulas; and
``conv3x3_up_bn_act`` / ``conv3x3_up_bn_stats``: the decoder's first conv reading its up-sampled
half (odd-size zero pad, optionally bilinear x2) through a geometry, never as a tensor.

The decoder's concat is fused by giving ``conv3x3_bn_act`` a second input ``x2``: the conv
reads its K range from ``x`` then ``x2``, i.e. it convolves ``cat([x, x2], 1)`` without the
concatenated tensor ever existing. See ``kernels/conv3x3.py`` for the byte count behind that
choice. The eval path's ``conv3x3_bn_act`` backward stays an eager composite: training runs
``conv3x3_bn_stats``.
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
    check_head,
    check_norm,
    empty_nhwc,
    grads_for,
    head_composite,
    head_grads,
    norm_arg,
    unit_affine,
    use_kernels,
)
from .derived import derived, untracked
from .op import AUTO, declare, kernel_package


def _check_same_dtype(op: str, **tensors: Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"fastunet::{op}: tensors must share one dtype, got {dtypes}")


def _check_conv3x3(
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    op: str = "conv3x3_bn_act",
    cast: bool = False,
) -> None:
    """The conv's sources and weight agree (``_check_conv3x3_weight``); the weight has the sources'
    dtype unless ``cast`` (the training forms cast the parameter inside)."""
    if x.dim() != 4 or (x2 is not None and x2.dim() != 4):
        raise ValueError(f"fastunet::{op}: x and x2 must be 4-D")
    _check_same_dtype(op, x=x, x2=x2, weight=None if cast else weight)
    if x2 is not None and (x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:]):
        raise ValueError(
            f"fastunet::{op}: x2 {tuple(x2.shape)} must match x {tuple(x.shape)} in batch and spatial size"
        )
    _check_conv3x3_weight(op, x.shape[1] + (0 if x2 is None else x2.shape[1]), weight, scale, shift)


def _check_conv3x3_weight(op: str, c_in: int, weight: Tensor, scale: Tensor, shift: Tensor) -> None:
    """weight ``[C_out, c_in, 3, 3]``, scale and shift (the training forms: the bias twice) ``[C_out]``."""
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c_in, 3, 3):
        raise ValueError(f"fastunet::{op}: weight must be [C_out, {c_in}, 3, 3], got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if scale.shape != (c_out,) or shift.shape != (c_out,):
        what = "scale and shift" if scale is not shift else "bias"
        got = f"{tuple(scale.shape)} and {tuple(shift.shape)}" if scale is not shift else f"{tuple(scale.shape)}"
        raise ValueError(f"fastunet::{op}: {what} must be [{c_out}], got {got}")


def _packed_conv_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The conv kernel's B operand layout in ``dtype`` (a no-op for an already packed weight), made
    once per parameter version (``derived``)."""
    if weight.dtype == dtype and weight.stride(0) == 1:
        return weight
    return derived(weight, ("conv3x3", dtype), lambda w: kernel_package().pack_conv3x3_weight(untracked(w), dtype))


def _flipped_weight(w: Tensor, dtype: torch.dtype, packed: bool) -> Tensor:
    """``w`` in ``dtype``, transposed and flipped: the input gradient's conv weight (packed for the kernels)."""
    if not packed:
        return w.detach().to(dtype).transpose(0, 1).flip(2, 3)
    # Cast, transpose and pack in one copy, then flip: ``flip`` keeps its input's strides, so the
    # result is packed as well (five torch ops where casting, flipping and then packing took eight).
    flipped = kernel_package().pack_conv3x3_weight(untracked(w).transpose(0, 1), dtype).flip(2, 3)
    return flipped if flipped.stride(0) == 1 else kernel_package().pack_conv3x3_weight(flipped)


def _conv3x3_composite(x, x2, weight, scale, shift, relu) -> Tensor:
    """Eager ``act(scale * conv3x3(cat([x, x2]), weight) + shift)`` in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    xin = x if x2 is None else torch.cat([x, x2], 1)
    y = F.conv2d(xin, weight, padding=1).to(acc) * channel_vec(scale, acc) + channel_vec(shift, acc)
    return torch.relu(y) if relu else y


def _conv3x3_grads(grad, x, x2, weight, scale, y, relu, needs):
    """Gradients of ``y = act(scale * conv(cat([x, x2])) + shift)``; ``needs`` = needs_input_grad."""
    need_x, need_x2, need_w, need_scale, need_shift = needs[:5]
    acc = acc_dtype(x.dtype)
    g = grad.to(acc)
    if relu:
        g = torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))
    xin = x if x2 is None else torch.cat([x, x2], 1)
    gz = (g * channel_vec(scale, acc)).to(x.dtype)
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
    return empty_nhwc((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x)


def _conv3x3_bn_act_impl(x, x2, weight, scale, shift, relu):
    # On the kernel path the launcher validates (one check per call on the hot path).
    k = use_kernels(x)
    if k:
        return k.conv3x3_bn_act(x, weight, scale.float(), shift.float(), x2=x2, relu=relu)
    _check_conv3x3(x, x2, weight, scale, shift)
    return as_nhwc(_conv3x3_composite(x, x2, weight, scale, shift, relu), x.dtype)


def _conv3x3_setup(ctx, inputs, output):
    x, x2, weight, scale, shift, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, x2, weight, scale, output)


def _conv3x3_backward(ctx, grad):
    x, x2, weight, scale, y = ctx.saved_tensors
    grads = _conv3x3_grads(grad, x, x2, weight, scale, y, ctx.relu, ctx.needs_input_grad)
    return (*grads, None)


declare(conv3x3_bn_act, _conv3x3_bn_act_impl, setup=_conv3x3_setup, backward=_conv3x3_backward)


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
    k = check_head("conv3x3_bn_act_head", weight.shape[0], head_weight, head_bias, activation)
    return empty_nhwc((x.shape[0], k, x.shape[2], x.shape[3]), x)


def _conv3x3_bn_act_head_impl(x, x2, weight, scale, shift, relu, head_weight, head_bias, activation):
    check_head("conv3x3_bn_act_head", weight.shape[0], head_weight, head_bias, activation)
    k = use_kernels(x)
    if k:
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
    return as_nhwc(head_composite(h, head_weight, head_bias, activation), x.dtype)


def _conv3x3_head_setup(ctx, inputs, output):
    x, x2, weight, scale, shift, relu, head_weight, head_bias, activation = inputs
    ctx.relu, ctx.activation = relu, activation
    ctx.save_for_backward(x, x2, weight, scale, shift, head_weight, head_bias, output)


def _conv3x3_head_backward(ctx, grad):
    x, x2, weight, scale, shift, head_weight, head_bias, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # The intermediate was never stored: recompute it (one conv) rather than keep N*C*H*W alive.
    h = _conv3x3_composite(x, x2, weight, scale, shift, ctx.relu).to(x.dtype)
    gh, ghw, ghb = head_grads(grad, h, None, None, head_weight, head_bias, y, ctx.activation, (True, *needs[6:8]))
    conv_grads = _conv3x3_grads(gh, x, x2, weight, scale, h, ctx.relu, needs)
    return (*conv_grads, None, ghw, ghb, None)


declare(conv3x3_bn_act_head, _conv3x3_bn_act_head_impl, setup=_conv3x3_head_setup, backward=_conv3x3_head_backward)


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


def _check_conv3x3_stats(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count=2, shapes=True):
    """``shapes=False`` on the kernel path: the launcher checks the sources, the weight and the bias
    itself; the transforms' pairs and BatchNorm's count rule are the op's own."""
    if not weight.is_floating_point():
        raise TypeError(f"fastunet::conv3x3_bn_stats: weight must be floating point, got {weight.dtype}")
    if shapes:
        _check_conv3x3(x, x2, weight, bias, bias, "conv3x3_bn_stats", cast=True)
    check_norm("conv3x3_bn_stats", x.shape[1], x_scale, x_shift, "x")
    if x2 is None and x2_scale is not None:
        raise ValueError("fastunet::conv3x3_bn_stats: x2_scale given without x2")
    if x2 is not None:
        check_norm("conv3x3_bn_stats", x2.shape[1], x2_scale, x2_shift, "x2")
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
    acc = acc_dtype(x.dtype)
    z = empty_nhwc((x.shape[0], c_out, x.shape[2], x.shape[3]), x)
    return z, x.new_empty(c_out, dtype=acc), x.new_empty(c_out, dtype=acc)


def _conv3x3_bn_stats_impl(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count=2):
    k = use_kernels(x)
    _check_conv3x3_stats(x, x2, weight, bias, x_scale, x_shift, x2_scale, x2_shift, min_count, shapes=not k)
    if k:
        return k.conv3x3_bn_stats(
            x, _packed_conv_weight(weight, x.dtype), bias.float(), x2=x2,
            x_norm=norm_arg(x_scale, x_shift), x2_norm=norm_arg(x2_scale, x2_shift),
        )  # fmt: skip
    acc = acc_dtype(x.dtype)
    xin = affine_relu(x, x_scale, x_shift)
    if x2 is not None:
        xin = torch.cat([xin, affine_relu(x2, x2_scale, x2_shift)], 1)
    z = as_nhwc(F.conv2d(xin, weight.to(x.dtype), padding=1).to(acc) + channel_vec(bias, acc), x.dtype)
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
    packed = bool(use_kernels(g))  # in the cache key: whether the flipped weight is packed
    flipped = derived(weight, ("conv3x3_flipped", g.dtype, packed), lambda w: _flipped_weight(w, g.dtype, packed))
    ones, zeros = unit_affine(flipped.shape[0], g, acc_dtype(g.dtype))
    return AUTO.conv3x3_bn_act(g, None, flipped, ones, zeros, False)


def _conv3x3_stats_backward(ctx, gz, gmean, gvar):
    x, x2, weight, x_scale, x_shift, x2_scale, x2_shift, z, mean = ctx.saved_tensors
    need_x, need_x2, need_w, need_b, need_xs, need_xt, need_x2s, need_x2t = ctx.needs_input_grad[:8]
    # The statistics' gradients reach z directly: d mean/dz = 1/n, d var/dz = 2(z - mean)/n.
    g, g_sum = AUTO.bn_stats_backward(gz.to(z.dtype) if gz is not None else None, z, mean, gmean, gvar)
    gb = g_sum.to(ctx.bias_dtype) if need_b else None
    c1 = x.shape[1]
    gw = None
    if need_w:
        gw = AUTO.conv3x3_weight_grad(g, x, x2, x_scale, x_shift, x2_scale, x2_shift)
        gw = gw.to(weight.dtype)
    gx = gxs = gxt = gx2 = gx2s = gx2t = None
    if need_x or need_x2 or need_xs or need_xt or need_x2s or need_x2t:
        gin = _conv3x3_input_grad(g, weight)
        # One source: gin is x's gradient whole (slicing it would only make an alias, a torch op).
        gx, gxs, gxt = affine_relu_grads(gin if x2 is None else gin[:, :c1], x, x_scale, x_shift)
        if x2 is not None:
            gx2, gx2s, gx2t = affine_relu_grads(gin[:, c1:], x2, x2_scale, x2_shift)
    return grads_for(ctx, (gx, gx2, gw, gb, gxs, gxt, gx2s, gx2t, None))


declare(conv3x3_bn_stats, _conv3x3_bn_stats_impl, setup=_conv3x3_stats_setup, backward=_conv3x3_stats_backward)


# =========================================================================== conv3x3_up_bn_*
# The decoder's first conv when the up-sampled half does not exist at the skip's size (milesial's
# decoder: U = up-sampled map zero-padded by the odd-size difference, or bilinear x2 of the
# low-res map). The kernels read U through a geometry (``kernels.conv3x3_up_bn_act``); the
# composites and the backward formulas build U with torch.


def _check_conv3x3_up(
    op: str, skip: Tensor, up: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, bilinear: bool, cast: bool = False
) -> None:
    """The geometry (up fits in the skip after the optional bilinear x2) and the weight
    (``_check_conv3x3_weight``; of the sources' dtype unless ``cast``, as ``_check_conv3x3``)."""
    if skip.dim() != 4 or up.dim() != 4:
        raise ValueError(f"fastunet::{op}: skip and up must be 4-D")
    _check_same_dtype(op, skip=skip, up=up, weight=None if cast else weight)
    if up.shape[0] != skip.shape[0]:
        raise ValueError(f"fastunet::{op}: up {tuple(up.shape)} and skip {tuple(skip.shape)} differ in batch size")
    f = 2 if bilinear else 1
    if min(up.shape[2], up.shape[3]) < 1 or f * up.shape[2] > skip.shape[2] or f * up.shape[3] > skip.shape[3]:
        raise ValueError(
            f"fastunet::{op}: the {'bilinear x2 of ' if bilinear else ''}up map {tuple(up.shape[2:])} must be "
            f"non-empty and fit in the skip's {tuple(skip.shape[2:])}"
        )
    _check_conv3x3_weight(op, skip.shape[1] + up.shape[1], weight, scale, shift)


def _up_sources(skip: Tensor, u: Tensor, up_first: bool) -> tuple[Tensor, Tensor]:
    """``(x, x2)`` in concat order."""
    return (u, skip) if up_first else (skip, u)


def _up_map(up: Tensor, bilinear: bool, size, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """U at the skip's ``size`` (H, W), in up's dtype: ``relu(up * scale + shift)`` (when given),
    bilinear x2 with align_corners=True (when ``bilinear``; in the accumulation dtype, rounded
    once, as the kernel does), zero-padded with ``(H - Hu) // 2`` rows on top and ``(W - Wu) // 2``
    columns on the left (milesial's ``F.pad``), the rest below / right."""
    if bilinear:
        acc = acc_dtype(up.dtype)
        u = up.to(acc)
        if scale is not None:
            u = torch.relu(u * channel_vec(scale, acc) + channel_vec(shift, acc))
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=True).to(up.dtype)
    else:
        u = affine_relu(up, scale, shift)
    dh, dw = size[0] - u.shape[2], size[1] - u.shape[3]
    if dh or dw:
        u = F.pad(u, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
    return u


def _bilinear_x2_matrix(n: int, like: Tensor) -> Tensor:
    """``[2n, n]``: row i holds the align_corners=True weights of output i (torch's rule: source
    ``i * (n - 1) / (2n - 1)``, neighbours ``i0 = floor``, ``min(i0 + 1, n - 1)``)."""
    i = torch.arange(2 * n, device=like.device, dtype=like.dtype)
    src = i * (n - 1) / (2 * n - 1)
    i0 = src.floor().clamp(max=n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    l1 = src - i0
    cols = torch.arange(n, device=like.device, dtype=like.dtype)
    return (cols == i0[:, None]) * (1 - l1)[:, None] + (cols == i1[:, None]) * l1[:, None]


def _up_map_backward(gu: Tensor, up: Tensor, bilinear: bool) -> Tensor:
    """dL/d(the up map before padding: up itself, or its activated form when bilinear) from
    gu = dL/dU ``[N, C_u, H, W]``: the pad's backward is a crop; bilinear x2 is separable,
    ``U = A_h X A_w^T``, so its backward is ``A_h^T G A_w`` (two small matmuls in the accumulation
    dtype; plain ops, so AOT tracing with dynamic shapes goes through them)."""
    h_up, w_up = (2 * up.shape[2], 2 * up.shape[3]) if bilinear else (up.shape[2], up.shape[3])
    top, left = (gu.shape[2] - h_up) // 2, (gu.shape[3] - w_up) // 2
    g = gu[:, :, top : top + h_up, left : left + w_up]
    if bilinear:
        g = g.to(acc_dtype(up.dtype))
        a_h = _bilinear_x2_matrix(up.shape[2], g)
        a_w = _bilinear_x2_matrix(up.shape[3], g)
        g = (a_h.t() @ g @ a_w).to(up.dtype)
    return g


@torch.library.custom_op("fastunet::conv3x3_up_bn_act", mutates_args=())
def conv3x3_up_bn_act(
    skip: Tensor,
    up: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
    up_first: bool,
    bilinear: bool,
) -> Tensor:
    """The decoder's first conv, ``act(scale * conv3x3(cat(...), weight, pad=1) + shift)``, with its
    up-sampled half read through a geometry instead of a tensor.

    skip ``[N, C_s, H, W]``; up ``[N, C_u, h, w]``; U = ``bilinear_x2(up)`` (align_corners=True)
    if ``bilinear`` else up, ``Hu x Wu`` <= H x W, zero-padded to H x W with ``(H - Hu) // 2``
    rows on top and ``(W - Wu) // 2`` columns on the left (milesial's pad). The conv input is
    ``cat([U, skip])`` if ``up_first`` else ``cat([skip, U])``; weight ``[C_out, C_s + C_u, 3, 3]``
    in that order (packed for eval, any layout), scale/shift ``[C_out]`` as ``conv3x3_bn_act``.
    Returns ``[N, C_out, H, W]`` channels_last in skip's dtype. With ``bilinear=False`` and equal
    sizes this is ``conv3x3_bn_act`` of the two sources. Backward: U is built with torch (pad /
    interpolate), the conv's gradients are ``conv3x3_bn_act``'s, then the crop and the
    interpolation's transpose take dL/dU back to up.
    """
    raise AssertionError("unreachable: every device has its own implementation")


@conv3x3_up_bn_act.register_fake
def _(skip, up, weight, scale, shift, relu, up_first, bilinear):
    _check_conv3x3_up("conv3x3_up_bn_act", skip, up, weight, scale, shift, bilinear)
    return empty_nhwc((skip.shape[0], weight.shape[0], skip.shape[2], skip.shape[3]), skip)


def _conv3x3_up_bn_act_impl(skip, up, weight, scale, shift, relu, up_first, bilinear):
    k = use_kernels(skip)
    if k:  # the launcher validates
        return k.conv3x3_up_bn_act(
            skip, up, weight, scale.float(), shift.float(), up_first=up_first, bilinear=bilinear, relu=relu
        )  # fmt: skip
    _check_conv3x3_up("conv3x3_up_bn_act", skip, up, weight, scale, shift, bilinear)
    x, x2 = _up_sources(skip, _up_map(up, bilinear, skip.shape[2:]), up_first)
    return as_nhwc(_conv3x3_composite(x, x2, weight, scale, shift, relu), skip.dtype)


def _conv3x3_up_setup(ctx, inputs, output):
    skip, up, weight, scale, shift, relu, up_first, bilinear = inputs
    ctx.relu, ctx.up_first, ctx.bilinear = relu, up_first, bilinear
    ctx.save_for_backward(skip, up, weight, scale, output)


def _conv3x3_up_backward(ctx, grad):
    skip, up, weight, scale, y = ctx.saved_tensors
    need_skip, need_up, need_w, need_scale, need_shift = ctx.needs_input_grad[:5]
    u = _up_map(up, ctx.bilinear, skip.shape[2:])
    x, x2 = _up_sources(skip, u, ctx.up_first)
    need_x, need_x2 = (need_up, need_skip) if ctx.up_first else (need_skip, need_up)
    gx, gx2, gw, gscale, gshift = _conv3x3_grads(
        grad, x, x2, weight, scale, y, ctx.relu, (need_x, need_x2, need_w, need_scale, need_shift)
    )  # fmt: skip
    gu, gskip = (gx, gx2) if ctx.up_first else (gx2, gx)
    gup = _up_map_backward(gu, up, ctx.bilinear) if gu is not None else None
    return gskip, gup, gw, gscale, gshift, None, None, None


declare(conv3x3_up_bn_act, _conv3x3_up_bn_act_impl, setup=_conv3x3_up_setup, backward=_conv3x3_up_backward)


@torch.library.custom_op("fastunet::conv3x3_up_bn_stats", mutates_args=())
def conv3x3_up_bn_stats(
    skip: Tensor,
    up: Tensor,
    weight: Tensor,
    bias: Tensor,
    skip_scale: Tensor | None,
    skip_shift: Tensor | None,
    up_scale: Tensor | None,
    up_shift: Tensor | None,
    up_first: bool,
    bilinear: bool,
    min_count: int = 2,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training form of ``conv3x3_up_bn_act``: ``z = conv3x3(cat(...), weight) + bias`` and z's
    BatchNorm batch statistics, as ``conv3x3_bn_stats`` (weight: the parameter, any float dtype;
    bias ``[C_out]``; ``min_count``: BatchNorm's rule).

    skip_scale/skip_shift ``[C_s]`` and up_scale/up_shift ``[C_u]`` (each pair both or neither):
    the source is a previous layer's raw output and ``relu(v * scale + shift)`` is applied as it
    is read; for up, to each low-res value before interpolating (milesial up-samples the
    activated map), the zero padding after it. Returns ``(z, mean, var)``: z ``[N, C_out, H, W]``
    channels_last in skip's dtype; mean and biased var ``[C_out]`` (float32; float64 for
    float64). Backward: U is built with torch and the weight and input gradients are the
    ``conv3x3_weight_grad`` / conv ops' (as ``conv3x3_bn_stats``'), then the crop, the
    interpolation's transpose and the BN+ReLU backward take dL/dU back to up.
    """
    raise AssertionError("unreachable: every device has its own implementation")


def _check_conv3x3_up_stats(
    skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, bilinear, min_count, shapes=True
):
    """``shapes=False`` on the kernel path, as ``_check_conv3x3_stats``."""
    op = "conv3x3_up_bn_stats"
    if not weight.is_floating_point():
        raise TypeError(f"fastunet::{op}: weight must be floating point, got {weight.dtype}")
    if shapes:
        _check_conv3x3_up(op, skip, up, weight, bias, bias, bilinear, cast=True)
    check_norm(op, skip.shape[1], skip_scale, skip_shift, "skip")
    check_norm(op, up.shape[1], up_scale, up_shift, "up")
    if skip.shape[0] * skip.shape[2] * skip.shape[3] < min_count:
        raise ValueError(
            f"fastunet::{op}: expected more than 1 value per channel when training, got input size {tuple(skip.shape)}"
        )


@conv3x3_up_bn_stats.register_fake
def _(skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, up_first, bilinear, min_count=2):
    _check_conv3x3_up_stats(skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, bilinear, min_count)
    c_out = weight.shape[0]
    acc = acc_dtype(skip.dtype)
    z = empty_nhwc((skip.shape[0], c_out, skip.shape[2], skip.shape[3]), skip)
    return z, skip.new_empty(c_out, dtype=acc), skip.new_empty(c_out, dtype=acc)


def _conv3x3_up_bn_stats_impl(
    skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, up_first, bilinear, min_count=2
):
    k = use_kernels(skip)
    _check_conv3x3_up_stats(
        skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, bilinear, min_count, shapes=not k
    )
    if k:
        return k.conv3x3_up_bn_stats(
            skip, up, _packed_conv_weight(weight, skip.dtype), bias.float(), up_first=up_first, bilinear=bilinear,
            skip_norm=norm_arg(skip_scale, skip_shift), up_norm=norm_arg(up_scale, up_shift),
        )  # fmt: skip
    acc = acc_dtype(skip.dtype)
    u = _up_map(up, bilinear, skip.shape[2:], up_scale, up_shift)
    x, x2 = _up_sources(affine_relu(skip, skip_scale, skip_shift), u, up_first)
    z = as_nhwc(
        F.conv2d(torch.cat([x, x2], 1), weight.to(skip.dtype), padding=1).to(acc) + channel_vec(bias, acc), skip.dtype
    )  # fmt: skip
    zf = z.to(acc)
    if zf.numel() == 0:  # an empty batch: no statistics (what torch.mean of nothing gives)
        nan = zf.new_full((zf.shape[1],), float("nan"))
        return z, nan, nan.clone()
    return z, zf.mean((0, 2, 3)), zf.var((0, 2, 3), unbiased=False)


def _conv3x3_up_stats_setup(ctx, inputs, output):
    skip, up, weight, bias, skip_scale, skip_shift, up_scale, up_shift, up_first, bilinear = inputs[:10]
    z, mean, _ = output
    ctx.bias_dtype, ctx.up_first, ctx.bilinear = bias.dtype, up_first, bilinear
    ctx.save_for_backward(skip, up, weight, skip_scale, skip_shift, up_scale, up_shift, z, mean)


def _conv3x3_up_stats_backward(ctx, gz, gmean, gvar):
    skip, up, weight, skip_scale, skip_shift, up_scale, up_shift, z, mean = ctx.saved_tensors
    need_skip, need_up, need_w, need_b, need_ss, need_st, need_us, need_ut = ctx.needs_input_grad[:8]
    g, g_sum = AUTO.bn_stats_backward(gz.to(z.dtype) if gz is not None else None, z, mean, gmean, gvar)
    gb = g_sum.to(ctx.bias_dtype) if need_b else None
    # U materialized once, already transformed (the weight gradient reads it as is).
    u = _up_map(up, ctx.bilinear, skip.shape[2:], up_scale, up_shift)
    gw = None
    if need_w:
        if ctx.up_first:
            gw = AUTO.conv3x3_weight_grad(g, u, skip, None, None, skip_scale, skip_shift)
        else:
            gw = AUTO.conv3x3_weight_grad(g, skip, u, skip_scale, skip_shift, None, None)
        gw = gw.to(weight.dtype)
    gskip = gss = gst = gup = gus = gut = None
    if need_skip or need_up or need_ss or need_st or need_us or need_ut:
        gin = _conv3x3_input_grad(g, weight)
        c_u = up.shape[1]
        if ctx.up_first:
            gu, gs = gin[:, :c_u], gin[:, c_u:]
        else:
            gs, gu = gin[:, : skip.shape[1]], gin[:, skip.shape[1] :]
        gskip, gss, gst = affine_relu_grads(gs, skip, skip_scale, skip_shift)
        if need_up or need_us or need_ut:
            gup, gus, gut = affine_relu_grads(_up_map_backward(gu, up, ctx.bilinear), up, up_scale, up_shift)
    return grads_for(ctx, (gskip, gup, gw, gb, gss, gst, gus, gut, None, None, None))


declare(
    conv3x3_up_bn_stats, _conv3x3_up_bn_stats_impl, setup=_conv3x3_up_stats_setup, backward=_conv3x3_up_stats_backward
)
