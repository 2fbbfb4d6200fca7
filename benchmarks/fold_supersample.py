"""Refinement's folding penalty judged on the pixel grid or on a finer one.

    python benchmarks/fold_supersample.py

1,000 MNIST validation pairs (tuning data, not test), the shipped matcher, one pass + 5
refinement steps with ``MatcherConfig.fold_supersample`` = 1 (the default), 2 and 4. Prints
Dice, folding on the pixel grid (share of pixels, share of pairs) and the share of pairs that
fold anywhere on a 4× finer grid, and the time for the whole batch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registration import checkpoint  # noqa: E402
from registration.evaluate import _table  # noqa: E402
from registration.losses import jacobian_det  # noqa: E402
from registration.train import MnistPairs  # noqa: E402


def main() -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(2)
    model = checkpoint.load("mnist", "matcher").eval()
    m, f = MnistPairs("val", 3).batch(1000)
    with torch.no_grad():
        p0 = model.predict(m, f)
    model.refine(m[:2], f[:2], p0[:2], steps=1)     # warm-up: loads the compiled loop
    rows = []
    for sup in (1, 2, 4):
        model.cfg.fold_supersample = sup
        t0 = time.perf_counter()
        p = model.refine(m, f, p0, steps=5)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            w, ff = model.warp(m, p) > 0.5, f > 0.5
            inter = (w & ff).sum((1, 2, 3)).float()
            dice = float((2 * inter / (w.sum((1, 2, 3)) + ff.sum((1, 2, 3)))).mean())
            coarse = jacobian_det(model.grid(p, (28, 28))) <= 0
            fine = jacobian_det(model.grid(p, (112, 112))) <= 0
        rows.append([sup, dice, f"{100 * float(coarse.float().mean()):.4f} %",
                     f"{100 * float(coarse.flatten(1).any(1).float().mean()):.1f} %",
                     f"{100 * float(fine.flatten(1).any(1).float().mean()):.1f} %",
                     f"{seconds:.2f}"])
    print(_table(["fold_supersample", "Dice", "folding pixels", "pairs folding",
                  "pairs folding at 4× resolution", "s for 1,000 pairs × 5 steps"], rows))


if __name__ == "__main__":
    main()
