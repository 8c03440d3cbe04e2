"""The per-parameter-version cache of derived weights (``fastunet.ops.derived``): hits while the
parameter is unchanged, remade on every kind of change, never used where it would be wrong, and
the training step bit-identical with and without it."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet.ops import derived as D


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, w):
        self.calls += 1
        return w.detach().to(torch.bfloat16) * 1  # a fresh tensor, as a pack is


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch):
    D.clear()
    monkeypatch.setattr(D, "ENABLED", True)  # opt-in: these tests are about the cache itself
    yield
    D.clear()


def test_off_by_default_so_an_update_through_data_is_seen(monkeypatch):
    # p.data.sub_(...) changes neither _version nor the storage: a kept pack would be stale.
    monkeypatch.undo()
    assert D.ENABLED is False
    w = torch.nn.Parameter(torch.randn(4, 3))
    version = w._version
    first = D.derived(w, "k", _Counting())
    w.data.add_(1.0)
    assert w._version == version  # invisible to the version counter
    again = D.derived(w, "k", _Counting())
    assert torch.equal(again, (w.detach().to(torch.bfloat16) * 1)) and not torch.equal(again, first)
    assert D.cache_size() == 0


def test_hit_while_unchanged_and_per_key():
    w = torch.nn.Parameter(torch.randn(4, 3))
    make = _Counting()
    a = D.derived(w, ("k", torch.bfloat16), make)
    assert D.derived(w, ("k", torch.bfloat16), make) is a and make.calls == 1
    b = D.derived(w, ("other", torch.bfloat16), make)  # another key: its own entry
    assert b is not a and make.calls == 2 and D.cache_size() == 2
    torch.testing.assert_close(a, w.detach().to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("change", ["inplace", "data_swap", "device", "module_to"])
def test_remade_on_change(change):
    lin = torch.nn.Linear(3, 4)
    w = lin.weight
    make = _Counting()
    first = D.derived(w, "k", make)
    if change == "inplace":
        with torch.no_grad():
            w.add_(1.0)  # what an optimizer step does: _version bumps
    elif change == "data_swap":
        w.data = torch.randn(4, 3)
    elif change == "device":
        lin.to("meta")  # the parameter object may be replaced or keep it with new storage: both remake
        w = lin.weight
    else:
        lin.to(torch.float64)  # the parameter object stays, its storage and dtype change
    again = D.derived(w, "k", make)
    assert make.calls == 2 and again is not first
    assert again.device == w.device
    if change != "device":
        torch.testing.assert_close(again, w.detach().to(torch.bfloat16) * 1, rtol=0, atol=0)


def test_not_cached_where_it_would_be_wrong():
    w = torch.nn.Parameter(torch.randn(4, 3))
    make = _Counting()

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _Watch():  # a dispatch mode (or a trace, functorch, a CUDA graph capture) must see the derivation
        D.derived(w, "k", make)
        D.derived(w, "k", make)
    assert make.calls == 2 and D.cache_size() == 0
    with torch.inference_mode():
        t = torch.randn(4, 3)  # an inference tensor: no version counter
    D.derived(t, "k", make)
    assert make.calls == 3 and D.cache_size() == 0


def test_entry_goes_with_its_tensor():
    w = torch.nn.Parameter(torch.randn(4, 3))
    D.derived(w, "k", _Counting())
    assert D.cache_size() == 1
    del w
    gc.collect()
    assert D.cache_size() == 0


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def _made(params) -> set[int]:
    """The derived tensors of ``params`` (the first conv's zero-padded weight is a new tensor
    every step: its pack is made per step and not counted here)."""
    ids = {id(p) for p in params}
    return {id(t) for e in D._ENTRIES.values() if id(e.ref()) in ids for t in e.made.values()}


def _assert_same(a, b):
    (y, g), (y_ref, g_ref) = a, b
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for ga, gb in zip(g, g_ref, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.model
@pytest.mark.usefixtures("triton_backend")
def test_training_steps_bit_identical_and_follow_optimizer(monkeypatch):
    """The fused training step with the cache equals one without it (a twin model whose every
    derivation is made afresh) bit for bit: on a hit, and after an optimizer's in-place update."""
    model = fastunet.UNet(3, 2, base_channels=4, depth=1).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin))
    uncached = D._cacheable
    params = [p for p in model.parameters() if p.dim() == 4]

    def twin_step():
        monkeypatch.setattr(D, "_cacheable", lambda t: False)
        try:
            return _step(twin, x)
        finally:
            monkeypatch.setattr(D, "_cacheable", uncached)

    for _ in range(2):
        _step(model, x)  # fills (first round) or finds every entry stale (second round)
        made = _made(params)
        assert len(made) >= len(params) - 1  # every weight but the first conv's (padded per step)
        _assert_same(_step(model, x), twin_step())
        assert made == _made(params)  # every derivation of the first step was a hit in the second
        opt.step()
        opt_twin.step()
