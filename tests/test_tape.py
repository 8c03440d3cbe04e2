"""The eager training forward as one autograd node (``fastunet.ops.run_taped``): the same
numbers as the per-op path (each op its own autograd node, what torch.compile traces), saved
tensors visible to saved-tensor hooks, no reference cycle, and the per-op path taken whenever
something watches the dispatcher."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from helpers import assert_close, model_pair
from torch.utils._python_dispatch import TorchDispatchMode

from fastunet import ops

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("triton_backend")]
NARROW = {"base_channels": 4, "depth": 2}


def _step(model, x, g):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# fp32 runs every kernel through the interpreter twice (~10 s): quick mode keeps fp64 (composites)
@pytest.mark.parametrize(
    "dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)], ids=["fp64", "fp32"]
)
def test_tape_equals_the_per_op_path(dtype):
    """A dispatch mode forces the per-op path (one autograd node per op): the tape must give the
    same output, input gradient, parameter gradients and running statistics."""
    _, model = model_pair(3, 2, dtype=dtype, **NARROW)
    model.train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    g = torch.randn(2, 2, 8, 8, dtype=dtype)
    taped = _step(model, x, g)
    with _Passthrough():
        per_op = _step(twin, x, g)
    tol = "fp64" if dtype == torch.float64 else "fp32"
    for what, a, b in zip(("output", "input grad"), taped[:2], per_op[:2], strict=True):
        assert_close(a, b.double(), tol, what)
    for i, (a, b) in enumerate(zip(taped[2], per_op[2], strict=True)):
        assert_close(a, b.double(), tol, f"param grad {i}", scale=max(b.abs().max().item(), 1e-6))
    for a, b in zip(taped[3], per_op[3], strict=True):
        if a.is_floating_point():
            assert_close(a, b.double(), tol, "buffer")
        else:
            assert torch.equal(a, b)


def test_the_tape_is_one_autograd_node_and_the_per_op_path_many():
    _, model = model_pair(3, 2, dtype=torch.float64, **NARROW)
    model.train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    assert type(y.grad_fn).__name__ == "_TapeFunctionBackward"
    with _Passthrough():
        y = model(x)
    assert type(y.grad_fn).__name__ != "_TapeFunctionBackward"


def test_saved_tensors_go_through_the_hooks():
    _, model = model_pair(3, 2, dtype=torch.float64, **NARROW)
    model.train()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
        y = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert len(seen) > 20, "the ops' saved tensors must reach the hooks"
    y.sum().backward()


def test_no_reference_cycle_keeps_the_activations():
    _, model = model_pair(3, 2, dtype=torch.float64, **NARROW)
    model.train()
    gc.collect()
    gc.disable()
    try:
        y = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        node = weakref.ref(y.grad_fn)
        out = weakref.ref(y)
        del y
        assert out() is None and node() is None, "the output and its node must go without the garbage collector"
    finally:
        gc.enable()


def test_without_gradients_nothing_is_recorded():
    _, model = model_pair(3, 2, dtype=torch.float64, **NARROW)
    model.train().requires_grad_(False)
    y = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert y.grad_fn is None
    with torch.no_grad():
        model.requires_grad_(True)
        assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).grad_fn is None


def test_run_taped_without_leaves_runs_untaped():
    calls = []

    def fn(namespace):
        calls.append(namespace)
        return torch.zeros(1)

    ops.run_taped(fn, (torch.zeros(1),))
    assert calls == [ops.DIRECT]
