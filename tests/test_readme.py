"""The README's examples run as written.

Blocks preceded by ``<!-- readme-test: cpu -->`` must run on a CPU-only machine exactly as a new
user would paste them; ``<!-- readme-test: export -->`` blocks need the ``export`` extra (and
onnxruntime to compare numbers). Each block runs in a fresh namespace inside a temporary working
directory, so files it writes (``unet.pt``, ``unet.onnx``) land there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)


def readme_blocks(kind: str) -> list[str]:
    """The python sources of the README blocks tagged ``kind``, in order."""
    return [code for tag, code in _BLOCK.findall(README.read_text()) if tag == kind]


def run_block(code: str, cwd: Path) -> tuple[dict, str]:
    """Execute ``code`` with ``cwd`` as working directory; returns (namespace, stdout)."""
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)  # contextlib.chdir is 3.11+, and the package supports 3.10
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace, out.getvalue()


def test_the_readme_tags_its_runnable_blocks():
    assert len(readme_blocks("cpu")) == 2
    assert len(readme_blocks("export")) == 1
    for code in readme_blocks("cpu"):
        assert "cuda" not in code, "a block tagged cpu must not need a GPU"


def test_the_readme_does_not_point_outside_the_repository():
    text = README.read_text()
    assert "../" not in text
    assert "/work/" not in text


def test_cpu_quick_start_runs_and_matches_the_classic_model(tmp_path):
    ns, out = run_block(readme_blocks("cpu")[0], tmp_path)
    assert (tmp_path / "unet.pt").is_file()
    assert ns["mask"].shape == (1, 1, 256, 256)
    assert 0.0 <= ns["mask"].min() and ns["mask"].max() <= 1.0
    with torch.no_grad():
        expected = ns["classic"](ns["x"])
    torch.testing.assert_close(ns["mask"], expected, rtol=1e-5, atol=1e-5)
    printed = float(re.search(r"tensor\(([-+0-9.e]+)", out).group(1))
    assert printed < 1e-5


def test_cpu_training_example_runs_on_logits(tmp_path):
    ns, out = run_block(readme_blocks("cpu")[1], tmp_path)
    assert ns["model"].out_activation == "none"
    assert isinstance(ns["loss_fn"], torch.nn.BCEWithLogitsLoss)
    assert re.fullmatch(r"loss \d+\.\d{3}\n", out)
    assert torch.isfinite(ns["loss"])
    # the head emits logits, not probabilities: a sigmoid head would keep them inside [0, 1]
    with torch.no_grad():
        logits = ns["model"].eval()(ns["x"])
    assert logits.min() < 0 or logits.max() > 1


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.slow
@pytest.mark.skipif(not _have("onnx", "onnxscript", "onnxruntime"), reason="needs onnx, onnxscript, onnxruntime")
def test_onnx_export_block_matches_the_model(tmp_path):
    import numpy as np
    import onnxruntime

    ns, _ = run_block(readme_blocks("export")[0], tmp_path)
    session = onnxruntime.InferenceSession(str(tmp_path / "unet.onnx"))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = ns["model"](x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
