"""``conv3x3_weight_grad`` (``kernels/conv3x3_wgrad.py``): the 3x3 conv's weight gradient with the
previous BN+ReLU applied on load, a backward op of ``conv3x3_bn_stats``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, affine_relu, norm_arg, use_kernels
from .op import declare


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
    return g.new_empty((g.shape[1], c_in, 3, 3), dtype=acc_dtype(g.dtype))


def _conv3x3_weight_grad_impl(g, x, x2, x_scale, x_shift, x2_scale, x2_shift):
    k = use_kernels(x)
    if k:
        return k.conv3x3_weight_grad(
            g.to(x.dtype), x, x2, x_norm=norm_arg(x_scale, x_shift), x2_norm=norm_arg(x2_scale, x2_shift)
        )
    xin = affine_relu(x, x_scale, x_shift)
    if x2 is not None:
        xin = torch.cat([xin, affine_relu(x2, x2_scale, x2_shift)], 1)
    w_shape = [g.shape[1], xin.shape[1], 3, 3]
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.to(x.dtype), xin, xin.new_empty(w_shape), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )  # fmt: skip
    return gw.to(acc_dtype(g.dtype)).contiguous()


declare(conv3x3_weight_grad, _conv3x3_weight_grad_impl, ref=1)
