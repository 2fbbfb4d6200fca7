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

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .config import MATCHER_PRESETS, LocalizerConfig, MatcherConfig
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
                     bs: int = 250) -> tuple[float, float]:
    """Hard Dice / IoU of warped-moving (>0.5) against fixed, fp32."""
    model.eval()
    dices, ious = [], []
    for i in range(0, len(moving), bs):
        m, f = moving[i:i + bs], fixed[i:i + bs]
        w = model.warp(m, model.predict(m, f)) > 0.5
        f = f > 0.5
        inter = (w & f).sum((1, 2, 3)).float()
        s = w.sum((1, 2, 3)).float() + f.sum((1, 2, 3)).float()
        dices.append(2 * inter / s.clamp_min(1))
        ious.append(inter / (s - inter).clamp_min(1))
    model.train()
    return float(torch.cat(dices).mean()), float(torch.cat(ious).mean())


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


def train_matcher(args, full: bool) -> dict:
    preset = MATCHER_PRESETS[args.preset]
    cfg = MatcherConfig(input_size=112 if full else 28,
                        grid_size=16 if full else (args.grid or preset["grid_size"]),
                        smooth_weight=args.smooth,
                        fold_weight=preset["fold_weight"] if args.fold is None else args.fold,
                        passes=args.passes if args.passes else (1 if full else preset["passes"]))
    torch.manual_seed(args.seed)
    model = Matcher(cfg).to(memory_format=torch.channels_last)
    data = FullFramePairs("train", args.seed) if full else MnistPairs("train", args.seed)
    val_data = FullFramePairs("val", args.seed + 1) if full else MnistPairs("val", args.seed + 1)
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
        d, j = matcher_val_dice(model, val_m, val_f)
        return {"val_dice": round(d, 4), "val_iou": round(j, 4)}

    metrics = fit(model, batch_loss, validate, args,
                  f"train {'matcher-full' if full else 'matcher'}", 1e-4)   # paper: L2 1e-4
    return {"model": model, "cfg": cfg, "metrics": {**metrics, "val_pairs": args.val_pairs}}


# ---------------------------------------------------------------------------------------------
# localizer

def scene_tensors(scenes_list):
    """Scenes → fixed (B, 1, S, S), moving (B, 1, 28, 28) in [0, 1], boxes (B, 4)."""
    f = torch.from_numpy(np.stack([s.fixed for s in scenes_list])).float().div_(255).unsqueeze(1)
    m = torch.from_numpy(np.stack([s.moving for s in scenes_list])).float().div_(255).unsqueeze(1)
    b = torch.from_numpy(np.stack([s.box for s in scenes_list])).float()
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


def train_localizer(args) -> dict:
    from .data.scenes import SceneGenerator
    from .localizer import Localizer
    cfg = LocalizerConfig(conditioning=args.conditioning)
    torch.manual_seed(args.seed)
    model = Localizer(cfg).to(memory_format=torch.channels_last)
    gen = SceneGenerator("train", seed=args.seed)
    val = scene_tensors(SceneGenerator("val", seed=args.seed + 1).batch(args.val_pairs))

    def batch_loss():
        f, m, b = scene_tensors(gen.batch(args.batch))
        return model.loss(f.contiguous(memory_format=torch.channels_last), m, b)

    metrics = fit(model, batch_loss, lambda: localizer_val(model, *val), args,
                  f"train localizer ({cfg.conditioning})", 5e-4)   # paper: L2 5e-4
    return {"model": model, "cfg": cfg, "metrics": {**metrics, "val_scenes": args.val_pairs}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m registration.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["matcher", "matcher-full", "localizer"])
    p.add_argument("--dataset", default="mnist", choices=["mnist"])
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
    p.add_argument("--passes", type=int, default=None,
                   help="matcher cascade passes at inference (default 3; matcher-full 1)")
    p.add_argument("--cascade", type=float, default=0.5,
                   help="share of each matcher batch pre-warped by the model itself")
    p.add_argument("--conditioning", default="film", choices=["film", "stack"])
    p.add_argument("--val-pairs", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (slower than fp32 on CPUs without native bf16)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/<dataset>/<model>)")
    args = p.parse_args(argv)
    # Before the thread pool starts, so every worker inherits it: dead filters decay towards 0
    # under weight decay and their denormal products made training steps 4× slower over a run.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    # (max steps, batch, lr, minutes)
    defaults = {"matcher": (100000, 128, 1e-3, 19), "matcher-full": (100000, 32, 1e-3, 6),
                "localizer": (100000, 32, 2e-3, 25)}[args.model]
    if args.minutes is None and args.steps is None:
        args.minutes = defaults[3]
    args.steps = args.steps or defaults[0]
    args.minutes = args.minutes or None
    args.batch = args.batch or defaults[1]
    args.lr = args.lr or defaults[2]

    if args.model == "localizer":
        out = train_localizer(args)
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
