"""Upper bounds on sizes read from files, checked before anything is allocated.

A file says how big it is (an image header its pixels, a checkpoint its depth and widths, a zip
entry its decompressed size); a small hostile or broken file can claim sizes that would take all
memory. Each such size is compared with a limit here first, and a size over it raises
``LimitError`` naming the limit and how to raise it. Arrays and tensors handed to the API are
not limited: they exist already.

The limits (name: default):

* ``image_pixels``: 89_478_485 (Pillow's own warning threshold, a 256 MiB RGB image): pixels of an
  image file decoded into memory (PNG, JPEG, BMP, compressed or tiled TIFF). An uncompressed TIFF
  is memory-mapped instead, read a band of rows at a time, and has no pixel limit.
* ``depth``: 8: a U-Net's depth (poolings) read from a checkpoint or config.
* ``channels``: 32_768: the widest level of a U-Net read from a checkpoint or config
  (``base_channels * 2**depth``), and its input and output channels.
* ``file_bytes``: 4 GiB: bytes a weights file may decompress to (the entries of a ``.pt`` zip
  archive or of a ``.keras`` archive, the datasets read from a Keras HDF5 file).
* ``config_bytes``: 1 MiB: the size of a checkpoint's ``config.json``.

Raise one for a process with the environment variable ``FASTUNET_LIMITS`` (comma-separated
``name=value``, e.g. ``FASTUNET_LIMITS=image_pixels=400000000,depth=10``), or in Python with
``fastunet.set_limits(image_pixels=400_000_000)`` (which takes precedence over the variable).
"""

from __future__ import annotations

import os
import threading

from .errors import LimitError

__all__ = ["DEFAULT_LIMITS", "ENV_VAR", "get_limit", "set_limits", "check_limit", "check_architecture"]

ENV_VAR = "FASTUNET_LIMITS"
DEFAULT_LIMITS: dict[str, int] = {
    "image_pixels": 89_478_485,
    "depth": 8,
    "channels": 32_768,
    "file_bytes": 4 << 30,
    "config_bytes": 1 << 20,
}
_overrides: dict[str, int] = {}
_lock = threading.Lock()


def _parse_value(name: str, text: object, source: str) -> int:
    if name not in DEFAULT_LIMITS:
        raise ValueError(f"{source}: unknown limit {name!r}; the limits are {', '.join(DEFAULT_LIMITS)}")
    try:
        value = int(float(text)) if isinstance(text, str) else int(text)  # "4e8" reads as it looks
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{source}: limit {name} must be a positive integer, got {text!r}") from None
    if isinstance(text, bool) or value < 1:
        raise ValueError(f"{source}: limit {name} must be a positive integer, got {text!r}")
    return value


def _from_env() -> dict[str, int]:
    text = os.environ.get(ENV_VAR, "").strip()
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR}={text!r}: expected name=value pairs separated by commas, got {item!r}")
        values[name.strip()] = _parse_value(name.strip(), value.strip(), ENV_VAR)
    return values


def get_limit(name: str) -> int:
    """The limit ``name`` in force: ``set_limits``, else ``FASTUNET_LIMITS``, else the default."""
    if name not in DEFAULT_LIMITS:
        raise ValueError(f"unknown limit {name!r}; the limits are {', '.join(DEFAULT_LIMITS)}")
    with _lock:
        if name in _overrides:
            return _overrides[name]
    return _from_env().get(name, DEFAULT_LIMITS[name])


def set_limits(**limits: int | None) -> dict[str, int | None]:
    """Set limits for this process (``None`` removes an override); returns the overrides they
    replace, so ``set_limits(**previous)`` restores them. E.g. ``set_limits(image_pixels=4e8)``.
    Raises ``ValueError`` for an unknown name or a value that is not a positive integer."""
    parsed = {name: None if v is None else _parse_value(name, v, "set_limits") for name, v in limits.items()}
    with _lock:
        previous = {name: _overrides.get(name) for name in parsed}
        for name, value in parsed.items():
            if value is None:
                _overrides.pop(name, None)
            else:
                _overrides[name] = value
    return previous


def check_limit(name: str, value: int, what: str) -> None:
    """Raise ``LimitError`` if ``value`` (``what``: the thing measured, with its source, e.g.
    ``"scan.png: 20000x20000 pixels"``) is over the limit ``name``."""
    limit = get_limit(name)
    if value > limit:
        raise LimitError(
            f"{what} ({value:,}) is over the limit {name}={limit:,}; if the file is trusted, raise it: "
            f"{ENV_VAR}={name}={value} in the environment, or fastunet.set_limits({name}={value})"
        )


def check_architecture(where: str, *, in_ch: int, out_ch: int, base_channels: int, depth: int) -> None:
    """A U-Net's sizes read from a file (``where`` names it) against the ``depth`` and
    ``channels`` limits, before any model is built from them."""
    check_limit("depth", depth, f"{where}: depth")
    check_limit("channels", max(in_ch, out_ch), f"{where}: input/output channels")
    widest = base_channels << depth
    what = f"{where}: channels of the deepest level (base_channels {base_channels} * 2**{depth})"
    check_limit("channels", widest, what)
