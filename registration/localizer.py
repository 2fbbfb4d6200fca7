"""Query-conditioned SSD (paper Table 1): where, in the fixed image, is the moving image's object?

Class-agnostic: each anchor gets one objectness logit and four box offsets. Two ways to tell the
network what to look for (``LocalizerConfig.conditioning``):

* ``"stack"`` (the paper's): the moving image, resized to the fixed image's size, is a second
  input channel;
* ``"film"``: a small query encoder turns the moving image into a vector that scales and shifts
  (FiLM) the fixed image's features at a few layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import anchors as anc
from . import frozen
from .config import LocalizerConfig


def conv_bn_elu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ELU(inplace=True))


class QueryEncoder(nn.Module):
    """(B, 1, q, q) query image → (B, D) embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(conv_bn_elu(1, 32, 3), nn.MaxPool2d(2), conv_bn_elu(32, 64, 3),
                                 nn.MaxPool2d(2), conv_bn_elu(64, dim, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q)


class Localizer(nn.Module):
    """fixed (B, 1, S, S) and moving (B, 1, q, q) in [0, 1] → per-anchor logits (B, N) and
    offsets (B, N, 4); ``anchors`` (N, 4) is a buffer, xyxy pixels of the fixed image."""

    def __init__(self, cfg: LocalizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LocalizerConfig()
        if cfg.conditioning not in ("film", "stack"):
            raise ValueError(f"conditioning: expected 'film' or 'stack', got {cfg.conditioning!r}")
        if cfg.stem not in ("conv", "unshuffle"):
            raise ValueError(f"stem: expected 'conv' or 'unshuffle', got {cfg.stem!r}")
        if cfg.stem == "unshuffle" and cfg.image_size % 2:
            raise ValueError(f"image_size: expected an even size for stem 'unshuffle', got "
                             f"{cfg.image_size}")
        c_in = 2 if cfg.conditioning == "stack" else 1
        if cfg.stem == "unshuffle":
            c_in *= 4
        self.blocks = nn.ModuleList()
        for i, c in enumerate(cfg.channels):
            self.blocks.append(conv_bn_elu(c_in, c, 5 if i == 0 and cfg.stem == "conv" else 3))
            c_in = c
        n_a = anc.anchors_per_location(cfg.aspect_ratios)
        self.heads = nn.ModuleList(nn.Conv2d(cfg.channels[i], n_a * 5, 3, padding=1)
                                   for i in cfg.head_layers)
        if cfg.conditioning == "film":
            self.query = QueryEncoder(cfg.query_dim)
            self.film = nn.ModuleDict()
            for i in cfg.film_layers:
                lin = nn.Linear(cfg.query_dim, 2 * cfg.channels[i])
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
                self.film[str(i)] = lin
        self._anchors: torch.Tensor | None = None

    @property
    def anchors(self) -> torch.Tensor:
        """(N, 4) anchors, xyxy pixels of the fixed image; made on first use, so building a
        model does not import torchvision (2+ s of the app's cold start)."""
        if self._anchors is None:
            cfg = self.cfg
            self._anchors = anc.generate_anchors(
                self.feature_sizes(), cfg.image_size, list(cfg.scales),
                list(cfg.aspect_ratios)).to(next(self.parameters()).device)
        return self._anchors

    def feature_sizes(self) -> list[int]:
        s, sizes = self.cfg.image_size, []
        if self.cfg.stem == "unshuffle":
            s //= 2
        for i in range(len(self.cfg.channels)):
            if i > 0:
                s //= 2
            if i in self.cfg.head_layers:
                sizes.append(s)
        return sizes

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor):
        cfg = self.cfg
        for name, t, s in (("fixed", fixed, cfg.image_size), ("moving", moving, cfg.query_size)):
            if t.ndim != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != (s, s):
                raise ValueError(f"{name}: expected (B, 1, {s}, {s}), got {tuple(t.shape)}")
        fast = frozen.use_frozen(self)
        return (fast or self._net)(fixed, moving)

    def _net(self, fixed: torch.Tensor, moving: torch.Tensor):
        """:meth:`forward` without its input checks (what :meth:`for_inference` freezes)."""
        cfg = self.cfg
        if cfg.conditioning == "stack":
            q = F.interpolate(moving, size=fixed.shape[-2:], mode="bilinear", align_corners=False)
            x, emb = torch.cat([fixed, q], dim=1), None
        else:
            x, emb = fixed, self.query(moving)
        if cfg.stem == "unshuffle":
            x = F.pixel_unshuffle(x, 2)
        outs = []
        last = len(self.blocks) - 1
        pooled = True
        for i, block in enumerate(self.blocks):
            if not pooled:
                x = F.max_pool2d(x, 2)
            conv, bn, act = block
            x = bn(conv(x))
            # ELU is monotonic, so pooling before it gives the same result on 4× fewer values;
            # only where nothing (FiLM, a head) needs the unpooled activations
            pooled = i < last and i not in cfg.head_layers and (emb is None
                                                                 or str(i) not in self.film)
            if pooled:
                x = F.max_pool2d(x, 2)
            x = act(x)
            if emb is not None and str(i) in self.film:
                gamma, beta = self.film[str(i)](emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
                x = x * (1 + gamma) + beta
            if i in cfg.head_layers:
                outs.append(x)
        preds = []
        for feat, head in zip(outs, self.heads):
            p = head(feat).permute(0, 2, 3, 1)
            preds.append(p.reshape(p.shape[0], -1, 5))
        p = torch.cat(preds, dim=1)
        return p[..., 0], p[..., 1:]

    def for_inference(self, freeze: bool = True) -> "Localizer":
        """An eval-mode copy with every BatchNorm folded into its convolution (same outputs up
        to float rounding, fewer passes over the 112×112 feature maps) in channels-last layout,
        whose forward pass without gradients runs a frozen TorchScript trace
        (:mod:`registration.frozen`; eager if tracing fails; ``freeze=False``: later, by
        :meth:`freeze`)."""
        import copy
        m = copy.deepcopy(self).eval()
        seqs = [*m.blocks, *(b for b in (m.query.net if hasattr(m, "query") else [])
                             if isinstance(b, nn.Sequential))]
        return frozen.finish_inference_copy(m, seqs, (0,), freeze)

    def freeze(self) -> bool:
        """Run the forward pass without gradients as a frozen TorchScript trace from now on
        (:mod:`registration.frozen`; for an eval-mode inference copy). True if frozen."""
        cfg = self.cfg
        return frozen.attach(self, "_net", (
            torch.zeros(1, 1, cfg.image_size, cfg.image_size).contiguous(
                memory_format=torch.channels_last),
            torch.zeros(1, 1, cfg.query_size, cfg.query_size)))

    @torch.no_grad()
    def predict(self, fixed: torch.Tensor, moving: torch.Tensor):
        """Top box per image: boxes (B, 4) xyxy pixels clipped to the image, scores (B,)."""
        logits, offsets = self(fixed, moving)
        best = logits.argmax(dim=1)
        idx = torch.arange(len(best), device=best.device)
        # one box per image: decoded in NumPy (float64), not in a dozen tiny torch operations
        boxes = anc.decode(offsets[idx, best].double().cpu().numpy(),
                           self.anchors[best].double().cpu().numpy(), self.cfg.box_weights)
        s = float(self.cfg.image_size)
        boxes = torch.from_numpy(boxes.clip(0, s)).to(device=offsets.device, dtype=torch.float32)
        return boxes, torch.sigmoid(logits[idx, best].float())

    @torch.no_grad()
    def candidates(self, fixed: torch.Tensor, moving: torch.Tensor, k: int = 5,
                   iou_threshold: float = 0.3, pre_nms: int = 100):
        """Up to k boxes per image after non-maximum suppression, best first: a list of
        (boxes (k_i, 4) xyxy pixels clipped to the image, scores (k_i,)) per image."""
        from torchvision.ops import nms
        logits, offsets = self(fixed, moving)
        s = float(self.cfg.image_size)
        out = []
        for b in range(len(logits)):
            top = logits[b].float().topk(min(pre_nms, logits.shape[1])).indices
            boxes = anc.decode(offsets[b, top].float(), self.anchors[top],
                               self.cfg.box_weights).clamp(0, s)
            scores = torch.sigmoid(logits[b, top].float())
            keep = nms(boxes, scores, iou_threshold)[:k]
            out.append((boxes[keep], scores[keep]))
        return out

    def loss(self, fixed: torch.Tensor, moving: torch.Tensor, gt_boxes: torch.Tensor,
             valid: torch.Tensor | None = None):
        """SSD loss for one target box per image: gt_boxes (B, 4) xyxy; valid (B,) bool marks
        images that contain the target (default all)."""
        logits, offsets = self(fixed, moving)
        return ssd_loss(logits.float(), offsets.float(), self.anchors, gt_boxes, valid,
                        self.cfg.pos_iou, self.cfg.neg_ratio, self.cfg.box_weights)


def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor,
                  pos_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives per image: IoU ≥ pos_iou, plus each target's best anchor.

    anchors (N, 4), gt_boxes (B, 4), valid (B,) → positive mask (B, N), IoU (B, N).
    """
    from torchvision.ops import box_iou   # lazy: see anchors.box_convert
    iou = box_iou(gt_boxes, anchors)                       # (B, N)
    pos = iou >= pos_iou
    pos[torch.arange(len(iou)), iou.argmax(dim=1)] = True
    pos &= valid.unsqueeze(1)
    iou = iou * valid.unsqueeze(1)
    return pos, iou


def ssd_loss(logits: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor,
             gt_boxes: torch.Tensor, valid: torch.Tensor | None = None, pos_iou: float = 0.5,
             neg_ratio: int = 3, weights=(10.0, 10.0, 5.0, 5.0)):
    """Objectness BCE with hard-negative mining (neg_ratio : 1) + smooth-L1 box offsets.

    logits (B, N), offsets (B, N, 4), anchors (N, 4), gt_boxes (B, 4). Normalised by the number
    of positives (at least 1), so a batch without any target gives a finite loss, box term 0.
    """
    b, n = logits.shape
    if gt_boxes.shape != (b, 4):
        raise ValueError(f"gt_boxes: expected ({b}, 4), got {tuple(gt_boxes.shape)}")
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=logits.device)
    pos, iou = match_anchors(anchors, gt_boxes, valid, pos_iou)
    n_pos = pos.sum(dim=1)                                              # (B,)
    bce = F.binary_cross_entropy_with_logits(logits, pos.float(), reduction="none")
    # hard negatives: the highest-loss anchors that are clearly background
    neg_loss = bce.masked_fill(pos | (iou >= pos_iou - 0.1), 0.0)
    k = (neg_ratio * n_pos.clamp_min(1)).clamp(max=n - 1)
    ranked = neg_loss.sort(dim=1, descending=True).values
    keep = torch.arange(n, device=logits.device).unsqueeze(0) < k.unsqueeze(1)
    cls = (bce * pos).sum() + (ranked * keep).sum()
    denom = n_pos.sum().clamp_min(1).float()
    if pos.any():
        bi, ai = pos.nonzero(as_tuple=True)
        target = anc.encode(gt_boxes[bi], anchors[ai], weights)
        box = F.smooth_l1_loss(offsets[bi, ai], target, reduction="sum")
    else:
        box = offsets.sum() * 0.0
    loss = (cls + box) / denom
    return loss, {"cls": float(cls.detach() / denom), "box": float(box.detach() / denom)}
