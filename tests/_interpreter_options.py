"""What the tests change in Triton's interpreter, for speed only (``speed_up``): for the root
conftest and for the scripts the tests run as child processes (``tests/_syncbn_worker.py``, the
determinism child). A training step of a depth-1 U-Net at 8x8 took 2.2x less CPU with both.

Triton's interpreter builds every int32 add/sub/mul's overflow check (both operands cast to int64,
the op again, two compares) and hands it to ``device_assert``, which drops it unless
``options.debug`` is set, and the interpreter never sets it: about a third of the interpreter's
time at the suite's sizes went into checks that nothing reads. ``tests/test_interpreter.py`` shows
the check is dead with the stock options, and that it fires with ``debug`` on, where this leaves it.
Two lookups it repeats are also answered once (``cache_interpreter_lookups``).
"""

from __future__ import annotations

import dataclasses
import os


def _interpreter():
    """``triton.runtime.interpreter`` when the kernels run in it (``TRITON_INTERPRET``), else None."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    return interpreter


def skip_dead_overflow_checks() -> bool:
    """Turn the interpreter's ``sanitize_overflow`` off where ``debug`` is off (a no-op without
    ``TRITON_INTERPRET`` or with another triton layout). Call after ``TRITON_INTERPRET`` is set.
    Returns whether the options changed."""
    interpreter = _interpreter()
    if interpreter is None:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True):
        return False
    if not getattr(options, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


def cache_interpreter_lookups() -> bool:
    """Two lookups Triton's interpreter repeats on every launch and every tensor op, answered once.

    * ``_patch_builtin``: on every launch and every call of a ``@triton.jit`` helper it lists
      ``triton.language``'s members (``inspect.getmembers``: ``dir``, a ``getattr`` and a sort
      each) to find its builtins; the names are fixed, so they are listed once here, before any
      kernel runs, and each call patches the same members the original would (those that are
      builtins at that moment: none inside an already patched launch, as before).
    * ``_get_np_dtype``: rebuilds a 20-entry dict of Triton to NumPy dtypes on every call; the
      answer depends on the element type alone, so it is kept per scalar type's name (pointers and
      anything else go to the original).

    A no-op without ``TRITON_INTERPRET`` or with a triton whose interpreter is laid out otherwise.
    Returns whether both were installed."""
    interpreter = _interpreter()
    if interpreter is None:
        return False
    import inspect

    import triton.language as tl

    patch_builtin, patch_attr = getattr(interpreter, "_patch_builtin", None), getattr(interpreter, "_patch_attr", None)
    get_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if getattr(patch_builtin, "_fastunet_cached", False):
        return True
    if not (callable(patch_builtin) and callable(patch_attr) and callable(get_np_dtype)):
        return False
    if list(inspect.signature(patch_builtin).parameters) != ["pkg", "builder", "scope"]:
        return False
    packages = [tl, tl.core, tl.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None)]
    names = {
        id(pkg): (pkg, [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)])
        for pkg in packages
        if pkg is not None
    }

    def cached_patch_builtin(pkg, builder, scope):
        known = names.get(id(pkg))
        if known is None or known[0] is not pkg:
            return patch_builtin(pkg, builder, scope)
        for name in known[1]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    np_dtypes: dict = {}

    def cached_get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if type(tt_dtype) is tl.block_type else tt_dtype
        if type(scalar) is not tl.dtype:  # pointers (uint64 either way) and anything unforeseen
            return get_np_dtype(tt_dtype)
        found = np_dtypes.get(scalar.name)
        if found is None:
            found = np_dtypes[scalar.name] = get_np_dtype(scalar)
        return found

    cached_patch_builtin._fastunet_cached = True
    cached_patch_builtin.__wrapped__, cached_get_np_dtype.__wrapped__ = patch_builtin, get_np_dtype
    interpreter._patch_builtin = cached_patch_builtin
    interpreter._get_np_dtype = cached_get_np_dtype
    return True


def speed_up() -> None:
    """Both changes (each a no-op where it does not apply). Call after ``TRITON_INTERPRET`` is set."""
    skip_dead_overflow_checks()
    cache_interpreter_lookups()
