"""The one place that converts between pixel and normalised coordinates.

Normalised coordinates follow ``torch.nn.functional.grid_sample(align_corners=False)``: the
image spans [-1, 1] edge to edge, so the centre of pixel i (of n) sits at (2i + 1) / n - 1.
Points are (x, y) pairs, x along the width.
"""
from __future__ import annotations

import torch


def _size_tensor(size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    h, w = size
    return torch.tensor([w, h], dtype=like.dtype, device=like.device)


def pixel_to_norm(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel (x, y) → normalised. points: (..., 2); size: (H, W)."""
    wh = _size_tensor(size, points)
    return (2 * points + 1) / wh - 1


def norm_to_pixel(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised (x, y) → pixel. points: (..., 2); size: (H, W)."""
    wh = _size_tensor(size, points)
    return ((points + 1) * wh - 1) / 2


def identity_grid(size: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised pixel-centre coordinates of an H×W image: (H, W, 2), (x, y) last."""
    h, w = size
    ys = (2 * torch.arange(h, dtype=dtype, device=device) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=dtype, device=device) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)
