"""The CPU fallback's inference form: BatchNorm folded into the convs, activations channels_last.

On CPU (the ``"auto"`` backend on CPU tensors) an eval-mode ``UNet`` whose module tree is the
classic structure (``fastunet.guard`` says so) does not call its submodules one by one. Each
3x3 conv absorbs its conv bias and its eval BatchNorm (running statistics, eps, affine) into
one weight and one bias, derived in float64 and then cast to the compute dtype, and the forward
runs the model's plan (``fastunet.plan.execute``) on those weights, channels_last.

Which ops run the steps (``form_for``; ``fastunet.cpu_ops`` has the primitives):

* ``PackedForm`` (the default wherever torch has oneDNN and no gradient is recorded): oneDNN
  convolutions on weights reordered once per input shape, bias and activation fused as
  post-ops, the decoder's concatenation folded into its first conv;
* ``WinogradForm`` (opt-in, ``fastunet.set_cpu_fast_math(True)``): the same, with Winograd for
  the 3x3 convs, per layer NNPACK's or fastunet's own (``fastunet.cpu_winograd``), whichever was
  measured faster for the map size (fewer FLOPs, ~1e-5 of the output range);
* ``PlainForm``: ``F.conv2d`` and friends (float64, input gradients, a torch without the
  private ops).

The folded weights are cached per model and compute dtype, keyed like ``fused.Weights``: the
source tensors' identity, ``_version`` and storage address, so an in-place edit,
``load_state_dict`` or ``.to()`` rebuilds them. The cache costs one more copy of the conv
weights (about 124 MB in float32 for the classic model), plus oneDNN's reordered copies
(``cpu_ops.PACKS_KEPT`` input shapes), and dies with the model.

The folded weights are detached, so ``model.py`` uses them only when no gradient has to reach a
parameter; gradients w.r.t. the input flow through the plain form as usual.

Per step: ``norm="none"`` keeps each conv's own bias (or none); an InstanceNorm (nnU-Net's
block) runs after its conv with each sample's statistics, then the activation (ReLU or
LeakyReLU(0.01), a fused post-op where no InstanceNorm comes between); dropout is the identity
in eval; the ups are the reference's math (``ConvTranspose2d``, nearest x2 + bottom/right zero
row and column + 2x2 conv + ReLU, bilinear x2 with align_corners), then ``pad_to`` the skip for
``odd_sizes="pad"`` and the concat in the plan's order; the pre-head conv + activation before
the head.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from operator import is_

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_ops
from ._snapshot import is_current, take_samples, tensors_state
from .backend import get_cpu_fast_math
from .cpu_scratch import scratch
from .cpu_winograd import OwnWinogradConv
from .guard import FusedLayers
from .norm import fold_bn
from .plan import Concat, Conv, DoubleConv, Head, Up, execute
from .reference import LEAKY_SLOPE, apply_out_activation, pad_to

_CL = torch.channels_last


@dataclass(eq=False)
class CpuPlan:
    """The folded weights of one model for one compute dtype.

    ``convs``: per 3x3 conv (``plan.convs`` order), ``(weight [C_out, C_in, 3, 3]
    channels_last, bias [C_out] or None)`` with BatchNorm and conv bias folded in; ``norms``: per
    3x3 conv, ``(weight, bias, eps)`` of its InstanceNorm (applied after the conv: it normalizes
    with each sample's statistics, nothing folds) or None; ``ups``: per
    transposed conv ``(weight [2C, C, 2, 2] channels_last, bias [C])`` or nearest_conv up conv
    ``(weight [C, 2C, 2, 2] channels_last, bias [C] or None)``, none for bilinear; ``head``:
    ``(weight [K, C, 1, 1], bias [K] or None)``. ``sources``/``versions``/``ptrs``/``samples``: the
    tensors it was built from, their ``_version``, ``data_ptr`` and sampled values then
    (``fastunet._snapshot``; held, so none can be freed and its identity reused).
    """

    key: tuple
    sources: tuple
    versions: tuple
    ptrs: tuple
    samples: tuple | None
    convs: list
    norms: list
    ups: list
    head: tuple
    #: the primitives of ``PackedForm``/``WinogradForm`` made from these weights, built on first
    #: use (``_prims``): weights reordered per input shape live in them
    prims: dict = field(default_factory=dict)


# model -> {(compute dtype, BatchNorm eps...): CpuPlan}; weak, so the plans go with the model
# and never travel with it through pickle or deepcopy.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of one conv computing ``bn(conv(x))`` with ``bn`` in eval mode.

    ``weight``: ``[C_out, C_in, kh, kw]`` channels_last, ``bias``: ``[C_out]``, both in
    ``dtype``; derived in float64 so that the final cast is the only rounding. Detached: call
    under ``torch.no_grad``.
    """
    scale, shift = fold_bn(conv, bn, torch.float64)
    weight = conv.weight.to(torch.float64) * scale[:, None, None, None]
    return weight.to(dtype).contiguous(memory_format=_CL), shift.to(dtype)


def _as_is(conv: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A conv's (weight channels_last, bias or None) in ``dtype``."""
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    return conv.weight.to(dtype).contiguous(memory_format=_CL), bias


def _build(layers: FusedLayers, dtype: torch.dtype, key, sources, versions, ptrs, samples) -> CpuPlan:
    # Plain tensors even inside torch.inference_mode: the plan is reused outside it, where an
    # inference tensor could not be saved for backward (the input-gradient case).
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        # a BatchNorm folds; no norm (norm="none", the pre-head conv) or an InstanceNorm: the
        # conv as it is (the InstanceNorm runs after it)
        plan, mods = layers.plan, layers.mods
        convs, norms = [], []
        for unit in plan.convs:
            conv, norm = mods[unit.conv], layers.norm(unit)
            instance = unit.norm_kind == "instance"
            convs.append(fold_conv_bn(conv, norm, dtype) if norm is not None and not instance else _as_is(conv, dtype))
            norms.append(_instance_params(norm, dtype) if instance else None)
        ups = [_as_is(mods[u.params], dtype) for u in plan.ups if u.params is not None]
        head = mods[plan.head.path]
        head_b = head.bias.to(dtype) if head.bias is not None else None
        return CpuPlan(key, sources, versions, ptrs, samples, convs, norms, ups, (head.weight.to(dtype), head_b))


def _instance_params(norm: nn.InstanceNorm2d, dtype: torch.dtype) -> tuple:
    """``(weight, bias, eps)`` of an InstanceNorm in ``dtype`` (None for absent affine ones)."""
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    return weight, bias, norm.eps


def cpu_plan(model: nn.Module, layers: FusedLayers, sources: tuple, eps: tuple, dtype: torch.dtype) -> CpuPlan | None:
    """The cached plan of ``model`` for ``dtype`` when every source tensor is unchanged, else a
    new one; None when the sources cannot be tracked (inference tensors have no version)."""
    try:
        versions, ptrs = tensors_state(sources)
    except RuntimeError:  # a parameter created under torch.inference_mode: no version counter
        return None
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS[model] = {}
    key = (dtype, eps)
    plan = plans.get(key)
    if plan is not None and is_current(plan, sources, versions, ptrs):
        return plan
    # Plans built from other tensors (before a .to(), a reassigned parameter) are stale for good:
    # let their weights go before the new ones are made.
    for k in [k for k, p in plans.items() if k == key or not all(map(is_, p.sources, sources))]:
        del plans[k]
    plan = plans[key] = _build(layers, dtype, key, sources, versions, ptrs, take_samples(sources))
    return plan


def forget(model: nn.Module) -> None:
    """Drop the cached plans of ``model`` (its parameters are about to be replaced)."""
    _PLANS.pop(model, None)


def forward(model: nn.Module, x: Tensor, layers: FusedLayers) -> Tensor | None:
    """The folded forward of ``model`` (eval mode, a tree the guard accepts) on ``x``, or None
    when it cannot run: a gradient has to reach a parameter (the folded weights are detached),
    or the parameters cannot be tracked. ``[N, C_in, H, W] -> [N, K, H, W]``."""
    sources, eps = layers.sources()
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return None
    dtype = requested_dtype(x)
    compute = compute_dtype(dtype, x)
    plan = cpu_plan(model, layers, sources, eps, compute)
    if plan is None:
        return None
    return run(plan, x, layers, out_dtype=None if compute == dtype else dtype)


def requested_dtype(x: Tensor) -> torch.dtype:
    """The dtype a forward on ``x`` returns: ``x``'s, or CPU autocast's (float64 stays float64)."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def compute_dtype(dtype: torch.dtype, x: Tensor) -> torch.dtype:
    """The dtype the fold computes a forward in when the caller asks for ``dtype``.

    ``dtype`` itself, except a 16-bit autocast dtype this CPU has no oneDNN convolutions for
    (no AVX-512 BF16 / AMX: torch would run bfloat16 convolutions on its slow reference path,
    ~12x slower than float32 here): then float32, the output cast to ``dtype`` at the end
    (``run``). Same error bound or better (float32 products of the same weights), several times
    faster. Only where the prepacked path runs (no gradient recorded for ``x``).
    """
    if dtype in (torch.bfloat16, torch.float16) and _no_autograd(x) and not cpu_ops.prepacked_ok(dtype):
        if cpu_ops.prepacked_ok(torch.float32):
            return torch.float32
    return dtype


def _no_autograd(x: Tensor) -> bool:
    """Whether this forward records no gradient: the prepacked ops have no autograd formula."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def run(plan: CpuPlan, x: Tensor, layers: FusedLayers, out_dtype: torch.dtype | None = None) -> Tensor:
    """The folded forward: ``layers.plan``'s steps on ``plan``'s weights,
    ``[N, C_in, H, W] -> [N, K, H, W]``.

    ``x`` in any dtype (cast to the plan's); under ``torch.autocast`` the plain form's ops follow
    the autocast rules on weights already in the autocast dtype. The output has the input's
    memory format, as the module tree's would, and ``out_dtype`` (default: the plan's dtype).

    Which ops run the steps (``form_for``): the prepacked oneDNN primitives of
    ``fastunet.cpu_ops`` where they are available and no gradient is recorded, Winograd as well
    with ``fastunet.set_cpu_fast_math(True)`` (``WinogradForm``); otherwise ``F.conv2d`` and
    friends (float64, input gradients, a torch without the private ops).
    """
    keep_cl = x.is_contiguous(memory_format=_CL) and not x.is_contiguous()
    form = form_for(plan, x)
    if type(form) is PlainForm:
        y = execute(layers.plan, form, x)
    else:  # the primitives run the plan's dtype; autocast has nothing to decide in them
        with torch.autocast("cpu", enabled=False):
            y = execute(layers.plan, form, x)
    if out_dtype is not None:
        y = y.to(out_dtype)
    # a Winograd form's NNPACK levels end NCHW: a channels_last input still gets channels_last
    return y.contiguous(memory_format=_CL) if keep_cl else y.contiguous()


def form_for(plan: CpuPlan, x: Tensor) -> PlainForm:
    """The form that runs ``plan``'s steps on ``x`` (see ``run``)."""
    dtype = plan.convs[0][0].dtype
    if not (_no_autograd(x) and cpu_ops.prepacked_ok(dtype)):
        return PlainForm(plan)
    # oneDNN's fused ReLU post-op maps NaN to 0, where the module tree's ReLU keeps it: an input
    # holding NaN or Inf takes the plain form, so it gives the reference's NaNs, never a number.
    # One read of the input, small beside the first conv.
    if not bool(torch.isfinite(x).all()):
        return PlainForm(plan)
    if dtype == torch.float32 and get_cpu_fast_math():
        return WinogradForm(plan)
    return PackedForm(plan)


class PlainForm:
    """The plan's steps on ``F.conv2d`` and friends with the folded weights; activations are
    channels_last tensors (see ``fastunet.plan.execute``): any dtype, autograd through the
    input. The fallback of the faster forms below."""

    def __init__(self, plan: CpuPlan):
        self.plan = plan

    def entry(self, x: Tensor) -> Tensor:
        return x.to(dtype=self.plan.convs[0][0].dtype, memory_format=_CL)

    def conv(self, unit: Conv, first: Tensor, second: Tensor | None = None) -> Tensor:
        """``unit`` on ``first``, or on ``cat([first, second])`` (a decoder's sources)."""
        if second is not None:
            first = torch.cat([first, second], 1)
        return self.norm_act(unit, F.conv2d(first, *self.plan.convs[unit.index], padding=1))

    def norm_act(self, unit: Conv, y: Tensor) -> Tensor:
        """What follows ``unit``'s conv (bias and any BatchNorm already in it): its InstanceNorm,
        then its activation, in place where it can."""
        norm = self.plan.norms[unit.index]
        if norm is not None:
            y = F.instance_norm(y, weight=norm[0], bias=norm[1], eps=norm[2])
        return y.relu_() if unit.act_kind == "relu" else F.leaky_relu_(y, LEAKY_SLOPE)

    def dropout(self, step: DoubleConv, x: Tensor) -> Tensor:
        return x  # the identity in eval

    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)

    def up(self, step: Up, x: Tensor):
        """``step``'s up-sampling of ``x`` (what ``concat`` receives as ``u``)."""
        if step.kind == "transpose":
            return F.conv_transpose2d(x, *self.plan.ups[step.index], stride=2)
        if step.kind == "nearest_conv":  # NearestConvUp: TensorFlow's 'same' pads bottom/right
            return F.conv2d(_nearest_padded(x), *self.plan.ups[step.index]).relu_()
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def concat(self, step: Concat, skip: Tensor, u, up: Up) -> tuple:
        """The next conv's two sources, in the concatenation order (``conv`` joins them)."""
        if step.pad:
            u = pad_to(u, skip)
        return (u, skip) if step.up_first else (skip, u)

    def head(self, step: Head, x: Tensor) -> Tensor:
        return apply_out_activation(F.conv2d(x, *self.plan.head), step.activation)


def _nearest_padded(x: Tensor) -> Tensor:
    """Nearest x2, then one zero row and column at the bottom and right (``NearestConvUp``)."""
    return F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))


def _fused_act(unit: Conv) -> tuple[str, float | None]:
    """The oneDNN post-op (name, slope) that ends ``unit``'s conv: its activation, or none when
    an InstanceNorm has to come between the two (it needs the whole output's statistics)."""
    if unit.norm_kind == "instance":
        return "none", None
    return ("relu", None) if unit.act_kind == "relu" else ("leaky_relu", LEAKY_SLOPE)


class PackedForm(PlainForm):
    """The plan's steps on oneDNN with prepacked weights and fused post-ops, channels_last: bias,
    the activation and the head's sigmoid in the convolutions' epilogues, no concatenation (the
    decoder's first conv reads its two sources, ``cpu_ops.ConcatConv``). An InstanceNorm runs
    between the conv and its activation (``norm_act``). float32, or bfloat16 on a CPU with
    bfloat16 convolutions. No autograd.

    The primitives (weights reordered per input shape inside them) live in the plan's
    ``prims``, made on first use."""

    def prim(self, key, make):
        """The plan's primitive ``key``, made by ``make()`` the first time."""
        prim = self.plan.prims.get(key)
        if prim is None:  # two threads racing here make two equal primitives; one is kept
            prim = self.plan.prims[key] = make()
        return prim

    def conv(self, unit: Conv, first: Tensor, second: Tensor | None = None) -> Tensor:
        act, slope = _fused_act(unit)
        w, b = self.plan.convs[unit.index]
        if second is None:
            y = self.prim(unit.index, lambda: cpu_ops.PackedConv(w, b, 1, act, slope))(first)
        else:
            split = first.shape[1]
            y = self.prim((unit.index, split), lambda: cpu_ops.ConcatConv(w, b, split, act, slope))(first, second)
        return y if act != "none" else self.norm_act(unit, y)

    def up(self, step: Up, x: Tensor):
        if step.kind == "bilinear":
            return super().up(step, x)
        w, b = self.plan.ups[step.index]
        if step.kind == "transpose":
            return self.prim(("up", step.index), lambda: cpu_ops.PackedUpConv(w, b))(x)
        return self.prim(("up", step.index), lambda: cpu_ops.PackedConv(w, b, 0, "relu"))(_nearest_padded(x))

    def head(self, step: Head, x: Tensor) -> Tensor:
        act = "sigmoid" if step.activation == "sigmoid" else "none"
        y = self.prim(("head", act), lambda: cpu_ops.PackedConv(*self.plan.head, 0, act))(x)
        return y if step.activation in ("sigmoid", "none") else apply_out_activation(y, step.activation)


class _LowRes:
    """A transposed conv not run yet: ``WinogradForm.concat`` writes it straight into the
    concatenation buffer."""

    __slots__ = ("step", "x")

    def __init__(self, step: Up, x: Tensor):
        self.step, self.x = step, x


class WinogradForm(PackedForm):
    """``PackedForm`` with Winograd for the 3x3 convs, opt-in (``fastunet.set_cpu_fast_math``):
    per layer the engine ``cpu_ops.conv3x3_engine`` measured fastest for its map size, NNPACK's
    F(6x6, 3x3) on the large maps, ``fastunet.cpu_winograd``'s own F(4x4) / F(2x2) on the small
    ones, oneDNN's direct conv for the first layer. NNPACK reads and writes NCHW: an NNPACK level
    keeps its activations NCHW, and its decoder's transposed conv is one GEMM written straight
    into an NCHW concatenation buffer, the skip copied beside it (NNPACK takes one input). The own
    Winograd reads any layout and both of a decoder's sources (no concatenation) and writes
    channels_last. float32, no autograd."""

    def entry(self, x: Tensor) -> Tensor:
        return x.to(dtype=torch.float32)

    def pool(self, x: Tensor) -> Tensor:
        return cpu_ops.max_pool2x2(x) if x.is_contiguous() else F.max_pool2d(x, 2)  # NCHW: see max_pool2x2

    def engine(self, c_in: int, height: int, width: int) -> str:
        return cpu_ops.conv3x3_engine(c_in, height, width, cpu_ops.nnpack_usable())

    def conv(self, unit: Conv, first: Tensor, second: Tensor | None = None) -> Tensor:
        c_in = first.shape[1] + (0 if second is None else second.shape[1])
        engine = self.engine(c_in, first.shape[2], first.shape[3])
        if engine == "direct" or (engine == "nnpack" and second is not None):
            return super().conv(unit, first, second)
        act, slope = _fused_act(unit)
        w, b = self.plan.convs[unit.index]
        if engine == "nnpack":
            y = self.prim(("winograd", unit.index), lambda: cpu_ops.WinogradConv(w, b, act, slope))(first)
        else:
            m = 4 if engine == "own4" else 2
            conv = self.prim(("own", unit.index, m), lambda: OwnWinogradConv(w, b, act, slope, m))
            y = conv(first) if second is None else conv(first, second)
        return y if act != "none" else self.norm_act(unit, y)

    def up(self, step: Up, x: Tensor):
        return _LowRes(step, x) if step.kind == "transpose" else super().up(step, x)

    def concat(self, step: Concat, skip: Tensor, u, up: Up) -> tuple:
        if not isinstance(u, _LowRes):
            return super().concat(step, skip, u, up)
        n, c, h, w = skip.shape
        x = u.x
        if (step.pad and (h, w) != (2 * x.shape[2], 2 * x.shape[3])) or self.engine(2 * c, h, w) != "nnpack":
            return super().concat(step, skip, PackedForm.up(self, u.step, x), up)
        # read by the next conv only, then dropped (plan.execute): a scratch buffer, no page faults
        buf = scratch("concat", n, 2 * c, h, w)
        up_part, skip_part = (buf[:, :c], buf[:, c:]) if step.up_first else (buf[:, c:], buf[:, :c])
        matrix = self.prim(("up_matrix", up.index), lambda: cpu_ops.upconv_matrix(self.plan.ups[up.index][0]))
        cpu_ops.upconv2x2_into(x.contiguous(), matrix, self.plan.ups[up.index][1], up_part)
        skip_part.copy_(skip)
        return (buf,)

    def head(self, step: Head, x: Tensor) -> Tensor:
        if x.is_contiguous():  # a Winograd level's NCHW output: oneDNN reads it as it is
            return PlainForm.head(self, step, x)
        return super().head(step, x)


# --------------------------------------------------------------------------- torch.compile
# Under torch.compile the fold runs as one opaque op: dynamo would otherwise trace the module
# tree (the reference math, unfolded) and inductor's CPU code for it is slower than the fold's
# prepacked oneDNN calls. The op reaches its model through a registry keyed by the model's id,
# which dynamo bakes into the graph as a constant (``_handle`` runs at trace time); dynamo
# guards on the module object, so another model never reuses a graph (tested: two models of one
# architecture compile to two graphs). An entry goes when its model does.
_MODELS: dict[int, weakref.ref] = {}


def _handle(model: nn.Module) -> int:
    key = id(model)
    _MODELS[key] = weakref.ref(model, lambda _, key=key: _MODELS.pop(key, None))
    return key


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and with
# it triton) into every ``import fastunet``; tests/test_compile.py checks that the mark is still
# the decorator's.
_handle._dynamo_marked_constant = True


def compiled_forward(model: nn.Module, x: Tensor) -> Tensor | None:
    """What a ``torch.compile`` trace of ``model`` (eval mode, CPU, the caller's cheap checks
    passed) records for its forward: the ``fastunet::cpu_fold_forward`` op, or None when a
    gradient is recorded for ``x`` or any parameter (the op has no autograd: the module tree
    is traced then, as in eager mode where the fold's folded weights are detached)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return None
    return torch.ops.fastunet.cpu_fold_forward(x, _handle(model), requested_dtype(x))


def _out_format(x: Tensor) -> torch.memory_format:
    return _CL if x.is_contiguous(memory_format=_CL) and not x.is_contiguous() else torch.contiguous_format


@torch.library.custom_op("fastunet::cpu_fold_forward", mutates_args=())
def _cpu_fold_forward(x: Tensor, handle: int, dtype: torch.dtype) -> Tensor:
    """The model ``handle`` names, run eagerly on ``x``: the fold, or the module tree where the
    fold declines (a hook added since the trace, ...). ``[N, C_in, H, W] -> [N, K, H, W]`` in
    ``dtype``, channels_last for a channels_last ``x``, else contiguous."""
    model = _MODELS[handle]()
    if model is None:
        raise RuntimeError("fastunet: the model this compiled graph was traced from no longer exists")
    y = model._cpu_folded_forward(x)
    if y is None:
        y = model._reference_forward(x)
    return y.to(dtype=dtype, memory_format=_out_format(x))


@_cpu_fold_forward.register_fake
def _(x: Tensor, handle: int, dtype: torch.dtype) -> Tensor:
    model = _MODELS[handle]()
    n, _, h, w = x.shape
    return torch.empty((n, model.out_ch, h, w), dtype=dtype, device=x.device, memory_format=_out_format(x))
