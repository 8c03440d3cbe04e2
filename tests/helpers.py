"""Shared test utilities: a comparison against the package's tolerance table
(``fastunet.tolerances``) that prints the worst mismatches.

Every comparison is against a float64 reference computed from the *same*
(rounded) inputs, so the tolerance only has to cover the arithmetic of the
kernel under test, not input rounding.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from fastunet.tolerances import DTYPE_NAMES, TOLERANCES, error_ratios, tolerance_name

HAS_CUDA = torch.cuda.is_available()

# Ring 2 (offline compiles) of every spec costs CPU-minutes per kernel module from a cold Triton
# cache: the default run compiles a spread sample of each kernel's specs (every dtype and form),
# FASTUNET_RING2_FULL=1 every spec (as `benchmarks/kernel_report.py --arch N` does).
RING2_FULL = os.environ.get("FASTUNET_RING2_FULL") == "1"


@contextlib.contextmanager
def ring2_lock():
    """Held around an offline compile whose specs another test compiles too (the report CLI's
    real-kernel run and the nearest up-conv's sample share 9 specs): under pytest-xdist the second
    waits, then finds them in Triton's cache and their measurements in kernel_report's (both in
    Triton's cache folder, which the workers share), instead of compiling them again at the same
    time. The compile children use every core (kernel_report's ``--jobs`` default), so the wait
    leaves no core idle."""
    from filelock import FileLock
    from triton import knobs

    root = Path(knobs.cache.dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "fastunet_ring2.lock")):
        yield


# The table and the dtype -> row rule live in the package (tuning verification uses them too);
# tests keep importing them from here.
__all__ = [
    "DTYPE_NAMES",
    "HAS_CUDA",
    "RING2_FULL",
    "TOLERANCES",
    "assert_close",
    "max_rel_error",
    "model_pair",
    "poisoned_like",
    "randomize_batchnorm",
    "ring2_lock",
    "tolerance_name",
]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: str, what: str = "", scale: float | None = None
) -> float:
    """Assert ``actual`` matches ``expected`` (float64) within ``TOLERANCES[tol]``.

    ``atol`` is multiplied by ``scale`` (default: the RMS of ``expected``); pass the magnitude of
    the surrounding computation when ``expected`` is mathematically zero (e.g. a conv bias's
    gradient in front of a training-mode BatchNorm is pure rounding noise).

    NaNs in ``actual`` where ``expected`` has none fail (that is how poisoned,
    unwritten outputs are caught). Returns the worst error relative to
    ``atol + rtol*|expected|`` so callers can report it.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[tol]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    ratio = error_ratios(a, e, tol, scale)
    worst = ratio.max().item() if ratio.numel() else 0.0
    if not worst <= 1.0:
        flat = ratio.flatten()
        k = min(5, flat.numel())
        idx = flat.topk(k).indices
        rows = []
        for i in idx.tolist():
            coord = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), a.shape))
            rows.append(f"  at {coord}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
        raise AssertionError(
            f"{what}: mismatch beyond {tol} tolerance (atol={atol}*rms, rtol={rtol}); "
            f"worst ratio {worst:.3g}, {int((ratio > 1).sum())} of {ratio.numel()} elements\n" + "\n".join(rows)
        )
    return worst


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float64: the figure reported in closing notes."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    denom = e.abs().max().item() or 1.0
    return (a - e).abs().max().item() / denom


def poisoned_like(t: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """An output buffer filled with NaN so any element a kernel fails to write shows up."""
    out = torch.empty_like(t, memory_format=memory_format)
    return out.fill_(float("nan"))


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so eval-mode
    folding is actually exercised (fresh BN layers are the identity), and every affine
    InstanceNorm non-trivial affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.InstanceNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    return model


def model_pair(in_ch=3, out_ch=2, *, dtype=torch.float64, device="cpu", **options):
    """A reference model and a ``fastunet.UNet`` holding the same random weights and BN state."""
    from fastunet import UNet, UNetReference

    ref = randomize_batchnorm(UNetReference(in_ch, out_ch, **options)).to(device=device, dtype=dtype)
    model = UNet(in_ch, out_ch, **options).to(device=device, dtype=dtype)
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model
