"""Pictures of a registration: numpy RGB uint8 images (for the app) and a matplotlib figure
(for reports). No model code here.

Colours are chosen to stay distinguishable for colour-blind viewers: fixed mask in blue, warped
moving mask in orange, their overlap in white.
"""
from __future__ import annotations

import cv2
import numpy as np

FIXED = (40, 120, 255)     # RGB
MOVING = (255, 150, 20)
BOX = (0, 230, 120)
SSD_BOX = (255, 60, 60)
GRID = (255, 220, 0)


def to_rgb(gray: np.ndarray, size: int | None = None) -> np.ndarray:
    """Float [0, 1] or uint8 (H, W) → RGB uint8, optionally resized (nearest) so the longest
    side is ``size``."""
    g = np.asarray(gray)
    if g.dtype != np.uint8:
        g = (np.clip(g.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=2) if g.ndim == 2 else g[..., :3].copy()
    if size is not None:
        h, w = rgb.shape[:2]
        k = size / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))),
                         interpolation=cv2.INTER_NEAREST if k >= 1 else cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def _scale_of(image_shape, display_shape) -> float:
    return display_shape[1] / image_shape[1]


def draw_boxes(gray: np.ndarray, boxes: list[tuple], size: int = 448) -> np.ndarray:
    """The image with labelled xyxy boxes. boxes: [(box, colour, label), ...] (pixels of
    ``gray``). Returns RGB uint8 with longest side ``size``."""
    rgb = to_rgb(gray, size)
    k = _scale_of(np.shape(gray), rgb.shape)
    for box, colour, label in boxes:
        if box is None:
            continue
        x0, y0, x1, y1 = [int(round(v * k)) for v in box]
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), colour, 2)
        if label:
            ty = y0 - 6 if y0 > 18 else y1 + 16
            cv2.putText(rgb, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1,
                        cv2.LINE_AA)
    return rgb


def draw_mask_outline(rgb: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """Outline a (H, W) mask (any resolution) on an RGB image in place; returns it."""
    m = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]),
                   interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, colour, 1)
    return rgb


def draw_grid(gray: np.ndarray, points: np.ndarray, size: int = 280,
              colour=GRID, mask: np.ndarray | None = None) -> np.ndarray:
    """The √K×√K control grid (points (K, 2), pixel coords of ``gray``) drawn as connected
    lines with dots, over the image (and the mask's outline, if given)."""
    rgb = to_rgb(gray, size)
    if mask is not None:
        draw_mask_outline(rgb, mask, (120, 200, 255))
    k = _scale_of(np.shape(gray), rgb.shape)
    n = int(round(np.sqrt(len(points))))
    # pixel coords → display: pixel centre (p + 0.5)·k
    p = ((np.asarray(points, np.float64) + 0.5) * k).reshape(n, n, 2)
    pts = np.round(p * 16).astype(np.int32)   # sub-pixel precision for cv2 lines
    for i in range(n):
        # cv2 wants contiguous (N, 2) int32 point arrays; a column slice is strided
        cv2.polylines(rgb, [np.ascontiguousarray(pts[i])], False, colour, 1, cv2.LINE_AA,
                      shift=4)
        cv2.polylines(rgb, [np.ascontiguousarray(pts[:, i])], False, colour, 1, cv2.LINE_AA,
                      shift=4)
    for q in pts.reshape(-1, 2):
        cv2.circle(rgb, tuple(int(v) for v in q), 2 * 16, colour, -1, cv2.LINE_AA, shift=4)
    return rgb


def mask_overlay(fixed_mask: np.ndarray, warped_mask: np.ndarray, size: int = 280,
                 background: np.ndarray | None = None) -> np.ndarray:
    """Fixed mask in blue, warped moving mask in orange, overlap white, on black or on a dimmed
    ``background`` image."""
    f = np.asarray(fixed_mask, bool)
    w = np.asarray(warped_mask, bool)
    if background is None:
        rgb = np.zeros(f.shape + (3,), np.uint8)
    else:
        rgb = (to_rgb(background).astype(np.float32) * 0.35).astype(np.uint8)
    rgb[f & ~w] = FIXED
    rgb[w & ~f] = MOVING
    rgb[w & f] = (255, 255, 255)
    return to_rgb(rgb, size) if size else rgb


def title_bar(rgb: np.ndarray, text: str, colour=(255, 255, 255), height: int = 28) -> np.ndarray:
    """A new RGB image: ``rgb`` under a dark band of ``height`` px that holds ``text``."""
    h, w = rgb.shape[:2]
    band = np.full((height, w, 3), 30, np.uint8)
    scale = height / 36
    thick = max(1, round(height / 22))
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    if tw > w - 12:   # shrink long titles to fit
        scale *= (w - 12) / tw
    cv2.putText(band, text, (8, int(height * 0.72)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                thick, cv2.LINE_AA)
    return np.concatenate([band, rgb[..., :3]], axis=0)


def summary_figure(rows: list[dict], path: str | None = None):
    """A matplotlib figure, one row per example. Each row dict holds ``fixed`` (image),
    ``result`` (localized Result), ``result_full`` (no-localization Result or None) and
    optionally ``true_box``/``true_mask``. Saves to ``path`` when given; returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import dice

    cols = ["fixed + boxes", "moving crop + grid", "fixed crop + grid", "crop overlay",
            "pasted back (with loc.)", "without localization"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.3 * len(cols), 2.4 * len(rows)),
                             squeeze=False)
    for r_i, row in enumerate(rows):
        r, fixed = row["result"], row["fixed"]
        true_mask = row.get("true_mask")
        boxes = [(row.get("true_box"), (160, 160, 160), "truth"),
                 (r.ssd_box, SSD_BOX, f"SSD {r.score:.2f}" if r.box_source != "component"
                                   else "component"), (r.box, BOX, "")]
        full_ref = true_mask if true_mask is not None else r.fixed_mask_full
        panels = [
            draw_boxes(fixed, boxes, 224),
            draw_grid(r.moving_crop, r.control_points, 224, mask=r.moving_mask),
            draw_grid(r.fixed_crop, r.control_points_warped, 224, mask=r.fixed_mask),
            mask_overlay(r.fixed_mask, r.warped_mask, 224),
            mask_overlay(full_ref, r.warped_mask_full, 224, background=fixed),
        ]
        titles = [cols[0], cols[1], cols[2], f"Dice {dice(r.warped_mask, r.fixed_mask):.2f}",
                  f"Dice {dice(r.warped_mask_full, full_ref):.2f}"]
        rf = row.get("result_full")
        if rf is not None:
            panels.append(mask_overlay(full_ref, rf.warped_mask_full, 224, background=fixed))
            titles.append(f"no loc.: Dice {dice(rf.warped_mask_full, full_ref):.2f}")
        else:
            panels.append(np.zeros((224, 224, 3), np.uint8))
            titles.append("without localization: n/a")
        for c_i, (img, title) in enumerate(zip(panels, titles)):
            ax = axes[r_i, c_i]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if r_i else f"{cols[c_i]}\n{title}" if c_i >= 3 else title,
                         fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


PART_COLOURS = ((230, 230, 230), (255, 140, 0))   # core, thin parts


def part_image(parts: np.ndarray, side: int = 160) -> np.ndarray:
    """(2, S, S) part masks (core, thin) → (side, side, 3) uint8, one colour per part."""
    p = np.asarray(parts) > 0.5
    img = np.zeros(p.shape[1:] + (3,), np.uint8)
    for k, c in enumerate(PART_COLOURS):
        img[p[k]] = c
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)


def parts_figure(moving, fixed, fixed_grey, warped: dict, path: str | None = None):
    """Rows of pairs: moving parts, fixed parts (with the silhouette's grey detail), and each
    named warp's parts drawn over the fixed outline. Tensors (N, 2, S, S) / (N, 1, S, S)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(warped)
    cols = ["moving (parts)", "fixed (parts)", "fixed grey"] + [f"warped: {k}" for k in names]
    n = len(moving)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.3 * n), squeeze=False)
    for i in range(n):
        f_out = np.asarray(fixed[i]).sum(0) > 0.5
        edge = f_out ^ (cv2.erode(f_out.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
        edge = cv2.resize(edge.astype(np.uint8), (160, 160), interpolation=cv2.INTER_NEAREST) > 0
        panels = [part_image(moving[i]), part_image(fixed[i]),
                  cv2.resize((np.asarray(fixed_grey[i][0]) * 255).astype(np.uint8), (160, 160),
                             interpolation=cv2.INTER_NEAREST)]
        for k in names:
            img = part_image(warped[k][i])
            img[edge] = (0, 160, 255)
            panels.append(img)
        for j, img in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    fig.suptitle("white: core, orange: thin parts; blue: the fixed silhouette's outline",
                 fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig
