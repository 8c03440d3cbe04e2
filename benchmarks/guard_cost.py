#!/usr/bin/env python
"""What ``fastunet.check_fused_support`` (run on every fused forward) costs, on this CPU.

    python benchmarks/guard_cost.py                 # classic UNet(3, 1)
    python benchmarks/guard_cost.py --base 4 --depth 2

Prints microseconds per call (best of several ``timeit`` repeats) for: an unchanged model (the
every-forward case), the first call after a hook was registered anywhere (the 4 hook dicts of
every submodule are read again), a model seen for the first time, the readable check that runs
when the fast one refuses, and the ``self.modules()`` BatchNorm walk the guard replaced. No GPU
needed: the guard only reads Python attributes.
"""

from __future__ import annotations

import argparse
import timeit

import torch
from torch.utils.hooks import RemovableHandle

import fastunet
from fastunet.guard import _MEMO, _explain, check_fused_support


def best_us(fn, number: int, repeat: int = 9) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=64, help="base_channels (64 classic)")
    parser.add_argument("--depth", type=int, default=4, help="depth (4 classic)")
    parser.add_argument("--number", type=int, default=5000, help="calls per timeit repeat")
    args = parser.parse_args()
    model = fastunet.UNet(3, 1, base_channels=args.base, depth=args.depth)

    def after_hook_registration():
        RemovableHandle.next_id += 1  # what registering any hook anywhere does to the stamp
        return check_fused_support(model)

    def first_call():
        _MEMO.clear()
        return check_fused_support(model)

    def old_walk():
        return any(m.training or m.running_mean is None for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    print(f"UNet(3, 1, base_channels={args.base}, depth={args.depth}): {sum(1 for _ in model.modules())} modules")
    for mode in ("eval", "train"):
        model.train(mode == "train")
        assert check_fused_support(model).supported
        rows = [
            ("unchanged model (every forward)", lambda: check_fused_support(model), args.number),
            ("after a hook registration elsewhere", after_hook_registration, args.number),
            ("model seen for the first time", first_call, args.number),
            ("readable check (_explain)", lambda: _explain(model), max(1, args.number // 10)),
            ("replaced: modules() BatchNorm walk", old_walk, max(1, args.number // 10)),
        ]
        for name, fn, number in rows:
            print(f"  {mode:5s}  {name:38s} {best_us(fn, number):8.1f} us")


if __name__ == "__main__":
    main()
