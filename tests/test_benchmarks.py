"""The benchmark harness (benchmarks/): FLOP count, like-for-like providers, the CPU report
(no %peak, no per-layer table, one CPU-target line, one GPU-targets line), where results are
written, the command line's help, the README table.

The quick run goes through a subprocess exactly as a user types it, without TRITON_INTERPRET
(the harness never times the interpreter), and is shared by the tests that read its output.
The other end-to-end runs call ``run.main`` in-process on a tiny model (a few tenths of a
second each).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402
import providers  # noqa: E402
import readme_table  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

import fastunet  # noqa: E402

ROW_KEYS = {
    "provider", "label", "layout", "family", "mode", "batch", "size", "dtype", "precision", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "n_reps", "timer", "first_call_s", "images_per_s", "gflop_per_step",
    "tflops", "peak_kind", "peak_fraction", "peak_mem_mb", "static_mem_mb", "max_abs_err", "max_rel_err",
    "tolerance", "grad_rel_l2_err", "grad_tolerance", "speedup_vs_eager_nchw", "speedup_vs_eager_cl",
    "speedup_vs_best_compile", "threads", "speedup_vs_best_peer", "minor_faults_per_step",
}  # fmt: skip
# A tiny model and case for the in-process runs: a few tenths of a second each.
TINY = ["--device", "cpu", "--batch", "1", "--size", "32", "--dtype", "fp32", "--base-channels", "4",
        "--depth", "2", "--warmup", "1", "--reps", "3", "--providers", "eager_fp32_nchw", "eager_cl", "fastunet"]  # fmt: skip


# --------------------------------------------------------------------------- FLOPs
def test_flops_classic_unet_256():
    """UNet(3, 1) on one 256x256 image: the 96.3 GFLOP everyone quotes (2 x MACs)."""
    total = flops.forward_flops(3, 1, base_channels=64, depth=4, batch=1, height=256)
    assert total == 96_334_774_272
    assert total / 1e9 == pytest.approx(96.3, abs=0.05)
    assert flops.forward_flops(3, 1, batch=16, height=256) == 16 * total
    assert flops.step_flops("training", in_ch=3, out_ch=1, batch=1, height=256) == 3 * total


@pytest.mark.parametrize("base, depth, size", [(64, 4, 256), (8, 3, 48), (16, 2, 40)])
def test_flops_match_torch_flop_counter(base, depth, size):
    """The config-based count equals torch's own FLOP counter on the real module (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = fastunet.UNetReference(3, 2, base_channels=base, depth=depth)
        x = torch.empty(2, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    expected = counter.get_total_flops()
    assert flops.forward_flops(3, 2, base_channels=base, depth=depth, batch=2, height=size) == expected


def test_layer_list_follows_the_module_tree():
    specs = flops.unet_layers(3, 1, base_channels=64, depth=4, batch=1, height=256)
    names = [s.name for s in specs]
    model = fastunet.UNetReference(3, 1)
    modules = dict(model.named_modules())
    for name in names:
        assert name.replace(".0", ".conv.0").replace(".3", ".conv.3") in modules, name
    assert len([s for s in specs if s.kind == "conv3x3"]) == 18
    assert [s.kind for s in specs].count("upconv") == 4
    assert specs[-1].kind == "head" and specs[-1].c_in == 64


# --------------------------------------------------------------------------- derived numbers
def _row(provider, family, ms, status="ok"):
    return {
        "provider": provider, "family": family, "mode": "inference", "batch": 4, "size": 64,
        "dtype": "bf16", "status": status, "ms_median": ms, "speedup_vs_eager_nchw": None,
        "speedup_vs_eager_cl": None, "speedup_vs_best_compile": None,
    }  # fmt: skip


def test_speedups_skip_wrong_rows_and_use_fastest_correct_compile():
    rows = [
        _row("eager_fp32_nchw", "eager", 20.0),
        _row("eager_cl", "eager", 10.0),
        _row("compile_default", "compile", 8.0),
        _row("compile_max_autotune", "compile", 2.0, status="wrong"),  # fast but wrong: no baseline
        _row("fastunet", "fastunet", 5.0),
        _row("fastunet_cudagraph", "fastunet", 1.0, status="wrong"),
    ]
    summary = report.add_speedups(rows)[("inference", 4, 64, "bf16", None)]
    assert summary["best_compile"] == "compile_default"
    assert (summary["eager_nchw_ms"], summary["eager_cl_ms"]) == (20.0, 10.0)
    fast = rows[4]
    assert fast["speedup_vs_eager_nchw"] == pytest.approx(4.0)
    assert fast["speedup_vs_eager_cl"] == pytest.approx(2.0)
    assert fast["speedup_vs_best_compile"] == pytest.approx(1.6)
    assert rows[3]["speedup_vs_eager_cl"] is None and rows[5]["speedup_vs_best_compile"] is None


def test_speedup_vs_the_fastest_correct_cpu_peer():
    rows = [
        _row("eager_fp32_nchw", "eager", 20.0),
        _row("onnxruntime", "peer", 12.0),
        _row("openvino", "peer", 6.0, status="wrong"),  # fast but wrong: never the bar
        _row("fastunet", "fastunet", 10.0),
    ]
    for r in rows:
        r["threads"] = 2
    summary = report.add_speedups(rows)[("inference", 4, 64, "bf16", 2)]
    assert (summary["best_peer"], summary["best_peer_ms"]) == ("onnxruntime", 12.0)
    assert rows[3]["speedup_vs_best_peer"] == pytest.approx(1.2)
    assert rows[2].get("speedup_vs_best_peer") is None
    blank = providers.blank_row(providers.PROVIDERS[0], _tiny_case())
    table = report.provider_table([{**blank, **r, "ms_p20": r["ms_median"], "ms_p80": r["ms_median"]} for r in rows],
                                  cuda=False)  # fmt: skip
    assert "x best peer" in table.splitlines()[0] and "1.20" in table.splitlines()[-1]


def _tiny_case(dtype_name="fp32"):
    cfg = providers.ModelConfig(base_channels=4, depth=2)
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    return providers.make_case(
        cfg, sd, mode="inference", batch=1, size=16, dtype_name=dtype_name, device=torch.device("cpu"), n_inputs=2,
        seed=1,
    )  # fmt: skip


def test_interleaved_rounds_time_every_provider_and_keep_failures_apart():
    """CPU timing: everything built and checked first, then one step of each provider per round;
    a provider that fails mid-way is failed, the others still timed, a wrong one still WRONG."""
    case = _tiny_case()
    calls = []

    def counted(c):
        runner = providers.build_eager_fp32_nchw(c)
        step = runner.step
        runner.step = lambda x: calls.append("eager") or step(x)
        return runner

    def flaky(c):
        runner = providers.build_eager_cl(c)
        step, seen = runner.step, []

        def once_then_fail(x):
            seen.append(1)
            if len(seen) > 3:  # first call, warm-up, check: then the timed rounds
                raise RuntimeError("lost the engine")
            return step(x)

        runner.step = once_then_fail
        return runner

    def off(c):
        runner = providers.build_eager_cl(c)
        step = runner.step
        runner.step = lambda x: step(x) * 1.01
        return runner

    rows = providers.bench_interleaved(
        [providers.Provider("eager_fp32_nchw", counted, "eager"), providers.Provider("eager_cl", flaky, "eager"),
         providers.Provider("fastunet", off, "fastunet"), providers.PROVIDERS[-1]],
        case, warmup=1, reps=4, quick=True,
    )  # fmt: skip
    assert [r["status"] for r in rows[:3]] == ["ok", "failed", "wrong"]
    assert rows[0]["n_reps"] == 4 and rows[0]["timer"] == "perf_counter, interleaved" and len(calls) == 3 + 4
    assert rows[1]["reason"] == "RuntimeError: lost the engine"
    assert rows[3]["provider"] == "openvino" and rows[3]["status"] in ("ok", "skipped")


def test_a_missing_peer_is_skipped_with_one_line(monkeypatch):
    case = _tiny_case()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in providers.PEERS else real(name, *a)
    )
    for name in providers.PEERS:
        provider = next(p for p in providers.PROVIDERS if p.name == name)
        reason = providers.skip_reason(provider, case, quick=False)
        assert reason == f"{name} is not installed (pip install 'fastunet[cpu-peers]')"
        assert "\n" not in reason


def test_a_wrong_output_is_marked_wrong():
    """A provider whose output is off is timed but reported WRONG, never as a result."""
    import providers

    cfg = providers.ModelConfig(base_channels=4, depth=2)
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    case = providers.make_case(
        cfg, sd, mode="inference", batch=1, size=16, dtype_name="fp32", device=torch.device("cpu"), n_inputs=2, seed=1
    )

    def broken(c):
        runner = providers.build_eager_cl(c)
        step = runner.step
        runner.step = lambda x: step(x) * 1.01  # a 1 % error: far above the fp32 tolerance
        return runner

    def crashing(c):
        raise RuntimeError("compile error\nwith details")

    wrong = providers.Provider("eager_cl", broken, "eager")
    row = providers.bench_provider(wrong, case, warmup=1, reps=2, quick=True)
    assert row["status"] == "wrong" and row["max_rel_err"] > row["tolerance"]
    assert row["ms_median"] is not None and "tolerance" in row["reason"]
    failed = providers.bench_provider(
        providers.Provider("fastunet", crashing, "fastunet"), case, warmup=1, reps=2, quick=True
    )
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: compile error"
    good = providers.bench_provider(providers.PROVIDERS[1], case, warmup=1, reps=2, quick=True)
    assert good["status"] == "ok" and good["max_rel_err"] < 1e-5


def _h100_result(fast_speedup_compile=1.1, fast_status="ok"):
    base = {"mode": "inference", "batch": 16, "size": 256, "dtype": "bf16", "reason": None}
    rows = [
        {**base, "provider": "eager_cl", "family": "eager", "status": "ok", "peak_mem_mb": 200.0},
        {**base, "provider": "compile_default", "family": "compile", "status": "ok", "peak_mem_mb": 150.0},
        {**base, "provider": "fastunet", "family": "fastunet", "status": fast_status, "peak_mem_mb": 100.0,
         "speedup_vs_eager_cl": 1.8, "speedup_vs_best_compile": fast_speedup_compile, "peak_fraction": 0.6},
    ]  # fmt: skip
    if fast_status != "ok":
        rows[2]["reason"] = "error above tolerance"
    return {
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "config": {"mode": "inference", "base_channels": 64, "depth": 4},
        "rows": rows,
    }


def test_targets_pass_fail_and_not_measured():
    targets = report.evaluate_targets(_h100_result())
    assert [t["result"] for t in targets] == ["PASS", "FAIL", "PASS", "PASS"]  # 1.8x, 1.1x < 1.2x, 60 %, 0.5x memory
    assert {t["kind"] for t in targets} == {"gpu"}  # no CPU target on a GPU run
    lines = report.target_lines(targets, cuda=True)  # a GPU run keeps one line per target
    assert len(lines) == 4 and all(line.startswith("TARGET") for line in lines)
    wrong = report.evaluate_targets(_h100_result(fast_status="wrong"))
    assert {t["result"] for t in wrong} == {"FAIL"}  # a wrong output never passes a target
    other_gpu = _h100_result()
    other_gpu["device"]["name"] = "NVIDIA A100-SXM4-80GB"
    assert {t["result"] for t in report.evaluate_targets(other_gpu)} == {"not measured"}
    h200 = _h100_result()
    h200["device"]["name"] = "NVIDIA H200"  # the same GH100 chip: judged like an H100
    assert [t["result"] for t in report.evaluate_targets(h200)] == ["PASS", "FAIL", "PASS", "PASS"]


def test_training_run_is_judged_on_the_training_target():
    result = _h100_result()
    result["config"]["mode"] = "training"
    for row in result["rows"]:
        row["mode"] = "training"
    targets = report.evaluate_targets(result)
    assert [(t["metric"], t["result"]) for t in targets] == [("speedup_vs_eager_cl", "PASS")]  # 1.8x >= 1.3x
    result["rows"][2]["speedup_vs_eager_cl"] = 1.2
    assert [t["result"] for t in report.evaluate_targets(result)] == ["FAIL"]


def _cpu_result(ratio=1.2, *, threads=1, size=256, base=64, fast_status="ok"):
    rows = [
        {"provider": "eager_fp32_nchw", "status": "ok", "speedup_vs_eager_nchw": 1.0},
        {"provider": "fastunet", "status": fast_status, "speedup_vs_eager_nchw": ratio if fast_status == "ok" else None,
         "reason": None if fast_status == "ok" else "error above tolerance"},
    ]  # fmt: skip
    for r in rows:
        r.update(mode="inference", batch=1, size=size, dtype="fp32", family="eager", threads=threads)
    return {
        "device": {"type": "cpu", "name": "Some CPU"},
        "config": {"mode": "inference", "base_channels": base, "depth": 4, "threads": [threads]},
        "rows": rows,
    }


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"ratio": 1.2}, "PASS"),
        ({"ratio": 1.1}, "FAIL"),
        ({"fast_status": "wrong"}, "FAIL"),  # a wrong output never passes
        ({"ratio": 1.5, "threads": 2}, "not judged"),  # a toy or other case never passes either
        ({"ratio": 1.5, "size": 128}, "not judged"),
        ({"ratio": 1.5, "base": 8}, "not judged"),
    ],
)
def test_cpu_target_is_judged_only_in_its_own_case(kwargs, expected):
    targets = report.evaluate_targets(_cpu_result(**kwargs))
    cpu = [t for t in targets if t["kind"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["result"] == expected, cpu
    assert {t["result"] for t in targets if t["kind"] == "gpu"} == {"not measured"}
    lines = report.target_lines(targets, cuda=False)
    assert lines == [f"CPU target: {expected}: {cpu[0]['detail']}", report.GPU_TARGETS_LINE]
    if "ratio" in kwargs:
        assert f"{kwargs['ratio']:.2f}x eager fp32 NCHW" in lines[0]


def test_provider_table_has_peak_columns_on_cuda_only():
    row = {
        "provider": "fastunet", "status": "ok", "reason": None, "dtype": "bf16", "ms_median": 2.0, "ms_p20": 1.9,
        "ms_p80": 2.1, "images_per_s": 500.0, "tflops": 48.0, "peak_fraction": 0.5, "peak_mem_mb": 100.0,
        "max_abs_err": 1e-3, "max_rel_err": 1e-3, "tolerance": 5e-2, "grad_rel_l2_err": None,
        "speedup_vs_eager_nchw": 3.0, "speedup_vs_eager_cl": 1.7, "speedup_vs_best_compile": 1.2,
    }  # fmt: skip
    gpu = report.provider_table([row], cuda=True).splitlines()[0]
    assert "%peak" in gpu and "peak MiB" in gpu and "x eager CL bf16-AMP" in gpu
    cpu = report.provider_table([{**row, "dtype": "fp32"}], cuda=False).splitlines()[0]
    assert "%peak" not in cpu and "peak MiB" not in cpu
    assert "x eager fp32 NCHW" in cpu and "x eager CL fp32" in cpu and "AMP" not in cpu


def test_gpu_result_plot_and_readme_keep_the_peak(tmp_path):
    """The CUDA side of the report (it cannot run here): title, %peak in the README table,
    failed rows without a bar, one TARGET line per target."""
    blank = dict.fromkeys(ROW_KEYS)
    base = {**blank, "mode": "inference", "batch": 16, "size": 256, "dtype": "bf16", "tolerance": 5e-2}
    ok = {"status": "ok", "ms_median": 10.0, "ms_p20": 9.5, "ms_p80": 10.5, "images_per_s": 1600.0,
          "tflops": 154.0, "peak_fraction": 0.2, "peak_mem_mb": 900.0, "max_rel_err": 1e-2}  # fmt: skip
    rows = [
        {**base, **ok, "provider": "eager_cl", "label": "eager", "family": "eager", "speedup_vs_eager_cl": 1.0},
        {**base, "provider": "fastunet", "label": "fastunet (Triton)", "family": "fastunet", "status": "failed",
         "reason": "RuntimeError: x"},
    ]  # fmt: skip
    result = {
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "versions": {"torch": "2.13", "triton": "3.9", "cuda": "12.8"},
        "date": "2026-01-01",
        "config": {"mode": "inference", "in_ch": 3, "out_ch": 1, "base_channels": 64, "depth": 4, "quick": False,
                   "threads": None},
        "peaks": {"matmul_tflops": {"bf16": 770.0}, "copy_gbps": 3000.0},
        "cases": [{"mode": "inference", "batch": 16, "size": 256, "dtype": "bf16", "gflop_per_step": 1541.4}],
        "rows": rows,
    }  # fmt: skip
    result["targets"] = report.evaluate_targets(result)
    assert "CPU fallback" not in report.plot_title(result)
    png = report.plot(result, tmp_path / "gpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = readme_table.render(result)
    assert "% of peak" in md and "× eager CL bf16 AMP" in md and "**FAIL**" in md
    assert len(report.target_lines(result["targets"], cuda=True)) == 4


def test_readme_table_picks_latest_full_gpu_result(tmp_path, monkeypatch):
    def write(name, device, date, quick=False):
        result = {"device": {"type": device}, "date": date, "timestamp": date, "config": {"quick": quick}}
        (tmp_path / name).write_text(json.dumps(result))
        return tmp_path / name

    files = [
        write("old.json", "cuda", "2026-01-01"),
        write("new.json", "cuda", "2026-02-01"),
        write("newer_quick.json", "cuda", "2026-03-01", quick=True),
        write("newest_cpu.json", "cpu", "2026-04-01"),
    ]
    monkeypatch.setattr(readme_table, "committed_results", lambda _: files)
    assert readme_table.latest_gpu_result(tmp_path).name == "new.json"
    monkeypatch.setattr(readme_table, "committed_results", lambda _: [])
    assert readme_table.latest_gpu_result(tmp_path) is None


# --------------------------------------------------------------------------- the CPU quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python benchmarks/run.py --device cpu --quick --out <tmp>``, once for the module."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTUNET_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    jsons = list(out.glob("*.json"))
    assert len(jsons) == 1, list(out.iterdir())
    return proc, jsons[0], json.loads(jsons[0].read_text())


def test_quick_run_writes_json_and_png(quick_run):
    proc, path, result = quick_run
    assert path.name.startswith("cpu-") and path.name.endswith("_inference_quick.json")
    assert path.name == f"{result['device']['slug']}_{result['date']}_inference_quick.json"
    png = path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in proc.stdout
    assert "need an NVIDIA GPU and were skipped" in proc.stdout
    assert "--quick" in proc.stdout and "base_channels=8" in proc.stdout
    assert "CPU fallback" in report.plot_title(result)


def test_cpu_report_has_no_peak_column_and_no_layer_table(quick_run):
    proc, _, result = quick_run
    headers = [line for line in proc.stdout.splitlines() if line.startswith("provider ")]
    assert len(headers) == len(result["cases"]) == 2
    for header in headers:
        assert "%peak" not in header and "peak MiB" not in header
        assert "x eager fp32 NCHW" in header
    assert "x eager CL fp32" in headers[0] and "x eager CL bf16-AMP" in headers[1]  # named by dtype
    assert "amp" not in headers[0].lower()  # an fp32 case says nothing about AMP
    assert "per layer" not in proc.stdout and "measured peaks" not in proc.stdout
    why = [line for line in proc.stdout.splitlines() if line.startswith("per-layer table left out on CPU")]
    assert len(why) == 1
    assert result["layers"] == [] and result["config"]["layers"] is False
    assert result["peaks"] is None
    assert all(r["peak_fraction"] is None for r in result["rows"])


def test_cpu_report_has_one_cpu_target_line_and_one_gpu_targets_line(quick_run):
    proc, _, result = quick_run
    lines = proc.stdout.splitlines()
    cpu = [line for line in lines if line.startswith("CPU target")]
    assert len(cpu) == 1 and "eager fp32 NCHW" in cpu[0]
    assert "not judged" in cpu[0]  # --quick is a toy model: never PASS or FAIL
    assert lines.count(report.GPU_TARGETS_LINE) == 1
    assert not any(line.startswith("TARGET") for line in lines)
    assert [t["result"] for t in result["targets"]] == ["not measured"] * 4 + ["not judged"]


def test_quick_run_json_schema(quick_run):
    _, _, result = quick_run
    for key in ("schema", "date", "timestamp", "wall_s", "command", "device", "versions", "config", "peaks",
                "flop_convention", "cases", "rows", "layers", "targets", "notes"):  # fmt: skip
        assert key in result, key
    assert result["schema"] == 2
    assert result["device"]["type"] == "cpu"
    assert result["versions"]["torch"] == torch.__version__
    assert {"python", "triton", "cuda", "fastunet"} <= result["versions"].keys()
    cfg = result["config"]
    assert cfg["quick"] is True and cfg["mode"] == "inference" and cfg["backend"] == "auto"
    assert cfg["threads"] == [1]
    assert len(result["cases"]) == len(cfg["batches"]) * len(cfg["sizes"]) * len(cfg["dtypes"]) * len(cfg["threads"])
    device = result["device"]
    assert "avx2" in device["isa"] or "avx2" not in Path("/proc/cpuinfo").read_text()  # the ISA flags recorded
    assert device["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(device["fastunet_cpu_features"]) == {"prepack", "bf16", "nnpack", "nnpack_threads"}
    assert len(device["load_average"]) == len(device["load_average_end"]) == 3
    for row in result["rows"]:
        assert set(row) == ROW_KEYS, set(row) ^ ROW_KEYS


def test_quick_run_rows(quick_run):
    _, _, result = quick_run
    rows = result["rows"]
    by = {(r["dtype"], r["provider"]): r for r in rows}
    for dtype in result["config"]["dtypes"]:
        for name in ("eager_fp32_nchw", "eager_cl", "fastunet"):
            r = by[(dtype, name)]
            assert r["status"] == "ok", r
            assert r["max_rel_err"] <= r["tolerance"]
            assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
            assert r["images_per_s"] == pytest.approx(r["batch"] / (r["ms_median"] / 1e3))
            assert r["peak_mem_mb"] is None  # no CUDA memory counters on CPU
            assert isinstance(r["minor_faults_per_step"], int) and r["minor_faults_per_step"] >= 0
            assert math.isfinite(r["speedup_vs_eager_nchw"]) and math.isfinite(r["speedup_vs_eager_cl"])
            assert r["speedup_vs_best_compile"] is None  # compile providers skipped in --quick
        assert by[(dtype, "eager_fp32_nchw")]["speedup_vs_eager_nchw"] == pytest.approx(1.0)
        assert by[(dtype, "eager_cl")]["speedup_vs_eager_cl"] == pytest.approx(1.0)
        assert by[(dtype, "eager_fp32_nchw")]["layout"] == "weights NCHW, input NCHW"
        assert by[(dtype, "eager_cl")]["layout"] == "weights channels_last, input channels_last"
        assert by[(dtype, "fastunet")]["layout"].endswith("input NCHW")  # the baseline's input, as a user has it
        assert "fallback" in by[(dtype, "fastunet")]["label"]
        for name in ("fastunet_cudagraph", "compile_default", "fastunet_compile"):
            assert by[(dtype, name)]["status"] == "skipped" and by[(dtype, name)]["reason"]
        assert all(by[(dtype, name)]["timer"] == "perf_counter, interleaved" for name in ("eager_cl", "fastunet"))
    assert "amp" not in " ".join(r["provider"] + r["label"] for r in rows if r["dtype"] == "fp32").lower()
    # the opt-in fast mode and ONNX Runtime run fp32 only; OpenVINO its default precision in bf16 cases
    assert by[("fp32", "fastunet_fast")]["status"] == "ok"
    for name in ("fastunet_fast", "onnxruntime"):
        assert by[("bf16", name)]["status"] == "skipped" and by[("bf16", name)]["reason"] == "fp32 only"
    for name, package in providers.PEERS.items():
        installed = importlib.util.find_spec(package) is not None
        for dtype in result["config"]["dtypes"]:
            row = by[(dtype, name)]
            if not installed:
                assert (
                    row["status"] == "skipped"
                    and row["reason"] == f"{package} is not installed (pip install 'fastunet[cpu-peers]')"
                )
            elif (dtype, name) != ("bf16", "onnxruntime"):
                assert row["status"] == "ok", row
                assert row["family"] == "peer" and math.isfinite(row["speedup_vs_best_peer"])
    if importlib.util.find_spec("openvino") is not None:
        ov = by[("bf16", "openvino")]
        assert "default precision" in ov["label"] and f"({ov['precision']} on this CPU)" in ov["label"]


def test_readme_table_renders_and_rewrites(quick_run, tmp_path):
    _, path, result = quick_run
    md = readme_table.render(result, source="benchmarks/results/x.json")
    assert "| provider |" in md and "`fastunet`" in md and "not judged" in md
    assert "% of peak" not in md and report.GPU_TARGETS_LINE in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n{readme_table.MARK_START}\nold table\n{readme_table.MARK_END}\n\n## after\n")
    assert readme_table.main([str(path), "--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "`eager_cl`" in text
    assert text.startswith("# title\n\nintro\n") and text.endswith(f"{readme_table.MARK_END}\n\n## after\n")
    assert readme_table.main([str(path), "--write-readme", str(readme)]) == 0
    assert readme.read_text() == text  # idempotent
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing to replace\n")
    assert readme_table.main([str(path), "--write-readme", str(no_markers)]) == 2
    assert no_markers.read_text() == "# nothing to replace\n"


def test_readme_table_cpu_section_and_dtype_filter(quick_run, tmp_path):
    _, path, result = quick_run
    dtypes = {c["dtype"] for c in result["cases"]}
    one = sorted(dtypes)[0]
    md = readme_table.render(result, source="x.json", dtypes=(one,))
    assert md.count("\n#### ") == sum(c["dtype"] == one for c in result["cases"]) >= 1
    headers = [line for line in md.splitlines() if line.startswith("#### ")]
    kept = [c for c in result["cases"] if c["dtype"] == one]
    assert all(f"×{c['size']}, {one}" in h for h, c in zip(headers, kept, strict=True))
    assert f"(cases: {one})" in md  # the generated line says what was left out
    start, end = readme_table.SECTIONS["cpu"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n{start}\nold\n{end}\n{readme_table.MARK_START}\ngpu\n{readme_table.MARK_END}\n")
    args = [str(path), "--write-readme", str(readme), "--section", "cpu", "--dtype", one]
    assert readme_table.main(args) == 0
    text = readme.read_text()
    assert "old" not in text and f"\n{readme_table.MARK_START}\ngpu\n" in text  # the GPU section untouched
    assert readme_table.main([str(path), "--write-readme", str(readme)]) == 0  # default: the GPU section
    assert "\ngpu\n" not in readme.read_text()


# --------------------------------------------------------------------------- in-process runs
def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else {}


def test_target_case_run_prints_one_pass_or_fail_line(monkeypatch, tmp_path, capsys):
    """A run in the CPU target's case (shrunk here to the tiny model, so it takes a second)
    prints exactly one CPU-target line with the measured ratio and PASS or FAIL, and by
    default writes outside the repository, never under benchmarks/results/."""
    monkeypatch.setitem(report.CPU_TARGET_CASE, "size", 32)
    monkeypatch.setattr(report, "TARGET_MODEL", {"base_channels": 4, "depth": 2})
    monkeypatch.setattr(run, "DEFAULT_OUT", tmp_path / "default-out")
    results_before = _files(run.RESULTS_DIR)
    threads_before = torch.get_num_threads()
    assert run.main(TINY) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads_before  # restored for the caller
    assert _files(run.RESULTS_DIR) == results_before  # nothing written into the repository
    written = sorted((tmp_path / "default-out").glob("*.json"))
    assert len(written) == 1 and f"wrote {written[0]}" in out
    result = json.loads(written[0].read_text())
    assert result["config"]["threads"] == [1]  # the CPU default
    cpu_lines = [line for line in out.splitlines() if line.startswith("CPU target")]
    assert len(cpu_lines) == 1, out
    target = next(t for t in result["targets"] if t["kind"] == "cpu")
    assert target["result"] in ("PASS", "FAIL")
    assert cpu_lines[0].startswith(f"CPU target: {target['result']}: ")
    fast = next(r for r in result["rows"] if r["provider"] == "fastunet")
    assert target["value"] == pytest.approx(fast["speedup_vs_eager_nchw"])
    assert f"{fast['speedup_vs_eager_nchw']:.2f}x eager fp32 NCHW" in cpu_lines[0]
    assert out.splitlines().count(report.GPU_TARGETS_LINE) == 1


def test_save_never_overwrites_a_same_day_result(monkeypatch, tmp_path, capsys):
    """--save writes under benchmarks/results/ (redirected here); a second run the same day
    gets a -2 name and leaves the first run's files byte for byte as they were."""
    assert run.parse_args(["--device", "cpu", "--save"]).out == BENCH / "results"
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path / "results")
    assert run.main([*TINY, "--save"]) == 0
    first = _files(tmp_path / "results")
    assert sorted(Path(n).suffix for n in first) == [".json", ".png"]
    assert run.main([*TINY, "--save"]) == 0
    second = _files(tmp_path / "results")
    assert len(second) == 4
    assert {n: second[n] for n in first} == first  # the first files are untouched
    stem = Path(next(n for n in first if n.endswith(".json"))).stem
    assert {f"{stem}-2.json", f"{stem}-2.png"} == set(second) - set(first)
    capsys.readouterr()


def test_default_out_is_outside_the_repository():
    args = run.parse_args(["--device", "cpu"])
    assert args.out == run.DEFAULT_OUT
    assert REPO not in args.out.resolve().parents
    assert args.batch == [1] and args.size == [256] and args.dtype == ["fp32"] and args.threads == [1]
    assert run.parse_args(["--device", "cpu", "--threads", "2"]).threads == [2]
    assert run.parse_args(["--device", "cpu", "--threads", "1", "2", "1"]).threads == [1, 2]
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", "--save", "--out", "/tmp/x"])


def test_help_states_every_default_and_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1].split("examples:", 1)[0]
    blocks = [b for b in ("\n" + options).split("\n  -") if b.strip()]  # one block per option
    parser = run.build_parser()
    flags = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    documented = set()
    for block in blocks:
        flag = "-" + block.split()[0]
        if flag in ("-h,", "-h"):
            continue
        documented.add(flag)
        assert "default" in " ".join(block.split()), f"{flag}: no default in its help:\n{block}"
        assert "(default: None)" not in " ".join(block.split()), flag
    assert documented == flags
    examples = [line for line in text.split("examples:", 1)[1].splitlines() if line.strip()]
    assert 3 <= len(examples) <= 5 and all(line.strip().startswith("python benchmarks/run.py") for line in examples)


# --------------------------------------------------------------------------- like for like
@pytest.fixture(scope="module")
def tiny_cases():
    cfg = providers.ModelConfig(base_channels=4, depth=2)
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    return {
        dtype: providers.make_case(
            cfg,
            sd,
            mode="inference",
            batch=1,
            size=16,
            dtype_name=dtype,
            device=torch.device("cpu"),
            n_inputs=2,
            seed=1,
        )  # fmt: skip
        for dtype in ("fp32", "bf16")
    }


@pytest.mark.parametrize(
    "name, weights, inputs",
    [
        ("eager_fp32_nchw", "NCHW", "NCHW"),
        ("eager_cl", "channels_last", "channels_last"),
        ("compile_default", "channels_last", "channels_last"),
        ("compile_max_autotune", "channels_last", "channels_last"),
        ("compile_max_autotune_freezing", "channels_last", "channels_last"),
        ("fastunet", "as a user has them", "NCHW"),  # fed the CPU baseline's input
        ("fastunet_compile", "as a user has them", "NCHW"),
    ],
)
def test_providers_prepare_the_layout_they_claim(tiny_cases, name, weights, inputs):
    """Read off the tensors each provider really prepares (building a compile provider does not
    compile: that happens on its first call). fastunet's weights are whatever
    ``fastunet.UNet(...)`` + ``load_state_dict`` + ``eval()`` gives a user: the benchmark adds
    no conversion of its own (the model may choose its internal layout itself)."""
    case = tiny_cases["fp32"]
    runner = _provider(name).build(case)
    if name.startswith("fastunet"):
        user = fastunet.UNet(case.model.in_ch, case.model.out_ch, **case.model.options())
        user.load_state_dict(case.state_dict)
        weights = providers.weights_format(user.eval())
        assert runner.inputs is case.inputs_nchw  # the very tensors the baseline gets
    assert providers.weights_format(runner.model) == weights
    assert {providers.memory_format(x) for x in runner.inputs} == {inputs}
    assert runner.layout == f"weights {weights}, input {inputs}"
    assert inputs in _provider(name).label(case)


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_providers_compute_in_the_dtype_they_claim(tiny_cases, dtype, expected):
    """eager_fp32_nchw is fp32 whatever the case; eager_cl and fastunet follow the case's dtype
    (autocast in 16-bit cases), so they are compared in the same arithmetic."""
    case = tiny_cases[dtype]
    assert _provider("eager_fp32_nchw").build(case).step(case.inputs_nchw[0]).dtype == torch.float32
    for name in ("eager_cl", "fastunet"):
        runner = _provider(name).build(case)
        assert runner.step(runner.inputs[0]).dtype == expected, name
        assert ("autocast" in _provider(name).label(case)) == (dtype != "fp32")


def test_training_step_includes_the_optimizer_and_keeps_the_weights():
    """``--mode training`` times zero_grad + forward + backward + an optimizer step; lr=0 keeps
    every provider on the shared weights, so the check after warm-up compares like with like."""
    import providers

    cfg = providers.ModelConfig(base_channels=4, depth=2)
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    case = providers.make_case(
        cfg, sd, mode="training", batch=2, size=16, dtype_name="fp32", device=torch.device("cpu"), n_inputs=2, seed=1
    )
    runner = providers.build_fastunet(case)
    before = [p.detach().clone() for p in runner.params]
    for x in case.inputs_cl:
        runner.step(x)
    assert all(p.grad is not None for p in runner.params)
    assert all(torch.equal(p, b) for p, b in zip(runner.params, before, strict=True))
    row = providers.bench_provider(_provider("fastunet"), case, warmup=1, reps=2, quick=True)
    assert row["status"] == "ok", row["reason"]
    assert row["grad_rel_l2_err"] is not None and row["grad_rel_l2_err"] < row["grad_tolerance"]


def _provider(name):
    import providers

    return next(p for p in providers.PROVIDERS if p.name == name)


# --------------------------------------------------------------------------- --preset
def test_preset_flops_follow_the_classic_convention():
    """A preset's FLOPs come from torch's flop counter on the preset's model; milesial's
    transposed-conv model has the classic model's convolutions (bias-free, which FLOPs ignore),
    so both counts must agree, and a training step is 3 forwards as for the classic model."""
    classic = providers.ModelConfig(base_channels=4, depth=2)
    milesial = providers.ModelConfig(base_channels=4, depth=2, out_activation="none", preset="milesial")
    for mode in ("inference", "training"):
        want = flops.step_flops(mode, **classic.flop_config(), batch=2, height=32)
        assert providers.model_step_flops(classic, mode, 2, 32) == want
        assert providers.model_step_flops(milesial, mode, 2, 32) == want
    keras = providers.ModelConfig(base_channels=4, depth=2, preset="keras")
    # nearest_conv: each 2x2 up conv runs on the upsampled map (4x the transposed conv's MACs)
    assert providers.model_step_flops(keras, "inference", 1, 32) > flops.step_flops(
        "inference", **classic.flop_config(), batch=1, height=32
    )


def test_every_provider_builds_the_presets_model():
    """Building a provider does not run or compile it: each model is read off as built."""
    cfg = providers.ModelConfig(base_channels=4, depth=2, out_activation="none", preset="milesial-bilinear")
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    case = providers.make_case(
        cfg, sd, mode="inference", batch=1, size=16, dtype_name="fp32", device=torch.device("cpu"), n_inputs=1, seed=1
    )
    for name in ("eager_fp32_nchw", "eager_cl", "compile_default", "compile_max_autotune", "fastunet",
                 "fastunet_compile"):  # fmt: skip
        model = _provider(name).build(case).model
        assert model.preset == "milesial-bilinear" and model.upsampling == "bilinear", name
        assert model.out_activation == "none" and isinstance(model, fastunet.UNet) == name.startswith("fastunet")


@pytest.mark.parametrize("mode, preset", [("inference", "milesial"), ("training", "keras")])
def test_preset_run_records_the_preset(monkeypatch, tmp_path, capsys, mode, preset):
    """``--preset`` end to end (tiny model; eager and fastunet's CPU fallback, all checked against
    the float64 reference of the preset's model): the JSON records the preset, its
    activation and dropout (0 in a keras training run: a random mask per provider could not be
    checked), the FLOPs of that model, and no target is judged on it."""
    args = ["--device", "cpu", "--mode", mode, "--preset", preset, "--batch", "2", "--size", "64", "--dtype", "fp32",
            "--base-channels", "4", "--depth", "2", "--warmup", "1", "--reps", "2", "--out", str(tmp_path),
            "--providers", "eager_fp32_nchw", "eager_cl", "fastunet"]  # fmt: skip
    assert run.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    cfg = result["config"]
    assert cfg["preset"] == preset and f"preset={preset!r}" in out and f"--preset {preset}" in out
    assert cfg["out_activation"] == fastunet.PRESETS[preset]["out_activation"]
    assert cfg["dropout"] == (0.0 if mode == "training" else None)
    model_cfg = providers.ModelConfig(3, 1, 4, 2, preset=preset)
    assert result["cases"][0]["gflop_per_step"] * 1e9 == providers.model_step_flops(model_cfg, mode, 2, 64)
    assert [r["provider"] for r in result["rows"]] == ["eager_fp32_nchw", "eager_cl", "fastunet"]
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]
    assert all(t["result"] in ("not measured", "not judged") for t in result["targets"])


def test_preset_is_refused_in_predict_mode(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--mode", "predict", "--preset", "keras"])
    assert "--preset is for --mode inference and training" in capsys.readouterr().err
