"""What the tests change in Triton's interpreter for speed (``tests/_interpreter_options.py``), and why
no check is lost."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="about Triton's interpreter (CPU runs)",
)


def _square_int32(x: torch.Tensor) -> torch.Tensor:
    """``x * x`` in int32 inside a kernel (wraps past 2**31); ``x``: int32, 1-D, at most 16."""
    import triton
    import triton.language as tl

    @triton.jit
    def square(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, a * a, mask=offs < n)

    out = torch.empty_like(x)
    square[(1,)](x, out, x.numel(), BLOCK=16)
    return out


def test_overflow_checks_are_skipped_only_where_nothing_reads_them():
    from triton.runtime import interpreter

    stock = interpreter.InterpreterOptions()
    assert stock.sanitize_overflow and not stock.debug, "the premise of conftest's change"
    assert interpreter.interpreter_builder.options == dataclasses.replace(stock, sanitize_overflow=False)


@pytest.mark.parametrize("sanitize", [True, False], ids=["stock", "conftest"])
def test_an_int32_overflow_passes_unchecked_either_way_without_debug(monkeypatch, sanitize):
    """Stock options compute the overflow check and drop it: the same wrapped result as with the
    check skipped, so skipping it loses nothing."""
    from triton.runtime import interpreter

    stock = interpreter.InterpreterOptions()
    monkeypatch.setattr(
        interpreter.interpreter_builder, "options", dataclasses.replace(stock, sanitize_overflow=sanitize)
    )
    x = torch.tensor([3, 1 << 20, -(1 << 17)], dtype=torch.int32)
    wrapped = (x.long() * x.long() + (1 << 31)) % (1 << 32) - (1 << 31)
    assert torch.equal(_square_int32(x).long(), wrapped)


def test_with_debug_the_overflow_check_fires(monkeypatch):
    """Where the check is read (``debug``), conftest leaves it on, and it works."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.interpreter_builder, "options", interpreter.InterpreterOptions(debug=True))
    with pytest.raises(Exception, match="int32 overflow detected"):  # InterpreterError wraps it
        _square_int32(torch.tensor([1 << 20], dtype=torch.int32))
    assert torch.equal(
        _square_int32(torch.tensor([3, -7], dtype=torch.int32)), torch.tensor([9, 49], dtype=torch.int32)
    )
