"""The tuning cache on disk: one JSON file per GPU model and triton/torch/fastunet versions,
shared by every process of this machine (``<cache dir>/tuning/<GPU name>/<versions>.json``).

File format (``FORMAT`` 1)::

    {"format": 1, "device": "<GPU name>", "versions": {...},
     "entries": {"<tuner>|<key>": {"config": "M128_N64_K64_w4_s4" | null,
                                   "ms": {"<config name>": float | null, ...},
                                   "tuning_s": float, "verify_s": float,
                                   "verified": bool, "rejected": {"<config name>": "<why>"},
                                   "eager": bool}}}

``config`` is null only in an ``eager`` record (no candidate passed verification: the op runs
its eager composite). Only ``config`` is required in a record; the rest is what tuning saw.

Reading validates the schema (``read``): a file that is not JSON, not an object of this format,
or larger than ``MAX_BYTES`` is ignored as a whole; a record of the wrong shape is ignored alone.
Either way one warning per file and process names the file, and the file is never modified:
a record we do not understand stays as it is (a write merges around it), and a file we cannot
read at all is never written over (``merge_write`` refuses and warns). Refusing, rather than
writing a fresh file beside it, because that file sits at our own cache path: it is most likely
a newer fastunet's format or a hand edit, and either is worth more than the seconds of tuning
it costs to keep it; the picks stay in this process's memory and the warning says how to let
fastunet write again (move or delete the file).

Writing (``merge_write``) is a read-modify-write under a lock on ``<file>.lock`` (``filelock``,
which torch installs; ``fcntl`` where it is missing), then an atomic replace: a process adds its
entries to whatever the others have written meanwhile, so concurrent processes tuning into one
cache keep every entry. The lock is advisory and released by the OS if the holder dies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..atomic import atomic_path

FORMAT = 1
# A cache holds a few hundred records of about 1 KB: anything far larger is not ours.
MAX_BYTES = 16 << 20
# How long a writer waits for another process's read-modify-write (milliseconds of work).
LOCK_TIMEOUT_S = 60.0
_CACHE_ENV = "FASTUNET_CACHE_DIR"

_WARNED: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    """``FASTUNET_CACHE_DIR``, else ``~/.cache/fastunet``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastunet"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def versions() -> dict[str, str]:
    """The versions a cache file is keyed by: triton, torch (without the local build tag), fastunet."""
    import triton

    try:
        from importlib.metadata import version

        fastunet_version = version("fastunet")
    except Exception:  # running from a checkout that is not installed
        fastunet_version = "dev"
    return {
        "triton": triton.__version__,
        "torch": torch.__version__.split("+")[0],
        "fastunet": fastunet_version,
    }


def cache_file(device_name: str) -> Path:
    """The tuning cache of one GPU model for the installed triton/torch/fastunet versions."""
    v = versions()
    name = f"triton-{v['triton']}_torch-{v['torch']}_fastunet-{v['fastunet']}.json"
    return cache_dir() / "tuning" / _slug(device_name) / name


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str_dict(d, value_ok) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and value_ok(v) for k, v in d.items())


def valid_record(record) -> bool:
    """Whether ``record`` has the shape of a cache entry (see the module docstring)."""
    if not isinstance(record, dict):
        return False
    eager = record.get("eager", False)
    config = record.get("config")
    if not isinstance(eager, bool) or (config is not None if eager else not isinstance(config, str)):
        return False
    ms = record.get("ms", {})
    if not _str_dict(ms, lambda v: v is None or _number(v)):
        return False
    if not _str_dict(record.get("rejected", {}), lambda v: isinstance(v, str)):
        return False
    if not isinstance(record.get("verified", False), bool):
        return False
    return all(_number(record[k]) for k in ("tuning_s", "verify_s") if k in record)


def _parse(path: Path) -> tuple[dict | None, str | None]:
    """``(document, None)`` for a readable file of this format, ``(None, None)`` when there is
    no file, ``(None, why)`` otherwise. Raises OSError when the file exists but cannot be read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, None
    if size > MAX_BYTES:
        return None, f"{size} bytes, more than a tuning cache can hold ({MAX_BYTES})"
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not UTF-8 or not JSON
        return None, f"not JSON ({exc})"
    if not isinstance(doc, dict):
        return None, f"a JSON {type(doc).__name__}, not an object"
    if doc.get("format") != FORMAT:
        return None, f"format {doc.get('format')!r}, expected {FORMAT}"
    if not isinstance(doc.get("entries"), dict):
        return None, "no 'entries' object"
    return doc, None


def _warn_once(path: Path, what: str, text: str) -> None:
    if (str(path), what) in _WARNED:
        return
    _WARNED.add((str(path), what))
    warnings.warn(f"fastunet: {text}", RuntimeWarning, stacklevel=4)


def _invalid_file(path: Path, why: str) -> None:
    _warn_once(
        path,
        "file",
        f"ignoring the tuning cache {path}: {why}. The file is left as it is and tuning results stay in "
        "this process's memory; move or delete it to let fastunet keep its tuning results again.",
    )


def _valid_entries(path: Path, doc: dict) -> dict[str, dict]:
    entries = doc["entries"]
    good = {k: r for k, r in entries.items() if valid_record(r)}
    if len(good) < len(entries):
        bad = sorted(set(entries) - set(good))
        _warn_once(
            path,
            "records",
            f"ignoring {len(bad)} malformed record(s) in the tuning cache {path} (first: {bad[0]!r}); "
            "they are left in the file as they are and those kernel shapes are tuned again.",
        )
    return good


def read(path: Path) -> dict[str, dict]:
    """The valid records of the cache file ``path`` (empty when there is none, or it cannot be
    read or validated: then one warning per file and process names it)."""
    try:
        doc, why = _parse(path)
    except OSError as exc:
        doc, why = None, f"unreadable ({exc})"
    if doc is None:
        if why is not None:
            _invalid_file(path, why)
        return {}
    return _valid_entries(path, doc)


# --------------------------------------------------------------------------------------------
# Locked merge-write
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``<path>.lock`` (blocks up to ``LOCK_TIMEOUT_S``;
    raises ``TimeoutError``, or OSError when the lock file cannot be created)."""
    lock_path = str(path) + ".lock"
    try:
        import filelock
    except ImportError:  # pragma: no cover - torch depends on filelock
        filelock = None
    if filelock is not None:
        try:
            with filelock.FileLock(lock_path, timeout=LOCK_TIMEOUT_S):
                yield
        except filelock.Timeout as exc:
            raise TimeoutError(f"another process holds {lock_path}") from exc
        return
    import fcntl  # pragma: no cover

    with open(lock_path, "a") as f:  # pragma: no cover
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_write(path: Path, device_name: str, new: dict[str, dict]) -> dict[str, dict] | None:
    """Add the records ``new`` to the cache file ``path`` under its lock: re-read the file,
    replace only the keys in ``new`` (every other record stays as written, malformed ones
    included), and write it whole (``fastunet.atomic``: the file is complete or as it was).
    Returns the file's valid records after the write, or None when nothing was written: the file
    exists but is not a cache of this format (left untouched, see the module docstring), or the
    write failed (read-only or full disk, lock timeout): one warning per file and process says
    which."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            doc, why = _parse(path)
            if why is not None:
                _invalid_file(path, why)
                return None
            if doc is None:
                doc = {"format": FORMAT, "entries": {}}
            doc["device"] = device_name
            doc["versions"] = versions()
            doc["entries"].update(new)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    except (OSError, TimeoutError) as exc:
        _warn_once(path, "write", f"could not write the tuning cache {path}: {exc}")
        return None
    return _valid_entries(path, doc)
