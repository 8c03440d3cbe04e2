"""Tuning that verifies itself: the op layer's half (the tuner's half and the whole story are in
``fastunet.kernels._tuning``).

Every op implementation runs as an ``op_call`` (via ``op.on_input_device``, which ``declare`` applies). When a
kernel shape is tuned during the call, the tuner leaves it pending; at the end of the call it
runs the op's eager composite on the same inputs (the same implementation with the kernels off:
``use_kernels`` answers None while ``eager_now()``), then has the tuner replay the call once per
candidate config, comparing each replay's outputs with the composite's through the test suite's
tolerance table (``fastunet.tolerances``). A key whose candidates all disagree makes the op run
the composite from then on (``NoVerifiedConfig``).

Every op call pays one global read for this (``PENDING``): which op call a tuning miss belongs
to is found only on the miss, by walking this thread's stack to the innermost op-call frame
(``_op_frame``). A thread-local depth counter kept per call cost ten times as much per op.

The composite runs in the op's own dtype, not float64: it rounds where the kernels round (the
BatchNorm+ReLU applied on load is rounded to the activation dtype before a max-pool compares,
say), so a pool's argmax among near-ties is the same as the kernel's. In float64 those windows
would route gradients elsewhere and every candidate of a large shape would fail. The tolerance
row is the dtype's (``tolerance_name``): both sides then carry rounding error, within the row's
margin (tested on the model, every op, in ``tests/test_tuning.py``).

Isolated elements may still differ: where ``x * scale + shift`` lies within an fp32 rounding of
zero, a fused multiply-add in the kernel and torch's multiply-then-add can put a ReLU or pool
boundary on different sides (about 1e-7 of the elements). A config bug corrupts whole tiles (at
least 16 x 16 elements), so up to ``numel >> 20`` elements (one per Mi, none below a Mi) may
exceed the tolerance before a candidate is rejected.

Replays assume an op implementation computes its outputs from its inputs only (every op with a
tuned kernel is declared ``mutates_args=()``); the data must be finite, else the call cannot be
checked and its picks are kept unverified (the next call with finite data of a new shape, or the
next process, verifies).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings

import torch
from torch import Tensor

from ..tolerances import TOLERANCES, allowed_error, tolerance_name


class _State(threading.local):
    """This thread's verification state; touched only when something is tuned or runs eager."""

    replaying = False  # the composite or a candidate is being run for verification
    eager = False  # the kernels are off (the composite runs)
    owner = None  # the op-call frame that settles this thread's pending keys


_STATE = _State()
_COUNT_LOCK = threading.Lock()
# Threads with pending keys (at most one: they hold the tuner's lock) and threads running a
# composite with the kernels off: each op call and ``use_kernels`` read only these globals.
PENDING = 0
_EAGER_THREADS = 0


def _bump(name: str, delta: int) -> None:
    with _COUNT_LOCK:
        globals()[name] += delta


def eager_now() -> bool:
    """Whether this thread runs the composite instead of the kernels (see ``use_kernels``)."""
    return _EAGER_THREADS > 0 and _STATE.eager


class _TunerHook:
    """What ``kernels._tuning.register_op_calls`` receives (``kernels._tuning.OpCalls``)."""

    def verifiable(self) -> bool:
        return not _STATE.replaying and not _STATE.eager and _op_frame() is not None

    def deferred(self) -> None:
        if _STATE.owner is None:  # the first key of this call; nested op calls' keys join it
            _STATE.owner = _op_frame()
            _bump("PENDING", 1)


HOOK = _TunerHook()


def _op_frame():
    """The innermost op-call frame (``op_call``) on this thread's stack (None outside op calls)."""
    f = sys._getframe(1)
    while f is not None and f.f_code is not _CALL_CODE:
        f = f.f_back
    return f


def _release(tuning, settle_with=None, spent_s: float = 0.0) -> bool:
    """Settle (``settle_with`` a check or the "cannot check" None; ``spent_s`` on the composite)
    or abandon (``settle_with=False``) this thread's pending keys; forget the owner. Returns
    ``tuning.settle``'s answer (False when abandoning)."""
    _STATE.owner = None
    _bump("PENDING", -1)
    if settle_with is False:
        tuning.abandon()
        return False
    return tuning.settle(settle_with, spent_s)


def op_call(impl, device_guard, kernels):
    """``impl`` as an op call (what ``op.on_input_device`` makes of an op's implementation): run
    with its first tensor's CUDA device current, verify what it tuned, fall back to the composite
    for shapes without a verified config. ``device_guard(device)``: the context that makes a CUDA
    ``device`` current, or None when it is already (asked for CUDA tensors only); ``kernels``: a
    zero-argument function returning ``fastunet.kernels`` or None when it has not been imported
    (then nothing can have tuned). Every op call is one frame of this code (``_op_frame`` looks
    for it): the device test and the verification share it."""

    def call(*args, **kwargs):
        # ``is_cuda``, not ``device.type == "cuda"``: reading a device's ``type`` costs about a
        # microsecond (a new string), ten times the flag.
        if args[0].is_cuda:
            guard = device_guard(args[0].device)
            if guard is not None:
                with guard:  # the device is current inside: this nested call gets no guard
                    return call(*args, **kwargs)
        try:
            out = impl(*args, **kwargs)
            if PENDING and _STATE.owner is sys._getframe(0):
                out = _settle(impl, args, kwargs, out, kernels()._tuning)
            return out
        except BaseException as exc:  # re-raised below; an interrupted call must release the tuner
            k = kernels()
            if k is None:
                raise
            eager = isinstance(exc, k._tuning.NoVerifiedConfig)
            if PENDING and _STATE.owner is sys._getframe(0):
                # A failed call's keys are forgotten; those of a call going eager (another key of
                # it has no verified config) are kept unchecked: it would otherwise time them
                # every call.
                _release(k._tuning, settle_with=None if eager else False)
            if not eager:
                raise
            return _composite(impl, args, kwargs)

    return functools.wraps(impl)(call)


_CALL_CODE = op_call(len, None, None).__code__


def _composite(impl, args, kwargs):
    """The op's eager composite: ``impl`` with the kernels off on this thread."""
    state = _STATE
    was = state.eager
    state.eager = True
    _bump("_EAGER_THREADS", 1)
    try:
        return impl(*args, **kwargs)
    finally:
        _bump("_EAGER_THREADS", -1)
        state.eager = was


def _settle(impl, args, kwargs, out, tuning):
    """Check the keys this call tuned (``tuning.settle``) and return the call's outputs, run
    again when a pick changed (which raises ``NoVerifiedConfig`` for a key gone eager)."""
    state = _STATE
    state.replaying = True
    t0 = time.perf_counter()
    try:
        try:
            reference = _composite(impl, args, kwargs)
        except Exception as exc:  # noqa: BLE001  (verification must not break a call that ran)
            warnings.warn(
                f"fastunet: could not run {getattr(impl, '__name__', impl)}'s eager composite to verify its newly "
                f"tuned kernel configs ({type(exc).__name__}: {exc}); they are kept unverified.",
                RuntimeWarning,
                stacklevel=5,
            )
            _release(tuning, settle_with=None)  # keeps the picks the call ran with
            return out
        inputs = [t for t in _tensors([*args, *kwargs.values()]) if t.is_floating_point()]
        check = None
        if _all_finite(inputs) and _all_finite(_tensors(reference)):
            # The least precise input bounds the op's precision: its row (bf16 x, fp32 scale: bf16).
            tol = max((tolerance_name(t.dtype, t.device) for t in inputs), key=lambda n: TOLERANCES[n][1])
            expected = Expected(reference, tol)

            def check():
                return expected.mismatch(impl(*args, **kwargs))

        changed = _release(tuning, settle_with=check, spent_s=time.perf_counter() - t0)
    finally:
        state.replaying = False
    return impl(*args, **kwargs) if changed else out


def _tensors(values) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    return [v for v in values if isinstance(v, Tensor)] if isinstance(values, (tuple, list)) else []


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Expected:
    """An op call's composite outputs and the error each element may have (``allowed_error``),
    made once per tuned key and held against every candidate's outputs (``mismatch``)."""

    def __init__(self, outputs, tol: str):
        self.tol = tol
        self.outputs = [(e.detach().float(), allowed_error(e.detach().float(), tol)) for e in _tensors(outputs)]

    def mismatch(self, got) -> str | None:
        """None when every output of ``got`` (a tensor or a tuple of them) is within the
        tolerance, up to ``numel >> 20`` isolated elements (see the module docstring); else a
        one-line reason. Three passes over a candidate's output: data that are all finite (the
        only kind checked) let NaN and infinity fail the comparison by themselves."""
        got_t = _tensors(got)
        if len(got_t) != len(self.outputs):
            return f"{len(got_t)} outputs, the composite has {len(self.outputs)}"
        for i, (g, (e, bound)) in enumerate(zip(got_t, self.outputs, strict=True)):
            if g.shape != e.shape:
                return f"output {i}: shape {tuple(g.shape)}, the composite's {tuple(e.shape)}"
            err = (g.detach().float() - e).abs_()
            bad = e.numel() - int((err <= bound).sum())
            if bad > e.numel() >> 20:
                why = f"output {i}: {bad} of {e.numel()} elements beyond the {self.tol} tolerance"
                nans = int(torch.isnan(g).sum())
                if nans:
                    return f"{why} ({nans} NaN where the composite has a number)"
                return f"{why} (worst error {err.div_(bound).max().item():.3g} times the allowed)"
        return None
