"""Time test-time refinement alone: ``Matcher.refine`` on one pair and in batches.

    python benchmarks/refine_speed.py [--steps 5] [--pairs 200]

The shipped MNIST matcher's one-pass parameters on held-out test pairs, refined against the
fixed mask at 28 px (the matcher's own size) and resized to 64 px (the pipeline's cap,
``pipeline.MAX_REFINE_SIDE``; there the TPS grid is taken on the 28×28 crop and interpolated,
as the pipeline does, or evaluated at every pixel), with ``fold_supersample`` 1 (the default)
and 2. Single-pair
times are medians over ``--pairs`` pairs with the four settings taking turns pair by pair (this
host's speed drifts over minutes); batches of 64 and 256 at 28 px are timed after one warm-up
batch. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registration import checkpoint  # noqa: E402
from registration.data import mnist  # noqa: E402
from registration.evaluate import _table  # noqa: E402
from registration.matcher import Matcher  # noqa: E402
from timing import interleaved_ms  # noqa: E402  (benchmarks/timing.py)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    base = checkpoint.load("mnist", "matcher").eval()
    models = {}
    for sup in (1, 2):
        m = Matcher(dataclasses.replace(base.cfg, fold_supersample=sup))
        m.load_state_dict(base.state_dict())
        models[sup] = m.eval()
    mov, fix = mnist.eval_pairs(max(args.pairs, 256), 0)
    m = torch.from_numpy(mov).float().unsqueeze(1)
    f28 = torch.from_numpy(fix).float().unsqueeze(1)
    f64 = torch.nn.functional.interpolate(f28, size=(64, 64), mode="bilinear",
                                          align_corners=False)
    with torch.no_grad():
        p0 = base.predict(m, f28)
    # at 64 px the TPS grid is by default taken on the 28×28 crop and interpolated (as the
    # pipeline pastes); "exact" evaluates the spline at all 64×64 pixels
    runs = {(size, sup, interp): (
        lambda i, model=models[sup], f=f, interp=interp:
        model.refine(m[i:i + 1], f[i:i + 1], p0[i:i + 1], steps=args.steps,
                     interpolate=interp))
        for size, f in ((28, f28), (64, f64)) for sup in (1, 2)
        for interp in ((True,) if size == 28 else (True, False))}
    ms = interleaved_ms(runs, n=args.pairs)            # warm-up rounds load the compiled loop
    rows = []
    for (size, sup, interp), median_ms in ms.items():
        batch = ""
        if size == 28:
            model = models[sup]
            out = []
            for bs in (64, 256):
                model.refine(m[:bs], f28[:bs], p0[:bs], steps=args.steps)
                t0 = time.perf_counter()
                model.refine(m[:bs], f28[:bs], p0[:bs], steps=args.steps)
                out.append(f"{bs / (time.perf_counter() - t0):,.0f}")
            batch = " / ".join(out)
        grid = "28×28 (its own)" if size == 28 else (
            "28×28, interpolated" if interp else "64×64, exact")
        rows.append([f"{size}×{size}", grid, sup, f"{median_ms:.2f}", batch])
    print(f"Matcher.refine, {args.steps} steps, {args.threads} threads, "
          f"{args.pairs} held-out MNIST pairs\n")
    print(_table(["fixed mask", "TPS grid", "fold_supersample", "ms for one pair (median)",
                  "pairs/s in batches of 64 / 256"], rows))


if __name__ == "__main__":
    main()
