"""Turning images into object masks: Otsu threshold + connected components.

The fixed image's mask keeps the components that best explain the detector's box, so digits
broken into several strokes stay whole and neighbours are dropped.
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


def is_label_image(mask) -> bool:
    """Whether ``mask`` is an instance label image: an integer array of any dtype but uint8
    (0 = background, 1, 2, … one value per object). bool and uint8 (0/255 PNG) arrays, and
    floats, are plain masks."""
    dt = np.asarray(mask).dtype
    return bool(np.issubdtype(dt, np.integer)) and dt != np.uint8


def components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: count (incl. background 0), labels (H, W) int32, stats (n, 5)
    (cv2's CC_STAT columns). ``mask``: (H, W) bool, or an instance label image
    (:func:`is_label_image`), whose objects are never joined: two pixels are one component
    only if they carry the same label and connect, so touching objects stay apart."""
    if not is_label_image(mask):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
        return n, labels, stats
    m = np.asarray(mask)
    out = np.zeros(m.shape, np.int32)
    bg = m <= 0
    ys, xs = np.nonzero(bg)
    rows = [np.array([[xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1,
                       len(xs)] if len(xs) else [0, 0, 0, 0, 0]], np.int32)]
    n = 1
    for v in np.unique(m[~bg]):
        k, lab, st, _ = cv2.connectedComponentsWithStats((m == v).astype(np.uint8),
                                                         connectivity=8)
        sel = lab > 0
        out[sel] = lab[sel] + (n - 1)
        rows.append(st[1:].astype(np.int32))
        n += k - 1
    return n, out, np.concatenate(rows)


def foreground_or_otsu(gray: np.ndarray, threshold: float | None) -> np.ndarray:
    """``gray > threshold``; Otsu's threshold when ``threshold`` is None or finds nothing."""
    if threshold is not None:
        fg = gray > threshold
        if fg.any():
            return fg
    return foreground(gray)


def select_best_fit(mask: np.ndarray, box, min_px: int = 4, clip: float | None = 0.1) -> np.ndarray:
    """The set of components whose joint tight box best fits the xyxy ``box`` (IoU), chosen
    greedily: start from the component with the most pixels inside the box, then add others
    (most pixels inside first) while that raises the IoU. Keeps a digit's broken strokes, drops
    a neighbour that merely overlaps the box's edge. A neighbour *touching* the object is one
    component with it, so the result is finally clipped to the box grown by ``clip`` of its
    size on each side (None: no clipping). ``mask``: (H, W) bool, or an instance label image
    (:func:`components`), whose touching objects are separate components. (H, W) bool."""
    n, labels, stats = components(mask)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w)), int(np.clip(np.floor(box[1]), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, w)), int(np.clip(np.ceil(box[3]), 0, h))
    inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n)[1:]
    area = stats[1:, cv2.CC_STAT_AREA]
    cand = [i for i in np.argsort(-inside) if inside[i] > 0 and area[i] >= min_px]
    if not cand:
        return np.zeros_like(mask, dtype=bool)
    cb = np.stack([stats[1:, cv2.CC_STAT_LEFT], stats[1:, cv2.CC_STAT_TOP],
                   stats[1:, cv2.CC_STAT_LEFT] + stats[1:, cv2.CC_STAT_WIDTH],
                   stats[1:, cv2.CC_STAT_TOP] + stats[1:, cv2.CC_STAT_HEIGHT]], 1).astype(float)

    def iou(b):
        ix = max(0.0, min(b[2], box[2]) - max(b[0], box[0]))
        iy = max(0.0, min(b[3], box[3]) - max(b[1], box[1]))
        inter = ix * iy
        u = (b[2] - b[0]) * (b[3] - b[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
        return inter / u if u > 0 else 0.0

    keep, cur = [cand[0]], cb[cand[0]].copy()
    best = iou(cur)
    for i in cand[1:]:
        nb = np.array([min(cur[0], cb[i, 0]), min(cur[1], cb[i, 1]),
                       max(cur[2], cb[i, 2]), max(cur[3], cb[i, 3])])
        v = iou(nb)
        if v > best:
            keep.append(i)
            cur, best = nb, v
    out = keep_labels(labels, n, np.array(keep) + 1)
    return out if clip is None else clip_to_box(out, box, clip)


def clip_to_box(mask: np.ndarray, box, grow: float) -> np.ndarray:
    """(H, W) bool mask cut to the xyxy ``box`` grown by ``grow`` of its width and height on
    each side (a new array)."""
    out = mask.copy()
    bw, bh = box[2] - box[0], box[3] - box[1]
    cx0, cy0 = int(max(0, np.floor(box[0] - grow * bw))), int(max(0, np.floor(box[1] - grow * bh)))
    cx1, cy1 = int(max(0, np.ceil(box[2] + grow * bw))), int(max(0, np.ceil(box[3] + grow * bh)))
    out[:cy0] = False
    out[cy1:] = False
    out[:, :cx0] = False
    out[:, cx1:] = False
    return out


def keep_labels(labels: np.ndarray, n: int, keep) -> np.ndarray:
    """(H, W) bool: pixels whose label (0 … n−1) is in ``keep`` (as ``np.isin``, by table
    lookup)."""
    table = np.zeros(n, bool)
    table[keep] = True
    return table[labels]


def object_mask(gray: np.ndarray, min_fraction_of_largest: float = 0.05,
                threshold: float | None = None) -> np.ndarray:
    """Mask of the single object an image shows: foreground (see :func:`foreground_or_otsu`)
    minus specks smaller than ``min_fraction_of_largest`` of the largest component. (H, W) bool."""
    return drop_specks(foreground_or_otsu(gray, threshold), min_fraction_of_largest)


def drop_specks(fg: np.ndarray, min_fraction_of_largest: float = 0.05) -> np.ndarray:
    """``fg`` (H, W) bool without components smaller than ``min_fraction_of_largest`` of the
    largest one."""
    n, labels, stats = components(fg)
    if n <= 1:
        return fg
    area = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(area >= min_fraction_of_largest * area.max()) + 1
    return keep_labels(labels, n, keep)


def split_touching(mask: np.ndarray, radii=(1, 2, 3, 4), min_frac: float = 0.2
                   ) -> list[np.ndarray]:
    """Split one connected object (H, W) bool where two objects touch through a neck: the
    first erosion by a disc of radius r in ``radii`` that leaves ≥ 2 pieces of ≥ ``min_frac``
    of what is left each; the pieces then grow back over the mask, each pixel going to the
    piece that reaches it first (r + 1 steps of 3×3 dilation, then any rest to the nearest
    piece). Returns the pieces, (H, W) bool each, or [] when no erosion splits the mask.
    Thin parts (legs, tails) cut off by the erosion are too small to count as pieces and
    rejoin their body."""
    m = mask.astype(np.uint8)
    for r in radii:
        er = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        total = int(er.sum())
        if total == 0:
            return []
        n, lab, stats, _ = cv2.connectedComponentsWithStats(er, connectivity=8)
        big = [c for c in range(1, n) if stats[c, cv2.CC_STAT_AREA] >= min_frac * total]
        if len(big) < 2:
            continue
        owner = np.zeros(mask.shape, np.int32)
        for k, c in enumerate(big, 1):
            owner[lab == c] = k
        k3 = np.ones((3, 3), np.uint8)
        for _ in range(r + 1):                     # grow each piece into free mask pixels
            free = (owner == 0) & mask
            if not free.any():
                break
            for k in range(1, len(big) + 1):
                grow = (cv2.dilate((owner == k).astype(np.uint8), k3) > 0) & free
                owner[grow] = k
                free &= ~grow
        rest = (owner == 0) & mask
        if rest.any():                             # the far tips of thin parts
            _, near = cv2.distanceTransformWithLabels((owner == 0).astype(np.uint8),
                                                      cv2.DIST_L2, 5,
                                                      labelType=cv2.DIST_LABEL_PIXEL)
            seeds = owner > 0
            seed_owner = np.zeros(int(near.max()) + 1, np.int32)
            seed_owner[near[seeds]] = owner[seeds]
            owner[rest] = seed_owner[near[rest]]
        return [(owner == k) & mask for k in range(1, len(big) + 1)]
    return []
