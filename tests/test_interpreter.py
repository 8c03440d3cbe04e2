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


def _fields(value):
    """A Triton front-end object as nested plain data (class, then every attribute in order), to
    compare two objects built apart; ints, strings and other leaves as themselves."""
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_fields(v) for v in value]
    if hasattr(value, "__dict__") and type(value).__module__.startswith("triton"):
        return type(value).__qualname__, [(k, _fields(v)) for k, v in vars(value).items()]
    return type(value).__name__, value


def _built(cls, init, *args):
    """``cls`` made with ``init`` (the installed or the original constructor): its fields, or the
    error it raised (class and text)."""
    obj = cls.__new__(cls)
    try:
        init(obj, *args)
    except Exception as error:  # noqa: BLE001 (the error is what is compared)
        return "raised", type(error).__name__, str(error)
    return _fields(obj)


def test_shared_block_shapes_build_what_the_originals_build():
    """conftest's ``block_type``/``tensor`` constructors are installed, and give field for field
    what Triton's own give (first build of a shape, and again from what was kept), the same errors
    for shapes Triton refuses, and their own mutable parts (a tuple changed in one object leaves
    the next alone)."""
    import _interpreter_options
    import triton.language as tl
    from triton.language import core

    assert getattr(core.block_type.__init__, "_fastunet_cached", False)
    assert _interpreter_options.share_block_shapes()  # a second call keeps the first's
    original = {cls: cls.__init__.__wrapped__ for cls in (core.block_type, core.tensor)}
    elements = [tl.int1, tl.int32, tl.uint8, tl.float16, tl.bfloat16, tl.float32, tl.float64,
                tl.pointer_type(tl.float32), tl.pointer_type(tl.int8, const=True)]  # fmt: skip
    refused = [[7], [], [2048, 1024], (4, 8), [4.0]]  # Triton raises (a builtin tuple: its assert)
    shapes = [
        [16],
        [1, 32],
        [4, 8, 2],
        [2, 1, 1, 64],
        core.tuple([8, 4]),
        [tl.constexpr(4), 8],
        [True, 2],
        [0],
        *refused,
    ]
    made = []  # [0]: triton 3.9 refuses it, 3.6 takes it; the same as the original either way
    for _ in range(2):  # the second round from what the first kept
        for element in elements:
            for shape in shapes:
                args = (element, core.tuple(list(shape.values)) if isinstance(shape, core.tuple) else shape)
                ours = _built(core.block_type, core.block_type.__init__, *args)
                assert ours == _built(core.block_type, original[core.block_type], *args), args
                made.append((repr(shape), ours[0] == "raised"))
    assert {text for text, raised in made if raised} >= {repr(shape) for shape in refused}

    handle = object()
    types = [*elements, *(core.block_type(e, s) for e in elements for s in ([16], [1, 32], [4, 8, 2]))]
    for t in types * 2:
        assert _built(core.tensor, core.tensor.__init__, handle, t) == _built(
            core.tensor, original[core.tensor], handle, t
        ), t

    shape = [4, 8, 2]
    first, second = core.tensor(handle, core.block_type(tl.float32, shape)), core.tensor(handle, types[-1])
    first.shape._setitem(0, tl.constexpr(128))
    first.type.shape._setitem(1, 2)
    assert _fields(second) == _built(core.tensor, original[core.tensor], handle, types[-1])
    for cls, args in ((core.block_type, (tl.float32, shape)), (core.tensor, (handle, core.block_type(tl.int8, shape)))):
        assert _built(cls, cls.__init__, *args) == _built(cls, original[cls], *args)
