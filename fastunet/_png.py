"""PNG without Pillow's 8-bit ceiling: a reader for 16-bit-per-channel PNGs and a streaming writer
for masks.

Pillow opens a 16-bit RGB, RGBA or grey+alpha PNG as 8 bits per channel (it has no 48- or 64-bit
mode): the low byte of every sample is lost. ``read_png16`` decodes those files itself (zlib, the
five row filters, Adam7 interlacing) into ``uint16``. The filters are undone along anti-diagonals
of the pixel grid (each pixel depends only on its left, upper and upper-left neighbours, which lie
on the two previous anti-diagonals), so the work is ``H + W`` vectorised steps, not ``H * W``
Python ones.

``write_png`` writes a ``uint8``/``uint16`` grey image given as bands of rows, compressing as it
goes, so a mask of any size never has to be in memory whole.

Every size is checked against the file before it is used; a malformed file raises ``ImageError``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError

__all__ = ["PngHeader", "read_header", "read_png16", "write_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (3, palette, is never 16-bit)
# Adam7: (first row, first column, row step, column step) of each of the seven passes.
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
_MAX_DIM = 2**31 - 1  # the PNG specification's bound on width and height


@dataclass(frozen=True)
class PngHeader:
    """The IHDR chunk: size, bits per sample, colour type (0 grey, 2 RGB, 3 palette, 4 grey+alpha,
    6 RGBA), interlace method (0 none, 1 Adam7)."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int

    @property
    def channels(self) -> int:
        return _CHANNELS.get(self.color_type, 1)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def read_header(path: Path) -> PngHeader:
    """The header of the PNG at ``path`` (reads 33 bytes). Raises ``ImageError`` if it is not one."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != SIGNATURE or head[12:16] != b"IHDR" or head[8:12] != b"\0\0\0\r":
        raise ImageError(f"{path}: not a PNG file (no PNG signature and header)")
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if not (1 <= width <= _MAX_DIM and 1 <= height <= _MAX_DIM) or interlace not in (0, 1):
        raise ImageError(f"{path}: corrupt PNG header (size {width}x{height}, interlace {interlace})")
    return PngHeader(width, height, depth, ctype, interlace)


def _idat(path: Path, data: bytes) -> bytes:
    """The concatenated IDAT payloads, every chunk's length and CRC checked."""
    parts, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ImageError(f"{path}: truncated PNG (chunk {kind!r} runs past the end of the file)")
        body = data[pos + 8 : end - 4]
        if kind == b"IDAT":
            (crc,) = struct.unpack(">I", data[end - 4 : end])
            if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
                raise ImageError(f"{path}: corrupt PNG (an IDAT chunk fails its CRC)")
            parts.append(body)
        if kind == b"IEND":
            break
        pos = end
    if not parts:
        raise ImageError(f"{path}: truncated PNG (no image data)")
    return b"".join(parts)


def _passes(header: PngHeader) -> list[tuple[int, int, int, int, int, int]]:
    """``(y0, x0, dy, dx, rows, cols)`` of each non-empty sub-image stored in the file."""
    h, w = header.height, header.width
    if not header.interlace:
        return [(0, 0, 1, 1, h, w)]
    out = []
    for y0, x0, dy, dx in _ADAM7:
        rows, cols = -(-(h - y0) // dy), -(-(w - x0) // dx)
        if rows > 0 and cols > 0:
            out.append((y0, x0, dy, dx, rows, cols))
    return out


def _unfilter(path: Path, scanlines: np.ndarray, rows: int, cols: int, bpp: int) -> np.ndarray:
    """Undo the PNG row filters of ``rows`` scanlines (each a filter byte then ``cols * bpp``
    bytes): ``[rows, cols, bpp]`` uint8.

    Pixel (r, x) depends on (r, x-1), (r-1, x) and (r-1, x-1), so all pixels of one
    anti-diagonal d = r + x are computed together from the two previous ones. The diagonals are
    kept skewed, ``diag[d + 2, p + 1]`` for the pixel at position p along the shorter image axis,
    so the neighbours are contiguous slices (the extra leading entries are the zeros the filters
    read outside the image), and the store is at most about twice the image.
    """
    lines = scanlines.reshape(rows, 1 + cols * bpp)
    kinds = lines[:, 0]
    if kinds.size and kinds.max() > 4:
        raise ImageError(f"{path}: corrupt PNG (row filter type {int(kinds.max())}; the types are 0-4)")
    filtered = lines[:, 1:].reshape(rows, cols, bpp)
    if not kinds.any():
        return filtered.copy()
    used = set(np.unique(kinds).tolist())
    by_row = rows <= cols  # p is the row index (else the column index)
    n_p, n_q = (rows, cols) if by_row else (cols, rows)
    diag = np.zeros((rows + cols + 1, n_p + 1, bpp), dtype=np.uint8)
    for d in range(rows + cols - 1):
        p = np.arange(max(0, d - n_q + 1), min(n_p - 1, d) + 1)
        r, x = (p, d - p) if by_row else (d - p, p)
        same = diag[d + 1, p[0] + 1 : p[-1] + 2].astype(np.int16)  # diagonal d-1 at p
        before = diag[d + 1, p[0] : p[-1] + 1].astype(np.int16)  # diagonal d-1 at p-1
        c = diag[d, p[0] : p[-1] + 1].astype(np.int16)  # upper left: diagonal d-2 at p-1
        a, b = (same, before) if by_row else (before, same)  # left, up
        kind = kinds[r][:, None]
        predictor = np.where(kind == 1, a, np.where(kind == 2, b, 0))  # filter types 0 none, 1 sub, 2 up
        if 3 in used:  # average
            predictor = np.where(kind == 3, (a + b) >> 1, predictor)
        if 4 in used:  # Paeth: whichever of a, b, c is closest to a + b - c (ties: a, then b)
            pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
            paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
            predictor = np.where(kind == 4, paeth, predictor)
        diag[d + 2, p[0] + 1 : p[-1] + 2] = filtered[r, x] + predictor.astype(np.uint8)  # wraps mod 256
    out = np.empty((rows, cols, bpp), dtype=np.uint8)
    xs = np.arange(cols)
    for r in range(rows):
        out[r] = diag[r + xs + 2, (r if by_row else xs) + 1]
    return out


def read_png16(path: Path, header: PngHeader) -> np.ndarray:
    """The 16-bit PNG at ``path`` as ``uint16`` ``[H, W, C]`` (C: 1 grey, 2 grey+alpha, 3 RGB,
    4 RGBA), every bit kept. ``header``: ``read_header(path)``, already checked by the caller
    against the pixel limit. Raises ``ImageError`` for a malformed or truncated file."""
    if header.bit_depth != 16 or header.color_type not in _CHANNELS:
        raise ImageError(f"{path}: read_png16 reads 16-bit PNGs, this one has {header.bit_depth} bits per sample")
    channels = header.channels
    bpp = 2 * channels
    passes = _passes(header)
    expected = sum(rows * (1 + cols * bpp) for *_, rows, cols in passes)
    try:
        raw = zlib.decompressobj().decompress(_idat(path, path.read_bytes()), expected + 1)
    except zlib.error as e:
        raise ImageError(f"{path}: corrupt PNG image data ({e})") from None
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "corrupt"
        raise ImageError(f"{path}: {state} PNG: {len(raw):,} bytes of image data, the header needs {expected:,}")
    data = np.frombuffer(raw, dtype=np.uint8)
    image = np.empty((header.height, header.width, channels), dtype=np.uint16)
    offset = 0
    for y0, x0, dy, dx, rows, cols in passes:
        size = rows * (1 + cols * bpp)
        pixels = _unfilter(path, data[offset : offset + size], rows, cols, bpp)
        image[y0::dy, x0::dx] = pixels.view(">u2").reshape(rows, cols, channels)
        offset += size
    return image


def write_png(path: Path, bands: Iterable[np.ndarray], width: int, height: int, dtype: np.dtype) -> None:
    """Write a grey PNG (8-bit for ``uint8``, 16-bit for ``uint16``) of ``height`` rows of
    ``width`` pixels, given as consecutive bands of rows ``[r, width]``, compressing each band as
    it arrives. Raises ``ValueError`` if the bands do not add up to the image."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_png writes uint8 or uint16 images, got {dtype}")
    stored = np.dtype(">u2") if dtype == np.uint16 else dtype
    header = struct.pack(">IIBBBBB", width, height, 8 * dtype.itemsize, 0, 0, 0, 0)
    compressor = zlib.compressobj(6)
    written = 0
    with open(path, "wb") as f:
        f.write(SIGNATURE + _chunk(b"IHDR", header))
        for band in bands:
            if band.ndim != 2 or band.shape[1] != width:
                raise ValueError(f"write_png: a band of shape {band.shape} in an image {width} pixels wide")
            lines = np.zeros((band.shape[0], 1 + width * dtype.itemsize), dtype=np.uint8)  # filter 0: none
            lines[:, 1:] = band.astype(stored).view(np.uint8).reshape(band.shape[0], -1)
            written += band.shape[0]
            chunk = compressor.compress(lines.tobytes())
            if chunk:
                f.write(_chunk(b"IDAT", chunk))
        if written != height:
            raise ValueError(f"write_png: the bands hold {written} rows, the image has {height}")
        f.write(_chunk(b"IDAT", compressor.flush()) + _chunk(b"IEND", b""))
