"""The benchmark harness (benchmarks/): FLOP count, the CPU quick run end to end, the README table.

The quick run goes through a subprocess exactly as a user types it, without TRITON_INTERPRET
(the harness never times the interpreter), and is shared by the tests that read its output.
"""

from __future__ import annotations

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
import readme_table  # noqa: E402
import report  # noqa: E402

import fastunet  # noqa: E402

ROW_KEYS = {
    "provider", "label", "family", "mode", "batch", "size", "dtype", "precision", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "n_reps", "timer", "first_call_s", "images_per_s", "gflop_per_step",
    "tflops", "peak_kind", "peak_fraction", "peak_mem_mb", "static_mem_mb", "max_abs_err", "max_rel_err",
    "tolerance", "grad_rel_l2_err", "grad_tolerance", "speedup_vs_eager_amp", "speedup_vs_best_compile",
}  # fmt: skip


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
        "dtype": "bf16", "status": status, "ms_median": ms,
        "speedup_vs_eager_amp": None, "speedup_vs_best_compile": None,
    }  # fmt: skip


def test_speedups_skip_wrong_rows_and_use_fastest_correct_compile():
    rows = [
        _row("eager_cl_amp", "eager", 10.0),
        _row("compile_default", "compile", 8.0),
        _row("compile_max_autotune", "compile", 2.0, status="wrong"),  # fast but wrong: no baseline
        _row("fastunet", "fastunet", 5.0),
        _row("fastunet_cudagraph", "fastunet", 1.0, status="wrong"),
    ]
    summary = report.add_speedups(rows)
    assert summary[("inference", 4, 64, "bf16")]["best_compile"] == "compile_default"
    fast = rows[3]
    assert fast["speedup_vs_eager_amp"] == pytest.approx(2.0)
    assert fast["speedup_vs_best_compile"] == pytest.approx(1.6)
    assert rows[2]["speedup_vs_eager_amp"] is None and rows[4]["speedup_vs_best_compile"] is None


def test_a_wrong_output_is_marked_wrong():
    """A provider whose output is off is timed but reported WRONG, never as a result."""
    import providers

    cfg = providers.ModelConfig(base_channels=4, depth=2)
    sd = providers.make_state_dict(cfg, torch.device("cpu"), seed=0)
    case = providers.make_case(
        cfg, sd, mode="inference", batch=1, size=16, dtype_name="fp32", device=torch.device("cpu"), n_inputs=2, seed=1
    )

    def broken(c):
        runner = providers.build_eager_cl_amp(c)
        step = runner.step
        runner.step = lambda x: step(x) * 1.01  # a 1 % error: far above the fp32 tolerance
        return runner

    def crashing(c):
        raise RuntimeError("compile error\nwith details")

    wrong = providers.Provider("eager_cl_amp", broken, "eager")
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
        {**base, "provider": "eager_cl_amp", "family": "eager", "status": "ok", "peak_mem_mb": 200.0},
        {**base, "provider": "compile_default", "family": "compile", "status": "ok", "peak_mem_mb": 150.0},
        {**base, "provider": "fastunet", "family": "fastunet", "status": fast_status, "peak_mem_mb": 100.0,
         "speedup_vs_eager_amp": 1.8, "speedup_vs_best_compile": fast_speedup_compile, "peak_fraction": 0.6},
    ]  # fmt: skip
    if fast_status != "ok":
        rows[2]["reason"] = "error above tolerance"
    return {
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "config": {"mode": "inference", "base_channels": 64, "depth": 4},
        "rows": rows,
    }


def test_targets_pass_fail_and_not_measured():
    results = [t["result"] for t in report.evaluate_targets(_h100_result())]
    assert results == ["PASS", "FAIL", "PASS", "PASS"]  # 1.8x, 1.1x < 1.2x, 60 %, 0.5x memory
    wrong = report.evaluate_targets(_h100_result(fast_status="wrong"))
    assert {t["result"] for t in wrong} == {"FAIL"}  # a wrong output never passes a target
    other_gpu = _h100_result()
    other_gpu["device"]["name"] = "NVIDIA A100-SXM4-80GB"
    assert {t["result"] for t in report.evaluate_targets(other_gpu)} == {"not measured"}


def test_training_run_is_judged_on_the_training_target():
    result = _h100_result()
    result["config"]["mode"] = "training"
    for row in result["rows"]:
        row["mode"] = "training"
    targets = report.evaluate_targets(result)
    assert [(t["metric"], t["result"]) for t in targets] == [("speedup_vs_eager_amp", "PASS")]  # 1.8x >= 1.3x
    result["rows"][2]["speedup_vs_eager_amp"] = 1.2
    assert [t["result"] for t in report.evaluate_targets(result)] == ["FAIL"]


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
    assert "need an NVIDIA GPU and were skipped" in proc.stdout
    assert "--quick" in proc.stdout and "base_channels=8" in proc.stdout
    assert "TARGET" in proc.stdout


def test_quick_run_json_schema(quick_run):
    _, _, result = quick_run
    for key in ("schema", "date", "timestamp", "wall_s", "command", "device", "versions", "config", "peaks",
                "flop_convention", "cases", "rows", "layers", "targets", "notes"):  # fmt: skip
        assert key in result, key
    assert result["device"]["type"] == "cpu"
    assert result["versions"]["torch"] == torch.__version__
    assert {"python", "triton", "cuda", "fastunet"} <= result["versions"].keys()
    cfg = result["config"]
    assert cfg["quick"] is True and cfg["mode"] == "inference" and cfg["backend"] == "auto"
    assert result["peaks"]["matmul_tflops"]["fp32"] > 0
    assert len(result["cases"]) == len(cfg["batches"]) * len(cfg["sizes"]) * len(cfg["dtypes"])
    for row in result["rows"]:
        assert set(row) == ROW_KEYS, set(row) ^ ROW_KEYS
    assert [t["result"] for t in result["targets"]] == ["not measured"] * 4


def test_quick_run_rows(quick_run):
    _, _, result = quick_run
    rows = result["rows"]
    by = {(r["dtype"], r["provider"]): r for r in rows}
    for dtype in result["config"]["dtypes"]:
        for name in ("eager_fp32_nchw", "eager_cl_amp", "fastunet"):
            r = by[(dtype, name)]
            assert r["status"] == "ok", r
            assert r["max_rel_err"] <= r["tolerance"]
            assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
            assert r["images_per_s"] == pytest.approx(r["batch"] / (r["ms_median"] / 1e3))
            assert r["peak_mem_mb"] is None  # no CUDA memory counters on CPU
            assert math.isfinite(r["speedup_vs_eager_amp"])
            assert r["speedup_vs_best_compile"] is None  # compile providers skipped in --quick
        assert by[(dtype, "eager_cl_amp")]["speedup_vs_eager_amp"] == pytest.approx(1.0)
        assert "fallback" in by[(dtype, "fastunet")]["label"]
        for name in ("fastunet_cudagraph", "compile_default", "fastunet_compile"):
            assert by[(dtype, name)]["status"] == "skipped" and by[(dtype, name)]["reason"]
    layers = result["layers"]
    assert layers and all(r["status"] == "ok" for r in layers), [r for r in layers if r["status"] != "ok"]
    assert {"conv3x3", "conv3x3_head", "upconv", "maxpool", "head"} == {r["kind"] for r in layers}


def test_readme_table_renders_and_rewrites(quick_run, tmp_path):
    _, path, result = quick_run
    md = readme_table.render(result, source="benchmarks/results/x.json")
    assert "| provider |" in md and "`fastunet`" in md and "not measured" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n{readme_table.MARK_START}\nold table\n{readme_table.MARK_END}\n\n## after\n")
    assert readme_table.main([str(path), "--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "`eager_cl_amp`" in text
    assert text.startswith("# title\n\nintro\n") and text.endswith(f"{readme_table.MARK_END}\n\n## after\n")
    assert readme_table.main([str(path), "--write-readme", str(readme)]) == 0
    assert readme.read_text() == text  # idempotent
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing to replace\n")
    assert readme_table.main([str(path), "--write-readme", str(no_markers)]) == 2
    assert no_markers.read_text() == "# nothing to replace\n"


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
