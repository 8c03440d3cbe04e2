"""Property-based fuzzing of the readers (Hypothesis): every file a user can hand fastunet, mutated
at random, either loads as what it says or raises the package's own error, never anything else
(no other exception type, no crash, no allocation beyond the limits, which are lowered here so
that a mutated size field is refused instead of tried).

Seeds are small valid files; a mutation flips, overwrites (with boundary integers too), inserts,
deletes or truncates bytes, and the PNG cases recompute the chunk CRCs afterwards so the mutation
reaches the decoder instead of stopping at the checksum. Deterministic (``derandomize``), no
example database written; the whole file runs in well under a minute (``FASTUNET_FUZZ_EXAMPLES``
runs a longer, randomly started hunt).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import png_bytes, png_from_header, tiny_unet

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("PIL")
tifffile = pytest.importorskip("tifffile")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

import fastunet  # noqa: E402
from fastunet import _png, imageio  # noqa: E402
from fastunet.errors import CheckpointError, ImageError, LimitError  # noqa: E402
from fastunet.loaders import read_state_dict  # noqa: E402

# FASTUNET_FUZZ_EXAMPLES=N: N examples per test, from a random start (a longer hunt than CI's).
_HUNT = int(os.environ.get("FASTUNET_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_HUNT or 120,
    deadline=None,
    derandomize=not _HUNT,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BOUNDARY = [0, 1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]


@pytest.fixture(autouse=True)
def small_limits():
    """Limits a mutated size field meets long before the machine's memory does."""
    previous = fastunet.set_limits(image_pixels=1 << 16, file_bytes=4 << 20, config_bytes=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoders warn about odd files; the errors are what is checked
        yield
    fastunet.set_limits(**previous)


@st.composite
def mutated(draw, seed: bytes, max_ops: int = 4) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "int", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "int" and len(data) >= 4:
            pos = min(pos, len(data) - 4)
            value = draw(st.sampled_from(BOUNDARY) | st.integers(0, 2**32 - 1))
            data[pos : pos + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC (as far as the chunk lengths hold together)."""
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        body = data[pos + 4 : end - 4]
        out += data[pos : pos + 4] + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        pos = end
    return bytes(out + data[pos:])


def check_image(path: Path, in_ch: int) -> None:
    """The property: an array of a sane shape and dtype, or ImageError / LimitError."""
    try:
        a = imageio.read_image(path, in_ch)
    except (ImageError, LimitError):
        return
    assert isinstance(a, np.ndarray) and a.ndim in (2, 3) and a.dtype.kind in "buif"
    assert a.size <= (1 << 16) * 4 or imageio.is_mapped(a)
    np.asarray(a[:1]).copy()  # the first rows can be read


def _seed_pngs() -> list[bytes]:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(buf, format="PNG")
    return [
        buf.getvalue(),
        png_bytes(rng.integers(0, 65536, (7, 10, 3), dtype=np.uint16), seed=1),
        png_bytes(rng.integers(0, 65536, (9, 6, 4), dtype=np.uint16), interlace=True, seed=2),
        png_bytes(rng.integers(0, 65536, (5, 5, 2), dtype=np.uint16), seed=3),
    ]


SEED_PNGS = _seed_pngs()


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SEED_PNGS) - 1), fix=st.booleans(), in_ch=st.sampled_from([1, 3]))
def test_fuzz_png(tmp_path, data, which, fix, in_ch):
    blob = data.draw(mutated(SEED_PNGS[which]))
    (tmp_path / "x.png").write_bytes(fix_png_crcs(blob) if fix else blob)
    check_image(tmp_path / "x.png", in_ch)


@FUZZ
@given(
    width=st.integers(0, 2**32 - 1) | st.integers(1, 40),
    height=st.integers(0, 2**32 - 1) | st.integers(1, 40),
    depth=st.sampled_from([1, 2, 4, 8, 16, 3, 32]),
    color=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
    interlace=st.integers(0, 2),
    raw=st.binary(max_size=2000),
    compress=st.booleans(),
)
def test_fuzz_png_headers(tmp_path, width, height, depth, color, interlace, raw, compress):
    idat = zlib.compress(raw) if compress else raw
    (tmp_path / "x.png").write_bytes(png_from_header(width, height, depth, color, idat, interlace))
    check_image(tmp_path / "x.png", 3)


def _seed_tiffs() -> list[bytes]:
    rng = np.random.default_rng(1)
    seeds = []
    for kwargs in ({}, {"compression": "zlib"}, {"tile": (16, 16)}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, rng.integers(0, 65536, (20, 17), dtype=np.uint16), **kwargs)
        seeds.append(buf.getvalue())
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.random((3, 8, 8), dtype=np.float32), photometric="rgb", planarconfig="separate")
    return [*seeds, buf.getvalue()]


SEED_TIFFS = _seed_tiffs()


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SEED_TIFFS) - 1), in_ch=st.sampled_from([1, 3]))
def test_fuzz_tiff(tmp_path, data, which, in_ch):
    (tmp_path / "x.tif").write_bytes(data.draw(mutated(SEED_TIFFS[which])))
    check_image(tmp_path / "x.tif", in_ch)


def _seed_others() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(2)
    out = []
    for fmt, suffix in (("JPEG", ".jpg"), ("BMP", ".bmp")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, format=fmt)
        out.append((suffix, buf.getvalue()))
    return out


SEED_OTHERS = _seed_others()


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SEED_OTHERS) - 1))
def test_fuzz_jpeg_and_bmp(tmp_path, data, which):
    suffix, seed = SEED_OTHERS[which]
    (tmp_path / f"x{suffix}").write_bytes(data.draw(mutated(seed)))
    check_image(tmp_path / f"x{suffix}", 3)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    channels=st.integers(1, 4),
    interlace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_16_bit_png_round_trip(shape, channels, interlace, seed):
    """Correctness, not just robustness: any 16-bit image, any filters, Adam7 or not, exactly."""
    image = np.random.default_rng(seed).integers(0, 65536, (*shape, channels), dtype=np.uint16)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "deep.png"
        path.write_bytes(png_bytes(image, interlace=interlace, seed=seed))
        np.testing.assert_array_equal(_png.read_png16(path, _png.read_header(path)), image)


def _seed_weights() -> list[tuple[str, bytes]]:
    from safetensors.torch import save

    state = {k: v for k, v in tiny_unet().state_dict().items() if k.startswith(("conv1.", "conv6."))}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    return [(".pt", zipped.getvalue()), (".pt", legacy.getvalue()), (".safetensors", save(state))]


SEED_WEIGHTS = _seed_weights()


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SEED_WEIGHTS) - 1))
def test_fuzz_weight_files(tmp_path, data, which):
    suffix, seed = SEED_WEIGHTS[which]
    path = tmp_path / f"w{suffix}"
    path.write_bytes(data.draw(mutated(seed, max_ops=3)))
    try:  # fastunet.load: the format from the content, then the architecture from the weights
        model = fastunet.load(path)
    except (CheckpointError, LimitError):
        pass
    else:
        assert isinstance(model, fastunet.UNet)
    try:
        state = read_state_dict(path)
    except (CheckpointError, LimitError):
        return
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "ck"
    tiny_unet().save_pretrained(path)
    return path


@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "format_version",
                "in_ch",
                "out_ch",
                "base_channels",
                "depth",
                "out_activation",
                "options",
                "dtype",
                "class",
            ]
        ),  # fmt: skip
        JSON | st.integers(-3, 70),
        max_size=3,
    ),
    drop=st.lists(st.sampled_from(["in_ch", "depth", "format_version"]), max_size=1),
)
def test_fuzz_config(tmp_path, checkpoint_dir, changes, drop):
    config = {**json.loads((checkpoint_dir / "config.json").read_text()), **changes}
    for key in drop:
        config.pop(key, None)
    ck = tmp_path / "ck"
    ck.mkdir(exist_ok=True)
    (ck / "config.json").write_text(json.dumps(config))
    (ck / "model.safetensors").write_bytes((checkpoint_dir / "model.safetensors").read_bytes())
    try:
        model = fastunet.UNet.from_pretrained(ck)
    except (CheckpointError, LimitError):
        return
    assert isinstance(model, fastunet.UNet)
