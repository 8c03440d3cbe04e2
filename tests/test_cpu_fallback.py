"""The CPU fallback's inference form (``fastunet.cpu_fold``): BatchNorm folded into the convs,
activations channels_last.

The contract: on CPU with the ``"auto"`` backend an eval-mode ``UNet`` uses the fold only when
the guard says the module tree is the classic structure, every BatchNorm uses running
statistics and no gradient has to reach a parameter; everything else (training, a hook, a
swapped module, parameter gradients, the ``"eager"`` backend) runs the module tree exactly.
Numbers are compared with a float64 reference on random data with random BatchNorm statistics
(fresh BatchNorms are the identity and would fold to nothing). Timing is not tested here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close, assert_live, model_pair
from torch import nn

import fastunet
from fastunet import cpu_fold, cpu_ops

pytestmark = pytest.mark.model

SMALL = {"base_channels": 8, "depth": 2}


@pytest.fixture(autouse=True)
def _auto_backend():
    before = fastunet.get_backend()
    fastunet.set_backend("auto")
    yield
    fastunet.set_backend(before)


@pytest.fixture
def fold_runs(monkeypatch):
    """Counts the folded forwards (``cpu_fold.run`` calls)."""
    calls = []
    original = cpu_fold.run

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_fold, "run", spy)
    return calls


@pytest.fixture
def guard_calls(monkeypatch):
    """Counts the guard's verdicts asked for by ``UNet.forward``."""
    calls = []
    original = fastunet.model.check_fused_support

    def spy(model, **kwargs):
        calls.append(1)
        return original(model, **kwargs)

    monkeypatch.setattr(fastunet.model, "check_fused_support", spy)
    return calls


def pair(dtype=torch.float64, out_activation="none", **options):
    """(float64 reference, UNet in ``dtype``) in eval mode, holding the same (rounded) weights."""
    ref, model = model_pair(3, 2, out_activation=out_activation, **{**SMALL, **options})
    model = model.to(dtype)
    ref.load_state_dict(model.state_dict())  # the reference sees the rounded weights too
    ref = ref.double().eval()
    assert_live(ref, 3, 16)  # model_pair checked it before the rounding to dtype
    return ref, model.eval()


def rand(n=2, size=32, dtype=torch.float32):
    return torch.randn(n, 3, size, size, dtype=dtype)


# ------------------------------------------------------------------ the fold, numerically
@pytest.mark.parametrize("activation", ["none", "sigmoid", "softmax"])
def test_fold_matches_float64_reference(activation, fold_runs):
    ref, model = pair(torch.float32, activation)
    x = rand()
    with torch.no_grad():
        y = model(x)
        assert_close(y, ref(x.double()), "fp32", "folded fp32 forward")
    assert fold_runs == [1]
    assert y.dtype == torch.float32 and y.is_contiguous()


@pytest.mark.parametrize(
    "options", [{"preset": "nnunet"}, {"norm": "instance", "act": "relu"}], ids=["nnunet", "instance"]
)
def test_nnunet_block_fold_matches_float64_reference(options, fold_runs):
    """nnU-Net's block on the fold: the InstanceNorm runs after its conv on each sample's
    statistics (nothing folds), then LeakyReLU(0.01); fp32 within the fp32 row."""
    ref, model = pair(torch.float32, **options)
    x = rand() * 2 + 0.5  # a mean the per-sample normalization has to remove
    with torch.no_grad():
        assert_close(model(x), ref(x.double()), "fp32", f"folded fp32 forward {options}")
    assert fold_runs == [1]


def _instance_without_affine(m):
    m.conv3.conv[4] = nn.InstanceNorm2d(m.conv3.conv[4].num_features, eps=1e-3)


def test_fold_covers_instance_norm_without_affine(fold_runs):
    ref, model = pair(torch.float64, preset="nnunet")
    _instance_without_affine(ref), _instance_without_affine(model)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), ref(x), "fp64", "InstanceNorm without affine, eps 1e-3")
    assert fold_runs == [1]


def test_float64_model_folds_in_float64(fold_runs):
    ref, model = pair(torch.float64)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), ref(x), "fp64", "folded fp64 forward")
    assert fold_runs == [1]
    plan = next(iter(cpu_fold._PLANS[model].values()))
    assert all(w.dtype == b.dtype == torch.float64 for w, b in plan.convs)


def _no_conv_bias(m):
    m.conv2.conv[0].bias = None


def _bn_without_affine(m):
    old = m.conv3.conv[4]
    new = nn.BatchNorm2d(old.num_features, affine=False).to(old.running_mean.dtype).eval()
    new.running_mean.copy_(old.running_mean)
    new.running_var.copy_(old.running_var)
    m.conv3.conv[4] = new


def _bn_eps(m):
    m.conv4.conv[1].eps = 0.1


@pytest.mark.parametrize("modify", [_no_conv_bias, _bn_without_affine, _bn_eps])
def test_fold_covers_every_batchnorm_and_bias_setting(modify, fold_runs):
    """What the guard accepts (bias-free conv, BatchNorm without affine, any eps) folds exactly."""
    ref, model = pair(torch.float64)
    modify(ref)
    modify(model)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), ref(x), "fp64", modify.__name__)
    assert fold_runs == [1]


def test_autocast_bfloat16_is_honoured(fold_runs):
    """Under CPU autocast the folded convs run in bfloat16, as the module tree's would."""
    ref, model = pair(torch.float32)
    ref32 = fastunet.UNetReference(3, 2, out_activation="none", **SMALL).eval()
    ref32.load_state_dict(model.state_dict())
    x = rand()
    with torch.no_grad():
        truth = ref(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_tree = model(x), ref32(x)
    assert fold_runs == [1]
    assert y.dtype == y_tree.dtype == torch.bfloat16
    assert_close(y, truth, "bf16", "folded forward under bf16 autocast")


def test_channels_last_input_gives_channels_last_output():
    _, model = pair(torch.float32)
    x = rand().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ which ops the fold runs
# Option sets covering every step the forms implement differently (ups of each kind, odd sizes,
# both concatenation orders, the pre-head conv, each head activation).
FORM_CASES = {
    "classic": {"out_activation": "sigmoid"},
    "nearest-pad-prehead": {"upsampling": "nearest_conv", "odd_sizes": "pad", "pre_head": 3},
    "bilinear-skipup-softmax": {"upsampling": "bilinear", "concat": "skip_up", "out_activation": "softmax"},
    "transpose-pad-nobn": {"odd_sizes": "pad", "norm": "none"},
    # nnU-Net's block: InstanceNorm between conv and activation (no fused post-op), LeakyReLU
    "nnunet": {"preset": "nnunet"},
    # LeakyReLU fused as the convs' post-op (a BatchNorm folds), the decoder's sources swapped
    "leaky-skipup": {"act": "leaky_relu", "concat": "skip_up"},
}


@pytest.fixture(params=["nnpack", "own4", "own2", "measured"])
def winograd_everywhere(request, monkeypatch):
    """One Winograd engine for every 3x3 conv of a tiny model (the measured table leaves a tiny
    model none but the own F(2x2)), so each engine's code paths (NNPACK's NCHW levels and
    concatenation buffer, the own transform's two-source decoder conv) run; "measured" is the
    table itself."""
    engine = request.param
    if engine == "nnpack" and not cpu_ops.cpu_features().nnpack:
        pytest.skip("no NNPACK in this torch")
    if engine != "measured":
        monkeypatch.setattr(cpu_ops, "conv3x3_engine", lambda c_in, height, width, nnpack=True: engine)
    before = fastunet.get_cpu_fast_math()
    fastunet.set_cpu_fast_math(True)
    yield
    fastunet.set_cpu_fast_math(before)


def _forms(monkeypatch) -> list:
    """The forms ``cpu_fold.run`` picks, recorded."""
    seen = []
    original = cpu_fold.form_for
    monkeypatch.setattr(cpu_fold, "form_for", lambda plan, x: seen.append(original(plan, x)) or seen[-1])
    return seen


@pytest.mark.parametrize("case", list(FORM_CASES))
@pytest.mark.skipif(not cpu_ops.cpu_features().prepack, reason="no prepacked oneDNN convolutions in this torch")
def test_prepacked_form_matches_float64_reference(case, monkeypatch):
    ref, model = pair(torch.float32, **FORM_CASES[case])
    forms = _forms(monkeypatch)
    x = rand(size=37) if model.odd_sizes == "pad" else rand()
    with torch.no_grad():
        y = model(x)
    assert [type(f) for f in forms] == [cpu_fold.PackedForm]
    expected = ref(x.double())
    assert (y.double() - expected).abs().max().item() <= 1e-4
    assert_close(y, expected, "fp32", f"{case}, prepacked")


@pytest.mark.parametrize("case", list(FORM_CASES))
@pytest.mark.skipif(not cpu_ops.cpu_features().prepack, reason="no prepacked oneDNN convolutions in this torch")
def test_fast_math_form_matches_float64_within_its_row(case, monkeypatch, winograd_everywhere):
    ref, model = pair(torch.float32, **FORM_CASES[case])
    forms = _forms(monkeypatch)
    x = rand(size=37) if model.odd_sizes == "pad" else rand()
    with torch.no_grad():
        y = model(x)
        assert [type(f) for f in forms] == [cpu_fold.WinogradForm]
        assert_close(y, ref(x.double()), "winograd", f"{case}, fast math")
        fastunet.set_cpu_fast_math(False)
        model(x)
    assert type(forms[-1]) is cpu_fold.PackedForm  # off again: the exact form


@pytest.mark.parametrize("case", ["classic", "leaky-skipup"])
@pytest.mark.skipif(not cpu_ops.cpu_features().prepack, reason="no prepacked oneDNN convolutions in this torch")
def test_fast_math_channels_last_input(case, monkeypatch, winograd_everywhere):
    """A channels_last input through each engine: the output within the row, channels_last."""
    ref, model = pair(torch.float32, **FORM_CASES[case])
    x = rand(size=36).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref(x.double()), "winograd", f"{case}, fast math, channels_last")


def test_fast_math_switch_is_checked():
    with pytest.raises(TypeError):
        fastunet.set_cpu_fast_math(1)
    assert fastunet.get_cpu_fast_math() in (True, False)


def test_plain_form_where_the_primitives_cannot_run(monkeypatch):
    """float64, a gradient for the input, mkldnn switched off, or the private ops missing: the
    plain fold (F.conv2d), with no warning."""
    forms = _forms(monkeypatch)
    ref, model = pair(torch.float32)
    model.requires_grad_(False)
    x = rand()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x.clone().requires_grad_())  # input gradient: autograd through F.conv2d
        with torch.no_grad():
            monkeypatch.setattr(cpu_ops, "cpu_features", lambda: cpu_ops.CpuFeatures(False, False, False))
            y = model(x)
    assert [type(f) for f in forms] == [cpu_fold.PlainForm] * 2
    assert_close(y, ref(x.double()), "fp32", "plain fold without the prepacked ops")


def test_autocast_without_bf16_convolutions_computes_float32(fold_runs, monkeypatch):
    """A CPU whose oneDNN has no bfloat16 convolutions: bf16 autocast runs the float32 primitives
    (torch's own bf16 convolution would be its slow reference loop there) and returns bfloat16."""
    monkeypatch.setattr(cpu_ops, "cpu_features", lambda: cpu_ops.CpuFeatures(True, False, False))
    forms = _forms(monkeypatch)
    ref, model = pair(torch.float32)
    x = rand()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and type(forms[0]) is cpu_fold.PackedForm
    assert forms[0].plan.convs[0][0].dtype == torch.float32
    assert_close(y, ref(x.double()), "bf16", "bf16 autocast, float32 compute")


# ------------------------------------------------------------------ when the fold is not used
def test_training_is_the_module_tree_without_the_guard(guard_calls, fold_runs):
    """Training updates the running statistics exactly as the reference does; no guard, no fold,
    also under no_grad."""
    ref, model = pair(torch.float64)
    ref.train(), model.train()
    for _ in range(2):
        x = rand(dtype=torch.float64)
        assert torch.equal(model(x), ref(x))
    with torch.no_grad():
        x = rand(dtype=torch.float64)
        assert torch.equal(model(x), ref(x))
    for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(bm, br), name
    assert guard_calls == [] and fold_runs == []


def test_one_batchnorm_on_batch_statistics_is_the_module_tree(fold_runs):
    ref, model = pair(torch.float64)
    ref.conv2.conv[1].train()
    model.conv2.conv[1].train()
    with torch.no_grad():
        x = rand(dtype=torch.float64)
        assert torch.equal(model(x), ref(x))
    assert torch.equal(model.conv2.conv[1].running_mean, ref.conv2.conv[1].running_mean)
    assert fold_runs == []


def test_eval_with_parameter_gradients_is_the_module_tree(guard_calls, fold_runs):
    """model.eval() and backward to the parameters: exact parameter gradients, and the guard is
    not even asked (a parameter the fold would detach requires grad)."""
    ref, model = pair(torch.float64)
    x = rand(dtype=torch.float64)
    g = torch.randn(2, 2, 32, 32, dtype=torch.float64)
    model(x).backward(g)
    ref(x).backward(g)
    for (name, pr), pm in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(pm.grad, pr.grad), name
    assert guard_calls == [] and fold_runs == []


def test_one_trainable_parameter_keeps_the_module_tree(fold_runs):
    ref, model = pair(torch.float64)
    model.requires_grad_(False)
    model.conv3.conv[4].weight.requires_grad_(True)  # fine-tuning one BatchNorm's scale
    x = rand(dtype=torch.float64)
    model(x).sum().backward()
    ref(x).sum().backward()
    assert_close(model.conv3.conv[4].weight.grad, ref.conv3.conv[4].weight.grad, "fp64", "BN weight grad")
    assert fold_runs == []


def test_frozen_parameters_input_gradient_through_the_fold(fold_runs):
    ref, model = pair(torch.float64)
    model.requires_grad_(False)
    x = rand(dtype=torch.float64)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 2, 32, 32, dtype=torch.float64)
    model(xm).backward(g)
    ref(xr).backward(g)
    assert fold_runs == [1]
    assert_close(xm.grad, xr.grad, "fp64", "input grad")
    assert all(p.grad is None for p in model.parameters())


def _forward_hook(m, log):
    m.conv2.conv[2].register_forward_hook(lambda mod, args, out: log.append("forward") or out * 0.5)


def _forward_pre_hook(m, log):
    m.conv1.conv[3].register_forward_pre_hook(lambda mod, args: log.append("pre") or (args[0] * 2,))


def _relu_to_gelu(m, log):
    m.conv1.conv[2] = nn.GELU()


def _batchnorm_swapped_for_identity(m, log):
    m.conv4.conv[1] = nn.Identity()


@pytest.mark.parametrize("modify", [_forward_hook, _forward_pre_hook, _relu_to_gelu, _batchnorm_swapped_for_identity])
def test_modified_tree_runs_the_module_tree_exactly(modify, guard_calls, fold_runs):
    """A hook or a replaced module takes effect only when the submodules are called: the module
    tree runs, bit for bit the reference's, without a warning (it is not a slower fused path)."""
    ref, model = pair(torch.float64)
    ref_log, log = [], []
    modify(ref, ref_log)
    modify(model, log)
    x = rand(dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model(x)
        assert torch.equal(y, ref(x))
    assert log == ref_log
    assert guard_calls == [1] and fold_runs == []


def test_eager_backend_is_the_module_tree(guard_calls, fold_runs):
    ref, model = pair(torch.float64)
    fastunet.set_backend("eager")
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert guard_calls == [] and fold_runs == []


# ------------------------------------------------------------------ the cache
def test_folded_weights_cached_until_a_source_changes(fold_runs):
    ref, model = pair(torch.float64)
    other, _ = pair(torch.float64)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        model(x)
        plan = cpu_fold._PLANS[model][(torch.float64, (1e-5,) * 10)]
        model(x)
        assert cpu_fold._PLANS[model][plan.key] is plan  # reused

        model.conv1.conv[0].weight.mul_(2)  # in place: the version moves
        ref.conv1.conv[0].weight.mul_(2)
        assert_close(model(x), ref(x), "fp64", "after an in-place weight edit")
        assert cpu_fold._PLANS[model][plan.key] is not plan

        model.load_state_dict(other.state_dict())
        assert_close(model(x), other(x), "fp64", "after load_state_dict")

        model.conv2.conv[4].running_var.add_(1.0)  # a buffer, in place
        other.conv2.conv[4].running_var.add_(1.0)
        assert_close(model(x), other(x), "fp64", "after an in-place BatchNorm change")

        model.float()  # .to(): the float64 plan goes at once
        assert model not in cpu_fold._PLANS
        assert_close(model(x.float()), other(x), "fp32", "after .float()")
        assert [k[0] for k in cpu_fold._PLANS[model]] == [torch.float32]
    assert fold_runs == [1] * 6


def test_data_edits_seen_or_refreshed(fold_runs):
    """An in-place edit through ``.data`` leaves the version counter alone: a whole-tensor rewrite
    (the mean-teacher EMA, a clamp) is caught by the sampled values; a single-element edit may not
    be, and ``refresh()`` is the documented way to make it visible."""
    ref, model = pair(torch.float64)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        model(x)
        plan = cpu_fold._PLANS[model][(torch.float64, (1e-5,) * 10)]
        model(x)
        assert cpu_fold._PLANS[model][plan.key] is plan  # unchanged values: reused

        for m in (model, ref):  # EMA through .data on every parameter
            for p in m.parameters():
                p.data.mul_(0.9).add_(torch.ones_like(p.data), alpha=0.1)
        assert_close(model(x), ref(x), "fp64", "after an EMA update through .data")
        assert cpu_fold._PLANS[model][plan.key] is not plan

        for m in (model, ref):  # a BatchNorm buffer through .data
            m.conv2.conv[1].running_mean.data.add_(0.5)
        assert_close(model(x), ref(x), "fp64", "after a running_mean edit through .data")

        model.conv1.conv[0].weight.data[1, 1, 1, 1] += 1.0  # one element: maybe not sampled
        ref.conv1.conv[0].weight.data[1, 1, 1, 1] += 1.0
        model.refresh()
        assert model not in cpu_fold._PLANS
        assert_close(model(x), ref(x), "fp64", "after refresh()")
    assert fold_runs == [1] * 5


def test_nan_weights_keep_their_plan(fold_runs):
    """Sampled values compare bit for bit: a NaN weight does not rebuild the plan on every call."""
    _, model = pair(torch.float64)
    x = rand(dtype=torch.float64)
    with torch.no_grad():
        model.conv1.conv[0].weight.fill_(float("nan"))
        assert torch.isnan(model(x)).all()
        plan = cpu_fold._PLANS[model][(torch.float64, (1e-5,) * 10)]
        model(x)
        assert cpu_fold._PLANS[model][plan.key] is plan


def test_plan_built_in_inference_mode_serves_autograd_later(fold_runs):
    """Built under torch.inference_mode, the folded weights are still plain tensors: a later
    forward that records autograd (for the input) can save them."""
    ref, model = pair(torch.float64)
    model.requires_grad_(False)
    x = rand(dtype=torch.float64)
    with torch.inference_mode():
        assert_close(model(x), ref(x), "fp64", "inference mode")
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xm).sum().backward()
    ref(xr).sum().backward()
    assert_close(xm.grad, xr.grad, "fp64", "input grad after inference mode")
    assert fold_runs == [1, 1]


def test_cpu_fallback_never_imports_triton():
    code = (
        "import sys, torch, fastunet\n"
        "m = fastunet.UNet(3, 1, base_channels=4, depth=2).eval()\n"
        "with torch.no_grad():\n    m(torch.randn(1, 3, 16, 16))\n"
        "m.train()(torch.randn(2, 3, 16, 16))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTUNET_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_gives_the_module_trees_non_finite_output(bad):
    """oneDNN's fused ReLU post-op maps NaN to 0: an input with NaN/Inf must not come out as
    numbers where the module tree gives NaN (the fold takes its plain form for such an input)."""
    ref, model = model_pair(3, 1, base_channels=4, depth=2, dtype=torch.float32)
    ref.eval(), model.eval()
    x = torch.rand(1, 3, 32, 32)
    x[0, :, 10, 10] = bad
    with torch.no_grad():
        y, expected = model(x), ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(expected).any()
    finite = torch.isfinite(expected)
    assert_close(y[finite], expected[finite], "fp32", "finite part of the output")
