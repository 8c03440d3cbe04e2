"""Which path a forward pass runs: the fused ``torch.ops.fastunet`` ops or the eager reference math.

``"auto"`` (default): fused ops for CUDA tensors, eager math for everything else (the CPU
fallback). ``"triton"``: the fused ops always; on CPU tensors that is only possible under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite runs the kernels
without a GPU. ``"eager"``: the reference math everywhere.

The initial value comes from the ``FASTUNET_BACKEND`` environment variable.
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
