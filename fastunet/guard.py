"""Does the fused path implement this model instance *exactly*?

The fused path never calls a submodule: it reads the tree's parameters and buffers and runs
``torch.ops.fastunet`` kernels, step by step along the model's plan (``fastunet.plan``).
Anything a user did to a submodule that only takes effect when that submodule is *called* (a
hook, a swapped or subclassed module, a changed conv attribute, an instance ``forward``
override, a parametrization) would be silently ignored, so ``UNet.forward`` asks
``check_fused_support`` first and runs the eager path (which calls every submodule) when the
answer is no, with one ``FusedPathWarning`` per model and reason.

The rules, one per role a module plays in the plan (``_RULES``), checked slot by slot in the
order the forward calls the modules:

* every called submodule is of the exact type its role names (``type(m) is nn.Conv2d``, not
  ``isinstance``: ``BatchNorm2d`` and ``SyncBatchNorm`` subclasses, parametrized modules
  (``weight_norm``, ``spectral_norm``, ...), lazy modules, quantization stubs are refused), or,
  in a BatchNorm's place, exactly ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``: the fused
  path merges its statistics across its process group, ``fastunet.distributed``), whose
  ``process_group`` is None (the default group) or a ``torch.distributed.ProcessGroup``;
* the architecture options (``upsampling``, ``norm``, ``act``, ``dropout``, ``pre_head_channels``,
  ``concat``, ``odd_sizes``, ``out_activation``) are ones the plan describes, and the tree they
  build holds the modules the plan lists at their paths with the plan's widths (mid widths of
  milesial's bilinear decoder included);
* a ``DoubleConv``'s ``conv`` is an ``nn.Sequential`` of exactly six modules ``Conv2d, norm,
  act, Conv2d, norm, act`` (seven with the ``nn.Dropout`` at index 6 where the model's
  ``dropout > 0`` puts one: ``conv{depth}`` and the bottleneck; any ``p``, read from the module);
  the 3x3 convs have kernel (3, 3), stride 1, padding 1 (or ``"same"``), dilation 1, groups 1,
  ``padding_mode="zeros"`` (bias optional); the norm is ``nn.Identity`` for ``norm="none"``,
  else BatchNorm2d with ``num_features`` = that width (any eps, momentum, affine,
  track_running_stats); the activation ``nn.ReLU`` (inplace or not);
* ``pool{i}``: ``MaxPool2d`` kernel 2, stride 2, padding 0, dilation 1, no ceil_mode, no indices;
* ``up{k}``: for ``upsampling="transpose"`` a ``ConvTranspose2d`` kernel 2, stride 2, padding 0,
  output_padding 0, dilation 1, groups 1, zero padding, with a bias (the op's schema requires
  one); for ``"nearest_conv"`` a ``NearestConvUp`` whose ``conv`` is a ``Conv2d`` kernel 2,
  stride 1, padding 0 (bias optional); for ``"bilinear"`` an ``nn.Upsample`` with scale_factor
  2, mode ``"bilinear"``, align_corners True;
* ``pre_head`` (when ``pre_head_channels > 0``): an ``nn.Sequential`` of a 3x3 ``Conv2d`` (as
  above) and the activation;
* the head: ``Conv2d`` kernel 1, stride 1, padding 0, dilation 1, groups 1 (bias optional);
* no forward, forward-pre, backward or backward-pre hook on any of those submodules (the
  model's own hooks are fine: they fire around ``forward`` on either path), and no global module
  hook (``nn.modules.module.register_module_forward_hook`` and friends fire for every
  submodule call);
* no instance attribute shadowing a method the submodule's call runs (``forward``,
  ``_call_impl``, ``Conv2d._conv_forward``, ``ConvTranspose2d._output_padding``,
  ``BatchNorm2d._check_input_dim``, ``SyncBatchNorm._check_non_zero_input_channels``), and none
  of those methods monkey-patched on its class (compared with the functions seen when fastunet
  was imported).

A submodule compiled on its own (``m.compile()``) is accepted: it computes the same thing.

Each rule is data (``_Rule``: the exact type, the attribute rows, the parameters it needs, what
puts it on batch statistics), and both answers come from it: the readable check (``_explain``,
which also accepts equivalent spellings such as ``stride=1`` for ``(1, 1)`` and says why) walks
the slots applying each row's normalization; the fast check (``_fast``) compiles the same rows
of one plan into ``itemgetter``s over the modules' ``__dict__``s and compares with the rows'
canonical values (``_Compiled``). The fast check only ever answers "supported" (any mismatch
means "ask ``_explain``"), so the two cannot disagree on a refusal.

Cost: the fast check runs on every fused forward: a direct walk over the plan's structure with
``map`` and ``operator.itemgetter``, and a per-model memo that makes an unchanged model cheap
(about 20 us for the classic ``UNet(3, 1)`` on a slow server CPU); ``benchmarks/guard_cost.py``
prints both figures.

Under ``torch.compile`` the readable check is what gets traced: plain attribute reads, on which
dynamo installs its guards, so a swapped module or a changed attribute recompiles and the
compiled graph pays nothing per call. Hooks are the exception dynamo makes for every module:
with ``torch._dynamo.config.skip_nnmodule_hook_guards`` (True by default) a hook registered after
compiling is not seen, exactly as for any compiled ``nn.Module``.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import and_, attrgetter, contains, is_, itemgetter, lt
from typing import NamedTuple

import torch
import torch.utils.hooks
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import ProcessGroup
from .plan import ARCH_NAMES, Conv, Plan, arch_key, build_plan, key_problem, plan_of
from .reference import LEAKY_SLOPE, DoubleConv, NearestConvUp

__all__ = ["FusedLayers", "FusedSupport", "FusedPathWarning", "check_fused_support", "fused_layers", "warn_unsupported"]


class FusedPathWarning(UserWarning):
    """``fastunet.UNet`` ran the eager path because the fused path does not implement this model
    exactly (a hook, a swapped module, a changed attribute, ...). Shown once per model and reason."""


@dataclass(frozen=True, slots=True)
class FusedSupport:
    """The verdict of ``check_fused_support``.

    ``supported``: the fused path computes exactly what the eager forward would.
    ``mode``: ``"eval"`` (every BatchNorm uses running statistics) or ``"train"`` (some
    BatchNorm uses batch statistics: ``bn.training or bn.running_mean is None``; some Dropout
    is active: ``training`` and ``p > 0``; or, with no BatchNorm (``norm="none"``), the model is
    in training mode): which form of the fused path runs.
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
    nn.InstanceNorm2d: ("forward", "_check_input_dim", "_get_no_batch_dim", "_apply_instance_norm"),
    nn.ReLU: ("forward",),
    nn.LeakyReLU: ("forward",),
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
_ORIGINAL_OF = {(cls, name): getattr(cls, name) for cls, name in _PATCHABLE}


# ------------------------------------------------------------------ the rules
_params_of, _buffers_of = itemgetter("_parameters"), itemgetter("_buffers")
_weight_of, _bias_of, _eps_of = itemgetter("weight"), itemgetter("bias"), itemgetter("eps")
_running_mean_of, _running_var_of = itemgetter("running_mean"), itemgetter("running_var")
_is_none = partial(is_, None)  # not ``None in``: that compares tensors with ``==``
_positive = partial(lt, 0)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _same(v):
    return v


def _scale_pair(v):
    return None if v is None else tuple(map(float, v)) if isinstance(v, (tuple, list)) else (float(v), float(v))


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__.startswith("torch.nn") else f"{t.__module__}.{t.__qualname__}"


# Rows: (attribute, normalize, canonical value, text). The readable check compares
# ``normalize(value)`` with ``normalize(canonical)`` (so ``stride=1`` passes for ``(1, 1)``), the
# fast one the raw value with the canonical one (what the reference's modules hold).
def _widths(cin: int, cout: int) -> tuple:
    return (("in_channels", _same, cin, str(cin)), ("out_channels", _same, cout, str(cout)))


def _conv_rows(cin: int, cout: int, k: int, stride: int, pad: int) -> tuple:
    """A ``k x k`` conv's rows (``padding_mode`` last: the head leaves it out)."""

    def padding(v):  # "valid" pads nothing; "same" pads (k - 1) // 2 on each side for an odd k
        return (0, 0) if v == "valid" else ((k - 1) // 2,) * 2 if v == "same" and k % 2 else _pair(v)

    return (
        *_widths(cin, cout),
        ("kernel_size", _pair, (k, k), f"({k}, {k})"),
        ("stride", _pair, (stride, stride), str(stride)),
        ("dilation", _pair, (1, 1), "1"),
        ("padding", padding, (pad, pad), f"{pad} (or 'same')" if pad else str(pad)),
        ("groups", _same, 1, "1"),
        ("padding_mode", _same, "zeros", "'zeros'"),
    )


def _head_rows(cin: int, cout: int) -> tuple:
    return _conv_rows(cin, cout, 1, 1, 0)[:-1]  # padding 0: any padding_mode pads nothing


def _up_rows(cin: int, cout: int) -> tuple:
    rows = _conv_rows(cin, cout, 2, 2, 0)
    return (*rows[:6], ("output_padding", _pair, (0, 0), "0"), *rows[6:])


_POOL_ROWS = (
    ("kernel_size", _pair, 2, "2"),
    ("stride", lambda v: (2, 2) if v is None else _pair(v), 2, "2"),
    ("padding", _pair, 0, "0"),
    ("dilation", _pair, 1, "1"),
    ("ceil_mode", bool, False, "False"),
    ("return_indices", bool, False, "False"),
)
# milesial's bilinear up is F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True).
# recompute_scale_factor is free: with align_corners the output size is 2h x 2w and the source
# positions depend on the sizes only.
_UPSAMPLE_ROWS = (
    ("size", _same, None, "None"),
    ("scale_factor", _scale_pair, 2.0, "2"),
    ("mode", _same, "bilinear", "'bilinear'"),
    ("align_corners", _same, True, "True"),
)


# Mode rules take the ``__dict__``s of every module of their role at once (the fast check's
# group, or the one module ``_explain`` is at) and ``get``, the reader of a key: the fast check's
# are ``itemgetter``s (loops in C), ``_explain`` passes ``_subscript`` (which dynamo can trace).
_GETTERS = {key: itemgetter(key) for key in ("training", "_buffers", "running_mean", "p")}


def _bn_batch(ds: tuple, get=_GETTERS.__getitem__) -> bool:
    """Whether some of these BatchNorms normalizes with batch statistics."""
    return any(map(get("training"), ds)) or any(map(_is_none, map(get("running_mean"), map(get("_buffers"), ds))))


def _dropout_active(ds: tuple, get=_GETTERS.__getitem__) -> bool:
    """Whether some of these Dropouts is active (``training`` and ``p > 0``)."""
    return any(map(and_, map(get("training"), ds), map(_positive, map(get("p"), ds))))


def _subscript(key: str):
    return lambda d: d[key]


@dataclass(frozen=True)
class _Rule:
    """What the module in a slot of one role must be.

    ``type``: the exact type the fused path implements; ``also``: other exact types it accepts in
    its place (the most specific first); ``rows``: the attribute rows, from the slot's args;
    ``requires``: ``(parameter, reason)`` that must not be None; ``batch``: ``(__dict__, ...) ->
    bool``, whether some of these modules makes the training form run; ``holds``: a container whose children the
    slot's args name, one per position.
    """

    type: type
    rows: Callable[..., tuple] = lambda *args: ()
    also: tuple = ()
    requires: tuple = ()
    batch: Callable | None = None
    holds: bool = False


_RULES = {
    "double_conv": _Rule(DoubleConv),
    "sequential": _Rule(nn.Sequential, holds=True),
    "conv3x3": _Rule(nn.Conv2d, lambda cin, cout: _conv_rows(cin, cout, 3, 1, 1)),
    "norm:batch": _Rule(
        nn.BatchNorm2d, lambda c: (("num_features", _same, c, str(c)),), also=(nn.SyncBatchNorm,), batch=_bn_batch
    ),
    "norm:instance": _Rule(
        nn.InstanceNorm2d,
        lambda c: (("num_features", _same, c, str(c)), ("track_running_stats", bool, False, "False")),
    ),
    "norm:none": _Rule(nn.Identity),
    "act:relu": _Rule(nn.ReLU),
    "act:leaky_relu": _Rule(
        nn.LeakyReLU, lambda: (("negative_slope", float, LEAKY_SLOPE, f"{LEAKY_SLOPE} (nnU-Net's)"),)
    ),
    "dropout": _Rule(nn.Dropout, batch=_dropout_active),
    "max_pool": _Rule(nn.MaxPool2d, lambda: _POOL_ROWS),
    "conv_transpose": _Rule(
        nn.ConvTranspose2d,
        _up_rows,
        requires=(("bias", "has no bias; the fused upsample takes one (build it with bias=True)"),),
    ),
    "nearest_conv_up": _Rule(NearestConvUp),
    "conv2x2": _Rule(nn.Conv2d, lambda cin, cout: _conv_rows(cin, cout, 2, 1, 0)),
    "upsample_bilinear": _Rule(nn.Upsample, lambda: _UPSAMPLE_ROWS),
    "head": _Rule(nn.Conv2d, _head_rows),
}


def _fused_limit(plan: Plan) -> tuple[str, str] | None:
    """``(module, reason)`` for the first step of ``plan`` the fused kernels do not implement (the
    CPU fold still runs it), or None."""
    first = plan.convs[0]
    if plan.act == "leaky_relu":
        return first.act, "is a LeakyReLU: the fused kernels' activation on store and on load is ReLU"
    drops = [slot.path for slot in plan.slots if slot.role == "dropout"]
    if plan.norm == "instance" and drops:
        return drops[0], (
            "is a Dropout in an InstanceNorm model: the fused path runs such a model one sample at a time, "
            "which would draw the dropout masks in another order than the module tree"
        )
    return None


# ------------------------------------------------------------------ the readable check
def _call_problem(m, rule: _Rule) -> str | None:
    """Why calling ``m`` might not be what the fused path computes for a module of ``rule``: wrong
    type, a hook, an instance override. ``None`` if none of those."""
    if m is None:
        return "is missing (None)"
    accepted = (*rule.also, rule.type)
    if type(m) not in accepted:
        expected = rule.type
        base = next((t for t in accepted if isinstance(m, t)), None)
        what = f"a subclass of exactly nn.{base.__name__}" if base else f"not exactly nn.{expected.__name__}"
        if base is None and len(accepted) > 1:
            what += " (or " + ", ".join(f"nn.{t.__name__}" for t in rule.also) + ")"
        return f"is a {_type_name(type(m))}, {what}; the fused path implements only the plain module"
    for attr in _HOOKS:
        if getattr(m, attr):
            return f"has {_HOOK_NAMES[attr]} (the fused path never calls submodules)"
    for name in _CALLED[type(m)] + ("_call_impl",):
        if name in m.__dict__:
            return f"overrides {name} on the instance"
    return None


def _slot_problem(m, rule: _Rule, args: tuple) -> str | None:
    """What of ``m``'s contents, attributes or parameters the slot's rule refuses (its type and
    calls already passed)."""
    if rule.holds and len(m._modules) != len(args):
        return f"holds {len(m._modules)} modules; the fused path implements {len(args)} ({', '.join(args)})"
    for attr, norm, want, text in () if rule.holds else rule.rows(*args):
        value = getattr(m, attr)
        if norm(value) != norm(want):
            return f"has {attr}={value!r}; the fused path implements {attr}={text}"
    for name, reason in rule.requires:
        if m._parameters.get(name) is None:
            return reason
    if type(m) is nn.SyncBatchNorm:
        group = m.process_group
        if group is not None and not isinstance(group, ProcessGroup):
            return (
                f"has process_group={group!r}; the fused path synchronises over a torch.distributed.ProcessGroup "
                "(or None: the default group)"
            )
    return None


def _model_problem(model, batch: list, kernels: bool) -> tuple[str, str] | None:
    """``(module name, reason)`` for the first thing the fused path does not implement (with
    ``kernels=False``: the first module that is not the plan's), else None; sets ``batch[0]``
    when some BatchNorm uses batch statistics or some Dropout is active (or, with no BatchNorm
    at all, the model is in training mode): the fused training form runs then."""
    for attr, register in _GLOBAL_HOOKS:
        if getattr(_module_globals, attr):
            return "", (
                f"a global module hook is registered (torch.nn.modules.module.{register}) "
                "and fires for every submodule call"
            )
    key = arch_key(model)
    problem = key_problem(key)
    if problem:
        return "", problem
    plan = build_plan(key)
    comp = _compiled(plan)
    for cls, name, orig in zip(comp.patch_classes, comp.patch_names, comp.originals, strict=True):
        if getattr(cls, name) is not orig:
            return "", f"{_type_name(cls)}.{name} has been replaced on the class (monkey-patched)"
    if plan.norm != "batch" and model.training:
        batch[0] = True
    found = []  # the module in each slot so far
    for slot, (parent, where) in zip(plan.slots, comp.parent, strict=True):
        if parent is None:
            name, m = slot.path, model._modules.get(slot.path)
        elif type(where) is int:  # a Sequential's child, by position (its length is checked)
            key, m = list(found[parent]._modules.items())[where]
            name = f"{plan.slots[parent].path}.{key}"
        else:
            name, m = slot.path, found[parent]._modules.get(where)
        rule = _RULES[slot.role]
        problem = _call_problem(m, rule) or _slot_problem(m, rule, slot.args)
        if problem:
            return name, problem
        if rule.batch is not None and rule.batch((m.__dict__,), _subscript):
            batch[0] = True
        found.append(m)
    return comp.limit if kernels else None


def _explain(model, kernels: bool = True) -> FusedSupport:
    """The readable (and dynamo-traceable) check: the verdict with its module and reason."""
    batch = [False]
    problem = _model_problem(model, batch, kernels)
    if problem is None:
        return _TRAIN if batch[0] else _EVAL
    name, reason = problem
    if not batch[0]:  # the walk stopped early: the mode of every BatchNorm-like module there is
        batch[0] = any(
            m.training or getattr(m, "running_mean", None) is None for m in model.modules() if isinstance(m, _BatchNorm)
        )
    return FusedSupport(False, "train" if batch[0] else "eval", name, reason)


# ------------------------------------------------------------------ the fast check
# The same rules, compiled per plan (``_Compiled``) so that the common, supported case spends as
# little interpreter time as possible (it runs on every forward): the structure is gathered level
# by level with ``map`` over ``itemgetter``s (C loops, no per-module bytecode), and each group of
# rows with the same attributes is read from the modules' ``__dict__``s by one ``itemgetter``.
# A mismatch (or a missing key) only means "ask ``_explain``", which has the final word.
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
_dict_of = attrgetter("__dict__")
_modules_of = itemgetter("_modules")
_FORWARD, _CALL_IMPL = repeat("forward"), repeat("_call_impl")  # endless: safe to share
_CHECK_CHANNELS = repeat("_check_non_zero_input_channels")
_process_group_of = itemgetter("process_group")
_AS_PLAIN = {nn.SyncBatchNorm: nn.BatchNorm2d}  # what a SyncBatchNorm stands in for
_get_arch = itemgetter(*ARCH_NAMES)
# ``map(_call, fs, xs)``: each ``fs[i](xs[i])`` in C (``operator.call`` from Python 3.11 on)
_call = getattr(operator, "call", itemgetter.__call__)

_Handle = getattr(torch.utils.hooks, "RemovableHandle", None)
if type(getattr(_Handle, "next_id", None)) is not int:  # another torch: no stamp, hooks always read
    _Handle = None


def _picker(indices):
    """``itemgetter(*indices)`` that always returns a tuple (also for zero or one index)."""
    indices = tuple(indices)
    if len(indices) > 1:
        return itemgetter(*indices)
    if indices:
        i = indices[0]
        return lambda seq: (seq[i],)
    return lambda seq: ()


def _group_picker(indices):
    """An ``itemgetter`` that returns a tuple: a lone index is read twice (for what is compared
    or tested, the same module twice changes nothing)."""
    indices = tuple(indices)
    return itemgetter(*(indices * 2 if len(indices) == 1 else indices))


class _Compiled:
    """``_RULES`` applied to one plan, for both checks.

    ``parent``: per slot, ``(None, None)`` for a child of the model, else the index of its parent
    slot and its key there (a position for a Sequential's children): how ``_explain`` finds it.

    The fast check gathers ``mods``: the top-level slots' modules (an ``itemgetter`` on the
    model's ``_modules``), then the named children of those (``DoubleConv.conv``,
    ``NearestConvUp.conv``), then every Sequential's children by position (``dict.values``, so
    an added module changes the length). The modules with rows form groups (one per type and
    set of row attributes), each read with one ``itemgetter`` (``getters``) and compared with
    what a tree as the reference builds it holds (``cfg``); ``over_groups``/``over_names``: the
    methods a type's call runs besides ``forward``, per module of those groups, aligned with
    ``chain`` over the groups' dicts; ``requires`` the parameters that must be set, ``modes`` the
    modules that can put the model on the training form (each a group's index, or a picker);
    ``patch_classes``/``patch_names``/``originals``: the methods the plan's modules' calls run,
    with the functions seen at import; ``paths``: the plan path of each module of ``mods`` (what
    the executors look them up by).
    """

    __slots__ = ("plan", "parent", "top", "parents", "kid", "seqs", "lens", "types", "getters", "group_pickers", "cfg",
                 "over_groups", "over_names", "requires", "modes", "bns", "model_mode", "patch_classes",
                 "patch_names", "originals", "paths", "limit", "verdicts")  # fmt: skip

    def __init__(self, plan: Plan):
        self.plan = plan
        slots = plan.slots
        where = {s.path: i for i, s in enumerate(slots)}
        self.parent = []
        for s in slots:
            head, _, last = s.path.rpartition(".")
            p = where.get(head)
            self.parent.append((None, None) if p is None else (p, int(last) if _RULES[slots[p].role].holds else last))
        top = [i for i, (p, _) in enumerate(self.parent) if p is None]
        kids = [i for i, (p, k) in enumerate(self.parent) if p is not None and type(k) is str]
        seqs = [i for i, s in enumerate(slots) if _RULES[s.role].holds]
        leaves = [i for q in seqs for i, (p, _) in enumerate(self.parent) if p == q]
        (kid_key,) = {self.parent[i][1] for i in kids}  # one child name ("conv"): one itemgetter
        order = top + kids + leaves
        at = {slot: i for i, slot in enumerate(order)}
        self.top = itemgetter(*(slots[i].path for i in top))
        self.kid = itemgetter(kid_key)
        self.parents = _picker(top.index(self.parent[i][0]) for i in kids)
        self.seqs = _picker(at[i] for i in seqs)
        self.lens = tuple(len(slots[i].args) for i in seqs)
        self.types = tuple(_RULES[slots[i].role].type for i in order)
        groups: dict[tuple, tuple[list, list]] = {}  # (type, row attributes) -> (modules, wants)
        requires: dict[str, list] = {}
        modes: dict[Callable, list] = {}
        for i in order:
            rule = _RULES[slots[i].role]
            rows = () if rule.holds else rule.rows(*slots[i].args)
            # every type whose call runs more than ``forward`` has rows, so its group checks those
            assert rows or len(_CALLED[rule.type]) == 1, rule
            if rows:
                picked, wants = groups.setdefault((rule.type, tuple(r[0] for r in rows)), ([], []))
                picked.append(at[i])
                wants.append({r[0]: r[2] for r in rows})
            for name, _ in rule.requires:
                requires.setdefault(name, []).append(at[i])
            if rule.batch is not None:
                modes.setdefault(rule.batch, []).append(at[i])
        self.getters = tuple(itemgetter(*attrs) for _, attrs in groups)
        # a lone module is read twice (_group_picker), so its wants are doubled
        wants = [w * 2 if len(w) == 1 else w for _, w in groups.values()]
        self.group_pickers = tuple(_group_picker(picked) for picked, _ in groups.values())
        self.cfg = tuple(tuple(map(get, w)) for get, w in zip(self.getters, wants, strict=True))
        over_groups, over_names = [], []
        for g, ((cls, _), w) in enumerate(zip(groups, wants, strict=True)):
            for name in _CALLED[cls][1:]:  # ``forward`` is checked on every module
                over_groups.append(g)
                over_names += [name] * len(w)
        self.over_groups, self.over_names = _picker(over_groups), tuple(over_names)
        # requires and modes read the dicts of their modules' group when it is exactly those
        # modules (a BatchNorm's, a ConvTranspose2d's), else pick them
        by_members = {tuple(picked): g for g, (picked, _) in enumerate(groups.values())}

        def members(v):
            g = by_members.get(tuple(v))
            return g if g is not None else _group_picker(v)

        self.requires = tuple((members(v), itemgetter(name)) for name, v in requires.items())
        self.modes = tuple((fn, members(v)) for fn, v in modes.items())
        self.bns = _picker(modes.get(_bn_batch, ()))
        self.model_mode = plan.norm != "batch"
        called = {t for s in slots for t in (*_RULES[s.role].also, _RULES[s.role].type)} | {nn.Module}
        patches = [(cls, name) for cls, name in _PATCHABLE if cls in called]
        self.patch_classes, self.patch_names = tuple(c for c, _ in patches), tuple(n for _, n in patches)
        self.originals = tuple(map(_ORIGINAL_OF.get, patches))
        self.paths = tuple(slots[i].path for i in order)
        self.limit = _fused_limit(plan)
        # (eval, train) with the kernels' limits, then without (``kernels=False``)
        limited = tuple(FusedSupport(False, mode, *self.limit) for mode in ("eval", "train")) if self.limit else None
        self.verdicts = (limited or (_EVAL, _TRAIN), (_EVAL, _TRAIN))


_COMPILED: dict[tuple, _Compiled] = {}


def _compiled(plan: Plan) -> _Compiled:
    comp = _COMPILED.get(plan.key)
    if comp is None or comp.plan is not plan:
        comp = _COMPILED[plan.key] = _Compiled(plan)
    return comp


# model -> (mods, their __dict__s, hook stamp, cfg, _Compiled, the groups' dicts, the overrides'
# dicts) of its last supported verdict
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast(model, kernels: bool = True) -> FusedSupport | None:
    """The verdict when the module tree is the plan's, else None (then ``_explain`` decides and
    says why). With ``kernels``, a plan the fused kernels do not implement gets its refusal."""
    g = _module_globals
    if (
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    ):
        return None
    md = model.__dict__
    try:
        key = _get_arch(md)
        comp = _COMPILED.get(key)
        if comp is None:
            plan = build_plan(key)
            if plan is None:
                return None
            comp = _compiled(plan)
        if tuple(map(getattr, comp.patch_classes, comp.patch_names)) != comp.originals:
            return None
        # The structure, as the forward would reach it.
        top = comp.top(md["_modules"])
        both = top + tuple(map(comp.kid, map(_modules_of, map(_dict_of, comp.parents(top)))))
        layers = tuple(map(_modules_of, map(_dict_of, comp.seqs(both))))
        if tuple(map(len, layers)) != comp.lens:
            return None
        mods = both + tuple(chain.from_iterable(map(dict.values, layers)))
        types = tuple(map(type, mods))
        synced = types != comp.types  # then only if some BatchNorm is a SyncBatchNorm
        if synced and tuple(map(_AS_PLAIN.get, types, types)) != comp.types:
            return None
        stamp = _Handle.next_id if _Handle is not None else None  # read before the hooks are
        memo = _MEMO.get(model)
        if memo is not None and memo[4] is comp and memo[0] == mods:  # the same plan and module objects
            dicts, hooks_seen = memo[1], memo[2] is not None and memo[2] == stamp
            groups, over_ds = memo[5], memo[6]  # picked from the same dicts: still theirs
        else:
            memo, dicts, hooks_seen = None, tuple(map(_dict_of, mods)), False
            # per group of rows, its modules' dicts; the dicts the overrides are looked up in
            groups = tuple(map(_call, comp.group_pickers, repeat(dicts)))
            over_ds = tuple(chain.from_iterable(comp.over_groups(groups)))
        if not hooks_seen and any(chain.from_iterable(map(_get_hooks, dicts))):
            return None
        cfg = tuple(map(tuple, map(map, comp.getters, groups)))  # each group read by its getter, in C
        same_cfg = memo is not None and cfg == memo[3]  # identity hits: values unchanged since then
        if not same_cfg and cfg != comp.cfg:
            return None
        if (
            any(map(contains, dicts, _FORWARD))
            or any(map(contains, dicts, _CALL_IMPL))
            or any(map(contains, over_ds, comp.over_names))
        ):
            return None
        for members, get in comp.requires:  # a parameter the fused op needs is None
            ds = groups[members] if type(members) is int else members(dicts)
            if any(map(_is_none, map(get, map(_params_of, ds)))):
                return None
        if synced:
            sync_d = [d for m, d in zip(comp.bns(mods), comp.bns(dicts), strict=True) if type(m) is nn.SyncBatchNorm]
            pgs = map(_process_group_of, sync_d)  # not ``groups``: the modes below read those
            if any(map(contains, sync_d, _CHECK_CHANNELS)) or not all(
                pg is None or isinstance(pg, ProcessGroup) for pg in pgs
            ):
                return None
        batch = comp.model_mode and md["training"]
        if not batch:
            for fn, members in comp.modes:
                if fn(groups[members] if type(members) is int else members(dicts)):
                    batch = True
                    break
    except (KeyError, TypeError):  # a missing module, attribute or buffer: let _explain say which
        return None
    if not (same_cfg and hooks_seen):
        _MEMO[model] = (mods, dicts, stamp, cfg, comp, groups, over_ds)
    return comp.verdicts[not kernels][bool(batch)]


# ------------------------------------------------------------------ the layers the executors read
class FusedLayers(NamedTuple):
    """The modules of a model the guard accepted, by the paths its plan names them: ``mods[path]``
    and its ``__dict__`` ``dicts[path]`` (parameters and buffers are read from
    ``_parameters``/``_buffers`` there without ``nn.Module.__getattr__``). ``conv_dicts``,
    ``norm_dicts``, ``up_dicts``, ``head_dict``: the ``__dict__``s of the modules with weights,
    in the plan's orders (norms only where there is one; ups only where they have weights).
    """

    plan: Plan
    mods: dict
    dicts: dict
    conv_dicts: tuple
    norm_dicts: tuple
    up_dicts: tuple
    head_dict: dict

    def norm(self, conv: Conv) -> nn.Module | None:
        """The norm module after ``conv`` (a ``plan.Conv``), None where there is none."""
        return None if conv.norm_kind == "none" else self.mods[conv.norm]

    def parameters(self) -> list:
        """Every parameter the executors read (what a training forward's gradients flow to)."""
        dicts = (*self.conv_dicts, *self.norm_dicts, *self.up_dicts, self.head_dict)
        return [p for d in dicts for p in d["_parameters"].values() if p is not None]

    def sources(self) -> tuple[tuple, tuple]:
        """Every tensor the executors' prepared weights derive from, read from the layers'
        ``__dict__``s (absent ones, e.g. a bias-free conv's bias, left out), and the norms'
        epsilons: what decides whether prepared weights are still current."""
        conv_p = tuple(map(_params_of, self.conv_dicts))
        norm_p = tuple(map(_params_of, self.norm_dicts))
        norm_b = tuple(map(_buffers_of, self.norm_dicts))
        up_p = tuple(map(_params_of, self.up_dicts))
        head_p = _params_of(self.head_dict)
        tensors = (
            *map(_weight_of, conv_p), *map(_bias_of, conv_p), *map(_weight_of, norm_p), *map(_bias_of, norm_p),
            *map(_running_mean_of, norm_b), *map(_running_var_of, norm_b), *map(_weight_of, up_p),
            *map(_bias_of, up_p), _weight_of(head_p), _bias_of(head_p),
        )  # fmt: skip
        if type(None) in map(type, tensors):  # rare (affine=False, bias=False, ...): drop the holes
            tensors = tuple(t for t in tensors if t is not None)
        return tensors, tuple(map(_eps_of, self.norm_dicts))


def _fused_layers(plan: Plan, mods: dict) -> FusedLayers:
    dicts = {path: m.__dict__ for path, m in mods.items()}

    def pick(paths):
        return tuple(dicts[p] for p in paths)

    return FusedLayers(
        plan, mods, dicts, pick(c.conv for c in plan.convs), pick(c.norm for c in plan.convs if c.norm_kind != "none"),
        pick(u.params for u in plan.ups if u.params is not None), dicts[plan.head.path],
    )  # fmt: skip


def walk_layers(model, plan: Plan) -> FusedLayers:
    """The layers of ``plan`` by attribute access: what ``torch.compile`` traces (the guard keeps
    no memo there) and the fallback when there is no memo. Call it on a model the guard accepted."""

    def get(path):
        m = model
        for part in path.split("."):
            m = getattr(m, part)
        return m

    return _fused_layers(plan, {slot.path: get(slot.path) for slot in plan.slots})


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
    mods = memo[0]
    cached = _LAYERS.get(model)
    if cached is not None and cached[0] is mods:
        return cached[1]
    comp = memo[4]
    layers = _fused_layers(comp.plan, dict(zip(comp.paths, mods, strict=True)))
    _LAYERS[model] = (mods, layers)
    return layers


def layers_of(model) -> FusedLayers:
    """The layers of ``model`` (a model the guard accepted just now): the memo's, else by
    attribute access."""
    return fused_layers(model) or walk_layers(model, plan_of(model))


def check_fused_support(model, *, kernels: bool = True) -> FusedSupport:
    """Whether the fused path implements ``model`` (a ``UNet``) exactly, and in which mode.

    Returns a ``FusedSupport``; see the module docstring for the rules. Cheap enough to run on
    every forward (about 20 us for an unchanged classic ``UNet(3, 1)``). ``kernels=False`` asks
    only whether the module tree is the plan's (what the CPU fold needs), not whether the fused
    kernels implement every step.
    """
    if not torch.compiler.is_compiling():
        verdict = _fast(model, kernels)
        if verdict is not None:
            return verdict
        _MEMO.pop(model, None)  # let go of modules this model may no longer hold
    return _explain(model, kernels)


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
