"""The ``fastunet`` command (also ``python -m fastunet``): argument parsing, file reading and
writing; the work is done by the package's functions.

    fastunet predict --weights unet.pt scans/*.png --out masks/ --tile 512 --tta flips
    fastunet bench --device cpu --quick                  # benchmarks/run.py, from a repository checkout
    fastunet tune --batch 16 --size 256 --dtype bf16     # tune the classic model's kernels
    fastunet tune --weights saved/ --mode both           # tune the checkpoint's architecture
    fastunet info milesial.pth                           # what a checkpoint is (--json for scripts)
    fastunet convert unet.weights.h5 saved/              # any checkpoint as a save_pretrained folder

Every command reads every checkpoint ``fastunet.load`` reads (``--weights`` a file or a folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EXAMPLES = """examples:
  fastunet tune --batch 16 --size 256 --dtype bf16
      tune UNet(3, 1) for batch 16 at 256x256 under bf16 autocast, inference
  fastunet tune --mode both --batch 8 --size 512 --dtype fp16
      inference and a training step (forward + backward)
  fastunet tune --weights milesial.pth --size 512
      the architecture of a checkpoint (any format fastunet.load reads: a file or a folder)
  FASTUNET_CACHE_DIR=/data/cache fastunet tune --size 1024 --batch 2
      keep the results somewhere else (default ~/.cache/fastunet)
"""
_PREDICT_EXAMPLES = """examples:
  fastunet predict --weights unet.pt slide.tif photo.png --out results/
      whole images (tiles only when one does not fit in memory); writes results/slide_mask.png
      and results/photo_mask.png
  fastunet predict --weights saved/ scan.png --out results/
      a save_pretrained folder (its config.json gives the architecture and the head); milesial's
      .pth, Keras .h5/.keras files work the same (see fastunet info)
  fastunet predict --weights unet.pt scans/*.png --out masks/ --tile 512 --overlap 0.25 --tta flips \\
      --dtype bf16 --device cuda --save-probs npy
      512x512 tiles, Gaussian blending, 4 flips averaged, bf16 on the GPU; also masks/<name>_probs.npy
  fastunet predict --weights unet.pt --out-ch 4 --out-activation softmax cells.tiff --out out/ \\
      --save-probs tiff --no-mask
      a 4-class model: out/cells_probs.tif, float32 [H, W, 4]

files written, per input NAME.EXT:
  DIR/NAME_mask.png     1 output channel: 255 where the probability >= --threshold, else 0;
                        K channels: the argmax class index 0..K-1 (uint8; uint16 above 256 classes)
  DIR/NAME_probs.npy    with --save-probs npy: float32 [H, W] (1 channel) or [H, W, K]
  DIR/NAME_probs.tif    with --save-probs tiff: the same as a float32 TIFF
  For --out-activation none (logits) the probabilities are sigmoid (1 channel) or softmax (K) of them.

safety:
  An input is never written over; an existing output is replaced only with --overwrite (checked for every
  file before any work). Each file is written under a temporary name in DIR and renamed when complete, so
  an interrupted run leaves no half-written file. An image that cannot be read is reported in one line
  and the others go on. Image sizes are checked before decoding (FASTUNET_LIMITS raises the limits).
  Exit status: 0 all written, 1 some image or the weights failed (one line each, then a summary),
  2 a usage error (one line, nothing done). --debug shows tracebacks.
"""
_BENCH_HELP = """fastunet bench [OPTIONS]: run the benchmark suite, benchmarks/run.py, with OPTIONS.

The suite lives in the repository's benchmarks/ folder (it is not part of the installed package),
so this command needs a checkout: an editable install (pip install -e .) or the current directory
at the repository root. Every option, with its default, is in: fastunet bench --help

examples:
  fastunet bench                                 # GPU: the full inference suite; CPU: the CPU target case
  fastunet bench --device cpu --quick            # a smoke run, under a minute
  fastunet bench --mode predict                  # whole-image predict vs raw tile forwards (and MONAI)
  fastunet bench --mode training --dtype bf16 --batch 8 --size 256
"""


class UsageError(Exception):
    """A problem with the command line or the files it names, found before any work (exit 2)."""


def one_line(exc: BaseException) -> str:
    """An exception as the one line the CLI prints: the package's own errors and the usual
    file errors as their message, anything else with its type and a pointer to ``--debug``."""
    from .errors import FastUNetError
    from .imageio import MissingDependency

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, (FastUNetError, MissingDependency, UsageError, ValueError, OSError)):
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text} (unexpected; rerun with --debug for the traceback)"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_TOP_EXAMPLES = """examples:
  fastunet predict --weights unet.pt scans/*.png --out masks/ --tile 512 --tta flips
      masks for images of any size (see fastunet predict --help)
  fastunet bench --device cpu --quick
      the benchmark suite from a repository checkout (see fastunet bench --help)
  fastunet tune --batch 16 --size 256 --dtype bf16
      tune UNet(3, 1)'s kernels for batch 16 at 256x256 under bf16 autocast (see fastunet tune --help)
  fastunet info unet.weights.h5
      what a checkpoint is: format, architecture, parameters, BatchNorm statistics, fused-path support
  fastunet convert milesial.pth saved/
      any checkpoint as a save_pretrained folder (--to keras-h5 / milesial the other way)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit status 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastunet",
        description="fastunet: a U-Net whose hot paths are fused Triton kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_TOP_EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tune = sub.add_parser(
        "tune",
        help="time the kernels' tile configs for a model and input shape, once per machine",
        description=(
            "Run the model once per mode so every kernel it launches picks its tile config by "
            "timing, and write the picks to the on-disk tuning cache: later processes with the same "
            "shapes (same power-of-two pixel bucket) start with no timing at all. Needs an NVIDIA GPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=_EXAMPLES,
    )
    tune.add_argument("--batch", type=_positive, default=16, help="batch size")
    tune.add_argument("--size", type=_positive, default=256, help="square image size (multiple of 2**depth)")
    tune.add_argument("--height", type=_positive, default=None, help="image height (overrides --size)")
    tune.add_argument("--width", type=_positive, default=None, help="image width (overrides --size)")
    tune.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    tune.add_argument("--mode", choices=["eval", "train", "both"], default="eval", help="what will run")
    add_weights(tune, required=False)
    tune.add_argument("--in-ch", type=_positive, default=None, help="input channels (default: 3, or the checkpoint's)")
    tune.add_argument("--out-ch", type=_positive, default=None,
                      help="output channels (default: 1, or the checkpoint's)")  # fmt: skip
    tune.add_argument("--base-channels", type=_positive, default=None,
                      help="width of the first level (default: 64, or the checkpoint's)")  # fmt: skip
    tune.add_argument("--depth", type=_positive, default=None,
                      help="number of poolings (default: 4, or the checkpoint's)")  # fmt: skip
    tune.add_argument("--device", default="cuda", help="the GPU to tune on, e.g. cuda:1")
    tune.add_argument("--debug", action="store_true", help="show the traceback of an error")
    _add_predict(sub)
    _add_info(sub)
    _add_convert(sub)
    # Listed here for the top-level help only: main() hands `bench ...` to benchmarks/run.py
    # before argparse sees it, so `fastunet bench --help` shows the suite's own options.
    sub.add_parser("bench", help="run the benchmark suite (benchmarks/run.py; needs a repository checkout)",
                   add_help=False)  # fmt: skip
    return parser


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _add_preset_and_head(p: argparse.ArgumentParser) -> None:
    """``--preset`` and ``--out-activation``: what a checkpoint may not record, over what it does."""
    from .reference import ACTIVATIONS, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="architecture options the weights do not show (concatenation order, head, ...): "
                        "needed only for a bare state_dict fastunet.load calls ambiguous (default: from the "
                        "checkpoint)")  # fmt: skip
    p.add_argument("--out-activation", choices=list(ACTIVATIONS), default=None,
                   help="the head the checkpoint was trained with (default: the checkpoint's: its config.json, "
                        "the preset of its format; sigmoid for a bare state_dict)")  # fmt: skip


def add_weights(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--weights PATH``, ``--preset``, ``--out-activation``: a checkpoint in any format
    ``fastunet.load`` reads."""
    need = " (required)" if required else " (default: none, the architecture from the options below)"
    p.add_argument("--weights", required=required, type=Path, metavar="PATH",
                   help="checkpoint: a save_pretrained folder, a .safetensors or torch.save state_dict (fastunet's "
                        "or milesial's keys; {'state_dict': ...} / {'model': ...} wrappers and module. prefixes "
                        f"work), or a Keras .h5 / .weights.h5 / .keras file{need}")  # fmt: skip
    _add_preset_and_head(p)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="what a checkpoint is: format, architecture, parameters, BatchNorm statistics, fused-path support",
        description=(
            "Load a checkpoint with fastunet.load and say what it is: the format detected, the architecture (and "
            "where each option came from: the weights, config.json, the format, the command line), the parameter "
            "count, dtype, whether BatchNorm running statistics are present, and whether the fused path implements "
            "it (the guard's reason if not)."
        ),
        formatter_class=_HelpFormatter,
        epilog="examples:\n  fastunet info saved/\n  fastunet info milesial.pth --json\n",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="checkpoint file or save_pretrained folder")
    _add_preset_and_head(p)
    p.add_argument("--json", action="store_true", help="print a JSON object (for scripts)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint as a save_pretrained folder, a Keras .h5 or a milesial .pth",
        description=(
            "Read SRC (any checkpoint fastunet.load reads) and write it as DST: a save_pretrained folder "
            "(config.json + model.safetensors, default), or with --to keras-h5 zhixuhao's Keras unet() weights "
            "(DST.h5: tf.keras layout; DST.weights.h5: Keras 3's), or with --to milesial milesial's Pytorch-UNet "
            "state_dict (DST.pth, or DST.safetensors), where the architecture is theirs. The weights are copied bit "
            "for bit (Keras: as float32). Never writes over SRC; an existing DST only with --overwrite; every file "
            "under a temporary name, renamed when complete."
        ),
        formatter_class=_HelpFormatter,
        epilog=(
            "examples:\n  fastunet convert milesial.pth saved/\n  fastunet convert unet.weights.h5 saved/\n"
            "  fastunet convert saved/ unet.weights.h5 --to keras-h5\n"
            "  fastunet convert saved/ unet.pth --to milesial\n"
        ),
    )
    p.add_argument("src", type=Path, metavar="SRC", help="checkpoint file or save_pretrained folder")
    p.add_argument("dst", type=Path, metavar="DST", help="where to write it")
    p.add_argument("--to", choices=["pretrained", "keras-h5", "milesial"], default="pretrained",
                   help="the format of DST")  # fmt: skip
    _add_preset_and_head(p)
    p.add_argument("--overwrite", action="store_true", help="replace DST's files if they exist (never SRC's)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _add_predict(sub) -> None:
    from .predict import BLENDS, PAD_MODES

    p = sub.add_parser(
        "predict",
        help="segment image files of any size with a trained checkpoint (masks and probabilities)",
        description=(
            "Run a trained U-Net over PNG/JPEG/BMP (Pillow) and TIFF (tifffile; 16-bit and large, "
            "memory-mapped when uncompressed) images of any size with fastunet.predict, and write a mask "
            "and/or the probabilities per image. The architecture and the head are read "
            "from the checkpoint (any format fastunet.load reads) unless given. Needs Pillow and tifffile: "
            'pip install "fastunet[predict]".'
        ),
        formatter_class=_HelpFormatter,
        epilog=_PREDICT_EXAMPLES,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (.png .jpg .jpeg .bmp .tif .tiff)")
    add_weights(p, required=True)
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output directory, created if missing; existing outputs are not replaced without "
                        "--overwrite (required)")  # fmt: skip
    p.add_argument("--in-ch", type=_positive, default=None, help="input channels (default: from the checkpoint)")
    p.add_argument("--out-ch", type=_positive, default=None, help="output channels (default: from the checkpoint)")
    p.add_argument("--base-channels", type=_positive, default=None,
                   help="width of the first level (default: from the checkpoint)")  # fmt: skip
    p.add_argument("--depth", type=_positive, default=None, help="number of poolings (default: from the checkpoint)")
    p.add_argument("--tile", type=_positive, nargs="+", metavar="N", default=None,
                   help="tile size (N, or H W), multiples of 2**depth (default: none, whole images; tiles "
                        "of up to 1024 only when an image does not fit in memory)")  # fmt: skip
    p.add_argument("--overlap", type=_fraction, default=0.25, help="fraction of a tile its neighbours share")
    p.add_argument("--blend", choices=BLENDS, default="gaussian",
                   help="how overlapping tiles combine: MONAI's Gaussian weights, a plain mean, or each pixel "
                        "from the tile where it is most central")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=8, help="tiles per forward")
    p.add_argument("--tta", choices=["none", "flips", "flips8"], default="none",
                   help="test-time augmentation: 4 flips or all 8 flips/transposes, averaged")  # fmt: skip
    p.add_argument("--pad-mode", choices=PAD_MODES, default="reflect", help="padding at the image border")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available, else cpu)")
    p.add_argument("--threshold", type=_probability, default=0.5,
                   help="mask threshold on the probability, for a 1-channel output")  # fmt: skip
    p.add_argument("--save-probs", choices=["npy", "tiff"], default=None,
                   help="also write the probabilities as .npy or float32 TIFF (default: not written)")  # fmt: skip
    p.add_argument("--no-mask", action="store_true", help="do not write the mask PNG (then --save-probs is needed)")
    p.add_argument("--max-device-mb", type=_positive, default=None,
                   help="memory predict may use on the device, MiB; larger images run a row of tiles at a "
                        "time with the output on the host (default: 80%% of free GPU memory, or half the "
                        "free RAM)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that exist already (default: refuse, naming the first; an input is "
                        "never written over)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line each)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each option's help unless it states its own; epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and ("(default" in action.help or "(required)" in action.help):
            return action.help
        return super()._get_help_string(action)


def tune_model(args: argparse.Namespace):
    """``(model, its description)`` for ``fastunet tune``: the checkpoint ``--weights`` (through
    ``cli_checkpoints.load_model``; sizes given must be its own) or ``UNet(--in-ch, --out-ch,
    preset=--preset, base_channels=..., depth=...)`` with random weights (the timings do not
    depend on the values). On the CPU; a bad checkpoint raises ``CheckpointError``."""
    from .formats import describe_model
    from .model import UNet

    if args.weights is not None:
        from .cli_checkpoints import load_model

        model = load_model(args.weights, args)
    else:
        model = UNet(args.in_ch or 3, args.out_ch or 1, base_channels=args.base_channels or 64, depth=args.depth or 4,
                     preset=args.preset)  # fmt: skip
    options = {**model.options, "in_ch": model.in_ch, "out_ch": model.out_ch}
    return model, describe_model("UNet", options, model.preset)


def _tune(args: argparse.Namespace) -> int:
    from .tuning import tune

    if args.weights is not None:
        from .cli_checkpoints import check_weights_path

        check_weights_path(args.weights)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UsageError(
            f"tuning needs an NVIDIA GPU (device {args.device!r}; torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}): on a CPU fastunet runs the eager path, with nothing to tune"
        )
    h = args.height or args.size
    w = args.width or args.size
    depth = args.depth or 4
    if args.weights is None and (h % 2**depth or w % 2**depth):
        raise UsageError(f"height and width must be multiples of 2**depth = {2**depth}, got {h}x{w}")
    model, described = tune_model(args)
    m = 2**model.depth
    if model.odd_sizes == "error" and (h % m or w % m):
        raise UsageError(f"height and width must be multiples of 2**depth = {m} for {described}, got {h}x{w}")
    model = model.to(device)
    x = torch.randn(args.batch, model.in_ch, h, w, device=device)
    modes = ("eval", "train") if args.mode == "both" else (args.mode,)
    print(
        f"tuning {described} on {torch.cuda.get_device_name(device)}: batch {args.batch}, {h}x{w}, {args.dtype}, "
        f"{args.mode}",
        flush=True,
    )
    report = tune(model, x, modes=modes, dtype=_DTYPES[args.dtype])
    print(report)
    return 0


# --------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace) -> int:
    """Check the command line and the files it names (``UsageError``, exit 2, before any work),
    then ``cli_predict.run``."""
    from . import imageio
    from .cli_predict import plan_outputs, prepare_out_dir, run

    inputs = [Path(p) for p in args.inputs]
    readable = imageio.PILLOW_SUFFIXES + imageio.TIFF_SUFFIXES
    for path in inputs:
        if path.suffix.lower() not in readable:
            raise UsageError(f"{path}: unsupported file type {path.suffix!r} (reads {' '.join(readable)})")
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    stems = {}
    for path in inputs:
        if path.stem in stems:
            raise UsageError(f"{stems[path.stem]} and {path} would write the same output names ({path.stem}_*)")
        stems[path.stem] = path
    if args.no_mask and args.save_probs is None:
        raise UsageError("--no-mask without --save-probs writes nothing")
    if args.tile is not None and len(args.tile) > 2:
        raise UsageError(f"--tile takes N or H W, got {len(args.tile)} numbers")
    try:
        imageio.required_modules(inputs, mask=not args.no_mask, probs=args.save_probs)
    except imageio.MissingDependency as exc:
        raise UsageError(str(exc)) from None
    from .cli_checkpoints import check_weights_path

    check_weights_path(args.weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    if device is None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    plans = plan_outputs(inputs, args.out, mask=not args.no_mask, probs=args.save_probs, overwrite=args.overwrite)
    prepare_out_dir(args.out)
    tile = None if args.tile is None else (args.tile[0], args.tile[-1])
    options = dict(
        tile_size=tile, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size,
        tta=None if args.tta == "none" else args.tta, pad_mode=args.pad_mode, dtype=_DTYPES[args.dtype],
        max_device_bytes=None if args.max_device_mb is None else args.max_device_mb << 20,
    )  # fmt: skip
    return run(args, device, plans, options)


# --------------------------------------------------------------------------- bench
def _bench_script() -> Path | None:
    """benchmarks/run.py of the checkout this package runs from (an editable install), or of
    the current directory; None when neither has one (a wheel install ships no benchmarks)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        script = root / "benchmarks" / "run.py"
        if script.is_file():
            return script
    return None


def _bench(argv: list[str]) -> int:
    script = _bench_script()
    if script is None:
        print(
            "fastunet bench: benchmarks/run.py not found. The benchmark suite is not part of the installed "
            "package: run it from a repository checkout (git clone the fastunet repository, then pip install -e "
            "'.[bench]' there, or cd into the checkout), or run python benchmarks/run.py directly.\n\n" + _BENCH_HELP,
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def main(argv: list[str] | None = None) -> int:
    """Run ``fastunet COMMAND ...``; returns the exit status: 0, 1 when some work failed (each
    failure one line on stderr), 2 for a usage error (one line, before any work). ``--debug``
    lets an error's traceback through instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed (2): a status, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"fastunet {args.command}"
    try:
        if args.command in ("info", "convert"):
            from . import cli_checkpoints

            return getattr(cli_checkpoints, args.command)(args)
        if args.command == "tune":
            return _tune(args)
        return _predict(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
