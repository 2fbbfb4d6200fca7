"""Pictures of the view from the skin: which tumour does the ultrasound show?

Writes ``reports/usct_view.png``: validation US–CT pairs whose CT holds more than one tumour
(validation stream, seed 8; true masks, as in the paper's setting), one per row: the
ultrasound; the CT with the SSD's candidates (green: the target, orange: the rival the ranker
scores highest, grey: the rest) and the ranker's pick (thick); then, for the target and for
that rival, the best view of a probe on the skin aimed at it (``ranker.best_view``) of the CT
mapped through the shipped ranker's lookup table (the ultrasound grey each CT grey shows),
with its correlation to the ultrasound; and last the target's best view of the CT's own grey,
as the previous release compared it. Each view is drawn at every second fan pixel of the
ultrasound (where the ultrasound is black, in a full shadow, there is nothing to compare) and
stretched to its own grey range.

    python scripts/usct_view.py [--rows 5]      # a few seconds
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

from registration import ranker  # noqa: E402
from registration.data.usct import PairGenerator  # noqa: E402
from registration.metrics import box_iou  # noqa: E402
from registration.pipeline import Pipeline  # noqa: E402
from registration.verify import POSITIVE_IOU  # noqa: E402


def rows(pipe: Pipeline, n: int, seed: int) -> list[dict]:
    """Up to n pairs with ≥ 1 other tumour and the target among the SSD's candidates."""
    lut = pipe.ranker.view_lut.numpy()
    out = []
    gen = PairGenerator("val", seed)
    while len(out) < n:
        s = gen.sample()
        if s.n_distractors < 1:
            continue
        prep = pipe._prepare([(s.moving, s.fixed)], [s.moving_mask], [s.all_mask])
        f_t, q_t, lb = pipe._ssd_inputs(prep)
        with torch.no_grad():
            cands = pipe.localizer.candidates(f_t, q_t, pipe.dataset.rerank)
            x, _, rank, boxes = pipe._ranker_features(prep, cands, lb)
            score = pipe.ranker(torch.from_numpy(x)).numpy()
        p = prep[0]
        hit = np.array([box_iou(b, s.box.tolist()) >= POSITIVE_IOU for b in boxes])
        if not hit.any() or hit.all():
            continue
        t = int(np.flatnonzero(hit)[np.argmax(score[hit])])
        r = int(np.flatnonzero(~hit)[np.argmax(score[~hit])])
        ctx = ranker.view_context(p["mg"], p["m_mask"], p["fg"], lut=lut)
        plain = ranker.view_context(p["mg"], p["m_mask"], p["fg"])
        if ctx is None:
            continue
        objs = p["candidate_objects"]
        views = [ranker.best_view(ctx, objs[rank[t]]), ranker.best_view(ctx, objs[rank[r]]),
                 ranker.best_view(plain, objs[rank[t]])]
        if any(v is None for v in views):
            continue
        out.append(dict(us=p["mg"], ct=p["fg"], boxes=boxes, target=t, rival=r,
                        pick=int(np.argmax(score)), views=views))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "reports" / "usct_view.png"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained("usct", freeze=False)
    if getattr(pipe.ranker, "view_lut", None) is None:
        raise SystemExit("the US–CT ranker has no lookup table (cfg.view_lut); nothing to show")
    data = rows(pipe, args.rows, args.seed)
    titles = ["ultrasound (moving)", "CT: target green, rival orange;\nthick = the ranker's pick",
              "target, CT through the table", "rival, CT through the table",
              "target, CT's own grey"]
    fig, ax = plt.subplots(len(data), 5, figsize=(15, 3.1 * len(data)), squeeze=False)
    for i, d in enumerate(data):
        ax[i, 0].imshow(d["us"], cmap="gray", vmin=0, vmax=1)
        ax[i, 1].imshow(d["ct"], cmap="gray", vmin=0, vmax=1)
        for k, b in enumerate(d["boxes"]):
            colour = "lime" if k == d["target"] else "orange" if k == d["rival"] else "0.6"
            ax[i, 1].add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                             ec=colour, lw=3 if k == d["pick"] else 1))
        for j, (img, ncc) in enumerate(d["views"]):
            fan = img[img > 0]                     # each view stretched to its own range
            lo, hi = np.percentile(fan, (1, 99)) if len(fan) else (0.0, 1.0)
            ax[i, 2 + j].imshow(np.where(img > 0, img, np.nan), cmap="gray", vmin=lo,
                                vmax=max(hi, lo + 1e-3))
            ax[i, 2 + j].set_facecolor("black")
            ax[i, 2 + j].text(2, 6, f"NCC {ncc:.2f}", color="yellow", fontsize=11)
        for j in range(5):
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if i == 0:
                ax[i, j].set_title(titles[j], fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
