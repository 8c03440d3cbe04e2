"""Per-layer benchmark: every distinct layer shape of the U-Net, fastunet's op against the
PyTorch ops it replaces, so the slowest layer (and the one furthest behind PyTorch) shows.

=================  ===========================================  ==================================
kind               fastunet op (``torch.ops.fastunet``)          PyTorch ops it replaces
=================  ===========================================  ==================================
``conv3x3``        ``conv3x3_bn_act(x, x2, w, scale, shift)``   ``conv2d`` + ``batch_norm`` (eval)
                                                                + ``relu_``
``conv3x3_head``   ``conv3x3_bn_act_head(...)``                 the above + ``conv2d`` 1x1 +
                                                                ``sigmoid``
``upconv``         ``upconv2x2(x, w, b)``                       ``conv_transpose2d`` + ``cat``
                                                                with the skip
``maxpool``        ``maxpool2x2(x)``                            ``max_pool2d``
``head``           ``head1x1(x, w, b, "sigmoid")``              ``conv2d`` 1x1 + ``sigmoid``
=================  ===========================================  ==================================

The first conv of a decoder level gets ``x2`` (the skip) on the fastunet side, which never
builds the concatenated tensor; on the PyTorch side it reads the already concatenated tensor,
whose cost is charged to the ``upconv`` row. Arguments are prepared the way ``fastunet.UNet``
prepares them: weights cast to the compute dtype (and on CUDA repacked by
``fastunet.kernels.pack_conv3x3_weight`` / ``pack_upconv2x2_weight``, once, outside the timing),
BatchNorm and conv bias folded into fp32 ``scale``/``shift``, biases in fp32. The PyTorch side
gets weights pre-cast to the compute dtype (favouring it slightly over eager autocast, which
casts on every call) and fp32 BatchNorm parameters, all activations channels_last.

Every op's output is checked against the same math in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flops import LayerSpec, unet_layers
from providers import DTYPES, OUTPUT_TOL, ModelConfig, compute_precision, failure_reason, output_error
from timing import time_op

import fastunet  # noqa: F401  (registers torch.ops.fastunet)
from fastunet.backend import interpreting

_ops = torch.ops.fastunet
_BN_EPS = 1e-5


def layer_specs(cfg: ModelConfig, batch: int, size: int) -> list[tuple[LayerSpec, list[str]]]:
    """The distinct layer shapes, each with the names of every layer that has it.

    Shapes repeat (an encoder level's second conv has the same shape as the matching decoder
    level's second conv); each is timed once. The fused last-conv + head that eval-mode
    fastunet runs is appended as its own row.
    """
    specs = unet_layers(
        cfg.in_ch, cfg.out_ch, base_channels=cfg.base_channels, depth=cfg.depth, batch=batch, height=size
    )
    last_conv = f"conv{2 * cfg.depth + 1}.3"
    specs.append(LayerSpec(f"{last_conv}+head", "conv3x3_head", batch, cfg.base_channels, 0, cfg.out_ch, size, size))
    distinct: dict[tuple, tuple[LayerSpec, list[str]]] = {}
    for spec in specs:
        key = (spec.kind, spec.n, spec.c_in, spec.c_skip, spec.c_out, spec.h, spec.w)
        if key in distinct:
            distinct[key][1].append(spec.name)
        else:
            distinct[key] = (spec, [spec.name])
    return list(distinct.values())


@dataclass
class LayerCase:
    """One layer ready to run: ``fastunet()`` and ``torch()`` each return the layer's output.

    ``reference()`` computes the float64 output of fastunet's op (on demand: it is the costly
    part of a case, and ``benchmarks/gpu_plan.py`` only records the op's launches);
    ``torch_part(out)`` extracts the comparable part of the PyTorch output (the upsampled half
    of ``cat([up, skip])``).
    """

    spec: LayerSpec
    fastunet: Callable[[], torch.Tensor]
    torch: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]
    torch_part: Callable[[torch.Tensor], torch.Tensor]


def _bn_params(c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "bias": 0.1 * torch.randn(c, generator=gen),
        "gamma": 1 + 0.1 * torch.randn(c, generator=gen),
        "beta": 0.1 * torch.randn(c, generator=gen),
        "mean": 0.1 * torch.randn(c, generator=gen),
        "var": 0.5 + torch.rand(c, generator=gen),
    }


def _fold(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm and conv bias as ``scale * conv + shift`` (what fastunet.UNet passes)."""
    scale = p["gamma"] / torch.sqrt(p["var"] + _BN_EPS)
    return scale, (p["bias"] - p["mean"]) * scale + p["beta"]


def _as_model_passes(weight: torch.Tensor, pack: str, packed: bool | None = None) -> torch.Tensor:
    """The weight as ``fastunet.UNet`` hands it to the op: on CUDA (or with ``packed``), repacked
    for the kernels (same logical shape and values, kernel-friendly strides); on CPU, where the
    model runs the eager fallback and never calls the ops, as it is (and triton is never
    imported)."""
    if not (weight.device.type == "cuda" if packed is None else packed):
        return weight
    from fastunet import kernels

    packer = getattr(kernels, pack, None)
    return packer(weight) if packer is not None else weight


def _conv_bn_relu(x, w, p, dtype):
    y = F.conv2d(x, w, p["bias"].to(dtype), padding=1)
    return F.relu_(F.batch_norm(y, p["mean"], p["var"], p["gamma"], p["beta"], False, 0.0, _BN_EPS))


def make_layer_case(
    spec: LayerSpec, dtype: torch.dtype, device: torch.device, seed: int = 0, *, packed: bool | None = None
) -> LayerCase:
    """Random inputs and parameters for ``spec`` (activations ``[n, c, h, w]`` channels_last);
    ``packed``: hand the ops repacked weights (default: on CUDA, as ``fastunet.UNet`` does)."""
    gen = torch.Generator().manual_seed(seed)
    n, h, w = spec.n, spec.h, spec.w

    def act(c: int, hh: int = h, ww: int = w) -> torch.Tensor:
        t = torch.randn(n, c, hh, ww, generator=gen)
        return t.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def weight(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * math.sqrt(2.0 / fan_in)).to(device=device, dtype=dtype)

    def on(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in d.items()}

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64)

    def f64d(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: f64(v) for k, v in d.items()}

    whole = lambda out: out  # noqa: E731

    if spec.kind in ("conv3x3", "conv3x3_head"):
        c_total = spec.c_in + spec.c_skip
        c_mid = spec.c_in if spec.kind == "conv3x3_head" else spec.c_out
        x = act(spec.c_in)
        x2 = act(spec.c_skip) if spec.c_skip else None
        xin = x if x2 is None else torch.cat([x, x2], 1)  # PyTorch reads the concatenated tensor
        wt = weight(c_mid, c_total, 3, 3, fan_in=9 * c_total)
        p = on(_bn_params(c_mid, gen))
        scale, shift = _fold(p)
        conv_ref = lambda: _conv_bn_relu(f64(xin), f64(wt), f64d(p), torch.float64)  # noqa: E731
        w_op = _as_model_passes(wt, "pack_conv3x3_weight", packed)
        if spec.kind == "conv3x3":
            return LayerCase(
                spec,
                lambda: _ops.conv3x3_bn_act(x, x2, w_op, scale, shift, True),
                lambda: _conv_bn_relu(xin, wt, p, dtype),
                conv_ref,
                whole,
            )
        hw = weight(spec.c_out, c_mid, 1, 1, fan_in=c_mid)
        hb = (0.1 * torch.randn(spec.c_out, generator=gen)).to(device)
        return LayerCase(
            spec,
            lambda: _ops.conv3x3_bn_act_head(x, x2, w_op, scale, shift, True, hw, hb, "sigmoid"),
            lambda: torch.sigmoid(F.conv2d(_conv_bn_relu(xin, wt, p, dtype), hw, hb.to(dtype))),
            lambda: torch.sigmoid(F.conv2d(conv_ref(), f64(hw), f64(hb))),
            whole,
        )
    if spec.kind == "upconv":
        x = act(spec.c_in)
        skip = act(spec.c_skip, 2 * h, 2 * w)
        wt = weight(spec.c_in, spec.c_out, 2, 2, fan_in=spec.c_in)
        b = (0.1 * torch.randn(spec.c_out, generator=gen)).to(device)
        w_op = _as_model_passes(wt, "pack_upconv2x2_weight", packed)
        return LayerCase(
            spec,
            lambda: _ops.upconv2x2(x, w_op, b),
            lambda: torch.cat([F.conv_transpose2d(x, wt, b.to(dtype), stride=2), skip], 1),
            lambda: F.conv_transpose2d(f64(x), f64(wt), f64(b), stride=2),
            lambda out: out[:, : spec.c_out],
        )
    if spec.kind == "maxpool":
        x = act(spec.c_in)
        return LayerCase(
            spec, lambda: _ops.maxpool2x2(x), lambda: F.max_pool2d(x, 2), lambda: F.max_pool2d(f64(x), 2), whole
        )
    if spec.kind == "head":
        x = act(spec.c_in)
        wt = weight(spec.c_out, spec.c_in, 1, 1, fan_in=spec.c_in)
        b = (0.1 * torch.randn(spec.c_out, generator=gen)).to(device)
        return LayerCase(
            spec,
            lambda: _ops.head1x1(x, wt, b, "sigmoid"),
            lambda: torch.sigmoid(F.conv2d(x, wt, b.to(dtype))),
            lambda: torch.sigmoid(F.conv2d(f64(x), f64(wt), f64(b))),
            whole,
        )
    raise ValueError(f"unknown layer kind {spec.kind!r}")


def blank_layer_row(spec: LayerSpec, names: list[str], dtype_name: str, device: torch.device) -> dict:
    precision = compute_precision(dtype_name, device)
    return {
        "layer": "=".join(names),
        "kind": spec.kind,
        "shape": spec.describe(),
        "count": len(names),
        "batch": spec.n,
        "size": None,
        "dtype": dtype_name,
        "precision": precision,
        "gflop": spec.flops / 1e9,
        "min_mb": None,
        "fastunet_ms": None,
        "fastunet_p20": None,
        "fastunet_p80": None,
        "torch_ms": None,
        "torch_p20": None,
        "torch_p80": None,
        "fastunet_tflops": None,
        "torch_tflops": None,
        "fastunet_gbps": None,
        "torch_gbps": None,
        "speedup": None,
        "peak_kind": None,
        "fastunet_peak_fraction": None,
        "fastunet_err": None,
        "torch_err": None,
        "tolerance": OUTPUT_TOL[precision],
        "status": "failed",
        "reason": None,
    }


def bench_layer(
    spec: LayerSpec,
    names: list[str],
    dtype_name: str,
    device: torch.device,
    *,
    size: int,
    warmup: int,
    reps: int,
    rep_ms: int = 100,
) -> dict:
    """Time one layer both ways and check both against float64; never raises.

    Status ``"ok"``, ``"wrong"`` (fastunet's error above tolerance) or ``"failed"`` (reason).
    TFLOP/s use ``spec.flops``; GB/s use ``spec.min_bytes`` (the bytes the fused op must move),
    the same count for both sides.
    """
    row = blank_layer_row(spec, names, dtype_name, device)
    row["size"] = size
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    row["min_mb"] = spec.min_bytes(itemsize) / 1e6
    try:
        if device.type != "cuda" and interpreting():
            raise RuntimeError("TRITON_INTERPRET=1 would time the Triton interpreter; unset it")
        case = make_layer_case(spec, dtype, device)
        reference = case.reference()
        row["torch_err"] = output_error(case.torch_part(case.torch()), reference)[1]
        row["fastunet_err"] = output_error(case.fastunet(), reference)[1]
        timings = {}
        for impl, fn in (("fastunet", case.fastunet), ("torch", case.torch)):
            t = time_op(fn, device=device, warmup=warmup, reps=reps, rep_ms=rep_ms)
            timings[impl] = t
            row[f"{impl}_ms"], row[f"{impl}_p20"], row[f"{impl}_p80"] = t.median_ms, t.p20_ms, t.p80_ms
            seconds = t.median_ms * 1e-3
            row[f"{impl}_tflops"] = spec.flops / seconds / 1e12 if spec.flops else None
            row[f"{impl}_gbps"] = spec.min_bytes(itemsize) / seconds / 1e9
        row["speedup"] = timings["torch"].median_ms / timings["fastunet"].median_ms
        row["status"] = "ok" if row["fastunet_err"] <= row["tolerance"] else "wrong"
        if row["status"] == "wrong":
            row["reason"] = f"fastunet error {row['fastunet_err']:.3g} above tolerance {row['tolerance']:g}"
    except Exception as exc:  # a missing or broken kernel must not end the run
        row["status"] = "failed"
        row["reason"] = failure_reason(exc)
    return row
