"""What the tests change in Triton's interpreter, for speed only (``speed_up``): for the root
conftest and for the scripts the tests run as child processes (``tests/_syncbn_worker.py``, the
determinism child). A training step of a depth-1 U-Net at 8x8 took 2.2x less CPU with both.

Triton's interpreter builds every int32 add/sub/mul's overflow check (both operands cast to int64,
the op again, two compares) and hands it to ``device_assert``, which drops it unless
``options.debug`` is set, and the interpreter never sets it: about a third of the interpreter's
time at the suite's sizes went into checks that nothing reads. ``tests/test_interpreter.py`` shows
the check is dead with the stock options, and that it fires with ``debug`` on, where this leaves it.
Two lookups it repeats are also answered once (``cache_interpreter_lookups``), and the type fields
it derives from each block shape are built once per shape (``share_block_shapes``).
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


def share_block_shapes() -> bool:
    """Triton's type objects for a block shape, derived once per shape instead of once per op.

    The interpreter runs Triton's front end for every op of every program: each op builds a
    ``block_type`` (unwraps and validates its shape, formats its name) and a ``tensor`` (one
    ``constexpr`` per dimension and one for the element count, in a new Triton ``tuple``): about a
    fifth of a kernel test's CPU time. For a shape of plain ints (every shape the interpreter
    makes), what the two constructors derive from the shape is kept the first time the original
    constructor has built (and validated) it; later objects get the same fields, each its own
    Triton ``tuple``, lists and ``tuple_type``, sharing only immutable parts (ints, ``constexpr``
    and ``constexpr_type`` objects, the shape's text). Anything else (a shape holding a
    ``constexpr``, a builtin tuple, a 0-d block, a type that is not a dtype) goes to the original, errors
    included. ``tests/test_interpreter.py`` compares the objects field by field with the originals'.

    A no-op without ``TRITON_INTERPRET`` or with a triton laid out otherwise. Returns whether
    installed."""
    interpreter = _interpreter()
    if interpreter is None:
        return False
    import inspect

    import triton.language.core as core

    block_type, tensor, tl_tuple, tuple_type, dtype = (
        getattr(core, name, None) for name in ("block_type", "tensor", "tuple", "tuple_type", "dtype")
    )
    if not all(isinstance(cls, type) for cls in (block_type, tensor, tl_tuple, tuple_type, dtype)):
        return False
    init_block, init_tensor = block_type.__init__, tensor.__init__
    if getattr(init_block, "_fastunet_cached", False):
        return True
    if list(inspect.signature(init_block).parameters) != ["self", "element_ty", "shape"]:
        return False
    if list(inspect.signature(init_tensor).parameters) != ["self", "handle", "type"]:
        return False
    blocks: dict = {}  # dims (ints) -> (numel, the dims' constexpr_types, the shape's text)
    tensors: dict = {}  # dims (ints) -> (numel as constexpr, the dims as constexprs)
    kind = type

    ints = {(int,) * rank for rank in range(1, 9)}  # the dims' classes where a shape is kept

    def shared_block_init(self, element_ty, shape):
        dims = shape if kind(shape) is list else shape.values if kind(shape) is tl_tuple else ()
        if (*map(kind, dims),) not in ints:
            return init_block(self, element_ty, shape)
        key = (*dims,)
        known = blocks.get(key)
        if known is None:
            init_block(self, element_ty, shape)  # validates (raises as it always did)
            blocks[key] = (self.numel, (*self.shape.type.types,), str(self.shape))
            return None
        numel, types, text = known
        self.element_ty = element_ty
        self.shape = tl_tuple(list(key), tuple_type(list(types)))
        self.numel = numel
        self.name = f"<{text}, {element_ty}>"
        return None

    def shared_tensor_init(self, handle, type):  # noqa: A002 (the original's keyword)
        if kind(type) is block_type:
            dims = type.shape.values if kind(type.shape) is tl_tuple else ()
            if (*map(kind, dims),) not in ints:
                return init_tensor(self, handle, type)
        elif isinstance(type, dtype) and not type.is_block():  # a scalar or a pointer
            dims = ()
        else:
            return init_tensor(self, handle, type)
        key = (*dims,)
        known = tensors.get(key)
        if known is None:
            init_tensor(self, handle, type)
            tensors[key] = (self.numel, list(self.shape.values))
            return None
        numel, constexprs = known
        self.handle = handle
        self.shape = tl_tuple(list(constexprs), tuple_type([c.type for c in constexprs]))
        self.numel = numel
        self.type = type
        self.dtype = type.scalar
        return None

    shared_block_init._fastunet_cached = True
    shared_block_init.__wrapped__, shared_tensor_init.__wrapped__ = init_block, init_tensor
    block_type.__init__, tensor.__init__ = shared_block_init, shared_tensor_init
    return True


def speed_up() -> None:
    """The three changes (each a no-op where it does not apply). Call after ``TRITON_INTERPRET`` is set."""
    skip_dead_overflow_checks()
    cache_interpreter_lookups()
    share_block_shapes()
