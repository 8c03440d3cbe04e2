"""fastunet._snapshot: when a cache derived from parameters is still current."""

from __future__ import annotations

import pytest
import torch

from fastunet import _snapshot
from fastunet._snapshot import SAMPLES, samples_unchanged, take_samples


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 32, 3, 3),
        lambda: torch.randn(64, 32, 3, 3).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(64, 32, 3, 3)[:, ::2],  # not dense: sampled by a copy per check
        lambda: torch.randn(5),
        lambda: torch.randn(0, 3),
        lambda: torch.randn(300, dtype=torch.float16),
        lambda: torch.randn(300, dtype=torch.bfloat16),
        lambda: torch.randn(300, dtype=torch.float64),
        lambda: torch.arange(300),
    ],
    ids=["contiguous", "channels_last", "strided", "tiny", "empty", "fp16", "bf16", "fp64", "int64"],
)
def test_whole_tensor_rewrite_is_seen(make):
    t = make()
    samples = take_samples([t])
    assert samples_unchanged([t], samples)
    views, saved = samples
    assert saved[0].numel() == min(t.numel(), SAMPLES) or t.numel() > SAMPLES
    assert saved[0].numel() <= SAMPLES
    if t.numel() == 0:
        return
    t.data.copy_(t + 1)  # through .data: the version counter does not move
    assert not samples_unchanged([t], samples)


def test_data_edit_leaves_the_version_alone():
    """Why the samples exist: ``.data`` has a version counter of its own."""
    p = torch.nn.Parameter(torch.randn(8))
    version = p._version
    p.data.mul_(2)
    assert p._version == version


@pytest.mark.parametrize("dense", [True, False], ids=["view", "copy"])
def test_nan_and_signed_zero_compare_bitwise(dense):
    def make(value):
        t = torch.full((100, 2), value)
        return t if dense else t[:, 0]  # a column: not dense, sampled by a copy

    t = make(float("nan"))
    samples = take_samples([t])
    assert samples_unchanged([t], samples)  # NaN equals its own bits: no rebuild per call
    z = make(0.0)
    samples = take_samples([z])
    z.data.neg_()  # -0.0 == 0.0 numerically, but the folded copies would hold +0.0
    assert not samples_unchanged([z], samples)


def test_samples_are_live_views_spread_over_the_tensor():
    n = 1000
    t = torch.zeros(n)
    samples = take_samples([t])
    hit = []
    for i in range(n):  # which single-element edits the samples see
        t.data[i] = 1.0
        hit.append(not samples_unchanged([t], samples))
        t.data[i] = 0.0
    seen = [i for i, h in enumerate(hit) if h]
    assert seen[0] == 0 and len(seen) == len(samples[1][0]) <= SAMPLES
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert max(gaps) == min(gaps) and n - 1 - seen[-1] < gaps[0]  # evenly over the whole tensor


def test_only_cpu_tensors_are_sampled():
    """Reading a CUDA tensor's values back would wait for the GPU on every forward."""
    assert take_samples([torch.empty(4, device="meta")]) is None
    assert samples_unchanged([torch.empty(4, device="meta")], None)


def test_is_current_checks_every_rule():
    a, b = torch.randn(10), torch.randn(10)
    versions, ptrs = _snapshot.tensors_state([a, b])

    class Plan:
        sources, samples = (a, b), take_samples([a, b])

    Plan.versions, Plan.ptrs = versions, ptrs
    assert _snapshot.is_current(Plan, (a, b), versions, ptrs)
    assert not _snapshot.is_current(Plan, (a, b.clone()), versions, ptrs)  # another object
    a.add_(1)  # in place: the version moves
    assert not _snapshot.is_current(Plan, (a, b), *_snapshot.tensors_state([a, b]))
    Plan.versions = _snapshot.tensors_state([a, b])[0]
    Plan.samples = take_samples([a, b])
    assert _snapshot.is_current(Plan, (a, b), *_snapshot.tensors_state([a, b]))
    b.data.mul_(3)  # through .data: only the samples see it
    assert not _snapshot.is_current(Plan, (a, b), *_snapshot.tensors_state([a, b]))


def test_sampled_devices_is_the_switch(monkeypatch):
    """``host_overhead.py`` empties it so that its simulated GPU's CPU tensors cost what a GPU's would."""
    monkeypatch.setattr(_snapshot, "SAMPLED_DEVICES", ())
    assert take_samples([torch.randn(4)]) is None
