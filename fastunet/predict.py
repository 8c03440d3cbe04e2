"""Whole-image inference: ``fastunet.predict(model, image)`` for images of any size.

This sits above the model: it calls ``model(x)`` on ``[B, C, h, w]`` batches whose h and w are
multiples of ``2**model.depth`` and nothing else, so it runs the same on the fused CUDA path,
on the CPU fallback, and on any module with a U-Net's input contract (attributes ``depth`` and
``in_ch``; ``out_ch`` is used when present).

Three ways through an image, chosen by size and a memory budget:

* **whole image**: no ``tile_size`` and the padded image fits the budget: pad to the next
  multiple of ``2**depth``, one forward per ``batch_size`` images, crop.
* **tiles on the device**: sliding windows placed and weighted exactly as MONAI's
  ``sliding_window_inference`` places and weights them (scan interval ``int(tile * (1 -
  overlap))``, the last window flush with the image end, an image smaller than the tile padded
  half before and half after, Gaussian importance ``sigma = 0.125 * tile`` floored at
  ``max(min, 1e-3)``), so results are interchangeable with MONAI's. Weighted sums accumulate in
  one fp32 buffer on the device; nothing waits for the host between tiles.
* **tiles, output on the host**: when the padded image and its accumulator do not fit the
  budget, one row of tiles at a time is read from the source (a numpy memmap stays on disk),
  run, and its finished rows are normalised and written to the output (which can be a
  ``numpy.memmap``, ``out=``); the accumulator carries only the rows the next tile row still
  overlaps. Memory: one tile row plus the output.

The third blend, ``"center"``, is the U-Net paper's overlap-tile strategy: every output pixel
comes from the one tile whose centre is nearest to it (per axis, which on a grid of tiles is
also nearest in any norm), no averaging.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .errors import NonFiniteInputWarning

__all__ = ["predict", "BLENDS", "TTAS", "PAD_MODES", "tile_starts", "importance_map"]

BLENDS = ("gaussian", "constant", "center")
TTAS = (None, "flips", "flips8")
PAD_MODES = ("reflect", "replicate", "constant")
AUTOCAST_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
SIGMA_SCALE = 0.125  # MONAI's default: sigma = 0.125 * tile size
MIN_WEIGHT = 1e-3  # MONAI floors the Gaussian at max(its minimum, 1e-3)
# Largest tile the automatic choice picks: beyond it larger tiles save little halo work and
# only grow the activations.
AUTO_TILE_MAX = 1024
_CPU_DEFAULT_BUDGET = 4 << 30  # when /proc/meminfo cannot be read


# --------------------------------------------------------------------------- geometry
def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one axis of ``length >= tile`` pixels, as MONAI places them.

    The scan interval is ``int(tile * (1 - overlap))`` (at least 1; the whole axis when
    ``length == tile``); windows are added until one reaches the end, and the last one is
    moved back to end flush with the axis. Returns increasing starts, the first 0 and the last
    ``length - tile``.
    """
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}: pad it first")
    if length == tile:
        return [0]
    interval = max(1, int(tile * (1 - overlap)))
    count = math.ceil((length - tile) / interval) + 1
    return [min(i * interval, length - tile) for i in range(count)]


def importance_map(tile: tuple[int, int], blend: str) -> Tensor:
    """The per-window weight ``[th, tw]`` (float64, CPU) for ``"gaussian"`` or ``"constant"``.

    Gaussian: the product of 1-D Gaussians centred on the window with ``sigma = 0.125 * size``
    per axis, then every value below ``max(min, 1e-3)`` raised to it, as MONAI's
    ``compute_importance_map`` does (so no pixel's weight sum is ~0 at the image corners).
    """
    if blend == "constant":
        return torch.ones(tile, dtype=torch.float64)
    if blend != "gaussian":
        raise ValueError(f"importance_map: blend must be 'gaussian' or 'constant', got {blend!r}")
    profiles = []
    for size in tile:
        offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profiles.append(torch.exp(-(offsets**2) / (2 * (SIGMA_SCALE * size) ** 2)))
    weights = profiles[0][:, None] * profiles[1][None, :]
    return weights.clamp(min=max(weights.min().item(), MIN_WEIGHT))


def _owned_bounds(starts: Sequence[int], tile: int, length: int) -> list[tuple[int, int]]:
    """For the center blend: the interval of the axis each window owns (the pixels whose
    centre ``p + 0.5`` is nearest to the window's centre; a tie goes to the earlier window).
    The intervals partition ``[0, length)`` and each lies inside its window."""
    cuts = [(a + b + tile + 1) // 2 for a, b in zip(starts[:-1], starts[1:], strict=True)]
    edges = [0, *cuts, length]
    return list(zip(edges[:-1], edges[1:], strict=True))


@dataclass(frozen=True)
class _Axis:
    """One spatial axis: the image's ``length``, the padded length and the padding before it,
    the window size and starts (padded coordinates), and the interval each window owns."""

    length: int
    padded: int
    before: int
    tile: int
    starts: tuple[int, ...]
    owned: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, length: int, multiple: int) -> _Axis:
        padded = -(-length // multiple) * multiple
        return cls(length, padded, (padded - length) // 2, padded, (0,), ((0, padded),))

    @classmethod
    def tiled(cls, length: int, tile: int, overlap: float) -> _Axis:
        # An axis shorter than the window is padded to it, half before and half after (MONAI).
        padded = max(length, tile)
        starts = tile_starts(padded, tile, overlap)
        owned = tuple(_owned_bounds(starts, tile, padded))
        return cls(length, padded, (padded - length) // 2, tile, tuple(starts), owned)

    @property
    def crop(self) -> slice:
        return slice(self.before, self.before + self.length)


def _source_index(axis: _Axis, pad_mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Where each padded position reads from in the image (int64 ``[padded]``) and, for
    constant padding, which positions are inside the image (bool, else None).

    Reflect padding wider than the image keeps reflecting (period ``2 * (length - 1)``, what
    ``numpy.pad(mode="reflect")`` does), which F.pad cannot; a length-1 axis has nothing to
    reflect and is replicated.
    """
    pos = np.arange(axis.padded, dtype=np.int64) - axis.before
    n = axis.length
    if pad_mode == "reflect" and n > 1:
        period = 2 * (n - 1)
        pos = pos % period
        return np.where(pos < n, pos, period - pos), None
    clipped = np.clip(pos, 0, n - 1)
    if pad_mode == "constant":
        return clipped, (pos >= 0) & (pos < n)
    return clipped, None  # replicate, or reflect of a single pixel


# --------------------------------------------------------------------------- the image
@dataclass
class _Image:
    """The input as the caller gave it, read lazily in rows as ``[N, C, rows, W]`` tensors.

    ``layout``: "NCHW"/"CHW" (tensor or numpy), "NHWC"/"HWC" (numpy) or "HW" (2-D numpy, one
    channel). ``scale``: 1 / the dtype's maximum for 8- and 16-bit integers, else None.
    """

    data: object
    is_numpy: bool
    layout: str
    n: int
    c: int
    h: int
    w: int
    scale: float | None
    device: torch.device

    def rows(self, sel: slice | np.ndarray, dtype: torch.dtype, n: slice = slice(None)) -> Tensor:
        """Rows ``sel`` of images ``n``, ``[n, C, r, W]`` in ``dtype`` on the data's device (a
        view of a tensor input when nothing needs converting: callers copy before writing)."""
        if self.is_numpy:
            a = self.data
            if self.layout == "HW":
                block = a[sel][None, None]
            elif self.layout == "HWC":
                block = a[sel].transpose(2, 0, 1)[None]
            elif self.layout == "CHW":
                block = a[:, sel][None]
            elif self.layout == "NHWC":
                block = a[n][:, sel].transpose(0, 3, 1, 2)
            else:  # NCHW
                block = a[n][:, :, sel]
            if self.layout in ("HW", "HWC", "CHW"):
                block = block[n]
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            # One copy: the read (memmap rows come off the disk here), the layout and the cast.
            block = np.ascontiguousarray(block, dtype=np_dtype)
            if not block.flags.writeable:  # rows of a read-only memmap in its own dtype: a copy torch may own
                block = block.copy()
            t = torch.from_numpy(block)
        else:
            x = self.data if self.layout == "NCHW" else self.data.unsqueeze(0)
            t = x[n][:, :, sel].to(dtype)
        if self.scale is not None:  # integer data: the cast above made a copy
            t = t.mul_(self.scale)
        return t

    def result_shape(self, k: int) -> tuple[int, ...]:
        """The shape ``predict`` returns for ``k`` output channels: the input's layout."""
        n, h, w = self.n, self.h, self.w
        return {
            "NCHW": (n, k, h, w), "CHW": (k, h, w), "NHWC": (n, h, w, k), "HWC": (h, w, k),
            "HW": (h, w) if k == 1 else (h, w, k),
        }[self.layout]  # fmt: skip


_MAX_SCALED_BITS = 16


def _int_scale(dtype: object, bits: int, maximum: int) -> float:
    """1 / ``maximum`` for an integer image dtype of up to 16 bits: uint8 and uint16 map to [0, 1],
    int8 and int16 to [-1, 1] (as torchvision's ``to_dtype(scale=True)`` does). Wider integers
    have no conventional range (a 32-bit image may hold 12-bit data): refused, not guessed."""
    if bits > _MAX_SCALED_BITS:
        name = str(dtype).removeprefix("torch.")
        article = "an" if name.startswith("int") else "a"
        raise ValueError(
            f"predict scales integer images by their dtype's range (uint8, int8, uint16, int16); {article} {name} "
            f"image has no conventional range: convert it to floating point scaled as the model was trained, e.g. "
            f"image.astype(np.float32) / 4095 for 12-bit data (tensor: image.float() / 4095)"
        )
    return 1 / maximum


def _scale_of(dtype: np.dtype | torch.dtype) -> float | None:
    """The factor ``predict`` multiplies an image of ``dtype`` by (None: used as it is)."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return None
        info = torch.iinfo(dtype)
        return _int_scale(dtype, info.bits, info.max)
    if dtype.kind in "ui":  # any byte order: a big-endian uint16 TIFF is scaled like a native one
        info = np.iinfo(dtype)
        return _int_scale(dtype, info.bits, info.max)
    return None


def _as_image(image: object, in_ch: int) -> _Image:
    """Check ``image`` against the model's channel count and say which layout it is in."""
    if isinstance(image, Tensor):
        if image.dim() not in (3, 4):
            raise ValueError(
                f"predict expects a tensor [C, H, W] or [N, C, H, W] with C = {in_ch}, got shape {tuple(image.shape)}"
            )
        c = image.shape[-3]
        if c != in_ch:
            raise ValueError(
                f"the model expects {in_ch} input channel(s) (tensor [C, H, W] / [N, C, H, W]), got C = {c} "
                f"(shape {tuple(image.shape)})"
            )
        if image.is_complex():
            raise ValueError(f"predict expects a real image, got dtype {image.dtype}")
        n = image.shape[0] if image.dim() == 4 else 1
        scale = _scale_of(image.dtype)
        layout = "NCHW" if image.dim() == 4 else "CHW"
        img = _Image(image, False, layout, n, c, image.shape[-2], image.shape[-1], scale, image.device)
    elif isinstance(image, np.ndarray):
        img = _numpy_image(image, in_ch)
    else:
        raise TypeError(f"predict expects a torch.Tensor or a numpy.ndarray, got {type(image).__name__}")
    if img.n < 1 or img.h < 1 or img.w < 1:
        raise ValueError(f"predict needs N, H and W >= 1, got N={img.n}, H={img.h}, W={img.w}")
    return img


def _numpy_image(a: np.ndarray, in_ch: int) -> _Image:
    if a.dtype.kind not in "buif":
        raise ValueError(f"predict expects a numeric image array, got dtype {a.dtype}")
    scale = _scale_of(a.dtype)
    cpu = torch.device("cpu")
    if a.ndim == 2:
        if in_ch != 1:
            raise ValueError(
                f"a 2-D array {a.shape} is a one-channel image, but the model expects {in_ch} channels: "
                f"pass HWC ({a.shape[0]}, {a.shape[1]}, {in_ch}) or CHW ({in_ch}, {a.shape[0]}, {a.shape[1]})"
            )
        return _Image(a, True, "HW", 1, 1, a.shape[0], a.shape[1], scale, cpu)
    if a.ndim not in (3, 4):
        raise ValueError(f"predict expects an array HW, HWC, CHW, NHWC or NCHW, got {a.ndim} dimensions {a.shape}")
    first, last = a.shape[-3], a.shape[-1]
    batch = a.ndim == 4
    n = a.shape[0] if batch else 1
    # Image libraries hand out HWC: when both ends could be the channels, that reading wins.
    if last == in_ch:
        return _Image(a, True, "NHWC" if batch else "HWC", n, in_ch, a.shape[-3], a.shape[-2], scale, cpu)
    if first == in_ch:
        return _Image(a, True, "NCHW" if batch else "CHW", n, in_ch, a.shape[-2], a.shape[-1], scale, cpu)
    raise ValueError(
        f"the model expects {in_ch} input channel(s) on the last axis (HWC) or the first (CHW), got an array of "
        f"shape {a.shape}"
    )


_FINITE_CHUNK = 1 << 24  # values per pass when counting NaN/Inf in an array (a memmap is not read whole)


def _count_non_finite(img: _Image) -> int:
    """How many NaN and Inf values a floating-point input holds (0 for integers)."""
    data = img.data
    if not img.is_numpy:
        if not (data.is_floating_point() or data.is_complex()):
            return 0
        if data.device.type != "cpu" or data.dtype == torch.bfloat16:
            return int((~torch.isfinite(data)).sum())
        data = data.detach().numpy()  # a view; numpy's pass is ~8x faster than torch's on a CPU
    if data.dtype.kind not in "fc":
        return 0
    # Buffered chunks in memory order, whatever the layout (a memmap, a broadcast grey view): the
    # temporaries stay _FINITE_CHUNK values long.
    chunks = np.nditer(data, flags=["external_loop", "buffered", "zerosize_ok"], buffersize=_FINITE_CHUNK)
    return sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk))) for chunk in chunks)


def _warn_non_finite(img: _Image) -> None:
    count = _count_non_finite(img)
    if count:
        total = img.n * img.c * img.h * img.w
        warnings.warn(
            f"predict: the input holds {count:,} NaN or Inf value(s) of {total:,}; each spreads through the "
            "convolutions to every output pixel it reaches (NaN probabilities, 0 in a thresholded mask): replace "
            "them first (numpy.nan_to_num / torch.nan_to_num)",
            NonFiniteInputWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- output
class _Output:
    """Where results go: the caller's ``out`` or a new array/tensor in the input's layout,
    written in ``[K, rows, W]`` pieces of image ``n``."""

    def __init__(self, img: _Image, k: int, dtype: torch.dtype, out: object):
        self.img, self.k = img, k
        shape = img.result_shape(k)
        if out is None:
            if img.is_numpy:
                out = np.empty(shape, dtype=np.float64 if dtype == torch.float64 else np.float32)
            else:
                out = torch.empty(shape, dtype=dtype, device=img.device)
        self.out = out
        self.view = _nkhw_view(out, img.layout, k)

    def write(self, n: int, y0: int, piece: Tensor) -> None:
        """Rows ``y0 : y0 + piece.shape[1]`` of image ``n``: ``piece`` is ``[K, rows, W]``."""
        dst = self.view[n, :, y0 : y0 + piece.shape[1]]
        if isinstance(dst, Tensor):
            dst.copy_(piece)
        else:
            dst[...] = piece.cpu().numpy()


def _nkhw_view(out: object, layout: str, k: int):
    """``out`` (a tensor or an array, whichever family the input was) indexed as
    ``[N, K, H, W]`` (a view: writes go to ``out``)."""
    permute = out.permute if isinstance(out, Tensor) else out.transpose
    if layout == "NHWC":
        return permute(0, 3, 1, 2)
    if layout == "HWC" or (layout == "HW" and k > 1):
        return permute(2, 0, 1)[None]
    if layout == "HW":
        return out[None, None]
    if layout == "CHW":
        return out[None]
    return out


def _check_out(out: object, shape: tuple[int, ...]) -> None:
    if isinstance(out, Tensor):
        ok_dtype = out.is_floating_point()
    elif isinstance(out, np.ndarray):
        ok_dtype = out.dtype.kind == "f"
        if ok_dtype and not out.flags.writeable:
            raise ValueError("out= is read-only (a memmap opened with mode='r'?): open it with mode 'w+' or 'r+'")
    else:
        raise ValueError(f"out= must be a numpy array (a numpy.memmap works) or a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out= must have the result's shape {tuple(shape)}, got {tuple(out.shape)}")
    if not ok_dtype:
        raise ValueError(f"out= must have a floating-point dtype (float32 is what predict computes), got {out.dtype}")


# --------------------------------------------------------------------------- options
def _check_model(model: nn.Module) -> tuple[int, int, int | None]:
    depth, in_ch = getattr(model, "depth", None), getattr(model, "in_ch", None)
    for name, value in (("depth", depth), ("in_ch", in_ch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "depth" else 1):
            raise TypeError(
                f"predict needs a model with a U-Net's input contract: an int attribute {name!r} "
                f"(fastunet.UNet has depth, in_ch and out_ch), got {name}={value!r}"
            )
    out_ch = getattr(model, "out_ch", None)
    return depth, in_ch, out_ch if isinstance(out_ch, int) and out_ch >= 1 else None


def _check_tile(tile_size: object, multiple: int) -> tuple[int, int] | None:
    if tile_size is None:
        return None
    if isinstance(tile_size, numbers.Integral):
        tile_size = (tile_size, tile_size)
    sizes = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else ()
    if len(sizes) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"tile_size must be an int or a pair of ints (height, width), got {tile_size!r}")
    sizes = tuple(int(s) for s in sizes)
    for s in sizes:
        if s < multiple or s % multiple:
            nearest = max(multiple, round(s / multiple) * multiple)
            raise ValueError(
                f"tile_size must be a positive multiple of 2**depth = {multiple}, got {s}; the nearest valid "
                f"size is {nearest}"
            )
    return sizes  # type: ignore[return-value]


def _check_options(overlap, blend, batch_size, tta, pad_mode, dtype, max_device_bytes, progress) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1) (0.25 by default), got {overlap!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if tta not in TTAS:
        raise ValueError(f"tta must be one of {TTAS}, got {tta!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {AUTOCAST_DTYPES} (the autocast dtype; None: none), got {dtype!r}")
    if max_device_bytes is not None and (
        isinstance(max_device_bytes, bool) or not isinstance(max_device_bytes, int) or max_device_bytes < 1
    ):
        raise ValueError(f"max_device_bytes must be a positive int or None, got {max_device_bytes!r}")
    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm: pip install tqdm (or fastunet[predict])") from exc


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = torch.cuda.current_device if torch.cuda.is_available() else lambda: 0
    return (a.index if a.index is not None else index()) == (b.index if b.index is not None else index())


def _model_device(model: nn.Module, device: object, img: _Image) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters(), None)
    if first is None:
        where = torch.device(device) if device is not None else img.device
        return where, torch.float32
    if device is not None and not _same_device(torch.device(device), first.device):
        raise ValueError(
            f"device={str(device)!r} but the model's parameters are on {first.device}: move the model "
            f"(model.to({str(device)!r})) or pass device={str(first.device)!r}"
        )
    dtype = first.dtype if first.is_floating_point() else torch.float32
    return first.device, dtype


# --------------------------------------------------------------------------- memory
def _default_budget(device: torch.device) -> int:
    """Bytes predict may allocate on ``device``: 80 % of what CUDA reports free (plus what the
    caching allocator holds unused), on CPU half of the available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.8 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return available // 2
    except (OSError, StopIteration, ValueError):
        return _CPU_DEFAULT_BUDGET


def _activation_bytes_per_pixel(model: nn.Module, elem: int) -> int:
    # A rough bound on a U-Net eval forward's live activations per input pixel: the level-0
    # skip, the conv output, the upsampled map and their concat (~6 base-width maps), plus the
    # coarser levels (each half the previous: channels x2, pixels /4).
    base = getattr(model, "base_channels", 64)
    base = base if isinstance(base, int) and base > 0 else 64
    return 12 * base * elem


def _forward_bytes(model, tile_px: int, batch: int, variants: int, c: int, k: int, elem: int) -> int:
    per_px = _activation_bytes_per_pixel(model, elem) + 4 * c + 8 * k
    return batch * variants * tile_px * per_px


# --------------------------------------------------------------------------- forward
def _variants(tta: str | None) -> list[tuple[bool, tuple[int, ...]]]:
    """(transpose H and W, flipped dims) per test-time variant."""
    flips = [(), (3,), (2,), (2, 3)]
    if tta is None:
        return [(False, ())]
    out = [(False, f) for f in flips]
    if tta == "flips8":
        out += [(True, f) for f in flips]
    return out


def _apply(x: Tensor, transpose: bool, dims: tuple[int, ...]) -> Tensor:
    if transpose:
        x = x.transpose(2, 3)
    return x.flip(dims) if dims else x


def _undo(y: Tensor, transpose: bool, dims: tuple[int, ...]) -> Tensor:
    if dims:
        y = y.flip(dims)
    return y.transpose(2, 3) if transpose else y


class _Runner:
    """``model`` on a batch of tiles ``[B, C, h, w]`` -> ``[B, K, h, w]`` in the accumulation
    dtype: autocast, inference mode, and the test-time variants (un-flipped and averaged)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, tta, acc: torch.dtype):
        self.model, self.device, self.acc = model, device, acc
        self.variants = _variants(tta)
        self.autocast = dtype is not None and dtype != torch.float32
        self.dtype = dtype

    def _model(self, x: Tensor) -> Tensor:
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            y = self.model(x)
        if not isinstance(y, Tensor) or y.dim() != 4 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise RuntimeError(
                f"predict needs a model that maps [B, C, h, w] to [B, K, h, w]; for an input of shape "
                f"{tuple(x.shape)} it returned {got}"
            )
        return y.to(self.acc)  # still an inference tensor: only read, or copied (see _finish)

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.variants) == 1:
            return self._model(x)
        b = x.shape[0]
        square = x.shape[2] == x.shape[3]
        # One forward for every variant; transposed variants of a non-square tile have the
        # other shape, so they get a second forward.
        groups = [self.variants] if square else [[v for v in self.variants if v[0] == t] for t in (False, True)]
        total = None
        for group in groups:
            if not group:
                continue
            y = self._model(torch.cat([_apply(x, *v) for v in group]))
            for i, v in enumerate(group):
                part = _undo(y[i * b : (i + 1) * b], *v)
                # Out of place: y is an inference tensor, which only inference mode may modify.
                total = part if total is None else total + part
        return total / len(self.variants)


# --------------------------------------------------------------------------- predict
def predict(
    model: nn.Module,
    image: Tensor | np.ndarray,
    *,
    tile_size: int | tuple[int, int] | None = None,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 8,
    tta: str | None = None,
    pad_mode: str = "reflect",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    out: np.ndarray | Tensor | None = None,
    max_device_bytes: int | None = None,
) -> Tensor | np.ndarray:
    """Run a U-Net over a whole image of any size and return its output at the image's size.

    Args:
        model: ``fastunet.UNet`` or any module with its input contract: ``[B, in_ch, h, w] ->
            [B, K, h, w]`` for h, w multiples of ``2**model.depth``, and int attributes
            ``depth`` and ``in_ch`` (``out_ch`` too, if it has one, lets ``out`` be checked
            before any work). Its outputs are returned as they are: probabilities for a
            sigmoid/softmax head, logits for ``out_activation="none"``.
        image: a tensor ``[C, H, W]`` or ``[N, C, H, W]``, or a numpy array ``[H, W]`` (one
            channel), ``[H, W, C]``, ``[C, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (when
            both the first and the last axis equal ``in_ch``, HWC is assumed). Any H, W >= 1.
            Integers are scaled by their dtype's maximum (tensors too; any byte order): uint8
            by 1/255 and uint16 by 1/65535 to [0, 1], int8 by 1/127 and int16 by 1/32767 to
            [-1, 1]; wider integers (int32, int64, uint32, uint64) are refused, having no
            conventional range. Floats are cast to the model's dtype as they are; NaN or Inf
            among them raise one ``fastunet.NonFiniteInputWarning`` with their count. A numpy
            memmap is read one tile row at a time on the host path (below).
        tile_size: None: the whole image in one forward when it fits the memory budget,
            otherwise tiles of a size chosen to fit (at most 1024). An int or (height, width):
            sliding windows of that size, multiples of ``2**depth``; an image smaller than the
            tile is padded to it.
        overlap: fraction of a tile shared by neighbouring tiles, in [0, 1).
        blend: ``"gaussian"`` (MONAI's importance map, sigma 0.125 x tile), ``"constant"``
            (plain mean) or ``"center"`` (each pixel from the tile where it is most central).
        batch_size: tiles (or whole images) per forward; with ``tta`` each forward holds
            ``batch_size x`` 4 or 8 variants.
        tta: None, ``"flips"`` (identity, horizontal, vertical, both) or ``"flips8"`` (those
            and the same four of the transposed tile: the 8 symmetries of the square). The
            variants of a batch go through the model in one forward and are un-flipped and
            averaged. Non-square tiles work with ``"flips8"``: their transposed variants have
            the other shape, so they take a second forward.
        pad_mode: how the image is padded to a multiple of ``2**depth`` or to the tile:
            ``"reflect"`` (the border pixel not repeated; wider than the image it keeps
            reflecting, as ``numpy.pad`` does, and a 1-pixel axis, which has nothing to reflect,
            is replicated), ``"replicate"`` or ``"constant"`` (zeros). Padding is split half
            before, half after.
        dtype: autocast dtype (``torch.bfloat16`` or ``torch.float16``) for the forwards, or
            None / ``torch.float32`` for none. Accumulation is fp32 either way.
        device: where the model runs; must be where its parameters are (None: there).
            On CUDA the model runs its fused Triton path, on CPU the eager fallback.
        progress: show a tqdm bar over tiles.
        out: optional destination of the result's shape and layout (a numpy array, a
            ``numpy.memmap``, or a tensor, for an input of either family), floating point;
            returned.
        max_device_bytes: memory predict may allocate on the device (None: 80 % of free CUDA
            memory, or half the available RAM on CPU). When the padded image and its
            accumulator exceed it, tiles run one row at a time and the output accumulates on
            the host (or in ``out``).

    Returns:
        The model's output ``[.., K, H, W]`` in the input's layout and family: a tensor on the
        input's device for a tensor (``[K, H, W]`` for ``[C, H, W]``), a numpy array for an
        array (``[H, W, K]`` for HWC, ``[K, H, W]`` for CHW, ``[H, W]`` for a 2-D image when
        K = 1), float32 (float64 for a float64 model), or ``out``.

    Raises:
        ValueError: before any work, for a wrong channel count or array rank, an integer
            dtype wider than 16 bits, a tile that is not a positive multiple of ``2**depth``,
            ``overlap`` outside [0, 1), an unknown ``blend``/``tta``/``pad_mode``,
            ``batch_size < 1``, an ``out`` of the wrong shape, or ``device`` other than the
            model's.

    The model runs in eval mode under ``torch.inference_mode``; the mode of each of its
    modules is restored afterwards. NaN in the input propagates to the outputs it reaches
    (with a warning, above).
    """
    depth, in_ch, out_ch = _check_model(model)
    _check_options(overlap, blend, batch_size, tta, pad_mode, dtype, max_device_bytes, progress)
    overlap, batch_size = float(overlap), int(batch_size)  # numpy scalars welcome
    multiple = 2**depth
    tile = _check_tile(tile_size, multiple)
    img = _as_image(image, in_ch)
    run_device, param_dtype = _model_device(model, device, img)
    _warn_non_finite(img)
    acc = torch.float64 if param_dtype == torch.float64 else torch.float32
    if out is not None and out_ch is not None:
        _check_out(out, img.result_shape(out_ch))
    budget = max_device_bytes if max_device_bytes is not None else _default_budget(run_device)
    k_guess = out_ch or 1
    variants = len(_variants(tta))
    elem = 2 if dtype in (torch.bfloat16, torch.float16) else param_dtype.itemsize

    def fits(ax_h: _Axis, ax_w: _Axis) -> bool:
        area = ax_h.padded * ax_w.padded
        whole = 4 * area * (img.n * (img.c + k_guess) + 1) + 4 * img.n * k_guess * img.h * img.w
        batch = min(batch_size, img.n * len(ax_h.starts) * len(ax_w.starts))
        fwd = _forward_bytes(model, ax_h.tile * ax_w.tile, batch, variants, img.c, k_guess, elem)
        return whole + fwd <= budget

    if tile is None:
        ax_h, ax_w = _Axis.whole(img.h, multiple), _Axis.whole(img.w, multiple)
        if not fits(ax_h, ax_w):
            auto = _auto_tile(model, budget, batch_size, variants, img.c, k_guess, elem, multiple)
            th = min(auto, ax_h.padded)
            tw = min(auto, ax_w.padded)
            ax_h, ax_w = _Axis.tiled(img.h, th, overlap), _Axis.tiled(img.w, tw, overlap)
    else:
        ax_h, ax_w = _Axis.tiled(img.h, tile[0], overlap), _Axis.tiled(img.w, tile[1], overlap)

    states = [(m, m.training) for m in model.modules()]
    model.eval()
    runner = _Runner(model, run_device, dtype, tta, acc)
    n_tiles = img.n * len(ax_h.starts) * len(ax_w.starts)
    bar = _progress(progress, n_tiles)
    try:
        with torch.no_grad():
            if fits(ax_h, ax_w):
                result = _run_on_device(img, ax_h, ax_w, runner, blend, pad_mode, batch_size, param_dtype, bar, out)
            else:
                result = _run_by_rows(img, ax_h, ax_w, runner, blend, pad_mode, batch_size, param_dtype, bar, out)
    finally:
        for m, training in states:
            m.training = training
        if bar is not None:
            bar.close()
    return result


def _auto_tile(model, budget: int, batch: int, variants: int, c: int, k: int, elem: int, multiple: int) -> int:
    """The largest tile (a multiple of ``multiple``, at most 1024) whose batch of forwards
    takes at most half the budget."""
    per_px = _forward_bytes(model, 1, batch, variants, c, k, elem)
    side = int(math.sqrt(max(budget // 2, 1) / per_px))
    return max(multiple, min(AUTO_TILE_MAX, side) // multiple * multiple)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # leave=None: the bar stays when it is the only one, and goes when it is nested under the
    # caller's (the CLI's bar over images).
    return tqdm(total=total, desc="tiles", unit="tile", leave=None, dynamic_ncols=True)


def _pad_columns(x: Tensor, cols: Tensor | None, valid_cols: Tensor | None) -> Tensor:
    if cols is not None:
        x = x.index_select(3, cols)
    if valid_cols is not None:
        x = x.masked_fill_(~valid_cols, 0)
    return x


def _index(axis: _Axis, pad_mode: str, device: torch.device) -> tuple[np.ndarray, Tensor | None, Tensor | None]:
    """Source positions (numpy), the same as a device tensor (None when no padding: a plain
    slice will do) and the constant-padding mask (None unless needed)."""
    idx, valid = _source_index(axis, pad_mode)
    identity = axis.padded == axis.length
    idx_t = None if identity else torch.from_numpy(idx).to(device)
    valid_t = None if valid is None or valid.all() else torch.from_numpy(valid).to(device)
    return idx, idx_t, valid_t


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run_on_device(img, ax_h, ax_w, runner, blend, pad_mode, batch_size, in_dtype, bar, out):
    """The padded image and one fp32 accumulator ``[N, K, Hp, Wp]`` on the device; windows
    in MONAI's order (image, then row, then column), ``batch_size`` per forward."""
    device = runner.device
    rows, rows_t, valid_r = _index(ax_h, pad_mode, device)
    _, cols_t, valid_c = _index(ax_w, pad_mode, device)
    x = img.rows(slice(None), in_dtype).to(device)
    if rows_t is not None:
        x = x.index_select(2, rows_t)
    if valid_r is not None:
        x = x.masked_fill_(~valid_r[:, None], 0)
    x = _pad_columns(x, cols_t, valid_c)
    th, tw = ax_h.tile, ax_w.tile
    single = len(ax_h.starts) == len(ax_w.starts) == 1

    if single:  # the whole (padded) image is the tile: no weights, no accumulator
        parts = []
        for n0 in range(0, img.n, batch_size):
            y = runner(x[n0 : n0 + batch_size])
            parts.append(y[:, :, ax_h.crop, ax_w.crop])
            if bar is not None:
                bar.update(y.shape[0])
        result = parts[0] if len(parts) == 1 else torch.cat(parts)
        return _finish(img, result, out)

    windows = [(n, sy, sx) for n in range(img.n) for sy in ax_h.starts for sx in ax_w.starts]
    center = blend == "center"
    own_h = dict(zip(ax_h.starts, ax_h.owned, strict=True))
    own_w = dict(zip(ax_w.starts, ax_w.owned, strict=True))
    if not center:
        weights = importance_map((th, tw), blend).to(device=device, dtype=runner.acc)
        wsum = torch.zeros(ax_h.padded, ax_w.padded, dtype=runner.acc, device=device)
        for sy in ax_h.starts:
            for sx in ax_w.starts:
                wsum[sy : sy + th, sx : sx + tw] += weights
    acc = None
    for batch in _batches(windows, batch_size):
        tiles = torch.stack([x[n, :, sy : sy + th, sx : sx + tw] for n, sy, sx in batch])
        y = runner(tiles)
        if acc is None:
            if out is not None:
                _check_out(out, img.result_shape(y.shape[1]))
            # The center blend writes every padded pixel exactly once: nothing to zero.
            new = y.new_empty if center else y.new_zeros
            acc = new(img.n, y.shape[1], ax_h.padded, ax_w.padded)
        for i, (n, sy, sx) in enumerate(batch):
            if center:
                (a, b), (c, d) = own_h[sy], own_w[sx]
                acc[n, :, a:b, c:d] = y[i, :, a - sy : b - sy, c - sx : d - sx]
            else:
                acc[n, :, sy : sy + th, sx : sx + tw].addcmul_(y[i], weights)
        if bar is not None:
            bar.update(len(batch))
    result = acc[:, :, ax_h.crop, ax_w.crop]
    if not center:
        result = result.div_(wsum[ax_h.crop, ax_w.crop])
    return _finish(img, result, out)


def _finish(img: _Image, result: Tensor, out: object):
    """``result`` ``[N, K, H, W]`` (on the device) into the caller's layout and family."""
    k = result.shape[1]
    if out is not None:
        _check_out(out, img.result_shape(k))
    if out is None and not img.is_numpy:
        if result.is_inference():  # the model's own output: a copy the caller may modify
            result = result.clone()
        result = result.to(img.device)
        return result[0] if img.layout == "CHW" else result
    sink = _Output(img, k, result.dtype, out)
    for n in range(img.n):
        sink.write(n, 0, result[n])
    return sink.out


def _run_by_rows(img, ax_h, ax_w, runner, blend, pad_mode, batch_size, in_dtype, bar, out):
    """One row of tiles at a time, one image at a time: read the band of rows the tile row
    covers, run its tiles, write the rows no later tile row touches to the output, and carry
    the rest (numerator and weight sum) to the next tile row."""
    device = runner.device
    rows, valid_rows = _source_index(ax_h, pad_mode)
    _, cols_t, valid_c = _index(ax_w, pad_mode, device)
    th, tw = ax_h.tile, ax_w.tile
    center = blend == "center" or (len(ax_h.starts) == len(ax_w.starts) == 1)
    if not center:
        weights = importance_map((th, tw), blend).to(device=device, dtype=runner.acc)
        colsum = torch.zeros(th, ax_w.padded, dtype=runner.acc, device=device)
        for sx in ax_w.starts:
            colsum[:, sx : sx + tw] += weights
    own_w = dict(zip(ax_w.starts, ax_w.owned, strict=True))
    top, bottom = ax_h.before, ax_h.before + ax_h.length
    sink = None
    for n in range(img.n):
        num = den = None
        for r, sy in enumerate(ax_h.starts):
            band = img.rows(rows[sy : sy + th], in_dtype, slice(n, n + 1)).to(device)
            if valid_rows is not None and not valid_rows[sy : sy + th].all():
                mask = torch.from_numpy(valid_rows[sy : sy + th]).to(device)
                band = band.masked_fill_(~mask[:, None], 0)
            band = _pad_columns(band, cols_t, valid_c)
            for cols in _batches(ax_w.starts, batch_size):
                y = runner(torch.cat([band[:, :, :, sx : sx + tw] for sx in cols]))
                if sink is None:
                    sink = _Output(img, y.shape[1], runner.acc, out)
                    if out is not None:
                        _check_out(out, img.result_shape(y.shape[1]))
                if num is None:
                    num = y.new_zeros(1, y.shape[1], th, ax_w.padded)
                    den = torch.zeros_like(colsum) if not center else None
                for i, sx in enumerate(cols):
                    if center:
                        c, d = own_w[sx]
                        num[0, :, :, c:d] = y[i, :, :, c - sx : d - sx]
                    else:
                        num[0, :, :, sx : sx + tw].addcmul_(y[i], weights)
                if bar is not None:
                    bar.update(len(cols))
            if center:
                a, b = ax_h.owned[r]
            else:
                den += colsum
                a, b = sy, ax_h.starts[r + 1] if r + 1 < len(ax_h.starts) else sy + th
            # The finished rows [a, b) of the padded image, less the padding.
            lo, hi = max(a, top), min(b, bottom)
            if lo < hi:
                piece = num[0, :, lo - sy : hi - sy, ax_w.crop]
                if not center:
                    piece = piece / den[lo - sy : hi - sy, ax_w.crop]
                sink.write(n, lo - top, piece)
            if not center and r + 1 < len(ax_h.starts):
                shift = b - sy  # the next tile row starts here: slide the carry up
                num = torch.cat([num[:, :, shift:], num.new_zeros(1, num.shape[1], shift, ax_w.padded)], dim=2)
                den = torch.cat([den[shift:], den.new_zeros(shift, ax_w.padded)])
    return _finish_sink(img, sink)


def _finish_sink(img: _Image, sink: _Output):
    out = sink.out
    if isinstance(out, Tensor) and not img.is_numpy and out.device != img.device:
        return out.to(img.device)
    return out
