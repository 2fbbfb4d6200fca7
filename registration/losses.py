"""Soft, differentiable training losses. Hard metrics for reports live in ``metrics.py``."""
from __future__ import annotations

import torch


def soft_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice per item: pred, target (B, C, H, W) in [0, 1] → (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target: expected equal shapes, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    dims = tuple(range(1, pred.ndim))
    inter = (pred * target).sum(dims)
    return (2 * inter + eps) / (pred.sum(dims) + target.sum(dims) + eps)


def control_smoothness(offsets: torch.Tensor) -> torch.Tensor:
    """The paper's Σ‖∇φ‖² over the control grid, averaged: offsets (B, K, 2) → (B,).

    ∇ is the first difference between neighbouring control points (normalised units).
    """
    b, k, _ = offsets.shape
    s = int(round(k ** 0.5))
    g = offsets.reshape(b, s, s, 2)
    dx = (g[:, :, 1:] - g[:, :, :-1]).pow(2).sum(-1).mean((1, 2))
    dy = (g[:, 1:] - g[:, :-1]).pow(2).sum(-1).mean((1, 2))
    return dx + dy


def jacobian_det(grid: torch.Tensor) -> torch.Tensor:
    """det J of a sampling grid (B, H, W, 2), normalised coords, in pixel units → (B, H-1, W-1).

    Forward differences; the identity grid gives exactly 1.
    """
    _, h, w, _ = grid.shape
    scale = torch.tensor([w / 2, h / 2], dtype=grid.dtype, device=grid.device)
    g = grid * scale
    gx = g[:, :-1, 1:] - g[:, :-1, :-1]     # d(sample)/dx
    gy = g[:, 1:, :-1] - g[:, :-1, :-1]     # d(sample)/dy
    return gx[..., 0] * gy[..., 1] - gx[..., 1] * gy[..., 0]


def fold_penalty(grid: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of relu(margin − det J) per item: (B, H, W, 2) → (B,). With margin 0 it is zero
    for any non-folding warp; a small margin also pushes det J away from the fold."""
    return torch.relu(margin - jacobian_det(grid)).mean((1, 2))


def matcher_loss(warped: torch.Tensor, fixed: torch.Tensor, offsets: torch.Tensor,
                 grid: torch.Tensor, smooth_weight: float = 1.0,
                 fold_weight: float = 0.0, fold_margin: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """1 − soft Dice + λ·smoothness (paper eq. 3) + μ·folding (margin ``fold_margin``),
    batch mean."""
    dice = soft_dice(warped, fixed)
    smooth = control_smoothness(offsets)
    loss = (1 - dice) + smooth_weight * smooth
    if fold_weight:
        loss = loss + fold_weight * fold_penalty(grid, fold_margin)
    loss = loss.mean()
    return loss, {"soft_dice": float(dice.detach().mean()), "smooth": float(smooth.detach().mean())}
