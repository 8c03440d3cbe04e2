"""The TMA launcher's host side (``kernels/conv3x3_tma.py``): descriptors made once per operand
set and never stale, never keeping a tensor alive; the persistent grid from the compiled kernel's
registers and shared memory. Launches run against a simulated H100 (recorded, not run), where
the launcher caches as on a GPU (the interpreter, which reads data through the descriptors'
tensors, does not cache)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import assert_close

pytest.importorskip("triton")
from fastunet.kernels import _common  # noqa: E402
from fastunet.kernels import conv3x3_tma as T  # noqa: E402
from fastunet.kernels.conv3x3 import pack_conv3x3_weight  # noqa: E402

pytestmark = pytest.mark.skipif(
    T.TensorDescriptor is None or not _common._INTERPRET, reason="host descriptors on a simulated GPU"
)

CFG = T.TMA_CONFIGS_SM90[1]  # 128x64x64, 4 warps
BF16 = torch.bfloat16


def _nhwc_at(storage: torch.Tensor, c: int, h: int, w: int, pitch: int | None = None) -> torch.Tensor:
    """An [1, c, h, w] NHWC tensor at the start of ``storage`` (pixel pitch ``pitch`` channels)."""
    pitch = pitch or c
    return storage.as_strided((1, c, h, w), (h * w * pitch, 1, w * pitch, pitch))


def _launch(x, weight, out, x2=None):
    c_out = weight.shape[0]
    T.conv3x3_tma_launch(
        CFG, x, x2, weight, torch.ones(c_out), torch.zeros(c_out), out, relu=True, dot_precision="ieee"
    )  # fmt: skip


def _descriptors_of(launch) -> tuple:
    return launch[2][2:7]  # x, x2, w1, w2, out


@pytest.fixture
def gpu():
    T._DESCRIPTORS.clear()
    with _common.simulate_gpu() as simulated:
        yield simulated
    T._DESCRIPTORS.clear()


def test_descriptors_are_made_once_per_operand_set(gpu):
    x = torch.randn(1, 64, 32, 32).to(BF16).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(1, 32, 32, 32).to(BF16).contiguous(memory_format=torch.channels_last)
    weight = pack_conv3x3_weight(torch.randn(64, 96, 3, 3).to(BF16))
    out = torch.empty_like(x)
    for _ in range(3):
        _launch(x, weight, out, x2)
    first, *rest = (_descriptors_of(launch) for launch in gpu.launches)
    assert all(all(a is b for a, b in zip(first, r, strict=True)) for r in rest)
    assert len(T._DESCRIPTORS) == 1


def test_a_cached_descriptor_equals_a_new_one(gpu):
    """What the copy engine's tensor map is encoded from: address, dtype, shape, strides, box."""
    x = torch.randn(2, 64, 16, 32).to(BF16).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(2, 48, 16, 32).to(BF16).contiguous(memory_format=torch.channels_last)
    weight = pack_conv3x3_weight(torch.randn(64, 112, 3, 3).to(BF16))
    out = torch.empty_like(x)
    _launch(x, weight, out, x2)
    _launch(x, weight, out, x2)  # from the cache
    bh, bw = T.tile_geometry(16, 32, CFG.BLOCK_M, stats=False)
    a_box, w_box = [1, bh, bw, CFG.BLOCK_K], [1, CFG.BLOCK_K, CFG.BLOCK_N]
    views = [
        (T._nhwc(x), a_box),
        (T._nhwc(x2), a_box),
        (T._weight_source(weight, 0, 64), w_box),
        (T._weight_source(weight, 64, 112), w_box),
        (T._nhwc(out), [1, bh, bw, CFG.BLOCK_N]),
    ]
    for desc, (view, box) in zip(_descriptors_of(gpu.launches[-1]), views, strict=True):
        fresh = T.TensorDescriptor.from_tensor(view, box)
        assert (desc.base.data_ptr(), desc.base.dtype) == (view.data_ptr(), view.dtype)
        assert list(desc.shape) == list(fresh.shape) and list(desc.strides) == list(fresh.strides)
        assert list(desc.block_shape) == box and desc.padding == fresh.padding


def test_a_reused_address_never_gets_a_stale_descriptor(gpu):
    """Tensors at one address (a freed buffer handed out again by the allocator) with another
    shape, another pixel pitch or another dtype each get descriptors of their own geometry."""
    storage = torch.empty(32 * 32 * 128, dtype=BF16)
    weight = pack_conv3x3_weight(torch.randn(64, 64, 3, 3).to(BF16))
    shapes = {}
    for h, w, pitch in ((32, 32, None), (16, 16, None), (32, 32, 128), (16, 32, None)):
        x = _nhwc_at(storage, 64, h, w, pitch)
        assert x.data_ptr() == storage.data_ptr()
        _launch(x, weight, torch.empty_like(x, memory_format=torch.channels_last))
        x_desc = _descriptors_of(gpu.launches[-1])[0]
        shapes[(h, w, pitch)] = (list(x_desc.shape), list(x_desc.strides))
    assert shapes == {
        (32, 32, None): ([1, 32, 32, 64], [65536, 2048, 64, 1]),
        (16, 16, None): ([1, 16, 16, 64], [16384, 1024, 64, 1]),
        (32, 32, 128): ([1, 32, 32, 64], [131072, 4096, 128, 1]),
        (16, 32, None): ([1, 16, 32, 64], [32768, 2048, 64, 1]),
    }
    x16 = _nhwc_at(storage.view(torch.float16), 64, 32, 32)  # same address and geometry, fp16
    _launch(x16, pack_conv3x3_weight(torch.randn(64, 64, 3, 3).half()), torch.empty_like(x16))
    assert _descriptors_of(gpu.launches[-1])[0].base.dtype == torch.float16


def test_cached_descriptors_keep_no_tensor_alive(gpu):
    x = torch.randn(1, 64, 32, 32).to(BF16).contiguous(memory_format=torch.channels_last)
    weight = pack_conv3x3_weight(torch.randn(64, 64, 3, 3).to(BF16))
    out = torch.empty_like(x)
    _launch(x, weight, out)
    gpu.launches.clear()  # the recorded launch holds its arguments; the cache must not
    refs = [weakref.ref(t) for t in (x, weight, out)]
    del x, weight, out
    gc.collect()
    assert len(T._DESCRIPTORS) == 1 and all(r() is None for r in refs)


def test_occupancy_takes_the_scarcest_resource():
    # 255 registers x 4 warps: 8 warps of 8192 registers fill the register file -> 2 CTAs
    assert T.occupancy(255, 114_688, 4) == 2
    # 168 registers x 8 warps: 3 warps per sub-partition, 12 per SM -> 1 CTA, although shared
    # memory (the old estimate's only input) would hold 2
    assert T.occupancy(168, 100_000, 8) == 1
    assert T.occupancy(32, 16_384, 4) == 13  # shared memory: 233472 // (16384 + 1024)
    assert T.occupancy(32, 0, 4) == 16  # threads: 2048 // 128
    assert T.occupancy(16, 0, 1) == 32  # the SM's CTA limit
    assert T.occupancy(255, 240_000, 8) == 1  # never 0


def test_persistent_grid_is_the_sms_times_the_ctas_per_sm(gpu):
    """On the simulated H100 (no compiled kernel to ask): 255 registers and the config's
    shared-memory estimate; on a GPU the compiled kernel's own figures (``ctas_per_sm``)."""
    cfg = T.TMA_CONFIGS_SM90[-1]
    assert cfg.persistent
    x = torch.empty(16, 64, 64, 64, dtype=BF16).contiguous(memory_format=torch.channels_last)  # 512 tiles
    weight = pack_conv3x3_weight(torch.randn(64, 64, 3, 3).to(BF16))
    T.conv3x3_tma_launch(
        cfg, x, None, weight, torch.ones(64), torch.zeros(64), torch.empty_like(x), relu=True, dot_precision="ieee"
    )  # fmt: skip
    ctas = T.occupancy(255, cfg.smem(2), cfg.num_warps)
    assert gpu.launches[-1][1] == (gpu.sms * ctas,) and 16 * 64 * 64 // cfg.BLOCK_M > gpu.sms * ctas


def test_kernels_run_by_the_interpreter_get_their_tensors():
    """Where Triton's interpreter runs the kernel (it reads the data through the descriptor's
    tensor), nothing is cached and the launch computes the conv; a recording GPU caches."""
    x = torch.randn(1, 16, 8, 8).half().contiguous(memory_format=torch.channels_last)
    weight = pack_conv3x3_weight(torch.randn(16, 16, 3, 3).half())
    out = torch.full_like(x, float("nan"))
    T._DESCRIPTORS.clear()
    with _common.simulate_gpu(_common.SimulatedGPU(execute=True)):
        _launch(x, weight, out)
    assert not T._DESCRIPTORS
    expected = torch.relu(torch.nn.functional.conv2d(x.double(), weight.double(), padding=1))
    assert_close(out, expected, "fp16", "TMA launch run by the interpreter")
    with _common.simulate_gpu():
        _launch(x, weight, out)
    assert len(T._DESCRIPTORS) == 1
    T._DESCRIPTORS.clear()
