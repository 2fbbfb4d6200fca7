"""Silhouettes on validation (or test) scenes: where the pipeline loses, by which mask is given.

For each seed, prints one row per mask setting: the moving object's and the fixed scene's
masks both true (as instance labels, one number per animal, or as one bool mask of every
animal), one of them true and the other segmented, or both segmented (end to end). Columns:
box Dice, hit rate (box IoU ≥ 0.5), matching Dice / IoU against the target's true mask on the
full frame, and how often the chosen object is the target (its Dice with the target's mask
≥ 0.98). ``--flip both`` runs every setting with and without the segmenter's mirror-image
average (``DatasetConfig.segment_flip``) and counts the scenes whose hit it gains or loses;
``--time N`` instead times one registration a pair with and without it, taking turns on N
test scenes; ``--samples`` instead checks the app's sample pairs (``assets/silhouettes``):
in how many the box lands on the target (IoU ≥ 0.5 with its true box), end to end.

    python scripts/silhouettes_validation.py --seeds 12 13              # ~2 min a seed
    python scripts/silhouettes_validation.py --seeds 12 13 --flip both --settings learned
    python scripts/silhouettes_validation.py --part test --seeds 123 --flip both --settings learned
    python scripts/silhouettes_validation.py --seeds 12 13 --settings true --refine-steps 80
    python scripts/silhouettes_validation.py --time 100
    python scripts/silhouettes_validation.py --samples --flip both
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registration import metrics  # noqa: E402
from registration.data.silhouettes import SceneGenerator, test_scenes  # noqa: E402
from registration.pipeline import Pipeline, RegistrationError  # noqa: E402

# setting → the masks given to Pipeline.register
SETTINGS = {
    "true, instance labels": lambda s: dict(moving_mask=s.moving_mask, fixed_mask=s.all_labels),
    "true, one bool mask": lambda s: dict(moving_mask=s.moving_mask, fixed_mask=s.all_mask),
    "fixed true (bool), moving segmented": lambda s: dict(fixed_mask=s.all_mask),
    "moving true, fixed segmented": lambda s: dict(moving_mask=s.moving_mask),
    "both segmented (end to end)": lambda s: {},
}
LEARNED = [k for k in SETTINGS if "segmented" in k]
GROUPS = {"all": list(SETTINGS), "learned": LEARNED, "true": [k for k in SETTINGS if k not in LEARNED]}


def scores(pipe: Pipeline, s, masks: dict) -> tuple[float, float, float, float, float]:
    """(box Dice, hit, matching Dice, matching IoU, chosen object is the target) for one
    scene; a RegistrationError scores 0."""
    try:
        r = pipe.register(s.moving, s.fixed, **masks)
    except RegistrationError:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    return (metrics.box_dice(r.box, s.box), float(metrics.box_iou(r.box, s.box) >= 0.5),
            metrics.dice(r.warped_mask_full, s.target_mask),
            metrics.iou(r.warped_mask_full, s.target_mask),
            float(metrics.dice(r.fixed_mask_full, s.target_mask) >= 0.98))


def timing(pipe: Pipeline, n: int) -> None:
    on = pipe.dataset
    off = dataclasses.replace(on, segment_flip=False)
    ss = test_scenes(n, seed=5)
    for s in ss[:5]:                                    # warm-up
        pipe.register(s.moving, s.fixed)
    t = {}
    for s in ss:
        for name, ds in (("mirror average", on), ("without", off)):
            pipe.dataset = ds
            for loc in (True, False):
                t0 = time.perf_counter()
                pipe.register(s.moving, s.fixed, localize=loc)
                t.setdefault((name, loc), []).append(time.perf_counter() - t0)
    pipe.dataset = on
    print(f"median ms a pair, taking turns on {n} test scenes (seed 5)\n")
    print("| segmenter | with localization | without localization |\n|---|---|---|")
    for name in ("mirror average", "without"):
        print(f"| {name} | {1e3 * statistics.median(t[(name, True)]):.1f} | "
              f"{1e3 * statistics.median(t[(name, False)]):.1f} |")


def samples(pipe: Pipeline, flips: list[bool]) -> None:
    import json

    import cv2
    folder = ROOT / "assets" / "silhouettes"
    examples = json.loads((folder / "examples.json").read_text())["examples"]
    base = pipe.dataset
    for flip in flips:
        pipe.dataset = dataclasses.replace(base, segment_flip=flip)
        ious = []
        for e in examples:
            m, f = (cv2.imread(str(folder / e[k]), cv2.IMREAD_GRAYSCALE)
                    for k in ("moving", "fixed"))
            ious.append(metrics.box_iou(pipe.register(m, f).box, e["true_box"]))
        print(f"mirror average {'on' if flip else 'off'}: box on the target in "
              f"{sum(v >= 0.5 for v in ious)} of {len(ious)} samples "
              f"(IoU {' '.join(f'{v:.2f}' for v in ious)})")
    pipe.dataset = base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="val", choices=["val", "test"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[12, 13])
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--settings", default="all", choices=list(GROUPS))
    ap.add_argument("--refine-steps", type=int, default=None,
                    help="test-time refinement steps (default: the data set's, 40)")
    ap.add_argument("--flip", default="on", choices=["on", "off", "both"],
                    help="the segmenter's mirror-image average (the data set's default: on)")
    ap.add_argument("--no-chooser", dest="chooser", action="store_false")
    ap.add_argument("--time", type=int, default=0, help="time N pairs instead")
    ap.add_argument("--samples", action="store_true", help="check the app's samples instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=args.refine_steps)
    if not args.chooser:
        pipe.chooser = None
    if args.time:
        timing(pipe, args.time)
        return
    flips = {"on": [True], "off": [False], "both": [True, False]}[args.flip]
    if args.samples:
        samples(pipe, flips)
        return
    names = GROUPS[args.settings]
    base = pipe.dataset
    print(f"| {args.part} seed | masks | mirror average | box Dice | hit | matching Dice | "
          "matching IoU | chosen = target | hits gained / lost by the mirror average |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        scenes = SceneGenerator(args.part, seed=seed).batch(args.n)
        for name in names:
            res = {}
            for flip in flips:
                pipe.dataset = dataclasses.replace(base, segment_flip=flip)
                res[flip] = np.array([scores(pipe, s, SETTINGS[name](s)) for s in scenes])
            for flip, r in res.items():
                change = ""
                if len(res) == 2 and flip:
                    a, b = res[True][:, 1] > 0, res[False][:, 1] > 0
                    change = f"{int((a & ~b).sum())} / {int((~a & b).sum())}"
                m = r.mean(0)
                print(f"| {seed} | {name} | {'on' if flip else 'off'} | {m[0]:.4f} | "
                      f"{100 * m[1]:.1f} % | {m[2]:.4f} | {m[3]:.4f} | "
                      f"{int(r[:, 4].sum())} / {len(r)} | {change} |", flush=True)
    pipe.dataset = base


if __name__ == "__main__":
    main()
