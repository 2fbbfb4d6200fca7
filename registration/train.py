"""Training CLI.

    python -m registration.train matcher --dataset mnist
    python -m registration.train matcher-full --dataset mnist
    python -m registration.train localizer --dataset mnist

Writes ``checkpoints/<dataset>/<model>/{config.json, model.safetensors, metrics.json}``;
metrics.json records the command line, wall time and validation figures.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, tps
from .config import (DATASET_MODELS, MATCHER_PRESETS, UNSHUFFLE_LOCALIZER, LocalizerConfig,
                     MatcherConfig)
from .matcher import Matcher


def autocast(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cosine_lr(progress: float, step: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` in [0, 1]."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Budget:
    """Stops training at ``steps`` or after ``minutes`` of wall time, whichever comes first;
    ``progress`` drives the learning-rate schedule so a slower machine still anneals fully."""

    def __init__(self, steps: int, minutes: float | None):
        self.steps, self.seconds, self.t0 = steps, (minutes or 0) * 60, time.time()

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.seconds:
            p = max(p, (time.time() - self.t0) / self.seconds)
        return min(1.0, p)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def bar(self, desc: str) -> tqdm:
        """Progress in percent of the budget (steps or time, whichever binds)."""
        return tqdm(total=100, desc=desc, unit="%", mininterval=10, file=sys.stdout,
                    bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")

    def tick(self, bar: tqdm, step: int) -> None:
        bar.update(100 * self.progress(step) - bar.n)


# ---------------------------------------------------------------------------------------------
# matcher data: batches of (moving, fixed) float masks (B, 1, S, S)

class MnistPairs:
    """Same-class pairs of MNIST masks; rows are split train/val by index within each class."""

    def __init__(self, part: str, seed: int):
        from .data import mnist
        images, self.labels = mnist.rows(part)
        self.masks = torch.from_numpy(mnist.masks(images)).float().unsqueeze(1)
        self.rng = np.random.default_rng(seed)
        self._sample = mnist.sample_pairs

    def batch(self, n: int):
        p = self._sample(self.labels, n, self.rng)
        return self.masks[p[:, 0]], self.masks[p[:, 1]]


class FullFramePairs:
    """Whole 112×112 scene frames for the no-localization matcher (paper §4.2)."""

    def __init__(self, part: str, seed: int):
        from .data import scenes
        self.gen = scenes.SceneGenerator(part, seed=seed)
        from .pipeline import full_frame_masks
        self._frames = full_frame_masks

    def batch(self, n: int):
        mov, fix = [], []
        for _ in range(n):
            s = self.gen.sample()
            m, f = self._frames(s.moving, s.fixed)
            mov.append(m)
            fix.append(f)
        t = lambda a: torch.from_numpy(np.stack(a)).float().unsqueeze(1)
        return t(mov), t(fix)


@torch.no_grad()
def matcher_val_dice(model: Matcher, moving: torch.Tensor, fixed: torch.Tensor,
                     bs: int = 250) -> tuple[float, float, float]:
    """Hard Dice / IoU of warped-moving (>0.5) against fixed, and the share of pixels whose
    warp folds (det J ≤ 0), fp32."""
    from .losses import jacobian_det
    model.eval()
    dices, ious, folds = [], [], []
    for i in range(0, len(moving), bs):
        m, f = moving[i:i + bs], fixed[i:i + bs]
        grid = model.grid(model.predict(m, f), tuple(f.shape[-2:]))
        folds.append((jacobian_det(grid) <= 0).float().mean((1, 2)))
        # part-labelled masks are scored on the whole silhouette (the union of the parts)
        w = tps.warp_image(m, grid).sum(1, keepdim=True) > 0.5
        f = f.sum(1, keepdim=True) > 0.5
        inter = (w & f).sum((1, 2, 3)).float()
        s = w.sum((1, 2, 3)).float() + f.sum((1, 2, 3)).float()
        dices.append(2 * inter / s.clamp_min(1))
        ious.append(inter / (s - inter).clamp_min(1))
    model.train()
    return (float(torch.cat(dices).mean()), float(torch.cat(ious).mean()),
            float(torch.cat(folds).mean()))


def fit(model, batch_loss, validate, args, desc: str, weight_decay: float) -> dict:
    """The loop both models share: Adam with L2 weight decay, warm-up + cosine over the budget,
    validation every ``args.val_every`` steps. ``batch_loss()`` samples a batch and returns
    (loss, parts); ``validate()`` returns a dict of validation figures."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=weight_decay)
    log = []
    t0 = time.time()
    budget = Budget(args.steps, args.minutes)
    bar = budget.bar(desc)
    step = 0
    while not budget.done(step):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(budget.progress(step), step, args.lr)
        with autocast(args.bf16):
            loss, _ = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        budget.tick(bar, step)
        loss_v = float(loss.detach())
        if step % args.val_every == 0:
            log.append({"step": step, "minutes": round((time.time() - t0) / 60, 2),
                        "loss": round(loss_v, 4), **validate()})
            bar.write(str(log[-1]), file=sys.stdout)
            sys.stdout.flush()
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
    bar.close()
    return {"wall_time_s": round(time.time() - t0, 1), "steps": step, "batch": args.batch,
            **validate(), "log": log}


class PairCrops:
    """Object-centric mask crops of scenes' (moving, target) masks, as the pipeline cuts them:
    ``square_around(box, margin)`` jittered (``segnet.jitter_square``), size × size; a pair
    is mirrored with probability ½ (both crops together)."""

    def __init__(self, source, size: int, margin: float, seed: int, jitter: bool = True):
        self.source, self.size, self.margin = source, size, margin
        self.rng = np.random.default_rng(seed)
        self.jitter = jitter

    def batch(self, n: int):
        from .pipeline import crop_mask, square_around
        from .segnet import jitter_square
        mov, fix = [], []
        for s in self.source.batch(n):
            sq = (lambda b: jitter_square(b, self.margin, self.rng, 0.04, 0.08)) if self.jitter \
                else (lambda b: square_around(b, self.margin))
            m = crop_mask(s.moving_mask, sq(s.moving_box), self.size)
            f = crop_mask(s.target_mask, sq(s.box), self.size)
            if self.jitter and self.rng.random() < 0.5:
                m, f = m[:, ::-1], f[:, ::-1]
            mov.append(m)
            fix.append(f)
        t = lambda a: torch.from_numpy(np.stack(a).astype(np.float32)).unsqueeze(1)
        return t(mov), t(fix)


class FullFrameCrops:
    """The no-localization setting on scenes with true masks: the moving object's mask centred
    at half the frame, every target-like object of the fixed image (``all_mask``: all animals,
    all tumours), size × size."""

    def __init__(self, source, size: int):
        from .pipeline import full_frame_layout
        self.source, self.size, self._layout = source, size, full_frame_layout

    def batch(self, n: int):
        pairs = [self._layout(s.moving_mask, s.all_mask, self.size) for s in self.source.batch(n)]
        t = lambda a: torch.from_numpy(np.stack(a).astype(np.float32)).unsqueeze(1)
        return t([p[0] for p in pairs]), t([p[1] for p in pairs])


def matcher_data(dataset: str, full: bool, part: str, seed: int, cfg: MatcherConfig,
                 args=None):
    if dataset == "usct":
        from .pipeline import DATASETS
        src = scene_source(dataset, part, seed, args)
        if full:
            return FullFrameCrops(src, cfg.input_size)
        return PairCrops(src, cfg.input_size, DATASETS[dataset].crop_margin, seed,
                         jitter=part == "train")
    if dataset == "silhouettes":
        from .data.silhouettes import MaskPairs
        if full:
            return FullFrameCrops(scene_generator(dataset, part, seed), cfg.input_size)
        return MaskPairs(part, seed, size=cfg.input_size, parts=cfg.mask_channels == 2)
    return FullFramePairs(part, seed) if full else MnistPairs(part, seed)


def matcher_config(args, full: bool) -> MatcherConfig:
    """The matcher's config: the preset's design (``MATCHER_PRESETS``), then the data set's
    sizes (``DATASET_MODELS``), then explicit command-line options. The full-frame matcher
    (no localization, paper §4.2) is the paper's regressor with a 16×16 grid, one pass."""
    kind = "matcher-full" if full else "matcher"
    base = ({"arch": "regress", "grid_size": 16, "passes": 1, "fold_weight": 1.0} if full
            else dict(MATCHER_PRESETS[args.preset]))
    base["input_size"] = 112 if full else 28
    base.update(DATASET_MODELS.get(args.dataset, {}).get(kind, {}))
    cli = {"grid_size": args.grid, "fold_weight": args.fold, "passes": args.passes,
           "arch": args.arch, "flow_scale": args.flow_scale, "fold_margin": args.fold_margin,
           "unet_channels": tuple(args.unet) if args.unet else None}
    base.update({k: v for k, v in cli.items() if v is not None})
    return MatcherConfig(smooth_weight=args.smooth, mask_channels=2 if args.parts else 1,
                         **base)


def train_matcher(args, full: bool) -> dict:
    cfg = matcher_config(args, full)
    torch.manual_seed(args.seed)
    model = Matcher(cfg).to(memory_format=torch.channels_last)
    data = matcher_data(args.dataset, full, "train", args.seed, cfg, args)
    val_data = matcher_data(args.dataset, full, "val", args.seed + 1, cfg, args)
    val_m, val_f = val_data.batch(args.val_pairs)

    n_cascade = int(round(args.batch * args.cascade)) if cfg.passes > 1 else 0

    def batch_loss():
        m, f = data.batch(args.batch)
        if n_cascade:
            # self-cascade: part of the batch starts from the model's own current warp, so the
            # same network learns the later passes' small corrections (no gradient through it)
            with torch.no_grad():
                m[:n_cascade] = model.warp(m[:n_cascade],
                                           model(m[:n_cascade], f[:n_cascade]).float())
        return model.loss(m.contiguous(memory_format=torch.channels_last),
                          f.contiguous(memory_format=torch.channels_last))

    def validate():
        d, j, fold = matcher_val_dice(model, val_m, val_f)
        return {"val_dice": round(d, 4), "val_iou": round(j, 4), "val_fold": round(fold, 5)}

    metrics = fit(model, batch_loss, validate, args,
                  f"train {'matcher-full' if full else 'matcher'}", 1e-4)   # paper: L2 1e-4
    return {"model": model, "cfg": cfg, "metrics": {**metrics, "val_pairs": args.val_pairs}}


# ---------------------------------------------------------------------------------------------
# localizer

def scene_tensors(scenes_list, image_size: int | None = None, query_size: int | None = None,
                  margin: float = 1.4, whole: bool = False):
    """Scenes → fixed (B, 1, S, S), moving (B, 1, q, q) in [0, 1], boxes (B, 4) xyxy in the
    S-px frame. A fixed image larger than ``image_size`` is resized (INTER_AREA) and its box
    scaled; ``query_size`` picks the query (see :func:`query_crop`)."""
    import cv2
    fixed = [s.fixed for s in scenes_list]
    k = 1.0
    if image_size and fixed[0].shape[0] != image_size:
        k = image_size / fixed[0].shape[0]
        fixed = [cv2.resize(x, (image_size, image_size), interpolation=cv2.INTER_AREA)
                 for x in fixed]
    f = torch.from_numpy(np.stack(fixed)).float().div_(255).unsqueeze(1)
    mov = [query_crop(s, query_size, margin, whole) if query_size else s.moving
           for s in scenes_list]
    m = torch.from_numpy(np.stack(mov).astype(np.float32)).div_(255).unsqueeze(1)
    b = torch.from_numpy(np.stack([s.box for s in scenes_list])).float() * k
    return f, m, b


@torch.no_grad()
def localizer_val(model, fixed, moving, boxes, bs: int = 250) -> dict:
    """Box Dice / IoU of the top box against the true box, and the share with IoU ≥ 0.5."""
    from torchvision.ops import box_iou
    model.eval()
    pred = torch.cat([model.predict(fixed[i:i + bs], moving[i:i + bs])[0]
                      for i in range(0, len(fixed), bs)])
    model.train()
    iou = box_iou(pred, boxes).diagonal()
    dice = 2 * iou / (1 + iou)   # for two boxes, Dice = 2·IoU / (1 + IoU)
    return {"val_box_dice": round(float(dice.mean()), 4), "val_box_iou": round(float(iou.mean()), 4),
            "val_hit": round(float((iou >= 0.5).float().mean()), 4)}


def scene_generator(dataset: str, part: str, seed: int):
    """The data set's seeded scene sampler (``.sample()`` / ``.batch(n)`` → scenes)."""
    if dataset == "usct":
        from .data.usct import PairGenerator
        return PairGenerator(part, seed)
    if dataset == "silhouettes":
        from .data.silhouettes import SceneGenerator
    else:
        from .data.scenes import SceneGenerator
    return SceneGenerator(part, seed=seed)


class CachedScenes:
    """A fixed list of scenes served like a generator (``sample``/``batch`` draw at random)."""

    def __init__(self, scenes_list, seed: int):
        self.items, self.rng = scenes_list, np.random.default_rng(seed)

    def sample(self):
        return self.items[int(self.rng.integers(len(self.items)))]

    def batch(self, n: int):
        return [self.sample() for _ in range(n)]


def scene_source(dataset: str, part: str, seed: int, args):
    """Training/validation scenes: generated on the fly, or (US–CT, ~0.1 s a pair) a cached
    set of ``args.pairs`` (validation: ``args.val_pairs``)."""
    if dataset != "usct":
        return scene_generator(dataset, part, seed)
    from .data.usct import cached_pairs
    n = args.pairs if part == "train" else args.val_pairs
    return CachedScenes(cached_pairs(part, seed, n), seed)


def query_crop(scene, query_size: int, margin: float, whole: bool = False) -> np.ndarray:
    """The localizer's query: the moving image itself when it is query_size²; else resized
    whole (``whole``) or the pipeline's crop around the moving object's box. (q, q)."""
    if scene.moving.shape[0] == query_size:
        return scene.moving
    import cv2
    if whole:
        return cv2.resize(scene.moving, (query_size, query_size), interpolation=cv2.INTER_AREA)
    from .pipeline import crop, square_around
    return crop(scene.moving.astype(np.float32), square_around(scene.moving_box, margin),
                query_size)


class ScenePool:
    """Training scenes as tensors, renewed a share at a time.

    Silhouette scenes take ~5 ms each to paint, as long as a third of a localizer step, so a
    pool of ``size`` scenes is painted once and each batch replaces ``fresh`` of its draws with
    new scenes; every draw is also mirrored left–right with probability ½ (fixed, moving and
    box together), which keeps the pool from being memorised. ``fresh=1`` is plain on-the-fly
    sampling."""

    def __init__(self, gen, size: int, fresh: float, seed: int, to_tensors=scene_tensors):
        self.gen, self.fresh, self.to_tensors = gen, float(fresh), to_tensors
        self.rng = np.random.default_rng(seed)
        self.size = size if self.fresh < 1 else 0
        self.f = self.m = self.b = None
        if self.size:
            self.f, self.m, self.b = to_tensors(gen.batch(size))

    def batch(self, n: int):
        if not self.size:
            f, m, b = self.to_tensors(self.gen.batch(n))
        else:
            idx = torch.from_numpy(self.rng.choice(self.size, n, replace=False))
            k = int(round(n * self.fresh))
            if k:
                nf, nm, nb = self.to_tensors(self.gen.batch(k))
                self.f[idx[:k]], self.m[idx[:k]], self.b[idx[:k]] = nf, nm, nb
            f, m, b = self.f[idx].clone(), self.m[idx].clone(), self.b[idx].clone()
        flip = torch.from_numpy(self.rng.random(n) < 0.5)
        if flip.any():
            w = f.shape[-1]
            f[flip] = f[flip].flip(-1)
            m[flip] = m[flip].flip(-1)
            b[flip] = torch.stack([w - b[flip, 2], b[flip, 1], w - b[flip, 0], b[flip, 3]], 1)
        return f, m, b


def train_localizer(args) -> dict:
    from .localizer import Localizer
    over = dict(DATASET_MODELS.get(args.dataset, {}).get("localizer", {}))
    if args.stem == "unshuffle":
        if over:
            raise SystemExit(f"--stem unshuffle: its layout is for the MNIST-sized SSD, not "
                             f"{args.dataset}'s {over}")
        over.update(UNSHUFFLE_LOCALIZER)
        if args.localizer_channels:
            if len(args.localizer_channels) != len(over["channels"]):
                raise SystemExit(f"--localizer-channels: expected {len(over['channels'])} "
                                 f"widths, got {len(args.localizer_channels)}")
            over["channels"] = tuple(args.localizer_channels)
    elif args.localizer_channels:
        raise SystemExit("--localizer-channels: only with --stem unshuffle")
    cfg = LocalizerConfig(conditioning=args.conditioning, **over)
    torch.manual_seed(args.seed)
    model = Localizer(cfg).to(memory_format=torch.channels_last)
    from .pipeline import DATASETS
    ds = DATASETS[args.dataset]
    tensors = lambda ss: scene_tensors(ss, cfg.image_size, cfg.query_size, ds.crop_margin,
                                       ds.query == "whole")
    pool = ScenePool(scene_source(args.dataset, "train", args.seed, args), args.pool,
                     args.fresh, args.seed, tensors)
    val = tensors(scene_source(args.dataset, "val", args.seed + 1, args).batch(args.val_pairs))

    def batch_loss():
        f, m, b = pool.batch(args.batch)
        return model.loss(f.contiguous(memory_format=torch.channels_last), m, b)

    metrics = fit(model, batch_loss, lambda: localizer_val(model, *val), args,
                  f"train localizer ({cfg.conditioning})", 5e-4)   # paper: L2 5e-4
    return {"model": model, "cfg": cfg, "metrics": {**metrics, "val_scenes": args.val_pairs}}


# ---------------------------------------------------------------------------------------------
# segmenter (learned masks for textured scenes)

def segmenter_samples(scenes_list, size: int, margin: float, rng) -> tuple[torch.Tensor, ...]:
    """Per scene: the fixed crop around the target (jittered), the moving crop around the
    moving animal (jittered) and the whole moving frame resized to size × size (the pipeline
    segments the moving image whole). Returns images, masks (N, 1, size, size) float."""
    import cv2

    from .segnet import scene_crops
    imgs, msks = scene_crops(scenes_list, size, margin, rng)
    whole_i = np.stack([cv2.resize(s.moving, (size, size), interpolation=cv2.INTER_AREA)
                        for s in scenes_list]).astype(np.float32)[:, None] / 255
    whole_m = np.stack([cv2.resize(s.moving_mask.astype(np.float32), (size, size),
                                   interpolation=cv2.INTER_AREA) > 0.5
                        for s in scenes_list]).astype(np.float32)[:, None]
    return (torch.from_numpy(np.concatenate([imgs, whole_i])),
            torch.from_numpy(np.concatenate([msks, whole_m])))


def train_segmenter(args) -> dict:
    from .segnet import SegNet, SegNetConfig, segmentation_loss
    cfg = SegNetConfig()
    torch.manual_seed(args.seed)
    model = SegNet(cfg).to(memory_format=torch.channels_last)
    gen = scene_source(args.dataset, "train", args.seed, args)
    rng = np.random.default_rng(args.seed)
    pool = gen.batch(args.pool)
    per = max(1, args.batch // 3)
    val_i, val_m = segmenter_samples(scene_source(args.dataset, "val", args.seed + 1, args)
                                     .batch(args.val_pairs), cfg.input_size, cfg.margin,
                                     np.random.default_rng(args.seed + 1))

    def batch_loss():
        idx = rng.choice(len(pool), per, replace=False)
        for k in idx[:int(round(per * args.fresh))]:
            pool[k] = gen.sample()
        i, m = segmenter_samples([pool[k] for k in idx], cfg.input_size, cfg.margin, rng)
        flip = torch.from_numpy(rng.random(len(i)) < 0.5)
        i[flip], m[flip] = i[flip].flip(-1), m[flip].flip(-1)
        return segmentation_loss(model(i.contiguous(memory_format=torch.channels_last)), m,
                                 cfg.dice_weight, cfg.bce_weight)

    @torch.no_grad()
    def validate():
        model.eval()
        pred = torch.cat([model(val_i[k:k + 200]) > 0 for k in range(0, len(val_i), 200)])
        model.train()
        t = val_m > 0.5
        inter = (pred & t).sum((1, 2, 3)).float()
        tot = pred.sum((1, 2, 3)).float() + t.sum((1, 2, 3)).float()
        return {"val_dice": round(float((2 * inter / tot.clamp_min(1)).mean()), 4),
                "val_iou": round(float((inter / (tot - inter).clamp_min(1)).mean()), 4)}

    metrics = fit(model, batch_loss, validate, args, "train segmenter", 1e-4)
    return {"model": model, "cfg": cfg,
            "metrics": {**metrics, "val_scenes": args.val_pairs,
                        "val_crops": int(len(val_i))}}


# ---------------------------------------------------------------------------------------------
# verifier (re-ranks the SSD's candidates)

def train_verifier(args) -> dict:
    """Samples from the pipeline's own candidates (top ``--rerank-k`` boxes after NMS) in
    ``--pool`` training scenes; with ``--classes``, labelled silhouettes instead (the rows
    drawn as the pipeline sees them, or with ``--verifier-grey`` the moving and target objects
    cut out of ``--pool`` rendered scenes, mask and grey detail). Validation on
    ``--val-pairs`` validation scenes: the share of scenes whose best-scored candidate is the
    target, against the shape overlap it replaces."""
    from .config import VerifierConfig
    from .pipeline import DATASETS, Pipeline
    from .metrics import group_top1
    from .verify import Verifier, candidate_samples, mask_overlap, verifier_loss
    ds = DATASETS[args.dataset]
    seg = checkpoint.load(args.dataset, "segmenter") if ds.segmenter == "learned" else None
    pipe = Pipeline(checkpoint.load(args.dataset, "matcher"),
                    checkpoint.load(args.dataset, "localizer"), dataset=ds, segmenter=seg)
    t0 = time.time()
    grey = args.verifier_grey
    if grey and not args.classes:
        raise SystemExit("verifier --verifier-grey: needs --classes (it classifies each object)")
    if args.classes:
        if args.dataset != "silhouettes":
            raise SystemExit("verifier --classes: only the silhouettes have kinds of object")
        from .verify import labelled_scene_masks
        mov = cand = lab = None
        seg_x = seg_y = None
        if grey:
            # objects cut from scenes, segmented by the pipeline and from the true masks, half
            # each: the grey detail only exists in rendered scenes
            print(f"cutting the moving and target objects of {args.pool} training scenes, "
                  f"segmented and true …", flush=True)
            src = scene_source(args.dataset, "train", args.seed, args)
            parts = [labelled_scene_masks(pipe, src.batch(args.pool // 2), grey=True,
                                          given_masks=g) for g in (False, True)]
            seg_x = torch.from_numpy(np.concatenate([x for x, _ in parts]))
            seg_y = torch.from_numpy(np.concatenate([y for _, y in parts]))
            vsrc = scene_source(args.dataset, "val", args.seed + 2, args).batch(args.val_pairs)
            vparts = [labelled_scene_masks(pipe, vsrc, grey=True, given_masks=g)
                      for g in (False, True)]
            v_shapes = torch.from_numpy(np.concatenate([x for x, _ in vparts]))
            v_kinds = np.concatenate([y for _, y in vparts])
        else:                          # the labelled rows, drawn as the pipeline sees them
            from .data import silhouettes as sil
            from .verify import shape_samples
            images, kinds = sil.rows("train")
            row_masks, kinds = sil.masks(images), torch.from_numpy(kinds.astype(np.int64))
            v_images, v_kinds = sil.rows("val")
            v_shapes, v_rows = shape_samples(sil.masks(v_images), 1000, pipe.size,
                                             ds.crop_margin,
                                             np.random.default_rng(args.seed + 1))
            v_shapes = torch.from_numpy(v_shapes).float().unsqueeze(1)
            v_kinds = v_kinds[v_rows]
            if args.scene_masks:
                print(f"segmenting {args.scene_masks} training scenes …", flush=True)
                x, y = labelled_scene_masks(pipe, scene_source(args.dataset, "train", args.seed,
                                                               args).batch(args.scene_masks))
                seg_x, seg_y = torch.from_numpy(x).float().unsqueeze(1), torch.from_numpy(y)
    else:
        print(f"collecting candidates from {args.pool} training scenes …", flush=True)
        mov, cand, lab, _ = candidate_samples(
            pipe, scene_source(args.dataset, "train", args.seed, args).batch(args.pool),
            args.rerank_k)
    v_mov, v_cand, v_lab, v_own = candidate_samples(
        pipe, scene_source(args.dataset, "val", args.seed + 1, args).batch(args.val_pairs),
        args.rerank_k, grey=grey)
    collect_s = time.time() - t0
    t = lambda a: torch.from_numpy(a).float() if grey else torch.from_numpy(a).float().unsqueeze(1)
    if lab is not None:
        print(f"{len(lab)} training samples ({lab.mean():.1%} positive), {len(v_lab)} "
              f"validation, {collect_s / 60:.1f} min", flush=True)
        mov, cand, lab = t(mov), t(cand), torch.from_numpy(lab)
    v_mov, v_cand = t(v_mov), t(v_cand)
    bn = args.verifier_arch == "bn"
    cfg = VerifierConfig(input_size=pipe.size, classes=args.classes, arch=args.verifier_arch,
                         dropout=0.3 if bn else 0.0, grey=grey,
                         **({"channels": tuple(args.verifier_channels),
                             "hidden": 2 * args.verifier_channels[-1]}
                            if args.verifier_channels else {}))
    torch.manual_seed(args.seed)
    model = Verifier(cfg)
    rng = np.random.default_rng(args.seed)

    def batch_loss():
        if grey:                       # classify objects cut from rendered scenes
            idx = torch.from_numpy(rng.choice(len(seg_y), args.batch, replace=False))
            x = seg_x[idx]
            flip = torch.from_numpy(rng.random(args.batch) < 0.5)
            x[flip] = x[flip].flip(-1)
            return torch.nn.functional.cross_entropy(model.classify(x), seg_y[idx],
                                                     label_smoothing=0.1 if bn else 0.0), {}
        if args.classes:               # classify silhouettes drawn as the pipeline sees them
            n_seg = args.batch // 2 if seg_x is not None else 0
            x, rows_ = shape_samples(row_masks, args.batch - n_seg, cfg.input_size,
                                     ds.crop_margin, rng, aspect=0.1 if bn else 0.0)
            x, y = t(x), kinds[rows_]
            if n_seg:                  # … and as its segmenter cut them out of scenes
                idx = torch.from_numpy(rng.choice(len(seg_y), n_seg, replace=False))
                sx = seg_x[idx]
                flip = torch.from_numpy(rng.random(n_seg) < 0.5)
                sx[flip] = sx[flip].flip(-1)
                x, y = torch.cat([x, sx]), torch.cat([y, seg_y[idx]])
            return torch.nn.functional.cross_entropy(model.classify(x), y,
                                                     label_smoothing=0.1 if bn else 0.0), {}
        idx = torch.from_numpy(rng.choice(len(lab), min(args.batch, len(lab)), replace=False))
        m, c = mov[idx], cand[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)     # mirror both masks together
        m[flip], c[flip] = m[flip].flip(-1), c[flip].flip(-1)
        return verifier_loss(model, m, c, lab[idx]), {}

    def top1(scores) -> float:
        """Share of validation scenes with a target candidate whose best candidate is it."""
        return round(group_top1(scores, v_lab, v_own), 4)

    overlap_top1 = top1(mask_overlap(v_mov[:, :1] > 0.5, v_cand[:, :1] > 0.5))   # baseline, once

    @torch.no_grad()
    def validate():
        model.eval()
        logits = torch.cat([model(v_mov[k:k + 512], v_cand[k:k + 512])
                            for k in range(0, len(v_mov), 512)])
        acc = ((logits > 0).float() == torch.from_numpy(v_lab)).float().mean()
        out = {"val_accuracy": round(float(acc), 4), "val_top1": top1(logits),
               "val_top1_shape_overlap": overlap_top1}
        if args.classes:
            kind = torch.cat([model.classify(v_shapes[k:k + 512]) for k in
                              range(0, len(v_shapes), 512)]).argmax(1).numpy()
            out["val_class_accuracy"] = round(float((kind == v_kinds).mean()), 4)
        model.train()
        return out

    metrics = fit(model, batch_loss, validate, args, "train verifier", 1e-4)
    return {"model": model, "cfg": cfg,
            "metrics": {**metrics, "collect_s": round(collect_s, 1),
                        **({} if args.classes else {"train_scenes": args.pool,
                                                    "train_samples": int(len(lab))}),
                        "val_scenes": args.val_pairs,
                        "val_samples": int(len(v_lab))}}


# ranker (re-ranks the US–CT SSD's candidates by the pair's geometry)

def fit_listwise(cfg, x: np.ndarray, table: np.ndarray, target: np.ndarray, val: tuple,
                 baselines: dict, args, desc: str):
    """A registration.ranker.Ranker on candidate features x (N, F), trained with a listwise
    softmax loss over the groups ``table`` (G, k) with positives ``target`` (G,)
    (ranker.group_table), Adam in mini-batches of ``args.batch`` groups. Validation:
    "val_top1" on ``val`` = (features, labels, groups), beside the fixed ``baselines``.
    Returns the model and fit's metrics."""
    from .metrics import group_top1
    from .ranker import Ranker, listwise_loss
    torch.manual_seed(args.seed)
    model = Ranker(cfg)
    X, T, Y = torch.from_numpy(x), torch.from_numpy(table), torch.from_numpy(target)
    model.set_scale(X)
    rng = np.random.default_rng(args.seed)
    vx, vy, vg = val

    def batch_loss():
        idx = torch.from_numpy(rng.choice(len(T), min(args.batch, len(T)), replace=False))
        return listwise_loss(model(X), T[idx], Y[idx]), {}

    @torch.no_grad()
    def validate():
        model.eval()
        out = {"val_top1": round(group_top1(model(torch.from_numpy(vx)).numpy(), vy, vg), 4),
               **baselines}
        model.train()
        return out

    return model, fit(model, batch_loss, validate, args, desc, 1e-3)


VIEW_LUT_PAIRS = 500   # training pairs the ranker's view lookup table is estimated from


def view_lut_from_pairs(pipe, pairs) -> np.ndarray:
    """ranker.estimate_view_lut on US–CT pairs as the pipeline sees them (its grey images at
    working resolution; the true tumour masks)."""
    from .ranker import estimate_view_lut

    def samples():
        for s in pairs:
            p = pipe._prepare([(s.moving, s.fixed)], [s.moving_mask], [s.all_mask])[0]
            target = cv2.resize(s.target_mask.astype(np.uint8), p["fg"].shape[::-1],
                                interpolation=cv2.INTER_NEAREST) > 0
            yield p["mg"], p["m_mask"], p["fg"], target
    return estimate_view_lut(samples())


def train_ranker(args) -> dict:
    """Features of the SSD's top ``--rerank-k`` candidates in ``--pool`` cached training pairs
    (registration.ranker), a listwise softmax loss per pair, Adam in mini-batches of pairs;
    validation: the share of ``--val-pairs`` validation pairs whose best-scored candidate is
    the target, against the SSD's own top box."""
    from .config import RankerConfig
    from .data.usct import cached_pairs
    from .pipeline import DATASETS, Pipeline
    from .metrics import group_top1
    from .ranker import candidate_table, group_table
    ds = DATASETS[args.dataset]
    pipe = Pipeline(checkpoint.load(args.dataset, "matcher"),
                    checkpoint.load(args.dataset, "localizer"), dataset=ds,
                    segmenter=checkpoint.load(args.dataset, "segmenter"))
    if args.view_lut and not args.view:
        raise SystemExit("--view-lut: the table maps the view's CT; add --view")
    cfg = RankerConfig(top_k=args.rerank_k, view=args.view, view_lut=args.view_lut,
                       features=RankerConfig.features + 2 * args.view)
    t0 = time.time()
    print(f"measuring the SSD's top {cfg.top_k} candidates in {args.pool} × "
          f"{len(args.pair_seeds or [0])} training and "
          f"{args.val_pairs} validation pairs …", flush=True)
    seeds = args.pair_seeds or [args.seed]
    train_pairs = [p for sd in seeds for p in cached_pairs("train", sd, args.pairs)[:args.pool]]
    lut = view_lut_from_pairs(pipe, train_pairs[:VIEW_LUT_PAIRS]) if cfg.view_lut else None
    x, y, g, r = candidate_table(pipe, train_pairs, cfg.top_k, view=cfg.view, lut=lut)
    vx, vy, vg, vr = candidate_table(pipe, cached_pairs("val", args.seed + 1, args.val_pairs),
                                     cfg.top_k, view=cfg.view, lut=lut)
    collect_s = time.time() - t0
    table, target = group_table(g, r, y, cfg.top_k)
    print(f"{len(y)} training candidates, {len(table)} pairs with the target among them, "
          f"{collect_s / 60:.1f} min", flush=True)
    model, metrics = fit_listwise(
        cfg, x, table, target, (vx, vy, vg),
        {"val_top1_ssd": round(group_top1(-vr, vy, vg), 4),
         "val_target_among": round(float(len(np.unique(vg[vy > 0.5])))
                                   / max(len(np.unique(vg)), 1), 4)}, args, "train ranker")
    if lut is not None:
        model.view_lut.copy_(torch.from_numpy(lut))
    return {"model": model, "cfg": cfg,
            "metrics": {**metrics, "collect_s": round(collect_s, 1),
                        "train_pairs": len(train_pairs),
                        "train_candidates": int(len(y)), "val_pairs": args.val_pairs}}


# chooser (chooses among the silhouettes verifier's candidates where masks are segmented)

CHOOSER_SEED = 100     # its scenes: validation-part scenes from this seed on (see train_chooser)


def train_chooser(args) -> dict:
    """Features of every candidate (registration.choose) in ``--pool`` validation-part scenes
    (seeds CHOOSER_SEED + ``--seed`` …; the verifier was trained on training-part scenes and
    is over-sure on them), half with the true masks given and half segmented, a listwise
    softmax loss per scene, Adam in mini-batches of scenes; validation: on ``--val-pairs``
    validation scenes (seed 11, masks segmented) the share of scenes with the target among
    their candidates whose best-scored candidate is the target, against the hand-set value
    (choose.HAND_SET_FEATURE, without the switch to a whole object)."""
    from .choose import HAND_SET_FEATURE, N_FEATURES, choice_table
    from .config import RankerConfig
    from .metrics import group_top1
    from .pipeline import Pipeline
    from .ranker import group_table
    pipe = Pipeline.from_pretrained(args.dataset, refine_steps=0, freeze=False)
    if pipe.verifier is None or not pipe.verifier.cfg.classes:
        raise SystemExit("chooser: needs the data set's kind-classifying verifier")
    pipe.chooser = None
    cfg = RankerConfig(features=N_FEATURES, hidden=(16,), kind="ranker")
    t0 = time.time()
    print(f"measuring the candidates of {args.pool} scenes (half with true masks) and "
          f"{args.val_pairs} validation scenes …", flush=True)
    half = args.pool // 2
    parts = [choice_table(pipe, scene_source(args.dataset, "val", CHOOSER_SEED + args.seed + k,
                                             args).batch(n), given_masks=k == 0)
             for k, n in enumerate((half, args.pool - half))]
    x = np.concatenate([q[0] for q in parts])
    y = np.concatenate([q[1] for q in parts])
    g = np.concatenate([q[2] + k * args.pool for k, q in enumerate(parts)])
    r = np.concatenate([q[3] for q in parts])
    vx, vy, vg, _ = choice_table(pipe, scene_source(args.dataset, "val", 11, args)
                                 .batch(args.val_pairs), given_masks=False)
    collect_s = time.time() - t0
    table, target = group_table(g, r, y, int(r.max()) + 1 if len(r) else 1)
    print(f"{len(y)} candidates, {len(table)} scenes with the target among them, "
          f"{collect_s / 60:.1f} min", flush=True)
    model, metrics = fit_listwise(
        cfg, x, table, target, (vx, vy, vg),
        {"val_top1_hand_set": round(group_top1(vx[:, HAND_SET_FEATURE], vy, vg), 4)}, args,
        "train chooser")
    return {"model": model, "cfg": cfg,
            "metrics": {**metrics, "collect_s": round(collect_s, 1), "train_scenes": args.pool,
                        "train_candidates": int(len(y)), "val_scenes": args.val_pairs}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m registration.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["matcher", "matcher-full", "localizer", "segmenter",
                                      "verifier", "ranker", "chooser"])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "silhouettes", "usct"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget; the LR schedule follows it (default per model)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--preset", default="default", choices=sorted(MATCHER_PRESETS),
                   help="matcher design: 'default' (8×8 grid, 3-pass cascade) or 'paper' "
                        "(4×4 grid, one pass, as published); the options below override it")
    p.add_argument("--grid", type=int, default=None, help="matcher control grid side (√K)")
    p.add_argument("--smooth", type=float, default=1.0, help="λ, smoothness weight")
    p.add_argument("--fold", type=float, default=None,
                   help="negative-Jacobian penalty weight (default: the preset's)")
    p.add_argument("--arch", default=None, choices=["regress", "flow"],
                   help="matcher network: 'regress' (conv + FC → TPS, the paper's) or 'flow' "
                        "(U-Net displacement projected onto the TPS); default: the preset's")
    p.add_argument("--flow-scale", type=int, default=None,
                   help="flow matcher: displacement predicted every this many pixels (1, 2, 4)")
    p.add_argument("--unet", type=int, nargs="+", default=None,
                   help="flow matcher: U-Net channels per level (default 16 32 64)")
    p.add_argument("--fold-margin", type=float, default=None,
                   help="folding penalty is relu(margin − det J) (default: the preset's)")
    p.add_argument("--passes", type=int, default=None,
                   help="matcher cascade passes at inference (default: the preset's; "
                        "matcher-full 1)")
    p.add_argument("--cascade", type=float, default=0.5,
                   help="share of each matcher batch pre-warped by the model itself")
    p.add_argument("--parts", action="store_true",
                   help="matcher: part-labelled masks (2 channels: core and thin parts)")
    p.add_argument("--conditioning", default="film", choices=["film", "stack"])
    p.add_argument("--stem", default="conv", choices=["conv", "unshuffle"],
                   help="localizer's first layer: 5×5 conv at full resolution (paper) or 2×2 "
                        "pixel unshuffle + 3×3 conv at half resolution (config.UNSHUFFLE_LOCALIZER)")
    p.add_argument("--localizer-channels", type=int, nargs="+", default=None,
                   help="localizer --stem unshuffle: other widths for its six blocks")
    p.add_argument("--pairs", type=int, default=2000,
                   help="usct: training pairs made once and cached (see data.usct.cached_pairs)")
    p.add_argument("--pool", type=int, default=4096,
                   help="localizer: training scenes kept in memory (see ScenePool)")
    p.add_argument("--fresh", type=float, default=None,
                   help="localizer: share of each batch painted anew (default: mnist 1, "
                        "silhouettes 0.25)")
    p.add_argument("--pair-seeds", type=int, nargs="+", default=None,
                   help="ranker: cached training pair sets to pool, one per seed (each "
                        "--pairs long; default: --seed's)")
    p.add_argument("--view", action="store_true",
                   help="ranker: add the view from the skin (ranker.view_similarity: NCC and "
                        "mutual information) to its features")
    p.add_argument("--view-lut", action="store_true",
                   help="ranker, with --view: compare the ultrasound with the CT mapped to the "
                        "grey each CT grey is expected to show, a lookup table estimated "
                        "from the first VIEW_LUT_PAIRS training pairs (ranker.estimate_view_lut)")
    p.add_argument("--rerank-k", type=int, default=8,
                   help="verifier: SSD candidates per training scene")
    p.add_argument("--verifier-channels", type=int, nargs="+", default=None,
                   help="verifier: conv channels per level (default 16 32 64)")
    p.add_argument("--verifier-arch", default="plain", choices=["plain", "bn"],
                   help="verifier: 'bn' adds BatchNorm, global pooling, dropout 0.3, mirror "
                        "averaging, and (with --classes) label smoothing 0.1 and aspect jitter")
    p.add_argument("--verifier-grey", action="store_true",
                   help="verifier --classes: also see the grey detail inside each object (a "
                        "second channel), trained on objects cut from --pool training scenes")
    p.add_argument("--scene-masks", type=int, default=0,
                   help="verifier --classes: also train on the segmented moving and target "
                        "masks of this many training scenes (half of each batch)")
    p.add_argument("--classes", type=int, default=0,
                   help="verifier: classify each mask into this many kinds (silhouettes: 10) "
                        "instead of judging pairs")
    p.add_argument("--val-pairs", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (slower than fp32 on CPUs without native bf16)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/<dataset>/<model>)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    # Before the thread pool starts, so every worker inherits it: dead filters decay towards 0
    # under weight decay and their denormal products made training steps 4× slower over a run.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    # (max steps, batch, lr, minutes)
    defaults = {"matcher": (100000, 128, 1e-3, 19), "matcher-full": (100000, 32, 1e-3, 6),
                "localizer": (100000, 32, 2e-3, 25),
                "segmenter": (100000, 48, 2e-3, 15),
                "verifier": (100000, 256, 1e-3, 6),
                "ranker": (3000, 256, 3e-3, None),
                "chooser": (3000, 256, 3e-3, None)}[args.model]
    if args.minutes is None and args.steps is None:
        args.minutes = defaults[3]
    args.steps = args.steps or defaults[0]
    args.minutes = args.minutes or None
    args.batch = args.batch or defaults[1]
    args.lr = args.lr or defaults[2]
    if args.fresh is None:
        args.fresh = {"silhouettes": 0.25, "usct": 0.0}.get(args.dataset, 1.0)
    if args.dataset == "usct":
        args.pool = min(args.pool, args.pairs)

    if args.model == "localizer":
        out = train_localizer(args)
    elif args.model == "segmenter":
        if args.dataset == "mnist":
            p.error("segmenter: MNIST is segmented by a threshold; use --dataset silhouettes")
        out = train_segmenter(args)
    elif args.model == "verifier":
        # trained on the SSD's top --rerank-k candidates whatever the data set's own re-ranking
        # (US–CT's pipeline takes the top box since its localizer's retraining; the README's
        # US–CT verifier command compares with that)
        if args.dataset == "mnist":
            p.error("verifier: MNIST's pipeline takes the SSD's top box; the verifier is for "
                    "silhouettes and usct")
        out = train_verifier(args)
    elif args.model == "ranker":
        if args.dataset != "usct":
            p.error("ranker: its features are the US–CT geometry (probe on the skin, a fan); "
                    "use --dataset usct")
        out = train_ranker(args)
    elif args.model == "chooser":
        if args.dataset != "silhouettes":
            p.error("chooser: it chooses among the silhouettes verifier's candidates; use "
                    "--dataset silhouettes")
        out = train_chooser(args)
    else:
        out = train_matcher(args, full=args.model == "matcher-full")
    metrics = out["metrics"]
    metrics["command"] = "python -m registration.train " + shlex.join(argv)
    metrics["torch"] = torch.__version__
    metrics["threads"] = args.threads
    folder = Path(args.out) if args.out else checkpoint.local_root() / args.dataset / args.model
    checkpoint.save(folder, out["model"], out["cfg"], metrics)
    print(f"saved {folder}  wall {metrics['wall_time_s']:.0f}s  "
          + "  ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("val_")))


if __name__ == "__main__":
    main()
