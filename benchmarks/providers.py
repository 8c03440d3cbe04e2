"""The providers timed side by side, the inputs and weights they share, and the float64 check.

A *case* is one (mode, batch, image size, dtype) point. For a case every provider builds its
own model from the same ``state_dict`` and runs on the same pre-generated input batches; its
output on the first batch is compared with a float64 forward of the reference model on the
same device and input before anything is timed (``bench_provider``).

Providers (``PROVIDERS``, in table order). Each row's ``layout`` field records the memory
format of the weights and of the input its step actually received (read off the tensors, not
claimed), so a mismatch cannot hide:

=============================== ============================================================
``eager_fp32_nchw``             reference eager model, fp32, NCHW weights and NCHW input
                                (TF32 convs on CUDA when ``torch.backends.cudnn.allow_tf32``,
                                PyTorch's default): what the classic model does out of the
                                box, and the baseline of the CPU target
``eager_cl``                    reference eager model, channels_last weights *and* input,
                                fp32 in fp32 cases, under ``torch.autocast`` in 16-bit cases:
                                the baseline of the GPU targets ("eager channels_last AMP")
``compile_default``             ``torch.compile(reference)``, channels_last weights and input,
                                autocast in 16-bit cases
``compile_max_autotune``        ``torch.compile(reference, mode="max-autotune")``
``compile_max_autotune_freezing`` the same with ``torch._inductor.config.freezing = True``
                                around the compile (inference only)
``fastunet``                    ``fastunet.UNet`` loaded with the shared weights and put in
                                ``eval()``/``train()``, nothing else: the model picks its own
                                internal layout. The ``"auto"`` backend runs the Triton kernels
                                on CUDA and the eager CPU fallback on CPU
``fastunet_compile``            ``torch.compile(fastunet.UNet)``
``fastunet_cudagraph``          fastunet's CUDA-graph path, ``UNet.cuda_graph`` (captured
                                after warm-up, replayed with a static input; inference, CUDA)
``fastunet_fast``               the CPU fallback with ``fastunet.set_cpu_fast_math(True)``
                                (Winograd: NNPACK's or fastunet's own per layer; fp32 inference, CPU)
``onnxruntime``                 ONNX Runtime's CPU execution provider on the reference model
                                exported by ``fastunet.export_onnx`` (static shapes, fp32; all
                                graph optimizations, ``intra_op_num_threads`` = torch's threads,
                                sequential execution; inference, CPU)
``openvino``                    OpenVINO's CPU plugin on the same ONNX file: fp32 cases with
                                ``INFERENCE_PRECISION_HINT=f32``, 16-bit cases with its *default*
                                precision (bf16 on a CPU with AVX-512 BF16 or AMX, f32 without:
                                the row's ``precision`` and label say which it ran); latency hint,
                                one stream, ``INFERENCE_NUM_THREADS`` = torch's threads
=============================== ============================================================

The two peers are optional (``pip install 'fastunet[cpu-peers]'``): a missing package skips its
row with one line saying so.

Every provider builds the same architecture: ``ModelConfig.preset`` (``run.py --preset``) is the
classic model by default, or a named option set of ``fastunet.PRESETS`` (keras, milesial,
milesial-bilinear), passed to ``UNetReference`` and ``fastunet.UNet`` alike.

Inputs are fp32 (as a data loader delivers them), converted to the provider's layout once,
outside the timed region. ``eager_fp32_nchw`` takes NCHW, the reference-model rows that
convert their weights to channels_last take channels_last. The fastunet rows take the same
input as the baseline they are judged against: NCHW on CPU (``eager_fp32_nchw``, the CPU
target's baseline: a user's tensor, as it comes), channels_last on CUDA (``eager_cl``, the GPU
targets' baseline). Casting to the 16-bit dtype happens inside the timed step (autocast, or
fastunet's own entrance cast), the same for all. A training step is ``zero_grad`` + forward +
a linear loss + backward + an optimizer step (SGD with momentum, ``lr=0``: the update does
all its arithmetic, but every provider keeps the shared weights, so the correctness check
after warm-up still compares like with like).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import math
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flops import TRAINING_FLOP_FACTOR, step_flops
from timing import minor_faults, summarize, synchronize, time_steps

import fastunet
from fastunet.backend import triton_available, use_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Output check: max|y - y64| / max|y64| over the whole network output (sigmoid, in (0, 1)).
# Measured on calibrated random weights: IEEE fp32 ~1e-6, fp16 autocast ~1.5e-3, bf16 autocast
# ~1e-2 (23 layers of 8-bit mantissa rounding). The bounds leave a 4-10x margin over that; a
# real bug (a wrong tap, a missing BatchNorm, an unwritten tile) is off by O(1).
OUTPUT_TOL = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
# Training adds a gradient check: ||g - g64|| / ||g64|| over all parameter gradients. Train-mode
# BatchNorm makes gradients much less well conditioned than the output (measured: fp32 ~5e-3,
# fp16 ~0.11, bf16 ~0.32 for eager autocast itself), so these bounds only catch gross errors
# (zero, missing or wrong-direction gradients); the output check above stays the tight one.
GRAD_TOL = {"fp32": 5e-2, "tf32": 0.5, "fp16": 0.5, "bf16": 0.8}


def compute_precision(dtype_name: str, device: torch.device) -> str:
    """The arithmetic a provider computing in ``dtype_name`` really does: fp32 convs on CUDA run
    in TF32 when cuDNN allows it (the default), and fastunet follows the same switch."""
    if dtype_name == "fp32":
        return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    return dtype_name


@dataclass(frozen=True)
class ModelConfig:
    """The benchmarked architecture. ``preset``: a key of ``fastunet.PRESETS`` (``"classic"``:
    the classic model, built without a preset as before); ``dropout``: None keeps the preset's,
    a number overrides it (training runs of a preset with dropout set 0: a random mask per
    provider would fail the float64 check)."""

    in_ch: int = 3
    out_ch: int = 1
    base_channels: int = 64
    depth: int = 4
    out_activation: str = "sigmoid"
    preset: str = "classic"
    dropout: float | None = None
    #: options over the preset's, as (name, value) pairs: a checkpoint's own (run.py --weights)
    extra: tuple = ()

    def options(self) -> dict:
        options = {
            "base_channels": self.base_channels,
            "depth": self.depth,
            "out_activation": self.out_activation,
        }
        if self.preset != "classic":
            options["preset"] = self.preset
        options.update(self.extra)
        if self.dropout is not None:
            options["dropout"] = self.dropout
        return options

    @property
    def classic(self) -> bool:
        """The classic architecture (what the per-layer table and the targets are about)."""
        return self.preset == "classic" and not self.extra

    def architecture(self) -> dict:
        """Every option the models are built with (the preset's, then this config's)."""
        options = {**fastunet.PRESETS[self.preset], **self.options()}
        options.pop("preset", None)
        return options

    def flop_config(self) -> dict:
        return {
            "in_ch": self.in_ch,
            "out_ch": self.out_ch,
            "base_channels": self.base_channels,
            "depth": self.depth,
        }


@dataclass
class Case:
    """One benchmark point and everything its providers share.

    ``inputs_nchw``/``inputs_cl``: ``n_inputs`` fp32 batches ``[batch, in_ch, size, size]``
    (same values, two layouts). ``ref_out``: float64 ``[batch, out_ch, size, size]``, the
    reference forward on ``inputs_nchw[0]``. Training only: ``grad_probe`` (fp32, output
    shape) defines the loss ``sum(y * grad_probe)``, and ``ref_grads`` are the float64 gradients
    of that loss for every parameter, in ``model.parameters()`` order.
    """

    mode: str
    batch: int
    size: int
    dtype_name: str
    device: torch.device
    model: ModelConfig
    state_dict: dict
    inputs_nchw: list[torch.Tensor]
    inputs_cl: list[torch.Tensor]
    ref_out: torch.Tensor
    ref_grads: list[torch.Tensor] | None = None
    grad_probe: torch.Tensor | None = None
    #: what providers of this case share and build lazily (the ONNX file of the CPU peers)
    scratch: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def training(self) -> bool:
        return self.mode == "training"


def model_step_flops(cfg: ModelConfig, mode: str, batch: int, size: int) -> int:
    """FLOPs of one timed step of ``cfg``'s model: ``flops.step_flops`` for the classic model; for
    a preset, ``torch.utils.flop_counter`` over a forward of the reference model on the meta
    device (the same convention: 2 x MACs of the convolutions only, so the nearest_conv preset's
    2x2 convs on the upsampled map count and bilinear upsampling does not)."""
    if cfg.classic:
        return step_flops(mode, **cfg.flop_config(), batch=batch, height=size)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = fastunet.UNetReference(cfg.in_ch, cfg.out_ch, **cfg.options()).eval()
        x = torch.empty(batch, cfg.in_ch, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    factor = TRAINING_FLOP_FACTOR if mode == "training" else 1
    return factor * counter.get_total_flops()


# --------------------------------------------------------------------------- shared weights
def _batchnorms(model: torch.nn.Module) -> Iterator[torch.nn.BatchNorm2d]:
    return (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def make_state_dict(cfg: ModelConfig, device: torch.device, seed: int) -> dict:
    """Weights every provider loads: default init, then BatchNorm made to matter.

    With default init and identity running statistics the signal fades through 18 convs and
    the output is a near-constant sigmoid(bias), which would hide a wrong kernel. So the
    running statistics are calibrated on one random batch (every BN then really normalizes
    and every layer shapes the output) and the affine parameters are perturbed (so folding BN
    into scale/shift is exercised). Returned on CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fastunet.UNetReference(cfg.in_ch, cfg.out_ch, **cfg.options())
        gen = torch.Generator().manual_seed(seed + 1)
        calib = max(64, 4 * 2**cfg.depth)
        x = torch.randn(4, cfg.in_ch, calib, calib, generator=gen)
        for bn in _batchnorms(model):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        model.to(device).train()
        with torch.no_grad():
            model(x.to(device))
            for bn in _batchnorms(model):
                bn.momentum = 0.1
                bn.weight.mul_(1 + 0.1 * torch.randn(bn.weight.shape, generator=gen).to(device))
                bn.bias.add_(0.1 * torch.randn(bn.bias.shape, generator=gen).to(device))
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def checkpoint_config(path, preset: str | None = None) -> tuple[ModelConfig, dict]:
    """The architecture and weights of the checkpoint at ``path`` (any format ``fastunet.load``
    reads), for every provider: the config (its preset, and its options beyond the preset's in
    ``extra``) and its state_dict in float32 (each provider casts as its label says; BatchNorm
    statistics as saved)."""
    model = fastunet.load(path, preset=preset)
    name = model.preset or "classic"
    options = model.options
    base = fastunet.PRESETS[name]
    fields = ("base_channels", "depth", "out_activation")
    extra = tuple((k, v) for k, v in options.items() if k not in fields and base.get(k) != v)
    cfg = ModelConfig(model.in_ch, model.out_ch, options["base_channels"], options["depth"],
                      out_activation=options["out_activation"], preset=name, extra=extra)  # fmt: skip
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    return cfg, state


def _load(model_cls: type, cfg: ModelConfig, state_dict: dict, device, mode: str) -> torch.nn.Module:
    model = model_cls(cfg.in_ch, cfg.out_ch, **cfg.options())
    model.load_state_dict(state_dict, strict=True)
    model.to(device)
    if mode == "training":
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)  # inference: parameters are constants (freezing needs it)
    return model


def make_case(
    cfg: ModelConfig,
    state_dict: dict,
    *,
    mode: str,
    batch: int,
    size: int,
    dtype_name: str,
    device: torch.device,
    n_inputs: int,
    seed: int,
) -> Case:
    """Generate the inputs and compute the float64 reference (output, and gradients in training)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_ch, size, size)
    inputs_nchw = [torch.randn(shape, generator=gen).to(device) for _ in range(n_inputs)]
    inputs_cl = [x.contiguous(memory_format=torch.channels_last) for x in inputs_nchw]
    probe = None
    if mode == "training":
        out_shape = (batch, cfg.out_ch, size, size)
        # Unit-variance probe scaled by 1/sqrt(numel): gradients stay O(1) per element, far from
        # fp16 overflow and underflow (there is no GradScaler in a timed step).
        numel = math.prod(out_shape)
        probe = (torch.randn(out_shape, generator=gen) / math.sqrt(numel)).to(device)
    ref = _load(fastunet.UNetReference, cfg, state_dict, device, mode).double()
    x64 = inputs_nchw[0].double()
    ref_grads = None
    if mode == "training":
        out = ref(x64)
        (out * probe.double()).sum().backward()
        ref_grads = [p.grad.detach().clone() for p in ref.parameters()]
        out = out.detach()
    else:
        with torch.no_grad():
            out = ref(x64)
    del ref
    return Case(mode, batch, size, dtype_name, device, cfg, state_dict, inputs_nchw, inputs_cl, out, ref_grads, probe)


# --------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """A built provider: ``step(x)`` runs one timed step and returns the network output.

    ``inputs`` are the case's batches in the layout this provider takes; ``params`` the
    parameters whose ``.grad`` a training step fills; ``model`` the module as prepared (before
    any ``torch.compile``), whose weights ``layout`` inspects; ``warmup_context`` wraps the
    first calls (where ``torch.compile`` compiles); ``keepalive`` holds whatever the step
    closes over.
    """

    step: Callable[[torch.Tensor], torch.Tensor]
    inputs: list[torch.Tensor]
    params: list[torch.Tensor]
    model: torch.nn.Module
    warmup_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    keepalive: tuple = field(default_factory=tuple)
    #: what the provider really computes in, where only the built engine knows (OpenVINO's
    #: default precision); None: ``Provider.precision``
    precision: str | None = None

    @property
    def layout(self) -> str:
        """``"weights <fmt>, input <fmt>"`` as the tensors really are (see ``memory_format``)."""
        return f"weights {weights_format(self.model)}, input {memory_format(self.inputs[0])}"


def memory_format(t: torch.Tensor) -> str:
    """``"NCHW"``, ``"channels_last"`` or ``"other"`` for a 4-D tensor.

    A tensor that satisfies both (one channel, or 1x1 spatial) counts as NCHW; callers judge
    layouts on tensors where the two differ (3x3 conv weights, multi-channel inputs).
    """
    if t.is_contiguous():
        return "NCHW"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "other"


def weights_format(model: torch.nn.Module) -> str:
    """The memory format shared by every 3x3 conv weight of ``model`` ("mixed" if they differ).

    Only 3x3 kernels are looked at: a 1x1 head's or a 2x2 transposed conv's weight can be both
    NCHW- and channels_last-contiguous, which would make the answer depend on tie-breaking.
    """
    formats = {
        memory_format(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    }
    return formats.pop() if len(formats) == 1 else "mixed"


def _autocast(case: Case, enabled: bool = True) -> contextlib.AbstractContextManager:
    if not enabled or case.dtype_name == "fp32":
        return contextlib.nullcontext()
    # cache_enabled=False: the cache only saves re-casting a weight used twice in one region
    # (none is, in a U-Net), and cached casts must not be captured by a CUDA graph.
    return torch.autocast(case.device.type, dtype=case.dtype, cache_enabled=False)


def _make_step(model, params, case: Case, *, amp: bool = True, before: Callable | None = None):
    if not case.training:

        def infer(x):
            if before is not None:
                before()
            with torch.no_grad(), _autocast(case, amp):
                return model(x)

        return infer

    probe = case.grad_probe
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def train(x):
        if before is not None:
            before()
        for p in params:
            p.grad = None
        with _autocast(case, amp):
            y = model(x)
        (y.float() * probe).sum().backward()
        optimizer.step()
        return y

    return train


def _reference(case: Case, channels_last: bool) -> torch.nn.Module:
    model = _load(fastunet.UNetReference, case.model, case.state_dict, case.device, case.mode)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _fastunet(case: Case) -> torch.nn.Module:
    model = _load(fastunet.UNet, case.model, case.state_dict, case.device, case.mode)
    fused = use_fused(_fastunet_inputs(case)[0])
    # Never time something other than what the label says: on CUDA this must be the Triton
    # path, on CPU the eager fallback (the "auto" backend; the interpreter is never benchmarked).
    if case.device.type == "cuda" and not fused:
        raise RuntimeError(
            f"fastunet would not take the fused Triton path (backend {fastunet.get_backend()!r}, "
            f"triton importable: {triton_available()})"
        )
    if case.device.type != "cuda" and fused:
        raise RuntimeError("fastunet would run the Triton interpreter on CPU; use the 'auto' backend")
    return model


def _mark_step(case: Case) -> Callable | None:
    # Inductor's CUDA graphs (mode="max-autotune") reuse output memory across calls; marking
    # each step tells it the previous outputs are dead. A no-op without CUDA graphs.
    return torch.compiler.cudagraph_mark_step_begin if case.device.type == "cuda" else None


@contextlib.contextmanager
def _inductor_freezing() -> Iterator[None]:
    """``torch._inductor.config.freezing = True`` for the duration, restored after."""
    import torch._inductor.config as inductor_config

    previous = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = previous


def _fastunet_inputs(case: Case) -> list[torch.Tensor]:
    # The input of the baseline fastunet is judged against (see the module docstring): on CPU
    # a user's NCHW tensor as it comes, on CUDA channels_last like the eager_cl baseline.
    return case.inputs_cl if case.device.type == "cuda" else case.inputs_nchw


def build_eager_fp32_nchw(case: Case) -> Runner:
    """Reference model, NCHW weights and input, fp32 (no autocast whatever the case's dtype)."""
    model = _reference(case, channels_last=False)
    params = list(model.parameters())
    step = _make_step(model, params, case, amp=False)
    return Runner(step, case.inputs_nchw, params, model, keepalive=(model,))


def build_eager_cl(case: Case) -> Runner:
    """Reference model, channels_last weights and input, autocast in 16-bit cases."""
    model = _reference(case, channels_last=True)
    params = list(model.parameters())
    return Runner(_make_step(model, params, case), case.inputs_cl, params, model, keepalive=(model,))


def _build_compiled(
    case: Case,
    model: torch.nn.Module,
    inputs: list[torch.Tensor],
    freezing: bool = False,
    **compile_kwargs,
) -> Runner:
    params = list(model.parameters())
    compiled = torch.compile(model, **compile_kwargs)
    step = _make_step(compiled, params, case, before=_mark_step(case))
    context = _inductor_freezing if freezing else contextlib.nullcontext
    return Runner(step, inputs, params, model, warmup_context=context, keepalive=(model, compiled))


def build_compile_default(case: Case) -> Runner:
    """``torch.compile`` of the channels_last reference model."""
    return _build_compiled(case, _reference(case, channels_last=True), case.inputs_cl)


def build_compile_max_autotune(case: Case) -> Runner:
    """``torch.compile(mode="max-autotune")`` of the channels_last reference model."""
    return _build_compiled(case, _reference(case, channels_last=True), case.inputs_cl, mode="max-autotune")


def build_compile_max_autotune_freezing(case: Case) -> Runner:
    """The max-autotune compile with inductor's weight freezing on."""
    model = _reference(case, channels_last=True)
    return _build_compiled(case, model, case.inputs_cl, freezing=True, mode="max-autotune")


def build_fastunet(case: Case) -> Runner:
    """``fastunet.UNet`` as a user runs it: weights loaded, eval/train mode, nothing converted."""
    model = _fastunet(case)
    params = list(model.parameters())
    return Runner(_make_step(model, params, case), _fastunet_inputs(case), params, model, keepalive=(model,))


def build_fastunet_compile(case: Case) -> Runner:
    """``torch.compile(fastunet.UNet)``, given the same input as the plain fastunet row."""
    return _build_compiled(case, _fastunet(case), _fastunet_inputs(case))


def build_fastunet_cudagraph(case: Case) -> Runner:
    """fastunet's own CUDA-graph path (``UNet.cuda_graph``): captured once per input signature
    after a warm-up on a side stream (tuning and weight preparation happen there), replayed
    with the batch copied into its static input; the input copy is part of every timed step,
    as it would be in use."""
    if case.training:
        raise RuntimeError("CUDA-graph replay is for inference (UNet.cuda_graph needs eval mode)")
    model = _fastunet(case)
    with torch.no_grad(), _autocast(case):
        runner = model.cuda_graph(case.inputs_cl[0])

    def step(x):
        with torch.no_grad(), _autocast(case):
            return runner(x)

    return Runner(step, case.inputs_cl, list(model.parameters()), model, keepalive=(model, runner))


@contextlib.contextmanager
def _cpu_fast_math() -> Iterator[None]:
    previous = fastunet.get_cpu_fast_math()
    fastunet.set_cpu_fast_math(True)
    try:
        yield
    finally:
        fastunet.set_cpu_fast_math(previous)


def build_fastunet_fast(case: Case) -> Runner:
    """The CPU fallback with ``fastunet.set_cpu_fast_math(True)`` around every step (the switch is
    global: the other providers, timed in between, run without it)."""
    model = _fastunet(case)
    params = list(model.parameters())
    infer = _make_step(model, params, case)

    def step(x):
        with _cpu_fast_math():
            return infer(x)

    return Runner(step, _fastunet_inputs(case), params, model, keepalive=(model,))


#: The optional peers: provider -> (module to import, pip hint).
PEERS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
PEERS_HINT = "pip install 'fastunet[cpu-peers]'"


def _onnx_file(case: Case) -> Path:
    """The reference model of ``case`` as an ONNX file (``fastunet.export_onnx``, static
    shapes), exported once per case into a temporary folder that lives as long as the case."""
    path = case.scratch.get("onnx")
    if path is None:
        folder = case.scratch["onnx_dir"] = tempfile.TemporaryDirectory(prefix="fastunet-peers-")
        path = Path(folder.name) / "unet.onnx"
        model = _reference(case, channels_last=False)
        fastunet.export_onnx(model, case.inputs_nchw[0], path, dynamic=False)
        case.scratch["onnx"] = path
    return path


def build_onnxruntime(case: Case) -> Runner:
    """ONNX Runtime, CPU execution provider, all graph optimizations, torch's thread count."""
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(_onnx_file(case)), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def step(x):
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return Runner(step, case.inputs_nchw, [], _reference(case, channels_last=False), keepalive=(session,))


#: OpenVINO's element types -> this harness's precision names.
_OV_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def build_openvino(case: Case) -> Runner:
    """OpenVINO's CPU plugin: f32 in fp32 cases, its default precision in 16-bit ones."""
    ov = importlib.import_module("openvino")
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
    if case.dtype_name == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(str(_onnx_file(case))), "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if chosen not in _OV_PRECISIONS:
        raise RuntimeError(f"OpenVINO chose inference precision {chosen!r}, which this harness has no tolerance for")
    request = compiled.create_infer_request()

    def step(x):
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    model = _reference(case, channels_last=False)
    return Runner(step, case.inputs_nchw, [], model, keepalive=(compiled, request), precision=_OV_PRECISIONS[chosen])


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case], Runner]
    family: str  # "eager" | "compile" (torch.compile of the reference) | "fastunet" | "peer" (CPU engines)
    uses_compile: bool = False
    slow_compile: bool = False  # max-autotune: minutes of autotuning, left out of --quick
    needs_cuda: bool = False
    needs_cpu: bool = False
    inference_only: bool = False
    fixed_dtype: str | None = None  # computes in this dtype whatever the case's dtype
    fp32_only: bool = False  # no 16-bit form: skipped in bf16/fp16 cases

    def precision(self, case: Case) -> str:
        return compute_precision(self.fixed_dtype or case.dtype_name, case.device)

    def label(self, case: Case) -> str:
        """What the row times, in words: model, layout and the arithmetic's dtype."""
        amp = ", fp32" if case.dtype_name == "fp32" else f", autocast {case.dtype_name}"
        cpu = case.device.type != "cuda"
        fast_in = "NCHW input" if cpu else "channels_last input"
        return {
            "eager_fp32_nchw": "eager reference, fp32, NCHW weights and input",
            "eager_cl": f"eager reference, channels_last weights and input{amp}",
            "compile_default": f"torch.compile(reference), channels_last{amp}",
            "compile_max_autotune": f"torch.compile(reference, max-autotune), channels_last{amp}",
            "compile_max_autotune_freezing": f"torch.compile(reference, max-autotune) + freezing, channels_last{amp}",
            "fastunet": f"fastunet.UNet CPU fallback, {fast_in}{amp}" if cpu else f"fastunet (Triton), {fast_in}{amp}",
            "fastunet_compile": f"torch.compile(fastunet.UNet){' CPU fallback' if cpu else ''}, {fast_in}{amp}",
            "fastunet_cudagraph": f"fastunet, CUDA-graph replay, channels_last input{amp}",
            "fastunet_fast": f"fastunet.UNet CPU fallback, set_cpu_fast_math(True), {fast_in}{amp}",
            "onnxruntime": f"ONNX Runtime CPU EP, ONNX of the reference, NCHW input{amp}",
            "openvino": "OpenVINO CPU, ONNX of the reference, NCHW input, "
            + ("f32 hint" if case.dtype_name == "fp32" else "default precision"),
        }[self.name]


PROVIDERS = [
    Provider("eager_fp32_nchw", build_eager_fp32_nchw, "eager", fixed_dtype="fp32"),
    Provider("eager_cl", build_eager_cl, "eager"),
    Provider("compile_default", build_compile_default, "compile", uses_compile=True),
    Provider("compile_max_autotune", build_compile_max_autotune, "compile", uses_compile=True, slow_compile=True),
    Provider(
        "compile_max_autotune_freezing",
        build_compile_max_autotune_freezing,
        "compile",
        uses_compile=True,
        slow_compile=True,
        inference_only=True,
    ),
    Provider("fastunet", build_fastunet, "fastunet"),
    Provider("fastunet_compile", build_fastunet_compile, "fastunet", uses_compile=True),
    Provider("fastunet_cudagraph", build_fastunet_cudagraph, "fastunet", needs_cuda=True, inference_only=True),
    Provider("fastunet_fast", build_fastunet_fast, "fastunet", needs_cpu=True, inference_only=True, fp32_only=True),
    Provider("onnxruntime", build_onnxruntime, "peer", needs_cpu=True, inference_only=True, fp32_only=True),
    Provider("openvino", build_openvino, "peer", needs_cpu=True, inference_only=True),
]
PROVIDER_NAMES = [p.name for p in PROVIDERS]


def skip_reason(provider: Provider, case: Case, quick: bool) -> str | None:
    """Why ``provider`` does not run for ``case`` (None: it runs)."""
    if provider.needs_cuda and case.device.type != "cuda":
        return "needs an NVIDIA GPU (CUDA graphs of the Triton kernels)"
    if provider.needs_cpu and case.device.type != "cpu":
        return "a CPU provider"
    if provider.inference_only and case.training:
        return "inference only"
    if provider.fp32_only and case.dtype_name != "fp32":
        return "fp32 only"
    package = PEERS.get(provider.name)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"{package} is not installed ({PEERS_HINT})"
    if provider.uses_compile and quick and case.device.type != "cuda":
        return "torch.compile providers are optional on CPU and skipped in --quick"
    if provider.slow_compile and quick:
        return "skipped in --quick (max-autotune compiles for minutes)"
    return None


# --------------------------------------------------------------------------- checking
def output_error(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|y - ref|, max|y - ref| / max|ref|) in float64; NaN anywhere counts as infinite."""
    y64 = y.detach().to(torch.float64)
    if tuple(y64.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(y64.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(y64).all():
        return math.inf, math.inf
    max_abs = (y64 - ref).abs().max().item()
    return max_abs, max_abs / (ref.abs().max().item() or 1.0)


def grad_error(params: list[torch.Tensor], ref_grads: list[torch.Tensor]) -> float:
    """||g - g64|| / ||g64|| over all parameter gradients; a missing or non-finite one is inf."""
    if len(params) != len(ref_grads):
        return math.inf
    num = den = 0.0
    for p, g64 in zip(params, ref_grads, strict=True):
        if p.grad is None:
            return math.inf
        g = p.grad.detach().to(torch.float64)
        if not torch.isfinite(g).all():
            return math.inf
        num += (g - g64).pow(2).sum().item()
        den += g64.pow(2).sum().item()
    return math.sqrt(num) / (math.sqrt(den) or 1.0)


# --------------------------------------------------------------------------- measuring
def _memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _release(device: torch.device) -> None:
    # Only memory counters need a clean slate between providers, and they exist on CUDA only.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _no_recompiles(enabled: bool) -> contextlib.AbstractContextManager:
    # A recompile inside the timed loop would time the compiler; make it an error instead.
    if not enabled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(error_on_recompile=True)


def failure_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def blank_row(provider: Provider, case: Case) -> dict:
    """A result row with every key present (see run.py's docstring for their meaning)."""
    return {
        "provider": provider.name,
        "label": provider.label(case),
        "layout": None,
        "family": provider.family,
        "mode": case.mode,
        "batch": case.batch,
        "size": case.size,
        "dtype": case.dtype_name,
        "threads": torch.get_num_threads() if case.device.type == "cpu" else None,
        "precision": provider.precision(case),
        "status": "skipped",
        "reason": None,
        "ms_median": None,
        "ms_p20": None,
        "ms_p80": None,
        "n_reps": None,
        "timer": None,
        "first_call_s": None,
        "images_per_s": None,
        "gflop_per_step": None,
        "tflops": None,
        "peak_kind": None,
        "peak_fraction": None,
        "peak_mem_mb": None,
        "static_mem_mb": None,
        "minor_faults_per_step": None,
        "max_abs_err": None,
        "max_rel_err": None,
        "tolerance": OUTPUT_TOL[provider.precision(case)],
        "grad_rel_l2_err": None,
        "grad_tolerance": GRAD_TOL[provider.precision(case)] if case.training else None,
        "speedup_vs_eager_nchw": None,
        "speedup_vs_eager_cl": None,
        "speedup_vs_best_compile": None,
        "speedup_vs_best_peer": None,
    }


def prepare_provider(
    provider: Provider, case: Case, *, warmup: int, quick: bool, verbose: bool = False, reset: bool = True
) -> tuple[dict, Runner | None]:
    """Build, warm up and check one provider against float64; never raises.

    Returns its row (``blank_row``'s keys, the error fields filled) and the runner to time, or
    ``(row, None)`` with status ``"skipped"`` or ``"failed"`` (the exception in ``reason``).
    ``reset``: clear torch.compile's caches first (False when other compiled providers are
    still to be timed, see ``bench_interleaved``).
    """
    row = blank_row(provider, case)
    reason = skip_reason(provider, case, quick)
    if reason is not None:
        row["reason"] = reason
        return row, None
    device = case.device
    try:
        _release(device)
        if provider.uses_compile and reset:
            torch._dynamo.reset()
        t0 = time.perf_counter()
        runner = provider.build(case)
        row["layout"] = runner.layout
        if runner.precision is not None:
            row["precision"] = runner.precision
            row["tolerance"] = OUTPUT_TOL[runner.precision]
            row["label"] += f" ({runner.precision} on this CPU)"
        inputs = runner.inputs
        with runner.warmup_context():
            runner.step(inputs[0])
            synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            for i in range(1, warmup + 1):
                runner.step(inputs[i % len(inputs)])
            synchronize(device)
        with _no_recompiles(provider.uses_compile):
            y = runner.step(inputs[0])
            row["max_abs_err"], row["max_rel_err"] = output_error(y, case.ref_out)
            del y
            if case.training:
                row["grad_rel_l2_err"] = grad_error(runner.params, case.ref_grads)
            synchronize(device)
        return row, runner
    except Exception as exc:  # one provider failing must not end the run
        row["status"] = "failed"
        row["reason"] = failure_reason(exc)
        if verbose:
            traceback.print_exc()
        return row, None


def finish_row(row: dict, timing) -> dict:
    """Fill a checked row's timing fields and its status: ``"ok"``, or ``"wrong"`` (error above
    the tolerance: timed, but never counted as a result)."""
    row.update(ms_median=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms)
    row.update(n_reps=timing.n, timer=timing.method)
    wrong = not row["max_rel_err"] <= row["tolerance"]
    if row["grad_tolerance"] is not None and not row["grad_rel_l2_err"] <= row["grad_tolerance"]:
        wrong = True
    row["status"] = "wrong" if wrong else "ok"
    if wrong:
        row["reason"] = f"error above tolerance: output {row['max_rel_err']:.3g} (tol {row['tolerance']:g})" + (
            f", gradients {row['grad_rel_l2_err']:.3g} (tol {row['grad_tolerance']:g})"
            if row["grad_tolerance"] is not None
            else ""
        )
    return row


def bench_provider(
    provider: Provider, case: Case, *, warmup: int, reps: int, quick: bool, verbose: bool = False
) -> dict:
    """Build, warm up, check against float64, then time one provider; never raises.

    Returns a row (``blank_row``'s keys) with status ``"ok"``, ``"wrong"`` (error above the
    tolerance: timed, but never counted as a result), ``"failed"`` (with the exception in
    ``reason``) or ``"skipped"``. Memory (CUDA only) is counted above what the harness already
    holds (shared inputs, float64 reference), so it is the provider's own footprint: weights,
    caches, graphs and activations.
    """
    device = case.device
    _release(device)
    baseline = _memory(device)
    row, runner = prepare_provider(provider, case, warmup=warmup, quick=quick, verbose=verbose)
    try:
        if runner is None:
            return row
        with _no_recompiles(provider.uses_compile):
            if device.type == "cuda":
                row["static_mem_mb"] = (_memory(device) - baseline) / 2**20
                torch.cuda.reset_peak_memory_stats(device)
            timing = time_steps(runner.step, runner.inputs, device=device, warmup=0, reps=reps)
            if device.type == "cuda":
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        return finish_row(row, timing)
    except Exception as exc:
        row["status"] = "failed"
        row["reason"] = failure_reason(exc)
        if verbose:
            traceback.print_exc()
        return row
    finally:
        runner = None
        if provider.uses_compile:
            torch._dynamo.reset()
        _release(device)


def bench_interleaved(
    providers: list[Provider], case: Case, *, warmup: int, reps: int, quick: bool, verbose: bool = False
) -> list[dict]:
    """Every provider built, warmed up and checked first, then timed in ``reps`` interleaved
    rounds (one step of each provider per round, in order), so a change in the machine's load
    during the run reaches every provider alike (CPU, where other processes share the cores).
    Rows as ``bench_provider``'s, in ``providers`` order."""
    torch._dynamo.reset()
    prepared = [prepare_provider(p, case, warmup=warmup, quick=quick, verbose=verbose, reset=False) for p in providers]
    live = [(i, runner) for i, (_, runner) in enumerate(prepared) if runner is not None]
    times: dict[int, list[float]] = {i: [] for i, _ in live}
    faults: dict[int, list[int]] = {i: [] for i, _ in live}
    failed: dict[int, Exception] = {}
    try:
        with _no_recompiles(any(providers[i].uses_compile for i, _ in live)):
            for r in range(reps):
                for i, runner in live:
                    if i in failed:
                        continue
                    x = runner.inputs[r % len(runner.inputs)]
                    try:
                        f0, t0 = minor_faults(), time.perf_counter()
                        runner.step(x)
                        synchronize(case.device)
                        times[i].append((time.perf_counter() - t0) * 1e3)
                        if f0 is not None:
                            faults[i].append(minor_faults() - f0)
                    except Exception as exc:
                        failed[i] = exc
                        if verbose:
                            traceback.print_exc()
        rows = [row for row, _ in prepared]
        for i, _ in live:
            if i in failed:
                rows[i]["status"], rows[i]["reason"] = "failed", failure_reason(failed[i])
            else:
                finish_row(rows[i], summarize(times[i], "perf_counter, interleaved"))
                if faults[i]:
                    rows[i]["minor_faults_per_step"] = int(statistics.median(faults[i]))
        return rows
    finally:
        prepared = live = None
        torch._dynamo.reset()
        _release(case.device)
