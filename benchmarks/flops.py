"""The U-Net's layers and FLOPs, derived from its configuration alone (no model, no tensors).

``unet_layers`` lists every layer the forward pass runs, in execution order, with its shapes;
the FLOP count and the per-layer benchmark table are both built from that one list, so they
cannot disagree about what the network is.

Convention: FLOPs = 2 x multiply-accumulates (MACs) of the convolutions only, i.e. the 3x3
convs, the 2x2 stride-2 transposed convs and the 1x1 head. BatchNorm, ReLU, max-pool, concat
and the sigmoid are not counted (together well under 0.1 % of the total). This is the
convention of ``torch.utils.flop_counter`` and of the ~96.3 GFLOP quoted for a 256x256 image
through the classic ``UNet(3, 1)``. A training step (forward + backward) is counted as
``TRAINING_FLOP_FACTOR = 3`` forwards: the backward pass runs one convolution for the input
gradient and one for the weight gradient per forward convolution, each as costly as the
forward one. That is the usual convention; it ignores the (cheap) BatchNorm backward.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINING_FLOP_FACTOR = 3

# What each kind of layer is, for readers of the tables.
KINDS = {
    "conv3x3": "3x3 conv (pad 1) + BatchNorm (eval) + ReLU",
    "conv3x3_head": "last 3x3 conv + BatchNorm + ReLU with the 1x1 head and sigmoid fused in",
    "maxpool": "2x2 max-pool, stride 2",
    "upconv": "ConvTranspose2d(k=2, s=2), then concatenated with the skip",
    "head": "1x1 conv + sigmoid",
}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the U-Net forward pass at a given batch and image size.

    Shapes: the input is ``[n, c_in, h, w]``. ``c_skip`` is the second input's channel count:
    for the first conv of a decoder level, the skip tensor the conv reads after the upsampled
    one (it convolves ``cat([up, skip])``, ``c_in + c_skip`` channels); for an ``upconv``, the
    skip it is concatenated with (the concat is part of what the layer replaces); else 0.
    ``c_out`` is the output's channel count; ``out_hw`` its spatial size.
    """

    name: str  # the reference module it corresponds to: "conv1.0", "pool1", "up6", "conv10", ...
    kind: str  # a key of KINDS
    n: int
    c_in: int
    c_skip: int
    c_out: int
    h: int
    w: int

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind == "maxpool":
            return self.h // 2, self.w // 2
        if self.kind == "upconv":
            return 2 * self.h, 2 * self.w
        return self.h, self.w

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the layer's convolutions (0 for the pool)."""
        pixels = self.n * self.h * self.w  # input pixels (= output pixels except pool/upconv)
        if self.kind == "conv3x3":
            return pixels * (self.c_in + self.c_skip) * self.c_out * 9
        if self.kind == "conv3x3_head":
            # c_out here is the head's K; the 3x3 conv has c_in -> c_in channels (the last
            # decoder level keeps its width), then the 1x1 maps c_in -> K.
            return pixels * self.c_in * self.c_in * 9 + pixels * self.c_in * self.c_out
        if self.kind == "upconv":
            # Every output pixel receives exactly one tap from one input pixel: C_in MACs per
            # output element, 4 output pixels per input pixel.
            return pixels * self.c_in * self.c_out * 4
        if self.kind == "head":
            return pixels * self.c_in * self.c_out
        if self.kind == "maxpool":
            return 0
        raise ValueError(f"unknown layer kind {self.kind!r}")

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def min_bytes(self, itemsize: int) -> int:
        """Bytes the fused op must move at least: read its inputs and weights, write its output.

        The same count is used for both implementations so GB/s compare like for like (the
        eager concat moves more; that is the point of fusing it).
        """
        oh, ow = self.out_hw
        read = self.n * self.h * self.w * (self.c_in + (self.c_skip if self.kind != "upconv" else 0))
        if self.kind == "upconv":
            weights = self.c_in * self.c_out * 4
        elif self.kind == "conv3x3":
            weights = (self.c_in + self.c_skip) * self.c_out * 9
        elif self.kind == "conv3x3_head":
            weights = self.c_in * self.c_in * 9 + self.c_in * self.c_out
        elif self.kind == "head":
            weights = self.c_in * self.c_out
        else:
            weights = 0
        c_written = self.c_in if self.kind == "maxpool" else self.c_out
        return itemsize * (read + weights + self.n * oh * ow * c_written)

    def describe(self) -> str:
        """Shape in one line, e.g. ``16x(64+64)->64 @256x256``."""
        c = f"({self.c_in}+{self.c_skip})" if self.c_skip and self.kind != "upconv" else f"{self.c_in}"
        c_out = self.c_in if self.kind == "maxpool" else self.c_out
        tail = f" ++skip {self.c_skip}" if self.kind == "upconv" else ""
        return f"{self.n}x{c}->{c_out} @{self.h}x{self.w}{tail}"


def unet_layers(
    in_ch: int,
    out_ch: int,
    *,
    base_channels: int = 64,
    depth: int = 4,
    batch: int = 1,
    height: int = 256,
    width: int | None = None,
) -> list[LayerSpec]:
    """Every layer of ``UNetReference(in_ch, out_ch, base_channels=..., depth=...)``'s forward
    on a ``[batch, in_ch, height, width]`` input, in execution order, named after its module.

    The head is listed once, as the separate 1x1 conv (``kind="head"``); the fused variant the
    eval-mode fastunet runs is added by the per-layer benchmark, not here, so that the FLOP
    sum counts every convolution exactly once.
    """
    width = height if width is None else width
    m = 2**depth
    if height % m or width % m:
        raise ValueError(f"height and width must be multiples of 2**depth = {m}, got {height}x{width}")
    widths = [base_channels * 2**i for i in range(depth + 1)]
    layers: list[LayerSpec] = []
    h, w, prev = height, width, in_ch
    for i, c in enumerate(widths, start=1):
        layers.append(LayerSpec(f"conv{i}.0", "conv3x3", batch, prev, 0, c, h, w))
        layers.append(LayerSpec(f"conv{i}.3", "conv3x3", batch, c, 0, c, h, w))
        if i <= depth:
            layers.append(LayerSpec(f"pool{i}", "maxpool", batch, c, 0, c, h, w))
            h, w = h // 2, w // 2
        prev = c
    for k in range(depth + 2, 2 * depth + 2):
        c = widths[2 * depth + 1 - k]
        layers.append(LayerSpec(f"up{k}", "upconv", batch, 2 * c, c, c, h, w))
        h, w = 2 * h, 2 * w
        layers.append(LayerSpec(f"conv{k}.0", "conv3x3", batch, c, c, c, h, w))
        layers.append(LayerSpec(f"conv{k}.3", "conv3x3", batch, c, 0, c, h, w))
    layers.append(LayerSpec(f"conv{2 * depth + 2}", "head", batch, base_channels, 0, out_ch, h, w))
    return layers


def forward_flops(
    in_ch: int,
    out_ch: int,
    *,
    base_channels: int = 64,
    depth: int = 4,
    batch: int = 1,
    height: int = 256,
    width: int | None = None,
) -> int:
    """FLOPs (2 x MACs) of one forward pass of the whole batch; see the module docstring."""
    specs = unet_layers(
        in_ch, out_ch, base_channels=base_channels, depth=depth, batch=batch, height=height, width=width
    )
    return sum(spec.flops for spec in specs)


def step_flops(mode: str, **config) -> int:
    """FLOPs of one timed step: a forward (``"inference"``) or forward + backward (``"training"``)."""
    factor = TRAINING_FLOP_FACTOR if mode == "training" else 1
    return factor * forward_flops(**config)
