"""``fastunet.UNet``: the drop-in replacement for the classic U-Net.

It *is* the reference model (a subclass of ``UNetReference``), so it has the same module tree,
the same parameters and the same state_dict keys, and a reference checkpoint loads with
``strict=True`` both ways. Only ``forward`` differs: it validates the input, then runs either
the reference math (eager path, the CPU fallback) or the fused path through
``torch.ops.fastunet.*`` (see ``fastunet.backend`` for which).

The CPU fallback (the ``"auto"`` backend on CPU tensors) runs the module tree, except for an
eval-mode forward that needs no parameter gradient on a model the guard accepts: that one folds
each BatchNorm into its conv and runs channels_last (``fastunet.cpu_fold``). The ``"eager"``
backend always runs the module tree.

Fused path, two forms:

* **Inference** (every BatchNorm uses running statistics): each BatchNorm folds with its conv
  bias into a per-channel ``scale``/``shift`` applied in the conv's epilogue with the ReLU, and
  the 1x1 head rides in the last conv's epilogue.
* **Training** (some BatchNorm uses batch statistics): a BatchNorm cannot be applied before the
  whole batch is seen, so each conv writes its raw output ``z`` and the batch statistics of it
  (``conv3x3_bn_stats``); ``scale``/``shift`` are derived from those (differentiably, so autograd
  gets BatchNorm's exact backward), the running statistics are updated the way
  ``nn.BatchNorm2d`` does it, and ``relu(z * scale + shift)`` is applied where z is next read:
  the next conv's loads, the pool, the upsample, the head. The normalized tensor never exists,
  which is what keeps the memory saved for backward at about half the reference's.

Architecture options (``fastunet.reference``; the guard checks the tree they build): the concat
order is the order of the two sources a decoder conv reads; ``norm="none"`` makes the epilogue
``scale = 1, shift = bias`` (eval) and the readers' transform a plain ReLU (training); a missing
conv bias is zeros; Dropout is the identity in eval and, in training, materializes
``relu(z * scale + shift)`` for ``F.dropout`` (the levels after it read a finished tensor);
the pre-head conv carries the head in its epilogue; pooling floors odd sizes; ``nearest_conv``
ups run ``upconv_nearest2x2``; a bilinear up, or an upsampled map smaller than its skip (odd
sizes), is read by the decoder conv through ``conv3x3_up_bn_act``/``conv3x3_up_bn_stats``
(interpolated and zero-padded on load: the upsampled or padded map never exists).

Both forms enter through ``pad_channels_nhwc``: the input cast to the compute dtype as dense
NHWC, zero-padded to 16-byte pixels for a 3- to 7-channel image (the first conv's weight gets
the matching zero input channels), so the first conv loads each tap of a pixel as one vector.

Host time per inference forward is what decides small batches. The inference form therefore
prepares everything that depends only on the weights once (``_EvalPlan``: packed weights, folded
BatchNorm, the padded first weight, the head's weight) and reuses it while the parameters and
buffers are the same tensors at the same version; the module tree is walked once per forward,
by the guard (``fastunet.guard``), whose walk also hands over the layers; and under
``torch.no_grad`` the ops are called without the dispatcher (``fastunet.ops.direct``).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_fold
from ._snapshot import is_current, tensors_state
from .backend import get_backend, use_fused
from .distributed import group_name, sync_group
from .guard import FusedLayers, check_fused_support, fused_layers, walk_layers, warn_unsupported
from .ops import OpsNamespace, Tape, direct_ok, direct_ok_mutation, kernel_package, run_taped
from .ops import direct as _direct
from .ops._common import _unit_affine
from .reference import UNetReference
from .validation import validate_input

_ops = torch.ops.fastunet
_ops_per_op = OpsNamespace()
_get_weight, _get_bias = itemgetter("weight"), itemgetter("bias")
_get_mean, _get_var = itemgetter("running_mean"), itemgetter("running_var")
_get_params, _get_buffers = itemgetter("_parameters"), itemgetter("_buffers")
_get_eps = itemgetter("eps")

# An activation on the training path: a tensor and the per-channel (scale, shift) of the
# BatchNorm+ReLU its reader applies, or (tensor, None, None) for a finished tensor.
_Act = tuple[Tensor, Tensor | None, Tensor | None]


def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _bn_affine(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(z) == z * scale + shift`` for the given statistics."""
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm and conv bias as ``scale * conv_nobias + shift`` (differentiable): the bias
    shifts the mean the BatchNorm subtracts."""
    mean = bn.running_mean.to(acc)
    if conv.bias is not None:
        mean = mean - conv.bias.to(acc)
    return _bn_affine(bn, mean, bn.running_var, acc)


@dataclass(eq=False)
class _EvalPlan:
    """What the inference form computes from the weights alone, for one (dtype, device).

    ``convs``: per 3x3 conv in call order, ``(packed weight, scale, shift)`` (eval BatchNorm and
    conv bias folded); ``ups``: per transposed conv, ``(packed weight, fp32 bias)``; ``head``:
    ``(weight in the compute dtype, fp32 bias)``; ``entry``: channels of the padded input.
    ``sources``/``versions``/``ptrs``: the parameters and buffers it was built from, their
    ``_version`` and storage then (the plan holds them, so none can be freed and its address
    or identity reused while the plan lives).
    """

    key: tuple
    sources: tuple
    versions: tuple
    ptrs: tuple
    convs: list
    ups: list
    head: tuple
    entry: int


def _layer_sources(layers: FusedLayers) -> tuple:
    """Every tensor the inference form reads, from the layers' ``__dict__``s, and the BatchNorm
    epsilons last (absent tensors, e.g. a bias-free conv, are left out)."""
    conv_p = tuple(map(_get_params, layers.conv_dicts))
    bn_p = tuple(map(_get_params, layers.bn_dicts))
    bn_b = tuple(map(_get_buffers, layers.bn_dicts))
    up_p = tuple(map(_get_params, layers.up_dicts))
    head_p = _get_params(layers.head_dict)
    tensors = (
        *map(_get_weight, conv_p), *map(_get_bias, conv_p), *map(_get_weight, bn_p), *map(_get_bias, bn_p),
        *map(_get_mean, bn_b), *map(_get_var, bn_b), *map(_get_weight, up_p), *map(_get_bias, up_p),
        _get_weight(head_p), _get_bias(head_p),
    )  # fmt: skip
    if type(None) in map(type, tensors):  # rare (affine=False, bias=False, ...): drop the holes
        tensors = tuple(t for t in tensors if t is not None)
    return tensors, tuple(map(_get_eps, layers.bn_dicts))


def _training_leaves(layers: FusedLayers) -> list:
    """Every parameter the training forward reads (what its gradients flow to)."""
    leaves = []
    for m in (*layers.convs, *layers.bns, *layers.ups, layers.head):
        leaves.extend(p for p in m._parameters.values() if p is not None)
    return leaves


def _norms(layers: FusedLayers) -> tuple:
    """Per 3x3 conv its BatchNorm, or None: every conv for ``norm="none"``, and the pre-head conv."""
    return (*layers.bns, *(None,) * (len(layers.convs) - len(layers.bns)))


def _dropout(ops, act: _Act, drop: nn.Dropout | None) -> _Act:
    """The training path's ``nn.Dropout`` after a DoubleConv: ``relu(z * scale + shift)`` is
    materialized (a dropout mask needs the values) and ``F.dropout`` applied, with the module's
    ``p`` and its own training flag (an inactive Dropout leaves ``act`` as it is). Costs one
    read of z and one write of the result (plus torch's mask) per dropout level; the readers
    then load the finished tensor without a transform.
    """
    if drop is None or not drop.training or drop.p == 0:
        return act
    z, scale, shift = act
    if isinstance(ops, Tape):
        return ops._run(_dropout_impl, _dropout_setup, _dropout_backward, z, scale, shift, drop.p), None, None
    # The per-op path records these plain torch ops itself; untaped, nothing needs a gradient.
    return _dropout_impl(z, scale, shift, drop.p), None, None


def _dropout_impl(z: Tensor, scale: Tensor, shift: Tensor, p: float) -> Tensor:
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    h = torch.relu(z.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)).to(z.dtype)
    # The mask is drawn in h's memory order (channels_last), as torch's dropout does for an NHWC
    # activation; then the same seed gives the same mask as a channels_last eager model.
    return F.dropout(h, p, True)


def _dropout_setup(ctx, inputs, output) -> None:
    z, scale, shift, p = inputs
    ctx.p = p
    ctx.save_for_backward(z, scale, shift, output)


def _dropout_backward(ctx, g):
    z, scale, shift, out = ctx.saved_tensors
    # Kept elements are exactly the nonzero outputs where relu's output was positive; where it
    # was 0 the ReLU's backward zeroes the gradient anyway, so ``out != 0`` is mask enough.
    gh = torch.where(out != 0, g * (1.0 / (1.0 - ctx.p)), torch.zeros((), dtype=g.dtype, device=g.device))
    dz, dscale, dshift = _ops.affine_relu_backward(gh.to(z.dtype), z, scale, shift)
    return dz, dscale, dshift, None


class UNet(UNetReference):
    """Drop-in U-Net: ``UNet(in_ch, out_ch)`` with the classic model's modules and weights.

    Same options as ``UNetReference`` (keyword-only ``base_channels``, ``depth``,
    ``out_activation``, the architecture options and ``preset``; every preset runs fused).
    ``forward(x)``: ``[N, in_ch, H, W] -> [N, out_ch, H, W]``, H and W multiples of
    ``2**depth`` (any H, W >= ``2**depth`` with ``odd_sizes="pad"``); on the fused path the
    output is channels_last.

    Inference prepares the weights once (packed layouts, folded BatchNorm; on CPU the folded
    channels_last weights of ``fastunet.cpu_fold``) and reuses them while every parameter and
    buffer is unchanged; in training the ops take the parameters as they are and pack inside (so
    autograd saves no packed copies). ``cuda_graph(example)`` gives a CUDA-graph replay of the
    inference forward for small batches.
    """

    def __init__(self, in_ch: int, out_ch: int, **options):
        super().__init__(in_ch, out_ch, **options)
        self._eval_plans: dict[tuple, _EvalPlan] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        first = self.conv1.conv[0].weight
        validate_input(
            x, in_ch=self.in_ch, depth=self.depth, param_dtype=first.dtype, param_device=first.device,
            odd_sizes=self.odd_sizes,
        )  # fmt: skip
        eager = not self._empty_batch_syncs(x) if x.numel() == 0 else not use_fused(x)
        if eager:
            # The CPU fallback's inference form; the cheap exclusions come first so that training
            # (and eval with gradients for the parameters) never pays for the guard.
            if (
                not self.training
                and x.device.type == "cpu"
                and not (first.requires_grad and torch.is_grad_enabled())
                and x.numel()
                and get_backend() == "auto"
            ):
                y = self._cpu_folded_forward(x)
                if y is not None:
                    return y
            return self._reference_forward(x)
        # Anything the fused path would silently ignore (a hook, a swapped module, a changed
        # conv attribute, ...) sends the call down the eager path instead (see fastunet.guard).
        support = check_fused_support(self)
        if not support.supported:
            warn_unsupported(self, support)
            return self._reference_forward(x)
        return self._fused_forward(x, support.mode == "train")

    def _empty_batch_syncs(self, x: Tensor) -> bool:
        """Whether an empty batch must run the fused path anyway: some ``nn.SyncBatchNorm``
        merges its statistics across ranks now, and the other ranks' fused forwards wait in
        those collectives for this one's (an empty rank takes part with a zero count)."""
        return any(sync_group(m) is not None for m in self.modules()) and use_fused(x)

    def _cpu_folded_forward(self, x: Tensor) -> Tensor | None:
        """The CPU fallback with BatchNorm folded (``fastunet.cpu_fold``), or None when the module
        tree must run: the guard refuses it (a hook, a swapped module, ...: those take effect only
        when the submodules are called), some BatchNorm uses batch statistics, a gradient has to
        reach a parameter (the folded weights are detached), or ``torch.compile`` is tracing
        (the compiler does its own folding). No warning: the module tree is the reference math.
        """
        if torch.compiler.is_compiling():
            return None
        support = check_fused_support(self)
        if not support.supported or support.mode != "eval":
            return None
        layers = fused_layers(self) or self._walk_layers()
        sources, eps = _layer_sources(layers)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return None
        dtype = x.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        plan = cpu_fold.cpu_plan(self, layers, sources, eps, dtype)
        if plan is None:
            return None
        return cpu_fold.run(plan, x, self)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .double(), ... replace the parameters: the folded copies of the old
        # ones would only hold memory until the next CPU forward noticed.
        cpu_fold.forget(self)
        return super()._apply(fn, *args, **kwargs)

    def _fused_forward(self, x: Tensor, batch_stats: bool) -> Tensor:
        """The fused path: the training form when some BatchNorm uses batch statistics."""
        layers = fused_layers(self) or self._walk_layers()
        dtype = x.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if batch_stats:
            return self._training_forward(x, dtype, layers)
        return self._eval_forward(x, dtype, layers)

    def cuda_graph(self, example: Tensor | None = None, *, warmup: int = 2):
        """A ``fastunet.graphs.CudaGraphRunner`` replaying this model's inference forward from
        CUDA graphs, one per input shape/dtype/autocast state (captured on first sight, or right
        away for ``example``). ``runner(x)`` returns the output in a static buffer that the next
        call of the same signature overwrites. Needs an NVIDIA GPU and the model in eval mode.
        """
        from .graphs import CudaGraphRunner

        return CudaGraphRunner(self, example, warmup=warmup)

    def _walk_layers(self) -> FusedLayers:
        """The layers by attribute access: what ``torch.compile`` traces (the guard keeps no memo
        there) and the fallback when it has none."""
        return walk_layers(self)

    def _entry(self, ops, x: Tensor, dtype: torch.dtype, channels: int) -> Tensor:
        if channels != x.shape[1]:
            return ops.pad_channels_nhwc(x, dtype, channels)
        return x.to(dtype=dtype, memory_format=torch.channels_last)

    # ------------------------------------------------------------------ inference
    def _eval_forward(self, x: Tensor, dtype: torch.dtype, layers: FusedLayers) -> Tensor:
        plan = self._eval_plan(layers, dtype, x.device)
        ops = _direct if direct_ok(x) else _ops
        x = self._entry(ops, x, dtype, plan.entry)
        d = self.depth
        convs = iter(plan.convs)
        skips = []
        # Dropout is the identity in eval; pooling floors odd sizes (the odd_sizes="pad" models).
        for _ in range(d):
            x = ops.conv3x3_bn_act(x, None, *next(convs), True)
            x = ops.conv3x3_bn_act(x, None, *next(convs), True)
            skips.append(x)
            x = ops.maxpool2x2(x)
        x = ops.conv3x3_bn_act(x, None, *next(convs), True)
        x = ops.conv3x3_bn_act(x, None, *next(convs), True)
        up_first, upsampling, pre_head = self.concat == "up_skip", self.upsampling, self.pre_head_channels
        same_size = self.odd_sizes == "error"  # H, W multiples of 2**depth: every up fits its skip
        for j in range(d):
            skip = skips.pop()
            conv = next(convs)
            if upsampling == "bilinear":  # the upsampled map never exists: the conv reads x through it
                x = ops.conv3x3_up_bn_act(skip, x, *conv, True, up_first, True)
            else:
                up_w, up_b = plan.ups[j]
                if upsampling == "transpose":
                    u = ops.upconv2x2(x, up_w, up_b)
                else:
                    u = ops.upconv_nearest2x2(x, up_w, up_b, True)
                if same_size or u.shape[2:] == skip.shape[2:]:  # concat order = the sources' order
                    first, second = (u, skip) if up_first else (skip, u)
                    x = ops.conv3x3_bn_act(first, second, *conv, True)
                else:  # odd sizes: u is zero-padded to the skip's size on load
                    x = ops.conv3x3_up_bn_act(skip, u, *conv, True, up_first, False)
            if j == d - 1 and not pre_head:  # the last conv carries the 1x1 head in its epilogue
                return ops.conv3x3_bn_act_head(x, None, *next(convs), True, *plan.head, self.out_activation)
            x = ops.conv3x3_bn_act(x, None, *next(convs), True)
        # The pre-head conv (+ ReLU) carries the head.
        return ops.conv3x3_bn_act_head(x, None, *next(convs), True, *plan.head, self.out_activation)

    def _eval_plan(self, layers: FusedLayers, dtype: torch.dtype, device: torch.device) -> _EvalPlan:
        """The cached ``_EvalPlan`` when every source tensor is unchanged, else a new one.

        Not cached when autograd must see the derivation (grad mode on and a source requires
        grad) or under ``torch.compile`` (the compiler traces, and can constant-fold, it).
        """
        if torch.compiler.is_compiling():
            return self._build_eval_plan(layers, dtype, device, (), (), (), ())
        sources, eps = _layer_sources(layers)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return self._build_eval_plan(layers, dtype, device, (), (), (), ())
        key = (dtype, device, torch.is_inference_mode_enabled(), eps)
        plan = self._eval_plans.get(key)
        versions, ptrs = tensors_state(sources)
        if plan is not None and is_current(plan, sources, versions, ptrs):
            return plan
        plan = self._build_eval_plan(layers, dtype, device, key, sources, versions, ptrs)
        self._eval_plans[key] = plan  # one per (dtype, device, ...): a few at most
        return plan

    def _inference_plan(self, x: Tensor) -> _EvalPlan | None:
        """The plan a fused inference forward on ``x`` reads now (None: that forward would take
        the eager or the training path). What ``CudaGraphRunner`` compares with the plan a
        graph captured: the same object means the same packed weights at the same addresses."""
        if not use_fused(x) or self.training:
            return None
        support = check_fused_support(self)
        if not support.supported or support.mode != "eval":
            return None
        dtype = x.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return self._eval_plan(fused_layers(self) or self._walk_layers(), dtype, x.device)

    def _build_eval_plan(self, layers, dtype, device, key, sources, versions, ptrs) -> _EvalPlan:
        k = kernel_package()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        entry = k.entry_channels(self.in_ch, dtype)
        convs = []
        for i, (conv, bn) in enumerate(zip(layers.convs, _norms(layers), strict=True)):
            weight = conv.weight.to(dtype)
            if i == 0 and entry != self.in_ch:
                weight = F.pad(weight, (0, 0, 0, 0, 0, entry - self.in_ch))
            if bn is not None:
                scale, shift = _fold_bn(conv, bn, acc)
            else:  # the conv bias (or nothing) is the whole epilogue
                scale = conv.weight.new_ones(conv.out_channels, dtype=acc)
                shift = conv.bias.to(acc) if conv.bias is not None else scale.new_zeros(conv.out_channels)
            convs.append((k.pack_conv3x3_weight(weight), scale, shift))
        if self.upsampling == "transpose":
            ups = [(k.pack_upconv2x2_weight(up.weight.to(dtype)), up.bias.to(acc)) for up in layers.ups]
        else:  # nearest_conv: the NearestConvUp.conv layers (bias optional); bilinear: none
            ups = [
                (k.pack_upconv_nearest2x2_weight(up.weight, dtype), None if up.bias is None else up.bias.to(acc))
                for up in layers.ups
            ]
        head = layers.head
        bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_channels)
        return _EvalPlan(key, sources, versions, ptrs, convs, ups, (head.weight.to(dtype), bias.to(acc)), entry)

    # ------------------------------------------------------------------ training
    def _training_forward(self, x: Tensor, dtype: torch.dtype, layers: FusedLayers) -> Tensor:
        """The fused path when some BatchNorm uses batch statistics (see the module docstring).

        In plain eager mode the whole forward is one autograd node (``fastunet.ops.run_taped``:
        each op runs its implementation directly, and the backward replays the ops' formulas);
        under a trace or a dispatch mode each op is its own node, as ``torch.compile`` needs.
        """
        if not direct_ok_mutation(x):
            return self._training_graph(_ops_per_op, x, dtype, layers)
        leaves = (x, *_training_leaves(layers))
        return run_taped(lambda ops: self._training_graph(ops, x, dtype, layers), leaves)

    def _training_graph(self, ops, x: Tensor, dtype: torch.dtype, layers: FusedLayers) -> Tensor:
        """The training forward against an ops namespace (the registered ops, or a tape)."""
        d = self.depth
        entry = kernel_package().entry_channels(self.in_ch, dtype)
        act: _Act = (ops.pad_channels_nhwc(x, dtype, entry), None, None)
        pairs = iter(zip(layers.convs, _norms(layers), strict=True))
        drops = iter(layers.drops)
        skips = []
        for level in range(d):
            act = self._double_conv_train(ops, pairs, act, None, dtype, entry if level == 0 else 0)
            act = _dropout(ops, act, next(drops))
            skips.append(act)
            act = (ops.maxpool2x2(*act), None, None)
        act = self._double_conv_train(ops, pairs, act, None, dtype, 0)
        act = _dropout(ops, act, next(drops))
        up_first, upsampling = self.concat == "up_skip", self.upsampling
        bilinear, same_size = upsampling == "bilinear", self.odd_sizes == "error"
        ups = iter(layers.ups)
        for _ in range(d):
            skip = skips.pop()
            # Parameters go in as they are (the ops cast and pack inside): autograd then saves the
            # parameter itself for backward instead of a packed copy per step.
            if upsampling == "transpose":
                up = next(ups)
                u: _Act = (ops.upconv2x2(act[0], up.weight, up.bias, act[1], act[2]), None, None)
            elif upsampling == "nearest_conv":
                up = next(ups)
                u = (ops.upconv_nearest2x2(act[0], up.weight, up.bias, True, act[1], act[2]), None, None)
            else:  # bilinear: the conv reads the low-res map (and its transform) through the interpolation
                u = act
            if bilinear or not (same_size or u[0].shape[2:] == skip[0].shape[2:]):
                h = self._conv_bn_train(ops, *next(pairs), skip, u, dtype, 0, (up_first, bilinear))
            elif up_first:
                h = self._conv_bn_train(ops, *next(pairs), u, skip, dtype, 0)
            else:
                h = self._conv_bn_train(ops, *next(pairs), skip, u, dtype, 0)
            act = self._conv_bn_train(ops, *next(pairs), h, None, dtype, 0)
        if self.pre_head_channels:
            act = self._conv_bn_train(ops, *next(pairs), act, None, dtype, 0)
        head = layers.head
        head_b = head.bias if head.bias is not None else head.weight.new_zeros(head.out_channels)
        return ops.head1x1(act[0], head.weight, head_b, self.out_activation, act[1], act[2])

    def _double_conv_train(self, ops, pairs, act: _Act, skip: _Act | None, dtype: torch.dtype, entry: int) -> _Act:
        h = self._conv_bn_train(ops, *next(pairs), act, skip, dtype, entry)
        return self._conv_bn_train(ops, *next(pairs), h, None, dtype, 0)

    def _conv_bn_train(
        self,
        ops,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        act: _Act,
        skip: _Act | None,
        dtype: torch.dtype,
        entry: int,
        up: tuple[bool, bool] | None = None,
    ) -> _Act:
        """One conv on the training path: raw output z and the (scale, shift) its reader applies.

        A BatchNorm in eval mode inside a training model (frozen) uses its running statistics
        for that transform; the batch statistics the op also returns are then unused. An
        ``nn.SyncBatchNorm`` that synchronises (``fastunet.distributed.sync_group``) normalizes
        with the statistics of the whole group's batch (``bn_stats_sync``), and updates its
        running statistics with those and the global count. ``entry``: the padded input's
        channel count for the first conv (its weight gets zero channels to match), 0 otherwise.

        ``bn`` None (``norm="none"``): the reader's transform is a plain ReLU (scale 1, shift 0;
        the conv bias is in z). ``up`` = ``(up_first, bilinear)``: ``act`` is the skip and ``skip``
        the up-sampling's output (bilinear: its low-res input), read through
        ``conv3x3_up_bn_stats`` (zero-padded to the skip's size, interpolated on load).
        """
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        bias = conv.bias if conv.bias is not None else act[0].new_zeros(conv.out_channels, dtype=acc)
        weight = conv.weight
        if entry and entry != weight.shape[1]:
            weight = ops.pad_weight_in(weight, entry)
        x2, x2_scale, x2_shift = skip if skip is not None else (None, None, None)
        batch_stats = bn is not None and _bn_uses_batch_stats(bn)
        group = sync_group(bn) if bn is not None else None
        # BatchNorm's "more than 1 value per channel" applies to the batch it normalizes by: the
        # group's (checked by bn_stats_sync), this one's, or none (running statistics).
        min_count = 2 if batch_stats and group is None else 0
        if up is not None:
            z, mean, var = ops.conv3x3_up_bn_stats(
                act[0], x2, weight, bias, act[1], act[2], x2_scale, x2_shift, *up, min_count
            )
        else:
            z, mean, var = ops.conv3x3_bn_stats(act[0], x2, weight, bias, act[1], act[2], x2_scale, x2_shift, min_count)
        if bn is None:
            return (z, *_unit_affine(conv.out_channels, z, acc))
        if batch_stats:
            count = z.numel() // z.shape[1]
            count_all = None
            if group is not None:
                mean, var, count_all = ops.bn_stats_sync(mean, var, count, group_name(group))
            if bn.training and bn.track_running_stats:
                ops.bn_running_update_(
                    mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, count, count_all
                )
        else:
            mean, var = bn.running_mean, bn.running_var
        # float64 vectors (C numbers): the ops then hand back the BatchNorm weight's gradient
        # pieces in float64, where its chain rule's cancellation against mean * dshift is
        # harmless (see ops._uncenter); the kernels read them as float32.
        scale, shift = ops.bn_affine(mean, var, bn.weight, bn.bias, bn.eps)
        return z, scale, shift

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed);
        see ``fastunet.checkpoint.save_pretrained``."""
        from .checkpoint import save_pretrained  # deferred: checkpoint imports this module

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, map_location="cpu"):
        """A model of this class built from ``directory``'s ``config.json`` with the weights of its
        ``model.safetensors`` on ``map_location``; see ``fastunet.checkpoint.load_pretrained``."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, cls=cls, map_location=map_location)

    @classmethod
    def from_keras(cls, source, **kw):
        """A model of this class (``preset="keras"``) holding the weights of a Keras U-Net
        (zhixuhao's ``unet()`` layout): ``source`` is a Keras 3 ``.weights.h5``, a legacy
        ``.h5`` (full model or weights only) or the list of ``keras_model.get_weights()``.
        Keyword options go to ``fastunet.convert.from_keras``, which documents them."""
        from .convert import from_keras  # deferred: h5py is an optional dependency

        return from_keras(source, cls=cls, **kw)

    @classmethod
    def from_milesial(cls, source, bilinear=None, **kw):
        """A model of this class (``preset="milesial"`` or ``"milesial-bilinear"``) holding the
        weights of milesial's ``Pytorch-UNet``: ``source`` is its state_dict or a checkpoint path.
        ``bilinear``: None infers the up-sampling from the weights. Keyword options go to
        ``fastunet.convert.from_milesial``, which documents them."""
        from .convert import from_milesial

        return from_milesial(source, bilinear=bilinear, cls=cls, **kw)
