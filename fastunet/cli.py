"""The ``fastunet`` command (also ``python -m fastunet``): argument parsing only; the work is done
by the package's functions.

    fastunet tune --batch 16 --size 256 --dtype bf16     # tune the classic model's kernels
    fastunet tune --mode both --base-channels 32 --depth 4 --in-ch 1 --out-ch 2
"""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EXAMPLES = """examples:
  fastunet tune --batch 16 --size 256 --dtype bf16
      tune UNet(3, 1) for batch 16 at 256x256 under bf16 autocast, inference
  fastunet tune --mode both --batch 8 --size 512 --dtype fp16
      inference and a training step (forward + backward)
  FASTUNET_CACHE_DIR=/data/cache fastunet tune --size 1024 --batch 2
      keep the results somewhere else (default ~/.cache/fastunet)
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastunet",
        description="fastunet: a U-Net whose hot paths are fused Triton kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXAMPLES,
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
    tune.add_argument("--in-ch", type=_positive, default=3, help="input channels")
    tune.add_argument("--out-ch", type=_positive, default=1, help="output channels (classes)")
    tune.add_argument("--base-channels", type=_positive, default=64, help="width of the first level")
    tune.add_argument("--depth", type=_positive, default=4, help="number of poolings")
    tune.add_argument("--device", default="cuda", help="the GPU to tune on, e.g. cuda:1")
    return parser


def _tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .model import UNet
    from .tuning import tune

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        parser.error(
            f"tuning needs an NVIDIA GPU (device {args.device!r}; torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}): on a CPU fastunet runs the eager path, with nothing to tune"
        )
    h = args.height or args.size
    w = args.width or args.size
    m = 2**args.depth
    if h % m or w % m:
        parser.error(f"height and width must be multiples of 2**depth = {m}, got {h}x{w}")
    model = UNet(args.in_ch, args.out_ch, base_channels=args.base_channels, depth=args.depth).to(device)
    x = torch.randn(args.batch, args.in_ch, h, w, device=device)
    modes = ("eval", "train") if args.mode == "both" else (args.mode,)
    print(
        f"tuning UNet({args.in_ch}, {args.out_ch}, base_channels={args.base_channels}, depth={args.depth}) "
        f"on {torch.cuda.get_device_name(device)}: batch {args.batch}, {h}x{w}, {args.dtype}, {args.mode}",
        flush=True,
    )
    report = tune(model, x, modes=modes, dtype=_DTYPES[args.dtype])
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune":
        return _tune(args, parser)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
