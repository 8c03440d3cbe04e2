"""The training tape: a whole eager training forward as one autograd node (``Tape``,
``run_taped``), recording each op's own ``setup`` and ``backward`` (``fastunet.ops.op``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .op import AUTO_STATE, DIRECT, DISPATCH, Op, direct_ok, direct_ok_mutation, on_declare

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
        self._grad_ids.update([id(t) for t in tensors if isinstance(t, Tensor) and t.requires_grad])

    def record(self, op: Op, *args):
        """Run ``op``'s implementation on ``args``; record its backward when an argument is on the
        tape (a leaf, or an output of a recorded op). ``tape.<name>(*args)`` is the same call."""
        return getattr(self, op.name)(*args)

    def finish(self, output: Tensor) -> None:
        """After the forward: outputs are kept by id, and every one but ``output`` stays pinned
        (with the inputs) so that no id is reused while the tape lives; ``output`` is not held,
        since it holds the autograd node that holds this tape (a reference cycle)."""
        self.pinned = [o for *_, outs in self.records for o in outs if o is not output]
        self.records = [(b, ctx, args, tuple(map(id, outs))) for b, ctx, args, outs in self.records]

    def backward(self, out_id: int, grad: Tensor, leaf_ids: tuple) -> tuple:
        """Gradients of the leaves (ids; None for a leaf that needs none) from ``grad`` = dL/d of
        the output ``out_id``, through the records in reverse. ``AUTO``'s watcher tests are made
        once here for every formula (``op.AUTO_STATE``): nothing in between can change them."""
        grads = {out_id: grad}
        pop = grads.pop
        state = AUTO_STATE
        was = state.direct
        state.direct = direct_ok(grad)
        try:
            for backward, ctx, args, out_ids in reversed(self.records):
                gouts = [pop(i, None) for i in out_ids]
                for g in gouts:
                    if g is not None:
                        break
                else:
                    continue
                for g_in, a, need in zip(backward(ctx, *gouts), args, ctx.needs_input_grad, strict=False):
                    if g_in is None or not need:  # only tensors on the tape (or leaves) get gradients
                        continue
                    key = id(a)
                    grads[key] = g_in if key not in grads else grads[key] + g_in
        finally:
            state.direct = was
        return tuple([grads.get(i) for i in leaf_ids])  # a None id (no gradient) is never a key


def _add_recorder(op: Op) -> None:
    """``Tape.<name>``: an op with a gradient is recorded; one without (a running-statistics
    update, a backward op) runs as it is. The recorder is the op's whole per-call tape work in
    one frame (about 100 recorded calls per training step)."""
    if op.backward is None:
        setattr(Tape, op.name, staticmethod(op.impl))
        return
    impl, setup, backward = op.impl, op.setup, op.backward

    def recorded(self, *args):
        out = impl(*args)
        grad_ids = self._grad_ids
        # Every id in grad_ids is a live tensor's (a leaf, or an output the records hold), so no
        # other live argument has one: the id test alone says "a tensor on the tape".
        needs = tuple([id(a) in grad_ids for a in args])
        if True in needs:
            ctx = _TapeCtx(self, needs)
            setup(ctx, args, out)
            outs = out if isinstance(out, tuple) else (out,)
            grad_ids.update(map(id, outs))
            self.records.append((backward, ctx, args, outs))
        return out

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
        ctx.leaf_ids = tuple([id(t) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves])
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
