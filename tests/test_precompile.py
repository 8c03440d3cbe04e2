"""``kernels._precompile``: launches recorded by ``fastunet.tune``'s first pass are compiled in
worker processes (``JITFunction.warmup``) before anything is timed. Here the workers run a
stand-in kernel whose ``warmup`` logs its call, so what travels (dtypes for tensors, values,
meta) and the bookkeeping (dedup, failures, several workers) are checked without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
import _precompile_probe  # noqa: E402
from fastunet.kernels import _precompile  # noqa: E402


def test_describe_sends_dtypes_for_tensors_and_values_for_the_rest():
    k = _precompile_probe.probe_kernel
    job = _precompile.describe(k, (4, 2), (torch.zeros(2, dtype=torch.bfloat16), 3, 1.5, True, None), {"BLOCK": 64})
    assert job["module"] == "_precompile_probe" and job["name"] == "probe_kernel"
    assert job["args"] == [{"dtype": "bfloat16"}, 3, 1.5, True, None]
    assert job["grid"] == [4, 2] and job["meta"] == {"BLOCK": 64}
    assert _precompile.describe(k, (1,), (object(),), {}) is None, "an argument that cannot travel"


def test_workers_compile_each_distinct_launch_once(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("PRECOMPILE_PROBE_LOG", str(log))
    k = _precompile_probe.probe_kernel
    x = torch.zeros(3, dtype=torch.float16)
    launches = [
        (k, (1,), (x, 7), {"BLOCK": 32, "num_warps": 4}),
        (k, (9,), (x, 7), {"BLOCK": 32, "num_warps": 4}),  # same binary, another grid: compiled once
        (k, (1,), (x, 7), {"BLOCK": 64, "num_warps": 8}),
        (k, (1,), (x, 7), {"BLOCK": 64, "fail": True}),
    ]
    summary = _precompile.precompile(launches, workers=2)
    assert summary["jobs"] == 3 and summary["compiled"] == 2 and summary["failed"] == 1, summary
    assert summary["workers"] == 2 and any("does not compile" in e for e in summary["errors"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(c["meta"]["BLOCK"] for c in calls) == [32, 64]
    assert all(c["args"][0] == "torch.float16" and c["args"][1] == "7" for c in calls)


def test_nothing_to_do():
    assert _precompile.precompile([])["jobs"] == 0
