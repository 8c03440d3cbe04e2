"""Which path a forward pass runs: the fused ``torch.ops.fastunet`` ops or the eager reference math.

``"auto"`` (default): fused ops for CUDA tensors, eager math for everything else (the CPU
fallback). ``"triton"``: the fused ops always; on CPU tensors that is only possible under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite runs the kernels
without a GPU. ``"eager"``: the reference math everywhere.

The initial value comes from the ``FASTUNET_BACKEND`` environment variable.

``set_cpu_fast_math(True)`` (initially the ``FASTUNET_CPU_FAST_MATH`` environment variable, off
by default) lets the CPU fallback trade exactness for speed, as TF32 does on a GPU: see
``fastunet.cpu_ops`` (NNPACK's Winograd for the float32 3x3 convolutions where it pays).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "eager")
_ENV = "FASTUNET_BACKEND"


def _parse(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.strip().lower()


_backend = _parse(os.environ.get(_ENV, "auto") or "auto", f"environment variable {_ENV}")
# Triton decides between compiling and interpreting when ``@triton.jit`` runs, i.e. when the
# kernels are imported: the environment at import time is what holds for the whole process.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_FAST_MATH_ENV = "FASTUNET_CPU_FAST_MATH"
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_flag(value: str, source: str) -> bool:
    flag = _FLAGS.get(value.strip().lower() or "0")
    if flag is None:
        raise ValueError(f"{source} must be one of {tuple(_FLAGS)}, got {value!r}")
    return flag


_cpu_fast_math = _parse_flag(os.environ.get(_FAST_MATH_ENV, ""), f"environment variable {_FAST_MATH_ENV}")


def set_cpu_fast_math(enabled: bool) -> None:
    """Let the CPU fallback's float32 inference trade exactness for speed (off by default).

    On: the 3x3 convolutions where it pays run NNPACK's Winograd F(6x6, 3x3) (about 1.5-2x
    fewer seconds for the classic model on one core; output error ~1e-5 of the output range
    instead of ~1e-7, the ``cpu-fast-math`` row of ``fastunet.tolerances``). Changes nothing
    where torch has no NNPACK, for other dtypes, or on the GPU path.
    """
    global _cpu_fast_math
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_fast_math takes True or False, got {enabled!r}")
    _cpu_fast_math = enabled


def get_cpu_fast_math() -> bool:
    """Whether the CPU fallback may use its fast, less exact convolutions (``set_cpu_fast_math``)."""
    return _cpu_fast_math


def set_backend(name: str) -> None:
    """Select the backend for every ``fastunet.UNet``: ``"auto"``, ``"triton"`` or ``"eager"``."""
    global _backend
    _backend = _parse(name, "backend")


def get_backend() -> str:
    """The backend currently selected (``"auto"``, ``"triton"`` or ``"eager"``)."""
    return _backend


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(x: torch.Tensor) -> bool:
    """Decide the path for an input tensor ``x`` under the current backend.

    Raises ``RuntimeError`` when ``"triton"`` is forced on a tensor the kernels cannot run on.
    """
    if _backend == "eager":
        return False
    if _backend == "auto":
        return x.device.type == "cuda" and triton_available()
    # forced "triton"
    if x.device.type == "cuda":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package: pip install triton")
        return True
    if x.device.type == "cpu" and _INTERPRETING and triton_available():
        return True
    raise RuntimeError(
        f"backend 'triton' cannot run on a {x.device.type} tensor: the Triton kernels need an "
        "NVIDIA GPU (or, for testing on CPU tensors, TRITON_INTERPRET=1 set before triton is "
        "imported). Use fastunet.set_backend('auto') for the eager CPU fallback."
    )
