"""The CPU fold's primitives (``fastunet.cpu_ops``) against float64 references on fresh random
data at odd sizes: oneDNN convolutions on prepacked weights with fused post-ops, the concat-free
decoder conv, the transposed conv, the up GEMM written into a NaN-poisoned concatenation
buffer, the NCHW max-pool, NNPACK's Winograd (against its own row of the tolerance table), and
the feature probes that turn each off. Timing is not tested here."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fastunet import cpu_ops

pytestmark = pytest.mark.ops

CL = torch.channels_last
FEATURES = cpu_ops.cpu_features()
needs_prepack = pytest.mark.skipif(not FEATURES.prepack, reason="this torch has no prepacked oneDNN convolutions")
needs_nnpack = pytest.mark.skipif(not FEATURES.nnpack, reason="this torch has no NNPACK")
# fp32 max abs error the fold's primitives must stay under (the bar; assert_close's row
# is the finer, relative check)
FP32_MAX_ABS = 1e-4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _act64(y: torch.Tensor, act: str, slope: float | None) -> torch.Tensor:
    if act == "relu":
        return y.relu()
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    return torch.sigmoid(y) if act == "sigmoid" else y


def _check(y: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32: within the fp32 row and under ``FP32_MAX_ABS``."""
    assert (y.double() - expected).abs().max().item() <= FP32_MAX_ABS, what
    assert_close(y, expected, "fp32", what)


@needs_prepack
@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("kernel, padding", [(3, 1), (2, 0), (1, 0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_packed_conv_matches_float64(act, kernel, padding, bias, layout):
    slope = 0.01 if act == "leaky_relu" else None
    x = torch.randn(2, 5, 9, 11)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    w = torch.randn(7, 5, kernel, kernel) / (kernel * 5**0.5)
    b = torch.randn(7) if bias else None
    y = cpu_ops.PackedConv(w, b, padding, act, slope)(x)
    expected = _act64(F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=padding), act, slope)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    _check(y, expected, f"packed conv {kernel}x{kernel} {act}")


@needs_prepack
def test_packed_weights_kept_per_input_shape():
    """oneDNN picks the blocked layout from the input's shape: one reordered copy per shape, the
    ``PACKS_KEPT`` most recent kept, every shape computed right (a re-packed one too)."""
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    conv = cpu_ops.PackedConv(w, b, 1, "relu")
    shapes = [(1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 5, 7), (1, 4, 8, 8)]
    for shape in shapes:
        x = torch.randn(shape).contiguous(memory_format=CL)
        _check(conv(x), F.conv2d(x.double(), w.double(), b.double(), padding=1).relu(), str(shape))
    assert list(conv.packs.by_shape) == [torch.Size(s) for s in shapes[-cpu_ops.PACKS_KEPT :]]


@needs_prepack
def test_packs_made_in_inference_mode_serve_later_forwards():
    w = torch.randn(3, 2, 3, 3)
    conv = cpu_ops.PackedConv(w, None, 1)
    x = torch.randn(1, 2, 6, 6)
    with torch.inference_mode():
        first = conv(x)
    assert not next(iter(conv.packs.by_shape.values())).is_inference()
    with torch.no_grad():
        assert torch.equal(conv(x), first)


@needs_prepack
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
@pytest.mark.parametrize("split", [3, 6])
def test_concat_conv_is_the_conv_of_the_concatenation(act, split):
    slope = 0.01 if act == "leaky_relu" else None
    a = torch.randn(2, split, 7, 10).contiguous(memory_format=CL)
    b = torch.randn(2, 9 - split, 7, 10)  # either layout
    w = torch.randn(5, 9, 3, 3) / 9
    bias = torch.randn(5)
    y = cpu_ops.ConcatConv(w, bias, split, act, slope)(a, b)
    cat = torch.cat([a, b], 1).double()
    expected = _act64(F.conv2d(cat, w.double(), bias.double(), padding=1), act, slope)
    assert y.is_contiguous(memory_format=CL)
    _check(y, expected, f"concat conv split {split}, {act}")


@needs_prepack
@pytest.mark.parametrize("bias", [True, False])
def test_packed_upconv_matches_float64(bias):
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    w = torch.randn(6, 4, 2, 2) / 3
    b = torch.randn(4) if bias else None
    y = cpu_ops.PackedUpConv(w, b)(x)
    expected = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), stride=2)
    assert y.shape == (2, 4, 10, 14) and y.is_contiguous(memory_format=CL)
    _check(y, expected, "packed transposed conv")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("up_first", [True, False])
def test_upconv_gemm_writes_exactly_its_slice_of_the_buffer(bias, up_first):
    """The up GEMM fills its channel slice of a NaN-poisoned concatenation buffer and nothing else."""
    n, c_in, c, h, w = 2, 6, 4, 5, 7
    x = torch.randn(n, c_in, h, w)
    weight = torch.randn(c_in, c, 2, 2) / 3
    b = torch.randn(c) if bias else None
    buf = torch.full((n, 2 * c, 2 * h, 2 * w), float("nan"))
    mine, other = (buf[:, :c], buf[:, c:]) if up_first else (buf[:, c:], buf[:, :c])
    assert cpu_ops.upconv2x2_into(x, cpu_ops.upconv_matrix(weight), b, mine) is mine
    expected = F.conv_transpose2d(x.double(), weight.double(), None if b is None else b.double(), stride=2)
    _check(mine, expected, "up GEMM into the buffer")
    assert torch.isnan(other).all()


@pytest.mark.parametrize("size", [(8, 10), (9, 7), (2, 3)])
def test_max_pool2x2_is_max_pool2d(size):
    x = torch.randn(2, 3, *size)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, -1, -1] = float("-inf")
    y, expected = cpu_ops.max_pool2x2(x), F.max_pool2d(x, 2)
    assert y.shape == expected.shape
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(y.nan_to_num(0.0), expected.nan_to_num(0.0))


@needs_nnpack
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
@pytest.mark.parametrize("c_in, c_out, size", [(16, 16, (32, 32)), (64, 48, (33, 40)), (256, 128, (32, 32))])
def test_winograd_conv_within_its_tolerance(act, c_in, c_out, size):
    """NNPACK's Winograd against float64, inside the table's ``winograd`` row (its error measured
    2-3x the fp32 row's bound: why the fast mode is opt-in)."""
    slope = 0.01 if act == "leaky_relu" else None
    x = torch.randn(1, c_in, *size).contiguous(memory_format=CL)  # converted to NCHW inside
    w = torch.randn(c_out, c_in, 3, 3) / (3 * c_in**0.5)
    b = torch.randn(c_out)
    y = cpu_ops.WinogradConv(w, b, act, slope)(x)
    expected = _act64(F.conv2d(x.double(), w.double(), b.double(), padding=1), act, slope)
    assert y.is_contiguous()
    assert_close(y, expected, "winograd", f"Winograd {c_in}->{c_out} {act}")


# ------------------------------------------------------------------ the feature probes
@pytest.fixture
def fresh_features():
    cpu_ops.cpu_features.cache_clear()
    yield
    cpu_ops.cpu_features.cache_clear()


def test_missing_private_ops_turn_the_prepacked_path_off(monkeypatch, fresh_features):
    def missing(name):
        raise AttributeError(f"'_OpNamespace' 'mkldnn' object has no attribute '{name}'")

    monkeypatch.setattr(cpu_ops, "_mkldnn", missing)
    features = cpu_ops.cpu_features()
    assert not features.prepack and not features.bf16
    assert not cpu_ops.prepacked_ok(torch.float32)


def test_a_probe_with_other_numbers_turns_its_feature_off(monkeypatch, fresh_features):
    monkeypatch.setattr(cpu_ops, "_close", lambda a, b: False)
    assert cpu_ops.cpu_features() == cpu_ops.CpuFeatures(False, False, False)


def test_nnpack_runs_only_at_the_thread_count_its_pool_was_made_with(monkeypatch):
    """torch sizes NNPACK's thread pool at its first call and never again: at another intra-op
    thread count fast math must not call it (it would ignore torch.set_num_threads), and its
    engine table then gives the large maps to the other engines."""
    monkeypatch.setattr(cpu_ops, "cpu_features", lambda: cpu_ops.CpuFeatures(True, False, True, 2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_ops.nnpack_usable()
        assert cpu_ops.conv3x3_engine(64, 256, 256, cpu_ops.nnpack_usable()) == "nnpack"
        torch.set_num_threads(1)
        assert not cpu_ops.nnpack_usable()
        assert cpu_ops.conv3x3_engine(64, 256, 256, cpu_ops.nnpack_usable()) == "direct"
        assert cpu_ops.conv3x3_engine(64, 128, 128, cpu_ops.nnpack_usable()) == "own4"
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(cpu_ops, "cpu_features", lambda: cpu_ops.CpuFeatures(True, False, False))
    assert not cpu_ops.nnpack_usable()


def test_the_probe_records_the_thread_count_it_ran_at(fresh_features):
    features = cpu_ops.cpu_features()
    assert features.nnpack_threads == (torch.get_num_threads() if features.nnpack else 0)


@needs_prepack
def test_mkldnn_switched_off_by_the_user_is_honoured():
    assert cpu_ops.prepacked_ok(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flags() also sets oneDNN's TF32 switch, and says so
        with torch.backends.mkldnn.flags(enabled=False):
            assert not cpu_ops.prepacked_ok(torch.float32)
    assert not cpu_ops.prepacked_ok(torch.float64)
    assert cpu_ops.prepacked_ok(torch.bfloat16) == FEATURES.bf16


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="gelu"):
        cpu_ops.PackedConv(torch.randn(2, 2, 3, 3), None, 1, "gelu")
