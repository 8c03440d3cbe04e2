"""How much memory a forward pass keeps alive for its backward.

``saved_tensor_bytes`` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and adds
up the storages autograd saved, each storage once (a tensor saved by two ops, or saved as a
view, is one allocation). Parameters and the input are left out by default: they exist whether
or not a graph is built, so what remains is the activation memory a training step pays for.
Works on any device, CPU included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages saved for backward while ``fn()`` runs.

    ``fn`` is a zero-argument callable running the forward (e.g. ``lambda: model(x)``); its
    result is kept alive until the count is taken, then dropped. ``exclude``: tensors whose
    storages are not counted (typically ``model.parameters()`` and the input). Returns an int
    (bytes).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
