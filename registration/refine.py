"""Test-time refinement of TPS parameters: Adam on the matcher's loss, with its gradient written
out and compiled (numba). Pure functions; :meth:`registration.matcher.Matcher.refine` passes in
the operators.

Why compiled: at these sizes (one 28×28 … 64×64 pair, ~300 parameters) a step is ~60 small
array operations, and the per-call overhead of PyTorch or NumPy (5–20 µs each) is most of the
cost, not the arithmetic (~0.5 M multiply-adds a step at 28×28). One compiled loop does a step
in a few tens of µs. The gradient is the same as autograd's on ``losses.matcher_loss`` with
``torch.optim.Adam`` (``tests/test_matcher.py``).

Parameters are in the (x, y)-split order of ``Matcher._split_operators``: x' = p_x·basis and
y' = p_y·basis, with basis rows (x, y, 1, U(·, c_1) … U(·, c_K)), plus the identity grid.
Loss per pair: 1 − soft Dice(warp(moving), fixed) + smooth_weight · pᵀQp
+ fold_weight · mean(relu(fold_margin − det J)), det J by forward differences in pixels
(``losses.jacobian_det``).
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch

EPS_DICE = 1e-6
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MIN_PAIRS_PER_THREAD = 8       # below this a batch runs on the calling thread


_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
# the products below may reassociate their sums (vectorised); no BLAS: OpenBLAS's own threads
# spin after each call and took the cores from PyTorch's (the MNIST pipeline ran 2× slower)
_jit_sums = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)


@dataclass(frozen=True)
class WarpOps:
    """The linear warp for one output size (H, W), float32.

    basis: (3 + K, N); base: (2, N), the identity grid's x and y rows in normalised units, on
    the pixel centres of ``grid_size`` (N = its h·w; default (H, W) itself). A coarser grid is
    interpolated bilinearly at the (H, W) pixels, edge values beyond its outermost centres
    (``grid_sample(padding_mode="border")``), which is how ``Pipeline`` pastes a warp into a
    larger frame: a step then costs O(N·K + H·W) instead of O(H·W·K)."""
    basis: np.ndarray
    base: np.ndarray
    size: tuple[int, int]
    grid_size: tuple[int, int] | None = None


@functools.lru_cache(maxsize=512)
def interpolation_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis from n_in to n_out pixel centres (same extent):
    output i samples input coordinate u = (i + 0.5)·n_in/n_out − 0.5, clamped to
    [0, n_in − 1], as taps (i0, i1, weight of i1), int64, int64, float32 (n_out,) each
    (cached: treat as read-only)."""
    u = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (u - i0).astype(np.float32)


@_jit
def _upsample(coarse, gw, fine, w, ix0, ix1, wx, iy0, iy1, wy):
    """fine (2, H·W) = bilinear interpolation of coarse (2, gh·gw) with the taps above."""
    for i in range(len(iy0)):
        r0, r1, fy = iy0[i] * gw, iy1[i] * gw, wy[i]
        for j in range(w):
            a, b, fx = ix0[j], ix1[j], wx[j]
            for c in range(2):
                top = coarse[c, r0 + a] + fx * (coarse[c, r0 + b] - coarse[c, r0 + a])
                bot = coarse[c, r1 + a] + fx * (coarse[c, r1 + b] - coarse[c, r1 + a])
                fine[c, i * w + j] = top + fy * (bot - top)


@_jit
def _upsample_t(g_fine, gw, g_coarse, w, ix0, ix1, wx, iy0, iy1, wy):
    """g_coarse (2, gh·gw) = the transpose of :func:`_upsample` applied to g_fine (2, H·W)."""
    g_coarse[:] = 0.0
    for i in range(len(iy0)):
        r0, r1, fy = iy0[i] * gw, iy1[i] * gw, wy[i]
        for j in range(w):
            a, b, fx = ix0[j], ix1[j], wx[j]
            for c in range(2):
                g = g_fine[c, i * w + j]
                gt, gb = g * (1 - fy), g * fy
                g_coarse[c, r0 + a] += gt * (1 - fx)
                g_coarse[c, r0 + b] += gt * fx
                g_coarse[c, r1 + a] += gb * (1 - fx)
                g_coarse[c, r1 + b] += gb * fx


@_jit_sums
def grid_product(p, basis, base, out):
    """out (2, N) = p (2, R) @ basis (R, N) + base (2, N)."""
    o0, o1 = out[0], out[1]
    o0[:] = base[0]
    o1[:] = base[1]
    for r in range(basis.shape[0]):
        a, b = p[0, r], p[1, r]
        row = basis[r]
        for k in range(out.shape[1]):
            o0[k] += a * row[k]
            o1[k] += b * row[k]


@_jit_sums
def _pull_back(g_grid, basis, out):
    """out (2, R) += g_grid (2, N) @ basis (R, N)ᵀ: the grid's gradient → the parameters'."""
    g0, g1 = g_grid[0], g_grid[1]
    for r in range(basis.shape[0]):
        row = basis[r]
        s0, s1 = np.float32(0.0), np.float32(0.0)
        for k in range(g_grid.shape[1]):
            s0 += g0[k] * row[k]
            s1 += g1[k] * row[k]
        out[0, r] += s0
        out[1, r] += s1


@_jit_sums
def _add_matvec(scale, a, x, out):
    """out (P,) += scale · a (P, P) @ x (P,)."""
    for i in range(a.shape[0]):
        s = np.float32(0.0)
        for j in range(a.shape[1]):
            s += a[i, j] * x[j]
        out[i] += scale * s


@_jit
def _sample(img, grid, values, d_x, d_y):
    """Bilinear sampling with zeros outside (``grid_sample``, ``align_corners=False``).
    img (C, h, w); grid (2, N) normalised (x, y) → values (C, N) and their derivatives
    along x and y in normalised units, (C, N) each."""
    n_ch, h, w = img.shape
    hx, hy = 0.5 * w, 0.5 * h
    for n in range(grid.shape[1]):
        x = grid[0, n] * hx + hx - 0.5            # pixel coordinates
        y = grid[1, n] * hy + hy - 0.5
        x0f, y0f = math.floor(x), math.floor(y)
        fx, fy = x - x0f, y - y0f
        x0, y0 = int(x0f), int(y0f)
        in_x0, in_x1 = 0 <= x0 < w, 0 <= x0 + 1 < w
        in_y0, in_y1 = 0 <= y0 < h, 0 <= y0 + 1 < h
        for ch in range(n_ch):
            v00 = img[ch, y0, x0] if in_y0 and in_x0 else 0.0
            v01 = img[ch, y0, x0 + 1] if in_y0 and in_x1 else 0.0
            v10 = img[ch, y0 + 1, x0] if in_y1 and in_x0 else 0.0
            v11 = img[ch, y0 + 1, x0 + 1] if in_y1 and in_x1 else 0.0
            top = v00 + fx * (v01 - v00)
            bot = v10 + fx * (v11 - v10)
            values[ch, n] = top + fy * (bot - top)
            d_x[ch, n] = ((v01 - v00) + fy * ((v11 - v10) - (v01 - v00))) * hx
            d_y[ch, n] = (bot - top) * hy


@_jit
def _fold_grad(grid, h, w, margin, weight, out):
    """out (2, H·W) += gradient of weight · mean(relu(margin − det J)) with respect to a grid
    (2, H·W) in normalised units (row-major H × W)."""
    sx, sy = 0.5 * w, 0.5 * h
    g_det = -weight / ((h - 1) * (w - 1))
    for i in range(h - 1):
        for j in range(w - 1):
            a = i * w + j
            right, down = a + 1, a + w
            xx = (grid[0, right] - grid[0, a]) * sx      # d x' / d x
            yy = (grid[1, down] - grid[1, a]) * sy       # d y' / d y
            yx = (grid[1, right] - grid[1, a]) * sy      # d y' / d x
            xy = (grid[0, down] - grid[0, a]) * sx       # d x' / d y
            if xx * yy - yx * xy < margin:
                g_xx, g_yy = g_det * yy * sx, g_det * xx * sy
                g_yx, g_xy = -g_det * xy * sy, -g_det * yx * sx
                out[0, right] += g_xx
                out[0, down] += g_xy
                out[0, a] -= g_xx + g_xy
                out[1, down] += g_yy
                out[1, right] += g_yx
                out[1, a] -= g_yy + g_yx


@_jit
def _refine_pair(moving, fixed, p, basis, base, h, w, quad, smooth2, steps, lr,
                 fold_weight, fold_margin, f_basis, f_base, hf, wf, fine, interp, grid_w, taps):
    """Adam on one pair's parameters p (2, R) in place. moving (C, h_in, w_in); fixed (C, N);
    interp: the grid is basis @ p on a coarser lattice (grid_w wide), upsampled with ``taps``."""
    n_ch, n = fixed.shape
    r = p.shape[1]
    b1, b2 = ADAM_BETAS
    ix0, ix1, wx, iy0, iy1, wy = taps
    coarse = np.empty((2, basis.shape[1]), np.float32)
    g_coarse = np.empty((2, basis.shape[1]), np.float32)
    grid = np.empty((2, n), np.float32)
    values = np.empty((n_ch, n), np.float32)
    d_x = np.empty((n_ch, n), np.float32)
    d_y = np.empty((n_ch, n), np.float32)
    g_grid = np.empty((2, n), np.float32)
    g = np.empty((2, r), np.float32)
    m1 = np.zeros(2 * r, np.float32)            # Adam's moments, flat like p
    m2 = np.zeros(2 * r, np.float32)
    fine_grid = np.empty((2, hf * wf), np.float32)
    fine_g = np.empty((2, hf * wf), np.float32)
    fix_sum = EPS_DICE
    for ch in range(n_ch):
        for k in range(n):
            fix_sum += fixed[ch, k]
    flat_p = p.reshape(2 * r)
    flat_g = g.reshape(2 * r)
    for t in range(1, steps + 1):
        if interp:
            grid_product(p, basis, base, coarse)
            _upsample(coarse, grid_w, grid, w, ix0, ix1, wx, iy0, iy1, wy)
        else:
            grid_product(p, basis, base, grid)
        _sample(moving, grid, values, d_x, d_y)
        inter, w_sum = 0.0, 0.0
        for ch in range(n_ch):
            for k in range(n):
                inter += values[ch, k] * fixed[ch, k]
                w_sum += values[ch, k]
        denom = w_sum + fix_sum
        ga = (2 * inter + EPS_DICE) / (denom * denom)     # d(−Dice)/d warped = ga − gb·fixed
        gb = 2 / denom
        for k in range(n):
            gx, gy = 0.0, 0.0
            for ch in range(n_ch):
                gw = ga - gb * fixed[ch, k]
                gx += gw * d_x[ch, k]
                gy += gw * d_y[ch, k]
            g_grid[0, k] = gx
            g_grid[1, k] = gy
        if fold_weight != 0.0 and not fine:
            _fold_grad(grid, h, w, fold_margin, fold_weight, g_grid)
        g[:] = 0.0
        if interp:
            _upsample_t(g_grid, grid_w, g_coarse, w, ix0, ix1, wx, iy0, iy1, wy)
            _pull_back(g_coarse, basis, g)
        else:
            _pull_back(g_grid, basis, g)
        if fold_weight != 0.0 and fine:        # folding judged on a finer grid than the pixels
            grid_product(p, f_basis, f_base, fine_grid)
            fine_g[:] = 0.0
            _fold_grad(fine_grid, hf, wf, fold_margin, fold_weight, fine_g)
            _pull_back(fine_g, f_basis, g)
        _add_matvec(smooth2, quad, flat_p, flat_g)         # + 2·λ·Q·p
        c1 = lr / (1 - b1 ** t)
        c2 = 1 / (1 - b2 ** t)
        for i in range(2 * r):
            gi = flat_g[i]
            m1[i] = b1 * m1[i] + (1 - b1) * gi
            m2[i] = b2 * m2[i] + (1 - b2) * gi * gi
            flat_p[i] -= c1 * m1[i] / (math.sqrt(m2[i] * c2) + ADAM_EPS)


def refine(moving: np.ndarray, fixed: np.ndarray, params: np.ndarray, ops: WarpOps,
           quad: np.ndarray, steps: int, lr: float, smooth_weight: float, fold_weight: float,
           fold_margin: float, fold_ops: WarpOps | None = None) -> np.ndarray:
    """Adam on split-order TPS parameters, each pair on its own (see the module docstring).

    moving: (B, C, h, w) in [0, 1]; fixed: (B, C, H, W) with (H, W) = ops.size; params: (B, P)
    split order, P = 2·(3 + K); quad: (P, P) Q of the smoothness term; fold_ops: judge folding
    on this (finer) grid instead of the pixels. Returns the refined params (B, P), float32.
    """
    b, c = moving.shape[:2]
    h, w = ops.size
    if fixed.shape != (b, c, h, w):
        raise ValueError(f"fixed: expected {(b, c, h, w)}, got {tuple(fixed.shape)}")
    if params.shape != (b, 2 * ops.basis.shape[0]):
        raise ValueError(f"params: expected {(b, 2 * ops.basis.shape[0])}, "
                         f"got {tuple(params.shape)}")
    mov = np.ascontiguousarray(moving, dtype=np.float32)
    fix = np.ascontiguousarray(fixed, dtype=np.float32).reshape(b, c, h * w)
    p = np.array(params, np.float32, order="C").reshape(b, 2, -1)   # a copy: refined in place
    fine = fold_ops if fold_ops is not None else ops
    if fold_ops is not None and fold_ops.grid_size not in (None, fold_ops.size):
        raise ValueError("fold_ops: expected an exact grid (grid_size None or its size)")
    gh, gw = ops.grid_size or (h, w)
    if ops.basis.shape[1] != gh * gw:
        raise ValueError(f"ops.basis: expected {gh * gw} columns for grid_size {(gh, gw)}, "
                         f"got {ops.basis.shape[1]}")
    interp = (gh, gw) != (h, w)
    taps = (*interpolation_taps(w, gw), *interpolation_taps(h, gh))

    def run(items: range) -> None:
        for i in items:
            _refine_pair(mov[i], fix[i], p[i], ops.basis, ops.base, h, w, quad,
                         np.float32(2 * smooth_weight), int(steps), float(lr), float(fold_weight),
                         float(fold_margin), fine.basis, fine.base, fine.size[0],
                         fine.size[1], fold_ops is not None, interp, gw, taps)

    # the compiled loop releases the GIL: split a batch over torch's thread count
    n_threads = min(torch.get_num_threads(), b // MIN_PAIRS_PER_THREAD)
    if n_threads > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(run, (range(k, b, n_threads) for k in range(n_threads))))
    else:
        run(range(b))
    return p.reshape(b, -1)
