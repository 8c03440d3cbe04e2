"""``upconv_nearest2x2`` (``kernels/upconv_nearest2x2.py``): Keras' ``UpSampling2D(2)`` followed by
``Conv2D(k=2, padding='same')`` (+ ReLU), with optional BN+ReLU on load, its autograd formula and
its backward op ``upconv_nearest2x2_input_grad``.

Every form works on the low-res map one output phase at a time (see the kernel module), so the
``[N, C_in, 2h, 2w]`` upsampled tensor exists in none of them:

* forward: the Triton phase GEMM; eager composite (float64, CPU without the interpreter): four
  small convolutions of the bottom/right zero-padded input with the phases' combined weights.
* input gradient (``upconv_nearest2x2_input_grad``): the Triton dgrad kernel (implicit GEMM over
  the 9 tap blocks, deterministic) where the forward runs Triton; else the per-phase
  ``aten.convolution_backward`` composite.
* weight gradient (``upconv_nearest2x2_weight_grad``): the packed blocks' gradient from the Triton
  wgrad kernel (split over pixels, deterministic) where the forward runs Triton, else a per-phase
  ``aten.convolution_backward`` composite; then the fixed 9x4 map from the tap blocks back to the
  2x2 kernel (an unpacked weight).
* bias gradient: a sum; BN+ReLU on load: ``affine_relu_backward`` (Triton where the forward is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._common import (
    acc_dtype,
    affine_relu,
    affine_relu_grads,
    as_nhwc,
    channel_vec,
    check_norm,
    empty_nhwc,
    grads_for,
    use_kernels,
    with_norm_defaults,
)
from .derived import derived
from .op import AUTO, declare

# First tap block of each phase ``di*2 + dj`` in the packed weight, and each phase's (di, dj).
# Mirrors ``kernels.upconv_nearest2x2.PHASE_BASE`` (not imported: CPU-only installs never import
# triton); the tests check the two agree.
_PHASE_BASE = (0, 1, 3, 5)
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


_PHASE_MATRICES: dict = {}


def _phase_matrix(dtype: torch.dtype, like: Tensor) -> Tensor:
    """``[9, 4]`` 0/1: packed tap block k is ``sum_ab P[k, a*2 + b] * W[:, :, a, b]`` (the same
    matrix as ``kernels.upconv_nearest2x2._phase_matrix``, kept here so the op layer needs no
    triton): phase ``(di, dj)``'s tap ``(dr, dc)`` collects kernel row a iff ``a*di == dr`` and
    column b iff ``b*dj == dc``. Made once per dtype and device, outside inference mode: a
    host-to-device copy per step would wait for the GPU and break a CUDA graph capture."""
    device = like.device
    # Under a trace (fake tensors) a constant is made in the trace's mode, never kept.
    traced = is_fake(like)
    matrix = None if traced else _PHASE_MATRICES.get((dtype, device))
    if matrix is None:
        rows = [
            [float(a * di == dr and b * dj == dc) for a in (0, 1) for b in (0, 1)]
            for di, dj in _PHASES
            for dr in range(di + 1)
            for dc in range(dj + 1)
        ]
        if traced:
            return torch.tensor(rows, dtype=dtype, device=device)
        with torch.inference_mode(False), torch.no_grad():
            matrix = _PHASE_MATRICES[(dtype, device)] = torch.tensor(rows, dtype=dtype, device=device)
    return matrix


def _pack(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[9, C_in, C_out]`` tap blocks in ``dtype`` of a ``[C_out, C_in, 2, 2]`` weight (summed
    in float32, float64 when either dtype is float64, and rounded once, as
    ``pack_upconv_nearest2x2_weight``), or a packed weight cast to ``dtype``."""
    if weight.dim() == 3:
        return weight.to(dtype)
    acc = torch.float64 if torch.float64 in (weight.dtype, dtype) else torch.float32
    w_ab = weight.to(acc).permute(2, 3, 1, 0).reshape(4, weight.shape[1], weight.shape[0])
    return torch.einsum("ka,aio->kio", _phase_matrix(acc, weight), w_ab).to(dtype)


def _kernel_weight(K, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernels' packed blocks in ``dtype``, made once per parameter version (``derived``)."""
    pack = _pack if weight.dim() == 3 else K.pack_upconv_nearest2x2_weight
    return derived(weight, ("upconv_nearest2x2", dtype), lambda w: pack(w.detach(), dtype))


def _phase_weight(packed: Tensor, phase: int) -> Tensor:
    """Phase ``phase``'s conv weight ``[C_out, C_in, di + 1, dj + 1]`` from the packed blocks."""
    di, dj = _PHASES[phase]
    base = _PHASE_BASE[phase]
    blocks = packed[base : base + (di + 1) * (dj + 1)]  # [taps, C_in, C_out]
    return blocks.reshape(di + 1, dj + 1, packed.shape[1], packed.shape[2]).permute(3, 2, 0, 1)


def _c_out(weight: Tensor) -> int:
    return weight.shape[0] if weight.dim() == 4 else weight.shape[2]


# =========================================================================== upconv_nearest2x2
@torch.library.custom_op("fastunet::upconv_nearest2x2", mutates_args=())
def upconv_nearest2x2(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    relu: bool,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
) -> Tensor:
    """Keras' ``UpSampling2D(2)`` + ``Conv2D(C_out, 2, padding='same')`` (+ ReLU):
    ``[N, C_in, h, w] -> [N, C_out, 2h, 2w]``, i.e. ``act(conv2d(pad(upsample_nearest(x, 2),
    (0, 1, 0, 1)), weight) + bias)`` (TensorFlow's 'same' pads an even kernel bottom/right).

    weight: the ``nn.Conv2d`` weight ``[C_out, C_in, 2, 2]`` (training: the parameter), or the
    packed ``[9, C_in, C_out]`` of ``kernels.pack_upconv_nearest2x2_weight(weight, dtype)``
    (eval: prepared once); another float dtype is cast to x's, its gradient returned in its own
    dtype (a packed weight gets the packed blocks' gradient). bias ``[C_out]`` or None.
    ``in_scale``/``in_shift`` ``[C_in]`` (both or neither): x is a raw pre-BatchNorm tensor and
    ``relu(x * in_scale + in_shift)`` is what gets upsampled (the padding stays zero). Returns
    channels_last in x's dtype.
    """
    raise AssertionError("unreachable: every device has its own implementation")


def _check_upconv_nearest(x, weight, bias, in_scale=None, in_shift=None):
    op = "fastunet::upconv_nearest2x2"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C_in, h, w], got shape {tuple(x.shape)}")
    c_in = x.shape[1]
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"{op}: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    unpacked = weight.dim() == 4 and tuple(weight.shape[1:]) == (c_in, 2, 2)
    packed = weight.dim() == 3 and tuple(weight.shape[:2]) == (9, c_in)
    if not (unpacked or packed):
        raise ValueError(
            f"{op}: weight must be [C_out, {c_in}, 2, 2] or packed [9, {c_in}, C_out], got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (_c_out(weight),):
        raise ValueError(f"{op}: bias must be [{_c_out(weight)}], got {tuple(bias.shape)}")
    check_norm("upconv_nearest2x2", c_in, in_scale, in_shift)


@upconv_nearest2x2.register_fake
def _(x, weight, bias, relu, in_scale=None, in_shift=None):
    _check_upconv_nearest(x, weight, bias, in_scale, in_shift)
    return empty_nhwc((x.shape[0], _c_out(weight), 2 * x.shape[2], 2 * x.shape[3]), x)


def _composite(x, weight, bias, relu, in_scale, in_shift) -> Tensor:
    """The eager form, one small convolution per phase in the accumulation dtype: the weights
    rounded to x's dtype (as the kernel reads them), then widened."""
    acc = acc_dtype(x.dtype)
    n, _, h, w = x.shape
    packed = _pack(weight, x.dtype).to(acc)
    xp = F.pad(affine_relu(x, in_scale, in_shift).to(acc), (0, 1, 0, 1))  # TF's bottom/right 'same'
    y = torch.empty((n, packed.shape[2], 2 * h, 2 * w), dtype=acc, device=x.device)
    for p, (di, dj) in enumerate(_PHASES):
        y[:, :, di::2, dj::2] = F.conv2d(xp[:, :, : h + di, : w + dj], _phase_weight(packed, p))
    if bias is not None:
        y = y + channel_vec(bias, acc)
    return torch.relu(y) if relu else y


def _upconv_nearest2x2_impl(x, weight, bias, relu, in_scale=None, in_shift=None):
    k = use_kernels(x)
    if k:
        w = _kernel_weight(k, weight, x.dtype)
        b = None if bias is None else bias.float()
        return k.upconv_nearest2x2(x, w, b, relu=relu, in_scale=in_scale, in_shift=in_shift)
    _check_upconv_nearest(x, weight, bias, in_scale, in_shift)
    return as_nhwc(_composite(x, weight, bias, relu, in_scale, in_shift), x.dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, relu, in_scale, in_shift = with_norm_defaults(inputs, 6)
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, in_scale, in_shift, output if relu else None)


def _weight_grad(g: Tensor, x: Tensor, weight: Tensor, in_scale, in_shift) -> Tensor:
    """The weight's gradient from ``g`` = dL/d(conv output): the packed blocks' gradient
    (``upconv_nearest2x2_weight_grad``), mapped to the 2x2 kernel by the transposed phase matrix
    for an unpacked weight."""
    gp = AUTO.upconv_nearest2x2_weight_grad(g, x, in_scale, in_shift)  # [9, C_in, C_out]
    if weight.dim() == 3:
        return gp.to(weight.dtype)
    g_ab = torch.einsum("ka,kio->aio", _phase_matrix(gp.dtype, gp), gp)  # [(a, b), C_in, C_out]
    return g_ab.reshape(2, 2, x.shape[1], -1).permute(3, 2, 0, 1).to(weight.dtype).contiguous()


def _backward(ctx, grad):
    x, weight, in_scale, in_shift, y = ctx.saved_tensors
    need_x, need_w, need_b, _, need_s, need_t = with_norm_defaults(ctx.needs_input_grad, 6)
    acc = acc_dtype(x.dtype)
    g = grad.to(x.dtype)
    if ctx.relu:  # torch's ReLU rule: no gradient where the output is <= 0
        g = torch.where(y <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
    gb = g.sum((0, 2, 3), dtype=acc).to(ctx.bias_dtype) if need_b else None
    gw = _weight_grad(g, x, weight, in_scale, in_shift) if need_w else None
    gx = gs = gt = None
    if need_x or need_s or need_t:
        gin = AUTO.upconv_nearest2x2_input_grad(g, weight)
        gx, gs, gt = affine_relu_grads(gin, x, in_scale, in_shift)
    return grads_for(ctx, (gx, gw, gb, None, gs, gt))


declare(upconv_nearest2x2, _upconv_nearest2x2_impl, setup=_setup, backward=_backward)


@torch.library.custom_op("fastunet::upconv_nearest2x2_input_grad", mutates_args=())
def upconv_nearest2x2_input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of ``upconv_nearest2x2``'s conv: g ``[N, C_out, 2h, 2w]`` (after the ReLU's
    mask), weight ``[C_out, C_in, 2, 2]`` or packed ``[9, C_in, C_out]`` (any float dtype) ->
    ``[N, C_in, h, w]`` channels_last in g's dtype (the gradient of ``T(x)`` in the training form)."""
    raise AssertionError("unreachable: every device has its own implementation")


def _c_in(weight: Tensor) -> int:
    return weight.shape[1]


@upconv_nearest2x2_input_grad.register_fake
def _(g, weight):
    return empty_nhwc((g.shape[0], _c_in(weight), g.shape[2] // 2, g.shape[3] // 2), g)


def _input_grad_impl(g, weight):
    k = use_kernels(g)
    if k:
        packed = _kernel_weight(k, weight, g.dtype)
        # The dgrad's B rows run along C_in: store the blocks [9, C_out, C_in] (a no-op if they are).
        packed = packed.detach().transpose(1, 2).contiguous().transpose(1, 2)
        return k.upconv_nearest2x2_input_grad(g, packed)
    # Composite: per phase, the dgrad of a (di + 1, dj + 1) conv over the padded low-res input;
    # the four add up on it and the padding's share is dropped (zeros are constants).
    acc = acc_dtype(g.dtype)
    n, _, h2, w2 = g.shape
    h, w = h2 // 2, w2 // 2
    packed = _pack(weight, g.dtype).to(acc)
    ga = g.to(acc)
    gxp = torch.zeros((n, packed.shape[1], h + 1, w + 1), dtype=acc, device=g.device)
    for p, (di, dj) in enumerate(_PHASES):
        gin, _, _ = torch.ops.aten.convolution_backward(
            ga[:, :, di::2, dj::2], gxp[:, :, : h + di, : w + dj], _phase_weight(packed, p), None, [1, 1], [0, 0],
            [1, 1], False, [0, 0], 1, [True, False, False],
        )  # fmt: skip
        gxp[:, :, : h + di, : w + dj] += gin
    return as_nhwc(gxp[:, :, :h, :w], g.dtype)


declare(upconv_nearest2x2_input_grad, _input_grad_impl)


@torch.library.custom_op("fastunet::upconv_nearest2x2_weight_grad", mutates_args=())
def upconv_nearest2x2_weight_grad(g: Tensor, x: Tensor, in_scale: Tensor | None, in_shift: Tensor | None) -> Tensor:
    """Gradient of ``upconv_nearest2x2``'s packed tap blocks: g ``[N, C_out, 2h, 2w]`` (after the
    ReLU's mask), raw x ``[N, C_in, h, w]`` (``T(x)`` with in_scale/in_shift) -> ``[9, C_in, C_out]``
    float32 (float64 for float64 g), deterministic."""
    raise AssertionError("unreachable: every device has its own implementation")


@upconv_nearest2x2_weight_grad.register_fake
def _(g, x, in_scale, in_shift):
    return g.new_empty((9, x.shape[1], g.shape[1]), dtype=acc_dtype(g.dtype))


def _weight_grad_impl(g, x, in_scale, in_shift):
    k = use_kernels(x)
    if k:
        norm = None if in_scale is None else (in_scale, in_shift)
        return k.upconv_nearest2x2_weight_grad(g.to(x.dtype), x, x_norm=norm)
    # Composite: per phase, the wgrad of a (di + 1, dj + 1) conv over the padded low-res T(x) is
    # that phase's blocks' gradient.
    acc = acc_dtype(g.dtype)
    n, c_in, h, w = x.shape
    ga = g.to(acc)
    xp = F.pad(affine_relu(x, in_scale, in_shift).to(acc), (0, 1, 0, 1))
    blocks = []
    for di, dj in _PHASES:
        _, gwp, _ = torch.ops.aten.convolution_backward(
            ga[:, :, di::2, dj::2], xp[:, :, : h + di, : w + dj], xp.new_empty((g.shape[1], c_in, di + 1, dj + 1)),
            None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False],
        )  # fmt: skip
        # [C_out, C_in, di+1, dj+1] -> [taps, C_in, C_out], taps row-major
        blocks.append(gwp.permute(2, 3, 1, 0).reshape(-1, c_in, gwp.shape[0]))
    return torch.cat(blocks).contiguous()


declare(upconv_nearest2x2_weight_grad, _weight_grad_impl, ref=1)
