"""The STN of the paper's Table 2: two stacked masks in, TPS parameters out."""
from __future__ import annotations

import torch
from torch import nn

from . import tps
from .coords import identity_grid
from .config import MatcherConfig
from .losses import control_smoothness, matcher_loss


def _jacobian_kernel(h: int, w: int) -> torch.Tensor:
    """(4, 2, 2, 2) convolution weights that turn a grid (B, 2, H, W) in normalised units into
    the forward differences of ``losses.jacobian_det`` in pixels, (B, 4, H−1, W−1): channels
    d(x)/dx, d(y)/dy, d(y)/dx, d(x)/dy, so det J = ch0·ch1 − ch2·ch3."""
    k = torch.zeros(4, 2, 2, 2)
    along_x = torch.tensor([[-1.0, 1.0], [0.0, 0.0]])
    along_y = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    k[0, 0], k[1, 1] = along_x * (w / 2), along_y * (h / 2)
    k[2, 1], k[3, 0] = along_x * (h / 2), along_y * (w / 2)
    return k


class FlowUNet(nn.Module):
    """(B, C_in, S, S) → displacement (B, 2, S/2^skip, S/2^skip): a small U-Net (two 3×3 convs
    per level, leaky ReLU 0.2, max-pool down, nearest up, skip connections) whose decoder stops
    ``skip`` levels short of the input resolution. The last layer is zero-initialised so an
    untrained network predicts no displacement."""

    def __init__(self, c_in: int, channels: tuple[int, ...], skip: int = 0):
        super().__init__()
        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(b, b, 3, padding=1), nn.LeakyReLU(0.2))
        self.down = nn.ModuleList()
        for c in channels:
            self.down.append(block(c_in, c))
            c_in = c
        if not 0 <= skip < len(channels):
            raise ValueError(f"skip: expected 0..{len(channels) - 1}, got {skip}")
        self.up = nn.ModuleList(block(channels[i + 1] + channels[i], channels[i])
                                for i in reversed(range(skip, len(channels) - 1)))
        self.out = nn.Conv2d(channels[skip], 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = blk(x)
            skips.append(x)
        skips = skips[len(skips) - 1 - len(self.up):-1]
        for blk in self.up:
            skip = skips.pop()
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = blk(torch.cat([x, skip], 1))
        return self.out(x)


class Matcher(nn.Module):
    """(moving, fixed) masks (B, C, S, S), C = cfg.mask_channels, → TPS parameters (B, 6 + 2K).

    ``cfg.arch == "regress"`` (the paper's design): conv 32,32,pool,64,64,pool,128,128,pool
    (leaky ReLU 1e-4), adaptive average pooling, then a small FC head whose last layer starts
    at zero, so an untrained matcher is the identity.

    ``cfg.arch == "flow"``: a small U-Net (:class:`FlowUNet`) predicts a displacement (x, y,
    normalised units) at the centres of an (S/f)×(S/f) lattice of cells, f = cfg.flow_scale, and the fixed least-squares projector
    of ``tps.composition_projector`` maps it to the TPS closest to it. Also the identity when
    untrained; the output is still one TPS, so cascades, refinement and the app's control grid
    work unchanged.
    """

    def __init__(self, cfg: MatcherConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MatcherConfig()
        self.register_buffer("ctrl", tps.control_grid(cfg.grid_size), persistent=False)
        self.register_buffer("coef", tps.tps_coefficients(self.ctrl).float(), persistent=False)
        self._basis: dict[tuple, torch.Tensor] = {}
        self._compose_ops: tuple[torch.Tensor, torch.Tensor] | None = None   # points, projector
        if cfg.arch == "flow":
            skip = {1: 0, 2: 1, 4: 2, 8: 3}.get(int(cfg.flow_scale))
            if skip is None or skip >= len(cfg.unet_channels):
                raise ValueError(f"flow_scale: expected a power of 2 below "
                                 f"2^{len(cfg.unet_channels)}, got {cfg.flow_scale}")
            self.flow = FlowUNet(2 * cfg.mask_channels, tuple(cfg.unet_channels), skip)
            s = cfg.input_size >> skip             # max-pool sizes: 28 → 14 → 7, 32 → 16 → 8
            # the displacement at the centres of the coarse cells, in the input's frame
            pts = identity_grid((s, s)).reshape(-1, 2)
            self.register_buffer("flow_proj", tps.composition_projector(self.ctrl, pts, self.coef),
                                 persistent=False)                              # (P, 2·S²)
            return
        if cfg.arch != "regress":
            raise ValueError(f"arch: expected 'regress' or 'flow', got {cfg.arch!r}")
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

    @property
    def n_ctrl(self) -> int:
        return self.cfg.grid_size ** 2

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        s, c = self.cfg.input_size, self.cfg.mask_channels
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.ndim != 4 or t.shape[1] != c or tuple(t.shape[-2:]) != (s, s):
                raise ValueError(f"{name}: expected (B, {c}, {s}, {s}), got {tuple(t.shape)}")
        x = torch.cat([moving, fixed], dim=1)
        if self.cfg.arch == "flow":
            disp = self.flow(x).float().permute(0, 2, 3, 1).reshape(len(x), -1)   # (B, 2·S²)
            return disp @ self.flow_proj.T
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
        """Sampling grid (B, H, W, 2) for output size (H, W): ``tps.tps_grid`` as one matrix
        product with cached operators (the same grid; tested)."""
        h, w = int(size[0]), int(size[1])
        ops = self._split_operators((h, w))
        b = len(params)
        basis = ops["basis"] if params.dtype == torch.float32 else ops["basis"].to(params.dtype)
        g2 = torch.addmm(ops["base"].to(params.dtype).repeat(b, 1),
                         params[:, ops["perm"]].reshape(2 * b, -1), basis)
        return g2.view(b, 2, h, w).permute(0, 2, 3, 1)

    def warp(self, moving: torch.Tensor, params: torch.Tensor,
             size: tuple[int, int] | None = None) -> torch.Tensor:
        """Warp moving (B, C, H, W) onto the fixed frame → (B, C, h, w) (default: same size)."""
        size = size or tuple(moving.shape[-2:])
        return tps.warp_image(moving, self.grid(params.float(), size))

    @torch.no_grad()
    def refine(self, moving: torch.Tensor, fixed: torch.Tensor, params: torch.Tensor | None = None,
               steps: int = 10, lr: float | None = None) -> torch.Tensor:
        """Test-time refinement: a few Adam steps on the TPS parameters of each pair, from the
        network's prediction, minimising the training loss. Trades milliseconds for Dice.

        moving, fixed: (B, C, S, S) masks in [0, 1]; params: (B, P) start (default: predicted);
        lr: Adam's step size (default ``cfg.refine_lr``).
        Returns refined params (B, P), detached. Each pair is optimised independently (the loss
        is a sum over the batch).
        """
        with torch.no_grad():
            p0 = self.predict(moving, fixed) if params is None else params.float()
        if steps <= 0:
            return p0
        lr = self.cfg.refine_lr if lr is None else float(lr)
        h, w = int(fixed.shape[-2]), int(fixed.shape[-1])
        ops = self._split_operators((h, w))
        mov, fix = moving.float().contiguous(), fixed.float()
        lam, mu, margin = self.cfg.smooth_weight, self.cfg.fold_weight, self.cfg.fold_margin
        b, eps = len(p0), 1e-6
        fix_sum = fix.sum((1, 2, 3)) + eps
        g_det_value = -mu / ((h - 1) * (w - 1))      # d/d det of μ·mean(relu(margin − det))
        sup = max(1, int(self.cfg.fold_supersample))
        if sup > 1:
            fops = self._split_operators((sup * h, sup * w))
            g_det_value_f = -mu / ((sup * h - 1) * (sup * w - 1))
            base_f = fops["base"].repeat(len(p0), 1)
        b1, b2, e_adam = 0.9, 0.999, 1e-8             # Adam, written out
        # Work in (x, y)-split parameters: x' = [x, y, 1, U(x, c_k)]·(a_x0, a_x1, a_x2, d_kx),
        # and the same operator gives y', so one small matrix serves both coordinates
        perm, basis, quad = ops["perm"], ops["basis"], self._smoothness_form()
        p = p0.detach()[:, perm].contiguous()
        base = ops["base"].repeat(b, 1)                # (2B, HW): x, y rows per item
        m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
        for t in range(1, steps + 1):
            # The loss's gradient, written out (an autograd graph is most of the cost at these
            # sizes); the sampler's exact derivative comes from grid_sample's own backward.
            g2 = torch.addmm(base, p.view(2 * b, -1), basis).view(b, 2, h, w)
            grid = g2.permute(0, 2, 3, 1)
            warped = nn.functional.grid_sample(mov, grid, mode="bilinear",
                                               padding_mode="zeros", align_corners=False)
            inter = (warped * fix).sum((1, 2, 3))
            denom = warped.sum((1, 2, 3)) + fix_sum
            # d(−Dice)/d(warped) with Dice = (2·I + ε) / (Σw + Σf + ε)
            g_w = torch.addcmul(((2 * inter + eps) / denom.square()).view(-1, 1, 1, 1),
                                (2 / denom).view(-1, 1, 1, 1), fix, value=-1)
            _, g_grid = torch.ops.aten.grid_sampler_2d_backward(
                g_w.expand_as(warped).contiguous(), mov, grid, 0, 0, False, [False, True])
            g_grid = g_grid.permute(0, 3, 1, 2)
            if mu and sup == 1:
                g_grid = g_grid + self._fold_grad(g2, ops, margin, g_det_value)
            g = torch.mm(g_grid.reshape(2 * b, -1), ops["basis_t"]).view(b, -1)
            if mu and sup > 1:
                # folding judged on a grid `sup` times finer than the pixels, where creases
                # narrower than a pixel show (README, "Sub-pixel folding")
                gf = torch.addmm(base_f, p.view(2 * b, -1), fops["basis"]).view(
                    b, 2, sup * h, sup * w)
                g.view(2 * b, -1).addmm_(
                    self._fold_grad(gf, fops, margin, g_det_value_f).reshape(2 * b, -1),
                    fops["basis_t"])
            g.addmm_(p, quad, alpha=2 * lam)
            m1.mul_(b1).add_(g, alpha=1 - b1)
            m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            den = (m2 / (1 - b2 ** t)).sqrt_().add_(e_adam)
            p.addcdiv_(m1, den, value=-lr / (1 - b1 ** t))
        return p[:, ops["unperm"]].contiguous()

    @staticmethod
    def _fold_grad(g2: torch.Tensor, ops: dict, margin: float, g_det_value: float
                   ) -> torch.Tensor:
        """Gradient of μ·mean(relu(margin − det J)) with respect to a grid (B, 2, H, W) in
        normalised units: the forward-difference Jacobian in pixels (as losses.jacobian_det)
        is one fixed 2×2 convolution of the grid, and its adjoint carries the gradient back.
        ``g_det_value`` = −μ / (number of det entries)."""
        diff = ops["diff"]
        jx, jy, jyx, jxy = nn.functional.conv2d(g2, diff).unbind(1)
        low = (jx * jy - jyx * jxy) < margin
        if not low.any():                   # most steps: nowhere near folding, no gradient
            return torch.zeros_like(g2)
        gd = low.to(g2.dtype).mul_(g_det_value)
        g_j = torch.stack([jy, jx, jxy, jyx], 1).mul_(ops["sign"]).mul_(gd[:, None])
        return nn.functional.conv_transpose2d(g_j, diff)

    def _split_operators(self, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Cached operators of the warp for one output size (H, W), in (x, y)-split parameter
        order (``perm``: the x-parameters a_x0, a_x1, a_x2, d_1x … d_Kx, then the same for y;
        ``unperm`` undoes it):

        basis (3 + K, HW) with x' − x = p_x·basis and y' − y = p_y·basis (rows: x, y, 1 of
        the affine part, then the K spline basis functions), and basis_t, its transpose;
        base (2, HW), the identity grid's x and y rows; diff and sign, the Jacobian's
        difference kernel (:func:`_jacobian_kernel`) and the signs of d det / d entries.
        """
        key = ("split", size)
        if key not in self._basis:
            h, w = size
            k = self.n_ctrl
            pts = identity_grid(size, dtype=torch.float64, device=self.ctrl.device).reshape(-1, 2)
            basis = torch.cat([pts.T, torch.ones(1, h * w, dtype=torch.float64),
                               self.basis(size, torch.float64).T], 0)
            perm = self._split_perm()
            self._basis[key] = {"basis": basis.float().contiguous(),
                                "basis_t": basis.T.float().contiguous(),
                                "base": pts.T.float().contiguous(),
                                "perm": perm, "unperm": torch.argsort(perm),
                                "diff": _jacobian_kernel(h, w),
                                "sign": torch.tensor([1.0, 1.0, -1.0, -1.0]).view(4, 1, 1)}
        return self._basis[key]

    def _split_perm(self) -> torch.Tensor:
        """(P,) parameter indices in split order: a_x0, a_x1, a_x2, d_1x … d_Kx, then y."""
        idx = torch.arange(self.n_ctrl)
        return torch.cat([torch.tensor([0, 1, 2]), tps.N_AFFINE + 2 * idx,
                          torch.tensor([3, 4, 5]), tps.N_AFFINE + 2 * idx + 1])

    def _smoothness_form(self) -> torch.Tensor:
        """(P, P) Q with control_smoothness(offsets) = pᵀ·Q·p, in the split parameter order of
        :meth:`_split_operators` (cached; the same for every size)."""
        if "smooth" not in self._basis:
            k = self.n_ctrl
            perm = self._split_perm()

            def smooth(v):
                return control_smoothness(tps.split_params(v[None], k)[1])[0]
            quad = torch.autograd.functional.hessian(
                smooth, torch.zeros(tps.N_AFFINE + 2 * k, dtype=torch.float64))
            self._basis["smooth"] = (quad / 2)[perm][:, perm].float().contiguous()
        return self._basis["smooth"]

    def loss(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Training loss for one batch of masks (B, C, S, S) in [0, 1]."""
        params = self(moving, fixed).float()
        grid = self.grid(params, tuple(fixed.shape[-2:]))
        warped = tps.warp_image(moving.float(), grid)
        _, offsets = tps.split_params(params, self.n_ctrl)
        return matcher_loss(warped, fixed.float(), offsets, grid, self.cfg.smooth_weight,
                            self.cfg.fold_weight, self.cfg.fold_margin)
