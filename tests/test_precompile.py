"""``kernels._precompile``: launches recorded by ``fastunet.tune``'s first pass (or by a simulated
GPU, ``benchmarks/gpu_plan.py``) are compiled in worker processes (``JITFunction.warmup``) before
anything is timed. Most tests run a stand-in kernel whose ``warmup`` logs its call, so what
travels (dtypes for tensors, descriptors, values, meta) and the bookkeeping (dedup by
specialization, failures, several workers) are checked without a GPU; one compiles a real TMA
launch offline for sm_90 and checks that the launch's own arguments then find that binary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_descriptors_travel_as_dtype_shape_strides_box():
    """A TMA launch's host TensorDescriptor is described, and the worker rebuilds one that
    Triton specializes the same way (dtype and box) over a MockTensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.zeros(2, 8, 16, 32, dtype=torch.float16)
    desc = TensorDescriptor.from_tensor(x, [1, 1, 16, 16])
    job = _precompile.describe(_precompile_probe.probe_kernel, (3,), (x, desc, 5), {})
    assert job["args"][1] == {
        "desc": {"dtype": "float16", "shape": [2, 8, 16, 32], "strides": [4096, 512, 32, 1], "block": [1, 1, 16, 16],
                 "padding": "zero"}
    }  # fmt: skip
    rebuilt = _precompile._argument(job["args"][1])
    assert isinstance(rebuilt, TensorDescriptor) and rebuilt.base.dtype == torch.float16
    assert list(rebuilt.shape) == [2, 8, 16, 32] and list(rebuilt.strides) == [4096, 512, 32, 1]
    assert list(rebuilt.block_shape) == [1, 1, 16, 16]


def test_one_job_per_specialization():
    """Ints Triton specializes alike (multiple of 16, not 1, 32-bit) share a binary: one job."""
    import importlib

    k = importlib.import_module("fastunet.kernels.maxpool2x2")._maxpool2x2_kernel
    x = torch.zeros(4, dtype=torch.float16)
    base = [x] * 4 + [32] * 12  # 4 pointers, N .. stride_ow; the constexprs travel in meta
    other = list(base)
    other[-1] = 48  # also a multiple of 16
    odd = list(base)
    odd[-1] = 7
    launches = [(k, (1,), tuple(a), {"BLOCK_P": 64}) for a in (base, other, odd)]
    jobs, undescribed = _precompile.distinct_jobs(launches)
    assert undescribed == 0 and len(jobs) == 2
    assert len(_precompile.distinct_jobs(launches + [(k, (1,), tuple(base), {"BLOCK_P": 128})])[0]) == 3


_REAL_LAUNCH = textwrap.dedent(
    """
    import json, os, sys, torch
    from fastunet.kernels import _common, _precompile, conv3x3 as K, conv3x3_tma as T
    from triton.runtime.driver import driver
    x = torch.randn(1, 16, 4, 8).half().contiguous(memory_format=torch.channels_last)
    w = K.pack_conv3x3_weight(torch.randn(16, 16, 3, 3).half())
    s, t = torch.ones(16), torch.zeros(16)
    out = torch.empty(1, 16, 4, 8, dtype=torch.half).contiguous(memory_format=torch.channels_last)
    with _common.recording_launches() as launches:
        T.conv3x3_tma_launch(T.INTERPRETER_CONFIG, x, None, w, s, t, out, relu=True, dot_precision="ieee")
    if sys.argv[1] == "describe":
        print(json.dumps(_precompile.distinct_jobs(launches)[0]))
    else:  # the launch's own tensors and descriptors, compiled for sm_90 (a cache hit or not)
        driver.set_active(_precompile._OfflineDriver(90))
        for fn, grid, args, meta in launches:
            fn.warmup(*args, grid=grid, **meta)
    """
)


@pytest.mark.slow  # one TMA kernel compiled for sm_90 (~3 s) and three interpreter-free processes
def test_tma_launches_are_described_and_compiled_by_workers(tmp_path):
    """A TMA launch (five host descriptors) travels to a worker, which compiles it for sm_90;
    the launch's real arguments then find that binary in Triton's cache (nothing new compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", _REAL_LAUNCH, mode], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    jobs = json.loads(run("describe").strip().splitlines()[-1])
    assert len(jobs) == 1 and jobs[0]["name"] == "_conv3x3_tma_kernel"
    assert sum("desc" in a for a in jobs[0]["args"] if isinstance(a, dict)) == 5
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = env["TRITON_CACHE_DIR"]
    try:
        summary = _precompile.precompile(None, jobs=jobs, workers=1, arch=90)
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR")
        else:
            os.environ["TRITON_CACHE_DIR"] = old
    assert summary["compiled"] == 1 and summary["failed"] == 0, summary
    cache = Path(env["TRITON_CACHE_DIR"])
    entries = {p.name for p in cache.iterdir()}
    assert any(f.suffix == ".cubin" for f in cache.rglob("*")), "the worker compiled to a cubin"
    run("launch")
    assert {p.name for p in cache.iterdir()} == entries, "the real launch compiled again: its key differs"
