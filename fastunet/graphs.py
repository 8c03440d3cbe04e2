"""CUDA-graph replay: a model's inference forward (``CudaGraphRunner``) and a whole training step
(``graph_train_step``), the small-batch paths.

At batch 1-4 a U-Net forward is a few milliseconds of GPU work launched by 26 kernels; the
host time to launch them is then a real part of the latency. A CUDA graph records the launches
once and replays them with one call. ``CudaGraphRunner`` (``UNet.cuda_graph(example)``) does
that per input signature:

* one graph per (shape, dtype, strides, autocast state) of the input, captured on first sight
  and replayed after; each has its own static input and output buffers;
* before a capture the forward runs on a side stream (the CUDA-graphs recipe): Triton compiles
  and tunes there, weights are packed there, so the capture itself only records launches (a
  kernel met for the first time inside a capture could not be timed);
* ``runner(x)`` copies ``x`` into the static input, replays, and returns the static output:
  the same tensor every call of that signature, overwritten by the next replay (``.clone()``
  it to keep it);
* a graph reads the weights as they were packed at capture, so before a replay the runner
  asks whether they still are: for a ``fastunet.UNet``, whether its inference weights (packed
  weights, folded BatchNorm; rebuilt when any parameter or buffer changes: an optimizer step,
  ``load_state_dict``, ``.to()``) are the ones the graph captured, a check of about 50 us that
  also runs the module guard; for any other model, every parameter and buffer's identity,
  storage and version. Changed weights mean a new capture: replay never runs stale weights;
* a ``UNet`` that would not take the fused inference path for the input (a hook or a swapped
  module: see ``fastunet.guard``) is not captured: the call runs ``model(x)`` as is, eager, with
  the guard's warning.

``CudaGraphRunner`` is for inference only: the model must be in eval mode (a training forward
updates BatchNorm running statistics and needs autograd, which a replay of the forward alone would
skip) and runs under ``torch.no_grad``. For training, ``graph_train_step`` captures forward, loss,
backward and the optimizer step together (see ``TrainStep``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["CudaGraphRunner", "GraphCaptureError", "TrainStep", "graph_train_step"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    weights: object  # what the graph read: a UNet's inference weights, else a signature
    keepalive: list = field(default_factory=list)


def _check_cuda_tensor(x: Tensor) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"CUDA-graph replay needs a CUDA input, got one on {x.device}")


def _signature(model: nn.Module) -> tuple:
    """Identity, storage and version of every parameter and buffer: equal iff a graph captured
    under the old one still reads the current weights (for models other than ``UNet``)."""
    return tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in (*model.parameters(), *model.buffers()))


class CudaGraphRunner:
    """Replays CUDA graphs of ``model``'s inference forward (see the module docstring).

    model:   an ``nn.Module`` in eval mode whose parameters are on one CUDA device (normally a
             ``fastunet.UNet``, whose fused path is what gets captured).
    example: optional input ``[N, C, H, W]`` on that device: captured right away, so the first
             call does not pay for it.
    warmup:  forwards on a side stream before each capture (>= 1; they compile and tune).

    Call it with an input tensor; it returns the model's output for it in a static buffer.
    Autocast is honoured: a call under ``torch.autocast("cuda", dtype=...)`` replays (or
    captures) the graph of that autocast state.
    """

    def __init__(self, model: nn.Module, example: Tensor | None = None, *, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need an NVIDIA GPU (torch.cuda.is_available() is False)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.model = model
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}
        self.captures = 0
        if example is not None:
            self.capture(example)

    # ----------------------------------------------------------------------------- public
    def __call__(self, x: Tensor) -> Tensor:
        entry = self._entry(x)
        if entry is None:  # not the fused inference path: nothing to replay
            with torch.no_grad():
                return self.model(x)
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out

    def capture(self, x: Tensor) -> Tensor:
        """Capture (or re-use) the graph for ``x``'s signature without replaying; returns its
        static output buffer (holding the warm-up's result for ``x``). Raises ``RuntimeError``
        when the model would not take the fused inference path for ``x``."""
        entry = self._entry(x)
        if entry is None:
            raise RuntimeError(
                "this model does not take the fused inference path for this input (see the FusedPathWarning "
                "of model(x)): there is no fused forward to capture"
            )
        return entry.static_out

    def reset(self) -> None:
        """Drop every captured graph (they are captured again on the next call)."""
        self._graphs.clear()

    def __len__(self) -> int:
        """How many graphs are held (one per input signature seen)."""
        return len(self._graphs)

    # ----------------------------------------------------------------------------- internals
    def _key(self, x: Tensor) -> tuple:
        autocast = torch.is_autocast_enabled("cuda")
        return (
            tuple(x.shape),
            x.stride(),
            x.dtype,
            x.device,
            autocast,
            torch.get_autocast_dtype("cuda") if autocast else None,
        )

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        self._check_device(x)
        if self.model.training:
            raise RuntimeError(
                "CUDA-graph replay is for inference: call model.eval() first (a training forward updates "
                "BatchNorm statistics and needs autograd, which a replayed graph would skip)"
            )

    @staticmethod
    def _check_device(x: Tensor) -> None:
        _check_cuda_tensor(x)

    def _weights(self, x: Tensor):
        """What a graph for ``x`` reads now (None: no fused inference forward for ``x``), under
        ``no_grad`` as the replay runs (with grad on, a UNet prepares differentiable weights per call)."""
        weights_of = getattr(self.model, "_inference_weights", None)
        with torch.no_grad():
            return weights_of(x) if weights_of is not None else _signature(self.model)

    def _entry(self, x: Tensor) -> _Captured | None:
        self._check(x)
        weights = self._weights(x)
        if weights is None:
            return None
        key = self._key(x)
        entry = self._graphs.get(key)
        if entry is None or not (entry.weights is weights or entry.weights == weights):
            entry = self._graphs[key] = self._capture(x)
        return entry

    def _capture(self, x: Tensor) -> _Captured:
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        self.captures += 1
        # The weights hold every tensor made outside the capture and read by it (packed weights,
        # folded BatchNorm): kept here, they outlive the graph even when the model replaces them.
        return _Captured(graph, static_in, static_out, self._weights(x))


# ================================================================================ training
class GraphCaptureError(RuntimeError):
    """A training step that a CUDA graph cannot capture, or a replay that would not do what an
    eager step does (a step that synchronises with the host, an optimizer or ``GradScaler`` that
    decides on the host, changed hyperparameters): the message says which and what to do."""


def graph_train_step(model, loss_fn, optimizer, example_x, example_y, **options) -> TrainStep:
    """A ``TrainStep``: forward, loss, backward and optimizer step of ``model`` as one CUDA graph,
    replayed by ``step(x, y)``. ``options``: ``scaler``, ``autocast``, ``warmup``, ``capture`` (see
    ``TrainStep`` for them and the rules)."""
    return TrainStep(model, loss_fn, optimizer, example_x, example_y, **options)


class TrainStep:
    """One training step (forward, loss, backward, optimizer step, and with a ``GradScaler`` its
    scale, step and update) captured as a CUDA graph and replayed per batch.

    model:     the ``nn.Module`` to train (normally a ``fastunet.UNet`` in train mode, whose fused
               training path is what gets captured; any module whose step a graph can capture works).
    loss_fn:   ``loss_fn(model(x), y)`` -> a one-element loss tensor. It must stay on the device:
               no ``.item()``, ``.cpu()``, ``print`` or ``if`` on a tensor (they synchronise with the
               host, which a capture refuses: ``GraphCaptureError``).
    optimizer: a ``torch.optim`` optimizer over the model's parameters. One with a ``capturable``
               option (Adam, AdamW, ...) needs ``capturable=True``; SGD needs nothing. Its
               hyperparameters (``lr``, ...) are baked into the graph: a replay refuses to run after
               one changed (``GraphCaptureError``); for a schedule pass ``lr`` as a CUDA tensor
               and update it in place, or ``reset()`` and capture again.
    example_x, example_y: a batch ``[N, C, H, W]`` and its target on the model's device: they fix
               the shapes, dtypes and device of the static buffers every ``step(x, y)`` copies into
               (another shape needs another ``TrainStep``: a graph replays fixed shapes).
    scaler:    a ``torch.amp.GradScaler`` for fp16 autocast, or None. In a graph the skipped step of
               an inf/NaN gradient must be decided on the device: that takes an optimizer that reads
               the scaler's ``found_inf`` itself, torch's fused ones (``Adam``/``AdamW``/``SGD``
               with ``fused=True``; Adam/AdamW also ``capturable=True``); any other one makes
               ``GradScaler.step`` call ``.item()``, refused with ``GraphCaptureError``. The scale
               and its growth tracker are updated on the device, in place, by each replay.
    autocast:  ``torch.float16`` or ``torch.bfloat16``: forward and loss run under
               ``torch.autocast`` of that dtype (cache off, as a capture needs); None: no autocast.
    warmup:    how many of the first calls run eagerly on a side stream before the capture (>= 1;
               torch's recipe: they compile and tune the kernels and let the optimizer and scaler
               create their state, so the capture only records launches). From the second on they
               run with ``torch.cuda.set_sync_debug_mode("error")``: a step that synchronises with
               the host fails there with a ``GraphCaptureError`` naming the cause, not in the capture.
    capture:   False runs the same step without a graph on every call (any device; for debugging
               and comparison); True needs a CUDA model and batch.

    ``step(x, y)`` copies ``x`` and ``y`` into the static buffers and runs the step: the first
    ``warmup`` calls eagerly, the next one captures and replays, every later one replays. It
    returns the loss (detached): after the capture the same tensor every call, overwritten by the
    next replay (``.clone()`` it to keep it; reading it with ``.item()`` synchronises, so do that
    every few steps rather than every step). The warm-up calls are ordinary training steps on
    the batches given, so no step is wasted. BatchNorm running statistics (fastunet's kernels,
    or ``nn.BatchNorm2d`` with a float momentum), the optimizer's state and the scaler's scale
    are all updated on the device by every replay. The parameters' ``.grad`` after a replay hold
    that step's gradients (static tensors, as in torch's recipe: the step sets them to None and
    its backward allocates them inside the graph's memory pool). Dropout draws new masks each
    replay (torch's generator advances its offset per replay).

    ``step.graph`` is None until the capture; ``captures`` counts them; ``reset()`` drops the graph
    so the next call captures again (after changing a hyperparameter, or the model's train/eval mode).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        example_x: Tensor,
        example_y: Tensor,
        *,
        scaler=None,
        autocast: torch.dtype | None = None,
        warmup: int = 3,
        capture: bool = True,
    ):
        _check_train_setup(model, loss_fn, optimizer, example_x, example_y, autocast, warmup)
        if scaler is not None and not scaler.is_enabled():
            scaler = None  # a disabled GradScaler is the identity: nothing to capture
        if capture:
            _check_capturable(optimizer, scaler, example_x)
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, scaler
        self.autocast, self.warmup, self.capture = autocast, warmup, capture
        self.static_x = _static_like(example_x)
        self.static_y = _static_like(example_y)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: Tensor | None = None
        self.captures = 0
        self.calls = 0
        self._grads: list = []
        self._captured_state: tuple = ()

    # ----------------------------------------------------------------------------- public
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        _check_batch("x", x, self.static_x)
        _check_batch("y", y, self.static_y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.calls += 1
        if self.graph is None:
            if not self.capture:
                return self._step()
            if self.calls <= self.warmup:
                return self._warm_step(check_syncs=self.calls > 1)
            self._capture()
        else:
            self._check_unchanged()
        self.graph.replay()
        return self.static_loss

    def reset(self) -> None:
        """Drop the graph: the next call captures again (no new warm-up)."""
        self.graph, self.static_loss, self._grads, self._captured_state = None, None, [], ()

    # ----------------------------------------------------------------------------- internals
    def _step(self) -> Tensor:
        """The step itself, as captured: what ``capture=False`` runs on every call."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast_context():
            loss = self.loss_fn(self.model(self.static_x), self.static_y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a one-element tensor, got {_describe(loss)}")
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

    def _autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        # The autocast weight cache would keep casts made inside the capture: off, as torch's
        # graph documentation asks.
        return torch.autocast(self.static_x.device.type, dtype=self.autocast, cache_enabled=False)

    def _warm_step(self, check_syncs: bool) -> Tensor:
        device = self.static_x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _host_syncs_fail(check_syncs):
            loss = self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        return loss

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = self._step()
        except GraphCaptureError:
            raise
        except Exception as err:
            raise GraphCaptureError(
                f"capturing the training step failed ({type(err).__name__}: {_first_line(err)}); run it with "
                "capture=False to see whether it works without a graph"
            ) from err
        self.graph, self.static_loss = graph, loss
        # The gradients live in the graph's pool and are rewritten by every replay: held here so
        # that a zero_grad(set_to_none=True) between replays cannot hand their memory back.
        self._grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        self._captured_state = _replay_state(self.model, self.optimizer)
        self.captures += 1

    def _check_unchanged(self) -> None:
        now = _replay_state(self.model, self.optimizer)
        if now != self._captured_state:
            raise GraphCaptureError(
                f"{_state_change(self._captured_state, now)} since the capture, and a replay runs the step as "
                "captured: call reset() to capture again (for an lr schedule, pass lr as a CUDA tensor "
                "to a capturable optimizer and change it in place)"
            )


def _check_train_setup(model, loss_fn, optimizer, x, y, autocast, warmup) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for name, t in (("example_x", x), ("example_y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
    if autocast not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast!r}")
    params = list(model.parameters())
    if params and (params[0].device != x.device or y.device != x.device):
        raise ValueError(
            f"model, example_x and example_y must be on one device, got {params[0].device}, {x.device} and {y.device}"
        )
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise GraphCaptureError(
            f"{type(optimizer).__name__}.step needs a closure (it evaluates the loss several times): "
            "a training step of one forward and one backward cannot run it"
        )


def _check_capturable(optimizer, scaler, x: Tensor) -> None:
    """What a capture refuses, said before any step runs."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA graphs need an NVIDIA GPU (torch.cuda.is_available() is False): pass capture=False "
            "to run the same step without a graph"
        )
    _check_cuda_tensor(x)
    name = type(optimizer).__name__
    if any(group.get("capturable") is False for group in optimizer.param_groups):
        raise GraphCaptureError(
            f"{name} was built with capturable=False, which keeps its step count on the host: build it "
            f"with capturable=True (e.g. torch.optim.{name}(params, lr=..., capturable=True)) to capture its step"
        )
    if scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise GraphCaptureError(
            f"GradScaler.step skips an inf/NaN step with .item() unless the optimizer reads found_inf on the "
            f"device, which {name} does not: use a fused optimizer (torch.optim.Adam/AdamW/SGD with fused=True, "
            "and capturable=True for Adam/AdamW), or bf16 autocast without a scaler"
        )


def _static_like(t: Tensor) -> Tensor:
    static = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    static.copy_(t)
    return static


def _check_batch(name: str, t: Tensor, static: Tensor) -> None:
    """One line naming what differs from the static buffer, before anything is copied."""
    if not isinstance(t, Tensor):
        raise TypeError(f"step({name}): expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != static.shape:
        raise ValueError(
            f"step({name}): shape {list(t.shape)} differs from the captured {list(static.shape)} (a graph replays "
            "fixed shapes: build another graph_train_step for this shape)"
        )
    if t.dtype != static.dtype:
        raise ValueError(f"step({name}): dtype {t.dtype} differs from the captured {static.dtype}")
    if t.device != static.device:
        raise ValueError(f"step({name}): on {t.device}, but the step's buffers are on {static.device}")


def _replay_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """What a replay keeps as it was at the capture: the model's train/eval mode and each param
    group's non-tensor hyperparameters and parameter count."""
    groups = tuple(
        (len(g["params"]), tuple((k, v) for k, v in g.items() if k != "params" and not isinstance(v, Tensor)))
        for g in optimizer.param_groups
    )
    return model.training, groups


def _state_change(before: tuple, now: tuple) -> str:
    if before[0] != now[0]:
        return f"the model was switched to {'train' if now[0] else 'eval'} mode"
    if len(before[1]) != len(now[1]):
        return f"the optimizer has {len(now[1])} param groups instead of {len(before[1])}"
    for i, ((n0, h0), (n1, h1)) in enumerate(zip(before[1], now[1], strict=True)):
        if n0 != n1:
            return f"param group {i} has {n1} parameters instead of {n0}"
        old, new = dict(h0), dict(h1)
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                return f"param group {i}'s {key} changed from {old.get(key)!r} to {new.get(key)!r}"
    return "the optimizer changed"


@contextlib.contextmanager
def _host_syncs_fail(enabled: bool):
    """While active, a host synchronisation fails (``torch.cuda.set_sync_debug_mode("error")``) and
    is reported as the ``GraphCaptureError`` it would become in a capture."""
    if not enabled:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        raise GraphCaptureError(
            "the training step synchronises with the host (a .item(), .cpu(), print, float() or if on a tensor, in "
            "the loss or elsewhere in the step), which a CUDA graph cannot capture: keep the step on the device "
            "and read the returned loss after step()"
        ) from err
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
