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


# ---------------------------------------------------------------------------------------------
# warp quality

def jacobian_determinant(displacement) -> np.ndarray:
    """det J of the map x ↦ x + u(x) for a dense displacement u (H, W, 2), (x, y) last, in
    pixels; central differences inside, one-sided at the border → (H, W).

    The identity (u = 0) gives 1 everywhere; a reflection gives -1; ≤ 0 means the map folds.
    """
    u = np.asarray(displacement, dtype=np.float64)
    if u.ndim != 3 or u.shape[2] != 2 or min(u.shape[:2]) < 2:
        raise ValueError(f"displacement: expected (H >= 2, W >= 2, 2), got {u.shape}")
    dux_dy, dux_dx = np.gradient(u[..., 0])
    duy_dy, duy_dx = np.gradient(u[..., 1])
    return (1 + dux_dx) * (1 + duy_dy) - dux_dy * duy_dx


def folding(displacement) -> float:
    """Share of pixels where det J ≤ 0 (the warp folds or tears there), in [0, 1]."""
    return float((jacobian_determinant(displacement) <= 0).mean())


def grid_to_displacement(grid) -> np.ndarray:
    """A ``grid_sample`` grid (H, W, 2), normalised, align_corners=False → displacement of the
    sampling map in pixels (H, W, 2): where each output pixel samples, minus where it sits."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 3 or g.shape[2] != 2:
        raise ValueError(f"grid: expected (H, W, 2), got {g.shape}")
    h, w = g.shape[:2]
    px = ((g[..., 0] + 1) * w - 1) / 2
    py = ((g[..., 1] + 1) * h - 1) / 2
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([px - xs, py - ys], -1)


def _boundary(mask: np.ndarray) -> np.ndarray:
    import cv2
    m = mask.astype(np.uint8)
    inner = cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m > 0) & (inner == 0)


def hausdorff95(a, b) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two masks, in
    pixels: the larger of the two directed 95th percentiles. inf when exactly one mask is empty,
    0 when both are."""
    import cv2
    a, b = _as_bool(a, "a"), _as_bool(b, "b")
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"masks: expected equal 2-D shapes, got {a.shape} and {b.shape}")
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    ba, bb = _boundary(a), _boundary(b)

    def directed(src, dst):
        # distance of every pixel to the nearest dst boundary pixel (exact Euclidean)
        d = cv2.distanceTransform((~dst).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return np.percentile(d[src], 95)

    return float(max(directed(ba, bb), directed(bb, ba)))


def group_top1(scores, labels, groups) -> float:
    """Re-ranking accuracy: over the groups (e.g. scenes) that hold a positive candidate, the
    share whose best-scored candidate is positive (the first on ties). scores, labels (1 =
    positive), groups: (N,) each."""
    best: dict[int, tuple[float, float]] = {}
    scores, labels = np.asarray(scores, float), np.asarray(labels, float)
    groups = np.asarray(groups, int)
    for s, y, g in zip(scores.tolist(), labels.tolist(), groups.tolist()):
        if g not in best or s > best[g][0]:
            best[g] = (s, y)
    has = {g for g, y in zip(groups.tolist(), labels.tolist()) if y > 0.5}
    return float(np.mean([best[g][1] for g in has])) if has else 0.0
