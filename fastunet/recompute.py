"""Opt-in recompute (``UNet(..., recompute=True)``): less activation memory for one more conv per block.

The training form (``fastunet.fused``) already keeps only raw conv outputs ``z`` for backward (the
BatchNorm+ReLU outputs never exist), about half of what the reference saves. What is left is, per
``DoubleConv``, its input, its middle ``z1`` and its output ``z2``. With ``recompute=True`` the
middle one is not kept: the tape (``fastunet.ops.tape``) saves, instead of ``z1``, the inputs of
the op that produced it (the block's first conv: its sources, their norm transforms, weight and
bias, all saved anyway or parameters), and the backward reruns that op once, just before the
first backward formula that reads ``z1`` (the second conv's), then drops it after the last (the
first conv's own). Cost: one forward of each block's first conv per step
(``benchmarks/activation_memory.py`` counts it; about 1.17x the training FLOPs of the classic
model). What is NOT recomputed:

* the batch statistics: the first conv's backward uses the mean its forward saved, the second
  conv the scale/shift derived from the forward's statistics (the rerun's own statistics are
  discarded), and the running statistics are updated once, in the forward;
* dropout: an ``nn.Dropout`` sits after a block's second conv, outside what is rerun, so its mask
  is the forward's (the second conv reads ``z1``, never a dropped-out tensor);
* anything under a dispatcher (``torch.compile``, a dispatch mode, the profiler, functorch), where
  each op is its own autograd node and saves what it saves (the compiler partitions recompute
  itself): recompute applies to the one-node tape of plain eager training only, and is a no-op on
  the eager fallback (the module tree) and in inference.

The rerun is the same implementation on the same inputs, so ``z1`` comes back bit for bit on the
eager composites and the deterministic Triton kernels, and the gradients are the default mode's.

This module reads the tape's records (``(backward, ctx, args, outs)`` before ``finish``), its
``saved`` list and each context's ``_span``: the hook in ``fastunet.fused`` calls ``Deferred.note``
for each block's first conv output and ``Deferred.apply`` at the end of the forward, before the
tape pins its outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import OPS
from .ops.tape import Tape
from .plan import DoubleConv, Plan

__all__ = ["Deferred", "check_recompute", "deferred_for", "recomputed_convs"]

_FIRSTS: dict[tuple, frozenset] = {}


def check_recompute(value: object) -> bool:
    """``value`` if it is a bool, else ``ValueError`` (the constructor's and the attribute's check)."""
    if not isinstance(value, bool):
        raise ValueError(f"recompute must be True or False, got {value!r}")
    return value


def recomputed_convs(plan: Plan) -> frozenset:
    """The ``Conv.index`` of every conv whose output recompute drops: each ``DoubleConv``'s first."""
    firsts = _FIRSTS.get(plan.key)
    if firsts is None:
        firsts = _FIRSTS[plan.key] = frozenset(s.first.index for s in plan.steps if type(s) is DoubleConv)
    return firsts


def deferred_for(ops, model, plan: Plan) -> Deferred | None:
    """A ``Deferred`` for a training forward on ``ops`` when ``model.recompute`` is on and ``ops`` is
    a tape, else None (the default saves; see the module docstring for where recompute applies)."""
    if not getattr(model, "recompute", False) or not isinstance(ops, Tape):
        return None
    return Deferred(ops, recomputed_convs(plan))


class _Dropped:
    """Stands in the tape's records for a tensor it no longer holds (gradients are keyed by its id)."""

    __slots__ = ()


class Deferred:
    """The tensors of one taped forward that backward recomputes instead of keeping.

    ``convs``: the conv indices whose outputs are dropped (``recomputed_convs``). ``note(index, z)``
    during the forward, ``apply()`` after it (before ``Tape.finish``)."""

    def __init__(self, tape: Tape, convs: frozenset):
        self.tape, self.convs = tape, convs
        self._noted: list[tuple[int, Tensor]] = []
        self._recipes: dict[int, tuple] = {}  # key -> (op impl, args with saved positions)
        self._where: dict[int, int] = {}  # position in tape.saved -> key
        self._cache: dict[int, Tensor] = {}  # key -> the recomputed tensor while readers remain
        self._readers: dict[int, int] = {}  # key -> backward formulas still to read it

    def note(self, index: int, z: Tensor) -> None:
        """Conv ``index`` just wrote ``z`` (its op is the tape's last record): dropped if listed."""
        records = self.tape.records
        if index in self.convs and records and records[-1][3][0] is z:
            self._noted.append((len(records) - 1, z))

    def apply(self) -> None:
        """Replace every noted tensor on the tape by what recomputes it (see the module docstring)."""
        tape, noted = self.tape, self._noted
        if not noted:
            return
        by_backward = {op.backward: op for op in OPS.values() if op.backward is not None}
        saved = tape.saved
        stand_ins = {}
        for key, (at, z) in enumerate(noted):
            backward, _, args, _ = tape.records[at]
            recipe = []
            for a in args:  # the producer's tensor inputs go through save_for_backward too
                if isinstance(a, Tensor):
                    recipe.append((True, len(saved)))
                    saved.append(a)
                else:
                    recipe.append((False, a))
            self._recipes[key] = (by_backward[backward].impl, tuple(recipe))
            stand_ins[id(z)] = (key, _Dropped())
        for pos, t in enumerate(saved):
            hit = stand_ins.get(id(t)) if isinstance(t, Tensor) else None
            if hit is not None and t is noted[hit[0]][1]:
                saved[pos] = None
                self._where[pos] = hit[0]
        for _, recipe in self._recipes.values():  # a recipe reading a dropped tensor is a reader
            for is_tensor, v in recipe:
                if is_tensor and v in self._where:
                    self._readers[self._where[v]] = self._readers.get(self._where[v], 0) + 1

        def swap(v):
            hit = stand_ins.get(id(v)) if isinstance(v, Tensor) else None
            return hit[1] if hit is not None and v is noted[hit[0]][1] else v

        for i, (backward, ctx, args, outs) in enumerate(tape.records):
            start, stop = ctx._span
            keys = {self._where[p] for p in range(start, stop) if p in self._where}
            if keys:
                for key in keys:
                    self._readers[key] = self._readers.get(key, 0) + 1
                ctx = _Resolving(ctx, self, keys)
            tape.records[i] = (backward, ctx, tuple(map(swap, args)), tuple(map(swap, outs)))
        self._noted = []  # the tape no longer holds them; neither does this

    def resolve(self, start: int, stop: int, keys: set) -> tuple:
        """``tape.unpacked[start:stop]`` with the dropped tensors recomputed; one read of ``keys``."""
        unpacked, where = self.tape.unpacked, self._where
        out = tuple(self._get(where[p]) if p in where else unpacked[p] for p in range(start, stop))
        self._done(keys)
        return out

    def _get(self, key: int) -> Tensor:
        t = self._cache.get(key)
        if t is None:
            impl, recipe = self._recipes[key]
            args = []
            keys = set()
            for is_tensor, v in recipe:
                if is_tensor and v in self._where:
                    keys.add(self._where[v])
                    args.append(self._get(self._where[v]))
                else:
                    args.append(self.tape.unpacked[v] if is_tensor else v)
            with torch.no_grad():  # the same implementation as the forward: the same bits
                t = self._cache[key] = impl(*args)[0]
            self._done(keys)
        return t

    def _done(self, keys) -> None:
        for key in keys:
            left = self._readers.get(key, 1) - 1
            self._readers[key] = left
            if left <= 0:
                self._cache.pop(key, None)


class _Resolving:
    """A record's context whose ``saved_tensors`` hold recomputed tensors (everything else is the
    wrapped context's)."""

    def __init__(self, ctx, deferred: Deferred, keys: set):
        self._ctx, self._deferred, self._keys = ctx, deferred, keys

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    @property
    def saved_tensors(self) -> tuple:
        start, stop = self._ctx._span
        return self._deferred.resolve(start, stop, self._keys)
