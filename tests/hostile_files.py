"""Small files that claim large or odd things, for tests/test_hostile_inputs.py and the fuzz tests:
PNGs written byte by byte (any header, any filter per row, Adam7), a deflate TIFF whose header
says 60000x60000, and a tiny U-Net checkpoint."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_from_header(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, interlace: int = 0) -> bytes:
    """A PNG with this header and this (compressed) image data, whatever they say."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _filter_rows(image: np.ndarray, bpp: int, rng: np.random.Generator) -> bytes:
    """``image`` ``[rows, cols, C]`` (uint8 or big-endian-written uint16) as PNG scanlines, each
    with a random filter type 0-4 (the encoder side of the five filters)."""
    rows = image.shape[0]
    raw = image.astype(">u2" if image.dtype == np.uint16 else np.uint8).view(np.uint8).reshape(rows, -1)
    raw = raw.astype(np.int32)
    out, prev = [], np.zeros(raw.shape[1], np.int32)
    for r in range(rows):
        kind, line = int(rng.integers(0, 5)), raw[r]
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if kind == 0:
            f = line
        elif kind == 1:
            f = line - left
        elif kind == 2:
            f = line - prev
        elif kind == 3:
            f = line - ((left + prev) >> 1)
        else:
            p = left + prev - upper_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upper_left)
            f = line - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upper_left))
        out.append(bytes([kind]) + (f & 255).astype(np.uint8).tobytes())
        prev = line
    return b"".join(out)


def png_bytes(image: np.ndarray, *, interlace: bool = False, seed: int = 0) -> bytes:
    """``image`` ``[H, W]`` or ``[H, W, C]`` (C 1-4; uint8 or uint16) as a PNG, every row with a
    random filter, optionally Adam7-interlaced: what Pillow cannot write for 16-bit colour."""
    a = image if image.ndim == 3 else image[..., None]
    h, w, c = a.shape
    bpp = c * a.dtype.itemsize
    rng = np.random.default_rng(seed)
    if interlace:
        parts = [a[y0::dy, x0::dx] for y0, x0, dy, dx in ADAM7]
        data = b"".join(_filter_rows(p, bpp, rng) for p in parts if p.size)
    else:
        data = _filter_rows(a, bpp, rng)
    return png_from_header(w, h, 8 * a.dtype.itemsize, COLOR_TYPES[c], zlib.compress(data), int(interlace))


def deflate_tiff_bomb(path: Path, side: int = 60000) -> None:
    """A one-strip deflate TIFF, ``side`` x ``side`` uint8 grey, of a few hundred KB (only its
    first rows are stored: a decoder sizes its output from the header)."""
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(bytes(side)) for _ in range(min(side, 64))) + comp.flush()
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, side), (279, 4, len(data))]  # fmt: skip
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + data)


def tiny_unet(seed: int = 0, **kwargs):
    """A trained-looking ``UNet(3, 1, base_channels=4, depth=2)`` (BatchNorm statistics from a
    batch), in eval mode."""
    import torch

    import fastunet

    torch.manual_seed(seed)
    model = fastunet.UNet(kwargs.pop("in_ch", 3), kwargs.pop("out_ch", 1), base_channels=4, depth=2, **kwargs)
    with torch.no_grad():
        model.train()(torch.randn(2, model.in_ch, 16, 16))
    return model.eval()
