"""Launch plans (``fastunet.kernels._tuning.Plans``): a launcher's metadata-only work (the tuner's
pick, flags, grid, integer arguments) decided once per operand signature and replayed. A planned
launch must be the launch the tuner's path makes (same kernel, grid, meta-parameters and
arguments), its results bit-identical, and a plan must never outlive what it was derived from
(simulated GPU, forced configs, the tuner's memory, the operands' strides)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import fastunet

pytest.importorskip("triton")
from fastunet.kernels import _common, _split_k, _tuning, conv3x3_tma  # noqa: E402
from fastunet.kernels import conv3x3 as C  # noqa: E402
from fastunet.kernels import conv3x3_wgrad as WG  # noqa: E402
from fastunet.kernels import norm_act_bwd as NB  # noqa: E402

# ``fastunet.kernels.maxpool2x2`` and ``.upconv2x2`` (and ``.head1x1``) are the package's functions; these are the modules.
HD = importlib.import_module("fastunet.kernels.head1x1")
MP = importlib.import_module("fastunet.kernels.maxpool2x2")
UP = importlib.import_module("fastunet.kernels.upconv2x2")

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _common._INTERPRET, reason="the simulated GPU runs on CPU tensors only"
)
PLANNED = {
    C._PLANS,
    NB._PLANS,
    WG._PLANS,
    MP._PLANS,
    UP._PLANS,
    HD._PLANS,
    _split_k._PLANS,
}  # the launchers that plan so far


@pytest.fixture(autouse=True)
def _fresh(fresh_tuning):
    """Each test: the tuner's fresh setting (``fresh_tuning``) and no plans."""
    for plans in PLANNED:
        plans.clear()
    yield


@pytest.fixture
def picks(monkeypatch):
    """The tuner names ``Tuner.pick`` is asked for, in order (a planned launch asks nothing)."""
    asked = []
    original = _tuning.Tuner.pick

    def spy(self, *args, **kwargs):
        asked.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_tuning.Tuner, "pick", spy)
    return asked


def _no_plans(monkeypatch):
    monkeypatch.setattr(_tuning.Plans, "get", lambda self, key: None)


def _describe(arg):
    """A launch argument as comparable data: a tensor's shape, strides and dtype; a TMA
    descriptor's geometry; anything else as it is."""
    if isinstance(arg, torch.Tensor):
        return tuple(arg.shape), arg.stride(), arg.dtype
    if hasattr(arg, "block_shape"):
        return type(arg).__name__, tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape), arg.padding
    return arg


def _launch_record(launch) -> tuple:
    """A recorded launch with its arguments described (``_describe``)."""
    fn, grid, args, meta = launch
    described = tuple(map(_describe, args))
    return getattr(fn, "__name__", str(fn)), tuple(grid), described, tuple(sorted(meta.items()))


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().sum().backward()
    return out


@needs_interpreter
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_planned_launches_are_the_tuners(monkeypatch, picks, tma):
    """On a simulated H100 (the configs, split-K and TMA choices of that GPU), a training step and
    an inference forward of the classic structure launch exactly what they launch with plans
    disabled, and once warm no launcher asks the tuner anything (but the TMA convs)."""
    model = fastunet.UNet(3, 1, base_channels=16)
    x = torch.randn(1, 3, 32, 32)
    gpu = _common.SimulatedGPU()
    if tma:
        gpu.time = lambda cfg: 0.5 if conv3x3_tma.is_tma_config(cfg) else 1.0
    steps = {
        "training": lambda: _train_step(model.train(), x),
        "inference": lambda: model.eval()(x),
    }
    with _common.simulate_gpu(gpu), torch.autocast("cpu", dtype=torch.bfloat16):
        for name, step in steps.items():
            with torch.no_grad() if name == "inference" else torch.enable_grad():
                step()  # tunes (simulated timings), fills the plans
                step()
                gpu.launches.clear()
                picks.clear()
                step()
                planned = [_launch_record(launch) for launch in gpu.launches]
                planned_picks = list(picks)
                with monkeypatch.context() as m:
                    _no_plans(m)
                    gpu.launches.clear()
                    step()
                    unplanned = [_launch_record(launch) for launch in gpu.launches]
            assert planned == unplanned, name
            kernels = {record[0] for record in planned}
            assert "_conv3x3_bn_act_kernel" in kernels
            if tma:  # TMA picks are never planned: those convs ask the tuner every time
                assert "_conv3x3_tma_kernel" in kernels
                assert planned_picks and all(p.startswith("conv3x3.") for p in planned_picks), planned_picks
            else:  # every tuned launcher replays its plan once warm
                assert planned_picks == [], planned_picks
    assert all(len(plans) for plans in PLANNED)


@needs_interpreter
def test_split_k_is_planned(picks):
    """The split-K form (workspace + epilogue launch) replays from its plan with the same launches."""
    x = torch.randn(1, 256, 4, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = C.pack_conv3x3_weight(torch.randn(256, 256, 3, 3).to(torch.bfloat16))
    scale, shift = torch.ones(256), torch.zeros(256)
    with _common.simulate_gpu() as gpu:
        C.conv3x3_bn_act(x, w, scale, shift)
        first = [_launch_record(launch) for launch in gpu.launches]
        gpu.launches.clear()
        picks.clear()
        C.conv3x3_bn_act(x, w, scale, shift)
        assert [_launch_record(launch) for launch in gpu.launches] == first and picks == []
    assert [name for name, *_ in first] == ["_conv3x3_bn_act_kernel", "_conv3x3_splitk_epilogue_kernel"]
    assert dict(first[0][3])["SPLIT_K"] > 1


@needs_interpreter
def test_plans_go_stale(picks):
    """A plan is not used after the tuner's memory is cleared or changed, while a config is
    forced, on another simulated GPU, or for operands with other strides."""
    x = torch.randn(2, 32, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = C.pack_conv3x3_weight(torch.randn(64, 32, 3, 3).to(torch.bfloat16))
    scale, shift = torch.ones(64), torch.zeros(64)

    def conv(inp=x):
        picks.clear()
        gpu.launches.clear()
        C.conv3x3_bn_act(inp, w, scale, shift)
        return picks == [], dict(gpu.launches[0][3])

    with _common.simulate_gpu() as gpu:
        assert conv()[0] is False
        hit, meta = conv()
        assert hit
        _tuning.clear_memory()  # the next launch reads the (empty) disk and tunes again
        assert conv()[0] is False and conv()[0]
        # Someone else's pick lands in memory under this key: it is used, not the plan's.
        (memo,) = [k for k in _tuning._MEMORY if k[1] == "conv3x3.main"]
        pointer = [c for c in C._TUNERS["main"].config_list(90) if not conv3x3_tma.is_tma_config(c)]
        other = next(c for c in pointer if c != _tuning._MEMORY[memo])
        _tuning._MEMORY[memo] = other
        hit, meta = conv()
        assert not hit and meta["BLOCK_M"] == other.BLOCK_M and meta["BLOCK_N"] == other.BLOCK_N
        with _tuning.forced({"conv3x3.main": _tuning.config_name(other)}):
            assert conv()[0] is False and conv()[0] is False  # forced picks are never planned
        assert conv()[0] is False and conv()[0]  # leaving ``forced`` starts a new plan generation
        nchw = x.contiguous()
        assert conv(nchw)[0] is False and conv(nchw)[0]
    with _common.simulate_gpu(_common.SimulatedGPU(arch=80, sms=108, name="A100 (simulated)")) as gpu:
        assert conv()[0] is False


@pytest.mark.model
def test_training_step_bit_identical_without_plans(monkeypatch, triton_backend):
    """In the interpreter (real numbers), a fused training step whose planned launchers replay
    their plans equals a twin's step with plans disabled, bit for bit (output and gradients)."""
    model = fastunet.UNet(3, 2, base_channels=4, depth=1).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    _train_step(model, x)  # fills the plans
    sizes = {id(p): len(p) for p in PLANNED}
    out = _train_step(model, x)
    assert all(len(p) == sizes[id(p)] > 0 for p in PLANNED)  # the second step replayed, made none
    with monkeypatch.context() as m:
        _no_plans(m)
        out_twin = _train_step(twin, x)
    torch.testing.assert_close(out, out_twin, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
