"""The CLI's checkpoints: ``load_model`` (the one weight-loading function of every command, through
``fastunet.load``), ``fastunet convert`` and ``fastunet info`` (the parsers are in ``cli``).

``convert SRC DST`` writes any checkpoint ``fastunet.load`` reads as a ``save_pretrained`` folder,
or with ``--to keras-h5`` / ``--to milesial`` as the other ecosystems' files where the
architecture is theirs (``fastunet.writers``). Before any work: SRC exists, no output is an input
(refused with ``--overwrite`` or not) and none exists unless ``--overwrite``. A new folder is
written under a temporary name and renamed whole; every file under a temporary name and renamed
when complete: an interrupted run leaves the previous files or none.

``info PATH`` prints what ``fastunet.load`` finds: the format, the architecture and where each
option came from, the parameter count, dtype, BatchNorm statistics, and whether the fused path
implements the model (``fastunet.check_fused_support``, the guard's reason if not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch

from .cli import UsageError

__all__ = ["ARCH_OPTIONS", "load_model", "convert", "info", "describe"]

#: The command-line options that go to ``fastunet.load`` as architecture options (None: not given).
ARCH_OPTIONS = ("in_ch", "out_ch", "base_channels", "depth", "out_activation")


def check_weights_path(path: Path, flag: str = "--weights") -> None:
    """A usage error (exit 2, before any work) unless ``path`` is a file or a folder."""
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file or folder")


def load_model(path: Path, args: argparse.Namespace):
    """The ``fastunet.UNet`` in the checkpoint at ``path`` (any format ``fastunet.load`` reads, a
    file or a folder), on the CPU in eval mode: ``--preset`` and the architecture options given
    on the command line (``ARCH_OPTIONS``, where the command has them) over what the file says.
    Raises ``CheckpointError`` / ``LimitError`` with one line naming the file and the problem."""
    from .formats import load

    options = {key: getattr(args, key) for key in ARCH_OPTIONS if getattr(args, key, None) is not None}
    return load(path, preset=getattr(args, "preset", None), **options)


# --------------------------------------------------------------------------- info
def _batchnorm(model) -> dict:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return {"layers": 0, "statistics": "none"}
    tracked = [m for m in norms if m.running_mean is not None]
    if not tracked:
        return {"layers": len(norms), "statistics": "absent"}
    initial = all(
        bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in tracked
    )  # what a BatchNorm starts with: never updated by a training step
    batches = sorted({int(m.num_batches_tracked) for m in tracked if m.num_batches_tracked is not None})
    return {"layers": len(norms), "statistics": "initial" if initial else "present", "num_batches_tracked": batches}


def _fused(model) -> dict:
    from .guard import check_fused_support

    verdicts = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        support = check_fused_support(model)
        verdicts[mode] = {"supported": support.supported, "module": support.module, "reason": support.reason}
    model.eval()
    return verdicts


def describe(path: Path, args: argparse.Namespace) -> dict:
    """What ``fastunet info`` reports about the checkpoint at ``path``, as a JSON-ready dict."""
    from .formats import build, describe_model, read, resolve

    options = {key: getattr(args, key) for key in ARCH_OPTIONS if getattr(args, key, None) is not None}
    ck = read(path)
    resolved = resolve(ck, args.preset, options)
    model = build(ck, preset=args.preset, **options)
    params = list(model.parameters())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    first = model.conv1.conv[0].weight
    return {
        "path": str(path),
        "format": ck.format,
        "container": ck.container,
        "model": describe_model(
            "UNet", {**model.options, "in_ch": model.in_ch, "out_ch": model.out_ch}, resolved.preset
        ),  # fmt: skip
        "preset": resolved.preset,
        "options": {"in_ch": model.in_ch, "out_ch": model.out_ch, **model.options},
        "origin": resolved.origin,
        "parameters": sum(p.numel() for p in params),
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "dtype": str(first.dtype).removeprefix("torch."),
        "batchnorm": _batchnorm(model),
        "fused": _fused(model),
        "gpu": torch.cuda.is_available(),
        "notes": ck.notes,
    }


def _origin_lines(report: dict) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key, value in report["options"].items():
        groups.setdefault(report["origin"].get(key, "weights"), []).append(f"{key}={value!r}")
    labels = {"weights": "from the weights", "config.json": "from config.json", "format": "from the format",
              "weights' preset": "the preset the weights' shapes match", "preset": "from --preset",
              "argument": "from the command line", "default": "classic defaults"}  # fmt: skip
    return [f"{labels.get(origin, origin)}: {', '.join(items)}" for origin, items in groups.items()]


def _fused_line(fused: dict, gpu: bool) -> str:
    parts = []
    for mode, label in (("eval", "inference"), ("train", "training")):
        v = fused[mode]
        if v["supported"]:
            parts.append(f"{label} supported")
        else:
            where = f"module '{v['module']}' " if v["module"] else ""
            parts.append(f"{label} NOT supported ({where}{v['reason']}): runs the eager path")
    where = "" if gpu else " (the fused kernels need an NVIDIA GPU; here the CPU path runs)"
    return "; ".join(parts) + where


_FORMATS = {"pretrained": "{}", "classic": "state_dict in fastunet's keys, {}",
            "milesial": "milesial Pytorch-UNet state_dict, {}", "keras": "zhixuhao's Keras unet(), {}"}  # fmt: skip


def format_report(report: dict) -> str:
    """``describe``'s dict as the lines ``fastunet info`` prints."""
    bn = report["batchnorm"]
    if bn["statistics"] == "none" and report["options"]["norm"] == "instance":
        norm = "none (InstanceNorm layers: each sample normalized by its own statistics, nothing stored)"
    elif bn["statistics"] == "none":
        norm = "none (no BatchNorm layers)"
    elif bn["statistics"] == "initial":
        norm = (f"{bn['layers']} layers, running statistics present but at their initial values (mean 0, var 1): "
                "never updated by training")  # fmt: skip
    else:
        counts = bn.get("num_batches_tracked") or []
        tracked = f" (num_batches_tracked {', '.join(map(str, counts))})" if counts else ""
        norm = f"{bn['layers']} layers, running statistics present{tracked}"
    lines = [
        str(report["path"]),
        f"  format:      {_FORMATS[report['format']].format(report['container'])}",
        f"  model:       {report['model']}",
        f"  preset:      {report['preset'] or 'none (its own options)'}",
        *(f"  options:     {line}" if i == 0 else f"               {line}" for i, line in
          enumerate(_origin_lines(report))),
        f"  parameters:  {report['parameters']:,} ({report['tensors']} tensors with the buffers, "
        f"{report['bytes'] / 2**20:.2f} MiB)",
        f"  dtype:       {report['dtype']}",
        f"  batchnorm:   {norm}",
        f"  fused path:  {_fused_line(report['fused'], report['gpu'])}",
    ]  # fmt: skip
    lines += [f"  note:        {note}" for note in report["notes"]]
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    """``fastunet info PATH [--json]``: exit 0, or 1 with one line when it does not load."""
    check_weights_path(args.path, "PATH")
    report = describe(args.path, args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# --------------------------------------------------------------------------- convert
_SUFFIXES = {"keras-h5": (".h5",), "milesial": (".pth", ".pt", ".safetensors")}


def _inputs(src: Path) -> list[Path]:
    if src.is_dir():
        return [p for p in src.iterdir() if p.is_file()]
    return [src]


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def plan_convert(src: Path, dst: Path, to: str, overwrite: bool) -> list[Path]:
    """The files ``convert`` will write, checked (``UsageError``, before any work): DST of a kind
    the target writes, no output an input, none existing unless ``overwrite``."""
    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME

    if to == "pretrained":
        if dst.exists() and not dst.is_dir():
            raise UsageError(f"{dst} is a file; a save_pretrained checkpoint is a folder (or use --to)")
        outputs = [dst / WEIGHTS_NAME, dst / CONFIG_NAME]
    else:
        if not dst.name.lower().endswith(_SUFFIXES[to]):
            names = {
                "keras-h5": "NAME.h5 (tf.keras save_weights layout) or NAME.weights.h5 (Keras 3's)",
                "milesial": "NAME.pth (torch.save, what milesial's predict.py loads) or NAME.safetensors",
            }
            raise UsageError(f"--to {to} writes {names[to]}, not {dst.name}")  # fmt: skip
        if dst.is_dir():
            raise UsageError(f"{dst} is a folder; --to {to} writes a file")
        outputs = [dst]
    for target in outputs:
        if any(_same_file(target, source) for source in _inputs(src) if target.exists()):
            raise UsageError(f"{target} is the input {src}: refusing to write over an input, with --overwrite or not")
        if target.exists() and not overwrite:
            raise UsageError(f"{target} exists: pass --overwrite to replace it, or choose another DST")
    return outputs


def _write_pretrained(model, dst: Path) -> None:
    from .checkpoint import save_pretrained

    if dst.exists():  # an existing folder: each file replaced atomically, the config last
        save_pretrained(model, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    try:  # a new folder appears whole or not at all
        save_pretrained(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(args: argparse.Namespace) -> int:
    """``fastunet convert SRC DST [--to ...]``: exit 0 written, 1 the checkpoint does not load or
    has no such file (one line), 2 a usage error (before any work)."""
    from .cli_predict import prepare_out_dir
    from .writers import incompatibility, save_keras_h5, save_milesial, unrecorded

    check_weights_path(args.src, "SRC")
    plan_convert(args.src, args.dst, args.to, args.overwrite)
    # A new folder is written next to its final name and renamed: its parent must take files.
    prepare_out_dir(args.dst if args.to == "pretrained" and args.dst.is_dir() else args.dst.parent, "DST's folder")
    if args.to == "keras-h5":
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise UsageError("--to keras-h5 needs h5py: pip install 'fastunet[keras]'") from None
    model = load_model(args.src, args)
    prog = "fastunet convert"
    if args.to == "pretrained":
        _write_pretrained(model, args.dst)
    else:
        problem = incompatibility(model, args.to)
        if problem:
            print(f"{prog}: error: {args.src} cannot be written --to {args.to}: {problem}", file=sys.stderr)
            return 1
        (save_keras_h5 if args.to == "keras-h5" else save_milesial)(model, args.dst)
        lost = unrecorded(model, args.to)
        if lost:
            hint = ", ".join(item.split(" ")[0] for item in lost)
            print(f"{prog}: warning: a {args.to} file does not record {', '.join(lost)}: load it back with {hint}",
                  file=sys.stderr)  # fmt: skip
    from .formats import describe_model

    described = describe_model("UNet", {**model.options, "in_ch": model.in_ch, "out_ch": model.out_ch}, model.preset)
    print(f"{args.src} -> {args.dst} ({args.to}): {described}")
    return 0
