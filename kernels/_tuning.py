"""Which tile config a kernel launch uses: measured once per machine and remembered on disk.

Every tuned kernel has one ``Tuner``: its candidate configs per architecture, a pruning rule
(drop what cannot fit or cannot pay off for a shape) and a key. A launcher asks
``tuner.pick(device, key, shape, run)`` for a config and launches with it; the pick never
changes behind the launcher's back (no shared ``best_config`` to read after the launch), so two
threads launching different shapes at once each get their own.

Where a pick comes from, first match wins:

1. a forced config (``forced({...})``: the tests and ``benchmarks/gpu_check.py`` force every
   config once);
2. this process's memory (a dict lookup: the only thing a warm launch pays);
3. with ``FASTUNET_AUTOTUNE=0``: the rule (below), never a measurement, cache ignored;
4. the on-disk cache (``<cache dir>/tuning/<GPU name>/<versions>.json``), written by any earlier
   process on this machine with the same GPU and the same triton/torch/fastunet versions;
5. a single candidate left after pruning (nothing to measure);
6. the rule, when measuring is not possible or not wanted: under
   ``torch.use_deterministic_algorithms(True)`` (a timing race must not decide a reduction
   order, so only recorded picks or the rule are used), or while a CUDA graph is being captured
   (nothing can be timed inside a capture);
7. otherwise every candidate is timed (``triton.testing.do_bench``, median) and the fastest is
   kept in memory and written to disk.

The key holds what changes the best config, not the exact shape: the pixel count bucketed to a
power of two (``bucket``), channel counts, dtypes and every constexpr flag of the launch. So
the last, smaller batch of an epoch, or batch 17 after batch 16, reuses the picks of batch 16.
Pruning sees the bucketed shape too, so every shape in a bucket has the same candidates.

The rule (``rule_pick``): the first candidate in list order (lists are written largest tile
first) whose grid fills every SM at least once; if none does, the candidate with the most
tiles. Deterministic for a given GPU model.

One list may hold the configs of more than one kernel: ``conv3x3``'s main list on sm_90 ends
with the TMA-fed variant's ``conv3x3_tma.TmaConfig`` entries (names ``..._TMA1_P0_...``), and its
launcher dispatches on the type of the pick. Such alternatives go at the end of a list, so the
rule, which picks without timing, keeps its old answer; an alternative is only ever chosen by
being timed faster on this GPU (or forced), which is why adding one cannot make a shape slower.

Settings, read when a pick is missing (never per launch): ``FASTUNET_AUTOTUNE`` ("0" = rule
only), ``FASTUNET_CACHE_DIR`` (default ``~/.cache/fastunet``).

Counters (``stats()``): timing runs (one per candidate timed), tuned keys, disk hits, rule
picks, forced picks; ``benchmarks`` and the tests read them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _common

__all__ = [
    "Tuner",
    "TUNERS",
    "bucket",
    "cache_dir",
    "cache_file",
    "clear_memory",
    "config_name",
    "forced",
    "reset_stats",
    "rule_pick",
    "stats",
]

# Tuning settings
_AUTOTUNE_ENV = "FASTUNET_AUTOTUNE"
_CACHE_ENV = "FASTUNET_CACHE_DIR"
# do_bench windows (ms). Each candidate is timed for about warmup + rep ms after compiling.
_WARMUP_MS, _REP_MS = 5, 25
_FORMAT = 1

TUNERS: dict[str, Tuner] = {}
_STATS: Counter = Counter()
_LOCK = threading.RLock()
_FORCED: dict[str, str] = {}
# (device key, tuner name, key) -> config, for this process.
_MEMORY: dict[tuple, Any] = {}
# device name -> {entry key: record} as read from / written to disk.
_DISK: dict[str, dict[str, dict]] = {}
_WARNED_CAPTURE: set[str] = set()


# --------------------------------------------------------------------------------------------
# Keys and names
# --------------------------------------------------------------------------------------------


def bucket(n: int) -> int:
    """``n`` rounded to the nearest power of two in log scale (1 for n <= 1): the pixel-count
    bucket of a tuning key. 16 and 17 images of 256x256 share the bucket 2^20."""
    if n <= 1:
        return 1
    return 1 << round(math.log2(n))


def config_name(cfg) -> str:
    """A stable name of a config (``triton.Config`` or ``GemmConfig``): its meta-parameters in
    the order written, warps and stages, e.g. ``M128_N64_K64_w4_s4``."""
    meta = "_".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cfg.kwargs.items())
    return f"{meta}_w{cfg.num_warps}_s{cfg.num_stages}"


_META: dict[int, tuple[Any, dict]] = {}


def launch_meta(cfg) -> dict:
    """The keyword arguments of a launch with ``cfg`` (made once per config: this is on every
    launch's path). Do not modify the returned dict."""
    hit = _META.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if _common.interpreting():  # interpreter configs are made per launch: nothing to keep
            return meta
        hit = _META[id(cfg)] = (cfg, meta)
    return hit[1]


def _key_text(tuner: str, key: tuple) -> str:
    return tuner + "|" + "|".join(str(v) for v in key)


# --------------------------------------------------------------------------------------------
# Settings and the disk cache
# --------------------------------------------------------------------------------------------


def autotune_enabled() -> bool:
    """False when ``FASTUNET_AUTOTUNE`` is "0"/"false"/"off"/"no": picks come from the rule."""
    return os.environ.get(_AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """``FASTUNET_CACHE_DIR``, else ``~/.cache/fastunet``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastunet"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def _versions() -> dict[str, str]:
    import triton

    try:
        from importlib.metadata import version

        fastunet_version = version("fastunet")
    except Exception:  # running from a checkout that is not installed
        fastunet_version = "dev"
    return {
        "triton": triton.__version__,
        "torch": torch.__version__.split("+")[0],
        "fastunet": fastunet_version,
    }


def cache_file(device_name: str) -> Path:
    """The tuning cache of one GPU model for the installed triton/torch/fastunet versions."""
    v = _versions()
    name = f"triton-{v['triton']}_torch-{v['torch']}_fastunet-{v['fastunet']}.json"
    return cache_dir() / "tuning" / _slug(device_name) / name


def _read_disk(device_name: str) -> dict[str, dict]:
    entries = _DISK.get(device_name)
    if entries is None:
        entries = {}
        path = cache_file(device_name)
        try:
            data = json.loads(path.read_text())
            if data.get("format") == _FORMAT and isinstance(data.get("entries"), dict):
                entries = data["entries"]
        except (OSError, ValueError):
            pass  # no file yet, or unreadable: tune again and rewrite it
        _DISK[device_name] = entries
    return entries


def _write_disk(device_name: str, text_key: str, record: dict) -> None:
    """Add one entry to the cache file: re-read it (another process may have added entries),
    merge, and replace it atomically. A lost race costs a re-tune later, never a wrong pick."""
    entries = _read_disk(device_name)
    entries[text_key] = record
    path = cache_file(device_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(path.read_text()).get("entries", {})
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(entries)
        entries.update(on_disk)
        payload = {"format": _FORMAT, "device": device_name, "versions": _versions(), "entries": on_disk}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # read-only home, full disk: keep the pick in memory only
        _STATS["disk_write_errors"] += 1
        if _STATS["disk_write_errors"] == 1:
            import warnings

            warnings.warn(f"fastunet: could not write the tuning cache {path}: {exc}", RuntimeWarning, stacklevel=3)


def clear_memory() -> None:
    """Forget every pick held in this process (the disk cache stays); the next launch of each key
    reads the disk again."""
    with _LOCK:
        _MEMORY.clear()
        _DISK.clear()


# --------------------------------------------------------------------------------------------
# Counters and forcing
# --------------------------------------------------------------------------------------------


def stats() -> dict[str, int]:
    """A copy of the counters: ``timing_runs``, ``tuned_keys``, ``disk_hits``, ``rule_picks``,
    ``single_candidate``, ``forced_picks``."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


@contextlib.contextmanager
def forced(picks: dict[str, str]) -> Iterator[None]:
    """Force configs by name while active: ``{tuner name: config_name(cfg)}``. A name that is not
    one of that tuner's configs on the device in use raises ``KeyError`` at launch."""
    with _LOCK:
        for name in picks:
            if name not in TUNERS:
                raise KeyError(f"no tuner named {name!r}; known: {sorted(TUNERS)}")
        previous = dict(_FORCED)
        _FORCED.update(picks)
    try:
        yield
    finally:
        with _LOCK:
            _FORCED.clear()
            _FORCED.update(previous)


# --------------------------------------------------------------------------------------------
# The rule and the timer
# --------------------------------------------------------------------------------------------


def rule_pick(candidates: Sequence, tiles: Callable[[Any], int], sms: int):
    """The first candidate whose grid has at least ``sms`` tiles, else the one with the most."""
    for cfg in candidates:
        if tiles(cfg) >= sms:
            return cfg
    return max(candidates, key=tiles)  # max keeps the first of equals


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _time(run: Callable[[Any], None], cfg) -> tuple[float, Exception | None]:
    """Median ms of ``run(cfg)``, or inf and the error when the config cannot run here (a
    compile or resource error only removes a candidate)."""
    sim = _common.simulated_gpu()
    _STATS["timing_runs"] += 1
    if sim is not None:
        return sim.time(cfg), None
    from triton.testing import do_bench

    try:
        run(cfg)  # compile outside the timed window
        return float(do_bench(lambda: run(cfg), warmup=_WARMUP_MS, rep=_REP_MS, quantiles=(0.5,))[0]), None
    except Exception as exc:  # noqa: BLE001  (any failure only disqualifies this config)
        _STATS["failed_candidates"] += 1
        return math.inf, exc


# --------------------------------------------------------------------------------------------
# The tuner
# --------------------------------------------------------------------------------------------


class Tuner:
    """Config selection for one kernel (or one variant of it).

    name:        stable identifier, e.g. ``"conv3x3.main"``; part of every cache entry.
    configs:     ``{tuned arch (80, 90): [triton.Config, ...]}``, largest tile first.
    prune:       ``prune(configs, shape, arch) -> list`` (never empty): drop configs that cannot
                 fit shared memory or registers on compute capability ``arch`` (the device's
                 own, e.g. 89, not the list's), or cannot pay off for ``shape`` (a dict of the
                 launch's bucketed sizes, dtypes and flags, built by the launcher).
    tiles:       ``tiles(cfg, shape) -> int``: the grid size, for the rule.
    interpreter: ``interpreter(shape) -> triton.Config``: the one small config run under
                 ``TRITON_INTERPRET=1`` (tuning there would only cost time).
    """

    def __init__(
        self,
        name: str,
        configs: dict[int, Sequence],
        prune: Callable[[Sequence, dict, int], list],
        tiles: Callable[[Any, dict], int],
        interpreter: Callable[[dict], Any],
    ):
        if name in TUNERS:
            raise ValueError(f"duplicate tuner name {name!r}")
        self.name = name
        self.configs = {arch: list(cfgs) for arch, cfgs in configs.items()}
        self.prune = prune
        self.tiles = tiles
        self.interpreter = interpreter
        self._by_name = {arch: {config_name(c): c for c in cfgs} for arch, cfgs in self.configs.items()}
        TUNERS[name] = self

    def config_list(self, arch: int) -> list:
        """Every config this tuner may pick on compute capability ``arch``."""
        return self.configs[_common.tuned_arch(arch)]

    def candidates(self, arch: int, shape: dict) -> list:
        """The configs timed for ``shape`` on ``arch`` (pruned; never empty)."""
        kept = self.prune(self.config_list(arch), shape, arch)
        if not kept:
            raise AssertionError(f"{self.name}: pruning left no config for {shape}")
        return kept

    def pick(self, device: torch.device, key: tuple, shape: Callable[[], dict], run: Callable[[Any], object]):
        """The config for one launch. ``key``: a hashable tuple of everything that changes the
        best config (bucketed pixel count, channel counts, dtypes, constexpr flags); ``shape()``:
        the same as a dict for ``prune``/``tiles`` (called only on a miss); ``run(cfg)``:
        launches the kernel with ``cfg`` on the real arguments (called only when timing)."""
        if _FORCED:
            forced_name = _FORCED.get(self.name)
            if forced_name is not None:
                _STATS["forced_picks"] += 1
                return self._named(device, forced_name)
        if _common.interpreting():
            return self.interpreter(shape())
        memo = (device.index, self.name, key)
        cfg = _MEMORY.get(memo)
        if cfg is not None:
            return cfg
        if _common.recording() is not None:
            return self._record_candidates(device, key, shape(), run)
        with _LOCK:
            cfg = _MEMORY.get(memo)
            if cfg is None:
                cfg, keep = self._resolve(device, key, shape(), run)
                if keep:
                    _MEMORY[memo] = cfg
        return cfg

    def _record_candidates(self, device: torch.device, key: tuple, shape: dict, run):
        """Recording pass: a launch of every candidate that timing would need (none when the
        disk cache or the settings answer without timing), then the rule's pick, not remembered."""
        arch = _common.device_arch(device)
        candidates = self.candidates(arch, shape)
        known = _read_disk(_common.device_name(device)).get(_key_text(self.name, key))
        if autotune_enabled() and known is None and len(candidates) > 1:
            for c in candidates:
                run(c)
        return rule_pick(candidates, lambda c: self.tiles(c, shape), _common.sm_count(device))

    def _named(self, device: torch.device, name: str):
        arch = _common.tuned_arch(_common.device_arch(device))
        try:
            return self._by_name[arch][name]
        except KeyError:
            raise KeyError(
                f"{self.name}: no config {name!r} on sm_{arch}; known: {sorted(self._by_name[arch])}"
            ) from None

    def _resolve(self, device: torch.device, key: tuple, shape: dict, run: Callable[[Any], object]):
        """``(config, remember)``: remember is False for a rule pick made only because a CUDA
        graph was being captured (the next launch outside a capture tunes)."""
        arch = _common.device_arch(device)
        candidates = self.candidates(arch, shape)
        sms = _common.sm_count(device)

        def by_rule():
            _STATS["rule_picks"] += 1
            return rule_pick(candidates, lambda c: self.tiles(c, shape), sms)

        if not autotune_enabled():
            return by_rule(), True
        device_name = _common.device_name(device)
        text_key = _key_text(self.name, key)
        record = _read_disk(device_name).get(text_key)
        if record is not None:
            cfg = self._by_name[_common.tuned_arch(arch)].get(record.get("config", ""))
            if cfg is not None:  # a config this version no longer has is re-tuned
                _STATS["disk_hits"] += 1
                return cfg, True
        if len(candidates) == 1:
            _STATS["single_candidate"] += 1
            return candidates[0], True
        if torch.are_deterministic_algorithms_enabled():
            return by_rule(), True
        if _capturing(device):
            if self.name not in _WARNED_CAPTURE:
                _WARNED_CAPTURE.add(self.name)
                import warnings

                warnings.warn(
                    f"fastunet: kernel {self.name} met a new shape inside a CUDA-graph capture, where nothing "
                    "can be timed; it uses the rule's config. Run the model once before capturing (or call "
                    "fastunet.tune) to capture the tuned configs.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return by_rule(), False
        t0 = time.perf_counter()
        times, error = {}, None
        for c in candidates:
            times[config_name(c)], err = _time(run, c)
            error = error or err
        best = min(candidates, key=lambda c: times[config_name(c)])
        if math.isinf(times[config_name(best)]):
            raise RuntimeError(f"{self.name}: no candidate config could run for {shape}") from error
        _STATS["tuned_keys"] += 1
        record = {
            "config": config_name(best),
            "ms": {k: (None if math.isinf(v) else round(v, 5)) for k, v in times.items()},
            "tuning_s": round(time.perf_counter() - t0, 3),
        }
        _write_disk(device_name, text_key, record)
        return best, True
