"""``UNet.cuda_graph`` / ``CudaGraphRunner``: one graph per input signature, replays equal the
model's own forward (GPU), weights changed after a capture are never replayed stale, and a model
the fused path refuses runs as is. ``graph_train_step``: the whole training step as one graph.

Without a GPU the bookkeeping runs against stand-ins for the CUDA-graph API (a graph whose replay
does nothing, a capture that runs its body once): what is checked there is when it captures, what
it returns and when it captures again or refuses, not the numbers (those are the ring-3 tests at
the bottom). The training step itself is checked to be capture-safe on CPU by watching every
aten op it runs (``_StepWatch``) on the fused path's GPU host code (a simulated GPU): no host
synchronisation (which also rules out a Python branch on a tensor's value), no tensor made from
host data, the same ops every step, and no tensor it allocates outliving it but the gradients.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import sys
import traceback
import warnings
import weakref

import pytest
import torch
from helpers import HAS_CUDA, assert_close, model_pair, tolerance_name
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastunet
from fastunet import FusedPathWarning, GraphCaptureError, graphs

NARROW = {"base_channels": 4, "depth": 2}
pytestmark = pytest.mark.usefixtures("triton_backend")


class _Graph:
    replays = 0

    def replay(self):
        _Graph.replays += 1


# Python-level reads of a tensor's values: on a GPU each copies to the host and waits. On CPU
# tensors some never reach the dispatcher (printing turns dispatch modes off, .cpu() and .tolist()
# read memory directly), so they are watched at the torch-function level too.
_HOST_READS = {
    "item", "tolist", "cpu", "numpy", "__array__", "__repr__", "__str__", "__format__", "__bool__",
    "__float__", "__int__", "__index__",
}  # fmt: skip


def _host_read(func, args, kwargs) -> str | None:
    """The name of the host read ``func`` is, or None. (``.to("cpu")`` is not among them: on CPU
    tensors it cannot be told from a move to the step's own device, which GradScaler makes.)"""
    name = getattr(func, "__name__", "")
    return name if name in _HOST_READS else None


class _CudaSyncError(TorchDispatchMode):
    """What ``torch.cuda.set_sync_debug_mode("error")`` does on a GPU, for CPU tensors: an op that
    synchronises the host fails with CUDA's message (``_PythonReadError`` does it for the reads
    that never reach the dispatcher on CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _SYNC_OPS:
            raise RuntimeError(f"called a synchronizing CUDA operation ({func})")
        return func(*args, **(kwargs or {}))


class _PythonReadError(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _host_read(func, args, kwargs):
            raise RuntimeError(f"called a synchronizing CUDA operation ({_host_read(func, args, kwargs)})")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-ins for the CUDA pieces the runner and the training step touch, so their logic runs
    on CPU tensors: a capture runs its body once (recording nothing), a replay runs nothing."""
    counts = {"captures": 0}
    sync_mode = {"mode": "default", "watch": None}

    def set_sync_debug_mode(mode):
        if sync_mode["watch"] is not None:
            sync_mode["watch"].close()
            sync_mode["watch"] = None
        if mode == "error":
            sync_mode["watch"] = contextlib.ExitStack()
            sync_mode["watch"].enter_context(_CudaSyncError())
            sync_mode["watch"].enter_context(_PythonReadError())
        sync_mode["mode"] = mode

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
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_sync_debug_mode)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: sync_mode["mode"])
    monkeypatch.setattr(graphs, "_check_cuda_tensor", lambda x: None)
    _Graph.replays = 0
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


# ------------------------------------------------------------------ the training step
aten = torch.ops.aten
# Ops that make the host wait for the device (read a value, or size an output by the values):
# item/bool/float/int/tolist/print of a tensor all end in _local_scalar_dense. lift_fresh is a
# tensor made from host data (torch.tensor(...)): on a GPU a synchronising copy, in a graph a
# copy of data the capture bakes in.
_SYNC_OPS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.equal, aten.masked_select,
    aten.unique_consecutive, aten._unique2, aten.lift_fresh,
}  # fmt: skip


def _narrow_train_model(dtype=torch.float64, **options):
    _, model = model_pair(3, 2, dtype=dtype, out_activation="none", **NARROW, **options)
    return model.train()


def _batches(n, dtype=torch.float64, size=8):
    return [(torch.randn(2, 3, size, size, dtype=dtype), torch.rand(2, 2, size, size, dtype=dtype)) for _ in range(n)]


def _eager_losses(model, loss_fn, optimizer, batches, scaler=None):
    """The training loop graph_train_step stands for, written the ordinary way."""
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.detach())
    return losses


def _state(model, optimizer):
    tensors = dict(model.state_dict())
    for i, state in enumerate(optimizer.state.values()):
        tensors.update({f"opt{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return tensors


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
    ids=["sgd", "adamw"],
)
def test_uncaptured_step_equals_eager_over_five_steps(make_opt):
    """``capture=False`` runs the step the graph captures: the same losses, weights, BatchNorm
    statistics and optimizer state as the eager loop, bit for bit, over 5 steps (float64, the
    fused path's composites)."""
    model = _narrow_train_model(dropout=0.2)  # the same seed draws the same masks
    twin = copy.deepcopy(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt, twin_opt = make_opt(model.parameters()), make_opt(twin.parameters())
    batches = _batches(5)
    step = fastunet.graph_train_step(model, loss_fn, opt, *batches[0], capture=False)
    torch.manual_seed(1)
    got = [step(x, y).clone() for x, y in batches]
    torch.manual_seed(1)
    expected = _eager_losses(twin, loss_fn, twin_opt, batches)
    assert [v.item() for v in got] == [v.item() for v in expected]
    a, b = _state(model, opt), _state(twin, twin_opt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights, BN and optimizer state"
    assert model.conv1.conv[1].num_batches_tracked.item() == twin.conv1.conv[1].num_batches_tracked.item()
    assert step.graph is None and step.captures == 0 and step.calls == 5


def test_uncaptured_step_with_a_grad_scaler_equals_eager():
    """The scaler's scale, its skip of a non-finite step and its update run as in the eager loop
    (CPU GradScaler, fused Adam: the combination a graph captures)."""
    model = _narrow_train_model(torch.float32)
    twin = copy.deepcopy(model)
    loss_fn = torch.nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    scaler, twin_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2))
    batches = _batches(5, torch.float32)
    batches[2] = (batches[2][0], torch.full_like(batches[2][1], float("inf")))  # this step is skipped
    fastunet.set_backend("eager")  # the fused kernels in the interpreter: minutes for 5 fp32 steps
    try:
        step = fastunet.graph_train_step(model, loss_fn, opt, *batches[0], scaler=scaler, capture=False)
        got = [step(x, y).clone() for x, y in batches]
        expected = _eager_losses(twin, loss_fn, twin_opt, batches, twin_scaler)
    finally:
        fastunet.set_backend("triton")
    assert [v.item() for v in got] == [v.item() for v in expected]
    assert scaler.get_scale() == twin_scaler.get_scale()
    a, b = _state(model, opt), _state(twin, twin_opt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _where() -> str:
    watcher = ("_where", "__torch_dispatch__", "__torch_function__")
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.name not in watcher][-2:]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames))


class _StepWatch(TorchDispatchMode):
    """Every aten op run while active: host synchronisations (with where they came from), the op
    sequence, and a weak reference to every tensor an op returns; with ``_PythonReads``, the reads
    that do not reach the dispatcher on CPU."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.ops: list[str] = []
        self.outputs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _SYNC_OPS:
            self.syncs.append(f"{func} at {_where()}")
        out = func(*args, **(kwargs or {}))
        self.ops.append(f"{func}")
        self.outputs.extend(weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


class _PythonReads(TorchFunctionMode):
    def __init__(self, syncs: list):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _host_read(func, args, kwargs):
            self.syncs.append(f"Tensor.{_host_read(func, args, kwargs)} at {_where()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _watching():
    with _StepWatch() as watch, _PythonReads(watch.syncs):
        yield watch


@pytest.fixture
def taped_under_watch(monkeypatch):
    """The training forward's path choice without the dispatch-mode test: with ``_StepWatch``
    active the step still runs the taped path that a capture records (the kernels' direct calls
    under one autograd node), not the per-op path a dispatch mode otherwise selects."""
    from fastunet.ops import op as op_module

    def direct_ok_mutation(x):
        return type(x) is torch.Tensor and not torch.compiler.is_compiling()

    def direct_ok(x):
        return not torch.is_grad_enabled() and direct_ok_mutation(x)

    for name, module in list(sys.modules.items()):
        if name.startswith("fastunet.ops"):
            for attr, fn in (("direct_ok", direct_ok), ("direct_ok_mutation", direct_ok_mutation)):
                if getattr(module, attr, None) is getattr(op_module, attr):
                    monkeypatch.setattr(module, attr, fn)


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize(
    "setup",
    [
        "sgd-fp32",
        "fused-adam-fp16-scaler",
        "sgd-fp32-dropout-bilinear",
        "sgd-fp32-nearest_conv",
    ],
)
def test_the_training_step_is_capture_safe(setup, taped_under_watch, fused_calls):
    """The step that ``graph_train_step`` captures, on the fused path as it runs for a GPU (a
    simulated H100: the GPU's configs, tuner and launchers, launches not run), watched op by op
    after one warm-up step: no host synchronisation, no tensor made from host data, the same ops
    in two consecutive steps (so no Python branch on anything that changes between steps), and no
    tensor allocated by a step alive after it but the parameters' gradients."""
    from fastunet.kernels import _common

    options = {"dropout": 0.1, "upsampling": "bilinear"} if "dropout" in setup else {}
    if "nearest_conv" in setup:
        options = {"upsampling": "nearest_conv"}
    model = _narrow_train_model(torch.float32, **options)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    scaler, autocast = None, None
    if "adam" in setup:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        scaler, autocast = torch.amp.GradScaler("cpu"), torch.float16
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batches(1, torch.float32, size=16)[0]
    with _common.simulate_gpu(_common.SimulatedGPU(record=False)) as gpu:
        step = fastunet.graph_train_step(model, loss_fn, opt, x, y, scaler=scaler, autocast=autocast, capture=False)
        step(x, y)  # the warm-up: tunes, creates the optimizer's and the scaler's state
        watches = []
        for _ in range(2):
            with _watching() as watch:
                loss = step(x, y)
            watches.append(watch)
            del loss
    assert gpu.sms == 132
    for watch in watches:
        assert watch.syncs == [], "host synchronisations in the step:\n" + "\n".join(watch.syncs)
    assert len(fused_calls) == 3, "the fused training path ran"
    assert watches[0].ops == watches[1].ops, "two steps ran different ops: a branch on something that changed"
    gc.collect()
    state = [*model.parameters(), *model.buffers(), x, y, step.static_x, step.static_y]
    state += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if scaler is not None:
        state += [scaler._scale, scaler._growth_tracker]
    owned = _storages(state)
    grads = _storages(p.grad for p in model.parameters())
    escaped = [t for ref in watches[1].outputs if (t := ref()) is not None]
    escaped = [t for t in escaped if t.untyped_storage().data_ptr() not in owned | grads]
    assert escaped == [], f"tensors made by the step outlive it: {[(tuple(t.shape), t.dtype) for t in escaped]}"
    new_grads = [ref() for ref in watches[1].outputs if ref() is not None]
    assert grads <= _storages(new_grads), "each step's backward allocates the gradients (captured: in the pool)"


def test_the_watch_sees_what_breaks_a_capture(taped_under_watch):
    """The watch is not blind: a loss that reads a value, and a model op made from host data,
    are caught."""
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]

    def loss_fn(out, target):
        loss = torch.nn.functional.mse_loss(out, target)
        if loss > 10:  # a Python branch on a value
            loss = loss + torch.tensor(0.0)
        print(f"loss {loss.item():.3f}", file=open("/dev/null", "w"))
        return loss

    step = fastunet.graph_train_step(model, loss_fn, opt, x, y, capture=False)
    step(x, y)
    with _watching() as watch:
        step(x, y)
    assert len(watch.syncs) >= 2 and all("test_graphs.py" in s for s in watch.syncs[:2]), watch.syncs


def test_training_step_warms_up_then_captures_once_and_replays(fake_cuda):
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(6)
    step = fastunet.graph_train_step(model, torch.nn.MSELoss(), opt, *batches[0], warmup=2)
    tracked = model.conv1.conv[1].num_batches_tracked.item()
    losses = [step(x, y) for x, y in batches[:2]]
    assert fake_cuda["captures"] == 0 and step.graph is None
    assert losses[0] is not losses[1], "warm-up calls are eager steps, each with its own loss"
    assert model.conv1.conv[1].num_batches_tracked.item() == tracked + 2, (
        "warm-up calls are training steps on the batches given"
    )
    grads_before = [p.grad for p in model.parameters()]
    loss = step(*batches[2])  # captures (the stand-in runs the body once) and replays
    assert fake_cuda["captures"] == 1 and _Graph.replays == 1 and loss is step.static_loss
    assert all(a is not b for a, b in zip(grads_before, (p.grad for p in model.parameters()), strict=True)), (
        "the capture's backward allocates new gradients (in the graph's pool)"
    )
    for x, y in batches[3:]:
        assert step(x, y) is loss
        assert torch.equal(step.static_x, x) and torch.equal(step.static_y, y), "copied in before the replay"
    assert fake_cuda["captures"] == 1 and _Graph.replays == 4 and step.captures == 1 and step.calls == 6


def test_training_step_refuses_another_batch_signature(fake_cuda):
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    step = fastunet.graph_train_step(model, torch.nn.MSELoss(), opt, x, y)
    with pytest.raises(ValueError, match=r"step\(x\): shape \[1, 3, 8, 8\] differs from the captured \[2, 3, 8, 8\]"):
        step(x[:1], y[:1])
    with pytest.raises(ValueError, match=r"step\(y\): dtype torch.float32 differs"):
        step(x, y.float())
    with pytest.raises(ValueError, match=r"step\(x\): on meta"):
        step(x.to("meta"), y)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        step(x.numpy(), y)
    assert step.calls == 0, "nothing ran"


def test_training_step_refuses_what_a_capture_cannot_hold(fake_cuda):
    model = _narrow_train_model()
    x, y = _batches(1)[0]
    loss_fn = torch.nn.MSELoss()
    with pytest.raises(GraphCaptureError, match="capturable=True"):
        fastunet.graph_train_step(model, loss_fn, torch.optim.AdamW(model.parameters()), x, y)
    fastunet.graph_train_step(model, loss_fn, torch.optim.AdamW(model.parameters(), capturable=True), x, y)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(GraphCaptureError, match="fused=True"):
        fastunet.graph_train_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), x, y, scaler=scaler)
    fused = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    fastunet.graph_train_step(model, loss_fn, fused, x, y, scaler=scaler)
    with pytest.raises(GraphCaptureError, match="closure"):
        fastunet.graph_train_step(model, loss_fn, torch.optim.LBFGS(model.parameters()), x, y)
    with pytest.raises(ValueError, match="warmup"):
        fastunet.graph_train_step(model, loss_fn, fused, x, y, warmup=0)
    with pytest.raises(ValueError, match="autocast"):
        fastunet.graph_train_step(model, loss_fn, fused, x, y, autocast=torch.float64)
    with pytest.raises(ValueError, match="one device"):
        fastunet.graph_train_step(model, loss_fn, fused, x, y.to("meta"))


def test_training_step_without_a_gpu_says_capture_false(monkeypatch):
    model = _narrow_train_model()
    x, y = _batches(1)[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="capture=False"):
        fastunet.graph_train_step(model, torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1), x, y)


@pytest.mark.parametrize("how", ["item", "print", "if", "cpu"])
def test_a_loss_that_syncs_is_a_clear_error_before_the_capture(fake_cuda, how):
    """From the second warm-up call on, the step runs with host syncs as errors (mocked here as CUDA
    does it): a loss that reads a value fails there, in one line, not in the capture."""
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(out, target):
        loss = torch.nn.functional.mse_loss(out, target)
        if how == "item":
            loss.item()
        elif how == "print":
            str(loss)
        elif how == "if" and loss > 1e9:
            loss = loss * 0
        elif how == "cpu":
            loss = loss.cpu().tolist() and loss
        return loss

    batches = _batches(2)
    step = fastunet.graph_train_step(model, loss_fn, opt, *batches[0])
    step(*batches[0])  # the first warm-up call is not checked (it tunes, which times on the host)
    with pytest.raises(GraphCaptureError, match="synchronises with the host") as err:
        step(*batches[1])
    assert "\n" not in str(err.value)
    assert torch.cuda.get_sync_debug_mode() == "default", "the debug mode is put back"
    assert fake_cuda["captures"] == 0


def test_a_failed_capture_is_a_clear_error(fake_cuda, monkeypatch):
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]

    @contextlib.contextmanager
    def failing_graph(g):
        yield
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    step = fastunet.graph_train_step(model, torch.nn.MSELoss(), opt, x, y, warmup=1)
    step(x, y)
    with pytest.raises(GraphCaptureError, match=r"capturing the training step failed \(RuntimeError: CUDA error"):
        step(x, y)
    assert step.graph is None


def test_a_changed_hyperparameter_or_mode_is_refused_until_reset(fake_cuda):
    model = _narrow_train_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    step = fastunet.graph_train_step(model, torch.nn.MSELoss(), opt, x, y, warmup=1)
    step(x, y)
    step(x, y)
    opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(GraphCaptureError, match="param group 0's lr changed from 0.1 to 0.01"):
        step(x, y)
    step.reset()
    step(x, y)
    assert fake_cuda["captures"] == 2
    model.eval()
    with pytest.raises(GraphCaptureError, match="switched to eval mode"):
        step(x, y)


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


def _gpu_train_setup(kind: str):
    """(model, optimizer, scaler, autocast) for one of the captured configurations."""
    _, model = model_pair(3, 1, dtype=torch.float32, device="cuda", out_activation="none", base_channels=8)
    model.train()
    if kind == "fp32-sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None, None
    if kind == "bf16-adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True), None, torch.bfloat16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    return model, opt, torch.amp.GradScaler("cuda", init_scale=2.0**12), torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fp32-sgd", "bf16-adamw", "fp16-fused-adamw-scaler"])
def test_captured_training_equals_the_uncaptured_step_on_gpu(kind):
    """Six steps (3 warm-up, the capture, 2 replays) of the graph against the same step without a
    graph from the same start: the same losses, weights, BatchNorm statistics and scale."""
    runs = []
    batches = [(torch.randn(2, 3, 64, 64, device="cuda"), torch.rand(2, 1, 64, 64, device="cuda")) for _ in range(6)]
    for capture in (True, False):
        torch.manual_seed(0)
        model, opt, scaler, autocast = _gpu_train_setup(kind)
        step = fastunet.graph_train_step(
            model, torch.nn.BCEWithLogitsLoss(), opt, *batches[0], scaler=scaler, autocast=autocast, capture=capture
        )
        losses = [step(x, y).clone() for x, y in batches]
        runs.append((losses, model.state_dict(), scaler.get_scale() if scaler else None, step.captures))
    (graphed, g_state, g_scale, captures), (eager, e_state, e_scale, _) = runs
    assert captures == 1
    tol = tolerance_name(torch.float32) if kind == "fp32-sgd" else ("bf16" if kind.startswith("bf16") else "fp16")
    for a, b in zip(graphed, eager, strict=True):
        assert_close(a, b, tol, "loss", scale=1.0)
    for name in e_state:
        if e_state[name].is_floating_point():
            assert_close(g_state[name], e_state[name], tol, name)
        else:
            assert torch.equal(g_state[name], e_state[name]), name
    assert g_scale == e_scale


@pytest.mark.cuda
def test_a_loss_that_syncs_is_refused_on_gpu():
    model, opt, _, _ = _gpu_train_setup("fp32-sgd")
    x, y = torch.randn(1, 3, 32, 32, device="cuda"), torch.rand(1, 1, 32, 32, device="cuda")

    def loss_fn(out, target):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, target)
        print(f"loss {loss.item():.3f}")
        return loss

    step = fastunet.graph_train_step(model, loss_fn, opt, x, y)
    step(x, y)
    with pytest.raises(GraphCaptureError, match="synchronises with the host"):
        step(x, y)
    assert torch.cuda.get_sync_debug_mode() == 0


def test_the_training_guide_example_runs(tmp_path):
    """docs/training.md's graph_train_step example as a user runs it on a CPU (capture=False, the
    module tree on the "auto" backend)."""
    from test_readme import doc_blocks, run_block

    (block,) = doc_blocks("graph-train")
    fastunet.set_backend("auto")  # the triton_backend fixture puts the forced backend back after
    ns, out = run_block(block, tmp_path)
    step = ns["step"]
    assert re.fullmatch(r"loss \d+\.\d{3}\n", out)
    assert step.calls == 6 and step.graph is None and not step.capture
    assert step.static_loss is None and torch.isfinite(ns["loss"])
    assert all(p.grad is not None for p in ns["model"].parameters()), "a training step ran"


@pytest.mark.slow
def test_reduce_overhead_compile_trains_like_eager():
    """``torch.compile(model, mode="reduce-overhead")`` in training: the fused training forward is one
    graph without breaks (the ops are opaque with fake implementations), and two SGD steps give
    eager's losses, weights and BatchNorm buffers (on CPU inductor makes no CUDA graphs; the
    compiled forward and backward must still be right)."""
    torch._dynamo.reset()
    model = _narrow_train_model()
    twin = copy.deepcopy(model)
    explained = torch._dynamo.explain(copy.deepcopy(model))(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, mode="reduce-overhead")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(2)
    got = _eager_losses(compiled, loss_fn, opt, batches)
    expected = _eager_losses(twin, loss_fn, twin_opt, batches)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, "fp64", "loss", scale=1.0)
    a, b = model.state_dict(), twin.state_dict()
    for name in a:
        if a[name].is_floating_point():
            assert_close(a[name], b[name], "fp64", name, scale=1.0)
        else:  # num_batches_tracked
            assert torch.equal(a[name], b[name]), name
