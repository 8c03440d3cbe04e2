"""fastunet.UNet against the reference: state_dict compatibility, outputs, gradients and BN
running statistics in eval and train mode, on the eager path and the fused op path, plus every
bad input."""

import pytest
import torch
from helpers import assert_close, max_rel_error, model_pair

import fastunet
from fastunet import UNet, UNetReference

pytestmark = pytest.mark.model

SMALL = {"base_channels": 4, "depth": 2}


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastunet.get_backend()
    yield
    fastunet.set_backend(before)


def test_reference_checkpoint_loads_strict_both_ways():
    ref = UNetReference(3, 1)
    model = UNet(3, 1)
    model.load_state_dict(ref.state_dict(), strict=True)
    back = UNetReference(3, 1)
    back.load_state_dict(model.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]


def _run_pair(backend, train, activation="sigmoid", steps=1, dtype=torch.float64):
    """Forward + backward of both models on the same data; returns per-quantity worst errors."""
    fastunet.set_backend(backend)
    ref, model = model_pair(3, 2, dtype=dtype, out_activation=activation, **SMALL)
    ref.train(train)
    model.train(train)
    errors = {"out": 0.0, "grad": 0.0, "stats": 0.0}
    for _ in range(steps):
        x = torch.randn(2, 3, 12, 8, dtype=dtype)
        xr = x.clone().requires_grad_()
        xm = x.clone().requires_grad_()
        yr, ym = ref(xr), model(xm)
        errors["out"] = max(errors["out"], max_rel_error(ym, yr))
        assert_close(ym, yr, "fp64", "output")
        g = torch.randn_like(yr)
        yr.backward(g)
        ym.backward(g)
        assert_close(xm.grad, xr.grad, "fp64", "input grad")
        grad_scale = max(p.grad.pow(2).mean().sqrt().item() for p in ref.parameters())
        for (name, pr), pm in zip(ref.named_parameters(), model.parameters(), strict=True):
            assert_close(pm.grad, pr.grad, "fp64", f"grad of {name}", scale=grad_scale)
            errors["grad"] = max(errors["grad"], max_rel_error(pm.grad, pr.grad))
        for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
            if br.is_floating_point():
                assert_close(bm, br, "fp64", name)
                errors["stats"] = max(errors["stats"], max_rel_error(bm, br))
            else:
                assert torch.equal(bm, br), name
    return errors


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_reference_float64(backend, train):
    _run_pair(backend, train, steps=2 if train else 1)


@pytest.mark.parametrize("activation", ["none", "softmax"])
def test_fused_activations(activation):
    _run_pair("triton", False, activation)


def test_fused_train_momentum_none_cumulative_average():
    fastunet.set_backend("triton")
    ref, model = model_pair(3, 2, **SMALL)
    for m in list(ref.modules()) + list(model.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    ref.train()
    model.train()
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        assert_close(model(x), ref(x), "fp64", "output")
    for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
        assert torch.allclose(bm.double(), br.double(), rtol=1e-10, atol=1e-12), name


def test_fused_output_is_channels_last():
    fastunet.set_backend("triton")
    _, model = model_pair(3, 2, **SMALL)
    y = model.eval()(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_auto_on_cpu_runs_the_eager_math(monkeypatch):
    """The CPU fallback never touches the fused ops (replaced by a trap here): the module tree with
    autograd on, the BatchNorm fold (``fastunet.cpu_fold``) under no_grad."""
    fastunet.set_backend("auto")
    ref, model = model_pair(3, 2, **SMALL)

    def trap(*args):
        raise AssertionError("the fused path ran on the CPU fallback")

    # Every fused forward picks its calls object here: calls_for (inference) or run_taped (training).
    monkeypatch.setattr("fastunet.fused.calls_for", trap)
    monkeypatch.setattr("fastunet.fused.run_taped", trap)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(model.eval()(x), ref.eval()(x))
    with torch.no_grad():
        assert_close(model(x), ref(x), "fp64", "folded")


def test_prepared_weights_follow_new_parameters():
    """Packed/folded weights are cached per parameter version: loading new weights must show."""
    fastunet.set_backend("triton")
    ref1, model = model_pair(3, 2, **SMALL)
    ref2, _ = model_pair(3, 2, **SMALL)
    ref1.eval(), ref2.eval(), model.eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), ref1(x), "fp64", "first weights")
        assert_close(model(x), ref1(x), "fp64", "cached")
        model.load_state_dict(ref2.state_dict())
        assert_close(model(x), ref2(x), "fp64", "after load_state_dict")
        model.conv1.conv[1].running_var.mul_(2)  # in-place buffer change bumps its version
        ref2.conv1.conv[1].running_var.mul_(2)
        assert_close(model(x), ref2(x), "fp64", "after in-place BN change")
        for m in (model, ref2):  # an EMA through .data: no version moves, the CPU samples see it
            for p in m.parameters():
                p.data.mul_(0.5).add_(0.25)
        assert_close(model(x), ref2(x), "fp64", "after an update through .data")
        model.conv1.conv[0].weight.data[0, 0, 0, 0] += 1.0
        ref2.conv1.conv[0].weight.data[0, 0, 0, 0] += 1.0
        model.refresh()
        assert model._eval_plans == {}
        assert_close(model(x), ref2(x), "fp64", "after refresh()")


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.randn(3, 16, 16), ValueError, r"4-D input.*3-D.*unsqueeze"),
        (lambda: torch.randn(1, 1, 3, 16, 16), ValueError, r"4-D input.*5-D"),
        (lambda: torch.randn(1, 4, 16, 16), ValueError, r"built for 3 input channels, got .* 4"),
        (lambda: torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), TypeError, r"floating-point.*uint8"),
        (lambda: torch.randn(1, 3, 30, 16), ValueError, r"divisible by 4.*H=30.*H=32, W=16"),
        (lambda: torch.randn(1, 3, 16, 13), ValueError, r"divisible by 4.*W=13.*H=16, W=12"),
        (lambda: torch.randn(1, 3, 16, 16, dtype=torch.float32), TypeError, r"float32 does not match.*float64"),
        (lambda: [[1.0]], TypeError, r"torch.Tensor"),
    ],
    ids=["3d", "5d", "channels", "integer", "height", "width", "dtype", "not-a-tensor"],
)
def test_bad_input(backend, make, error, match):
    fastunet.set_backend(backend)
    _, model = model_pair(3, 2, **SMALL)
    with pytest.raises(error, match=match):
        model(make())


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_dtype_mismatch_on_cpu_suggests_autocast_not_float16(x_dtype):
    """A half-precision input for a float32 model on CPU: the advice is bfloat16 autocast or
    converting the input, never converting the model to float16 (slow on most CPUs)."""
    model = UNet(3, 1, **SMALL)
    with pytest.raises(TypeError) as info:
        model(torch.randn(1, 3, 16, 16, dtype=x_dtype))
    message = str(info.value)
    assert f"input dtype {x_dtype} does not match the model's parameters (torch.float32)" in message
    assert 'torch.autocast("cpu", dtype=torch.bfloat16)' in message
    assert "x.to(torch.float32)" in message
    assert "model.to(" not in message


def test_float64_input_on_cpu_is_not_sent_to_autocast():
    """Autocast leaves float64 inputs alone: the advice is converting the input only."""
    model = UNet(3, 1, **SMALL)
    with pytest.raises(TypeError, match=r"float64 does not match.*float32") as info:
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert "x.to(torch.float32)" in str(info.value) and "autocast" not in str(info.value)


def test_dtype_mismatch_on_cuda_keeps_the_model_conversion_advice():
    from fastunet.validation import dtype_mismatch_message

    message = dtype_mismatch_message(torch.float16, torch.float32, torch.device("cuda", 0))
    assert "model.to(torch.float16)" in message and "torch.autocast" in message


def test_nearest_valid_size_never_zero():
    from fastunet.validation import nearest_multiple

    assert nearest_multiple(3, 16) == 16
    assert nearest_multiple(250, 16) == 256
    assert nearest_multiple(247, 16) == 240
