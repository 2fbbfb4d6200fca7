"""The STN of the paper's Table 2: two stacked masks in, TPS parameters out."""
from __future__ import annotations

import torch
from torch import nn

from . import tps
from .config import MatcherConfig
from .losses import matcher_loss


class Matcher(nn.Module):
    """(moving, fixed) masks (B, 1, S, S) → TPS parameters (B, 6 + 2K).

    Conv 32,32,pool,64,64,pool,128,128,pool (leaky ReLU 1e-4), adaptive average pooling, then a
    small FC head whose last layer starts at zero, so an untrained matcher is the identity.
    """

    def __init__(self, cfg: MatcherConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MatcherConfig()
        layers: list[nn.Module] = []
        c_in = 2
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

    @property
    def n_ctrl(self) -> int:
        return self.cfg.grid_size ** 2

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.ndim != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != (s, s):
                raise ValueError(f"{name}: expected (B, 1, {s}, {s}), got {tuple(t.shape)}")
        x = torch.cat([moving, fixed], dim=1)
        return self.head(self.fc(self.pool(self.features(x))))

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

        moving, fixed: (B, 1, S, S) masks in [0, 1]; params: (B, P) start (default: predicted).
        Returns refined params (B, P), detached. Each pair is optimised independently (the loss
        is a sum over the batch).
        """
        with torch.no_grad():
            p0 = self(moving, fixed).float() if params is None else params.float()
        if steps <= 0:
            return p0
        p = p0.clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=lr)
        size = tuple(fixed.shape[-2:])
        basis = self.basis(size)
        with torch.enable_grad():
            for _ in range(steps):
                grid = tps.tps_grid(p, self.ctrl, size, basis=basis)
                warped = tps.warp_image(moving.float(), grid)
                _, offsets = tps.split_params(p, self.n_ctrl)
                loss, _ = matcher_loss(warped, fixed.float(), offsets, grid,
                                       self.cfg.smooth_weight, self.cfg.fold_weight)
                opt.zero_grad(set_to_none=True)
                (loss * len(p)).backward()
                opt.step()
        return p.detach()

    def loss(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Training loss for one batch of masks (B, 1, S, S) in [0, 1]."""
        params = self(moving, fixed).float()
        grid = self.grid(params, tuple(fixed.shape[-2:]))
        warped = tps.warp_image(moving.float(), grid)
        _, offsets = tps.split_params(params, self.n_ctrl)
        return matcher_loss(warped, fixed.float(), offsets, grid,
                            self.cfg.smooth_weight, self.cfg.fold_weight)
