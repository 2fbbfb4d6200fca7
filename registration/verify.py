"""Which of the SSD's candidate boxes shows the moving image's object? A learned verifier.

On the silhouettes the query-conditioned SSD puts the target among its top 5 boxes in 92 % of
held-out scenes but first in only 42 %: it finds animals, and it is unsure which one is the
query's kind. Re-ranking its candidates by the overlap of the two object-centric masks barely
helps (animals of different kinds overlap as much as two of one kind). This module learns the
comparison instead: two object-centric masks (the moving object and the object segmented in
one candidate box, S×S, as the pipeline crops them for the matcher) → one logit, "the same
kind of object".

Two designs (``VerifierConfig.classes``): one network sees both masks stacked as channels and
gives one logit; or (shipped for the silhouettes) one network classifies each object into the
data set's kinds and "same" is the chance both are one kind. The kinds can be read from the
mask alone (trained on the labelled rows drawn as the pipeline sees them), or with
``VerifierConfig.grey`` (shipped) from the mask and the grey detail inside it
(:func:`object_detail`, a second channel; trained on objects cut out of rendered scenes).
Either way: levels of two 3×3 conv + ReLU and a 2×2 max-pool (default 16-32-64 channels; the
shipped silhouettes verifier 32-64-128, with BatchNorm and global pooling), then the logits.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VerifierConfig
from .metrics import box_iou

POSITIVE_IOU = 0.5    # a candidate whose snapped box overlaps the target's this much is it
NEGATIVE_IOU = 0.2    # … and one below this is not; those in between are left out of training


class Verifier(nn.Module):
    """moving, candidate: (B, 1, S, S) masks in [0, 1] → (B,) logits, "the same object".

    ``cfg.classes == 0``: the two masks stacked as channels, one logit. ``cfg.classes = n``:
    each mask classified into n kinds by one network (:meth:`classify`), and the logit of
    Σ_k p_moving(k) · p_candidate(k), the chance that both are of one kind."""

    def __init__(self, cfg: VerifierConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VerifierConfig()
        if cfg.arch not in ("plain", "bn"):
            raise ValueError(f"arch: expected 'plain' or 'bn', got {cfg.arch!r}")
        if cfg.grey and not cfg.classes:
            raise ValueError("grey: only a kind-classifying verifier (classes > 0) sees grey detail")
        bn = cfg.arch == "bn"
        layers: list[nn.Module] = []
        c_in = 2 if (cfg.grey or not cfg.classes) else 1
        for c in cfg.channels:
            for a, b in ((c_in, c), (c, c)):
                layers += [nn.Conv2d(a, b, 3, padding=1, bias=not bn)]
                layers += [nn.BatchNorm2d(b)] if bn else []
                layers += [nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        if bn:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Dropout(cfg.dropout), nn.Linear(c_in, cfg.classes or 1))
        else:
            side = cfg.input_size // 2 ** len(cfg.channels)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, cfg.hidden),
                                      nn.ReLU(inplace=True),
                                      nn.Linear(cfg.hidden, cfg.classes or 1))

    def _check(self, name: str, t: torch.Tensor) -> None:
        s, c = self.cfg.input_size, 2 if self.cfg.grey else 1
        if t.ndim != 4 or t.shape[1] != c or tuple(t.shape[-2:]) != (s, s):
            raise ValueError(f"{name}: expected (B, {c}, {s}, {s}), got {tuple(t.shape)}")

    def classify(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) masks, or with ``cfg.grey`` (B, 2, S, S) masks and their
        :func:`object_detail` → (B, n) class logits (``cfg.classes = n`` only)."""
        if not self.cfg.classes:
            raise ValueError("classify: this verifier compares pairs (cfg.classes = 0)")
        self._check("masks", masks)
        centred = torch.cat([masks[:, :1] - 0.5, masks[:, 1:]], 1)
        return self.head(self.features(centred))

    def forward(self, moving: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """moving, candidate: (B, C, S, S), C = 2 with ``cfg.grey`` (mask, detail), else 1."""
        self._check("moving", moving)
        self._check("candidate", candidate)
        if self.cfg.classes:
            p = self.kinds(torch.cat([moving, candidate]))
            same = self.same_kind(p[:len(moving)], p[len(moving):])
            return torch.log(same) - torch.log1p(-same)
        return self.head(self.features(torch.cat([moving, candidate], 1) - 0.5))[:, 0]

    @staticmethod
    def same_kind(p_moving: torch.Tensor, p_candidate: torch.Tensor) -> torch.Tensor:
        """Kind probabilities (B, n) of both → (B,) the probability they are the same kind,
        clamped to [1e-6, 1 − 1e-6]."""
        return (p_moving * p_candidate).sum(1).clamp(1e-6, 1 - 1e-6)

    def kinds(self, masks: torch.Tensor) -> torch.Tensor:
        """Inputs as :meth:`classify` → (B, n) kind probabilities; with ``arch = "bn"``
        averaged with the mirror image's (a kind does not depend on the facing)."""
        p = torch.softmax(self.classify(masks), 1)
        if self.cfg.arch == "bn":
            p = (p + torch.softmax(self.classify(masks.flip(-1)), 1)) / 2
        return p


DETAIL_CLIP = 4.0     # object_detail's bound, in standard deviations


def object_detail(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The grey detail inside an object: (H, W) float image and bool mask → (H, W) float32,
    the image standardised over the mask's interior (the mask eroded by one pixel, so the
    outline's blend with the background is left out; the whole mask if nothing is left) by
    its median and standard deviation, clipped to ±DETAIL_CLIP, and 0 outside it. Invariant
    to the object's brightness and contrast: only the pattern inside (stripes, patches) stays."""
    if gray.shape != mask.shape:
        raise ValueError(f"object_detail: gray {gray.shape} and mask {mask.shape} differ")
    core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0) > 0
    if core.sum() < 4:
        core = mask.astype(bool)
    out = np.zeros(gray.shape, np.float32)
    if core.sum() < 2:
        return out
    v = gray[core].astype(np.float32)
    out[core] = np.clip((v - np.median(v)) / (v.std() + 1e-2), -DETAIL_CLIP, DETAIL_CLIP)
    return out


def _prepared_chunks(pipe, scenes, batch: int, given_masks: bool = False):
    """Scenes in chunks of ``batch``, each as (index of its first scene, the scenes whose
    moving object the pipeline finds, their ``Pipeline._prepare`` records); the others are
    skipped, and chunks left empty too. ``given_masks``: the pipeline is given each scene's
    true moving mask and true fixed foreground (all its animals), as in evaluation with
    true masks."""
    from .pipeline import RegistrationError
    for start in range(0, len(scenes), batch):
        chunk, prep = [], []
        for s in scenes[start:start + batch]:
            masks_ = ([s.moving_mask], [s.all_mask]) if given_masks else ([None], [None])
            try:
                prep += pipe._prepare([(s.moving, s.fixed)], *masks_)
                chunk.append(s)
            except RegistrationError:
                continue
        if chunk:
            yield start, chunk, prep


def mask_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice of masks (B, …) bool, per item (B,) float (0 where both are empty): the score the
    re-ranking uses without a verifier."""
    dims = tuple(range(1, a.ndim))
    inter = (a & b).sum(dims).float()
    return 2 * inter / (a.sum(dims) + b.sum(dims)).float().clamp_min(1)


@torch.no_grad()
def candidate_samples(pipe, scenes, k: int = 8, batch: int = 32, grey: bool = False):
    """The pipeline's re-ranking inputs on scenes with known target boxes: moving and
    candidate object-centric masks (N, S, S) bool (with ``grey``: the verifier's two-channel
    inputs (N, 2, S, S) float32, mask and :func:`object_detail`), labels (N,) float (1: the
    candidate is the target, by IoU of its snapped box with the target's box; ambiguous
    overlaps left out) and the scene index of each (N,)."""
    movs, cands, labels, owner = [], [], [], []
    for start, chunk, prep in _prepared_chunks(pipe, scenes, batch):
        f_t, q_t, lb = pipe._ssd_inputs(prep)
        found = pipe.localizer.candidates(f_t, q_t, k)
        mov, fix, own, _, _, snapped, _ = pipe._candidate_crops(prep, found, lb)
        if grey and len(mov):
            mov, fix = pipe._verifier_inputs(prep, mov, fix, own, snapped, grey=True)
        for m, f, i, box in zip(mov, fix, own, snapped):
            sc = prep[i]["scale"]
            iou = box_iou([v / sc for v in box], chunk[i].box.tolist())
            if NEGATIVE_IOU <= iou < POSITIVE_IOU:
                continue
            movs.append(m)
            cands.append(f)
            labels.append(float(iou >= POSITIVE_IOU))
            owner.append(start + int(i))
    s = pipe.size
    if not movs:
        e = np.zeros((0, 2, s, s), np.float32) if grey else np.zeros((0, s, s), bool)
        return e, e, np.zeros(0, np.float32), np.zeros(0, int)
    return (np.stack(movs), np.stack(cands), np.array(labels, np.float32), np.array(owner))


def shape_samples(masks: np.ndarray, n: int, size: int, margin: float,
                  rng: np.random.Generator, longest=(25.0, 58.0), aspect: float = 0.0
                  ) -> np.ndarray:
    """n object-centric masks (n, size, size) bool made from random rows of ``masks`` (N, h, w)
    as the pipeline would see them: the silhouette scaled so its longest side is ``longest``
    px (the scenes' range), cut to the square of ``margin`` × its box, resampled to size², and
    roughened like a segmentation (random 1-px dilation or erosion, a bite out of the outline,
    a speck beside it, a mirror). ``aspect`` > 0 also stretches one axis against the other
    by a factor up to e^±aspect. Returns the masks and the rows drawn (n,)."""
    import cv2

    from .pipeline import crop_mask, mask_box, square_around
    rows = rng.integers(len(masks), size=n)
    out = np.zeros((n, size, size), bool)
    k3 = np.ones((3, 3), np.uint8)
    for j, r in enumerate(rows):
        m = masks[r].astype(np.float32)
        box = mask_box(m > 0.5)
        if box is None:
            continue
        f = rng.uniform(*longest) / max(box[2] - box[0], box[3] - box[1])
        h, w = m.shape
        fx = fy = f
        if aspect > 0:
            a = np.exp(rng.uniform(-aspect, aspect))
            fx, fy = f * np.sqrt(a), f / np.sqrt(a)
        big = cv2.resize(m, (max(1, round(w * fx)), max(1, round(h * fy))),
                         interpolation=cv2.INTER_LINEAR) > 0.5
        u = rng.random(4)
        if u[0] < 0.25:
            big = cv2.dilate(big.astype(np.uint8), k3) > 0
        elif u[0] < 0.5:
            big = cv2.erode(big.astype(np.uint8), k3) > 0
        ys, xs = np.nonzero(big)
        if len(xs) == 0:
            continue
        if u[1] < 0.3:                       # a bite out of the object
            i = rng.integers(len(xs))
            cv2.circle(big.view(np.uint8), (int(xs[i]), int(ys[i])), int(rng.integers(2, 6)), 0, -1)
        if u[2] < 0.3:                       # a speck of background beside it
            i = rng.integers(len(xs))
            cv2.circle(big.view(np.uint8), (int(xs[i] + rng.integers(-6, 7)),
                                            int(ys[i] + rng.integers(-6, 7))),
                       int(rng.integers(1, 4)), 1, -1)
        b = mask_box(big)
        if b is None:
            continue
        c = crop_mask(big, square_around(b, margin), size)
        out[j] = c[:, ::-1] if u[3] < 0.5 else c
    return out, rows


@torch.no_grad()
def labelled_scene_masks(pipe, scenes, batch: int = 32, grey: bool = False,
                         given_masks: bool = False):
    """Object-centric masks (N, S, S) bool of the moving object and of the target as the
    pipeline segments them (the target's region cut around its true box), with each scene's
    kind label (N,): the verifier's inputs with the segmenter's own errors. ``grey``: the
    two-channel inputs (N, 2, S, S) float32 instead; ``given_masks``: cut from the scenes'
    true masks instead of segmented."""
    masks, labels = [], []
    for _, chunk, prep in _prepared_chunks(pipe, scenes, batch, given_masks):
        _, _, lb = pipe._ssd_inputs(prep)
        truth = [(torch.from_numpy(s.box[None] * k).float(), torch.ones(1))
                 for s, k in zip(chunk, lb)]
        mov, fix, own, _, _, snapped, _ = pipe._candidate_crops(prep, truth, lb)
        if grey and len(mov):
            mov, fix = pipe._verifier_inputs(prep, mov, fix, own, snapped, grey=True)
        for m, f, i in zip(mov, fix, own):
            masks += [m, f]
            labels += [chunk[i].label] * 2
    s = pipe.size
    if not masks:
        shape = (0, 2, s, s) if grey else (0, s, s)
        return np.zeros(shape, np.float32 if grey else bool), np.zeros(0, np.int64)
    return np.stack(masks), np.array(labels, np.int64)


def verifier_loss(model: Verifier, moving: torch.Tensor, candidate: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy, positives weighted to balance the classes in the batch."""
    logits = model(moving, candidate)
    pos = labels.mean().clamp(0.05, 0.95)
    weight = torch.where(labels > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weight)
