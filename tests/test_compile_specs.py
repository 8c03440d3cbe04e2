"""The offline report's specs cannot drift from the tuners: every (config, form) a tuner can pick
for the U-Net's layers is compiled by ring 2 (``benchmarks/kernel_report.py``).

Each kernel module's ``compile_specs`` asks its tuners for their configs (``kernels/_specs.py``);
this test checks the result from the other side, without that code. The U-Net (classic and family
presets, inference and a training step) runs against a simulated H100 and A100
(``_common.simulate_gpu``) while launches are recorded the way ``fastunet.tune`` records them:
every tuner that meets a new key launches each of its candidates. Every such launch must match a
spec of the same kernel with the same constexpr values (config and form alike), ``num_warps``,
``num_stages`` and the activations' dtype. TMA eligibility is forced on (a simulated GPU has CPU
tensors, which the copy engine cannot read) so that the TMA kernel's candidates are recorded too.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch

import fastunet

pytest.importorskip("triton")
from fastunet.kernels import _common, _tuning, conv3x3_tma  # noqa: E402

from fastunet import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not _common._INTERPRET, reason="the simulated GPU runs on CPU tensors only"
)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
_TRITON_DEFAULT_STAGES = 3  # a launch that does not name num_stages compiles with this
# (preset, out channels, input size): the presets as their users build them (milesial's two-class
# logits; the classic one-class sigmoid); milesial at an odd size for its padded up-sampling.
_MODELS = (
    ("classic", 1, 64),
    ("keras", 1, 64),
    ("milesial", 2, 62),
    ("milesial-bilinear", 2, 62),
)


def _spec_index(arch: int) -> dict[str, list]:
    index = defaultdict(list)
    for spec in kernels.all_compile_specs(arch):
        index[spec.kernel].append(spec)
    return index


def _activation(fn, args) -> tuple[str, str] | None:
    """The first tensor argument's name and Triton pointer type (None for a descriptor)."""
    for name, arg in zip(fn.arg_names, args, strict=False):
        if isinstance(arg, torch.Tensor):
            return name, "*" + _DTYPES.get(arg.dtype, str(arg.dtype))
        if type(arg).__name__ == "TensorDescriptor":
            return None
    return None


def _compiled(index: dict, fn, args, meta: dict) -> bool:
    constexprs = {k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS}
    warps, stages = meta.get("num_warps", 4), meta.get("num_stages", _TRITON_DEFAULT_STAGES)
    activation = _activation(fn, args)
    for spec in index.get(fn.__name__, ()):
        if (spec.num_warps, spec.num_stages) != (warps, stages):
            continue
        if any(spec.constexprs.get(k, _MISSING) != v for k, v in constexprs.items()):
            continue
        if activation is not None and spec.signature.get(activation[0]) != activation[1]:
            continue
        return True
    return False


_MISSING = object()


class _TunedLaunches(list):
    """``SimulatedGPU.launches`` that keeps only the candidate launches of a tuner, with its name."""

    def __init__(self, current: threading.local):
        super().__init__()
        self._current = current

    def append(self, launch) -> None:
        tuner = getattr(self._current, "tuner", None)
        if tuner is not None:
            super().append((tuner, *launch))


def _record(monkeypatch, arch: int, preset: str, out_ch: int, size: int, dtype, train: bool) -> list:
    current = threading.local()
    original = _tuning.Tuner._record_candidates

    def recording(self, *args, **kwargs):
        current.tuner = self.name
        try:
            return original(self, *args, **kwargs)
        finally:
            current.tuner = None

    monkeypatch.setattr(_tuning.Tuner, "_record_candidates", recording)
    monkeypatch.setattr(conv3x3_tma, "tma_available", lambda device: arch >= 90)
    _tuning.clear_memory()
    model = fastunet.UNet(3, out_ch, preset=preset).train(train)
    x = torch.randn(2, 3, size, size)
    gpu = _common.SimulatedGPU(arch=arch, sms=132 if arch >= 90 else 108)
    with _common.simulate_gpu(gpu), _common.recording_launches():
        gpu.launches = _TunedLaunches(current)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if train:
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    return list(gpu.launches)


@pytest.fixture(autouse=True)
def _fused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTUNET_AUTOTUNE", raising=False)
    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    yield
    fastunet.set_backend(before)
    _tuning.clear_memory()


_INDEX: dict[int, dict] = {}


def _check(monkeypatch, arch, preset, out_ch, size, dtype, train):
    index = _INDEX.setdefault(arch, _spec_index(arch))
    launches = _record(monkeypatch, arch, preset, out_ch, size, dtype, train)
    tuners = {tuner for tuner, *_ in launches}
    assert len(tuners) >= (8 if train else 3), f"too few tuners recorded: {sorted(tuners)}"
    missing = sorted(
        {
            f"{tuner}: {fn.__name__} {_activation(fn, args)} "
            + " ".join(f"{k}={v}" for k, v in sorted(meta.items(), key=lambda kv: kv[0]))
            for tuner, fn, _grid, args, meta in launches
            if not _compiled(index, fn, args, meta)
        }
    )
    assert not missing, f"{len(missing)} tuned launches have no compile spec on sm_{arch}:\n" + "\n".join(missing[:20])
    return launches


@pytest.mark.compile
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("preset, out_ch, size", [_MODELS[0], _MODELS[3]], ids=["classic", "milesial-bilinear"])
def test_every_tuned_launch_is_compiled_offline_sm90_bf16(monkeypatch, preset, out_ch, size, train):
    launches = _check(monkeypatch, 90, preset, out_ch, size, torch.bfloat16, train)
    if preset == "classic":  # the TMA kernel's candidates were recorded (and matched) too
        assert any(fn.__name__ == "_conv3x3_tma_kernel" for _, fn, *_ in launches)


def _matrix():
    """The slow matrix: every preset on sm_90 in fp32 (TF32) and bf16 and on sm_80 in bf16, and
    fp16 for the classic model (its forms are bf16's in another dtype); the quick test's cases left
    out."""
    quick = {(90, _MODELS[0][0], torch.bfloat16), (90, _MODELS[3][0], torch.bfloat16)}
    cases = [(90, m, dt) for m in _MODELS for dt in (torch.float32, torch.bfloat16)]
    cases += [(80, m, torch.bfloat16) for m in _MODELS] + [(90, _MODELS[0], torch.float16)]
    return [
        pytest.param(arch, *model, dtype, id=f"sm{arch}-{model[0]}-{_DTYPES[dtype]}")
        for arch, model, dtype in cases
        if (arch, model[0], dtype) not in quick
    ]


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch, preset, out_ch, size, dtype", _matrix())
def test_every_tuned_launch_is_compiled_offline(monkeypatch, arch, preset, out_ch, size, dtype, train):
    _check(monkeypatch, arch, preset, out_ch, size, dtype, train)


def test_a_spec_missing_from_the_report_is_caught(monkeypatch):
    """The check itself: drop one tile config of the main conv from the specs and exactly its
    launches are named."""
    index = dict(_spec_index(90))
    convs = index["_conv3x3_bn_act_kernel"]
    dropped = next(s for s in convs if s.extra["variant"] == "main")

    def tile(c: dict, warps: int, stages: int) -> tuple:
        return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], warps, stages

    gone = tile(dropped.constexprs, dropped.num_warps, dropped.num_stages)
    index["_conv3x3_bn_act_kernel"] = [s for s in convs if tile(s.constexprs, s.num_warps, s.num_stages) != gone]
    launches = _record(monkeypatch, 90, "classic", 1, 64, torch.bfloat16, False)
    conv = [(fn, args, m) for _, fn, _, args, m in launches if fn.__name__ == "_conv3x3_bn_act_kernel"]
    missed = [m for fn, args, m in conv if not _compiled(index, fn, args, m)]
    assert missed and all(tile(m, m["num_warps"], m["num_stages"]) == gone for m in missed)
    assert len(missed) == sum(tile(m, m["num_warps"], m["num_stages"]) == gone for _, _, m in conv)
