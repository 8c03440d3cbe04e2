#!/usr/bin/env python
"""Host (Python) time per forward and per training step of the fused path, with the kernel
launches stubbed out, on a machine without a GPU.

At small batches a U-Net's GPU work is a few milliseconds, so the host work of launching it
(Python, argument checks, tensor allocations, op dispatch, tuning lookups) decides the speed.
This script measures exactly that work: the fused path runs against a simulated H100
(``fastunet.kernels._common.simulate_gpu``: the launchers pick configs and build every argument
as on that GPU, but ``launch`` records instead of running, so no kernel time is included) on
CPU tensors.

What is timed (``time.perf_counter``, median of ``--reps`` after warm-up and tuning):

* inference: ``model(x)`` under ``torch.no_grad()`` and bf16 autocast, the model in eval mode;
* training step: ``zero_grad`` + forward + ``y.float().sum()`` + ``backward()`` (no optimizer:
  its cost is torch's, the same for any model), the model in train mode;
* each again with the 3x3 convs on the TMA-fed variant (``kernels/conv3x3_tma.py``): the
  simulated timings make every TMA candidate faster than every pointer config, so each conv
  that can take one does (its host work: descriptors, tile geometry, the persistent grid).

The model has the classic U-Net's structure (depth 4: 18 3x3 convs, 4 pools, 4 upconvs, the
head; the same ops and launches as ``UNet(3, 1)``) at ``--base-channels 16`` (every layer then
takes the same kernel variants as the classic widths, and the torch ops on weights and
statistics that run on the CPU here, as separate small GPU kernels there, cost microseconds as
they would to launch) on one 32x32 image. Counted per step: kernel launches, torch (aten) ops
(each a small kernel or an allocation on a GPU; by name in the JSON), Python and C function
calls (cProfile's primitive calls: deterministic, unlike the times on a loaded machine),
``os.environ`` reads, ``torch.cuda.get_device_properties`` calls and walks over the module tree.

Targets (issue 24): inference <= 0.35 ms, training step <= 1.5 ms (the TMA rows have the same
targets).

    python benchmarks/host_overhead.py [--reps 200] [--json out.json]
"""

# ruff: noqa: E402  (TRITON_INTERPRET must be set before triton is imported)
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the launchers; nothing is interpreted

import argparse
import cProfile
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from fastunet.kernels import _common, _tuning, conv3x3_tma
from fastunet.kernels import pack_conv3x3_weight as _pack_weight
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet import _snapshot

TARGET_MS = {"inference": 0.35, "training": 1.5}


class _CountingEnviron(os._Environ):  # type: ignore[misc,name-defined]
    """``os.environ`` that counts reads (``[]``, ``get``, ``in``)."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        type(self).reads += 1
        return super().__contains__(key)


@contextmanager
def _counters() -> Counter:
    """Count environment reads, device-property queries and module-tree walks while active."""
    counts: Counter = Counter()
    env = os.environ
    counting = _CountingEnviron(env._data, env.encodekey, env.decodekey, env.encodevalue, env.decodevalue)
    _CountingEnviron.reads = 0
    props = torch.cuda.get_device_properties
    named_modules = nn.Module.named_modules

    def counted_props(*args, **kwargs):
        counts["get_device_properties"] += 1
        return props(*args, **kwargs)

    def counted_named_modules(self, memo=None, *args, **kwargs):
        if memo is None:  # a walk starts here; its recursion passes the memo set down
            counts["module_walks"] += 1
        return named_modules(self, memo, *args, **kwargs)

    # Code reads os.environ through the module attribute, so swapping it counts every read.
    os.environ = counting  # noqa: B003
    torch.cuda.get_device_properties = counted_props
    nn.Module.named_modules = counted_named_modules
    try:
        yield counts
    finally:
        os.environ = env  # noqa: B003
        torch.cuda.get_device_properties = props
        nn.Module.named_modules = named_modules
        counts["environ_reads"] = _CountingEnviron.reads


class _OpCounter(TorchDispatchMode):
    """Counts the torch (aten) ops that reach a kernel, by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_torch_ops() -> Counter:
    """The torch ops run while active, by name. The fused path takes its per-op dispatcher path
    when a dispatch mode watches (``fastunet.ops.direct_ok``), so while counting the mode is
    hidden from the one test that would see it (``torch._C._len_torch_dispatch_stack``): the
    step takes the path it takes unwatched, and every aten op it runs is counted (fastunet's
    own ops, called without the dispatcher there, are not: their launches are counted apart)."""
    stack_len = torch._C._len_torch_dispatch_stack
    counter = _OpCounter()
    with counter:
        torch._C._len_torch_dispatch_stack = lambda: 0
        try:
            yield counter.ops
        finally:
            torch._C._len_torch_dispatch_stack = stack_len


def call_counts(fn) -> tuple[int, int]:
    """``(Python calls, C calls)`` of one ``fn()``: cProfile's primitive calls (a recursive call
    counts once per outermost entry, a generator once per resumption), the profiler's own
    ``disable`` left out. The same code on the same inputs gives the same counts."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    prof.create_stats()
    python = c = 0
    for (file, _, name), (primitive, *_) in prof.stats.items():
        if file != "~":
            python += primitive
        elif "_lsprof.Profiler" not in name:
            c += primitive
    return python, c


class _KernelsOnly(list):
    """A launch record that keeps each launch's kernel, not its arguments: holding the argument
    tensors (what ``SimulatedGPU`` records) would change the step it counts, since autograd copies
    a gradient that something else still holds instead of taking it (two torch ops each)."""

    def append(self, launch) -> None:
        super().append(launch[:1])


def _prefer_tma(cfg) -> float:
    """Simulated timing that makes every TMA candidate the fastest."""
    return 0.5 if conv3x3_tma.is_tma_config(cfg) else 1.0


def measure(
    mode: str, *, reps: int = 200, base_channels: int = 16, size: int = 32, batch: int = 1, tma: bool = False
) -> dict:
    """Host ms per step of ``mode`` ("inference" | "training") and the counts per step; with
    ``tma`` every conv that has a TMA candidate takes it (``tma_launches`` counts them)."""
    if mode not in TARGET_MS:
        raise ValueError(f"mode must be one of {sorted(TARGET_MS)}, got {mode!r}")
    torch.manual_seed(0)
    model = fastunet.UNet(3, 1, base_channels=base_channels).train(mode == "training")
    x = torch.randn(batch, 3, size, size)
    training = mode == "training"

    def step():
        if training:
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)

    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    cache_env = os.environ.get("FASTUNET_CACHE_DIR")
    # Each run tunes afresh into a throw-away cache: simulated timings must not reach the real
    # one, and the TMA rows must not reuse the pointer rows' picks.
    os.environ["FASTUNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastunet-host-overhead-")
    _tuning.clear_memory()
    sampled = _snapshot.SAMPLED_DEVICES
    # The prepared weights' value samples are taken for CPU tensors only: the simulated GPU's
    # tensors are CPU tensors, a real GPU's would not be sampled.
    _snapshot.SAMPLED_DEVICES = ()
    try:
        gpu = _common.SimulatedGPU()
        if tma:
            gpu.time = _prefer_tma
        with _common.simulate_gpu(gpu), torch.autocast("cpu", dtype=torch.bfloat16):
            step()  # tuning (simulated timings) and weight preparation happen here
            step()
            gpu.launches = _KernelsOnly()
            with _counters() as counts:
                step()
            launches = len(gpu.launches)
            gpu.launches.clear()
            with _count_torch_ops() as torch_ops:
                step()
            if len(gpu.launches) != launches:  # the counting step must be the step that is timed
                raise RuntimeError(f"{len(gpu.launches)} launches while counting torch ops, {launches} without")
            tma_launches = sum(fn is conv3x3_tma._conv3x3_tma_kernel for fn, *_ in gpu.launches)
            gpu.record = False
            python_calls, c_calls = call_counts(step)  # the timed step's work
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
    finally:
        _snapshot.SAMPLED_DEVICES = sampled
        fastunet.set_backend(before)
        _tuning.clear_memory()
        if cache_env is None:
            os.environ.pop("FASTUNET_CACHE_DIR", None)
        else:
            os.environ["FASTUNET_CACHE_DIR"] = cache_env
    ms = sorted(t * 1e3 for t in times)
    return {
        "mode": mode + (" (TMA)" if tma else ""),
        "ms_median": statistics.median(ms),
        "ms_p20": ms[len(ms) // 5],
        "ms_p80": ms[(4 * len(ms)) // 5],
        "target_ms": TARGET_MS[mode],
        "launches": launches,
        "tma_launches": tma_launches,
        "torch_ops": sum(torch_ops.values()),
        "torch_ops_by_name": dict(torch_ops.most_common()),
        "python_calls": python_calls,
        "c_calls": c_calls,
        "environ_reads": counts["environ_reads"],
        "get_device_properties": counts["get_device_properties"],
        "module_walks": counts["module_walks"],
        "reps": reps,
        "model": f"UNet(3, 1, base_channels={base_channels}), depth 4",
        "input": [batch, 3, size, size],
    }


def tma_launch_us(*, reps: int = 2000, concat: bool = False) -> float:
    """Median host microseconds of one ``conv3x3_tma_launch`` (launch stubbed), the same operands
    every call as in a model's steady state: 64 -> 64 channels at 32x32 in bf16, one source, or
    with ``concat`` the decoder's two sources (five descriptors)."""
    x = torch.randn(1, 64, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x2 = x.clone() if concat else None
    c_in = 128 if concat else 64
    weight = _pack_weight(torch.randn(64, c_in, 3, 3).to(torch.bfloat16))
    out = torch.empty_like(x)
    scale, shift = torch.ones(64), torch.zeros(64)
    cfg = conv3x3_tma.TMA_CONFIGS_SM90[1]
    with _common.simulate_gpu(_common.SimulatedGPU(record=False)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            conv3x3_tma.conv3x3_tma_launch(cfg, x, x2, weight, scale, shift, out, relu=True, dot_precision="ieee")
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/host_overhead.py",
        description="Host (Python) ms per inference forward and training step, kernel launches stubbed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--reps", type=int, default=200, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(mode, reps=args.reps, tma=tma) for tma in (False, True) for mode in ("inference", "training")]
    print(f"host time per step, kernel launches stubbed ({rows[0]['model']}, input {rows[0]['input']}, bf16):")
    print(
        f"{'mode':<16} {'median ms':>9} {'p20-p80 ms':>13} {'target':>7} {'launches':>8} {'TMA':>4} {'torch ops':>9} "
        f"{'py calls':>8} {'C calls':>7} {'env reads':>9} {'dev props':>9} {'walks':>5}"
    )
    for r in rows:
        print(
            f"{r['mode']:<16} {r['ms_median']:>9.3f} {r['ms_p20']:>6.3f}-{r['ms_p80']:<6.3f} "
            f"{'<=' + str(r['target_ms']):>7} {r['launches']:>8} {r['tma_launches']:>4} {r['torch_ops']:>9} "
            f"{r['python_calls']:>8} {r['c_calls']:>7} {r['environ_reads']:>9} "
            f"{r['get_device_properties']:>9} {r['module_walks']:>5}"
        )
    launch_us = {"one source": tma_launch_us(), "two sources": tma_launch_us(concat=True)}
    print("host us per conv3x3_tma_launch (launch stubbed): " + ", ".join(f"{k} {v:.1f}" for k, v in launch_us.items()))
    if args.json:
        result = {"torch": torch.__version__, "rows": rows, "tma_launch_us": launch_us}
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
