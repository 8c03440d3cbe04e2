"""How close a kernel's result must be to its reference, written down once.

The tests hold every kernel to a float64 reference computed from the same (rounded) inputs with
this table, and tuning holds every candidate config to the op's eager composite with it (see
``fastunet.ops._verify``), so a config the tuner keeps meets the bar the test suite sets.

``TOLERANCES[name] = (atol, rtol)``: an element passes when ``|actual - expected| <= atol * scale +
rtol * |expected|``, ``scale`` being the RMS of the finite expected values (so one row serves
activations of any magnitude) unless the caller knows a better magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DTYPE_NAMES", "TOLERANCES", "allowed_error", "error_ratios", "tolerance_name"]

# name -> (atol, rtol)
TOLERANCES = {
    "fp64": (1e-10, 1e-10),
    "fp32": (2e-5, 2e-5),  # IEEE fp32 dots (interpreter, or allow_tf32=False)
    "tf32": (5e-3, 5e-3),  # fp32 tensors on tensor cores (10-bit mantissa inputs)
    "fp16": (1e-2, 1e-2),
    "bf16": (6e-2, 6e-2),
    # Winograd in fp32 (the CPU fold under fastunet.set_cpu_fast_math: NNPACK's F(6x6, 3x3) and
    # fastunet.cpu_winograd's F(4x4) / F(2x2)): measured max |err| per 3x3 layer ~6e-5 (NNPACK),
    # ~5e-5 (F(4x4)), ~3e-6 (F(2x2)) x RMS (3 to 1024 input channels), ~1e-5 of the output range
    # over the classic model (IEEE fp32 convolutions: ~2e-6 x RMS per layer, ~1e-6 of the range)
    "winograd": (2e-4, 2e-4),
}

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tolerance_name(dtype: torch.dtype, device: torch.device | str | None = None) -> str:
    """The row of ``TOLERANCES`` a computation in ``dtype`` falls in: fp32 on a CUDA device
    (default: this machine has one) with ``torch.backends.cudnn.allow_tf32`` runs on TF32 tensor
    cores and gets the ``"tf32"`` row."""
    name = DTYPE_NAMES[dtype]
    if name == "fp32" and torch.backends.cudnn.allow_tf32:
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if on_cuda:
            return "tf32"
    return name


def allowed_error(expected: Tensor, tol: str, scale: float | None = None) -> Tensor:
    """Per element, ``atol * scale + rtol * |expected|`` with ``TOLERANCES[tol]``, in expected's
    dtype. ``scale``: default the RMS of the finite expected values."""
    atol, rtol = TOLERANCES[tol]
    if scale is None:
        finite = torch.isfinite(expected)
        scale = expected[finite].pow(2).mean().sqrt().item() if bool(finite.any()) else 1.0
    return expected.abs().mul_(rtol).add_(atol * max(scale, 1e-12))


def error_ratios(
    actual: Tensor, expected: Tensor, tol: str, scale: float | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per element, ``|actual - expected| / allowed_error(expected, tol, scale)``, computed in
    ``dtype`` on ``expected``'s device; an element passes at <= 1.

    actual, expected: the same shape, any floating dtypes. NaN where ``expected`` has none is
    ``inf`` (how unwritten, NaN-poisoned outputs fail); NaN in both, and equal values
    (infinities included), are 0.
    """
    a = actual.detach().to(device=expected.device, dtype=dtype)
    e = expected.detach().to(dtype)
    ratio = (a - e).abs_().div_(allowed_error(e, tol, scale))
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    ratio = ratio.masked_fill_(nan_a != nan_e, float("inf"))
    return ratio.masked_fill_((nan_a & nan_e) | (a == e), 0.0)
