"""Tuning that verifies itself: the op layer's half (the tuner's half and the whole story are in
``fastunet.kernels._tuning``).

Every op implementation runs through ``call`` (via ``_common._on_input_device``). When a kernel
shape is tuned during the call, the tuner leaves it pending; at the end of the call ``call``
runs the op's eager composite on the same inputs (the same implementation with the kernels off:
``_use_kernels`` is False while ``CALLS.eager``), then has the tuner replay the call once per
candidate config, comparing each replay's outputs with the composite's through the test suite's
tolerance table (``fastunet.tolerances``). A key whose candidates all disagree makes the op run
the composite from then on (``NoVerifiedConfig``).

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

import threading
import warnings

import torch
from torch import Tensor

from ..tolerances import TOLERANCES, error_ratios, tolerance_name


class _Calls(threading.local):
    """This thread's op-call state (class attributes are the defaults every thread starts with);
    the object ``kernels._tuning.register_op_calls`` receives (``kernels._tuning.OpCalls``)."""

    depth = 0  # > 0 inside an op implementation
    replaying = False  # the composite or a candidate is being run for verification
    eager = False  # the kernels are off (the composite runs)
    pending = False  # the tuner left a key pending for this call

    def verifiable(self) -> bool:
        return self.depth > 0 and not self.replaying and not self.eager

    def deferred(self) -> None:
        self.pending = True


CALLS = _Calls()
# Threads running a composite because the kernels are off for their call (``_use_kernels``'
# quick test: nonzero only then, so the common path reads one global).
_EAGER_THREADS = 0
_EAGER_LOCK = threading.Lock()


def eager_now() -> bool:
    """Whether this thread runs the composite instead of the kernels (see ``_use_kernels``)."""
    return _EAGER_THREADS > 0 and CALLS.eager


def call(impl, args: tuple, kwargs: dict, kernels):
    """``impl(*args, **kwargs)`` as an op call: verify what it tuned, fall back to the composite
    for shapes without a verified config. ``kernels``: a zero-argument function returning
    ``fastunet.kernels`` or None when it has not been imported (then nothing can have tuned)."""
    calls = CALLS
    if calls.depth:  # an op called inside another's implementation: the outer call verifies
        return impl(*args, **kwargs)
    calls.depth = 1
    try:
        out = impl(*args, **kwargs)
        while calls.pending:
            out = _settle(impl, args, kwargs, out, kernels()._tuning)
        return out
    except Exception as exc:
        k = kernels()
        if k is None:
            raise
        k._tuning.abandon()  # whatever this call left pending is forgotten, the lock released
        if not isinstance(exc, k._tuning.NoVerifiedConfig):
            raise
        return _composite(impl, args, kwargs)
    finally:
        calls.depth = 0
        calls.pending = False


def _composite(impl, args, kwargs):
    """The op's eager composite: ``impl`` with the kernels off on this thread."""
    global _EAGER_THREADS
    calls = CALLS
    was = calls.eager
    calls.eager = True
    with _EAGER_LOCK:
        _EAGER_THREADS += 1
    try:
        return impl(*args, **kwargs)
    finally:
        with _EAGER_LOCK:
            _EAGER_THREADS -= 1
        calls.eager = was


def _settle(impl, args, kwargs, out, tuning):
    """Check the keys this call tuned (``tuning.settle``) and return the call's outputs, run
    again when a pick changed."""
    calls = CALLS
    calls.pending = False
    calls.replaying = True
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
            tuning.settle(None)  # keeps the picks the call ran with
            return out
        inputs = [t for t in _tensors([*args, *kwargs.values()]) if t.is_floating_point()]
        check = None
        if _all_finite(inputs) and _all_finite(_tensors(reference)):
            # The least precise input bounds the op's precision: its row (bf16 x, fp32 scale: bf16).
            tol = max((tolerance_name(t.dtype, t.device) for t in inputs), key=lambda n: TOLERANCES[n][1])

            def check():
                return mismatch(impl(*args, **kwargs), reference, tol)

        changed = tuning.settle(check)
    finally:
        calls.replaying = False
    return impl(*args, **kwargs) if changed else out


def _tensors(values) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    return [v for v in values if isinstance(v, Tensor)] if isinstance(values, (tuple, list)) else []


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def mismatch(got, expected, tol: str) -> str | None:
    """None when every floating output of ``got`` matches ``expected``'s (a tensor or a tuple of
    them) within ``TOLERANCES[tol]`` (scaled by each expected output's RMS), up to ``numel >> 20``
    isolated elements (see the module docstring); else a one-line reason."""
    got_t, exp_t = _tensors(got), _tensors(expected)
    if len(got_t) != len(exp_t):
        return f"{len(got_t)} outputs, the composite has {len(exp_t)}"
    for i, (g, e) in enumerate(zip(got_t, exp_t, strict=True)):
        if not e.is_floating_point():
            continue
        if g.shape != e.shape:
            return f"output {i}: shape {tuple(g.shape)}, the composite's {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        ratio = error_ratios(g, e, tol, dtype=torch.float32)
        bad = int((~(ratio <= 1)).sum())
        if bad > e.numel() >> 20:
            why = f"output {i}: {bad} of {e.numel()} elements beyond the {tol} tolerance"
            nans = int((torch.isnan(g) & ~torch.isnan(e)).sum())
            if nans:
                return f"{why} ({nans} NaN where the composite has a number)"
            return f"{why} (worst error {ratio.max().item():.3g} times the allowed)"
    return None
