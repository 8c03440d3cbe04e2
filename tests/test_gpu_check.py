"""``benchmarks/gpu_check.py``: the one timed command a lent GPU gets.

Checked without a GPU: the stage limits fit the 540 s budget with 20% to spare; a stage is killed
as a process group at its limit (its children too) and leftovers of a stage that ended are
killed; the git stamp survives a machine without git; pytest's ``-v`` lines are counted even
without a summary; ``run.py --rows`` streams one JSON line per row. The whole script runs end to
end against a simulated GPU (``FASTUNET_GPU_CHECK_SIMULATE=1``: launches stubbed, a small case),
once through every stage (every file appears) and once with the tests stage cut by a tiny limit
(its partial files are kept, the next stage still runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import run  # noqa: E402


def test_stage_limits_fit_the_budget_with_margin():
    total = sum(gpu_check.STAGE_LIMITS.values())
    assert set(gpu_check.STAGE_LIMITS) == set(gpu_check.STAGES)
    assert gpu_check.MARGIN >= 0.2
    assert total <= (1 - gpu_check.MARGIN) * gpu_check.BUDGET_S, (
        f"{total} s of limits in a {gpu_check.BUDGET_S} s budget"
    )
    assert all(limit > gpu_check.GRACE_S for limit in gpu_check.STAGE_LIMITS.values())


def test_stage_order():
    """What a lost minute costs: facts first, then the compiles every later stage would pay
    serially, correctness before tuning, tuning before the figures, inference before training."""
    assert gpu_check.STAGES == ("environment", "precompile", "tests", "tune", "bench_inference", "bench_training")


def test_git_stamp_is_guarded(tmp_path, monkeypatch):
    assert gpu_check.git_commit(tmp_path) is None, "not a checkout"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    assert gpu_check.git_commit(REPO) is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_SPAWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(child.pid))
    print("started", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


@pytest.mark.parametrize("leader_s, status", [(120, "timeout"), (0, "passed")], ids=["cut", "ended"])
def test_a_stage_is_killed_as_a_process_group(tmp_path, leader_s, status):
    """At its limit the stage's whole group goes (SIGINT, then SIGKILL): the grandchild too; and
    a stage that ended leaves no child behind (a compile worker would steal the next stage's CPUs)."""
    pid_file, log = tmp_path / "pid", tmp_path / "stage.log"
    cmd = [sys.executable, "-c", _SPAWNER, str(pid_file), str(leader_s)]
    t0 = time.perf_counter()
    result = gpu_check.run_stage(cmd, 6.0, log, dict(os.environ), grace=1.0)
    assert result["status"] == status and time.perf_counter() - t0 < 15
    assert "started" in log.read_text()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "a child of the stage survived it"


def test_pytest_counts_without_a_summary():
    text = "\n".join(
        [
            "tests/a.py::test_x[fp16] PASSED                                   [  1%]",
            "tests/a.py::test_y FAILED                                         [  2%]",
            "[gw1] [  3%] SKIPPED tests/b.py::test_z ",
            "[gw0] [  4%] ERROR tests/b.py::test_w ",
            "collected 9 items / 3 deselected",
        ]
    )
    counts = gpu_check._pytest_counts(text)
    assert counts["selected"] == 6
    assert counts["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert counts["failed"] == ["tests/a.py::test_y", "tests/b.py::test_w"]


def test_run_streams_one_json_line_per_row(tmp_path):
    tiny = ["--device", "cpu", "--batch", "1", "--size", "32", "--dtype", "fp32", "--base-channels", "4", "--depth",
            "2", "--warmup", "1", "--reps", "2", "--providers", "eager_fp32_nchw", "fastunet"]  # fmt: skip
    rows = tmp_path / "rows.jsonl"
    assert run.main([*tiny, "--out", str(tmp_path), "--rows", str(rows)]) == 0
    streamed = [json.loads(line) for line in rows.read_text().splitlines()]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["provider"] for r in streamed] == [r["provider"] for r in result["rows"]]
    assert all(r["table"] == "model" for r in streamed)
    assert [r["ms_median"] for r in streamed] == [r["ms_median"] for r in result["rows"]]


def _simulated(tmp_path, *args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTUNET_GPU_CHECK_SIMULATE="1", FASTUNET_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path / "out"), "--workers", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return proc, report, {s["stage"]: s for s in report["stages"]}


@pytest.mark.slow  # the whole script, every stage (~1.5 min on a 2-core machine)
def test_simulated_run_writes_every_file(tmp_path):
    # Limits for a loaded 2-core CI machine, not the GPU's: this checks the orchestration only.
    roomy = [arg for s in gpu_check.STAGES for arg in ("--limit", f"{s}=900")]
    # Two pytest-xdist workers for the one test of the tests stage (the script's default, 8, is
    # the GPU machine's): still xdist's path, without six more torch imports on two cores.
    tests = ["--xdist", "2", "--tests-args", "tests/test_precompile.py", "-k", "nothing_to_do"]
    # One precompile worker (argparse: the last --workers wins): simulated, a worker only resolves
    # each kernel, and each piece's workers are fresh Pythons importing torch (~4 CPU-s each);
    # workers sharing one job list are test_precompile.py's test_workers_compile_each_distinct_launch_once.
    proc, report, stages = _simulated(tmp_path, "--budget", "5000", "--workers", "1", *roomy, *tests)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["result"] == "passed" and list(stages) == list(gpu_check.STAGES)
    assert all(s["status"] == "passed" for s in stages.values()), {k: v["status"] for k, v in stages.items()}
    expected = ["gpu_check.json", "gpu_check.md", "precompile.log", "precompile.json", "precompile.jsonl",
                "tests.log", "tests.json", "tests.xml", "tune.log", "tune.json"]  # fmt: skip
    expected += [f"bench_{m}{ext}" for m in ("inference", "training") for ext in (".log", ".jsonl", ".json", ".png")]
    expected += [f"bench_{m}_results.json" for m in ("inference", "training")]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(expected)
    pre = json.loads((out / "precompile.json").read_text())
    assert set(pre["stages"]) == set(gpu_check.STAGES[2:]) and pre["stages"]["tune"]["kernels"] > 10
    assert all(v["compiled"] == v["jobs"] and v["failed"] == 0 for v in pre["compiled"].values()), pre["compiled"]
    lines = (out / "precompile.jsonl").read_text().splitlines()
    assert len(lines) == sum(v["jobs"] for v in pre["compiled"].values()) and '_conv3x3_tma_kernel"' in "".join(lines)
    assert json.loads((out / "tests.json").read_text())["counts"] == {"passed": 1}
    assert json.loads((out / "tune.json").read_text())["report"]["tuned_keys"] > 0
    assert stages["bench_inference"]["rows"] and "| bench_training | passed |" in (out / "gpu_check.md").read_text()
    result = json.loads((out / "bench_training_results.json").read_text())
    streamed = [json.loads(line) for line in (out / "bench_training.jsonl").read_text().splitlines()]
    assert [r["provider"] for r in streamed] == [r["provider"] for r in result["rows"]]


@pytest.mark.slow  # two stages of the script (~40 s on a 2-core machine)
@pytest.mark.parametrize("ended, expected", [("timeout", "cut"), ("failed", "failed"), ("passed", "failed")])
def test_a_stage_file_left_running_is_settled(tmp_path, ended, expected):
    """A stage cut inside its final write leaves "running" in its file: the parent settles it."""
    path = tmp_path / "tests.json"
    path.write_text(json.dumps({"stage": "tests", "status": "running", "ran": 3}))
    result = gpu_check.settle_stage_file(path, ended)
    assert result["status"] == expected and result["ran"] == 3 and ended in result["settled_by"]
    assert json.loads(path.read_text()) == result
    done = {"stage": "tests", "status": "cut"}
    path.write_text(json.dumps(done))
    assert gpu_check.settle_stage_file(path, ended) == done  # a final status is left as it is


def test_a_stage_catches_sigint_even_if_started_with_it_ignored():
    """``nohup gpu_check.py ... &`` hands every stage SIGINT ignored: the stage restores it, so the
    cut at its limit arrives as KeyboardInterrupt (in it and in the pytest it starts)."""
    script = (
        "import signal, subprocess, sys; sys.path.insert(0, sys.argv[1]); import gpu_check;"
        "gpu_check.catch_sigint();"
        "child = 'import os, signal; os.kill(os.getpid(), signal.SIGINT)';"
        "sys.exit(subprocess.run([sys.executable, '-c', child]).returncode)"
    )
    ignoring = subprocess.run(  # the parent ignores SIGINT, as a background job's does
        [sys.executable, "-c", "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN);"
         "sys.exit(subprocess.run(sys.argv[1:]).returncode)", sys.executable, "-c", script, str(BENCH)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ignoring.returncode != 0 and "KeyboardInterrupt" in ignoring.stderr, ignoring.stderr[-2000:]


def test_a_cut_stage_keeps_its_files_and_the_next_stage_runs(tmp_path):
    # Far more than the limit of interpreter tests (test_conv3x3_up's alone, ~15 s before the
    # interpreter's dead work was skipped, came to about the limit: the cut raced the end).
    tests = ["tests/kernels/test_conv3x3_up.py", "tests/kernels/test_conv3x3.py", "-m", "not slow"]
    limit = 8.0
    proc, report, stages = _simulated(
        tmp_path, "--skip", "precompile", "tune", "bench_training", "--limit", f"tests={limit}", "--tests-args", *tests
    )
    out = tmp_path / "out"
    assert proc.returncode == 1 and report["result"] == "failed"
    assert stages["tests"]["status"] == "timeout" and stages["tests"]["seconds"] < limit + 3
    assert json.loads((out / "tests.json").read_text())["status"] == "cut"
    assert "===== " in (out / "tests.log").read_text()
    assert stages["bench_inference"]["status"] == "passed" and (out / "bench_inference_results.json").exists()
    assert [stages[s]["status"] for s in ("precompile", "tune", "bench_training")] == ["skipped"] * 3
