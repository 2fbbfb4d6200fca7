"""The STN of the paper's Table 2: two stacked masks in, TPS parameters out."""
from __future__ import annotations

import torch
from torch import nn

from . import tps
from .coords import identity_grid
from .config import MatcherConfig
from .losses import control_smoothness, matcher_loss


class Matcher(nn.Module):
    """(moving, fixed) masks (B, C, S, S), C = cfg.mask_channels, → TPS parameters (B, 6 + 2K).

    Conv 32,32,pool,64,64,pool,128,128,pool (leaky ReLU 1e-4), adaptive average pooling, then a
    small FC head whose last layer starts at zero, so an untrained matcher is the identity.
    """

    def __init__(self, cfg: MatcherConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MatcherConfig()
        layers: list[nn.Module] = []
        c_in = 2 * cfg.mask_channels
        for c in cfg.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.LeakyReLU(cfg.leaky_slope)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(cfg.pooled)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * cfg.pooled ** 2, cfg.hidden),
                                nn.LeakyReLU(cfg.leaky_slope))
        self.head = nn.Linear(cfg.hidden, tps.n_params(cfg.grid_size))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("ctrl", tps.control_grid(cfg.grid_size), persistent=False)
        self.register_buffer("coef", tps.tps_coefficients(self.ctrl).float(), persistent=False)
        self._basis: dict[tuple, torch.Tensor] = {}
        self._compose_ops: tuple[torch.Tensor, torch.Tensor] | None = None   # points, projector

    @property
    def n_ctrl(self) -> int:
        return self.cfg.grid_size ** 2

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        s, c = self.cfg.input_size, self.cfg.mask_channels
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.ndim != 4 or t.shape[1] != c or tuple(t.shape[-2:]) != (s, s):
                raise ValueError(f"{name}: expected (B, {c}, {s}, {s}), got {tuple(t.shape)}")
        x = torch.cat([moving, fixed], dim=1)
        return self.head(self.fc(self.pool(self.features(x))))

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor,
                passes: int | None = None) -> torch.Tensor:
        """TPS parameters (B, P) from ``passes`` cascaded applications of the network
        (default ``cfg.passes``): each pass sees the moving mask warped by the composition of
        the passes before it, and the result is composed into a single TPS."""
        passes = self.cfg.passes if passes is None else int(passes)
        if passes < 1:
            raise ValueError(f"passes: expected >= 1, got {passes}")
        params = self(moving, fixed).float()
        for _ in range(passes - 1):
            step = self(self.warp(moving.float(), params).to(moving.dtype), fixed).float()
            params = self.compose(params, step)
        return params

    def compose(self, outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """One TPS ≈ outer ∘ inner, fitted on the S×S pixel centres (see tps.compose_params)."""
        s = self.cfg.input_size
        if self._compose_ops is None:
            pts = identity_grid((s, s), device=self.ctrl.device).reshape(-1, 2)
            self._compose_ops = (pts, tps.composition_projector(self.ctrl, pts, self.coef))
        pts, proj = self._compose_ops
        return tps.compose_params(outer.float(), inner.float(), self.ctrl, pts, proj,
                                  self.basis((s, s)), self.coef)

    def basis(self, size: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
        """Cached (H·W, K) TPS basis for an output size."""
        key = (int(size[0]), int(size[1]), dtype, self.ctrl.device)
        if key not in self._basis:
            self._basis[key] = tps.dense_basis(self.ctrl.to(torch.float64), size).to(dtype)
        return self._basis[key]

    def warp_points(self, points: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """T(points): points (N, 2) normalised, params (B, P) → (B, N, 2)."""
        return tps.warp_points_with_basis(points, tps.tps_basis(points, self.ctrl, self.coef),
                                          params)

    def grid(self, params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Sampling grid (B, H, W, 2) for output size (H, W)."""
        return tps.tps_grid(params, self.ctrl, size, basis=self.basis(size, params.dtype))

    def warp(self, moving: torch.Tensor, params: torch.Tensor,
             size: tuple[int, int] | None = None) -> torch.Tensor:
        """Warp moving (B, C, H, W) onto the fixed frame → (B, C, h, w) (default: same size)."""
        size = size or tuple(moving.shape[-2:])
        return tps.warp_image(moving, self.grid(params.float(), size))

    def refine(self, moving: torch.Tensor, fixed: torch.Tensor, params: torch.Tensor | None = None,
               steps: int = 10, lr: float = 0.02) -> torch.Tensor:
        """Test-time refinement: a few Adam steps on the TPS parameters of each pair, from the
        network's prediction, minimising the training loss. Trades milliseconds for Dice.

        moving, fixed: (B, C, S, S) masks in [0, 1]; params: (B, P) start (default: predicted).
        Returns refined params (B, P), detached. Each pair is optimised independently (the loss
        is a sum over the batch).
        """
        with torch.no_grad():
            p0 = self.predict(moving, fixed) if params is None else params.float()
        if steps <= 0:
            return p0
        size = (int(fixed.shape[-2]), int(fixed.shape[-1]))
        ops = self._refine_operators(size)
        mov, fix = moving.float(), fixed.float()
        lam, mu = self.cfg.smooth_weight, self.cfg.fold_weight
        fix_sum = fix.sum((1, 2, 3))
        b1, b2, eps = 0.9, 0.999, 1e-8          # Adam, written out: a handful of in-place ops
        m1, m2 = torch.zeros_like(p0), torch.zeros_like(p0)
        p = p0.detach().clone()
        for t in range(1, steps + 1):
            with torch.enable_grad():
                q = p.detach().requires_grad_(True)
                # the training loss, using the warp's linearity in p: grid = identity + q·L,
                # finite-difference Jacobian = J0 + q·D, smoothness = qᵀ·Q·q
                grid = torch.addmm(ops["base"], q, ops["lin"]).view(-1, size[0], size[1], 2)
                warped = tps.warp_image(mov, grid)
                inter = (warped * fix).sum((1, 2, 3))
                dice = (2 * inter + 1e-6) / (warped.sum((1, 2, 3)) + fix_sum + 1e-6)
                loss = (lam * ((q @ ops["quad"]) * q).sum(1) - dice).sum()
                if mu:
                    j = torch.addmm(ops["jac0"], q, ops["jac"]).view(len(q), 4, -1)
                    det = j[:, 0] * j[:, 1] - j[:, 2] * j[:, 3]
                    loss = loss + mu * torch.relu(-det).mean(1).sum()
                (g,) = torch.autograd.grad(loss, q)
            m1.mul_(b1).add_(g, alpha=1 - b1)
            m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (m2 / (1 - b2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(m1, denom, value=-lr / (1 - b1 ** t))
        return p

    def _refine_operators(self, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Cached linear operators of the warp for one output size (H, W):

        base (1, 2HW) identity grid and lin (P, 2HW), so grid = base + p·lin;
        jac0 (1, 4M) and jac (P, 4M), the forward-difference Jacobian of the grid in pixel
        units (entries xx, xy, yx, yy over M = (H-1)(W-1) pixels), as in ``jacobian_det``;
        quad (P, P) with control_smoothness(offsets) = pᵀ·quad·p.
        """
        key = ("refine", size)
        if key not in self._basis:
            h, w = size
            pts = identity_grid(size, dtype=torch.float64, device=self.ctrl.device)
            lin = tps.param_matrix(pts.reshape(-1, 2), self.basis(size, torch.float64)).T
            n_p = lin.shape[0]
            scale = torch.tensor([w / 2, h / 2], dtype=torch.float64)

            def jac_entries(g):                 # (B, H, W, 2) grid → (B, 4M)
                g = g * scale
                gx = g[:, :-1, 1:] - g[:, :-1, :-1]
                gy = g[:, 1:, :-1] - g[:, :-1, :-1]
                return torch.stack([gx[..., 0], gy[..., 1], gx[..., 1], gy[..., 0]],
                                   1).reshape(len(g), -1)
            jac0 = jac_entries(pts[None])
            jac = jac_entries(lin.reshape(n_p, h, w, 2))

            def smooth(v):
                return control_smoothness(tps.split_params(v[None], self.n_ctrl)[1])[0]
            quad = torch.autograd.functional.hessian(smooth, torch.zeros(n_p, dtype=torch.float64))
            self._basis[key] = {"base": pts.reshape(1, -1).float(),
                                "lin": lin.contiguous().float(),
                                "jac0": jac0.float(), "jac": jac.contiguous().float(),
                                "quad": (quad / 2).float()}
        return self._basis[key]

    def loss(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Training loss for one batch of masks (B, C, S, S) in [0, 1]."""
        params = self(moving, fixed).float()
        grid = self.grid(params, tuple(fixed.shape[-2:]))
        warped = tps.warp_image(moving.float(), grid)
        _, offsets = tps.split_params(params, self.n_ctrl)
        return matcher_loss(warped, fixed.float(), offsets, grid,
                            self.cfg.smooth_weight, self.cfg.fold_weight)
