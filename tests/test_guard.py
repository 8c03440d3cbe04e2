"""The fused path's guard (``fastunet.guard``): a model the fused path does not implement exactly
(a hook, a swapped, subclassed or parametrized module, a changed attribute, ...) runs the eager
path instead, with one ``FusedPathWarning`` per model and reason naming the module, and gives
exactly what the eager reference model with the same modification gives. The unmodified model
takes the fused path without a word.

Every case runs in float64 (the eager path is exact; the fused path's ops run their composites)
with the fused path forced, in eval and in train mode. At the end, the CPU fallback's use of the
guard (whether an eval forward may fold BatchNorm, ``fastunet.cpu_fold``). No timing here: the
guard's cost per forward is printed by ``benchmarks/guard_cost.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from helpers import assert_close, model_pair
from torch import nn
from torch.nn.modules import module as module_globals

import fastunet
from fastunet import FusedPathWarning, check_fused_support
from fastunet.guard import _explain, _fast

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("triton_backend")]

# depth 2: conv1, pool1, conv2, pool2, conv3 (bottleneck), up4, conv4, up5, conv5, head conv6
NARROW = {"base_channels": 4, "depth": 2}
MODES = pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])


def pair(train: bool):
    """(float64 reference, float64 UNet) with the same random weights and BatchNorm state."""
    ref, model = model_pair(3, 2, **NARROW)
    return ref.train(train), model.train(train)


def fused_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FusedPathWarning)]


# ------------------------------------------------------------------ modifications
# Each applies one modification to a model (the reference or the UNet alike) and returns it;
# ``log`` collects what that model's hooks saw.


class FrozenBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass that always normalizes with its running statistics."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class LoggingSyncBatchNorm(nn.SyncBatchNorm):
    """A SyncBatchNorm subclass (whatever it adds, the fused path would not call it)."""


def sync_batchnorm_subclass(m, log):
    old = m.conv1.conv[1]
    new = LoggingSyncBatchNorm(old.num_features).to(old.weight.dtype).train(old.training)
    new.load_state_dict(old.state_dict())
    m.conv1.conv[1] = new
    return m


def sync_batchnorm_bad_group(m, log):
    m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    m.conv3.conv[4].process_group = "default"  # not a ProcessGroup: the fused path cannot resolve it
    return m


def forward_hook(m, log):
    m.conv2.conv[2].register_forward_hook(lambda mod, args, out: log.append("forward") or out * 0.5)
    return m


def forward_pre_hook(m, log):
    m.conv1.conv[3].register_forward_pre_hook(lambda mod, args: log.append("pre") or (args[0] * 2,))
    return m


def full_backward_hook(m, log):
    m.up4.register_full_backward_hook(lambda mod, gin, gout: log.append("backward"))
    return m


def full_backward_pre_hook(m, log):
    m.conv5.conv[3].register_full_backward_pre_hook(lambda mod, gout: log.append("backward pre") or (gout[0] * 3,))
    return m


def relu_to_gelu(m, log):
    m.conv1.conv[2] = nn.GELU()
    return m


def reflect_padding(m, log):
    m.conv2.conv[0].padding_mode = "reflect"
    return m


def dilation(m, log):
    conv = m.conv3.conv[3]
    conv.dilation, conv.padding = (2, 2), (2, 2)  # same output size, different math
    return m


def batchnorm_subclass(m, log):
    old = m.conv4.conv[4]
    new = FrozenBatchNorm(old.num_features).to(old.weight.dtype).train(old.training)
    new.load_state_dict(old.state_dict())
    m.conv4.conv[4] = new
    return m


def instance_forward(m, log):
    conv = m.conv1.conv[0]
    conv.forward = lambda x: nn.Conv2d.forward(conv, x) + 0.25
    return m


def weight_norm(m, log):
    torch.nn.utils.parametrizations.weight_norm(m.conv2.conv[3])
    return m


def prune(m, log):
    torch.nn.utils.prune.l1_unstructured(m.conv1.conv[0], "weight", amount=0.5)  # a forward pre-hook
    return m


def maxpool_ceil_mode(m, log):
    m.pool1.ceil_mode = True  # even sizes: no effect on the result, still not what the kernel implements
    return m


def upconv_without_bias(m, log):
    m.up5.bias = None
    return m


def extra_layer(m, log):
    m.conv2.conv.append(nn.Tanh())
    return m


def unknown_out_activation(m, log):
    m.out_activation = "tanh"  # the reference math treats an unknown name as identity
    return m


@dataclass(frozen=True)
class Case:
    modify: Callable
    module: str  # the name the verdict and the warning give
    reason: str  # a fragment of the reason
    fires: tuple = ()  # what the hooks log in one forward + backward

    def __str__(self):
        return self.modify.__name__


CASES = [
    Case(sync_batchnorm_subclass, "conv1.conv.1", "LoggingSyncBatchNorm, a subclass of exactly nn.SyncBatchNorm"),
    Case(sync_batchnorm_bad_group, "conv3.conv.4", "process_group='default'"),
    Case(forward_hook, "conv2.conv.2", "forward hook", ("forward",)),
    Case(forward_pre_hook, "conv1.conv.3", "forward pre-hook", ("pre",)),
    Case(full_backward_hook, "up4", "backward hook", ("backward",)),
    Case(full_backward_pre_hook, "conv5.conv.3", "backward pre-hook", ("backward pre",)),
    Case(relu_to_gelu, "conv1.conv.2", "GELU, not exactly nn.ReLU"),
    Case(reflect_padding, "conv2.conv.0", "padding_mode='reflect'"),
    Case(dilation, "conv3.conv.3", "dilation=(2, 2)"),
    Case(batchnorm_subclass, "conv4.conv.4", "FrozenBatchNorm, a subclass of exactly nn.BatchNorm2d"),
    Case(instance_forward, "conv1.conv.0", "overrides forward"),
    Case(weight_norm, "conv2.conv.3", "ParametrizedConv2d, a subclass of exactly nn.Conv2d"),
    Case(prune, "conv1.conv.0", "forward pre-hook"),
    Case(maxpool_ceil_mode, "pool1", "ceil_mode=True"),
    Case(upconv_without_bias, "up5", "no bias"),
    Case(extra_layer, "conv2.conv", "holds 7 modules"),
    Case(unknown_out_activation, "", "out_activation='tanh'"),
]


def assert_same_step(model, ref, x, train: bool, what: str):
    """One forward + backward of both: output, input gradient and (train) BatchNorm buffers agree."""
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = model(xm)
    yr = ref(xr)
    assert_close(y, yr, "fp64", f"{what}: output")
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(xm.grad, xr.grad, "fp64", f"{what}: input grad")
    if train:
        for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
            assert_close(bm, br, "fp64", f"{what}: {name}", scale=1.0)
    return record


@MODES
@pytest.mark.parametrize("case", CASES, ids=str)
def test_unsupported_model_runs_eager_path_with_one_warning(case, train, fused_calls):
    ref, model = pair(train)
    ref_log, log = [], []
    ref, model = case.modify(ref, ref_log), case.modify(model, log)

    verdict = check_fused_support(model)
    assert not verdict.supported
    assert (verdict.module, verdict.mode) == (case.module, "train" if train else "eval")
    assert case.reason in verdict.reason
    assert _fast(model) is None  # the fast check never accepts what the readable one refuses

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    buffers_before = [b.clone() for b in model.buffers()]
    record = assert_same_step(model, ref, x, train, str(case))
    messages = fused_warnings(record)
    assert len(messages) == 1, messages
    where = f"module '{case.module}' " if case.module else ""
    assert f"{where}{verdict.reason}" in messages[0] and "eager path" in messages[0]
    assert [w.filename for w in record if w.category is FusedPathWarning] == [__file__]  # points at model(x)
    assert fused_calls == []
    assert log == ref_log == list(case.fires)
    if train:  # the eager path's BatchNorms (SyncBatchNorms included) updated their running statistics
        assert any(not torch.equal(a, b) for a, b in zip(buffers_before, model.buffers(), strict=True))


@MODES
@pytest.mark.parametrize(
    "register, fires",
    [
        (module_globals.register_module_forward_hook, "forward"),
        (module_globals.register_module_forward_pre_hook, "forward"),
        (module_globals.register_module_full_backward_hook, "backward"),
    ],
    ids=["forward", "forward_pre", "full_backward"],
)
def test_global_module_hook(register, fires, train, fused_calls):
    ref, model = pair(train)
    for m in (*ref.modules(), *model.modules()):
        if isinstance(m, nn.ReLU):  # a full backward hook on an in-place ReLU is an error in eager PyTorch
            m.inplace = False
    seen = []
    handle = register(lambda mod, *args: seen.append(type(mod)))
    try:
        verdict = check_fused_support(model)
        assert not verdict.supported and verdict.module == "" and register.__name__ in verdict.reason
        record = assert_same_step(model, ref, torch.randn(2, 3, 8, 8, dtype=torch.float64), train, "global hook")
    finally:
        handle.remove()
    messages = fused_warnings(record)
    assert len(messages) == 1 and "global module hook" in messages[0]
    assert fused_calls == []
    assert nn.Conv2d in seen and nn.ReLU in seen  # fired for submodules, on both models
    assert check_fused_support(model).supported  # removed: back to the fused path


@MODES
def test_class_patch(monkeypatch, train, fused_calls):
    ref, model = pair(train)
    original = nn.ReLU.forward
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: original(self, x) - 0.1)
    verdict = check_fused_support(model)
    assert not verdict.supported and verdict.module == "" and "ReLU.forward" in verdict.reason
    record = assert_same_step(model, ref, torch.randn(2, 3, 8, 8, dtype=torch.float64), train, "patched ReLU")
    assert len(fused_warnings(record)) == 1
    assert fused_calls == []


# ------------------------------------------------------------------ the supported model
@MODES
def test_unmodified_model_takes_fused_path_silently(train, fused_calls):
    ref, model = pair(train)
    verdict = check_fused_support(model)
    assert verdict.supported and verdict.mode == ("train" if train else "eval")
    assert verdict.module is None and verdict.reason is None
    assert _fast(model) == _explain(model) == verdict
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model(x)
    assert fused_calls == [1]
    assert_close(y, ref(x), "fp64", "fused output")


def _relu_not_inplace(m):
    m.conv1.conv[2].inplace = False


def _int_stride(m):
    m.conv2.conv[0].stride = 1


def _same_padding(m):
    m.conv3.conv[0].padding = "same"


def _pool_tuple_kernel(m):
    m.pool2.kernel_size = (2, 2)


def _head_reflect_padding(m):
    m.conv6.padding_mode = "reflect"  # padding 0: nothing to pad


def _bn_settings(m):
    bn = m.conv2.conv[1]
    bn.eps, bn.momentum = 1e-3, None


def _conv_without_bias(m):
    m.conv4.conv[0].bias = None


def _submodule_compiled(m):
    m.conv1.conv[0].compile()  # the same computation; never called on the fused path


def _sync_batchnorm(m):
    # Without torch.distributed initialised a SyncBatchNorm is a BatchNorm2d: the fused path runs
    # it (tests/test_syncbn.py covers the synchronised case across ranks).
    return nn.SyncBatchNorm.convert_sync_batchnorm(m)


def _some_sync_batchnorms(m):
    m.conv2.conv[4] = nn.SyncBatchNorm.convert_sync_batchnorm(m.conv2.conv[4])  # a mix of both kinds
    return m


@MODES
@pytest.mark.parametrize(
    "modify",
    [
        _relu_not_inplace,
        _int_stride,
        _same_padding,
        _pool_tuple_kernel,
        _head_reflect_padding,
        _bn_settings,
        _conv_without_bias,
        _submodule_compiled,
        _sync_batchnorm,
        _some_sync_batchnorms,
    ],
)
def test_equivalent_spellings_stay_fused(modify, train, fused_calls):
    """What the kernels implement however it is written: no warning, the fused path, the same
    numbers as the reference modified alike."""
    ref, model = pair(train)
    ref = modify(ref) or ref
    model = modify(model) or model
    verdict = check_fused_support(model)
    assert verdict.supported and verdict.mode == ("train" if train else "eval")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedPathWarning)
        y = model(x)
    assert fused_calls == [1]
    assert_close(y, ref(x), "fp64", modify.__name__)


@MODES
@pytest.mark.parametrize("modify", [_sync_batchnorm, _some_sync_batchnorms])
def test_the_fast_check_answers_for_sync_batchnorms_itself(modify, train):
    """A SyncBatchNorm without a process group is the fast check's to accept (not a fall-back
    to the readable check on every forward), the first time and from its memo."""
    _, model = pair(train)
    model = modify(model)
    assert _fast(model) == _fast(model) == _explain(model) == check_fused_support(model)
    assert _fast(model).supported
    model.conv3.conv[1].train(not train)  # one norm's mode flipped: the memo's dicts are read again
    assert _fast(model) == _explain(model) and _fast(model).mode == "train"


def test_mode_follows_every_batchnorm():
    _, model = pair(False)
    assert check_fused_support(model).mode == "eval"
    model.conv3.conv[4].train()  # one BatchNorm on batch statistics
    assert check_fused_support(model).mode == "train"
    model.conv3.conv[4].eval()
    assert check_fused_support(model).mode == "eval"
    model.conv2.conv[1].running_mean = None  # no running statistics: batch statistics in eval too
    model.conv2.conv[1].running_var = None
    assert check_fused_support(model) == _explain(model)
    assert check_fused_support(model).mode == "train"
    _, model = pair(True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # a training model with frozen BatchNorms
    assert check_fused_support(model).mode == "eval"


# ------------------------------------------------------------------ once per instance, and later changes
def test_one_warning_per_instance_and_reason(fused_calls):
    _, model = pair(False)
    forward_hook(model, [])
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(x)
        model(x)  # same model, same reason: silent
        relu_to_gelu(model, [])  # another reason: one more warning
        model(x)
        model(x)
        _, other = pair(False)  # another instance, the first reason again: warns
        forward_hook(other, [])
        other(x)
    messages = fused_warnings(record)
    assert len(messages) == 3, messages
    assert "'conv2.conv.2' has a forward hook" in messages[0]
    assert "'conv1.conv.2' is a GELU" in messages[1]
    assert "'conv2.conv.2' has a forward hook" in messages[2]
    assert fused_calls == []


@pytest.mark.parametrize("case", CASES, ids=str)
def test_change_after_a_fused_forward_is_seen(case):
    """The fast check keeps a per-model memo; a change made after a supported verdict (a hook, a
    swapped module, a changed attribute, a parametrization) must still be seen."""
    _, model = pair(False)
    assert check_fused_support(model).supported
    assert check_fused_support(model).supported  # from the memo
    model = case.modify(model, [])
    verdict = check_fused_support(model)
    assert not verdict.supported and verdict.module == case.module and case.reason in verdict.reason


def test_removed_hook_restores_fused_path(fused_calls):
    ref, model = pair(False)
    handle = model.conv3.conv[5].register_forward_hook(lambda mod, args, out: out)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(FusedPathWarning, match="'conv3.conv.5' has a forward hook"):
        model(x)
    assert fused_calls == []
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedPathWarning)
        y = model(x)
    assert fused_calls == [1]
    assert_close(y, ref(x), "fp64", "after the hook is removed")


def test_swapped_back_module_is_fused_again():
    _, model = pair(False)
    relu = model.conv1.conv[2]
    model.conv1.conv[2] = nn.GELU()
    assert not check_fused_support(model).supported
    model.conv1.conv[2] = relu
    assert check_fused_support(model).supported


# ------------------------------------------------------------------ the CPU fallback
# On CPU ("auto" backend) the guard decides whether an eval forward may fold BatchNorm into the
# convs (fastunet.cpu_fold); training, and eval with gradients for the parameters, run the module
# tree without asking it. Either way no FusedPathWarning: the module tree is the reference math.
@pytest.fixture
def cpu_fallback(monkeypatch):
    """The "auto" backend (restored by ``triton_backend``); returns the folded forwards run."""
    fastunet.set_backend("auto")
    runs = []
    original = fastunet.cpu_fold.run

    def spy(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fastunet.cpu_fold, "run", spy)
    return runs


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_cpu_fallback_training_never_runs_the_guard(monkeypatch, fused_calls, cpu_fallback, no_grad):
    """Training on CPU runs the module tree directly: no guard, no fold, no warning; the hook fires
    and the BatchNorms update their running statistics."""

    def guard_called(model):
        raise AssertionError("the guard ran on the CPU fallback in training")

    monkeypatch.setattr(fastunet.model, "check_fused_support", guard_called)
    ref, model = pair(True)
    ref_log, log = [], []
    forward_hook(ref, ref_log)
    forward_hook(model, log)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(), torch.set_grad_enabled(not no_grad):
        warnings.simplefilter("error")
        y = model(x)
        assert_close(y, ref(x), "fp64", "CPU fallback, training")
    assert log == ref_log == ["forward"]
    for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(bm, br), name
    assert fused_calls == [] and cpu_fallback == []


def test_cpu_fallback_eval_with_parameter_grads_never_runs_the_guard(monkeypatch, fused_calls, cpu_fallback):
    """Eval with autograd on and trainable parameters: the fold would detach them, so the module
    tree runs, and the guard is not asked."""

    def guard_called(model):
        raise AssertionError("the guard ran although the fold cannot be used")

    monkeypatch.setattr(fastunet.model, "check_fused_support", guard_called)
    ref, model = pair(False)
    assert_same_step(model, ref, torch.randn(2, 3, 8, 8, dtype=torch.float64), False, "eval, parameter grads")
    assert fused_calls == [] and cpu_fallback == []


def test_cpu_fallback_eval_folds_the_supported_model(fused_calls, cpu_fallback):
    ref, model = pair(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        y = model(x)
    assert_close(y, ref(x), "fp64", "folded CPU fallback")
    assert cpu_fallback == [1] and fused_calls == []


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_fallback_eval_unsupported_runs_the_module_tree(case, fused_calls, cpu_fallback):
    """Whatever the guard refuses runs the module tree on CPU in eval, exactly the reference's
    with the same modification, silently (the eager path here is the plain CPU fallback)."""
    ref, model = pair(False)
    ref_log, log = [], []
    ref, model = case.modify(ref, ref_log), case.modify(model, log)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        y = model(x)
        assert torch.equal(y, ref(x))
    assert log == ref_log
    assert fused_calls == [] and cpu_fallback == []


@pytest.mark.slow
def test_compiled_model_with_hook_and_later_swap():
    """Under ``torch.compile(fullgraph=True)`` the guard is traced: a hooked model compiles the
    eager path (the hook fires), and a module swapped after compiling triggers a recompile
    through dynamo's guards on what the guard read. (Dynamo cannot trace ``warnings.warn``: no
    warning under compile.)"""
    torch._dynamo.reset()
    ref, model = pair(False)
    ref_log, log = [], []
    forward_hook(ref, ref_log)
    forward_hook(model, log)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert_close(compiled(x), ref(x), "fp64", "compiled, hooked")
    assert log == ref_log == ["forward"]
    relu_to_gelu(ref, [])
    relu_to_gelu(model, [])
    assert_close(compiled(x), ref(x), "fp64", "compiled, then swapped")


@MODES
def test_compile_after_an_eager_forward(train):
    """The memo an eager forward leaves is not traced: ``torch.compile(fullgraph=True)`` of a
    model that already ran eagerly compiles (it used to fail on the memo's ``is`` comparisons)
    and walks the layers by attribute access."""
    torch._dynamo.reset()
    ref, model = pair(train)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x), ref(x)  # eager: fills the guard's memo (and, in train mode, steps the buffers alike)
    assert fastunet.guard.fused_layers(model) is not None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), ref(x), "fp64", "compiled after an eager forward")
