"""A small U-Net that segments the object in an object-centric crop, and its training data.

A threshold finds silhouettes on black (MNIST), not on brick, grass or gravel
(``registration.data.silhouettes``), so those crops get a learned segmenter: three levels of
two 3×3 conv + BatchNorm + ReLU blocks (16-32-64 channels), bilinear upsampling with skip
connections, and a 1×1 head giving one logit per pixel (~118k parameters). Input: a grey crop
(B, 1, S, S) in [0, 1], S divisible by 4; output: logits (B, 1, S, S); the mask is logit > 0.

Training crops follow the pipeline's crops: a square of side ``margin`` × the box's longest
side around the object's box (jittered in training), resampled to S × S, zeros outside the
image (``registration.pipeline``'s ``square_around`` and ``crop``), with the crop of the true
mask as target. The loss is soft Dice + BCE.

Pure functions plus one thin ``nn.Module``; built from ``config.SegNetConfig`` and shipped as
``checkpoints/<dataset>/segmenter`` by ``python -m registration.train segmenter``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import frozen
from .config import SegNetConfig
from .pipeline import crop as crop_image
from .pipeline import square_around


# ---------------------------------------------------------------------------------------------
# network

def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def check_input(x: torch.Tensor, levels: int, name: str = "x") -> None:
    """Raise ValueError unless ``x`` is (B, 1, H, W) floating with H, W divisible by
    2**(levels − 1)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (B, 1, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (B, 1, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {x.dtype}")
    k = 2 ** (levels - 1)
    if x.shape[2] % k or x.shape[3] % k or x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"{name}: expected H and W positive multiples of {k}, got "
                         f"{x.shape[2]}×{x.shape[3]}")


class SegNet(nn.Module):
    """U-Net: (B, 1, S, S) grey crop in [0, 1] → (B, 1, S, S) logits."""

    def __init__(self, cfg: SegNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or SegNetConfig()
        ch = tuple(self.cfg.channels)
        if len(ch) < 2 or any(c < 1 for c in ch):
            raise ValueError(f"channels: expected ≥ 2 positive widths, got {ch}")
        self.down = nn.ModuleList([_block(1, ch[0])] + [_block(ch[i - 1], ch[i])
                                                        for i in range(1, len(ch))])
        self.up = nn.ModuleList([_block(ch[i + 1] + ch[i], ch[i]) for i in range(len(ch) - 1)])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, len(self.down))
        fast = frozen.use_frozen(self)
        return (fast or self._net)(x)

    def for_inference(self, freeze: bool = True) -> "SegNet":
        """An eval-mode copy with every BatchNorm folded into its convolution, in channels-last
        layout, whose forward pass without gradients runs a frozen TorchScript trace
        (:mod:`registration.frozen`, checked at the crop size and at twice it; eager if
        tracing fails; ``freeze=False``: later, by :meth:`freeze`)."""
        import copy
        m = copy.deepcopy(self).eval()
        return frozen.finish_inference_copy(m, [*m.down, *m.up], (0, 3), freeze)

    def freeze(self) -> bool:
        """Run the forward pass without gradients as a frozen TorchScript trace from now on
        (:mod:`registration.frozen`; for an eval-mode inference copy). True if frozen."""
        s = self.cfg.input_size
        ex = lambda k: (torch.rand(1, 1, k, k).contiguous(memory_format=torch.channels_last),)
        return frozen.attach(self, "_net", ex(s), also=(ex(2 * s),))

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its input check (what :meth:`for_inference` freezes)."""
        # centre the input so the first BatchNorm sees roughly zero-mean data in eval too
        h = x - 0.5
        skips = []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[i](torch.cat([h, skips[i]], 1))
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_mask(model: SegNet, crop: np.ndarray) -> np.ndarray:
    """Mask of one grey crop: (S, S) uint8 or float in [0, 1] → (S, S) bool (logit > 0).

    S must be a multiple of 2**(levels − 1); the model runs in eval mode on its own device.
    """
    img = to_float(crop, "crop")
    if img.ndim != 2:
        raise ValueError(f"crop: expected (S, S), got shape {img.shape}")
    p = next(model.parameters())
    x = torch.from_numpy(img).to(device=p.device, dtype=p.dtype)[None, None]
    was_training = model.training
    model.eval()
    try:
        return (model(x)[0, 0] > 0).cpu().numpy()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# loss

def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      bce_weight: float = 1.0, eps: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """dice_weight · (1 − soft Dice) + bce_weight · BCE, batch mean.

    logits (B, 1, H, W); target (B, 1, H, W) in [0, 1] (bool allowed). Soft Dice per item on
    sigmoid(logits), with ``eps`` added to numerator and denominator so an empty target and
    an empty prediction score 1, not 0/0. Returns (loss, {"dice", "bce"} floats).
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits: expected (B, 1, H, W), got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target: expected shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    dice = (2 * inter + eps) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + eps)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
    loss = (dice_weight * (1 - dice) + bce_weight * bce).mean()
    return loss, {"dice": float(dice.detach().mean()), "bce": float(bce.detach().mean())}


# ---------------------------------------------------------------------------------------------
# crops (the same geometry as registration.pipeline: pixel i spans [i, i + 1), boxes xyxy)

def to_float(image: np.ndarray, name: str = "image") -> np.ndarray:
    """uint8 (÷255) or float image → float32 in [0, 1]."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {a.dtype}")
    return np.clip(a.astype(np.float32), 0, 1)


def jitter_square(box: Sequence[float], margin: float, rng: np.random.Generator,
                  shift: float = 0.1, scale: float = 0.15) -> tuple[float, float, float, float]:
    """``square_around(box, margin)`` moved by up to ±shift of its side in x and y and
    resized by a factor in [1 − scale, 1 + scale]: the detector's boxes are not exact."""
    x0, y0, x1, y1 = square_around(box, margin)
    side = (x1 - x0) * rng.uniform(1 - scale, 1 + scale)
    cx = (x0 + x1) / 2 + rng.uniform(-shift, shift) * (x1 - x0)
    cy = (y0 + y1) / 2 + rng.uniform(-shift, shift) * (y1 - y0)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def object_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[float], size: int = 64,
                margin: float = 1.4, rng: np.random.Generator | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """One training pair: (size, size) float32 crop of ``image`` (H, W) in [0, 1] and the
    (size, size) bool crop of ``mask`` (H, W), around ``box`` (xyxy) with ``margin``;
    jittered by ``rng`` if given, exact otherwise."""
    img = to_float(image)
    m = np.asarray(mask)
    if img.ndim != 2 or m.shape != img.shape:
        raise ValueError(f"image, mask: expected equal (H, W) shapes, got {img.shape} and "
                         f"{m.shape}")
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"box: expected xyxy with x1 > x0 and y1 > y0, got {list(box)}")
    sq = jitter_square(box, margin, rng) if rng is not None else square_around(box, margin)
    return crop_image(img, sq, size), crop_image(m.astype(np.float32), sq, size) > 0.5


def scene_crops(scenes: Sequence, size: int = 64, margin: float = 1.4,
                rng: np.random.Generator | None = None, include_moving: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """Training crops from silhouette scenes (``registration.data.silhouettes.Scene``).

    Each scene gives its fixed crop around the target box and, if ``include_moving``, its
    moving crop around the moving animal's box (both images meet the segmenter in the
    pipeline). Returns images (N, 1, size, size) float32 in [0, 1] and masks
    (N, 1, size, size) float32 in {0, 1}, N = len(scenes) × (2 if include_moving else 1).
    """
    imgs, msks = [], []
    for s in scenes:
        pairs = [(s.fixed, s.target_mask, s.box)]
        if include_moving:
            pairs.append((s.moving, s.moving_mask, s.moving_box))
        for image, mask, box in pairs:
            c, m = object_crop(image, mask, box, size, margin, rng)
            imgs.append(c)
            msks.append(m)
    if not imgs:
        raise ValueError("scenes: expected at least one scene, got none")
    return (np.stack(imgs)[:, None].astype(np.float32),
            np.stack(msks)[:, None].astype(np.float32))
