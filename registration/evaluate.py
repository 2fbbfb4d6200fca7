"""Evaluation CLI: prints a markdown table, writes JSON (and a figure) under ``reports/``.

    python -m registration.evaluate matcher --dataset mnist    # 1,000 same-class mask pairs
    python -m registration.evaluate pipeline --dataset mnist   # 1,000 held-out 112×112 scenes
    python -m registration.evaluate pipeline --dataset silhouettes   # 1,000 128×128 scenes
    python -m registration.evaluate parts                      # part-labelled vs plain masks
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, metrics
from .losses import jacobian_det

PAPERS = {
    "mnist": {"source": "paper (Table 4)",   # the paper's MNIST figures
              "matching": {"dice": 0.79, "iou": 0.66}, "detection": {"dice": 0.87, "iou": 0.78}},
    "silhouettes": {"source": "paper, Caltech-101 (Table 4)",
                    "matching": {"dice": 0.94, "iou": 0.90},
                    "detection": {"dice": 0.95, "iou": 0.91}},
    "usct": {"source": "paper, US–CT (Table 4)",
             "matching": {"dice": 0.96, "iou": 0.94}, "detection": {"dice": 0.97, "iou": 0.94}},
}
PAPER = PAPERS["mnist"]
TITLES = {"mnist": "MNIST", "silhouettes": "Animal silhouettes", "usct": "US–CT phantoms",
          "usct-real": "Real CT (LiTS volume 117, never trained on) with simulated ultrasound"}


def eval_pairs(dataset: str, n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out matcher benchmark: n seeded same-class test pairs, (n, S, S) bool each."""
    if dataset == "silhouettes":
        from .data.silhouettes import MaskPairs
        m, f = MaskPairs("test", seed, size=size).batch(n, jitter=False)
        return m[:, 0].numpy() > 0.5, f[:, 0].numpy() > 0.5
    if dataset == "usct":
        from .data import usct
        from .pipeline import DATASETS
        from .train import PairCrops
        from types import SimpleNamespace
        test = SimpleNamespace(batch=lambda k: usct.test_pairs(k, seed))
        m, f = PairCrops(test, size, DATASETS["usct"].crop_margin, seed, jitter=False).batch(n)
        return m[:, 0].numpy() > 0.5, f[:, 0].numpy() > 0.5
    from .data import mnist
    return mnist.eval_pairs(n, seed)


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _write(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _pair_scores(warped: np.ndarray, fixed: np.ndarray) -> dict:
    d = [metrics.dice(a, b) for a, b in zip(warped, fixed)]
    j = [metrics.iou(a, b) for a, b in zip(warped, fixed)]
    return {"dice": float(np.mean(d)), "iou": float(np.mean(j))}


def evaluate_matcher(dataset: str, n: int, seed: int, out: Path,
                     refine: tuple[int, ...] = (0, 2, 3, 5, 10), folder: str | None = None) -> dict:
    """Mean Dice / IoU on n held-out same-class mask pairs for the identity, the network in one
    pass and in its default cascade, and + k steps of test-time refinement; the share of pixels
    where the warp folds (det J ≤ 0); ms per pair (one pair at a time, median) and pairs/s in
    batches of 256. ``folder`` evaluates a checkpoint folder instead of the shipped one."""
    model = checkpoint.load_folder(folder) if folder else checkpoint.load(dataset, "matcher")
    model = model.for_inference()             # what the pipeline runs (frozen, channels-last)
    size = model.cfg.input_size
    mov, fix = eval_pairs(dataset, n, seed, size)
    m = torch.from_numpy(mov).float().unsqueeze(1)
    f = torch.from_numpy(fix).float().unsqueeze(1)
    res = {"no warp (identity)": _pair_scores(mov, fix)}
    res["no warp (identity)"].update(ms_per_pair=0.0, folding_pixels=0.0, folding_pairs=0.0,
                                     folding_pairs_fine=0.0)

    def run(mm, ff, k, passes):
        with torch.no_grad():
            p = model.predict(mm, ff, passes)
        if k:
            p = model.refine(mm, ff, p, steps=k)
        with torch.no_grad():
            return model.warp(mm, p) > 0.5, p

    passes = model.cfg.passes
    variants = [(0, 1)] if passes == 1 else [(0, 1), (0, passes)]
    variants += [(k, passes) for k in refine if k]
    for k, ps in variants:
        name = (f"this matcher, {ps} pass{'es' if ps > 1 else ''}"
                + (f" + {k} refinement steps" if k else ""))
        outs = [run(m[i:i + 256], f[i:i + 256], k, ps) for i in range(0, n, 256)]
        warped = torch.cat([o[0] for o in outs])
        params = torch.cat([o[1] for o in outs])
        res[name] = _pair_scores(warped.numpy()[:, 0], fix)
        with torch.no_grad():
            det = jacobian_det(model.grid(params, (size, size)))
        res[name]["folding_pixels"] = float((det <= 0).float().mean())
        res[name]["folding_pairs"] = float((det <= 0).flatten(1).any(1).float().mean())
        # the same at 4× the resolution: folds narrower than a pixel escape the pixel grid
        with torch.no_grad():
            fine = jacobian_det(model.grid(params, (4 * size, 4 * size))) <= 0
        res[name]["folding_pixels_fine"] = float(fine.float().mean())
        res[name]["folding_pairs_fine"] = float(fine.flatten(1).any(1).float().mean())
        reps = 200 if k <= 10 else 60
        times = []
        for i in range(reps + 10):
            t0 = time.perf_counter()
            run(m[i:i + 1], f[i:i + 1], k, ps)
            times.append(time.perf_counter() - t0)
        res[name]["ms_per_pair"] = statistics.median(times[10:]) * 1e3
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            run(m[i:i + 256], f[i:i + 256], k, ps)
        res[name]["pairs_per_s_batch256"] = n / (time.perf_counter() - t0)
    paper = PAPERS[dataset]
    rows = [[paper["source"], paper["matching"]["dice"], paper["matching"]["iou"], "—", "—",
             "—", "—"]]
    for name, v in res.items():
        pps = v.get("pairs_per_s_batch256")
        rows.append([name, v["dice"], v["iou"],
                     f"{100 * v['folding_pixels']:.3f} % / {100 * v['folding_pairs']:.1f} %",
                     f"{100 * v['folding_pairs_fine']:.1f} %",
                     f"{v['ms_per_pair']:.2f}", f"{pps:,.0f}" if pps else "—"])
    table = _table(["method", "Dice", "IoU", "folding: pixels / pairs",
                    "pairs folding at 4× resolution", "ms/pair (1 pair)",
                    "pairs/s (batch 256)"], rows)
    what = ("ultrasound → CT tumour-mask pairs (test stream" if dataset == "usct"
            else "same-class pairs (test rows")
    print(f"{TITLES[dataset]} matcher, {n} held-out {what}, seed {seed}), "
          f"{size}×{size} masks, {torch.get_num_threads()} threads\n")
    print(table)
    payload = {"dataset": dataset, "pairs": n, "seed": seed, "threads": torch.get_num_threads(),
               "checkpoint": folder or f"checkpoints/{dataset}/matcher",
               "results": res, "paper": paper["matching"], "table": table}
    print(f"\nwrote {_write(out, f'{dataset}_matcher', payload)}")
    return payload


def test_scenes(dataset: str, n: int, seed: int, real: bool = False) -> list:
    if dataset == "usct":
        from .data import usct
        return usct.real_pairs(n, seed) if real else usct.test_pairs(n, seed)
    if dataset == "silhouettes":
        from .data import silhouettes
        return silhouettes.test_scenes(n, seed)
    from .data import scenes
    return scenes.test_scenes(n, seed)


def _score(rec: dict, prefix: str, r, s, detection: bool) -> None:
    """Scores of one Result ``r`` (None = RegistrationError, scored 0) against scene ``s``."""
    ok = r is not None
    rec[f"{prefix}dice"] = metrics.dice(r.warped_mask_full, s.target_mask) if ok else 0.0
    rec[f"{prefix}iou"] = metrics.iou(r.warped_mask_full, s.target_mask) if ok else 0.0
    if detection:
        rec[f"{prefix}ssd_box_dice"] = metrics.box_dice(r.ssd_box, s.box) if ok else 0.0
        rec[f"{prefix}ssd_box_iou"] = metrics.box_iou(r.ssd_box, s.box) if ok else 0.0
        rec[f"{prefix}box_dice"] = metrics.box_dice(r.box, s.box) if ok else 0.0
        rec[f"{prefix}box_iou"] = metrics.box_iou(r.box, s.box) if ok else 0.0
        rec[f"{prefix}crop_dice"] = r.dice if ok else 0.0
    rec[f"{prefix}timings"] = r.timings if ok else None


def evaluate_pipeline(dataset: str, n: int, seed: int, out: Path, figure: bool = True,
                      refine_steps: int | None = None, real: bool = False,
                      rerank: int | None = None, components: bool = True,
                      verifier: str | None = None, split: bool = True,
                      plain_choice: bool = False, chooser: bool = True,
                      ranker: str | None = None) -> dict:
    """End to end on n held-out scenes: detection, matching pasted back into the full frame
    (against the target's true mask), without localization, ms per stage. Data sets with
    learned masks are also run with the true masks (the paper's setting): the moving object's
    mask and, in the fixed image, the mask of *every* object (all animals, all tumours), so
    that finding the target is still the localizer's job: the pipeline keeps the true
    object(s) that best fit its box (with re-ranking: its candidates' boxes), and the
    full-frame matcher must pick the target itself. Scenes that carry instance labels
    (silhouettes' ``all_labels``: each animal its own number) are run a third time with those
    as the fixed mask, so that touching animals stay two objects, as in per-object annotations
    (Caltech-101's); the bool mask of every object joins them."""
    from .pipeline import Pipeline, RegistrationError
    pipe = Pipeline.from_pretrained(dataset)
    if refine_steps is not None:
        pipe.refine_steps = refine_steps
    if rerank is not None:
        pipe.dataset = dataclasses.replace(pipe.dataset, rerank=rerank)
    if verifier is not None:           # "none": re-rank by mask overlap
        pipe.verifier = None if verifier == "none" else checkpoint.load_folder(verifier)
        pipe.chooser = None            # its features are the shipped verifier's
    dropped = pipe.dataset.component_candidates and not components
    if dropped:
        pipe.dataset = dataclasses.replace(pipe.dataset, component_candidates=False)
    unsplit = pipe.dataset.component_candidates and pipe.dataset.split_components and not split
    if unsplit:
        pipe.dataset = dataclasses.replace(pipe.dataset, split_components=False)
    plain = plain_choice and (pipe.dataset.shape_weight or pipe.dataset.prefer_whole
                              or pipe.chooser is not None)
    if plain:
        pipe.dataset = dataclasses.replace(pipe.dataset, shape_weight=0.0, prefer_whole=False)
        pipe.chooser = None
    unchosen = pipe.chooser is not None and not chooser
    if unchosen:
        pipe.chooser = None
    if ranker is not None:
        if pipe.ranker is None:
            raise SystemExit(f"--ranker: the {dataset} pipeline does not use a ranker")
        pipe.ranker = checkpoint.load_folder(ranker).eval()
    gt = pipe.dataset.segmenter == "learned"
    test = test_scenes(dataset, n, seed, real)
    n = len(test)
    recs = []
    shown = []

    def run(prefix, rec, s, localize, **masks):
        try:
            r = pipe.register(s.moving, s.fixed, localize=localize, **masks)
        except RegistrationError:
            r = None
        _score(rec, prefix, r, s, detection=localize)
        return r

    for i, s in enumerate(tqdm(test, desc="scenes", mininterval=5, file=sys.stderr)):
        rec = {"n_distractors": s.n_distractors}
        r = run("", rec, s, True)
        rf = run("noloc_", rec, s, False)
        if gt:
            run("gt_", rec, s, True, moving_mask=s.moving_mask, fixed_mask=s.all_mask)
            run("gt_noloc_", rec, s, False, moving_mask=s.moving_mask, fixed_mask=s.all_mask)
            if getattr(s, "all_labels", None) is not None:
                run("gt_inst_", rec, s, True, moving_mask=s.moving_mask,
                    fixed_mask=s.all_labels)
        recs.append(rec)
        if figure and r is not None and len(shown) < 6 and (i % 7 == 0):
            shown.append({"fixed": s.fixed, "result": r, "result_full": rf, "true_box": s.box,
                          "true_mask": s.target_mask})
    mean = lambda k, rs=recs: float(np.mean([x[k] for x in rs]))
    med_total = lambda k: statistics.median(x[k]["total"] for x in recs if x[k])
    stage = {}
    timed = [x["timings"] for x in recs if x["timings"]]
    for k in ("segment", "localize", "match", "paste", "total"):
        stage[k] = statistics.median(t[k] for t in timed)
    by_k = {}
    for k in range(4):
        rs = [x for x in recs if x["n_distractors"] == k]
        if rs:
            by_k[k] = {"n": len(rs), "box_dice": mean("box_dice", rs), "dice": mean("dice", rs),
                       "noloc_dice": mean("noloc_dice", rs)}
    res = {
        "detection_ssd": {"dice": mean("ssd_box_dice"), "iou": mean("ssd_box_iou"),
                          "hit_rate_iou50": float(np.mean([x["ssd_box_iou"] >= 0.5
                                                           for x in recs]))},
        "detection": {"dice": mean("box_dice"), "iou": mean("box_iou"),
                      "hit_rate_iou50": float(np.mean([x["box_iou"] >= 0.5 for x in recs]))},
        "matching": {"dice": mean("dice"), "iou": mean("iou"), "crop_dice": mean("crop_dice")},
        "matching_without_localization": {"dice": mean("noloc_dice"), "iou": mean("noloc_iou"),
                                          "ms": med_total("noloc_timings")},
        "median_ms": stage, "by_distractors": by_k,
    }
    paper = PAPERS[dataset]
    seg = "learned masks" if gt else "threshold masks"
    rows = [
        [paper["source"], paper["detection"]["dice"], paper["detection"]["iou"],
         paper["matching"]["dice"], paper["matching"]["iou"]],
        ["SSD box alone", res["detection_ssd"]["dice"], res["detection_ssd"]["iou"], "", ""]]
    true_masks = lambda pre: {k: mean(pre + k) for k in ("dice", "iou", "crop_dice",
                                                         "box_dice", "box_iou")}
    if gt:
        res["matching_true_masks"] = true_masks("gt_")
        res["matching_true_masks_without_localization"] = {
            "dice": mean("gt_noloc_dice"), "iou": mean("gt_noloc_iou")}
        inst = all("gt_inst_dice" in x for x in recs)
        if inst:
            m = res["matching_true_instance_masks"] = true_masks("gt_inst_")
            rows.append(["with localization, true masks, one per object (instance labels, as "
                         "per-object annotations: the paper's setting; box snapped to the true "
                         "object)", m["box_dice"], m["box_iou"], m["dice"], m["iou"]])
        rows.append([("with localization, true masks as one bool mask of every object "
                      "(touching objects join; box snapped to the true object)") if inst else
                     ("with localization, true masks (the paper's setting; box snapped to "
                      "the true object)"), res["matching_true_masks"]["box_dice"],
                     res["matching_true_masks"]["box_iou"], res["matching_true_masks"]["dice"],
                     res["matching_true_masks"]["iou"]])
    rows.append([f"with localization, {seg} (end to end; box snapped to the segmented object)",
                 res["detection"]["dice"], res["detection"]["iou"], res["matching"]["dice"],
                 res["matching"]["iou"]])
    if gt:
        rows.append(["without localization, true masks (full-frame matcher)", "—", "—",
                     res["matching_true_masks_without_localization"]["dice"],
                     res["matching_true_masks_without_localization"]["iou"]])
    rows.append([f"without localization, {seg} (full-frame matcher)", "—", "—",
                 res["matching_without_localization"]["dice"],
                 res["matching_without_localization"]["iou"]])
    table = _table(["", "detection Dice", "detection IoU", "matching Dice", "matching IoU"], rows)
    stages = _table(["stage", "median ms / pair"],
                    [[k, f"{v:.2f}"] for k, v in stage.items()]
                    + [["without localization, total",
                        f"{res['matching_without_localization']['ms']:.2f}"]])
    dist = _table(["distractors", "scenes", "detection Dice", "matching Dice", "no-loc. Dice"],
                  [[k, v["n"], v["box_dice"], v["dice"], v["noloc_dice"]] for k, v in by_k.items()])
    side = test[0].fixed.shape[0]
    title = TITLES["usct-real" if real else dataset]
    ds = pipe.dataset
    extra = (" (+ the foreground components"
             + (" and their split pieces" if ds.split_components else "") + ")"
             if ds.component_candidates else "")
    print(f"{title}: {n} held-out {side}×{side} scenes (seed {seed}), "
          f"{torch.get_num_threads()} threads, {pipe.refine_steps} refinement steps, "
          f"{ds.rerank} SSD candidates re-ranked{extra}; "
          f"matching scored end to end on the full frame\n")
    print(table, "\n")
    print(dist, "\n")
    print(stages)
    payload = {"dataset": dataset, "real": real, "scenes": n, "seed": seed, "threads": torch.get_num_threads(),
               "refine_steps": pipe.refine_steps, "rerank": pipe.dataset.rerank,
               "component_candidates": pipe.dataset.component_candidates,
               "split_components": pipe.dataset.split_components,
               "shape_weight": pipe.dataset.shape_weight,
               "prefer_whole": pipe.dataset.prefer_whole,
               "chooser": pipe.chooser is not None,
               "ranker_view": pipe._ranker_sees_view(),
               "snap_clip": pipe.dataset.snap_clip,
               "segment_flip": pipe.dataset.segment_flip,
               "results": res, "paper": paper, "table": table, "stages": stages,
               "by_distractors_table": dist}
    tag = (f"{dataset}{'_real' if real else ''}_pipeline"
           + (f"_refine{pipe.refine_steps}" if pipe.refine_steps else "")
           + (f"_rerank{pipe.dataset.rerank}" if pipe.dataset.rerank > 1 else "")
           + ("_nocomponents" if dropped else "")
           + ("_nosplit" if unsplit else "")
           + ("_plainchoice" if plain else "")
           + ("_nochooser" if unchosen else "")
           + (f"_{Path(verifier).name}" if verifier is not None else "")
           + (f"_{Path(ranker).name}" if ranker is not None else ""))
    print(f"\nwrote {_write(out, tag, payload)}")
    if figure and shown:
        from .viz import summary_figure
        path = out / f"{tag}.png"
        summary_figure(shown, str(path))
        print(f"wrote {path}")
    return payload


def _ncc_inside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of images a, b (B, 1, H, W) over the pixels of mask
    (B, 1, H, W) bool → (B,); 0 where either image is flat there."""
    w = mask.float()
    n = w.sum((1, 2, 3)).clamp_min(1)
    am = (a * w).sum((1, 2, 3)) / n
    bm = (b * w).sum((1, 2, 3)) / n
    ac = (a - am[:, None, None, None]) * w
    bc = (b - bm[:, None, None, None]) * w
    den = (ac.pow(2).sum((1, 2, 3)) * bc.pow(2).sum((1, 2, 3))).sqrt()
    return torch.where(den > 1e-8, (ac * bc).sum((1, 2, 3)) / den.clamp_min(1e-8),
                       torch.zeros_like(den))


def evaluate_parts(n: int, seed: int, out: Path, refine: tuple[int, ...] = (0, 10),
                   figure: bool = True) -> dict:
    """Plain-mask matcher vs the part-labelled one (paper Fig. 5) on n held-out silhouette
    pairs: Dice of the whole silhouette, Dice per part (core, thin) after warping, and how
    well the silhouettes' own grey detail (zebra stripes, giraffe patches) agrees inside the
    fixed mask after warping (NCC, over the pairs whose fixed silhouette has such detail)."""
    from .data.silhouettes import MaskPairs
    # the part-label matcher is the cascade design (8×8 regressor, 3 passes), so it is compared
    # with the plain-mask matcher of the same design and budget when that checkpoint is there
    plain = checkpoint.try_load("silhouettes", "matcher-cascade")
    if plain is None:
        plain = checkpoint.load("silhouettes", "matcher")
    parts = checkpoint.load("silhouettes", "matcher-parts")
    size = plain.cfg.input_size
    mov, fix, mov_g, fix_g = MaskPairs("test", seed, size=size, parts=True).batch(
        n, grey=True, jitter=False)
    union = lambda x: x.sum(1, keepdim=True).clamp(max=1)
    fix_u = union(fix) > 0.5
    # detail pairs: grey structure well inside the fixed silhouette (2 px from its outline, so
    # the anti-aliased rim does not count)
    w = 1 - torch.nn.functional.max_pool2d(1 - fix_u.float(), 5, 1, 2)
    mean_in = (fix_g * w).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp_min(1)
    std_in = (((fix_g - mean_in[:, None, None, None]) * w).pow(2).sum((1, 2, 3))
              / w.sum((1, 2, 3)).clamp_min(1)).sqrt()
    detail = std_in > 0.08

    def scores(warped_parts: torch.Tensor, warped_grey: torch.Tensor) -> dict:
        wu = union(warped_parts) > 0.5
        d = lambda a, b: (2 * (a & b).sum((1, 2, 3)) / (a.sum((1, 2, 3)) + b.sum((1, 2, 3))
                                                         ).clamp_min(1)).float()
        part_d = [d(warped_parts[:, k:k + 1] > 0.5, fix[:, k:k + 1] > 0.5) for k in range(2)]
        inter = (wu & fix_u).sum((1, 2, 3)).float()
        tot = wu.sum((1, 2, 3)).float() + fix_u.sum((1, 2, 3)).float()
        ncc = _ncc_inside(warped_grey, fix_g, fix_u)
        return {"dice": float((2 * inter / tot.clamp_min(1)).mean()),
                "iou": float((inter / (tot - inter).clamp_min(1)).mean()),
                "core_dice": float(part_d[0].mean()), "thin_dice": float(part_d[1].mean()),
                "part_dice": float(((part_d[0] + part_d[1]) / 2).mean()),
                "ncc_detail": float(ncc[detail].mean()) if detail.any() else float("nan"),
                "ncc_all": float(ncc.mean())}

    res = {"no warp (identity)": scores(mov, mov_g)}
    warps = {}
    for name, model, inp_m, inp_f in (("plain masks", plain, union(mov), union(fix)),
                                      ("part-labelled masks", parts, mov, fix)):
        for k in refine:
            with torch.no_grad():
                p = model.predict(inp_m, inp_f)
            if k:
                p = model.refine(inp_m, inp_f, p, steps=k)
            with torch.no_grad():
                wp, wg = model.warp(mov, p), model.warp(mov_g, p)
            label = name + (f" + {k} refinement steps" if k else "")
            res[label] = scores(wp, wg)
            warps[label] = wp
    rows = [[k, v["dice"], v["iou"], v["core_dice"], v["thin_dice"], v["ncc_detail"],
             v["ncc_all"]] for k, v in res.items()]
    table = _table(["matcher", "silhouette Dice", "IoU", "core Dice", "thin-part Dice",
                    f"NCC inside (detail pairs, n={int(detail.sum())})", "NCC inside (all)"],
                   rows)
    print(f"Part-labelled vs plain masks: {n} held-out silhouette pairs (test rows, seed {seed}), "
          f"{size}×{size}; parts = core (opening) and thin parts; NCC of the silhouettes' grey "
          f"detail inside the fixed mask after warping\n")
    print(table)
    payload = {"pairs": n, "seed": seed, "detail_pairs": int(detail.sum()), "results": res,
               "table": table}
    print(f"\nwrote {_write(out, 'silhouettes_parts', payload)}")
    if figure:
        from .viz import parts_figure
        idx = list(dict.fromkeys(torch.nonzero(detail).flatten()[:3].tolist() + [0, 1, 2]))[:6]
        names = [k for k in warps if "+" not in k]
        path = out / "silhouettes_parts.png"
        parts_figure(mov[idx], fix[idx], fix_g[idx], {k: warps[k][idx] for k in names},
                     str(path))
        print(f"wrote {path}")
    return payload


@torch.no_grad()
def evaluate_segmenter(dataset: str, n: int, seed: int, out: Path) -> dict:
    """The learned segmenter on held-out scenes: Dice / IoU of its mask against the truth on
    the fixed crop around the true box (margin as in training, no jitter) and on the whole
    moving image, beside Otsu's threshold on the same fixed crops (bright objects, and the
    better polarity as an oracle)."""
    import cv2

    from . import segment
    from .segnet import object_crop
    model = checkpoint.load(dataset, "segmenter").eval()
    cfg = model.cfg
    scenes = test_scenes(dataset, n, seed)
    crops, truth, whole, whole_t = [], [], [], []
    for s in scenes:
        c, m = object_crop(s.fixed, s.target_mask, s.box, cfg.input_size, cfg.margin)
        crops.append(c)
        truth.append(m)
        whole.append(cv2.resize(s.moving, (cfg.input_size,) * 2,
                                interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
        whole_t.append(cv2.resize(s.moving_mask.astype(np.float32), (cfg.input_size,) * 2,
                                  interpolation=cv2.INTER_AREA) > 0.5)

    def run(imgs):
        x = torch.from_numpy(np.stack(imgs))[:, None]
        return torch.cat([model(x[i:i + 250]) > 0 for i in range(0, len(x), 250)])[:, 0].numpy()

    def score(pred, tru):
        return {"dice": float(np.mean([metrics.dice(a, b) for a, b in zip(pred, tru)])),
                "iou": float(np.mean([metrics.iou(a, b) for a, b in zip(pred, tru)]))}

    otsu = [segment.foreground(c) for c in crops]
    res = {"learned, fixed crops": score(run(crops), truth),
           "learned, whole moving images": score(run(whole), whole_t),
           "Otsu (bright objects), fixed crops": score(otsu, truth),
           "Otsu, better polarity (oracle), fixed crops": {
               k: float(np.mean([max(f(o, t), f(~o, t)) for o, t in zip(otsu, truth)]))
               for k, f in (("dice", metrics.dice), ("iou", metrics.iou))}}
    table = _table(["segmenter", "Dice", "IoU"], [[k, v["dice"], v["iou"]] for k, v in res.items()])
    print(f"{TITLES[dataset]}: segmentation on {n} held-out scenes (seed {seed}), "
          f"{cfg.input_size}-px crops\n")
    print(table)
    payload = {"dataset": dataset, "scenes": n, "seed": seed, "results": res, "table": table}
    print(f"\nwrote {_write(out, f'{dataset}_segmenter', payload)}")
    return payload


@torch.no_grad()
def evaluate_localizer(dataset: str, n: int, seed: int, out: Path, k: int = 5) -> dict:
    """The SSD alone on n held-out scenes: the share whose true box has IoU ≥ 0.5 with the
    top box, and with any of the top 1..k boxes after NMS (what re-ranking can reach)."""
    from torchvision.ops import box_iou

    from .pipeline import DATASETS
    from .train import scene_tensors
    loc = checkpoint.load(dataset, "localizer").for_inference()
    ds = DATASETS[dataset]
    scenes = test_scenes(dataset, n, seed)
    f, m, b = scene_tensors(scenes, loc.cfg.image_size, loc.cfg.query_size, ds.crop_margin,
                            ds.query == "whole")
    hits = np.zeros(k)
    for i in range(0, n, 250):
        for (boxes, _), gt in zip(loc.candidates(f[i:i + 250], m[i:i + 250], k), b[i:i + 250]):
            ok = (box_iou(boxes, gt[None])[:, 0] >= 0.5).numpy()
            hits += np.array([ok[:j + 1].any() for j in range(k)], float)
    hits /= n
    table = _table(["candidates", "true box among them (IoU ≥ 0.5)"],
                   [[j + 1, f"{100 * h:.1f} %"] for j, h in enumerate(hits)])
    print(f"{TITLES[dataset]}: the SSD's top boxes (after NMS) on {n} held-out scenes "
          f"(seed {seed})\n")
    print(table)
    payload = {"dataset": dataset, "scenes": n, "seed": seed,
               "hit_at_k": [float(h) for h in hits], "table": table}
    print(f"\nwrote {_write(out, f'{dataset}_localizer', payload)}")
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m registration.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["matcher", "pipeline", "parts", "segmenter", "localizer"])
    p.add_argument("--dataset", default="mnist", choices=sorted(PAPERS))
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports")
    p.add_argument("--no-figure", dest="figure", action="store_false")
    p.add_argument("--checkpoint", default=None,
                   help="matcher: evaluate this checkpoint folder instead of the shipped one")
    p.add_argument("--rerank", type=int, default=None,
                   help="pipeline: SSD candidates re-ranked by match quality (default: the "
                        "data set's)")
    p.add_argument("--no-components", dest="components", action="store_false",
                   help="pipeline: re-rank the SSD's candidates only, not also the fixed "
                        "foreground's connected components (silhouettes)")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="pipeline: do not add the pieces of touching objects' components as "
                        "candidates (silhouettes)")
    p.add_argument("--plain-choice", action="store_true",
                   help="pipeline: choose among the candidates by the verifier (and the SSD "
                        "score) alone: no shape term, no preference for whole objects, no "
                        "learned chooser (silhouettes)")
    p.add_argument("--no-chooser", dest="chooser", action="store_false",
                   help="pipeline: with segmented masks, choose by the hand-set rule, not the "
                        "learned chooser (silhouettes)")
    p.add_argument("--ranker", default=None,
                   help="pipeline: re-rank with this ranker checkpoint folder instead of the "
                        "data set's (e.g. checkpoints/usct/ranker-geometry; US–CT)")
    p.add_argument("--verifier", default=None,
                   help="pipeline: re-rank with this verifier checkpoint folder instead of the "
                        "data set's (e.g. checkpoints/silhouettes/verifier-plain), or 'none' "
                        "for the overlap of the two masks")
    p.add_argument("--real", action="store_true",
                   help="usct pipeline: the real CT volume's tumour slices instead of phantoms")
    p.add_argument("--refine-steps", type=int, default=None,
                   help="pipeline: test-time refinement steps (default: the pipeline's)")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)   # before the thread pool starts (see train.py)
    torch.set_num_threads(args.threads)
    if args.what == "parts":
        evaluate_parts(args.n, args.seed, Path(args.out), figure=args.figure)
    elif args.what == "localizer":
        evaluate_localizer(args.dataset, args.n, args.seed, Path(args.out))
    elif args.what == "segmenter":
        evaluate_segmenter(args.dataset, args.n, args.seed, Path(args.out))
    elif args.what == "matcher":
        evaluate_matcher(args.dataset, args.n, args.seed, Path(args.out),
                         folder=args.checkpoint)
    else:
        evaluate_pipeline(args.dataset, args.n, args.seed, Path(args.out), args.figure,
                          args.refine_steps, args.real, args.rerank, args.components,
                          args.verifier, args.split, args.plain_choice, args.chooser,
                          args.ranker)


if __name__ == "__main__":
    main()
