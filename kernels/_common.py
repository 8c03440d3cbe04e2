"""Helpers shared by every kernel module: interpreter detection, the device facts a launcher
needs (cached: they never change in a process), dtype names, shared-memory limits per
architecture, the one place every kernel is launched from (``launch``), a simulated GPU for
counting launches and tuning without one, and the ``KernelSpec`` record that the offline
compile report (``benchmarks/kernel_report.py``) consumes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

# Usable dynamic shared memory per block (bytes), from the CUDA occupancy tables.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}

# Architectures we keep explicit autotune lists for; anything else falls back to the sm_80 list.
TUNED_ARCHS = (80, 90)

TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


# Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel (at import), so the
# value at import is the one that holds for this process; read once, not per launch.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class SimulatedGPU:
    """A GPU that is not there, for counting without one (``simulate_gpu``).

    While active, launchers behave as on this GPU (its config lists, SM count and name; no
    interpreter shortcuts) but ``launch`` only records ``(kernel, grid, args, meta)`` in
    ``launches`` (when ``record``) instead of running anything, and the tuner's timing runs return ``time(cfg)``
    (default: every config 1 ms, so the first candidate wins) and are counted as usual. Tensors
    stay on the CPU; ``TRITON_INTERPRET=1`` must be set (so that the op layer routes CPU tensors
    to the kernels). What it measures: the host work of a launch sequence (Python, argument
    checks, allocations, tuning lookups) and which keys and candidates a model's shapes create.
    With ``execute`` the launches also run, in the interpreter: then a model computes real
    numbers with this GPU's tuned configs (what tuning verification is tested with).
    """

    arch: int = 90
    sms: int = 132
    name: str = "NVIDIA H100 80GB HBM3 (simulated)"
    record: bool = True
    execute: bool = False
    launches: list = field(default_factory=list)

    def time(self, cfg) -> float:
        return 1.0


_SIMULATED: SimulatedGPU | None = None


@contextlib.contextmanager
def simulate_gpu(gpu: SimulatedGPU | None = None) -> Iterator[SimulatedGPU]:
    """Run launchers against a ``SimulatedGPU`` (see there); yields it."""
    global _SIMULATED
    if not _INTERPRET:
        raise RuntimeError("simulate_gpu needs TRITON_INTERPRET=1 (set before triton is imported)")
    previous, _SIMULATED = _SIMULATED, gpu or SimulatedGPU()
    invalidate_plans()  # arch, SM count and config lists change with the GPU
    try:
        yield _SIMULATED
    finally:
        _SIMULATED = previous
        invalidate_plans()


def simulated_gpu() -> SimulatedGPU | None:
    return _SIMULATED


# Launches recorded instead of run (``recording_launches``): the first pass of ``fastunet.tune``,
# which collects every candidate config a model's shapes will time, to compile them all at
# once in parallel before any timing.
_RECORDING: list | None = None


@contextlib.contextmanager
def recording_launches() -> Iterator[list]:
    """While active, ``launch`` appends ``(fn, grid, args, meta)`` to the yielded list and runs
    nothing, and a tuner meeting a new key records a launch of every candidate (then answers by
    rule, without remembering it). Outputs are garbage; only the list is the point."""
    global _RECORDING
    previous, _RECORDING = _RECORDING, []
    invalidate_plans()
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous
        invalidate_plans()


def recording() -> list | None:
    return _RECORDING


# Launch plans (``_tuning.Plans``) are valid for one generation: a change of the simulated GPU,
# of recording, of forced configs or a cleared tuning memory starts a new one.
_PLAN_GENERATION = 0


def invalidate_plans() -> None:
    """Make every launcher's cached launch plan stale (see ``_tuning.Plans``)."""
    global _PLAN_GENERATION
    _PLAN_GENERATION += 1


def plan_generation() -> int:
    return _PLAN_GENERATION


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints, for launch grids and workspace sizes. (``triton.cdiv`` is a
    constexpr function since triton 3.9: called from Python it costs about ten times more.)"""
    return -(a // -b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``) and no GPU is
    being simulated: launchers then use one small fixed config per kernel."""
    return _INTERPRET and _SIMULATED is None


def can_launch(device: torch.device) -> bool:
    """Whether kernels can run on tensors of ``device``: CUDA, or CPU in the interpreter (or a
    simulation)."""
    kind = device.type  # read once: each read makes a new string (about a microsecond)
    return kind == "cuda" or (kind == "cpu" and _INTERPRET)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_facts(index: int) -> tuple[int, int, str]:
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count, props.name


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 80 in the interpreter or on CPU."""
    if _SIMULATED is not None:
        return _SIMULATED.arch
    if device.type != "cuda":
        return 80
    return _cuda_facts(_cuda_index(device))[0]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 on CPU)."""
    if _SIMULATED is not None:
        return _SIMULATED.sms
    if device.type != "cuda":
        return 1
    return _cuda_facts(_cuda_index(device))[1]


def device_name(device: torch.device) -> str:
    """The GPU's marketing name (what the tuning cache is keyed by)."""
    if _SIMULATED is not None:
        return _SIMULATED.name
    if device.type != "cuda":
        return "cpu"
    return _cuda_facts(_cuda_index(device))[2]


def launch(fn, grid: tuple, args: tuple, meta: dict) -> None:
    """``fn[grid](*args, **meta)``: every kernel of this package is launched here, on the current
    CUDA device and its current stream (the op layer makes the tensors' device current). Under
    ``simulate_gpu`` or ``recording_launches`` the launch is recorded instead (and run as well
    by a ``SimulatedGPU(execute=True)``)."""
    if _SIMULATED is not None:
        if _SIMULATED.record:
            _SIMULATED.launches.append((fn, grid, args, meta))
        if not _SIMULATED.execute:
            return
    elif _RECORDING is not None:
        _RECORDING.append((fn, grid, args, meta))
        return
    first = args[0]
    if first.is_cuda and first.get_device() != torch.cuda.current_device():
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)}: tensors on cuda:{first.get_device()} but cuda:"
            f"{torch.cuda.current_device()} is current; launch inside `with torch.cuda.device(...)` "
            "(the torch.ops.fastunet ops do this for you)"
        )
    fn[grid](*args, **meta)


def tuned_arch(arch: int) -> int:
    """The architecture whose config list a device uses (Hopper -> 90, everything else -> 80)."""
    return 90 if arch >= 90 else 80


def smem_limit(arch: int) -> int:
    return SMEM_LIMIT.get(arch, SMEM_LIMIT[80] if arch >= 80 else 49_152)


def triton_dtype(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_TRITON[dtype]
    except KeyError:
        raise TypeError(f"fastunet kernels support float32, float16 and bfloat16, got {dtype}") from None


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 iff cuDNN would use it, else IEEE.

    16-bit inputs ignore the setting (they always run on tensor cores).
    """
    if dtype == torch.float32 and not interpreting() and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


class GemmConfig(NamedTuple):
    """One tile config of a GEMM-shaped kernel: block sizes and launch options."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"M{self.BLOCK_M}_N{self.BLOCK_N}_K{self.BLOCK_K}_w{self.num_warps}_s{self.num_stages}"

    @property
    def kwargs(self) -> dict[str, int]:
        """The meta-parameters, as ``triton.Config.kwargs`` spells them (what a launch passes)."""
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K}

    def smem(self, elem: int) -> int:
        """``gemm_smem`` of this tile with ``elem``-byte operands and its fp32 accumulator staged
        by the epilogue (a kernel module adds what its own operands and epilogue need on top)."""
        return gemm_smem(self, elem, out_bytes=4)


def _tile(cfg) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages) of a ``GemmConfig``-like tuple or a ``triton.Config``
    whose meta-parameters are named BLOCK_M/N/K."""
    if hasattr(cfg, "BLOCK_M"):
        return cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_stages
    k = cfg.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_stages


def gemm_smem(cfg, a_bytes: int, b_bytes: int | None = None, *, out_bytes: int = 0, scratch: int = 0) -> int:
    """Shared memory (bytes) a pipelined GEMM tile config may compile to: the estimate every
    tuner's pruning compares with ``smem_limit``, and the offline report checks against each
    compiled spec's own ``metadata.shared`` (the estimate must never be the smaller).

    ``num_stages`` buffers of the A ``[BLOCK_M, BLOCK_K]`` (``a_bytes`` per element) and B
    ``[BLOCK_K, BLOCK_N]`` (``b_bytes``, default ``a_bytes``) tiles, or, when larger, the
    ``[BLOCK_M, BLOCK_N]`` result staged through shared memory by the epilogue (``out_bytes`` per
    element: a layout change of the fp32 accumulator, or a bulk-copy store), which is allocated
    once the loop's buffers are dead; plus ``scratch`` (reductions live next to either).
    ``cfg``: a ``GemmConfig``/``TmaConfig`` or a ``triton.Config`` with BLOCK_M/N/K.
    """
    bm, bn, bk, stages = _tile(cfg)
    b_bytes = a_bytes if b_bytes is None else b_bytes
    loop = stages * (bm * bk * a_bytes + bk * bn * b_bytes)
    return max(loop, bm * bn * out_bytes) + scratch + _SMEM_SLACK


# Barriers and alignment padding beside the buffers (triton 3.6 put 32 B past the pipeline of a
# 256x64x64 fp32 tile; 1 KiB covers such extras whatever their layout).
_SMEM_SLACK = 1024


@dataclass(frozen=True)
class KernelSpec:
    """One (kernel, config, dtype) point to compile offline for a GPU target.

    ``signature`` maps every kernel argument name to a Triton type string
    (``"*fp16"``, ``"i32"``, ``"i64"``, ``"fp32"``) or ``"constexpr"``; ``constexprs``
    gives every constexpr's value. ``num_warps``/``num_stages`` are the launch options.
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    dtype: str
    config: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_config(cls, fn, cfg, *, signature: dict, constexprs: dict, dtype: str, config: str, extra: dict):
        """The spec of ``@triton.jit`` kernel ``fn`` launched with tile config ``cfg`` (its
        ``num_warps``/``num_stages``), named after the kernel."""
        return cls(fn.__name__, fn, signature, constexprs, cfg.num_warps, cfg.num_stages, dtype, config, extra)


def check_bias(bias, c_out: int, x: torch.Tensor) -> None:
    """A launcher's optional per-channel bias: None, or a floating ``[c_out]`` tensor on x's device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must be [C_out={c_out}], got shape {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device}, x on {x.device}")


def check_out(out, shape: tuple, x: torch.Tensor) -> None:
    """A launcher's optional output buffer: None, or a tensor of ``shape`` in x's dtype and device
    (any strides: the kernels write through them)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must be [{', '.join(map(str, shape))}], got shape {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out dtype {out.dtype} must match x dtype {x.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
