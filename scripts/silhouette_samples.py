"""Show the silhouette scenes, and how far a plain threshold gets on them.

Writes ``reports/silhouette_scenes.png``: 8 held-out scenes (test rows, seed 0), one per row:
the moving image with its animal's outline, the fixed image with the target's true box, the
fixed object-centric crop (margin 1.4 around the true box), the true mask in that crop, and
Otsu's mask of the crop (bright = object, as ``registration.segment.foreground``).

It also scores Otsu against the true mask on the fixed crops of ``--n`` test scenes and
writes ``reports/silhouette_otsu.json``: Dice of Otsu's bright-object mask; of the better of
it and its inverse (an oracle that knows each scene's polarity); and of the MNIST pipeline's
threshold segmenter (Otsu, then the components that best fit the box) given the true box.

    python scripts/silhouette_samples.py            # ~10 s on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registration.data import silhouettes  # noqa: E402
from registration.segment import foreground, select_best_fit  # noqa: E402
from registration.segnet import object_crop, square_around  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def otsu_scores(scenes, size: int = 64, margin: float = 1.4) -> dict:
    bright, oracle, fit = [], [], []
    for s in scenes:
        crop, truth = object_crop(s.fixed, s.target_mask, s.box, size, margin)
        fg = foreground(crop)
        bright.append(dice(fg, truth))
        oracle.append(max(bright[-1], dice(~fg, truth)))
        # the MNIST pipeline's segmenter, given the *true* box: Otsu + best-fitting components
        sq = square_around(s.box, margin)
        k = (sq[2] - sq[0]) / size
        box_in_crop = (np.asarray(s.box) - np.array(sq[:2] * 2)) / k
        fit.append(dice(select_best_fit(fg, box_in_crop), truth))
    summary = {}
    for name, v in (("otsu_bright", bright), ("otsu_best_polarity", oracle),
                    ("otsu_best_fit_true_box", fit)):
        v = np.asarray(v)
        summary[name] = {"mean_dice": round(float(v.mean()), 4),
                         "median_dice": round(float(np.median(v)), 4),
                         "share_dice_ge_0.8": round(float((v >= 0.8).mean()), 4)}
    return summary


def figure(scenes, path: Path, size: int = 64, margin: float = 1.4) -> None:
    cols = ["moving (animal outline)", "fixed + true box", "fixed crop", "true mask",
            "Otsu on crop"]
    fig, axes = plt.subplots(len(scenes), len(cols), figsize=(2.1 * len(cols), 2.1 * len(scenes)))
    for r, s in enumerate(scenes):
        crop, truth = object_crop(s.fixed, s.target_mask, s.box, size, margin)
        fg = foreground(crop)
        panels = [s.moving, s.fixed, crop, truth, fg]
        for c, img in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1 if img.dtype != np.uint8 else 255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].contour(s.moving_mask, levels=[0.5], colors="orange", linewidths=0.8)
        x0, y0, x1, y1 = s.box
        axes[r, 1].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                           edgecolor="lime", linewidth=1.2))
        axes[r, 0].set_ylabel(f"{silhouettes.CLASSES[s.label]}, {s.n_distractors} distr.",
                              fontsize=8)
        axes[r, 4].set_xlabel(f"Dice {dice(fg, truth):.2f}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="test scenes scored for Otsu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "silhouette_scenes.png")
    args = ap.parse_args(argv)
    scenes = silhouettes.test_scenes(max(args.n, 8), seed=args.seed)
    figure(scenes[:8], args.out)
    summary = {"scenes": len(scenes), "split": "test", "seed": args.seed,
               "crop": "fixed image, square of 1.4 × the true box's longest side, 64×64",
               **otsu_scores(scenes)}
    (args.out.parent / "silhouette_otsu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
