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
    "assert_live",
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


def randomize_batchnorm(model: torch.nn.Module, sample: torch.Tensor | None = None) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so eval-mode
    folding is actually exercised (fresh BN layers are the identity), and every affine
    InstanceNorm non-trivial affine parameters.

    With ``sample`` (an input batch, N x C x H x W) the network is also made live: PyTorch's
    default conv init shrinks the activations layer by layer, so fixed O(0.5) BN shifts turned
    every ReLU of a narrow model off and its output into the head's bias for any input. One eval
    forward of ``sample`` scales each conv's weight to unit output spread and sets each BN's
    running statistics to those of its input, perturbed (mean by up to 0.2 std, variance by a
    factor 0.7..1.4) so the statistics stay non-trivial. Without ``sample`` (a model whose input
    the caller does not describe) the running statistics are drawn at fixed scales."""
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
        if sample is not None:
            _calibrate(model, sample)
    return model


def _calibrate(model: torch.nn.Module, sample: torch.Tensor) -> None:
    """One eval forward of ``sample`` in which each conv's output and each BN's input set that
    layer's scale (hooks fire in execution order, so every layer sees its calibrated inputs)."""

    def conv_hook(conv, args, out):
        bias = 0 if conv.bias is None else conv.bias.view(1, -1, 1, 1)
        factor = 1 / (out - bias).std().clamp_min(1e-12)
        conv.weight.mul_(factor)
        return (out - bias) * factor + bias

    def bn_hook(bn, args):
        x = args[0].transpose(0, 1).flatten(1)
        mean, var = x.mean(1), x.var(1)
        bn.running_mean.copy_(mean + torch.empty_like(mean).uniform_(-0.2, 0.2) * var.sqrt())
        bn.running_var.copy_(var * torch.empty_like(var).uniform_(0.7, 1.4))

    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, convs)]
    hooks += [m.register_forward_pre_hook(bn_hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    training = model.training
    try:
        model.eval()(sample.to(next(model.parameters())))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)


def assert_live(model: torch.nn.Module, in_ch: int, size: int) -> None:
    """The eval-mode output depends on the input (two random ``in_ch`` x ``size`` x ``size``
    inputs in the model's dtype): a dead network gives the same output for any input, and a comparison of
    two of them checks nothing. Leaves the RNG and the model's mode as they were."""
    training = model.training
    with torch.no_grad(), torch.random.fork_rng():
        p = next(model.parameters())
        # one forward of both: in eval mode the samples of a batch do not mix
        a, b = model.eval()(torch.randn(2, in_ch, size, size, dtype=p.dtype, device=p.device))
    model.train(training)
    spread = ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()
    assert spread > LIVE_SPREAD, f"the test model's output hardly depends on its input (relative spread {spread:.2g})"


# model_pair's models of every option set the tests use spread by >= 0.32 at seeds 0..19; before
# the calibration the eval-mode ones spread by 0 to 1e-2 (/work/notes/livenet.md).
LIVE_SPREAD = 0.03


def model_pair(in_ch=3, out_ch=2, *, dtype=torch.float64, device="cpu", **options):
    """A reference model and a ``fastunet.UNet`` holding the same random weights and BN state,
    calibrated so that every layer's activations are O(1) and input-dependent (``randomize_batchnorm``
    with a sample); raises if the reference's output does not depend on its input."""
    from fastunet import UNet, UNetReference

    ref = UNetReference(in_ch, out_ch, **options)
    depth = ref.options["depth"]
    # 4 x 4 at the bottleneck: at 1 x 1 the few output elements make the spread a noisy measure
    size = 4 * 2**depth
    randomize_batchnorm(ref, torch.randn(2, in_ch, size, size))
    assert_live(ref.double(), in_ch, size)
    ref.to(device=device, dtype=dtype)
    model = UNet(in_ch, out_ch, **options).to(device=device, dtype=dtype)
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model
