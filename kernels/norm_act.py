"""The training path's BatchNorm+ReLU applied on load, shared by the forward kernels that read a
raw pre-BatchNorm tensor (``IN_NORM``: ``maxpool2x2``, ``upconv2x2``, ``upconv_nearest2x2``,
``head1x1``) and the backward kernels (``norm_act_bwd``, ``upconv2x2_bwd``, ``head1x1_bwd``):
the ``@triton.jit`` transform ``affine_relu`` and the launchers' check of its ``(scale, shift)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["affine_relu", "check_norm_affine"]


@triton.jit
def affine_relu(x, scale, shift):
    """``T`` on a ``[rows, channels]`` tile: fp32 ``max(x*scale + shift, 0)``.

    ``scale``/``shift`` are fp32 ``[channels]``. ``v < 0`` rather than ``max``: NaN and -0.0 pass
    through unchanged, as in ``torch.relu`` on CPU (a NaN-dropping max would hide a NaN).
    """
    v = x.to(tl.float32) * scale[None, :] + shift[None, :]
    return tl.where(v < 0.0, 0.0, v)


def check_norm_affine(
    scale, shift, C: int, x: torch.Tensor, names: tuple[str, str] = ("in_scale", "in_shift")
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate an optional per-channel ``(scale, shift)`` pair for ``C`` channels of ``x``.

    Both or neither: returns None for neither, else the pair as contiguous ``[C]`` tensors, fp32
    or fp64 (the kernels compute in fp32 either way; the training path's BatchNorm vectors are fp64).
    """
    if scale is None and shift is None:
        return None
    if scale is None or shift is None:
        raise ValueError(f"pass both {names[0]} and {names[1]}, or neither")
    for name, t in zip(names, (scale, shift), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be [C={C}], got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return scale.contiguous(), shift.contiguous()
