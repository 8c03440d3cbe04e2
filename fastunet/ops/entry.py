"""The model's entrance (``kernels/entry.py``): ``pad_channels_nhwc`` (cast + zero channel padding to
16-byte NHWC pixels) with its autograd formula, and ``pad_weight_in``, the first conv's weight
padded to match (a composite: plain torch ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import KERNEL_DTYPES, empty_nhwc, use_kernels
from .op import declare, declare_composite


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
    return empty_nhwc((x.shape[0], channels, x.shape[2], x.shape[3]), x, dtype)


def _pad_channels_nhwc_impl(x, dtype, channels):
    _check_pad(x, dtype, channels)
    k = use_kernels(x) if dtype in KERNEL_DTYPES else None
    if k:
        return k.pad_cast_nhwc(x, dtype, channels)
    out = empty_nhwc((x.shape[0], channels, x.shape[2], x.shape[3]), x, dtype)
    out[:, x.shape[1] :].zero_()
    out[:, : x.shape[1]].copy_(x)
    return out


def _pad_setup(ctx, inputs, output):
    x, _, _ = inputs
    ctx.in_dtype, ctx.in_ch = x.dtype, x.shape[1]


def _pad_backward(ctx, grad):
    return grad[:, : ctx.in_ch].to(ctx.in_dtype), None, None


declare(pad_channels_nhwc, _pad_channels_nhwc_impl, setup=_pad_setup, backward=_pad_backward)


def pad_weight_in(weight: Tensor, channels: int) -> Tensor:
    """``weight`` ``[C_out, C_in, k, k]`` with zero input channels added up to ``channels``."""
    return F.pad(weight, (0, 0, 0, 0, 0, channels - weight.shape[1]))


def _pad_weight_setup(ctx, inputs, output):
    ctx.in_ch = inputs[0].shape[1]


def _pad_weight_backward(ctx, grad):
    return grad[:, : ctx.in_ch], None


declare_composite("pad_weight_in", pad_weight_in, setup=_pad_weight_setup, backward=_pad_weight_backward)
