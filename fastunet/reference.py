"""The eager reference U-Net: plain ``torch.nn`` modules, the truth every test
compares against and the math the CPU fallback runs (in eval mode with each BatchNorm folded
into its conv, see ``fastunet.cpu_fold``).

The classic model (``UNetReference(in_ch, out_ch)``): four encoder levels of
``DoubleConv`` with 2x2 max-pool between them, a 1024-channel bottleneck, four
decoder levels of ``ConvTranspose2d(k=2, s=2)`` -> ``cat([up, skip])`` ->
``DoubleConv``, a 1x1 head and a sigmoid. ``UNetReference(3, 1)`` has
31,043,521 parameters.

Architecture options (keyword-only, see ``UNetReference``) describe the other U-Nets users
bring, without new classes: the Keras U-Net (zhixuhao's ``unet()``), milesial's
``Pytorch-UNet`` and nnU-Net's conv -> InstanceNorm -> LeakyReLU blocks are the named option sets
in ``PRESETS``. The classic options leave the module
tree, the state_dict keys and the parameter order exactly as they were before options existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .validation import ODD_SIZES, validate_input

ACTIVATIONS = ("sigmoid", "none", "softmax")
UPSAMPLINGS = ("transpose", "nearest_conv", "bilinear")
NORMS = ("batch", "instance", "none")
ACTS = ("relu", "leaky_relu")
#: nnU-Net's LeakyReLU slope (``nonlin_kwargs={"inplace": True}``, torch's default 0.01).
LEAKY_SLOPE = 0.01
CONCATS = ("up_skip", "skip_up")
INITS = ("torch", "he_normal")

#: The classic value of every architecture option (besides ``base_channels=64, depth=4``).
DEFAULT_OPTIONS = {
    "out_activation": "sigmoid",
    "upsampling": "transpose",
    "norm": "batch",
    "act": "relu",
    "conv_bias": True,
    "concat": "up_skip",
    "dropout": 0.0,
    "pre_head": 0,
    "odd_sizes": "error",
    "init": "torch",
}

_MILESIAL = {
    **DEFAULT_OPTIONS,
    "out_activation": "none",
    "norm": "batch",
    "conv_bias": False,
    "concat": "skip_up",
    "odd_sizes": "pad",
}

#: Named option sets: ``UNetReference(in_ch, out_ch, preset=name)``; options passed explicitly
#: override the preset's. Each preset names every option, so it reads as the whole architecture.
PRESETS = {
    "classic": dict(DEFAULT_OPTIONS),
    # zhixuhao's unet(): UpSampling2D + Conv2D(2, relu, 'same'), no BatchNorm, Dropout(0.5) after
    # conv4 and conv5, concatenate([skip, up]), a 2-channel 3x3 conv before the sigmoid head.
    "keras": {
        **DEFAULT_OPTIONS,
        "upsampling": "nearest_conv",
        "norm": "none",
        "conv_bias": True,
        "concat": "skip_up",
        "dropout": 0.5,
        "pre_head": 2,
        "out_activation": "sigmoid",
        "init": "he_normal",
    },
    # milesial's Pytorch-UNet UNet(n_channels, n_classes, bilinear=False / True): bias-free 3x3
    # convs before BatchNorm, torch.cat([x2, x1]), F.pad of the upsampled map, logits out.
    "milesial": {**_MILESIAL, "upsampling": "transpose"},
    "milesial-bilinear": {**_MILESIAL, "upsampling": "bilinear"},
    # nnU-Net's generic U-Net blocks (dynamic_network_architectures' StackedConvBlocks): 3x3 conv
    # with bias -> InstanceNorm2d(affine=True, eps=1e-5) -> LeakyReLU(0.01), ConvTranspose2d(k=2,
    # s=2) up, torch.cat((up, skip)), logits out (nnU-Net applies its softmax after the network),
    # He-normal convs with zero biases. Its stage widths cap (320/512), strided-conv downsampling
    # and deep supervision are not options here: ``base_channels``/``depth`` set the widths.
    "nnunet": {
        **DEFAULT_OPTIONS,
        "norm": "instance",
        "act": "leaky_relu",
        "out_activation": "none",
        "init": "he_normal",
    },
}

# Keras' truncated normal draws from N(0, s) cut at +-2s and divides s by the standard deviation
# of a standard normal truncated at +-2 (keras.initializers.VarianceScaling), so the samples'
# own standard deviation is the sqrt(2 / fan_in) that He et al. ask for.
_TRUNC_NORMAL_2SIGMA_STD = 0.87962566103423978


def make_act(act: str) -> nn.Module:
    """The activation module of ``act``: ``nn.ReLU`` or nnU-Net's ``nn.LeakyReLU(0.01)`` (in place)."""
    return nn.ReLU(inplace=True) if act == "relu" else nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


class DoubleConv(nn.Module):
    """(3x3 conv pad 1 -> norm -> activation) x 2; ``[N, in_ch, H, W] -> [N, out_ch, H, W]``.

    Args:
        in_ch, out_ch: input and output channels; ``mid_ch`` (default ``out_ch``): the channels
            between the two convs (milesial's bilinear decoder narrows after the first conv).
        norm: ``"batch"`` (``nn.BatchNorm2d``), ``"instance"`` (``nn.InstanceNorm2d(affine=True)``,
            nnU-Net's: per-sample statistics in training and eval alike) or ``"none"``
            (``nn.Identity`` in its place).
        act: ``"relu"`` (``nn.ReLU``) or ``"leaky_relu"`` (``nn.LeakyReLU(0.01)``, nnU-Net's).
        bias: whether the two convs have a bias.
        dropout: when > 0, an ``nn.Dropout(dropout)`` on the output (index 6).

    The layers live in ``self.conv`` (an ``nn.Sequential``): indices 0 and 3 are always the
    convs and 1 and 4 the norms, which fixes the state_dict names ``conv.0.weight``,
    ``conv.1.running_mean``, ... of the classic model.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        mid_ch: int | None = None,
        *,
        norm: str = "batch",
        act: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        _check_choice("act", act, ACTS)
        mid_ch = out_ch if mid_ch is None else mid_ch

        def make_norm(ch: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(ch)
            return nn.InstanceNorm2d(ch, affine=True) if norm == "instance" else nn.Identity()

        layers = [
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=bias),
            make_norm(mid_ch),
            make_act(act),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=bias),
            make_norm(out_ch),
            make_act(act),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NearestConvUp(nn.Module):
    """Keras' ``Conv2D(out, 2, activation='relu', padding='same')(UpSampling2D(2)(x))``:
    ``[N, in_ch, h, w] -> [N, out_ch, 2h, 2w]``.

    Nearest x2 upsampling, one zero row and column added at the bottom and right (TensorFlow's
    'same' padding of an even kernel puts the extra row/column after), a 2x2 valid conv, ReLU.
    The conv is ``self.conv`` (state_dict keys ``conv.weight``, ``conv.bias``).
    """

    def __init__(self, in_ch: int, out_ch: int, *, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.conv(F.pad(x, (0, 1, 0, 1))))


def apply_out_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The head's output activation: sigmoid, identity (logits) or softmax over channels."""
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return y


def pad_to(up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``up`` zero-padded to ``skip``'s H and W: ``diff // 2`` before and the rest after, as
    milesial's ``F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])``."""
    dy = skip.shape[2] - up.shape[2]
    dx = skip.shape[3] - up.shape[3]
    return F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_options(in_ch, out_ch, base_channels, depth, options: dict) -> None:
    """Raise ``ValueError`` naming the first bad argument and what it accepts."""
    for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("base_channels", base_channels)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"depth must be a positive int (4 for the classic U-Net), got {depth!r}")
    _check_choice("out_activation", options["out_activation"], ACTIVATIONS)
    _check_choice("upsampling", options["upsampling"], UPSAMPLINGS)
    _check_choice("norm", options["norm"], NORMS)
    _check_choice("act", options["act"], ACTS)
    _check_choice("concat", options["concat"], CONCATS)
    _check_choice("odd_sizes", options["odd_sizes"], ODD_SIZES)
    _check_choice("init", options["init"], INITS)
    if not isinstance(options["conv_bias"], bool):
        raise ValueError(f"conv_bias must be True or False, got {options['conv_bias']!r}")
    p = options["dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1) (0 disables it, keras' is 0.5), got {p!r}")
    if not _is_int(options["pre_head"]) or options["pre_head"] < 0:
        raise ValueError(
            f"pre_head must be an int >= 0 (channels of a 3x3 conv + ReLU before the head, 0 for none), "
            f"got {options['pre_head']!r}"
        )


def resolve_options(preset: str | None, explicit: dict) -> dict:
    """The option values a model gets: the classic defaults, then ``PRESETS[preset]``, then the
    options passed explicitly (those that are not None)."""
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"unknown preset {preset!r}; the presets are {', '.join(map(repr, PRESETS))} (or None)")
    options = dict(DEFAULT_OPTIONS)
    if preset is not None:
        options.update(PRESETS[preset])
    options.update({k: v for k, v in explicit.items() if v is not None})
    return options


def init_he_normal(model: nn.Module) -> None:
    """Keras' ``he_normal`` on every conv and transposed conv of ``model``: weights from a normal
    cut at 2 standard deviations, scaled so that the samples' standard deviation is
    ``sqrt(2 / fan_in)``; biases zero. BatchNorm keeps torch's (and Keras') ones and zeros.

    ``fan_in`` is torch's (``weight.size(1) * kh * kw``), which for a transposed conv is
    ``out_ch * kh * kw`` exactly as Keras computes it from a ``Conv2DTranspose`` kernel.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                std = math.sqrt(2.0 / fan_in) / _TRUNC_NORMAL_2SIGMA_STD
                nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    m.bias.zero_()


class UNetReference(nn.Module):
    """The U-Net in plain eager PyTorch: the classic one by default, the Keras or milesial one
    through ``preset`` or the options below.

    Args:
        in_ch: input channels C_in.
        out_ch: output channels (classes) K.
        base_channels: width of the first level (64 classic); level i (1-based) has
            ``base * 2**(i-1)``.
        depth: number of poolings (4 classic). Encoder modules are ``conv1..conv{depth+1}``
            and ``pool1..pool{depth}``; decoder ``up{depth+2}..up{2*depth+1}`` with
            ``conv{depth+2}..conv{2*depth+1}``; then ``pre_head`` (when ``pre_head > 0``); the head
            is ``conv{2*depth+2}``.
        out_activation: ``"sigmoid"`` (classic), ``"none"`` (logits) or ``"softmax"`` (over K).
        upsampling: ``"transpose"`` (``ConvTranspose2d(2w, w, 2, stride=2)``, classic),
            ``"nearest_conv"`` (``NearestConvUp(2w, w)``, Keras) or ``"bilinear"``
            (``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)``, no parameters;
            widths as milesial's ``bilinear=True``: the bottleneck keeps the deepest level's
            width and each decoder conv halves its output).
        norm: ``"batch"`` (``BatchNorm2d`` after every 3x3 conv, classic), ``"instance"``
            (``InstanceNorm2d(affine=True)``, nnU-Net) or ``"none"``.
        act: the activation after every norm (and of the pre-head conv): ``"relu"`` (classic) or
            ``"leaky_relu"`` (``LeakyReLU(0.01)``, nnU-Net).
        conv_bias: bias on every 3x3 conv, the pre-head conv and the nearest_conv up conv
            (transposed convs and the 1x1 head always have one).
        concat: ``"up_skip"`` (``cat([up, skip])``, classic) or ``"skip_up"`` (Keras, milesial).
        dropout: ``p`` of an ``nn.Dropout`` on the outputs of ``conv{depth}`` (before its pool and
            as its skip) and of the bottleneck ``conv{depth+1}``; 0 (classic) adds none.
        pre_head: when > 0, a 3x3 'same' conv from ``base_channels`` to ``pre_head`` channels +
            the activation before the head (Keras: 2).
        odd_sizes: ``"error"`` (H, W multiples of ``2**depth``, classic) or ``"pad"`` (any H, W
            >= ``2**depth``; pooling floors and each upsampled map is zero-padded to its skip's
            size, ``diff // 2`` before and the rest after, as milesial).
        init: ``"torch"`` (torch's default initialization) or ``"he_normal"`` (Keras', see
            ``init_he_normal``).
        preset: ``None`` or a key of ``PRESETS`` (``"classic"``, ``"keras"``, ``"milesial"``,
            ``"milesial-bilinear"``, ``"nnunet"``); options passed explicitly override the
            preset's.

    ``model.options`` holds the value of every option (``base_channels`` and ``depth`` included,
    ``preset`` not: the options alone rebuild the model), each also an attribute of the model.

    Shapes: ``[N, C_in, H, W] -> [N, K, H, W]``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        base_channels: int = 64,
        depth: int = 4,
        out_activation: str | None = None,
        upsampling: str | None = None,
        norm: str | None = None,
        act: str | None = None,
        conv_bias: bool | None = None,
        concat: str | None = None,
        dropout: float | None = None,
        pre_head: int | None = None,
        odd_sizes: str | None = None,
        init: str | None = None,
        preset: str | None = None,
    ):
        super().__init__()
        # None means "the preset's value, else the classic default", so an explicit value
        # (even the classic one) always wins over the preset.
        explicit = dict(
            out_activation=out_activation, upsampling=upsampling, norm=norm, act=act, conv_bias=conv_bias,
            concat=concat, dropout=dropout, pre_head=pre_head, odd_sizes=odd_sizes, init=init,
        )  # fmt: skip
        opts = resolve_options(preset, explicit)
        _check_options(in_ch, out_ch, base_channels, depth, opts)
        opts["dropout"] = float(opts["dropout"])
        self.in_ch, self.out_ch = in_ch, out_ch
        self.base_channels, self.depth = base_channels, depth
        self.preset = preset
        self.out_activation = opts["out_activation"]
        self.upsampling, self.norm, self.conv_bias = opts["upsampling"], opts["norm"], opts["conv_bias"]
        self.act = opts["act"]
        self.concat, self.dropout, self.odd_sizes = opts["concat"], opts["dropout"], opts["odd_sizes"]
        self.init = opts["init"]
        self.pre_head_channels = opts["pre_head"]
        self._options = {"base_channels": base_channels, "depth": depth, **opts}

        dc = dict(norm=self.norm, act=self.act, bias=self.conv_bias)
        widths = [base_channels * 2**i for i in range(depth)]  # level i + 1
        bilinear = self.upsampling == "bilinear"
        prev = in_ch
        for i, width in enumerate(widths, start=1):
            p = self.dropout if i == depth else 0.0
            setattr(self, f"conv{i}", DoubleConv(prev, width, **dc, dropout=p))
            setattr(self, f"pool{i}", nn.MaxPool2d(2))
            prev = width
        # milesial's bilinear model has no up conv to halve the bottleneck's width, so the
        # bottleneck keeps the deepest level's width (his ``factor = 2``).
        bottleneck = widths[-1] if bilinear else 2 * widths[-1]
        setattr(self, f"conv{depth + 1}", DoubleConv(prev, bottleneck, **dc, dropout=self.dropout))
        for k in range(depth + 2, 2 * depth + 2):
            skip = widths[2 * depth + 1 - k]
            if bilinear:
                up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
                # in: the previous level's output (skip wide) + skip; out: the next skip's width
                out = base_channels if k == 2 * depth + 1 else skip // 2
                conv = DoubleConv(2 * skip, out, skip, **dc)
            else:
                if self.upsampling == "transpose":
                    up = nn.ConvTranspose2d(2 * skip, skip, 2, stride=2)
                else:
                    up = NearestConvUp(2 * skip, skip, bias=self.conv_bias)
                conv = DoubleConv(2 * skip, skip, **dc)
            setattr(self, f"up{k}", up)
            setattr(self, f"conv{k}", conv)
        if self.pre_head_channels:
            self.pre_head = nn.Sequential(
                nn.Conv2d(base_channels, self.pre_head_channels, 3, padding=1, bias=self.conv_bias),
                make_act(self.act),
            )
        setattr(self, f"conv{2 * depth + 2}", nn.Conv2d(self.pre_head_channels or base_channels, out_ch, 1))
        if self.init == "he_normal":
            init_he_normal(self)

    @property
    def options(self) -> dict:
        """Every option's value (a fresh dict): ``type(m)(m.in_ch, m.out_ch, **m.options)``
        builds the same architecture."""
        return dict(self._options)

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
        validate_input(
            x, in_ch=self.in_ch, depth=self.depth, param_dtype=first.dtype, param_device=first.device,
            odd_sizes=self.odd_sizes,
        )  # fmt: skip
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on a validated input, calling every submodule."""
        d = self.depth
        skips = []
        for i in range(1, d + 1):
            x = getattr(self, f"conv{i}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i}")(x)
        x = getattr(self, f"conv{d + 1}")(x)
        for k in range(d + 2, 2 * d + 2):
            up, skip = getattr(self, f"up{k}")(x), skips.pop()
            if self.odd_sizes == "pad":
                up = pad_to(up, skip)
            x = getattr(self, f"conv{k}")(torch.cat([up, skip] if self.concat == "up_skip" else [skip, up], dim=1))
        if self.pre_head_channels:
            x = self.pre_head(x)
        return apply_out_activation(self.head(x), self.out_activation)
