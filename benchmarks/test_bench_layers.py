"""pytest-benchmark suite: each distinct U-Net layer, fastunet's op against the PyTorch ops it
replaces (see ``layers.py`` for the pairs), grouped per layer so the two sit side by side.

    pytest benchmarks/ --benchmark-only                 # CPU: a tiny model; CUDA: the classic one
    FASTUNET_BENCH_BATCH=8 FASTUNET_BENCH_SIZE=512 FASTUNET_BENCH_DTYPE=fp16 \\
        pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Configuration (environment): ``FASTUNET_BENCH_BATCH``, ``_SIZE``, ``_BASE`` (base channels),
``_DTYPE`` (fp32 | bf16 | fp16). Defaults: CUDA batch 16, 256x256, base 64, bf16; CPU batch 1,
32x32, base 8, fp32, 10 fixed rounds (there the fastunet ops are the eager CPU fallback, so this
only checks that the suite runs). Each op's output is checked against float64 before it is timed. On CUDA every
timed call ends with ``torch.cuda.synchronize()``, since pytest-benchmark times with the host
clock. The project's plain ``pytest`` (testpaths = tests/) never collects this directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import layer_specs, make_layer_case  # noqa: E402
from providers import DTYPES, OUTPUT_TOL, ModelConfig, compute_precision, output_error  # noqa: E402

from fastunet.backend import interpreting  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("FASTUNET_BENCH_BATCH", 16 if CUDA else 1))
SIZE = int(os.environ.get("FASTUNET_BENCH_SIZE", 256 if CUDA else 32))
BASE = int(os.environ.get("FASTUNET_BENCH_BASE", 64 if CUDA else 8))
DTYPE = os.environ.get("FASTUNET_BENCH_DTYPE", "bf16" if CUDA else "fp32")

SPECS = layer_specs(ModelConfig(base_channels=BASE), BATCH, SIZE)


@pytest.mark.parametrize("impl", ["fastunet", "torch"])
@pytest.mark.parametrize("spec, names", SPECS, ids=["=".join(names) for _, names in SPECS])
def test_layer(benchmark, spec, names, impl):
    if not CUDA and interpreting():
        pytest.skip("TRITON_INTERPRET=1 would benchmark the Triton interpreter; unset it")
    case = make_layer_case(spec, DTYPES[DTYPE], DEVICE)
    fn = case.fastunet if impl == "fastunet" else case.torch
    out = fn() if impl == "fastunet" else case.torch_part(fn())
    tol = OUTPUT_TOL[compute_precision(DTYPE, DEVICE)]
    err = output_error(out, case.reference())[1]
    assert err <= tol, f"{impl} {spec.name}: max rel error {err:.3g} above {tol:g}"

    benchmark.group = f"{'='.join(names)} {spec.describe()} {DTYPE}"
    benchmark.extra_info.update(gflop=spec.flops / 1e9, shape=spec.describe(), max_rel_err=err)
    if CUDA:

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        # Fixed, small round counts: on CPU the ops are the eager fallback and this is a check
        # that the suite runs, not a measurement worth pytest-benchmark's calibration time.
        benchmark.pedantic(fn, rounds=10, warmup_rounds=1, iterations=1)
