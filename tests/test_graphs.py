"""``UNet.cuda_graph`` / ``CudaGraphRunner``: one graph per input signature, replays equal the
model's own forward (GPU), weights changed after a capture are never replayed stale, and a model
the fused path refuses runs as is.

Without a GPU the runner's bookkeeping runs against stand-ins for the CUDA-graph API (a graph
whose replay does nothing): what is checked there is when it captures, what it returns and when
it captures again, not the numbers (those are the ring-3 tests at the bottom).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from helpers import HAS_CUDA, assert_close, model_pair

import fastunet
from fastunet import FusedPathWarning, graphs

NARROW = {"base_channels": 4, "depth": 2}
pytestmark = pytest.mark.usefixtures("triton_backend")


class _Graph:
    replays = 0

    def replay(self):
        _Graph.replays += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-ins for the CUDA pieces the runner touches, so its logic runs on CPU tensors."""
    counts = {"captures": 0}

    @contextlib.contextmanager
    def graph(g):
        yield
        counts["captures"] += 1

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(graphs.CudaGraphRunner, "_check_device", staticmethod(lambda x: None))
    return counts


def _eval_model():
    _, model = model_pair(3, 2, **NARROW)
    return model.eval()


def test_one_capture_per_signature_and_static_buffers(fake_cuda):
    model = _eval_model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    runner = model.cuda_graph(x)
    assert fake_cuda["captures"] == 1 and len(runner) == 1
    y1 = runner(x)
    x2 = torch.randn_like(x)
    y2 = runner(x2)
    assert y1 is y2, "a signature's output is one static buffer, overwritten by each replay"
    assert torch.equal(runner._graphs[runner._key(x)].static_in, x2), "the input is copied in before the replay"
    assert fake_cuda["captures"] == 1
    runner(torch.randn(1, 3, 16, 8, dtype=torch.float64))  # another shape: another graph
    assert fake_cuda["captures"] == 2 and len(runner) == 2
    runner.reset()
    assert len(runner) == 0


def test_changed_weights_are_captured_again(fake_cuda):
    model = _eval_model()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    runner = model.cuda_graph(x)
    for _ in range(3):
        runner(x)
    assert fake_cuda["captures"] == 1, "unchanged weights: replay"
    with torch.no_grad():
        model.conv2.conv[0].weight.mul_(2)  # an optimizer step or load_state_dict does this
    runner(x)
    assert fake_cuda["captures"] == 2
    _, other = model_pair(3, 2, **NARROW)
    model.load_state_dict(other.state_dict())
    runner(x)
    assert fake_cuda["captures"] == 3
    model.conv1.conv[1].eps = 1e-3  # not a tensor, still part of the prepared weights
    runner(x)
    assert fake_cuda["captures"] == 4


def test_a_refused_model_runs_eager_without_capture(fake_cuda):
    model = _eval_model()
    ref = fastunet.UNetReference(3, 2, **NARROW).double().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    runner = model.cuda_graph()
    model.conv1.conv[0].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(FusedPathWarning, match="conv1.conv.0"):
        y = runner(x)
    assert fake_cuda["captures"] == 0
    assert_close(y, ref(x), "fp64", "eager fallback")
    with pytest.raises(RuntimeError, match="no fused forward to capture"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FusedPathWarning)
        runner.capture(x)


def test_training_mode_is_refused(fake_cuda):
    model = _eval_model()
    runner = model.cuda_graph()
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        runner(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_any_module_gets_a_weights_signature(fake_cuda):
    model = torch.nn.Conv2d(3, 3, 3, padding=1).double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    runner = graphs.CudaGraphRunner(model, x)
    runner(x)
    assert fake_cuda["captures"] == 1
    with torch.no_grad():
        model.weight.add_(1)
    runner(x)
    assert fake_cuda["captures"] == 2


def test_arguments_are_checked(monkeypatch):
    _, model = model_pair(3, 2, **NARROW)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="NVIDIA GPU"):
            model.cuda_graph()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="warmup"):
        graphs.CudaGraphRunner(model, warmup=0)
    with pytest.raises(TypeError, match="nn.Module"):
        graphs.CudaGraphRunner(lambda x: x)
    runner = graphs.CudaGraphRunner(model.eval())
    with pytest.raises(ValueError, match="CUDA input"):
        runner(torch.randn(1, 3, 8, 8, dtype=torch.float64))


# ------------------------------------------------------------------ ring 3: real graphs
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replays_equal_the_forward_on_gpu(dtype):
    _, model = model_pair(3, 1, dtype=torch.float32, device="cuda")
    model.eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    runner = model.cuda_graph()
    with torch.no_grad(), autocast:
        for _ in range(3):
            x = torch.randn_like(x)
            y = runner(x).clone()
            assert torch.equal(y, model(x)), "a replay computes what the fused forward computes"
        with torch.no_grad():
            model.conv3.conv[0].weight.mul_(0.5)
        x = torch.randn_like(x)
        assert torch.equal(runner(x), model(x)), "new weights after a capture"
        assert runner.captures == 2


@pytest.mark.cuda
def test_capture_before_any_tuning_works(tmp_path, monkeypatch):
    """The first call of a runner tunes in its warm-up (on a side stream), then captures."""
    from fastunet.kernels import _tuning

    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    _tuning.clear_memory()
    _, model = model_pair(3, 1, dtype=torch.float32, device="cuda", base_channels=8)
    x = torch.randn(1, 3, 32, 32, device="cuda")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "new shape inside a capture" warning
        y = model.eval().cuda_graph(x)(x).clone()
        assert torch.equal(y, model(x))
