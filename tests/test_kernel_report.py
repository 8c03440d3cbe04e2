"""Ring 2: the offline compile report (``benchmarks/kernel_report.py``).

The root conftest sets ``TRITON_INTERPRET=1`` on machines without a GPU, and under it
``@triton.jit`` gives interpreter functions that cannot be compiled. So every test that compiles
runs a child process with the variable removed. That child imports this module to get the
tiny GEMM defined below (its spec providers ``tiny_specs``/``bad_specs`` are ordinary
``compile_specs``-style functions). The tests that only check rows run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
BENCH = ROOT / "benchmarks"
REPORT = BENCH / "kernel_report.py"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

import kernel_report as kr  # noqa: E402
from helpers import RING2_FULL, ring2_lock  # noqa: E402

pytestmark = pytest.mark.compile

_common = kr._import_common()  # fastunet.kernels._common
KernelSpec, smem_limit = _common.KernelSpec, _common.smem_limit


# ----------------------------------------------------------------------------------------------
# A tiny kernel to compile: C = A @ B with K-contiguous A and N-contiguous B, fp32 accumulator.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tiny_gemm(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + rk
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def _tiny_spec(dtype, bm, bn, bk, warps, stages, precision="ieee", kernel="tiny_gemm") -> KernelSpec:
    signature = {
        "a_ptr": f"*{dtype}",
        "b_ptr": f"*{dtype}",
        "c_ptr": f"*{dtype}",
        **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_bk", "stride_cm")},
        **{n: "constexpr" for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION")},
    }
    return KernelSpec(
        kernel=kernel,
        fn=_tiny_gemm,
        signature=signature,
        constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": precision},
        num_warps=warps,
        num_stages=stages,
        dtype=dtype,
        config=f"M{bm}_N{bn}_K{bk}_w{warps}_s{stages}_{precision}",
        # what the JIT would see: 16-byte aligned pointers, K and row strides multiples of 16
        extra={"attrs": ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bk", "stride_cm"]},
    )


def tiny_specs(arch: int) -> list[KernelSpec]:
    """Provider of specs that compile cleanly on sm_80 and sm_90 (no spills, within smem)."""
    return [
        _tiny_spec("fp16", 64, 64, 32, 4, 3),
        _tiny_spec("bf16", 64, 64, 32, 4, 3),
        _tiny_spec("fp32", 64, 64, 32, 4, 3, "tf32"),
        _tiny_spec("fp32", 64, 64, 32, 4, 3, "ieee"),
        _tiny_spec("fp16", 64, 64, 32, 2, 3),  # 2 warps: no warpgroup
        _tiny_spec("fp16", 32, 64, 32, 4, 3),  # BLOCK_M 32 < 64
    ]


# ----------------------------------------------------------------------------------------------
# A tiny elementwise kernel for the NaN rule: a GPU's max.f32 (no .NaN) returns the other operand
# when one is NaN, where torch.relu / clamp / BatchNorm statistics give NaN.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tiny_nan(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if MODE == "maximum":
        y = tl.maximum(x, 0.0)  # NaN-dropping ReLU
    elif MODE == "where":
        y = tl.where(x < 0.0, 0.0, x)  # torch.relu: NaN and -0.0 pass through
    elif MODE == "propagate":
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif MODE == "row_max":
        y = x - tl.max(tl.where(mask, x, float("-inf")), axis=0)  # NaN-dropping reduction
    else:  # "int": integer max, never a NaN question
        y = tl.maximum(x.to(tl.int32), 3).to(x.dtype)
    tl.store(y_ptr + offs, y, mask=mask)


def _nan_spec(mode: str, dtype: str = "fp32", exempt: str | None = None) -> KernelSpec:
    return KernelSpec(
        kernel="tiny_nan",
        fn=_tiny_nan,
        signature={"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "n": "i32", "MODE": "constexpr", "BLOCK": "constexpr"},
        constexprs={"MODE": mode, "BLOCK": 1024},
        num_warps=4,
        num_stages=1,
        dtype=dtype,
        config=mode + ("_exempt" if exempt else ""),
        extra={"attrs": ["x_ptr", "y_ptr", "n"], **({"nan_dropping_ok": exempt} if exempt else {})},
    )


def nan_specs(arch: int) -> list[KernelSpec]:
    """Provider for the NaN rule: which forms of max the check flags, in each float dtype."""
    return [
        *(_nan_spec("maximum", dt) for dt in ("fp32", "fp16", "bf16")),
        *(_nan_spec("where", dt) for dt in ("fp32", "fp16", "bf16")),
        *(_nan_spec("propagate", dt) for dt in ("fp32", "fp16", "bf16")),
        _nan_spec("int"),
        _nan_spec("row_max"),
        _nan_spec("row_max", exempt="a NaN element makes x - max NaN whatever the max is"),
    ]


def bad_specs(arch: int) -> list[KernelSpec]:
    """Provider with one good spec and one of each failure the CLI must catch (on sm_90)."""
    return [
        _tiny_spec("fp16", 64, 64, 32, 4, 3),  # fine
        _tiny_spec("fp16", 64, 64, 8, 4, 3),  # tl.dot needs K >= 16: compile error
        _tiny_spec("fp16", 64, 256, 64, 4, 3),  # 128 accumulator regs/thread and more: spills
        _tiny_spec("fp16", 128, 128, 128, 8, 7),  # 7 stages of 128x128x128: 256 KiB smem
        _tiny_spec("fp16", 64, 64, 32, 2, 3, kernel="conv3x3_tiny"),  # conv3x3, 16-bit, no HGMMA
        _nan_spec("maximum"),  # a NaN-dropping ReLU
    ]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(TESTS), str(BENCH)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(args, timeout, env=None):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_child_env() if env is None else env,
        cwd=ROOT,
    )


def _compile_in_child(provider: str, arch: int) -> list[dict]:
    """``collect_rows(arch, provider(arch))`` in a child without TRITON_INTERPRET."""
    code = (
        "import dataclasses, json, kernel_report, test_kernel_report\n"
        f"rows = kernel_report.collect_rows({arch}, test_kernel_report.{provider}({arch}))\n"
        "print('ROWS=' + json.dumps([dataclasses.asdict(r) for r in rows]))\n"
    )
    proc = _run(["-c", code], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS=")][-1]
    return json.loads(line[len("ROWS=") :])


def _line_of(text: str) -> int:
    """Line number of the first line of this file that contains ``text``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def _row(**kw) -> kr.Row:
    base = dict(kernel="k", config="c", dtype="fp16", regs=128, spills=0, smem=1024, hgmma=True)
    base.update(kw)
    return kr.Row(**base)


def _validate_schema(payload) -> None:
    assert isinstance(payload, list)
    for obj in payload:
        assert list(obj) == list(kr.JSON_KEYS), obj
        assert all(isinstance(obj[k], str) for k in ("kernel", "config", "dtype"))
        assert all(type(obj[k]) is int for k in ("regs", "spills", "smem"))
        assert type(obj["hgmma"]) is bool
        assert type(obj["nan_dropping"]) is int and obj["nan_dropping"] >= 0
        assert 0 < obj["regs"] <= 255 and obj["spills"] >= 0 and obj["smem"] >= 0
    keys = [(o["kernel"], o["config"], o["dtype"]) for o in payload]
    assert keys == sorted(keys), "rows are not sorted"
    assert len(set(keys)) == len(keys), "duplicate rows"


# ----------------------------------------------------------------------------------------------
# check_rows / JSON / parsers: no compiler involved
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [80, 90])
def test_check_rows_accepts_clean_rows(arch):
    rows = [_row(kernel="_conv3x3_bn_act_kernel"), _row(kernel="head", dtype="fp32", hgmma=False)]
    assert kr.check_rows(rows, arch) == []


@pytest.mark.parametrize(
    "row, arch, expected",
    [
        (_row(spills=8), 80, "register spills"),
        (_row(smem=smem_limit(90) + 1), 90, "shared memory"),
        (_row(smem=smem_limit(80) + 1), 80, "shared memory"),
        (_row(error="CompilationError: boom"), 90, "compile failed"),
        (_row(kernel="_conv3x3_bn_act_kernel", hgmma=False), 90, "no HGMMA"),
        (_row(kernel="conv3x3_dual", dtype="bf16", hgmma=False), 90, "no HGMMA"),
        (_row(kernel="any", module="conv3x3", hgmma=False), 90, "no HGMMA"),
        (_row(kernel="upconv", hgmma=False, expect_hgmma=True), 90, "no HGMMA"),
        (_row(nan_dropping=2, nan_dropping_sites=["2x max.f32 at k.py:3"]), 90, "NaN-dropping"),
        (_row(nan_dropping=1), 80, "NaN-dropping"),
        (_row(nan_dropping=1, nan_dropping_ok=""), 90, "NaN-dropping"),  # an empty reason is none
        (_row(smem=4096, smem_estimate=4095), 90, "pruning's estimate"),
        (_row(kernel="_conv3x3_wgrad_kernel", config="M64_N32_K64_w4_s3_smallc_x2_norm", spills=40), 90, "spills"),
    ],
    ids=[
        "spill", "smem90", "smem80", "compile-error", "conv-no-hgmma", "conv-bf16", "conv-module", "forced",
        "nan-drop90", "nan-drop80", "nan-empty-reason", "smem-over-estimate", "no-known-spills",
    ],
)  # fmt: skip
def test_check_rows_flags(row, arch, expected):
    failures = kr.check_rows([_row(kernel="fine"), row], arch)
    assert len(failures) == 1 and expected in failures[0], failures
    assert row.kernel in failures[0]


@pytest.mark.parametrize(
    "row, arch",
    [
        (_row(kernel="conv3x3_x", hgmma=False), 80),  # HGMMA only exists on sm_90
        (_row(kernel="conv3x3_x", dtype="fp32", hgmma=False), 90),  # fp32 is not required
        (_row(kernel="conv3x3_epilogue", has_dot=False, hgmma=False), 90),  # no tl.dot at all
        (_row(kernel="upconv2x2", hgmma=False), 90),  # the rule is for conv3x3 only
        (_row(kernel="conv3x3_x", hgmma=False, expect_hgmma=False), 90),  # spec opted out
        (_row(smem=smem_limit(90)), 90),  # the limit itself is allowed
        (_row(nan_dropping=20, nan_dropping_ok="softmax row max: a NaN logit still gives a NaN row"), 90),
    ],
    ids=["sm80", "fp32", "no-dot", "not-conv", "opt-out", "at-limit", "nan-exempt"],
)
def test_check_rows_leaves_alone(row, arch):
    assert kr.check_rows([row], arch) == []


def test_check_rows_flags_duplicate_labels():
    failures = kr.check_rows([_row(), _row()], 90)
    assert len(failures) == 1 and "share this label" in failures[0]


def test_rows_to_json_schema():
    rows = [_row(kernel="b"), _row(kernel="a", config="z"), _row(kernel="a", config="y"), _row(kernel="c", error="x")]
    payload = kr.rows_to_json(rows)
    _validate_schema(payload)
    assert [(o["kernel"], o["config"]) for o in payload] == [("a", "y"), ("a", "z"), ("b", "c")]
    json.dumps(payload)


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    592 bytes stack frame, 588 bytes spill stores, 584 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 592 bytes cumulative stack size\n"
        "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
    )
    got = kr.parse_ptxas_log(log)
    assert got["spills"] == 588 + 584 and got["regs"] == 255
    assert got["notes"] == ["(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized"]
    assert kr.parse_ptxas_log("") == {"spills": None, "regs": None, "notes": []}


def test_parse_cuobjdump():
    text = (
        " Function k:\n  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:608\n"
        "        /*0100*/  STL.64 [R1], R2 ;\n        /*0110*/  STL [R1+0x8], R4 ;\n"
        "        /*0120*/  LDL.128 R8, [R1] ;\n        /*0130*/  LDL.LU R4, [R1+0x8] ;\n"
        "        /*0140*/  HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;\n"
    )
    got = kr.parse_cuobjdump(text)
    assert got == {
        "regs": 168, "hgmma": True, "mma": "HGMMA.64x64x16.F32", "local_bytes": 8 + 4 + 16 + 4, "global_loads": {},
    }  # fmt: skip
    assert kr.parse_cuobjdump("HMMA.16816.F32 R0")["hgmma"] is False


@pytest.mark.parametrize(
    "spelling, drops",
    [
        ("max.f32", True),
        ("max.ftz.f32", True),
        ("min.f32", True),
        ("max.xorsign.abs.f32", True),
        ("max.f16", True),
        ("max.f16x2", True),
        ("max.bf16", True),
        ("max.bf16x2", True),
        ("max.f64", True),  # PTX has no max.NaN.f64
        ("max.NaN.f32", False),
        ("min.ftz.NaN.f32", False),
        ("max.NaN.f16x2", False),
        ("max.NaN.bf16x2", False),
        ("max.s32", False),
        ("max.u32", False),
        ("min.s64", False),
        ("max.relu.s32", False),
        ("max.u16x2", False),
    ],
)
def test_nan_dropping_instruction(spelling, drops):
    assert kr.nan_dropping_instruction(spelling) is drops


def test_parse_ptx_nan_dropping():
    ptx = (
        ".maxnreg 128\n"
        ".visible .entry _maxpool_kernel(\n"
        "\t.loc\t1 12 5                          // k.py:12:5\n"
        "\tmax.f32 \t%r1, %r2, %r3;\n"
        "\tmax.NaN.f32 \t%r4, %r2, %r3;\n"
        "\tmax.s32 \t%r5, %r6, 0;\n"
        "\t@%p1 min.ftz.f32 \t%r7, %r8, %r9;\n"
        "\tmax.bf16x2 \t%r10, %r11, %r12;\n"
        "\tmax.NaN.bf16x2 \t%r13, %r11, %r12;\n"
        "\tredux.sync.max.s32 \t%r14, %r15, -1;\n"
        "\t.loc\t1 20 7                          // k.py:20:7\n"
        "\t.loc\t2 216 16, function_name $L__info_string0, inlined_at 1 20 7 // standard.py:216:16\n"
        "\t.loc\t2 196 12, function_name $L__info_string0, inlined_at 2 216 16 // standard.py:196:12\n"
        "\tmax.f32 \t%r16, %r17, %r18;\n"
        "\tmax.f32 \t%r19, %r16, %r20;\n"
        "\t{ .reg .f32 t; max.ftz.f32 t, %r1, %r2; mov.b32 %r21, t; }\n"
        '\t.file\t1 "/work/main/kernels/k.py"\n'
        '\t.file\t2 "/venv/lib/python3.11/site-packages/triton/language/standard.py"\n'
    )
    got = kr.parse_ptx_nan_dropping(ptx)
    assert got["count"] == 6, got
    # the reduction's max.f32 sit in triton's standard.py, inlined at k.py:20: blamed on k.py:20
    assert got["sites"] == [
        "1x max.f32 at k.py:12",
        "1x min.ftz.f32 at k.py:12",
        "1x max.bf16x2 at k.py:12",
        "2x max.f32 at k.py:20",
    ]
    assert kr.parse_ptx_nan_dropping(ptx, keep=1)["sites"] == ["1x max.f32 at k.py:12"]
    assert kr.parse_ptx_nan_dropping("\tmax.f32 %r1, %r2, %r3;\n") == {"count": 1, "sites": ["1x max.f32"]}
    clean = "\tmax.NaN.f32 %r1, %r2, %r3;\n\tmax.s32 %r4, %r5, %r6;\n\tmin.u64 %rd1, %rd2, %rd3;\n"
    assert kr.parse_ptx_nan_dropping(clean) == {"count": 0, "sites": []}
    # triton 3.6 writes no inlined_at; the caller chain is only in the comment
    ptx36 = (
        "\t.loc\t2 170 27                        // standard.py:170:27 @[ standard.py:191:40 @[ k.py:21:23 ] ]\n"
        "\tmax.f32 \t%r46, %r38, %r39;\n"
        '\t.file\t1 "/work/main/kernels/k.py"\n'
        '\t.file\t2 "/venv/lib/python3.11/site-packages/triton/language/standard.py"\n'
    )
    assert kr.parse_ptx_nan_dropping(ptx36) == {"count": 1, "sites": ["1x max.f32 at k.py:21"]}


def test_stale_measurements_are_measured_again(tmp_path, monkeypatch):
    """A cached measurement from before the NaN count (or any other format) must not be reused:
    it would read as 0 NaN-dropping instructions without anyone looking."""
    monkeypatch.setattr(kr, "_measurement_path", lambda h: tmp_path / f"{h}.json")
    full = {"format": kr._MEASURE_FORMAT, "regs": 40, "spills": 0, "spill_source": "ptxas", "hgmma": False}
    full.update(mma="", notes=[], nan_dropping=3, nan_dropping_sites=["3x max.f32 at k.py:1"], global_loads={})
    kr._store_measurement("new", full)
    assert kr._load_measurement("new") == full
    old = {k: v for k, v in full.items() if not k.startswith("nan_dropping")}
    (tmp_path / "old.json").write_text(json.dumps({**old, "format": 2}))
    assert kr._load_measurement("old") is None
    (tmp_path / "partial.json").write_text(json.dumps(old))  # right format, missing fields
    assert kr._load_measurement("partial") is None
    assert kr._load_measurement("missing") is None


def test_interpret_detection():
    assert kr.interpret_requested({"TRITON_INTERPRET": "1"})
    assert kr.interpret_requested({"TRITON_INTERPRET": "true"})
    assert not kr.interpret_requested({"TRITON_INTERPRET": "0"})
    assert not kr.interpret_requested({})


# ----------------------------------------------------------------------------------------------
# Real compiles of the tiny kernel, in a child process
# ----------------------------------------------------------------------------------------------


def test_collect_rows_tiny_kernel_sm90():
    rows = {(r["dtype"], r["config"]): r for r in _compile_in_child("tiny_specs", 90)}
    assert len(rows) == len(tiny_specs(90))
    for r in rows.values():
        assert r["error"] is None, r["error"]
        assert 0 < r["regs"] <= 255 and r["spills"] == 0 and 0 < r["smem"] <= smem_limit(90)
        assert r["has_dot"]
    # 16-bit dots with 4 warps and BLOCK_M >= 64 lower to Hopper's warpgroup MMA ...
    assert rows["fp16", "M64_N64_K32_w4_s3_ieee"]["hgmma"]
    assert rows["bf16", "M64_N64_K32_w4_s3_ieee"]["hgmma"]
    # ... and so does fp32 as TF32, while an IEEE fp32 dot runs on the FMA units.
    assert rows["fp32", "M64_N64_K32_w4_s3_tf32"]["hgmma"]
    assert not rows["fp32", "M64_N64_K32_w4_s3_ieee"]["hgmma"]
    assert rows["fp32", "M64_N64_K32_w4_s3_ieee"]["mma"] == ""  # FFMA: no MMA instruction
    # Less than a warpgroup (2 warps), or fewer than 64 rows: Ampere's mma.sync instead.
    for cfg in ("M64_N64_K32_w2_s3_ieee", "M32_N64_K32_w4_s3_ieee"):
        assert not rows["fp16", cfg]["hgmma"]
        # (from the SASS when it was disassembled, else from the PTX)
        assert rows["fp16", cfg]["mma"].startswith(("HMMA", "mma.sync")), rows["fp16", cfg]["mma"]
    rows_json = kr.rows_to_json([kr.Row(**r) for r in rows.values()])
    _validate_schema(rows_json)


@pytest.mark.slow  # sm_90 covers the same path in quick mode
def test_collect_rows_tiny_kernel_sm80():
    rows = _compile_in_child("tiny_specs", 80)
    assert len(rows) == len(tiny_specs(80))
    for r in rows:
        assert r["error"] is None, r["error"]
        assert not r["hgmma"]  # no wgmma before Hopper
        assert r["spills"] == 0 and 0 < r["smem"] <= smem_limit(80)
    assert kr.check_rows([kr.Row(**r) for r in rows], 80) == []


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_nan_rule_tiny_kernel(arch):
    rows = {(r["config"], r["dtype"]): r for r in _compile_in_child("nan_specs", arch)}
    assert len(rows) == len(nan_specs(arch))
    for r in rows.values():
        assert r["error"] is None, r["error"]
    relu_line = _line_of("y = tl.maximum(x, 0.0)  # NaN-dropping ReLU")
    # tl.maximum's default (PropagateNan.NONE) is llvm.maxnum: max.f32 / max.f16(x2) / max.bf16(x2)
    for dtype in ("fp32", "fp16", "bf16"):
        r = rows["maximum", dtype]
        assert r["nan_dropping"] > 0, r
        assert all(f"at test_kernel_report.py:{relu_line}" in site for site in r["nan_dropping_sites"]), r
    assert any(" max.f32 " in site for site in rows["maximum", "fp32"]["nan_dropping_sites"])
    assert any(".bf16" in site for site in rows["maximum", "bf16"]["nan_dropping_sites"])
    # the torch-exact forms: a select, or llvm.maximum (max.NaN.*); integer max is no concern
    for mode in ("where", "propagate"):
        for dtype in ("fp32", "fp16", "bf16"):
            assert rows[mode, dtype]["nan_dropping"] == 0, rows[mode, dtype]
    assert rows["int", "fp32"]["nan_dropping"] == 0
    # tl.max's combine function is tl.maximum too: blamed on the line that calls tl.max
    row_max_line = _line_of("NaN-dropping reduction")
    assert rows["row_max", "fp32"]["nan_dropping"] > 0
    assert f"at test_kernel_report.py:{row_max_line}" in rows["row_max", "fp32"]["nan_dropping_sites"][0]
    assert rows["row_max_exempt", "fp32"]["nan_dropping"] == rows["row_max", "fp32"]["nan_dropping"]
    assert rows["row_max_exempt", "fp32"]["nan_dropping_ok"]
    failures = kr.check_rows([kr.Row(**r) for r in rows.values()], arch)
    flagged = sorted(f.split("]")[0] + "]" for f in failures)
    expected = ["tiny_nan[maximum, bf16]", "tiny_nan[maximum, fp16]", "tiny_nan[maximum, fp32]"]
    assert flagged == sorted([*expected, "tiny_nan[row_max, fp32]"]), failures
    assert all("NaN-dropping" in f for f in failures)
    _validate_schema(kr.rows_to_json([kr.Row(**r) for r in rows.values()]))


def test_nan_exemption_needs_a_reason():
    code = (
        "import kernel_report, test_kernel_report as t\n"
        "spec = t._nan_spec('where')\n"
        "spec.extra['nan_dropping_ok'] = True\n"
        "(row,) = kernel_report.collect_rows(90, [spec])\n"
        "print('ERROR=' + str(row.error))\n"
    )
    proc = _run(["-c", code], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "non-empty reason string" in proc.stdout, proc.stdout


@pytest.mark.slow  # a kernel_report subprocess compiling deliberately broken specs (~5 s)
def test_cli_flags_each_failure(tmp_path):
    out = tmp_path / "bad.json"
    env = _child_env()
    env["TRITON_INTERPRET"] = "1"  # the CLI must start itself again without it
    args = [str(REPORT), "--arch", "90", "--no-modules", "--provider", "test_kernel_report:bad_specs"]
    proc = _run([*args, "--json", str(out), "--jobs", "2"], timeout=600, env=env)
    err = proc.stderr
    assert proc.returncode == kr.EXIT_FAIL, proc.stdout + err
    assert "re-running without it" in err
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL: ")]
    assert any("M64_N64_K8_w4_s3_ieee" in f and "compile failed" in f for f in fails), err
    assert any("M64_N256_K64_w4_s3_ieee" in f and "register spills" in f for f in fails), err
    assert any("M128_N128_K128_w8_s7_ieee" in f and "shared memory" in f for f in fails), err
    assert any(f.startswith("FAIL: conv3x3_tiny[") and "no HGMMA" in f for f in fails), err
    assert any(f.startswith("FAIL: tiny_nan[maximum, fp32]") and "NaN-dropping" in f for f in fails), err
    assert len(fails) == 5, fails
    assert "kernel_report sm_90: 6 specs" in proc.stdout and "failures 5" in proc.stdout
    assert "NAN-DROP" in proc.stdout  # the table's status column
    payload = json.loads(out.read_text())
    _validate_schema(payload)
    assert len(payload) == 5  # the spec that does not compile has no row
    assert [o["nan_dropping"] > 0 for o in payload if o["kernel"] == "tiny_nan"] == [True]


@pytest.mark.slow  # two kernel_report subprocesses (~6 s)
def test_cli_table_and_kernel_filter(tmp_path):
    args = [str(REPORT), "--arch", "80", "--no-modules", "--provider", "test_kernel_report:tiny_specs"]
    proc = _run([*args, "--kernels", "tiny_gemm", "--jobs", "1"], timeout=600)
    assert proc.returncode == kr.EXIT_OK, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:10] == ["kernel", "config", "dtype", "regs", "cap", "spills", "smem", "est", "hgmma", "nan"]
    assert sum(ln.startswith("tiny_gemm ") for ln in lines) == len(tiny_specs(80))
    proc = _run([*args, "--kernels", "nothing_matches"], timeout=600)
    assert proc.returncode == kr.EXIT_EMPTY, proc.stdout + proc.stderr


def test_cli_reports_a_module_that_does_not_import(tmp_path):
    pkg = tmp_path / "fakekernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "conv3x3.py").write_text("raise RuntimeError('half-written kernel module')\n")
    (pkg / "upconv2x2.py").write_text("X = 1  # no compile_specs yet\n")
    (pkg / "head1x1.py").write_text(
        "import test_kernel_report\n\ndef compile_specs(arch):\n    return test_kernel_report.tiny_specs(arch)[:1]\n"
    )
    env = _child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = _run([str(REPORT), "--arch", "80", "--packages", "fakekernels", "--jobs", "1"], timeout=600, env=env)
    assert proc.returncode == kr.EXIT_FAIL, proc.stdout + proc.stderr
    assert "FAIL: fakekernels.conv3x3: import failed" in proc.stderr
    assert "half-written kernel module" in proc.stderr
    assert "fakekernels.upconv2x2: no compile_specs() yet" in proc.stderr
    assert "maxpool2x2: no such module" in proc.stderr
    assert "kernel_report sm_80: 1 specs" in proc.stdout  # head1x1 still got checked


# ----------------------------------------------------------------------------------------------
# The real kernel modules
# ----------------------------------------------------------------------------------------------


# Every spec: about 25 CPU-minutes for sm_90 and 15 for sm_80 per triton from a cold cache
# (seconds when warm): more than CI's budget, so the full report is opt-in here
# (FASTUNET_RING2_FULL=1) and .ci/run compiles a spread sample on the newest triton and on 3.6.
_FULL_REPORT = pytest.mark.skipif(
    not RING2_FULL,
    reason="the full ring-2 report: FASTUNET_RING2_FULL=1, or benchmarks/kernel_report.py --arch N",
)
# The default run's real-kernel CLI run: every kernel module discovered, imported and expanded
# (a kernel-name prefix, not a module name, makes the report discover them all), one spec per
# kernel and dtype compiled of the nearest up-conv's three kernels: the specs its own ring-2 test
# compiles too (helpers.ring2_lock: compiled once). The first spec of every other kernel and dtype
# is compiled by CI's ring-2 step (.ci/run: `--sample 2` on sm_90, `--sample 1` on sm_80, both
# tritons; the first spec is in every sample) and by the full runs above.
_NEAREST = "_upconv_nearest2x2_"


@pytest.mark.parametrize(
    "arch, sample, kernels",
    [
        pytest.param(90, 0, "", marks=[pytest.mark.slow, _FULL_REPORT]),
        pytest.param(80, 0, "", marks=[pytest.mark.slow, _FULL_REPORT]),
        (90, 1, _NEAREST),
    ],
)
def test_cli_real_kernels(arch, sample, kernels, tmp_path):
    out = tmp_path / f"sm{arch}.json"
    args = [str(REPORT), "--arch", str(arch), "--json", str(out), "--quiet", "--sample", str(sample)]
    args += ["--kernels", kernels] if kernels else []
    with ring2_lock():
        proc = _run(args, timeout=1800)
    if proc.returncode == kr.EXIT_EMPTY:
        pytest.skip("no kernel module exposes compile_specs() yet: " + proc.stderr.strip()[-300:])
    # A module that does not import or whose compile_specs() raises is a failure too, filter or not.
    assert proc.returncode == kr.EXIT_OK, f"ring 2 failures on sm_{arch}:\n{proc.stderr[-6000:]}\n{proc.stdout[-1000:]}"
    payload = json.loads(out.read_text())
    _validate_schema(payload)
    assert payload, "no rows"
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"kernel_report sm_{arch}: {len(payload)} specs"), summary
    names = {r["kernel"] for r in payload}
    if kernels:
        assert all(n.startswith(kernels) for n in names), names
    else:
        assert {"_conv3x3_bn_act_kernel", "_conv3x3_wgrad_kernel", "_upconv2x2_kernel"} <= names
    if sample:
        kernel_dtypes = {(r["kernel"], r["dtype"]) for r in payload}
        assert len(payload) == len(kernel_dtypes), "one spec per kernel and dtype"
        assert {d for _, d in kernel_dtypes} == {"fp32", "fp16", "bf16"} and len(names) == 3, kernel_dtypes


def test_sample_spreads_over_each_kernel_and_dtype():
    refs = [
        kr.SpecRef("p:f", i, kernel, f"c{i}", dtype, "m")
        for i, (kernel, dtype) in enumerate(
            [("a", "bf16"), ("a", "bf16"), ("a", "fp32"), ("b", "bf16"), ("a", "bf16"), ("b", "bf16"), ("a", "bf16")]
        )
    ]
    assert [r.index for r in kr.sample_refs(refs, 1)] == [0, 2, 3]
    assert [r.index for r in kr.sample_refs(refs, 2)] == [0, 2, 3, 5, 6]  # a/bf16: first and last
    assert [r.index for r in kr.sample_refs(refs, 3)] == [0, 1, 2, 3, 5, 6]
    assert kr.sample_refs(refs, 9) == refs


def test_estimate_and_register_cap_are_reported():
    """A spec at its shared-memory estimate passes; one within REG_CAP_MARGIN registers of the cap
    passes with AT-CAP in the table and a count in the summary (a warning, not a failure)."""
    exact = _row(smem=4096, smem_estimate=4096)
    capped = _row(config="capped", regs=kr.REG_CAP - 1)
    assert kr.check_rows([exact, capped], 90) == []
    table = kr.format_table([exact, capped], 90)
    assert "AT-CAP" in table.splitlines()[3] and "AT-CAP" not in table.splitlines()[2]
    summary = kr.summary_line([exact, capped], 90, 0, 1.0, 1)
    assert "(1 at the cap)" in summary and "smem estimate >= compiled in 1/1" in summary


def test_global_loads_are_counted_by_width():
    sass = """
        /*0100*/   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0110*/   LDG.E.U16 R5, desc[UR4][R2.64+0x2] ;
        /*0120*/   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;
        /*0130*/   LDG.E.64 R10, desc[UR4][R12.64] ;
        /*0140*/   LDGDEPBAR ;
        /*0150*/   STG.E.U16 desc[UR4][R2.64], R4 ;
    """
    loads = kr.parse_cuobjdump(sass)["global_loads"]
    assert loads == {"LDG.E.U16": 2, "LDGSTS.E.BYPASS.128": 1, "LDG.E.64": 1}  # LDGDEPBAR is a barrier


def test_report_covers_every_kernel_module():
    """The report keeps its own module list (it can run against a checkout's ``kernels``); a kernel
    module missing from it would never be compiled offline, in CI or anywhere else."""
    from fastunet import kernels

    assert set(kr.KERNEL_MODULES) == set(kernels.KERNEL_MODULES)
