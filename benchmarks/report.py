"""Everything derived from the measured rows: throughput, fractions of peak (CUDA only),
speedups, the targets, the printed tables, the JSON file and the plot."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# The two eager baselines every row's speedups are quoted against: {row field: provider}.
BASELINES = {"speedup_vs_eager_nchw": "eager_fp32_nchw", "speedup_vs_eager_cl": "eager_cl"}
# The issues' acceptance targets, judged only on the case they were set for; a run is judged
# on the targets of its own --mode.
TARGET_CASE = {"device": "H100", "batch": 16, "size": 256, "dtype": "bf16"}
# The targets were set on an H100; an H200 is the same GH100 chip with faster, larger HBM, and the
# targets are ratios against eager PyTorch on the same GPU, so it is judged too (the machines lent
# for GPU checks are H200s). The JSON records which GPU ran.
TARGET_DEVICES = ("H100", "H200")
TARGET_MODEL = {"base_channels": 64, "depth": 4}
TARGETS = (
    ("inference", "speedup_vs_eager_cl", ">=", 1.6, "fastunet >= 1.6x eager channels_last AMP"),
    ("inference", "speedup_vs_best_compile", ">=", 1.2, "fastunet >= 1.2x the best torch.compile"),
    ("inference", "peak_fraction", ">=", 0.55, "fastunet >= 55 % of the measured bf16 matmul peak"),
    ("inference", "memory_ratio", "<=", 0.6, "fastunet peak memory <= 0.6x eager AMP"),
    ("training", "speedup_vs_eager_cl", ">=", 1.3, "fastunet training step >= 1.3x eager channels_last AMP"),
)
# The CPU target: the fallback against what the classic model does out of the box on a small
# CPU (one thread, so a busy 2-core machine cannot turn OpenMP barriers into the result).
CPU_TARGET_CASE = {"mode": "inference", "threads": 1, "batch": 1, "size": 256, "dtype": "fp32"}
CPU_TARGET = ("speedup_vs_eager_nchw", ">=", 1.15, "fastunet CPU fallback >= 1.15x eager fp32 NCHW")
GPU_TARGETS_LINE = "GPU targets (see docs/benchmarks.md 'Targets'): not measured here, need an NVIDIA GPU"


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def case_key(row: dict) -> tuple:
    """``(mode, batch, size, dtype, threads)``: the case a row belongs to (``threads``: the CPU
    intra-op thread count, None on CUDA and in results written before it was recorded)."""
    return (row["mode"], row["batch"], row["size"], row["dtype"], row.get("threads"))


# --------------------------------------------------------------------------- derived numbers
def add_throughput(row: dict, flops_per_step: int, peaks: dict | None) -> None:
    """Fill images/s, GFLOP, TFLOP/s and the fraction of the measured peak of a timed row
    (``peaks`` is None on CPU: there is no peak worth the name, see ``run.py``)."""
    row["gflop_per_step"] = flops_per_step / 1e9
    if row["ms_median"] is None:
        return
    seconds = row["ms_median"] * 1e-3
    row["images_per_s"] = row["batch"] / seconds
    row["tflops"] = flops_per_step / seconds / 1e12
    peak = (peaks or {}).get("matmul_tflops", {}).get(row["precision"])
    if peak:
        row["peak_kind"] = f"{row['precision']} matmul"
        row["peak_fraction"] = row["tflops"] / peak


def add_layer_peak(row: dict, peaks: dict | None) -> None:
    """Fraction of the measured peak a layer's fastunet op reaches: of the matmul peak for layers
    with FLOPs, of the copy bandwidth for the max-pool (which only moves bytes)."""
    if row["fastunet_ms"] is None or not peaks:
        return
    if row["fastunet_tflops"]:
        peak = peaks["matmul_tflops"].get(row["precision"])
        if peak:
            row["peak_kind"], row["fastunet_peak_fraction"] = (
                f"{row['precision']} matmul",
                row["fastunet_tflops"] / peak,
            )
    elif row["fastunet_gbps"] and peaks.get("copy_gbps"):
        row["peak_kind"], row["fastunet_peak_fraction"] = "copy bandwidth", row["fastunet_gbps"] / peaks["copy_gbps"]


def add_speedups(rows: Sequence[dict]) -> dict[tuple, dict]:
    """Speedups of every ``ok`` row vs each eager baseline (``BASELINES``: fp32 NCHW and
    channels_last), vs the fastest correct torch.compile of the reference and vs the fastest
    correct CPU peer (ONNX Runtime, OpenVINO), per case. Rows that are wrong, failed or skipped
    get none (a wrong result is never a speedup). Returns ``{case_key: {"eager_nchw_ms",
    "eager_cl_ms", "best_compile", "best_compile_ms", "best_peer", "best_peer_ms"}}``."""
    summary: dict[tuple, dict] = {}
    for key in dict.fromkeys(case_key(r) for r in rows):
        case_rows = [r for r in rows if case_key(r) == key]
        ok = [r for r in case_rows if r["status"] == "ok"]
        bases = {field: next((r for r in ok if r["provider"] == name), None) for field, name in BASELINES.items()}
        best = _fastest(ok, "compile")
        peer = _fastest(ok, "peer")
        for r in ok:
            for field, base in bases.items():
                if base is not None:
                    r[field] = base["ms_median"] / r["ms_median"]
            if best is not None:
                r["speedup_vs_best_compile"] = best["ms_median"] / r["ms_median"]
            if peer is not None:
                r["speedup_vs_best_peer"] = peer["ms_median"] / r["ms_median"]
        nchw, cl = bases["speedup_vs_eager_nchw"], bases["speedup_vs_eager_cl"]
        summary[key] = {
            "eager_nchw_ms": nchw["ms_median"] if nchw else None,
            "eager_cl_ms": cl["ms_median"] if cl else None,
            "best_compile": best["provider"] if best else None,
            "best_compile_ms": best["ms_median"] if best else None,
            "best_peer": peer["provider"] if peer else None,
            "best_peer_ms": peer["ms_median"] if peer else None,
        }
    return summary


def _fastest(rows: Sequence[dict], family: str) -> dict | None:
    """The fastest of ``rows`` in ``family``, or None."""
    return min((r for r in rows if r["family"] == family), key=lambda r: r["ms_median"], default=None)


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets as PASS / FAIL / ``"not measured"`` records.

    Judged on the plain ``fastunet`` provider (what users call) in the target case on an H100 (or H200)
    with the classic width; anything else reports "not measured" and says what was missing.
    """
    device_name = result["device"]["name"]
    cfg = result["config"]
    want = {**TARGET_CASE, "mode": cfg["mode"]}
    missing = []
    if result["device"]["type"] != "cuda" or not any(d in device_name.upper() for d in TARGET_DEVICES):
        missing.append(f"an {' or '.join(TARGET_DEVICES)} (this run: {device_name})")
    if cfg["base_channels"] != TARGET_MODEL["base_channels"] or cfg["depth"] != TARGET_MODEL["depth"]:
        missing.append("the classic width (--base-channels 64, depth 4)")
    rows = [
        r
        for r in result["rows"]
        if (r["mode"], r["batch"], r["size"], r["dtype"]) == (want["mode"], want["batch"], want["size"], want["dtype"])
    ]
    if not rows:
        missing.append(f"batch {want['batch']}, {want['size']}x{want['size']}, {want['dtype']}")
    fast = next((r for r in rows if r["provider"] == "fastunet"), None)
    base = next((r for r in rows if r["provider"] == BASELINES["speedup_vs_eager_cl"]), None)
    where = f"{want['device']}, batch {want['batch']}, {want['size']}x{want['size']}, {want['dtype']} {want['mode']}"
    out = []
    for mode, metric, op, threshold, text in TARGETS:
        if mode != cfg["mode"]:
            continue
        record = {"kind": "gpu", "target": f"{text} ({where})", "metric": metric, "op": op, "threshold": threshold}
        value = None
        if fast is not None and fast["status"] == "ok":
            if metric == "memory_ratio":
                ok_base = base is not None and base["status"] == "ok"
                if ok_base and fast["peak_mem_mb"] is not None and base["peak_mem_mb"]:
                    value = fast["peak_mem_mb"] / base["peak_mem_mb"]
            else:
                value = fast[metric]
        record["value"] = value
        if missing:
            record["result"], record["detail"] = "not measured", "needs " + "; ".join(missing)
        elif fast is None or fast["status"] == "skipped":
            record["result"], record["detail"] = "not measured", "the fastunet provider did not run"
        elif fast["status"] in ("wrong", "failed"):
            record["result"], record["detail"] = "FAIL", f"fastunet {fast['status']}: {fast['reason']}"
        elif value is None:
            record["result"] = "not measured"
            record["detail"] = {
                "speedup_vs_eager_cl": "eager channels_last baseline did not run correctly",
                "speedup_vs_best_compile": "no torch.compile provider ran correctly",
                "peak_fraction": "no measured bf16 peak",
                "memory_ratio": "no peak memory for fastunet or eager AMP",
            }[metric]
        else:
            passed = value >= threshold if op == ">=" else value <= threshold
            record["result"] = "PASS" if passed else "FAIL"
            record["detail"] = f"{value:.3g} {op} {threshold:g}"
            if metric == "speedup_vs_best_compile":
                compiled = [r["provider"] for r in rows if r["family"] == "compile" and r["status"] == "ok"]
                record["detail"] += f" (compile providers measured: {', '.join(compiled)})"
        out.append(record)
    if result["device"]["type"] == "cpu":
        out.append(evaluate_cpu_target(result))
    return out


def _cpu_target_where() -> str:
    c = CPU_TARGET_CASE
    return (
        f"{c['threads']} thread, batch {c['batch']}, {c['size']}x{c['size']}, {c['dtype']} {c['mode']}, "
        f"base_channels {TARGET_MODEL['base_channels']}"
    )


def evaluate_cpu_target(result: dict) -> dict:
    """The CPU target as a record like ``evaluate_targets``' (``kind`` "cpu").

    PASS/FAIL only when the run measured the target case itself (threads, batch, size, dtype,
    mode, classic width); any other run gets "not judged", with the ratio it did measure in the
    detail, so a fast toy configuration can never report a target as met.
    """
    metric, op, threshold, text = CPU_TARGET
    cfg = result["config"]
    want = CPU_TARGET_CASE
    record = {
        "kind": "cpu",
        "target": f"{text} ({_cpu_target_where()})",
        "metric": metric,
        "op": op,
        "threshold": threshold,
        "value": None,
    }
    differs = []
    if cfg["mode"] != want["mode"]:
        differs.append(f"mode {cfg['mode']}")
    if cfg["base_channels"] != TARGET_MODEL["base_channels"] or cfg["depth"] != TARGET_MODEL["depth"]:
        differs.append(f"base_channels {cfg['base_channels']}, depth {cfg['depth']}")
    target_key = (want["mode"], want["batch"], want["size"], want["dtype"], want["threads"])
    rows = [r for r in result["rows"] if case_key(r) == target_key]
    if not rows:
        # Judge the first case measured, for the "measured here" number.
        first = case_key(result["rows"][0]) if result["rows"] else None
        rows = [r for r in result["rows"] if case_key(r) == first]
        if first is not None:
            differs.append(f"batch {first[1]}, {first[2]}x{first[2]}, {first[3]}, {first[4]} thread(s)")
    fast = next((r for r in rows if r["provider"] == "fastunet"), None)
    value = fast.get(metric) if fast is not None and fast["status"] == "ok" else None
    record["value"] = value
    need = f"needs {op} {threshold:g}x ({_cpu_target_where()})"
    if fast is None or fast["status"] == "skipped":
        record["result"], record["detail"] = "not measured", f"the fastunet provider did not run; {need}"
    elif fast["status"] in ("wrong", "failed"):
        record["result"], record["detail"] = "FAIL", f"fastunet {fast['status']}: {fast['reason']}"
    elif value is None:
        record["result"] = "not measured"
        record["detail"] = f"the eager fp32 NCHW baseline did not run correctly; {need}"
    elif differs:
        record["result"] = "not judged"
        record["detail"] = (
            f"fastunet CPU fallback = {value:.2f}x eager fp32 NCHW in this run, which is not the target case "
            f"({'; '.join(differs)}); the target {need}"
        )
    else:
        passed = value >= threshold if op == ">=" else value <= threshold
        record["result"] = "PASS" if passed else "FAIL"
        record["detail"] = f"fastunet CPU fallback = {value:.2f}x eager fp32 NCHW, {need}"
    return record


# --------------------------------------------------------------------------- text tables
def _f(value, spec: str, dash: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return dash
    return format(value, spec)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _status(row: dict) -> str:
    status = row["status"].upper() if row["status"] in ("wrong", "failed") else row["status"]
    return f"{status}: {row['reason']}" if row["reason"] else status


def eager_cl_name(dtype: str) -> str:
    """How the channels_last eager baseline is called in a ``dtype`` case: by what it computes."""
    return "eager CL fp32" if dtype == "fp32" else f"eager CL {dtype}-AMP"


def provider_table(rows: Sequence[dict], *, cuda: bool) -> str:
    """The per-case table. The %peak and peak-memory columns exist on CUDA only: a CPU has
    no measured peak worth the name and no allocator counters."""
    dtype = rows[0]["dtype"] if rows else "fp32"
    headers = [
        "provider", "ms median [p20-p80]", "img/s", "TFLOP/s", "%peak", "peak MiB",
        "max abs / rel err (tol)", "x eager fp32 NCHW", f"x {eager_cl_name(dtype)}", "x best-compile",
        "x best peer", "status",
    ]  # fmt: skip
    right = [False, True, True, True, True, True, True, True, True, True, True, False]
    body = []
    for r in rows:
        timed = r["ms_median"] is not None
        ms = f"{r['ms_median']:.3f} [{r['ms_p20']:.3f}-{r['ms_p80']:.3f}]" if timed else "-"
        err = "-"
        if r["max_rel_err"] is not None:
            err = f"{_f(r['max_abs_err'], '.1e', 'inf')} / {_f(r['max_rel_err'], '.1e', 'inf')} ({r['tolerance']:.0e})"
        if r["grad_rel_l2_err"] is not None:
            err += f" grad {r['grad_rel_l2_err']:.1e} ({r['grad_tolerance']:.0e})"
        body.append([
            r["provider"], ms, _f(r["images_per_s"], ".2f"), _f(r["tflops"], ".3g"),
            _f(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f"),
            _f(r["peak_mem_mb"], ".0f"), err,
            _f(r["speedup_vs_eager_nchw"], ".2f"), _f(r["speedup_vs_eager_cl"], ".2f"),
            _f(r["speedup_vs_best_compile"], ".2f"), _f(r.get("speedup_vs_best_peer"), ".2f"), _status(r),
        ])  # fmt: skip
    # CUDA: no %peak or memory on CPU, no CPU peers on CUDA
    drop = ("x best peer",) if cuda else ("%peak", "peak MiB")
    if drop:
        keep = [i for i, h in enumerate(headers) if h not in drop]
        headers = [headers[i] for i in keep]
        body = [[row[i] for i in keep] for row in body]
        right = [right[i] for i in keep]
    return format_table(headers, body, right)


def layer_table(rows: Sequence[dict]) -> str:
    timed = [r for r in rows if r["fastunet_ms"] is not None]
    slowest = max(timed, key=lambda r: r["fastunet_ms"], default=None)
    behind = min(timed, key=lambda r: r["speedup"], default=None)
    headers = [
        "layer", "shape", "GFLOP", "fastunet ms", "torch ms", "speedup",
        "fastunet rate (% peak)", "err fastunet", "err torch", "status",
    ]  # fmt: skip
    body = []
    for r in rows:
        rate = f"{r['fastunet_tflops']:.2f} TF/s" if r["fastunet_tflops"] else _f(r["fastunet_gbps"], ".0f") + " GB/s"
        if r.get("fastunet_peak_fraction") is not None:
            rate += f" ({100 * r['fastunet_peak_fraction']:.0f}%)"
        notes = [_status(r)]
        if r is slowest:
            notes.append("<- slowest")
        if r is behind and r["speedup"] < 1:
            notes.append("<- furthest behind torch")
        body.append([
            r["layer"], r["shape"], _f(r["gflop"], ".3f"), _f(r["fastunet_ms"], ".4f"),
            _f(r["torch_ms"], ".4f"), _f(r["speedup"], ".2f"),
            rate if r["fastunet_ms"] is not None else "-",
            _f(r["fastunet_err"], ".1e"), _f(r["torch_err"], ".1e"), " ".join(notes),
        ])  # fmt: skip
    return format_table(headers, body, [False, False, True, True, True, True, True, True, True, False])


def target_lines(targets: Sequence[dict], *, cuda: bool) -> list[str]:
    """The printed target verdicts. On CUDA one line per GPU target. On CPU one line for the
    CPU target and one for all GPU targets together (none can be measured without a GPU)."""
    if cuda:
        return [f"TARGET {t['result']:>12}  {t['target']}: {t['detail']}" for t in targets if t.get("kind") != "cpu"]
    lines = [f"CPU target: {t['result']}: {t['detail']}" for t in targets if t.get("kind") == "cpu"]
    if any(t.get("kind", "gpu") == "gpu" for t in targets):
        lines.append(GPU_TARGETS_LINE)
    return lines


# --------------------------------------------------------------------------- files
def _finite(obj):
    """JSON has no inf/nan: non-finite floats become null (the row's status says why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def result_stem(result: dict) -> str:
    """``<device-slug>_<YYYY-MM-DD>_<mode>[_quick]``."""
    quick = "_quick" if result["config"]["quick"] else ""
    return f"{result['device']['slug']}_{result['date']}_{result['config']['mode']}{quick}"


def free_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ...: the first with neither a .json nor a .png in
    ``out_dir``, so a second run on the same day never overwrites the first one's files."""
    candidate, n = stem, 1
    while (out_dir / f"{candidate}.json").exists() or (out_dir / f"{candidate}.png").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_json(result: dict, out_dir: Path) -> Path:
    """Write ``result`` as ``<out_dir>/<result_stem>[-N].json`` (never over an existing file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{free_stem(out_dir, result_stem(result))}.json"
    with open(path, "x") as f:  # "x": a file that appeared since free_stem looked is not replaced
        f.write(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")
    return path


_COLORS = {"eager": "#8c8c8c", "compile": "#4c72b0", "fastunet": "#dd8452", "peer": "#55a868"}


def plot_title(result: dict) -> str:
    """The figure's title: on CPU it says that fastunet's CPU fallback is what was timed."""
    cfg = result["config"]
    model = f"UNet({cfg['in_ch']}, {cfg['out_ch']}, base_channels={cfg['base_channels']})"
    if result["device"]["type"] == "cpu":
        threads = cfg.get("threads")
        threads = "/".join(map(str, threads)) if isinstance(threads, list) else threads
        head = f"fastunet CPU fallback vs eager PyTorch: {result['device']['name']}, {threads} thread(s)"
    else:
        head = f"fastunet benchmark: {result['device']['name']}"
    return f"{head}\n{model}, {cfg['mode']}, {result['date']}" + (" --quick" if cfg["quick"] else "")


def plot(result: dict, path: Path) -> Path:
    """Horizontal bars of images/s per provider (median; error bars from the p20/p80 step
    times), one panel per case. Wrong rows are hatched red, failed ones named with their
    status instead of a bar; skipped rows are left out (the table says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in result["rows"] if r["status"] != "skipped"]
    keys = list(dict.fromkeys(case_key(r) for r in shown)) or [None]
    height = 1.6 * len(keys) + 0.4 * max(len(shown), 1) + 1.0
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, height), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        rows = [r for r in shown if case_key(r) == key]
        y = list(range(len(rows)))[::-1]
        top = max((r["batch"] / (r["ms_p20"] * 1e-3) for r in rows if r["ms_p20"]), default=1.0)
        for yi, r in zip(y, rows, strict=True):
            value = r["images_per_s"] or 0.0
            wrong = r["status"] == "wrong"
            xerr = None
            if r["ms_p20"] and r["ms_p80"]:
                # images/s falls as time rises: the p80 time gives the low end, p20 the high end.
                low, high = r["batch"] / (r["ms_p80"] * 1e-3), r["batch"] / (r["ms_p20"] * 1e-3)
                xerr = [[max(value - low, 0.0)], [max(high - value, 0.0)]]
            ax.barh(
                yi,
                value,
                xerr=xerr,
                capsize=3,
                color="#d62728" if wrong else _COLORS.get(r["family"], "#555555"),
                hatch="//" if wrong else None,
            )
            text = f"{value:.3g}" if r["status"] == "ok" else r["status"].upper()
            ax.text(value + 0.02 * top if xerr is None else value + xerr[1][0] + 0.02 * top, yi, text,
                    va="center", fontsize=8)  # fmt: skip
        ax.set_yticks(y, [r["provider"] for r in rows], fontsize=9)
        if key is not None:
            mode, batch, size, dtype, threads = key
            where = "" if threads is None else f", {threads} thread(s)"
            ax.set_title(f"{mode}, batch {batch}, {size}x{size}, {dtype}{where}", fontsize=9)
        ax.set_xlabel("images / s (median, bars p20-p80; higher is better)", fontsize=8)
        ax.set_xlim(0, top * 1.25)
    fig.suptitle(plot_title(result), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
