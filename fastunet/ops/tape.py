"""How the model calls the ops: ``direct`` (the inference implementations without the dispatcher),
``Tape`` and ``run_taped`` (a training forward as one autograd node), ``OpsNamespace`` (the
per-op path through ``torch.ops.fastunet`` for traces and modes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bn_train import (
    _bn_affine_backward,
    _bn_affine_impl,
    _bn_affine_setup,
    _bn_running_update_impl,
    _bn_stats_sync_backward,
    _bn_stats_sync_impl,
    _bn_stats_sync_setup,
)
from .conv3x3 import (
    _conv3x3_bn_act_head_impl,
    _conv3x3_bn_act_impl,
    _conv3x3_bn_stats_impl,
    _conv3x3_stats_backward,
    _conv3x3_stats_setup,
    _conv3x3_up_bn_act_impl,
    _conv3x3_up_bn_stats_impl,
    _conv3x3_up_stats_backward,
    _conv3x3_up_stats_setup,
)
from .entry import (
    _pad_backward,
    _pad_channels_nhwc_impl,
    _pad_setup,
    _pad_weight_backward,
    _pad_weight_in,
    _pad_weight_setup,
)
from .head1x1 import _head1x1_impl, _head_backward, _head_setup
from .maxpool2x2 import _maxpool2x2_impl, _pool_backward, _pool_setup
from .upconv2x2 import _upconv2x2_impl, _upconv_backward, _upconv_setup
from .upconv_nearest2x2 import _backward as _upconv_nearest_backward
from .upconv_nearest2x2 import _setup as _upconv_nearest_setup
from .upconv_nearest2x2 import _upconv_nearest2x2_impl


class _Direct:
    """The inference ops' implementations, called without the dispatcher (see ``direct_ok``)."""

    conv3x3_bn_act = staticmethod(_conv3x3_bn_act_impl)
    conv3x3_bn_act_head = staticmethod(_conv3x3_bn_act_head_impl)
    conv3x3_up_bn_act = staticmethod(_conv3x3_up_bn_act_impl)
    upconv2x2 = staticmethod(_upconv2x2_impl)
    upconv_nearest2x2 = staticmethod(_upconv_nearest2x2_impl)
    maxpool2x2 = staticmethod(_maxpool2x2_impl)
    head1x1 = staticmethod(_head1x1_impl)
    pad_channels_nhwc = staticmethod(_pad_channels_nhwc_impl)
    bn_running_update_ = staticmethod(_bn_running_update_impl)


direct = _Direct()


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

    def _run(self, impl, setup, backward, *args):
        out = impl(*args)
        needs = tuple(isinstance(a, Tensor) and id(a) in self._grad_ids for a in args)
        if any(needs):
            ctx = _TapeCtx(self, needs)
            setup(ctx, args, out)
            outs = out if isinstance(out, tuple) else (out,)
            self._grad_ids.update(id(o) for o in outs)
            self.records.append((backward, ctx, args, outs))
        return out

    def finish(self, output: Tensor) -> None:
        """After the forward: outputs are kept by id, and every one but ``output`` stays pinned
        (with the inputs) so that no id is reused while the tape lives; ``output`` is not held,
        since it holds the autograd node that holds this tape (a reference cycle)."""
        self.pinned = [o for *_, outs in self.records for o in outs if o is not output]
        self.records = [(b, ctx, args, tuple(map(id, outs))) for b, ctx, args, outs in self.records]

    def conv3x3_bn_stats(self, *args):
        return self._run(_conv3x3_bn_stats_impl, _conv3x3_stats_setup, _conv3x3_stats_backward, *args)

    def conv3x3_up_bn_stats(self, *args):
        return self._run(_conv3x3_up_bn_stats_impl, _conv3x3_up_stats_setup, _conv3x3_up_stats_backward, *args)

    def bn_affine(self, *args):
        return self._run(_bn_affine_impl, _bn_affine_setup, _bn_affine_backward, *args)

    def bn_stats_sync(self, *args):
        return self._run(_bn_stats_sync_impl, _bn_stats_sync_setup, _bn_stats_sync_backward, *args)

    def maxpool2x2(self, *args):
        return self._run(_maxpool2x2_impl, _pool_setup, _pool_backward, *args)

    def upconv2x2(self, *args):
        return self._run(_upconv2x2_impl, _upconv_setup, _upconv_backward, *args)

    def upconv_nearest2x2(self, *args):
        return self._run(_upconv_nearest2x2_impl, _upconv_nearest_setup, _upconv_nearest_backward, *args)

    def head1x1(self, *args):
        return self._run(_head1x1_impl, _head_setup, _head_backward, *args)

    def pad_channels_nhwc(self, *args):
        return self._run(_pad_channels_nhwc_impl, _pad_setup, _pad_backward, *args)

    def pad_weight_in(self, weight: Tensor, channels: int) -> Tensor:
        return self._run(_pad_weight_in, _pad_weight_setup, _pad_weight_backward, weight, channels)

    bn_running_update_ = staticmethod(_bn_running_update_impl)

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


class _Untaped(_Direct):
    """The tape's interface without recording (nothing needs a gradient): the direct calls plus
    the training-only ops."""

    conv3x3_bn_stats = staticmethod(_conv3x3_bn_stats_impl)
    conv3x3_up_bn_stats = staticmethod(_conv3x3_up_bn_stats_impl)
    bn_affine = staticmethod(_bn_affine_impl)
    bn_stats_sync = staticmethod(_bn_stats_sync_impl)
    pad_weight_in = staticmethod(_pad_weight_in)


class OpsNamespace:
    """The per-op path: the registered ops (one autograd node each), for traces and modes."""

    def __getattr__(self, name):
        if name == "pad_weight_in":
            return _pad_weight_in  # plain torch ops: autograd records them itself
        return getattr(torch.ops.fastunet, name)


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
    """``fn(ops)`` (a training forward written against the ops' interface) with one autograd
    node for all of it (see the comment above). ``leaves``: every tensor gradients may flow to
    (the input and the parameters). Without any leaf requiring grad (or grad mode off) nothing
    is recorded."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in leaves):
        return fn(_Untaped)
    return _TapeFunction.apply(fn, *leaves)
