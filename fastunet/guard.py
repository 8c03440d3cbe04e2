"""Does the fused path implement this model instance *exactly*?

The fused path never calls a submodule: it reads the classic tree's parameters and buffers and
runs ``torch.ops.fastunet`` kernels. Anything a user did to a submodule that only takes effect
when that submodule is *called* (a hook, a swapped or subclassed module, a changed conv
attribute, an instance ``forward`` override, a parametrization) would be silently ignored, so
``UNet.forward`` asks ``check_fused_support`` first and runs the eager path (which calls every
submodule) when the answer is no, with one ``FusedPathWarning`` per model and reason.

What the fused path implements, walked in the order the classic forward calls it:

* every called submodule is of the exact type it was built with (``type(m) is nn.Conv2d``, not
  ``isinstance``: ``BatchNorm2d`` and ``SyncBatchNorm`` subclasses, parametrized modules
  (``weight_norm``, ``spectral_norm``, ...), lazy modules, quantization stubs are refused), or,
  in a BatchNorm's place, exactly ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``: the fused
  path merges its statistics across its process group, ``fastunet.distributed``);
* the tree the model's architecture options build (``upsampling``, ``norm``, ``dropout``,
  ``pre_head_channels``; ``layout`` writes out the widths it expects, mid widths of milesial's
  bilinear decoder included), and ``concat``/``odd_sizes`` values the fused path implements;
* ``conv{i}`` is a ``DoubleConv`` whose ``conv`` is an ``nn.Sequential`` of exactly six modules
  ``Conv2d, norm, ReLU, Conv2d, norm, ReLU`` (seven with the ``nn.Dropout`` at index 6 where
  the model's ``dropout > 0`` puts one: ``conv{depth}`` and the bottleneck; any ``p``, read
  from the module); the 3x3 convs have kernel (3, 3),
  stride 1, padding 1 (or ``"same"``), dilation 1, groups 1, ``padding_mode="zeros"`` and the
  model's widths (bias optional); the norm is ``nn.Identity`` for ``norm="none"``, else
  BatchNorm2d with ``num_features`` = that width (any eps,
  momentum, affine, track_running_stats), or a SyncBatchNorm, whose ``process_group``
  is None (the default group) or a ``torch.distributed.ProcessGroup``; ReLU (inplace or not);
* ``pool{i}``: ``MaxPool2d`` kernel 2, stride 2, padding 0, dilation 1, no ceil_mode, no indices;
* ``up{k}``: for ``upsampling="transpose"`` a ``ConvTranspose2d`` kernel 2, stride 2, padding 0,
  output_padding 0, dilation 1, groups 1, zero padding, with a bias (the op's schema requires
  one), the model's widths; for ``"nearest_conv"`` a ``NearestConvUp`` whose ``conv`` is a
  ``Conv2d`` kernel 2, stride 1, padding 0 (bias optional); for ``"bilinear"`` an
  ``nn.Upsample`` with scale_factor 2, mode ``"bilinear"``, align_corners True;
* ``pre_head`` (when ``pre_head_channels > 0``): an ``nn.Sequential`` of a 3x3 ``Conv2d`` (as
  above) and a ``ReLU``;
* the head: ``Conv2d`` kernel 1, stride 1, padding 0, dilation 1, groups 1 (bias optional);
* no forward, forward-pre, backward or backward-pre hook on any of those submodules (the
  model's own hooks are fine: they fire around ``forward`` on either path), and no global module
  hook (``nn.modules.module.register_module_forward_hook`` and friends fire for every
  submodule call);
* no instance attribute shadowing a method the submodule's call runs (``forward``,
  ``_call_impl``, ``Conv2d._conv_forward``, ``ConvTranspose2d._output_padding``,
  ``BatchNorm2d._check_input_dim``, ``SyncBatchNorm._check_non_zero_input_channels``), and none
  of those methods monkey-patched on its class
  (compared with the functions seen when fastunet was imported);
* ``out_activation`` is one the head kernels implement.

A submodule compiled on its own (``m.compile()``) is accepted: it computes the same thing.

Cost: this runs on every fused forward, so the common case (supported) is a fast check written
for the interpreter (``_fast``): a direct walk over the known structure with ``map`` and
``operator.itemgetter`` over each module's ``__dict__``, and a per-model memo that makes an
unchanged model cheap (about 20 us for the classic ``UNet(3, 1)`` on a slow server CPU; the
``self.modules()`` walk it replaces took longer in eval mode). Only when the fast check fails does
the readable check (``_explain``, which also accepts equivalent spellings such as ``stride=1``
for ``(1, 1)``) run and say why; ``benchmarks/guard_cost.py`` prints both figures.

Under ``torch.compile`` the readable check is what gets traced: plain attribute reads, on which
dynamo installs its guards, so a swapped module or a changed attribute recompiles and the
compiled graph pays nothing per call. Hooks are the exception dynamo makes for every module:
with ``torch._dynamo.config.skip_nnmodule_hook_guards`` (True by default) a hook registered after
compiling is not seen, exactly as for any compiled ``nn.Module``.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, contains, is_, itemgetter
from typing import NamedTuple

import torch
import torch.utils.hooks
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import ProcessGroup
from .reference import ACTIVATIONS, NORMS, UPSAMPLINGS, DoubleConv, NearestConvUp

__all__ = ["FusedLayers", "FusedSupport", "FusedPathWarning", "check_fused_support", "fused_layers", "warn_unsupported"]

#: Output activations the fused head kernels implement.
FUSED_ACTIVATIONS = ACTIVATIONS


class FusedPathWarning(UserWarning):
    """``fastunet.UNet`` ran the eager path because the fused path does not implement this model
    exactly (a hook, a swapped module, a changed attribute, ...). Shown once per model and reason."""


@dataclass(frozen=True, slots=True)
class FusedSupport:
    """The verdict of ``check_fused_support``.

    ``supported``: the fused path computes exactly what the eager forward would.
    ``mode``: ``"eval"`` (every BatchNorm uses running statistics) or ``"train"`` (some
    BatchNorm uses batch statistics: ``bn.training or bn.running_mean is None``; some Dropout
    is active: ``training`` and ``p > 0``; or, with ``norm="none"``, the model is in training
    mode): which form of the fused path runs.
    ``module``: when not supported, the dotted name (as in ``model.named_modules()``) of the
    first module in call order the fused path does not implement; ``""`` for the model itself
    or for something global (a global module hook). ``reason``: one line saying why.
    """

    supported: bool
    mode: str
    module: str | None = None
    reason: str | None = None


_EVAL = FusedSupport(True, "eval")
_TRAIN = FusedSupport(True, "train")

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_NAMES = {
    "_forward_hooks": "a forward hook",
    "_forward_pre_hooks": "a forward pre-hook",
    "_backward_hooks": "a backward hook",
    "_backward_pre_hooks": "a backward pre-hook",
}
_GLOBAL_HOOKS = (
    ("_global_forward_hooks", "register_module_forward_hook"),
    ("_global_forward_pre_hooks", "register_module_forward_pre_hook"),
    ("_global_backward_hooks", "register_module_full_backward_hook"),
    ("_global_backward_pre_hooks", "register_module_full_backward_pre_hook"),
)

# Methods a submodule's call runs, per type: an instance attribute of that name shadows the
# method (and is ignored by the fused path); a class attribute replaced after import is a patch.
_CALLED = {
    DoubleConv: ("forward",),
    nn.Sequential: ("forward",),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.BatchNorm2d: ("forward", "_check_input_dim"),
    nn.SyncBatchNorm: ("forward", "_check_input_dim", "_check_non_zero_input_channels"),
    nn.ReLU: ("forward",),
    nn.MaxPool2d: ("forward",),
    nn.ConvTranspose2d: ("forward", "_output_padding"),
    NearestConvUp: ("forward",),
    nn.Upsample: ("forward",),
    nn.Identity: ("forward",),
    nn.Dropout: ("forward",),
}
_MODULE_CALL = ("__call__", "_wrapped_call_impl", "_call_impl")
_PATCHABLE = tuple((cls, name) for cls, names in _CALLED.items() for name in names) + tuple(
    (nn.Module, name) for name in _MODULE_CALL
)
_ORIGINAL = tuple(getattr(cls, name) for cls, name in _PATCHABLE)


def _class_methods() -> tuple:
    return tuple(getattr(cls, name) for cls, name in _PATCHABLE)


# ------------------------------------------------------------------ the readable check
def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__.startswith("torch.nn") else f"{t.__module__}.{t.__qualname__}"


# The exact types the fused path implements in a module's place (its own type, and for a
# BatchNorm also SyncBatchNorm), the most specific first.
_ACCEPTED = {nn.BatchNorm2d: (nn.SyncBatchNorm, nn.BatchNorm2d)}


def _call_problem(m, expected: type) -> str | None:
    """Why calling ``m`` might not be what the fused path computes for a module of type
    ``expected``: wrong type, a hook, an instance override. ``None`` if none of those."""
    if m is None:
        return "is missing (None)"
    accepted = _ACCEPTED.get(expected, (expected,))
    if type(m) not in accepted:
        base = next((t for t in accepted if isinstance(m, t)), None)
        what = f"a subclass of exactly nn.{base.__name__}" if base else f"not exactly nn.{expected.__name__}"
        if base is None and len(accepted) > 1:
            what += " (or " + ", ".join(f"nn.{t.__name__}" for t in accepted if t is not expected) + ")"
        return f"is a {_type_name(type(m))}, {what}; the fused path implements only the plain module"
    for attr in _HOOKS:
        if getattr(m, attr):
            return f"has {_HOOK_NAMES[attr]} (the fused path never calls submodules)"
    for name in _CALLED[type(m)] + ("_call_impl",):
        if name in m.__dict__:
            return f"overrides {name} on the instance"
    return None


def _attr_problem(m, checks) -> str | None:
    """``checks``: (attribute, normalize, expected value, expected text) rows."""
    for attr, norm, want, text in checks:
        value = getattr(m, attr)
        if norm(value) != want:
            return f"has {attr}={value!r}; the fused path implements {attr}={text}"
    return None


def _same(v):
    return v


def _conv3x3_checks(cin: int, cout: int):
    return (
        ("in_channels", _same, cin, str(cin)),
        ("out_channels", _same, cout, str(cout)),
        ("kernel_size", _pair, (3, 3), "(3, 3)"),
        ("stride", _pair, (1, 1), "1"),
        ("dilation", _pair, (1, 1), "1"),
        ("padding", lambda v: (1, 1) if v == "same" else _pair(v), (1, 1), "1 (or 'same')"),
        ("groups", _same, 1, "1"),
        ("padding_mode", _same, "zeros", "'zeros'"),
    )


def _head_checks(cin: int, cout: int):
    return (
        ("in_channels", _same, cin, str(cin)),
        ("out_channels", _same, cout, str(cout)),
        ("kernel_size", _pair, (1, 1), "(1, 1)"),
        ("stride", _pair, (1, 1), "1"),
        ("dilation", _pair, (1, 1), "1"),
        ("padding", lambda v: (0, 0) if v in ("same", "valid") else _pair(v), (0, 0), "0"),
        ("groups", _same, 1, "1"),
    )


def _up_checks(cin: int, cout: int):
    return (
        ("in_channels", _same, cin, str(cin)),
        ("out_channels", _same, cout, str(cout)),
        ("kernel_size", _pair, (2, 2), "(2, 2)"),
        ("stride", _pair, (2, 2), "2"),
        ("dilation", _pair, (1, 1), "1"),
        ("padding", _pair, (0, 0), "0"),
        ("output_padding", _pair, (0, 0), "0"),
        ("groups", _same, 1, "1"),
        ("padding_mode", _same, "zeros", "'zeros'"),
    )


_POOL_CHECKS = (
    ("kernel_size", _pair, (2, 2), "2"),
    ("stride", lambda v: (2, 2) if v is None else _pair(v), (2, 2), "2"),
    ("padding", _pair, (0, 0), "0"),
    ("dilation", _pair, (1, 1), "1"),
    ("ceil_mode", bool, False, "False"),
    ("return_indices", bool, False, "False"),
)


def _bn_checks(c: int):
    return (("num_features", _same, c, str(c)),)


def _sync_bn_problem(m) -> str | None:
    """What a SyncBatchNorm may hold that the fused path's synchronisation cannot use."""
    group = m.process_group
    if group is not None and not isinstance(group, ProcessGroup):
        return (
            f"has process_group={group!r}; the fused path synchronises over a torch.distributed.ProcessGroup "
            "(or None: the default group)"
        )
    return None


def _bn_batch_stats(bn) -> bool:
    return bn.training or bn.running_mean is None


class Layout(NamedTuple):
    """The widths the fused path expects for one architecture, in call order.

    ``doubles``: per ``DoubleConv`` (``conv1..conv{2*depth+1}``) ``(name, in, mid, out, dropout)``
    (``dropout``: whether its ``conv`` Sequential ends with an ``nn.Dropout``); ``ups``: per
    ``up{k}`` ``(name, in, out)`` (channels of a transposed or nearest_conv up; a bilinear up
    keeps its input's); ``pre_head``: ``(in, out)`` of the pre-head 3x3 conv or None; ``head``:
    ``(in, out)`` of the 1x1 head.
    """

    doubles: tuple
    ups: tuple
    pre_head: tuple | None
    head: tuple


def layout(in_ch: int, out_ch: int, base: int, depth: int, upsampling: str, dropout: float, pre_head: int) -> Layout:
    """The ``Layout`` of ``UNetReference(in_ch, out_ch, base_channels=base, depth=depth, ...)``
    (``fastunet.reference`` builds the same widths; written out here so the guard states what the
    fused path expects rather than trusting the module tree it checks)."""
    widths = [base << i for i in range(depth)]
    bilinear = upsampling == "bilinear"
    drop = dropout > 0
    doubles, ups = [], []
    prev = in_ch
    for i, width in enumerate(widths, start=1):
        doubles.append((f"conv{i}", prev, width, width, drop and i == depth))
        prev = width
    bottleneck = widths[-1] if bilinear else 2 * widths[-1]
    doubles.append((f"conv{depth + 1}", prev, bottleneck, bottleneck, drop))
    for k in range(depth + 2, 2 * depth + 2):
        skip = widths[2 * depth + 1 - k]
        if bilinear:
            out = base if k == 2 * depth + 1 else skip // 2
            ups.append((f"up{k}", skip, skip))
            doubles.append((f"conv{k}", 2 * skip, skip, out, False))
        else:
            ups.append((f"up{k}", 2 * skip, skip))
            doubles.append((f"conv{k}", 2 * skip, skip, skip, False))
    pre = (base, pre_head) if pre_head else None
    return Layout(tuple(doubles), tuple(ups), pre, (pre_head or base, out_ch))


def _double_conv_problem(
    dc, name: str, cin: int, mid: int, cout: int, norm: str, dropout: bool, batch: list
) -> tuple[str, str] | None:
    problem = _call_problem(dc, DoubleConv)
    if problem:
        return name, problem
    seq = dc._modules.get("conv")
    seq_name = f"{name}.conv"
    problem = _call_problem(seq, nn.Sequential)
    if problem:
        return seq_name, problem
    n = 7 if dropout else 6
    if len(seq._modules) != n:
        what = "conv, norm, ReLU, conv, norm, ReLU" + (", Dropout" if dropout else "")
        return seq_name, f"holds {len(seq._modules)} modules; the fused path implements {n} ({what})"
    norm_type, norm_checks = (nn.BatchNorm2d, _bn_checks) if norm == "batch" else (nn.Identity, lambda c: ())
    layers = [
        (nn.Conv2d, _conv3x3_checks(cin, mid)),
        (norm_type, norm_checks(mid)),
        (nn.ReLU, ()),
        (nn.Conv2d, _conv3x3_checks(mid, cout)),
        (norm_type, norm_checks(cout)),
        (nn.ReLU, ()),
    ]
    if dropout:
        layers.append((nn.Dropout, ()))
    for (key, m), (expected, checks) in zip(seq._modules.items(), layers, strict=True):
        problem = _call_problem(m, expected) or _attr_problem(m, checks)
        if not problem and type(m) is nn.SyncBatchNorm:
            problem = _sync_bn_problem(m)
        if problem:
            return f"{seq_name}.{key}", problem
        if expected is nn.BatchNorm2d and _bn_batch_stats(m):
            batch[0] = True
        if expected is nn.Dropout and m.training and m.p > 0:
            batch[0] = True
    return None


def _scale_pair(v):
    return tuple(map(float, v)) if isinstance(v, (tuple, list)) else (float(v), float(v))


# What milesial's bilinear up is: F.interpolate(x, scale_factor=2, mode="bilinear",
# align_corners=True). recompute_scale_factor is free: with align_corners the output size is
# 2h x 2w and the source positions depend on the sizes only.
_UPSAMPLE_CHECKS = (
    ("size", _same, None, "None"),
    ("scale_factor", lambda v: None if v is None else _scale_pair(v), (2.0, 2.0), "2"),
    ("mode", _same, "bilinear", "'bilinear'"),
    ("align_corners", _same, True, "True"),
)


def _nearest_conv_checks(cin: int, cout: int):
    return (
        ("in_channels", _same, cin, str(cin)),
        ("out_channels", _same, cout, str(cout)),
        ("kernel_size", _pair, (2, 2), "(2, 2)"),
        ("stride", _pair, (1, 1), "1"),
        ("dilation", _pair, (1, 1), "1"),
        ("padding", lambda v: (0, 0) if v == "valid" else _pair(v), (0, 0), "0"),
        ("groups", _same, 1, "1"),
        ("padding_mode", _same, "zeros", "'zeros'"),
    )


def _up_problem(m, name: str, upsampling: str, cin: int, cout: int) -> tuple[str, str] | None:
    if upsampling == "transpose":
        problem = _call_problem(m, nn.ConvTranspose2d) or _attr_problem(m, _up_checks(cin, cout))
        if not problem and m.bias is None:
            problem = "has no bias; the fused upsample takes one (build it with bias=True)"
        return (name, problem) if problem else None
    if upsampling == "bilinear":
        problem = _call_problem(m, nn.Upsample) or _attr_problem(m, _UPSAMPLE_CHECKS)
        return (name, problem) if problem else None
    problem = _call_problem(m, NearestConvUp)
    if problem:
        return name, problem
    conv = m._modules.get("conv")
    problem = _call_problem(conv, nn.Conv2d) or _attr_problem(conv, _nearest_conv_checks(cin, cout))
    return (f"{name}.conv", problem) if problem else None


def _pre_head_problem(m, cin: int, cout: int) -> tuple[str, str] | None:
    problem = _call_problem(m, nn.Sequential)
    if problem:
        return "pre_head", problem
    if len(m._modules) != 2:
        return "pre_head", f"holds {len(m._modules)} modules; the fused path implements 2 (conv, ReLU)"
    for (key, sub), (expected, checks) in zip(
        m._modules.items(), ((nn.Conv2d, _conv3x3_checks(cin, cout)), (nn.ReLU, ())), strict=True
    ):
        problem = _call_problem(sub, expected) or _attr_problem(sub, checks)
        if problem:
            return f"pre_head.{key}", problem
    return None


def _options_problem(model) -> str | None:
    """Why the model's architecture options are not ones the fused path knows (None if they are)."""
    up, norm = getattr(model, "upsampling", "transpose"), getattr(model, "norm", "batch")
    p, pre = getattr(model, "dropout", 0.0), getattr(model, "pre_head_channels", 0)
    if up not in UPSAMPLINGS:
        return f"has upsampling={up!r}; the fused path implements {UPSAMPLINGS}"
    if norm not in NORMS:
        return f"has norm={norm!r}; the fused path implements {NORMS}"
    if type(p) is not float or not 0.0 <= p < 1.0:
        return f"has dropout={p!r}; the fused path needs a float in [0, 1)"
    if type(pre) is not int or pre < 0:
        return f"has pre_head_channels={pre!r}; the fused path needs an int >= 0"
    if getattr(model, "concat", "up_skip") not in ("up_skip", "skip_up"):
        return f"has concat={model.concat!r}; the fused path implements ('up_skip', 'skip_up')"
    if getattr(model, "odd_sizes", "error") not in ("error", "pad"):
        return f"has odd_sizes={model.odd_sizes!r}; the fused path implements ('error', 'pad')"
    return None


def _model_problem(model, batch: list) -> tuple[str, str] | None:
    """``(module name, reason)`` for the first thing the fused path does not implement, else None;
    sets ``batch[0]`` when some BatchNorm uses batch statistics or some Dropout is active (or,
    with no BatchNorm at all, the model is in training mode): the fused training form runs then."""
    for attr, register in _GLOBAL_HOOKS:
        if getattr(_module_globals, attr):
            return "", (
                f"a global module hook is registered (torch.nn.modules.module.{register}) "
                "and fires for every submodule call"
            )
    if _class_methods() != _ORIGINAL:
        for (cls, name), now, orig in zip(_PATCHABLE, _class_methods(), _ORIGINAL, strict=True):
            if now is not orig:
                return "", f"{_type_name(cls)}.{name} has been replaced on the class (monkey-patched)"
    activation = model.out_activation
    if activation not in FUSED_ACTIVATIONS:
        return "", f"has out_activation={activation!r}; the fused head implements {FUSED_ACTIVATIONS}"
    d, base = model.depth, model.base_channels
    if type(d) is not int or d < 1 or type(base) is not int or base < 1:
        return "", f"has depth={d!r}, base_channels={base!r}; the fused path needs positive ints"
    problem = _options_problem(model)
    if problem:
        return "", problem
    upsampling, norm = getattr(model, "upsampling", "transpose"), getattr(model, "norm", "batch")
    lay = layout(
        model.in_ch, model.out_ch, base, d, upsampling, getattr(model, "dropout", 0.0),
        getattr(model, "pre_head_channels", 0),
    )  # fmt: skip
    if norm == "none" and model.training:
        batch[0] = True
    mods = model._modules
    for i, (name, cin, mid, cout, drop) in enumerate(lay.doubles, start=1):
        if i > d + 1:
            up_name, up_in, up_out = lay.ups[i - d - 2]
            problem = _up_problem(mods.get(up_name), up_name, upsampling, up_in, up_out)
            if problem:
                return problem
        problem = _double_conv_problem(mods.get(name), name, cin, mid, cout, norm, drop, batch)
        if problem:
            return problem
        if i <= d:
            pool_name = f"pool{i}"
            m = mods.get(pool_name)
            problem = _call_problem(m, nn.MaxPool2d) or _attr_problem(m, _POOL_CHECKS)
            if problem:
                return pool_name, problem
    if lay.pre_head is not None:
        problem = _pre_head_problem(mods.get("pre_head"), *lay.pre_head)
        if problem:
            return problem
    name = f"conv{2 * d + 2}"
    m = mods.get(name)
    problem = _call_problem(m, nn.Conv2d) or _attr_problem(m, _head_checks(*lay.head))
    if problem:
        return name, problem
    return None



def _explain(model) -> FusedSupport:
    """The readable (and dynamo-traceable) check: the verdict with its module and reason."""
    batch = [False]
    problem = _model_problem(model, batch)
    if problem is None:
        return _TRAIN if batch[0] else _EVAL
    name, reason = problem
    if not batch[0]:  # the walk stopped early: the mode of every BatchNorm-like module there is
        batch[0] = any(
            m.training or getattr(m, "running_mean", None) is None for m in model.modules() if isinstance(m, _BatchNorm)
        )
    return FusedSupport(False, "train" if batch[0] else "eval", name, reason)


# ------------------------------------------------------------------ the fast check
# The same rules as ``_model_problem`` for the common, supported case, written to spend as little
# interpreter time as possible (it runs on every forward): the known structure is gathered level
# by level with ``map`` over ``itemgetter``s (C loops, no per-module bytecode), and the attributes
# the kernels depend on are read from each module's ``__dict__`` by one ``itemgetter`` per module
# type. A mismatch (or a missing key) only means "ask ``_explain``", which has the final word.
#
# A per-model memo of the last verdict (weakly keyed) holds the submodule objects seen, their
# ``__dict__``s, the attribute values read and a hook stamp. Reused only for the *same* module
# objects, it saves re-reading ``__dict__`` (a module's dict object is stable) and makes the
# attribute comparison an identity check (the values are immutable: ints, strs, tuples of ints).
# The hook stamp is ``torch.utils.hooks.RemovableHandle.next_id``, a counter every hook
# registration through the public API increments (module hooks, tensor hooks, state-dict hooks):
# unchanged counter + same module objects = no new hook on them, so the 4 hook dicts of every
# submodule are only read again after some hook was registered somewhere. (Writing into a
# module's private ``_forward_hooks`` dict by hand bypasses the counter, and replacing a module's
# whole ``__dict__`` bypasses the memo; neither is supported.) The memo holds the submodules it
# saw until the next check (a failed one drops it).
_get_hooks = itemgetter(*_HOOKS)
_get_conv = itemgetter("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                       "padding_mode")  # fmt: skip
_get_up = itemgetter("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "dilation",
                     "groups", "padding_mode")  # fmt: skip
_get_head = itemgetter("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_get_bn = itemgetter("num_features")
_get_pool = itemgetter("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_dict_of = attrgetter("__dict__")
_modules_of = itemgetter("_modules")
_conv_child = itemgetter("conv")
_training_of = itemgetter("training")
_running_mean_of = itemgetter("running_mean")
_buffers_of = itemgetter("_buffers")
_params_of = itemgetter("_parameters")
_bias_of = itemgetter("bias")
_is_none = partial(is_, None)  # not ``None in``: that compares tensors with ``==``
_patch_classes = tuple(cls for cls, _ in _PATCHABLE)
_patch_names = tuple(name for _, name in _PATCHABLE)
_FORWARD, _CALL_IMPL = repeat("forward"), repeat("_call_impl")  # endless: safe to share
_CONV_FORWARD, _CHECK_DIM = repeat("_conv_forward"), repeat("_check_input_dim")
_OUTPUT_PADDING, _CHECK_CHANNELS = repeat("_output_padding"), repeat("_check_non_zero_input_channels")
_process_group_of = itemgetter("process_group")
_AS_PLAIN = {nn.SyncBatchNorm: nn.BatchNorm2d}  # what a SyncBatchNorm stands in for
_CONCATS, _ODD_SIZES = ("up_skip", "skip_up"), ("error", "pad")

_Handle = getattr(torch.utils.hooks, "RemovableHandle", None)
if type(getattr(_Handle, "next_id", None)) is not int:  # another torch: no stamp, hooks always read
    _Handle = None


_get_upsample = itemgetter("size", "scale_factor", "mode", "align_corners")
_p_of = itemgetter("p")
_UPSAMPLE_CFG = (None, 2.0, "bilinear", True)


def _picker(indices):
    """``itemgetter(*indices)`` that always returns a tuple (also for zero or one index)."""
    indices = tuple(indices)
    if len(indices) > 1:
        return itemgetter(*indices)
    if indices:
        i = indices[0]
        return lambda seq: (seq[i],)
    return lambda seq: ()


class _Plan:
    """The expected structure of one architecture (in_ch, out_ch, base_channels, depth,
    upsampling, norm, dropout, pre_head_channels).

    ``mods`` in the fast check is ``top + kids + leaves``: the top-level submodules in call order
    (``conv1, pool1, ..., conv{d+1}, up{d+2}, conv{d+2}, ..., [pre_head], head``), the ``conv``
    child of every ``DoubleConv`` (a Sequential) and then of every ``NearestConvUp`` (a Conv2d),
    and the layers of the Sequentials (each DoubleConv's six or seven, then pre_head's two).
    The other attributes pick groups of ``mods`` (``_picker``s) or of their ``__dict__``s.
    """

    __slots__ = ("top", "parents", "seqs", "lens", "convs", "bns", "drops", "pools", "ups", "near", "samples",
                 "head", "types", "cfg", "norm_none", "param_ups", "dropouts", "conv_like")  # fmt: skip

    def __init__(self, in_ch, out_ch, base, d, upsampling, norm, dropout, pre_head):
        lay = layout(in_ch, out_ch, base, d, upsampling, dropout, pre_head)
        norm_type = nn.BatchNorm2d if norm == "batch" else nn.Identity
        names, types = [], []
        doubles, pools, ups = [], [], []

        def add(name, t):
            names.append(name)
            types.append(t)
            return len(names) - 1

        up_type = {"transpose": nn.ConvTranspose2d, "nearest_conv": NearestConvUp, "bilinear": nn.Upsample}[upsampling]
        for i, dc in enumerate(lay.doubles, start=1):
            if i > d + 1:
                ups.append(add(lay.ups[i - d - 2][0], up_type))
            doubles.append(add(dc[0], DoubleConv))
            if i <= d:
                pools.append(add(f"pool{i}", nn.MaxPool2d))
        pre = add("pre_head", nn.Sequential) if lay.pre_head is not None else None
        head = add(f"conv{2 * d + 2}", nn.Conv2d)
        n_top = len(names)
        near = ups if upsampling == "nearest_conv" else []
        parents = doubles + near  # their "conv" children, in this order, follow top
        kid_types = [nn.Sequential] * len(doubles) + [nn.Conv2d] * len(near)
        n_kids = len(parents)
        seqs = list(range(n_top, n_top + len(doubles))) + ([pre] if pre is not None else [])
        lens, leaf_types = [], []
        convs, bns, drops = [], [], []
        cfg_convs, cfg_bns = [], []
        at = n_top + n_kids
        for _, cin, mid, cout, drop in lay.doubles:
            seq = [nn.Conv2d, norm_type, nn.ReLU, nn.Conv2d, norm_type, nn.ReLU] + ([nn.Dropout] if drop else [])
            convs += [at, at + 3]
            cfg_convs += [(cin, mid, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"),
                          (mid, cout, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")]  # fmt: skip
            if norm == "batch":
                bns += [at + 1, at + 4]
                cfg_bns += [mid, cout]  # _get_bn has one key: it returns the value itself
            drops.append(at + 6 if drop else None)
            lens.append(len(seq))
            leaf_types += seq
            at += len(seq)
        if lay.pre_head is not None:
            convs.append(at)
            cfg_convs.append((*lay.pre_head, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"))
            lens.append(2)
            leaf_types += [nn.Conv2d, nn.ReLU]
        self.top = itemgetter(*names)
        self.parents = _picker(parents)
        self.seqs = _picker(seqs)
        self.lens = tuple(lens)
        self.convs, self.bns = _picker(convs), _picker(bns)
        self.drops = tuple(drops)  # per DoubleConv: the index of its Dropout, or None
        self.dropouts = _picker(i for i in drops if i is not None)
        self.pools = _picker(pools)
        transposed = ups if upsampling == "transpose" else []
        self.ups = _picker(transposed)
        nearest_convs = range(n_top + len(doubles), n_top + n_kids)  # the NearestConvUp.conv Conv2ds
        self.near = _picker(nearest_convs)
        self.conv_like = _picker([*convs, *nearest_convs])  # every Conv2d but the head: one check
        self.param_ups = _picker(transposed or nearest_convs)  # what holds each up's parameters
        self.samples = _picker(ups if upsampling == "bilinear" else [])
        self.head = head
        self.norm_none = norm == "none"
        self.types = tuple(types) + tuple(kid_types) + tuple(leaf_types)
        up_cfg = tuple((cin, cout, (2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 1, "zeros") for _, cin, cout in lay.ups)
        near_cfg = tuple((cin, cout, (2, 2), (1, 1), (0, 0), (1, 1), 1, "zeros") for _, cin, cout in lay.ups)
        head_cfg = (*lay.head, (1, 1), (1, 1), (0, 0), (1, 1), 1)  # padding_mode: no padding, no effect
        self.cfg = (
            tuple(cfg_convs) + (near_cfg if upsampling == "nearest_conv" else ()),
            tuple(cfg_bns),
            ((2, 2, 0, 1, False, False),) * d,
            up_cfg if upsampling == "transpose" else (),
            (_UPSAMPLE_CFG,) * d if upsampling == "bilinear" else (),
            head_cfg,
        )


# architecture key (see _arch_key) -> _Plan
_PLANS: dict[tuple, _Plan] = {}
# model -> (mods, their __dict__s, hook stamp, cfg, plan) of its last supported verdict
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The plan's key also holds the values the structure does not depend on but the fused path must
# implement (concat, odd_sizes, out_activation): one dict lookup validates them all.
_get_arch = itemgetter("in_ch", "out_ch", "base_channels", "depth", "upsampling", "norm", "dropout",
                       "pre_head_channels", "concat", "odd_sizes", "out_activation")  # fmt: skip


def _new_plan(key: tuple) -> _Plan | None:
    in_ch, out_ch, base, d, upsampling, norm, dropout, pre_head, concat, odd_sizes, activation = key
    if not all(type(v) is int and v > 0 for v in key[:4]):
        return None
    if concat not in _CONCATS or odd_sizes not in _ODD_SIZES or activation not in FUSED_ACTIVATIONS:
        return None
    if upsampling not in UPSAMPLINGS or norm not in NORMS or type(pre_head) is not int or pre_head < 0:
        return None
    if type(dropout) is not float or not 0.0 <= dropout < 1.0:
        return None
    return _Plan(*key[:8])


def _fast(model) -> FusedSupport | None:
    """The verdict when the model is supported, else None (then ``_explain`` decides and says why)."""
    g = _module_globals
    if (
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
        or tuple(map(getattr, _patch_classes, _patch_names)) != _ORIGINAL
    ):
        return None
    md = model.__dict__
    try:
        key = _get_arch(md)
        plan = _PLANS.get(key)
        if plan is None:
            plan = _new_plan(key)
            if plan is None:
                return None
            _PLANS[key] = plan
        # The structure, as the forward would reach it.
        top = plan.top(md["_modules"])
        kids = tuple(map(_conv_child, map(_modules_of, map(_dict_of, plan.parents(top)))))
        both = top + kids
        layers = tuple(map(_modules_of, map(_dict_of, plan.seqs(both))))
        if tuple(map(len, layers)) != plan.lens:
            return None
        mods = both + tuple(chain.from_iterable(map(dict.values, layers)))
        types = tuple(map(type, mods))
        synced = types != plan.types  # then only if some BatchNorm is a SyncBatchNorm
        if synced and tuple(map(_AS_PLAIN.get, types, types)) != plan.types:
            return None
        stamp = _Handle.next_id if _Handle is not None else None  # read before the hooks are
        memo = _MEMO.get(model)
        if memo is not None and memo[0] == mods:  # the same module objects (exact types: identity)
            dicts, hooks_seen = memo[1], memo[2] is not None and memo[2] == stamp
        else:
            memo, dicts, hooks_seen = None, tuple(map(_dict_of, mods)), False
        if not hooks_seen and any(chain.from_iterable(map(_get_hooks, dicts))):
            return None
        conv_d, bn_d, up_d = plan.conv_like(dicts), plan.bns(dicts), plan.ups(dicts)
        head_d = dicts[plan.head]
        cfg = (
            tuple(map(_get_conv, conv_d)),
            tuple(map(_get_bn, bn_d)),
            tuple(map(_get_pool, plan.pools(dicts))),
            tuple(map(_get_up, up_d)),
            tuple(map(_get_upsample, plan.samples(dicts))),
            _get_head(head_d),
        )
        same_cfg = memo is not None and cfg == memo[3]  # identity hits: values unchanged since then
        if not same_cfg and cfg != plan.cfg:
            return None
        if (
            any(map(contains, dicts, _FORWARD))
            or any(map(contains, dicts, _CALL_IMPL))
            or any(map(contains, conv_d, _CONV_FORWARD))
            or "_conv_forward" in head_d
            or any(map(contains, bn_d, _CHECK_DIM))
            or any(map(contains, up_d, _OUTPUT_PADDING))
            or any(map(_is_none, map(_bias_of, map(_params_of, up_d))))
        ):
            return None
        if synced:
            sync_d = [d for m, d in zip(plan.bns(mods), bn_d, strict=True) if type(m) is nn.SyncBatchNorm]
            groups = map(_process_group_of, sync_d)
            if any(map(contains, sync_d, _CHECK_CHANNELS)) or not all(
                g is None or isinstance(g, ProcessGroup) for g in groups
            ):
                return None
        if plan.norm_none:
            batch = md["training"]
        else:
            batch = any(map(_training_of, bn_d)) or any(map(_is_none, map(_running_mean_of, map(_buffers_of, bn_d))))
        if not batch:  # an active Dropout needs the training form too (none in the classic tree)
            drop_d = plan.dropouts(dicts)
            batch = bool(drop_d) and any(d["training"] and d["p"] > 0 for d in drop_d)
    except (KeyError, TypeError):  # a missing module, attribute or buffer: let _explain say which
        return None
    if not (same_cfg and hooks_seen):
        _MEMO[model] = (mods, dicts, stamp, cfg, plan)
    return _TRAIN if batch else _EVAL


class FusedLayers(NamedTuple):
    """The modules the fused path reads, in call order, and their ``__dict__``s (parameters and
    buffers are read from ``_parameters``/``_buffers`` there without ``nn.Module.__getattr__``).

    ``convs``: the 3x3 convs (two per level, encoder then decoder, then the pre-head conv when
    there is one); ``bns``: their BatchNorms, ``()`` for ``norm="none"``; ``ups``: the modules
    holding each up-sampling's parameters (the ``ConvTranspose2d``s, the ``NearestConvUp.conv``
    Conv2ds; ``()`` for bilinear); ``head``: the 1x1 conv; ``drops``: per ``DoubleConv`` its
    ``nn.Dropout`` or None.
    """

    convs: tuple
    bns: tuple
    ups: tuple
    head: nn.Module
    conv_dicts: tuple
    bn_dicts: tuple
    up_dicts: tuple
    head_dict: dict
    drops: tuple = ()


def walk_layers(model) -> FusedLayers:
    """The layers by attribute access: what ``torch.compile`` traces (the guard keeps no memo
    there) and the fallback when there is no memo. Call it on a model the guard accepted."""
    d = model.depth
    dcs = [getattr(model, f"conv{i}").conv for i in range(1, 2 * d + 2)]
    convs = [m for seq in dcs for m in (seq[0], seq[3])]
    pre_head = model.pre_head_channels if hasattr(model, "pre_head_channels") else 0
    if pre_head:
        convs.append(model.pre_head[0])
    bns = tuple(m for seq in dcs for m in (seq[1], seq[4])) if getattr(model, "norm", "batch") == "batch" else ()
    upsampling = getattr(model, "upsampling", "transpose")
    ups = tuple(getattr(model, f"up{k}") for k in range(d + 2, 2 * d + 2))
    if upsampling == "nearest_conv":
        ups = tuple(m.conv for m in ups)
    elif upsampling == "bilinear":
        ups = ()
    drops = tuple(seq[6] if len(seq) > 6 else None for seq in dcs)
    head = model.head
    return FusedLayers(
        tuple(convs), bns, ups, head, tuple(m.__dict__ for m in convs), tuple(m.__dict__ for m in bns),
        tuple(m.__dict__ for m in ups), head.__dict__, drops,
    )  # fmt: skip


# model -> (the memo's module tuple, its FusedLayers)
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_layers(model) -> FusedLayers | None:
    """The layers of ``model`` as the last supported ``check_fused_support`` saw them, or None
    (not checked yet, refused, or under ``torch.compile``, where the check keeps no memo). Call it
    right after a supported verdict: it reuses that check's walk instead of walking again."""
    if torch.compiler.is_compiling():
        # A memo left by an eager forward would be traced as well: dynamo would guard on the
        # weak keys of _MEMO (any model's, which the collector may take before the guards are
        # built) and on module tuples it cannot compare with ``is``.
        return None
    memo = _MEMO.get(model)
    if memo is None:
        return None
    mods, dicts, plan = memo[0], memo[1], memo[4]
    cached = _LAYERS.get(model)
    if cached is not None and cached[0] is mods:
        return cached[1]
    layers = FusedLayers(
        plan.convs(mods), plan.bns(mods), plan.param_ups(mods), mods[plan.head],
        plan.convs(dicts), plan.bns(dicts), plan.param_ups(dicts), dicts[plan.head],
        tuple(None if i is None else mods[i] for i in plan.drops),
    )  # fmt: skip
    _LAYERS[model] = (mods, layers)
    return layers



def check_fused_support(model) -> FusedSupport:
    """Whether the fused path implements ``model`` (a ``UNet``) exactly, and in which mode.

    Returns a ``FusedSupport``; see the module docstring for the rules. Cheap enough to run on
    every forward (about 20 us for an unchanged classic ``UNet(3, 1)``).
    """
    if not torch.compiler.is_compiling():
        verdict = _fast(model)
        if verdict is not None:
            return verdict
        _MEMO.pop(model, None)  # let go of modules this model may no longer hold
    return _explain(model)


def warn_unsupported(model, support: FusedSupport) -> None:
    """Emit one ``FusedPathWarning`` per model instance and (module, reason).

    Not under ``torch.compile``: dynamo cannot trace ``warnings.warn`` (with ``fullgraph=True``
    it would be an error), so a compiled model takes the eager path without a word.
    """
    if torch.compiler.is_compiling():
        return
    key = (support.module, support.reason)
    seen = model.__dict__.setdefault("_fused_path_warned", set())
    if key in seen:
        return
    seen.add(key)
    where = f"module '{support.module}' {support.reason}" if support.module else support.reason
    warnings.warn(
        f"fastunet.UNet: the fused path does not implement this model exactly: {where}. "
        "Running the eager path (the reference math, calling every submodule) instead.",
        FusedPathWarning,
        stacklevel=_caller_stacklevel(),
    )


_INTERNAL_DIRS = tuple(
    os.path.dirname(f) + os.sep for f in (__file__, _module_globals.__file__) if f is not None
)  # fastunet/ and torch/nn/modules/


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised in ``warn_unsupported`` at the user's
    ``model(x)`` line: past fastunet's frames and ``nn.Module.__call__``'s."""
    level, frame = 1, sys._getframe(1)  # stacklevel 1 is warn_unsupported itself
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level += 1
        frame = frame.f_back
    return level
