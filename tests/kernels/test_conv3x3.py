"""Spec for ``kernels/conv3x3.py``: the fused 3x3 conv + scale/shift (+ReLU) (+1x1 head).

Every result is compared with ``torch.nn.functional.conv2d`` in float64 on the same (rounded)
inputs, into NaN-poisoned outputs so unwritten elements fail. Without a GPU the kernels run in
Triton's interpreter, so shapes are tiny and the grid is a spread, not a cartesian product.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastunet.kernels import conv3x3 as K
from fastunet.kernels._common import interpreting
from helpers import assert_close, poisoned_like, tolerance_name

pytestmark = pytest.mark.conv3x3

BF16_SKIP = pytest.mark.skipif(
    interpreting(), reason="Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP),
]
DTYPES_16 = [DTYPES[1], DTYPES[2]]


# ------------------------------------------------------------------------------------ helpers


def make_conv(n, c1, c_out, h, w, dtype, device, *, c2=0, layout="channels_last"):
    """Random conv operands with O(1) outputs; x (and x2) in ``layout``."""
    x = _activation(n, c1, h, w, dtype, device, layout)
    x2 = _activation(n, c2, h, w, dtype, device, layout) if c2 else None
    weight = (torch.randn(c_out, c1 + c2, 3, 3) / (9 * (c1 + c2)) ** 0.5).to(dtype).to(device)
    scale = (torch.rand(c_out) + 0.5).to(device)
    shift = (0.5 * torch.randn(c_out)).to(device)
    return x, x2, weight, scale, shift


def _activation(n, c, h, w, dtype, device, layout):
    if layout == "channels_last":
        return torch.randn(n, c, h, w).to(dtype).to(device, memory_format=torch.channels_last)
    if layout == "nchw":
        return torch.randn(n, c, h, w).to(dtype).to(device).contiguous()
    if layout == "channel_slice":
        # A slice [:, 2:2+c] of a wider NHWC buffer: the pixel stride is not c.
        big = torch.randn(n, c + 5, h, w).to(dtype).to(device, memory_format=torch.channels_last)
        x = big[:, 2 : 2 + c]
        assert x.stride(3) == c + 5
        return x
    raise ValueError(layout)


def reference(x, weight, scale, shift, *, x2=None, relu=True):
    """act(scale * conv2d(cat([x, x2]), weight) + shift) in float64 on CPU."""
    xin = x if x2 is None else torch.cat([x, x2], 1)
    y = F.conv2d(xin.cpu().double(), weight.cpu().double(), padding=1)
    y = y * scale.cpu().double()[:, None, None] + shift.cpu().double()[:, None, None]
    return y.clamp_min(0) if relu else y


def head_reference(z, head_weight, head_bias, activation):
    hw = head_weight.cpu().double().reshape(head_weight.shape[0], -1)
    logits = torch.einsum("nchw,kc->nkhw", z, hw) + head_bias.cpu().double()[:, None, None]
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    return logits


def poisoned_out(n, c, h, w, dtype, device):
    return poisoned_like(torch.empty(n, c, h, w, dtype=dtype, device=device))


# -------------------------------------------------------------------------------- conv tests


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize(
    "n, c_in, c_out, h, w",
    [
        (1, 3, 5, 17, 17),  # the U-Net's first layer: small-C mode
        (3, 37, 64, 8, 8),  # channels not a multiple of the K block
        (1, 1, 5, 5, 9),  # one input channel, non-square
        (3, 3, 64, 8, 8),
        (1, 37, 5, 17, 17),
        (3, 1, 64, 5, 9),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_matches_conv2d(n, c_in, c_out, h, w, relu, dtype, device):
    x, _, weight, scale, shift = make_conv(n, c_in, c_out, h, w, dtype, device)
    out = poisoned_out(n, c_out, h, w, dtype, device)
    got = K.conv3x3_bn_act(x, K.pack_conv3x3_weight(weight), scale, shift, relu=relu, out=out)
    assert got is out
    expected = reference(x, weight, scale, shift, relu=relu)
    assert_close(got, expected, tolerance_name(dtype), f"conv {n}x{c_in}x{h}x{w}->{c_out}")


@pytest.mark.parametrize(
    "c1, c2, c_out, x2_layout",
    [
        (5, 7, 9, "channels_last"),  # small-C mode over both sources
        (37, 20, 64, "channels_last"),  # per-tap K blocks, both sources ragged
        (20, 37, 5, "channel_slice"),  # the skip read from a wider buffer
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_second_source_is_a_concat(c1, c2, c_out, x2_layout, dtype, device):
    n, h, w = 2, 7, 6
    x, _, weight, scale, shift = make_conv(n, c1, c_out, h, w, dtype, device, c2=c2)
    x2 = _activation(n, c2, h, w, dtype, device, x2_layout)
    out = poisoned_out(n, c_out, h, w, dtype, device)
    got = K.conv3x3_bn_act(x, K.pack_conv3x3_weight(weight), scale, shift, x2=x2, out=out)
    expected = reference(x, weight, scale, shift, x2=x2)
    assert_close(got, expected, tolerance_name(dtype), f"cat([{c1}, {c2}]) -> {c_out}")


@pytest.mark.parametrize(
    "x_layout, out_layout, packed",
    [
        ("channels_last", "allocate", True),
        ("nchw", "channels_last", True),
        ("channel_slice", "channel_slice", True),
        ("channels_last", "nchw", False),
        ("channel_slice", "channels_last", False),
        ("nchw", "channel_slice", False),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_layout(x_layout, out_layout, packed, dtype, device):
    n, c_in, c_out, h, w = 2, 19, 24, 6, 5
    x, _, weight, scale, shift = make_conv(n, c_in, c_out, h, w, dtype, device, layout=x_layout)
    wt = K.pack_conv3x3_weight(weight) if packed else weight.contiguous()
    expected = reference(x, weight, scale, shift)
    tol = tolerance_name(dtype)
    if out_layout == "allocate":
        got = K.conv3x3_bn_act(x, wt, scale, shift)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
        assert_close(got, expected, tol, "allocated out")
    elif out_layout == "channel_slice":
        big = poisoned_out(n, c_out + 7, h, w, dtype, device)
        got = K.conv3x3_bn_act(x, wt, scale, shift, out=big[:, 3 : 3 + c_out])
        assert_close(got, expected, tol, "channel-slice out")
        # Neighbouring channels of the buffer must stay untouched.
        assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, 3 + c_out :]).all()
    else:
        fmt = torch.channels_last if out_layout == "channels_last" else torch.contiguous_format
        out = poisoned_like(torch.empty(n, c_out, h, w, dtype=dtype, device=device), fmt)
        got = K.conv3x3_bn_act(x, wt, scale, shift, out=out)
        assert_close(got, expected, tol, f"{out_layout} out")


@pytest.mark.parametrize("c_in, small_c", [(3, False), (20, True), (5, True)])
def test_both_k_modes(c_in, small_c, monkeypatch, device):
    """Each K mode is right on shapes the heuristic would hand to the other one."""
    monkeypatch.setattr(K, "_use_small_c", lambda c1, c2: small_c)
    n, c_out, h, w = 2, 10, 6, 7
    x, _, weight, scale, shift = make_conv(n, c_in, c_out, h, w, torch.float32, device)
    out = poisoned_out(n, c_out, h, w, torch.float32, device)
    got = K.conv3x3_bn_act(x, K.pack_conv3x3_weight(weight), scale, shift, out=out)
    expected = reference(x, weight, scale, shift)
    assert_close(got, expected, tolerance_name(torch.float32), f"small_c={small_c}")


@pytest.mark.parametrize("split_k, c1, c2", [(2, 37, 0), (3, 20, 17), (5, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k(split_k, c1, c2, dtype, monkeypatch, device):
    """The split-K path (partial sums + ordered epilogue) matches, and is bitwise repeatable."""
    monkeypatch.setattr(K, "_pick_split_k", lambda *args: split_k)
    n, c_out, h, w = 1, 33, 5, 6
    x, x2, weight, scale, shift = make_conv(n, c1, c_out, h, w, dtype, device, c2=c2)
    wt = K.pack_conv3x3_weight(weight)
    out = poisoned_out(n, c_out, h, w, dtype, device)
    got = K.conv3x3_bn_act(x, wt, scale, shift, x2=x2, out=out)
    expected = reference(x, weight, scale, shift, x2=x2)
    assert_close(got, expected, tolerance_name(dtype), f"split_k={split_k}")
    again = K.conv3x3_bn_act(x, wt, scale, shift, x2=x2)
    assert torch.equal(again, got)


@pytest.mark.parametrize("split_k", [1, 3], ids=["fused", "split-k"])
def test_relu_keeps_nan(split_k, monkeypatch, device):
    """torch.relu(NaN) is NaN, so a NaN input pixel makes its 3x3 neighbourhood NaN in every
    output channel. A GPU's plain max.f32 would return 0 there (the ReLU is a select instead);
    Triton 3.9's interpreter runs a plain tl.maximum as np.fmax, so this catches it on CPU too
    (benchmarks/kernel_report.py checks the PTX of every spec for such instructions)."""
    monkeypatch.setattr(K, "_pick_split_k", lambda *args: split_k)
    n, c_in, c_out, h, w = 2, 5, 6, 5, 6
    x, _, weight, scale, shift = make_conv(n, c_in, c_out, h, w, torch.float32, device)
    x[1, 2, 3, 4] = float("nan")
    shift[0] = -100.0  # channel 0 is ReLU-clamped everywhere except at the NaN
    out = poisoned_out(n, c_out, h, w, torch.float32, device)
    got = K.conv3x3_bn_act(x, K.pack_conv3x3_weight(weight), scale, shift, out=out)
    expected = reference(x, weight, scale, shift)
    assert expected[1, :, 2:5, 3:6].isnan().all() and expected.isnan().sum() == c_out * 9
    assert_close(got, expected, tolerance_name(torch.float32), f"NaN through the ReLU, split_k={split_k}")


# -------------------------------------------------------------------------------- head tests


@pytest.mark.parametrize(
    "activation, k, c_out, c2, head_4d",
    [
        ("sigmoid", 1, 20, 0, True),
        ("softmax", 3, 20, 0, False),
        ("none", 3, 5, 0, True),
        ("softmax", 1, 9, 7, False),
        ("sigmoid", 3, 33, 6, False),
        ("none", 1, 64, 0, False),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head(activation, k, c_out, c2, head_4d, dtype, device):
    n, c1, h, w = 2, 6, 5, 7
    x, x2, weight, scale, shift = make_conv(n, c1, c_out, h, w, dtype, device, c2=c2)
    head_weight = torch.randn(k, c_out, 1, 1, device=device) / c_out**0.5
    if not head_4d:
        head_weight = head_weight[:, :, 0, 0]
    head_bias = torch.randn(k, device=device)
    out = poisoned_out(n, k, h, w, dtype, device)
    got = K.conv3x3_bn_act_head(
        x, K.pack_conv3x3_weight(weight), scale, shift, head_weight, head_bias,
        activation=activation, x2=x2, out=out,
    )  # fmt: skip
    z = reference(x, weight, scale, shift, x2=x2)
    expected = head_reference(z, head_weight, head_bias, activation)
    assert_close(got, expected, tolerance_name(dtype), f"head {activation} K={k}")


def test_head_allocates_channels_last(device):
    x, _, weight, scale, shift = make_conv(1, 3, 8, 4, 5, torch.float16, device)
    got = K.conv3x3_bn_act_head(
        x, weight, scale, shift, torch.randn(2, 8, device=device), torch.zeros(2, device=device),
        activation="softmax",
    )  # fmt: skip
    assert got.shape == (1, 2, 4, 5) and got.dtype == torch.float16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float().sum(1), torch.ones(1, 4, 5, device=device), atol=2e-3, rtol=0)


# ---------------------------------------------------------------------- packing and validation


def test_pack_weight_storage_order_and_gradient():
    c_out, c_in = 6, 4
    weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True)
    packed = K.pack_conv3x3_weight(weight)
    assert packed.shape == weight.shape
    assert packed.stride() == (1, c_out, 3 * c_in * c_out, c_in * c_out)
    assert packed.permute(2, 3, 1, 0).is_contiguous()  # storage is [3, 3, C_in, C_out]
    assert torch.equal(packed.detach(), weight.detach())
    probe = torch.randn_like(weight)
    (packed * probe).sum().backward()
    assert torch.equal(weight.grad, probe)


def _valid(device):
    return make_conv(1, 4, 6, 5, 5, torch.float32, device)


@pytest.mark.parametrize(
    "case, exc",
    [
        ("weight_shape", ValueError),
        ("weight_dtype", TypeError),
        ("x_dtype", TypeError),
        ("x_dim", ValueError),
        ("x2_spatial", ValueError),
        ("x2_dtype", TypeError),
        ("scale_dtype", TypeError),
        ("shift_shape", ValueError),
        ("out_shape", ValueError),
        ("out_dtype", TypeError),
    ],
)
def test_conv_rejects_bad_inputs(case, exc, device):
    x, _, weight, scale, shift = _valid(device)
    kwargs = {}
    if case == "weight_shape":
        weight = weight[:, :3]
    elif case == "weight_dtype":
        weight = weight.half()
    elif case == "x_dtype":
        x, weight = x.double(), weight.double()
    elif case == "x_dim":
        x = x[0]
    elif case == "x2_spatial":
        kwargs["x2"] = torch.randn(1, 2, 5, 4, device=device)
        weight = torch.randn(6, 6, 3, 3, device=device)
    elif case == "x2_dtype":
        kwargs["x2"] = torch.randn(1, 2, 5, 5, device=device).half()
        weight = torch.randn(6, 6, 3, 3, device=device)
    elif case == "scale_dtype":
        scale = scale.half()
    elif case == "shift_shape":
        shift = shift[:5]
    elif case == "out_shape":
        kwargs["out"] = torch.empty(1, 5, 5, 5, device=device)
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(1, 6, 5, 5, device=device).half()
    with pytest.raises(exc):
        K.conv3x3_bn_act(x, weight, scale, shift, **kwargs)


@pytest.mark.parametrize("case", ["activation", "c_out_too_wide", "head_weight_shape", "head_bias_shape"])
def test_head_rejects_bad_inputs(case, device):
    x, _, weight, scale, shift = _valid(device)
    hw, hb, act = torch.randn(2, 6, device=device), torch.zeros(2, device=device), "sigmoid"
    if case == "activation":
        act = "tanh"
    elif case == "c_out_too_wide":
        weight = torch.randn(300, 4, 3, 3, device=device)
        scale, shift = torch.ones(300, device=device), torch.zeros(300, device=device)
        hw = torch.randn(2, 300, device=device)
    elif case == "head_weight_shape":
        hw = torch.randn(2, 5, device=device)
    elif case == "head_bias_shape":
        hb = torch.zeros(3, device=device)
    with pytest.raises(ValueError):
        K.conv3x3_bn_act_head(x, weight, scale, shift, hw, hb, activation=act)


@pytest.mark.parametrize("arch", [80, 90])
def test_autotune_pruning(arch):
    """What the tuner may try: fits in shared memory, no tiles far wider than the problem."""
    from fastunet.kernels._tuning import bucket


    def candidates(variant, dtype, n, hw, c1, c2, c_out, training=False):
        shape = dict(
            variant=variant, elem=torch.empty(0, dtype=dtype).element_size(), M=bucket(n * hw * hw),
            C1=c1, C2=c2, C_out=c_out, SMALL_C=K._use_small_c(c1, c2), training=training,
        )  # fmt: skip
        return K._TUNERS[variant].candidates(arch, shape)

    def kept(variant, dtype, n, hw, c1, c2, c_out, training=False):
        configs = candidates(variant, dtype, n, hw, c1, c2, c_out, training)
        assert configs, (variant, dtype, n, hw, c1, c2, c_out)
        elem = torch.empty(0, dtype=dtype).element_size()
        for c in configs:
            smem = c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem
            assert smem <= K.smem_limit(arch)
        return [c.kwargs for c in configs]

    for dtype in (torch.float32, torch.float16):
        assert all(c["BLOCK_N"] <= 64 for c in kept("main", dtype, 2, 256, 64, 0, 64))
        # Training forms keep the A tile and the accumulator live together: smaller budget.
        elem = torch.empty(0, dtype=dtype).element_size()
        training = candidates("main", dtype, 16, 128, 256, 0, 512, training=True)
        assert training
        for cfg in training:
            assert K._training_regs(cfg, elem) <= K._TRAINING_REG_BUDGET[elem]
        assert any(c["BLOCK_N"] == 256 for c in kept("main", torch.float16, 2, 128, 256, 0, 512))
        deep = kept("main", dtype, 2, 16, 1024, 0, 1024)
        assert {"BLOCK_M": 64, "BLOCK_N": 64} in [{k: c[k] for k in ("BLOCK_M", "BLOCK_N")} for c in deep]
        assert all(c["BLOCK_K"] <= 32 for c in kept("smallc", dtype, 2, 256, 3, 0, 64))
        assert all(c["BLOCK_K"] <= 16 for c in kept("smallc", dtype, 2, 256, 1, 0, 64))
        assert {c["BLOCK_N"] for c in kept("head", dtype, 2, 256, 64, 0, 64)} == {64}
        for c_in, c_out in ((64, 200), (3, 200), (3, 64), (5, 100)):
            head = kept("head", dtype, 2, 256, c_in, 0, c_out)
            assert {c["BLOCK_N"] for c in head} == {K._head_block_n(c_out)}
            if c_in < 16:  # small-C mode: narrow K steps only
                assert all(c["BLOCK_K"] <= 32 for c in head)
        assert kept("split", dtype, 1, 16, 1024, 0, 1024)


def test_compile_specs_cover_the_autotune_lists():
    """Specs are complete, fit in shared memory, and match the kernels' signatures."""
    for arch in (80, 90):
        specs = K.compile_specs(arch)
        main = [s for s in specs if s.kernel == "_conv3x3_bn_act_kernel"]
        assert {s.dtype for s in specs} == {"fp32", "fp16", "bf16"}
        assert any(s.constexprs["HAS_X2"] for s in main)
        assert any(s.constexprs["HEAD_K"] > 0 for s in main)
        assert any(s.constexprs["SPLIT_K"] > 1 for s in main)
        assert any(s.kernel == "_conv3x3_splitk_epilogue_kernel" for s in specs)
        for s in specs:
            assert list(s.signature) == list(s.fn.arg_names)
            for name, ty in s.signature.items():
                assert (ty == "constexpr") == (name in s.constexprs), name
            if s.kernel == "_conv3x3_bn_act_kernel":
                elem = 4 if s.dtype == "fp32" else 2
                c = s.constexprs
                assert c["BLOCK_K"] <= 32 or not c["SMALL_C"], s.config
                smem = s.num_stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elem
                assert smem <= K.smem_limit(arch), s.config
                if arch == 90 and s.dtype != "fp32":
                    assert c["BLOCK_M"] >= 64 and s.num_warps in (4, 8), s.config


# ------------------------------------------------------------------------- ring 3: real sizes


@pytest.mark.cuda
@pytest.mark.parametrize(
    "n, c1, c2, c_out, hw",
    [
        (2, 64, 0, 64, 64),
        (2, 512, 0, 512, 64),
        (2, 1024, 0, 1024, 16),
        (1, 1024, 0, 1024, 16),  # few tiles: the split-K path
        (2, 512, 512, 512, 32),  # decoder conv reading [up, skip]
        (2, 3, 0, 64, 64),  # first layer, small-C mode
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_unet_sizes(n, c1, c2, c_out, hw, dtype):
    device = torch.device("cuda")
    x, x2, weight, scale, shift = make_conv(n, c1, c_out, hw, hw, dtype, device, c2=c2)
    out = poisoned_out(n, c_out, hw, hw, dtype, device)
    got = K.conv3x3_bn_act(x, K.pack_conv3x3_weight(weight), scale, shift, x2=x2, out=out)
    expected = reference(x, weight, scale, shift, x2=x2)
    assert_close(got, expected, tolerance_name(dtype), f"{n}x{c1}+{c2}x{hw}^2->{c_out}")


@pytest.mark.cuda
@pytest.mark.parametrize("activation, k", [("sigmoid", 1), ("softmax", 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_head(activation, k, dtype):
    device = torch.device("cuda")
    x, _, weight, scale, shift = make_conv(2, 64, 64, 64, 64, dtype, device)
    hw, hb = torch.randn(k, 64, device=device) / 8, torch.randn(k, device=device)
    out = poisoned_out(2, k, 64, 64, dtype, device)
    got = K.conv3x3_bn_act_head(x, K.pack_conv3x3_weight(weight), scale, shift, hw, hb, activation=activation, out=out)
    expected = head_reference(reference(x, weight, scale, shift), hw, hb, activation)
    assert_close(got, expected, tolerance_name(dtype), f"head {activation}")
