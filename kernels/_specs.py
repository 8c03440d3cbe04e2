"""Offline compile specs from the tuners: the configs a ``Tuner`` can pick, never a copy of its
pruning.

A kernel module's ``compile_specs(arch)`` lists each (config, form) the offline report
(``benchmarks/kernel_report.py``) compiles. The configs of one form are asked of the tuner that
launches it: ``tuned_configs`` runs ``tuner.candidates(arch, shape)`` (its list and its own
``prune``) over every shape bucket the tuner can be shown for that form, and keeps the union in
the tuner's list order. So a change to a config list or to a pruning rule changes the specs with
it; ``tests/test_compile_specs.py`` checks the result against what the U-Net's layers launch.

The shape axes: a tuner sees pixel counts through ``_tuning.bucket`` (powers of two), and
channel counts as they are; pruning compares them with tile sizes (powers of two) through
``next_pow2`` and ``max(64, ...)``-style caps, so powers of two, their neighbours and the
few-channel inputs (RGB, the padded entry) reach every threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from ._tuning import config_name

__all__ = ["CHANNELS", "FEW_PIXEL_BUCKETS", "PIXEL_BUCKETS", "SMALL_CHANNELS", "shape_grid", "tuned_configs"]

#: Every pixel-count bucket a launch can have (``bucket(n)`` for n up to 2^31).
PIXEL_BUCKETS = tuple(1 << k for k in range(32))
#: A few of them, for tuners whose pruning never reads the pixel count (only their grid size does).
FEW_PIXEL_BUCKETS = (1, 1 << 12, 1 << 24)
#: Channel counts below 16 (the small-C mode's inputs: grey, RGB, RGBA, the padded entry, ...).
SMALL_CHANNELS = (1, 2, 3, 4, 8, 15)
#: Channel counts of 16 and more: powers of two and their neighbours up to the widest U-Net layer.
CHANNELS = (16, 17, 31, 32, 33, 48, 64, 65, 96, 128, 129, 192, 256, 257, 512, 1024, 2048, 4096)


def shape_grid(base: dict, **axes: Iterable) -> Iterator[dict]:
    """Every ``{**base, axis: value, ...}`` over the product of ``axes``; a value may also be a
    callable of the dict built so far (for derived fields, e.g. ``C2=lambda s: s["C1"]``)."""
    names = [n for n, v in axes.items() if not callable(v)]
    derived = {n: v for n, v in axes.items() if callable(v)}
    for values in itertools.product(*(tuple(axes[n]) for n in names)):
        shape = {**base, **dict(zip(names, values, strict=True))}
        for name, fn in derived.items():
            shape[name] = fn(shape)
        yield shape


def tuned_configs(tuner, arch: int, shapes: Iterable[dict], keep: Callable[[object], bool] | None = None) -> list:
    """The configs ``tuner`` can pick on ``arch`` for any of ``shapes`` (its pruning applied to
    each), once each, in the tuner's list order; ``keep`` filters them (e.g. one kernel's configs
    of a list that mixes two)."""
    picked: dict[str, object] = {}
    for shape in shapes:
        for cfg in tuner.candidates(arch, shape):
            picked.setdefault(config_name(cfg), cfg)
    order = {config_name(c): i for i, c in enumerate(tuner.config_list(arch))}
    configs = sorted(picked.values(), key=lambda c: order[config_name(c)])
    return [c for c in configs if keep is None or keep(c)]
