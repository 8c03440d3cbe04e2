"""Image files for ``fastunet predict``: PNG/JPEG/BMP through Pillow (16-bit colour PNGs through
``fastunet._png``, which keeps all 16 bits), TIFF through tifffile (memory-mapped when the file
is stored uncompressed, so a large TIFF is read a band of rows at a time), masks written as PNG a
band of rows at a time, probabilities as ``.npy`` or float32 TIFF, both memory-mapped while
``predict`` fills them.

Sizes come from the file's header and are checked against the ``image_pixels`` limit
(``fastunet.limits``) before anything is decoded; a file that cannot be read raises
``ImageError`` with one line saying why.

Pillow and tifffile are optional (``pip install "fastunet[predict]"``); each is imported only
when a file needs it, and its absence is reported as ``MissingDependency`` with the install
command.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import _png
from .errors import FastUNetError, ImageError
from .limits import check_limit

__all__ = [
    "MissingDependency",
    "TIFF_SUFFIXES",
    "PILLOW_SUFFIXES",
    "required_modules",
    "read_image",
    "is_mapped",
    "open_probs",
    "mask_bands",
    "write_mask",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_INSTALL = 'pip install "fastunet[predict]"'
_ROWS_PER_CHUNK = 1024  # rows per pass when deriving masks from a (memory-mapped) result
# Pillow's decompression-bomb threshold is module state: it is swapped for ours while a file opens.
_PILLOW_LOCK = threading.Lock()


class MissingDependency(ImportError):
    """An optional package that reading or writing some file needs is not installed."""


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependency(
            f"reading PNG/JPEG/BMP images needs Pillow: {_INSTALL} (or pip install pillow)"
        ) from exc
    return Image


def _tifffile():
    try:
        import tifffile
    except ImportError as exc:
        raise MissingDependency(f"TIFF files need tifffile: {_INSTALL} (or pip install tifffile)") from exc
    return tifffile


def required_modules(inputs: list[Path], *, mask: bool, probs: str | None) -> None:
    """Raise ``MissingDependency`` now, before any work, if a file at hand will need a package
    that is missing (masks are written without either)."""
    if any(p.suffix.lower() not in TIFF_SUFFIXES for p in inputs):
        _pillow()
    if probs == "tiff" or any(p.suffix.lower() in TIFF_SUFFIXES for p in inputs):
        _tifffile()


def _reason(exc: BaseException, path: Path) -> str:
    """The first line of a decoder's message (its type when it has none), without the path
    (the message says it once, first)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.replace(f" {str(path)!r}", "").replace(str(path), "the file")


def read_image(path: Path, in_ch: int) -> np.ndarray:
    """The image at ``path`` as ``[H, W]`` or ``[H, W, C]`` (TIFF: also ``[C, H, W]``), in its
    stored dtype (uint8, uint16, float: ``predict`` scales the integers), with its channels
    matched to ``in_ch`` where that is unambiguous: grey repeated (a broadcast view, no copy),
    alpha dropped, colour to grey by luminance.

    An uncompressed TIFF comes back memory-mapped (read-only); anything else is decoded, after
    its header's size is checked against the ``image_pixels`` limit. Raises ``ImageError`` for a
    file that is not a readable image, ``LimitError`` for one over the limit, ``MissingDependency``
    when Pillow or tifffile is needed and missing.
    """
    path = Path(path)
    try:
        return _checked(path, _read(path, in_ch))
    except (FastUNetError, MissingDependency):
        raise
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to decode it") from None
    except Exception as exc:  # each decoder has its own error types for a corrupt file
        raise ImageError(f"{path}: cannot read it as an image: {_reason(exc, path)}") from None


def _read(path: Path, in_ch: int) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path, in_ch)
    with open(path, "rb") as f:
        is_png = f.read(8) == _png.SIGNATURE
    if is_png:
        header = _png.read_header(path)
        if header.bit_depth == 16 and header.color_type in (2, 4, 6):  # Pillow would keep 8 of the 16 bits
            size = f"{path}: {header.width}x{header.height} pixels"
            check_limit("image_pixels", header.width * header.height, size)
            return _fit_channels(_png.read_png16(path, header), in_ch, hwc=True)
    return _read_pillow(path, in_ch)


def _checked(path: Path, a: np.ndarray) -> np.ndarray:
    """``a`` if it is an image (2 or 3 axes, at least one pixel, numbers), else ``ImageError``:
    a damaged file can decode to anything."""
    if a.ndim not in (2, 3) or a.size == 0 or a.dtype.kind not in "buif":
        raise ImageError(f"{path}: decodes to an array of shape {a.shape} and dtype {a.dtype}, not an image")
    return a


def _read_tiff(path: Path, in_ch: int) -> np.ndarray:
    tifffile = _tifffile()
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageError(f"{path}: a TIFF file with no image in it")
        series = tif.series[0]
        if series.dataoffset is None:  # compressed or tiled: decoded whole
            samples = max(1, int(series.keyframe.samplesperpixel))
            pixels = int(np.prod(series.shape, dtype=np.int64)) // samples
            check_limit("image_pixels", pixels, f"{path}: {'x'.join(map(str, series.shape))} (compressed TIFF) pixels")
            return _fit_channels(series.asarray(), in_ch, hwc=False)
    # Uncompressed: rows come off the disk as predict needs them.
    return _fit_channels(tifffile.memmap(path, mode="r"), in_ch, hwc=False)


def _read_pillow(path: Path, in_ch: int) -> np.ndarray:
    Image = _pillow()
    with _PILLOW_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our limit, checked below from the header, replaces Pillow's
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with image:
        check_limit("image_pixels", image.width * image.height, f"{path}: {image.width}x{image.height} pixels")
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grey: keep the depth
            a = np.array(image)
            if image.mode == "I" and a.size and 0 <= a.min() and a.max() <= 65535:
                a = a.astype(np.uint16)
            return _fit_channels(a, in_ch, hwc=True)
        target = {1: "L", 3: "RGB", 4: "RGBA"}.get(in_ch)
        if target is not None and image.mode != target:
            image = image.convert(target)
        return np.array(image)


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what Pillow's convert("L") uses


def _fit_channels(a: np.ndarray, in_ch: int, *, hwc: bool) -> np.ndarray:
    """``a`` with its channels matched to ``in_ch`` where unambiguous. ``hwc``: the decoder
    returns ``[H, W]`` or ``[H, W, C]`` only (a TIFF may also be ``[C, H, W]``)."""
    if a.ndim == 3 and a.shape[-1] == 1 and (hwc or in_ch == 1):
        a = a[..., 0]
    if a.ndim == 2:
        # A view with a zero stride: a memory-mapped grey TIFF stays on the disk.
        return np.broadcast_to(a[..., None], (*a.shape, in_ch)) if in_ch > 1 else a
    c = a.shape[-1]
    if a.ndim != 3 or c == in_ch or not (hwc or a.shape[0] != in_ch):
        return a
    if c in (2, 4) and in_ch == c - 1:  # grey+alpha or RGBA: drop the alpha
        return a[..., :in_ch]
    if hwc and c == 2 and in_ch > 1:  # grey+alpha for a colour model: the grey, repeated
        return np.broadcast_to(a[..., :1], (*a.shape[:2], in_ch))
    if hwc and c in (3, 4) and in_ch == 1:  # colour for a grey model: luminance
        grey = a[..., :3].astype(np.float32) @ np.asarray(_LUMA, dtype=np.float32)
        return np.round(grey).astype(a.dtype) if a.dtype.kind in "ui" else grey.astype(a.dtype)
    if hwc and c == 3 and in_ch == 4:  # RGB for an RGBA model: opaque
        top = np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 1
        return np.concatenate([a, np.full((*a.shape[:2], 1), top, dtype=a.dtype)], axis=-1)
    return a


def is_mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is (a view of) a memory-mapped file: its data stays on the disk."""
    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return isinstance(a, mmap.mmap)


def open_probs(path: Path, shape: tuple[int, ...], fmt: str) -> np.memmap:
    """A new float32 file of ``shape`` (``[H, W]`` or ``[H, W, K]``) mapped for writing:
    ``.npy`` (``numpy.load`` reads it) or a TIFF (one page, K samples per pixel). Write it under
    a temporary name (``fastunet.atomic.atomic_path``) and rename it when filled."""
    if fmt == "npy":
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    return _tifffile().memmap(path, shape=shape, dtype=np.float32, photometric="minisblack")


def mask_bands(probs: np.ndarray, threshold: float) -> Iterator[np.ndarray]:
    """The ``[H, W]`` mask of ``probs`` (``[H, W]`` or ``[H, W, K]``) as bands of up to 1024
    rows: one channel ``probs >= threshold`` as 0/255 (uint8, visible as is); K channels the
    argmax class index (uint8, uint16 above 256 classes). A memory-mapped ``probs`` is read a band
    at a time, never whole."""
    w = probs.shape[1]
    k = 1 if probs.ndim == 2 else probs.shape[2]
    dtype = np.uint8 if k <= 256 else np.uint16
    for y in range(0, probs.shape[0], _ROWS_PER_CHUNK):
        band = np.asarray(probs[y : y + _ROWS_PER_CHUNK])
        if k == 1:
            yield np.where(band.reshape(band.shape[0], w) >= threshold, 255, 0).astype(dtype)
        else:
            yield band.argmax(axis=-1).astype(dtype)


def write_mask(path: Path, probs: np.ndarray, threshold: float) -> None:
    """Write the mask of ``probs`` (see ``mask_bands``) as a grey PNG at ``path``, a band of rows
    at a time (8-bit, 16-bit above 256 classes)."""
    k = 1 if probs.ndim == 2 else probs.shape[2]
    dtype = np.uint8 if k <= 256 else np.uint16
    _png.write_png(path, mask_bands(probs, threshold), probs.shape[1], probs.shape[0], dtype)
