"""Test configuration shared by every ring.

Without a GPU the Triton kernels run in the interpreter on CPU tensors, and
``TRITON_INTERPRET`` must be set before anything imports ``triton``: that is why
it happens here, at the top of the root conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import re  # noqa: E402

import _interpreter_options  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (the README's `-n auto`: one worker process per core) each worker computes on
# one thread: torch's default of one thread per core in every worker would oversubscribe the
# cores, and the interpreter's numpy work is single-threaded anyway. A test that sets its own
# thread count (the CPU benchmarks) still does.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def _interpreter_numpy_bug() -> bool:
    """triton < 3.7's interpreter fails on numpy >= 2.4 in every kernel with a loop over a runtime
    bound (fixed in triton 3.7). The GPU image pairs triton 3.6 with numpy 2.5: there the kernels
    run on the GPU and this never matters, but a CPU run there must say why, not fail."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton
    except ImportError:
        return False
    return _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4)


INTERPRETER_NUMPY_BUG = _interpreter_numpy_bug()


# Work Triton's interpreter does for nothing, skipped (_interpreter_options.py).
_interpreter_options.speed_up()
_BUG_TEXT = "only 0-dimensional arrays can be converted to Python scalars"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_backend():
    """The fused ops forced for the test (on CPU the interpreter runs their kernels)."""
    import fastunet

    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    yield
    fastunet.set_backend(before)


@pytest.fixture
def fresh_tuning(tmp_path, monkeypatch):
    """A tuner test's setting: its own cache directory, no picks in memory, zeroed counters, the
    settings at their defaults, the fused backend."""
    from fastunet.kernels import _tuning, _tuning_cache

    import fastunet

    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTUNET_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTUNET_VERIFY", raising=False)
    monkeypatch.setattr(_tuning_cache, "_WARNED", set())
    _tuning.clear_memory()
    _tuning.reset_stats()
    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    yield
    fastunet.set_backend(before)
    _tuning.clear_memory()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of ``UNet._fused_forward`` (0: the eager path ran)."""
    from fastunet import UNet

    calls = []
    original = UNet._fused_forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "_fused_forward", spy)
    return calls


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the mark added here must count
def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (ring 3)")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            # CUDA-capable: the device fixture runs it on the GPU when there is one, so ring 3
            # (benchmarks/gpu_check.py: -m "cuda or gpu_check") must select it. Tests that pick
            # CUDA otherwise (a module-level DEVICE) carry the mark themselves.
            item.add_marker(pytest.mark.gpu_check)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report the known triton<3.7 / numpy>=2.4 interpreter failure as a skip that says so."""
    outcome = yield
    report = outcome.get_result()
    if INTERPRETER_NUMPY_BUG and call.excinfo is not None and _BUG_TEXT in str(call.excinfo.value):
        import triton

        report.outcome = "skipped"
        report.longrepr = (
            str(item.path),
            item.location[1] or 0,
            f"Skipped: triton {triton.__version__}'s interpreter cannot run kernels with loops on numpy "
            f"{np.__version__} (>= 2.4; fixed in triton 3.7): run on a GPU, or with numpy < 2.4",
        )
