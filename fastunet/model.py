"""``fastunet.UNet``: the drop-in replacement for the classic U-Net.

It *is* the reference model (a subclass of ``UNetReference``), so it has the same module tree,
the same parameters and the same state_dict keys, and a reference checkpoint loads with
``strict=True`` both ways. Only ``forward`` differs: it validates the input, then runs either
the reference math (eager path, the CPU fallback) or the fused path through
``torch.ops.fastunet.*`` (see ``fastunet.backend`` for which).

Fused path, per DoubleConv: a BatchNorm that uses running statistics (eval mode) folds with the
conv bias into a per-channel ``scale``/``shift`` applied in the conv's epilogue together with the
ReLU. A BatchNorm that uses batch statistics (train mode) cannot be folded before the batch is
seen, so the conv op runs with ``scale=1, shift=bias`` and the ``nn.BatchNorm2d`` module itself
normalizes (exact running-stat updates, momentum, ``num_batches_tracked``); fusing those
statistics into the kernel is the training issue's work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import use_fused
from .reference import DoubleConv, UNetReference
from .validation import validate_input

_ops = torch.ops.fastunet


def _kernels():
    from . import kernels  # deferred: the CPU fallback never imports triton

    return kernels


def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm and conv bias as ``scale * conv_nobias + shift`` (differentiable)."""
    inv_std = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight.to(acc) * inv_std
    bias = conv.bias.to(acc) if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.to(acc)) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


class UNet(UNetReference):
    """Drop-in U-Net: ``UNet(in_ch, out_ch)`` with the classic model's modules and weights.

    Same options as ``UNetReference`` (keyword-only ``base_channels``, ``depth``,
    ``out_activation``). ``forward(x)``: ``[N, in_ch, H, W] -> [N, out_ch, H, W]``, H and W
    multiples of ``2**depth``; on the fused path the output is channels_last.

    Prepared weights (packed layouts, folded BatchNorm) are cached per parameter version when
    no gradient is needed, so inference packs them once; training re-derives them each step
    (cheap, and differentiable).
    """

    def __init__(self, in_ch: int, out_ch: int, **options):
        super().__init__(in_ch, out_ch, **options)
        self._prepared: dict[str, tuple[tuple, object]] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        first = self.conv1.conv[0].weight
        validate_input(x, in_ch=self.in_ch, depth=self.depth, param_dtype=first.dtype, param_device=first.device)
        if x.numel() == 0 or not use_fused(x):
            return super().forward(x)
        return self._fused_forward(x)

    def _fused_forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype=dtype, memory_format=torch.channels_last)
        d = self.depth
        skips = []
        for i in range(1, d + 1):
            x = self._double_conv(getattr(self, f"conv{i}"), x, None, dtype)
            skips.append(x)
            x = _ops.maxpool2x2(x)
        x = self._double_conv(getattr(self, f"conv{d + 1}"), x, None, dtype)
        for k in range(d + 2, 2 * d + 2):
            up = getattr(self, f"up{k}")
            weight = self._prepare(
                f"up{k}", (up.weight,), dtype, lambda w=up.weight: _kernels().pack_upconv2x2_weight(w.to(dtype))
            )
            u = _ops.upconv2x2(x, weight, up.bias)
            dc = getattr(self, f"conv{k}")
            fuse_head = k == 2 * d + 1 and self._head_fusable(dc)
            x = self._double_conv(dc, u, skips.pop(), dtype, fuse_head)
        if fuse_head:
            return x
        head_w, head_b = self._head_params(dtype)
        return _ops.head1x1(x, head_w, head_b, self.out_activation)

    # ------------------------------------------------------------------ pieces
    def _head_fusable(self, dc: DoubleConv) -> bool:
        # Batch statistics must be known before the last conv's output exists: no fusion then.
        return not _bn_uses_batch_stats(dc.conv[4])

    def _head_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        head = self.head
        weight = self._prepare("head.w", (head.weight,), dtype, lambda: head.weight.to(dtype))
        bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_channels)
        return weight, bias

    def _double_conv(
        self, dc: DoubleConv, x: Tensor, x2: Tensor | None, dtype: torch.dtype, fuse_head: bool = False
    ) -> Tensor:
        h = self._conv_bn_relu(dc, 0, x, x2, dtype)
        return self._conv_bn_relu(dc, 3, h, None, dtype, fuse_head)

    def _conv_bn_relu(
        self, dc: DoubleConv, idx: int, x: Tensor, x2: Tensor | None, dtype: torch.dtype, fuse_head=False
    ) -> Tensor:
        conv, bn = dc.conv[idx], dc.conv[idx + 1]
        name = f"{id(dc)}.{idx}"
        weight = self._prepare(
            name + ".w", (conv.weight,), dtype, lambda: _kernels().pack_conv3x3_weight(conv.weight.to(dtype))
        )
        if _bn_uses_batch_stats(bn):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            shift = conv.bias.to(acc) if conv.bias is not None else x.new_zeros(conv.out_channels, dtype=acc)
            ones = torch.ones(conv.out_channels, dtype=acc, device=x.device)
            z = _ops.conv3x3_bn_act(x, x2, weight, ones, shift, False)
            return F.relu(bn(z))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        bn_tensors = tuple(t for t in (conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None)
        scale, shift = self._prepare(name + ".bn", bn_tensors, acc, lambda: _fold_bn(conv, bn, acc))
        if fuse_head:
            head_w, head_b = self._head_params(dtype)
            return _ops.conv3x3_bn_act_head(x, x2, weight, scale, shift, True, head_w, head_b, self.out_activation)
        return _ops.conv3x3_bn_act(x, x2, weight, scale, shift, True)

    def _prepare(self, name: str, sources: tuple[Tensor, ...], dtype: torch.dtype, build):
        """``build()`` — cached while ``sources`` are unchanged (same storage, same ``_version``).

        Not cached when autograd must see the derivation (a source requires grad and grad mode is
        on) or under ``torch.compile`` (the compiler traces, and can constant-fold, ``build``).
        """
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return build()
        key = (dtype, torch.is_inference_mode_enabled()) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device) for t in sources
        )
        hit = self._prepared.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._prepared[name] = (key, value)
        return value
