"""fastunet's own Winograd F(m x m, 3x3) for the CPU fold's opt-in fast math: batched GEMMs.

A 3x3 convolution (stride 1, padding 1) over ``m x m`` output tiles is, per tile,
``Y = A^T [ (G w G^T) * (B^T d B) ] A`` with ``d`` the tile's ``(m+2) x (m+2)`` input window
(``t = m + 2``). Summed over the input channels, the ``t * t`` elementwise products become
``t * t`` independent GEMMs ``[P tiles, C_in] @ [C_in, C_out]``: the multiply count drops from
``9`` to ``t * t / (m * m)`` per output (F(4x4): 2.25, 4x fewer; F(2x2): 4, 2.25x fewer), and the
GEMMs run on torch's sgemm (MKL / oneDNN). The transforms are GEMMs too (Kronecker matrices
``B^T (x) B^T`` and ``A^T (x) A^T`` applied to all tiles at once), the bias and the activation
follow in the pass that scatters the tiles into the output.

Where it pays (``fastunet.cpu_ops.conv3x3_engine``): the deep, small maps, where NNPACK's
per-call weight transform dominates and oneDNN's direct convolution runs all 9 multiplies; on
the large maps the transforms' memory traffic (each a pass over ``t * t / (m * m)`` times the
input) costs more than the GEMM saves, and NNPACK's fused transforms win there.

Numbers: the standard interpolation points ``0, +-1, +-2, inf`` (F(4x4)) and ``0, +-1, inf``
(F(2x2)); transformed weights derived in float64, then cast. Measured max abs error per layer
against float64 (random data, 3 to 1024 input channels): F(4x4) ~5e-5, F(2x2) ~3e-6 of the
output's RMS (tests/test_cpu_winograd.py; the table's ``winograd`` row bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_scratch import scratch

__all__ = ["OwnWinogradConv", "winograd_matrices"]

_CL = torch.channels_last

# B^T, G, A^T of F(m, 3) (Lavin & Gray 2016), by m
_F43 = (
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
)  # fmt: skip
_F23 = (
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    [[1, 1, 1, 0], [0, 1, -1, -1]],
)  # fmt: skip
_MATRICES = {4: _F43, 2: _F23}


def winograd_matrices(m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B^T [t, t], G [t, 3], A^T [m, t])`` of F(m x m, 3x3) in float64, ``t = m + 2``;
    ``m`` 2 or 4."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd tile {m}: fastunet has F(2x2, 3x3) and F(4x4, 3x3)")
    return tuple(torch.tensor(a, dtype=torch.float64) for a in _MATRICES[m])


class OwnWinogradConv:
    """``act(conv2d(cat(xs, 1), weight, bias, padding=1))`` through Winograd F(m x m, 3x3).

    float32 only. ``weight``: ``[C_out, C_in, 3, 3]``; ``bias``: ``[C_out]`` or None; ``act``:
    ``"relu"``, ``"leaky_relu"`` (``slope``) or ``"none"``; ``m``: the output tile (4 or 2).
    The transformed weight (``[t*t, C_in, C_out]``, ``t*t/9`` times the weight's size) is made
    once, here (the fold keeps this object per folded weight).

    ``self(*xs)``: one or more ``[N, C_i, H, W]`` inputs (any memory format; several are the
    decoder's concatenation sources, in order, ``sum(C_i) = C_in``, never concatenated) ->
    ``[N, C_out, H, W]`` channels_last. Any ``H, W >= 1`` (partial tiles are zero-padded).
    """

    __slots__ = ("m", "u", "bk", "ak", "bias", "act", "slope")

    def __init__(self, weight: Tensor, bias: Tensor | None, act: str = "relu", slope: float | None = None, m: int = 4):
        if act not in ("relu", "leaky_relu", "none"):
            raise ValueError(f"activation {act!r}: OwnWinogradConv applies 'relu', 'leaky_relu' or 'none'")
        bt, g, at = winograd_matrices(m)
        t = m + 2
        with torch.inference_mode(False), torch.no_grad():
            u = torch.einsum("ai,kcij,bj->abck", g, weight.to(torch.float64), g)  # G w G^T per (k, c)
            self.u = u.reshape(t * t, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()
            self.bk = torch.kron(bt, bt).to(torch.float32)  # [(a, b), (i, j)]
            self.ak = torch.kron(at, at).to(torch.float32)  # [(r, s), (a, b)]
        self.m, self.bias, self.act, self.slope = m, bias, act, slope

    def __call__(self, *xs: Tensor) -> Tensor:
        m, t = self.m, self.m + 2
        n, _, h, w = xs[0].shape
        c_in, c_out = self.u.shape[1], self.u.shape[2]
        if sum(x.shape[1] for x in xs) != c_in:
            raise ValueError(f"OwnWinogradConv: inputs of {[x.shape[1] for x in xs]} channels, weight reads {c_in}")
        th, tw = -(-h // m), -(-w // m)
        hp, wp = th * m + 2, tw * m + 2
        tiles = n * th * tw
        # zero-padded NHWC copy of the input(s), the concatenation written channel slice by slice
        xp = scratch("padded", n, hp, wp, c_in)
        xp[:, 0].zero_()
        xp[:, h + 1 :].zero_()
        xp[:, 1 : h + 1, 0].zero_()
        xp[:, 1 : h + 1, w + 1 :].zero_()
        start = 0
        for x in xs:
            xp[:, 1 : h + 1, 1 : w + 1, start : start + x.shape[1]].copy_(x.permute(0, 2, 3, 1))
            start += x.shape[1]
        s = xp.stride()
        windows = xp.as_strided((t, t, n, th, tw, c_in), (s[1], s[2], s[0], m * s[1], m * s[2], 1))
        d = scratch("tiles", t, t, n, th, tw, c_in)
        d.copy_(windows)
        v = scratch("v", t * t, tiles * c_in)
        torch.mm(self.bk, d.view(t * t, -1), out=v)  # B^T d B of every tile and channel
        prod = scratch("m", t * t, tiles, c_out)
        torch.bmm(v.view(t * t, tiles, c_in), self.u, out=prod)  # the t*t GEMMs
        y = scratch("y", m * m, tiles * c_out)
        torch.mm(self.ak, prod.view(t * t, -1), out=y)  # A^T M A
        y = y.view(m, m, n, th, tw, c_out).permute(2, 3, 0, 4, 1, 5)  # [n, th, r, tw, s, k]
        out = torch.empty(n, c_out, h, w, memory_format=_CL)
        exact = h == th * m and w == tw * m
        full = out if exact else torch.empty(n, c_out, th * m, tw * m, memory_format=_CL)
        target = full.permute(0, 2, 3, 1).view(n, th, m, tw, m, c_out)
        if self.bias is None:
            target.copy_(y)
        else:
            torch.add(y, self.bias, out=target)
        if not exact:
            out.copy_(full[:, :, :h, :w])
        if self.act == "relu":
            return out.relu_()
        return F.leaky_relu_(out, self.slope) if self.act == "leaky_relu" else out
