"""fastunet's own Winograd (``fastunet.cpu_winograd``) against float64 references on fresh random
data: F(2x2) and F(4x4) tiles, partial tiles at odd sizes (down to 1x1), NCHW and channels_last
inputs, the decoder's two sources read without a concatenation, every activation, no bias,
NaN-poisoned scratch (the zero border is rewritten on every call), two threads at once, and the
per-layer engine table of the fast mode. Timing is not tested here."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fastunet import cpu_ops, cpu_scratch
from fastunet.cpu_winograd import OwnWinogradConv, winograd_matrices

pytestmark = pytest.mark.ops

CL = torch.channels_last


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _case(c_in, c_out, h, w, n=1, bias=True):
    x = torch.randn(n, c_in, h, w)
    weight = torch.randn(c_out, c_in, 3, 3) / (3 * c_in**0.5)
    b = torch.randn(c_out) if bias else None
    return x, weight, b


def _expected(x, weight, b, act="relu", slope=None):
    y = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    if act == "relu":
        return y.relu()
    return F.leaky_relu(y, slope) if act == "leaky_relu" else y


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
@pytest.mark.parametrize(
    "c_in, c_out, h, w, n",
    [(16, 24, 16, 16, 1), (40, 32, 13, 22, 2), (3, 8, 1, 1, 1), (64, 48, 33, 7, 1), (256, 128, 8, 8, 1)],
)
def test_own_winograd_within_its_row(m, act, c_in, c_out, h, w, n):
    slope = 0.01 if act == "leaky_relu" else None
    x, weight, b = _case(c_in, c_out, h, w, n)
    y = OwnWinogradConv(weight, b, act, slope, m)(x)
    assert y.shape == (n, c_out, h, w) and y.is_contiguous(memory_format=CL)
    expected = _expected(x, weight, b, act, slope)
    assert (y.double() - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert_close(y, expected, "winograd", f"F({m}x{m}) {c_in}->{c_out} {h}x{w} {act}")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_any_input_layout_and_no_bias(m, layout):
    x, weight, _ = _case(24, 16, 18, 11, n=2, bias=False)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "sliced":  # a non-contiguous view (a channel slice of a larger map)
        x = torch.randn(2, 30, 18, 11)[:, 3:27]
    y = OwnWinogradConv(weight, None, "none", None, m)(x)
    assert_close(y, _expected(x, weight, None, "none"), "winograd", f"F({m}x{m}) {layout} input")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("split", [8, 20])
def test_two_sources_are_the_conv_of_their_concatenation(m, split):
    """The decoder's first conv: both sources read in place of ``cat([a, b], 1)``, in order."""
    x, weight, b = _case(32, 16, 14, 19, n=2)
    a, rest = x[:, :split].contiguous(memory_format=CL), x[:, split:].contiguous()
    y = OwnWinogradConv(weight, b, "relu", None, m)(a, rest)
    assert_close(y, _expected(x, weight, b), "winograd", f"F({m}x{m}) concat split {split}")
    with pytest.raises(ValueError, match="channels"):
        OwnWinogradConv(weight, b, "relu", None, m)(a)


@pytest.mark.parametrize("m", [2, 4])
def test_poisoned_scratch_never_reaches_the_output(m):
    """The per-thread scratch is shared by every layer and shape: after a larger call, NaN in all
    of it (the padded input's zero border included) must not reach a smaller call's output."""
    conv_big = OwnWinogradConv(*_case(32, 32, 24, 24)[1:], "relu", None, m)
    conv_big(torch.randn(1, 32, 24, 24))
    for buf in cpu_scratch.buffers().values():
        buf.fill_(float("nan"))
    x, weight, b = _case(16, 8, 9, 7)
    y = OwnWinogradConv(weight, b, "none", None, m)(x)
    assert not torch.isnan(y).any()
    assert_close(y, _expected(x, weight, b, "none"), "winograd", f"F({m}x{m}) after poisoned scratch")


def test_two_threads_use_their_own_scratch():
    x, weight, b = _case(32, 16, 20, 20, n=2)
    conv = OwnWinogradConv(weight, b, "relu", None, 4)
    expected = _expected(x, weight, b)
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = conv(x[i : i + 1])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert_close(results[i], expected[i : i + 1], "winograd", f"thread {i}")


def test_made_in_inference_mode_serves_later_forwards():
    x, weight, b = _case(16, 8, 12, 12)
    with torch.inference_mode():
        conv = OwnWinogradConv(weight, b, "relu", None, 4)
        conv(x)
    with torch.no_grad():
        y = conv(x)  # the scratch made inside inference_mode is written outside it
    assert_close(y, _expected(x, weight, b), "winograd", "after inference_mode")


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_the_1d_correlation(m):
    """``A^T [(G g) * (B^T d)]`` is the valid correlation of ``d`` (length m+2) with ``g`` (3)."""
    bt, g, at = winograd_matrices(m)
    d, k = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([(d[i : i + 3] * k).sum() for i in range(m)])
    torch.testing.assert_close(at @ ((g @ k) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_unknown_tile_or_activation_is_refused():
    with pytest.raises(ValueError, match="F\\(2x2, 3x3\\) and F\\(4x4, 3x3\\)"):
        winograd_matrices(6)
    with pytest.raises(ValueError, match="activation"):
        OwnWinogradConv(torch.randn(4, 4, 3, 3), None, "sigmoid")


def test_engine_table_is_the_measured_one():
    """The classic model's layers at 256x256 (see the table in ``fastunet.cpu_ops``)."""
    engine = cpu_ops.conv3x3_engine
    assert engine(3, 256, 256) == "direct"  # the first layer: every transform costs more
    assert engine(64, 256, 256) == engine(128, 128, 128) == engine(512, 64, 64) == "nnpack"
    assert engine(512, 32, 32) == engine(1024, 40, 32) == "own4"
    assert engine(1024, 16, 16) == engine(512, 16, 9) == "own2"
    # without NNPACK: the own F(4x4) up to 128x128, oneDNN above
    assert engine(128, 128, 128, nnpack=False) == engine(256, 64, 64, nnpack=False) == "own4"
    assert engine(64, 256, 256, nnpack=False) == "direct"


def test_scratch_is_per_role_per_thread_and_grows():
    a = cpu_scratch.scratch("test-role", 2, 3)
    assert a.shape == (2, 3) and a.dtype == torch.float32 and a.is_contiguous()
    b = cpu_scratch.scratch("test-role", 4, 5)  # grown: a new buffer
    assert b.shape == (4, 5) and cpu_scratch.scratch("test-role", 3).data_ptr() == b.data_ptr()
    assert cpu_scratch.scratch("other-role", 3).data_ptr() != b.data_ptr()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cpu_scratch.scratch("test-role", 3).data_ptr()))
    thread.start()
    thread.join()
    assert seen[0] != b.data_ptr()
    with torch.inference_mode():
        c = cpu_scratch.scratch("inference-role", 4)
    assert not c.is_inference()
