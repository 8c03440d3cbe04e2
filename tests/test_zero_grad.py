"""``UNet.zero_grad``: the gradients ``nn.Module.zero_grad`` resets, by a walk over the module
dicts, and torch's own wherever its walk could differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fastunet


def _model():
    torch.manual_seed(0)
    m = fastunet.UNet(3, 2, base_channels=4, depth=1)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    return m


def _grads(m):
    return [p.grad for p in m.parameters()]


@pytest.fixture
def torch_walks(monkeypatch):
    calls = []
    original = nn.Module.zero_grad

    def spy(self, set_to_none=True):
        calls.append(set_to_none)
        original(self, set_to_none)

    monkeypatch.setattr(nn.Module, "zero_grad", spy)
    return calls


def test_every_gradient_is_reset_without_torchs_walk(torch_walks):
    m = _model()
    shared = nn.Conv2d(1, 1, 1)  # one module at two places in the tree
    m.extra_a, m.extra_b = shared, shared
    shared.weight.grad = torch.ones_like(shared.weight)
    m.register_parameter("unused", None)
    assert sum(g is not None for g in _grads(m)) > 10
    m.zero_grad()
    assert all(g is None for g in _grads(m)) and torch_walks == []
    m.late = nn.Linear(2, 2)  # added after a first call: found as well (nothing is kept)
    m.late.bias.grad = torch.ones(2)
    m.zero_grad()
    assert m.late.bias.grad is None and torch_walks == []


def test_a_parametrized_weight_is_reset():
    m = _model()
    conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    original = conv.parametrizations.weight.original
    assert original.grad is not None
    m.zero_grad()
    assert original.grad is None and all(g is None for g in _grads(m))


def test_zeroing_in_place_is_torchs(torch_walks):
    m = _model()
    m.zero_grad(set_to_none=False)
    assert torch_walks == [False]
    assert all(g is None or (g == 0).all() for g in _grads(m)) and any(g is not None for g in _grads(m))


class _OwnListing(nn.Sequential):
    def named_modules(self, *args, **kwargs):
        yield from super().named_modules(*args, **kwargs)


class _OwnParameters(fastunet.UNet):
    def parameters(self, recurse=True):
        return super().parameters(recurse)


def test_a_tree_listed_its_own_way_takes_torchs_walk(torch_walks):
    m = _model()
    m.custom = _OwnListing(nn.Linear(2, 2))
    m.custom[0].weight.grad = torch.ones(2, 2)
    m.zero_grad()
    assert torch_walks == [True] and all(g is None for g in _grads(m))
    torch.manual_seed(0)
    own = _OwnParameters(3, 2, base_channels=4, depth=1)
    own(torch.randn(2, 3, 8, 8)).sum().backward()
    own.zero_grad()
    assert torch_walks == [True, True] and all(g is None for g in _grads(own))


def test_a_data_parallel_replica_warns_as_torch_does():
    m = _model()
    m._is_replica = True
    with pytest.warns(UserWarning, match="DataParallel"):
        m.zero_grad()
