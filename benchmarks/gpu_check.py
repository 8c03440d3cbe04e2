#!/usr/bin/env python
"""Everything worth knowing from a GPU, in one timed command: ``python benchmarks/gpu_check.py --out DIR``.

A GPU is lent to a session for minutes, rarely. This script spends them in order of value,
each stage a subprocess with its own time limit, and writes what it learned under DIR even
when a stage fails or the budget runs out:

1. ``environment``: GPU, driver, SMs, versions, the known limits of the installed triton.
2. ``tune``: ``fastunet tune`` for the target case (classic ``UNet(3, 1)``, batch 16, 256x256,
   bf16, inference and a training step): every candidate compiled in parallel, then timed;
   the picks land in the tuning cache the later stages reuse.
3. ``tests``: ring 3, ``pytest -m "cuda or gpu_check"``: every CUDA test of the suite and
   ``tests/test_tuned_configs.py`` (each tile config of each tuned kernel forced once against
   the float64 reference), in parallel workers when pytest-xdist is installed.
4. ``bench_inference`` / ``bench_training``: ``benchmarks/run.py`` on the target case (eager,
   torch.compile, fastunet, fastunet's CUDA-graph path) with its per-layer table, JSON and
   plot; max-autotune providers only with ``--full`` (they compile for minutes).

Files under DIR (at most eight, so a caller with a file limit gets them all):
``gpu_check.json`` (environment, every stage's status, time, counts and log tail, the tuning
cache's entries: each kernel shape's pick and every candidate's time),
``gpu_check.md`` (the same, readable), ``tests.log``, ``bench_inference.json``/``.png``,
``bench_training.json``/``.png``, ``run.log`` (every stage's full output).

Without an NVIDIA GPU it says so, writes nothing and exits 0. It installs nothing and needs no
package index (the GPU image: torch 2.11, triton 3.6; install fastunet first with
``pip install --no-deps --no-build-isolation -e .``). Exit status: 0 when every stage that ran
passed, 1 otherwise.

    python benchmarks/gpu_check.py --out /tmp/gpu [--budget 540] [--full] [--skip tests]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "tune", "tests", "bench_inference", "bench_training")
# Seconds each stage may take at most (a stage also never runs past the overall budget).
STAGE_LIMITS = {"environment": 60, "tune": 180, "tests": 240, "bench_inference": 150, "bench_training": 150}
# Below this many seconds of budget a stage is not started: it could not finish.
MIN_STAGE_S = 30
TARGET = {"batch": 16, "size": 256, "dtype": "bf16"}


def known_limits(triton_version: str, numpy_version: str) -> list[str]:
    """What the installed triton is known to get wrong, said up front instead of failing on it."""
    notes = []

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text)[:2])

    if version(triton_version) < (3, 7) and version(numpy_version) >= (2, 4):
        notes.append(
            f"triton {triton_version}'s interpreter fails on numpy {numpy_version} (>= 2.4; a range() over a runtime "
            "bound, fixed in triton 3.7): the ring-1 interpreter tests cannot run here; ring 3 runs on the GPU"
        )
    if version(triton_version) < (3, 7):
        notes.append(
            f"triton {triton_version}'s codegen spills on some small-C conv3x3 weight-gradient configs that 3.9 "
            "compiles without spills: the offline report (ring 2) lists them as known, not as failures"
        )
    return notes


def environment() -> dict:
    """GPU and software facts (runs in-process: it only reads)."""
    import numpy as np
    import torch

    info = {
        "date": dt.date.today().isoformat(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import fastunet

        info["fastunet"] = fastunet.__version__
    except ImportError as exc:
        info["fastunet"] = f"not importable: {exc}"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["git_commit"] = commit.stdout.strip() or None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "count": torch.cuda.device_count(),
        }
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    info["known_limits"] = known_limits(info.get("triton") or "0", info["numpy"])
    return info


def run_stage(name: str, cmd: list[str], limit: float, log, env: dict) -> dict:
    """Run one stage's command with a time limit; its output goes to ``log``."""
    t0 = time.perf_counter()
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        out, rc, status = proc.stdout + proc.stderr, proc.returncode, "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc, status = None, "timeout"
    log.write(out)
    log.flush()
    return {
        "stage": name,
        "status": status,
        "returncode": rc,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd),
        "tail": out[-2000:],
    }


def _pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line ("3 failed, 120 passed, 4 skipped in 80.1s")."""
    counts = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)", line)
        if found and " in " in line:
            counts = {k.rstrip("s") if k == "errors" else k: int(v) for v, k in found}
            break
    return counts


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Ring-3 tests, tuning and the target benchmark on an NVIDIA GPU, within a time budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python benchmarks/gpu_check.py --out /tmp/gpu --budget 540",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the results (created)")
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (stages stop at it)")
    p.add_argument("--full", action="store_true", help="also the max-autotune torch.compile providers (slow)")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES[1:], help="stages to leave out")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the tests (if installed)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU here (torch.cuda.is_available() is False): nothing to check, nothing written.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # never interpret on the GPU machine
    # The tuning cache stays outside DIR (a caller may fetch only a few files from it); its
    # entries are copied into gpu_check.json after the tune stage.
    cache = Path(env.setdefault("FASTUNET_CACHE_DIR", str(Path.home() / ".cache" / "fastunet")))
    report = {"environment": environment(), "stages": [], "budget_s": args.budget}
    print(json.dumps(report["environment"], indent=1), flush=True)

    def remaining() -> float:
        return args.budget - (time.perf_counter() - t_start)

    py = sys.executable
    bench_common = ["--batch", str(TARGET["batch"]), "--size", str(TARGET["size"]), "--dtype", TARGET["dtype"]]
    bench_common += ["--warmup", "5", "--reps", "20"]
    providers = ["eager_fp32_nchw", "eager_cl", "compile_default", "fastunet", "fastunet_compile"]
    if args.full:
        providers += ["compile_max_autotune", "compile_max_autotune_freezing"]
    plans = {
        "tune": [py, "-m", "fastunet", "tune", "--mode", "both", "--batch", str(TARGET["batch"]),
                 "--size", str(TARGET["size"]), "--dtype", TARGET["dtype"]],
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda or gpu_check", "tests"]
        + (["-n", str(args.workers)] if _has_xdist() and args.workers > 1 else []),
        "bench_inference": [py, "benchmarks/run.py", "--mode", "inference", *bench_common, "--out", str(args.out),
                            "--providers", *providers, "fastunet_cudagraph"],
        "bench_training": [py, "benchmarks/run.py", "--mode", "training", *bench_common, "--out", str(args.out),
                           "--providers", *providers],
    }  # fmt: skip
    with open(args.out / "run.log", "w") as log:
        for name in STAGES[1:]:
            if name in args.skip:
                report["stages"].append({"stage": name, "status": "skipped", "reason": "--skip"})
                continue
            limit = min(STAGE_LIMITS[name], remaining())
            if limit < MIN_STAGE_S:
                report["stages"].append({"stage": name, "status": "skipped", "reason": "out of budget"})
                continue
            print(f"== {name} (up to {limit:.0f} s)", flush=True)
            result = run_stage(name, plans[name], limit, log, env)
            if name == "tests":
                result["pytest"] = _pytest_summary(result["tail"])
                (args.out / "tests.log").write_text(result["tail"])
            if name == "tune":
                result["cache"] = {
                    str(f.relative_to(cache)): json.loads(f.read_text()) for f in cache.glob("tuning/*/*.json")
                }
            report["stages"].append(result)
            print(f"   {result['status']} in {result['seconds']} s", flush=True)
    # run.py names its files by device and date: give them the fixed names promised above.
    for mode in ("inference", "training"):
        # run.py appends -2, -3, ... rather than overwrite a same-day file: take the newest.
        made = [*args.out.glob(f"*_{mode}.json"), *args.out.glob(f"*_{mode}-[0-9]*.json")]
        made = sorted(made, key=lambda f: f.stat().st_mtime)
        if made:
            made[-1].rename(args.out / f"bench_{mode}.json")
            png = made[-1].with_suffix(".png")
            if png.exists():
                png.rename(args.out / f"bench_{mode}.png")
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    ok = all(s["status"] in ("passed", "skipped") for s in report["stages"])
    report["result"] = "passed" if ok else "failed"
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gpu_check {report['environment']['date']}: {report['result']} in {report['wall_s']} s", ""]
    gpu = report["environment"].get("gpu", {})
    lines.append(
        f"{gpu.get('name')} (sm_{gpu.get('capability', '?').replace('.', '')}, {gpu.get('sm_count')} SMs), torch "
        f"{report['environment']['torch']}, triton {report['environment']['triton']}, numpy "
        f"{report['environment']['numpy']}, commit {report['environment']['git_commit']}"
    )
    lines += [f"- note: {n}" for n in report["environment"]["known_limits"]]
    lines += ["", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    for s in report["stages"]:
        detail = s.get("reason") or (json.dumps(s["pytest"]) if s.get("pytest") else "")
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} | {detail} |")
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
