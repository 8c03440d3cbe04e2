"""CUDA-graph replay of a model's inference forward: the small-batch path.

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

Only inference: the model must be in eval mode (a training forward updates BatchNorm running
statistics and needs autograd, which a replay would skip) and runs under ``torch.no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["CudaGraphRunner"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    weights: object  # what the graph read: a UNet's inference weights, else a signature
    keepalive: list = field(default_factory=list)


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
        if x.device.type != "cuda":
            raise ValueError(f"CUDA-graph replay needs a CUDA input, got one on {x.device}")

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
