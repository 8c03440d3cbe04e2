#!/usr/bin/env python
"""docs/predict.md's picture: an image, the tile grid ``fastunet.predict`` lays over it, and
the mask it returns.

    python examples/predict_demo.py                  # writes docs/predict_demo.png (seconds on a CPU)

The image is the Grace Hopper portrait that matplotlib ships as sample data. The model is a
small ``fastunet.UNet`` that this script trains on CPU for a few seconds to reproduce a
colour rule, "blue pixels" (blue above 0.35 and at least 0.12 above red: the backdrop and the
flag's field): a stand-in for a real segmentation model, chosen because its answer can be
checked. The right panel compares the mask with the rule (IoU in its title).

Needs matplotlib and Pillow (``pip install -e ".[test]"`` has both).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

import fastunet
from fastunet.predict import tile_starts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_image() -> np.ndarray:
    """``[H, W, 3]`` uint8: matplotlib's sample portrait (600 x 512)."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def rule(rgb: torch.Tensor) -> torch.Tensor:
    """The target: ``[.., 3, H, W]`` in [0, 1] -> ``[.., 1, H, W]`` 0/1, blue pixels."""
    r, b = rgb[..., 0:1, :, :], rgb[..., 2:3, :, :]
    return ((b > 0.35) & (b - r > 0.12)).float()


def train(image: torch.Tensor, steps: int, seed: int) -> fastunet.UNet:
    """A UNet(3, 1, base_channels=4, depth=2) fitted to ``rule`` on random 48x48 crops."""
    torch.manual_seed(seed)
    model = fastunet.UNet(3, 1, base_channels=4, depth=2, out_activation="none").train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    _, h, w = image.shape
    for _ in range(steps):
        ys = torch.randint(0, h - 48, (8,))
        xs = torch.randint(0, w - 48, (8,))
        x = torch.stack([image[:, y : y + 48, x : x + 48] for y, x in zip(ys.tolist(), xs.tolist(), strict=True)])
        loss = loss_fn(model(x), rule(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The same weights behind a sigmoid head: predict then returns probabilities.
    trained = fastunet.UNet(3, 1, base_channels=4, depth=2)
    trained.load_state_dict(model.state_dict())
    return trained.eval()


def figure(rgb: np.ndarray, probs: np.ndarray, target: np.ndarray, tile: int, overlap: float, path: Path) -> None:
    h, w = probs.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    mask = probs >= 0.5
    iou = (mask & target).sum() / max((mask | target).sum(), 1)
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 5.2))
    ax = axes[0]
    ax.imshow(rgb)
    colors = plt.cm.tab10.colors
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            inset = 1.5 * ((i + j) % 2)  # neighbouring tiles overlap: a small inset keeps both edges visible
            ax.add_patch(Rectangle((x + inset - 0.5, y + inset - 0.5), tile - 2 * inset, tile - 2 * inset,
                                   fill=False, lw=1.6, ec=colors[(i * len(xs) + j) % 10], alpha=0.9))  # fmt: skip
    ax.set_title(f"input {h}x{w}: {len(ys) * len(xs)} tiles of {tile}x{tile}, overlap {overlap}", fontsize=9)
    axes[1].imshow(probs, cmap="magma", vmin=0, vmax=1)
    axes[1].set_title("fastunet.predict: probability (Gaussian blend)", fontsize=9)
    overlay = rgb.astype(np.float32) / 255 * 0.45
    overlay[mask] = (0.2, 0.85, 1.0)
    overlay[mask & ~target] = (1.0, 0.25, 0.2)  # false positives in red
    overlay[~mask & target] = (1.0, 0.85, 0.1)  # misses in yellow
    axes[2].imshow(overlay)
    axes[2].set_title(f"mask (p >= 0.5) vs the colour rule: IoU {iou:.3f}\ncyan: agree, red: extra, yellow: missed",
                      fontsize=9)  # fmt: skip
    for a in axes:
        a.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    from PIL import Image

    # A palette PNG: a photo in 256 colours is a fraction of the RGB file's size.
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buf).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "predict_demo.png", help="the PNG to write")
    p.add_argument("--steps", type=int, default=200, help="training steps (batch 8 of 48x48 crops)")
    p.add_argument("--tile", type=int, default=192, help="tile size (a multiple of 4)")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny convolutions: one thread is as fast, and immune to a busy machine
    rgb = load_image()
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    t0 = time.perf_counter()
    model = train(image, args.steps, args.seed)
    t1 = time.perf_counter()
    probs = fastunet.predict(model, rgb, tile_size=args.tile, overlap=args.overlap)[..., 0]  # uint8 HWC in
    t2 = time.perf_counter()
    target = rule(image[None])[0, 0].bool().numpy()
    figure(rgb, probs, target, args.tile, args.overlap, args.out)
    print(f"trained {args.steps} steps in {t1 - t0:.1f} s, predict {probs.shape[0]}x{probs.shape[1]} in "
          f"{t2 - t1:.2f} s; wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")  # fmt: skip


if __name__ == "__main__":
    main()
