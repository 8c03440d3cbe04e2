"""Timers and the device's measured peak.

* Whole-model steps (``time_steps``): on CUDA, a pair of CUDA events around every call, after
  warm-up, rotating over several pre-generated input batches; on CPU, ``time.perf_counter``
  around every call. The median and the 20th/80th percentiles are reported, never the mean
  (one page fault or one late launch would move the mean, not the median).
* Single ops (``time_op``, the per-layer table): ``triton.testing.do_bench`` on CUDA, which
  flushes the L2 cache before every call so a small layer is not timed out of a warm cache;
  ``perf_counter`` medians on CPU.
* Peaks (``measure_peaks``; ``run.py`` calls it on CUDA only, since a CPU's 1024^3 matmul is
  no peak a U-Net's convolutions could be judged against): what this device actually reaches,
  measured in the same run: a large matmul per precision (bf16, fp16, TF32, IEEE fp32) through
  ``do_bench``, and a large device-to-device copy for memory bandwidth. Achieved TFLOP/s are
  reported as a fraction of these, not of a datasheet number.
"""

from __future__ import annotations

import time

try:
    import resource
except ImportError:  # Windows
    resource = None
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

QUANTILES = (0.2, 0.5, 0.8)


def minor_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing).

    On CPU a step that allocates its activations afresh pays one fault per 4 KiB page the
    allocator had returned to the OS (glibc's mmap/trim thresholds): measured on the classic
    model, ~10^4 faults per fastunet or eager step against none for ONNX Runtime's arena."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Timing:
    """Milliseconds per call: median and the 20th/80th percentiles over ``n`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int | None  # None when the timer (do_bench) chose the count itself
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(times_ms: Sequence[float], method: str) -> Timing:
    if not times_ms:
        raise ValueError("no timings to summarize")
    p20, p50, p80 = np.percentile(np.asarray(times_ms, dtype=np.float64), [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80), len(times_ms), method)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[torch.Tensor], object],
    inputs: Sequence[torch.Tensor],
    *,
    device: torch.device,
    warmup: int,
    reps: int,
) -> Timing:
    """Time ``step(x)`` for ``x`` cycling through ``inputs``; ``reps`` timed calls after ``warmup``.

    CUDA: one start/end event pair per call, read after a single synchronize at the end, so the
    host never stalls the queue between calls and each sample is the GPU-timeline time of one
    call (host launch overhead shows up when the GPU has to wait for it, as it would in use).
    """
    n_in = len(inputs)
    for i in range(warmup):
        step(inputs[i % n_in])
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            x = inputs[i % n_in]
            starts[i].record()
            step(x)
            ends[i].record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], "cuda-events")
    times = []
    for i in range(reps):
        x = inputs[i % n_in]
        t0 = time.perf_counter()
        step(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf_counter")


def time_op(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup: int = 3,
    reps: int = 10,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> Timing:
    """Time a no-argument ``fn``: ``do_bench`` (L2 flushed per call) on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(float(p50), float(p20), float(p80), None, "triton.do_bench")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf_counter")


# --------------------------------------------------------------------------- peaks
# Matmul size for the peak: large enough that launch overhead and tails are noise (8192^3 is
# 1.1 TFLOP, ~1.5 ms in bf16 on an H100), small enough to take seconds in IEEE fp32. On CPU a
# 1024^3 matmul (2.1 GFLOP) is the same idea scaled to a few cores.
_PEAK_MATMUL_N = {"cuda": 8192, "cpu": 1024}
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}

_MATMUL_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}


def _matmul_tflops(kind: str, device: torch.device, n: int) -> float:
    dtype = _MATMUL_DTYPE[kind]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.get_float32_matmul_precision()
    # "high" lets fp32 matmuls use TF32 tensor cores; "highest" forces IEEE fp32. Restored after.
    torch.set_float32_matmul_precision("high" if kind == "tf32" else "highest")
    try:
        timing = time_op(lambda: torch.mm(a, b, out=c), device=device, warmup=2, reps=5, rep_ms=200)
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e12


def _copy_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_op(lambda: dst.copy_(src), device=device, warmup=2, reps=5, rep_ms=200)
    return 2.0 * nbytes / (timing.median_ms * 1e-3) / 1e9  # read + write


def measure_peaks(device: torch.device, kinds: Sequence[str]) -> dict:
    """Measured peaks: ``{"matmul_tflops": {kind: TFLOP/s}, "copy_gbps": GB/s, ...}``.

    ``kinds`` are the precisions the run's rows compute in (``"bf16"``, ``"fp16"``, ``"tf32"``,
    ``"fp32"``); only those are measured.
    """
    n = _PEAK_MATMUL_N.get(device.type, 1024)
    nbytes = _COPY_BYTES.get(device.type, 64 << 20)
    matmul = {kind: _matmul_tflops(kind, device, n) for kind in sorted(set(kinds))}
    copy_gbps = _copy_gbps(device, nbytes)
    method = "triton.do_bench" if device.type == "cuda" else "perf_counter"
    return {
        "matmul_tflops": matmul,
        "copy_gbps": copy_gbps,
        "matmul_n": n,
        "copy_bytes": nbytes,
        "method": f"{method}: torch.mm of two {n}x{n} matrices; dst.copy_(src) of {nbytes >> 20} MiB",
    }
