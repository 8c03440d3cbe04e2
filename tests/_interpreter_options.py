"""The one change the tests make to Triton's interpreter, for speed; for the root conftest and for
the scripts the tests run as child processes (``tests/_syncbn_worker.py``, the determinism child).

Triton's interpreter builds every int32 add/sub/mul's overflow check (both operands cast to int64,
the op again, two compares) and hands it to ``device_assert``, which drops it unless
``options.debug`` is set, and the interpreter never sets it: about a third of the interpreter's
time at the suite's sizes went into checks that nothing reads. ``tests/test_interpreter.py`` shows
the check is dead with the stock options, and that it fires with ``debug`` on, where this leaves it.
"""

from __future__ import annotations

import dataclasses
import os


def skip_dead_overflow_checks() -> bool:
    """Turn the interpreter's ``sanitize_overflow`` off where ``debug`` is off (a no-op without
    ``TRITON_INTERPRET`` or with another triton layout). Call after ``TRITON_INTERPRET`` is set.
    Returns whether the options changed."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True):
        return False
    if not getattr(options, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
