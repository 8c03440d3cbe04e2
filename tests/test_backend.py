"""Backend selection: set_backend, FASTUNET_BACKEND, and the CPU rules of the forced Triton path."""

import os
import subprocess
import sys

import pytest
import torch

import fastunet
from fastunet import backend


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastunet.get_backend()
    yield
    fastunet.set_backend(before)


def test_set_and_get():
    for name in fastunet.BACKENDS:
        fastunet.set_backend(name)
        assert fastunet.get_backend() == name
    fastunet.set_backend(" Eager ")
    assert fastunet.get_backend() == "eager"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto.*triton.*eager"):
        fastunet.set_backend("cudnn")


@pytest.mark.parametrize("value, expected", [("eager", "eager"), ("triton", "triton"), ("", "auto")])
def test_environment_variable(value, expected):
    env = dict(os.environ, FASTUNET_BACKEND=value)
    out = subprocess.run(
        [sys.executable, "-c", "import fastunet; print(fastunet.get_backend())"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == expected


def test_bad_environment_variable_fails_at_import():
    env = dict(os.environ, FASTUNET_BACKEND="fast")
    out = subprocess.run([sys.executable, "-c", "import fastunet"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTUNET_BACKEND" in out.stderr


def test_auto_uses_eager_on_cpu():
    fastunet.set_backend("auto")
    assert not backend.use_fused(torch.zeros(1))


def test_eager_never_fused():
    fastunet.set_backend("eager")
    assert not backend.use_fused(torch.zeros(1))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # The interpreter is chosen when triton is imported, so the flag is read once at import.
    fastunet.set_backend("triton")
    monkeypatch.setattr(backend, "_INTERPRETING", True)
    assert backend.use_fused(torch.zeros(1))
    monkeypatch.setattr(backend, "_INTERPRETING", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.use_fused(torch.zeros(1))


def test_interpreter_flag_is_read_once_at_import(monkeypatch):
    before = backend.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before else "1")
    assert backend.interpreting() == before
