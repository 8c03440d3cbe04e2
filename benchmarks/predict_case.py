"""``python benchmarks/run.py --mode predict``: whole-image inference with ``fastunet.predict``
against raw forwards of the same tiles (the overhead ratio) and, when MONAI is installed,
against MONAI's ``sliding_window_inference`` with the same model, tiles and weights.

One square image of ``--size`` pixels, tiles of ``--tile`` with ``--overlap``, ``--batch`` tiles
per forward, Gaussian blending; defaults: on a GPU one 2048x2048 image, tile 512, batch 8,
bf16, the classic model; on a CPU (1 thread) 512x512, tile 128, batch 8, fp32,
base_channels 16 (about a minute).

Providers (every one runs the same ``fastunet.UNet`` with the same weights):

* ``raw_tiles``: only the forwards: the tiles ``predict`` runs, cut out and batched beforehand,
  through the model ``--batch`` at a time (inference mode, autocast as the case says).
* ``fastunet_predict``: ``fastunet.predict`` (padding, tile gathering, Gaussian weighting, the
  fp32 accumulation and the division included), ``blend="gaussian"``.
* ``fastunet_predict_center``: the same with the overlap-tile blend (no weights, no division).
* ``monai_swi``: ``monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125,
  padding_mode="reflect")``; skipped when MONAI is not installed (it is no dependency).

Timing: the providers take turns, one call each per round (so a slow spell of a shared
machine hits all of them alike), after ``--warmup`` rounds; median and p20/p80 of ``--reps``
rounds. CUDA: synchronized before and after each call. Overhead ("x raw forwards") = the
median over rounds of each round's ``fastunet_predict`` time over the same round's
``raw_tiles`` time (paired, so a slow spell divides out); the target is <= 1.15x. The JSON
goes where the other modes' go (``<device-slug>_<date>_predict[-N].json``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time

import numpy as np
import report
import torch
from providers import ModelConfig, make_state_dict

import fastunet
from fastunet.predict import tile_starts

OVERHEAD_TARGET = 1.15
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per (device type, quick): image size, tile, base_channels, warm-up rounds, timed rounds,
# threads. Batch (tiles per forward) is 8 everywhere, dtype bf16 on CUDA and fp32 on CPU.
DEFAULTS = {
    ("cuda", False): {"size": 2048, "tile": 512, "base_channels": 64, "warmup": 3, "reps": 10, "threads": None},
    ("cuda", True): {"size": 1024, "tile": 512, "base_channels": 64, "warmup": 2, "reps": 5, "threads": None},
    ("cpu", False): {"size": 512, "tile": 128, "base_channels": 16, "warmup": 1, "reps": 7, "threads": 1},
    ("cpu", True): {"size": 128, "tile": 64, "base_channels": 4, "warmup": 1, "reps": 3, "threads": 1},
}
PROVIDERS = ("raw_tiles", "fastunet_predict", "fastunet_predict_center", "monai_swi")


def apply_defaults(args, given: set[str]) -> None:
    """Fill the options the user left out with the predict defaults of the device."""
    d = DEFAULTS[(args.device, args.quick)]
    args.size = args.size if "size" in given else [d["size"]]
    args.tile = args.tile if args.tile is not None else d["tile"]
    args.base_channels = args.base_channels if "base_channels" in given else d["base_channels"]
    args.warmup = args.warmup if "warmup" in given else d["warmup"]
    args.reps = args.reps if "reps" in given else d["reps"]
    args.threads = args.threads if "threads" in given else d["threads"]
    args.batch = args.batch if "batch" in given else [8]
    args.dtype = args.dtype if "dtype" in given else (["bf16"] if args.device == "cuda" else ["fp32"])


def _monai():
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    return sliding_window_inference


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3, out


def run(args, argv, *, device_info, versions, default_out) -> int:
    """Time the providers on one image; print the table and the overhead line; write the JSON."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size, tile, batch, dtype_name = args.size[0], args.tile, args.batch[0], args.dtype[0]
    autocast = _AUTOCAST[dtype_name]
    if getattr(args, "checkpoint", None) is not None:  # run.py --weights: its architecture and weights
        cfg, state = args.checkpoint
    else:
        cfg = ModelConfig(args.in_ch, args.out_ch, args.base_channels, args.depth)
        state = make_state_dict(cfg, device, args.seed)
    model = fastunet.UNet(cfg.in_ch, cfg.out_ch, **cfg.options())
    model.load_state_dict(state)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    image = torch.rand(1, cfg.in_ch, size, size, generator=gen).to(device)
    info = device_info(device)

    # The tiles predict runs (the image is at least one tile here, so no padding).
    starts = tile_starts(max(size, tile), tile, args.overlap)
    pad = max(tile - size, 0)
    padded = torch.nn.functional.pad(image, [pad // 2, pad - pad // 2] * 2, mode="reflect") if pad else image
    windows = [padded[0, :, y : y + tile, x : x + tile] for y in starts for x in starts]
    batches = [torch.stack(windows[i : i + batch]) for i in range(0, len(windows), batch)]

    def raw():
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return [model(b) for b in batches][-1]

    def ours(blend):
        return lambda: fastunet.predict(
            model, image, tile_size=tile, overlap=args.overlap, blend=blend, batch_size=batch, dtype=autocast
        )

    swi = _monai()

    def monai():
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return swi(image, (tile, tile), batch, model, overlap=args.overlap, mode="gaussian", sigma_scale=0.125,
                       padding_mode="reflect")  # fmt: skip

    calls = {"raw_tiles": raw, "fastunet_predict": ours("gaussian"), "fastunet_predict_center": ours("center")}
    if swi is not None:
        calls["monai_swi"] = monai
    wanted = [p for p in PROVIDERS if p in calls]
    print(
        f"fastunet predict benchmark on {info['name']} ({device.type}"
        + ("" if device.type == "cuda" else f", {torch.get_num_threads()} thread(s)")
        + f"): one {size}x{size} image, tile {tile}, overlap {args.overlap}, {len(windows)} tiles, batch {batch}, "
        f"{dtype_name}, UNet({cfg.in_ch}, {cfg.out_ch}, base_channels={cfg.base_channels}, depth={cfg.depth})",
        flush=True,
    )
    times = {p: [] for p in wanted}
    outputs = {}
    for r in range(args.warmup + args.reps):
        for p in wanted:
            ms, out = _timed(calls[p], device)
            if r >= args.warmup:
                times[p].append(ms)
            outputs[p] = out
        print(f"  round {r + 1}/{args.warmup + args.reps}" + (" (warm-up)" if r < args.warmup else ""),
              file=sys.stderr, flush=True)  # fmt: skip

    rows = []
    for p in PROVIDERS:
        row = {"provider": p, "status": "ok", "reason": None, "ms_median": None, "ms_p20": None, "ms_p80": None,
               "n_reps": len(times.get(p, [])), "vs_raw": None, "max_abs_diff_vs_predict": None}  # fmt: skip
        if p not in times:
            row["status"], row["reason"] = "skipped", "MONAI is not installed (pip install monai; optional)"
        else:
            t = np.asarray(times[p])
            row.update(ms_median=float(np.median(t)), ms_p20=float(np.percentile(t, 20)),
                       ms_p80=float(np.percentile(t, 80)))  # fmt: skip
        rows.append(row)
    ref = outputs["fastunet_predict"].float()
    raw_t = np.asarray(times["raw_tiles"])
    for row in rows:
        if row["status"] == "ok":
            # Paired: each round's call over the same round's raw forwards, then the median, so
            # a slow spell of a shared machine divides out instead of landing on one provider.
            row["vs_raw"] = float(np.median(np.asarray(times[row["provider"]]) / raw_t))
            if row["provider"] != "raw_tiles":
                row["max_abs_diff_vs_predict"] = float((outputs[row["provider"]].float() - ref).abs().max())
    overhead = rows[1]["vs_raw"]
    target_case = device.type == "cpu" and (size, tile, cfg.base_channels, args.overlap, torch.get_num_threads()) == (
        512,
        128,
        16,
        0.25,
        1,
    )
    verdict = "PASS" if overhead <= OVERHEAD_TARGET else "FAIL"
    target_line = (
        f"predict overhead: {verdict}: fastunet.predict = {overhead:.3f}x the raw forwards of its "
        f"{len(windows)} tiles, needs <= {OVERHEAD_TARGET}x"
        + ("" if target_case else " (the target's case: CPU, 1 thread, 512x512, tile 128, overlap 0.25, base 16)")
    )

    print()
    print(predict_table(rows))
    print()
    print(target_line)
    result = {
        "schema": 2,
        "date": dt.date.today().isoformat(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "command": " ".join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": info,
        "versions": versions(),
        "config": {
            "mode": "predict",
            "device": device.type,
            "size": size,
            "tile": tile,
            "overlap": args.overlap,
            "tiles": len(windows),
            "batch": batch,
            "dtype": dtype_name,
            "in_ch": cfg.in_ch,
            "out_ch": cfg.out_ch,
            "base_channels": cfg.base_channels,
            "depth": cfg.depth,
            "warmup": args.warmup,
            "reps": args.reps,
            "quick": args.quick,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "backend": fastunet.get_backend(),
            "blend": "gaussian",
        },  # fmt: skip
        "rows": rows,
        "overhead": {"value": overhead, "threshold": OVERHEAD_TARGET, "result": verdict, "target_case": target_case},
        "notes": [],
    }
    out_dir = args.out if args.out is not None else default_out
    path = report.write_json(result, out_dir)
    print(f"\nwrote {path}\n({result['wall_s']:.1f} s)")
    bad = [r for r in rows if r["max_abs_diff_vs_predict"] is not None and r["provider"] == "monai_swi"
           and not r["max_abs_diff_vs_predict"] <= (1e-4 if autocast is None else 5e-2)]  # fmt: skip
    if bad:
        print(f"\nMONAI's result differs from fastunet.predict by {bad[0]['max_abs_diff_vs_predict']:.3g}: WRONG")
    return 1 if bad else 0


def predict_table(rows: list[dict]) -> str:
    """One line per provider: median and p20-p80 ms, x raw forwards, max |diff| vs predict."""
    headers = ("provider", "ms (p20-p80)", "x raw forwards (paired)", "max |diff| vs predict", "status")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["provider"], "-", "-", "-", f"skipped: {r['reason']}"))
            continue
        diff = r["max_abs_diff_vs_predict"]
        lines.append((
            r["provider"], f"{r['ms_median']:.1f} ({r['ms_p20']:.1f}-{r['ms_p80']:.1f})", f"{r['vs_raw']:.3f}",
            "-" if diff is None else f"{diff:.2g}", "ok",
        ))  # fmt: skip
    return report.format_table(headers, lines, right=(False, True, True, True, False))
