"""The op layer's one registry (``fastunet.ops.op``): every op declared once is reachable the one
way, ``calls.<name>(*args)``, on every calls object, and the policy objects pick what they say."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet  # noqa: F401  (declares the ops)
from fastunet import ops
from fastunet.ops import op as op_module

# Registered in the model layer (the CPU fold as one opaque op under torch.compile), not an op of
# the fused path: see docs/design.md, "The op layer".
NOT_IN_OPS = {"cpu_fold_forward"}


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _registered() -> set[str]:
    """Every ``fastunet::`` op the dispatcher knows (however it was reached so far)."""
    return {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastunet::")}


def test_every_registered_op_is_declared_once_in_the_registry():
    registered = _registered()
    assert registered - NOT_IN_OPS <= set(ops.OPS), registered - NOT_IN_OPS - set(ops.OPS)
    composites = {name for name, op in ops.OPS.items() if op.dispatch is op.impl}
    assert composites == {"pad_weight_in", "affine_relu_dropout", "bn_train_fold"}
    assert set(ops.OPS) - composites <= registered


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_every_calls_object_reaches_every_op(name):
    entry = ops.OPS[name]
    assert ops.DIRECT.__class__.__dict__[name].__func__ is entry.impl
    dispatch = ops.DISPATCH.__class__.__dict__[name].__func__
    assert dispatch is (entry.impl if entry.dispatch is entry.impl else getattr(torch.ops.fastunet, name))
    assert callable(getattr(ops.AUTO, name))
    recorder = getattr(ops.Tape, name)
    if entry.backward is None:  # nothing to record: the tape runs the implementation
        assert recorder is entry.impl
    else:
        assert recorder.__name__ == name


def test_declaring_a_name_twice_is_refused():
    with pytest.raises(RuntimeError, match="declared twice"):
        op_module.declare_composite("maxpool2x2", lambda x: x, setup=None, backward=None)
    with pytest.raises(ValueError, match="both setup and backward"):
        op_module.declare(ops.maxpool2x2, lambda x: x, setup=lambda *a: None)


def test_on_declare_replays_what_is_declared(monkeypatch):
    monkeypatch.setattr(op_module, "_LISTENERS", [])
    seen = []
    op_module.on_declare(lambda entry: seen.append(entry.name))
    assert seen == list(ops.OPS)


def test_calls_for_picks_direct_only_when_nobody_watches():
    x = torch.zeros(1)
    assert ops.calls_for(x) is ops.DISPATCH  # grad mode on: autograd must see the ops
    with torch.no_grad():
        assert ops.calls_for(x) is ops.DIRECT
        with _Passthrough():
            assert ops.calls_for(x) is ops.DISPATCH


def test_auto_calls_the_implementation_or_the_registered_op(monkeypatch):
    """A backward op through AUTO: the implementation when nothing watches, the registered op
    (what a dispatch mode sees) otherwise; the same numbers either way."""
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        direct = ops.AUTO.affine_relu_backward(g, x, scale, shift)
        with Watch():
            watched = ops.AUTO.affine_relu_backward(g, x, scale, shift)
    assert any("fastunet.affine_relu_backward" in s for s in seen), seen
    for a, b in zip(direct, watched, strict=True):
        assert_close(a, b, "fp64", "affine_relu_backward")


def test_affine_relu_dropout_matches_its_definition():
    """``F.dropout(relu(z * scale + shift), p)`` with the same seed, and its tape backward equals
    autograd's through the same torch ops."""
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    torch.manual_seed(1)
    got = ops.affine_relu_dropout(z, scale, shift, 0.3)
    torch.manual_seed(1)
    h = torch.relu(z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    assert torch.equal(got, torch.nn.functional.dropout(h, 0.3, True))

    leaves = tuple(t.clone().requires_grad_() for t in (z, scale, shift))
    twins = tuple(t.clone().requires_grad_() for t in (z, scale, shift))
    g = torch.randn_like(z)
    torch.manual_seed(2)
    ops.run_taped(lambda calls: calls.affine_relu_dropout(*leaves, 0.3), leaves).backward(g)
    torch.manual_seed(2)
    with _Passthrough():  # the per-op path: autograd records the composite's torch ops
        ops.run_taped(lambda calls: calls.affine_relu_dropout(*twins, 0.3), twins).backward(g)
    for a, b in zip(leaves, twins, strict=True):
        assert_close(a.grad, b.grad, "fp64", "affine_relu_dropout grad")
