"""Helpers shared by every kernel module: interpreter detection, dtype names,
shared-memory limits per architecture, and the ``KernelSpec`` record that the
offline compile report (``benchmarks/kernel_report.py``) consumes.

Nothing here launches a kernel.
"""

from __future__ import annotations

import os
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


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 80 in the interpreter or on CPU."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


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

    def smem(self, elem: int) -> int:
        """Upper bound on the pipelined A/B buffers (what the shared-memory pruning compares)."""
        return self.num_stages * (self.BLOCK_M * self.BLOCK_K + self.BLOCK_K * self.BLOCK_N) * elem


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
