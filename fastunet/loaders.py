"""Weight files, one reader per format, each turning every way a file can be bad into one
``CheckpointError`` line that names the file.

* ``read_torch_file(path)``: what ``torch.save`` wrote, loaded with ``weights_only=True`` (no code
  from the file runs); a zip archive's decompressed size is checked against the ``file_bytes``
  limit first (``torch.load`` inflates deflated entries whole).
* ``unwrap_state_dict(obj, where)``: the state_dict inside the common wrappers
  (``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``), less the
  ``module.`` prefix ``nn.DataParallel`` adds.
* ``read_safetensors(path)``: a ``.safetensors`` file (a JSON header and raw tensors; the
  library checks every offset against the file).
* ``read_state_dict(path)``: by suffix, one of the above, checked to be a dict of tensors.
* ``check_zip_size(path)``: a zip archive's decompressed size against ``file_bytes``, from its
  directory (also used for ``.keras`` archives).
* ``sniff(path)``: which of these formats (or Keras') a file is, from its first bytes; the suffix
  only decides whose error a file of no known format gets.
* ``unwrap(obj, where)``: ``unwrap_state_dict`` that also says what it took off (for
  ``fastunet info``) and refuses a file holding several state_dicts.

None of them checks the values (``fastunet.checkpoint.check_state_dict``) or the architecture:
their callers do, against the model they build.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .limits import check_limit

__all__ = [
    "read_torch_file",
    "unwrap",
    "unwrap_state_dict",
    "read_safetensors",
    "read_state_dict",
    "check_zip_size",
    "sniff",
    "TORCH_SUFFIXES",
    "KERAS_SUFFIXES",
]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
#: Suffixes of the files torch.save writes (the suffix only picks whose error an unknown file gets).
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_zip_size(path: str | os.PathLike) -> None:
    """The decompressed size of a zip archive (``torch.save``'s format, a ``.keras`` file)
    against ``file_bytes``, from its directory, before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable archive: torch.load says what is wrong with it
    check_limit("file_bytes", total, f"{path}: decompressed size in bytes")


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """The object ``torch.save`` wrote to ``path``, loaded with ``weights_only=True``.

    Raises ``FileNotFoundError`` for a missing file, ``LimitError`` for an archive that would
    decompress beyond ``file_bytes``, and ``CheckpointError`` for everything else: an empty,
    truncated or corrupt file, not a PyTorch file, or one holding Python objects other than
    tensors and plain containers (a pickled ``nn.Module`` or a custom class: loading those
    would run code from the file, which fastunet never does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted save or download?)")
    with open(path, "rb") as f:
        head = f.read(4)
    zip_magic = head == b"PK\x03\x04"
    if not zip_magic and head[:1] != b"\x80":  # torch.save writes a zip archive, or (before 1.6) a pickle
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither the zip archive nor the pickle torch.save writes)"
        )
    if zip_magic and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is truncated: it starts as a PyTorch zip archive but its end (the archive's directory) is "
            "missing (an interrupted save or download?)"
        )
    check_zip_size(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found or "weights_only" in str(exc).lower():
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds Python objects other than tensors{what}, such as a whole pickled model: fastunet "
                "loads only tensors and never runs code from a file. Where it was made, save the weights alone: "
                "torch.save(model.state_dict(), path)"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to load it") from None
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError, ... for a damaged file
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: truncated or corrupt ({_first_line(exc)})"
        ) from None


def unwrap(obj: object, where: str) -> tuple[dict, list[str]]:
    """``(state_dict, notes)``: the state_dict in ``obj`` (``obj`` itself or the dict under one of
    the keys ``state_dict``, ``model``, ``model_state_dict``) with a ``module.`` prefix on every
    key removed, and one note per thing taken off. Raises ``CheckpointError`` unless that is a
    dict with string keys, or when ``obj`` holds several of those wrappers (which one is the
    model is not for fastunet to guess)."""
    notes = []
    if isinstance(obj, dict):
        wrapped = [key for key in _WRAPPER_KEYS if isinstance(obj.get(key), dict)]
        if len(wrapped) > 1:
            raise CheckpointError(
                f"{where} holds several state_dicts (under {', '.join(map(repr, wrapped))}): save the one to load "
                "alone, e.g. torch.save(checkpoint[" + repr(wrapped[0]) + "], path)"
            )
        if wrapped:
            others = [str(k) for k in obj if k != wrapped[0]]
            notes.append(f"the state_dict under {wrapped[0]!r}")
            if others:
                notes.append(f"also in the file, ignored: {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}")
            obj = obj[wrapped[0]]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"{where} does not hold a state_dict (a dict of tensors by name), but a {type(obj).__name__}"
        )
    # Saved from nn.DataParallel / DistributedDataParallel: the same keys under "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
        notes.append("the 'module.' prefix (DataParallel) removed")
    return obj, notes


def unwrap_state_dict(obj: object, where: str) -> dict:
    """The state_dict in ``obj``: ``unwrap(obj, where)`` without the notes."""
    return unwrap(obj, where)[0]


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the ``.safetensors`` file at ``path``, on ``device``. Raises
    ``FileNotFoundError`` or ``CheckpointError`` (a truncated, corrupt or non-safetensors file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # a dependency of the package: only a broken install lacks it
        raise ImportError(f"{path} is a safetensors file: pip install safetensors") from exc
    try:
        return load_file(str(path), device=str(torch.device(device)))
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to load it") from None
    except Exception as exc:  # safetensors raises its own error types for a corrupt or truncated file
        reason = _first_line(exc)
        raise CheckpointError(f"{path} cannot be read as safetensors: truncated or corrupt ({reason})") from None


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state_dict in the weights file at ``path``: a ``.safetensors`` file, or else what
    ``torch.save`` wrote (unwrapped, see ``unwrap_state_dict``). Raises ``CheckpointError``
    unless every value is a tensor."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, map_location)
    state = unwrap_state_dict(read_torch_file(path, map_location), str(path))
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor: not a state_dict")
    return state


def sniff(path: str | os.PathLike) -> str:
    """The format of the file at ``path``, from its first bytes: ``"safetensors"``,
    ``"torch"`` (what ``torch.save`` writes: a zip archive with ``data.pkl``, or a pickle),
    ``"keras-archive"`` (a Keras 3 ``.keras`` zip) or ``"hdf5"`` (a Keras ``.h5``). A file that
    starts like none of them is the format its suffix names (its reader then says what is wrong
    with it); with no such suffix, a ``CheckpointError`` saying what fastunet reads. Raises
    ``CheckpointError`` for an empty file."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted save or download?)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "keras-archive" if path.suffix == ".keras" else "torch"  # its reader says it is truncated
        if "model.weights.h5" in names:
            return "keras-archive"
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "torch"
        raise CheckpointError(
            f"{path} is a zip archive but neither a PyTorch checkpoint (torch.save's .../data.pkl) nor a Keras 3 "
            f".keras archive (model.weights.h5); it holds {names[:4]}"
        )
    if head[:1] == b"\x80":  # a pickle: torch.save before PyTorch 1.6 (or with _use_new_zipfile_serialization=False)
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in KERAS_SUFFIXES:
        return "keras-archive" if suffix == ".keras" else "hdf5"
    raise CheckpointError(
        f"{path} is not a checkpoint fastunet reads (it starts with {head[:8]!r}): fastunet reads a save_pretrained "
        "folder, a .safetensors or torch.save file of a U-Net state_dict (fastunet's keys or milesial's), and Keras "
        ".h5 / .weights.h5 / .keras files of zhixuhao's unet()"
    )
