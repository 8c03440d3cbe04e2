"""``fastunet.UNet``: the drop-in replacement for the classic U-Net.

It *is* the reference model (a subclass of ``UNetReference``), so it has the same module tree,
the same parameters and the same state_dict keys, and a reference checkpoint loads with
``strict=True`` both ways. Only ``forward`` differs: it validates the input, then runs either
the reference math (eager path, the CPU fallback) or the fused path through
``torch.ops.fastunet.*`` (see ``fastunet.backend`` for which).

Fused path, two forms:

* **Inference** (every BatchNorm uses running statistics): each BatchNorm folds with its conv
  bias into a per-channel ``scale``/``shift`` applied in the conv's epilogue with the ReLU, and
  the 1x1 head rides in the last conv's epilogue.
* **Training** (some BatchNorm uses batch statistics): a BatchNorm cannot be applied before the
  whole batch is seen, so each conv writes its raw output ``z`` and the batch statistics of it
  (``conv3x3_bn_stats``); ``scale``/``shift`` are derived from those (differentiably, so autograd
  gets BatchNorm's exact backward), the running statistics are updated the way
  ``nn.BatchNorm2d`` does it, and ``relu(z * scale + shift)`` is applied where z is next read:
  the next conv's loads, the pool, the upsample, the head. The normalized tensor never exists,
  which is what keeps the memory saved for backward at about half the reference's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backend import use_fused
from .reference import DoubleConv, UNetReference
from .validation import validate_input

_ops = torch.ops.fastunet

# An activation on the training path: a tensor and the per-channel (scale, shift) of the
# BatchNorm+ReLU its reader applies, or (tensor, None, None) for a finished tensor.
_Act = tuple[Tensor, Tensor | None, Tensor | None]


def _kernels():
    from . import kernels  # deferred: the CPU fallback never imports triton

    return kernels


def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update of ``nn.BatchNorm2d.forward`` in train mode, from the batch
    ``mean`` and biased ``var`` over ``count`` values per channel."""
    if not (bn.training and bn.track_running_stats):
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    if bn.running_mean is None:
        return
    with torch.no_grad():
        unbiased = var.detach() * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _bn_affine(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(z) == z * scale + shift`` for the given statistics."""
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm and conv bias as ``scale * conv_nobias + shift`` (differentiable): the bias
    shifts the mean the BatchNorm subtracts."""
    mean = bn.running_mean.to(acc)
    if conv.bias is not None:
        mean = mean - conv.bias.to(acc)
    return _bn_affine(bn, mean, bn.running_var, acc)


class UNet(UNetReference):
    """Drop-in U-Net: ``UNet(in_ch, out_ch)`` with the classic model's modules and weights.

    Same options as ``UNetReference`` (keyword-only ``base_channels``, ``depth``,
    ``out_activation``). ``forward(x)``: ``[N, in_ch, H, W] -> [N, out_ch, H, W]``, H and W
    multiples of ``2**depth``; on the fused path the output is channels_last.

    Prepared weights (packed layouts, folded BatchNorm) are cached per parameter version when
    no gradient is needed, so inference packs them once. In training the ops take the
    parameters as they are and pack inside (so autograd saves no packed copies).
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
        if any(_bn_uses_batch_stats(m) for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            return self._training_forward(x, dtype)
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
            fuse_head = k == 2 * d + 1
            x = self._double_conv(dc, u, skips.pop(), dtype, fuse_head)
        if fuse_head:
            return x
        head_w, head_b = self._head_params(dtype)
        return _ops.head1x1(x, head_w, head_b, self.out_activation)

    def _training_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The fused path when some BatchNorm uses batch statistics (see the module docstring)."""
        d = self.depth
        act: _Act = (x, None, None)
        skips = []
        for i in range(1, d + 1):
            act = self._double_conv_train(getattr(self, f"conv{i}"), act, None, dtype)
            skips.append(act)
            act = (_ops.maxpool2x2(*act), None, None)
        act = self._double_conv_train(getattr(self, f"conv{d + 1}"), act, None, dtype)
        for k in range(d + 2, 2 * d + 2):
            up = getattr(self, f"up{k}")
            # Parameters go in as they are (the ops cast and pack inside): autograd then saves the
            # parameter itself for backward instead of a packed copy per step.
            u = _ops.upconv2x2(act[0], up.weight, up.bias, act[1], act[2])
            act = self._double_conv_train(getattr(self, f"conv{k}"), (u, None, None), skips.pop(), dtype)
        head_w, head_b = self._head_params(dtype)
        return _ops.head1x1(act[0], head_w, head_b, self.out_activation, act[1], act[2])

    def _double_conv_train(self, dc: DoubleConv, act: _Act, skip: _Act | None, dtype: torch.dtype) -> _Act:
        h = self._conv_bn_train(dc, 0, act, skip, dtype)
        return self._conv_bn_train(dc, 3, h, None, dtype)

    def _conv_bn_train(self, dc: DoubleConv, idx: int, act: _Act, skip: _Act | None, dtype: torch.dtype) -> _Act:
        """One conv on the training path: raw output z and the (scale, shift) its reader applies.

        A BatchNorm in eval mode inside a training model (frozen) uses its running statistics
        for that transform; the batch statistics the op also returns are then unused.
        """
        conv, bn = dc.conv[idx], dc.conv[idx + 1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        bias = conv.bias if conv.bias is not None else act[0].new_zeros(conv.out_channels, dtype=acc)
        x2, x2_scale, x2_shift = skip if skip is not None else (None, None, None)
        z, mean, var = _ops.conv3x3_bn_stats(act[0], x2, conv.weight, bias, act[1], act[2], x2_scale, x2_shift)
        if _bn_uses_batch_stats(bn):
            _update_running_stats(bn, mean, var, z.numel() // z.shape[1])
        else:
            mean, var = bn.running_mean, bn.running_var
        # float64 vectors (C numbers): the ops then hand back the BatchNorm weight's gradient
        # pieces in float64, where its chain rule's cancellation against mean * dshift is
        # harmless (see ops._uncenter); the kernels read them as float32.
        scale, shift = _bn_affine(bn, mean, var, torch.float64)
        return z, scale, shift

    # ------------------------------------------------------------------ pieces
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
