#!/usr/bin/env python
"""Render a benchmark result (JSON written by ``benchmarks/run.py``) as Markdown, and keep the
README's benchmark section generated from it, never typed by hand.

    python benchmarks/readme_table.py                     # latest committed GPU result -> stdout
    python benchmarks/readme_table.py path/to/result.json # a given result (any device)
    python benchmarks/readme_table.py --write-readme      # rewrite README.md between the markers
    python benchmarks/readme_table.py --layers ...        # add the per-layer tables

"Latest committed" means: among the JSON files under ``benchmarks/results/`` in git's ``HEAD``,
the CUDA ones, full runs before ``--quick`` ones, then the newest by date and timestamp. Only
reads git (``git ls-tree``); never changes the repository's state. ``--write-readme`` replaces
everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` and nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import report

from fastunet.atomic import atomic_path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
README = HERE.parent / "README.md"
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
#: the README's generated sections: name -> (start marker, end marker); "bench" holds the GPU result
SECTIONS = {"bench": (MARK_START, MARK_END), "cpu": ("<!-- cpu-bench:start -->", "<!-- cpu-bench:end -->")}


def committed_results(results_dir: Path) -> list[Path]:
    """JSON files under ``results_dir`` that are in git's HEAD (empty outside a repo/commit)."""
    try:
        proc = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", "HEAD", "."],
            cwd=results_dir,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    # ls-tree prints paths relative to the directory it runs in.
    return [results_dir / name for name in proc.stdout.splitlines() if name.endswith(".json")]


def latest_gpu_result(results_dir: Path) -> Path | None:
    best, best_key = None, None
    for path in committed_results(results_dir):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("device", {}).get("type") != "cuda":
            continue
        key = (not result["config"].get("quick", False), result.get("date", ""), result.get("timestamp", ""))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _status(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    label = "**WRONG**" if row["status"] == "wrong" else row["status"]
    return f"{label}: {_md(row['reason'])}" if row.get("reason") else label


def provider_markdown(rows: list[dict], *, cuda: bool = True) -> str:
    """One case's rows as a Markdown table; "% of peak" and "peak MiB" only for CUDA results
    (a CPU result has neither a measured peak nor memory counters)."""
    dtype = rows[0]["dtype"] if rows else "fp32"
    cl = "eager CL fp32" if dtype == "fp32" else f"eager CL {dtype} AMP"
    cols = ["provider", "ms (p20–p80)", "img/s", "TFLOP/s"]
    cols += ["% of peak", "peak MiB"] if cuda else []
    cols += ["max rel err", "× eager fp32 NCHW", f"× {cl}", "× best compile"]
    # the peers' column where the run timed some (older results have none: their tables stay as rendered)
    peers = any(r.get("speedup_vs_best_peer") is not None for r in rows)
    cols += ["× best peer"] if peers else []
    cols += ["status"]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|---|" + "--:|" * (len(cols) - 2) + "---|",
    ]
    for r in rows:
        ms = "–" if r["ms_median"] is None else f"{r['ms_median']:.2f} ({r['ms_p20']:.2f}–{r['ms_p80']:.2f})"
        frac = None if r.get("peak_fraction") is None else 100 * r["peak_fraction"]
        cells = [
            f"{_md(r['label'])} (`{r['provider']}`)", ms, _num(r["images_per_s"], ".1f"), _num(r["tflops"], ".3g"),
        ]  # fmt: skip
        if cuda:
            cells += [_num(frac, ".1f"), _num(r["peak_mem_mb"], ".0f")]
        cells += [
            _num(r["max_rel_err"], ".1e"), _num(r.get("speedup_vs_eager_nchw"), ".2f"),
            _num(r.get("speedup_vs_eager_cl"), ".2f"), _num(r["speedup_vs_best_compile"], ".2f"),
        ]  # fmt: skip
        cells += [_num(r.get("speedup_vs_best_peer"), ".2f")] if peers else []
        cells += [_status(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_markdown(rows: list[dict]) -> str:
    lines = [
        "| layer | shape | GFLOP | fastunet ms | torch ms | speedup | fastunet err | status |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_md(r['layer'])} | {_md(r['shape'])} | {_num(r['gflop'], '.3f')} | "
            f"{_num(r['fastunet_ms'], '.4f')} | {_num(r['torch_ms'], '.4f')} | {_num(r['speedup'], '.2f')} | "
            f"{_num(r['fastunet_err'], '.1e')} | {_status(r)} |"
        )
    return "\n".join(lines)


def render(result: dict, source: str | None = None, layers: bool = False, dtypes: tuple = ()) -> str:
    """The Markdown for one result: a header line, one table per case (only the cases of
    ``dtypes`` when given, e.g. ``("fp32",)``), the targets."""
    dev, ver, cfg = result["device"], result["versions"], result["config"]
    out = []
    if source:
        cases = f" (cases: {', '.join(dtypes)})" if dtypes else ""
        out.append(f"_Generated by `python benchmarks/readme_table.py` from `{source}`{cases}; do not edit by hand._\n")
    header = [f"**{_md(dev['name'])}**", f"torch {ver.get('torch')}", f"triton {ver.get('triton')}"]
    if ver.get("cuda"):
        header.append(f"CUDA {ver['cuda']}")
    header += [
        result["date"],
        cfg["mode"],
        f"UNet({cfg['in_ch']}, {cfg['out_ch']}, base_channels={cfg['base_channels']})",
    ]
    if cfg.get("quick"):
        header.append("`--quick`")
    out.append(" · ".join(header))
    if dev["type"] == "cpu" and dev.get("isa"):
        load = dev.get("load_average")
        out.append(
            f"\n{dev.get('cores')} cores; ISA flags: {' '.join(dev['isa'])}; torch CPU capability "
            f"{dev.get('torch_cpu_capability')}; load average (1/5/15 min) at the start "
            f"{'/'.join(map(str, load)) if load else 'unknown'}."
        )
    peaks = result.get("peaks")
    if peaks:
        mm = ", ".join(f"{k} {v:.3g}" for k, v in peaks["matmul_tflops"].items())
        out.append(f"\nMeasured peaks: matmul TFLOP/s {mm}; copy {peaks['copy_gbps']:.0f} GB/s.")
    for case in result["cases"]:
        if dtypes and case["dtype"] not in dtypes:
            continue
        key = (case["mode"], case["batch"], case["size"], case["dtype"], case.get("threads"))
        rows = [r for r in result["rows"] if report.case_key(r) == key]
        threads = "" if key[4] is None else f", {key[4]} thread{'s' if key[4] > 1 else ''}"
        out.append(
            f"\n#### batch {case['batch']}, {case['size']}×{case['size']}, {case['dtype']}{threads} "
            f"({case['gflop_per_step']:.1f} GFLOP/step)\n"
        )
        out.append(provider_markdown(rows, cuda=dev["type"] == "cuda"))
        if layers:
            lrows = [
                r
                for r in result.get("layers", [])
                if (r["batch"], r["size"], r["dtype"]) == (case["batch"], case["size"], case["dtype"])
            ]
            if lrows:
                out.append("\nPer layer (forward, eval-mode ops):\n")
                out.append(layer_markdown(lrows))
    if result.get("targets"):
        out.append("\nTargets:\n")
        if dev["type"] == "cuda":
            out.extend(f"- **{t['result']}**: {_md(t['target'])}: {_md(t['detail'])}" for t in result["targets"])
        else:
            out.extend(f"- {_md(line)}" for line in report.target_lines(result["targets"], cuda=False))
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str, name: str = "bench") -> str:
    """``text`` with everything between the markers of section ``name`` replaced by ``section``."""
    mark_start, mark_end = SECTIONS[name]
    start, end = text.find(mark_start), text.find(mark_end)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README has no '{mark_start}' ... '{mark_end}' section to rewrite")
    return text[: start + len(mark_start)] + "\n" + section.rstrip("\n") + "\n" + text[end:]


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/readme_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", type=Path, help="result file (default: latest committed GPU result)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--write-readme",
        nargs="?",
        const=README,
        type=Path,
        metavar="README",
        help=f"rewrite the marked section of this file (default {_display(README)}) instead of printing",
    )
    p.add_argument("--layers", action="store_true", help="include the per-layer tables")
    p.add_argument(
        "--section", choices=sorted(SECTIONS), default="bench",
        help="which marked section --write-readme rewrites (cpu: the CPU results)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", action="append", default=[], metavar="DTYPE",
        help="only the cases of this dtype (fp32, bf16, fp16; repeatable; default: every case)",
    )  # fmt: skip
    args = p.parse_args(argv)

    path = args.json or latest_gpu_result(args.results_dir)
    if path is None:
        print(
            f"no committed GPU result under {_display(args.results_dir)}; run benchmarks/run.py on a GPU, "
            "commit its JSON, or pass a JSON path",
            file=sys.stderr,
        )
        return 2
    markdown = render(
        json.loads(Path(path).read_text()), source=_display(Path(path)), layers=args.layers, dtypes=tuple(args.dtype)
    )
    if args.write_readme is None:
        sys.stdout.write(markdown)
        return 0
    readme = args.write_readme
    try:
        updated = replace_section(readme.read_text(), markdown, args.section)
    except (OSError, ValueError) as exc:
        print(f"{readme}: {exc}", file=sys.stderr)
        return 2
    with atomic_path(readme) as tmp:  # a cut run never leaves a half-written README
        tmp.write_text(updated)
    print(f"updated {_display(readme)} from {_display(Path(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
