"""When a cache of tensors derived from parameters and buffers (the fused inference weights, the CPU
fallback's folded weights) is still valid: the same tensor objects, each with the ``_version``
and storage it had when the cache was built. An in-place update bumps ``_version``; a ``.data``
swap or ``.to()`` changes the storage; ``load_state_dict`` or a reassigned parameter changes the
object. Shared so both caches invalidate under exactly the same rule."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, is_

from torch import Tensor

_version_of = attrgetter("_version")


def tensors_state(tensors: Sequence[Tensor]) -> tuple[tuple, tuple]:
    """``(_version, data_ptr)`` of every tensor: what an in-place update or a ``.data`` swap changes.

    Raises ``RuntimeError`` for an inference tensor (it has no version counter)."""
    return tuple(map(_version_of, tensors)), tuple(map(Tensor.data_ptr, tensors))


def is_current(plan, sources: Sequence[Tensor], versions: tuple, ptrs: tuple) -> bool:
    """Whether ``plan`` (with ``sources``, ``versions``, ``ptrs`` fields) was built from exactly
    these tensors in exactly this state."""
    return plan.versions == versions and plan.ptrs == ptrs and all(map(is_, plan.sources, sources))
