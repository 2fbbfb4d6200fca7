"""Pictures of the US–CT simulator: phantoms and the ultrasound simulated from them, side by side.

Writes ``reports/usct_samples.png``: 6 held-out phantom pairs (test stream, seed 0), one per
row: the CT in a soft-tissue window with the target tumour's box (red), the probe's fan drawn
on it (yellow: where the ultrasound looks), the simulated ultrasound with the tumour's true
outline (red), and the same ultrasound before time-gain compensation (the depth loss it
corrects). With ``--real``, a second figure ``reports/usct_real_samples.png`` does the same
for slices of the real LiTS volume (when its package is installed).

    python scripts/usct_samples.py [--real]      # a few seconds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registration.data import usct  # noqa: E402


def _outline(img: np.ndarray, mask: np.ndarray, colour, scale: int = 1) -> np.ndarray:
    rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img.copy()
    m = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]),
                   interpolation=cv2.INTER_NEAREST)
    cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, cs, -1, colour, scale)
    return rgb


def rows(n: int, seed: int, real: bool):
    rng = np.random.default_rng(seed)
    out = []
    tries = 0
    while len(out) < n and tries < 400:
        tries += 1
        if real:
            hu, lab = usct.lits_volume()
            k = int(rng.integers(hu.shape[2]))
            ph = usct.real_phantom(hu[:, :, k].T, lab[:, :, k].T, rng)
            if ph is None:
                continue
        else:
            ph = usct.phantom(rng)
            if ph.target_mask().sum() < 30:
                continue
        try:
            probe = usct.place_probe(rng, ph, ph.target_mask())
        except RuntimeError:
            continue
        skin = probe.apex + probe.axis * probe.r0
        moved = usct.deform_phantom(ph, usct.deformation(rng, skin, probe.axis))
        us = usct.simulate_ultrasound(moved, probe, rng)
        hu_l, lab_l, echo_l, step = usct.scanlines(moved, probe)
        raw = usct.beamform(hu_l, lab_l, echo_l, step, np.random.default_rng(1), tgc=False)
        no_tgc = (usct.scan_convert(usct.log_compress(raw), probe) * 255).astype(np.uint8)
        cx, cy, inside = probe.to_ct()
        tm = cv2.remap(moved.target_mask().astype(np.uint8), cx - 0.5, cy - 0.5,
                       cv2.INTER_LINEAR) > 0
        ct = cv2.cvtColor(usct.window(ph.hu), cv2.COLOR_GRAY2RGB)
        fan = inside.astype(np.uint8)
        edge = np.zeros(ct.shape[:2], np.uint8)
        pts = np.stack([cx[fan > 0], cy[fan > 0]], 1)
        hull = cv2.convexHull(pts.astype(np.float32)).astype(np.int32)
        cv2.polylines(edge, [hull], True, 1, 1)
        ct[edge > 0] = (255, 220, 0)
        x0, y0, x1, y1 = usct.mask_box(ph.target_mask()).astype(int)
        cv2.rectangle(ct, (x0, y0), (x1 - 1, y1 - 1), (255, 40, 40), 1)
        up = lambda a: cv2.resize(a, (256, 256), interpolation=cv2.INTER_LINEAR)
        out.append([ct, _outline(up(us), tm & inside, (255, 40, 40)), up(no_tgc)])
    return out


def figure(rws, path: Path, title: str) -> None:
    cols = ["CT (soft-tissue window): target box, probe fan", "simulated ultrasound, tumour "
            "outline", "before time-gain compensation"]
    fig, axes = plt.subplots(len(rws), 3, figsize=(9, 3 * len(rws)), squeeze=False)
    for i, r in enumerate(rws):
        for j, img in enumerate(r):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args(argv)
    figure(rows(args.n, args.seed, False), ROOT / "reports" / "usct_samples.png",
           "Phantom CT slices and the ultrasound simulated from them (anatomy deformed under "
           "the probe)")
    if args.real:
        figure(rows(args.n, args.seed, True), ROOT / "reports" / "usct_real_samples.png",
               "Real CT (LiTS volume 117) and ultrasound simulated from it")


if __name__ == "__main__":
    main()
