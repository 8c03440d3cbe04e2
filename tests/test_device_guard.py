"""Every kernel launch happens on its tensors' device: the op layer's one guard
(``fastunet.ops.op.on_input_device``) makes the first tensor's device current around each op's
implementation, and Triton launches on the current device and its current stream.

Without two GPUs this is checked with a mock: the guard is replaced by a recorder, the kernels
run against the simulated GPU (launches recorded, nothing executed), and each recorded launch
must have happened inside a guard for the device of the op's tensors. On a machine with two or
more GPUs the last test runs the whole model on the second one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import model_pair

import fastunet
from fastunet.ops import op as ops  # the guard is looked up (and patched) there

pytest.importorskip("triton")
from fastunet.kernels import _common  # noqa: E402


class _Recorder:
    """Stands in for ``ops._device_guard``: remembers which device is "current" while a guard
    is active, and checks every launch against it."""

    def __init__(self):
        self.current: list[torch.device] = []
        self.entered = 0
        self.launches = 0
        self.bad: list[str] = []

    def guard(self, device):
        @contextlib.contextmanager
        def ctx():
            self.entered += 1
            self.current.append(device)
            try:
                yield
            finally:
                self.current.pop()

        return ctx()

    def record(self, launch):
        fn, grid, args, meta = launch
        self.launches += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not self.current:
            self.bad.append(f"{fn.__name__}: launched outside any device guard")
        elif any(t.device != self.current[-1] for t in tensors):
            self.bad.append(f"{fn.__name__}: tensors on {tensors[0].device}, guard on {self.current[-1]}")


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
def test_every_launch_is_inside_a_guard_for_its_device(monkeypatch, train):
    """The whole model, forward and (train) backward: every kernel of every op, guarded."""
    recorder = _Recorder()
    monkeypatch.setattr(ops, "_device_guard", recorder.guard)
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
    assert recorder.entered >= 1


def test_the_guard_switches_only_when_needed(monkeypatch):
    """No context at all for CPU tensors or the current device (a hot-path call costs one
    comparison); ``torch.cuda.device`` for a CUDA tensor on another device."""
    assert ops._device_guard(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ops._device_guard(torch.device("cuda", 0)) is None
    guard = ops._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


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
