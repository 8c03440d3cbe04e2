"""Files written whole or not at all: every file fastunet writes goes to a temporary name in its
folder and is renamed over the final name (``os.replace``, atomic on POSIX and Windows) only once
complete, so an interrupted run (an exception, Ctrl-C, SIGKILL, a full disk) never leaves a
half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_files", "scratch_path", "PARTIAL_SUFFIX"]

#: The temporary files end in ``.partial`` + the final suffix (writers that go by the suffix
#: still see it); one left behind by a killed run can be deleted.
PARTIAL_SUFFIX = ".partial"


def _fsync(path: Path) -> None:
    # Data on the disk before the rename, so a crash cannot leave the new name on an empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary file next to ``final`` (``.NAME.<random>.partial.SUFFIX``) for the
    caller to write; on a normal exit it is flushed to disk and renamed to ``final`` (replacing
    a file there), on an exception it is removed and ``final`` is left as it was. The temporary
    file is created with the usual permissions (0o666 less the umask), not private ones."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}{final.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(final: str | os.PathLike) -> Iterator[Path]:
    """For a writer that may put companion files beside its output (ONNX's external weights,
    ``NAME.data``, named after the output): a path with ``final``'s name inside a new temporary
    folder next to it (``.NAME.<random>.partial``). On a normal exit every file the writer left
    in that folder is flushed and renamed into ``final``'s folder, the companions first and
    ``final`` itself last (the file that names the others appears only once they are all in
    place); on an exception nothing is moved. The folder is removed either way."""
    final = Path(final)
    folder = final.parent / f".{final.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    folder.mkdir()
    try:
        staged = folder / final.name
        yield staged
        written = sorted(p for p in folder.iterdir() if p != staged)
        if not staged.is_file():
            raise FileNotFoundError(f"the writer did not create {final.name}")
        for path in [*written, staged]:
            _fsync(path)
            os.replace(path, final.parent / path.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def scratch_path(folder: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """A new, empty temporary file in ``folder`` (``.fastunet-scratch.<random>.partial.SUFFIX``),
    removed on exit whatever happens: room on the disk for data too large for memory."""
    path = Path(folder) / f".fastunet-scratch.{secrets.token_hex(4)}{PARTIAL_SUFFIX}{suffix}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
