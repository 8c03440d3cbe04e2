"""How an op is declared and how it is called: the one registry of the op layer.

**Declared once.** Each op lives in its family module (``fastunet/ops/<family>.py``): the schema
(a ``@torch.library.custom_op`` stub with the docstring), ``@<op>.register_fake``, the
implementation, and for an op with a gradient ``setup`` (what it saves) and ``backward`` (its
formula). One ``declare(op, impl, setup=..., backward=...)`` then does every registration: the
CPU and CUDA kernel (the implementation under the device guard and the tuning verification,
``on_input_device``), ``register_autograd``, and the op's ``Op`` entry in ``OPS``. A plain-torch
step the training forward records (the first conv's weight padding, the dropout) is declared with
``declare_composite``: no torch.library entry (autograd records its torch ops on the per-op path).

**Called one way.** Every caller (the model's executors, the backward formulas) calls
``calls.<name>(*args)`` on a *calls* object. The calls objects differ only in policy and are all
filled from ``OPS`` as ops are declared (no per-op list anywhere):

* ``DISPATCH``: the registered op through the dispatcher, for whoever watches it (a
  ``torch.compile`` trace, a dispatch mode, functorch, the profiler);
* ``DIRECT``: the implementation, skipping the dispatcher (about 10 us per call that a launch's
  own few us of host work would not survive) when nothing watches (``direct_ok``);
* ``AUTO``: ``DIRECT`` or ``DISPATCH`` decided per call, for the backward formulas (one formula
  runs under the training tape and under per-op autograd alike; the tape's backward tests the
  thread's watchers once for all its formulas, ``AUTO_STATE``);
* a ``Tape`` (``fastunet.ops.tape``): records each op's ``setup``/``backward`` so a whole
  training forward is one autograd node.

A forward picks its calls object once (``calls_for``, ``tape.run_taped``), not per op: the
choice costs a few C calls, the attribute lookup per op is what ``DIRECT`` cost before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _verify

__all__ = [
    "AUTO",
    "DIRECT",
    "DISPATCH",
    "OPS",
    "Op",
    "calls_for",
    "declare",
    "declare_composite",
    "direct_ok",
    "direct_ok_mutation",
    "kernel_package",
    "on_declare",
    "on_input_device",
]


# =========================================================================== the kernels, the device
_KERNELS = None


def kernel_package():
    """The ``fastunet.kernels`` package, imported on first use (CPU-only installs never need
    triton). The one way the op layer reaches the kernels: every op implementation, and the
    model's weight packing through ``fastunet.ops.kernel_package``."""
    global _KERNELS
    if _KERNELS is None:
        from .. import kernels

        kernels._tuning.register_op_calls(_verify.HOOK)
        _KERNELS = kernels
    return _KERNELS


def _loaded_kernels():
    """``fastunet.kernels`` if an op has loaded it, else None (then no kernel has been tuned)."""
    return _KERNELS


def _device_guard(device: torch.device):
    """The context that makes ``device`` the current CUDA device, or None when it already is (or
    is not a CUDA device). Triton launches on the current device and its current stream, so
    this is what sends every kernel of an op to its tensors' GPU."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)


def on_input_device(impl):
    """Run an op's device implementation with its first tensor's device current (the one device
    guard of the package: every kernel launch happens inside some op's implementation), as an op
    call whose newly tuned kernel shapes are verified against its composite (``_verify.op_call``:
    one frame per op call; ``_device_guard`` is asked for CUDA tensors only). ``declare`` applies
    it; a module calls it only for a helper that is not an op."""
    return _verify.op_call(impl, _device_guard, _loaded_kernels)


# =========================================================================== who is watching
def direct_ok(x: Tensor) -> bool:
    """Whether a forward on ``x`` may bypass the dispatcher (``DIRECT``): no autograd graph to
    record (grad mode off), a plain tensor (no fake, functional or subclass tensor), and nobody
    watching at the dispatcher: no ``torch.compile`` trace, no ``TorchDispatchMode``, no functorch
    transform, no profiler (so a profile still names every ``fastunet::`` op)."""
    # Spelt out rather than calling direct_ok_mutation: AUTO tests it on every backward op call.
    return (
        not torch.is_grad_enabled()
        and type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch.autograd._profiler_enabled()
    )


def direct_ok_mutation(x: Tensor) -> bool:
    """``direct_ok`` without the grad-mode test: for an op without a gradient (a buffer update),
    or a training forward that records its own gradients (the tape)."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch.autograd._profiler_enabled()
    )


# =========================================================================== the registry
@dataclass(frozen=True, eq=False, slots=True)
class Op:
    """One declared op. ``impl``: the implementation (for a registered op, the guarded one the
    dispatcher reaches); ``setup(ctx, inputs, output)`` and ``backward(ctx, *grads)``: its autograd
    formula (None: no gradient); ``ref``: the argument whose tensor decides ``AUTO``'s policy;
    ``dispatch``: the callable ``DISPATCH`` uses (``torch.ops.fastunet.<name>``, or ``impl`` for
    a composite)."""

    name: str
    impl: object
    setup: object
    backward: object
    ref: int
    dispatch: object


#: Every declared op by name, in declaration order.
OPS: dict[str, Op] = {}
_LISTENERS: list = []


class _Calls:
    """A calls object: one attribute per declared op (set by ``_enter``), ``calls.<name>(*args)``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"fastunet.ops.{type(self).__name__.upper()}"


class Dispatch(_Calls):
    """The registered ops through the dispatcher (one autograd node per op)."""


class Direct(_Calls):
    """The implementations without the dispatcher (see ``direct_ok``)."""


class Auto(_Calls):
    """Per call: the implementation when ``direct_ok`` holds for the op's ``ref`` argument, else the
    registered op (the backward formulas' calls: during ``loss.backward()`` grad mode is off).
    Within a tape's backward only the argument's type is tested per call (``AUTO_STATE``)."""


class _AutoState(threading.local):
    """``direct``: set by a caller that has tested ``direct_ok``'s thread and global conditions
    once for a stretch of ``AUTO`` calls in which none of them can change (``Tape.backward``: grad
    mode, compile, dispatch modes, functorch and the profiler are fixed while it runs its
    formulas); ``AUTO`` then tests only each call's own tensor type. Thread-local: another
    thread's backward may run under a dispatch mode of its own."""

    direct = False


AUTO_STATE = _AutoState()


class _OpOrImpl:
    __slots__ = ("op", "impl", "ref")

    def __init__(self, op: Op):
        self.op, self.impl, self.ref = op.dispatch, op.impl, op.ref

    def __call__(self, *args):
        x = args[self.ref]
        if (AUTO_STATE.direct and type(x) is Tensor) or direct_ok(x):
            return self.impl(*args)
        return self.op(*args)


DISPATCH, DIRECT, AUTO = Dispatch(), Direct(), Auto()


def calls_for(x: Tensor) -> _Calls:
    """The calls object for a forward on ``x`` without a tape: ``DIRECT`` when nothing needs the
    dispatcher (``direct_ok``), else ``DISPATCH``."""
    return DIRECT if direct_ok(x) else DISPATCH


def on_declare(listener) -> None:
    """Call ``listener(op)`` for every op declared so far and every one declared later (how the
    tape builds its recorders)."""
    _LISTENERS.append(listener)
    for op in OPS.values():
        listener(op)


def _enter(op: Op) -> Op:
    if op.name in OPS:
        raise RuntimeError(f"fastunet op {op.name!r} declared twice")
    OPS[op.name] = op
    setattr(Dispatch, op.name, staticmethod(op.dispatch))
    setattr(Direct, op.name, staticmethod(op.impl))
    setattr(Auto, op.name, _OpOrImpl(op))
    for listener in _LISTENERS:
        listener(op)
    return op


def declare(custom_op, impl, *, setup=None, backward=None, ref: int = 0) -> Op:
    """Register ``impl`` as ``custom_op``'s CPU and CUDA implementation (under ``on_input_device``)
    and, given ``backward``, its autograd formula with ``setup``; enter the op in ``OPS``. ``ref``:
    the argument whose tensor ``AUTO`` tests (a backward op's first tensor may be a gradient
    that is None-able or of another kind; pick the one that is always a plain input)."""
    if (setup is None) != (backward is None):
        raise ValueError("declare: give both setup and backward, or neither")
    name = custom_op._name
    guarded = on_input_device(impl)
    custom_op.register_kernel(("cpu", "cuda"))(guarded)
    if backward is not None:
        custom_op.register_autograd(backward, setup_context=setup)
    return _enter(Op(name, guarded, setup, backward, ref, getattr(torch.ops.fastunet, name)))


def declare_composite(name: str, impl, *, setup, backward) -> Op:
    """An op made of plain torch ops (no torch.library entry): ``DISPATCH`` and ``DIRECT`` call
    ``impl`` (autograd records its torch ops when it must); the tape records ``setup``/``backward``."""
    return _enter(Op(name, impl, setup, backward, 0, impl))
