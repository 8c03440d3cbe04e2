"""The host-side decisions the op layer makes once instead of per call (issue 24 §1): each must
give the per-call answer whenever it could differ, and leave no state behind.

- ``Tape.backward`` tests ``AUTO``'s watchers once per backward (``op.AUTO_STATE``): a backward
  run under a dispatch mode or the profiler (the forward was not) still dispatches every
  backward op; the decision is per thread and undone after the backward, also when it raises.

Also here: ``benchmarks/host_overhead.py``'s per-step Python/C call counts, the deterministic
measure these changes are judged by.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from pathlib import Path

import pytest
import torch
from helpers import model_pair
from torch.utils._python_dispatch import TorchDispatchMode

from fastunet import ops
from fastunet.ops import op as op_module
from fastunet.ops import tape as tape_module

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("triton_backend")]
NARROW = {"base_channels": 4, "depth": 1}
REPO = Path(__file__).resolve().parents[1]


class _Watch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _model():
    _, model = model_pair(3, 2, dtype=torch.float64, **NARROW)
    return model.train()


def _taped_forward(model, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    assert type(y.grad_fn).__name__ == "_TapeFunctionBackward"
    return y


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_auto_is_decided_once_per_tape_backward(monkeypatch):
    """Nothing watching: one watcher test for the whole backward, every backward op called
    directly, the flag undone afterwards."""
    model = _model()
    y = _taped_forward(model)
    tests = []
    real = op_module.direct_ok

    def counted(x):
        tests.append(type(x))
        return real(x)

    monkeypatch.setattr(op_module, "direct_ok", counted)
    monkeypatch.setattr(tape_module, "direct_ok", counted)
    with _Watch() as outside:  # entered and left before backward: the backward is unwatched
        pass
    y.sum().backward()
    assert len(tests) == 1, f"AUTO re-tested the watchers {len(tests) - 1} times in one tape backward"
    assert op_module.AUTO_STATE.direct is False
    assert outside.seen == []


@pytest.mark.parametrize("watcher", ["dispatch_mode", "profiler"])
def test_a_watched_backward_dispatches_every_backward_op(watcher):
    """The forward is taped with nobody watching; the backward runs under a dispatch mode or the
    profiler: its ops must go through the dispatcher (where the watcher sees them), and the
    gradients equal an unwatched backward's bit for bit (the same implementations)."""
    model = _model()
    twin = copy.deepcopy(model)
    _taped_forward(twin).sum().backward()
    y = _taped_forward(model)
    if watcher == "dispatch_mode":
        with _Watch() as watch:
            y.sum().backward()
        seen = watch.seen
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        seen = [e.name for e in prof.events()]
    assert any("fastunet" in s and "backward" in s for s in seen), sorted(set(seen))[:20]
    assert op_module.AUTO_STATE.direct is False
    for a, b in zip(_grads(model), _grads(twin), strict=True):
        assert torch.equal(a, b)


def test_the_decision_is_undone_when_a_formula_raises(monkeypatch):
    model = _model()
    y = _taped_forward(model)

    def boom(*args):
        assert op_module.AUTO_STATE.direct is True  # decided: nothing watches this backward
        raise RuntimeError("formula failed")

    for i, (_, ctx, args, outs) in enumerate(y.grad_fn.tape.records):
        y.grad_fn.tape.records[i] = (boom, ctx, args, outs)
    with pytest.raises(RuntimeError, match="formula failed"):
        y.sum().backward()
    assert op_module.AUTO_STATE.direct is False


def test_the_decision_is_per_thread():
    seen = []
    op_module.AUTO_STATE.direct = True
    try:
        thread = threading.Thread(target=lambda: seen.append(op_module.AUTO_STATE.direct))
        thread.start()
        thread.join()
    finally:
        op_module.AUTO_STATE.direct = False
    assert seen == [False]


def test_auto_with_the_decision_made_still_tests_the_tensor_type(monkeypatch):
    """``AUTO_STATE.direct`` covers the thread's watchers, not the argument: a tensor subclass
    still goes through the registered op (``direct_ok`` fails for it), a plain tensor does not."""

    class Sub(torch.Tensor):
        pass

    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    g, scale, shift = torch.randn_like(x), torch.rand(2, dtype=torch.float64) + 0.5, torch.randn(2, dtype=torch.float64)
    auto = ops.AUTO.affine_relu_backward
    direct_calls = []
    real = auto.impl
    monkeypatch.setattr(auto, "impl", lambda *a: direct_calls.append(type(a[1])) or real(*a))
    monkeypatch.setattr(op_module.AUTO_STATE, "direct", True)
    with torch.no_grad():
        plain = auto(g, x, scale, shift)
        sub = auto(g, x.as_subclass(Sub), scale, shift)
    assert direct_calls == [torch.Tensor], direct_calls
    for a, b in zip(plain, sub, strict=True):
        assert torch.equal(a, b.as_subclass(torch.Tensor))


def test_the_tape_marks_exactly_the_tensors_on_it():
    """``needs`` is an id test against the tape's live tensors: with some parameters frozen, the
    taped step's gradients equal the per-op path's bit for bit, frozen ones None."""
    model = _model()
    frozen = [p for name, p in model.named_parameters() if name.endswith("bias")][:2]
    frozen.append(next(iter(model.parameters())))
    for p in frozen:
        p.requires_grad_(False)
    twin = copy.deepcopy(model)
    _taped_forward(model).sum().backward()
    with _Watch():
        torch.manual_seed(0)
        y = twin(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        assert type(y.grad_fn).__name__ != "_TapeFunctionBackward"
        y.sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        if not a.requires_grad:
            assert a.grad is None and b.grad is None, name
        else:
            assert torch.equal(a.grad, b.grad), name


def _host_overhead():
    spec = importlib.util.spec_from_file_location("host_overhead", REPO / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_call_counts_count_python_and_c_calls():
    """``benchmarks/host_overhead.py``'s per-step call counts: every Python frame entered and
    every C function called once each, nothing of the profiler's own."""
    count = _host_overhead().call_counts

    def helper(x):
        return len(x)

    def fn():
        for _ in range(3):
            helper("ab")
        sorted([2, 1])

    assert count(fn) == (4, 4)  # fn + 3 helper; 3 len + sorted
    assert count(fn) == count(fn)
