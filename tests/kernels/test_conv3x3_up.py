"""Spec for the decoder's first conv reading an up-sampled source that never exists as a tensor
(``kernels.conv3x3.conv3x3_up_bn_act`` / ``conv3x3_up_bn_stats`` and the ops
``fastunet::conv3x3_up_bn_act`` / ``fastunet::conv3x3_up_bn_stats``).

The truth is milesial's decoder in float64 eager torch on the same (rounded) inputs:
``conv2d(cat([skip, F.pad(F.interpolate(T(up), scale_factor=2, mode='bilinear',
align_corners=True), ...)]))`` (or without the interpolation, or up first). Outputs are
NaN-poisoned so unwritten elements fail. Without a GPU the kernels run in Triton's interpreter:
tiny shapes, a spread of cases rather than a product.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastunet.kernels import conv3x3 as K
from fastunet.kernels._common import interpreting
from helpers import RING2_FULL, assert_close, max_rel_error, poisoned_like, tolerance_name

import fastunet.ops  # noqa: F401  (registers the ops)

pytestmark = pytest.mark.conv3x3

ROOT = Path(__file__).resolve().parents[2]
ACT = torch.ops.fastunet.conv3x3_up_bn_act
STATS = torch.ops.fastunet.conv3x3_up_bn_stats

ORDERS = [pytest.param(False, id="skip_first"), pytest.param(True, id="up_first")]


# ------------------------------------------------------------------------------------ helpers


def spread(quick: tuple, **axes):
    """``pytest.param``s over the product of ``axes`` (name -> list of (id, value)); every case
    but ``quick`` (a tuple of ids) is a slow test: quick mode keeps one case per test (the
    interpreter takes seconds per launch), the full suite runs them all."""
    names = list(axes)
    params = []
    for combo in itertools.product(*axes.values()):
        ids = tuple(i for i, _ in combo)
        marks = () if ids == quick else (pytest.mark.slow,)
        params.append(pytest.param(*(v for _, v in combo), id="-".join(ids), marks=marks))
    return ",".join(names), params


_DT = [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
_ORD = [("skip_first", False), ("up_first", True)]


def _skip_bf16(dtype):
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA")


def _act(n, c, h, w, dtype, device, layout="channels_last"):
    if layout == "channel_slice":
        # A slice [:, 2:2+c] of a wider NHWC buffer: the pixel stride is not c.
        big = torch.randn(n, c + 5, h, w).to(dtype).to(device, memory_format=torch.channels_last)
        return big[:, 2 : 2 + c]
    return torch.randn(n, c, h, w).to(dtype).to(device, memory_format=torch.channels_last)


def _norm(c, device):
    """A BatchNorm+ReLU transform as the training path passes it: fp64 [c] scale and shift."""
    return (torch.rand(c, dtype=torch.float64) + 0.5).to(device), (0.5 * torch.randn(c, dtype=torch.float64)).to(device)


def up_map(up, bilinear, size, norm=None):
    """milesial's U in float64 on CPU: T(up), bilinear x2 (align_corners=True), then F.pad to size."""
    u = up.detach().cpu().double()
    if norm is not None:
        s, t = (v.cpu().double()[:, None, None] for v in norm)
        u = torch.relu(u * s + t)
    if bilinear:
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=True)
    dh, dw = size[0] - u.shape[2], size[1] - u.shape[3]
    return F.pad(u, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


def reference(skip, up, weight, scale, shift, *, up_first, bilinear, relu=True, skip_norm=None, up_norm=None):
    s = skip.detach().cpu().double()
    if skip_norm is not None:
        a, b = (v.cpu().double()[:, None, None] for v in skip_norm)
        s = torch.relu(s * a + b)
    u = up_map(up, bilinear, skip.shape[2:], up_norm)
    xin = torch.cat([u, s] if up_first else [s, u], 1)
    y = F.conv2d(xin, weight.detach().cpu().double(), padding=1)
    y = y * scale.cpu().double()[:, None, None] + shift.cpu().double()[:, None, None]
    return y.clamp_min(0) if relu else y


def operands(skip_shape, up_shape, c_out, dtype, device, *, skip_layout="channels_last", up_layout="channels_last"):
    n, cs, h, w = skip_shape
    _, cu, hu, wu = up_shape
    skip = _act(n, cs, h, w, dtype, device, skip_layout)
    up = _act(n, cu, hu, wu, dtype, device, up_layout)
    weight = (torch.randn(c_out, cs + cu, 3, 3) / (9 * (cs + cu)) ** 0.5).to(dtype).to(device)
    scale = (torch.rand(c_out) + 0.5).to(device)
    shift = (0.5 * torch.randn(c_out)).to(device)
    return skip, up, weight, scale, shift


def _ordered_weight(weight, up_first, cs):
    """The weight for the order up_first, from one written for cat([skip, U])."""
    return torch.cat([weight[:, cs:], weight[:, :cs]], 1) if up_first else weight


# -------------------------------------------------------------------------------- the launchers


@pytest.mark.parametrize(
    *spread(
        ("pad1", "skip_first", "fp16"),
        geometry=[
            # odd input: pad 0 above/left, 1 below/right
            ("odd", ((7, 6), (6, 5), ("channels_last", "channels_last"))),
            # pad 1 above and below, 1 left / 2 right; the skip a channel slice of a wider buffer
            ("pad1", ((8, 9), (6, 6), ("channel_slice", "channels_last"))),
            # up read from a wider NHWC buffer
            ("upslice", ((5, 7), (3, 6), ("channels_last", "channel_slice"))),
        ],
        up_first=_ORD,
        dtype=_DT,
    )
)
def test_padded_source(geometry, up_first, dtype, device):
    _skip_bf16(dtype)
    skip_hw, up_hw, layouts = geometry
    cs, cu, c_out = 5, 19, 7  # 19: a ragged K block of U's channels
    skip, up, weight, scale, shift = operands(
        (2, cs, *skip_hw), (2, cu, *up_hw), c_out, dtype, device, skip_layout=layouts[0], up_layout=layouts[1]
    )  # fmt: skip
    weight = _ordered_weight(weight, up_first, cs)
    out = poisoned_like(torch.empty(2, c_out, *skip_hw, dtype=dtype, device=device))
    got = K.conv3x3_up_bn_act(
        skip, up, K.pack_conv3x3_weight(weight), scale, shift, up_first=up_first, bilinear=False, out=out
    )  # fmt: skip
    assert got is out
    expected = reference(skip, up, weight, scale, shift, up_first=up_first, bilinear=False)
    assert_close(got, expected, tolerance_name(dtype), f"pad {up_hw} -> {skip_hw}")


@pytest.mark.parametrize(
    *spread(
        ("odd", "up_first", "fp32"),
        geometry=[
            ("odd", ((7, 7), (3, 3))),  # odd low-res map, odd skip: pad 0 above, 1 below
            ("odd_even", ((6, 9), (3, 4))),  # odd x even, pad only in width (0 left, 1 right)
            ("even_odd", ((10, 9), (4, 3))),  # even x odd, pad 1 above and below, 1 left / 2 right
        ],
        up_first=_ORD,
        dtype=_DT,
    )
)
def test_bilinear_source(geometry, up_first, dtype, device):
    _skip_bf16(dtype)
    skip_hw, low_hw = geometry
    cs, cu, c_out = 6, 17, 9
    skip, up, weight, scale, shift = operands((2, cs, *skip_hw), (2, cu, *low_hw), c_out, dtype, device)
    weight = _ordered_weight(weight, up_first, cs)
    out = poisoned_like(torch.empty(2, c_out, *skip_hw, dtype=dtype, device=device))
    got = K.conv3x3_up_bn_act(
        skip, up, K.pack_conv3x3_weight(weight), scale, shift, up_first=up_first, bilinear=True, relu=False, out=out
    )  # fmt: skip
    expected = reference(skip, up, weight, scale, shift, up_first=up_first, bilinear=True, relu=False)
    assert_close(got, expected, tolerance_name(dtype), f"bilinear {low_hw} -> {skip_hw}")


@pytest.mark.parametrize(
    "up_first", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["skip_first", "up_first"]
)
def test_pad_zero_is_the_plain_two_source_conv(up_first, device):
    """Equal sizes: the launcher takes the plain conv (same code, same tuning key), and the
    geometry path forced at pad 0 computes the very same numbers."""
    skip, up, weight, scale, shift = operands((2, 5, 6, 5), (2, 18, 6, 5), 8, torch.float32, device)
    weight = K.pack_conv3x3_weight(_ordered_weight(weight, up_first, 5))
    x, x2 = (up, skip) if up_first else (skip, up)
    plain = K.conv3x3_bn_act(x, weight, scale, shift, x2=x2)
    via_up = K.conv3x3_up_bn_act(skip, up, weight, scale, shift, up_first=up_first, bilinear=False)
    torch.testing.assert_close(via_up, plain, rtol=0, atol=0)
    dims = K._check_conv_inputs(x, weight, scale, shift, x2)
    out = poisoned_like(torch.empty_like(plain))
    geometry = (1 if up_first else 2, 1, 6, 5, 0, 0, 6, 5)
    K._launch(x, x2, weight, scale, shift, out, dims, relu=True, up=geometry)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    *spread(
        ("bilinear", "skip_first", "fp32"),
        geometry=[("pad", (False, (7, 8), (6, 6))), ("bilinear", (True, (7, 6), (3, 3)))],
        up_first=_ORD,
        dtype=_DT,
    )
)
def test_training_form(geometry, up_first, dtype, device):
    """z, mean and var with both sources normalized on load (up: before interpolating)."""
    _skip_bf16(dtype)
    bilinear, skip_hw, up_hw = geometry
    cs, cu, c_out = 5, 18, 6
    skip, up, weight, _, _ = operands((2, cs, *skip_hw), (2, cu, *up_hw), c_out, dtype, device)
    weight = _ordered_weight(weight, up_first, cs)
    bias = (0.3 * torch.randn(c_out)).to(device)
    skip_norm, up_norm = _norm(cs, device), _norm(cu, device)
    out = poisoned_like(torch.empty(2, c_out, *skip_hw, dtype=dtype, device=device))
    z, mean, var = K.conv3x3_up_bn_stats(
        skip, up, K.pack_conv3x3_weight(weight), bias, up_first=up_first, bilinear=bilinear,
        skip_norm=skip_norm, up_norm=up_norm, out=out,
    )  # fmt: skip
    assert z is out
    ones = torch.ones(c_out, device=device)
    expected = reference(
        skip, up, weight, ones, bias, up_first=up_first, bilinear=bilinear, relu=False,
        skip_norm=skip_norm, up_norm=up_norm,
    )  # fmt: skip
    tol = tolerance_name(dtype)
    assert_close(z, expected, tol, "z")
    # The statistics are of z as stored (rounded): compare with the stored z's own.
    zs = z.double().cpu()
    assert_close(mean, zs.mean((0, 2, 3)), tol, "mean", scale=zs.std().item())
    assert_close(var, zs.var((0, 2, 3), unbiased=False), tol, "var")


def check_both_forms(skip_shape, up_shape, c_out, dtype, device, *, bilinear, up_first=False):
    """The eval form (into a NaN-poisoned output) and the training form (both sources normalized
    on load, z and its statistics) of one decoder conv against float64."""
    skip, up, weight, scale, shift = operands(skip_shape, up_shape, c_out, dtype, device)
    weight = _ordered_weight(weight, up_first, skip_shape[1])
    packed = K.pack_conv3x3_weight(weight)
    tol = tolerance_name(dtype)
    what = f"{'bilinear' if bilinear else 'pad'} {tuple(up_shape)} -> {tuple(skip_shape)} {dtype}"
    out = poisoned_like(torch.empty(skip_shape[0], c_out, *skip_shape[2:], dtype=dtype, device=device))
    got = K.conv3x3_up_bn_act(skip, up, packed, scale, shift, up_first=up_first, bilinear=bilinear, out=out)
    expected = reference(skip, up, weight, scale, shift, up_first=up_first, bilinear=bilinear)
    assert_close(got, expected, tol, f"eval {what}")
    skip_norm, up_norm = _norm(skip_shape[1], device), _norm(up_shape[1], device)
    z, mean, var = K.conv3x3_up_bn_stats(
        skip, up, packed, shift, up_first=up_first, bilinear=bilinear, skip_norm=skip_norm, up_norm=up_norm
    )  # fmt: skip
    expected = reference(
        skip, up, weight, torch.ones_like(shift), shift, up_first=up_first, bilinear=bilinear, relu=False,
        skip_norm=skip_norm, up_norm=up_norm,
    )  # fmt: skip
    assert_close(z, expected, tol, f"train z {what}")
    zs = z.double().cpu()
    assert_close(mean, zs.mean((0, 2, 3)), tol, f"mean {what}", scale=zs.std().item())
    assert_close(var, zs.var((0, 2, 3), unbiased=False), tol, f"var {what}")


# ------------------------------------------------------------------------- ring 3: real sizes


@pytest.mark.cuda
@pytest.mark.parametrize(
    "bilinear, skip_shape, up_shape",
    [
        (True, (2, 64, 128, 128), (2, 64, 64, 64)),  # milesial-bilinear's last decoder level, 128 input
        (True, (2, 256, 33, 31), (2, 256, 16, 15)),  # an odd input: bilinear x2, then padded
        (False, (2, 128, 65, 63), (2, 128, 64, 62)),  # the padded up-conv output of an odd input
    ],
    ids=["bilinear", "bilinear_odd", "pad_odd"],
)
@pytest.mark.parametrize("dtype", [d for _, d in _DT], ids=[i for i, _ in _DT])
def test_real_unet_sizes(bilinear, skip_shape, up_shape, dtype):
    check_both_forms(skip_shape, up_shape, 64, dtype, torch.device("cuda"), bilinear=bilinear)


def test_rejects_bad_geometry(device):
    skip, up, weight, scale, shift = operands((1, 4, 5, 5), (1, 3, 3, 3), 2, torch.float32, device)
    packed = K.pack_conv3x3_weight(weight)
    with pytest.raises(ValueError, match="must be non-empty and fit"):  # 6x6 > 5x5
        K.conv3x3_up_bn_act(skip, up, packed, scale, shift, up_first=False, bilinear=True)
    with pytest.raises(ValueError, match="batch"):
        K.conv3x3_up_bn_act(skip, torch.cat([up, up]), packed, scale, shift, up_first=False, bilinear=False)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C1\+C2"):
        K.conv3x3_up_bn_act(skip, up[:, :2], packed, scale, shift, up_first=False, bilinear=False)
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        K.conv3x3_up_bn_act(skip, None, packed, scale, shift, up_first=False, bilinear=False)
    with pytest.raises(ValueError, match="fit in the skip"):
        ACT(
            skip.double(),
            torch.randn(1, 3, 6, 5, dtype=torch.float64),
            weight.double(),
            scale,
            shift,
            True,
            False,
            False,
        )


# ------------------------------------------------------------------------------------ the ops


def _op_inputs(dtype, device, *, bilinear, skip_hw=(7, 6), up_hw=(3, 3), cs=5, cu=6, c_out=4):
    skip, up, weight, _, _ = operands((2, cs, *skip_hw), (2, cu, *up_hw), c_out, torch.float64, device)
    bias = 0.3 * torch.randn(c_out, dtype=torch.float64, device=device)
    (ss, st), (us, ut) = _norm(cs, device), _norm(cu, device)
    return skip.to(dtype), up.to(dtype), weight, bias, ss, st, us, ut


@pytest.mark.parametrize("bilinear", [False, True], ids=["pad", "bilinear"])
@pytest.mark.parametrize("up_first", ORDERS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)], ids=["fp64", "fp32"]
)
def test_training_gradients(bilinear, up_first, dtype, device):
    """Outputs, statistics and every gradient of ``conv3x3_up_bn_stats`` vs float64 autograd of
    the eager decoder (fp32: the kernels; fp64: the composite)."""
    dev = device if dtype != torch.float64 else torch.device("cpu")
    up_hw = (3, 3) if bilinear else (6, 5)
    inputs = _op_inputs(dtype, dev, bilinear=bilinear, up_hw=up_hw)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    skip, up, weight, bias, ss, st, us, ut = ref_leaves
    s_in = torch.relu(skip * ss[:, None, None] + st[:, None, None])
    u_in = torch.relu(up * us[:, None, None] + ut[:, None, None])
    if bilinear:
        u_in = F.interpolate(u_in, scale_factor=2, mode="bilinear", align_corners=True)
    dh, dw = skip.shape[2] - u_in.shape[2], skip.shape[3] - u_in.shape[3]
    u_in = F.pad(u_in, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
    z = F.conv2d(torch.cat([u_in, s_in] if up_first else [s_in, u_in], 1), weight, padding=1) + bias[:, None, None]
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    gz, gm, gv = torch.randn_like(z), torch.randn_like(mean), torch.randn_like(var)
    ((z * gz).sum() + (mean * gm).sum() + (var * gv).sum()).backward()

    z2, m2, v2 = STATS(*leaves, up_first, bilinear)
    assert z2.is_contiguous(memory_format=torch.channels_last)
    dev_d = z2.device
    (
        (z2.double() * gz.to(dev_d)).sum() + (m2.double() * gm.to(dev_d)).sum() + (v2.double() * gv.to(dev_d)).sum()
    ).backward()
    tol = tolerance_name(dtype)
    assert_close(z2, z, tol, "z")
    assert_close(m2, mean, tol, "mean", scale=z.std().item())
    assert_close(v2, var, tol, "var")
    for name, got, ref in zip(("skip", "up", "weight", "bias", "skip_scale", "skip_shift", "up_scale", "up_shift"),
                              leaves, ref_leaves, strict=True):  # fmt: skip
        assert_close(got.grad, ref.grad, tol, f"d{name}")


@pytest.mark.parametrize("bilinear", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["pad", "bilinear"])
def test_inference_op_and_gradients(bilinear, device):
    """``conv3x3_up_bn_act`` (kernel path, fp32) vs float64 autograd: output and gradients."""
    up_hw = (3, 4) if bilinear else (6, 6)
    skip, up, weight, scale, shift = operands((2, 5, 7, 8), (2, 6, *up_hw), 4, torch.float32, device)
    leaves = [t.detach().clone().requires_grad_() for t in (skip, up, weight, scale, shift)]
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (skip, up, weight, scale, shift)]
    y = ACT(*leaves, True, False, bilinear)
    s, u, w, a, b = ref_leaves
    xin = torch.cat([s, up_map_autograd(u, bilinear, s.shape[2:])], 1)
    yr = torch.relu(F.conv2d(xin, w, padding=1) * a[:, None, None] + b[:, None, None])
    g = torch.randn_like(yr)
    (y.double() * g.to(y.device)).sum().backward()
    (yr * g).sum().backward()
    tol = tolerance_name(torch.float32)
    assert_close(y, yr, tol, "y")
    for name, got, ref in zip(("skip", "up", "weight", "scale", "shift"), leaves, ref_leaves, strict=True):
        assert_close(got.grad, ref.grad, tol, f"d{name}")


def up_map_autograd(u, bilinear, size):
    if bilinear:
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=True)
    dh, dw = size[0] - u.shape[2], size[1] - u.shape[3]
    return F.pad(u, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


def _opcheck_cases(dtype, device):
    skip, up, weight, bias, ss, st, us, ut = _op_inputs(dtype, device, bilinear=True)
    scale, shift = torch.rand(4, dtype=dtype, device=device) + 0.5, torch.randn(4, dtype=dtype, device=device)
    w = weight.to(dtype)
    grad = [t.requires_grad_() for t in (skip, up, w, bias, ss, st, us, ut)]
    return {
        "act-bilinear": (ACT, (skip, up, w, scale, shift, True, False, True)),
        "act-pad": (ACT, (skip, up[:, :, :2].detach().clone().requires_grad_(), w, scale, shift, False, True, False)),
        "stats-bilinear": (STATS, (*grad, True, True)),
        "stats-pad-no-norm": (STATS, (skip, up, w, bias, None, None, None, None, False, False)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "act-pad",
        *(pytest.param(c, marks=pytest.mark.slow) for c in ("act-bilinear", "stats-bilinear", "stats-pad-no-norm")),
    ],
)
def test_opcheck_float64(case):
    op, args = _opcheck_cases(torch.float64, torch.device("cpu"))[case]
    torch.library.opcheck(op, args)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["act-bilinear", "act-pad", "stats-bilinear", "stats-pad-no-norm"])
def test_opcheck_on_the_kernel_path(case, device):
    op, args = _opcheck_cases(torch.float32, device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    skip, up, weight, bias, ss, st, us, ut = (
        t.requires_grad_() for t in _op_inputs(torch.float32, device, bilinear=True)
    )  # fmt: skip

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(*args):
        z, mean, var = STATS(*args, False, True)
        return z.float().sum() + mean.sum() + var.sum()

    args = (skip, up, weight, bias, ss, st, us, ut)
    f(*args).backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    z, mean, var = STATS(*args, False, True)
    (z.float().sum() + mean.sum() + var.sum()).backward()
    # Same ops both ways; AOT may hand the backward differently laid-out gradients (a sum's
    # expanded ones made dense), which reorders the kernels' reductions: rounding-level only.
    for name, g, a in zip(("skip", "up", "weight", "bias", "ss", "st", "us", "ut"), got, args, strict=True):
        assert_close(g, a.grad.double(), "fp32", f"compiled d{name}")


@pytest.mark.slow
def test_reports_worst_errors(device, capsys):
    """Worst max|err| / max|ref| per dtype and form (the figures the report quotes)."""
    rows = {}
    for dtype in (torch.float32, torch.float16):
        for bilinear, up_hw in ((False, (15, 14)), (True, (7, 7))):
            skip, up, weight, scale, shift = operands((2, 24, 16, 15), (2, 40, *up_hw), 32, dtype, device)
            y = K.conv3x3_up_bn_act(
                skip, up, K.pack_conv3x3_weight(weight), scale, shift, up_first=False, bilinear=bilinear
            )  # fmt: skip
            expected = reference(skip, up, weight, scale, shift, up_first=False, bilinear=bilinear)
            rows[f"{dtype}-{'bilinear' if bilinear else 'pad'}"] = max_rel_error(y, expected)
    with capsys.disabled():
        print("\nconv3x3_up worst max|err|/max|ref|:", json.dumps(rows))
    assert all(v < (1e-5 if "float32" in k else 1e-2) for k, v in rows.items()), rows


# --------------------------------------------------------------------------------------------- ring 2
_RING2 = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_report as kr
from fastunet.kernels import conv3x3
arch, wanted = int(sys.argv[1]), {tuple(k) for k in json.loads(sys.argv[2])}
rows = []
for spec in conv3x3.compile_specs(arch):
    if (spec.config, spec.dtype) in wanted:
        r = kr.compile_spec(spec, arch)
        rows.append(dict(config=spec.config, dtype=spec.dtype, regs=r.regs, spills=r.spills, hgmma=r.hgmma,
                         error=r.error))
print(json.dumps(rows))
"""


def _form(config: str) -> str:
    """The form part of an up spec's config name, its tile prefix dropped (``up_pad_norm1_stats``)."""
    return re.sub(r"^M\d+_N\d+_K\d+_w\d+_s\d+_", "", config)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("arch", [80, 90])
def test_offline_compile_up_specs(arch):
    """The up forms' specs compiled offline: no compile error, no spills, and on sm_90 HGMMA in
    every spec (16-bit and TF32). Every spec with FASTUNET_RING2_FULL=1 (about 40 per arch, CPU-minutes
    from a cold cache); else the largest tile of each dtype and form (pad/bilinear, with and
    without the norm/statistics epilogues): 12 specs."""
    every = [s for s in K.compile_specs(arch) if s.extra["variant"] == "up"]
    forms = {(s.dtype, _form(s.config)) for s in every}
    # The sample: the first (largest) tile of each dtype and form, the one nearest the register budget.
    specs = every if RING2_FULL else list({(s.dtype, _form(s.config)): s for s in reversed(every)}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    wanted = json.dumps([(s.config, s.dtype) for s in specs])
    proc = subprocess.run(
        [sys.executable, "-c", _RING2, str(arch), wanted], capture_output=True, text=True, timeout=3600, env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == len(specs) > 0
    assert {(r["dtype"], _form(r["config"])) for r in rows} == forms, "every dtype of every form"
    assert not [r for r in rows if r["error"]], [r for r in rows if r["error"]]
    assert all(r["spills"] == 0 for r in rows), [r for r in rows if r["spills"]]
    assert arch < 90 or all(r["hgmma"] for r in rows), [r for r in rows if not r["hgmma"]]
    bilinear = {r["dtype"] for r in rows if "bilinear" in r["config"]}
    assert bilinear == {"fp32", "fp16", "bf16"}


def test_up_tuner_prunes_to_the_register_budget():
    """The "up" tuner never offers a tile over its register budget, and always offers one."""
    from fastunet.kernels._tuning import bucket

    for arch in (80, 90):
        for dtype in (torch.float32, torch.float16):
            elem = torch.empty(0, dtype=dtype).element_size()
            for bilinear in (False, True):
                for training in (False, True):
                    shape = dict(
                        variant="up", elem=elem, M=bucket(2 * 128 * 128), C1=128, C2=128, C_out=128,
                        SMALL_C=False, training=training, bilinear=bilinear,
                    )  # fmt: skip
                    kept = K._TUNERS["up"].candidates(arch, shape)
                    assert kept, (arch, dtype, bilinear, training)
                    for c in kept:
                        cfg = K._Cfg(
                            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages
                        )
                        assert K._fits_up(cfg, elem, bilinear, training), (arch, dtype, bilinear, training, cfg)
