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


def test_the_cached_lookups_answer_as_the_originals():
    """conftest's two caches are installed, and give what the interpreter's own functions give:
    the same NumPy dtypes for every Triton type a kernel meets, and the same members patched."""
    import _interpreter_options
    import triton.language as tl
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_builtin, "_fastunet_cached", False)
    assert _interpreter_options.cache_interpreter_lookups()  # a second call keeps the first's
    original = {f: getattr(interpreter, f).__wrapped__ for f in ("_get_np_dtype", "_patch_builtin")}
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64,
               tl.float16, tl.bfloat16, tl.float32, tl.float64]  # fmt: skip
    types = [*scalars, tl.pointer_type(tl.float16), *(tl.block_type(t, [4, 8]) for t in scalars)]
    types.append(tl.block_type(tl.pointer_type(tl.float32), [16]))
    for t in types * 2:  # the second round from the cache
        assert interpreter._get_np_dtype(t) == original["_get_np_dtype"](t), t

    class Scope:
        def __init__(self):
            self.names = []

        def set_attr(self, obj, name, value):
            self.names.append((obj, name))

    for pkg in (tl, tl.core, tl.tensor, tl.math, tl.core.tensor_descriptor_base):
        ours, theirs = Scope(), Scope()
        interpreter._patch_builtin(pkg, None, ours)
        original["_patch_builtin"](pkg, None, theirs)
        assert ours.names and sorted(ours.names, key=str) == sorted(theirs.names, key=str), pkg
