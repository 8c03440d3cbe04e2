"""``nn.SyncBatchNorm`` on the fused training path: which BatchNorms synchronise, and the
collectives (``torch.distributed``) behind the ``fastunet::bn_stats_sync`` ops.

How one conv + BatchNorm's statistics flow on the fused training path, and where the two
collectives go (marked ◆); r is this rank, n_r = N_r*H*W its values per channel, N = Σ n_r:

forward

* ``conv3x3_bn_stats``: the conv's epilogue writes per-tile partials (count, mean as an fp32
  pair, centred M2), a finalize kernel merges the tiles with Chan's formula into this rank's
  mean m_r and biased var v_r ``[C]`` (fp32; fp64 for fp64 activations).
* ◆ ``bn_stats_sync`` (``sync_stats``): one ``all_gather`` of ``(m_r, M2_r = v_r*n_r, n_r)``, a
  ``[2C+1]`` fp64 vector per rank; every rank merges the same ``[W, 2C+1]`` in the same order
  (fp64, Chan: ``M = Σ n_r m_r / N``, ``M2 = Σ M2_r + Σ n_r (m_r - M)²``), so all ranks
  normalize with bit-identical global mean M and var V = M2/N (returned in the local stats'
  dtype) and get the global count N as a one-element fp64 tensor.
* ``bn_running_update_``: the running statistics from (M, V), unbiased with the global N read
  on the device (no host synchronisation), momentum or cumulative as ``nn.BatchNorm2d``.
* ``bn_affine``: (scale, shift) from (M, V); the readers apply ``relu(z*scale + shift)``.

backward (reverse order)

* the readers: ``dscale = Σ g·z`` and ``dshift = Σ g`` over the local batch (centred sums).
* ``bn_affine_backward``: the BatchNorm weight's and bias's gradients from those local sums
  (local, as ``nn.SyncBatchNorm`` leaves them: DDP averages parameter gradients), and the
  gradients of M and V: ``gM = -w·rstd·Σg``, ``gV = -w·rstd³·(Σg·z - M·Σg)/2``.
* ◆ ``bn_stats_sync_backward`` (``sync_stats_backward``): one ``all_reduce`` (sum) of
  ``(gM, gV)``, ``[2C]`` fp64. They are the two per-channel sums ``nn.SyncBatchNorm``
  all-reduces (``sum_dy``, ``sum_dy_xmu``) times per-channel factors every rank shares (w, rstd,
  M), so reducing them reduces those sums. Then the gradient of this rank's (m_r, v_r):
  ``gm_r = n_r/N·(GM + 2(m_r - M)·GV)``, ``gv_r = n_r/N·GV``.
* ``conv3x3_bn_stats``' backward, unchanged: ``g = gz + gm_r/n_r + gv_r·2(z - m_r)/n_r``, which is
  ``gz + GM/N + GV·2(z - M)/N``: BatchNorm's backward over the whole global batch.

Why all_gather of (count, mean, M2) merged in fp64, rather than an all_reduce of moment sums:
the counts differ between ranks (uneven batches, a rank with none), and sums of squares about a
common point (``Σ M2_r + n_r·m_r²``, then ``- N·M²``) cancel catastrophically when |mean| >> std,
the failure ``kernels/bn_stats.py`` avoids inside one rank (an all_reduce about a shared
reference would need a second collective to agree on it). Chan's merge only adds non-negative
terms; in fp64 its error is far below the fp32 rounding of the local means it is given, which
the single-process path normalizes with as well. ``nn.SyncBatchNorm`` also all-gathers, but
sends ``invstd`` (the variance comes back through ``eps``); this sends M2. The gathered vector is
``W·(2C+1)`` doubles per layer: 16 KB per rank at C = 1024.

A rank whose local batch is empty still takes part in every collective (the others wait in
them) with a zero count; BatchNorm's "more than 1 value per channel" rule applies to N, checked
on the host only on a rank whose own n_r < 2 (then every rank has n_r < 2 if N < 2, so all of
them raise together and none is left waiting).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["group_name", "sync_group", "sync_stats", "sync_stats_backward"]

try:
    import torch.distributed as dist

    _AVAILABLE = dist.is_available()
except ImportError:  # a torch build without distributed support
    dist = None
    _AVAILABLE = False

#: ``torch.distributed.ProcessGroup``, or an empty tuple (``isinstance`` then always fails).
ProcessGroup = dist.ProcessGroup if _AVAILABLE else ()


def sync_group(bn: nn.Module):
    """The process group ``bn``'s batch statistics are merged over in a forward now, or None.

    Exactly when ``nn.SyncBatchNorm.forward`` synchronises: an ``nn.SyncBatchNorm`` in training
    mode (a statless one in eval mode normalizes by its local batch), ``torch.distributed``
    initialised, and its ``process_group`` (None: the default group) of more than one rank
    (``get_world_size`` is -1 on a rank outside the group: no synchronisation, as in torch).
    """
    if type(bn) is not nn.SyncBatchNorm or not bn.training:
        return None
    if not (_AVAILABLE and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def group_name(group) -> str:
    """The name the ops take for ``group`` (ops cannot take a ProcessGroup argument)."""
    return group.group_name


def _resolve(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


def _all_gather(local: Tensor, group) -> Tensor:
    """``[W, K]``: every rank's ``local`` ``[K]``, in rank order."""
    world = dist.get_world_size(group)
    if group._get_backend_name() != "gloo":  # gloo has no all_gather_into_tensor (as torch's SyncBatchNorm)
        out = local.new_empty((world, local.numel()))
        dist.all_gather_into_tensor(out, local, group=group)
        return out
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts)


def merge_stats(gathered: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank statistics, in the dtype of ``gathered`` ``[W, 2C+1]`` (rows:
    ``mean [C], M2 [C], count``; a zero count contributes nothing, whatever its mean). Returns
    ``(mean [C], biased var [C], count [1])`` over all rows, in a fixed order."""
    means, m2s, counts = gathered[:, :c], gathered[:, c : 2 * c], gathered[:, 2 * c :]
    n = counts.sum(0)  # [1]
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / n, n


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def sync_stats(mean: Tensor, var: Tensor, count: int, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's ``mean``/biased ``var`` ``[C]`` over ``count`` values merged with every rank's
    of the group ``name`` (one all_gather). Returns the global ``(mean, var)`` in the dtypes of
    the inputs and the global count as a one-element fp64 tensor. Raises ``ValueError`` (on
    every rank alike) when the group holds fewer than 2 values per channel in all."""
    group = _resolve(name)
    c = mean.shape[0]
    f64 = torch.float64
    if count > 0:
        local = torch.cat([mean.to(f64), var.to(f64) * count, mean.new_full((1,), count, dtype=f64)])
    else:  # an empty batch's statistics are NaN: send zeros, and a zero count
        local = mean.new_zeros(2 * c + 1, dtype=f64)
    g_mean, g_var, n = merge_stats(_all_gather(local, group), c)
    # n_r >= 2 here already guarantees N >= 2: no host synchronisation in the common case.
    if count < 2 and not _capturing(n) and n.item() < 2:
        raise ValueError(
            "expected more than 1 value per channel when training, got "
            f"{int(n.item())} across the process group (this rank: {count})"
        )
    return g_mean.to(mean.dtype), g_var.to(var.dtype), n


def sync_stats_backward(
    gmean: Tensor | None, gvar: Tensor | None, mean: Tensor, mean_all: Tensor, count_all: Tensor, count: int, name: str
) -> tuple[Tensor, Tensor]:
    """The gradient of this rank's ``(mean, var)`` from each rank's ``gmean``/``gvar`` ``[C]``
    (the gradients of the global statistics this rank's loss sees; None: zero), all-reduced
    once. ``mean_all``/``count_all``: ``sync_stats``' outputs. Returns ``(gm_r, gv_r)`` in
    ``mean``'s dtype: ``n_r/N·(GM + 2(m_r - M)·GV)`` and ``n_r/N·GV``."""
    group = _resolve(name)
    c = mean.shape[0]
    f64 = torch.float64
    zeros = mean.new_zeros(c, dtype=f64)
    sums = torch.cat([zeros if gmean is None else gmean.to(f64), zeros if gvar is None else gvar.to(f64)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if count == 0:  # nothing here depends on the statistics (and the local mean is NaN)
        return mean.new_zeros(c), mean.new_zeros(c)
    g_m, g_v = sums[:c], sums[c:]
    share = count / count_all.to(f64)  # [1]
    gm = share * (g_m + 2.0 * (mean.to(f64) - mean_all.to(f64)) * g_v)
    return gm.to(mean.dtype), (share * g_v).to(mean.dtype)
