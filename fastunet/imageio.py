"""Image files for ``fastunet predict``: PNG/JPEG/BMP through Pillow, TIFF through tifffile
(memory-mapped when the file is stored uncompressed, so a large TIFF is read a tile row at a
time), masks written as PNG, probabilities as ``.npy`` or float32 TIFF, both memory-mapped
while ``predict`` fills them.

Pillow and tifffile are optional (``pip install "fastunet[predict]"``); each is imported only
when a file needs it, and its absence is reported as ``MissingDependency`` with the install
command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "MissingDependency",
    "TIFF_SUFFIXES",
    "PILLOW_SUFFIXES",
    "required_modules",
    "read_image",
    "open_probs",
    "mask_from_probs",
    "write_mask",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_INSTALL = 'pip install "fastunet[predict]"'
_ROWS_PER_CHUNK = 1024  # rows per pass when deriving masks from a (memory-mapped) result


class MissingDependency(ImportError):
    """An optional package that reading or writing some file needs is not installed."""


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependency(
            f"reading PNG/JPEG and writing masks needs Pillow: {_INSTALL} (or pip install pillow)"
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
    that is missing."""
    if mask or any(p.suffix.lower() not in TIFF_SUFFIXES for p in inputs):
        _pillow()
    if probs == "tiff" or any(p.suffix.lower() in TIFF_SUFFIXES for p in inputs):
        _tifffile()


def read_image(path: Path, in_ch: int) -> np.ndarray:
    """The image at ``path`` as ``[H, W]`` or ``[H, W, C]`` (TIFF: also ``[C, H, W]``), in its
    stored dtype (uint8, uint16, float: ``predict`` scales the integers), with its channels
    matched to ``in_ch`` where that is unambiguous: gray repeated to RGB, alpha dropped
    (Pillow: ``convert("RGB")``/``convert("L")``)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        tifffile = _tifffile()
        try:
            a = tifffile.memmap(path, mode="r")  # uncompressed: rows come off the disk as needed
        except ValueError:  # compressed or tiled: decoded whole
            a = tifffile.imread(path)
        return _fit_channels(np.asarray(a) if not isinstance(a, np.memmap) else a, in_ch)
    image = _pillow().open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit gray: keep the depth
        a = np.asarray(image)
        if image.mode == "I" and a.size and 0 <= a.min() and a.max() <= 65535:
            a = a.astype(np.uint16)
        return _fit_channels(a, in_ch)
    if in_ch == 3 and image.mode != "RGB":
        image = image.convert("RGB")
    elif in_ch == 1 and image.mode != "L":
        image = image.convert("L")
    elif in_ch == 4 and image.mode != "RGBA":
        image = image.convert("RGBA")
    return np.asarray(image)


def _fit_channels(a: np.ndarray, in_ch: int) -> np.ndarray:
    if a.ndim == 2 and in_ch > 1:
        return np.repeat(a[..., None], in_ch, axis=-1)
    if a.ndim == 3 and in_ch == 3 and a.shape[-1] == 4 and a.shape[0] != 3:
        return a[..., :3]  # RGBA: drop the alpha
    if a.ndim == 3 and in_ch == 1 and a.shape[-1] == 1:
        return a[..., 0]
    return a


def open_probs(path: Path, shape: tuple[int, ...], fmt: str) -> np.memmap:
    """A new float32 file of ``shape`` (``[H, W]`` or ``[H, W, K]``) mapped for writing:
    ``.npy`` (``numpy.load`` reads it) or a TIFF (one page, K samples per pixel)."""
    if fmt == "npy":
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    return _tifffile().memmap(path, shape=shape, dtype=np.float32, photometric="minisblack")


def mask_from_probs(probs: np.ndarray, threshold: float) -> np.ndarray:
    """``[H, W]`` mask: one channel ``probs >= threshold`` as 0/255 (uint8, visible as is);
    K channels the argmax class index (uint8, uint16 above 256 classes). Computed a band of
    rows at a time, so a memory-mapped ``probs`` is never loaded whole."""
    h, w = probs.shape[:2]
    k = 1 if probs.ndim == 2 else probs.shape[2]
    mask = np.empty((h, w), dtype=np.uint8 if k <= 256 else np.uint16)
    for y in range(0, h, _ROWS_PER_CHUNK):
        band = np.asarray(probs[y : y + _ROWS_PER_CHUNK])
        if k == 1:
            band = band.reshape(band.shape[0], w)
            mask[y : y + _ROWS_PER_CHUNK] = np.where(band >= threshold, 255, 0)
        else:
            mask[y : y + _ROWS_PER_CHUNK] = band.argmax(axis=-1)
    return mask


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a ``[H, W]`` uint8/uint16 mask as a PNG."""
    _pillow().fromarray(mask).save(path)
