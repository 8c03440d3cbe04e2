#!/usr/bin/env python
"""Everything worth knowing from a GPU, in one timed command: ``python benchmarks/gpu_check.py --out DIR``.

A GPU is lent for minutes, rarely: the first one this project meets gives one run of at most
9 minutes (``--budget 540``). The run is a sequence of stages, each a subprocess in its own
process group with its own time limit; the limits add up to at most 80% of the budget
(``STAGE_LIMITS``, checked by a test), so a slow start or a slow stage still leaves room.

Stages, in the order of what a lost minute costs:

1. ``environment`` (in this process, seconds): GPU, driver, versions, which optional modules are
   importable, the known limits of the installed triton. Without it no other number can be read.
2. ``precompile``: every kernel the later stages launch, found by recording their workloads on a
   simulated GPU of this GPU's kind (``benchmarks/gpu_plan.py``; the cuda-only tests on the GPU
   itself, launches recorded, nothing run), compiled up front by 16 worker processes
   (``kernels/_precompile.py``, TMA kernels included), in the order the rest needs them: the
   most telling tests' kernels, then tune's and the benchmarks', then the other tests'. First
   because a minute here saves ~16 minutes of serial compiling inside the timed stages, and what
   it leaves undone is only compiled later, never lost.
3. ``tests``: ring 3, ``pytest -m "cuda or gpu_check"`` with ``FASTUNET_AUTOTUNE=0`` (rule picks:
   tuning is the next stage's job) over every CUDA-capable test, file by file with the most
   telling first (``gpu_plan.TESTS_FIRST``: ``tests/test_tuned_configs.py``, which forces each
   tile config of each tuned kernel once against the float64 reference, the TMA variant, the
   up-sampled-source conv, the whole model), so a cut run has done those. Before tuning and
   benchmarks because correctness comes first: a wrong kernel makes every figure after it
   meaningless, and ring 3 is the one check no CPU ring can make.
4. ``tune``: ``fastunet.tune`` for the target case (classic ``UNet(3, 1)``, batch 16, 256x256,
   bf16, inference and a training step); its picks land in the tuning cache the benchmarks reuse.
   Before them so the figures are the tuned ones; if it is cut, the benchmarks tune the rest on
   first use inside their own limits.
5. ``bench_inference``, then 6. ``bench_training``: ``benchmarks/run.py`` on the target case with
   the providers the targets judge (``PROVIDERS``: fastunet first, then eager channels_last AMP,
   for inference fastunet's CUDA-graph path and torch.compile, then eager fp32 NCHW; no compile in
   training) and the per-layer table once (inference); inference first, the issue's headline
   target. The other compile providers only with ``--full``.

Every stage writes its own files the moment it ends, and keeps partial results when its limit
cuts it (SIGINT to its group, then SIGKILL ``GRACE_S`` later, so compile workers and ``ptxas``
children never outlive their stage); ``gpu_check.json`` and ``gpu_check.md`` are rewritten
(atomically) after every stage. Files under DIR, ``<stage>.log`` (its whole output) and
``<stage>.json`` (its status, time and summary, written as it goes) for every stage, and:

``gpu_check.json`` / ``gpu_check.md``  environment, every stage's status, time, limit and summary
``precompile.jsonl``                one line per kernel compiled (name, ok, wall and CPU seconds)
``tests.xml``                       JUnit of ring 3 (``tests.log``: one ``-v`` line per test as it ends)
``bench_<mode>.jsonl``              one line per benchmark row as it is measured
``bench_<mode>_results.json``       run.py's JSON (every row, the per-layer table, the targets) and
``bench_<mode>.png``                its plot

Without an NVIDIA GPU it says so, writes nothing and exits 0. It installs nothing and needs no
package index (the GPU image: torch 2.11, triton 3.6; install fastunet first with ``pip install
--no-deps --no-build-isolation -e .``). Exit status: 0 when every stage that ran passed, 1
otherwise.

    python benchmarks/gpu_check.py --out /tmp/gpu [--budget 540] [--full] [--skip tests]
    python benchmarks/gpu_check.py --plan [--compile --workers 16]   # no GPU needed

``--plan`` prints the stages, their limits and how many kernels each launches (recorded as the
precompile stage records them), and the precompile stage's compile order; with ``--compile`` it
also compiles every piece offline for sm_90 with ``--workers`` processes and reports each one's
wall and CPU seconds: the rehearsal of the GPU run's compiles on a CPU machine.

Test-only switch: ``FASTUNET_GPU_CHECK_SIMULATE=1`` runs the whole script without a GPU against
a simulated H100 (``kernels._common.simulate_gpu``) on a small case (``gpu_plan.SIM_TARGET``):
the precompile stage records for real but its workers only resolve each kernel (no compile),
tune runs with launches stubbed, the tests stage runs ``--tests-args`` and the benchmarks run
``run.py``'s CPU smoke case. It checks the orchestration (process groups, limits, files), never
a kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_plan
from gpu_plan import TESTS_ARGS, simulating, target, write_json

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
STAGES = ("environment", "precompile", "tests", "tune", "bench_inference", "bench_training")
BUDGET_S = 540
# Seconds each stage may take at most, its grace period included; a stage also never runs
# past the overall budget. Their sum stays within 80% of BUDGET_S (tests/test_benchmarks.py).
STAGE_LIMITS = {
    "environment": 15,
    "precompile": 150,
    "tests": 110,
    "tune": 75,
    "bench_inference": 55,
    "bench_training": 25,
}
MARGIN = 0.2
NO_LIMIT = 7 * 24 * 3600.0  # for calls whose limit is someone else's (the stage's, the rehearsal's)
# A cut stage gets SIGINT first (pytest then writes its summary, run.py its streamed rows are
# already on disk), and SIGKILL this much later.
GRACE_S = 8
# Below this many seconds of budget a stage is not started: it could not finish.
MIN_STAGE_S = 20
OPTIONAL_MODULES = ("pytest", "xdist", "tqdm", "matplotlib", "safetensors", "filelock")
# What the targets judge (docs/benchmarks.md "Targets"): eager channels_last AMP and the best torch.compile for
# inference, eager channels_last AMP for training; eager fp32 NCHW costs seconds. The rest only
# with --full: each Inductor compile (of the reference, of fastunet, of a training step) costs
# tens of seconds of a budget that has none to spare, and no training target judges one.
# In the order of what a cut stage must not lose: fastunet, its baseline, then the rest (run.py
# streams each row as it is measured).
PROVIDERS = {
    "inference": ["fastunet", "eager_cl", "fastunet_cudagraph", "compile_default", "eager_fp32_nchw"],
    "training": ["fastunet", "eager_cl", "eager_fp32_nchw"],
}
FULL_PROVIDERS = {
    "inference": ["fastunet_compile", "compile_max_autotune", "compile_max_autotune_freezing"],
    "training": ["compile_default", "fastunet_compile"],
}


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


def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit, or None: no git binary (the GPU image may have none), not a
    checkout, or anything else that goes wrong (the stamp is never worth a crash)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_facts() -> dict:
    """``{"name", "arch", "sms", ...}`` of GPU 0, or of the simulated H100 under the switch."""
    if simulating():
        from fastunet.kernels._common import SimulatedGPU

        sim = SimulatedGPU()
        return {"name": sim.name, "arch": sim.arch, "sms": sim.sms, "capability": f"{sim.arch // 10}.{sim.arch % 10}"}
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "arch": 10 * props.major + props.minor,
        "sms": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "count": torch.cuda.device_count(),
    }


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
        "cpus": os.cpu_count(),
        "simulated": simulating(),
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
    info["git_commit"] = git_commit()
    info["modules"] = {name: _importable(name) for name in OPTIONAL_MODULES}
    info["gpu"] = gpu_facts()
    smi = shutil.which("nvidia-smi")
    if smi and not simulating():
        try:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    info["known_limits"] = known_limits(info.get("triton") or "0", info["numpy"])
    return info


# ------------------------------------------------------------------------------ running stages
def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_stage(cmd: list[str], limit: float, log_path: Path, env: dict, *, grace: float = GRACE_S) -> dict:
    """Run ``cmd`` as the leader of a new process group with its output in ``log_path``; at
    ``limit - grace`` seconds the group gets SIGINT, at ``limit`` SIGKILL, and whatever is left of
    the group is killed when the leader ends (compile workers and their children included).
    Returns ``{"status": "passed" | "failed" | "timeout", "returncode", "seconds"}``."""
    t0 = time.perf_counter()
    grace = min(grace, limit / 4)
    with open(log_path, "a") as log:
        log.write(f"===== {' '.join(cmd)} (limit {limit:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        status = None
        try:
            rc = proc.wait(timeout=max(0.1, limit - grace))
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        finally:
            # The leader is gone (or going): nothing it started may survive into the next stage.
            _kill_group(proc.pid, signal.SIGKILL)
    return {
        "status": status or ("passed" if rc == 0 else "failed"),
        "returncode": rc,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------ stage bodies
# Each runs in the stage's own process (``--stage NAME``), fills ``result`` as it goes and is
# written to DIR/<stage>.json when it ends, also when cut (SIGINT arrives as KeyboardInterrupt).


def compile_order(recorded: dict[str, dict]) -> list[tuple[str, list[dict]]]:
    """``[(piece, jobs)]``: the recorded stages' binaries, each once, in the order to compile
    them: the tests of the first files (``gpu_plan.TESTS_FIRST``), tune, the benchmarks, the
    rest of the tests; so a cut precompile has built what the most telling tests and every
    figure need, and leaves the tail of the test run to compile in the stage."""
    tests = recorded.get("tests", {})
    head = tests.get("head", len(tests.get("jobs", [])))
    pieces = [("tests", tests.get("jobs", [])[:head])] if "tests" in recorded else []
    pieces += [(s, recorded[s].get("jobs", [])) for s in STAGES[3:] if s in recorded]
    pieces += [("tests (rest)", tests["jobs"][head:])] if "tests" in recorded else []
    seen: set[str] = set()
    order = []
    for piece, jobs in pieces:
        new = [j for j in jobs if j["key"] not in seen]
        seen.update(j["key"] for j in new)
        order.append((piece, new))
    return order


def stage_precompile(args, result: dict, write) -> None:
    """Record every later stage's launches (in parallel: one process per stage, the tests in
    shards), then compile them piece by piece in ``compile_order``."""
    from fastunet.kernels import _precompile

    gpu = gpu_facts()
    todo = [s for s in STAGES[2:] if s not in args.skip]
    result.update(gpu=gpu, stages={})
    progress = args.out / "precompile.jsonl"
    with tempfile.TemporaryDirectory(prefix="fastunet-gpu-plan-") as tmp:
        recorded = gpu_plan.record_all(
            todo,
            Path(tmp),
            arch=gpu["arch"],
            sms=gpu["sms"],
            name=gpu["name"],
            tests_args=args.tests_args,
            on_gpu=not simulating(),
        )
    for s in todo:
        info = {k: v for k, v in recorded[s].items() if k not in ("jobs", "per_test")}
        result["stages"][s] = info
    write()
    result["compiled"] = {}
    for piece, jobs in compile_order({s: r for s, r in recorded.items() if "error" not in r}):
        entry = result["compiled"][piece] = {"jobs": len(jobs)}
        write()
        entry.update(
            _precompile.precompile(
                None,
                jobs=jobs,
                workers=args.workers,
                device_index=0,
                progress=str(progress),
                dry=simulating(),
                timeout=NO_LIMIT,  # the stage's limit is the limit
            )
        )
        write()


def _pytest_counts(text: str) -> dict:
    """Outcome counts from pytest ``-v`` lines (a cut run has no summary line): one per test;
    ``selected``: how many the run had to do (a cut run did fewer)."""
    counts: dict[str, int] = {}
    failed = []
    for line in text.splitlines():
        found = re.search(r"(\S+::\S+).*?\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line) or re.search(
            r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b.*?(\S+::\S+)", line
        )
        if not found:
            continue
        a, b = found.groups()
        nodeid, outcome = (a, b) if "::" in a else (b, a)
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(nodeid)
    found = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?", text)
    selected = int(found.group(1)) - int(found.group(2) or 0) if found else None
    return {"selected": selected, "counts": counts, "failed": failed[:200]}


def stage_tests(args, result: dict, write) -> None:
    """Ring 3 in a pytest subprocess (same process group), autotuning off, one ``-v`` line per test."""
    # A test module that cannot import (tests/test_convert.py needs h5py, which an offline GPU
    # image may lack) would otherwise stop the whole session at collection, running nothing.
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    cmd += ["--junitxml", str(args.out / "tests.xml")]
    cmd += args.tests_args or TESTS_ARGS
    if _importable("xdist") and args.xdist > 1:
        cmd += ["-n", str(args.xdist)]
    env = dict(os.environ, FASTUNET_AUTOTUNE="0")
    result["command"] = " ".join(cmd)
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    log = args.out / "tests.log"
    try:
        result["returncode"] = proc.wait()
    except KeyboardInterrupt:  # the limit: pytest got the same SIGINT and writes its summary
        result.update(_pytest_counts(log.read_text(errors="replace")), status="cut")
        write()  # the counts so far, before the SIGKILL that may follow
        with contextlib.suppress(subprocess.TimeoutExpired):
            result["returncode"] = proc.wait(timeout=GRACE_S / 2)
        raise
    finally:
        result.update(_pytest_counts(log.read_text(errors="replace")))
    result["ok"] = result["returncode"] == 0


@contextlib.contextmanager
def _target_device():
    """The GPU, or under the test-only switch a CPU device with the simulated GPU active."""
    import torch

    if not simulating():
        yield torch.device("cuda")
        return
    from fastunet.kernels import _common

    import fastunet

    fastunet.set_backend("triton")
    with _common.simulate_gpu(_common.SimulatedGPU(record=False)):
        yield torch.device("cpu")


def stage_tune(args, result: dict, write) -> None:
    """``fastunet.tune`` on the target case, both modes; the cache's entries into the result."""
    import torch

    import fastunet
    from fastunet import tuning

    case = target()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    with _target_device() as device:
        model = fastunet.UNet(3, 1).to(device)
        x = torch.randn(case["batch"], 3, case["size"], case["size"], device=device)
        report = tuning.tune(model, x, modes=("eval", "train"), dtype=dtype)
        print(report, flush=True)
        result["report"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}
        cache = tuning.cache_file(device)
    result["cache_file"] = str(cache)
    try:
        result["cache"] = json.loads(cache.read_text())
    except (OSError, ValueError) as exc:
        result["cache"] = f"unreadable: {exc}"


def stage_bench(args, result: dict, write, mode: str) -> None:
    """``benchmarks/run.py`` in this process; rows stream to bench_<mode>.jsonl as measured, and
    its JSON and plot get fixed names (``bench_<mode>_results.json``, ``bench_<mode>.png``)."""
    import run as bench

    rows = args.out / f"bench_{mode}.jsonl"
    if simulating():  # the CPU smoke case: files and streaming, not kernels
        argv = ["--device", "cpu", "--quick", "--batch", "1", "--size", "32", "--dtype", "fp32"]
        argv += ["--providers", "eager_fp32_nchw", "fastunet"]
    else:
        providers = PROVIDERS[mode] + (FULL_PROVIDERS[mode] if args.full else [])
        case = target()
        argv = ["--batch", str(case["batch"]), "--size", str(case["size"]), "--dtype", case["dtype"]]
        argv += ["--warmup", "5", "--reps", "20", "--providers", *providers]
        # The per-layer table times eval-mode ops: the inference stage's, not again here.
        argv += ["--no-layers"] if mode == "training" else []
    with tempfile.TemporaryDirectory(prefix=f".bench_{mode}-", dir=args.out) as tmp:
        result["returncode"] = bench.main(["--mode", mode, *argv, "--out", tmp, "--rows", str(rows)])
        made = sorted(Path(tmp).glob("*.json"))
        if made:
            os.replace(made[-1], args.out / f"bench_{mode}_results.json")
            if made[-1].with_suffix(".png").exists():
                os.replace(made[-1].with_suffix(".png"), args.out / f"bench_{mode}.png")
    result["ok"] = result["returncode"] == 0


def _bench_summary(path: Path) -> list[dict]:
    """The provider rows streamed so far: provider, status, ms, speedup vs eager channels_last."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if row.get("table") == "model":
                    keep = ("provider", "status", "ms_median", "speedup_vs_eager_cl", "reason")
                    out.append({k: row.get(k) for k in keep})
    return out


STAGE_BODIES = {
    "precompile": stage_precompile,
    "tests": stage_tests,
    "tune": stage_tune,
    "bench_inference": lambda a, r, w: stage_bench(a, r, w, "inference"),
    "bench_training": lambda a, r, w: stage_bench(a, r, w, "training"),
}


def catch_sigint() -> None:
    """Make SIGINT raise KeyboardInterrupt in this stage process (and so, after exec, in what it
    starts): a run started in the background by a non-interactive shell (``nohup ... &``, the way
    a remote GPU box is often used) inherits SIGINT ignored, and the cut at a stage's limit would
    then never reach pytest or run.py, losing their summaries to the SIGKILL that follows."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stage_main(name: str, args) -> int:
    """The body of stage ``name`` (``--stage NAME``): DIR/<name>.json written as it goes and at
    the end, whatever the end is."""
    catch_sigint()
    path = args.out / f"{name}.json"
    result: dict = {"stage": name, "status": "running", "started": dt.datetime.now().isoformat(timespec="seconds")}
    t0 = time.perf_counter()

    def write() -> None:
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(path, result)

    write()
    try:
        STAGE_BODIES[name](args, result, write)
        result["status"] = "passed" if result.get("ok", True) else "failed"
    except KeyboardInterrupt:
        result["status"] = "cut"
    except Exception as exc:  # the stage's file must say what happened
        result["status"], result["error"] = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write()
    return 0 if result["status"] == "passed" else 1


def settle_stage_file(path: Path, ended: str) -> dict:
    """The stage's own ``DIR/<stage>.json`` after its process ended as ``ended`` (``run_stage``'s
    status). A stage cut or killed between its last progress write and its final one (SIGINT
    landing in that write, SIGKILL at the limit) leaves ``"running"`` there: the file is then
    rewritten with what the parent saw (``"cut"`` at the limit, else ``"failed"``), so no stage
    file of a finished run says it is still running."""
    result = json.loads(path.read_text())
    if isinstance(result, dict) and result.get("status") == "running":
        result["status"] = "cut" if ended == "timeout" else "failed"
        result["settled_by"] = f"gpu_check: the stage process ended ({ended}) before its final write"
        write_json(path, result)
    return result


# ------------------------------------------------------------------------------ the report
def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, both atomically (called after every stage)."""
    write_json(out / "gpu_check.json", report)
    env = report["environment"]
    gpu = env.get("gpu", {})
    lines = [f"# gpu_check {env['date']}: {report.get('result', 'running')} in {report.get('wall_s', '?')} s", ""]
    lines.append(
        f"{gpu.get('name')} (sm_{gpu.get('arch')}, {gpu.get('sms')} SMs), torch {env['torch']}, triton "
        f"{env['triton']}, numpy {env['numpy']}, commit {env['git_commit']}, modules "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in env["modules"].items())
    )
    lines += [f"- note: {n}" for n in env["known_limits"]]
    lines += ["", "| stage | status | seconds | limit | detail |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} | {s.get('limit', '')} | {_detail(s)} |")
    tmp = out / ".gpu_check.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "gpu_check.md")


def _detail(s: dict) -> str:
    if s.get("reason"):
        return s["reason"]
    own = s.get("result") or {}
    if s["stage"] == "precompile":
        parts = [f"{k}: {v.get('compiled', 0)} of {v['jobs']} built" for k, v in own.get("compiled", {}).items()]
        return "; ".join(parts)
    if s["stage"] == "tests":
        return f"{json.dumps(own.get('counts', {}))} of {own.get('selected')} selected"
    if s["stage"].startswith("bench_"):
        return "; ".join(
            f"{r['provider']} {r['status']}" + (f" {r['ms_median']:.3g} ms" if r["ms_median"] else "")
            for r in s.get("rows", [])
        )
    if s["stage"] == "tune":
        return str(own.get("report", {}).get("tuned_keys", ""))
    return own.get("error", "")


def run_all(args) -> int:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "stages": [], "budget_s": args.budget, "limits": args.limits}
    print(json.dumps(report["environment"], indent=1), flush=True)
    report["stages"].append(
        {"stage": "environment", "status": "passed", "seconds": round(time.perf_counter() - t_start, 1)}
    )
    write_report(args.out, report)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # never interpret on the GPU machine
    # The tuning cache stays outside DIR; the tune stage copies its entries into tune.json.
    env.setdefault("FASTUNET_CACHE_DIR", str(Path.home() / ".cache" / "fastunet"))
    passthrough = ["--out", str(args.out), "--workers", str(args.workers), "--xdist", str(args.xdist)]
    passthrough += (["--full"] if args.full else []) + (["--skip", *args.skip] if args.skip else [])
    passthrough += ["--tests-args", *args.tests_args] if args.tests_args else []
    for name in STAGES[1:]:
        if name in args.skip:
            report["stages"].append({"stage": name, "status": "skipped", "reason": "--skip"})
            continue
        remaining = args.budget - (time.perf_counter() - t_start)
        limit = min(args.limits[name], remaining)
        if limit < min(MIN_STAGE_S, args.limits[name]):
            report["stages"].append(
                {"stage": name, "status": "skipped", "reason": f"out of budget ({remaining:.0f} s left)"}
            )
            write_report(args.out, report)
            continue
        print(f"== {name} (up to {limit:.0f} s)", flush=True)
        stage_env = dict(env)
        if simulating() and name == "tune":
            stage_env["TRITON_INTERPRET"] = "1"  # the simulated GPU routes CPU tensors to the kernels
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, *passthrough]
        entry = {"stage": name, "limit": round(limit, 1), **run_stage(cmd, limit, args.out / f"{name}.log", stage_env)}
        with contextlib.suppress(OSError, ValueError):
            entry["result"] = settle_stage_file(args.out / f"{name}.json", entry["status"])
        if entry["status"] == "failed" and entry.get("result", {}).get("status") == "cut":
            entry["status"] = "timeout"
        if name.startswith("bench_"):
            entry["rows"] = _bench_summary(args.out / f"{name}.jsonl")
        entry["tail"] = _tail(args.out / f"{name}.log")
        report["stages"].append(entry)
        print(f"   {entry['status']} in {entry['seconds']} s", flush=True)
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_report(args.out, report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    ok = all(s["status"] in ("passed", "skipped") for s in report["stages"])
    report["result"] = "passed" if ok else "failed"
    write_report(args.out, report)
    print((args.out / "gpu_check.md").read_text())
    return 0 if ok else 1


# ------------------------------------------------------------------------------ --plan
def plan(args) -> int:
    """Print the stages, their limits and the kernels each will compile (recorded on a simulated
    H100); with ``--compile``, compile them offline for sm_``--arch`` in ``compile_order``,
    timing each piece (wall and CPU seconds)."""
    from fastunet.kernels import _precompile

    total = sum(args.limits.values())
    print(f"budget {args.budget:.0f} s; stage limits sum to {total:.0f} s ({100 * total / args.budget:.0f}%, "
          f"margin {args.budget - total:.0f} s)")  # fmt: skip
    todo = [s for s in STAGES[2:] if s not in args.skip]
    report: dict = {"budget_s": args.budget, "limits": args.limits, "arch": args.arch, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="fastunet-gpu-plan-") as tmp:
        # One recording at a time: the target case's take GBs of (never written) tensors each.
        sim = {"arch": args.arch, "sms": 132, "name": "NVIDIA H100 80GB HBM3"}
        recorded = gpu_plan.record_all(
            todo, Path(tmp), **sim, tests_args=args.tests_args, parallel=False, stdout=subprocess.DEVNULL
        )
    for s in todo:
        if "error" in recorded[s]:
            raise SystemExit(f"gpu_check --plan: recording the {s} stage failed: {recorded[s]['error']}")
    order = compile_order(recorded)
    print(f"{'stage':<16} {'limit s':>7}  kernels it launches (recorded)")
    print(f"{'environment':<16} {args.limits['environment']:>7}  -")
    print(f"{'precompile':<16} {args.limits['precompile']:>7}  {sum(len(jobs) for _, jobs in order)}: all below, once")
    report["stages"] = {}
    for s in todo:
        rec = recorded[s]
        line = f"{s:<16} {args.limits[s]:>7}  {rec['kernels']}"
        if s == "tests":
            line += (
                f" ({rec.get('tests_with_launches')} of {rec.get('tests')} tests launch here; "
                "the cuda-only ones are recorded on the GPU)"
            )
        print(line)
        report["stages"][s] = {k: v for k, v in rec.items() if k != "jobs"} | {"keys": [j["key"] for j in rec["jobs"]]}
    timing = f": wall s, CPU s ({args.workers} workers, sm_{args.arch})" if args.compile else ""
    print(f"\ncompile order (kernels new to each piece){timing}")
    report["compiled"] = {}
    progress = str(args.plan_json.with_suffix(".jsonl")) if args.plan_json else None
    for piece, jobs in order:
        line = f"  {piece:<16} {len(jobs):5}"
        entry = report["compiled"][piece] = {"jobs": len(jobs)}
        if args.compile:
            summary = _precompile.precompile(
                None, jobs=jobs, workers=args.workers, arch=args.arch, progress=progress, timeout=NO_LIMIT
            )
            entry.update(summary)
            line += f"  {summary['seconds']:7.0f}  {summary['cpu_s']:7.0f}"
            line += f"  ({summary['failed']} failed: {summary['errors'][:1]})" if summary["failed"] else ""
        print(line, flush=True)
    if args.plan_json:
        write_json(args.plan_json, report)
    return 0


# ------------------------------------------------------------------------------ command line
def _limits(pairs: list[str]) -> dict:
    limits = dict(STAGE_LIMITS)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in limits or not value:
            raise argparse.ArgumentTypeError(f"--limit NAME=SECONDS with NAME one of {list(limits)}, got {pair!r}")
        limits[name] = float(value)
    return limits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Ring-3 tests, tuning and the target benchmark on an NVIDIA GPU, within a time budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python benchmarks/gpu_check.py --out /tmp/gpu --budget 540",
    )
    p.add_argument("--out", type=Path, help="directory for the results (created)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything (stages stop at it)")
    p.add_argument("--full", action="store_true", help="also the max-autotune torch.compile providers (slow)")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES[1:], help="stages to leave out")
    p.add_argument("--workers", type=int, default=16, help="compile worker processes of the precompile stage")
    p.add_argument("--xdist", type=int, default=8, help="pytest-xdist workers for the tests (if installed)")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=S", help="override a stage's limit")
    p.add_argument("--plan", action="store_true", help="print the stages, limits and kernels to compile; no GPU needed")
    p.add_argument("--compile", action="store_true", help="with --plan: compile every stage's kernels offline, timed")
    p.add_argument("--arch", type=int, default=90, help="with --plan: the simulated GPU's architecture")
    p.add_argument(
        "--plan-json", type=Path, help="with --plan: write the plan here (counts, compile times; per kernel: .jsonl)"
    )
    p.add_argument("--stage", choices=STAGES[1:], help=argparse.SUPPRESS)  # one stage's body (internal)
    p.add_argument("--tests-args", nargs=argparse.REMAINDER, help="pytest arguments instead of the ring-3 selection")
    args = p.parse_args(argv)
    try:
        args.limits = _limits(args.limit)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.plan:
        return plan(args)
    if args.out is None:
        p.error("--out DIR is required (or --plan)")
    if args.stage:
        return stage_main(args.stage, args)

    import torch

    if not torch.cuda.is_available() and not simulating():
        print("gpu_check: no NVIDIA GPU here (torch.cuda.is_available() is False): nothing to check, nothing written.")
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
