#!/usr/bin/env python
"""Which kernels each stage of ``benchmarks/gpu_check.py`` will compile, found without a GPU.

Each stage's workload runs here against a simulated GPU (``fastunet.kernels._common
.simulate_gpu``: the launchers choose configs and build every argument as on that GPU, and
``launch`` records instead of running) and its launches are reduced to the distinct binaries
Triton would build (``kernels._precompile.distinct_jobs``):

``tune``             ``fastunet tune``'s own recording pass (``fastunet.tuning._run_modes`` under
                     ``recording_launches``): every candidate config of every kernel shape the
                     target case meets, inference and a training step.
``bench_inference``  the ``fastunet`` provider's step as ``benchmarks/run.py`` takes it
``bench_training``   (channels_last input, autocast), then every per-layer op of the layer table,
                     with every candidate recorded (the tuned pick is one of them, whichever it is).
``tests``            the ring-3 selection (``gpu_check.TESTS_ARGS``) run by pytest in this process
                     with ``FASTUNET_AUTOTUNE=0``: what each test body launches (outputs are
                     garbage: nothing ran, so ``helpers.assert_close`` passes while recording; a
                     bare ``assert`` on an output still ends a body early). Tests that
                     need a real CUDA device (``@pytest.mark.cuda``) are skipped here; on the
                     GPU machine ``--on-gpu`` records them with the GPU visible (CUDA tensors,
                     ``recording_launches``: nothing runs). Launches of test subprocesses
                     compile inside the stage.

The same recording feeds ``gpu_check``'s ``precompile`` stage on the GPU machine (run there with
the GPU hidden and the real GPU's arch/SMs/name) and its ``--plan`` here, so the counts printed
offline are the ones compiled on the GPU. Not covered: ``torch.compile(fastunet)`` runs the same
ops on the same shapes (per-op path), so it finds their binaries, but its own Inductor kernels
(and ``compile_default``'s) are compiled by Inductor inside the benchmark stages.

    python benchmarks/gpu_plan.py --stage tune --out jobs.json [--arch 90 --sms 132 --name "..."]

Writes ``{"stage", "launches", "undescribed", "jobs": [...], "seconds", ...}`` (atomically).
"""

# ruff: noqa: E402  (the interpreter switch and the hidden GPU must precede torch/triton imports)
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if "--on-gpu" not in sys.argv:
        # Recording needs the interpreter's routing of CPU tensors to the kernels, and no real
        # GPU (the test modules decide their device at import: a visible GPU would be used).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse
import contextlib
import copy
import json
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
# The target case every stage measures (gpu_check imports it from here).
TARGET = {"batch": 16, "size": 256, "dtype": "bf16"}
# gpu_check's test-only switch: a run without a GPU against a simulated one (see gpu_check).
SIMULATE_ENV = "FASTUNET_GPU_CHECK_SIMULATE"
# ... which records and tunes a small case: it checks the orchestration, not the kernels, and the
# target case's recording takes tens of seconds on a small CPU.
SIM_TARGET = {"batch": 2, "size": 64, "dtype": "bf16"}
# The tests stage (ring 3): every CUDA-capable test (see docs/gpu-check.md), file by file in the order
# of what a test tells that nothing else does, so a stage cut by its limit has run the head: every
# tile config forced once, the TMA variant, the up-sampled-source conv, the whole model; then
# every other test file in name order.
TESTS_MARK = "cuda or gpu_check"
TESTS_FIRST = (
    "tests/test_tuned_configs.py",
    "tests/kernels/test_conv3x3_tma.py",
    "tests/kernels/test_conv3x3_up.py",
    "tests/test_fused_model.py",
    "tests/test_training.py",
)
# The tests' recording is split over this many processes (by file): one process takes minutes for
# the ring-3 selection on a small CPU.
TEST_SHARDS = 8


def ring3_files() -> list[str]:
    """The test files of the tests stage, in run order (``TESTS_FIRST``, then the rest by name)."""
    rest = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py"))
    return [*TESTS_FIRST, *(f for f in rest if f not in TESTS_FIRST)]


TESTS_ARGS = ["-m", TESTS_MARK, *ring3_files()]
STAGES = ("tune", "tests", "bench_inference", "bench_training")


def simulating() -> bool:
    """Whether gpu_check's test-only switch is on."""
    return os.environ.get(SIMULATE_ENV, "0") not in ("", "0")


def target() -> dict:
    """The case the stages run: TARGET, or SIM_TARGET under the switch."""
    return SIM_TARGET if simulating() else TARGET


def _dtype():
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[target()["dtype"]]


def _model(training: bool):
    import fastunet

    return fastunet.UNet(3, 1).train(training)


def _input(channels_last: bool):
    import torch

    case = target()
    x = torch.randn(case["batch"], 3, case["size"], case["size"])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def record_tune(gpu) -> None:
    """``fastunet tune --mode both`` for the target case: its recording pass, as ``tune`` runs it."""
    from fastunet.kernels import _common

    from fastunet import tuning

    with _common.recording_launches():
        tuning._run_modes(copy.deepcopy(_model(False)), _input(False), ("eval", "train"), _dtype())


def record_bench(gpu, mode: str) -> None:
    """``benchmarks/run.py --mode MODE`` for the target case: the fastunet provider's step and the
    per-layer ops, every tuning candidate recorded."""
    import layers
    import providers
    import torch
    from fastunet.kernels import _common

    training = mode == "training"
    model = _model(training)
    x = _input(True)
    with _common.recording_launches():
        with torch.autocast("cpu", dtype=_dtype(), cache_enabled=False):
            if training:
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
        # packed: the weights as the layer table hands them to the ops on CUDA (same strides).
        cfg = providers.ModelConfig(3, 1, 64, 4)
        for spec, _names in layers.layer_specs(cfg, target()["batch"], target()["size"]):
            layers.make_layer_case(spec, _dtype(), torch.device("cpu"), packed=True).fastunet()


def record_tests(launches: list, extra_args: list[str] | None = None, *, on_gpu: bool = False) -> dict:
    """The tests stage's selection, autotuning off (as the stage runs), every launch appended to
    ``launches``: under the simulated GPU (entered by the caller before the session starts, so
    the test modules parametrize as on that GPU), or ``on_gpu`` with each test inside
    ``recording_launches`` (CUDA tensors, nothing runs)."""
    import pytest
    from fastunet.kernels import _common, _precompile

    counts = {"tests": 0, "tests_with_launches": 0}
    per_test: dict[str, list[str]] = {}

    class Recorder:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            before = len(launches)
            with _common.recording_launches() if on_gpu else contextlib.nullcontext() as recorded:
                yield
            launches.extend(recorded or ())
            counts["tests"] += 1
            if len(launches) > before:
                counts["tests_with_launches"] += 1
                per_test[item.nodeid] = [j["key"] for j in _precompile.distinct_jobs(launches[before:])[0]]

    # Nothing runs, so every comparison would fail at the first one and end the test body
    # there, before its later launches: comparisons pass while recording (before collection,
    # so the test modules import the stand-in). A bare assert still ends a body early.
    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    helpers.assert_close = lambda *args, **kwargs: None
    os.environ["FASTUNET_AUTOTUNE"] = "0"
    args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--rootdir", str(ROOT)]
    args += ["-o", "addopts=", *(extra_args or TESTS_ARGS)]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = pytest.main(args, plugins=[Recorder()])
    finally:
        os.chdir(cwd)
    return {"pytest_exit": int(code), **counts, "per_test": per_test}


def test_shard(i: int, n: int) -> list[str]:
    """pytest arguments of shard ``i`` of ``n`` of the ring-3 selection: its files dealt largest
    first to the lightest shard (file size as the weight); ``merge`` puts the jobs back in the
    tests' run order."""
    files = ring3_files()
    shards: list[list[str]] = [[] for _ in range(n)]
    weight = [0] * n
    for f in sorted(files, key=lambda f: -(ROOT / f).stat().st_size):
        k = weight.index(min(weight))
        shards[k].append(f)
        weight[k] += (ROOT / f).stat().st_size
    return ["-m", TESTS_MARK, *sorted(shards[i], key=files.index)]


def merge(records: list[dict]) -> dict:
    """One record from several of the same stage (the tests' shards): jobs deduplicated by
    binary and ordered by the first test that needs them in the stage's run order (so a
    precompile cut short has compiled the head of the test run), counts added."""
    files = ring3_files()
    rank: dict[str, tuple] = {}
    for r in records:
        for position, (test, ids) in enumerate(r.get("per_test", {}).items()):
            file = test.split("::")[0]
            here = (files.index(file) if file in files else len(files), position)
            for i in ids:
                key = r["jobs"][i]["key"]
                rank[key] = min(rank.get(key, here), here)
    jobs: dict[str, dict] = {}
    for r in records:
        for job in r["jobs"]:
            jobs.setdefault(job["key"], job)
    ordered = sorted(jobs.values(), key=lambda j: rank.get(j["key"], (len(files) + 1, 0)))
    out = {**records[0], "jobs": ordered, "kernels": len(ordered)}
    # The jobs of the first files (TESTS_FIRST) lead the list: how many they are.
    out["head"] = sum(rank.get(j["key"], (len(files),))[0] < len(TESTS_FIRST) for j in ordered)
    index = {j["key"]: i for i, j in enumerate(ordered)}
    if "per_test" in records[0]:
        out["per_test"] = {
            t: [index[r["jobs"][i]["key"]] for i in ids] for r in records for t, ids in r["per_test"].items()
        }
    for k in ("launches", "undescribed", "tests", "tests_with_launches"):
        if k in records[0]:
            out[k] = sum(r.get(k, 0) for r in records)
    out["seconds"] = max(r["seconds"] for r in records)
    return out


def record_all(
    stages,
    tmp: Path,
    *,
    arch: int,
    sms: int,
    name: str,
    tests_args=None,
    parallel: bool = True,
    stdout=None,
    on_gpu: bool = False,
) -> dict[str, dict]:
    """Record ``stages`` in subprocesses of this script (the ring-3 tests in ``TEST_SHARDS``
    pieces unless ``tests_args`` replaces the selection, plus with ``on_gpu`` the cuda-only tests
    on the GPU), all at once or one at a time. Returns ``{stage: record}``, or ``{stage:
    {"error": ...}}`` for a recording that failed."""
    runs = []
    for stage in stages:
        pieces = [[]]
        if stage == "tests" and not tests_args:
            pieces = [["--shard", f"{i}/{TEST_SHARDS}"] for i in range(TEST_SHARDS)]
            pieces += [["--on-gpu"]] if on_gpu else []
        for k, piece in enumerate(pieces):
            out = tmp / f"{stage}-{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(out)]
            cmd += ["--arch", str(arch), "--sms", str(sms), "--name", name, *piece]
            cmd += ["--tests-args", *tests_args] if tests_args else []
            runs.append((stage, out, cmd))
    procs = []
    for *_, cmd in runs:
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT if stdout else None))
        if not parallel:
            procs[-1].wait()
    records: dict[str, list] = {}
    for (stage, out, _), proc in zip(runs, procs, strict=True):
        proc.wait()
        try:
            records.setdefault(stage, []).append(json.loads(out.read_text()))
        except (OSError, ValueError):
            records[stage] = [{"error": f"recording failed (exit {proc.returncode})"}] + records.get(stage, [])
    return {s: r[0] if "error" in r[0] else merge(r) for s, r in records.items()}


def record(
    stage: str, *, arch: int, sms: int, name: str, tests_args: list[str] | None = None, on_gpu: bool = False
) -> dict:
    """Run ``stage``'s workload against a simulated GPU; returns the plan record (jobs and counts)."""
    from fastunet.kernels import _common, _precompile

    import fastunet

    t0 = time.perf_counter()
    extra: dict = {}
    fastunet.set_backend("triton")
    gpu = _common.SimulatedGPU(arch=arch, sms=sms, name=name)
    with tempfile.TemporaryDirectory(prefix="fastunet-plan-") as cache:
        # A fresh tuning cache: a recorded pick would hide the candidates a real run times.
        os.environ["FASTUNET_CACHE_DIR"] = cache
        if on_gpu:  # the cuda-only tests, on the real GPU (see the module docstring)
            extra = record_tests(gpu.launches, tests_args or ["-m", "cuda", *ring3_files()], on_gpu=True)
        else:
            with _common.simulate_gpu(gpu):
                if stage == "tune":
                    record_tune(gpu)
                elif stage in ("bench_inference", "bench_training"):
                    record_bench(gpu, stage.removeprefix("bench_"))
                elif stage == "tests":
                    extra = record_tests(gpu.launches, tests_args)
                else:
                    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    jobs, undescribed = _precompile.distinct_jobs(gpu.launches)
    if "per_test" in extra:  # the binaries each test needs, as indices into jobs (what a cut would save)
        index = {j["key"]: i for i, j in enumerate(jobs)}
        extra["per_test"] = {t: [index[k] for k in keys] for t, keys in extra["per_test"].items()}
    return {
        "stage": stage,
        "gpu": {"arch": arch, "sms": sms, "name": name},
        "launches": len(gpu.launches),
        "undescribed": undescribed,
        "kernels": len(jobs),
        "seconds": round(time.perf_counter() - t0, 1),
        **extra,
        "jobs": jobs,
    }


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``: a temp file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_plan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--arch", type=int, default=90, help="compute capability of the simulated GPU (90: sm_90)")
    p.add_argument("--sms", type=int, default=132, help="its streaming multiprocessors")
    p.add_argument("--name", default="NVIDIA H100 80GB HBM3", help="its name")
    p.add_argument("--shard", help="tests: record shard I/N of the ring-3 selection (see test_shard)")
    p.add_argument("--on-gpu", action="store_true", help="tests: record the cuda-only tests on the real GPU")
    p.add_argument("--tests-args", nargs=argparse.REMAINDER, help="pytest arguments instead of the ring-3 selection")
    args = p.parse_args(argv)
    tests_args = args.tests_args
    if args.shard and not tests_args:
        i, n = (int(v) for v in args.shard.split("/"))
        tests_args = test_shard(i, n)
    if args.on_gpu and args.stage != "tests":
        p.error("--on-gpu records the tests stage only")
    plan = record(args.stage, arch=args.arch, sms=args.sms, name=args.name, tests_args=tests_args, on_gpu=args.on_gpu)
    write_json(args.out, plan)
    print(
        f"{args.stage}: {plan['kernels']} kernels to compile from {plan['launches']} launches "
        f"({plan['undescribed']} undescribed) in {plan['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
