"""``fastunet.export`` (fused and portable ``torch.export``) and ``fastunet.export_onnx``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import fastunet
from fastunet.export import fastunet_ops

pytestmark = pytest.mark.model

TINY = dict(base_channels=4, depth=2)  # H and W multiples of 4


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_onnx = pytest.mark.skipif(
    not _have("onnx", "onnxscript", "onnxruntime"), reason="needs onnx, onnxscript, onnxruntime (the test extra)"
)


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastunet.get_backend()
    yield
    fastunet.set_backend(before)


def _model(**options) -> fastunet.UNet:
    model = fastunet.UNet(3, 2, **{**TINY, **options}).train()
    with torch.no_grad():  # non-default BatchNorm running statistics
        model(torch.randn(2, 3, 8, 8))
    return model.eval()


def _targets(program) -> set[str]:
    return {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------- portable
def test_portable_export_is_aten_only_and_dynamic():
    model = _model()
    program = fastunet.export(model, torch.randn(2, 3, 8, 8))
    assert fastunet_ops(program) == []
    assert not any(t.startswith("fastunet") for t in _targets(program))
    assert "aten.conv2d.default" in _targets(program)
    run = program.module()
    # other batches and sizes: one 4-pixel block (the 1x1 bottleneck), batch 1, non-square
    for shape in [(1, 3, 4, 4), (3, 3, 8, 20)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"% 4 == 0"):  # sizes stay multiples of 2**depth
        run(torch.randn(1, 3, 6, 8))


def test_portable_export_keeps_mode_and_backend():
    model = _model().train()
    fastunet.set_backend("auto")
    program = fastunet.export(model, torch.randn(1, 3, 8, 8), dynamic=False)
    assert model.training and all(m.training for m in model.modules())
    assert fastunet.get_backend() == "auto"
    # traced in eval mode: running statistics, no batch-statistics update in the graph
    assert "aten.batch_norm.default" in _targets(program)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_static_export_fixes_the_shape():
    program = fastunet.export(_model(), torch.randn(1, 3, 8, 8), dynamic=False)
    with pytest.raises(Exception, match=r"size\(\)\[0\] == 1|Expected input"):
        program.module()(torch.randn(2, 3, 8, 8))


def test_portable_export_of_the_reference_model():
    ref = fastunet.UNetReference(3, 2, **TINY).eval()
    program = fastunet.export(ref, torch.randn(2, 3, 8, 8))
    assert fastunet_ops(program) == []
    x = torch.randn(1, 3, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref(x), rtol=0, atol=0)


def test_dynamic_shapes_are_multiples_of_two_to_the_depth():
    shapes = fastunet.export_dynamic_shapes(fastunet.UNet(3, 1))["x"]
    assert set(shapes) == {0, 2, 3}
    assert "16" in str(shapes[2]) and "h_blocks" in str(shapes[2])


# ---------------------------------------------------------------------------- fused
@pytest.mark.slow  # traces and runs the fused path through the interpreter (~13 s)
def test_fused_export_keeps_fastunet_ops_and_runs(triton_backend, tmp_path):
    model = _model()
    example = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(example)  # an eager forward first: the export must not trip over its memo
    program = fastunet.export(model, example, portable=False)
    ops = fastunet_ops(program)
    assert {"fastunet.conv3x3_bn_act.default", "fastunet.maxpool2x2.default", "fastunet.upconv2x2.default"} <= set(ops)
    assert "aten.batch_norm.default" not in _targets(program)  # folded into the ops' scale/shift
    x = torch.randn(3, 3, 4, 12)  # dynamic batch and size, down to one 4-pixel block
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
        assert torch.equal(model(example), before)  # the model is unchanged by the export
    # ONNX has no counterpart for the fused ops: a clear error, no file
    with pytest.raises(ValueError, match=r"holds fused fastunet ops \(fastunet\.conv3x3_bn_act.*portable=True"):
        fastunet.export_onnx(program, None, tmp_path / "fused.onnx")
    assert not (tmp_path / "fused.onnx").exists()


@pytest.mark.slow
def test_plain_strict_torch_export_keeps_fastunet_ops(triton_backend):
    """What ``fastunet.export(portable=False)`` does, spelled with torch.export on a fresh model."""
    model = fastunet.UNet(3, 1, **TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,), strict=True)
    assert fastunet_ops(program)
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


@pytest.mark.xfail(
    strict=True,
    reason="non-strict torch.export patches nn.Module.__call__ while tracing and fastunet's guard then "
    "refuses the fused path: the graph is the eager math (use fastunet.export or strict=True)",
)
def test_default_non_strict_torch_export_keeps_fastunet_ops(triton_backend):
    model = fastunet.UNet(3, 1, **TINY).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    assert fastunet_ops(program)


def test_fused_export_needs_the_fused_path():
    model = _model()
    fastunet.set_backend("auto")  # CPU tensors run the eager fallback under "auto"
    with pytest.raises(RuntimeError, match=r"fused path does not run for a cpu input under the 'auto' backend"):
        fastunet.export(model, torch.randn(1, 3, 8, 8), portable=False)
    with pytest.raises(RuntimeError, match=r"UNetReference has only the reference math"):
        fastunet.export(fastunet.UNetReference(3, 1, **TINY), torch.randn(1, 3, 8, 8), portable=False)


def test_fused_export_refuses_a_model_the_guard_refuses(triton_backend):
    model = _model()
    model.conv1.conv[0].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match=r"does not implement this model \(module 'conv1.conv.0' has a forward hook"):
        fastunet.export(model, torch.randn(1, 3, 8, 8), portable=False)


def test_fused_export_of_an_instance_norm_model_fixes_the_batch(triton_backend):
    """An InstanceNorm model's fused path runs one sample at a time: exported with the example's
    shape (the loop unrolled), refused with a dynamic batch."""
    model = fastunet.UNet(3, 1, **TINY, norm="instance").double().eval()
    example = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="one sample at a time, so its batch cannot be symbolic"):
        fastunet.export(model, example, portable=False)
    program = fastunet.export(model, example, portable=False, dynamic=False)
    assert "fastunet.conv3x3_bn_stats.default" in fastunet_ops(program)
    with torch.no_grad():
        assert_close(program.module()(example), model(example), "fp64", "fused export, fixed batch")


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected a fastunet.UNet"):
        fastunet.export(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        fastunet.export(_model(), [1, 3, 8, 8])
    with pytest.raises(ValueError, match="nearest valid size"):  # the model's own input check
        fastunet.export(_model(), torch.randn(1, 3, 6, 8))


# ---------------------------------------------------------------------------- ONNX
@needs_onnx
@pytest.mark.parametrize(
    "activation",
    [pytest.param(a, marks=pytest.mark.slow) for a in ("sigmoid", "softmax", "none")],  # ~7 s each
)
def test_onnx_matches_onnxruntime(tmp_path, activation):
    import numpy as np
    import onnxruntime

    model = _model(out_activation=activation)
    path = tmp_path / "unet.onnx"
    fastunet.export_onnx(model, torch.randn(1, 3, 8, 8), path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("x", ["batch", 3, "height", "width"])
    assert (out.name, out.shape) == ("y", ["batch", 2, "height", "width"])
    for shape in [(1, 3, 8, 8), (3, 3, 4, 20), (2, 3, 32, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@needs_onnx
def test_onnx_of_a_portable_program(tmp_path):
    import onnx

    model = _model()
    program = fastunet.export(model, torch.randn(2, 3, 8, 8), dynamic=False)
    fastunet.export_onnx(program, None, tmp_path / "static.onnx")
    graph = onnx.load(str(tmp_path / "static.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]
    assert not any(node.domain.startswith("fastunet") for node in graph.node)


@needs_onnx
def test_an_interrupted_onnx_export_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "unet.onnx"
    path.write_bytes(b"the user's file")

    def dies_half_way(self, destination, **kwargs):
        Path(destination).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fastunet.export_onnx(_model(), torch.randn(1, 3, 8, 8), path)
    assert path.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]
