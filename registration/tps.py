"""Thin-plate-spline warps as pure, batched, differentiable functions.

Conventions (see ``coords.py``): points are (x, y) in normalised coordinates, [-1, 1] edge to
edge, ``align_corners=False``. A warp maps points of the *fixed* (output) frame to the points of
the *moving* (input) frame they sample, which is what ``grid_sample`` wants.

Parameters, one row per batch item, length 6 + 2K (the paper's TPS layer):

* ``params[:, :6]``: the affine part, row-major 2×3, added to the identity, so all-zero
  parameters give the identity warp;
* ``params[:, 6:]``: K control-point offsets (x, y) in normalised units.

The warp is ``T(p) = A·[p; 1] + f(p)``, where ``f`` is the thin-plate spline that interpolates
the offsets at the K control points. So control point ``c_k`` samples the moving image at
``A·[c_k; 1] + d_k`` exactly, and offsets of zero leave a pure affine map.
"""
from __future__ import annotations

import torch

from .coords import identity_grid

N_AFFINE = 6


def _check_points(points: torch.Tensor, name: str) -> None:
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(points).__name__}")
    if points.shape[-1] != 2:
        raise ValueError(f"{name}: expected shape (..., 2), got {tuple(points.shape)}")


def control_grid(grid_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Regular √K×√K lattice of control points spanning [-1, 1]².

    Returns (K, 2) with K = grid_size², row-major (y outer, x inner).
    """
    if int(grid_size) < 2:
        raise ValueError(f"grid_size: expected an integer >= 2, got {grid_size}")
    t = torch.linspace(-1.0, 1.0, int(grid_size), dtype=dtype, device=device)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Radial basis U(r) = r² log r² between point sets (…, N, 2) and (…, M, 2) → (…, N, M).

    U(0) = 0. Any constant multiple gives the same interpolant (scipy uses r² log r).
    """
    _check_points(a, "a")
    _check_points(b, "b")
    r2 = ((a.unsqueeze(-2) - b.unsqueeze(-3)) ** 2).sum(-1)
    # r2 * log(r2) → 0 as r2 → 0; clamp keeps log finite and its gradient defined
    return r2 * torch.log(r2.clamp_min(1e-20))


def tps_system(ctrl: torch.Tensor) -> torch.Tensor:
    """The (K+3)×(K+3) interpolation matrix [[U(C, C), P], [Pᵀ, 0]] with P = [1, x, y]."""
    _check_points(ctrl, "ctrl")
    k = ctrl.shape[0]
    p = torch.cat([torch.ones(k, 1, dtype=ctrl.dtype, device=ctrl.device), ctrl], dim=1)
    top = torch.cat([tps_kernel(ctrl, ctrl), p], dim=1)
    bottom = torch.cat([p.t(), torch.zeros(3, 3, dtype=ctrl.dtype, device=ctrl.device)], dim=1)
    return torch.cat([top, bottom], dim=0)


def tps_coefficients(ctrl: torch.Tensor) -> torch.Tensor:
    """(K+3, K) map from control-point offsets to the spline's kernel weights and linear part.

    Depends only on the control points, so callers with a fixed grid compute it once.
    Solved in float64 for conditioning.
    """
    _check_points(ctrl, "ctrl")
    c64 = ctrl.to(torch.float64)
    k = c64.shape[0]
    rhs = torch.zeros(k + 3, k, dtype=torch.float64, device=ctrl.device)
    rhs[:k] = torch.eye(k, dtype=torch.float64, device=ctrl.device)
    return torch.linalg.solve(tps_system(c64), rhs)


def tps_basis(points: torch.Tensor, ctrl: torch.Tensor,
              coef: torch.Tensor | None = None) -> torch.Tensor:
    """Linear map from control-point offsets to offsets at ``points``.

    points: (N, 2); ctrl: (K, 2); coef: optional (K+3, K) from :func:`tps_coefficients`
    → (N, K) matrix B with f(points) = B @ offsets, in points' dtype.
    """
    _check_points(points, "points")
    if coef is None:
        coef = tps_coefficients(ctrl)
    dt = coef.dtype
    p = points.to(dt)
    feats = torch.cat([tps_kernel(p, ctrl.to(dt)), torch.ones_like(p[:, :1]), p], dim=1)
    return (feats @ coef).to(points.dtype)


def split_params(params: torch.Tensor, n_ctrl: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 6 + 2K) → affine matrices (B, 2, 3) (identity added) and offsets (B, K, 2)."""
    if params.ndim != 2 or params.shape[1] != N_AFFINE + 2 * n_ctrl:
        raise ValueError(
            f"params: expected shape (B, {N_AFFINE + 2 * n_ctrl}) for K={n_ctrl}, "
            f"got {tuple(params.shape)}")
    eye = torch.eye(2, 3, dtype=params.dtype, device=params.device)
    theta = params[:, :N_AFFINE].reshape(-1, 2, 3) + eye
    offsets = params[:, N_AFFINE:].reshape(-1, n_ctrl, 2)
    return theta, offsets


def warp_points_with_basis(points: torch.Tensor, basis: torch.Tensor,
                           params: torch.Tensor) -> torch.Tensor:
    """T(points) given a precomputed ``basis = tps_basis(points, ctrl)``.

    points: (N, 2); basis: (N, K); params: (B, 6 + 2K) → (B, N, 2).
    """
    theta, offsets = split_params(params, basis.shape[1])
    ones = torch.ones_like(points[:, :1])
    affine = torch.cat([points, ones], dim=1) @ theta.transpose(1, 2)   # (B, N, 2)
    return affine + basis @ offsets


def warp_points(points: torch.Tensor, params: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """Apply the TPS warp to arbitrary points.

    points: (N, 2) or (B, N, 2) normalised; params: (B, 6 + 2K); ctrl: (K, 2) → (B, N, 2).
    """
    _check_points(points, "points")
    if points.ndim == 2:
        return warp_points_with_basis(points, tps_basis(points, ctrl), params)
    if points.ndim != 3 or points.shape[0] != params.shape[0]:
        raise ValueError(f"points: expected (N, 2) or (B={params.shape[0]}, N, 2), "
                         f"got {tuple(points.shape)}")
    return torch.cat([warp_points_with_basis(p, tps_basis(p, ctrl), params[i:i + 1])
                      for i, p in enumerate(points)], dim=0)


def tps_grid(params: torch.Tensor, ctrl: torch.Tensor, size: tuple[int, int],
             basis: torch.Tensor | None = None) -> torch.Tensor:
    """Dense sampling grid for ``grid_sample``: (B, H, W, 2) for output size (H, W).

    Pass ``basis`` (from :func:`dense_basis`) to skip the solve when the size repeats.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size: expected positive (H, W), got {size}")
    pts = identity_grid((h, w), dtype=params.dtype, device=params.device).reshape(-1, 2)
    if basis is None:
        basis = tps_basis(pts, ctrl.to(params.dtype))
    return warp_points_with_basis(pts, basis, params).reshape(-1, h, w, 2)


def dense_basis(ctrl: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (H·W, K) basis of :func:`tps_grid` for one output size, to cache."""
    pts = identity_grid(size, dtype=ctrl.dtype, device=ctrl.device).reshape(-1, 2)
    return tps_basis(pts, ctrl)


def warp_image(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample image (B, C, H, W) at grid (B, h, w, 2) → (B, C, h, w); zeros outside."""
    if image.ndim != 4:
        raise ValueError(f"image: expected (B, C, H, W), got {tuple(image.shape)}")
    return torch.nn.functional.grid_sample(image, grid.to(image.dtype), mode=mode,
                                           padding_mode="zeros", align_corners=False)


def n_params(grid_size: int) -> int:
    """Length of a parameter vector for a grid_size × grid_size control grid."""
    return N_AFFINE + 2 * int(grid_size) ** 2
