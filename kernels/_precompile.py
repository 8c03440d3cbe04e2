"""Compile many kernel variants at once, in worker processes, before anything times them.

Tuning a U-Net's shapes times a few hundred (kernel, config) candidates, and compiling each
takes about a second of one CPU core; Triton's compiler holds the GIL, so threads do not help.
``precompile(launches)`` hands the launches recorded by ``_common.recording_launches`` to
worker processes (``python -m <this module> JOBS.json``, one per core, up to 16), each of which calls
``JITFunction.warmup`` with the same arguments: Triton compiles and stores the binary in its
on-disk cache, and the real launches later load it instead of compiling.

Arguments travel as JSON: a tensor as its dtype (``warmup`` stands a ``MockTensor`` in for it,
16-byte aligned like a fresh allocation), everything else as its value, so the worker computes
the same specialization as the launch will (a tensor that is a misaligned slice specializes
differently: that launch then compiles for itself, which only costs time).

Workers are plain subprocesses, not ``multiprocessing``: a spawned multiprocessing worker
re-imports the user's ``__main__``, which would rerun an unguarded script. Everything here is
best effort: a job that fails is counted and reported, the launch compiles later as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["describe", "precompile"]

_MAX_WORKERS = 16


def describe(fn, grid: tuple, args: tuple, meta: dict) -> dict | None:
    """A JSON-able description of one launch, or None when an argument cannot be described."""
    import torch

    inner = getattr(fn, "fn", None)
    if inner is None:
        return None
    described = []
    for a in args:
        if isinstance(a, torch.Tensor):
            described.append({"dtype": str(a.dtype).removeprefix("torch.")})
        elif isinstance(a, (bool, int, float, str)) or a is None:
            described.append(a)
        else:
            return None
    return {
        "module": inner.__module__,
        "name": inner.__name__,
        "args": described,
        "grid": [int(g) for g in grid],
        "meta": dict(meta),
    }


def precompile(launches, *, device_index: int = 0, workers: int | None = None, timeout: float = 900) -> dict:
    """Compile every distinct launch of ``launches`` (``(fn, grid, args, meta)`` tuples) in
    worker processes. Returns ``{"jobs", "compiled", "failed", "workers", "seconds", "errors"}``."""
    t0 = time.perf_counter()
    jobs: dict[str, dict] = {}
    for fn, grid, args, meta in launches:
        job = describe(fn, grid, args, meta)
        if job is not None:
            # One binary per specialization: the grid does not change it.
            jobs.setdefault(json.dumps({**job, "grid": None}, sort_keys=True), job)
    todo = list(jobs.values())
    summary: dict[str, Any] = {"jobs": len(todo), "compiled": 0, "failed": 0, "workers": 0, "errors": []}
    if not todo:
        summary["seconds"] = 0.0
        return summary
    n = workers or min(_MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))
    n = max(1, min(n, len(todo)))
    chunks = [todo[i::n] for i in range(n)]
    env = dict(os.environ, FASTUNET_PRECOMPILE_DEVICE=str(device_index))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory(prefix="fastunet-precompile-") as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            path = os.path.join(tmp, f"jobs{i}.json")
            with open(path, "w") as f:
                json.dump(chunk, f)
            cmd = [sys.executable, "-m", __name__, path]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        summary["workers"] = len(procs)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
            except (subprocess.TimeoutExpired, ValueError) as exc:
                proc.kill()
                out, err = proc.communicate()
                result = None
                summary["errors"].append(f"worker: {type(exc).__name__}")
            if result is None:
                summary["errors"].append(f"worker exited {proc.returncode}: {(err or '')[-500:]}")
                continue
            summary["compiled"] += result["compiled"]
            summary["failed"] += result["failed"]
            summary["errors"] += result["errors"][:5]
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _run_jobs(jobs: list[dict]) -> dict:
    """Worker side: ``warmup`` every job; returns counts and the first errors."""
    import importlib

    import torch

    index = int(os.environ.get("FASTUNET_PRECOMPILE_DEVICE", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(index)
    compiled = failed = 0
    errors = []
    for job in jobs:
        try:
            fn = getattr(importlib.import_module(job["module"]), job["name"])
            args = [getattr(torch, a["dtype"]) if isinstance(a, dict) else a for a in job["args"]]
            fn.warmup(*args, grid=tuple(job["grid"]), **job["meta"])
            compiled += 1
        except Exception as exc:  # noqa: BLE001  (a failed job only means a later compile)
            failed += 1
            if len(errors) < 5:
                errors.append(f"{job['name']} {job['meta']}: {type(exc).__name__}: {str(exc)[:300]}")
    return {"compiled": compiled, "failed": failed, "errors": errors}


if __name__ == "__main__":
    with open(sys.argv[1]) as jobs_file:
        print(json.dumps(_run_jobs(json.load(jobs_file))))
