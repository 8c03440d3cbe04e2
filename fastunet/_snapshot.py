"""When a cache of tensors derived from parameters and buffers (the fused inference weights, the CPU
fallback's folded weights) is still valid: the same tensor objects, each with the ``_version``
and storage it had when the cache was built. An in-place update bumps ``_version``; a ``.data``
swap or ``.to()`` changes the storage; ``load_state_dict`` or a reassigned parameter changes the
object. Shared so both caches invalidate under exactly the same rule.

One kind of edit changes none of these: an in-place update through ``.data``
(``p.data.mul_(a).add_(q.data, alpha=1 - a)``, the mean-teacher EMA; ``p.data.clamp_()``), because
``.data`` is a new tensor with a version counter of its own. For CPU tensors the cache therefore
also keeps a strided sample of every source's elements (``SAMPLES`` each, as live views, compared
bit for bit): an update that rewrites a whole tensor changes its sample. A partial ``.data`` edit
can miss the sample, and CUDA tensors are not sampled (reading them back would wait for the GPU on
every forward): after such edits call ``UNet.refresh()`` (docs/limits.md, "Prepared weights follow the parameters").
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, is_

import torch
from torch import Tensor

_version_of = attrgetter("_version")

#: elements sampled per CPU source tensor: each comparison costs ~2 us whatever its length, so
#: a few dozen elements make a whole-tensor rewrite that keeps them all bit-identical implausible
SAMPLES = 64

#: device types whose tensors are sampled (``benchmarks/host_overhead.py`` empties it: its
#: simulated GPU computes on CPU tensors, and a real GPU's are never sampled)
SAMPLED_DEVICES = ("cpu",)

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensors_state(tensors: Sequence[Tensor]) -> tuple[tuple, tuple]:
    """``(_version, data_ptr)`` of every tensor: what an in-place update or a ``.data`` swap changes.

    Raises ``RuntimeError`` for an inference tensor (it has no version counter)."""
    return tuple(map(_version_of, tensors)), tuple(map(Tensor.data_ptr, tensors))


def _sample_view(t: Tensor) -> Tensor | None:
    """A live 1-D view of up to ``SAMPLES`` of ``t``'s elements spread over its memory, as integers
    of the same width (so NaN compares equal to itself and -0.0 differs from 0.0); None when
    ``t`` is not laid out densely (then it is sampled by a copy at each check)."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if not dense or t.element_size() not in _INT_OF_SIZE or t.is_complex():
        return None
    n = t.numel()
    step = max(1, -(-n // SAMPLES))
    # A dense tensor's elements fill [storage_offset, storage_offset + numel) whatever its layout.
    flat = t.detach().as_strided((-(-n // step),), (step,), t.storage_offset())
    return flat.view(_INT_OF_SIZE[t.element_size()])


def _current_sample(t: Tensor, view: Tensor | None) -> Tensor:
    if view is not None:
        return view
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, -(-flat.numel() // SAMPLES))].clone()
    size = sample.element_size()  # compared as integers too, as the views are
    return sample.view(_INT_OF_SIZE[size]) if size in _INT_OF_SIZE and not sample.is_complex() else sample


def take_samples(sources: Sequence[Tensor]) -> tuple | None:
    """``(views, saved)`` for CPU ``sources``: the live sample views and a copy of their values now;
    None when a source is not on the CPU (nothing is sampled there: see the module docstring)."""
    if not all(t.device.type in SAMPLED_DEVICES for t in sources):
        return None
    views = tuple(map(_sample_view, sources))
    saved = tuple(_current_sample(t, v).clone() for t, v in zip(sources, views, strict=True))
    return views, saved


def samples_unchanged(sources: Sequence[Tensor], samples: tuple | None) -> bool:
    """Whether every sampled element of ``sources`` still holds the value ``take_samples`` saved."""
    if samples is None:
        return True
    views, saved = samples
    return all(map(torch.equal, map(_current_sample, sources, views), saved))


def is_current(plan, sources: Sequence[Tensor], versions: tuple, ptrs: tuple) -> bool:
    """Whether ``plan`` (with ``sources``, ``versions``, ``ptrs``, ``samples`` fields) was built from
    exactly these tensors in exactly this state."""
    return (
        plan.versions == versions
        and plan.ptrs == ptrs
        and all(map(is_, plan.sources, sources))
        and samples_unchanged(sources, plan.samples)
    )
