#!/usr/bin/env python
"""Bytes saved for backward by one training forward: fastunet's fused path (default and
``recompute=True``) vs the reference, and the training FLOPs recompute costs.

    python benchmarks/activation_memory.py                      # UNet(3, 1), batch 2, 64 and 128
    python benchmarks/activation_memory.py --size 256 --batch 1 --json out.json

Counts, with ``fastunet.memory.saved_tensor_bytes``, the distinct storages autograd keeps
alive between forward and backward (parameters and the input excluded). Recompute's FLOPs:
a training step is 3 forwards (``benchmarks/flops.py``'s convention) plus, with recompute, one
more forward of each DoubleConv's first conv (``conv*.0``), the convs its backward reruns
(``tests/test_recompute.py`` checks that count against ``torch.utils.flop_counter``). Runs on CPU in float64,
where fastunet's ops use their eager composites: the same tensors are saved as on the GPU (the
kernels and the composites save identical inputs), so the byte count is the GPU's for a
float64 model; see docs/training.md for how it scales to 16-bit (the reference's int64 pool indices
do not shrink, so the ratio only improves). No timing: nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the "triton" backend take CPU tensors

import torch  # noqa: E402

import fastunet  # noqa: E402
from fastunet.atomic import atomic_path  # noqa: E402
from fastunet.memory import saved_tensor_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import TRAINING_FLOP_FACTOR, unet_layers  # noqa: E402


def recompute_flops(batch: int, size: int, base_channels: int, depth: int) -> tuple[int, int]:
    """``(training FLOPs, extra FLOPs with recompute=True)`` of the classic-shaped ``UNet(3, 1)``."""
    layers = unet_layers(3, 1, base_channels=base_channels, depth=depth, batch=batch, height=size)
    training = TRAINING_FLOP_FACTOR * sum(spec.flops for spec in layers)
    return training, sum(spec.flops for spec in layers if spec.name.endswith(".0"))


def measure(batch: int, size: int, base_channels: int, depth: int, seed: int = 0) -> dict:
    """Saved bytes of the reference and of fastunet (default, ``recompute=True``) for one float64
    training forward, and the training FLOPs with and without recompute."""
    torch.manual_seed(seed)
    ref = fastunet.UNetReference(3, 1, base_channels=base_channels, depth=depth).double().train()
    model = fastunet.UNet(3, 1, base_channels=base_channels, depth=depth).double().train()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    before = fastunet.get_backend()
    try:
        fastunet.set_backend("eager")
        reference = saved_tensor_bytes(lambda: ref(x), [*ref.parameters(), x])
        fastunet.set_backend("triton")
        ours = saved_tensor_bytes(lambda: model(x), [*model.parameters(), x])
        model.recompute = True
        recomputed = saved_tensor_bytes(lambda: model(x), [*model.parameters(), x])
    finally:
        fastunet.set_backend(before)
    training, extra = recompute_flops(batch, size, base_channels, depth)
    return {
        "batch": batch,
        "size": size,
        "base_channels": base_channels,
        "depth": depth,
        "dtype": "fp64",
        "reference_bytes": reference,
        "fastunet_bytes": ours,
        "ratio": ours / reference,
        "recompute_bytes": recomputed,
        "recompute_ratio": recomputed / reference,
        "training_flops": training,
        "recompute_training_flops": training + extra,
        "recompute_flops_ratio": (training + extra) / training,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs="+", default=[64, 128])
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = [measure(args.batch, s, args.base_channels, args.depth) for s in args.size]
    for r in rows:
        print(
            f"batch {r['batch']}, {r['size']}x{r['size']}, base {r['base_channels']}: reference "
            f"{r['reference_bytes'] / 2**20:.1f} MiB, fastunet {r['fastunet_bytes'] / 2**20:.1f} MiB, "
            f"ratio {r['ratio']:.3f}; recompute {r['recompute_bytes'] / 2**20:.1f} MiB, ratio "
            f"{r['recompute_ratio']:.3f} at {r['recompute_flops_ratio']:.3f}x the training FLOPs "
            f"({r['recompute_training_flops'] / 1e9:.1f} vs {r['training_flops'] / 1e9:.1f} GFLOP)"
        )
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
