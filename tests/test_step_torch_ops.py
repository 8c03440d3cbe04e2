"""The torch ops a training step runs besides its kernels (each an allocation or a dispatcher round
trip on a GPU): the weight preparation (cast, transpose, flip, pack) gives the same values and
layout as the step-by-step composition it replaced, the statistics convs' unit scale is made once,
and the classic model's step runs none of the ops taken out (``benchmarks/host_overhead.py``'s
count)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fastunet.kernels import conv3x3 as conv_kernels
from fastunet.kernels import pack_conv3x3_weight, pack_upconv2x2_weight

from fastunet.ops.conv3x3 import _flipped_weight, _packed_conv_weight
from fastunet.ops.derived import untracked
from fastunet.ops.upconv2x2 import _packed_upconv_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c_out, c_in", [(6, 4), (1, 5), (5, 1)])
def test_flipped_packed_weight_is_the_packed_flip(c_out, c_in, dtype):
    w = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
    stepwise = pack_conv3x3_weight(w.detach().to(dtype).transpose(0, 1).flip(2, 3))
    got = _flipped_weight(w, dtype, packed=True)
    assert got.dtype == dtype and got.shape == (c_in, c_out, 3, 3)
    assert got.stride() == stepwise.stride() == (1, c_in, 3 * c_in * c_out, c_in * c_out)
    assert torch.equal(got, stepwise) and not got.requires_grad


def test_flipped_unpacked_weight():
    w = torch.randn(6, 4, 3, 3)
    got = _flipped_weight(w, torch.bfloat16, packed=False)
    assert torch.equal(got, w.to(torch.bfloat16).transpose(0, 1).flip(2, 3))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_packing_casts_in_its_one_copy(dtype):
    w = torch.randn(6, 4, 3, 3)
    packed = pack_conv3x3_weight(w, dtype)
    assert packed.dtype == (dtype or w.dtype)
    assert torch.equal(packed, w.to(packed.dtype)) and packed.permute(2, 3, 1, 0).is_contiguous()


def test_upconv_packing_casts_in_its_one_copy():
    w = torch.randn(5, 7, 2, 2)
    packed = pack_upconv2x2_weight(w, torch.bfloat16)
    assert packed.dtype == torch.bfloat16 and torch.equal(packed, w.to(torch.bfloat16))
    assert packed.stride() == (28, 1, 14, 7) and packed.permute(0, 2, 3, 1).is_contiguous()


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (for the capture test)."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def unit_scales(monkeypatch):
    monkeypatch.setattr(conv_kernels, "_UNIT_SCALES", {})
    return conv_kernels._UNIT_SCALES


def test_the_unit_scale_is_made_once_per_device_and_size(unit_scales):
    a = conv_kernels._unit_scale(torch.randn(6))
    assert a.dtype == torch.float32 and a.shape == (6,) and torch.equal(a, torch.ones(6))
    assert conv_kernels._unit_scale(torch.randn(6)) is a  # another bias of that size: the same ones
    b = conv_kernels._unit_scale(torch.randn(5)[::1])
    assert b is not a and b.shape == (5,) and len(unit_scales) == 2


def test_the_unit_scale_is_not_kept_while_a_graph_is_captured(unit_scales, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    bias = torch.randn(4).as_subclass(_OnCuda)
    assert torch.equal(conv_kernels._unit_scale(bias), torch.ones(4)) and not unit_scales
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    waited = []
    monkeypatch.setattr(conv_kernels, "_wait_for_fill", waited.append)
    kept = conv_kernels._unit_scale(bias)
    # kept only after its fill has run: another stream's kernel may read it next
    assert list(unit_scales.values()) == [kept] and waited == [bias.device]
    assert conv_kernels._unit_scale(bias) is kept and len(waited) == 1


@pytest.mark.parametrize(
    "bias, error", [(torch.zeros(2, 3), ValueError), (torch.zeros(3, dtype=torch.float64), TypeError)]
)
def test_bn_stats_still_reports_a_bad_bias(bias, error, unit_scales):
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(error, match="scale must be"):
        conv_kernels.conv3x3_bn_stats(x, w, bias)
    assert not unit_scales


def test_the_classic_training_step_runs_none_of_the_ops_taken_out():
    """Per step (simulated H100, the classic structure): no permute or select from weight packing
    and workspace planes, one ones_like (the loss's), no zeros (the BatchNorm backward's unused
    fill), four fewer ops per 3x3 conv than the step-by-step packing took."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import host_overhead
    finally:
        sys.path.pop(0)
    ops = host_overhead.measure("training", reps=1, base_channels=4)["torch_ops_by_name"]
    assert "permute" not in str(ops) and ops.get("select.int", 0) <= 2, ops
    assert ops.get("ones_like.default", 0) <= 1 and "zeros.default" not in ops, ops
    assert ops["flip.default"] == ops["transpose.int"] == 17, ops  # one per conv input gradient
    assert ops["new_empty_strided.default"] <= 35 + 8 + 1, ops  # the packs (+ autograd's copies)


def test_untracked_detaches_only_where_autograd_would_record():
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    with torch.enable_grad():
        got = untracked(w)
        assert got is not w and not got.requires_grad and got.data_ptr() == w.data_ptr()
        assert untracked(w.detach()) is not w  # no grad: returned as is
        plain = torch.randn(3)
        assert untracked(plain) is plain
    with torch.no_grad():
        assert untracked(w) is w


@pytest.mark.parametrize("grad", [True, False])
def test_the_prepared_weights_never_carry_a_graph(grad):
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
    u = torch.nn.Parameter(torch.randn(4, 5, 2, 2))
    with torch.set_grad_enabled(grad):
        prepared = [
            _packed_conv_weight(w, torch.bfloat16),
            _flipped_weight(w, torch.bfloat16, packed=True),
            _packed_upconv_weight(u, torch.bfloat16),
        ]
    for t in prepared:
        assert not t.requires_grad and t.grad_fn is None
    assert torch.equal(prepared[0], w.detach().to(torch.bfloat16))
    assert torch.equal(prepared[2], u.detach().to(torch.bfloat16))
