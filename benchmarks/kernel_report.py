"""Ring 2 of the test plan: compile every kernel spec offline and check what the compiler made.

Every kernel module under ``kernels/`` (imported as ``fastunet.kernels.<mod>``:
``pip install -e .`` first) exposes ``compile_specs(arch) -> list[KernelSpec]``: each (kernel, autotune
config, form, dtype) its launcher can run on that architecture, with a full Triton signature and
the constexprs. The configs come from the tuners themselves (``kernels/_specs.py``: each tuner's
candidates over every shape bucket it can be shown, its own pruning applied), and
``tests/test_compile_specs.py`` checks that every candidate the U-Net's layers make a tuner time
(classic and family presets) has its spec. This script compiles each one for a GPU that need not
be present::

    triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, attrs),
                   target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})

and reads, per spec, registers per thread, spilled bytes, shared memory per block, whether
the SASS holds ``HGMMA`` (Hopper's warpgroup MMA, ``wgmma`` in PTX) and how many float max/min
instructions in the PTX drop NaN. It fails (exit status 1) on

* a spec that does not compile (the spec and the error are printed),
* any register spill (spill stores + spill loads > 0 bytes), on every triton (the GPU image runs
  3.6; CI runs the report on 3.6 and on the newest),
* shared memory over the target's per-block limit (``_common.smem_limit(arch)``),
* shared memory over the spec's ``extra["smem_estimate"]``: the estimate the tuner's pruning
  compared with that limit (``_common.gemm_smem`` and each kernel's additions). A compiled kernel
  above its estimate means the pruning could let a config over the limit through, so the estimate
  must be an upper bound on every spec that has one (the GEMM kernels' do; elementwise kernels,
  which no pruning sizes, have none),
* on sm_90 and later: a 16-bit (fp16/bf16) spec of a ``conv3x3`` kernel that contains a
  ``tl.dot`` but whose SASS has no ``HGMMA`` (a spec can override the rule with
  ``extra["expect_hgmma"] = True/False``),
* a NaN-dropping float max/min in the PTX (see below), unless the spec documents why it is
  harmless with ``extra["nan_dropping_ok"] = "<reason>"`` (a non-empty string),
* a kernel module that exists but fails to import, or whose ``compile_specs`` raises,
* two specs with the same (kernel, config, dtype).

With nothing to check (no module exposes ``compile_specs`` yet) it exits with status 3.

Register pressure: the table's ``cap`` column is 255 minus the registers per thread. A spec within
``REG_CAP_MARGIN`` (4) of the cap is marked ``AT-CAP`` and counted in the summary, never failed:
it does not spill with this ptxas, but has nothing left for another version's choices, so such
configs are pruned where the tuner offers a comparable one (``conv3x3_tma.fits_training``).

Spills below the cap are ptxas's own trade, not a lack of registers: on sm_80 both tritons' ptxas
aim for an occupancy step and hold a kernel at exactly 80 (8 warps), 128 or 168 (4 warps)
registers, spilling the few words above it (8-44 B, one reload inside the main loop in the case
read). With ``.maxnreg 255`` set the same kernels compiled clean, but every other kernel then
took more registers too (a split-K epilogue 78 -> 168), so that is not a fix. They still fail
the report: a tile list changes (fewer stages, 8 warps, K steps of 16, or the tile dropped) until
neither triton spills; the comments at each sm_80 list say which tile spilled where.

Besides the checks, every row carries a static performance metric of the GEMM main loop
(``sass_metrics.py``, read from the same SASS): the non-NOP instructions of the innermost loops
that hold ``HGMMA``, per HGMMA (what one warp issues per warpgroup MMA: address and mask
arithmetic, copies, barriers, pipeline bookkeeping; the table's ``ins/hgmma``), whether the SASS
loads through TMA (``UTMALDG``, ``tma``), and the resident CTAs per SM allowed by registers and
by shared memory on sm_90 (``ctas``, registers/shared memory). They are reported, never failed.
The JSON carries them as ``loop_insts``, ``loop_hgmma``, ``insts_per_hgmma``, ``tma``,
``ctas_regs``, ``ctas_smem``; ``benchmarks/results/conv_main_loop_sm90.json`` holds the conv's
before/after rows (issue 14) and ``python benchmarks/sass_metrics.py`` on it prints docs/kernels.md's
table.

``attrs`` is ``spec.extra["attrs"]`` when the spec has one (Triton's form,
``{(arg_index,): [["tt.divisibility", 16]]}``, or a list of argument names), else nothing. It
matters: the JIT marks every 16-byte-aligned pointer and every int divisible by 16 as such and
turns an int equal to 1 into a constexpr. On one tile config (fp16, 128x64x32, 4 warps) the
same GEMM compiled to 254 registers and 32 KiB of shared memory without the hints and to 153
registers and 16 KiB with them. A spec should spell out what the runtime will see.

NaN-dropping max/min
--------------------
``tl.maximum``/``tl.minimum`` on floats default to ``propagate_nan=tl.PropagateNan.NONE``, which
is LLVM's ``maxnum``: PTX ``max.f32`` (on 16-bit operands triton 3.9 emits ``max.f16x2``/
``max.bf16x2`` for sm_90 and ``max.f16``/``max.bf16`` for sm_80, where 3.6 computed in fp32),
which returns the other operand when one is NaN: ``max(NaN, 0) = 0``.
``tl.max``/``tl.min`` reduce with the same function. torch propagates NaN (``relu(NaN)``,
``clamp(NaN)``, the BatchNorm statistics of a NaN batch are all NaN), so such an instruction makes a
kernel disagree with the reference model exactly when something has gone wrong, and hides it. The
interpreter does not model the GPU here reliably: triton 3.9 runs ``maxnum`` as ``np.fmax``
(NaN-dropping, like the GPU) but triton 3.6 as ``np.maximum`` (NaN-propagating), so ring 1 sees
the problem only with a NaN test and a recent triton. The report therefore counts, in every
spec's PTX, the ``max``/``min`` instructions of a float type (``f16``, ``f16x2``, ``bf16``,
``bf16x2``, ``f32``, ``f64``) without the ``.NaN`` modifier; integer forms (``max.s32``, ...)
are not counted. The torch-exact forms compile to none: ``tl.where(v < 0.0, 0.0, v)`` (a ReLU
that also keeps -0.0, as ``torch.relu`` on CPU; ``setp`` + ``selp``) and
``tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)`` (``max.NaN.f32``, one instruction, the
same in triton 3.6). Which one is a register question, measured on ``_conv3x3_bn_act_kernel``
(triton 3.9): for the epilogue ReLU, ``max.NaN`` compiled like ``max.f32`` (within 2 registers on
every sm_90 spec) while the select cost up to 33 more and spilled 64 B on one sm_80 fp32 tile;
for the BatchNorm+ReLU on the A tile in the K loop the select was the cheaper one (``max.NaN``
up to 32 more). Each counted instruction is attributed to its source line through the
PTX's ``.loc`` (a ``tl.max`` is blamed on its caller, not on ``triton/language/standard.py``)
and the first few sites are shown, e.g. ``20x max.f32 at head1x1.py:123``. An exemption is for
a reduction whose result provably still matches torch, e.g. a softmax's row max: a NaN logit
makes ``exp(logit - max)`` NaN and so the whole row NaN whatever the max is.

How the numbers are read offline (no GPU, no driver)
----------------------------------------------------
``CompiledKernel.n_regs``/``n_spills`` only exist after ``_init_handles()``, which loads the
cubin through the CUDA driver, so they are not available here (triton 3.6 and 3.9 alike).
Instead:

* shared memory: ``compiled.metadata.shared`` (bytes; includes pipeline buffers and scratch).
* spills: the ptxas ``-v`` log of the compile itself. Triton runs ptxas with ``-v`` and prints
  the log when ``TRITON_DUMP_PTXAS_LOG=1``. The report sets that and captures stdout. Spills =
  "bytes spill stores" + "bytes spill loads". On a triton cache hit ptxas does not run, so
  there is no log. The spills are then counted from the SASS: the bytes moved by
  ``STL``/``LDL`` instructions, which matched ptxas's figure exactly (588 + 588 B) on the
  kernels tried. ptxas remarks about ``wgmma`` (e.g. C7517 "wgmma.wait_group is injected":
  serialized warpgroup MMAs) are kept as notes.
* registers: ``REG:n`` from Triton's bundled ``cuobjdump -res-usage`` on the cubin (about
  2 ms); the ptxas log's "Used n registers" if that is missing.
* HGMMA: ``cuobjdump -sass`` on the cubin (about 0.5 s). It only runs when the PTX has
  ``wgmma``: without ``wgmma`` in the PTX, ptxas cannot emit HGMMA, so such specs (everything
  on sm_80, fp32 IEEE dots, kernels without a dot) are not disassembled.
* NaN-dropping max/min: a regular expression over ``compiled.asm["ptx"]`` (no tool needed).
* each measurement is saved as ``<triton cache dir>/fastunet_kernel_report/<hash>.json``, where
  ``<hash>`` is the kernel's triton cache key. When triton's cache and that file both hit, a
  spec costs milliseconds. A saved record carries ``_MEASURE_FORMAT``; one of another format
  (or missing a field) is measured again, so a record from before the NaN count cannot pass
  for "no NaN-dropping instruction". ``--no-cache`` recompiles everything (``TRITON_ALWAYS_COMPILE=1``)
  and measures again.

The same calls work on triton 3.6: ``ASTSource``/``GPUTarget``/``triton.compile`` take the same
arguments, and both versions have the two environment knobs and bundle ``cuobjdump``. One
difference: 3.6 runs ptxas 12.x for sm_90, where 3.9 runs its newer ``ptxas-blackwell`` (13.x).
Compiles must run without ``TRITON_INTERPRET``, because under it ``@triton.jit`` returns an
interpreter function that cannot be compiled. If the variable is set, the script runs itself
again in a child process without it.

Getting HGMMA when a config lacks it (sm_90)
---------------------------------------------
What was tried with triton 3.9 (ptxas 13.4) on a tiny masked-load GEMM, fp32 accumulator; the
test kernel in ``tests/test_kernel_report.py`` checks the first three points:

* ``num_warps`` must be a multiple of 4, because a warpgroup is 4 warps. With 1 or 2 warps the
  dot lowers to ``HMMA.16816`` (Ampere ``mma.sync``); with 4, 8 or 16 warps it lowers to HGMMA.
* ``BLOCK_M`` must be at least 64, because one warpgroup instruction covers 64 rows. With
  ``BLOCK_M`` 16 or 32 you get HMMA even with 4 or 8 warps; 64, 128 and 256 give HGMMA. With
  ``BLOCK_M=64`` and 8 or 16 warps, Triton splits N between the warps (``HGMMA.64x32x16``,
  ``64x16x16``).
* Operands must be 16-bit, or fp32 with ``input_precision="tf32"`` (``HGMMA.64xNx8...TF32``,
  also ``tf32x3``). An fp32 ``"ieee"`` dot uses no tensor cores at all: it becomes ``FFMA``.
* ``BLOCK_N`` down to 8 still gives HGMMA (``HGMMA.64x8x16``). ``BLOCK_K`` must be at least 16
  for 16-bit operands: ``BLOCK_K=8`` fp16 fails to compile at all; fp32/tf32 works with
  ``BLOCK_K=8``.
* These did *not* cost HGMMA: 1 to 3 pipeline stages; a B tile that is K-contiguous or
  N-contiguous (fp16 and tf32); scaling/ReLU of the A or B tile between ``tl.load`` and
  ``tl.dot`` (BN-on-load), since Triton stages the result through shared memory itself. So
  "operands in shared memory in an MMAv3 layout" is Triton's job as long as the dot's
  operands are plain 2-D tiles.
* An fp16 accumulator (``out_dtype=tl.float16``) gives ``HGMMA...F16``, but ptxas reported
  C7517 (wait_group injected), which serializes the MMAs. The report prints such notes.
* HGMMA does not stop spills. At 128x128x64, 4 warps, fp16 got HGMMA plus 255 registers and
  588 B of spills; with 8 warps the same tile used 163 registers and did not spill. Big
  Hopper tiles want 8 warps.

Usage::

    python benchmarks/kernel_report.py --arch 90 [--json out.json] [--kernels conv3x3,upconv2x2]
        [--sample N] [--jobs N] [--quiet] [--no-cache] [--provider MODULE:FUNCTION ...] [--no-modules]
        [--packages fastunet.kernels]

From Python (in a process without TRITON_INTERPRET): ``collect_rows(arch, specs)`` compiles
``KernelSpec`` objects and returns ``Row`` objects; ``check_rows(rows, arch)`` returns the
failure messages; ``rows_to_json(rows)`` returns the JSON payload.

Timing. On a quiet 2-core machine (triton 3.9): CPU time per spec, measurement included, about
0.8 s for conv3x3 on sm_80, 1.2 s on sm_90 (0.5 s of that is the SASS disassembly), about 0.5 s
for the smaller kernels. Measured again with triton 3.6 and 3.9 on a heavily shared machine (issue
21): 1.7 to 1.9 CPU-s per spec for the conv and TMA kernels on sm_90 (user + sys over fresh
compiles). The full set is 1298 specs for sm_90 and 1017 for sm_80 per triton: about 25 and 15
CPU-minutes, so CI compiles ``--sample 2`` (sm_90) and ``--sample 1`` (sm_80) on each triton
(``.ci/run``). When triton's cache and the saved measurements are warm, a run takes seconds. The
summary line gives the wall time and the mean compile time of the specs that were compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # sass_metrics sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_metrics  # noqa: E402

KERNEL_MODULES = (
    "conv3x3",
    "conv3x3_tma",
    "bn_stats",
    "bn_train",
    "conv3x3_wgrad",
    "norm_act_bwd",
    "upconv2x2",
    "upconv_nearest2x2",
    "maxpool2x2",
    "head1x1",
    "upconv2x2_bwd",
    "head1x1_bwd",
    "_split_k",
    "entry",
)
PACKAGES = ("fastunet.kernels",)  # the kernels' one import name
JSON_KEYS = (
    "kernel", "config", "dtype", "regs", "spills", "smem", "smem_estimate", "hgmma", "nan_dropping",
    "global_loads", *sass_metrics.METRIC_KEYS,
)  # fmt: skip
SIXTEEN_BIT = ("fp16", "bf16")
HGMMA_KERNEL_PREFIX = "conv3x3"
# A thread has at most 255 registers; a spec within REG_CAP_MARGIN of it is flagged ("cap").
REG_CAP, REG_CAP_MARGIN = 255, 4

EXIT_OK, EXIT_FAIL, EXIT_EMPTY = 0, 1, 3

# Knobs read by triton at compile time (same names in 3.6 and 3.9).
_DUMP_LOG_ENV = "TRITON_DUMP_PTXAS_LOG"
_ALWAYS_COMPILE_ENV = "TRITON_ALWAYS_COMPILE"
# Bump when the cached measurement's meaning changes: a record of another format is measured
# again (3: NaN-dropping max/min counted from the PTX; 6: the main-loop metric of sass_metrics).
_MEASURE_FORMAT = 6
_MEASURE_KEYS = (
    "regs", "spills", "spill_source", "hgmma", "mma", "notes", "nan_dropping", "nan_dropping_sites", "global_loads",
)  # fmt: skip
_NAN_SITES_KEPT = 4  # distinct (instruction, source line) pairs kept per spec
_FP_FUSION_WARNING = r".*TRITON_DEFAULT_FP_FUSION.*"


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """What one compiled spec looks like. Only ``JSON_KEYS`` go to the JSON file."""

    kernel: str
    config: str
    dtype: str
    regs: int = -1
    spills: int = -1
    smem: int = -1
    hgmma: bool = False
    num_warps: int = 0
    num_stages: int = 0
    has_dot: bool = True  # unknown counts as "has one": the HGMMA rule then applies
    expect_hgmma: bool | None = None  # spec.extra["expect_hgmma"]; None: the default rule
    module: str = ""  # short kernel-module name (conv3x3, ...) or provider reference
    mma: str = ""  # first MMA instruction: from the SASS (HGMMA.64x64x16.F32) or the PTX
    spill_source: str = ""  # "ptxas" or "sass"
    cached: bool = False  # measurement read back from the report's cache
    nan_dropping: int = 0  # float max/min instructions in the PTX without .NaN (drop NaN)
    nan_dropping_sites: list[str] = dataclasses.field(default_factory=list)  # "3x max.f32 at f.py:12"
    nan_dropping_ok: str | None = None  # spec.extra["nan_dropping_ok"]: why they are harmless
    # spec.extra["smem_estimate"]: the shared memory the tuner's pruning assumed for this config
    # (bytes; -1: the spec has none, e.g. an elementwise kernel no pruning sizes).
    smem_estimate: int = -1
    # Global-load instructions in the SASS by mnemonic ({"LDG.E.U16": 32, ...}; empty when the
    # SASS was not disassembled): how wide a kernel's loads are (the dense entry's 16-byte cp.async).
    global_loads: dict[str, int] = dataclasses.field(default_factory=dict)
    # The static main-loop metric (sass_metrics; 0 where the SASS was not disassembled or has no
    # HGMMA loop): non-NOP instructions and HGMMAs in the innermost HGMMA loops, their ratio,
    # whether the SASS loads through TMA (UTMALDG), and resident CTAs per SM by registers and by
    # shared memory (sm_90 limits).
    loop_insts: int = 0
    loop_hgmma: int = 0
    insts_per_hgmma: float = 0.0
    tma: bool = False
    ctas_regs: int = 0
    ctas_smem: int = 0
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kernel}[{self.config}, {self.dtype}]"

    def sort_key(self) -> tuple:
        return (self.kernel, self.config, self.dtype, self.error or "")

    def as_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel),
            "config": str(self.config),
            "dtype": str(self.dtype),
            "regs": int(self.regs),
            "spills": int(self.spills),
            "smem": int(self.smem),
            "smem_estimate": int(self.smem_estimate),
            "hgmma": bool(self.hgmma),
            "nan_dropping": int(self.nan_dropping),
            "global_loads": dict(sorted(self.global_loads.items())),
            "loop_insts": int(self.loop_insts),
            "loop_hgmma": int(self.loop_hgmma),
            "insts_per_hgmma": float(self.insts_per_hgmma),
            "tma": bool(self.tma),
            "ctas_regs": int(self.ctas_regs),
            "ctas_smem": int(self.ctas_smem),
        }


def rows_to_json(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """The JSON payload: one object per successfully compiled spec, sorted, exactly JSON_KEYS."""
    return [r.as_json() for r in sorted(rows, key=Row.sort_key) if r.error is None]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _smem_limit(arch: int) -> int:
    return _import_common().smem_limit(arch)


def hgmma_required(row: Row, arch: int) -> bool:
    """Whether ``row`` must contain HGMMA: 16-bit conv3x3 specs with a dot, on sm_90+."""
    if arch < 90:
        return False
    if row.expect_hgmma is not None:
        return bool(row.expect_hgmma)
    is_conv = row.module == HGMMA_KERNEL_PREFIX or row.kernel.lstrip("_").startswith(HGMMA_KERNEL_PREFIX)
    return is_conv and row.dtype in SIXTEEN_BIT and row.has_dot


def nan_dropping_failed(row: Row) -> bool:
    """Whether ``row`` fails the NaN rule: NaN-dropping max/min in the PTX and no exemption."""
    return row.nan_dropping > 0 and not row.nan_dropping_ok


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def at_register_cap(row: Row) -> bool:
    """Whether ``row`` uses the last few of the 255 registers a thread can have: no spill today,
    but nothing left for another triton/ptxas version's choices (reported, not failed)."""
    return row.regs >= REG_CAP - REG_CAP_MARGIN


def check_rows(rows: Sequence[Row], arch: int) -> list[str]:
    """Every ring-2 failure among ``rows``, one message each (empty: all good)."""
    failures = []
    limit = _smem_limit(arch)
    counts = Counter((r.kernel, r.config, r.dtype) for r in rows)
    for key, n in sorted(counts.items()):
        if n > 1:
            failures.append(f"{key[0]}[{key[1]}, {key[2]}]: {n} specs share this label")
    for r in sorted(rows, key=Row.sort_key):
        if r.error is not None:
            failures.append(f"{r.label}: compile failed: {r.error}")
            continue
        if r.spills > 0:
            failures.append(
                f"{r.label}: {r.spills} bytes of register spills (spill stores + loads) at "
                f"{r.regs} registers, num_warps={r.num_warps}"
            )
        if r.smem > limit:
            failures.append(f"{r.label}: {r.smem} B shared memory > sm_{arch} limit {limit} B")
        if r.smem_estimate >= 0 and r.smem > r.smem_estimate:
            failures.append(
                f"{r.label}: {r.smem} B shared memory > the pruning's estimate {r.smem_estimate} B: the "
                "estimate could let a config over the limit through; raise it (kernels/_common.py gemm_smem)"
            )
        if hgmma_required(r, arch) and not r.hgmma:
            got = r.mma or "no tensor-core MMA"
            failures.append(
                f"{r.label}: no HGMMA in the SASS on sm_{arch} (got {got}; num_warps="
                f"{r.num_warps}); see the module docstring for what HGMMA needs"
            )
        if nan_dropping_failed(r):
            where = "; ".join(r.nan_dropping_sites) or "no line info"
            failures.append(
                f"{r.label}: {r.nan_dropping} NaN-dropping float max/min in the PTX ({where}); "
                "torch propagates NaN: write a ReLU as tl.where(v < 0.0, 0.0, v), a clamp with "
                "propagate_nan=tl.PropagateNan.ALL, or, where the result provably still matches "
                'torch, set the spec\'s extra["nan_dropping_ok"] = "<why>"'
            )
    return failures


# --------------------------------------------------------------------------------------------
# Compiling one spec
# --------------------------------------------------------------------------------------------


def interpret_requested(env: dict[str, str] | None = None) -> bool:
    """True when TRITON_INTERPRET holds anything but an explicit false."""
    value = (os.environ if env is None else env).get("TRITON_INTERPRET", "")
    return value.strip().lower() not in ("", "0", "false", "off", "no")


@contextlib.contextmanager
def _compile_environment(always_compile: bool):
    wanted = {_DUMP_LOG_ENV: "1"}
    if always_compile:
        wanted[_ALWAYS_COMPILE_ENV] = "1"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool bundled with (or configured for) triton, or None."""
    try:
        from triton import knobs

        tool = getattr(knobs.nvidia, name.replace("-", "_"))
        if tool is not None and getattr(tool, "path", None):
            return tool.path
    except Exception:  # older triton without knobs, or tool missing
        pass
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _spec_attrs(spec, fn) -> dict:
    """``spec.extra["attrs"]``: Triton's dict, or a list of argument names divisible by 16."""
    attrs = (getattr(spec, "extra", None) or {}).get("attrs")
    if not attrs:
        return {}
    if isinstance(attrs, dict):
        return attrs
    names = list(fn.arg_names)
    unknown = [n for n in attrs if n not in names]
    if unknown:
        raise ValueError(f'extra["attrs"] names unknown arguments {unknown} of {fn.__name__}')
    return {(names.index(n),): [["tt.divisibility", 16]] for n in attrs}


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_SASS_LOCAL = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)")
_SASS_MMA = re.compile(r"\b(HGMMA\.\S+|HMMA\.\S+|IMMA\.\S+)")
_SASS_GLOBAL_LOAD = re.compile(r"\b(LDGSTS(?:\.[A-Z0-9_]+)*|LDG(?:\.[A-Z0-9_]+)*)\b")
_LOCAL_WIDTH = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def parse_ptxas_log(log: str) -> dict[str, Any]:
    """Registers, spill bytes and notable remarks from a ``ptxas -v`` log (None if absent)."""
    spills = _PTXAS_SPILLS.findall(log)
    regs = _PTXAS_REGS.findall(log)
    notes = [
        line.split(" : ", 1)[-1].strip() if line.startswith("ptxas") else line.strip()
        for line in log.splitlines()
        if any(word in line.lower() for word in ("wgmma", "performance", "warning"))
    ]
    return {
        "spills": sum(int(s) + int(lo) for s, lo in spills) if spills else None,
        "regs": max(int(r) for r in regs) if regs else None,
        "notes": notes,
    }


# A float max/min without ``.NaN`` returns the other operand when one is NaN (PTX ISA:
# ``max{.ftz}{.NaN}{.xorsign.abs}.f32``, ``max{.ftz}{.NaN}.f16/.f16x2``, ``max{.NaN}.bf16/.bf16x2``;
# ``max.f64`` has no ``.NaN`` form). One instruction per statement; an optional guard predicate.
_PTX_MINMAX = re.compile(r"(?:^|[;{])[ \t]*(?:@!?%\w+[ \t]+)?((?:max|min)(?:\.\w+)+)[ \t]", re.MULTILINE)
_PTX_FLOAT_TYPES = frozenset({"f16", "f16x2", "bf16", "bf16x2", "f32", "f64"})
_PTX_FILE = re.compile(r'^[ \t]*\.file[ \t]+(\d+)[ \t]+"([^"]*)"', re.MULTILINE)
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)(?:.*?inlined_at\s+(\d+)\s+(\d+)\s+(\d+))?")
_TRITON_LIB = re.compile(r"[/\\]triton[/\\]language[/\\]")


def nan_dropping_instruction(spelling: str) -> bool:
    """Whether a PTX ``max``/``min`` spelling (``max.ftz.f32``, ``min.NaN.bf16x2``) drops NaN:
    a float type without the ``.NaN`` modifier. Integer ``max.s32``/``min.u64``... never do."""
    parts = spelling.split(".")
    return parts[0] in ("max", "min") and parts[-1] in _PTX_FLOAT_TYPES and "NaN" not in parts[1:]


def parse_ptx_nan_dropping(ptx: str, keep: int = _NAN_SITES_KEPT) -> dict[str, Any]:
    """Count the float max/min instructions of ``ptx`` that drop NaN.

    Returns ``{"count": n, "sites": [...]}``, sites being the first ``keep`` distinct
    (instruction, source line) pairs as ``"20x max.f32 at head1x1.py:123"``. The source line is
    the PTX's ``.loc`` before the instruction; a line inside ``triton/language`` (the combine
    function of ``tl.max``, say) is followed to its caller: through the ``inlined_at`` chain
    (triton 3.9) or the ``// standard.py:170:27 @[ k.py:21:23 ]`` comment (triton 3.6).
    """
    files = {int(i): name for i, name in _PTX_FILE.findall(ptx)}
    lib_names = {os.path.basename(name) for name in files.values() if _TRITON_LIB.search(name)}
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    where = ""
    counts: Counter = Counter()
    for line in ptx.splitlines():
        loc = _PTX_LOC.match(line)
        if loc:
            f, ln, _, pf, pln, _ = loc.groups()
            here = (int(f), int(ln))
            if pf is not None:
                parent[here] = (int(pf), int(pln))
            where = _source_line(here, files, parent, lib_names, line.partition("//")[2])
            continue
        for spelling in _PTX_MINMAX.findall(line):
            if nan_dropping_instruction(spelling):
                counts[spelling, where] += 1
    sites = [f"{n}x {spelling}" + (f" at {at}" if at else "") for (spelling, at), n in list(counts.items())[:keep]]
    return {"count": sum(counts.values()), "sites": sites}


_PTX_LOC_COMMENT = re.compile(r"([\w.-]+\.py):(\d+)")


def _source_line(here, files: dict[int, str], parent: dict, lib_names: set[str], comment: str) -> str:
    """``file.py:line`` of a ``.loc``, moved out of triton's own library to the caller."""
    seen = set()
    while _TRITON_LIB.search(files.get(here[0], "")) and here in parent and here not in seen:
        seen.add(here)
        here = parent[here]
    if here[0] not in files:
        return ""
    if _TRITON_LIB.search(files[here[0]]):
        # No inlined_at (triton 3.6): the comment spells the chain, innermost first.
        callers = [f"{name}:{ln}" for name, ln in _PTX_LOC_COMMENT.findall(comment) if name not in lib_names]
        if callers:
            return callers[0]
    return f"{os.path.basename(files[here[0]])}:{here[1]}"


def parse_cuobjdump(text: str) -> dict[str, Any]:
    """Registers, HGMMA, the first MMA instruction, STL/LDL bytes and the global loads by mnemonic
    (``LDG.E.U16``: one 2-byte element; ``LDGSTS.E.BYPASS.128``: a 16-byte cp.async) from
    cuobjdump output."""
    regs = [int(r) for r in re.findall(r"\bREG:(\d+)", text)]
    local = 0
    for _, suffix in _SASS_LOCAL.findall(text):
        width = 4
        for part in suffix.split("."):
            width = _LOCAL_WIDTH.get(part, width)
        local += width
    mma = _SASS_MMA.search(text)
    return {
        "regs": max(regs) if regs else None,
        "hgmma": "HGMMA" in text,
        "mma": mma.group(1) if mma else "",
        "local_bytes": local,
        "global_loads": dict(Counter(_SASS_GLOBAL_LOAD.findall(text))),
    }


def _cuobjdump(cubin: bytes, sass: bool) -> str:
    """``cuobjdump -res-usage`` (about 2 ms) and, with ``sass``, ``-sass`` (about 0.5 s)."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither bundled with triton nor on PATH)")
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        cmd = [tool, "-res-usage", *(["-sass"] if sass else []), path]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _short_error(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > limit:
        text = text[: limit // 2] + "\n  [...]\n" + text[-limit // 2 :]
    return text


def _measurement_path(kernel_hash: str) -> Path | None:
    try:
        from triton import knobs

        root = Path(knobs.cache.dir)
    except Exception:
        return None
    return root / "fastunet_kernel_report" / f"{kernel_hash}.json"


def _load_measurement(kernel_hash: str) -> dict[str, Any] | None:
    path = _measurement_path(kernel_hash)
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    # A record of an older format (before the NaN count, say) lacks fields: measure again.
    if not isinstance(data, dict) or data.get("format") != _MEASURE_FORMAT:
        return None
    return data if all(k in data for k in _MEASURE_KEYS) else None


def _store_measurement(kernel_hash: str, data: dict[str, Any]) -> None:
    path = _measurement_path(kernel_hash)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # atomic: parallel workers may race on the same kernel
    except OSError:
        pass


def _measure(compiled, ptxas_log: str) -> dict[str, Any]:
    """Registers, spills, HGMMA, NaN-dropping max/min and notes of a compiled kernel.

    The SASS is disassembled only when it can tell something: when the PTX has ``wgmma``
    (confirm HGMMA) or when there is no ptxas log (count spills). Without ``wgmma`` in the PTX
    there can be no HGMMA in the SASS, and on sm_80 and for 16-bit dots that fell back to
    ``mma.sync`` this skips about a quarter of the time per spec.
    """
    ptxas = parse_ptxas_log(ptxas_log)
    ptx = compiled.asm.get("ptx", "")
    nan = parse_ptx_nan_dropping(ptx)
    disassemble = "wgmma" in ptx or ptxas["spills"] is None
    text = _cuobjdump(compiled.asm["cubin"], sass=disassemble)
    sass = parse_cuobjdump(text)
    loop = sass_metrics.main_loop_metrics(text) if disassemble else sass_metrics.main_loop_metrics("")
    if not disassemble:
        sass["mma"] = "mma.sync (PTX)" if "mma.sync" in ptx else ""
    regs = sass["regs"] if sass["regs"] is not None else ptxas["regs"]
    if ptxas["spills"] is not None:
        spills, source = ptxas["spills"], "ptxas"
    else:  # triton cache hit: ptxas did not run; STL/LDL bytes give the same figure
        spills, source = sass["local_bytes"], "sass"
    return {
        "format": _MEASURE_FORMAT,
        "regs": -1 if regs is None else regs,
        "spills": spills,
        "spill_source": source,
        "hgmma": sass["hgmma"],
        "mma": sass["mma"],
        "notes": ptxas["notes"],
        "nan_dropping": nan["count"],
        "nan_dropping_sites": nan["sites"],
        "global_loads": sass["global_loads"] if disassemble else {},
        "loop_insts": loop["loop_insts"],
        "loop_hgmma": loop["loop_hgmma"],
        "insts_per_hgmma": loop["insts_per_hgmma"],
        "tma": loop["tma"],
    }


def compile_spec(spec, arch: int, module: str = "", *, use_cache: bool = True) -> Row:
    """Compile one ``KernelSpec`` for ``sm_<arch>`` in this process and measure it.

    The process must not run under TRITON_INTERPRET (``spec.fn`` must be a ``JITFunction``).
    Compile errors are recorded in ``Row.error``, not raised. With ``use_cache`` a kernel that
    triton already has in its cache is not recompiled, and its measurement is read back from
    ``<triton cache>/fastunet_kernel_report/<kernel hash>.json`` (the hash covers source,
    signature, constexprs, options, target and the triton/ptxas versions).
    """
    extra = getattr(spec, "extra", None) or {}
    expect = extra.get("expect_hgmma")
    nan_ok = extra.get("nan_dropping_ok")
    row = Row(
        kernel=spec.kernel,
        config=spec.config,
        dtype=spec.dtype,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        expect_hgmma=None if expect is None else bool(expect),
        module=module,
        nan_dropping_ok=nan_ok if isinstance(nan_ok, str) else None,
        smem_estimate=int(extra.get("smem_estimate", -1)),
    )
    t0 = time.perf_counter()
    try:
        if nan_ok is not None and not (isinstance(nan_ok, str) and nan_ok.strip()):
            raise ValueError(f'extra["nan_dropping_ok"] must be a non-empty reason string, got {nan_ok!r}')
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        fn = spec.fn
        while not isinstance(fn, JITFunction) and type(fn).__name__ in ("Autotuner", "Heuristics"):
            fn = fn.fn  # @triton.autotune / @triton.heuristics wrap the JITFunction
        if not isinstance(fn, JITFunction):
            raise TypeError(
                f"spec.fn is a {type(fn).__name__}, not a @triton.jit function (was the kernel "
                "module imported under TRITON_INTERPRET=1? compile in a process without it)"
            )
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), _spec_attrs(spec, fn))
        log = io.StringIO()
        with _compile_environment(not use_cache), contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        row.compile_s = time.perf_counter() - t0
        row.smem = int(compiled.metadata.shared)
        row.has_dot = "tt.dot" in compiled.asm.get("ttir", "tt.dot")
        measured = _load_measurement(compiled.hash) if use_cache else None
        row.cached = measured is not None
        if measured is None:
            measured = _measure(compiled, log.getvalue())
            _store_measurement(compiled.hash, measured)
    except Exception as exc:
        row.compile_s = time.perf_counter() - t0
        row.error = _short_error(exc)
        return row
    row.regs = int(measured["regs"])
    row.spills = int(measured["spills"])
    row.spill_source = measured["spill_source"]
    row.hgmma = bool(measured["hgmma"])
    row.mma = measured["mma"]
    row.notes = list(measured["notes"])
    row.nan_dropping = int(measured["nan_dropping"])
    row.nan_dropping_sites = list(measured["nan_dropping_sites"])
    row.global_loads = dict(measured["global_loads"])
    # The loop metric is in every format-6 measurement; read with defaults (the format number
    # already sends an older record to be measured again).
    row.loop_insts = int(measured.get("loop_insts", 0))
    row.loop_hgmma = int(measured.get("loop_hgmma", 0))
    row.insts_per_hgmma = float(measured.get("insts_per_hgmma", 0.0))
    row.tma = bool(measured.get("tma", False))
    if arch >= 90:
        row.ctas_regs, row.ctas_smem = sass_metrics.ctas_per_sm(row.regs, row.num_warps, row.smem)
    if row.nan_dropping_ok and row.nan_dropping:
        row.notes.append(f"{row.nan_dropping} NaN-dropping max/min exempted: {row.nan_dropping_ok}")
    elif row.nan_dropping_ok:
        row.notes.append('extra["nan_dropping_ok"] is set but the PTX has no NaN-dropping max/min')
    if row.regs < 0:
        row.error = "could not read the register count (no cuobjdump output, no ptxas log)"
    return row


# --------------------------------------------------------------------------------------------
# Spec providers (kernel modules) and the worker pool
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecRef:
    """Spec ``index`` of ``provider(arch)``, where provider is ``"module:function"``.

    Workers re-import the provider and rebuild the spec: a ``JITFunction`` does not pickle.
    """

    provider: str
    index: int
    kernel: str
    config: str
    dtype: str
    module: str = ""


def _import_common():
    return importlib.import_module(f"{PACKAGES[0]}._common")


def locate_module(name: str, packages: Sequence[str] = PACKAGES) -> str | None:
    """Dotted name of kernel module ``name`` in the first of ``packages`` that has it, or None."""
    for pkg in packages:
        try:
            found = importlib.util.find_spec(f"{pkg}.{name}")
        except Exception:  # the parent package is missing or broken: try the next one
            continue
        if found is not None:
            return f"{pkg}.{name}"
    return None


def _load_provider(ref: str) -> Callable[[int], list]:
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func or "compile_specs")


def discover(
    names: Sequence[str] = KERNEL_MODULES, packages: Sequence[str] = PACKAGES
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Find the kernel modules (``<package>.<name>``) that expose ``compile_specs``.

    Returns ``(providers, problems, notes)``: providers as ``(short name, "module:function")``,
    problems are failures (a module exists but does not import), notes are informational.
    """
    providers, problems, notes = [], [], []
    for name in names:
        dotted = locate_module(name, packages)
        if dotted is None:
            notes.append(f"{name}: no such module in {', '.join(packages)}")
            continue
        try:
            module = importlib.import_module(dotted)
        except Exception:
            problems.append(f"{dotted}: import failed:\n{_indent(traceback.format_exc())}")
            continue
        if callable(getattr(module, "compile_specs", None)):
            providers.append((name, f"{dotted}:compile_specs"))
        else:
            notes.append(f"{dotted}: no compile_specs() yet, not checked")
    return providers, problems, notes


def expand_provider(ref: str, arch: int, module: str = "") -> list[SpecRef]:
    """The specs of provider ``ref`` on ``arch``, as references a worker can rebuild."""
    specs = _load_provider(ref)(arch)
    return [SpecRef(ref, i, s.kernel, s.config, s.dtype, module or ref) for i, s in enumerate(specs)]


_WORKER_CACHE: dict[tuple[str, int], list] = {}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)


def _compile_ref(ref: SpecRef, arch: int, use_cache: bool = True) -> dict[str, Any]:
    key = (ref.provider, arch)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = list(_load_provider(ref.provider)(arch))
    spec = _WORKER_CACHE[key][ref.index]
    if (spec.kernel, spec.config, spec.dtype) != (ref.kernel, ref.config, ref.dtype):
        row = Row(ref.kernel, ref.config, ref.dtype, module=ref.module)
        row.error = f"{ref.provider}({arch}) returned a different list on a second call"
        return dataclasses.asdict(row)
    return dataclasses.asdict(compile_spec(spec, arch, ref.module, use_cache=use_cache))


def _crash_row(ref: SpecRef, why: str) -> Row:
    row = Row(ref.kernel, ref.config, ref.dtype, module=ref.module)
    row.error = why
    return row


def _pool(jobs: int) -> ProcessPoolExecutor:
    # spawn: a fresh interpreter per worker; forking after torch/triton/LLVM are loaded is
    # asking for trouble, and the workers must not inherit TRITON_INTERPRET-decorated kernels.
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)


def _compile_refs(refs: Sequence[SpecRef], arch: int, jobs: int, use_cache: bool = True) -> list[Row]:
    if not refs:
        return []
    if jobs <= 1:
        return [Row(**_compile_ref(ref, arch, use_cache)) for ref in refs]
    rows: dict[SpecRef, Row] = {}
    with _pool(min(jobs, len(refs))) as pool:
        futures = {pool.submit(_compile_ref, ref, arch, use_cache): ref for ref in refs}
        for fut, ref in futures.items():
            try:
                rows[ref] = Row(**fut.result())
            except BrokenProcessPool:
                break
    lost = [ref for ref in refs if ref not in rows]
    if lost:
        # A worker died (an LLVM/MLIR abort, a segfault, the OOM killer). Compile the rest one
        # process each, so the dying spec is named and the others still get measured.
        print(
            f"kernel_report: a compile worker died; compiling {len(lost)} remaining specs one process each",
            file=sys.stderr,
        )

        def isolated(ref: SpecRef) -> Row:
            try:
                with _pool(1) as single:
                    return Row(**single.submit(_compile_ref, ref, arch, use_cache).result())
            except BrokenProcessPool:
                return _crash_row(ref, "the compiler process died (abort/segfault/OOM)")

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as threads:
            for ref, row in zip(lost, threads.map(isolated, lost), strict=True):
                rows[ref] = row
    return [rows[ref] for ref in refs]


def collect_rows(arch: int, specs: Iterable[Any], *, jobs: int = 1, use_cache: bool = True) -> list[Row]:
    """Compile ``specs`` for ``sm_<arch>`` and return one ``Row`` each, sorted.

    Items are ``KernelSpec`` objects (compiled here, one after the other) or ``SpecRef`` (from
    ``expand_provider``; compiled by ``jobs`` spawned worker processes when ``jobs > 1``).
    Call it from a process without TRITON_INTERPRET. ``use_cache=False`` recompiles
    everything (``TRITON_ALWAYS_COMPILE``) and measures afresh.
    """
    if interpret_requested():
        raise RuntimeError("collect_rows: TRITON_INTERPRET is set; offline compiles need a process without it")
    specs = list(specs)
    refs = [s for s in specs if isinstance(s, SpecRef)]
    rows = [compile_spec(s, arch, use_cache=use_cache) for s in specs if not isinstance(s, SpecRef)]
    rows += _compile_refs(refs, arch, jobs, use_cache)
    return sorted(rows, key=Row.sort_key)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Row], arch: int) -> str:
    """The report's table: one line per spec. ``est``: the pruning's shared-memory estimate
    (``-``: none); ``cap``: registers left below the 255 per thread (``0!`` and the status
    ``AT-CAP`` within ``REG_CAP_MARGIN``, a warning, not a failure)."""
    limit = _smem_limit(arch)
    header = (
        "kernel", "config", "dtype", "regs", "cap", "spills", "smem", "est", "hgmma", "nan", "ins/hgmma", "tma",
        "ctas", "status",
    )  # fmt: skip
    lines = []
    for r in rows:
        if r.error is not None:
            lines.append((r.kernel, r.config, r.dtype, *("-" * 10), "COMPILE ERROR"))
            continue
        bad = []
        if r.spills > 0:
            bad.append("SPILL")
        if r.smem > limit:
            bad.append("SMEM")
        if r.smem_estimate >= 0 and r.smem > r.smem_estimate:
            bad.append("SMEM>EST")
        if hgmma_required(r, arch) and not r.hgmma:
            bad.append("NO-HGMMA")
        if nan_dropping_failed(r):
            bad.append("NAN-DROP")
        if at_register_cap(r):
            bad.append("AT-CAP")
        status = ",".join(bad) or "ok"
        nan = f"{r.nan_dropping}{'*' if r.nan_dropping_ok and r.nan_dropping else ''}"  # *: exempt
        cap = f"{REG_CAP - r.regs}{'!' if at_register_cap(r) else ''}"
        # The static main-loop metric (sass_metrics): instructions per HGMMA in the innermost
        # HGMMA loops, TMA loads, resident CTAs per SM by registers/shared memory (sm_90).
        per_mma = f"{r.insts_per_hgmma:.1f}" if r.loop_hgmma else "-"
        ctas = f"{r.ctas_regs}/{r.ctas_smem}" if r.ctas_regs else "-"
        est = str(r.smem_estimate) if r.smem_estimate >= 0 else "-"
        lines.append(
            (r.kernel, r.config, r.dtype, str(r.regs), cap, str(r.spills), str(r.smem), est,
             "yes" if r.hgmma else "no", nan, per_mma, "yes" if r.tma else "no", ctas, status)
        )  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 9, 10, 12}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def summary_line(rows: Sequence[Row], arch: int, n_failures: int, wall: float, jobs: int) -> str:
    import triton

    ok = [r for r in rows if r.error is None]
    fresh = [r.compile_s for r in rows if not r.cached]
    mean = sum(fresh) / len(fresh) if fresh else 0.0
    estimated = [r for r in ok if r.smem_estimate >= 0]
    return (
        f"kernel_report sm_{arch}: {len(rows)} specs, triton {triton.__version__}, "
        f"max regs {max((r.regs for r in ok), default=0)} ({sum(at_register_cap(r) for r in ok)} at the cap), "
        f"spills {sum(r.spills > 0 for r in ok)}, "
        f"max smem {max((r.smem for r in ok), default=0)} B (limit {_smem_limit(arch)}; "
        f"{sum(r.smem > _smem_limit(arch) for r in ok)} over), "
        f"smem estimate >= compiled in {sum(r.smem <= r.smem_estimate for r in estimated)}/{len(estimated)}, "
        f"HGMMA {sum(r.hgmma for r in ok)}/{len(rows)}, "
        f"NaN-dropping max/min {sum(r.nan_dropping for r in ok)} in "
        f"{sum(r.nan_dropping > 0 for r in ok)} specs ({sum(bool(r.nan_dropping and r.nan_dropping_ok) for r in ok)} "
        f"exempt), "
        f"failures {n_failures}; "
        f"wall {wall:.1f} s on {jobs} jobs, {len(fresh)} compiled at {mean:.2f} s/spec, "
        f"{len(rows) - len(fresh)} from cache"
    )


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kernel_report.py",
        description="Compile every kernel spec offline for sm_<arch> and check registers, "
        "spills, shared memory, HGMMA and NaN-dropping float max/min (ring 2). Exit 0: all good; 1: failures; "
        "3: nothing to check.",
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    p.add_argument(
        "--kernels",
        default="",
        help="comma list restricting the specs: a kernel module (conv3x3, upconv2x2, "
        "maxpool2x2, head1x1) or a kernel-name prefix (leading underscores ignored)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="check only N specs of each kernel and dtype, spread over its list (a quick run that "
        "still compiles every kernel; default: 0, every spec)",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    p.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    p.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="extra spec provider, FUNCTION(arch) -> list[KernelSpec]; repeatable",
    )
    p.add_argument("--no-modules", action="store_true", help="skip the kernel modules (only --provider)")
    p.add_argument(
        "--packages",
        default=",".join(PACKAGES),
        help="where to look for the kernel modules, first match wins (default: %(default)s)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompile every spec (TRITON_ALWAYS_COMPILE) instead of reusing triton's cache "
        "and the report's saved measurements",
    )
    return p.parse_args(argv)


def _selected(ref: SpecRef, wanted: Sequence[str]) -> bool:
    if not wanted:
        return True
    name = ref.kernel.lstrip("_")
    return any(ref.module == w or name.startswith(w.lstrip("_")) for w in wanted)


def sample_refs(refs: Sequence[SpecRef], n: int) -> list[SpecRef]:
    """``n`` specs of each (kernel, dtype), spread evenly over the providers' order (the first
    and, for ``n > 1``, the last included; ``--sample``).

    A quick run that still compiles every kernel in every dtype it is built for, and with ``n``
    above 1 the forms and tile sizes from one end of a kernel's list to the other (its configs
    come in the tuner's order, largest tile first); the tile configs' register and spill limits
    need the full set.
    """
    groups: dict[tuple[str, str, str], list[SpecRef]] = {}
    for ref in refs:
        groups.setdefault((ref.module, ref.kernel, ref.dtype), []).append(ref)
    keep = set()
    for group in groups.values():
        k = min(n, len(group))
        keep.update(group[(i * (len(group) - 1)) // (k - 1)] if k > 1 else group[0] for i in range(k))
    return [ref for ref in refs if ref in keep]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if interpret_requested():
        # Kernels decorated under the interpreter cannot be compiled: start again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("kernel_report: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        return subprocess.call([sys.executable, os.path.abspath(__file__), *argv], env=env)

    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
    wanted = [w.strip() for w in args.kernels.split(",") if w.strip()]
    problems: list[str] = []
    notes: list[str] = []
    providers: list[tuple[str, str]] = []
    if not args.no_modules:
        only_modules = wanted and all(w in KERNEL_MODULES for w in wanted)
        packages = [p.strip() for p in args.packages.split(",") if p.strip()]
        found, problems, notes = discover(wanted if only_modules else KERNEL_MODULES, packages)
        providers += found
    providers += [(ref, ref) for ref in args.provider]

    refs: list[SpecRef] = []
    for module, ref in providers:
        try:
            refs += [r for r in expand_provider(ref, args.arch, module) if _selected(r, wanted)]
        except Exception:
            problems.append(f"{ref}({args.arch}) raised:\n{_indent(traceback.format_exc())}")

    if args.sample > 0:
        refs = sample_refs(refs, args.sample)
    for w in wanted:
        if not any(_selected(r, [w]) for r in refs):
            notes.append(f"--kernels {w}: matches no spec")
    for note in notes:
        if not args.quiet:
            print(f"kernel_report: {note}", file=sys.stderr)
    if not refs and not problems:
        print(
            f"kernel_report: nothing to check on sm_{args.arch}: no kernel module exposes "
            "compile_specs() (or --kernels matched no spec)",
            file=sys.stderr,
        )
        return EXIT_EMPTY

    jobs = max(1, min(args.jobs, len(refs)))
    rows = collect_rows(args.arch, refs, jobs=jobs, use_cache=not args.no_cache)
    failures = problems + check_rows(rows, args.arch)
    wall = time.perf_counter() - t0

    if not args.quiet:
        print(format_table(rows, args.arch))
        for r in rows:
            for note in r.notes:
                print(f"note: {r.label}: {note}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows_to_json(rows), indent=1) + "\n")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(summary_line(rows, args.arch, len(failures), wall, jobs))
    sys.stdout.flush()
    return EXIT_FAIL if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
