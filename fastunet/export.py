"""``torch.export`` and ONNX export of a U-Net, in two forms.

* **Fused** (``export(model, x, portable=False)``): the graph of the fused path, with the
  ``fastunet::`` ops as single nodes (traced through their fake implementations). It runs
  wherever fastunet is imported and the ops run: ``ep.module()(x)`` gives the model's numbers;
  ``torch.compile``/AOTInductor take the ops as opaque calls. On a GPU that is the ``"auto"``
  backend; on CPU only the ``"triton"`` backend under ``TRITON_INTERPRET=1`` (testing).
* **Portable** (``export(model, x)``, the default): the reference math as plain aten ops
  (``conv2d``, ``batch_norm`` with the running statistics, ``relu``, ``max_pool2d``,
  ``conv_transpose2d``, ``cat``, the activation), which ONNX, ExecuTorch and any other
  ``torch.export`` consumer understand without fastunet. ``export_onnx`` writes it as ONNX.

Both trace the inference forward (the model in eval mode; its mode is restored afterwards).
With ``dynamic=True`` the batch and the image size stay symbolic, H and W as multiples of
``2**depth`` (``16 * Dim("h_blocks")`` for the classic model; see ``export_dynamic_shapes``).

Why the fused form is traced with ``strict=True``: torch's non-strict export (the default of
``torch.export.export``) replaces ``nn.Module.__call__`` on the class while it traces, and the
fused path's guard (``fastunet.guard``) refuses a patched ``Module.__call__``, so a non-strict
trace records the eager path instead: aten ops, no ``fastunet::`` node. The strict (dynamo)
trace patches nothing.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from . import guard as _guard
from .atomic import atomic_files
from .backend import get_backend, set_backend, use_fused
from .reference import UNetReference
from .validation import validate_input

__all__ = ["export", "export_onnx", "export_dynamic_shapes", "fastunet_ops"]


def export_dynamic_shapes(model: UNetReference) -> dict:
    """The ``dynamic_shapes`` argument for ``torch.export.export(model, (x,), ...)``: batch any
    size >= 1, H and W any multiples of ``2**model.depth`` (16 for the classic model).

    ``{"x": {0: Dim("batch"), 2: 16 * Dim("h_blocks"), 3: 16 * Dim("w_blocks")}}``.
    """
    m = 2**model.depth
    return {
        "x": {
            0: Dim("batch", min=1),
            2: m * Dim("h_blocks", min=1),
            3: m * Dim("w_blocks", min=1),
        }
    }


def fastunet_ops(program: ExportedProgram) -> list[str]:
    """The distinct ``fastunet::`` ops called in ``program``'s graph (sorted names, e.g.
    ``"fastunet.conv3x3_bn_act.default"``); empty for a portable (aten-only) program."""
    names = set()
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace == "fastunet":
                names.add(str(node.target))
    return sorted(names)


@contextlib.contextmanager
def _backend(name: str):
    # The backend is process-wide; the portable trace needs the eager math for its duration only.
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _size_oblivious():
    """Shape reasoning that does not specialize a size of 1: the bottleneck of an image of one
    ``2**depth`` block is 1x1, and without this the trace would guard ``H // 16 != 1`` and
    refuse 16-pixel inputs. Private torch config, so absent -> no-op (the export still works,
    for images of >= 2 blocks)."""
    config = getattr(torch.fx.experimental, "_config", None)
    if config is None or not hasattr(config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


def export(
    model: UNetReference,
    example: Tensor,
    *,
    portable: bool = True,
    dynamic: bool = True,
) -> ExportedProgram:
    """``torch.export`` of ``model``'s inference forward.

    Args:
        model: a ``fastunet.UNet`` (or, for ``portable=True``, a ``fastunet.UNetReference``).
        example: an input ``[N, in_ch, H, W]`` on the model's device and dtype (H, W multiples
            of ``2**depth``); with ``dynamic=True`` only its dtype, device and channels are fixed.
        portable: True: an aten-only graph of the reference math (for ONNX, ExecuTorch, ...).
            False: the fused graph with ``fastunet::`` ops (needs fastunet where it runs, and a
            backend that runs the fused path for ``example``: ``"auto"`` on CUDA, or
            ``"triton"``).
        dynamic: batch, H and W symbolic (``export_dynamic_shapes(model)``); False: ``example``'s shape.

    Returns:
        ``torch.export.ExportedProgram``; ``program.module()(x)`` maps ``[N, in_ch, H, W]`` to
        ``[N, out_ch, H, W]`` with the model's output activation.

    Raises:
        RuntimeError: ``portable=False`` and the fused path would not run for ``example``
            (wrong backend or device, a model the fused path does not implement: the reason), or
            ``dynamic=True`` for an InstanceNorm model (its fused path loops over the samples).
    """
    if not isinstance(model, UNetReference):
        raise TypeError(f"expected a fastunet.UNet or fastunet.UNetReference, got {type(model).__name__}")
    # The model's own input check first: its errors name the nearest valid size, where a
    # dynamic-shape trace would only say the size is not of the form 16*h_blocks.
    first = model.conv1.conv[0].weight
    validate_input(example, in_ch=model.in_ch, depth=model.depth, param_dtype=first.dtype, param_device=first.device)
    shapes = export_dynamic_shapes(model) if dynamic else None
    # A dynamic dimension traced at size 1 is specialized to 1 by torch.export: trace a batch
    # of 2 instead (the values never matter, only dtype, device and shape).
    if dynamic and example.shape[0] == 1:
        example = torch.cat([example, example])
    with _eval_mode(model), _size_oblivious():
        if portable:
            with _backend("eager"):
                program = torch.export.export(model, (example,), dynamic_shapes=shapes)
            leaked = fastunet_ops(program)
            if leaked:  # the eager path calls no fastunet op; this would be a bug
                raise AssertionError(f"portable export holds fastunet ops: {leaked}")
            return program
        _check_fused(model, example, dynamic)
        with warnings.catch_warnings():
            # backend.triton_available is functools.cache'd and constant within a process.
            warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")
            program = torch.export.export(model, (example,), dynamic_shapes=shapes, strict=True)
    if not fastunet_ops(program):
        raise RuntimeError(
            "the fused export traced no fastunet op (the model ran its eager path while tracing); "
            "use portable=True for an aten graph"
        )
    return program


def _check_fused(model: UNetReference, example: Tensor, dynamic: bool) -> None:
    from .model import UNet  # deferred: model.py imports the ops and, on first use, triton

    if not isinstance(model, UNet):
        raise RuntimeError(
            f"portable=False exports the fused path of a fastunet.UNet; {type(model).__name__} has only the "
            "reference math (use portable=True)"
        )
    if not use_fused(example):  # raises itself for "triton" on a device the kernels cannot use
        raise RuntimeError(
            f"portable=False: the fused path does not run for a {example.device.type} input under the "
            f"{get_backend()!r} backend (it runs on CUDA tensors, or on CPU tensors with backend 'triton' under "
            "TRITON_INTERPRET=1); export on the GPU, or use portable=True"
        )
    with _eval_mode(model):
        support = _guard.check_fused_support(model)
    if not support.supported:
        where = f"module '{support.module}' {support.reason}" if support.module else support.reason
        raise RuntimeError(f"portable=False: the fused path does not implement this model ({where}); use portable=True")
    if dynamic and model.norm == "instance":
        raise RuntimeError(
            "portable=False, dynamic=True: the fused path runs an InstanceNorm model one sample at a time, so its "
            "batch cannot be symbolic; use dynamic=False (example's shape) or portable=True"
        )


def export_onnx(
    model: UNetReference | ExportedProgram,
    example: Tensor | None,
    f: str | os.PathLike | None,
    *,
    dynamic: bool = True,
    opset_version: int | None = None,
):
    """Write ``model`` as an ONNX file ``f`` (needs the ``export`` extra: onnx, onnxscript).

    Args:
        model: a ``UNet``/``UNetReference`` (exported with ``export(model, example,
            portable=True, dynamic=dynamic)`` first), or a portable ``ExportedProgram`` from
            ``export`` (``example`` and ``dynamic`` are then unused).
        example: an input ``[N, in_ch, H, W]`` (see ``export``); None for a program.
        f: the ``.onnx`` path, or None to only return the program. The file is written whole or
            not at all: an interrupted export leaves a file already at ``f`` as it was.
        dynamic: batch, height and width as symbolic dimensions named ``batch``, ``height``,
            ``width`` (H and W multiples of ``2**depth``: the graph computes any size, the
            model is only defined for those).

    Returns:
        ``torch.onnx.ONNXProgram``: input ``x`` ``[batch, in_ch, height, width]``, output ``y``
        ``[batch, out_ch, height, width]``.

    Raises:
        ValueError: ``model`` is a program holding ``fastunet::`` ops (``portable=False``):
            ONNX has no counterpart for them.
    """
    if isinstance(model, ExportedProgram):
        program = model
        fused = fastunet_ops(program)
        if fused:
            raise ValueError(
                f"this exported program holds fused fastunet ops ({', '.join(fused)}), which ONNX has no "
                "counterpart for (and no ONNX runtime can run); export the model with "
                "fastunet.export(model, x, portable=True) (the default), or call "
                "fastunet.export_onnx(model, x, path) on the model itself"
            )
    else:
        if example is None:
            raise TypeError("export_onnx(model, example, f): an example input is needed to export a model")
        program = export(model, example, portable=True, dynamic=dynamic)
    onnx_program = torch.onnx.export(
        program, f=None, dynamo=True, input_names=["x"], output_names=["y"], opset_version=opset_version
    )
    _name_dims(onnx_program, ("batch", None, "height", "width"))
    if f is not None:
        # Written whole or not at all (with its external-weights file, for a model over 2 GB).
        with atomic_files(f) as staged:
            onnx_program.save(staged)
    return onnx_program


def _name_dims(onnx_program, names: tuple) -> None:
    """Rename the input's symbolic dimensions (torch names them ``s77``, ``16*s38``, ...) to
    ``names`` everywhere they appear on the graph's inputs and outputs."""
    try:
        import onnx_ir as ir
    except ImportError:  # an onnxscript without onnx_ir: keep torch's names
        return
    graph = onnx_program.model.graph
    rename = {}
    for dim, name in zip(graph.inputs[0].shape, names, strict=True):
        if name is not None and isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            rename[dim.value] = name
    for value in (*graph.inputs, *graph.outputs):
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)
