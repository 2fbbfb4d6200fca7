"""Side by side with classical registration, on the same pairs in one run.

    pip install -r benchmarks/requirements.txt
    python benchmarks/peers.py                      # 1,000 mask pairs + 300 scenes
    python benchmarks/peers.py --pairs 100 --scenes 50   # quick look
    python benchmarks/peers.py --tune               # the parameter search on training pairs

Part 1, matching: the 1,000 held-out same-class MNIST mask pairs of
``python -m registration.evaluate matcher`` (28×28, masks = pixels > 127). Each method warps
the moving mask onto the fixed one; we report Dice, IoU, HD95 (px), folding (share of pixels
with det J ≤ 0 of the method's dense map, and share of pairs with any), median ms for one pair,
and pairs/s in batches where the method has them.

Part 2, end to end on the 112×112 scenes of ``python -m registration.evaluate pipeline``:
this project's pipeline against a classical pipeline (multi-scale normalised cross-correlation
template matching with ``cv2.matchTemplate`` to localize, Otsu-free fixed threshold to segment,
then demons on the crops), and each classical matcher on the whole frames without localization.

Classical parameters were tuned on 100 *training* pairs with ``--tune`` (grids below); the
chosen values are the constants in ``PARAMS``. Writes ``reports/peers.json`` and
``reports/peers.png`` (Dice against ms per pair, log scale).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registration import checkpoint, classical, metrics  # noqa: E402
from registration.evaluate import _table  # noqa: E402
from registration.data import mnist, scenes  # noqa: E402
from timing import interleaved_ms  # noqa: E402  (benchmarks/timing.py)

try:
    import SimpleITK as sitk
except ImportError:  # pragma: no cover
    sitk = None
try:
    from skimage.registration import optical_flow_tvl1
    from skimage.transform import warp as sk_warp
except ImportError:  # pragma: no cover
    optical_flow_tvl1 = None

# chosen by --tune on 100 training pairs (mean Dice; ties → faster)
PARAMS = {
    "sitk_affine": {"iterations": 100, "sigma": 0.0},                  # Dice 0.709 on tuning
    "sitk_bspline": {"mesh": 8, "iterations": 50, "sigma": 0.0},        # 0.932
    "sitk_demons": {"iterations": classical.DEMONS_ITERATIONS,
                    "std": classical.DEMONS_STD},                      # 400, 0.5: 0.915
    "tvl1": {"attachment": 15.0, "tightness": 0.3, "num_iter": 10},    # 0.836
}
REFINE_STEPS = (3, 5, 10)     # test-time refinement steps shown for the learned matcher
TUNE_GRID = {
    "sitk_affine": {"iterations": [50, 100, 200], "sigma": [0.0, 1.0, 2.0]},
    "sitk_bspline": {"mesh": [4, 8], "iterations": [50, 100], "sigma": [0.0, 1.0]},
    "sitk_demons": {"iterations": [50, 100, 200, 400], "std": [0.5, 0.75, 1.0, 1.5]},
    "tvl1": {"attachment": [5.0, 15.0, 40.0], "tightness": [0.3, 0.6], "num_iter": [10]},
}


# ---------------------------------------------------------------------------------------------
# classical matchers: (moving, fixed) bool (H, W) → warped bool (H, W), displacement (H, W, 2) px

def _field(tx, ref) -> np.ndarray:
    f = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, ref.GetSize(),
                                          ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    return sitk.GetArrayFromImage(f)       # (H, W, 2), (x, y): fixed pixel → moving pixel


def sitk_affine(moving, fixed, iterations=100, sigma=1.0):
    f, m = classical.sitk_image(fixed, sigma), classical.sitk_image(moving, sigma)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMeanSquares()
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                               numberOfIterations=iterations)
    r.SetOptimizerScalesFromPhysicalShift()
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    r.SetInitialTransform(init, inPlace=False)
    r.SetShrinkFactorsPerLevel([2, 1])
    r.SetSmoothingSigmasPerLevel([1, 0])
    r.SetInterpolator(sitk.sitkLinear)
    try:
        tx = r.Execute(f, m)
    except RuntimeError:              # e.g. the optimiser leaves the image: keep the start
        tx = init
    return classical.resample(moving, f, tx), _field(tx, f)


def sitk_bspline(moving, fixed, mesh=8, iterations=100, sigma=1.0):
    f, m = classical.sitk_image(fixed, sigma), classical.sitk_image(moving, sigma)
    tx = sitk.BSplineTransformInitializer(f, [mesh, mesh], 3)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMeanSquares()
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000)
    r.SetInitialTransform(tx, inPlace=True)
    r.SetInterpolator(sitk.sitkLinear)
    try:
        r.Execute(f, m)
    except RuntimeError:
        pass
    return classical.resample(moving, f, tx), _field(tx, f)


def sitk_demons(moving, fixed, iterations=100, std=1.0):
    return classical.demons(moving, fixed, iterations, std)


def tvl1(moving, fixed, attachment=15.0, tightness=0.3, num_iter=10):
    v, u = optical_flow_tvl1(fixed.astype(np.float32), moving.astype(np.float32),
                             attachment=attachment, tightness=tightness, num_iter=num_iter)
    h, w = fixed.shape
    rr, cc = np.mgrid[0:h, 0:w]
    warped = sk_warp(moving.astype(np.float32), np.array([rr + v, cc + u]), order=1,
                     mode="constant") > 0.5
    return warped, np.stack([u, v], -1)


CLASSICAL = {"SimpleITK affine": "sitk_affine", "SimpleITK B-spline FFD": "sitk_bspline",
             "SimpleITK diffeomorphic demons": "sitk_demons", "scikit-image TV-L1 flow": "tvl1"}
FUNCS = {"sitk_affine": sitk_affine, "sitk_bspline": sitk_bspline, "sitk_demons": sitk_demons,
         "tvl1": tvl1}


# ---------------------------------------------------------------------------------------------

def _scores(warped, fixed, disps=None) -> dict:
    d = [metrics.dice(a, b) for a, b in zip(warped, fixed)]
    j = [metrics.iou(a, b) for a, b in zip(warped, fixed)]
    hd = [metrics.hausdorff95(a, b) for a, b in zip(warped, fixed)]
    out = {"dice": float(np.mean(d)), "iou": float(np.mean(j)),
           "hd95": float(np.median([h for h in hd])),
           "hd95_mean_finite": float(np.mean([h for h in hd if np.isfinite(h)]))}
    if disps is not None:
        fold = [metrics.folding(u) for u in disps]
        out.update(folding_pixels=float(np.mean(fold)),
                   folding_pairs=float(np.mean([x > 0 for x in fold])))
    return out


def run_classical(key: str, mov, fix, params: dict) -> dict:
    fn = FUNCS[key]
    warped, disps = [], []
    for m, f in zip(mov, fix):
        w, u = fn(m, f, **params)
        warped.append(w)
        disps.append(u)
    res = _scores(warped, fix, disps)
    res.update(params=params)
    return res


def run_learned(model, mov, fix, steps: int, passes: int | None, batch_sizes=(64, 256)):
    """Scores and batch throughput of one learned row, and ``go(i)``: the row on pair i alone
    (for :func:`interleaved_ms`)."""
    m = torch.from_numpy(mov).float().unsqueeze(1)
    f = torch.from_numpy(fix).float().unsqueeze(1)

    def go(mm, ff):
        with torch.no_grad():
            p = model.predict(mm, ff, passes)
        if steps:
            p = model.refine(mm, ff, p, steps=steps)
        with torch.no_grad():
            return (model.warp(mm, p) > 0.5)[:, 0], p

    warped, grids = [], []
    for i in range(0, len(m), 256):
        w, p = go(m[i:i + 256], f[i:i + 256])
        warped.append(w.numpy())
        grids.append(model.grid(p, (28, 28)).numpy())
    warped, grids = np.concatenate(warped), np.concatenate(grids)
    res = _scores(warped, fix, [metrics.grid_to_displacement(g) for g in grids])
    res.update(_batch_throughput(go, m, f, batch_sizes))
    return res, lambda i: go(m[i:i + 1], f[i:i + 1])


def _batch_throughput(go, m: torch.Tensor, f: torch.Tensor, batch_sizes=(64, 256)) -> dict:
    """Pairs/s of ``go`` in each batch size, over as many whole batches as the pairs fill,
    after one warm-up batch."""
    out = {}
    for bs in batch_sizes:
        n = (len(m) // bs) * bs or len(m)
        go(m[:bs], f[:bs])
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            go(m[i:i + bs], f[i:i + bs])
        out[f"pairs_per_s_batch{bs}"] = n / (time.perf_counter() - t0)
    return out


def speed(model, mov, fix, threads=(1, 2), steps=(0,) + REFINE_STEPS) -> list[dict]:
    """The learned matcher's speed alone, with 1 and 2 torch threads: median ms for one pair
    (200 pairs, taking turns with SimpleITK demons on the same pairs, see
    :func:`interleaved_ms`) and pairs/s in batches of 64 and 256; model load and warm-up
    excluded, ``torch.inference_mode`` around the network, warp included."""
    m = torch.from_numpy(mov).float().unsqueeze(1)
    f = torch.from_numpy(fix).float().unsqueeze(1)

    def go(mm, ff, k):
        with torch.inference_mode():
            p = model.predict(mm, ff, 1)
        if k:
            p = model.refine(mm, ff, p.clone(), steps=k)
        with torch.inference_mode():
            return model.warp(mm, p) > 0.5

    out = []
    before = torch.get_num_threads()
    for t in threads:
        torch.set_num_threads(t)
        fns = {k: (lambda i, k=k: go(m[i:i + 1], f[i:i + 1], k)) for k in steps}
        fns["demons"] = lambda i: sitk_demons(mov[i], fix[i], **PARAMS["sitk_demons"])
        ms = interleaved_ms(fns, n=min(200, len(mov)))
        for k in steps:
            out.append({"threads": t, "refine_steps": k, "ms_per_pair": ms[k],
                        "demons_ms_per_pair": ms["demons"],
                        "times_faster_than_demons": ms["demons"] / ms[k],
                        **_batch_throughput(lambda mm, ff: go(mm, ff, k), m, f)})
    torch.set_num_threads(before)
    return out


def tune(n: int = 100, only=None) -> None:
    images, labels = mnist.rows("train")
    pairs = mnist.sample_pairs(labels, n, np.random.default_rng(123))
    m = mnist.masks(images)
    mov, fix = m[pairs[:, 0]], m[pairs[:, 1]]
    for key, grid in TUNE_GRID.items():
        if only and key not in only:
            continue
        best = None
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid.keys(), values))
            t0 = time.perf_counter()
            r = run_classical(key, mov, fix, params)
            ms = (time.perf_counter() - t0) * 1e3 / len(mov)
            print(f"{key:14s} {params} Dice {r['dice']:.4f} {ms:.1f} ms", flush=True)
            if best is None or r["dice"] > best[0] + 1e-3:
                best = (r["dice"], params)
        print(f"best {key}: {best[1]} (Dice {best[0]:.4f})\n", flush=True)


# ---------------------------------------------------------------------------------------------
# end to end on scenes

def ncc_localize(moving: np.ndarray, fixed: np.ndarray, heights=range(18, 60, 3)):
    """Multi-scale template matching (TM_CCOEFF_NORMED): the moving digit's tight crop, resized
    to each height, slid over the fixed image. → best box xyxy (pixels)."""
    mm = moving > 127
    ys, xs = np.nonzero(mm)
    t = moving[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    f = fixed.astype(np.float32)
    best = (-2.0, None)
    for h in heights:
        w = max(2, round(t.shape[1] * h / t.shape[0]))
        if h >= f.shape[0] or w >= f.shape[1]:
            continue
        r = cv2.matchTemplate(f, cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA),
                              cv2.TM_CCOEFF_NORMED)
        _, score, _, (x, y) = cv2.minMaxLoc(r)
        if score > best[0]:
            best = (score, (x, y, x + w, y + h))
    return best[1]


def classical_pipeline(s, demons_params: dict, size: int = 28) -> tuple[np.ndarray, tuple]:
    """Template matching → crop → threshold → demons on the crops → paste back."""
    from registration.pipeline import crop, crop_mask, mask_box, square_around
    box = ncc_localize(s.moving, s.fixed)
    m_mask = s.moving > 127
    m_sq = square_around(mask_box(m_mask), 1.4)
    f_sq = square_around(box, 1.4)
    mov = crop_mask(m_mask, m_sq, size)
    fix = crop(s.fixed.astype(np.float32) / 255, f_sq, size) > 0.5
    warped, _ = sitk_demons(mov, fix, **demons_params)
    # paste the crop back into the frame: inverse of the crop's similarity transform
    x0, y0, x1, _ = f_sq
    k = (x1 - x0) / size
    a = np.array([[1 / k, 0, (0.5 - x0) / k - 0.5], [0, 1 / k, (0.5 - y0) / k - 0.5]])
    full = cv2.warpAffine(warped.astype(np.float32), a, s.fixed.shape[::-1],
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
    return full, box


def end_to_end(n: int, seed: int, skip_slow: bool, n_frames: int) -> dict:
    from registration.pipeline import Pipeline, RegistrationError, full_frame_masks
    test = scenes.test_scenes(n, seed)
    pipe = Pipeline.from_pretrained("mnist")
    rows = {}
    # this project's pipeline at its default refinement and without, and the classical
    # pipeline, taking turns on each scene (see interleaved_ms; warm-up first)
    default = (f"this pipeline (SSD + TPS matcher, {pipe.refine_steps} refinement steps, the "
               f"default)")
    runs = {default: lambda s: pipe.register(s.moving, s.fixed).warped_mask_full,
            "this pipeline, no refinement":
                lambda s: pipe.register(s.moving, s.fixed, refine_steps=0).warped_mask_full,
            "NCC template matching + demons":
                lambda s: classical_pipeline(s, PARAMS["sitk_demons"])}
    for s in test[:5]:
        for fn in runs.values():
            fn(s)
    out = {k: {"d": [], "j": [], "t": [], "det": []} for k in runs}
    for s in test:
        for name, fn in runs.items():
            t0 = time.perf_counter()
            try:
                w = fn(s)
            except RegistrationError:
                w = np.zeros_like(s.target_mask)
            out[name]["t"].append(time.perf_counter() - t0)
            if isinstance(w, tuple):                 # the classical pipeline: (mask, box)
                w, box = w
                out[name]["det"].append(metrics.box_dice(box, s.box))
            out[name]["d"].append(metrics.dice(w, s.target_mask))
            out[name]["j"].append(metrics.iou(w, s.target_mask))
    for name, o in out.items():
        rows[name] = {"dice": float(np.mean(o["d"])), "iou": float(np.mean(o["j"])),
                      "ms_per_pair": statistics.median(o["t"]) * 1e3}
        if o["det"]:
            rows[name]["detection_dice"] = float(np.mean(o["det"]))
    classical_ms = rows["NCC template matching + demons"]["ms_per_pair"]
    for name in (default, "this pipeline, no refinement"):
        rows[name]["times_faster_than_classical"] = classical_ms / rows[name]["ms_per_pair"]
    # without localization: each matcher on the whole 112×112 frames
    frames = [full_frame_masks(s.moving, s.fixed) for s in test[:n_frames]]
    keys = ["sitk_affine", "sitk_demons", "tvl1"] + ([] if skip_slow else ["sitk_bspline"])
    for name, key in CLASSICAL.items():
        if key not in keys:
            continue
        d, j, times = [], [], []
        for (mm, ff), s in zip(frames, test):
            t0 = time.perf_counter()
            w, _ = FUNCS[key](mm, ff, **PARAMS[key])
            times.append(time.perf_counter() - t0)
            d.append(metrics.dice(w, s.target_mask))
            j.append(metrics.iou(w, s.target_mask))
        rows[f"{name}, full frame, no localization ({len(frames)} scenes)"] = {
            "dice": float(np.mean(d)), "iou": float(np.mean(j)),
            "ms_per_pair": statistics.median(times) * 1e3}
    d, j, times = [], [], []
    for s in test:
        r = pipe.register(s.moving, s.fixed, localize=False)
        d.append(metrics.dice(r.warped_mask_full, s.target_mask))
        j.append(metrics.iou(r.warped_mask_full, s.target_mask))
        times.append(r.timings["total"])
    rows["this project's full-frame matcher, no localization"] = {
        "dice": float(np.mean(d)), "iou": float(np.mean(j)),
        "ms_per_pair": statistics.median(times)}
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (learned rows)")
    ap.add_argument("--itk-threads", type=int, default=1,
                    help="SimpleITK threads: 1 is 2× faster than 2 on 28×28 images here")
    ap.add_argument("--frames", type=int, default=50,
                    help="scenes for the classical full-frame (no localization) rows: slow")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-only", nargs="*", default=None, help="with --tune: these methods")
    ap.add_argument("--skip-slow", action="store_true", help="leave B-spline out of part 2")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--replot", action="store_true",
                    help="redraw peers.png from the peers.json already in --out")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads((Path(args.out) / "peers.json").read_text())
        _plot(data["matching"], data["end_to_end"], Path(args.out) / "peers.png")
        return
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if sitk is None or optical_flow_tvl1 is None:
        sys.exit("needs SimpleITK and scikit-image: pip install -r benchmarks/requirements.txt")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.itk_threads)
    if args.tune:
        tune(only=args.tune_only)
        return
    mov, fix = mnist.eval_pairs(args.pairs, args.seed)
    res = {"no warp (identity)": {**_scores(mov, fix, [np.zeros((28, 28, 2))] * len(mov)),
                                  "ms_per_pair": 0.0}}
    single = {}                       # name → the method on pair i alone, for the timing pass
    for name, key in CLASSICAL.items():
        print(f"{name} …", flush=True)
        res[name] = run_classical(key, mov, fix, PARAMS[key])
        single[name] = lambda i, key=key: FUNCS[key](mov[i], fix[i], **PARAMS[key])
    # the inference copies the pipeline runs: channels-last, forward pass frozen
    # (Matcher.for_inference, registration/frozen.py)
    model = checkpoint.load("mnist", "matcher").for_inference()
    # the previous default, the paper's regressor design with an 8×8 grid: its one pass is the
    # "single-step STN" row (the 4×4 paper preset does not train, README), its 3-pass cascade
    learned = []
    prev = checkpoint.try_load("mnist", "matcher-cascade")
    if prev is not None:
        prev = prev.for_inference()
        learned += [("paper's design: one STN pass (8×8 TPS regressor)", prev, 0, 1),
                    ("previous matcher: 8×8 regressor, 3 passes", prev, 0, 3)]
    learned += [("this matcher: flow U-Net → 12×12 TPS, one pass", model, 0, 1)]
    learned += [(f"this matcher + {k} refinement steps", model, k, 1) for k in REFINE_STEPS]
    for name, net, k, passes in learned:
        print(f"{name} …", flush=True)
        res[name], single[name] = run_learned(net, mov, fix, k, passes)
    print("timing one pair at a time, the methods taking turns …", flush=True)
    for name, ms in interleaved_ms(single, n=min(200, len(mov))).items():
        res[name]["ms_per_pair"] = ms
    demons_ms = res["SimpleITK diffeomorphic demons"]["ms_per_pair"]
    rows = []
    for name, r in res.items():
        rows.append([name, r["dice"], r["iou"], r["hd95_mean_finite"],
                     f"{100 * r.get('folding_pixels', 0):.2f} % / {100 * r.get('folding_pairs', 0):.0f} %",
                     f"{r['ms_per_pair']:.2f}",
                     f"{demons_ms / r['ms_per_pair']:.0f}×" if r["ms_per_pair"] > 0 else "—",
                     f"{r['pairs_per_s_batch256']:,.0f}" if "pairs_per_s_batch256" in r else "—"])
    table = _table(["method", "Dice", "IoU", "HD95 px (mean)", "folding: pixels / pairs",
                    "ms / pair", "speed vs demons", "pairs/s (batch 256)"], rows)
    print(f"\n{args.pairs} held-out MNIST mask pairs, {args.threads} threads\n")
    print(table)
    sp = speed(model, mov, fix)
    speed_table = _table(["threads", "refinement steps", "ms / pair (1 pair)",
                          "demons ms / pair (same turns)", "speed vs demons",
                          "pairs/s (batch 64)", "pairs/s (batch 256)"],
                         [[r["threads"], r["refine_steps"], f"{r['ms_per_pair']:.2f}",
                           f"{r['demons_ms_per_pair']:.1f}",
                           f"{r['times_faster_than_demons']:.0f}×",
                           f"{r['pairs_per_s_batch64']:,.0f}",
                           f"{r['pairs_per_s_batch256']:,.0f}"] for r in sp])
    print("\nThe learned matcher's speed, taking turns with demons on 200 pairs\n")
    print(speed_table)
    e2e = end_to_end(args.scenes, args.seed, args.skip_slow, args.frames) if args.scenes else {}
    e2e_table = _table(["method", "matching Dice", "matching IoU", "ms / pair",
                        "speed vs the classical pipeline"],
                       [[k, v["dice"], v["iou"], f"{v['ms_per_pair']:.1f}",
                         f"{v['times_faster_than_classical']:.1f}×"
                         if "times_faster_than_classical" in v else ""]
                        for k, v in e2e.items()])
    if e2e:
        print(f"\nEnd to end, {args.scenes} held-out 112×112 scenes\n")
        print(e2e_table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(
        {"pairs": args.pairs, "scenes": args.scenes, "seed": args.seed, "threads": args.threads,
         "matching": res, "end_to_end": e2e, "table": table, "e2e_table": e2e_table,
         "speed": sp, "speed_table": speed_table},
        indent=2))
    _plot(res, e2e, out / "peers.png")
    print(f"\nwrote {out / 'peers.json'} and {out / 'peers.png'}")


def _short(name: str) -> str:
    """Plot label: the table's row name without its parenthesised details."""
    for long, short in (("this matcher: flow U-Net → 12×12 TPS, one pass", "flow matcher, 1 pass"),
                        ("this matcher + ", "flow matcher + "),
                        ("paper's design: one STN pass (8×8 TPS regressor)", "paper's design (1 pass)"),
                        ("previous matcher: 8×8 regressor, 3 passes", "previous matcher (3 passes)"),
                        ("this project's full-frame matcher", "full-frame matcher"),
                        (", full frame, no localization", ", no loc."),
                        (" refinement steps", " steps"),
                        ("this pipeline (SSD + TPS matcher, ", "this pipeline, "),
                        (" steps, the default)", " steps (default)")):
        name = name.replace(long, short)
    return name.split(" (")[0] if not name.endswith("passes)") and "pass)" not in name else name


def _plot(res: dict, e2e: dict, path: Path) -> None:
    """Dice against ms per pair (log): learned rows orange circles labelled on the left,
    classical rows blue squares labelled on the right; the identity as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(13 if e2e else 6.5, 5.2), squeeze=False)
    for ax, data, title in ((axes[0, 0], res, "28×28 mask pairs"),
                            *(((axes[0, 1], e2e, "112×112 scenes, end to end"),) if e2e else ())):
        for name, r in data.items():
            if r["ms_per_pair"] <= 0:          # the identity: no time to plot
                ax.axhline(r["dice"], color="grey", ls="--", lw=1)
                ax.annotate(f"{name}: Dice {r['dice']:.3f}", (0.02, r["dice"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                            xytext=(0, 3), textcoords="offset points")
                continue
            learned = name.startswith(("this", "paper's", "previous"))
            ax.scatter(r["ms_per_pair"], r["dice"], s=50, marker="o" if learned else "s",
                       color="tab:orange" if learned else "tab:blue", zorder=3)
            ax.annotate(_short(name), (r["ms_per_pair"], r["dice"]), fontsize=7,
                        xytext=(-6 if learned else 6, -3), textcoords="offset points",
                        ha="right" if learned else "left")
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo / 3, hi * 6)
        ax.set_xlabel("ms per pair (one pair, median, log scale)")
        ax.set_ylabel("Dice")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
