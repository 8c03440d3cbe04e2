"""Pay the kernels' tuning once per machine, up front.

The first launch of each kernel shape on a GPU times the candidate tile configs and keeps the
fastest (``fastunet.kernels._tuning`` has the whole story: keys, pruning, the rule used without
timing). Picks are written to an on-disk cache keyed by the GPU model and the triton, torch and
fastunet versions, so a second process with the same shapes does no timing at all.

``tune(model, example)`` runs the model once per mode on a copy, so every kernel the real run
will launch is tuned and cached before it matters (a benchmark, a CUDA-graph capture, a
latency-sensitive service); ``python -m fastunet tune --batch 16 --size 256 --dtype bf16`` does
the same from a shell.

Every timed candidate is checked once against its op's eager composite on the same inputs
(the test suite's tolerance table): one that disagrees is dropped with a warning naming the
kernel, the config and the error, and the cache records the pick as verified; a shape with no
agreeing candidate runs the composite. So the first tune on a new GPU is also a correctness test
of every config it keeps.

Environment: ``FASTUNET_AUTOTUNE=0`` picks configs by rule (no timing, cache ignored);
``FASTUNET_VERIFY=0`` keeps the fastest candidate unchecked; ``FASTUNET_CACHE_DIR`` moves the
cache (default ``~/.cache/fastunet``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["TuneReport", "cache_dir", "cache_file", "tune", "tuning_stats"]

_MODES = ("eval", "train")


def _impl():
    from .kernels import _tuning  # deferred: the CPU fallback never imports triton

    return _tuning


def cache_dir() -> Path:
    """Where tuning results live: ``FASTUNET_CACHE_DIR``, else ``~/.cache/fastunet``."""
    return _impl().cache_dir()


def cache_file(device: torch.device | str | None = None) -> Path:
    """The cache file the current versions use for ``device``'s GPU model (default: current)."""
    from .kernels import _common

    dev = torch.device("cuda") if device is None else torch.device(device)
    return _impl().cache_file(_common.device_name(dev))


def tuning_stats() -> dict[str, float]:
    """This process's tuning counters: ``timing_runs`` (candidates timed), ``tuned_keys``,
    ``disk_hits``, ``rule_picks``, ``single_candidate``, ``forced_picks``; verification:
    ``verified_keys``, ``verify_runs`` (one replay per candidate), ``rejected_configs``,
    ``eager_keys``, ``unverified_keys``, and ``tuning_ms`` / ``verify_ms`` (time spent timing
    candidates / verifying them: their ratio is the verification's overhead)."""
    return _impl().stats()


@dataclass(frozen=True)
class TuneReport:
    """What ``tune`` did: counters over the whole call and where the results went."""

    timing_runs: int
    tuned_keys: int
    disk_hits: int
    rule_picks: int
    seconds: float
    modes: tuple[str, ...]
    cache_file: Path
    precompile: dict | None = None  # what the parallel compile did (see kernels._precompile)
    verified_keys: int = 0  # tuned shapes whose candidates were checked against the composite
    rejected_configs: int = 0  # candidates that disagreed (each warned about)
    eager_keys: int = 0  # shapes with no agreeing candidate: their op runs the composite
    verify_seconds: float = 0.0  # of ``seconds``, spent checking candidates
    timing_seconds: float = 0.0  # of ``seconds``, spent timing candidates

    def __str__(self) -> str:
        text = (
            f"tuned {self.tuned_keys} kernel shape(s) with {self.timing_runs} timing run(s), "
            f"{self.disk_hits} already cached, {self.rule_picks} by rule, in {self.seconds:.1f} s "
            f"({'+'.join(self.modes)}); cache: {self.cache_file}"
        )
        if self.verified_keys:
            text += (
                f"\nverified {self.verified_keys} shape(s) against the ops' composites in {self.verify_seconds:.1f} s "
                f"(timing: {self.timing_seconds:.1f} s): {self.rejected_configs} config(s) rejected, "
                f"{self.eager_keys} shape(s) left to the composite"
            )
        if self.precompile:
            p = self.precompile
            text += (
                f"\nparallel compile: {p['compiled']} of {p['jobs']} kernel variants on {p['workers']} "
                f"worker(s) in {p['seconds']:.1f} s" + (f", {p['failed']} failed" if p["failed"] else "")
            )
        return text


def _check_modes(modes) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    bad = [m for m in modes if m not in _MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {_MODES}, got {modes!r}")
    return modes


def _run_modes(model: nn.Module, x: torch.Tensor, modes: tuple[str, ...], dtype: torch.dtype | None) -> None:
    """One forward per mode (a training step's forward and backward for "train"). Raises
    ``RuntimeError`` (the guard's module and reason) for a mode whose forward would run the
    eager path: nothing of it would be tuned."""
    from .guard import check_fused_support

    for mode in modes:
        model.train(mode == "train")
        support = check_fused_support(model)
        if not support.supported:
            where = f"module {support.module!r} " if support.module else ""
            raise RuntimeError(
                f"nothing to tune: in {mode} mode the model runs the eager path ({where}{support.reason})"
            )
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            if mode == "eval":
                with torch.no_grad():
                    model(x)
            else:
                model.zero_grad(set_to_none=True)
                model(x.detach().requires_grad_()).float().sum().backward()


def tune(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    modes: str | tuple[str, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> TuneReport:
    """Tune every kernel ``model`` launches for inputs shaped like ``example_input``.

    model:          a ``fastunet.UNet`` (left untouched: the runs use a deep copy, so running
                    statistics, gradients and the cached weights stay as they were).
    example_input:  ``[N, C, H, W]`` on the GPU the model will run on; only its shape, dtype
                    and device matter (batch sizes with the same power-of-two pixel bucket
                    share the results).
    modes:          ``"eval"``, ``"train"`` or both; default: the model's current mode.
    dtype:          run under ``torch.autocast`` with this dtype (``torch.bfloat16``,
                    ``torch.float16``); default: no autocast, the input's own dtype.

    Returns a ``TuneReport``. Raises ``RuntimeError`` when the model would not take the fused
    path for this input (no GPU, the eager backend, a module the fused path does not
    implement), since there would be nothing to tune.
    """
    from .backend import use_fused
    from .model import UNet

    if not isinstance(model, UNet):
        raise TypeError(f"tune expects a fastunet.UNet, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError("example_input must be a 4-D tensor [N, C, H, W]")
    if not use_fused(example_input):
        raise RuntimeError(
            f"nothing to tune: a {example_input.device.type} input runs the eager path (the fused Triton "
            "kernels need an NVIDIA GPU; move the model and the input to 'cuda')"
        )
    modes = _check_modes(modes if modes is not None else ("train" if model.training else "eval"))
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or None, got {dtype}")
    impl = _impl()
    from .kernels import _common, _precompile

    before = impl.stats()
    t0 = time.perf_counter()
    x = example_input.detach()
    # Pass 1 records every candidate launch that timing will need (nothing runs), so they can be
    # compiled in parallel worker processes; pass 2 then times them, loading compiled binaries.
    precompiled = None
    if x.device.type == "cuda" and impl.autotune_enabled():
        with _common.recording_launches() as launches:
            _run_modes(copy.deepcopy(model), x, modes, dtype)
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        precompiled = _precompile.precompile(launches, device_index=index)
    _run_modes(copy.deepcopy(model), x, modes, dtype)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    after = impl.stats()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    return TuneReport(
        timing_runs=delta("timing_runs"),
        tuned_keys=delta("tuned_keys"),
        disk_hits=delta("disk_hits"),
        rule_picks=delta("rule_picks"),
        seconds=time.perf_counter() - t0,
        modes=modes,
        cache_file=cache_file(x.device),
        precompile=precompiled,
        verified_keys=delta("verified_keys"),
        rejected_configs=delta("rejected_configs"),
        eager_keys=delta("eager_keys"),
        verify_seconds=delta("verify_ms") / 1e3,
        timing_seconds=delta("tuning_ms") / 1e3,
    )
