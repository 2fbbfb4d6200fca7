"""112×112 MNIST scenes: the moving digit's class, another instance, somewhere among others.

A scene's *fixed* image holds the target (same class as the 28×28 *moving* digit, a different
instance) with its ink 20–56 px tall at a random place, plus 0–3 distractor digits of other
classes that overlap the target's box little. Ground truth: the target's mask (pixels > 127 of
the pasted digit alone) and its tight box, xyxy in pixels (x1, y1 exclusive).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import mnist

SIZE = 112
MIN_H, MAX_H = 20, 56


@dataclass
class Scene:
    moving: np.ndarray        # (28, 28) uint8
    fixed: np.ndarray         # (SIZE, SIZE) uint8
    target_mask: np.ndarray   # (SIZE, SIZE) bool
    box: np.ndarray           # (4,) float32 xyxy pixels, tight box of target_mask
    label: int
    n_distractors: int


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (x1, y1 exclusive) of a boolean mask; zeros if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _place(digit: np.ndarray, height: float, rng: np.random.Generator, size: int):
    """Scale a 28×28 digit so its ink is `height` px tall and put it at a random place fully
    inside a size×size canvas. Returns (canvas float32, ink box)."""
    ink = mask_box(digit > mnist.MASK_THRESHOLD)
    ink_h = max(1.0, ink[3] - ink[1])
    f = height / ink_h
    side = max(1, int(round(28 * f)))
    patch = cv2.resize(digit, (side, side), interpolation=cv2.INTER_LINEAR)
    pbox = mask_box(patch > mnist.MASK_THRESHOLD)
    if pbox[2] - pbox[0] > size or pbox[3] - pbox[1] > size:   # a very wide digit: shrink
        return _place(digit, height * 0.8, rng, size)
    ox = rng.integers(int(-pbox[0]), int(size - pbox[2]) + 1)
    oy = rng.integers(int(-pbox[1]), int(size - pbox[3]) + 1)
    canvas = np.zeros((size, size), np.float32)
    x0, y0 = max(0, ox), max(0, oy)
    x1, y1 = min(size, ox + side), min(size, oy + side)
    canvas[y0:y1, x0:x1] = patch[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return canvas, pbox + np.array([ox, oy, ox, oy], np.float32)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy


class SceneGenerator:
    """Seeded scene sampler over one part of MNIST: 'train', 'val' or 'test' rows."""

    def __init__(self, part: str = "train", seed: int = 0, size: int = SIZE,
                 max_distractors: int = 3, max_overlap: float = 0.1):
        self.images, self.labels = mnist.rows(part)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.max_distractors = max_distractors
        self.max_overlap = max_overlap

    def sample(self, n_distractors: int | None = None) -> Scene:
        rng = self.rng
        classes = list(self.by_class)
        label = int(rng.choice(classes))
        i_mov, i_tgt = rng.choice(self.by_class[label], size=2, replace=False)
        h = rng.uniform(MIN_H, MAX_H)
        target, tbox = _place(self.images[i_tgt], h, rng, self.size)
        target_mask = target > mnist.MASK_THRESHOLD
        fixed = target.copy()
        k = int(rng.integers(0, self.max_distractors + 1)) if n_distractors is None else n_distractors
        t_area = max(1.0, (tbox[2] - tbox[0]) * (tbox[3] - tbox[1]))
        placed = 0
        others = [c for c in classes if c != label]
        for _ in range(k):
            idx = rng.choice(self.by_class[int(rng.choice(others))])
            for _try in range(20):
                d, dbox = _place(self.images[idx], rng.uniform(MIN_H, MAX_H), rng, self.size)
                if _overlap(dbox, tbox) <= self.max_overlap * t_area:
                    fixed = np.maximum(fixed, d)
                    placed += 1
                    break
        return Scene(moving=self.images[i_mov].copy(), fixed=fixed.round().astype(np.uint8),
                     target_mask=target_mask, box=mask_box(target_mask), label=label,
                     n_distractors=placed)

    def batch(self, n: int) -> list[Scene]:
        return [self.sample() for _ in range(n)]


def test_scenes(n: int = 1000, seed: int = 0) -> list[Scene]:
    """The held-out benchmark: n seeded scenes from the test rows."""
    return SceneGenerator("test", seed=seed).batch(n)
