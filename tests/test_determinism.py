"""A fused training step gives the same bits in two separate processes.

Each run is its own Python process (fresh allocator, hash seed, Triton state), trains a tiny
``UNet`` through the fused path (``"triton"`` backend: on CPU the kernels run in Triton's
interpreter, fp32) for one SGD step and saves every parameter and BatchNorm buffer; the two
files must be equal with ``torch.equal``. On a GPU the same check runs under
``torch.use_deterministic_algorithms(True)`` with an empty tuning cache, the setting docs/training.md
names for reproducible runs (rule picks, no timing race).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]

# The training step, run by each child process: argv = output file, device, deterministic flag,
# image size.
CHILD = r"""
import sys, warnings
import torch
import torch.nn.functional as F
import fastunet
from safetensors.torch import save_file

sys.path.insert(0, "tests")
from _interpreter_options import speed_up
speed_up()

out, device, deterministic, size = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
if deterministic:
    torch.use_deterministic_algorithms(True)
warnings.simplefilter("error", fastunet.FusedPathWarning)  # the eager path would not count
fastunet.set_backend("triton")  # the fused ops or an error, never the eager fallback
torch.manual_seed(0)
model = fastunet.UNet(3, 1, base_channels=4, depth=2, out_activation="none").to(device).train()
support = fastunet.check_fused_support(model)
assert support.supported and support.mode == "train", support
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x = torch.randn(2, 3, size, size).to(device)
target = (torch.rand(2, 1, size, size) > 0.5).float().to(device)
loss = F.binary_cross_entropy_with_logits(model(x), target)
opt.zero_grad()
loss.backward()
opt.step()
state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
state["loss"] = loss.detach().cpu().reshape(1)
save_file(state, out)
"""


def _run_twice(tmp_path: Path, device: str, env: dict, deterministic: bool, size: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    paths = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    flag = "1" if deterministic else "0"
    # Concurrently: two cores, half the wall time; the runs share nothing but the disk.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(p), device, flag, str(size)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in paths
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    return load_file(str(paths[0])), load_file(str(paths[1]))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"differ between the two processes: {different}"
    # and the step did something: trained weights, updated BatchNorm statistics
    torch.manual_seed(0)
    fresh = __import__("fastunet").UNet(3, 1, base_channels=4, depth=2).state_dict()
    assert not torch.equal(a["conv1.conv.0.weight"], fresh["conv1.conv.0.weight"])
    assert a["conv1.conv.1.num_batches_tracked"].item() == 1
    assert torch.isfinite(a["loss"]).all()


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTUNET_BACKEND", "PYTHONHASHSEED")}
    env.update(changes)
    return env


# Two fresh processes each import torch and run the interpreter (about 17 s for 8x8 on 2 cores):
# slow tests both, so quick mode stays under 3 minutes. 8x8: several kernels run as one program;
# 12x12 launches the same 31 (kernel, constexpr config) pairs as 16x16 did, each kernel over
# several programs as at 16x16 (partials combined across programs), at 56 % of its pixels, and
# with partial last tiles below the top level (2*6*6 and 2*3*3 pixels: no multiple of the 32- and
# 16-pixel tiles; 16x16's 512, 128 and 32 all were).
@pytest.mark.slow
@pytest.mark.parametrize("size", [8, 12])
def test_fused_training_step_is_bitwise_identical_across_processes(tmp_path, size):
    # TRITON_INTERPRET must be set before the child imports triton: the interpreter, fp32, CPU.
    a, b = _run_twice(tmp_path, "cpu", _env(TRITON_INTERPRET="1"), deterministic=False, size=size)
    _assert_bitwise(a, b)


@pytest.mark.cuda
def test_fused_training_step_is_bitwise_identical_across_processes_cuda(tmp_path):
    env = _env(FASTUNET_CACHE_DIR=str(tmp_path / "cache"), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.pop("TRITON_INTERPRET", None)
    a, b = _run_twice(tmp_path, "cuda", env, deterministic=True, size=64)
    _assert_bitwise(a, b)
