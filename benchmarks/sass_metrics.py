"""A static performance metric read off sm_90 SASS: how much a GEMM main loop issues per HGMMA.

Why. On Hopper a warpgroup MMA (``HGMMA``) runs asynchronously for many cycles, but every other
instruction of the loop (address and mask arithmetic, ``LDGSTS`` copies, barriers, the
pipeline's bookkeeping) is issued by the same warps. When those outnumber what the tensor core
needs to stay busy, the loop is issue-bound however good its tiles are. The count is exact and
needs no GPU, so it can be compared before and after a change (issue 14).

What is counted (``main_loop_metrics``):

* the SASS of ``cuobjdump -sass``, one instruction per ``/*addr*/`` line;
* a *loop* is the address range of a backward branch ``[target, branch]`` (``@P BRA 0x4120``
  at 0x5220: the body is 0x4120..0x5220, both ends included), unless that range crosses
  another loop's and its branch is unconditional (an out-of-line slow path, e.g. an mbarrier
  wait's retry placed after the kernel's end, jumps back into the middle of the loop it came
  from);
* the *main loops* are the innermost loops that contain ``HGMMA`` (a loop none of whose nested
  loops contains one); a conv with two K sources has two;
* instructions: every instruction in a main loop except ``NOP`` (alignment padding, never
  issued in the steady state); ``insts_per_hgmma`` = their sum over the main loops / the
  HGMMA instructions in them. Per warp and per K step: every warp of a warpgroup issues the
  same stream, so the ratio is also what one warp issues per warpgroup MMA.

Also here: ``ctas_per_sm`` (occupancy bound by registers and by shared memory on sm_90) and
``uses_tma`` (``UTMALDG``, the bulk tensor copy, in the SASS).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ctas_per_sm", "main_loop_metrics", "parse_sass", "METRIC_KEYS"]

# The fields these metrics add to a report row (and to its JSON).
METRIC_KEYS = ("loop_insts", "loop_hgmma", "insts_per_hgmma", "tma", "ctas_regs", "ctas_smem")

_INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z0-9]+)*\s+(?:`?\(?)0x([0-9a-f]+)")

# sm_90 (H100/H200) per-SM limits: 64 K 32-bit registers, allocated per warp in units of 256;
# 228 KiB of shared memory of which a block may use 227 KiB, 1 KiB reserved per block;
# 32 resident blocks and 64 warps.
_SM90_REGS, _SM90_REG_UNIT, _SM90_SMEM, _SM90_SMEM_RESERVED = 65_536, 256, 233_472, 1_024
_SM90_MAX_CTAS, _SM90_MAX_WARPS = 32, 64


def parse_sass(text: str) -> list[tuple[int, str]]:
    """``(address, instruction text)`` per SASS instruction of ``cuobjdump -sass`` output."""
    return [(int(addr, 16), body) for addr, body in _INST.findall(text)]


def _opcode(body: str) -> str:
    """The mnemonic of an instruction, its guard predicate (``@!P1``) dropped."""
    parts = body.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def main_loop_metrics(sass: str) -> dict[str, Any]:
    """Instructions per HGMMA in the innermost HGMMA loops of ``sass`` (see the module docstring).

    Returns ``{"loop_insts", "loop_hgmma", "insts_per_hgmma", "loops", "tma"}``: totals over the
    main loops (0 and ``insts_per_hgmma`` 0.0 when there is none), ``loops`` the per-loop
    ``(instructions, hgmma)`` pairs in address order, ``tma`` whether ``UTMALDG`` appears anywhere.
    """
    insts = parse_sass(sass)
    loops = []
    for addr, body in insts:
        m = _BRANCH.search(body)
        if m and _opcode(body).startswith("BRA"):
            target = int(m.group(1), 16)
            if target <= addr:
                loops.append((target, addr, body.startswith("@")))

    def stats(lo: int, hi: int) -> tuple[int, int]:
        ops = [_opcode(b) for a, b in insts if lo <= a <= hi]
        return sum(op != "NOP" for op in ops), sum(op.startswith("HGMMA") for op in ops)

    # A slow path placed after the kernel's end (an mbarrier wait's retry) jumps back into the
    # middle of a loop: its range crosses that loop instead of nesting in it. Not a loop.
    # Its back edge is unconditional; a loop's is conditional (@P BRA).
    loops = [
        (lo, hi)
        for lo, hi, conditional in loops
        if conditional or not any(a < lo <= b < hi or lo < a <= hi < b for a, b, _ in loops)
    ]
    with_mma = [(lo, hi) for lo, hi in loops if stats(lo, hi)[1] > 0]
    innermost = [
        (lo, hi) for lo, hi in with_mma if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in with_mma)
    ]
    per_loop = [stats(lo, hi) for lo, hi in sorted(set(innermost))]
    n_insts = sum(i for i, _ in per_loop)
    n_mma = sum(m for _, m in per_loop)
    return {
        "loop_insts": n_insts,
        "loop_hgmma": n_mma,
        "insts_per_hgmma": round(n_insts / n_mma, 2) if n_mma else 0.0,
        "loops": per_loop,
        "tma": any(_opcode(b).startswith("UTMALDG") for _, b in insts),
    }


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> tuple[int, int]:
    """Resident CTAs per sm_90 SM allowed by registers and by shared memory, separately.

    regs per thread (as ``cuobjdump -res-usage`` reports), warps per CTA, shared bytes per CTA.
    """
    if regs <= 0 or num_warps <= 0:
        return 0, 0
    per_warp = -(-regs * 32 // _SM90_REG_UNIT) * _SM90_REG_UNIT
    by_regs = min(_SM90_REGS // (per_warp * num_warps), _SM90_MAX_WARPS // num_warps, _SM90_MAX_CTAS)
    by_smem = _SM90_SMEM // (max(smem, 0) + _SM90_SMEM_RESERVED)
    return by_regs, min(by_smem, _SM90_MAX_CTAS)


# --------------------------------------------------------------------------------------------
# Before/after table of the conv main loop (docs/kernels.md, issue 14)
# --------------------------------------------------------------------------------------------

_FORMS = {
    "x": "one source",
    "x2": "fused concat",
    "x2_norm2_stats": "training, decoder",
    "x_norm1_stats": "training, encoder",
}


def _tile_form(config: str) -> tuple[str, str] | None:
    """``("M128_N64_K64_w4_s4", "x2")`` from a pointer (``..._main_x2_blockc``) or TMA
    (``..._tma_x2``) conv spec name; None for the other variants (small C, split, head)."""
    for sep in ("_main_", "_tma_"):
        if sep in config:
            tile, form = config.split(sep, 1)
            form = form.replace("_blockc", "")
            return (tile, form) if form in _FORMS else None
    return None


def compare_table(before: list[dict], after: list[dict], dtype: str = "fp16") -> str:
    """Markdown: per form, each pointer tile (``before``: the report's JSON rows of
    ``_conv3x3_bn_act_kernel``) beside the TMA tile of the same BLOCK_M x BLOCK_N (``after``:
    rows of ``_conv3x3_tma_kernel``): instructions per HGMMA, registers, CTAs/SM by registers
    and by shared memory, UTMALDG, and the after/before ratio."""

    def index(rows):
        out = {}
        for r in rows:
            tf = _tile_form(r["config"]) if r["dtype"] == dtype else None
            if tf:
                out[tf] = r
        return out

    def mn(tile):
        m, n = tile.split("_")[:2]
        return m, n

    b, a = index(before), index(after)
    lines = [
        "| form | pointer tile | ins/HGMMA | regs | CTAs/SM (regs/smem) | TMA tile | ins/HGMMA | regs "
        "| CTAs/SM (regs/smem) | UTMALDG | after/before |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for form in _FORMS:
        tiles = sorted({t for t, f in b if f == form}, key=lambda t: (-int(t[1:4].rstrip("_")), t))
        tma_tiles = [t for t, f in a if f == form]
        used = set()
        for tile in tiles:
            match = next((t for t in tma_tiles if mn(t) == mn(tile)), None)
            rb, ra = b[(tile, form)], a.get((match, form)) if match else None
            used.add(match)
            cells = [_FORMS[form], tile, f"{rb['insts_per_hgmma']:.1f}", str(rb["regs"]),
                     f"{rb['ctas_regs']}/{rb['ctas_smem']}"]  # fmt: skip
            if ra:
                ratio = ra["insts_per_hgmma"] / rb["insts_per_hgmma"] if rb["insts_per_hgmma"] else 0.0
                ctas = f"{ra['ctas_regs']}/{ra['ctas_smem']}"
                cells += [match, f"{ra['insts_per_hgmma']:.1f}", str(ra["regs"]), ctas]
                cells += ["yes" if ra["tma"] else "no", f"{ratio:.2f}x"]
            else:
                cells += ["-", "-", "-", "-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        for t in tma_tiles:
            if t not in used:
                ra = a[(t, form)]
                cells = [_FORMS[form], "-", "-", "-", "-", t, f"{ra['insts_per_hgmma']:.1f}", str(ra["regs"]),
                         f"{ra['ctas_regs']}/{ra['ctas_smem']}", "yes" if ra["tma"] else "no", "-"]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/sass_metrics.py RESULTS.json  (benchmarks/results/conv_main_loop_sm90.json)")
    data = json.loads(open(sys.argv[1]).read())
    print(compare_table(data["before"], data["after"]))
