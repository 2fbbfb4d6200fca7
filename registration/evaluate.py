"""Evaluation CLI: prints a markdown table, writes JSON (and a figure) under ``reports/``.

    python -m registration.evaluate matcher --dataset mnist    # 1,000 same-class mask pairs
    python -m registration.evaluate pipeline --dataset mnist   # 1,000 held-out 112×112 scenes
"""
from __future__ import annotations

import argparse
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

PAPER = {  # the paper's Table 4 (MNIST)
    "matching": {"dice": 0.79, "iou": 0.66},
    "detection": {"dice": 0.87, "iou": 0.78},
}


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
                     refine: tuple[int, ...] = (0, 3, 5, 10, 25), folder: str | None = None) -> dict:
    """Mean Dice / IoU on n held-out same-class mask pairs for the identity, the network in one
    pass and in its default cascade, and + k steps of test-time refinement; the share of pixels
    where the warp folds (det J ≤ 0); ms per pair (one pair at a time, median) and pairs/s in
    batches of 256. ``folder`` evaluates a checkpoint folder instead of the shipped one."""
    from .data import mnist
    model = checkpoint.load_folder(folder) if folder else checkpoint.load(dataset, "matcher")
    model = model.to(memory_format=torch.channels_last)
    mov, fix = mnist.eval_pairs(n, seed)
    m = torch.from_numpy(mov).float().unsqueeze(1)
    f = torch.from_numpy(fix).float().unsqueeze(1)
    res = {"no warp (identity)": _pair_scores(mov, fix)}
    res["no warp (identity)"].update(ms_per_pair=0.0, folding_pixels=0.0)

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
            det = jacobian_det(model.grid(params, (28, 28)))
        res[name]["folding_pixels"] = float((det <= 0).float().mean())
        res[name]["folding_pairs"] = float((det <= 0).flatten(1).any(1).float().mean())
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
    rows = [["paper (Table 4)", PAPER["matching"]["dice"], PAPER["matching"]["iou"], "—", "—",
             "—"]]
    for name, v in res.items():
        pps = v.get("pairs_per_s_batch256")
        rows.append([name, v["dice"], v["iou"], f"{100 * v['folding_pixels']:.3f} %",
                     f"{v['ms_per_pair']:.2f}", f"{pps:,.0f}" if pps else "—"])
    table = _table(["method", "Dice", "IoU", "folding pixels", "ms/pair (1 pair)",
                    "pairs/s (batch 256)"], rows)
    print(f"MNIST matcher, {n} held-out same-class pairs (test rows, seed {seed}), "
          f"{torch.get_num_threads()} threads\n")
    print(table)
    payload = {"dataset": dataset, "pairs": n, "seed": seed, "threads": torch.get_num_threads(),
               "checkpoint": folder or f"checkpoints/{dataset}/matcher",
               "results": res, "paper": PAPER["matching"], "table": table}
    print(f"\nwrote {_write(out, f'{dataset}_matcher', payload)}")
    return payload


def evaluate_pipeline(dataset: str, n: int, seed: int, out: Path, figure: bool = True,
                      refine_steps: int | None = None) -> dict:
    from .data import scenes
    from .pipeline import Pipeline, RegistrationError
    pipe = Pipeline.from_pretrained(dataset)
    if refine_steps is not None:
        pipe.refine_steps = refine_steps
    test = scenes.test_scenes(n, seed)
    recs = []
    shown = []
    for i, s in enumerate(tqdm(test, desc="scenes", mininterval=5, file=sys.stderr)):
        rec = {"n_distractors": s.n_distractors}
        try:
            r = pipe.register(s.moving, s.fixed)
            rec.update(ssd_box_dice=metrics.box_dice(r.ssd_box, s.box),
                       ssd_box_iou=metrics.box_iou(r.ssd_box, s.box),
                       box_dice=metrics.box_dice(r.box, s.box), box_iou=metrics.box_iou(r.box, s.box),
                       dice=metrics.dice(r.warped_mask_full, s.target_mask),
                       iou=metrics.iou(r.warped_mask_full, s.target_mask),
                       crop_dice=r.dice, timings=r.timings)
        except RegistrationError:
            r = None
            rec.update(ssd_box_dice=0.0, ssd_box_iou=0.0, box_dice=0.0, box_iou=0.0, dice=0.0,
                       iou=0.0, crop_dice=0.0, timings=None)
        try:
            rf = pipe.register(s.moving, s.fixed, localize=False)
            rec.update(noloc_dice=metrics.dice(rf.warped_mask_full, s.target_mask),
                       noloc_iou=metrics.iou(rf.warped_mask_full, s.target_mask),
                       noloc_ms=rf.timings["total"])
        except RegistrationError:
            rf = None
            rec.update(noloc_dice=0.0, noloc_iou=0.0, noloc_ms=None)
        recs.append(rec)
        if figure and r is not None and len(shown) < 6 and (i % 7 == 0):
            shown.append({"fixed": s.fixed, "result": r, "result_full": rf, "true_box": s.box,
                          "true_mask": s.target_mask})
    mean = lambda k, rs=recs: float(np.mean([x[k] for x in rs]))
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
        "detection_ssd": {"dice": mean("ssd_box_dice"), "iou": mean("ssd_box_iou")},
        "detection": {"dice": mean("box_dice"), "iou": mean("box_iou"),
                      "hit_rate_iou50": float(np.mean([x["box_iou"] >= 0.5 for x in recs]))},
        "matching": {"dice": mean("dice"), "iou": mean("iou"), "crop_dice": mean("crop_dice")},
        "matching_without_localization": {"dice": mean("noloc_dice"), "iou": mean("noloc_iou"),
                                          "ms": statistics.median(
                                              x["noloc_ms"] for x in recs if x["noloc_ms"])},
        "median_ms": stage, "by_distractors": by_k,
    }
    table = _table(["", "detection Dice", "detection IoU", "matching Dice", "matching IoU"], [
        ["paper (Table 4)", PAPER["detection"]["dice"], PAPER["detection"]["iou"],
         PAPER["matching"]["dice"], PAPER["matching"]["iou"]],
        ["SSD box alone", res["detection_ssd"]["dice"], res["detection_ssd"]["iou"], "", ""],
        ["with localization (box snapped to the segmented object)", res["detection"]["dice"],
         res["detection"]["iou"], res["matching"]["dice"], res["matching"]["iou"]],
        ["without localization (full-frame matcher)", "—", "—",
         res["matching_without_localization"]["dice"], res["matching_without_localization"]["iou"]],
    ])
    stages = _table(["stage", "median ms / pair"],
                    [[k, f"{v:.2f}"] for k, v in stage.items()]
                    + [["without localization, total",
                        f"{res['matching_without_localization']['ms']:.2f}"]])
    dist = _table(["distractors", "scenes", "detection Dice", "matching Dice", "no-loc. Dice"],
                  [[k, v["n"], v["box_dice"], v["dice"], v["noloc_dice"]] for k, v in by_k.items()])
    print(f"MNIST scenes, {n} held-out 112×112 scenes (test rows, seed {seed}), "
          f"{torch.get_num_threads()} threads, {pipe.refine_steps} refinement steps; "
          f"matching scored end to end on the full frame\n")
    print(table, "\n")
    print(dist, "\n")
    print(stages)
    payload = {"dataset": dataset, "scenes": n, "seed": seed, "threads": torch.get_num_threads(),
               "refine_steps": pipe.refine_steps,
               "results": res, "paper": PAPER, "table": table, "stages": stages,
               "by_distractors_table": dist}
    tag = f"{dataset}_pipeline" + (f"_refine{pipe.refine_steps}" if pipe.refine_steps else "")
    print(f"\nwrote {_write(out, tag, payload)}")
    if figure and shown:
        from .viz import summary_figure
        path = out / f"{tag}.png"
        summary_figure(shown, str(path))
        print(f"wrote {path}")
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m registration.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["matcher", "pipeline"])
    p.add_argument("--dataset", default="mnist", choices=["mnist"])
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports")
    p.add_argument("--no-figure", dest="figure", action="store_false")
    p.add_argument("--checkpoint", default=None,
                   help="matcher: evaluate this checkpoint folder instead of the shipped one")
    p.add_argument("--refine-steps", type=int, default=None,
                   help="pipeline: test-time refinement steps (default: the pipeline's)")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)   # before the thread pool starts (see train.py)
    torch.set_num_threads(args.threads)
    if args.what == "matcher":
        evaluate_matcher(args.dataset, args.n, args.seed, Path(args.out),
                         folder=args.checkpoint)
    else:
        evaluate_pipeline(args.dataset, args.n, args.seed, Path(args.out), args.figure,
                          args.refine_steps)


if __name__ == "__main__":
    main()
