"""The torch.library op layer: opcheck (schema, fake tensors, autograd registration, AOT
dispatch) on every op, and gradcheck of every autograd formula in float64."""

import pytest
import torch
from helpers import assert_close

import fastunet  # noqa: F401  (registers the ops)

pytestmark = pytest.mark.ops

ops = torch.ops.fastunet


def _t(*shape, dtype=torch.float64, grad=True, channels_last=True):
    t = torch.randn(*shape, dtype=dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def op_cases(dtype):
    """(op, args) for every op with small odd shapes; scale/shift/biases stay float32 unless fp64."""
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    n, h, w = 2, 5, 6
    return {
        "conv3x3_bn_act": (
            ops.conv3x3_bn_act,
            (_t(n, 3, h, w, dtype=dtype), None, _t(4, 3, 3, 3, dtype=dtype), _t(4, dtype=vec), _t(4, dtype=vec), True),
        ),
        "conv3x3_bn_act_two_sources": (
            ops.conv3x3_bn_act,
            (_t(n, 2, h, w, dtype=dtype), _t(n, 3, h, w, dtype=dtype, channels_last=False),
             _t(4, 5, 3, 3, dtype=dtype), _t(4, dtype=vec), _t(4, dtype=vec), False),
        ),
        "conv3x3_bn_act_head": (
            ops.conv3x3_bn_act_head,
            (_t(n, 2, h, w, dtype=dtype), _t(n, 3, h, w, dtype=dtype), _t(4, 5, 3, 3, dtype=dtype),
             _t(4, dtype=vec), _t(4, dtype=vec), True, _t(3, 4, 1, 1, dtype=dtype), _t(3, dtype=vec), "softmax"),
        ),
        "upconv2x2": (ops.upconv2x2, (_t(n, 4, 3, 5, dtype=dtype), _t(4, 3, 2, 2, dtype=dtype), _t(3, dtype=vec))),
        "maxpool2x2": (ops.maxpool2x2, (_t(n, 3, 6, 4, dtype=dtype),)),
        "head1x1": (ops.head1x1, (_t(n, 4, h, w, dtype=dtype), _t(2, 4, 1, 1, dtype=dtype), _t(2, dtype=vec), "sigmoid")),
        # Training path: raw inputs with the previous BatchNorm+ReLU as (scale, shift).
        "conv3x3_bn_stats": (
            ops.conv3x3_bn_stats,
            (_t(n, 3, h, w, dtype=dtype), None, _t(4, 3, 3, 3, dtype=dtype), _t(4, dtype=vec),
             _t(3, dtype=vec), _t(3, dtype=vec), None, None),
        ),
        "conv3x3_bn_stats_two_sources": (
            ops.conv3x3_bn_stats,
            (_t(n, 2, h, w, dtype=dtype), _t(n, 3, h, w, dtype=dtype, channels_last=False),
             _t(4, 5, 3, 3, dtype=dtype), _t(4, dtype=vec), None, None, _t(3, dtype=vec), _t(3, dtype=vec)),
        ),
        "upconv2x2_norm": (
            ops.upconv2x2,
            (_t(n, 4, 3, 5, dtype=dtype), _t(4, 3, 2, 2, dtype=dtype), _t(3, dtype=vec),
             _t(4, dtype=vec), _t(4, dtype=vec)),
        ),
        "maxpool2x2_norm": (ops.maxpool2x2, (_t(n, 3, 6, 4, dtype=dtype), _t(3, dtype=vec), _t(3, dtype=vec))),
        "head1x1_norm": (
            ops.head1x1,
            (_t(n, 4, h, w, dtype=dtype), _t(2, 4, 1, 1, dtype=dtype), _t(2, dtype=vec), "softmax",
             _t(4, dtype=vec), _t(4, dtype=vec)),
        ),
    }  # fmt: skip


CASES = list(op_cases(torch.float64))


def backward_op_cases(dtype):
    """The ops the autograd formulas call (no autograd of their own): plain tensors."""
    vec = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*shape, dt=dtype):
        return _t(*shape, dtype=dt, grad=False)

    n, h, w = 2, 4, 6
    return {
        "affine_relu_backward": (ops.affine_relu_backward, (t(n, 3, h, w), t(n, 3, h, w), t(3, dt=vec), t(3, dt=vec))),
        "maxpool2x2_backward": (ops.maxpool2x2_backward, (t(n, 3, 2, 3), t(n, 3, h, w), None, None)),
        "maxpool2x2_backward_norm": (
            ops.maxpool2x2_backward, (t(n, 3, 2, 3), t(n, 3, h, w), t(3, dt=vec), t(3, dt=vec)),
        ),
        "conv3x3_weight_grad": (
            ops.conv3x3_weight_grad, (t(n, 4, h, w), t(n, 3, h, w), t(n, 2, h, w), t(3, dt=vec), t(3, dt=vec), None, None),
        ),
        "upconv2x2_input_grad": (ops.upconv2x2_input_grad, (t(n, 3, h, w), t(5, 3, 2, 2))),
        "upconv2x2_weight_grad": (
            ops.upconv2x2_weight_grad, (t(n, 3, h, w), t(n, 5, 2, 3), t(5, dt=vec), t(5, dt=vec)),
        ),
        "head1x1_input_grad": (ops.head1x1_input_grad, (t(n, 2, h, w), t(2, 5, 1, 1))),
        "head1x1_weight_grad": (ops.head1x1_weight_grad, (t(n, 2, h, w), t(n, 5, h, w), None, None)),
    }  # fmt: skip


BACKWARD_CASES = list(backward_op_cases(torch.float64))


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_opcheck_backward_ops(case, device):
    """float64 (eager composites) and float32 (the kernels: CUDA, or the interpreter on CPU)."""
    for dtype in (torch.float64, torch.float32):
        op, args = backward_op_cases(dtype)[case]
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_ops_kernels_match_composites(case, device):
    """The kernel path of every backward op against its float64 composite on the same values."""
    op, args = backward_op_cases(torch.float32)[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    expected = op(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    got = op(*args)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,),
                    strict=True):  # fmt: skip
        assert_close(g, e, "fp32", case)


@pytest.mark.parametrize("case", CASES)
def test_opcheck_float64(case):
    op, args = op_cases(torch.float64)[case]
    torch.library.opcheck(op, args)


# Finite differences through a whole 3x3 conv take 20-30 s each on 2 cores: quick mode keeps the
# other ops' gradchecks (including the statistics forms of the same conv).
_SLOW_GRADCHECKS = {"conv3x3_bn_act", "conv3x3_bn_act_two_sources", "conv3x3_bn_act_head"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_GRADCHECKS else c for c in CASES]
)
def test_gradcheck_float64(case):
    """The registered backward formulas against finite differences."""
    op, args = op_cases(torch.float64)[case]
    torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("activation", ["none", "sigmoid", "softmax"])
def test_head_gradcheck_every_activation(activation):
    args = (_t(1, 3, 2, 3), _t(2, 3, 1, 1), _t(2), activation)
    torch.autograd.gradcheck(lambda *a: ops.head1x1(*a), args)


def test_pool_gradient_routes_ties_like_torch():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    ops.maxpool2x2(x).backward(g)
    torch.nn.functional.max_pool2d(x2, 2).backward(g)
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.conv3x3_bn_act(_t(1, 3, 4, 4), None, _t(4, 2, 3, 3), _t(4), _t(4), True),
            r"weight must be \[C_out, 3, 3, 3\]",
        ),
        (lambda: ops.conv3x3_bn_act(_t(1, 3, 4, 4), _t(1, 2, 4, 5), _t(4, 5, 3, 3), _t(4), _t(4), True), "x2"),
        (lambda: ops.conv3x3_bn_act(_t(1, 3, 4, 4), None, _t(4, 3, 3, 3), _t(3), _t(4), True), "scale and shift"),
        (lambda: ops.upconv2x2(_t(1, 3, 4, 4), _t(2, 3, 2, 2), _t(3)), "do not fit"),
        (lambda: ops.maxpool2x2(_t(3, 5, 4)), "4-D input"),
        (lambda: ops.head1x1(_t(1, 3, 4, 4), _t(2, 3, 1, 1), _t(2), "relu"), "activation must be one of"),
        (lambda: ops.maxpool2x2(_t(1, 3, 4, 4), _t(3), None), "both in_scale and in_shift"),
        (lambda: ops.upconv2x2(_t(1, 3, 4, 4), _t(3, 2, 2, 2), _t(2), _t(2), _t(2)), r"in_shift must be \[3\]"),
        (
            lambda: ops.conv3x3_bn_stats(_t(1, 3, 4, 4), None, _t(4, 3, 3, 3), _t(4), _t(2), _t(2), None, None),
            r"x_shift must be \[3\]",
        ),
        (
            lambda: ops.conv3x3_bn_stats(_t(1, 3, 1, 1), None, _t(4, 3, 3, 3), _t(4), None, None, None, None),
            "more than 1 value per channel",
        ),
    ],
    ids=[
        "conv-weight",
        "conv-x2",
        "conv-scale",
        "upconv",
        "pool",
        "head",
        "pool-norm",
        "upconv-norm",
        "stats-norm",
        "stats-one-value",
    ],  # fmt: skip
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mixed_dtypes_rejected():
    with pytest.raises(TypeError, match="one dtype"):
        ops.conv3x3_bn_act(_t(1, 3, 4, 4), None, _t(4, 3, 3, 3, dtype=torch.float32), _t(4), _t(4), True)


@pytest.mark.parametrize("case", CASES)
def test_opcheck_on_the_kernel_path(case, device):
    """float32 runs the Triton kernels (CUDA, or the interpreter on CPU): opcheck them too."""
    op, args = op_cases(torch.float32)[case]
    args = tuple(a.detach().to(device).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)
