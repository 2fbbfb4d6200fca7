"""Hard metrics for reports (numpy in, floats out). Training losses live in ``losses.py``."""
from __future__ import annotations

import numpy as np


def _as_bool(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"{name}: expected a mask with >= 2 dims, got shape {a.shape}")
    return a.astype(bool)


def dice(a, b) -> float:
    """Dice of two boolean masks of equal shape; two empty masks score 1."""
    a, b = _as_bool(a, "a"), _as_bool(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"masks: expected equal shapes, got {a.shape} and {b.shape}")
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def iou(a, b) -> float:
    """Intersection over union of two boolean masks; two empty masks score 1."""
    a, b = _as_bool(a, "a"), _as_bool(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"masks: expected equal shapes, got {a.shape} and {b.shape}")
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def box_area(box) -> float:
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes (pixels)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = box_area(a) + box_area(b) - inter
    return 0.0 if u <= 0 else float(inter / u)


def box_dice(a, b) -> float:
    """Dice of two xyxy boxes as regions: 2|A∩B| / (|A| + |B|)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    s = box_area(a) + box_area(b)
    return 0.0 if s <= 0 else float(2 * ix * iy / s)
