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

__all__ = ["read_torch_file", "unwrap_state_dict", "read_safetensors", "read_state_dict", "check_zip_size"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
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


def unwrap_state_dict(obj: object, where: str) -> dict:
    """The state_dict in ``obj``: ``obj`` itself or the dict under one of the keys
    ``state_dict``, ``model``, ``model_state_dict``, with a ``module.`` prefix on every key
    removed. Raises ``CheckpointError`` unless that is a dict with string keys."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"{where} does not hold a state_dict (a dict of tensors by name), but a {type(obj).__name__}"
        )
    # Saved from nn.DataParallel / DistributedDataParallel: the same keys under "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


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
