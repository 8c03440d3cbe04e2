"""Compile many kernel variants at once, in worker processes, before anything times them.

Tuning a U-Net's shapes times a few hundred (kernel, config) candidates, and compiling each
takes about a second of one CPU core; Triton's compiler holds the GIL, so threads do not help.
``precompile(launches)`` hands the launches recorded by ``_common.recording_launches`` (or by a
``SimulatedGPU``) to worker processes (``python -m <this module> JOBS.json CLAIMS``, one per core,
up to 16), each of which calls ``JITFunction.warmup`` with the same arguments: Triton compiles and
stores the binary in its on-disk cache, and the real launches later load it instead of compiling.

Arguments travel as JSON: a tensor as its dtype (``warmup`` stands a ``MockTensor`` in for it,
16-byte aligned like a fresh allocation), a host ``TensorDescriptor`` (the TMA variant's
operands) as its dtype, shape, strides, box and padding (the worker builds the same descriptor
over a ``MockTensor``; Triton specializes a descriptor on its dtype and box only, in 3.6 as in
3.9), everything else as its value, so the worker computes the same specialization as the launch
will (a tensor that is a misaligned slice specializes differently: that launch then compiles for
itself, which only costs time). ``distinct_jobs`` keeps one job per specialization: two launches
whose integers differ but fall in the same class (multiple of 16, equal to 1, 32/64-bit) share a
binary, so they are one job.

Workers share one job list and claim jobs one at a time (an exclusive-create file per job), so a
worker that drew slow kernels does not leave the others idle at the end. They are plain
subprocesses, not ``multiprocessing``: a spawned multiprocessing worker re-imports the user's
``__main__``, which would rerun an unguarded script; and they stay in the caller's process
group, so whoever kills that group (``benchmarks/gpu_check.py`` at a stage's limit) kills the
workers and their ``ptxas`` children with it. Everything here is best effort: a job that fails is
counted and reported, the launch compiles later as usual.

Without a GPU, ``precompile(..., arch=90)`` compiles for that architecture offline (a stand-in
Triton driver reports the target; nothing is loaded or run): what ``gpu_check.py --plan
--compile`` uses to rehearse the GPU run's compiles on a CPU machine.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["describe", "distinct_jobs", "precompile"]

_MAX_WORKERS = 16
_ARCH_ENV = "FASTUNET_PRECOMPILE_ARCH"
_DEVICE_ENV = "FASTUNET_PRECOMPILE_DEVICE"
_DRY_ENV = "FASTUNET_PRECOMPILE_DRY"


def _descriptor_type():
    try:  # triton >= 3.4 (3.6 on the GPU image)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - older triton has no host descriptors to describe
        return None
    return TensorDescriptor


def describe(fn, grid: tuple, args: tuple, meta: dict) -> dict | None:
    """A JSON-able description of one launch, or None when an argument cannot be described.

    Tensors become ``{"dtype": "bfloat16"}``; host tensor descriptors ``{"desc": {"dtype",
    "shape", "strides", "block", "padding"}}``; bools, ints, floats, strings and None travel as
    they are."""
    import torch

    inner = getattr(fn, "fn", None)
    if inner is None:
        return None
    descriptor = _descriptor_type()
    described = []
    for a in args:
        if isinstance(a, torch.Tensor):
            described.append({"dtype": str(a.dtype).removeprefix("torch.")})
        elif descriptor is not None and isinstance(a, descriptor):
            described.append(
                {
                    "desc": {
                        "dtype": str(a.base.dtype).removeprefix("torch."),
                        "shape": [int(s) for s in a.shape],
                        "strides": [int(s) for s in a.strides],
                        "block": [int(b) for b in a.block_shape],
                        "padding": getattr(a, "padding", "zero"),
                    }
                }
            )
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


def _int_class(v: int) -> str:
    """What Triton specializes an int argument on: its width, ``== 1`` and divisibility by 16."""
    width = "i32" if -(2**31) <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
    return f"{width}{'=1' if v == 1 else ''}{'/16' if v % 16 == 0 else ''}"


@functools.cache
def _param_kinds(fn) -> tuple[tuple[bool, bool], ...]:
    """``(constexpr, do_not_specialize)`` per parameter of a ``@triton.jit`` kernel, read from
    the Python function (the same for a compiled kernel and an interpreted one, which has no
    ``params``: a simulated GPU records under the interpreter)."""
    dns = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
    kinds = []
    for i, p in enumerate(inspect.signature(fn.fn).parameters.values()):
        kinds.append(("constexpr" in str(p.annotation), i in dns or p.name in dns))
    return tuple(kinds)


def _spec_key(fn, job: dict) -> str:
    """A key equal for two jobs exactly when Triton compiles them to the same binary: constexpr
    arguments by value, the rest by type and specialization class (descriptors: dtype and box)."""
    try:
        kinds = _param_kinds(fn)
    except (TypeError, ValueError, AttributeError):  # not a plain jit function: no sharing assumed
        kinds = ()
    parts = []
    for i, a in enumerate(job["args"]):
        constexpr, no_spec = kinds[i] if i < len(kinds) else (True, False)
        if isinstance(a, dict):
            parts.append(a.get("dtype") or {k: a["desc"][k] for k in ("dtype", "block", "padding")})
        elif constexpr or a is None or isinstance(a, str):
            parts.append(a)
        elif isinstance(a, bool):
            parts.append("i1")
        elif isinstance(a, int):
            parts.append("int" if no_spec else _int_class(a))
        else:
            parts.append("fp32")
    return json.dumps([job["module"], job["name"], parts, job["meta"]], sort_keys=True, default=str)


def distinct_jobs(launches) -> tuple[list[dict], int]:
    """``(jobs, undescribed)``: one job per distinct binary among ``launches`` (``(fn, grid,
    args, meta)`` tuples, in first-seen order; each job's ``key`` names its binary, so job lists
    recorded apart merge without duplicates) and how many launches could not be described."""
    jobs: dict[str, dict] = {}
    undescribed = 0
    for fn, grid, args, meta in launches:
        job = describe(fn, grid, args, meta)
        if job is None:
            undescribed += 1
            continue
        # One binary per specialization: the grid and the specialized ints' values do not change it.
        key = _spec_key(fn, job)
        jobs.setdefault(key, {**job, "key": key})
    return list(jobs.values()), undescribed


def precompile(
    launches,
    *,
    device_index: int = 0,
    workers: int | None = None,
    timeout: float = 900,
    arch: int | None = None,
    jobs: list[dict] | None = None,
    progress: str | None = None,
    dry: bool = False,
) -> dict:
    """Compile every distinct launch of ``launches`` (``(fn, grid, args, meta)`` tuples; or the
    ready ``jobs`` of ``distinct_jobs``) in worker processes.

    arch:     compile offline for ``sm_<arch>`` (no GPU needed; nothing is loaded), else for the
              GPU ``device_index``.
    progress: a file each worker appends one JSON line to per job as it ends (``name``,
              ``key``, ``ok``, ``error``, ``seconds``, ``cpu_s``), so a run cut short keeps what
              it did.
    dry:      the workers resolve each job's kernel but compile nothing (``gpu_check.py``'s
              simulated run: the plumbing without the minutes).

    Returns ``{"jobs", "compiled", "failed", "workers", "seconds", "cpu_s", "errors"}``
    (``cpu_s``: the workers' CPU time, compiler children included)."""
    t0 = time.perf_counter()
    if jobs is None:
        jobs, _ = distinct_jobs(launches)
    todo = list(jobs)
    summary: dict[str, Any] = {"jobs": len(todo), "compiled": 0, "failed": 0, "workers": 0, "errors": []}
    if not todo:
        summary["seconds"] = summary["cpu_s"] = 0.0
        return summary
    n = workers or min(_MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))
    n = max(1, min(n, len(todo)))
    env = dict(os.environ, **{_DEVICE_ENV: str(device_index)})
    env.pop("TRITON_INTERPRET", None)
    env.pop(_ARCH_ENV, None)
    env.pop(_DRY_ENV, None)
    if dry:
        env[_DRY_ENV] = "1"
    if arch is not None:
        env[_ARCH_ENV] = str(int(arch))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="fastunet-precompile-") as tmp:
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(todo, f)
        claims = os.path.join(tmp, "claims")
        os.mkdir(claims)
        cmd = [sys.executable, "-m", __name__, path, claims] + ([progress] if progress else [])
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)
        ]
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
            summary["errors"] += result["errors"][: max(0, 10 - len(summary["errors"]))]
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary["cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


class _OfflineDriver:
    """What ``JITFunction.warmup`` asks of Triton's driver, answered for a GPU that is not
    there: device 0, stream 0, ``cuda`` target ``sm_<arch>`` (warp size 32, as the offline
    compile report uses). ``warmup`` compiles and returns; nothing is loaded, so nothing else of
    the driver is reached."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _argument(a):
    """A job's argument as ``warmup`` takes it (see ``describe``)."""
    import torch

    if not isinstance(a, dict):
        return a
    if "dtype" in a:
        return getattr(torch, a["dtype"])
    from triton.runtime.jit import MockTensor

    d = a["desc"]
    base = MockTensor(getattr(torch, d["dtype"]), d["shape"])
    descriptor = _descriptor_type()
    return descriptor(base, d["shape"], d["strides"], d["block"], d.get("padding", "zero"))


def _cpu_seconds() -> float:
    """CPU time of this process and its ended children (ptxas): what a job costs on any machine,
    where its wall time depends on how many others share the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _claim(claims: str, i: int) -> bool:
    try:
        os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _run_jobs(jobs: list[dict], claims: str, progress: str | None = None) -> dict:
    """Worker side: ``warmup`` every job this worker claims; returns counts and the first errors."""
    import importlib

    arch = os.environ.get(_ARCH_ENV)
    if arch:
        from triton.runtime.driver import driver

        driver.set_active(_OfflineDriver(int(arch)))
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get(_DEVICE_ENV, "0")))
    dry = os.environ.get(_DRY_ENV) == "1"
    compiled = failed = 0
    errors = []
    for i, job in enumerate(jobs):
        if not _claim(claims, i):
            continue
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        error = None
        try:
            fn = getattr(importlib.import_module(job["module"]), job["name"])
            if not dry:
                fn.warmup(*[_argument(a) for a in job["args"]], grid=tuple(job["grid"]), **job["meta"])
            compiled += 1
        except Exception as exc:  # noqa: BLE001  (a failed job only means a later compile)
            failed += 1
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            if len(errors) < 5:
                errors.append(f"{job['name']} {job['meta']}: {error}")
        if progress:
            line = {"name": job["name"], "key": job.get("key"), "ok": error is None, "error": error}
            line.update(seconds=round(time.perf_counter() - t0, 3), cpu_s=round(_cpu_seconds() - cpu0, 3))
            with open(progress, "a") as f:  # one short append per job: lines do not interleave
                f.write(json.dumps(line, default=str) + "\n")
    return {"compiled": compiled, "failed": failed, "errors": errors}


if __name__ == "__main__":
    with open(sys.argv[1]) as jobs_file:
        print(json.dumps(_run_jobs(json.load(jobs_file), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
