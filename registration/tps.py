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
    if a.ndim == 2 and b.ndim == 2 and not (a.requires_grad or b.requires_grad):
        # |a|² + |b|² − 2a·b: one matmul instead of an (N, M, 2) difference tensor
        r2 = (torch.addmm((a * a).sum(1, keepdim=True), a, b.T, alpha=-2)
              + (b * b).sum(1)).clamp_min_(0)
    else:
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


def param_matrix(points: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The linear map from parameters to displacements at ``points``.

    points: (N, 2); basis: (N, K) from :func:`tps_basis` → (2N, 6 + 2K) matrix L with
    ``warp_points(points, p) - points == (L @ p).reshape(N, 2)`` for any parameters p.
    """
    n, k = basis.shape
    ones = torch.ones_like(points[:, :1])
    homog = torch.cat([points, ones], dim=1)                        # (N, 3)
    out = points.new_zeros(n, 2, N_AFFINE + 2 * k)
    out[:, 0, 0:3] = homog                                          # x' row of A
    out[:, 1, 3:6] = homog                                          # y' row of A
    out[:, 0, N_AFFINE::2] = basis                                  # x offsets
    out[:, 1, N_AFFINE + 1::2] = basis                              # y offsets
    return out.reshape(2 * n, N_AFFINE + 2 * k)


def canonical_matrix(ctrl: torch.Tensor) -> torch.Tensor:
    """(P, P) matrix C with ``canonical_params(p, ctrl) == p @ C.T`` (the map is linear)."""
    k = ctrl.shape[0]
    eye = torch.eye(N_AFFINE + 2 * k, dtype=ctrl.dtype, device=ctrl.device)
    return canonical_params(eye, ctrl).T


def canonical_params(params: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """The same warp with the affine part of the offsets moved into the affine parameters.

    (A, d) and (A + E, d - E·[c; 1]) give the same warp for any 2×3 matrix E, because the
    spline reproduces affine offsets exactly. The canonical form keeps offsets orthogonal to
    affine functions of the control points, so smoothness penalises only the non-affine part.
    params: (B, 6 + 2K); ctrl: (K, 2) → (B, 6 + 2K).
    """
    k = ctrl.shape[0]
    theta, offsets = split_params(params, k)
    homog = torch.cat([ctrl, torch.ones_like(ctrl[:, :1])], 1).to(params.dtype)   # (K, 3)
    e = (torch.linalg.pinv(homog) @ offsets).transpose(1, 2)                     # (B, 2, 3)
    return torch.cat([(params[:, :N_AFFINE].reshape(-1, 2, 3) + e).reshape(-1, N_AFFINE),
                      (offsets - homog @ e.transpose(1, 2)).reshape(-1, 2 * k)], 1)


def compose_params(outer: torch.Tensor, inner: torch.Tensor, ctrl: torch.Tensor,
                   points: torch.Tensor, proj: torch.Tensor | None = None,
                   basis: torch.Tensor | None = None,
                   coef: torch.Tensor | None = None) -> torch.Tensor:
    """Parameters of the TPS closest (least squares over ``points``) to ``outer ∘ inner``,
    the warp x ↦ outer(inner(x)), in canonical form (see :func:`canonical_params`).

    This is how a cascade composes: warping the moving image by ``outer`` and the result by
    ``inner`` samples the moving image at outer(inner(x)). The composition is evaluated
    exactly at ``points``; only the fit back to one TPS approximates.

    outer, inner: (B, 6 + 2K); ctrl: (K, 2); points: (N, 2) where the fit is made (e.g. the
    pixel centres of the output). Cached pieces, all optional: proj (P, 2N), the map from
    displacements at ``points`` to canonical parameters (:func:`composition_projector`);
    basis (N, K) = ``tps_basis(points, ctrl)``; coef = ``tps_coefficients(ctrl)``.
    Returns (B, 6 + 2K).
    """
    _check_points(points, "points")
    b, k = outer.shape[0], ctrl.shape[0]
    if inner.shape != outer.shape:
        raise ValueError(f"inner: expected outer's shape {tuple(outer.shape)}, "
                         f"got {tuple(inner.shape)}")
    if coef is None:
        coef = tps_coefficients(ctrl)
    if basis is None:
        basis = tps_basis(points, ctrl, coef)
    if proj is None:
        proj = composition_projector(ctrl, points, coef)
    mid = warp_points_with_basis(points, basis.to(points.dtype), inner.to(points.dtype))
    flat = mid.reshape(-1, 2)
    basis_mid = tps_basis(flat, ctrl, coef).reshape(b, -1, k)
    theta, offsets = split_params(outer, k)
    target = (flat.reshape(b, -1, 2) @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
              + basis_mid @ offsets)
    disp = (target - points).reshape(b, -1)                                    # (B, 2N)
    return disp @ proj.T.to(disp.dtype)


def composition_projector(ctrl: torch.Tensor, points: torch.Tensor,
                          coef: torch.Tensor | None = None) -> torch.Tensor:
    """(P, 2N) least-squares map from displacements at ``points`` (N, 2), flattened (x, y)
    per point, to canonical TPS parameters; computed in float64, returned in points' dtype."""
    p64, c64 = points.to(torch.float64), ctrl.to(torch.float64)
    lin = param_matrix(p64, tps_basis(p64, c64, None if coef is None else coef.double()))
    # the affine part is represented twice (A and affine offsets), so lin has a 6-dimensional
    # null space; its singular values are ~1e-14 (or ~1e-8 from a float32 coef) against ≥ 1 for
    # the rest, and must be cut, not inverted
    return (canonical_matrix(c64) @ torch.linalg.pinv(lin, rtol=1e-6)).to(points.dtype)


def n_params(grid_size: int) -> int:
    """Length of a parameter vector for a grid_size × grid_size control grid."""
    return N_AFFINE + 2 * int(grid_size) ** 2
