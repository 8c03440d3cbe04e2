"""Every tile config of every tuned kernel, forced once, against the float64 eager composite.

The tuner only ever runs the configs it picks, and the interpreter runs one small tile per
kernel; a config that computes wrongly (a mask, a tile edge, a split) would surface only on the
GPU where it happens to win. Here each config of each tuner's list for this device is forced
(``_tuning.forced``) on a probe that exercises that kernel through its op, and the result is
compared with the same op on float64 copies of the inputs (the op's eager composite).

On a GPU (ring 3, ``benchmarks/gpu_check.py``) every config runs, in bf16 for the 16-bit lists
and fp32 with TF32 off for the IEEE lists. Without one, the interpreter runs the first config of
each tuner (fp16: its bf16 dot is broken) so the probes themselves stay under test.

A forced config must run its own kernel: a launcher raises when the forced config cannot run the
probe's operands (``conv3x3``'s TMA configs on an image without a statistics tile geometry used to
fall back to the pointer kernel silently), so each probe picks operands every config of its
tuner can run; ``tests/kernels/test_conv3x3_tma.py::test_forced_tma_config_runs_its_kernel_or_raises``
checks both sides under a simulated sm_90.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import HAS_CUDA, assert_close, tolerance_name

import fastunet  # noqa: F401  (registers torch.ops.fastunet)

triton = pytest.importorskip("triton")
from fastunet.kernels import _common, _tuning  # noqa: E402
from fastunet.kernels import conv3x3 as C  # noqa: E402
from fastunet.kernels import conv3x3_tma as T  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.gpu_check]

OPS = torch.ops.fastunet
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ARCH = _common.device_arch(DEVICE)
# bf16 wherever kernels do not run in the interpreter (whose bf16 dot is broken): on a GPU, and
# under the simulated GPU with which benchmarks/gpu_plan.py records what this file compiles.
HALF = torch.float16 if _common.interpreting() else torch.bfloat16


def _t(*shape, dtype=HALF, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _vec(c, lo=0.5, hi=1.5):
    return (torch.rand(c) * (hi - lo) + lo).to(DEVICE)


def _norm(c):
    return _vec(c), (torch.randn(c) * 0.5).to(DEVICE)


def _d(args):
    """float64 copies of the tensor arguments (the op's eager composite runs on those)."""
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _check_op(op, args, what, dtype=HALF):
    got = op(*args)
    want = op(*_d(args))
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.numel():
            assert_close(g, w, tolerance_name(dtype), f"{what} output {i}")


# ------------------------------------------------------------------------------ probes
def _conv_main(cfg):
    # Eval with partial tiles at every edge: a 12x10 image for the pointer tiles; a TMA config
    # runs only patches >= 32 pixels wide (``conv3x3_tma.tuned_geometry``), so 12x40, clipped at
    # the right edge. The weight packed as the model passes it (the TMA variant reads only that).
    tma = T.is_tma_config(cfg)
    x, w = _nhwc(_t(2, 40, 12, 40 if tma else 10)), C.pack_conv3x3_weight(_t(48, 40, 3, 3, scale=0.1))
    _check_op(OPS.conv3x3_bn_act, (x, None, w, _vec(48), torch.randn(48).to(DEVICE), True), "conv eval")
    # The training forms' statistics need a TMA tile of whole image rows (``tile_geometry``): 8x32
    # has one for each TMA BLOCK_M (64, 128, 256); a forced config that cannot run raises.
    h, wd = (8, 32) if tma else (12, 10)
    x = _nhwc(_t(2, 40, h, wd))
    x2 = _nhwc(_t(2, 24, h, wd))
    w2 = _t(48, 64, 3, 3, scale=0.1)
    args = (x, x2, w2, torch.zeros(48, device=DEVICE), None, None, *_norm(24))
    _check_op(OPS.conv3x3_bn_stats, args, "conv train (x2, norm2, stats)")
    _check_op(OPS.conv3x3_bn_stats, (x, None, w, torch.zeros(48, device=DEVICE), *_norm(40), None, None), "norm1")


def _conv_smallc(cfg):
    x, w = _nhwc(_t(2, 3, 12, 10)), _t(32, 3, 3, 3, scale=0.3)
    _check_op(OPS.conv3x3_bn_act, (x, None, w, _vec(32), torch.randn(32).to(DEVICE), True), "small-C eval")
    xp = OPS.pad_channels_nhwc(x, HALF, 8)
    wp = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, 5))
    _check_op(OPS.conv3x3_bn_stats, (xp, None, wp, torch.zeros(32, device=DEVICE), None, None, None, None), "dense")


def _conv_split(cfg):
    x, w = _nhwc(_t(1, 256, 4, 4)), _t(64, 256, 3, 3, scale=0.05)
    scale, shift = _vec(64), torch.randn(64).to(DEVICE)
    out = torch.empty(1, 64, 4, 4, device=DEVICE, dtype=HALF, memory_format=torch.channels_last)
    got = C._launch(x, None, C.pack_conv3x3_weight(w), scale, shift, out, (1, 256, 0, 4, 4, 64), relu=True, split_k=2)
    want = OPS.conv3x3_bn_act(*_d((x, None, w, scale, shift, True)))
    assert_close(got, want, tolerance_name(HALF), "split-K conv")


def _conv_head(cfg):
    c_out = min(cfg.BLOCK_N, C.MAX_HEAD_C_OUT) - 5
    x, w = _nhwc(_t(2, 16, 8, 6)), _t(c_out, 16, 3, 3, scale=0.2)
    hw, hb = (torch.randn(3, c_out, 1, 1) * 0.2).to(DEVICE), torch.randn(3).to(DEVICE)
    args = (x, None, w, _vec(c_out), torch.randn(c_out).to(DEVICE), True, hw, hb, "softmax")
    _check_op(OPS.conv3x3_bn_act_head, args, "conv + head")


def _wgrad(small_c: bool, dtype=HALF):
    def probe(cfg):
        c1 = 3 if small_c else 40
        g, x = _nhwc(_t(2, 32, 9, 11, dtype=dtype)), _nhwc(_t(2, c1, 9, 11, dtype=dtype))
        x2 = None if small_c else _nhwc(_t(2, 20, 9, 11, dtype=dtype))
        norm2 = (None, None) if small_c else _norm(20)
        _check_op(OPS.conv3x3_weight_grad, (g, x, x2, *_norm(c1), *norm2), "weight grad", dtype)

    return probe


def _head1x1(cfg):
    x, w = _nhwc(_t(2, 40, 9, 7)), _t(5, 40, 1, 1, scale=0.2)
    _check_op(OPS.head1x1, (x, w, torch.randn(5).to(DEVICE), "softmax", *_norm(40)), "head1x1")


def _maxpool(cfg):
    _check_op(OPS.maxpool2x2, (_nhwc(_t(2, 72, 10, 6)), *_norm(72)), "maxpool")


def _upconv(dtype=HALF):
    def probe(cfg):
        x, w = _nhwc(_t(2, 48, 5, 7, dtype=dtype)), _t(48, 40, 2, 2, dtype=dtype, scale=0.2)
        _check_op(OPS.upconv2x2, (x, w, torch.randn(40).to(DEVICE), *_norm(48)), "upconv", dtype)

    return probe


def _affine_bwd(cfg):
    _check_op(OPS.affine_relu_backward, (_nhwc(_t(2, 72, 9, 7)), _nhwc(_t(2, 72, 9, 7)), *_norm(72)), "BN+ReLU bwd")


def _maxpool_bwd(cfg):
    args = (_nhwc(_t(2, 72, 5, 3)), _nhwc(_t(2, 72, 10, 6)), *_norm(72))
    _check_op(OPS.maxpool2x2_backward, args, "pool bwd")


def _upconv_dgrad(cfg):
    _check_op(OPS.upconv2x2_input_grad, (_nhwc(_t(2, 40, 10, 14)), _t(48, 40, 2, 2, scale=0.2)), "upconv dX")


def _upconv_wgrad(cfg):
    args = (_nhwc(_t(2, 40, 10, 14)), _nhwc(_t(2, 48, 5, 7)), *_norm(48))
    _check_op(OPS.upconv2x2_weight_grad, args, "upconv dW")


def _head_wgrad(cfg):
    _check_op(OPS.head1x1_weight_grad, (_nhwc(_t(2, 5, 9, 7)), _nhwc(_t(2, 40, 9, 7)), *_norm(40)), "head dW")


def _head_dgrad(cfg):
    _check_op(OPS.head1x1_input_grad, (_nhwc(_t(2, 5, 9, 7)), torch.randn(5, 40, 1, 1).to(DEVICE)), "head dX")


def _conv_up(cfg):
    # pad (17x13 skip, 16x12 up) and bilinear (8x6 low-res), both concat orders, both forms
    skip, up = _nhwc(_t(2, 24, 17, 13)), _nhwc(_t(2, 16, 16, 12))
    w = _t(32, 40, 3, 3, scale=0.1)
    args = (skip, up, w, _vec(32), torch.randn(32).to(DEVICE), True, False, False)
    _check_op(OPS.conv3x3_up_bn_act, args, "up conv eval (pad, skip first)")
    low = _nhwc(_t(2, 16, 8, 6))
    args = (skip, low, w, torch.zeros(32, device=DEVICE), *_norm(24), *_norm(16), True, True)
    _check_op(OPS.conv3x3_up_bn_stats, args, "up conv train (bilinear, up first)")


def _nearest(dtype=HALF):
    def probe(cfg):
        x, w = _nhwc(_t(2, 40, 5, 7, dtype=dtype)), _t(24, 40, 2, 2, dtype=dtype, scale=0.2)
        _check_op(OPS.upconv_nearest2x2, (x, w, torch.randn(24).to(DEVICE), True, *_norm(40)), "nearest up", dtype)

    return probe


def _nearest_dgrad(dtype=HALF):
    def probe(cfg):
        g, w = _nhwc(_t(2, 24, 10, 14, dtype=dtype)), _t(24, 40, 2, 2, dtype=dtype, scale=0.2)
        _check_op(OPS.upconv_nearest2x2_input_grad, (g, w), "nearest up dX", dtype)

    return probe


def _nearest_wgrad(dtype=HALF):
    def probe(cfg):
        g, x = _nhwc(_t(2, 24, 10, 14, dtype=dtype)), _nhwc(_t(2, 40, 5, 7, dtype=dtype))
        _check_op(OPS.upconv_nearest2x2_weight_grad, (g, x, *_norm(40)), "nearest up dW", dtype)

    return probe


# tuner name -> (probe, needs IEEE fp32 dots)
PROBES = {
    "conv3x3.main": (_conv_main, False),
    "conv3x3.smallc": (_conv_smallc, False),
    "conv3x3.split": (_conv_split, False),
    "conv3x3.head": (_conv_head, False),
    "conv3x3.up": (_conv_up, False),
    "conv3x3_wgrad.main": (_wgrad(False), False),
    "conv3x3_wgrad.smallc": (_wgrad(True), False),
    "conv3x3_wgrad.ieee": (_wgrad(False, torch.float32), True),
    "head1x1": (_head1x1, False),
    "maxpool2x2": (_maxpool, False),
    "upconv2x2": (_upconv(), False),
    "upconv2x2.ieee": (_upconv(torch.float32), True),
    "upconv_nearest2x2": (_nearest(), False),
    "upconv_nearest2x2.ieee": (_nearest(torch.float32), True),
    "upconv_nearest2x2.dgrad": (_nearest_dgrad(), False),
    "upconv_nearest2x2.dgrad.ieee": (_nearest_dgrad(torch.float32), True),
    "upconv_nearest2x2.wgrad": (_nearest_wgrad(), False),
    "upconv_nearest2x2.wgrad.ieee": (_nearest_wgrad(torch.float32), True),
    "norm_act_bwd.affine_relu": (_affine_bwd, False),
    "norm_act_bwd.maxpool": (_maxpool_bwd, False),
    "upconv2x2_bwd.dgrad": (_upconv_dgrad, False),
    "upconv2x2_bwd.wgrad": (_upconv_wgrad, False),
    "head1x1_bwd.wgrad": (_head_wgrad, False),
    "head1x1_bwd.dgrad": (_head_dgrad, False),
}


def _params():
    out = []
    for name, tuner in sorted(_tuning.TUNERS.items()):
        for i, cfg in enumerate(tuner.config_list(ARCH)):
            cfg_name = _tuning.config_name(cfg)
            marks = []
            if _common.interpreting() and i > 0:
                marks.append(pytest.mark.skip(reason="interpreter: the first config of each tuner; every one on a GPU"))
            out.append(pytest.param(name, cfg_name, id=f"{name}-{cfg_name}", marks=marks))
    return out


def test_every_tuner_has_a_probe():
    assert set(PROBES) == set(_tuning.TUNERS), "a tuner without a probe is never checked config by config"


@pytest.mark.parametrize("tuner, config", _params())
def test_forced_config_matches_reference(tuner, config, monkeypatch):
    probe, ieee = PROBES[tuner]
    cfg = _tuning.TUNERS[tuner]._named(DEVICE, config)
    if ieee:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    before = _tuning.stats().get("forced_picks", 0)
    with _tuning.forced({tuner: config}):
        try:
            probe(cfg)
        except triton.runtime.errors.OutOfResources as exc:
            pytest.skip(f"{config} does not fit this GPU for this dtype (the tuner prunes it): {exc}")
    assert _tuning.stats().get("forced_picks", 0) > before, f"{tuner} never launched: the probe misses its kernel"


def test_forcing_an_unknown_config_or_tuner_is_an_error():
    with pytest.raises(KeyError, match="no tuner"), _tuning.forced({"conv3x3.nope": "x"}):
        pass
    with _tuning.forced({"maxpool2x2": "P1_C1_w1_s1"}), pytest.raises(KeyError, match="no config"):
        with contextlib.suppress(ValueError):
            _maxpool(None)
