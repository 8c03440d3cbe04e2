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
4. the on-disk cache (``<cache dir>/tuning/<GPU name>/<versions>.json``, see ``_tuning_cache``:
   locked, merged on write, validated on read), written by any earlier process on this machine
   with the same GPU and the same triton/torch/fastunet versions; with verification on, only
   records that were verified count;
5. a single candidate left after pruning (nothing to measure);
6. the rule, when measuring is not possible or not wanted: under
   ``torch.use_deterministic_algorithms(True)`` (a timing race must not decide a reduction
   order, so only recorded picks or the rule are used), or while a CUDA graph is being captured
   (nothing can be timed inside a capture);
7. otherwise every candidate is timed (``triton.testing.do_bench``, median) and the fastest is
   kept in memory and written to disk, once verified (below).

Verification (``FASTUNET_VERIFY``, on unless "0"): a config that compiles is not a config that
computes the right thing on every GPU and triton, so every timed candidate is checked once
against the op's eager composite on the same inputs, with the test suite's tolerance table.
Kernels know no op, so the op layer drives it (``fastunet.ops._verify``): through
``register_op_calls`` it tells the tuner when an op call that can be checked is running on this
thread; a key tuned inside one is left *pending* (its fastest candidate runs the call, nothing is
remembered, and this thread holds the tuner's lock until the end of the call, so no other thread
sees or re-tunes it); at the end of the call the op layer calls ``settle(check)``, which replays
the call once per candidate with that candidate forced (``check``: None or why it disagrees with
the composite), drops and warns about every one that disagrees, keeps the fastest that agrees
and writes the record with ``"verified": true`` and the ``"rejected"`` configs. If none agrees the
key is marked eager: its launches raise ``NoVerifiedConfig``, on which the op layer runs the
composite (with a warning). A call that fails instead ``abandon``s its pending keys. A key tuned
outside an op call (a launcher called directly) is kept unverified (``"verified": false``) and,
with verification on, tuned again by the next process.

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
only), ``FASTUNET_VERIFY`` ("0" = keep the fastest candidate unchecked), ``FASTUNET_CACHE_DIR``
(default ``~/.cache/fastunet``).

Counters (``stats()``): timing runs (one per candidate timed), tuned keys, disk hits, rule
picks, forced picks, and for verification: verified keys, verify runs (one replay per candidate),
rejected configs, eager keys, unverified keys, and the milliseconds spent timing and verifying
(``tuning_ms``, ``verify_ms``: their ratio is the verification overhead); ``benchmarks`` and the
tests read them.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import _common, _tuning_cache
from ._tuning_cache import cache_dir, cache_file

__all__ = [
    "NoVerifiedConfig",
    "OpCalls",
    "Plans",
    "Tuner",
    "TUNERS",
    "bucket",
    "cache_dir",
    "cache_file",
    "clear_memory",
    "config_name",
    "forced",
    "register_op_calls",
    "reset_stats",
    "rule_pick",
    "settle",
    "abandon",
    "stats",
    "verify_enabled",
]

# Tuning settings
_AUTOTUNE_ENV = "FASTUNET_AUTOTUNE"
_VERIFY_ENV = "FASTUNET_VERIFY"
# do_bench windows (ms). Each candidate is timed for about warmup + rep ms after compiling.
_WARMUP_MS, _REP_MS = 5, 25

TUNERS: dict[str, Tuner] = {}
_STATS: Counter = Counter()
_LOCK = threading.RLock()
_FORCED: dict[str, str] = {}
# (device key, tuner name, key) -> config, for this process.
_MEMORY: dict[tuple, Any] = {}
# device name -> {entry key: record} as read from / written to disk.
_DISK: dict[str, dict[str, dict]] = {}
# (device key, tuner name, key) -> why: keys no candidate of which passed verification.
_EAGER: dict[tuple, str] = {}
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


def _setting_on(env: str) -> bool:
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "off", "no")


def autotune_enabled() -> bool:
    """False when ``FASTUNET_AUTOTUNE`` is "0"/"false"/"off"/"no": picks come from the rule."""
    return _setting_on(_AUTOTUNE_ENV)


def verify_enabled() -> bool:
    """False when ``FASTUNET_VERIFY`` is "0"/"false"/"off"/"no": tuned picks are not checked
    against the op's composite, and unverified cache records are used."""
    return _setting_on(_VERIFY_ENV)


def _verifying() -> bool:
    """Whether tuned picks are verified here: the setting is on and launches really run (a
    ``SimulatedGPU`` that only records them computes nothing to check)."""
    sim = _common.simulated_gpu()
    return verify_enabled() and (sim is None or sim.execute)


def _usable(record: dict | None, verify: bool) -> bool:
    """Whether a cache record answers a pick: with verification on, only a verified one."""
    return record is not None and (not verify or record.get("verified", False))


def _read_disk(device_name: str) -> dict[str, dict]:
    entries = _DISK.get(device_name)
    if entries is None:
        entries = _DISK[device_name] = _tuning_cache.read(cache_file(device_name))
    return entries


def _write_disk(device_name: str, records: dict[str, dict]) -> None:
    """Add ``records`` to this device's cache file (locked read-modify-write, see
    ``_tuning_cache.merge_write``) and to the copy in memory. A write that cannot happen keeps
    them in memory only: a later process tunes those keys again, never picks wrongly."""
    entries = _read_disk(device_name)
    entries.update(records)
    merged = _tuning_cache.merge_write(cache_file(device_name), device_name, records)
    if merged is None:
        _STATS["disk_write_errors"] += 1
    else:
        entries.update(merged)


def clear_memory() -> None:
    """Forget every pick held in this process (the disk cache stays); the next launch of each key
    reads the disk again."""
    with _LOCK:
        _MEMORY.clear()
        _DISK.clear()
        _EAGER.clear()
        _common.invalidate_plans()


# --------------------------------------------------------------------------------------------
# Counters and forcing
# --------------------------------------------------------------------------------------------


def stats() -> dict[str, float]:
    """A copy of the counters: ``timing_runs``, ``tuned_keys``, ``disk_hits``, ``rule_picks``,
    ``single_candidate``, ``forced_picks``, ``failed_candidates``; verification: ``verified_keys``,
    ``verify_runs``, ``rejected_configs``, ``eager_keys``, ``unverified_keys``; and the time spent
    timing candidates and verifying them, ``tuning_ms`` and ``verify_ms`` (float milliseconds;
    the other counters are ints)."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


def forced_config(tuner: str) -> str | None:
    """The config name ``forced`` currently holds for ``tuner`` (None when not forced): a
    launcher whose forced config cannot run its operands raises instead of running another."""
    return _FORCED.get(tuner)


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
        _common.invalidate_plans()
    try:
        yield
    finally:
        with _LOCK:
            _FORCED.clear()
            _FORCED.update(previous)
            _common.invalidate_plans()


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
        if memo in _EAGER:
            raise NoVerifiedConfig(_EAGER[memo])
        if _common.recording() is not None:
            return self._record_candidates(device, key, shape(), run)
        with _LOCK:
            cfg = _MEMORY.get(memo) or _open_pick(memo)
            if cfg is None:
                cfg, keep = self._resolve(device, memo, shape(), run)
                if keep:
                    _MEMORY[memo] = cfg
        return cfg

    def _record_candidates(self, device: torch.device, key: tuple, shape: dict, run):
        """Recording pass: a launch of every candidate that timing would need (none when the
        disk cache or the settings answer without timing), then the rule's pick, not remembered."""
        arch = _common.device_arch(device)
        candidates = self.candidates(arch, shape)
        known = _read_disk(_common.device_name(device)).get(_key_text(self.name, key))
        if autotune_enabled() and not _usable(known, _verifying()) and len(candidates) > 1:
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

    def _resolve(self, device: torch.device, memo: tuple, shape: dict, run: Callable[[Any], object]):
        """``(config, remember)``: remember is False for a rule pick made only because a CUDA
        graph was being captured (the next launch outside a capture tunes), and for a key left
        pending for its op call to verify (``settle`` remembers it)."""
        key = memo[2]
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
        verify = _verifying()
        record = _read_disk(device_name).get(text_key)
        if _usable(record, verify):
            if record.get("eager", False):
                if verify:  # without verification an eager record is tuned again, unchecked
                    _STATS["disk_hits"] += 1
                    _EAGER[memo] = _eager_text(self.name, key, record.get("rejected", {}))
                    raise NoVerifiedConfig(_EAGER[memo])
            else:
                cfg = self._by_name[_common.tuned_arch(arch)].get(record["config"])
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
        ranked = sorted(
            (c for c in candidates if not math.isinf(times[config_name(c)])), key=lambda c: times[config_name(c)]
        )
        if not ranked:
            raise RuntimeError(f"{self.name}: no candidate config could run for {shape}") from error
        tuning_s = time.perf_counter() - t0
        _STATS["tuned_keys"] += 1
        _STATS["tuning_ms"] += 1e3 * tuning_s
        pending = _Pending(self, memo, device_name, text_key, ranked, times, tuning_s)
        if verify and _OP_CALLS is not None and _OP_CALLS.verifiable():
            _defer(pending)
            return pending.pick, False
        _STATS["unverified_keys"] += 1
        _write_disk(device_name, {text_key: pending.record(verified=False)})
        return pending.pick, True


# --------------------------------------------------------------------------------------------
# Launch plans: what a launcher derives from its operands' metadata, decided once per key
# --------------------------------------------------------------------------------------------


class Plans:
    """One launcher's cached launch plans: what it derives from its operands' metadata alone
    (the tuner's pick, constexpr flags, grid, integer arguments, workspace sizes), kept under a
    key the launcher builds from everything that decides them (dtypes, sizes, strides, flags,
    device), so a steady-state launch skips the pick and the arithmetic.

    A plan is kept only when its pick is a settled one: held in this process's memory (or, in
    the interpreter, the fixed interpreter config, a function of the key). Never a forced pick, a
    pick pending verification, a verification replay's candidate, a recording pass's rule pick or
    a capture-time rule pick: those launches take the tuner's path every time, as before. A kept
    plan is used while (checked per hit) the plan generation is the same (``simulate_gpu``,
    ``recording_launches``, ``forced`` and ``clear_memory`` start a new one), no config is forced,
    and the tuner's memory still holds the same pick for its key. A plan (its meta-parameter dict
    included) is shared by every launch that replays it: read-only, like ``launch_meta``'s dicts.
    """

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int = 512):
        self._entries: dict = {}
        self.limit = limit  # shapes seen by one launcher; past it, start over (never grows unbounded)

    def get(self, key):
        """The plan kept for ``key`` if it is still valid, else None."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        generation, memo, cfg, plan = hit
        if generation != _common._PLAN_GENERATION or _FORCED or (memo is not None and _MEMORY.get(memo) is not cfg):
            return None
        return plan

    def put(self, key, tuner: Tuner, device: torch.device, tuning_key: tuple, cfg, plan) -> None:
        """Keep ``plan`` for ``key`` if ``cfg``, what ``tuner.pick(device, tuning_key, ...)``
        returned, is a settled pick (see the class docstring)."""
        if _FORCED:
            return
        memo = None
        if not _common.interpreting():
            memo = (device.index, tuner.name, tuning_key)
            if _MEMORY.get(memo) is not cfg:
                return
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[key] = (_common._PLAN_GENERATION, memo, cfg, plan)

    def make(self, key, tuner: Tuner, device: torch.device, tuning_key: tuple, shape, kernel, args: tuple, plan_for):
        """The plan ``plan_for(cfg) -> (grid, meta)`` of ``tuner``'s pick for ``tuning_key``
        (``shape()``: its pruning dict; candidates are timed by launching ``kernel`` on ``args``),
        kept for ``key`` when the pick is settled (``put``)."""

        def run(cfg):
            grid, meta = plan_for(cfg)
            _common.launch(kernel, grid, args, meta)

        cfg = tuner.pick(device, tuning_key, shape, run)
        plan = plan_for(cfg)
        self.put(key, tuner, device, tuning_key, cfg, plan)
        return plan

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------------------------
# Verification (see the module docstring; the op layer drives it)
# --------------------------------------------------------------------------------------------


class NoVerifiedConfig(RuntimeError):
    """No candidate config of a kernel shape passed verification: the op runs its eager
    composite (``fastunet.ops`` catches this). Raised by ``Tuner.pick``."""


class OpCalls(Protocol):
    """What the op layer tells the tuner (``register_op_calls``)."""

    def verifiable(self) -> bool:
        """True while an op call whose composite can check a candidate runs on this thread."""

    def deferred(self) -> None:
        """A key was left pending for the running op call: it must call ``settle`` (or
        ``abandon``) on this thread before it returns."""


_OP_CALLS: OpCalls | None = None


def register_op_calls(calls: OpCalls) -> None:
    """Called by ``fastunet.ops`` when it first loads the kernels (kernels never import it)."""
    global _OP_CALLS
    _OP_CALLS = calls


@dataclass(eq=False)
class _Pending:
    """A key tuned inside an op call, waiting for ``settle``."""

    tuner: Tuner
    memo: tuple
    device_name: str
    text_key: str
    ranked: list  # the candidates that ran, fastest first
    times: dict[str, float]
    tuning_s: float
    pick: Any = None  # what launches of this key use until settled; None: no candidate passed
    rejected: dict[str, str] = field(default_factory=dict)
    verify_s: float = 0.0

    def __post_init__(self):
        self.pick = self.ranked[0]

    def record(self, verified: bool) -> dict:
        rec = {
            "config": None if self.pick is None else config_name(self.pick),
            "ms": {k: (None if math.isinf(v) else round(v, 5)) for k, v in self.times.items()},
            "tuning_s": round(self.tuning_s, 3),
            "verified": verified,
        }
        if verified:
            rec["verify_s"] = round(self.verify_s, 3)
            rec["rejected"] = dict(self.rejected)
        if self.pick is None:
            rec["eager"] = True
        return rec


class _ThreadState(threading.local):
    def __init__(self):
        self.pending: list[_Pending] = []
        self.forced: dict[tuple, Any] | None = None  # memo -> config, during a replay


_THREAD = _ThreadState()


def _open_pick(memo: tuple):
    """The config this thread's unsettled op call uses for ``memo``: forced by a replay, or the
    pending pick (a second launch of the key in the same call). None otherwise."""
    t = _THREAD
    if t.forced is not None and memo in t.forced:
        return t.forced[memo]
    for p in t.pending:
        if p.memo == memo:
            if p.pick is None:
                raise NoVerifiedConfig(_eager_text(p.tuner.name, memo[2], p.rejected))
            return p.pick
    return None


def _defer(p: _Pending) -> None:
    """Leave ``p`` for ``settle``, holding the lock until then (re-entrant: this thread goes on;
    another thread missing a key waits, and then finds it settled)."""
    _LOCK.acquire()
    _THREAD.pending.append(p)
    _OP_CALLS.deferred()


def _release_pending() -> list[_Pending]:
    t = _THREAD
    items, t.pending, t.forced = t.pending, [], None
    for _ in items:
        _LOCK.release()
    return items


def abandon() -> None:
    """Forget this thread's pending keys (their op call failed): nothing is remembered, the next
    launch of each tunes again."""
    _release_pending()


def _eager_text(tuner: str, key: tuple, rejected: dict[str, str]) -> str:
    why = "; ".join(f"{name}: {err}" for name, err in rejected.items()) or "none ran"
    return (
        f"fastunet: no tuned config of kernel {tuner} agrees with the op's eager composite for key {key} "
        f"({why}); that op runs the composite for this shape (slower). FASTUNET_VERIFY=0 keeps the fastest "
        "config unchecked."
    )


def _verify(p: _Pending, items: list[_Pending], check: Callable[[], str | None]) -> None:
    """Replay the op call once per candidate of ``p`` (the other pending keys at their current
    picks) and keep the fastest that agrees with the composite; ``p.pick`` is None if none does."""
    # A key that failed so far replays with its fastest candidate (it is not the one checked).
    others = {q.memo: q.pick or q.ranked[0] for q in items if q is not p}
    p.rejected = {}
    passed = []
    t0 = time.perf_counter()
    for cfg in p.ranked:
        _THREAD.forced = {**others, p.memo: cfg}
        _STATS["verify_runs"] += 1
        try:
            why = check()
        except Exception as exc:  # noqa: BLE001  (a candidate that cannot run is rejected, not fatal)
            why = f"{type(exc).__name__}: {exc}"
        finally:
            _THREAD.forced = None
        if why is None:
            passed.append(cfg)
        else:
            p.rejected[config_name(cfg)] = why
    p.verify_s += time.perf_counter() - t0
    p.pick = passed[0] if passed else None


def settle(check: Callable[[], str | None] | None, spent_s: float = 0.0) -> bool:
    """Verify and remember the keys this thread's op call left pending (see the module docstring).

    ``check()``: runs the op call again (with the candidates this function forces) and returns
    None when its outputs agree with the composite's, else a one-line reason. ``check=None``: the
    call cannot be checked (its data are not finite): the fastest candidates are kept unverified.
    ``spent_s``: seconds the caller already spent on this verification (the composite), counted
    with the replays in ``verify_ms`` and the records' ``verify_s``.
    Returns True when a key's pick is not the one the call ran with (the caller must run it again;
    a key with no passing config raises ``NoVerifiedConfig`` then). Warns once per rejected
    config and per eager key. Releases the tuner's lock."""
    t = _THREAD
    items = t.pending
    if not items:
        return False
    try:
        if check is not None:
            # Each key is checked with the others at their current picks; a key whose candidates
            # all failed is checked again once another key's pick changed (the failure may have
            # been that key's config), so one wrong config cannot send an innocent kernel eager.
            todo = list(items)
            for _ in range(len(items)):
                before = [q.pick for q in items]
                for p in todo:
                    _verify(p, items, check)
                todo = [p for p in items if p.pick is None]
                if not todo or all(a is q.pick for a, q in zip(before, items, strict=True)):
                    break
    finally:
        items = _release_pending()
    changed = False
    by_device: dict[str, dict[str, dict]] = {}
    for p in items:
        verified = check is not None
        p.verify_s += spent_s / len(items)
        _STATS["verify_ms"] += 1e3 * p.verify_s
        _STATS["verified_keys" if verified else "unverified_keys"] += 1
        _STATS["rejected_configs"] += len(p.rejected)
        for name, why in p.rejected.items():
            warnings.warn(
                f"fastunet: kernel {p.tuner.name} config {name} disagrees with the op's eager composite for key "
                f"{p.memo[2]}: {why}; dropped from the candidates of this shape.",
                RuntimeWarning,
                stacklevel=4,
            )
        if p.pick is None:
            _STATS["eager_keys"] += 1
            _EAGER[p.memo] = _eager_text(p.tuner.name, p.memo[2], p.rejected)
            warnings.warn(_EAGER[p.memo], RuntimeWarning, stacklevel=4)
        else:
            _MEMORY[p.memo] = p.pick
        changed |= p.pick is not p.ranked[0]
        by_device.setdefault(p.device_name, {})[p.text_key] = p.record(verified)
    for device_name, records in by_device.items():
        _write_disk(device_name, records)
    return changed
