"""The examples of the README and of the guides in ``docs/`` run as written, and their links resolve.

A block preceded by ``<!-- readme-test: KIND -->`` is run by a test that asks for ``doc_blocks("KIND")``
(here, or in the test file of the feature it shows), wherever the block lives: README.md or
docs/*.md. ``cpu`` blocks must run on a CPU-only machine exactly as a new user would paste them;
``export`` blocks need the ``export`` extra (and onnxruntime to compare numbers); ``cli`` blocks are
shell lines whose ``fastunet ...`` commands run through ``fastunet.cli.main``. Each block runs in a
fresh namespace inside a temporary working directory, so files it writes (``unet.pt``,
``unet.onnx``) land there. A Python block without a tag must say why it cannot run here: it needs a
GPU (it names ``cuda``) or the text before it says "not run".
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]

# Every tagged block, by kind, and how many there are across README.md and docs/*.md. A block that
# lost its tag in a move, a new tag, or a kind that no test asks for fails
# test_every_tagged_block_is_run_by_a_test.
TAGGED = {
    "cpu": 2, "load-quick": 1, "cli": 1, "export": 1, "convert": 1, "checkpoint": 1, "load": 1, "predict": 1,
    "graph-train": 1,
}  # fmt: skip

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_TAG = re.compile(r"<!-- readme-test: ([\w-]+) -->\n$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


class Block(NamedTuple):
    """One fenced code block: its tag (None if untagged), language, source, the text before it
    and where it is (``docs/x.md:LINE``, for tracebacks and messages)."""

    tag: str | None
    lang: str
    code: str
    before: str
    where: str


def all_blocks() -> list[Block]:
    """Every fenced block of README.md and docs/*.md, file by file, in order."""
    blocks = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            before = text[: m.start()]
            tag = _TAG.search(before[-80:])
            line = text.count("\n", 0, m.start()) + 1
            where = f"{path.relative_to(REPO)}:{line}"
            blocks.append(Block(tag and tag.group(1), m.group(1), m.group(2), before, where))
    return blocks


def doc_blocks(kind: str) -> list[Block]:
    """The blocks tagged ``kind``, in README-then-docs order."""
    return [b for b in all_blocks() if b.tag == kind]


def run_block(block: Block, cwd: Path) -> tuple[dict, str]:
    """Execute a Python block with ``cwd`` as working directory; returns (namespace, stdout)."""
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)  # contextlib.chdir is 3.11+, and the package supports 3.10
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, block.where, "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace, out.getvalue()


def test_the_readme_test_command_is_what_ci_runs():
    """The README opens with the two commands; .ci/run runs the test command's steps, in order."""
    first = _FENCE.search(README.read_text())
    assert first.group(1) == "bash" and README.read_text().startswith("# fastunet\n\n```bash\n# main job:")
    lines = first.group(2).splitlines()
    assert [line.split(":")[0] for line in lines[::2]] == ["# main job", "# tests"]
    steps = lines[3].split(" && ")
    ci = [line.replace(" -q", "") for line in (REPO / ".ci" / "run").read_text().splitlines()]
    found = [ci.index(step) for step in steps]  # ValueError names a step CI does not run
    assert found == sorted(found)


def test_every_tagged_block_is_run_by_a_test():
    counts: dict[str, int] = {}
    for b in all_blocks():
        if b.tag is not None:
            counts[b.tag] = counts.get(b.tag, 0) + 1
    assert counts == TAGGED
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for kind in TAGGED:
        assert f'doc_blocks("{kind}")' in tests, f"no test runs the blocks tagged {kind!r}"
    for b in doc_blocks("cpu"):
        assert "cuda" not in b.code, f"{b.where}: a block tagged cpu must not need a GPU"


def test_every_python_block_runs_or_says_why_not():
    untagged = 0
    for b in all_blocks():
        if b.lang != "python":
            continue
        ast.parse(b.code, b.where)  # untested blocks at least parse
        if b.tag is None:
            untagged += 1
            says_why = "cuda" in b.code or "not run" in b.before[-300:]
            assert says_why, f"{b.where}: an untagged Python block that could run on CPU; tag it and test it"
    assert untagged == 6  # the GPU-only and file-needing examples: a change here is deliberate


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    text = _FENCE.sub("", path.read_text())  # a '# comment' in a code block is not a heading
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_resolves_inside_the_repository():
    checked = 0
    for path in DOC_FILES:
        text = _FENCE.sub("", path.read_text())
        assert "/work/" not in path.read_text(), path
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(REPO)}: ({target})"
            assert dest.is_relative_to(REPO), f"{where} points outside the repository"
            assert dest.exists(), f"{where}: no such file"
            if anchor:
                assert dest.suffix == ".md", where
                assert anchor in _anchors(dest), f"{where}: no heading with that anchor"
            checked += 1
    assert checked > 20


def test_the_results_table_is_generated_from_its_committed_result():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import readme_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    text = README.read_text()
    found = re.findall(
        r"_Generated by `python benchmarks/readme_table\.py` from `([^`]+)`(?: \(cases: ([^)]+)\))?", text
    )
    assert found, "README has no generated results table"
    for source, cases in found:
        dtypes = tuple(cases.split(", ")) if cases else ()
        rendered = readme_table.render(json.loads((REPO / source).read_text()), source=source, dtypes=dtypes)
        assert rendered in text, f"README's results table from {source} differs from readme_table.py's rendering"
    for start, end in readme_table.SECTIONS.values():
        assert text.count(start) == 1 and text.count(end) == 1


def test_cpu_quick_start_runs_and_matches_the_classic_model(tmp_path):
    ns, out = run_block(doc_blocks("cpu")[0], tmp_path)
    assert (tmp_path / "unet.pt").is_file()
    assert ns["mask"].shape == (1, 1, 256, 256)
    assert 0.0 <= ns["mask"].min() and ns["mask"].max() <= 1.0
    with torch.no_grad():
        expected = ns["classic"](ns["x"])
    torch.testing.assert_close(ns["mask"], expected, rtol=1e-5, atol=1e-5)
    printed = float(re.search(r"tensor\(([-+0-9.e]+)", out).group(1))
    assert printed < 1e-5

    # the load quick start reads the file the block above wrote, as the README says
    ns2, out2 = run_block(doc_blocks("load-quick")[0], tmp_path)
    model = ns2["model"]
    assert not model.training and out2 == "64 sigmoid\n"
    with torch.no_grad():
        torch.testing.assert_close(model(ns["x"]), expected, rtol=1e-5, atol=1e-5)


def test_cpu_training_example_runs_on_logits(tmp_path):
    ns, out = run_block(doc_blocks("cpu")[1], tmp_path)
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


@pytest.mark.skipif(not _have("PIL", "tifffile"), reason="needs the predict extra (Pillow, tifffile)")
def test_cli_predict_quick_start_writes_the_mask_it_names(tmp_path):
    import numpy as np
    from PIL import Image

    import fastunet
    from fastunet import cli

    (block,) = doc_blocks("cli")
    # unet.pt stands in for the quick start's (a narrow model: the command is what is tested)
    torch.save(fastunet.UNetReference(3, 1, base_channels=4, depth=2).state_dict(), tmp_path / "unet.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    commands = 0
    for line in block.code.splitlines():
        args = shlex.split(line, comments=True)
        if args[:2] == ["pip", "install"]:
            continue
        assert args[0] == "fastunet", f"{block.where}: {line!r} is neither pip install nor fastunet"
        before = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert cli.main(args[1:]) == 0, line
        finally:
            os.chdir(before)
        for written in re.findall(r"writes (\S+)", line):
            mask = np.asarray(Image.open(tmp_path / written))
            assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255}
        commands += 1
    assert commands == 1


@pytest.mark.slow
@pytest.mark.skipif(not _have("onnx", "onnxscript", "onnxruntime"), reason="needs onnx, onnxscript, onnxruntime")
def test_onnx_export_block_matches_the_model(tmp_path):
    import numpy as np
    import onnxruntime

    ns, _ = run_block(doc_blocks("export")[0], tmp_path)
    session = onnxruntime.InferenceSession(str(tmp_path / "unet.onnx"))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = ns["model"](x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
