#!/usr/bin/env python
"""fastunet's main command: the U-Net benchmark, every provider side by side in one process.

    python benchmarks/run.py                          # GPU: batch 1 and 16, 256^2 and 512^2, bf16
                                                      # no GPU: 1 thread, batch 1, 256^2, fp32
    python benchmarks/run.py --quick                  # GPU: the target case only, fewer reps
    python benchmarks/run.py --device cpu --quick     # no GPU: a < 1 minute smoke run
    python benchmarks/run.py --mode training --dtype bf16 fp16 --batch 8 --size 256
    python benchmarks/run.py --mode predict           # fastunet.predict vs raw tile forwards (and MONAI)
    python benchmarks/run.py --preset milesial        # the same comparison for milesial's architecture
    python benchmarks/run.py --save                   # results under benchmarks/results/, to commit

Results go to ``--out DIR`` (default: ``<tempdir>/fastunet-bench``, outside the repository),
or with ``--save`` to ``benchmarks/results/``. A file of the same name is never overwritten:
a second run on the same day gets ``-2``, ``-3``, ... appended to its name.

Method
------
* **Same weights, same inputs.** One ``state_dict`` (default init, BatchNorm statistics
  calibrated on a random batch and affine parameters perturbed, so every layer matters) is
  loaded by every provider's model. Each case pre-generates ``n_inputs`` fp32 batches and every
  provider cycles through the same ones; enough of them that together they exceed twice the
  GPU's L2 cache, so a small case is not timed out of a warm cache.
* **Like for like.** Each provider gets exactly the layout and dtype treatment its name and
  label claim (``providers.py``): ``eager_fp32_nchw`` NCHW weights and input in fp32,
  ``eager_cl`` channels_last weights and input (autocast in 16-bit cases), fastunet as a user
  builds it, given the same input as the baseline it is judged against. Each row records the
  memory format its weights and input really had (``layout``).
* **Checked before timed.** Each provider's output on the first batch is compared with a
  float64 forward of the reference model (``.double()``, same device, same input): max abs
  error and max abs error / max|ref| are reported; above the precision's tolerance
  (``providers.OUTPUT_TOL``) the row is ``wrong``: shown as WRONG, kept out of every speedup.
  Training also compares all parameter gradients (relative L2 error, ``providers.GRAD_TOL``).
* **Timing.** Warm-up first (which includes compilation and autotuning, reported separately as
  ``first_call_s``). CUDA: a CUDA-event pair around every step, read after one synchronize;
  CPU: ``time.perf_counter`` per step. Median and 20th/80th percentiles, never the mean.
  Single layers are timed with ``triton.testing.do_bench`` (L2 flushed before every call) on
  CUDA. Peaks (CUDA only) are measured in the same run (``timing.measure_peaks``): a large
  matmul per precision through ``do_bench`` and a large device-to-device copy.
* **FLOPs** are counted from the model configuration (``flops.py``): 2 x MACs of every conv,
  transposed conv and the 1x1 head, ~96.3 GFLOP per 256x256 image for ``UNet(3, 1)``; a
  training step counts as 3 forwards (the usual convention).
* **Memory** (CUDA): ``torch.cuda.max_memory_allocated`` over the timed steps after
  ``reset_peak_memory_stats``, minus what the harness itself holds (shared inputs, float64
  reference), i.e. the provider's own weights, caches, graphs and activations. null on CPU.
* **CPU.** ``--device cpu`` compares the classic eager model with fastunet's CPU fallback
  (``fastunet.UNet(...).eval()`` under the ``"auto"`` backend), by default at one intra-op
  thread (``--threads``), batch 1, 256x256, fp32: the case of the CPU target (fastunet >=
  1.15x ``eager_fp32_nchw``), judged PASS/FAIL on one line, and only in that case. The
  Triton providers need an NVIDIA GPU and are skipped; the Triton interpreter is never
  benchmarked (this script unsets ``TRITON_INTERPRET`` and always selects ``"auto"``). There
  is no %peak column (a CPU has no measured peak comparable to a GPU's) and no per-layer table
  (it times fused ops the CPU fallback never calls); the GPU targets are one "not measured"
  line.

Exit status: 0, or 1 when any row (model or layer) is WRONG. The JSON and the plot are
written either way.

JSON (``<out>/<device-slug>_<YYYY-MM-DD>_<mode>[_quick][-N].json``)
---------------------------------------------------------------------
``schema``: format version (2: per-row ``layout``, two eager speedups, ``kind`` on targets).
``date`` (YYYY-MM-DD, local), ``timestamp`` (UTC, ISO 8601), ``wall_s`` (whole run, seconds),
``command`` (argv as run).

``device``: ``type`` ("cuda" | "cpu"), ``name``, ``slug`` (file-name form of the name); CUDA:
``capability``, ``sm_count``, ``memory_gib``, ``l2_mib``; CPU: ``cores``, ``threads``.

``versions``: ``python``, ``torch``, ``triton``, ``cuda`` (torch's CUDA, null on CPU builds),
``cudnn``, ``fastunet``, ``numpy``, ``git_commit`` (null outside a repository with commits).

``config``: ``mode``, ``device``, ``batches``, ``sizes``, ``dtypes``, ``in_ch``, ``out_ch``,
``base_channels``, ``depth``, ``preset`` (``--preset``: "classic", "keras", "milesial",
"milesial-bilinear"; every provider builds that architecture), ``out_activation`` (the
preset's), ``dropout`` (null: the preset's; 0 in training runs of a preset with dropout),
``providers``, ``warmup``, ``reps``,
``n_inputs`` (as requested; null = chosen per case from the L2 size, see ``cases``), ``quick``,
``seed``, ``threads`` (torch intra-op threads), ``layers`` (per-layer table on), ``save``,
``backend`` (fastunet backend, always "auto"), ``cudnn_benchmark``, ``cudnn_allow_tf32``,
``matmul_precision``.

``peaks`` (null on CPU): ``matmul_tflops`` ({precision: TFLOP/s} for "bf16", "fp16", "tf32", "fp32" as
needed), ``copy_gbps`` (device-to-device copy, read + write bytes), ``matmul_n``,
``copy_bytes``, ``method``.

``flop_convention``: the counting rule in words.

``rows`` (one per provider and case): ``provider``, ``label``, ``layout`` (memory format of
the 3x3 conv weights and of the input the step received, e.g. "weights NCHW, input NCHW";
null unless built), ``family`` ("eager" |
"compile" = torch.compile of the reference | "fastunet"), ``mode``, ``batch``, ``size``,
``dtype`` (the case's), ``precision`` (what this provider computes in: "fp32", "tf32", "bf16",
"fp16"), ``status`` ("ok" | "wrong" | "failed" | "skipped"), ``reason`` (why, for anything but
ok), ``ms_median``/``ms_p20``/``ms_p80`` (per step), ``n_reps``, ``timer`` ("cuda-events" |
"perf_counter"), ``first_call_s`` (build + first step: compile time), ``images_per_s``,
``gflop_per_step``, ``tflops`` (achieved), ``peak_kind`` and ``peak_fraction`` (tflops over the
measured matmul peak of that precision; null on CPU), ``peak_mem_mb`` and ``static_mem_mb`` (MiB; CUDA
only), ``minor_faults_per_step`` (CPU, interleaved runs: median minor page faults of the whole
process per timed step, null elsewhere), ``max_abs_err``, ``max_rel_err`` and ``tolerance`` (output vs float64),
``grad_rel_l2_err`` and ``grad_tolerance`` (training only), ``speedup_vs_eager_nchw`` (vs
``eager_fp32_nchw``), ``speedup_vs_eager_cl`` (vs ``eager_cl``: channels_last, autocast in
16-bit cases) and ``speedup_vs_best_compile`` (vs the fastest correct torch.compile of the
reference); all null unless the row is ok.

``cases`` (one per case): ``mode``, ``batch``, ``size``, ``dtype``, ``gflop_per_step``,
``n_inputs``, ``eager_nchw_ms``, ``eager_cl_ms``, ``best_compile``, ``best_compile_ms``.

``layers`` (CUDA only; one per distinct layer shape and case; forward, eval-mode ops): ``layer`` (module
names sharing the shape, "="-joined), ``kind``, ``shape``, ``count``, ``batch``, ``size``,
``dtype``, ``precision``, ``gflop``, ``min_mb`` (bytes the fused op must move, MB),
``fastunet_ms``/``_p20``/``_p80``, ``torch_ms``/``_p20``/``_p80``, ``fastunet_tflops``,
``torch_tflops``, ``fastunet_gbps``, ``torch_gbps``, ``speedup`` (torch_ms / fastunet_ms),
``peak_kind`` and ``fastunet_peak_fraction`` (of the matmul peak, or of the copy bandwidth for
the max-pool), ``fastunet_err``, ``torch_err`` (max rel error vs float64), ``tolerance``,
``status``, ``reason``.

``targets``: ``kind`` ("gpu": the issue's goals, H100, batch 16, 256x256, bf16; "cpu", CPU
runs only: fastunet >= 1.15x ``eager_fp32_nchw`` at 1 thread, batch 1, 256x256, fp32
inference, classic width), ``target``, ``metric``, ``op``, ``threshold``, ``value``,
``result`` ("PASS" | "FAIL" | "not measured" | "not judged": measured, but not in the
target's case), ``detail``.

``notes``: plain-language remarks printed with the tables (quick mode, skipped providers).
Non-finite numbers are written as null.
"""

# ruff: noqa: E402  (the environment must be fixed before torch/triton are imported)
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Never time Triton's CPU interpreter: the test suite sets TRITON_INTERPRET=1, and a
    # subprocess would inherit it. It must be gone before triton is imported.
    _INTERPRET_WAS_SET = os.environ.pop("TRITON_INTERPRET", None) is not None
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
else:
    _INTERPRET_WAS_SET = False

import argparse
import dataclasses
import datetime as dt
import gc
import json
import math
import platform
import subprocess
import tempfile
import time

import numpy as np
import predict_case
import report
import torch
from flops import TRAINING_FLOP_FACTOR
from layers import bench_layer, layer_specs
from providers import (
    PROVIDER_NAMES,
    PROVIDERS,
    Case,
    ModelConfig,
    bench_interleaved,
    bench_provider,
    blank_row,
    checkpoint_config,
    compute_precision,
    failure_reason,
    make_case,
    make_state_dict,
    model_step_flops,
)
from timing import measure_peaks

import fastunet
from fastunet.cpu_ops import cpu_features

try:
    from tqdm import tqdm
except ImportError:  # an offline GPU image may lack tqdm: progress as plain lines instead of a bar

    class tqdm:  # noqa: N801  (tqdm's name and the part of its interface used here)
        def __init__(self, total: int, desc: str, file, **_):
            self.total, self.desc, self.file, self.n = total, desc, file, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def set_postfix_str(self, text: str) -> None:
            print(f"{self.desc} {self.n}/{self.total}: {text}", file=self.file, flush=True)

        def update(self, n: int = 1) -> None:
            self.n += n


RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where results go unless --save or --out says otherwise: outside the repository, so a plain
# run never leaves files for git to pick up.
DEFAULT_OUT = Path(tempfile.gettempdir()) / "fastunet-bench"

# Defaults per (device type, quick); explicit options always win. CPU runs use one intra-op
# thread: on a busy machine OpenMP's barriers wait on descheduled threads, and a 10 ms forward
# became 100+ ms (seen on a loaded 2-core runner); one thread is also the CPU target's case.
_DEFAULT_KEYS = ("batch", "size", "dtype", "base_channels", "warmup", "reps", "threads")
DEFAULTS = {
    ("cuda", False): dict(zip(_DEFAULT_KEYS, ([1, 16], [256, 512], ["bf16"], 64, 10, 50, None), strict=True)),
    ("cuda", True): dict(zip(_DEFAULT_KEYS, ([16], [256], ["bf16"], 64, 5, 20, None), strict=True)),
    ("cpu", False): dict(zip(_DEFAULT_KEYS, ([1], [256], ["fp32"], 64, 3, 15, [1]), strict=True)),
    ("cpu", True): dict(zip(_DEFAULT_KEYS, ([2], [64], ["fp32", "bf16"], 8, 2, 10, [1]), strict=True)),
}

FLOP_CONVENTION = (
    "FLOPs = 2 x multiply-accumulates of the 3x3 convs, 2x2 stride-2 transposed convs and the 1x1 "
    "head, counted from the model configuration (BatchNorm, ReLU, pool, concat, sigmoid not "
    f"counted); a training step = {TRAINING_FLOP_FACTOR} x forward (the usual convention)."
)

CPU_LAYERS_NOTE = (
    "per-layer table left out on CPU: it times the fused ops (conv+BN+ReLU, upconv+concat, ...) "
    "that the CPU fallback never calls, so it would say nothing about this model's CPU speed."
)
CPU_PEAK_NOTE = (
    "no %peak on CPU: a CPU has no measured peak comparable to the GPU's (a 1024^3 matmul is not "
    "one), so only absolute TFLOP/s are shown."
)

EXAMPLES = """\
examples:
  python benchmarks/run.py                                  # no GPU: 1 thread, batch 1, 256x256, fp32 (CPU target)
  python benchmarks/run.py --device cpu --quick             # CPU smoke run, under a minute
  python benchmarks/run.py --mode predict                   # predict vs raw tile forwards: GPU 2048^2 / CPU 512^2
  python benchmarks/run.py --device cuda --batch 16 --size 256 --dtype bf16 --save
  python benchmarks/run.py --mode training --dtype bf16 fp16 --batch 8 --size 256 --out /tmp/bench
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to the help of options with a fixed default; description and epilog
    kept as written (the examples are laid out by hand)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Options whose default depends on the device state it themselves; argparse would add
        # a misleading "(default: None)" to them.
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _device_defaults(key: str) -> str:
    """``"cpu 1; cuda 1 16; --quick: cpu 2, cuda 16"``: an option's default per device, for --help."""

    def fmt(value) -> str:
        if value is None:
            return "torch's"
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    full = f"cpu {fmt(DEFAULTS[('cpu', False)][key])}; cuda {fmt(DEFAULTS[('cuda', False)][key])}"
    quick = f"cpu {fmt(DEFAULTS[('cpu', True)][key])}, cuda {fmt(DEFAULTS[('cuda', True)][key])}"
    return f"(default: {full}; with --quick: {quick})"


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help states its default."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description=(
            "Benchmark fastunet against eager PyTorch and torch.compile, side by side, same weights and inputs.\n"
            "Without an NVIDIA GPU it times fastunet's CPU fallback against the classic eager model."
        ),
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    # Options whose default depends on --device/--quick have default=None and say so in their
    # help text (ArgumentDefaultsHelpFormatter only appends "%(default)s" where one is missing).
    p.add_argument("--device", choices=["cuda", "cpu"], help="(default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="small, fast run (on CPU: a tiny model, a smoke test)")
    p.add_argument("--batch", type=int, nargs="+", help=f"batch sizes {_device_defaults('batch')}")
    p.add_argument(
        "--size", type=int, nargs="+", help=f"square image sizes, multiples of 2**depth {_device_defaults('size')}"
    )
    p.add_argument(
        "--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], help=f"compute dtypes {_device_defaults('dtype')}"
    )
    p.add_argument(
        "--mode", choices=["inference", "training", "predict"], default="inference",
        help="what one timed step is; predict: fastunet.predict on one --size image in --tile tiles vs raw forwards "
        "of the same tiles (and MONAI's sliding_window_inference if installed; defaults: cuda 2048 image, tile 512, "
        "bf16; cpu 512, tile 128, fp32, base_channels 16, 1 thread; --batch = tiles per forward, 8)",
    )  # fmt: skip
    p.add_argument(
        "--tile", type=int, help="predict mode: tile size, a multiple of 2**depth (default: cuda 512; cpu 128)"
    )
    p.add_argument("--overlap", type=float, default=0.25, help="predict mode: tile overlap, in [0, 1)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        help=f"directory for the JSON and PNG (default: {DEFAULT_OUT}, outside the repository)",
    )
    where.add_argument(
        "--save",
        action="store_true",
        help=f"write the JSON and PNG under {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}/ instead, to commit them",
    )
    p.add_argument(
        "--providers", nargs="+", choices=PROVIDER_NAMES, metavar="NAME",
        help=f"subset of providers, run in the order given, of: {', '.join(PROVIDER_NAMES)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--warmup", type=int, help=f"warm-up steps per provider, after the first call {_device_defaults('warmup')}"
    )
    p.add_argument("--reps", type=int, help=f"timed steps per provider {_device_defaults('reps')}")
    p.add_argument(
        "--base-channels", type=int, help=f"width of the first level, 64 classic {_device_defaults('base_channels')}"
    )
    p.add_argument("--depth", type=int, help="number of poolings (default: 4 classic, or the checkpoint's)")
    p.add_argument("--in-ch", type=int, help="input channels (default: 3, or the checkpoint's)")
    p.add_argument("--out-ch", type=int, help="output channels (default: 1, or the checkpoint's)")
    p.add_argument(
        "--preset",
        choices=list(fastunet.PRESETS),
        default=None,
        help="architecture (fastunet.PRESETS), built by every provider: classic, keras (zhixuhao's Keras U-Net), "
        "milesial / milesial-bilinear (milesial's Pytorch-UNet), nnunet (nnU-Net's InstanceNorm + LeakyReLU "
        "blocks); its out_activation is the preset's (default: "
        "classic; with --weights the checkpoint's, this only for a bare state_dict fastunet.load calls ambiguous)",
    )
    p.add_argument(
        "--weights", type=Path, metavar="PATH",
        help="benchmark this checkpoint's architecture with its weights (any format fastunet.load reads: a "
        "save_pretrained folder, a .safetensors/.pt state_dict of fastunet's or milesial's keys, a Keras "
        ".h5/.keras file); --in-ch, --out-ch, --base-channels, --depth come from it (default: none, random "
        "weights of the architecture above)",
    )  # fmt: skip
    p.add_argument(
        "--n-inputs", type=int,
        help="input batches to rotate through (default: 3 on CPU; on CUDA enough to exceed twice the L2 cache)",
    )  # fmt: skip
    p.add_argument(
        "--no-layers", action="store_true", help="skip the per-layer table (CUDA only; it is never run on CPU)"
    )
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (CUDA)")
    p.add_argument(
        "--threads", type=int, nargs="+",
        help=f"CPU intra-op thread counts, each a table of its own in one run {_device_defaults('threads')}",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument(
        "--rows", type=Path,
        help="also append every row (provider and layer) to this file as one JSON line the moment it is measured, "
        "so a run cut short keeps what it measured (benchmarks/gpu_check.py uses it) (default: no such file)",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and complete the options: device, then the per-device defaults, then checks."""
    p = build_parser()
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu)")
    _architecture_args(p, args)
    if args.mode == "predict":
        if args.preset != "classic" and args.weights is None:
            p.error("--preset is for --mode inference and training (predict times the classic model)")
        return _predict_args(p, args)
    if args.tile is not None:
        p.error("--tile is for --mode predict")
    defaults = DEFAULTS[(args.device, args.quick)]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = list(dict.fromkeys(args.dtype))
    m = 2**args.depth
    bad = [s for s in args.size if s <= 0 or s % m]
    if bad:
        p.error(f"--size must be positive multiples of 2**depth = {m}, got {bad}")
    if min(args.batch) < 1 or args.reps < 1 or args.warmup < 0 or args.base_channels < 1:
        p.error("--batch, --reps and --base-channels must be >= 1, --warmup >= 0")
    if args.threads is not None and min(args.threads) < 1:
        p.error("--threads must be >= 1")
    if args.threads is not None:
        args.threads = list(dict.fromkeys(args.threads))
    args.providers = args.providers or PROVIDER_NAMES
    if args.out is None:
        args.out = RESULTS_DIR if args.save else DEFAULT_OUT
    return args


def _architecture_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The sizes and preset: the defaults, or (--weights) the checkpoint's, loaded here once into
    ``args.checkpoint`` (``(ModelConfig, state_dict)``; None without --weights). A checkpoint that
    does not load is one line and exit status 1."""
    sizes = ("in_ch", "out_ch", "base_channels", "depth")
    args.checkpoint = None
    if args.weights is None:
        args.preset = args.preset or "classic"
        for key, value in (("in_ch", 3), ("out_ch", 1), ("depth", 4)):
            if getattr(args, key) is None:
                setattr(args, key, value)
        return
    given = [f"--{k.replace('_', '-')}" for k in sizes if getattr(args, k) is not None]
    if given:
        p.error(f"{', '.join(given)}: the sizes come from --weights")
    if not args.weights.exists():
        p.error(f"--weights {args.weights}: no such file or folder")
    try:
        args.checkpoint = checkpoint_config(args.weights, args.preset)
    except (fastunet.FastUNetError, OSError) as exc:
        p.exit(1, f"{p.prog}: error: {str(exc).strip().splitlines()[0]}\n")
    cfg = args.checkpoint[0]
    args.in_ch, args.out_ch, args.base_channels, args.depth = cfg.in_ch, cfg.out_ch, cfg.base_channels, cfg.depth
    args.preset = cfg.preset


def _predict_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--mode predict: its own defaults (predict_case.DEFAULTS) and checks; any image size."""
    given = {k for k in ("size", "base_channels", "warmup", "reps", "threads", "batch", "dtype")
             if getattr(args, k) is not None}  # fmt: skip
    if args.threads is not None:
        if len(args.threads) != 1:
            p.error("--mode predict takes one --threads count")
        args.threads = args.threads[0]
    predict_case.apply_defaults(args, given)
    m = 2**args.depth
    if args.tile < m or args.tile % m:
        p.error(f"--tile must be a positive multiple of 2**depth = {m}, got {args.tile}")
    if not 0 <= args.overlap < 1:
        p.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if min(args.size) < 1 or min(args.batch) < 1 or args.reps < 1 or args.warmup < 0 or args.base_channels < 1:
        p.error("--size, --batch, --reps and --base-channels must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.out is None:
        args.out = RESULTS_DIR if args.save else DEFAULT_OUT
    return args


# --------------------------------------------------------------------------- environment
def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return {
            "type": "cuda",
            "name": name,
            "slug": report.slug(name),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    features = cpu_features()
    return {
        "type": "cpu",
        "name": name,
        "slug": "cpu-" + report.slug(name),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "isa": [flag for flag in fields.get("flags", "").split() if flag.startswith(ISA_FLAG_PREFIXES)],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fastunet_cpu_features": dataclasses.asdict(features),
        "load_average": _load_average(),
    }


#: The /proc/cpuinfo flags that decide what the convolutions can issue (vector width, FMA,
#: bf16/int8 dot products, matrix units), recorded with every CPU result.
ISA_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx")


def _cpuinfo() -> dict:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): CPU timings on a busy
    machine are not comparable with idle ones, so every CPU result records them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fastunet": fastunet.__version__,
        "numpy": np.__version__,
        "git_commit": commit if commit and len(commit) == 40 else None,
    }


def rotation_count(device: torch.device, input_bytes: int, requested: int | None) -> int:
    """How many input batches to cycle through: together at least twice the L2 cache (GPU),
    at least 3, at most 64 and 1 GiB."""
    if requested:
        return requested
    if device.type != "cuda":
        return 3
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20
    n = math.ceil(2 * l2 / input_bytes)
    return max(3, min(n, 64, (1 << 30) // input_bytes))


def failed_row(provider, cfg, mode, batch, size, dtype_name, device, reason: str) -> dict:
    """The row of a provider whose case could not even be set up."""
    stub = Case(mode, batch, size, dtype_name, device, cfg, {}, [], [], torch.empty(0))
    row = blank_row(provider, stub)
    row["status"], row["reason"] = "failed", reason
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark as ``python benchmarks/run.py [argv]`` would; returns the exit status."""
    args = parse_args(argv)
    previous_backend = fastunet.get_backend()
    previous_threads = torch.get_num_threads()
    fastunet.set_backend("auto")  # Triton on CUDA tensors, the eager fallback on CPU
    try:
        return run(args, argv)
    finally:
        # An in-process caller (the tests) keeps its own settings.
        fastunet.set_backend(previous_backend)
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Measure, print the tables and the targets, write the JSON and the plot."""
    if args.mode == "predict":
        return predict_case.run(args, argv, device_info=device_info, versions=versions, default_out=DEFAULT_OUT)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    # CPU: one table per thread count; CUDA: torch's setting (one table)
    thread_counts = (args.threads or [torch.get_num_threads()]) if not cuda else [None]
    if args.threads is not None:
        torch.set_num_threads(args.threads[0])
    if args.checkpoint is not None:
        cfg, loaded = args.checkpoint
    else:
        out_activation = fastunet.PRESETS[args.preset]["out_activation"]
        cfg = ModelConfig(args.in_ch, args.out_ch, args.base_channels, args.depth, out_activation=out_activation,
                          preset=args.preset)  # fmt: skip
        loaded = None
    classic = cfg.classic
    # The per-layer table lists the classic model's layers (flops.unet_layers): classic only.
    layers_on = cuda and not args.no_layers and classic
    preset_options = cfg.architecture()
    # Dropout in a training step draws a different mask in every provider and in the float64
    # reference, so no output could be checked: training runs of such a preset leave it out.
    no_dropout = args.mode == "training" and preset_options.get("dropout", 0.0) > 0
    cfg = dataclasses.replace(cfg, dropout=0.0 if no_dropout else None)
    # In the order given (a caller with a time limit puts first what it most needs measured).
    by_name = {p.name: p for p in PROVIDERS}
    providers = [by_name[name] for name in dict.fromkeys(args.providers)]
    info = device_info(device)

    notes = []
    if _INTERPRET_WAS_SET:
        notes.append(
            "TRITON_INTERPRET was set in the environment and has been unset: benchmarks never time the interpreter."
        )
    if args.quick:
        notes.append(
            f"--quick: UNet({cfg.in_ch}, {cfg.out_ch}, base_channels={cfg.base_channels}) at batch "
            f"{args.batch}, size {args.size}, {args.warmup} warm-up and {args.reps} timed steps, "
            f"{', '.join(map(str, thread_counts))} CPU thread(s): a fast check "
            "of the harness"
            + (", not a measurement of the classic 31M-parameter model." if cfg.base_channels != 64 else ".")
        )
    if loaded is not None:
        notes.append(
            f"--weights {args.weights}: every provider loads its weights (float32 masters, BatchNorm statistics as "
            "saved) into its architecture, below."
        )
    if not classic:
        notes.append(
            f"--preset {args.preset}: every provider builds UNetReference/UNet(preset={args.preset!r}) "
            f"({', '.join(f'{k}={v!r}' for k, v in preset_options.items())}); FLOPs counted with "
            "torch.utils.flop_counter on that model; the targets are judged on the classic model only"
            + ("; no per-layer table (it lists the classic model's layers)" if cuda and not args.no_layers else "")
            + "."
        )
    if no_dropout:
        notes.append(
            f"training with --preset {args.preset}: dropout set to 0 (a random mask per provider would make "
            "the float64 output check meaningless); its cost is not in these timings."
        )
    if not cuda:
        notes.append(
            "No NVIDIA GPU: the Triton providers (fastunet's fused kernels, torch.compile(fastunet) on Triton, "
            "CUDA-graph replay) need an NVIDIA GPU and were skipped. The 'fastunet' rows time fastunet's CPU "
            "fallback: fastunet.UNet(...).eval() given the same NCHW fp32 input as eager_fp32_nchw."
        )
        if len(thread_counts) > 1 and "fastunet_fast" in args.providers and cpu_features().nnpack:
            notes.append(
                f"fastunet_fast at {'/'.join(map(str, thread_counts[1:]))} thread(s): NNPACK's thread pool keeps the "
                f"thread count of the process's first NNPACK call ({thread_counts[0]}), so there fast math runs its "
                "large maps on its other engines (fastunet.cpu_ops.nnpack_usable); `--threads N` alone gives fast "
                "math's figure at N threads."
            )
    print(
        f"fastunet benchmark on {info['name']} ({device.type}"
        + ("" if cuda else f", {'/'.join(map(str, thread_counts))} thread(s), load average {info['load_average'][0]}")
        + f"), torch {torch.__version__}, mode {args.mode}"
    )
    for note in notes:
        print("note:", note)
    sys.stdout.flush()
    if not cuda:
        notes += [CPU_PEAK_NOTE, CPU_LAYERS_NOTE]  # printed with the tables, where the columns would be

    cases = [(b, s, d) for d in args.dtype for b in args.batch for s in args.size]
    n_layer_rows = len(layer_specs(cfg, 1, args.size[0])) if layers_on else 0
    total = 1 + len(cases) * (1 + len(thread_counts) * len(providers) + n_layer_rows)
    rows: list[dict] = []
    layer_rows: list[dict] = []
    case_summaries: list[dict] = []
    with tqdm(total=total, desc="benchmark", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        peaks = None
        if cuda:
            bar.set_postfix_str("measuring peaks")
            kinds = {compute_precision(d, device) for d in args.dtype}
            if "eager_fp32_nchw" in args.providers:
                kinds.add(compute_precision("fp32", device))
            try:
                peaks = measure_peaks(device, sorted(kinds))
            except Exception as exc:  # the run is still useful without peaks
                notes.append(f"peak measurement failed: {failure_reason(exc)}")
        bar.update(1)
        state_dict = loaded if loaded is not None else make_state_dict(cfg, device, args.seed)
        for batch, size, dtype_name in cases:
            label = f"b{batch} {size}x{size} {dtype_name}"
            bar.set_postfix_str(f"{label}: float64 reference")
            input_bytes = batch * cfg.in_ch * size * size * 4
            n_inputs = rotation_count(device, input_bytes, args.n_inputs)
            try:
                case = make_case(
                    cfg, state_dict, mode=args.mode, batch=batch, size=size, dtype_name=dtype_name,
                    device=device, n_inputs=n_inputs, seed=args.seed + 1,
                )  # fmt: skip
                case_error = None
            except Exception as exc:  # e.g. the float64 reference runs out of memory
                case, case_error = None, f"case setup (inputs, float64 reference) failed: {failure_reason(exc)}"
                _release(device)
            bar.update(1)
            flops = model_step_flops(cfg, args.mode, batch, size)

            def measured(row: dict) -> dict:
                # each row streamed the moment it is measured: a run cut short keeps it (--rows)
                report.add_throughput(row, flops, peaks)  # noqa: B023  (called within this case's loop)
                _stream_row(args.rows, "model", row)
                return row

            for threads in thread_counts:
                if threads is not None:
                    torch.set_num_threads(threads)
                tlabel = label if threads is None else f"{label} {threads}t"
                if case is None:
                    case_rows = [measured(failed_row(p, cfg, args.mode, batch, size, dtype_name, device, case_error))
                                 for p in providers]  # fmt: skip
                elif cuda:
                    case_rows = []
                    for provider in providers:
                        bar.set_postfix_str(f"{tlabel}: {provider.name}")
                        case_rows.append(measured(bench_provider(
                            provider, case, warmup=args.warmup, reps=args.reps, quick=args.quick, verbose=args.verbose
                        )))  # fmt: skip
                        bar.update(1)
                else:  # CPU: interleaved rounds (see the module docstring)
                    bar.set_postfix_str(f"{tlabel}: {len(providers)} providers, interleaved")
                    case_rows = [measured(row) for row in bench_interleaved(
                        providers, case, warmup=args.warmup, reps=args.reps, quick=args.quick, verbose=args.verbose
                    )]  # fmt: skip
                    bar.update(len(providers))
                summary = report.add_speedups(case_rows)[report.case_key(case_rows[0])]
                case_summaries.append(
                    {"mode": args.mode, "batch": batch, "size": size, "dtype": dtype_name, "threads": threads,
                     "gflop_per_step": flops / 1e9, "n_inputs": n_inputs, **summary}
                )  # fmt: skip
                rows.extend(case_rows)
            del case
            gc.collect()
            if layers_on:
                for spec, names in layer_specs(cfg, batch, size):
                    bar.set_postfix_str(f"{label}: layer {names[0]}")
                    layer_row = bench_layer(
                        spec, names, dtype_name, device, size=size, warmup=args.warmup, reps=args.reps,
                        rep_ms=50 if args.quick else 100,
                    )  # fmt: skip
                    report.add_layer_peak(layer_row, peaks)
                    _stream_row(args.rows, "layer", layer_row)
                    layer_rows.append(layer_row)
                    bar.update(1)
            if cuda:
                torch.cuda.empty_cache()

    result = {
        "schema": 2,
        "date": dt.date.today().isoformat(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None,
        "command": " ".join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": info,
        "versions": versions(),
        "config": {
            "mode": args.mode,
            "device": device.type,
            "batches": args.batch,
            "sizes": args.size,
            "dtypes": args.dtype,
            "in_ch": cfg.in_ch,
            "out_ch": cfg.out_ch,
            "base_channels": cfg.base_channels,
            "depth": cfg.depth,
            "preset": cfg.preset,
            "out_activation": cfg.out_activation,
            "dropout": cfg.dropout,
            "providers": [p.name for p in providers],
            "warmup": args.warmup,
            "reps": args.reps,
            "n_inputs": args.n_inputs,
            "quick": args.quick,
            "seed": args.seed,
            "threads": None if cuda else thread_counts,
            "layers": layers_on,
            "save": args.save,
            "backend": fastunet.get_backend(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
            "matmul_precision": torch.get_float32_matmul_precision(),
        },
        "peaks": peaks,
        "flop_convention": FLOP_CONVENTION,
        "cases": case_summaries,
        "rows": rows,
        "layers": layer_rows,
        "targets": [],
        "notes": notes,
    }
    result["targets"] = report.evaluate_targets(result)
    if not classic:  # the targets are about the classic model
        for target in result["targets"]:
            if target["result"] in ("PASS", "FAIL"):
                target["result"] = "not judged"
                target["detail"] = f"measured on --preset {cfg.preset}; the target is the classic model's"

    print_report(result)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if not cuda:
        result["device"]["load_average_end"] = _load_average()
    json_path = report.write_json(result, args.out)
    print(f"\nwrote {json_path}")
    try:
        print(f"wrote {report.plot(result, json_path.with_suffix('.png'))}")
    except ImportError as exc:  # no matplotlib (an offline GPU image): the JSON has every number
        print(f"no plot: {exc}")
    if not args.save and args.out == DEFAULT_OUT:
        print("(outside the repository; --save writes to benchmarks/results/ for committing)")
    print(f"({result['wall_s']:.1f} s)")
    wrong = [r for r in rows + layer_rows if r["status"] == "wrong"]
    if wrong:
        print(f"\n{len(wrong)} row(s) WRONG: their outputs differ from the float64 reference beyond tolerance.")
    return 1 if wrong else 0


def _stream_row(path: Path | None, table: str, row: dict) -> None:
    """Append ``row`` to ``path`` (``--rows``) as one JSON line ``{"table": "model"|"layer",
    **row}``, flushed: a run killed later keeps it. Appends only: the file is never rewritten."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(report._finite({"table": table, **row}), allow_nan=False) + "\n")


def print_report(result: dict) -> None:
    """The human-readable report: providers, one table per case, per-layer tables (CUDA), targets."""
    cuda = result["device"]["type"] == "cuda"
    peaks = result["peaks"]
    if peaks:
        mm = ", ".join(f"{k} {v:.3g}" for k, v in peaks["matmul_tflops"].items())
        print(f"\nmeasured peaks: matmul TFLOP/s {mm}; copy {peaks['copy_gbps']:.0f} GB/s")
    if result["rows"]:
        first = report.case_key(result["rows"][0])
        print("\nproviders:")
        for r in result["rows"]:
            if report.case_key(r) == first:
                layout = f"  [{r['layout']}]" if r["layout"] else ""
                print(f"  {r['provider']:<30} {r['label']}{layout}")
    cfg = result["config"]
    for case in result["cases"]:
        key = (case["mode"], case["batch"], case["size"], case["dtype"], case.get("threads"))
        rows = [r for r in result["rows"] if report.case_key(r) == key]
        threads = "" if key[4] is None else f", {key[4]} thread(s)"
        print(
            f"\n== {case['mode']}, batch {case['batch']}, {case['size']}x{case['size']}, {case['dtype']}{threads}: "
            f"UNet({cfg['in_ch']}, {cfg['out_ch']}, base_channels={cfg['base_channels']}"
            + (f", preset={cfg['preset']!r}" if cfg.get("preset", "classic") != "classic" else "")
            + "), "
            f"{case['gflop_per_step']:.2f} GFLOP/step, {case['n_inputs']} rotating inputs =="
        )
        print(report.provider_table(rows, cuda=cuda))
        layers = [
            r
            for r in result["layers"]
            if (r["batch"], r["size"], r["dtype"]) == (case["batch"], case["size"], case["dtype"])
        ]
        if layers:
            print(
                f"\n-- per layer (forward, eval-mode ops), batch {case['batch']}, "
                f"{case['size']}x{case['size']}, {case['dtype']} --"
            )
            print(report.layer_table(layers))
    if not cuda:
        print(f"\n{CPU_PEAK_NOTE}\n{CPU_LAYERS_NOTE}")
    print()
    for line in report.target_lines(result["targets"], cuda=cuda):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
