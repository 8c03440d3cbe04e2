"""The fused path: a model's plan (``fastunet.plan``) run on the ``torch.ops.fastunet`` ops.

Two forms, each an executor of the same plan walk (``fastunet.plan.execute``):

* **Inference** (``EvalForm``; every BatchNorm uses running statistics): each BatchNorm folds
  with its conv bias into a per-channel ``scale``/``shift`` applied in the conv's epilogue with
  the activation, and the 1x1 head rides in the last conv's epilogue. What depends only on the
  weights (``Weights``: packed weights, folded BatchNorm, the padded first weight, the head's
  weight) is prepared once and reused while the parameters and buffers are the same tensors at
  the same version; under ``torch.no_grad`` the ops are called without the dispatcher
  (``fastunet.ops.DIRECT``).
* **Training** (``TrainForm``; some BatchNorm uses batch statistics): a BatchNorm cannot be
  applied before the whole batch is seen, so each conv writes its raw output ``z`` and the batch
  statistics of it (``conv3x3_bn_stats``); ``scale``/``shift`` are derived from those
  (differentiably, so autograd gets BatchNorm's exact backward), the running statistics are
  updated the way ``nn.BatchNorm2d`` does it, and ``act(z * scale + shift)`` is applied where z
  is next read: the next conv's loads, the pool, the upsample, the head. The normalized tensor
  never exists, which is what keeps the memory saved for backward at about half the
  reference's. In plain eager mode the whole forward is one autograd node
  (``fastunet.ops.run_taped``); under a trace or a dispatch mode each op is its own node.

Per step: ``norm="none"`` makes the epilogue ``scale = 1, shift = bias`` (inference) and the
readers' transform the bare activation (training); a missing conv bias is zeros; Dropout is the
identity in inference and, in training, materializes ``act(z * scale + shift)`` for
``F.dropout`` (the levels after it read a finished tensor); pooling floors odd sizes;
``nearest_conv`` ups run ``upconv_nearest2x2``; a bilinear up, or an upsampled map smaller than
its skip (odd sizes), is read by the decoder conv through
``conv3x3_up_bn_act``/``conv3x3_up_bn_stats`` (interpolated and zero-padded on load: the
upsampled or padded map never exists); the concat order is the order of the two sources a
decoder conv reads.

Both forms enter through ``pad_channels_nhwc``: the input cast to the compute dtype as dense
NHWC, zero-padded to 16-byte pixels for a 3- to 7-channel image (the first conv's weight gets
the matching zero input channels), so the first conv loads each tap of a pixel as one vector.

The executors reach the ops through one calls object each (``self.ops``: ``fastunet.ops.DISPATCH``,
``DIRECT`` or a ``Tape``, picked by ``fastunet.ops.calls_for`` / ``run_taped``): how an op is
called is the ops layer's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._snapshot import is_current, take_samples, tensors_state
from .distributed import group_name, sync_group
from .guard import FusedLayers
from .norm import fold_bn
from .ops import calls_for, kernel_package, run_taped, unit_affine
from .plan import Concat, Conv, DoubleConv, Head, Up, execute
from .recompute import deferred_for

__all__ = ["EvalForm", "TrainForm", "Weights", "compute_dtype", "eval_weights", "forward", "train_graph"]

# An activation on the training path: a tensor and the per-channel (scale, shift) of the
# norm + activation its reader applies, or (tensor, None, None) for a finished tensor.
_Act = tuple[Tensor, Tensor | None, Tensor | None]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the forward computes in: x's, or the autocast dtype of x's device (not for
    float64, which autocast leaves alone)."""
    if x.dtype != torch.float64:
        kind = x.device.type  # read once: each read makes a new string (about a microsecond)
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    return x.dtype


def forward(model, x: Tensor, layers: FusedLayers, batch_stats: bool) -> Tensor:
    """The fused forward of ``model`` on ``x`` (validated): the training form when some
    BatchNorm uses batch statistics, else the inference form. ``[N, C_in, H, W] -> [N, K, H, W]``
    channels_last.

    InstanceNorm (``norm="instance"``) normalizes each sample by its own statistics, in eval as in
    training: on one sample that is BatchNorm's training form, so such a model runs the training
    form one sample at a time (the conv epilogue's per-channel statistics are then per (sample,
    channel), and the readers apply that sample's normalization on load, as for BatchNorm)."""
    dtype = compute_dtype(x)
    if layers.plan.norm == "instance":
        if x.shape[0] == 1:
            return train_forward(model, x, dtype, layers)
        return torch.cat([train_forward(model, x[n : n + 1], dtype, layers) for n in range(x.shape[0])])
    if batch_stats:
        return train_forward(model, x, dtype, layers)
    weights = eval_weights(model, layers, dtype, x.device)
    return execute(layers.plan, EvalForm(calls_for(x), weights, dtype), x)


def _sources(concat: Concat, up: Up, skip, u, same_size) -> tuple:
    """The two sources of a decoder conv and how it reads the up-sampled one: ``(first, second,
    None)`` in the concat order when the up-sampled map ``u`` exists at the skip's size, else
    ``(skip, u, (up_first, bilinear))``: ``u`` (for bilinear, the low-res map) read through the
    interpolation and the zero pad on load. ``same_size()``: whether ``u`` has the skip's size."""
    bilinear = up.kind == "bilinear"
    if bilinear or (concat.pad and not same_size()):
        return skip, u, (concat.up_first, bilinear)
    return (u, skip, None) if concat.up_first else (skip, u, None)


# ------------------------------------------------------------------ inference
@dataclass(eq=False)
class Weights:
    """What the inference form computes from the weights alone, for one (dtype, device).

    ``convs``: per 3x3 conv (``plan.convs`` order) ``(packed weight, scale, shift)`` (eval
    BatchNorm and conv bias folded); ``ups``: per up-sampling with weights ``(packed weight,
    fp32 bias or None)``; ``head``: ``(weight in the compute dtype, fp32 bias)``; ``entry``:
    channels of the padded input. ``sources``/``versions``/``ptrs``/``samples``: the parameters
    and buffers it was built from, their ``_version``, storage and sampled values then
    (``fastunet._snapshot``; it holds them, so none can be freed and its address or identity
    reused while it lives).
    """

    key: tuple
    sources: tuple
    versions: tuple
    ptrs: tuple
    samples: tuple | None
    convs: list
    ups: list
    head: tuple
    entry: int


def eval_weights(model, layers: FusedLayers, dtype: torch.dtype, device: torch.device) -> Weights:
    """The cached ``Weights`` of ``model`` when every source tensor is unchanged, else new ones.

    Not cached when autograd must see the derivation (grad mode on and a source requires grad)
    or under ``torch.compile`` (the compiler traces, and can constant-fold, it).
    """
    if torch.compiler.is_compiling():
        return _build_weights(model, layers, dtype, device, (), (), (), (), None)
    sources, eps = layers.sources()
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return _build_weights(model, layers, dtype, device, (), (), (), (), None)
    key = (dtype, device, torch.is_inference_mode_enabled(), eps)
    cache = model._eval_plans
    weights = cache.get(key)
    versions, ptrs = tensors_state(sources)
    if weights is not None and is_current(weights, sources, versions, ptrs):
        return weights
    samples = take_samples(sources)
    weights = cache[key] = _build_weights(model, layers, dtype, device, key, sources, versions, ptrs, samples)
    return weights  # one per (dtype, device, ...): a few at most


def _build_weights(model, layers: FusedLayers, dtype, device, key, sources, versions, ptrs, samples) -> Weights:
    k = kernel_package()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    entry = k.entry_channels(model.in_ch, dtype)
    convs = []
    plan, mods = layers.plan, layers.mods
    for unit in plan.convs:
        conv, norm = mods[unit.conv], layers.norm(unit)
        weight = conv.weight.to(dtype)
        if unit.index == 0 and entry != model.in_ch:
            weight = F.pad(weight, (0, 0, 0, 0, 0, entry - model.in_ch))
        if norm is not None:
            scale, shift = fold_bn(conv, norm, acc)
        else:  # the conv bias (or nothing) is the whole epilogue
            scale = conv.weight.new_ones(conv.out_channels, dtype=acc)
            shift = conv.bias.to(acc) if conv.bias is not None else scale.new_zeros(conv.out_channels)
        convs.append((k.pack_conv3x3_weight(weight), scale, shift))
    pack = k.pack_upconv2x2_weight if plan.upsampling == "transpose" else k.pack_upconv_nearest2x2_weight
    ups = []
    for up in (mods[u.params] for u in plan.ups if u.params is not None):
        ups.append((pack(up.weight, dtype), None if up.bias is None else up.bias.to(acc)))
    head = mods[plan.head.path]
    bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_channels)
    return Weights(key, sources, versions, ptrs, samples, convs, ups, (head.weight.to(dtype), bias.to(acc)), entry)


class EvalForm:
    """The inference form's steps (see the module docstring); activations are finished tensors."""

    def __init__(self, ops, weights: Weights, dtype: torch.dtype):
        self.ops, self.weights, self.dtype = ops, weights, dtype
        self.last = len(weights.convs) - 1  # the conv that carries the head in its epilogue

    def entry(self, x: Tensor) -> Tensor:
        channels = self.weights.entry
        if channels != x.shape[1]:
            return self.ops.pad_channels_nhwc(x, self.dtype, channels)
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def conv(self, unit: Conv, first: Tensor, second=None, up=None) -> Tensor:
        if unit.index == self.last:  # ``head`` runs it, with the head in its epilogue
            return first
        w, scale, shift = self.weights.convs[unit.index]
        if up is not None:
            return self.ops.conv3x3_up_bn_act(first, second, w, scale, shift, True, *up)
        return self.ops.conv3x3_bn_act(first, second, w, scale, shift, True)

    def dropout(self, step: DoubleConv, x: Tensor) -> Tensor:
        return x  # the identity in eval

    def pool(self, x: Tensor) -> Tensor:
        return self.ops.maxpool2x2(x)

    def up(self, step: Up, x: Tensor) -> Tensor:
        if step.kind == "bilinear":  # the upsampled map never exists: the conv reads x through it
            return x
        w, b = self.weights.ups[step.index]
        if step.kind == "transpose":
            return self.ops.upconv2x2(x, w, b)
        return self.ops.upconv_nearest2x2(x, w, b, True)

    def concat(self, step: Concat, skip: Tensor, u: Tensor, up: Up) -> tuple:
        return _sources(step, up, skip, u, lambda: u.shape[2:] == skip.shape[2:])

    def head(self, step: Head, x: Tensor) -> Tensor:
        w, scale, shift = self.weights.convs[self.last]
        return self.ops.conv3x3_bn_act_head(x, None, w, scale, shift, True, *self.weights.head, step.activation)


# ------------------------------------------------------------------ training
def train_forward(model, x: Tensor, dtype: torch.dtype, layers: FusedLayers) -> Tensor:
    """The training form (see the module docstring): one autograd node in plain eager mode, the
    per-op path under a trace or a dispatch mode (``fastunet.ops.run_taped`` decides)."""
    leaves = (x, *layers.parameters())
    return run_taped(lambda ops: train_graph(ops, model, x, dtype, layers), leaves)


def train_graph(ops, model, x: Tensor, dtype: torch.dtype, layers: FusedLayers) -> Tensor:
    """The training forward against a calls object (``fastunet.ops.DISPATCH``, ``DIRECT`` or a tape)."""
    form = TrainForm(ops, model, layers, dtype)
    out = execute(layers.plan, form, x)
    if form.deferred is not None:  # recompute=True on a tape: drop what backward recomputes
        form.deferred.apply()
    return out


class TrainForm:
    """The training form's steps (see the module docstring); activations are ``_Act`` triples."""

    def __init__(self, ops, model, layers: FusedLayers, dtype: torch.dtype):
        self.ops, self.layers, self.dtype = ops, layers, dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.entry_channels = kernel_package().entry_channels(model.in_ch, dtype)
        self.deferred = deferred_for(ops, model, layers.plan)  # fastunet.recompute

    def entry(self, x: Tensor) -> _Act:
        return self.ops.pad_channels_nhwc(x, self.dtype, self.entry_channels), None, None

    def conv(self, unit: Conv, act: _Act, skip: _Act | None = None, up: tuple | None = None) -> _Act:
        """One conv: raw output z and the (scale, shift) its reader applies.

        A BatchNorm in eval mode inside a training model (frozen) uses its running statistics
        for that transform; the batch statistics the op also returns are then unused. An
        InstanceNorm (no running statistics: this form runs one sample at a time for it) always
        normalizes with the batch statistics, which are that sample's. An
        ``nn.SyncBatchNorm`` that synchronises (``fastunet.distributed.sync_group``) normalizes
        with the statistics of the whole group's batch (``bn_stats_sync``), and updates its
        running statistics with those and the global count. The first conv reads the padded
        entry (its weight gets zero input channels to match).

        No norm: the reader's transform is the bare activation (scale 1, shift 0; the conv bias
        is in z). ``up`` = ``(up_first, bilinear)``: ``act`` is the skip and ``skip`` the
        up-sampling's output (bilinear: its low-res input), read through
        ``conv3x3_up_bn_stats`` (zero-padded to the skip's size, interpolated on load).
        """
        ops, acc, layers = self.ops, self.acc, self.layers
        conv, bn = layers.mods[unit.conv], layers.norm(unit)
        # Parameters and buffers are read from the modules' dicts (as the guard's checks do):
        # ``conv.weight`` is ``nn.Module.__getattr__``, a Python call per read.
        params = layers.dicts[unit.conv]["_parameters"]
        weight, bias = params["weight"], params["bias"]
        if bias is None:
            bias = act[0].new_zeros(conv.out_channels, dtype=acc)
        if unit.index == 0 and self.entry_channels != weight.shape[1]:
            weight = ops.pad_weight_in(weight, self.entry_channels)
        x2, x2_scale, x2_shift = skip if skip is not None else (None, None, None)
        batch_stats = bn is not None and (bn.training or bn.running_mean is None)
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
        if self.deferred is not None:
            self.deferred.note(unit.index, z)
        if bn is None:
            return (z, *unit_affine(conv.out_channels, z, acc))
        # float64 vectors (C numbers): the ops then hand back the BatchNorm weight's gradient
        # pieces in float64, where its chain rule's cancellation against mean * dshift is
        # harmless (see fastunet/ops/norm_act_bwd.py, _uncenter); the kernels read them as float32.
        d = layers.dicts[unit.norm]
        params, buffers = d["_parameters"], d["_buffers"]
        if not batch_stats:
            stats = (buffers["running_mean"], buffers["running_var"])
            return z, *ops.bn_affine(*stats, params["weight"], params["bias"], bn.eps)
        count = z.numel() // z.shape[1]
        count_all = None
        if group is not None:
            mean, var, count_all = ops.bn_stats_sync(mean, var, count, group_name(group))
        # the running-statistics update (when tracked) and the affine in one launch
        running = (None, None, None)
        if bn.training and bn.track_running_stats:
            running = (buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"])
        return z, *ops.bn_train_fold(
            mean, var, params["weight"], params["bias"], bn.eps, *running, bn.momentum, count, count_all
        )

    def dropout(self, step: DoubleConv, act: _Act) -> _Act:
        return _dropout(self.ops, act, self.layers.mods[step.dropout])

    def pool(self, act: _Act) -> _Act:
        return self.ops.maxpool2x2(*act), None, None

    def up(self, step: Up, act: _Act) -> _Act:
        # Parameters go in as they are (the ops cast and pack inside): autograd then saves the
        # parameter itself for backward instead of a packed copy per step.
        if step.kind == "bilinear":  # the conv reads the low-res map (and its transform) through it
            return act
        params = self.layers.dicts[step.params]["_parameters"]
        if step.kind == "transpose":
            return self.ops.upconv2x2(act[0], params["weight"], params["bias"], act[1], act[2]), None, None
        return self.ops.upconv_nearest2x2(act[0], params["weight"], params["bias"], True, act[1], act[2]), None, None

    def concat(self, step: Concat, skip: _Act, u: _Act, up: Up) -> tuple:
        return _sources(step, up, skip, u, lambda: u[0].shape[2:] == skip[0].shape[2:])

    def head(self, step: Head, act: _Act) -> Tensor:
        params = self.layers.dicts[step.path]["_parameters"]
        weight, bias = params["weight"], params["bias"]
        if bias is None:
            bias = weight.new_zeros(self.layers.mods[step.path].out_channels)
        return self.ops.head1x1(act[0], weight, bias, step.activation, act[1], act[2])


def _dropout(ops, act: _Act, drop: nn.Dropout) -> _Act:
    """The training path's ``nn.Dropout`` after a DoubleConv, with the module's ``p`` and its own
    training flag (an inactive Dropout leaves ``act`` as it is): ``affine_relu_dropout`` (the
    readers then load a finished tensor)."""
    if not drop.training or drop.p == 0:
        return act
    return ops.affine_relu_dropout(*act, drop.p), None, None
