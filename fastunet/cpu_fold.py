"""The CPU fallback's inference form: BatchNorm folded into the convs, activations channels_last.

On CPU (the ``"auto"`` backend on CPU tensors) an eval-mode ``UNet`` whose module tree is the
classic structure (``fastunet.guard`` says so) does not call its submodules one by one. Each
3x3 conv absorbs its conv bias and its eval BatchNorm (running statistics, eps, affine) into
one weight and one bias, derived in float64 and then cast to the compute dtype, and the forward
runs ``conv2d + bias -> relu_`` per layer with weights and activations in channels_last (the
layout oneDNN's convolutions run fastest in here; ``ConvTranspose2d`` in particular is 2-6x
faster channels_last at the wide levels). On one thread that is about 1.27x the module tree for ``UNet(3, 1)`` on one
256x256 float32 image (708 vs 900 ms on a Sapphire Rapids core).

The folded weights are cached per model and compute dtype, keyed like ``fused.Weights``: the
source tensors' identity, ``_version`` and storage address, so an in-place edit,
``load_state_dict`` or ``.to()`` rebuilds them. The cache costs one more copy of the conv
weights (about 124 MB in float32 for the classic model) and dies with the model.

The folded weights are detached, so ``model.py`` uses them only when no gradient has to reach a
parameter; gradients w.r.t. the input flow through the folded forward as usual.

The forward is the model's plan (``fastunet.plan.execute``) run by ``CpuForm``: ``norm="none"``
keeps each conv's own bias (or none); dropout is the identity in eval; the ups are the
reference's math (``ConvTranspose2d``, nearest x2 + bottom/right zero row and column + 2x2 conv
+ ReLU, bilinear x2 with align_corners), then ``pad_to`` the skip for ``odd_sizes="pad"`` and
the concat in the plan's order; the pre-head conv + activation before the head.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from operator import is_

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._snapshot import is_current, tensors_state
from .guard import FusedLayers
from .norm import fold_bn
from .plan import Concat, Conv, DoubleConv, Head, Up, execute
from .reference import LEAKY_SLOPE, apply_out_activation, pad_to

_CL = torch.channels_last


@dataclass(eq=False)
class CpuPlan:
    """The folded weights of one model for one compute dtype.

    ``convs``: per 3x3 conv (``plan.convs`` order), ``(weight [C_out, C_in, 3, 3]
    channels_last, bias [C_out] or None)`` with BatchNorm and conv bias folded in; ``norms``: per
    3x3 conv, ``(weight, bias, eps)`` of its InstanceNorm (applied after the conv: it normalizes
    with each sample's statistics, nothing folds) or None; ``ups``: per
    transposed conv ``(weight [2C, C, 2, 2] channels_last, bias [C])`` or nearest_conv up conv
    ``(weight [C, 2C, 2, 2] channels_last, bias [C] or None)``, none for bilinear; ``head``:
    ``(weight [K, C, 1, 1], bias [K] or None)``. ``sources``/``versions``/``ptrs``: the tensors it
    was built from, their ``_version`` and ``data_ptr`` then (held, so none can be freed and its
    identity reused).
    """

    key: tuple
    sources: tuple
    versions: tuple
    ptrs: tuple
    convs: list
    norms: list
    ups: list
    head: tuple


# model -> {(compute dtype, BatchNorm eps...): CpuPlan}; weak, so the plans go with the model
# and never travel with it through pickle or deepcopy.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of one conv computing ``bn(conv(x))`` with ``bn`` in eval mode.

    ``weight``: ``[C_out, C_in, kh, kw]`` channels_last, ``bias``: ``[C_out]``, both in
    ``dtype``; derived in float64 so that the final cast is the only rounding. Detached: call
    under ``torch.no_grad``.
    """
    scale, shift = fold_bn(conv, bn, torch.float64)
    weight = conv.weight.to(torch.float64) * scale[:, None, None, None]
    return weight.to(dtype).contiguous(memory_format=_CL), shift.to(dtype)


def _as_is(conv: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A conv's (weight channels_last, bias or None) in ``dtype``."""
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    return conv.weight.to(dtype).contiguous(memory_format=_CL), bias


def _build(layers: FusedLayers, dtype: torch.dtype, key, sources, versions, ptrs) -> CpuPlan:
    # Plain tensors even inside torch.inference_mode: the plan is reused outside it, where an
    # inference tensor could not be saved for backward (the input-gradient case).
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        # a BatchNorm folds; no norm (norm="none", the pre-head conv) or an InstanceNorm: the
        # conv as it is (the InstanceNorm runs after it)
        plan, mods = layers.plan, layers.mods
        convs, norms = [], []
        for unit in plan.convs:
            conv, norm = mods[unit.conv], layers.norm(unit)
            instance = unit.norm_kind == "instance"
            convs.append(fold_conv_bn(conv, norm, dtype) if norm is not None and not instance else _as_is(conv, dtype))
            norms.append(_instance_params(norm, dtype) if instance else None)
        ups = [_as_is(mods[u.params], dtype) for u in plan.ups if u.params is not None]
        head = mods[plan.head.path]
        head_b = head.bias.to(dtype) if head.bias is not None else None
        return CpuPlan(key, sources, versions, ptrs, convs, norms, ups, (head.weight.to(dtype), head_b))


def _instance_params(norm: nn.InstanceNorm2d, dtype: torch.dtype) -> tuple:
    """``(weight, bias, eps)`` of an InstanceNorm in ``dtype`` (None for absent affine ones)."""
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    return weight, bias, norm.eps


def cpu_plan(model: nn.Module, layers: FusedLayers, sources: tuple, eps: tuple, dtype: torch.dtype) -> CpuPlan | None:
    """The cached plan of ``model`` for ``dtype`` when every source tensor is unchanged, else a
    new one; None when the sources cannot be tracked (inference tensors have no version)."""
    try:
        versions, ptrs = tensors_state(sources)
    except RuntimeError:  # a parameter created under torch.inference_mode: no version counter
        return None
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS[model] = {}
    key = (dtype, eps)
    plan = plans.get(key)
    if plan is not None and is_current(plan, sources, versions, ptrs):
        return plan
    # Plans built from other tensors (before a .to(), a reassigned parameter) are stale for good:
    # let their weights go before the new ones are made.
    for k in [k for k, p in plans.items() if k == key or not all(map(is_, p.sources, sources))]:
        del plans[k]
    plan = plans[key] = _build(layers, dtype, key, sources, versions, ptrs)
    return plan


def forget(model: nn.Module) -> None:
    """Drop the cached plans of ``model`` (its parameters are about to be replaced)."""
    _PLANS.pop(model, None)


def forward(model: nn.Module, x: Tensor, layers: FusedLayers) -> Tensor | None:
    """The folded forward of ``model`` (eval mode, a tree the guard accepts) on ``x``, or None
    when it cannot run: a gradient has to reach a parameter (the folded weights are detached),
    or the parameters cannot be tracked. ``[N, C_in, H, W] -> [N, K, H, W]``."""
    sources, eps = layers.sources()
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return None
    dtype = x.dtype
    if dtype != torch.float64 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    plan = cpu_plan(model, layers, sources, eps, dtype)
    if plan is None:
        return None
    return run(plan, x, layers)


def run(plan: CpuPlan, x: Tensor, layers: FusedLayers) -> Tensor:
    """The folded forward: ``layers.plan``'s steps on ``plan``'s weights,
    ``[N, C_in, H, W] -> [N, K, H, W]``.

    ``x`` in any dtype (cast to the plan's); under ``torch.autocast`` the ops follow the
    autocast rules on weights already in the autocast dtype. The output has the input's memory
    format, as the module tree's would.
    """
    keep_cl = x.is_contiguous(memory_format=_CL) and not x.is_contiguous()
    y = execute(layers.plan, CpuForm(plan), x)
    return y if keep_cl else y.contiguous()


class CpuForm:
    """The plan's steps on eager ops with the folded weights; activations are channels_last
    tensors (see ``fastunet.plan.execute``)."""

    def __init__(self, plan: CpuPlan):
        self.plan = plan

    def entry(self, x: Tensor) -> Tensor:
        return x.to(dtype=self.plan.convs[0][0].dtype, memory_format=_CL)

    def conv(self, unit: Conv, x: Tensor) -> Tensor:
        y = F.conv2d(x, *self.plan.convs[unit.index], padding=1)
        norm = self.plan.norms[unit.index]
        if norm is not None:
            y = F.instance_norm(y, weight=norm[0], bias=norm[1], eps=norm[2])
        return y.relu_() if unit.act_kind == "relu" else F.leaky_relu_(y, LEAKY_SLOPE)

    def dropout(self, step: DoubleConv, x: Tensor) -> Tensor:
        return x  # the identity in eval

    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)

    def up(self, step: Up, x: Tensor) -> Tensor:
        if step.kind == "transpose":
            return F.conv_transpose2d(x, *self.plan.ups[step.index], stride=2)
        if step.kind == "nearest_conv":  # NearestConvUp: TensorFlow's 'same' pads bottom/right
            x = F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))
            return F.conv2d(x, *self.plan.ups[step.index]).relu_()
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def concat(self, step: Concat, skip: Tensor, u: Tensor, up: Up) -> tuple:
        if step.pad:
            u = pad_to(u, skip)
        return (torch.cat([u, skip] if step.up_first else [skip, u], 1),)

    def head(self, step: Head, x: Tensor) -> Tensor:
        return apply_out_activation(F.conv2d(x, *self.plan.head), step.activation)
