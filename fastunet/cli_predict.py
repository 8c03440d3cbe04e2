"""``fastunet predict``: image files in, masks and probabilities out (the parser is in ``cli``).

What it promises, checked in this order before any image is read:

* every input exists and has a readable suffix, and no two inputs share output names;
* no output is an input (never written over, ``--overwrite`` or not) and no output exists
  already unless ``--overwrite`` (the first such file named);
* ``--out`` is a folder that can be written (created if missing);
* the weights load (one function, ``cli_checkpoints.load_model``, through ``fastunet.load``: any
  format, a file or a folder, the architecture from the weights and what the file records,
  checked on the meta device before anything is allocated, the values validated).

Then each image is read, run and written on its own: a file that fails is reported in one line
and the rest go on; the exit status is 1 with a summary if any failed. Every output is written to
a temporary name in ``--out`` and renamed when complete (``fastunet.atomic``), so an interrupted
run leaves no half-written file under a final name. A memory-mapped input (an uncompressed TIFF)
gets memory-mapped probabilities (the ``--save-probs`` file, or a scratch file in ``--out``
removed afterwards), and masks are written a band of rows at a time: its size is bounded by the
disk, not the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError, one_line
from .cli_checkpoints import load_model

__all__ = ["OutputPlan", "plan_outputs", "prepare_out_dir", "load_model", "predict_file", "run"]


# --------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class OutputPlan:
    """The files one input becomes: the mask PNG and the probabilities file (None: not written)."""

    source: Path
    mask: Path | None
    probs: Path | None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.mask, self.probs) if p is not None]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links, ``..`` and hard links)."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def plan_outputs(inputs: list[Path], out: Path, *, mask: bool, probs: str | None, overwrite: bool) -> list[OutputPlan]:
    """The output files of each input, checked: none is an input, none exists unless
    ``overwrite``, none is a folder. Raises ``UsageError`` naming the first offending file."""
    suffix = {"npy": ".npy", "tiff": ".tif", None: None}[probs]
    plans = [
        OutputPlan(
            source=path,
            mask=out / f"{path.stem}_mask.png" if mask else None,
            probs=out / f"{path.stem}_probs{suffix}" if suffix else None,
        )
        for path in inputs
    ]
    for plan in plans:
        for target in plan.paths:
            for source in inputs:
                if _same_file(target, source):
                    raise UsageError(
                        f"{target} (an output of {plan.source.name}) is also an input: refusing to write over an "
                        "input, with --overwrite or not (choose another --out)"
                    )
            if target.is_dir():
                raise UsageError(f"{target} (an output of {plan.source.name}) is a folder")
            if target.exists() and not overwrite:
                raise UsageError(
                    f"{target} exists (an output of {plan.source.name}): pass --overwrite to replace it, or choose "
                    "another --out"
                )
    return plans


def prepare_out_dir(out: Path, what: str = "--out") -> None:
    """Create ``out`` if missing and check a file can be created in it (a real attempt: the
    permission bits do not tell for root, read-only mounts or quotas). Raises ``UsageError``
    naming it as ``what``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        from .atomic import scratch_path

        with scratch_path(out, ".probe"):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {out} cannot be written: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- one image
def _layout_is_chw(image, in_ch: int) -> bool:
    return image.ndim == 3 and image.shape[-1] != in_ch


def _hwk_view(out, image, in_ch: int, k: int):
    """The probabilities file ([H, W] or [H, W, K]) seen in the layout predict returns for
    ``image`` (a view: predict writes straight into the file)."""
    if image.ndim == 2:
        return out
    if _layout_is_chw(image, in_ch):
        return out[None] if k == 1 else out.transpose(2, 0, 1)
    return out[..., None] if k == 1 else out


def _as_hw(result, image, in_ch: int, k: int):
    """predict's result as [H, W] (one channel) or [H, W, K]."""
    if _layout_is_chw(image, in_ch):
        result = result.transpose(1, 2, 0)
    if k == 1 and result.ndim == 3:
        result = result[..., 0]
    return result


def _activate_in_place(probs, k: int) -> None:
    """Logits to probabilities, a band of rows at a time (``probs`` may be memory-mapped)."""
    for y in range(0, probs.shape[0], 1024):
        band = torch.from_numpy(probs[y : y + 1024])
        if k == 1:
            band.sigmoid_()
        else:
            band.copy_(torch.softmax(band, dim=-1))


def _image_size(image: np.ndarray, in_ch: int) -> tuple[int, int]:
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == in_ch):
        return image.shape[0], image.shape[1]
    if image.ndim == 3 and image.shape[0] == in_ch:  # a planar (CHW) TIFF
        return image.shape[1], image.shape[2]
    raise ValueError(f"the model takes {in_ch} channel(s), the image has shape {image.shape}")


def _run_into(model, image, probs_path: Path | None, fmt: str, mask_path: Path | None, args, options, progress):
    """Run ``predict`` on ``image`` into a new probabilities file at ``probs_path`` (None: in
    memory) and write the mask to ``mask_path`` (None: none). Every memory map it opens is gone
    when it returns, so the caller can rename the file (Windows cannot rename a mapped file)."""
    from . import imageio
    from .predict import predict

    h, w = _image_size(image, model.in_ch)
    k = model.out_ch
    out = None if probs_path is None else imageio.open_probs(probs_path, (h, w) if k == 1 else (h, w, k), fmt)
    hwk = _hwk_view(out, image, model.in_ch, k) if out is not None else None
    result = predict(model, image, out=hwk, progress=progress, **options)
    probs = out if out is not None else _as_hw(result, image, model.in_ch, k)
    if model.out_activation == "none":
        _activate_in_place(probs, k)
    if out is not None:
        out.flush()
    if mask_path is not None:
        imageio.write_mask(mask_path, probs, args.threshold)


def predict_file(model, plan: OutputPlan, args: argparse.Namespace, options: dict, progress: bool) -> str:
    """Read ``plan.source``, run ``predict`` and write ``plan``'s files, each under a temporary
    name renamed when complete. Returns the line reporting it."""
    from . import imageio
    from .atomic import atomic_path, scratch_path

    t0 = time.perf_counter()
    image = imageio.read_image(plan.source, model.in_ch)
    h, w = _image_size(image, model.in_ch)
    with contextlib.ExitStack() as files:
        probs_path, fmt = None, args.save_probs
        if plan.probs is not None:
            probs_path = files.enter_context(atomic_path(plan.probs))
        elif imageio.is_mapped(image):  # a result the size of the input would not fit memory either
            probs_path, fmt = files.enter_context(scratch_path(args.out, ".npy")), "npy"
        mask_path = files.enter_context(atomic_path(plan.mask)) if plan.mask is not None else None
        _run_into(model, image, probs_path, fmt, mask_path, args, options, progress)
    written = ", ".join(map(str, plan.paths))
    return f"{plan.source}: {h}x{w} -> {written} ({time.perf_counter() - t0:.1f} s)"


# --------------------------------------------------------------------------- the command
class _Reporter:
    """Lines for the user: progress on stdout, warnings and errors on stderr, through the tqdm
    bar over images when there is one (so the bar is not broken)."""

    def __init__(self, total: int, progress: bool):
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the bars are a nicety: plain lines instead
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="images", unit="image", dynamic_ncols=True)

    def line(self, text: str, *, error: bool = False) -> None:
        stream = sys.stderr if error else sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace, device: torch.device, plans: list[OutputPlan], options: dict) -> int:
    """Load the weights, then each image on its own. Returns the exit status: 0, or 1 when the
    weights or any image failed (each failure reported in one line, then a summary)."""
    prefix = "fastunet predict"
    try:
        model = load_model(args.weights, args).to(device)
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prefix}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    m = 2**model.depth
    tile = options.get("tile_size")
    if tile is not None and any(t % m for t in tile):
        raise UsageError(f"--tile must be a multiple of 2**depth = {m}, got {' '.join(map(str, args.tile))}")
    progress = not args.no_progress
    report = _Reporter(len(plans), progress)
    failed = []
    try:
        for plan in plans:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    message = predict_file(model, plan, args, options, progress and report.bar is not None)
                for text in dict.fromkeys(str(w.message).removeprefix("predict: ") for w in caught):
                    report.line(f"{prefix}: warning: {plan.source}: {text}", error=True)
                report.line(message)
            except Exception as exc:
                if args.debug:
                    raise
                failed.append(plan.source)
                text = one_line(exc)
                where = "" if text.startswith(str(plan.source)) else f"{plan.source}: "
                report.line(f"{prefix}: error: {where}{text}", error=True)
            report.step()
    finally:
        report.close()
    if failed:
        names = ", ".join(map(str, failed[:10])) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        print(f"{prefix}: {len(failed)} of {len(plans)} image(s) failed: {names}", file=sys.stderr)
        return 1
    return 0
