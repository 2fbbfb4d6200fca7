"""Turning images into object masks: Otsu threshold + connected components.

The fixed image's mask keeps the components that the detector's box explains (most of their
pixels inside it), so digits broken into several strokes stay whole and distractors outside the
box are dropped.
"""
from __future__ import annotations

import cv2
import numpy as np


def otsu_threshold(gray: np.ndarray) -> float:
    """Otsu's threshold of a float image in [0, 1] (returned in the same units)."""
    u8 = np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8)
    if u8.max() == u8.min():
        return float(u8.max()) / 255 + 1e-6    # flat: nothing is foreground
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255


def foreground(gray: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Bright-object mask of a float image (H, W) in [0, 1]: pixels > Otsu's threshold."""
    if gray.ndim != 2:
        raise ValueError(f"gray: expected (H, W), got shape {gray.shape}")
    t = otsu_threshold(gray) if threshold is None else threshold
    return gray > t


def components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: count (incl. background 0), labels (H, W), stats (n, 5)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats


def select_in_box(mask: np.ndarray, box, min_fraction: float = 0.5,
                  min_px: int = 4) -> np.ndarray:
    """Components of ``mask`` with at least ``min_fraction`` of their pixels inside the xyxy
    ``box`` (pixels); if none qualifies, the one with the most pixels inside. (H, W) bool."""
    n, labels, stats = components(mask)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w)), int(np.clip(np.floor(box[1]), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, w)), int(np.clip(np.ceil(box[3]), 0, h))
    inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n)[1:]
    area = stats[1:, cv2.CC_STAT_AREA]
    keep = (inside >= min_fraction * area) & (area >= min_px)
    if not keep.any():
        if inside.max() == 0:
            return np.zeros_like(mask, dtype=bool)
        keep = inside == inside.max()
    return np.isin(labels, np.flatnonzero(keep) + 1)


def object_mask(gray: np.ndarray, min_fraction_of_largest: float = 0.05) -> np.ndarray:
    """Mask of the single object an image shows: Otsu foreground, minus specks smaller than
    ``min_fraction_of_largest`` of the largest component. (H, W) bool."""
    fg = foreground(gray)
    n, labels, stats = components(fg)
    if n <= 1:
        return fg
    area = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(area >= min_fraction_of_largest * area.max()) + 1
    return np.isin(labels, keep)
