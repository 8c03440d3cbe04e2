"""The ``fastunet`` command (``python -m fastunet``): help, argument checks, and the GPU-less
answer of ``tune``. Tuning itself is tested in tests/test_tuning.py (simulated GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastunet import cli


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastunet", *args], capture_output=True, text=True, env=env)


def test_help_lists_every_option_with_defaults_and_examples():
    out = run("tune", "--help")
    assert out.returncode == 0
    for option in ("--batch", "--size", "--height", "--width", "--dtype", "--mode", "--in-ch", "--out-ch",
                   "--base-channels", "--depth", "--device"):  # fmt: skip
        assert option in out.stdout, option
    assert "(default: 16)" in out.stdout and "examples:" in out.stdout
    top = run("--help")
    assert top.returncode == 0 and "tune" in top.stdout


@pytest.mark.slow  # one CLI subprocess per bad argument (~4 s)
def test_bad_arguments_are_refused_with_a_reason():
    out = run("tune", "--batch", "0")
    assert out.returncode == 2 and "must be >= 1" in out.stderr
    out = run("tune", "--dtype", "fp64")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = run()
    assert out.returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_tune_without_a_gpu_says_why():
    out = run("tune", "--batch", "2", "--size", "64")
    assert out.returncode == 2 and "needs an NVIDIA GPU" in out.stderr


def test_sizes_must_fit_the_depth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--size", "250"])
    assert exc.value.code == 2
