"""``affine_relu_dropout``: the training path's ``nn.Dropout`` after a DoubleConv, on a raw conv
output with its reader's BatchNorm+ReLU (a composite of plain torch ops, no kernel).

A dropout mask needs the values, so ``relu(z * scale + shift)`` is materialized here and
``F.dropout`` applied; the readers then load the finished tensor without a transform. Costs one
read of z and one write of the result (plus torch's mask) per dropout level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import acc_dtype, channel_vec
from .op import AUTO, declare_composite


def affine_relu_dropout(z: Tensor, scale: Tensor, shift: Tensor, p: float) -> Tensor:
    """``F.dropout(relu(z * scale + shift), p, training=True)``: z ``[N, C, H, W]`` raw, scale/shift
    ``[C]`` (any float dtype, applied in the accumulation dtype); returns z's dtype and memory
    format. The mask is drawn in the activation's memory order (channels_last), as torch's
    dropout does for an NHWC tensor, so the same seed gives the same mask as a channels_last
    eager model."""
    acc = acc_dtype(z.dtype)
    h = torch.relu(z.to(acc) * channel_vec(scale, acc) + channel_vec(shift, acc)).to(z.dtype)
    return F.dropout(h, p, True)


def _setup(ctx, inputs, output) -> None:
    z, scale, shift, p = inputs
    ctx.p = p
    ctx.save_for_backward(z, scale, shift, output)


def _backward(ctx, g):
    z, scale, shift, out = ctx.saved_tensors
    # Kept elements are exactly the nonzero outputs where relu's output was positive; where it
    # was 0 the ReLU's backward zeroes the gradient anyway, so ``out != 0`` is mask enough.
    gh = torch.where(out != 0, g * (1.0 / (1.0 - ctx.p)), torch.zeros((), dtype=g.dtype, device=g.device))
    dz, dscale, dshift = AUTO.affine_relu_backward(gh.to(z.dtype), z, scale, shift)
    return dz, dscale, dshift, None


declare_composite("affine_relu_dropout", affine_relu_dropout, setup=_setup, backward=_backward)
