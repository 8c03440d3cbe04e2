"""The whole U-Net through the fused Triton path (ring 1 on CPU via the interpreter, ring 3 on a
GPU) against the float64 reference, and the promise that the eval forward runs only fastunet
kernels: no convolution, concat, BatchNorm or max-pool op from PyTorch."""

import copy

import pytest
import torch
from helpers import HAS_CUDA, assert_close, model_pair, tolerance_name
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("triton_backend")]

NARROW = {"base_channels": 4, "depth": 2}
FORBIDDEN = ("convolution", "conv2d", "conv_transpose", "cat", "batch_norm", "max_pool", "cudnn")


def low_precision_pair(dtype, device, in_ch=3, out_ch=2, **options):
    """A ``UNet`` in ``dtype`` and a float64 reference holding exactly its (rounded) weights."""
    _, model = model_pair(in_ch, out_ch, dtype=torch.float64, device=device, **options)
    model = model.to(dtype).eval()
    ref = fastunet.UNetReference(in_ch, out_ch, **options).to(device)
    ref.load_state_dict(copy.deepcopy(model.state_dict()))
    return ref.double().eval(), model


class AtenLog(TorchDispatchMode):
    """Records every aten op name dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


DTYPES_RING1 = [torch.float32, torch.float16]


@pytest.mark.parametrize(
    "dtype", [DTYPES_RING1[0], pytest.param(DTYPES_RING1[1], marks=pytest.mark.slow)], ids=["fp32", "fp16"]
)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_eval_model_matches_reference(device, dtype, activation):
    ref, model = low_precision_pair(dtype, device, out_activation=activation, **NARROW)
    x = torch.randn(3, 3, 8, 12, device=device).to(dtype)
    with torch.no_grad():
        y = model(x)
        expected = ref(x.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, tolerance_name(dtype), f"UNet {dtype} eval")


def test_eval_logits_and_one_input_channel(device):
    ref, model = low_precision_pair(torch.float32, device, in_ch=1, out_ch=3, out_activation="none", **NARROW)
    x = torch.randn(1, 1, 16, 8, device=device)
    with torch.no_grad():
        assert_close(model(x), ref(x.double()), tolerance_name(torch.float32), "logits")


def test_train_mode_forward_backward_fp32(device):
    """Train mode on the fused path (batch statistics from the conv kernels, BatchNorm+ReLU on
    the readers' loads): output, grads, BN running stats."""
    ref, model = low_precision_pair(torch.float32, device, **NARROW)
    ref.train()
    model.train()
    x = torch.randn(2, 3, 8, 8, device=device)
    xm = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    y, yr = model(xm), ref(xr)
    tol = tolerance_name(torch.float32)
    assert_close(y, yr, tol, "train output")
    g = torch.randn_like(yr)
    y.backward(g.float())
    yr.backward(g)
    assert_close(xm.grad, xr.grad, tol, "input grad")
    scale = max(p.grad.pow(2).mean().sqrt().item() for p in ref.parameters())
    for (name, pr), pm in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert_close(pm.grad, pr.grad, tol, f"grad of {name}", scale=scale)
    for (name, br), bm in zip(ref.named_buffers(), model.buffers(), strict=True):
        if br.is_floating_point():
            assert_close(bm, br, tol, name)


def test_autocast_fp16(device):
    ref, model = low_precision_pair(torch.float32, device, **NARROW)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        y = model(x)
    assert y.dtype == torch.float16
    with torch.no_grad():
        assert_close(y, ref(x.double()), "fp16", "autocast fp16")


def test_eval_runs_only_fastunet_kernels(device):
    _, model = low_precision_pair(torch.float32, device, **NARROW)
    x = torch.randn(1, 3, 8, 8, device=device)
    log = AtenLog()
    with torch.no_grad(), log:
        model(x)
    used = [n for n in log.names if any(f in n for f in FORBIDDEN)]
    assert not used, f"PyTorch compute ops on the fused path: {sorted(set(used))}"


# ------------------------------------------------------------------ ring 3: real sizes on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_classic_unet_on_gpu(dtype):
    ref, model = low_precision_pair(dtype, torch.device("cuda"), 3, 1)
    x = torch.randn(2, 3, 128, 128, device="cuda").to(dtype)
    with torch.no_grad():
        assert_close(model(x), ref(x.double()), tolerance_name(dtype), f"UNet(3,1) {dtype}")


@pytest.mark.cuda
def test_gpu_profile_has_no_torch_compute_kernels():
    _, model = low_precision_pair(torch.bfloat16, torch.device("cuda"), 3, 1)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # warm-up: autotuning launches stay out of the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    bad = [
        n
        for n in names
        if any(f in n.lower() for f in ("cudnn", "conv", "batch_norm", "bn_fw", "max_pool", "catarray"))
    ]
    assert not bad, f"non-fastunet GPU kernels: {sorted(set(bad))}"
    assert HAS_CUDA
