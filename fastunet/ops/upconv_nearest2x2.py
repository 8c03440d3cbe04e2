"""``upconv_nearest2x2`` (``kernels/upconv_nearest2x2.py``): Keras' ``UpSampling2D(2)`` followed by
``Conv2D(k=2, padding='same')`` (+ ReLU), with optional BN+ReLU on load, and its autograd formula.

Every form works on the low-res map one output phase at a time (see the kernel module): the
Triton kernel as one phase GEMM, the eager composite (float64, CPU without the interpreter) and
the backward as four small convolutions of the bottom/right zero-padded input with the phases'
combined weights, so the ``[N, C_in, 2h, 2w]`` upsampled tensor exists in none of them.

The backward is an eager composite (``aten.convolution_backward`` per phase, in float32, float64
for float64 inputs) on every device: one dgrad and one wgrad convolution per phase, then the
fixed 9x4 map from the phases' tap blocks back to the 2x2 kernel, then the BN+ReLU-on-load
chain rule through ``affine_relu_backward`` (Triton where the forward is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _acc_dtype,
    _affine_relu,
    _affine_relu_grads,
    _as_nhwc,
    _channel_vec,
    _check_norm,
    _empty_nhwc,
    _grads_for,
    _kernels,
    _on_input_device,
    _use_kernels,
    _with_norm_defaults,
)

# First tap block of each phase ``di*2 + dj`` in the packed weight, and each phase's (di, dj).
# Mirrors ``kernels.upconv_nearest2x2.PHASE_BASE`` (not imported: CPU-only installs never import
# triton); the tests check the two agree.
_PHASE_BASE = (0, 1, 3, 5)
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _phase_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[9, 4]`` 0/1: packed tap block k is ``sum_ab P[k, a*2 + b] * W[:, :, a, b]`` (the same
    matrix as ``kernels.upconv_nearest2x2._phase_matrix``): phase ``(di, dj)``'s tap ``(dr, dc)``
    collects kernel row a iff ``a*di == dr`` and column b iff ``b*dj == dc``."""
    rows = [
        [float(a * di == dr and b * dj == dc) for a in (0, 1) for b in (0, 1)]
        for di, dj in _PHASES
        for dr in range(di + 1)
        for dc in range(dj + 1)
    ]
    return torch.tensor(rows, dtype=dtype, device=device)


def _pack(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[9, C_in, C_out]`` tap blocks in ``dtype`` of a ``[C_out, C_in, 2, 2]`` weight (summed
    in float32, float64 when either dtype is float64, and rounded once, as
    ``pack_upconv_nearest2x2_weight``), or a packed weight cast to ``dtype``."""
    if weight.dim() == 3:
        return weight.to(dtype)
    acc = torch.float64 if torch.float64 in (weight.dtype, dtype) else torch.float32
    w_ab = weight.to(acc).permute(2, 3, 1, 0).reshape(4, weight.shape[1], weight.shape[0])
    return torch.einsum("ka,aio->kio", _phase_matrix(acc, weight.device), w_ab).to(dtype)


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
    _check_norm("upconv_nearest2x2", c_in, in_scale, in_shift)


@upconv_nearest2x2.register_fake
def _(x, weight, bias, relu, in_scale=None, in_shift=None):
    _check_upconv_nearest(x, weight, bias, in_scale, in_shift)
    return _empty_nhwc((x.shape[0], _c_out(weight), 2 * x.shape[2], 2 * x.shape[3]), x)


def _composite(x, weight, bias, relu, in_scale, in_shift) -> Tensor:
    """The eager form, one small convolution per phase in the accumulation dtype: the weights
    rounded to x's dtype (as the kernel reads them), then widened."""
    acc = _acc_dtype(x.dtype)
    n, _, h, w = x.shape
    packed = _pack(weight, x.dtype).to(acc)
    xp = F.pad(_affine_relu(x, in_scale, in_shift).to(acc), (0, 1, 0, 1))  # TF's bottom/right 'same'
    y = torch.empty((n, packed.shape[2], 2 * h, 2 * w), dtype=acc, device=x.device)
    for p, (di, dj) in enumerate(_PHASES):
        y[:, :, di::2, dj::2] = F.conv2d(xp[:, :, : h + di, : w + dj], _phase_weight(packed, p))
    if bias is not None:
        y = y + _channel_vec(bias, acc)
    return torch.relu(y) if relu else y


@upconv_nearest2x2.register_kernel(("cpu", "cuda"))
@_on_input_device
def _upconv_nearest2x2_impl(x, weight, bias, relu, in_scale=None, in_shift=None):
    if _use_kernels(x):
        K = _kernels()
        w = _pack(weight, x.dtype) if weight.dim() == 3 else K.pack_upconv_nearest2x2_weight(weight.detach(), x.dtype)
        b = None if bias is None else bias.float()
        return K.upconv_nearest2x2(x, w, b, relu=relu, in_scale=in_scale, in_shift=in_shift)
    _check_upconv_nearest(x, weight, bias, in_scale, in_shift)
    return _as_nhwc(_composite(x, weight, bias, relu, in_scale, in_shift), x.dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, relu, in_scale, in_shift = _with_norm_defaults(inputs, 6)
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, in_scale, in_shift, output if relu else None)


def _backward(ctx, grad):
    """Per phase ``(di, dj)``: ``g[:, :, di::2, dj::2]`` is the output of a conv with kernel
    ``(di + 1, dj + 1)`` over the padded low-res input; its dgrad and wgrad come from
    ``aten.convolution_backward``. The dgrads of the four phases add up on the padded input (the
    padding's share is dropped: zeros are constants), the wgrads are the packed blocks' gradient,
    mapped to the 2x2 kernel by the transposed phase matrix for an unpacked weight."""
    x, weight, in_scale, in_shift, y = ctx.saved_tensors
    need_x, need_w, need_b, _, need_s, need_t = _with_norm_defaults(ctx.needs_input_grad, 6)
    acc = _acc_dtype(x.dtype)
    g = grad.to(acc)
    if ctx.relu:
        g = torch.where(y.to(acc) <= 0, torch.zeros((), dtype=acc, device=g.device), g)  # torch's relu rule
    gb = g.sum((0, 2, 3)).to(ctx.bias_dtype) if need_b else None
    need_in = need_x or need_s or need_t
    gx = gw = gs = gt = None
    if need_in or need_w:
        n, c_in, h, w = x.shape
        packed = _pack(weight, x.dtype).to(acc)
        xp = F.pad(_affine_relu(x, in_scale, in_shift).to(acc), (0, 1, 0, 1))
        gxp = torch.zeros_like(xp) if need_in else None
        gpacked = []
        for p, (di, dj) in enumerate(_PHASES):
            src = xp[:, :, : h + di, : w + dj]
            gin, gwp, _ = torch.ops.aten.convolution_backward(
                g[:, :, di::2, dj::2], src, _phase_weight(packed, p), None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [need_in, need_w, False],
            )  # fmt: skip
            if need_in:
                gxp[:, :, : h + di, : w + dj] += gin
            if need_w:  # [C_out, C_in, di+1, dj+1] -> [taps, C_in, C_out], taps row-major
                gpacked.append(gwp.permute(2, 3, 1, 0).reshape(-1, c_in, gwp.shape[0]))
        if need_w:
            gp = torch.cat(gpacked)  # [9, C_in, C_out]
            if weight.dim() == 3:
                gw = gp.to(weight.dtype)
            else:
                g_ab = torch.einsum("ka,kio->aio", _phase_matrix(acc, gp.device), gp)  # [(a, b), C_in, C_out]
                gw = g_ab.reshape(2, 2, c_in, -1).permute(3, 2, 0, 1).to(weight.dtype).contiguous()
        if need_in:
            gx, gs, gt = _affine_relu_grads(gxp[:, :, :h, :w].to(x.dtype), x, in_scale, in_shift)
    return _grads_for(ctx, (gx, gw, gb, None, gs, gt))


upconv_nearest2x2.register_autograd(_backward, setup_context=_setup)
