"""The training tape: a whole eager training forward as one autograd node (``Tape``,
``run_taped``), recording each op's own ``setup`` and ``backward`` (``fastunet.ops.op``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .op import DIRECT, DISPATCH, Op, direct_ok_mutation, on_declare

# =========================================================================== the tape
# A training forward through the ops makes one autograd node per op (about 45 for the
# classic model) and the dispatcher and torch.library's Python autograd wrapper cost tens of us
# per op on the host, forward and backward. In plain eager mode (``direct_ok_mutation``) the
# model instead runs its training forward inside ONE ``torch.autograd.Function``: every op runs
# its implementation directly and its ``setup_context`` records what it saves; the Function's
# backward replays the ops' own backward formulas in reverse, adding gradients where a tensor
# has several readers (a skip connection, a BatchNorm's scale). Same implementations, same
# formulas, so the same numbers; the tensors the ops save go through the Function's
# ``save_for_backward``, so ``saved_tensors_hooks`` (memory accounting, offloading) see them.
# Under torch.compile, a dispatch mode, functorch or the profiler the per-op path runs.


class _TapeCtx:
    """What an op's ``setup_context`` and backward formula see in place of autograd's ctx."""

    def __init__(self, tape: Tape, needs: tuple):
        self._tape = tape
        self._span = (0, 0)
        self.needs_input_grad = needs

    def save_for_backward(self, *tensors):
        start = len(self._tape.saved)
        self._tape.saved.extend(tensors)
        self._span = (start, len(self._tape.saved))

    @property
    def saved_tensors(self):
        start, stop = self._span
        return tuple(self._tape.unpacked[start:stop])


class Tape:
    """Records the training ops of one forward (see the comment above); ``run_taped`` replays it."""

    def __init__(self):
        self.records: list = []
        self.saved: list = []
        self.pinned: list = []
        self.unpacked: list | tuple = ()
        self._grad_ids: set[int] = set()

    def mark(self, tensors) -> None:
        """The leaves gradients flow to (the Function's inputs that require grad)."""
        self._grad_ids.update(id(t) for t in tensors if isinstance(t, Tensor) and t.requires_grad)

    def record(self, op: Op, *args):
        """Run ``op``'s implementation on ``args``; record its backward when an argument is on the
        tape (a leaf, or an output of a recorded op)."""
        out = op.impl(*args)
        needs = tuple(isinstance(a, Tensor) and id(a) in self._grad_ids for a in args)
        if any(needs):
            ctx = _TapeCtx(self, needs)
            op.setup(ctx, args, out)
            outs = out if isinstance(out, tuple) else (out,)
            self._grad_ids.update(id(o) for o in outs)
            self.records.append((op.backward, ctx, args, outs))
        return out

    def finish(self, output: Tensor) -> None:
        """After the forward: outputs are kept by id, and every one but ``output`` stays pinned
        (with the inputs) so that no id is reused while the tape lives; ``output`` is not held,
        since it holds the autograd node that holds this tape (a reference cycle)."""
        self.pinned = [o for *_, outs in self.records for o in outs if o is not output]
        self.records = [(b, ctx, args, tuple(map(id, outs))) for b, ctx, args, outs in self.records]

    def backward(self, out_id: int, grad: Tensor, leaf_ids: tuple) -> tuple:
        """Gradients of the leaves (ids; None for a leaf that needs none) from ``grad`` = dL/d of
        the output ``out_id``, through the records in reverse."""
        grads = {out_id: grad}
        for backward, ctx, args, out_ids in reversed(self.records):
            gouts = [grads.pop(i, None) for i in out_ids]
            if all(g is None for g in gouts):
                continue
            for g_in, a, need in zip(backward(ctx, *gouts), args, ctx.needs_input_grad, strict=False):
                if g_in is None or not need:  # only tensors on the tape (or leaves) get gradients
                    continue
                key = id(a)
                grads[key] = g_in if key not in grads else grads[key] + g_in
        return tuple(None if i is None else grads.get(i) for i in leaf_ids)


def _add_recorder(op: Op) -> None:
    """``Tape.<name>``: an op with a gradient is recorded; one without (a running-statistics
    update, a backward op) runs as it is."""
    if op.backward is None:
        setattr(Tape, op.name, staticmethod(op.impl))
        return

    def recorded(self, *args):
        return self.record(op, *args)

    recorded.__name__ = recorded.__qualname__ = op.name
    setattr(Tape, op.name, recorded)


on_declare(_add_recorder)


class _TapeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *leaves):
        tape = Tape()
        tape.mark(leaves)
        out = fn(tape)
        tape.finish(out)
        ctx.save_for_backward(*tape.saved)
        tape.saved = []  # autograd holds them now (through any saved-tensor hooks)
        ctx.tape, ctx.out_id = tape, id(out)
        ctx.leaf_ids = tuple(id(t) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves)
        return out

    @staticmethod
    def backward(ctx, grad):
        tape = ctx.tape
        tape.unpacked = ctx.saved_tensors
        grads = tape.backward(ctx.out_id, grad, ctx.leaf_ids)
        ctx.tape = None  # the activations go with it
        return (None, *grads)


def run_taped(fn, leaves: tuple) -> Tensor:
    """``fn(calls)``, a training forward written against the calls interface, run the way its
    input allows. ``leaves``: the input first, then every tensor gradients may flow to (the
    parameters). In plain eager mode with a leaf requiring grad: on a ``Tape``, one autograd node
    for all of it (see the comment above); with none (or grad mode off) on ``DIRECT``, nothing
    recorded; when something watches the dispatcher (``direct_ok_mutation`` fails for the input:
    a trace, a dispatch mode, functorch, the profiler) on ``DISPATCH``, one autograd node per op."""
    if not direct_ok_mutation(leaves[0]):
        return fn(DISPATCH)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in leaves):
        return fn(DIRECT)
    return _TapeFunction.apply(fn, *leaves)
