"""SSD default boxes and box coding. Boxes are xyxy in pixels throughout."""
from __future__ import annotations

import math

import numpy as np
import torch


def _xp(a):
    """The array module of ``a``: the box functions take torch tensors or NumPy arrays (a
    single pair's box decodes ~15× faster in NumPy than in a dozen tiny torch operations)."""
    return np if isinstance(a, np.ndarray) else torch


def box_convert(boxes, in_fmt: str, out_fmt: str):
    """(..., 4) boxes (tensor or NumPy array) between "xyxy" (corners) and "cxcywh" (centre,
    width, height), as ``torchvision.ops.box_convert`` (tested against it) without importing
    torchvision, which pulls in torch._dynamo (~2 s of an app's start or first request)."""
    cat = _xp(boxes).concatenate
    if (in_fmt, out_fmt) == ("cxcywh", "xyxy"):
        c, half = boxes[..., :2], boxes[..., 2:] / 2
        return cat([c - half, c + half], axis=-1)
    if (in_fmt, out_fmt) == ("xyxy", "cxcywh"):
        a, b = boxes[..., :2], boxes[..., 2:]
        return cat([(a + b) / 2, b - a], axis=-1)
    raise ValueError(f"in_fmt/out_fmt: expected 'xyxy' or 'cxcywh', got {in_fmt!r} → {out_fmt!r}")


def anchors_per_location(aspect_ratios) -> int:
    """One box per aspect ratio plus SSD's extra square between this scale and the next."""
    return len(aspect_ratios) + 1


def generate_anchors(feature_sizes: list[int], image_size: int, scales: list[float],
                     aspect_ratios: list[float], dtype=torch.float32, device=None) -> torch.Tensor:
    """Default boxes for square feature maps.

    feature_sizes: side f of each map; scales: box side per map as a fraction of image_size;
    aspect_ratios: width / height. Returns (Σ f² · A, 4) xyxy pixels, ordered map by map,
    then row (y), column (x), then anchor type (aspects in order, then the extra square),
    the order a head's (B, A·5, f, f) output has after permute(0, 2, 3, 1).
    """
    if len(feature_sizes) != len(scales):
        raise ValueError(f"scales: expected one per feature map ({len(feature_sizes)}), "
                         f"got {len(scales)}")
    out = []
    for k, (f, s) in enumerate(zip(feature_sizes, scales)):
        s_next = scales[k + 1] if k + 1 < len(scales) else 1.0
        wh = [(s * math.sqrt(a), s / math.sqrt(a)) for a in aspect_ratios]
        wh.append((math.sqrt(s * s_next),) * 2)
        wh_t = torch.tensor(wh, dtype=dtype, device=device) * image_size      # (A, 2)
        step = image_size / f
        c = (torch.arange(f, dtype=dtype, device=device) + 0.5) * step
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        ctr = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
        boxes = torch.cat([ctr, wh_t.expand_as(ctr)], dim=-1).reshape(-1, 4)
        out.append(box_convert(boxes, "cxcywh", "xyxy"))
    return torch.cat(out)


def encode(boxes: torch.Tensor, anchors: torch.Tensor,
           weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """xyxy boxes (N, 4) relative to anchors (N, 4) → SSD offsets (N, 4): (dx, dy, dw, dh)."""
    if boxes.shape != anchors.shape or boxes.shape[-1] != 4:
        raise ValueError(f"boxes and anchors: expected equal (N, 4) shapes, got "
                         f"{tuple(boxes.shape)} and {tuple(anchors.shape)}")
    b = box_convert(boxes, "xyxy", "cxcywh")
    a = box_convert(anchors, "xyxy", "cxcywh")
    wx, wy, ww, wh = weights
    return torch.stack([
        wx * (b[:, 0] - a[:, 0]) / a[:, 2],
        wy * (b[:, 1] - a[:, 1]) / a[:, 3],
        ww * torch.log(b[:, 2].clamp_min(1e-6) / a[:, 2]),
        wh * torch.log(b[:, 3].clamp_min(1e-6) / a[:, 3]),
    ], dim=1)


def decode(offsets, anchors, weights=(10.0, 10.0, 5.0, 5.0)):
    """Inverse of :func:`encode`: offsets (..., N, 4), anchors (N, 4) → xyxy (..., N, 4);
    torch tensors or NumPy arrays (both the same kind)."""
    if offsets.shape[-1] != 4 or offsets.shape[-2] != anchors.shape[0]:
        raise ValueError(f"offsets: expected (..., {anchors.shape[0]}, 4), "
                         f"got {tuple(offsets.shape)}")
    a = box_convert(anchors, "xyxy", "cxcywh")
    wx, wy, ww, wh = weights
    clamp = math.log(1000.0 / 16)   # as torchvision: no exp overflow from a wild offset
    cx = offsets[..., 0] / wx * a[:, 2] + a[:, 0]
    cy = offsets[..., 1] / wy * a[:, 3] + a[:, 1]
    xp = _xp(offsets)
    w = xp.exp((offsets[..., 2] / ww).clip(max=clamp)) * a[:, 2]
    h = xp.exp((offsets[..., 3] / wh).clip(max=clamp)) * a[:, 3]
    return box_convert(xp.stack([cx, cy, w, h], axis=-1), "cxcywh", "xyxy")
