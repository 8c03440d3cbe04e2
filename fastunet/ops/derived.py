"""Tensors derived from a parameter (a packed or cast weight), made once per parameter version.

The training ops take the parameters as they are (autograd then saves the parameter, not a copy)
and cast and pack them inside: per step, one copy per 3x3 conv for the forward, one transposed
and flipped copy for its input gradient, one per up-conv. ``derived(t, key, make)`` returns
``make(t)`` made once and reused while ``t`` is the same tensor object with the same
``_version``, storage and device (the rule of ``fastunet._snapshot``: an in-place update such as
an optimizer step bumps ``_version``; a ``.data`` swap or a module's ``.to()`` changes the
storage), for the same ``key`` (what the caller derives: its kind and target dtype). The values
are bit-identical to making them afresh: ``make`` is the same function either way.

Not cached (made afresh, as before): a tensor that is not a plain tensor or parameter (a trace's
fake or functional tensor, a subclass), an inference tensor (no version counter), and anything
under a ``torch.compile`` trace, a ``TorchDispatchMode``, a functorch transform or a CUDA graph
capture: a captured graph must replay the derivation, since the parameter changes in place
between replays without anyone checking its version.

**Off by default** (``ENABLED``): an in-place update made through ``.data`` (``p.data.sub_(lr *
p.grad)``, the manual SGD of many tutorials, ``p.data.clamp_()``, ``p.data.normal_()``) changes
neither ``_version`` nor the storage, so a kept pack would silently run the old weights. Turn it on
(``fastunet.ops.derived.ENABLED = True``) only where every update goes through the parameter
itself (``torch.optim``, ``load_state_dict``, ``copy_`` under ``no_grad``): it then saves the
copies per step when the weights do not change between steps (gradient accumulation, frozen layers).

Each entry holds its tensor weakly (it goes when the parameter does) and the derived tensors
strongly: for a bf16 training model, about the parameters' own size again.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

__all__ = ["cache_size", "clear", "derived", "untracked"]

_PLAIN = (Tensor, nn.Parameter)

#: Whether ``derived`` keeps what it makes (see the module docstring for why it is off by default).
ENABLED = False


class _Entry:
    __slots__ = ("ref", "version", "ptr", "device", "made")

    def __init__(self, t: Tensor, ref):
        self.ref, self.version, self.ptr, self.device = ref, t._version, t.data_ptr(), t.device
        self.made: dict = {}


#: id(tensor) -> its entry (removed with the tensor by the weakref's callback).
_ENTRIES: dict[int, _Entry] = {}


def _cacheable(t: Tensor) -> bool:
    if not ENABLED or type(t) not in _PLAIN or t.is_inference():
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def derived(t: Tensor, key, make):
    """``make(t)`` (a tensor computed from ``t`` alone, never written to by its users), cached per
    ``(t, key)`` while ``t`` is unchanged when ``ENABLED`` (see the module docstring). ``key``: hashable, what
    ``make`` derives (e.g. ``("conv3x3", torch.bfloat16)``)."""
    if not _cacheable(t):
        return make(t)
    tid = id(t)
    entry = _ENTRIES.get(tid)
    if entry is None or entry.ref() is not t:
        entry = _ENTRIES[tid] = _Entry(t, weakref.ref(t, lambda _, tid=tid: _drop(tid)))
    elif entry.version != t._version or entry.ptr != t.data_ptr() or entry.device != t.device:
        entry.version, entry.ptr, entry.device = t._version, t.data_ptr(), t.device
        entry.made.clear()
    out = entry.made.get(key)
    if out is None:
        out = entry.made[key] = make(t)
    return out


def untracked(t: Tensor) -> Tensor:
    """``t`` for a ``make`` that copies it: detached only where autograd would record the copy
    (grad mode on and ``t`` requiring grad); otherwise ``t`` itself, which gives the same copy
    without the detach's torch op. Not for a ``make`` that may return ``t`` itself (a no-op
    ``.to``): ``derived`` would then keep the parameter alive."""
    return t.detach() if t.requires_grad and torch.is_grad_enabled() else t


def _drop(tid: int) -> None:
    entry = _ENTRIES.get(tid)
    if entry is not None and entry.ref() is None:
        del _ENTRIES[tid]


def cache_size() -> int:
    """How many derived tensors are held (for tests and memory accounting)."""
    return sum(len(e.made) for e in _ENTRIES.values())


def clear() -> None:
    """Forget every derived tensor (they are remade on next use)."""
    _ENTRIES.clear()
