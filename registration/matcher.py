"""The STN of the paper's Table 2: two stacked masks in, TPS parameters out."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import frozen
from . import refine as _refine
from . import tps
from .coords import identity_grid
from .config import MatcherConfig
from .losses import control_smoothness, matcher_loss


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
        fast = frozen.use_frozen(self)
        return (fast or self._net)(moving, fixed)

    def _net(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its input checks (what :meth:`for_inference` freezes)."""
        x = torch.cat([moving, fixed], dim=1)
        if self.cfg.arch == "flow":
            disp = self.flow(x).float().permute(0, 2, 3, 1).flatten(1)   # (B, 2·S²)
            return disp @ self.flow_proj.T
        return self.head(self.fc(self.pool(self.features(x))))

    def for_inference(self, freeze: bool = True) -> "Matcher":
        """An eval-mode copy in channels-last layout whose forward pass without gradients runs
        a frozen TorchScript trace (:mod:`registration.frozen`; eager if tracing fails;
        ``freeze=False``: later, by :meth:`freeze`). Warping, cascades and refinement are
        unchanged."""
        import copy
        return frozen.finish_inference_copy(copy.deepcopy(self).eval(), freeze=freeze)

    def freeze(self) -> bool:
        """Run the forward pass without gradients as a frozen TorchScript trace from now on
        (:mod:`registration.frozen`; for an eval-mode inference copy). True if frozen."""
        c, s = self.cfg.mask_channels, self.cfg.input_size
        ex = torch.zeros(1, c, s, s).contiguous(memory_format=torch.channels_last)
        return frozen.attach(self, "_net", (ex, ex))

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

    def grid_numpy(self, params, size: tuple[int, int]) -> np.ndarray:
        """:meth:`grid` for one pair's params (P,) as a C-contiguous (H, W, 2) float32 NumPy
        array, by the refinement's compiled product (no autograd; ~10× faster than
        :meth:`grid` for one pair)."""
        ops = self._warp_ops((int(size[0]), int(size[1])))
        perm = self._refine_consts()[0]
        p = np.asarray(params.detach().cpu().numpy() if isinstance(params, torch.Tensor)
                       else params, dtype=np.float32)
        if p.shape != (len(perm),):
            raise ValueError(f"params: expected ({len(perm)},), got {p.shape}")
        out = np.empty((2, ops.basis.shape[1]), np.float32)
        _refine.grid_product(np.ascontiguousarray(p[perm].reshape(2, -1)), ops.basis, ops.base,
                             out)
        return np.ascontiguousarray(out.reshape(2, *ops.size).transpose(1, 2, 0))

    def warp(self, moving: torch.Tensor, params: torch.Tensor,
             size: tuple[int, int] | None = None) -> torch.Tensor:
        """Warp moving (B, C, H, W) onto the fixed frame → (B, C, h, w) (default: same size)."""
        size = size or tuple(moving.shape[-2:])
        return tps.warp_image(moving, self.grid(params.float(), size))

    @torch.no_grad()
    def refine(self, moving: torch.Tensor, fixed: torch.Tensor, params: torch.Tensor | None = None,
               steps: int = 10, lr: float | None = None, interpolate: bool = True
               ) -> torch.Tensor:
        """Test-time refinement: a few Adam steps on the TPS parameters of each pair, from the
        network's prediction, minimising the training loss. Trades milliseconds for Dice.

        moving: (B, C, h, w) masks in [0, 1]; fixed: (B, C, H, W), any size (the loss is judged
        at the fixed mask's pixels); params: (B, P) start (default: predicted);
        lr: Adam's step size (default ``cfg.refine_lr``); interpolate: when the fixed mask has
        more pixels than the S×S input, take the TPS grid on the S×S pixel centres and
        interpolate it bilinearly at the fixed mask's pixels (as ``Pipeline`` pastes a warp into
        the frame; a step costs O(S²·K + H·W) instead of O(H·W·K)); False evaluates the spline
        at every pixel.
        Returns refined params (B, P), detached. Each pair is optimised independently (the loss
        is a sum over the batch). The loop is :func:`registration.refine.refine` (compiled).
        """
        p0 = self.predict(moving, fixed) if params is None else params.float()
        if steps <= 0:
            return p0
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.ndim != 4 or t.shape[:2] != (len(p0), self.cfg.mask_channels):
                raise ValueError(f"{name}: expected (B={len(p0)}, {self.cfg.mask_channels}, H, W), "
                                 f"got {tuple(t.shape)}")
        size = (int(fixed.shape[-2]), int(fixed.shape[-1]))
        sup = max(1, int(self.cfg.fold_supersample))
        perm, unperm, quad = self._refine_consts()
        s = self.cfg.input_size
        ops = self._warp_ops(size, interpolate and size[0] * size[1] > s * s)
        p = _refine.refine(
            moving.detach().float().cpu().numpy(), fixed.detach().float().cpu().numpy(),
            p0.detach().cpu().numpy()[:, perm], ops, quad, int(steps),
            self.cfg.refine_lr if lr is None else float(lr), self.cfg.smooth_weight,
            self.cfg.fold_weight, self.cfg.fold_margin,
            self._warp_ops((sup * size[0], sup * size[1])) if sup > 1 else None)
        return torch.from_numpy(p[:, unperm]).to(p0.device)

    def _refine_consts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split order and its inverse as NumPy indices, and the smoothness form Q (cached)."""
        if "refine" not in self._basis:
            perm = self._split_perm()
            self._basis["refine"] = (perm.numpy(), torch.argsort(perm).numpy(),
                                     self._smoothness_form().numpy())
        return self._basis["refine"]

    def _warp_ops(self, size: tuple[int, int], from_crop: bool = False) -> _refine.WarpOps:
        """:meth:`_split_operators` as NumPy arrays, for :mod:`registration.refine` (cached);
        from_crop: the grid on the S×S input's pixel centres, interpolated at ``size``."""
        key = ("numpy", size, from_crop)
        if key not in self._basis:
            s = self.cfg.input_size
            ops = self._split_operators((s, s) if from_crop else size)
            self._basis[key] = _refine.WarpOps(ops["basis"].cpu().numpy(),
                                               ops["base"].cpu().numpy(), size,
                                               (s, s) if from_crop else None)
        return self._basis[key]

    def _split_operators(self, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Cached operators of the warp for one output size (H, W), in (x, y)-split parameter
        order (``perm``: the x-parameters a_x0, a_x1, a_x2, d_1x … d_Kx, then the same for y):

        basis (3 + K, HW) with x' − x = p_x·basis and y' − y = p_y·basis (rows: x, y, 1 of
        the affine part, then the K spline basis functions);
        base (2, HW), the identity grid's x and y rows.
        """
        key = ("split", size)
        if key not in self._basis:
            h, w = size
            pts = identity_grid(size, dtype=torch.float64, device=self.ctrl.device).reshape(-1, 2)
            basis = torch.cat([pts.T, torch.ones(1, h * w, dtype=torch.float64),
                               self.basis(size, torch.float64).T], 0)
            perm = self._split_perm()
            self._basis[key] = {"basis": basis.float().contiguous(),
                                "base": pts.T.float().contiguous(),
                                "perm": perm}
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
