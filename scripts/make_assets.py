"""Write the app's sample pairs: ``assets/mnist/NN_moving.png`` / ``NN_fixed.png`` + examples.json.

The pairs are held-out test scenes (MNIST test rows, seed 123), picked to show the range the app
must cope with: 0–3 distractor digits, small (~20–25 px) and big (≥ 45 px) targets, and two
dark-on-light (inverted) variants to show that uploads drawn on white paper work too.

    python scripts/make_assets.py            # writes assets/mnist/
    python scripts/make_assets.py --dataset silhouettes   # writes assets/silhouettes/
    python scripts/make_assets.py --dataset usct          # writes assets/usct/

Silhouette pairs are held-out test scenes too (test rows and test texture rows, seed 123):
ten scenes covering all ten classes, 1–3 distractors, light and dark animals.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registration.data.scenes import SceneGenerator  # noqa: E402

SMALL = (20, 25)      # target ink height, px
MEDIUM = (30, 40)
BIG = (45, 56)
SIZES = {"small": SMALL, "medium": MEDIUM, "big": BIG}

# (distractors, target size, inverted), in the order the app shows them (6 to a page, so
# the first page already spans the range)
WANTED = [
    (3, "small", False),
    (3, "big", False),
    (2, "small", False),
    (1, "medium", False),
    (0, "big", False),
    (3, "medium", True),
    (3, "small", False),
    (3, "medium", False),
    (2, "big", False),
    (1, "small", False),
    (0, "small", False),
    (2, "small", True),
]


def caption(n_distractors: int, size: str, height: int, inverted: bool) -> str:
    d = {0: "no distractors", 1: "1 distractor"}.get(n_distractors, f"{n_distractors} distractors")
    text = f"{d}, {size} target ({height} px)"
    return text + ", dark on light" if inverted else text


def find(gen: SceneGenerator, n_distractors: int, size: str, max_tries: int = 5000):
    lo, hi = SIZES[size]
    for _ in range(max_tries):
        s = gen.sample(n_distractors=n_distractors)
        h = int(s.box[3] - s.box[1])
        if s.n_distractors == n_distractors and lo <= h <= hi:
            return s, h
    raise RuntimeError(f"no scene with {n_distractors} distractors and a {size} target "
                       f"in {max_tries} tries")


def silhouette_examples(out: Path, seed: int) -> dict:
    """Ten silhouette test scenes, one per class, distractors cycling 1, 2, 3."""
    from registration.data import silhouettes as sil
    gen = sil.SceneGenerator("test", seed=seed)
    examples = []
    for c, name in enumerate(sil.CLASSES):
        want = 1 + c % 3
        for _ in range(5000):
            s = gen.sample(n_distractors=want)
            if s.label == c and s.n_distractors == want:
                break
        else:
            raise RuntimeError(f"no {name} scene with {want} distractors")
        stem = f"{c + 1:02d}"
        Image.fromarray(s.moving, mode="L").save(out / f"{stem}_moving.png", optimize=True)
        Image.fromarray(s.fixed, mode="L").save(out / f"{stem}_fixed.png", optimize=True)
        d = "1 other animal" if want == 1 else f"{want} other animals"
        others = ", ".join(sil.CLASSES[k] for k in s.distractor_labels)
        examples.append({
            "moving": f"{stem}_moving.png", "fixed": f"{stem}_fixed.png",
            "caption": f"{name} among {d} ({others})",
            "n_distractors": s.n_distractors, "label": s.label, "class": name,
            "true_box": [float(v) for v in s.box],
        })
    return {"source": f"registration.data.silhouettes.SceneGenerator('test', seed={seed})",
            "examples": examples}


def usct_examples(out: Path, seed: int, n: int = 10) -> dict:
    """Ten phantom US–CT test pairs (test stream, seed ``seed``)."""
    from registration.data import usct
    gen = usct.PairGenerator("test", seed)
    examples = []
    for i in range(1, n + 1):
        p = gen.sample()
        stem = f"{i:02d}"
        Image.fromarray(p.moving, mode="L").save(out / f"{stem}_moving.png", optimize=True)
        Image.fromarray(p.fixed, mode="L").save(out / f"{stem}_fixed.png", optimize=True)
        k = p.n_distractors + 1
        side = int(max(p.box[2] - p.box[0], p.box[3] - p.box[1]))
        examples.append({
            "moving": f"{stem}_moving.png", "fixed": f"{stem}_fixed.png",
            "caption": f"{k} tumour{'s' if k > 1 else ''} in the slice, target {side} px",
            "n_distractors": p.n_distractors, "true_box": [float(v) for v in p.box],
        })
    return {"source": f"registration.data.usct.PairGenerator('test', {seed})",
            "examples": examples}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "silhouettes", "usct"])
    ap.add_argument("--out", default=None, help="default: assets/<dataset>")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args(argv)

    out = Path(args.out or ROOT / "assets" / args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*_moving.png"):
        old.unlink()
    for old in out.glob("*_fixed.png"):
        old.unlink()
    if args.dataset in ("silhouettes", "usct"):
        meta = (silhouette_examples if args.dataset == "silhouettes" else usct_examples)(
            out, args.seed)
        (out / "examples.json").write_text(json.dumps(meta, indent=2) + "\n")
        total = sum(p.stat().st_size for p in out.glob("*.png"))
        print(f"wrote {len(meta['examples'])} pairs to {out} ({total / 1024:.1f} KiB of PNG)")
        return
    gen = SceneGenerator("test", seed=args.seed)
    examples = []
    for i, (k, size, inverted) in enumerate(WANTED, start=1):
        scene, h = find(gen, k, size)
        moving, fixed = scene.moving, scene.fixed
        if inverted:
            moving, fixed = 255 - moving, 255 - fixed
        stem = f"{i:02d}"
        Image.fromarray(moving, mode="L").save(out / f"{stem}_moving.png", optimize=True)
        Image.fromarray(fixed, mode="L").save(out / f"{stem}_fixed.png", optimize=True)
        examples.append({
            "moving": f"{stem}_moving.png",
            "fixed": f"{stem}_fixed.png",
            "caption": caption(scene.n_distractors, size, h, inverted),
            "n_distractors": scene.n_distractors,
            "target_height_px": h,
            "inverted": inverted,
            "label": scene.label,
            "true_box": [float(v) for v in scene.box],
        })
    meta = {"source": f"registration.data.scenes.SceneGenerator('test', seed={args.seed})",
            "examples": examples}
    (out / "examples.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.glob("*.png"))
    print(f"wrote {len(examples)} pairs to {out} ({total / 1024:.1f} KiB of PNG)")


if __name__ == "__main__":
    main()
