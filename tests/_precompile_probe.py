"""A stand-in kernel for tests/test_precompile.py: ``warmup`` appends what it was given to the
file named by $PRECOMPILE_PROBE_LOG (what a worker process of ``_precompile`` calls)."""

import json
import os


class _Kernel:
    def __init__(self, fn):
        self.fn = fn

    def warmup(self, *args, grid, **meta):
        if meta.get("fail"):
            raise RuntimeError("this config does not compile")
        with open(os.environ["PRECOMPILE_PROBE_LOG"], "a") as f:
            f.write(json.dumps({"args": [str(a) for a in args], "grid": list(grid), "meta": meta}) + "\n")


def probe_kernel():  # the "JIT function" the kernel object wraps
    pass


probe_kernel = _Kernel(probe_kernel)  # noqa: F811  (like @triton.jit: the name holds the kernel)
