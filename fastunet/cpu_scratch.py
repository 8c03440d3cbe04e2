"""Per-thread scratch buffers for the CPU fold's fast math (float32).

A buffer that lives only inside one step (a Winograd conv's tile matrices, a decoder's
concatenation buffer read by the next conv and dropped) is taken from here instead of being a
fresh tensor: glibc hands multi-MB blocks back to the OS when they are freed, so a fresh one
costs a page fault per 4 KiB every forward (~2 ms per MB on this project's machine). One buffer
per role and thread, grown to the largest request seen, shared by every layer and model on
that thread: the steps of one forward run one after another, and a role's buffer is never held
past the step that asked for it. Memory kept: the largest request per role (at 256x256, classic
model: 77 MiB per thread in all, measured).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["buffers", "scratch"]

_LOCAL = threading.local()


def buffers() -> dict:
    """This thread's ``{role: buffer}`` (tests poison them)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    return bufs


def scratch(role: str, *shape: int) -> Tensor:
    """A contiguous float32 ``[*shape]`` tensor for ``role`` on this thread, contents undefined,
    valid until the next ``scratch(role, ...)`` on this thread."""
    numel = 1
    for s in shape:
        numel *= s
    bufs = buffers()
    buf = bufs.get(role)
    if buf is None or buf.numel() < numel:
        # a normal tensor even inside inference_mode: a later forward outside it writes into it
        with torch.inference_mode(False):
            buf = bufs[role] = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)
