"""Pictures of why per-object true masks matter where animals touch.

Writes ``reports/silhouettes_labels.png``: validation silhouette scenes (seed 12) whose target
touches another animal, one per row: the fixed image with the target's true box (green);
the true masks given as one bool mask of every animal, with the object the pipeline chose
(orange) and the moving mask warped onto it (outline), and its matching Dice against the
target; then the same scene with the true masks given as instance labels (one number per
animal), where the chosen object is the target alone. Both runs use the shipped models, the
moving object's true mask and the data set's default refinement.

    python scripts/silhouette_labels.py [--rows 4]      # a few seconds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registration import metrics, segment  # noqa: E402
from registration.data.silhouettes import SceneGenerator  # noqa: E402
from registration.pipeline import Pipeline  # noqa: E402


def touching(s) -> bool:
    """Whether the target is one 8-connected component with another animal in all_mask."""
    n, lab, _ = segment.components(s.all_mask)
    own = np.unique(lab[s.target_mask])
    return len(own) == 1 and (lab == own[0]).sum() > s.target_mask.sum()


def overlay(ax, s, r, title: str) -> None:
    """The fixed image; the chosen object tinted orange, the target's true mask outlined
    green, the warped moving mask outlined white."""
    rgb = np.repeat(s.fixed[..., None] / 255.0, 3, -1) * 0.6
    obj = r.fixed_mask_full
    rgb[obj] = 0.5 * rgb[obj] + 0.5 * np.array([1.0, 0.55, 0.1])
    ax.imshow(rgb, interpolation="nearest")
    ax.contour(s.target_mask, [0.5], colors=["#2ca02c"], linewidths=1.2)
    ax.contour(r.warped_mask_full, [0.5], colors=["white"], linewidths=0.9)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "reports" / "silhouettes_labels.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained("silhouettes")
    picked = []
    for s in SceneGenerator("val", seed=args.seed).batch(300):
        if not touching(s):
            continue
        rb = pipe.register(s.moving, s.fixed, moving_mask=s.moving_mask, fixed_mask=s.all_mask)
        rl = pipe.register(s.moving, s.fixed, moving_mask=s.moving_mask,
                           fixed_mask=s.all_labels)
        db, dl = (metrics.dice(r.warped_mask_full, s.target_mask) for r in (rb, rl))
        if dl - db > 0.03:              # rows where the labels change the result
            picked.append((s, rb, rl, db, dl))
        if len(picked) == args.rows:
            break
    fig, axes = plt.subplots(len(picked), 4, figsize=(8, 2.1 * len(picked)), squeeze=False)
    for row, (s, rb, rl, db, dl) in zip(axes, picked):
        row[0].imshow(s.moving, cmap="gray")
        row[0].set_title("moving", fontsize=8)
        row[0].axis("off")
        row[1].imshow(s.fixed, cmap="gray")
        x0, y0, x1, y1 = s.box
        row[1].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                       ec="#2ca02c", lw=1.2))
        row[1].set_title("fixed, target's box", fontsize=8)
        row[1].axis("off")
        overlay(row[2], s, rb, f"one bool mask: Dice {db:.2f}")
        overlay(row[3], s, rl, f"instance labels: Dice {dl:.2f}")
    fig.suptitle("Touching animals: chosen object (orange), target (green), warped moving "
                 "mask (white)", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(picked)} rows)")


if __name__ == "__main__":
    main()
