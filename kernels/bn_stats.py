"""BatchNorm batch statistics from per-tile partials: the finalize half of the training conv.

The training conv (``conv3x3.conv3x3_bn_stats``) writes, for every row tile t of its output
``z`` viewed as ``[M = N*H*W, C]``, the tile's mean as a pair ``mu0_t + corr_t`` and the sum of
squared deviations from it ``Q_t``. ``bn_stats_finalize`` merges the tiles into the batch mean
and biased variance per channel, the two numbers ``nn.BatchNorm2d`` normalizes with.

Why not (Σy, Σy²): ``var = Σy²/n - mean²`` cancels catastrophically in fp32 when
``|mean| >> std`` (an activation of 1000 ± 0.1 loses every digit of its variance). Instead:

* each tile centres on its own mean (corrected two-pass: centre on a first mean ``mu0``, then
  measure that mean's rounding error ``corr`` on the centred values);
* the merge works in offsets from one reference per channel (tile 0's ``mu0``):
  ``(mu0_t - ref) + corr_t`` is exact where it matters (tiles close to the reference), so the
  spread of the tile means is not drowned by the fp32 rounding of means of size 1000;
* chunks of ``BLOCK_T`` tiles merge with Chan et al.'s formula
  ``M2 = M2_a + M2_b + delta² n_a n_b / n``, which only adds non-negative terms.

The merge runs in a fixed order (chunks in sequence), so the result is bitwise reproducible:
no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    KernelSpec,
    cdiv,
    interpreting,
    launch,
)

__all__ = ["bn_stats_finalize", "compile_specs"]

_BLOCK_T, _BLOCK_C, _WARPS = 32, 64, 4
_INTERPRETER_BLOCKS = (8, 16)


# Everything that scales with the batch stays unspecialized: one compiled kernel for all batches.
@triton.jit(do_not_specialize=("stride_plane", "T", "M"))
def _bn_stats_finalize_kernel(
    part_ptr,
    mean_ptr,
    var_ptr,
    stride_plane,
    T,
    M,
    C,
    TILE_M,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge T tiles of (mu0, corr, M2) partials into per-channel mean and biased variance.

    part_ptr [3, >=T, C] fp32, rows contiguous, planes ``stride_plane`` elements apart: tile
    means as mu0 + corr, and tile sums of squared deviations from the tile mean; tile t covers
    rows [t*TILE_M, min((t+1)*TILE_M, M)) of the M rows. mean_ptr, var_ptr [C] fp32 outputs.
    Grid: (cdiv(C, BLOCK_C),). Moves 12*T*C + 8*C bytes.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_mask = offs_c < C
    ref = tl.load(part_ptr + offs_c, mask=c_mask, other=0.0)  # [BLOCK_C] tile 0's mu0
    n_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    off_a = tl.zeros([BLOCK_C], dtype=tl.float32)  # running mean, as an offset from ref
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        t_mask = offs_t < T
        rows = tl.minimum(M - offs_t.to(tl.int64) * TILE_M, TILE_M)
        cnt = tl.where(t_mask, rows, 0).to(tl.float32)  # [BLOCK_T]
        mask = t_mask[:, None] & c_mask[None, :]
        offs = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]  # [BLOCK_T, BLOCK_C]
        mu0 = tl.load(part_ptr + offs, mask=mask, other=0.0)
        corr = tl.load(part_ptr + stride_plane + offs, mask=mask, other=0.0)
        q = tl.load(part_ptr + 2 * stride_plane + offs, mask=mask, other=0.0)
        d = tl.where(mask, (mu0 - ref[None, :]) + corr, 0.0)  # [BLOCK_T, BLOCK_C] tile mean offsets
        n_b = tl.sum(cnt, axis=0)
        off_b = tl.sum(cnt[:, None] * d, axis=0) / n_b  # [BLOCK_C]
        dev = tl.where(mask, d - off_b[None, :], 0.0)
        m2_b = tl.sum(q, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        n = n_a + n_b
        delta = off_b - off_a
        off_a += delta * (n_b / n)
        m2_a += m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(mean_ptr + offs_c, ref + off_a, mask=c_mask)
    tl.store(var_ptr + offs_c, m2_a / n_a, mask=c_mask)


def bn_stats_finalize(partials: Tensor, rows: int, tile_rows: int) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance per channel from the training conv's tile partials.

    partials ``[3, T_alloc, C]`` fp32 contiguous (tile means as ``[0] + [1]``, tile centred sums
    of squares ``[2]``);
    ``rows`` = M = N*H*W, the number of values per channel; ``tile_rows`` = the rows per tile
    the conv used (its BLOCK_M), so ``T = cdiv(rows, tile_rows) <= T_alloc`` tiles are read.
    Returns ``(mean, var)``, each ``[C]`` fp32, ``var`` biased (divided by M), as
    ``nn.BatchNorm2d`` normalizes with.
    """
    if not isinstance(partials, Tensor) or partials.dtype != torch.float32:
        raise TypeError("partials must be a float32 tensor")
    if partials.dim() != 3 or partials.shape[0] != 3 or not partials.is_contiguous():
        raise ValueError(f"partials must be a contiguous [3, T, C] tensor, got {tuple(partials.shape)}")
    if rows < 1 or tile_rows < 1:
        raise ValueError(f"rows and tile_rows must be >= 1, got {rows} and {tile_rows}")
    tiles = cdiv(rows, tile_rows)
    if tiles > partials.shape[1]:
        raise ValueError(f"{rows} rows in tiles of {tile_rows} need {tiles} partial rows, got {partials.shape[1]}")
    c = partials.shape[2]
    mean = torch.empty(c, device=partials.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_t, block_c = _INTERPRETER_BLOCKS if interpreting() else (_BLOCK_T, _BLOCK_C)
    launch(
        _bn_stats_finalize_kernel, (cdiv(c, block_c),),
        (partials, mean, var, partials.stride(0), tiles, rows, c, tile_rows),
        dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_WARPS),
    )  # fmt: skip
    return mean, var


def compile_specs(arch: int) -> list[KernelSpec]:
    """The finalize kernel as launched on GPU (one config, fp32 only: it never sees activations)."""
    fn = _bn_stats_finalize_kernel
    constexprs = {"BLOCK_T": _BLOCK_T, "BLOCK_C": _BLOCK_C}
    sig = {
        name: "constexpr" if name in constexprs else ("*fp32" if name.endswith("_ptr") else "i32")
        for name in fn.arg_names
    }
    return [
        KernelSpec(
            kernel=fn.__name__,
            fn=fn,
            signature=sig,
            constexprs=constexprs,
            num_warps=_WARPS,
            num_stages=1,
            dtype="fp32",
            config=f"T{_BLOCK_T}_C{_BLOCK_C}_w{_WARPS}",
            extra={"attrs": {}, "variant": "finalize", "expect_hgmma": False},
        )
    ]
