"""The 3x3 conv's main loop fed by Hopper's bulk tensor copy (TMA): a tuned candidate of
``conv3x3``'s main variant, never a replacement.

What changes against ``conv3x3._conv3x3_bn_act_kernel`` (the pointer variant): every operand
tile comes from a tensor descriptor instead of a tensor of pointers and masks.

* A (activations): a 4-D NHWC descriptor ``[N, H, W, C]`` (any pixel strides, channels
  contiguous) with a box of ``[1, BH, BW, BLOCK_K]``: the CTA's output tile is a 2-D patch of
  ``BH`` rows x ``BW`` columns of pixels (``BLOCK_M = BH * BW``), and K step ``(tap, channel
  block)`` is one box load at ``(n, h0 + kh - 1, w0 + kw - 1, c0)``. Coordinates off the image
  (-1, H, W) and channels past C are zero-filled by the copy engine: that is the conv's
  padding, so the per-element address math and masks of the pointer variant leave the loop.
  The ``[1, BH, BW, BLOCK_K]`` box is reshaped to the GEMM's ``[BLOCK_M, BLOCK_K]`` tile.
* B (weights): one 3-D descriptor per K source over the packed weight (``[tap, C_s, C_out]``,
  C_out contiguous; the second source's starts at input channel C1), box ``[1, BLOCK_K,
  BLOCK_N]``; channels past the source's C_s are zero-filled too, so a K block never reads the
  next tap's or the other source's weights (0 * Inf cannot happen).
* The output: a 4-D descriptor store ``[1, BH, BW, BLOCK_N]``, clipped by the copy engine at
  the image and channel edges (no store masks).

Both K sources (the decoder's fused concat) and the training forms (BatchNorm+ReLU of the
previous layer on the load, ``NORM1``/``NORM2``; this layer's batch-statistics partials in the
epilogue, ``STATS``) are supported. With a NORM, ``relu(s * 0 + t)`` is not 0, so the padding
must be zero *after* the transform: the shift is multiplied by a per-row 0/1 factor (the padded
rows, zero-filled, then give ``relu(0)``), one multiply per element rather than a select on a
row x channel mask. ``STATS`` writes the same per-tile partials as the pointer kernel, which
``bn_stats_finalize`` merges assuming tile t holds flat pixels ``[t * BLOCK_M, (t+1) *
BLOCK_M)``; a 2-D patch equals that flat range exactly when the patch is a run of one image
row (``W % BLOCK_M == 0``: ``BH = 1``) or a stack of whole rows (``BLOCK_M % W == 0`` and ``H %
BH == 0``), so the statistics forms run only with those geometries (``tile_geometry``). U-Net
sizes (powers of two) always have one.

Persistent scheduling (``TmaConfig.persistent``): the grid is ``min(tiles, CTAs per SM x SMs)``
and each CTA walks the tile list with a stride of the grid; tile i's output store is an
asynchronous bulk copy, so it overlaps tile i+1's first loads, and the last wave's tail shrinks
to at most one tile per CTA. The non-persistent launch is the same kernel with one tile per CTA.

Which TMA API, and why: the host-side ``triton.tools.tensor_descriptor.TensorDescriptor``
(triton >= 3.4; the GPU image's 3.6 has it, as 3.9 here). The tensor map is encoded once per
launch on the host and passed by value as a ``__grid_constant__`` kernel parameter, so the
kernel spends no instructions building descriptors and needs no global scratch allocator
(the device-side ``tl.make_tensor_descriptor`` writes a 128-byte tensor map per CTA to memory
from ``triton.set_allocator``, plus a fence, and a CUDA graph would have to capture that
allocator). Triton's interpreter runs host descriptors too (zero fill and all), so ring 1 checks
this kernel on the CPU. Where ``TensorDescriptor`` is missing (an older triton) or an operand's
alignment does not allow TMA (``tma_supported``), the pointer variant runs.

Launchers: ``conv3x3_tma_launch`` (validated operands in, as called by ``conv3x3``'s tuner), the
predicates ``tma_available`` / ``tma_supported`` / ``tile_geometry``, ``compile_specs`` for the
offline report.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _INTERPRET,
    KernelSpec,
    cdiv,
    device_arch,
    gemm_smem,
    interpreting,
    launch,
    next_pow2,
    simulated_gpu,
    sm_count,
    tuned_arch,
)

try:  # triton >= 3.4 (3.6 on the GPU image, 3.9 here)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer variant runs everywhere
    TensorDescriptor = None

__all__ = [
    "BLOCK_MS",
    "TMA_CONFIGS_SM90",
    "TmaConfig",
    "compile_specs",
    "conv3x3_tma_launch",
    "is_tma_config",
    "tile_geometry",
    "tma_available",
    "tma_smem",
    "tma_supported",
    "tuned_geometries",
    "tuned_geometry",
    "tuned_prune",
    "with_tma_configs",
]

_GROUP_M = 8
# The copy engine wants 16-byte aligned bases and strides (every stride but the last).
_TMA_ALIGN = 16


class TmaConfig(NamedTuple):
    """A tile config of the TMA variant (same fields as ``GemmConfig``, so ``conv3x3``'s pruning
    and tile counting apply unchanged) plus ``persistent``."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    persistent: bool = False

    @property
    def name(self) -> str:
        return f"M{self.BLOCK_M}_N{self.BLOCK_N}_K{self.BLOCK_K}_w{self.num_warps}_s{self.num_stages}" + (
            "_tma_persistent" if self.persistent else "_tma"
        )

    @property
    def kwargs(self) -> dict[str, int]:
        # What ``_tuning.config_name`` spells: the TMA marker keeps the names apart from the
        # pointer configs' (``M128_N64_K64_TMA1_P0_w4_s4``). Never passed to a kernel as is.
        return {
            "BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K,
            "TMA": 1, "P": int(self.persistent),
        }  # fmt: skip

    def smem(self, elem: int) -> int:
        """Pipelined A/B stages plus the output tile staged for the bulk store: the buffers alone
        (what ``ctas_per_sm`` assumes where no compiled kernel can be asked; the pruning uses
        ``tma_smem``)."""
        return (self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K + self.BLOCK_M * self.BLOCK_N) * elem


def is_tma_config(cfg) -> bool:
    return isinstance(cfg, TmaConfig)


# Short on purpose: each one is a compile and a timing run per tuned shape. Appended after the
# pointer configs, so the rule (first config that fills the GPU) never picks one untimed.
# 128x64 and 64x64 are the issue-bound pointer tiles; 256x64 is two warpgroups' M tiles on one
# B tile for the C_out = 64 layers; the persistent 128x64 trims the last wave's tail.
TMA_CONFIGS_SM90 = (
    TmaConfig(128, 128, 64, 8, 4),
    TmaConfig(128, 64, 64, 4, 4),
    TmaConfig(256, 64, 64, 8, 3),
    TmaConfig(64, 64, 64, 4, 4),
    TmaConfig(128, 64, 64, 4, 4, persistent=True),
)
# The interpreter's one small tile (the tests also run it persistent).
INTERPRETER_CONFIG = TmaConfig(32, 16, 16, 4, 1)
# Every BLOCK_M a TMA config can have (``launch_facts`` records a tile geometry for each).
BLOCK_MS = tuple(sorted({c.BLOCK_M for c in (*TMA_CONFIGS_SM90, INTERPRETER_CONFIG)}))


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _tma_source(
    acc,
    x_desc,
    w_desc,
    s_ptr,
    t_ptr,
    C,
    iters,
    img,
    h0,
    w0,
    co0,
    oh,
    ow,
    H,
    W,
    NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Add one K source (``iters`` = 9 taps x cdiv(C, BLOCK_K) channel blocks) to acc.

    x_desc [N, H, W, C] box [1, BH, BW, BLOCK_K]; w_desc [9, C, C_out] box [1, BLOCK_K, BLOCK_N].
    oh, ow [BLOCK_M]: the tile's pixel coordinates (used only by NORM's padding mask).
    """
    # (tap, channel block) as counters carried through the loop: a division per K step would
    # cost more instructions than the rest of the address work together.
    c0 = 0
    kh = 0
    kw = 0
    for _ in range(0, iters):
        # Off-image coordinates and channels >= C come back as zeros: the padding.
        a = x_desc.load([img, h0 + kh - 1, w0 + kw - 1, c0]).reshape(BLOCK_M, BLOCK_K)  # [BLOCK_M, BLOCK_K]
        if NORM:
            c = c0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            c_ok = c < C
            s = tl.load(s_ptr + c, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            t = tl.load(t_ptr + c, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            ih = oh + (kh - 1)
            iw = ow + (kw - 1)
            # relu(shift) is not 0, so the padding must be zero after the transform. The copy
            # engine zero-filled the padded rows, so dropping the shift there (a row factor of
            # 0) makes them relu(0 * s + 0) = 0: one multiply per element instead of a select
            # on a combined row x channel mask (LOP3/SEL chains: 145 instead of 102 instructions
            # per HGMMA at 64x64x64). Channels past C load s = t = 0.
            row_f = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)).to(tl.float32)  # [BLOCK_M]
            a_n = a.to(tl.float32) * s[None, :] + row_f[:, None] * t[None, :]
            a = tl.where(a_n < 0.0, 0.0, a_n).to(a.dtype)  # ReLU as a select: NaN passes, as in torch.relu
        b = w_desc.load([kh * 3 + kw, c0, co0]).reshape(BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        c0 += BLOCK_K
        next_tap = c0 >= C
        c0 = tl.where(next_tap, 0, c0)
        kw = tl.where(next_tap, kw + 1, kw)
        next_row = kw == 3
        kw = tl.where(next_row, 0, kw)
        kh = tl.where(next_row, kh + 1, kh)
    return acc


@triton.jit(do_not_specialize=("N",))
def _conv3x3_tma_kernel(
    scale_ptr,
    shift_ptr,
    x_desc,
    x2_desc,
    w1_desc,
    w2_desc,
    out_desc,
    xs_ptr,
    xt_ptr,
    x2s_ptr,
    x2t_ptr,
    stat_ptr,
    N,
    H,
    W,
    C1,
    C2,
    C_out,
    HAS_X2: tl.constexpr,
    NORM1: tl.constexpr,
    NORM2: tl.constexpr,
    STATS: tl.constexpr,
    RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """TMA-fed implicit-GEMM 3x3 conv (pad 1) + scale/shift (+ReLU); the fusions of
    ``_conv3x3_bn_act_kernel`` but the head and split-K (see the module docstring).

    x_desc   [N, H, W, C1] NHWC, box [1, BH, BW, BLOCK_K]; x2_desc likewise [N, H, W, C2]
    w1_desc  [9, C1, C_out], w2_desc [9, C2, C_out] (packed weight, source 2 from channel C1),
             box [1, BLOCK_K, BLOCK_N]
    out_desc [N, H, W, C_out], box [1, BH, BW, BLOCK_N], in the input dtype
    scale_ptr, shift_ptr [C_out] fp32; xs/xt [C1], x2s/x2t [C2] fp32/fp64 (NORM1/NORM2)
    stat_ptr [3, N*H*W / BLOCK_M, C_out] fp32 (STATS; the geometry makes every tile full)

    Grid: (programs,); program p walks tiles p, p + programs, ... of the
    ``N * cdiv(H, BH) * cdiv(W, BW)`` x ``cdiv(C_out, BLOCK_N)`` tiles (grouped along M by
    GROUP_M), so ``programs`` = tiles is the classic launch and fewer is persistent.
    FLOPs 2*N*H*W*9*(C1+C2)*C_out, as the pointer variant.
    """
    BLOCK_M: tl.constexpr = BH * BW
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    num_pid_m = N * tiles_hw
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    iters1 = 9 * tl.cdiv(C1, BLOCK_K)
    iters2 = 9 * tl.cdiv(C2, BLOCK_K)
    offs_i = tl.arange(0, BLOCK_M)  # [BLOCK_M] pixel within the patch
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        img = pid_m // tiles_hw
        rest = pid_m - img * tiles_hw
        h0 = (rest // tiles_w) * BH
        w0 = (rest % tiles_w) * BW
        co0 = pid_n * BLOCK_N
        oh = h0 + offs_i // BW  # [BLOCK_M]
        ow = w0 + offs_i % BW  # [BLOCK_M]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        acc = _tma_source(
            acc, x_desc, w1_desc, xs_ptr, xt_ptr, C1, iters1, img, h0, w0, co0, oh, ow, H, W,
            NORM1, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_X2:
            acc = _tma_source(
                acc, x2_desc, w2_desc, x2s_ptr, x2t_ptr, C2, iters2, img, h0, w0, co0, oh, ow, H, W,
                NORM2, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip

        offs_co = co0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        co_mask = offs_co < C_out
        scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        y = acc * scale[None, :] + shift[None, :]  # [BLOCK_M, BLOCK_N]
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # torch.relu keeps NaN
        y_out = y.to(out_desc.dtype)
        # The copy engine clips the box at the image and channel edges: no store mask.
        out_desc.store([img, h0, w0, co0], y_out.reshape(1, BH, BW, BLOCK_N))
        if STATS:
            # The pointer kernel's corrected two-pass partials (see there), on a tile that the
            # geometry guarantees to be BLOCK_M real pixels (so no row mask).
            y_st = tl.where(co_mask[None, :], y_out.to(tl.float32), 0.0)  # [BLOCK_M, BLOCK_N]
            cnt = BLOCK_M * 1.0
            mu0 = tl.sum(y_st, axis=0) / cnt  # [BLOCK_N]
            dev = tl.where(co_mask[None, :], y_st - mu0[None, :], 0.0)  # [BLOCK_M, BLOCK_N]
            corr = tl.sum(dev, axis=0) / cnt  # [BLOCK_N]
            t_m2 = tl.maximum(tl.sum(dev * dev, axis=0) - cnt * corr * corr, 0.0, propagate_nan=tl.PropagateNan.ALL)
            st_ptrs = stat_ptr + pid_m.to(tl.int64) * C_out + offs_co
            st_plane = num_pid_m.to(tl.int64) * C_out
            tl.store(st_ptrs, mu0, mask=co_mask)
            tl.store(st_ptrs + st_plane, corr, mask=co_mask)
            tl.store(st_ptrs + 2 * st_plane, t_m2, mask=co_mask)


# --------------------------------------------------------------------------------------------
# Predicates
# --------------------------------------------------------------------------------------------


def tma_available(device: torch.device) -> bool:
    """Whether this triton has host tensor descriptors and ``device`` a copy engine (sm_90+: a
    real one, or a ``SimulatedGPU`` of that architecture, so that its tuning and host cost are
    an H100's), or the interpreter runs the kernels (it emulates descriptors)."""
    if TensorDescriptor is None:
        return False
    if device.type == "cuda" or simulated_gpu() is not None:
        return device_arch(device) >= 90
    return interpreting()


def _nhwc_ok(t: Tensor, elem: int) -> bool:
    """Channels contiguous, 16-byte aligned base and pixel/row/image strides (positive: an
    expanded, stride-0 dimension is not a tensor map the copy engine takes). Written for the
    launch path (a few attribute reads, no loop)."""
    sn, sc, sh, sw = t.stride()
    return (
        sc == 1
        and sn > 0
        and sh > 0
        and sw > 0
        and not ((sn * elem) % _TMA_ALIGN or (sh * elem) % _TMA_ALIGN or (sw * elem) % _TMA_ALIGN)
        and not t.data_ptr() % _TMA_ALIGN
    )


def _packed_weight_ok(weight: Tensor, c1: int, elem: int) -> bool:
    """The ``pack_conv3x3_weight`` layout (storage [3, 3, C_in, C_out]) with 16-byte rows and
    both sources' starts (input channel 0 and C1) 16-byte aligned."""
    c_out, c_in = weight.shape[:2]
    return (
        weight.stride() == (1, c_out, 3 * c_in * c_out, c_in * c_out)
        and not (c_out * elem) % _TMA_ALIGN
        and not (c1 * c_out * elem) % _TMA_ALIGN
        and not weight.data_ptr() % _TMA_ALIGN
    )


def tma_supported(x: Tensor, x2: Tensor | None, weight: Tensor, out: Tensor) -> bool:
    """Whether the TMA variant can run these operands: descriptors available on their device,
    NHWC activations and output with 16-byte aligned bases and strides (a channel slice whose
    pixel pitch or start is not a multiple of 16 bytes is not), the packed weight. Small-C
    inputs (< 16 channels) stay with the pointer variant's flattened K."""
    if not tma_available(x.device):
        return False
    c1 = x.shape[1]
    if c1 < 16 or (x2 is not None and x2.shape[1] < 16):
        return False
    elem = x.element_size()
    return (
        _nhwc_ok(x, elem)
        and _nhwc_ok(out, elem)
        and (x2 is None or _nhwc_ok(x2, elem))
        and _packed_weight_ok(weight, c1, elem)
    )


def tile_geometry(h: int, w: int, block_m: int, *, stats: bool) -> tuple[int, int] | None:
    """``(BH, BW)`` with ``BH * BW = block_m`` for an H x W image, or None.

    A run of one row when ``block_m`` divides W, whole rows when W divides ``block_m`` (and BH
    divides H): then patch t is flat pixels [t*block_m, (t+1)*block_m), as the statistics'
    finalize assumes. Otherwise (odd sizes) a patch at least 8 pixels wide, clipped at the
    edges; None with ``stats`` (the statistics forms need the flat-equal tiles)."""
    if w % block_m == 0:
        return 1, block_m
    if block_m % w == 0 and h % (block_m // w) == 0:
        return block_m // w, w
    if stats:
        return None
    bw = min(block_m, max(8, next_pow2(w)))
    return block_m // bw, bw


# --------------------------------------------------------------------------------------------
# The hook in conv3x3's tuner (its main variant's candidate list mixes both kernels)
# --------------------------------------------------------------------------------------------


def with_tma_configs(pointer_configs, arch: int) -> tuple:
    """``conv3x3``'s main list on ``arch``: the pointer configs, then (sm_90, triton with host
    descriptors) the TMA configs. Appended, so the rule pick (first config filling the GPU) is
    unchanged and a TMA config only wins by being timed faster."""
    extra = TMA_CONFIGS_SM90 if tuned_arch(arch) == 90 and TensorDescriptor is not None else ()
    return tuple(pointer_configs) + extra


def launch_facts(x: Tensor, x2: Tensor | None, weight: Tensor, out: Tensor, stats: bool) -> tuple:
    """Whether TMA can read a launch's operands, and for which BLOCK_M a tile geometry exists
    (only the statistics forms can lack one): ``(False,)``, or ``(True, *per BLOCK_MS)``.

    Not part of ``conv3x3``'s tuning key, so launches keep their keys and a pointer pick pays
    nothing for the TMA variant: it is computed when the tuner misses (``shape_fields``) and
    when the pick is a TMA config (``runnable``: a few µs of stride reads). A TMA pick reused for
    operands of the same key that TMA cannot read (a misaligned slice, or an image shape of the
    same pixel bucket without a statistics geometry) runs the pointer kernel with its tiles."""
    if not tma_supported(x, x2, weight, out):
        return _NO_TMA
    return _geometry_facts(x.shape[2], x.shape[3], stats, interpreting())


_NO_TMA = (False,)


# ``interpreting`` is part of the key: ``tuned_geometry`` answers differently in the interpreter
# (small patches allowed) and on a real or simulated GPU, and one process can see both.
@functools.lru_cache(maxsize=256)
def _geometry_facts(h: int, w: int, stats: bool, interp: bool) -> tuple:
    return (True, *(tuned_geometry(h, w, bm, stats=stats) is not None for bm in BLOCK_MS))


# Patches narrower than this many pixels leave a launch to the pointer kernel: each geometry is
# another compiled kernel (``compile_specs`` holds every one a tuned launch can take), and maps
# under 32 pixels wide are the U-Net's smallest layers. The interpreter's tile is smaller.
_MIN_TUNED_BW = 32


def tuned_geometry(h: int, w: int, block_m: int, *, stats: bool) -> tuple[int, int] | None:
    """``tile_geometry``, or None when its patch is narrower than the tuned launches use."""
    geometry = tile_geometry(h, w, block_m, stats=stats)
    if geometry is None or (geometry[1] < min(_MIN_TUNED_BW, block_m) and not interpreting()):
        return None
    return geometry


def tuned_geometries(block_m: int) -> tuple[tuple[int, int], ...]:
    """Every ``(BH, BW)`` ``tuned_geometry`` can return for ``block_m`` (power-of-two widths)."""
    return tuple((block_m // bw, bw) for bw in (1 << k for k in range(block_m.bit_length())) if bw >= _MIN_TUNED_BW)


def fields_from_facts(facts: tuple, norms, stats: bool) -> dict:
    """The fields ``candidate_ok`` reads, from ``launch_facts``."""
    fields = {"tma": facts[0], "norm1": norms[0] is not None, "norm2": norms[1] is not None, "stats": stats}
    fields["geometry"] = dict(zip(BLOCK_MS, facts[1:], strict=False)) if facts[0] else {}
    return fields


def shape_fields(eligible: bool, x: Tensor, x2: Tensor | None, weight: Tensor, out: Tensor, norms, stats: bool) -> dict:
    """The TMA fields of ``conv3x3``'s prune dict (called on a tuner miss only); ``eligible``:
    the launch is of the main variant without an up-sampling geometry."""
    facts = launch_facts(x, x2, weight, out, stats) if eligible else _NO_TMA
    return fields_from_facts(facts, norms, stats)


def tuned_prune(base):
    """``base`` (conv3x3's ``_prune``) followed by ``prune``; if that leaves nothing (every
    pointer config was dropped in favour of a TMA one), ``base`` over the pointer configs alone."""

    def prune_both(configs, shape: dict, arch: int) -> list:
        kept = prune(base(configs, shape, arch), shape)
        return kept or base([c for c in configs if not is_tma_config(c)], shape, arch)

    return prune_both


def prune(kept: list, shape: dict) -> list:
    """Drop the TMA configs ``shape`` cannot use from ``conv3x3``'s pruned list (its pointer
    configs stay, so the list never empties)."""
    return [c for c in kept if not is_tma_config(c) or candidate_ok(c, shape)]


def facts_allow(cfg: TmaConfig, facts: tuple) -> bool:
    """Whether ``launch_facts`` let TMA config ``cfg`` run."""
    return bool(facts[0]) and facts[1 + BLOCK_MS.index(cfg.BLOCK_M)]


def runnable(cfg: TmaConfig, x: Tensor, x2: Tensor | None, weight: Tensor, out: Tensor, stats: bool) -> bool:
    """Whether the picked TMA config can run these operands (see ``launch_facts``)."""
    return facts_allow(cfg, launch_facts(x, x2, weight, out, stats))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _weight_source(weight: Tensor, c_lo: int, c_hi: int) -> Tensor:
    """The packed weight's input channels [c_lo, c_hi) as a [9, C_s, C_out] view (tap, ci, co).
    ``view``, not ``reshape``: a descriptor must point into the weight itself, never a copy."""
    c_out, c_in = weight.shape[:2]
    storage = weight.permute(2, 3, 1, 0)  # [3, 3, C_in, C_out], contiguous for a packed weight
    return storage.view(9, c_in, c_out)[:, c_lo:c_hi]


def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1)  # [N, H, W, C] view, channels last


class _Address:
    """What a cached descriptor keeps of its tensor: the address and dtype its tensor map is
    encoded from (triton reads ``base.data_ptr()`` and ``base.dtype``). Not the tensor: a cached
    descriptor must not keep an activation alive."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, t: Tensor):
        self._ptr, self.dtype = t.data_ptr(), t.dtype

    def data_ptr(self) -> int:
        return self._ptr


def _launches_compiled() -> bool:
    """Whether launches reach compiled kernels (a GPU) or nothing (a simulated GPU that only
    records them), rather than Triton's interpreter."""
    sim = simulated_gpu()
    return not _INTERPRET if sim is None else not sim.execute


def _descriptor(view: Tensor, box: list[int], cached: bool):
    base = _Address(view) if cached else view
    return TensorDescriptor(base, list(view.shape), list(view.stride()), box)


def _facts(t: Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.shape, t.stride()


# (cfg, stats, facts of x, x2, weight, out) -> (BH, BW, the five descriptors). See ``_descriptors``.
_DESCRIPTORS: dict[tuple, tuple] = {}
_MAX_DESCRIPTORS = 1024


def _descriptors(cfg: TmaConfig, x: Tensor, x2: Tensor | None, weight: Tensor, out: Tensor, stats: bool) -> tuple:
    """``(BH, BW, x_desc, x2_desc, w1_desc, w2_desc, out_desc)`` of a launch, made once per key.

    Building five host descriptors costs tens of us per launch; a model launches the same
    operands every step. The key is everything the descriptors are computed from: the config
    (boxes, tile geometry), the statistics flag, and each tensor's address, dtype, shape and
    strides (the views and the channel split are functions of these). So a hit returns exactly
    what would be built anew, and a freed tensor whose address another of a different shape,
    layout or dtype reuses gets its own entry, never a stale descriptor. No device in the key:
    CUDA's unified addressing gives every device its own addresses (and the host others). A
    cached descriptor holds the address, not the tensor (``_Address``); Triton's interpreter
    reads the data through the tensor, so where it runs the kernels nothing is cached."""
    cached = _launches_compiled()
    if cached:
        key = (cfg, stats, *_facts(x), *(_facts(x2) if x2 is not None else ()), *_facts(weight), *_facts(out))
        hit = _DESCRIPTORS.get(key)
        if hit is not None:
            return hit
    n, c1, h, w = x.shape
    geometry = tile_geometry(h, w, cfg.BLOCK_M, stats=stats)
    if geometry is None:
        raise ValueError(f"no TMA tile geometry of {cfg.BLOCK_M} pixels for statistics on {h}x{w} images")
    bh, bw = geometry
    bn, bk = cfg.BLOCK_N, cfg.BLOCK_K
    a_box, w_box = [1, bh, bw, bk], [1, bk, bn]
    x_desc = _descriptor(_nhwc(x), a_box, cached)
    w1_desc = _descriptor(_weight_source(weight, 0, c1), w_box, cached)
    if x2 is not None:
        x2_desc = _descriptor(_nhwc(x2), a_box, cached)
        w2_desc = _descriptor(_weight_source(weight, c1, c1 + x2.shape[1]), w_box, cached)
    else:
        x2_desc, w2_desc = x_desc, w1_desc
    out_desc = _descriptor(_nhwc(out), [1, bh, bw, bn], cached)
    result = (bh, bw, x_desc, x2_desc, w1_desc, w2_desc, out_desc)
    if cached:
        if len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:  # shapes keep changing: start over
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = result
    return result


def conv3x3_tma_launch(
    cfg: TmaConfig,
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    out: Tensor,
    *,
    relu: bool,
    dot_precision: str,
    norms=(None, None),
    partials: Tensor | None = None,
    programs: int | None = None,
) -> None:
    """Launch the TMA variant on operands already validated by ``conv3x3`` (and
    ``tma_supported``): ``out = act(scale * conv3x3(cat([T1(x), T2(x2)])) + shift)``.

    x [N, C1, H, W], x2 [N, C2, H, W] or None, out [N, C_out, H, W]: NHWC strides, 16-byte
    aligned; weight [C_out, C1+C2, 3, 3] packed (``pack_conv3x3_weight``); scale, shift [C_out]
    fp32; norms: (scale, shift) [C_s] fp32/fp64 or None per source (BN+ReLU on the load);
    partials: the [3, >= N*H*W/BLOCK_M, C_out] fp32 statistics workspace, or None (no
    statistics). programs: the grid (default: every tile, or for a persistent config the SMs
    times the CTAs of the compiled kernel that fit one SM). Raises ValueError when no tile
    geometry fits the shape.
    """
    n, c1, h, w = x.shape
    c2 = x2.shape[1] if x2 is not None else 0
    c_out = weight.shape[0]
    stats = partials is not None
    bh, bw, x_desc, x2_desc, w1_desc, w2_desc, out_desc = _descriptors(cfg, x, x2, weight, out, stats)
    bn = cfg.BLOCK_N
    norm1, norm2 = norms
    xs, xt = norm1 if norm1 is not None else (scale, shift)
    x2s, x2t = norm2 if norm2 is not None else (scale, shift)
    tiles = n * cdiv(h, bh) * cdiv(w, bw) * cdiv(c_out, bn)
    # A tensor first: ``_common.launch`` checks the device of the first argument.
    args = (
        scale, shift, x_desc, x2_desc, w1_desc, w2_desc, out_desc, xs, xt, x2s, x2t,
        partials if stats else scale, n, h, w, c1, c2, c_out,
    )  # fmt: skip
    meta = dict(
        HAS_X2=x2 is not None, NORM1=norm1 is not None, NORM2=norm2 is not None, STATS=stats, RELU=relu,
        DOT_PRECISION=dot_precision, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=cfg.BLOCK_K, GROUP_M=_GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if programs is None:
        programs = tiles
        if cfg.persistent and not interpreting():
            programs = min(tiles, sm_count(x.device) * ctas_per_sm(cfg, x, args, meta))
    launch(_conv3x3_tma_kernel, (max(1, min(programs, tiles)),), args, meta)


# --------------------------------------------------------------------------------------------
# How many CTAs of a compiled kernel one SM holds (the persistent grid)
# --------------------------------------------------------------------------------------------


class SmLimits(NamedTuple):
    """One SM's resources (the CUDA occupancy tables), for ``occupancy``."""

    regs: int = 65_536  # 32-bit registers, in 4 sub-partitions of 16K
    threads: int = 2048
    smem: int = 233_472  # shared memory one SM gives its CTAs together (228 KiB on sm_90)
    ctas: int = 32


SM90_LIMITS = SmLimits()
_SMEM_PER_CTA_RESERVED = 1024  # the driver's per-CTA shared-memory reserve (sm_80+)
_REG_ALLOC_UNIT = 256  # registers are handed to a warp 256 at a time
_SUBPARTITIONS = 4  # each with a quarter of the register file; a warp lives in one


def occupancy(n_regs: int, shared: int, num_warps: int, limits: SmLimits = SM90_LIMITS) -> int:
    """CTAs of a kernel that one SM runs at once (>= 1): the least of what its registers
    (``n_regs`` per thread), shared memory (``shared`` bytes per CTA, plus the 1 KiB reserve) and
    threads allow, and the SM's CTA limit."""
    regs_per_warp = -(-n_regs * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    warps = _SUBPARTITIONS * ((limits.regs // _SUBPARTITIONS) // max(regs_per_warp, 1))
    by_regs = warps // num_warps
    by_smem = limits.smem // (shared + _SMEM_PER_CTA_RESERVED)
    by_threads = limits.threads // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, limits.ctas))


# (device, dtype, meta) -> CTAs per SM of that compiled kernel.
_OCCUPANCY: dict[tuple, int] = {}
# Registers assumed where no compiled kernel can be asked (a simulated GPU): the most a thread
# can have, which the 128x128 training forms reach (so the estimate never over-fills an SM).
_MAX_REGS = 255


def ctas_per_sm(cfg: TmaConfig, x: Tensor, args: tuple, meta: dict) -> int:
    """CTAs per SM of the kernel ``meta`` compiles to, from its metadata (registers per thread,
    shared memory) and the SM's limits (the device's own where torch reports them). Asked once
    per (device, dtype, meta): the compile (or the cache lookup) happens here, before the launch
    that would do it anyway. On a simulated GPU: the largest register count and the config's
    shared-memory estimate."""
    key = (x.device, x.dtype, *meta.items())
    hit = _OCCUPANCY.get(key)
    if hit is None:
        if x.device.type == "cuda":
            kernel = _conv3x3_tma_kernel.warmup(*args, grid=(1,), **meta)
            kernel._init_handles()  # loads the binary: that is where triton reads n_regs
            n_regs, shared, limits = kernel.n_regs, kernel.metadata.shared, _device_limits(x.device)
        else:
            n_regs, shared, limits = _MAX_REGS, cfg.smem(x.element_size()), SM90_LIMITS
        hit = _OCCUPANCY[key] = occupancy(n_regs, shared, cfg.num_warps, limits)
    return hit


def _device_limits(device: torch.device) -> SmLimits:
    props = torch.cuda.get_device_properties(device)
    default = SM90_LIMITS
    return SmLimits(
        regs=getattr(props, "regs_per_multiprocessor", default.regs),
        threads=getattr(props, "max_threads_per_multi_processor", default.threads),
        smem=getattr(props, "shared_memory_per_multiprocessor", default.smem),
        ctas=default.ctas,
    )


# --------------------------------------------------------------------------------------------
# Offline compile specs
# --------------------------------------------------------------------------------------------

# The training forms hold the transformed A tile and the accumulator in registers together:
# budget in 32-bit registers per thread for both, as conv3x3's ``_training_regs``; and no N tile
# wider than 64: at 128x128 on 8 warps the training forms compiled to 254-255 registers (sm_90,
# triton 3.9), the cap a thread has, where 128x64 on 4 warps and 256x64 on 8 (both 96 here) used
# 224-238.
_TRAINING_REG_BUDGET = 96
_TRAINING_MAX_BLOCK_N = 64
# The statistics epilogue's cross-warp partials, as conv3x3's (3 fp32 per column per warp).
_STATS_SMEM_PER_WARP_COL = 12
# Bulk-copy buffers start 1024-byte aligned (the 128-byte swizzle): the A, B, second-source A and
# B, and output buffers each may be padded by up to that much (triton 3.6 added 1024 B with x2).
_TMA_BUFFERS, _TMA_BUFFER_ALIGN = 5, 1024


def fits_training(cfg: TmaConfig) -> bool:
    """Whether the training forms (BN+ReLU on the load, statistics) fit ``cfg``'s registers
    (16-bit operands)."""
    threads = 32 * cfg.num_warps
    regs = (cfg.BLOCK_M * cfg.BLOCK_N + cfg.BLOCK_M * cfg.BLOCK_K // 2) // threads
    return regs <= _TRAINING_REG_BUDGET and cfg.BLOCK_N <= _TRAINING_MAX_BLOCK_N


def tma_smem(cfg: TmaConfig, elem: int, stats: bool) -> int:
    """Shared memory of the TMA kernel with ``cfg`` (the pruning's estimate; the offline report
    checks it against each spec): the A/B pipeline, plus the output tile staged for the bulk
    store (a persistent CTA's store overlaps its next tile's loads), plus the statistics'
    partials, plus the alignment of each bulk-copy buffer."""
    scratch = cfg.BLOCK_M * cfg.BLOCK_N * elem + _TMA_BUFFERS * _TMA_BUFFER_ALIGN
    if stats:
        scratch += _STATS_SMEM_PER_WARP_COL * cfg.BLOCK_N * cfg.num_warps
    return gemm_smem(cfg, elem, scratch=scratch)


def candidate_ok(cfg: TmaConfig, shape: dict) -> bool:
    """Whether the tuner should time TMA config ``cfg`` for ``conv3x3``'s ``shape`` (its prune
    dict plus ``shape_fields``): TMA can read the operands, 16-bit (fp32 runs the pointer kernel's
    TF32 path), a tuned tile geometry exists for ``cfg.BLOCK_M``, and for the training forms the
    registers allow it."""
    if not shape.get("tma") or shape["elem"] != 2 or shape["SMALL_C"] or shape["variant"] != "main":
        return False
    if not shape.get("geometry", {}).get(cfg.BLOCK_M, False):
        return False
    return fits_training(cfg) if shape["training"] else True


def compile_specs(arch: int) -> list[KernelSpec]:
    """The TMA kernel's (config, form, geometry, dtype) specs on sm_90 (none on other archs: no
    copy engine).

    Configs: the TMA configs ``conv3x3``'s main tuner can pick for each of its main forms
    (``conv3x3.tuned_configs``: its pruning over every shape bucket, TMA-readable operands), the
    persistent ones once (the same binary; only the grid differs); every tile geometry a tuned
    launch can take (``tuned_geometries``); fp16 and bf16 (fp32 runs the pointer kernel).
    Descriptors appear in the signature as ``tensordesc<dtype[box]>``; C1/C2/C_out multiples of 16.
    """
    if tuned_arch(arch) != 90 or TensorDescriptor is None:
        return []
    from . import conv3x3  # the tuner and the forms live there (it imports this module)

    specs = []
    for dtype, form in itertools.product(("fp16", "bf16"), conv3x3.main_forms()):
        configs = [c for c in conv3x3.tuned_configs(form, arch, 2, tma=True) if is_tma_config(c) and not c.persistent]
        for cfg in configs:
            specs += [_spec(cfg, form, dtype, geometry) for geometry in tuned_geometries(cfg.BLOCK_M)]
    return specs


def _spec(cfg: TmaConfig, form, dtype: str, geometry: tuple[int, int]) -> KernelSpec:
    fn = _conv3x3_tma_kernel
    bh, bw = geometry
    constexprs = dict(
        HAS_X2=form.has_x2, NORM1=form.norm1, NORM2=form.norm2, STATS=form.stats, RELU=form.relu,
        DOT_PRECISION="ieee", BH=bh, BW=bw, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=_GROUP_M,
    )  # fmt: skip
    a_desc = f"tensordesc<{dtype}[1,{bh},{bw},{cfg.BLOCK_K}]>"
    w_desc = f"tensordesc<{dtype}[1,{cfg.BLOCK_K},{cfg.BLOCK_N}]>"
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("x_desc", "x2_desc"):
            sig[name] = a_desc
        elif name in ("w1_desc", "w2_desc"):
            sig[name] = w_desc
        elif name == "out_desc":
            sig[name] = f"tensordesc<{dtype}[1,{bh},{bw},{cfg.BLOCK_N}]>"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    # The training path's BatchNorm vectors are fp64 (read as fp32).
    for on, names in ((form.norm1, ("xs_ptr", "xt_ptr")), (form.norm2, ("x2s_ptr", "x2t_ptr"))):
        if on:
            sig.update(dict.fromkeys(names, "*fp64"))
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name] in ("i32", "*fp32", "*fp64") and name != "N"
    }
    tags = form.tags.removeprefix("main_").replace("_blockc", "") + (f"_rows{bw}" if bh > 1 else "")
    extra = {"attrs": attrs, "variant": "tma", "expect_hgmma": True, "smem_estimate": tma_smem(cfg, 2, form.stats)}
    return KernelSpec.of_config(
        fn, cfg, signature=sig, constexprs=constexprs, dtype=dtype, config=f"{cfg.name}_{tags}", extra=extra
    )
