"""Every kernel launch happens on its tensors' device: the op layer's one guard
(``fastunet.ops.op.on_input_device``) makes the first tensor's device current around each op's
implementation, and Triton launches on the current device and its current stream.

Without two GPUs this is checked in two halves: the whole model against the simulated GPU
(launches recorded, nothing executed) must launch every kernel inside an op call whose first
tensor is on the launch's device (the op call is where the guard is), and an op call on a
(fake) CUDA tensor of a non-current device must run its implementation with that device
current and restore the previous one after, also when it raises. On a machine with two or more
GPUs the last test runs the whole model on the second one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import model_pair

import fastunet
from fastunet.ops import _verify
from fastunet.ops import op as ops  # the guard lives there

pytest.importorskip("triton")
from fastunet.kernels import _common  # noqa: E402


class _Recorder:
    """Checks every launch against the innermost op call on the stack (``_verify._op_frame``):
    there must be one, and its first argument must be on the launch's tensors' device."""

    def __init__(self):
        self.launches = 0
        self.bad: list[str] = []

    def record(self, launch):
        fn, grid, args, meta = launch
        self.launches += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        frame = _verify._op_frame()
        if frame is None:
            self.bad.append(f"{fn.__name__}: launched outside any op call")
            return
        device = frame.f_locals["args"][0].device
        if any(t.device != device for t in tensors):
            self.bad.append(f"{fn.__name__}: tensors on {tensors[0].device}, the op call's on {device}")


class _Launches(list):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def append(self, item):
        self.recorder.record(item)
        super().append(item)


needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _common._INTERPRET, reason="the simulated GPU runs on CPU tensors"
)


@needs_interpreter
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_launch_is_inside_an_op_call_on_its_device(train):
    """The whole model, forward and (train) backward: every kernel of every op inside its op call."""
    recorder = _Recorder()
    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    try:
        _, model = model_pair(3, 2, dtype=torch.float32, base_channels=16, depth=2)
        model.train(train)
        x = torch.randn(2, 3, 16, 16, requires_grad=train)
        with _common.simulate_gpu() as gpu:
            gpu.launches = _Launches(recorder)
            if train:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        fastunet.set_backend(before)
    assert recorder.launches > (40 if train else 10), "the simulation recorded too few launches"
    assert not recorder.bad, "\n".join(recorder.bad[:10])


def test_the_guard_switches_only_when_needed(monkeypatch):
    """No context at all for CPU tensors or the current device (a hot-path call costs one
    comparison); ``torch.cuda.device`` for a CUDA tensor on another device."""
    assert ops._device_guard(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ops._device_guard(torch.device("cuda", 0)) is None
    guard = ops._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


class _FakeCuda:
    """The current CUDA device of a machine without one: ``torch.cuda.current_device`` and the
    context ``torch.cuda.device(d)`` (what ``ops._device_guard`` enters) read and switch it."""

    def __init__(self, monkeypatch, current: int):
        self.current = current
        self.switches: list[int] = []
        fake = self

        class Device:
            def __init__(self, device):
                self.idx = torch.device(device).index

            def __enter__(self):
                self.prev, fake.current = fake.current, self.idx
                fake.switches.append(self.idx)

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "device", Device)


class _FakeCudaTensor:
    def __init__(self, index: int):
        self.device = torch.device("cuda", index)
        self.is_cuda = True


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_an_op_call_runs_on_its_tensors_device(monkeypatch, raises):
    """An op implementation (``on_input_device``, as ``declare`` applies it) called with a tensor of
    a non-current CUDA device runs with that device current, once, and the previous device is
    current again after (also when the implementation raises); on the current device, or for a
    CPU tensor, nothing is switched."""
    cuda = _FakeCuda(monkeypatch, current=0)
    seen = []

    def impl(x, y, *, z=None):
        seen.append((cuda.current, y, z))
        if raises:
            raise ValueError("from the implementation")
        return "out"

    call = ops.on_input_device(impl)
    for arg, current in ((_FakeCudaTensor(1), 1), (_FakeCudaTensor(0), 0), (torch.zeros(1), 0)):
        if raises:
            with pytest.raises(ValueError, match="from the implementation"):
                call(arg, 2, z=3)
        else:
            assert call(arg, 2, z=3) == "out"
        assert seen.pop() == (current, 2, 3) and not seen
        assert cuda.current == 0
    assert cuda.switches == [1]


def test_a_launcher_refuses_tensors_of_another_device(monkeypatch):
    """Called directly (not through an op) with tensors of a non-current GPU, a launcher raises
    instead of launching on the wrong device."""

    class FakeCudaTensor:
        is_cuda = True

        def get_device(self):
            return 1

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_common, "_SIMULATED", None)
    monkeypatch.setattr(_common, "_RECORDING", None)

    class Kernel:
        __name__ = "k"

        def __getitem__(self, grid):
            raise AssertionError("must not launch")

    with pytest.raises(RuntimeError, match="cuda:1 but cuda:0 is current"):
        _common.launch(Kernel(), (1,), (FakeCudaTensor(),), {})


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_on_the_second_gpu():
    ref, model = model_pair(3, 1, dtype=torch.float32, device="cuda:1", base_channels=8)
    x = torch.randn(2, 3, 32, 32, device="cuda:1")
    torch.cuda.set_device(0)
    with torch.no_grad():
        y = model.eval()(x)
        expected = ref.eval()(x)
    torch.cuda.synchronize(1)
    assert (y - expected).abs().max().item() < 1e-2
