"""The eager reference U-Net: plain ``torch.nn`` modules, the truth every test
compares against and the math the CPU fallback runs (in eval mode with each BatchNorm folded
into its conv, see ``fastunet.cpu_fold``).

The classic model (``UNetReference(in_ch, out_ch)``): four encoder levels of
``DoubleConv`` with 2x2 max-pool between them, a 1024-channel bottleneck, four
decoder levels of ``ConvTranspose2d(k=2, s=2)`` -> ``cat([up, skip])`` ->
``DoubleConv``, a 1x1 head and a sigmoid. ``UNetReference(3, 1)`` has
31,043,521 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .validation import validate_input

ACTIVATIONS = ("sigmoid", "none", "softmax")


class DoubleConv(nn.Module):
    """(3x3 conv pad 1 -> BatchNorm2d -> ReLU) x 2; ``[N, in_ch, H, W] -> [N, out_ch, H, W]``.

    The layers live in ``self.conv`` (an ``nn.Sequential``), which fixes the
    state_dict names ``conv.0.weight``, ``conv.1.running_mean``, ... of the classic model.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def apply_out_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The head's output activation: sigmoid, identity (logits) or softmax over channels."""
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return y


def _check_options(in_ch, out_ch, base_channels, depth, out_activation):
    for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("base_channels", base_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int (4 for the classic U-Net), got {depth!r}")
    if out_activation not in ACTIVATIONS:
        raise ValueError(f"out_activation must be one of {ACTIVATIONS}, got {out_activation!r}")


class UNetReference(nn.Module):
    """The classic U-Net in plain eager PyTorch.

    Args:
        in_ch: input channels C_in.
        out_ch: output channels (classes) K.
        base_channels: width of the first level (64 classic); level i has ``base * 2**i``.
        depth: number of poolings (4 classic). Encoder modules are ``conv1..conv{depth+1}``
            and ``pool1..pool{depth}``; decoder ``up{depth+2}..up{2*depth+1}`` with
            ``conv{depth+2}..conv{2*depth+1}``; the head is ``conv{2*depth+2}``.
        out_activation: ``"sigmoid"`` (classic), ``"none"`` (logits) or ``"softmax"`` (over K).

    Shapes: ``[N, C_in, H, W] -> [N, K, H, W]`` with H and W multiples of ``2**depth``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        base_channels: int = 64,
        depth: int = 4,
        out_activation: str = "sigmoid",
    ):
        super().__init__()
        _check_options(in_ch, out_ch, base_channels, depth, out_activation)
        self.in_ch, self.out_ch = in_ch, out_ch
        self.base_channels, self.depth, self.out_activation = base_channels, depth, out_activation
        widths = [base_channels * 2**i for i in range(depth + 1)]
        prev = in_ch
        for i, width in enumerate(widths, start=1):
            setattr(self, f"conv{i}", DoubleConv(prev, width))
            if i <= depth:
                setattr(self, f"pool{i}", nn.MaxPool2d(2))
            prev = width
        for k in range(depth + 2, 2 * depth + 2):
            width = widths[2 * depth + 1 - k]
            setattr(self, f"up{k}", nn.ConvTranspose2d(2 * width, width, 2, stride=2))
            setattr(self, f"conv{k}", DoubleConv(2 * width, width))
        setattr(self, f"conv{2 * depth + 2}", nn.Conv2d(base_channels, out_ch, 1))

    @property
    def head(self) -> nn.Conv2d:
        """The 1x1 output convolution (``conv{2*depth+2}``)."""
        return getattr(self, f"conv{2 * self.depth + 2}")

    def encoder_level(self, i: int) -> DoubleConv:
        return getattr(self, f"conv{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W] -> [N, K, H, W]``, after the checks ``fastunet.UNet`` makes (the same
        errors for the same mistakes, before a shape mismatch surfaces inside ``torch.cat``)."""
        first = self.conv1.conv[0].weight
        validate_input(x, in_ch=self.in_ch, depth=self.depth, param_dtype=first.dtype, param_device=first.device)
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The classic forward on a validated input, calling every submodule."""
        d = self.depth
        skips = []
        for i in range(1, d + 1):
            x = getattr(self, f"conv{i}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i}")(x)
        x = getattr(self, f"conv{d + 1}")(x)
        for k in range(d + 2, 2 * d + 2):
            up = getattr(self, f"up{k}")(x)
            x = getattr(self, f"conv{k}")(torch.cat([up, skips.pop()], dim=1))
        return apply_out_activation(self.head(x), self.out_activation)
