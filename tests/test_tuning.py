"""The tuner (``fastunet.kernels._tuning``): keys, the on-disk cache, the settings, determinism,
forcing, CUDA-graph capture, thread safety, and how many timing runs the classic model's shapes
cost. Without a GPU the launchers run against a simulated H100 (``_common.simulate_gpu``): they
prune, key and pick exactly as on that GPU, launches are recorded and timings are fake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import fastunet

pytest.importorskip("triton")
from fastunet.kernels import _common, _tuning, _tuning_cache  # noqa: E402
from fastunet.kernels import conv3x3 as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _common._INTERPRET, reason="the simulated GPU runs on CPU tensors only"
)


@pytest.fixture(autouse=True)
def _fresh_tuning(fresh_tuning):
    """Each test: its own cache directory, no picks in memory, zeroed counters, fused backend."""
    yield


def _conv(n=2, c_in=32, c_out=64, hw=16, dtype=torch.float16, stats=False):
    x = torch.randn(n, c_in, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w = C.pack_conv3x3_weight(torch.randn(c_out, c_in, 3, 3).to(dtype))
    if stats:
        return C.conv3x3_bn_stats(x, w, torch.zeros(c_out))
    return C.conv3x3_bn_act(x, w, torch.ones(c_out), torch.zeros(c_out))


def test_bucket_rounds_to_the_nearest_power_of_two_in_log_scale():
    assert [_tuning.bucket(n) for n in (0, 1, 2, 3, 5, 6, 1000)] == [1, 1, 2, 4, 4, 8, 1024]
    assert _tuning.bucket(16 * 256 * 256) == _tuning.bucket(17 * 256 * 256) == 2**20
    assert _tuning.bucket(22 * 256 * 256) == 2**20 and _tuning.bucket(23 * 256 * 256) == 2**21  # sqrt(2) * 16


def test_config_names_are_stable_and_unique_per_tuner():
    for name, tuner in _tuning.TUNERS.items():
        for arch in (80, 90):
            names = [_tuning.config_name(c) for c in tuner.config_list(arch)]
            assert len(names) == len(set(names)), f"{name} sm_{arch}: duplicate config names"
    assert _tuning.config_name(C._CONFIGS_SM90[0]) == "M128_N256_K64_w8_s3"


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path / "x"))
    assert _tuning.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FASTUNET_CACHE_DIR")
    assert _tuning.cache_dir() == Path.home() / ".cache" / "fastunet"
    path = _tuning.cache_file("NVIDIA H100 80GB HBM3")
    assert path.parent.name == "NVIDIA-H100-80GB-HBM3" and "triton-" in path.name and "torch-" in path.name


@needs_interpreter
def test_training_and_eval_forms_are_tuned_apart():
    """The conv key holds every constexpr flag: eval (RELU) and training (STATS) never share a
    pick, so the training form's register budget always prunes its own candidates."""
    with _common.simulate_gpu():
        _conv()
        _conv(stats=True)
        _conv()  # same key as the first: nothing new
    assert _tuning.stats()["tuned_keys"] == 2


@pytest.mark.slow  # two fresh processes (~3.5 s)
@needs_interpreter
def test_picks_persist_across_processes(tmp_path):
    """A second process with the same shapes does no timing at all: it reads the cache file."""
    script = textwrap.dedent(
        """
        import json, os
        import torch, fastunet
        from fastunet.kernels import _common, _tuning
        fastunet.set_backend("triton")
        model = fastunet.UNet(3, 1, base_channels=16).eval()
        with _common.simulate_gpu(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 3, 32, 32))
        print(json.dumps(_tuning.stats()))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", FASTUNET_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["timing_runs"] > 0 and first["tuned_keys"] > 0
    assert second.get("timing_runs", 0) == 0 and second["disk_hits"] == first["tuned_keys"]
    files = list((tmp_path / "cache" / "tuning").glob("*/*.json"))
    assert len(files) == 1 and "simulated" in files[0].parent.name
    entries = json.loads(files[0].read_text())["entries"]
    assert len(entries) == first["tuned_keys"]
    assert all(set(e) >= {"config", "ms"} for e in entries.values())


@needs_interpreter
def test_autotune_off_picks_by_rule_without_timing(monkeypatch):
    monkeypatch.setenv("FASTUNET_AUTOTUNE", "0")
    with _common.simulate_gpu():
        _conv()
        _conv(stats=True)
    stats = _tuning.stats()
    assert stats.get("timing_runs", 0) == 0 and stats["rule_picks"] == 2
    assert not list(_tuning.cache_dir().rglob("*.json")), "rule picks are not written to the cache"


@needs_interpreter
def test_deterministic_mode_never_times_and_prefers_recorded_picks():
    """Under torch.use_deterministic_algorithms(True) a reduction order must not hang on a
    timing race: recorded picks or the rule, never a measurement."""
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        with _common.simulate_gpu():
            _conv(hw=8)  # timed and recorded while determinism is off
            torch.use_deterministic_algorithms(True)
            _tuning.clear_memory()
            _tuning.reset_stats()
            _conv(hw=8)  # the recorded pick, from disk
            _conv(hw=32)  # a new key: the rule
    finally:
        torch.use_deterministic_algorithms(previous)
    stats = _tuning.stats()
    assert stats.get("timing_runs", 0) == 0 and stats["disk_hits"] == 1 and stats["rule_picks"] == 1


@needs_interpreter
def test_rule_pick_fills_the_sms_with_the_largest_tile():
    tuner = C._TUNERS["main"]
    big = dict(variant="main", elem=2, M=2**20, C1=64, C2=0, C_out=256, SMALL_C=False, training=False)
    pick = _tuning.rule_pick(tuner.candidates(90, big), lambda c: C._tiles(c, big), 132)
    assert (pick.BLOCK_M, pick.BLOCK_N) == (128, 256)
    small = dict(big, M=1024, C_out=64)
    pick = _tuning.rule_pick(tuner.candidates(90, small), lambda c: C._tiles(c, small), 132)
    assert (pick.BLOCK_M, pick.BLOCK_N) == (64, 64)  # no tile fills the SMs: the most tiles


@needs_interpreter
def test_capture_uses_the_rule_and_warns_once(monkeypatch):
    monkeypatch.setattr(_tuning, "_capturing", lambda device: True)
    monkeypatch.setattr(_tuning, "_WARNED_CAPTURE", set())
    with _common.simulate_gpu(), pytest.warns(RuntimeWarning, match="inside a CUDA-graph capture"):
        _conv()
    assert _tuning.stats()["rule_picks"] == 1 and _tuning.stats().get("timing_runs", 0) == 0
    monkeypatch.setattr(_tuning, "_capturing", lambda device: False)
    with _common.simulate_gpu():
        _conv()  # outside the capture the same key is tuned: the capture's pick was not kept
    assert _tuning.stats()["timing_runs"] > 0 and _tuning.stats()["tuned_keys"] == 1


@needs_interpreter
def test_forced_config_wins_and_is_not_remembered():
    name = _tuning.config_name(C._CONFIGS_SM90[-1])
    with _common.simulate_gpu() as gpu:
        with _tuning.forced({"conv3x3.main": name}):
            _conv()
        assert gpu.launches[-1][3]["BLOCK_K"] == C._CONFIGS_SM90[-1].BLOCK_K
        assert _tuning.stats()["forced_picks"] == 1 and _tuning.stats().get("tuned_keys", 0) == 0


@needs_interpreter
def test_bn_statistics_use_the_tile_of_their_own_launch(monkeypatch):
    """The finalize reads the partials with the BLOCK_M of the conv launch that wrote them, not
    a tuner's shared ``best_config`` another thread may have changed in between."""
    tuner = C._TUNERS["main"]
    real_pick = tuner.pick
    other = next(c for c in C._CONFIGS_SM90 if c.BLOCK_M == 64)

    def pick_then_retune(*args, **kwargs):
        cfg = real_pick(*args, **kwargs)
        _tuning._MEMORY.clear()  # what a concurrent launch of another shape could leave behind
        _tuning._MEMORY[("stale",)] = other
        return cfg

    monkeypatch.setattr(tuner, "pick", pick_then_retune)
    with _common.simulate_gpu() as gpu:
        _conv(n=16, hw=64, c_in=64, stats=True)
    (conv, _, _, meta), (fin, _, fin_args, _) = gpu.launches[-2], gpu.launches[-1]
    assert conv.__name__ == "_conv3x3_bn_act_kernel" and fin.__name__ == "_bn_stats_finalize_kernel"
    assert fin_args[-1] == meta["BLOCK_M"] == 128


@needs_interpreter
def test_threads_tune_each_key_once():
    with _common.simulate_gpu():
        errors = []

        def work(hw):
            try:
                for _ in range(3):
                    _conv(hw=hw)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(hw,)) for hw in (8, 16, 8, 16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert _tuning.stats()["tuned_keys"] == 2


@needs_interpreter
def test_tune_api_reports_and_leaves_the_model_untouched():
    model = fastunet.UNet(3, 1, base_channels=16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _common.simulate_gpu():
        report = fastunet.tune(model, torch.randn(2, 3, 32, 32), modes=("eval", "train"), dtype=torch.bfloat16)
        again = fastunet.tune(model, torch.randn(2, 3, 32, 32), modes=("eval", "train"), dtype=torch.bfloat16)
    assert report.timing_runs > 0 and report.tuned_keys > 0 and report.modes == ("eval", "train")
    assert again.timing_runs == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "tune changed the model"
    assert model.training and all(p.grad is None for p in model.parameters())
    assert "kernel shape(s)" in str(report)


def test_tune_rejects_what_it_cannot_tune():
    with pytest.raises(TypeError, match="fastunet.UNet"):
        fastunet.tune(torch.nn.Conv2d(1, 1, 1), torch.randn(1, 1, 4, 4))
    fastunet.set_backend("eager")
    with pytest.raises(RuntimeError, match="nothing to tune"):
        fastunet.tune(fastunet.UNet(3, 1, base_channels=4, depth=2), torch.randn(1, 3, 8, 8))


@needs_interpreter
def test_tune_refuses_a_model_the_guard_sends_to_the_eager_path():
    # nnU-Net's LeakyReLU has no fused kernel: the guard's reason, before any launch
    model = fastunet.UNet(3, 1, preset="nnunet", base_channels=4, depth=2)
    with _common.simulate_gpu(), pytest.raises(RuntimeError) as info:
        fastunet.tune(model, torch.randn(1, 3, 32, 32), modes=("eval", "train"))
    text = str(info.value)
    assert text.startswith("nothing to tune: in eval mode the model runs the eager path (module 'conv1.conv.2'")
    assert "LeakyReLU" in text and _tuning.stats().get("tuned_keys", 0) == 0


# What one batch of the classic model costs to tune on an H100 (the simulated GPU's config
# lists, TMA-fed candidates included, 132 SMs): timing runs (candidates timed) and kernel shapes
# tuned. The numbers docs/tuning.md quotes; a change to a config list or a pruning rule moves them,
# and then this test and that text change together. (117 and 298 before the simulated H100 had
# its copy engine: the TMA candidates were not counted.)
CLASSIC_TIMING_RUNS = {"eval": (170, 23), "train": (395, 66)}


@needs_interpreter
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_classic_model_timing_runs(mode):
    """UNet(3, 1), bf16, 256x256: batch 16 times every candidate once per kernel shape; batch 17
    (the same power-of-two pixel bucket, e.g. an epoch's last batch) then times nothing."""
    model = fastunet.UNet(3, 1).train(mode == "train")
    counts = []
    with _common.simulate_gpu() as gpu, torch.autocast("cpu", dtype=torch.bfloat16):
        gpu.record = False
        for batch in (16, 17):
            before = _tuning.stats()
            x = torch.randn(batch, 3, 256, 256)
            if mode == "eval":
                with torch.no_grad():
                    model(x)
            else:
                model(x).float().sum().backward()
            after = _tuning.stats()
            counts.append(tuple(after.get(k, 0) - before.get(k, 0) for k in ("timing_runs", "tuned_keys")))
    assert counts[0] == CLASSIC_TIMING_RUNS[mode]
    assert counts[1] == (0, 0)


# --------------------------------------------------------------------------------------------
# Verification: every timed candidate checked against the op's composite
# --------------------------------------------------------------------------------------------


def _conv_op_inputs(n=1, c_in=16, c_out=32, hw=8, dtype=torch.float16):
    x = torch.randn(n, c_in, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 3, 3).to(dtype)
    return x, w, torch.rand(c_out) + 0.5, torch.randn(c_out)


def _conv_op(x, w, scale, shift):
    return fastunet.ops.conv3x3_bn_act(x, None, w, scale, shift, True)


def _expected_conv(x, w, scale, shift):
    z = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    return torch.relu(z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


class _Timing:
    """The simulated GPU's clock: the i-th candidate timed takes ``ms[i]`` (1.0 past the list);
    ``names``: the candidates in the order they were timed."""

    def __init__(self, *ms):
        self.ms, self.names = ms, []

    def __call__(self, cfg) -> float:
        self.names.append(_tuning.config_name(cfg))
        i = len(self.names) - 1
        return self.ms[i] if i < len(self.ms) else 1.0


def _executing_gpu(timing: _Timing) -> _common.SimulatedGPU:
    """A simulated sm_80 GPU whose launches run in the interpreter and whose timings are ``timing``."""
    gpu = _common.SimulatedGPU(arch=80, sms=4, execute=True)
    gpu.time = timing
    return gpu


def _make_wrong(monkeypatch, is_wrong):
    """The test hook: conv3x3 launches of a config for which ``is_wrong(name)`` holds leave the
    top half of every image unwritten (NaN, as a poisoned output shows a tile-coverage bug). The
    package has no such path; this replaces the kernel module's ``launch`` for one test."""
    real = C.launch

    def launch(fn, grid, args, meta):
        real(fn, grid, args, meta)
        if fn is C._conv3x3_bn_act_kernel and is_wrong(_tuning.config_name(_Meta(meta))):
            out = args[5]
            out[:, :, : max(1, out.shape[2] // 2)] = float("nan")

    monkeypatch.setattr(C, "launch", launch)


class _Meta:
    """A launch's meta-parameters seen as a config (for ``config_name``)."""

    def __init__(self, meta):
        self.kwargs = {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        self.num_warps, self.num_stages = meta["num_warps"], meta["num_stages"]


def _cache_entries() -> dict:
    (path,) = _tuning.cache_dir().rglob("*.json")
    return json.loads(path.read_text())["entries"]


def _conv_launches(gpu) -> int:
    return sum(fn is C._conv3x3_bn_act_kernel for fn, *_ in gpu.launches)


def _next_process_launches(x, w, scale, shift, expected) -> int:
    """Run the op as a new process would (nothing in memory): it must take the cache's record
    without timing and compute ``expected``; returns its conv launches."""
    _tuning.clear_memory()
    _tuning.reset_stats()
    with _common.simulate_gpu(_executing_gpu(_Timing())) as gpu:
        assert_close(_conv_op(x, w, scale, shift), expected, "fp16", "the next process")
    assert _tuning.stats() == {"disk_hits": 1}
    return _conv_launches(gpu)


@needs_interpreter
def test_verification_drops_a_wrong_candidate(monkeypatch):
    """The fastest candidate computes garbage (the test hook ``_make_wrong``): the tuner warns
    naming the kernel, the config and the error, keeps the next fastest (which agrees with the
    composite), the call that tuned returns the right numbers, and the cache records the key as
    verified with the rejected config; a later process takes the verified pick without timing."""
    timing = _Timing(0.5, 0.7)  # the first candidate timed is the fastest, the second the next
    _make_wrong(monkeypatch, lambda name: name == timing.names[0])
    x, w, scale, shift = _conv_op_inputs()
    expected = _expected_conv(x, w, scale, shift)
    with _common.simulate_gpu(_executing_gpu(timing)) as gpu, pytest.warns(RuntimeWarning) as warned:
        y = _conv_op(x, w, scale, shift)
        tuning_launches = _conv_launches(gpu)
        y_next = _conv_op(x, w, scale, shift)
        assert _conv_launches(gpu) == tuning_launches + 1, "a verified pick is not checked again"
    bad, good = timing.names[:2]
    messages = [str(m.message) for m in warned if "disagrees" in str(m.message)]
    assert len(messages) == 1 and "conv3x3.main" in messages[0] and bad in messages[0]
    assert "elements beyond the fp16 tolerance" in messages[0] and "NaN where the composite has a number" in messages[0]
    assert_close(y, expected, "fp16", "the call that tuned")
    assert_close(y_next, expected, "fp16", "the next call")
    stats = _tuning.stats()
    assert stats["verify_runs"] == stats["timing_runs"] == len(timing.names) >= 2, "each candidate checked once"
    assert stats["rejected_configs"] == 1 and stats["verified_keys"] == 1 and "eager_keys" not in stats
    # the provisional launch (the wrong config), one replay per candidate, the call run again
    assert tuning_launches == len(timing.names) + 2
    (entry,) = _cache_entries().values()
    assert entry["config"] == good and entry["verified"] is True and set(entry["rejected"]) == {bad}

    assert _next_process_launches(x, w, scale, shift, expected) == 1


@needs_interpreter
def test_no_agreeing_candidate_runs_the_composite(monkeypatch):
    """Every candidate is wrong: the op warns and runs its eager composite, for this call, the
    next ones and the next process (the cache records the key as eager)."""
    timing = _Timing()
    _make_wrong(monkeypatch, lambda name: True)
    x, w, scale, shift = _conv_op_inputs()
    expected = _expected_conv(x, w, scale, shift)
    with _common.simulate_gpu(_executing_gpu(timing)) as gpu:
        with pytest.warns(RuntimeWarning) as warned:
            assert_close(_conv_op(x, w, scale, shift), expected, "fp16", "the call that tuned")
        assert sum("runs the composite for this shape" in str(m.message) for m in warned) == 1
        gpu.launches.clear()
        assert_close(_conv_op(x, w, scale, shift), expected, "fp16", "the next call")
        assert _conv_launches(gpu) == 0
    assert _tuning.stats()["eager_keys"] == 1 and _tuning.stats()["rejected_configs"] == len(timing.names)
    (entry,) = _cache_entries().values()
    assert entry["eager"] is True and entry["config"] is None and set(entry["rejected"]) == set(timing.names)

    assert _next_process_launches(x, w, scale, shift, expected) == 0


@needs_interpreter
def test_verify_off_keeps_the_fastest_unchecked_and_on_retunes_it(monkeypatch):
    """``FASTUNET_VERIFY=0``: nothing is checked (the wrong fastest candidate is kept: what
    verification prevents) and the record says unverified; with verification back on, that
    record does not count: the key is tuned and verified again."""
    timing = _Timing(0.5)
    _make_wrong(monkeypatch, lambda name: name == timing.names[0])
    x, w, scale, shift = _conv_op_inputs()
    monkeypatch.setenv("FASTUNET_VERIFY", "0")
    with _common.simulate_gpu(_executing_gpu(timing)):
        assert torch.isnan(_conv_op(x, w, scale, shift)).any(), "the wrong config ran"
    assert "verify_runs" not in _tuning.stats() and _tuning.stats()["unverified_keys"] == 1
    (entry,) = _cache_entries().values()
    assert entry["config"] == timing.names[0] and entry["verified"] is False

    monkeypatch.setenv("FASTUNET_VERIFY", "1")
    _tuning.clear_memory()
    _tuning.reset_stats()
    timing = _Timing(0.5)
    with _common.simulate_gpu(_executing_gpu(timing)), pytest.warns(RuntimeWarning, match="disagrees"):
        assert_close(_conv_op(x, w, scale, shift), _expected_conv(x, w, scale, shift), "fp16", "verified")
    assert _tuning.stats()["verified_keys"] == 1 and "disk_hits" not in _tuning.stats()
    (entry,) = _cache_entries().values()
    assert entry["verified"] is True and entry["config"] != timing.names[0]


@needs_interpreter
def test_what_cannot_be_checked_is_kept_unverified(monkeypatch):
    """A launcher called directly (no op, so no composite) and an op call on non-finite data
    keep the fastest candidate with ``"verified": false`` (a later process verifies it)."""
    with _common.simulate_gpu():
        _conv()  # the launcher, outside any op call
    assert _tuning.stats()["unverified_keys"] == 1 and "verify_runs" not in _tuning.stats()
    assert [e["verified"] for e in _cache_entries().values()] == [False]

    _tuning.reset_stats()
    x, w, scale, shift = _conv_op_inputs(hw=4)
    x[0, 0, 0, 0] = float("nan")
    with _common.simulate_gpu(_executing_gpu(_Timing())):
        _conv_op(x, w, scale, shift)
    assert _tuning.stats()["unverified_keys"] == 1 and "verify_runs" not in _tuning.stats()


@needs_interpreter
def test_threads_verify_each_key_once(monkeypatch):
    """The tuner's lock is held from a key's timing to the end of its op call's verification:
    threads launching the same shapes tune and verify each key once and never see it unverified."""
    inputs = {hw: _conv_op_inputs(hw=hw) for hw in (4, 8)}
    errors = []
    real, interpreter = C.launch, threading.Lock()

    def launch(*args):  # Triton's interpreter runs one kernel at a time (it has global state)
        with interpreter:
            real(*args)

    monkeypatch.setattr(C, "launch", launch)

    def work(hw):
        try:
            for _ in range(2):
                assert_close(_conv_op(*inputs[hw]), _expected_conv(*inputs[hw]), "fp16", f"hw={hw}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with _common.simulate_gpu(_executing_gpu(_Timing())):
        threads = [threading.Thread(target=work, args=(hw,)) for hw in (4, 8, 4, 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    stats = _tuning.stats()
    assert stats["tuned_keys"] == stats["verified_keys"] == 2 and stats["verify_runs"] == stats["timing_runs"]


@pytest.mark.slow  # a training step of a small model, every kernel in the interpreter (~60 s)
@needs_interpreter
def test_every_op_of_a_training_step_verifies_without_false_rejections():
    """A training step through every tuned kernel of a small U-Net on fresh random data: each
    candidate of each key agrees with its op's composite within the tolerance table (a rejection
    here would be the verification, not a config, being wrong)."""
    model = fastunet.UNet(3, 2, base_channels=8, depth=2).half().train()
    with _common.simulate_gpu(_executing_gpu(_Timing())):
        model(torch.randn(2, 3, 16, 16).half()).float().sum().backward()
    stats = _tuning.stats()
    assert stats["tuned_keys"] == stats["verified_keys"] > 20 and stats["verify_runs"] == stats["timing_runs"]
    assert stats.get("rejected_configs", 0) == 0 and stats.get("eager_keys", 0) == 0


# --------------------------------------------------------------------------------------------
# The cache file: validated on read, locked and merged on write, never written over
# --------------------------------------------------------------------------------------------

_SIMULATED_NAME = _common.SimulatedGPU().name


@pytest.mark.parametrize(
    "content",
    [b"[1, 2]", b"null", b'{"x": 5}', b'{"format": 1, "entries": [1]}', b'{"format": 2, "entries": {}}', b"{trunc",
     b"\xff\xfe\x00", b""],
    ids=["list", "null", "object", "entries-list", "format-2", "truncated", "not-utf8", "empty"],
)  # fmt: skip
@needs_interpreter
def test_a_cache_file_of_the_wrong_shape_is_ignored_and_never_written_over(content):
    """Valid JSON of the wrong shape once crashed every fused forward: now one warning names the
    file, tuning goes on in memory, and the file keeps its bytes (no write over it)."""
    path = _tuning.cache_file(_SIMULATED_NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with _common.simulate_gpu(), pytest.warns(RuntimeWarning) as warned:
        _conv()
        _conv(hw=32)  # a second key: read and written again, still one warning
    messages = [str(m.message) for m in warned if "tuning cache" in str(m.message)]
    assert len(messages) == 1 and str(path) in messages[0] and "left as it is" in messages[0]
    assert path.read_bytes() == content
    assert _tuning.stats()["tuned_keys"] == 2 and _tuning.stats()["disk_write_errors"] == 2


def test_an_oversized_cache_file_is_not_read(monkeypatch):
    path = _tuning.cache_file(_SIMULATED_NAME)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "entries": {}}) + " " * 64)
    monkeypatch.setattr(_tuning_cache, "MAX_BYTES", 32)
    with pytest.warns(RuntimeWarning, match="more than a tuning cache can hold"):
        assert _tuning_cache.read(path) == {}


@needs_interpreter
def test_malformed_records_are_ignored_alone_and_kept():
    """Records of the wrong shape are skipped (one warning) while the good ones answer picks,
    and a write keeps them as they are."""
    with _common.simulate_gpu():
        _conv()
    path = next(_tuning.cache_dir().rglob("*.json"))
    doc = json.loads(path.read_text())
    bad = {
        "conv3x3.main|a": {"config": 5},
        "conv3x3.main|b": {"config": "M64_N64_K32_w4_s4", "ms": [1]},
        "conv3x3.main|c": {"config": "M64_N64_K32_w4_s4", "verified": "yes"},
        "conv3x3.main|d": {"config": None},
        "conv3x3.main|e": 7,
    }
    doc["entries"].update(bad)
    path.write_text(json.dumps(doc))
    _tuning.clear_memory()
    _tuning.reset_stats()
    with _common.simulate_gpu(), pytest.warns(RuntimeWarning, match="ignoring 5 malformed record"):
        _conv()  # the good record
        _conv(hw=32)  # a new key, merged into the file
    assert _tuning.stats()["disk_hits"] == 1 and _tuning.stats()["tuned_keys"] == 1
    entries = _cache_entries()
    assert len(entries) == 7 and all(entries[k] == v for k, v in bad.items())


def _write_entries(path: str, worker: int, count: int, barrier) -> None:
    """One process's share of the concurrency test: ``count`` read-modify-writes of one record each."""
    barrier.wait()
    for j in range(count):
        record = {"config": f"M64_N64_K32_w4_s{j}", "ms": {"a": 1.0}, "verified": True}
        assert _tuning_cache.merge_write(Path(path), "gpu", {f"t|{worker}|{j}": record}) is not None


def test_concurrent_processes_keep_every_entry(tmp_path):
    """12 processes writing into one cache at once (each of its 10 records a separate locked
    read-modify-write, started together) keep all 120 records (an unlocked merge lost most)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers, count = 12, 10
    path = tmp_path / "cache.json"
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_write_entries, args=(str(path), i, count, barrier)) for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(f"t|{i}|{j}" for i in range(workers) for j in range(count))
    assert not list(tmp_path.glob(".*partial*")), "no temporary file left behind"


@pytest.mark.slow  # 12 fresh processes (~45 CPU-s)
@needs_interpreter
def test_concurrent_tune_processes_keep_every_entry(tmp_path):
    """The issue's case end to end: 12 processes running ``fastunet.tune`` (the simulated GPU,
    each its own image size, so their keys overlap in part) into one cache keep every key any of
    them tuned."""
    script = textwrap.dedent(
        """
        import json, sys
        import torch, fastunet
        from fastunet.kernels import _common, _tuning
        fastunet.set_backend("triton")
        written, write = set(), _tuning._write_disk
        _tuning._write_disk = lambda device, records: (written.update(records), write(device, records))
        size = int(sys.argv[1])
        with _common.simulate_gpu():
            fastunet.tune(fastunet.UNet(3, 1, base_channels=8, depth=2), torch.randn(2, 3, size, size), modes="eval")
        print(json.dumps(sorted(written)))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", FASTUNET_CACHE_DIR=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(16 * (i + 1))], env=env, cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(12)
    ]  # fmt: skip
    tuned = set()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        tuned |= set(json.loads(out.strip().splitlines()[-1]))
    (path,) = (tmp_path / "cache" / "tuning").glob("*/*.json")
    assert len(tuned) > 50 and set(json.loads(path.read_text())["entries"]) == tuned


def test_tune_report_says_what_verification_did():
    report = fastunet.TuneReport(
        timing_runs=12, tuned_keys=3, disk_hits=0, rule_picks=0, seconds=2.0, modes=("eval",),
        cache_file=Path("c.json"), verified_keys=3, rejected_configs=1, eager_keys=0, verify_seconds=0.1,
        timing_seconds=1.5,
    )  # fmt: skip
    assert "verified 3 shape(s)" in str(report) and "1 config(s) rejected" in str(report)
    assert "verified" not in str(fastunet.TuneReport(0, 0, 1, 0, 0.1, ("eval",), Path("c.json")))


@needs_interpreter
def test_an_interrupted_op_call_forgets_its_pending_key_and_frees_the_tuner(monkeypatch):
    """A call interrupted after tuning (here Ctrl-C in its launch) remembers nothing and leaves
    the tuner's lock free for other threads; the next call tunes and verifies the key."""
    from fastunet.ops import _verify

    real = C.launch

    def interrupted(*args):
        raise KeyboardInterrupt

    x, w, scale, shift = _conv_op_inputs()
    monkeypatch.setattr(C, "launch", interrupted)
    with _common.simulate_gpu(_executing_gpu(_Timing())), pytest.raises(KeyboardInterrupt):
        _conv_op(x, w, scale, shift)
    assert _verify.PENDING == 0 and _tuning._THREAD.pending == [] and not list(_tuning.cache_dir().rglob("*.json"))
    taken = []

    def take_the_lock():
        taken.append(_tuning._LOCK.acquire(timeout=5))
        if taken[-1]:
            _tuning._LOCK.release()

    worker = threading.Thread(target=take_the_lock)
    worker.start()
    worker.join()
    assert taken == [True], "another thread can take the tuner's lock"
    monkeypatch.setattr(C, "launch", real)
    with _common.simulate_gpu(_executing_gpu(_Timing())):
        assert_close(_conv_op(x, w, scale, shift), _expected_conv(x, w, scale, shift), "fp16", "after")
    assert _tuning.stats()["tuned_keys"] == 2 and _tuning.stats()["verified_keys"] == 1
