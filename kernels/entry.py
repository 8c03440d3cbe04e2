"""The model's entrance: cast the input to the compute dtype as a zero-padded NHWC tensor.

The first 3x3 conv reads the image. In NHWC a 3-channel bf16 pixel is 6 bytes, so the conv's
small-C mode gathers each (pixel, tap) channel by channel: 32 scalar 2-byte loads per thread
per K step (read off the sm_90 SASS: ``LDG.E.U16``). Padded with zeros to 16-byte pixels (8
channels in 16-bit, 4 in fp32) and dense, every tap of a pixel is one aligned 16-byte vector,
which the conv's ``DENSE_C`` mode loads with ``cp.async`` (``LDGSTS.E.BYPASS.128``), pipelined
like every other layer's loads. The cast that has to happen anyway writes the padded tensor, so
the padding costs only its own bytes: 16 instead of 6 bytes written per pixel, and read once.

``_pad_cast_nhwc_kernel`` does that in one pass: each program reads ``BLOCK_P`` pixels of any
layout (NCHW from a data loader reads each channel plane coalesced along W) and writes them,
cast and zero-padded, as contiguous ``[BLOCK_P, C_PAD]`` rows.

Launcher: ``pad_cast_nhwc``; the offline compile report uses ``compile_specs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    KernelSpec,
    can_launch,
    cdiv,
    launch,
    triton_dtype,
)

__all__ = ["compile_specs", "entry_channels", "pad_cast_nhwc"]

# Pixel indices are int32 in the kernel; the last tile may run BLOCK_P past the end.
_MAX_PIXELS = 2**31 - 2**16
_BLOCK_P, _WARPS = 256, 4


@triton.jit(do_not_specialize=("N",))
def _pad_cast_nhwc_kernel(
    x_ptr,
    out_ptr,
    N,
    C,
    H,
    W,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[n, c, h, w] = x[n, c, h, w] cast to out's dtype for c < C, 0 for C <= c < C_PAD.

    x_ptr   [N, C, H, W], any strides and float dtype.
    out_ptr [N, C_PAD, H, W], dense NHWC (pixel p's channels at ``p * C_PAD``).
    Grid: (cdiv(N*H*W, BLOCK_P),). Moves N*H*W*(C*x_elem + C_PAD*out_elem) bytes.
    """
    pid = tl.program_id(0)
    HW = H * W
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] pixels
    p_mask = offs_p < N * HW
    img = offs_p // HW
    rem = offs_p - img * HW
    oh = rem // W
    ow = rem - oh * W
    offs_c = tl.arange(0, C_PAD)  # [C_PAD]
    src = img.to(tl.int64) * stride_xn + oh.to(tl.int64) * stride_xh + ow.to(tl.int64) * stride_xw
    ptrs = x_ptr + src[:, None] + (offs_c.to(tl.int64) * stride_xc)[None, :]  # [BLOCK_P, C_PAD]
    v = tl.load(ptrs, mask=p_mask[:, None] & (offs_c < C)[None, :], other=0.0)
    dst = out_ptr + (offs_p.to(tl.int64) * C_PAD)[:, None] + offs_c[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=p_mask[:, None])


def entry_channels(in_ch: int, dtype: torch.dtype) -> int:
    """How many channels the padded entry has for ``in_ch`` input channels in ``dtype``: the
    channels of a 16-byte pixel (8 in 16-bit, 4 in fp32) when the input has at least 3 and
    fewer than that, else ``in_ch`` (no padding: a 1- or 2-channel image would read 4-8x the
    bytes for the same number of load instructions, and wider inputs already load in blocks)."""
    pad = 16 // torch.empty((), dtype=dtype).element_size()
    return pad if 3 <= in_ch < pad else in_ch


def pad_cast_nhwc(x: Tensor, dtype: torch.dtype, channels: int, *, out: Tensor | None = None) -> Tensor:
    """``x`` [N, C, H, W] (any strides, any float dtype) cast to ``dtype`` and zero-padded to
    ``channels`` >= C channels, as a dense channels_last tensor [N, channels, H, W].

    ``out``: optional destination of that shape, dtype and dense NHWC layout. One pass, one
    launch; float32/float16/bfloat16 outputs.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    triton_dtype(dtype)  # TypeError for anything the kernels do not compute in
    n, c, h, w = x.shape
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < c:
        raise ValueError(f"channels must be an int >= C = {c}, got {channels!r}")
    if channels & (channels - 1):
        raise ValueError(f"channels must be a power of two (one vector per pixel), got {channels}")
    if not can_launch(x.device):
        raise ValueError(f"pad_cast_nhwc runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if n * h * w > _MAX_PIXELS:
        raise ValueError(f"N*H*W = {n * h * w} pixels exceeds the int32 pixel index")
    shape = (n, channels, h, w)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=dtype, memory_format=torch.channels_last)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != x.device:
        raise ValueError(f"out must be {shape} {dtype} on {x.device}, got {tuple(out.shape)} {out.dtype} {out.device}")
    elif out.stride() != (h * w * channels, 1, w * channels, channels):
        raise ValueError("out must be a dense channels_last tensor")
    if out.numel() == 0:
        return out
    grid = (cdiv(n * h * w, _BLOCK_P),)
    args = (x, out, n, c, h, w, *x.stride())
    launch(_pad_cast_nhwc_kernel, grid, args, dict(C_PAD=channels, BLOCK_P=_BLOCK_P, num_warps=_WARPS))
    return out


def compile_specs(arch: int) -> list[KernelSpec]:
    """The entry kernel as the model launches it: fp32 NCHW input (a data loader's), every
    compute dtype out, 16-byte pixels (C_PAD 8 in 16-bit, 4 in fp32)."""
    fn = _pad_cast_nhwc_kernel
    specs = []
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        c_pad = 16 // torch.empty((), dtype=out_dtype).element_size()
        constexprs = {"stride_xw": 1, "C_PAD": c_pad, "BLOCK_P": _BLOCK_P}
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name == "x_ptr":
                sig[name] = "*fp32"
            elif name == "out_ptr":
                sig[name] = f"*{triton_dtype(out_dtype)}"
            else:
                sig[name] = "i32"
        # NCHW fp32 at U-Net sizes: aligned pointers, H*W and W multiples of 16; C (3) and N are not.
        aligned = ("x_ptr", "out_ptr", "H", "W", "stride_xn", "stride_xc", "stride_xh")
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        specs.append(
            KernelSpec(
                kernel=fn.__name__,
                fn=fn,
                signature=sig,
                constexprs=constexprs,
                num_warps=_WARPS,
                num_stages=1,
                dtype=triton_dtype(out_dtype),
                config=f"P{_BLOCK_P}_w{_WARPS}_pad{c_pad}",
                extra={"attrs": attrs, "variant": "entry", "expect_hgmma": False},
            )
        )
    return specs
