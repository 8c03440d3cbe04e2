"""Spec for ``kernels/conv3x3_tma.py``: the TMA-fed conv main loop (a tuned candidate of conv3x3).

Triton's interpreter emulates host tensor descriptors (out-of-bounds zero fill on loads,
clipping on stores; triton 3.9 here), so ring 1 runs the kernel itself on the CPU: every variant
(one source, the fused concat, the training forms, the persistent walk) x dtype against a
float64 reference, into NaN-poisoned outputs, with odd H/W/C and channel-slice operands. On a
GPU (ring 3: the kernel tests carry the ``gpu_check`` mark) the same tests run every sm_90 TMA
config instead of the interpreter's small tile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastunet.kernels import _common, _tuning
from fastunet.kernels import conv3x3 as K
from fastunet.kernels import conv3x3_tma as T
from fastunet.kernels._common import dot_precision, interpreting
from fastunet.kernels.bn_stats import bn_stats_finalize
from helpers import assert_close, tolerance_name

pytestmark = pytest.mark.conv3x3

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
DEVICE = "cuda" if ON_HOPPER else "cpu"
# sm_90, the interpreter, or the simulated sm_90 benchmarks/gpu_plan.py records ring 3's launches on.
RUNS = T.tma_available(torch.device(DEVICE))
_SKIP_NO_TMA = pytest.mark.skipif(not RUNS, reason="the TMA variant needs sm_90 or Triton's interpreter")


def needs_tma(test):
    """The tests that run the kernel: skipped where TMA cannot run, and part of ring 3
    (``gpu_check``: they use the module's DEVICE, not the ``device`` fixture conftest marks by)."""
    return pytest.mark.gpu_check(_SKIP_NO_TMA(test))


BF16_SKIP = pytest.mark.skipif(
    interpreting(), reason="Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP),
]
# The heavier interpreter tests run fp16 in quick mode and fp32 with the slow tests.
DTYPES_SLOW32 = [pytest.param(torch.float32, id="fp32", marks=pytest.mark.slow), *DTYPES[1:]]
# The interpreter runs one small tile; a GPU runs every config the tuner may pick.
CONFIGS = [T.INTERPRETER_CONFIG] if interpreting() else list(T.TMA_CONFIGS_SM90)


# ------------------------------------------------------------------------------------ helpers


def nhwc(n, c, h, w, dtype, *, pad=0, offset=0):
    """x [N, C, H, W] channels last; with ``pad``/``offset`` the channel slice
    [offset, offset + C) of a (C + pad)-channel NHWC buffer (its pixel pitch is not C)."""
    big = torch.randn(n, c + pad, h, w).to(dtype).to(DEVICE, memory_format=torch.channels_last)
    return big[:, offset : offset + c]


def poisoned_nhwc(n, c, h, w, dtype, *, pad=0, offset=0):
    """A NaN-filled NHWC output (or a channel slice of a wider NaN buffer) and that buffer."""
    big = torch.full((n, c + pad, h, w), float("nan"), dtype=dtype, device=DEVICE)
    big = big.to(memory_format=torch.channels_last)
    return big[:, offset : offset + c], big


def operands(c_in, c_out, dtype):
    weight = (torch.randn(c_out, c_in, 3, 3) / (9 * c_in) ** 0.5).to(dtype).to(DEVICE)
    scale = (torch.rand(c_out) + 0.5).to(DEVICE)
    shift = (0.5 * torch.randn(c_out)).to(DEVICE)
    return K.pack_conv3x3_weight(weight), scale, shift


def norm_params(c):
    return ((torch.rand(c, dtype=torch.float64) + 0.5).to(DEVICE), torch.randn(c, dtype=torch.float64).to(DEVICE))


def transform(t, norm):
    """The previous layer's BatchNorm + ReLU as the kernel applies it on the load (float64)."""
    t = t.cpu().double()
    if norm is None:
        return t
    s, b = (v.cpu().double() for v in norm)
    return torch.relu(t * s[:, None, None] + b[:, None, None])


def reference(x, x2, weight, scale, shift, *, relu=True, norms=(None, None)):
    """act(scale * conv2d(cat([T1(x), T2(x2)]), weight) + shift) in float64 on the CPU."""
    parts = [transform(x, norms[0])] + ([transform(x2, norms[1])] if x2 is not None else [])
    y = F.conv2d(torch.cat(parts, 1), weight.cpu().double(), padding=1)
    y = y * scale.cpu().double()[:, None, None] + shift.cpu().double()[:, None, None]
    return y.clamp_min(0) if relu else y


def launch(cfg, x, x2, weight, scale, shift, out, *, relu=True, norms=(None, None), partials=None, programs=None):
    assert T.tma_supported(x, x2, weight, out), "the test's operands must be TMA-able"
    T.conv3x3_tma_launch(
        cfg, x, x2, weight, scale, shift, out, relu=relu, dot_precision=dot_precision(x.dtype),
        norms=norms, partials=partials, programs=programs,
    )  # fmt: skip


# -------------------------------------------------------------------------------- inference


def aligned(n, c, h, w, dtype, *, sliced):
    """x [N, C, H, W] in a buffer whose pixel pitch is C rounded up to 8 channels (16-byte
    aligned in 16 and 32 bits); ``sliced``: 8 channels into a buffer 8 channels wider still."""
    pitch = -(-c // 8) * 8
    return nhwc(n, c, h, w, dtype, pad=pitch - c + (16 if sliced else 0), offset=8 if sliced else 0)


# (N, C1, C2, C_out, H, W, inputs as channel slices): odd H/W (partial patches at the right and
# bottom edges), odd channel counts (zero-filled channel blocks past C), slices of wider
# buffers, C_out not a multiple of BLOCK_N, and the fused concat.
INFERENCE_CASES = [
    pytest.param(2, 16, 0, 24, 5, 7, False, id="x-odd-hw"),
    pytest.param(1, 17, 0, 16, 6, 9, True, id="x-odd-c-slice"),
    pytest.param(2, 16, 19, 24, 7, 5, True, id="x2-odd-c2-slice"),
]


@needs_tma
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c1,c2,c_out,h,w,sliced", INFERENCE_CASES)
def test_inference_matches_float64(cfg, dtype, n, c1, c2, c_out, h, w, sliced):
    x = aligned(n, c1, h, w, dtype, sliced=sliced)
    x2 = aligned(n, c2, h, w, dtype, sliced=sliced) if c2 else None
    weight, scale, shift = operands(c1 + c2, c_out, dtype)
    out, _ = poisoned_nhwc(n, c_out, h, w, dtype)
    launch(cfg, x, x2, weight, scale, shift, out)
    assert_close(out, reference(x, x2, weight, scale, shift), tolerance_name(dtype), "tma conv")


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_output_channel_slice_leaves_the_rest(dtype):
    """A C_out = 16 slice of a 48-channel output buffer: the bulk store writes exactly the slice
    (the NaNs around it survive), without ReLU."""
    n, c_in, h, w = 1, 16, 5, 6
    x = nhwc(n, c_in, h, w, dtype)
    weight, scale, shift = operands(c_in, 16, dtype)
    out, big = poisoned_nhwc(n, 16, h, w, dtype, pad=32, offset=16)
    launch(CONFIGS[0], x, None, weight, scale, shift, out, relu=False)
    assert_close(out, reference(x, None, weight, scale, shift, relu=False), tolerance_name(dtype), "slice")
    assert torch.isnan(big[:, :16]).all() and torch.isnan(big[:, 32:]).all()


@needs_tma
@pytest.mark.parametrize("programs", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_persistent_walk_covers_every_tile(programs):
    """Fewer programs than tiles: each walks tiles p, p + programs, ... (the persistent launch)."""
    dtype = torch.float16
    n, c1, c2, c_out, h, w = 2, 16, 16, 32, 6, 11
    x, x2 = nhwc(n, c1, h, w, dtype), nhwc(n, c2, h, w, dtype)
    weight, scale, shift = operands(c1 + c2, c_out, dtype)
    out, _ = poisoned_nhwc(n, c_out, h, w, dtype)
    cfg = CONFIGS[0]._replace(persistent=True)
    launch(cfg, x, x2, weight, scale, shift, out, programs=programs)
    assert_close(out, reference(x, x2, weight, scale, shift), tolerance_name(dtype), "persistent")


# --------------------------------------------------------------------------------- training


# (C1, C2, norm on source 1, norm on source 2): the encoder form (x raw, its BN+ReLU on the
# load), the decoder form (x finished, the raw skip x2 normalized) and plain statistics.
TRAINING_CASES = [
    pytest.param(17, 0, True, False, id="encoder-norm1"),
    pytest.param(16, 19, False, True, id="decoder-norm2"),
    pytest.param(16, 0, False, False, id="stats-only"),
]


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES_SLOW32)
@pytest.mark.parametrize("c1,c2,norm1,norm2", TRAINING_CASES)
def test_training_forms_match_float64(dtype, c1, c2, norm1, norm2):
    """z = conv(cat(T1(x), T2(x2))) + bias and its batch mean/var; padding after the transform
    (relu(shift) is not 0, so a padded tap read as T(0) would be wrong)."""
    cfg = CONFIGS[0]
    n, c_out, w = 2, 24, 16
    h = 2 * max(1, cfg.BLOCK_M // w)  # whole-row patches: the statistics' flat tiles
    x = aligned(n, c1, h, w, dtype, sliced=False)
    x2 = aligned(n, c2, h, w, dtype, sliced=True) if c2 else None
    weight, _, bias = operands(c1 + c2, c_out, dtype)
    ones = torch.ones_like(bias)
    norms = (norm_params(c1) if norm1 else None, norm_params(c2) if norm2 else None)
    out, _ = poisoned_nhwc(n, c_out, h, w, dtype)
    m = n * h * w
    partials = torch.full((3, m // cfg.BLOCK_M, c_out), float("nan"), device=DEVICE)
    launch(cfg, x, x2, weight, ones, bias, out, relu=False, norms=norms, partials=partials)
    expected = reference(x, x2, weight, ones, bias, relu=False, norms=norms)
    tol = tolerance_name(dtype)
    assert_close(out, expected, tol, "z")
    mean, var = bn_stats_finalize(partials, m, cfg.BLOCK_M)
    stored = out.cpu().double()  # the statistics are of z as stored (rounded)
    assert_close(mean, stored.mean((0, 2, 3)), "fp32", "mean", scale=stored.std().item())
    assert_close(var, stored.var((0, 2, 3), unbiased=False), "fp32", "var")


# ------------------------------------------------------------------------------- predicates


def test_tile_geometry():
    assert T.tile_geometry(256, 256, 128, stats=True) == (1, 128)  # a run of one row
    assert T.tile_geometry(16, 16, 64, stats=True) == (4, 16)  # whole rows
    assert T.tile_geometry(6, 16, 64, stats=True) is None  # 4 rows do not divide 6
    assert T.tile_geometry(6, 16, 64, stats=False) == (4, 16)  # clipped at the bottom edge
    assert T.tile_geometry(37, 37, 64, stats=False) == (1, 64)
    assert T.tile_geometry(5, 5, 64, stats=False) == (8, 8)
    for h, w, bm in ((5, 7, 32), (37, 37, 64), (3, 300, 128)):
        bh, bw = T.tile_geometry(h, w, bm, stats=False)
        assert bh * bw == bm


@needs_tma
def test_tma_supported_alignment():
    """16-byte aligned NHWC operands and the packed weight are TMA-able; a slice whose start or
    pixel pitch is not 16-byte aligned, an NCHW tensor, an unpacked weight or a small-C input is not."""
    dtype = torch.float16
    weight, _, _ = operands(16, 16, dtype)
    out, _ = poisoned_nhwc(1, 16, 4, 4, dtype)
    assert T.tma_supported(nhwc(1, 16, 4, 4, dtype), None, weight, out)
    assert T.tma_supported(nhwc(1, 16, 4, 4, dtype, pad=16, offset=8), None, weight, out)
    assert not T.tma_supported(nhwc(1, 16, 4, 4, dtype, pad=3), None, weight, out)  # 38-byte pitch
    assert not T.tma_supported(nhwc(1, 16, 4, 4, dtype, pad=8, offset=3), None, weight, out)  # start
    nchw = torch.randn(1, 16, 4, 4, dtype=dtype, device=DEVICE)
    assert not T.tma_supported(nchw, None, weight, out)
    unpacked = torch.randn(16, 16, 3, 3, dtype=dtype, device=DEVICE)
    assert not T.tma_supported(nhwc(1, 16, 4, 4, dtype), None, unpacked, out)
    small, _, _ = operands(8, 16, dtype)
    assert not T.tma_supported(nhwc(1, 8, 4, 4, dtype), None, small, out)


def test_candidates_keep_the_pointer_configs_first():
    """The tuner's sm_90 main list keeps every pointer config, in order, ahead of the TMA ones
    (the rule, which picks untimed, never lands on a TMA config first); TMA candidates appear
    only for 16-bit, TMA-able shapes with a tile geometry (training forms within the register
    budget)."""
    tuner = K._TUNERS["main"]
    configs = tuner.config_list(90)
    n_ptr = len(K._CONFIGS_SM90)
    assert list(configs[:n_ptr]) == list(K._CONFIGS_SM90)
    assert all(T.is_tma_config(c) for c in configs[n_ptr:]) and len(configs) > n_ptr
    facts = (True, *(True for _ in T.BLOCK_MS))  # TMA-able, every BLOCK_M has a tile geometry
    base = {
        "variant": "main", "elem": 2, "M": 2**20, "C1": 64, "C2": 0, "C_out": 64, "SMALL_C": False,
        "training": False, "dense": False, "bilinear": False, **T.fields_from_facts(facts, (None, None), False),
    }  # fmt: skip
    kept = tuner.candidates(90, base)
    assert any(T.is_tma_config(c) for c in kept) and any(not T.is_tma_config(c) for c in kept)
    for change in ({"tma": False}, {"elem": 4}, {"geometry": {}}):
        assert not any(T.is_tma_config(c) for c in tuner.candidates(90, {**base, **change})), change
    for training in ({"norm1": True}, {"C2": 64, "norm2": True}):
        kept = tuner.candidates(90, {**base, **training, "training": True, "stats": True})
        assert any(T.is_tma_config(c) for c in kept)
        assert all(T.fits_training(c) for c in kept if T.is_tma_config(c))
    assert not any(T.is_tma_config(c) for c in tuner.config_list(80))
    cfg = T.TMA_CONFIGS_SM90[0]
    assert T.facts_allow(cfg, facts) and not T.facts_allow(cfg, (False,))


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES_SLOW32[:2])
def test_conv3x3_launchers_dispatch_a_tma_pick(dtype, monkeypatch):
    """When the tuner picks a TMA config, ``conv3x3_bn_act`` (fused concat, channel-slice input)
    and ``conv3x3_bn_stats`` (decoder form) run the TMA kernel and match float64; a TMA pick on
    operands TMA cannot read (a 38-byte pixel pitch) runs the pointer kernel with the same tiles."""
    picks = []

    def pick(device, key, shape, run):
        picks.append(key)
        return CONFIGS[0]

    monkeypatch.setattr(K._TUNERS["main"], "pick", pick)
    launched = []
    real = T.conv3x3_tma_launch
    monkeypatch.setattr(T, "conv3x3_tma_launch", lambda *a, **k: launched.append(1) or real(*a, **k))
    n, c1, c2, c_out, w = 2, 16, 19, 24, 16
    h = 2 * max(1, CONFIGS[0].BLOCK_M // w)
    x, x2 = aligned(n, c1, h, w, dtype, sliced=True), aligned(n, c2, h, w, dtype, sliced=False)
    weight, scale, shift = operands(c1 + c2, c_out, dtype)
    tol = tolerance_name(dtype)
    got = K.conv3x3_bn_act(x, weight, scale, shift, x2=x2)
    assert_close(got, reference(x, x2, weight, scale, shift), tol, "eval through conv3x3")
    norms = (None, norm_params(c2))
    z, mean, var = K.conv3x3_bn_stats(x, weight, shift, x2=x2, x2_norm=norms[1])
    expected = reference(x, x2, weight, torch.ones_like(shift), shift, relu=False, norms=norms)
    assert_close(z, expected, tol, "train through conv3x3")
    stored = z.cpu().double()
    assert_close(mean, stored.mean((0, 2, 3)), "fp32", "mean", scale=stored.std().item())
    assert_close(var, stored.var((0, 2, 3), unbiased=False), "fp32", "var")
    assert len(launched) == 2 and len(picks) == 2
    ragged = nhwc(n, c1, h, w, dtype, pad=3)  # a 38- or 76-byte pixel pitch: no TMA
    w_r, s_r, t_r = operands(c1, c_out, dtype)
    got = K.conv3x3_bn_act(ragged, w_r, s_r, t_r)
    assert_close(got, reference(ragged, None, w_r, s_r, t_r), tol, "pointer kernel with the TMA pick's tiles")
    assert len(launched) == 2


@pytest.mark.skipif(torch.cuda.is_available() or not _common._INTERPRET, reason="the simulated GPU runs on CPU only")
@pytest.mark.parametrize("cfg", [c for c in T.TMA_CONFIGS_SM90 if not c.persistent], ids=lambda c: c.name)
def test_forced_tma_config_runs_its_kernel_or_raises(cfg):
    """A forced TMA config (``_tuning.forced``: ``tests/test_tuned_configs.py``'s probes) runs the
    TMA kernel, or raises when it cannot: on a 12x40 image the statistics forms have no tile of
    whole rows, and running the pointer kernel instead would pass the config untested. Under a
    simulated sm_90 (launches recorded, nothing runs), so every config is checked on the CPU."""
    name = _tuning.config_name(cfg)
    dtype = torch.float16

    def train(h, w):
        x = nhwc(2, 40, h, w, dtype)
        weight, _, shift = operands(40, 48, dtype)
        return K.conv3x3_bn_stats(x, weight, shift, x_norm=norm_params(40))

    with _common.simulate_gpu() as gpu, _tuning.forced({"conv3x3.main": name}):
        train(8, 32)  # whole 32-pixel rows for every TMA BLOCK_M (64, 128, 256)
        assert [f.fn.__name__ for f, *_ in gpu.launches][:1] == ["_conv3x3_tma_kernel"]
        with pytest.raises(ValueError, match=f"forced config {name} cannot run"):
            train(12, 40)
        gpu.launches.clear()
        x = nhwc(2, 40, 12, 40, dtype)
        K.conv3x3_bn_act(x, *operands(40, 48, dtype))  # eval: a clipped 64-pixel-wide patch, TMA runs
        assert [f.fn.__name__ for f, *_ in gpu.launches] == ["_conv3x3_tma_kernel"]


def test_compile_specs_are_16_bit_in_every_tuned_geometry():
    specs = T.compile_specs(90)
    assert {s.dtype for s in specs} == {"fp16", "bf16"}
    geometries = {(s.constexprs["BH"] * s.constexprs["BW"], s.constexprs["BH"], s.constexprs["BW"]) for s in specs}
    for bm in {c.BLOCK_M for c in T.TMA_CONFIGS_SM90}:
        assert {(bh, bw) for m, bh, bw in geometries if m == bm} == set(T.tuned_geometries(bm))
    assert not any(s.constexprs["STATS"] and s.constexprs["BLOCK_N"] > 64 for s in specs)  # register cap
    assert len({(s.kernel, s.config, s.dtype) for s in specs}) == len(specs)
    assert T.compile_specs(80) == []


# ------------------------------------------------------------------ the static metric (ring 2)

# A cut-down sm_90 SASS listing: a main loop 0x0100..0x0160 with 2 HGMMA and a NOP, whose
# mbarrier wait retries out of line at 0x0300 and jumps back into it, inside a tile loop.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0100*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*0110*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR10+0x1c000], R2 ;
        /*0120*/               @!P1 BRA 0x300 ;
        /*0130*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8].tnspB, R24 ;
        /*0140*/                   HGMMA.64x64x16.F32 R24, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0150*/                   NOP ;
        /*0160*/               @P0 UTMALDG.4D [UR8], [UR14] ;
        /*0170*/                @P2 BRA 0x100 ;
        /*0180*/                @P3 BRA 0x0 ;
        /*0190*/                   EXIT ;
        /*0300*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR10+0x1c000], R2 ;
        /*0310*/               @!P1 BRA 0x300 ;
        /*0320*/                   BRA 0x110 ;
"""


def test_main_loop_metric_reads_the_innermost_hgmma_loop():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import sass_metrics as S

    m = S.main_loop_metrics(SASS)
    # 0x100..0x170: 7 instructions (the NOP is not counted); the tile loop (0x0..0x180) is not
    # innermost, the out-of-line retry's jump back (0x110..0x320) crosses the loop: no loop.
    assert (m["loop_insts"], m["loop_hgmma"], m["insts_per_hgmma"], m["tma"]) == (7, 2, 3.5, True)
    assert S.main_loop_metrics("")["insts_per_hgmma"] == 0.0
    # 168 registers x 128 threads: 3 CTAs by registers; 98 KiB: 2 by shared memory.
    assert S.ctas_per_sm(168, 4, 98_304) == (3, 2)
    assert S.ctas_per_sm(64, 4, 0)[0] == 8
