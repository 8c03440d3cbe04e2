"""A norm layer as the per-channel affine transform the executors apply: ``norm(z) == z * scale +
shift`` for given statistics, and an eval BatchNorm folded with its conv's bias. Shared by the
fused path (``fastunet.fused``) and the CPU fold (``fastunet.cpu_fold``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def bn_affine(bn: nn.Module, mean: Tensor, var: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` in ``acc`` with ``bn(z) == z * scale + shift`` when ``bn`` normalizes
    with ``mean`` and ``var`` (``[C]``; ``bn``'s eps and optional affine weight and bias)."""
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """An eval BatchNorm and its conv's bias as ``scale * conv_nobias + shift`` (``[C_out]`` in
    ``acc``; differentiable): the bias shifts the mean the BatchNorm subtracts."""
    mean = bn.running_mean.to(acc)
    if conv.bias is not None:
        mean = mean - conv.bias.to(acc)
    return bn_affine(bn, mean, bn.running_var, acc)
