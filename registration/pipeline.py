"""The public API: localize → crop → segment → match → paste back.

    from registration import Pipeline
    pipe = Pipeline.from_pretrained("mnist")
    r = pipe.register(moving, fixed)            # numpy images, H×W or H×W×3, uint8 or [0, 1]
    r.box, r.score, r.warped_mask_full, r.timings
    pipe.register(moving, fixed, localize=False)   # the full-frame matcher, for comparison
    pipe.match(moving_mask, fixed_mask)            # matcher alone on object-centric masks
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from . import checkpoint, frozen, segment, tps
from . import ranker as ranker_mod
from .choose import SAME_OBJECT_IOU, choice_features
from .config import DatasetConfig
from .coords import norm_to_pixel
from .verify import Verifier, mask_overlap, object_detail

DATASETS: dict[str, DatasetConfig] = {
    "mnist": DatasetConfig(name="mnist", segmenter="otsu", crop_margin=1.4, threshold=0.5),
    # textured scenes, animals lighter or darker than the ground: a learned segmenter; the
    # crop margin is the matcher's training margin (registration.data.silhouettes.CROP_MARGIN);
    # the SSD's top 5 boxes re-ranked by the learned verifier (box Dice on 300 validation
    # scenes: 0.415 by shape overlap, 0.606 by the verifier; with the first, smaller verifier
    # top 3 / 5 / 8 gave 0.579 / 0.591 / 0.587)
    # … plus the foreground's connected components as candidates (test detection Dice with the
    # second verifier: 0.659 → 0.682 learned masks, 0.838 → 0.923 true masks; README)
    # … choosing by the verifier plus 0.2 × the masks' Dice, and a whole object over an SSD
    # box's cut of it (validation box Dice, 3 × 300 scenes with true masks: 0.949 → 0.960;
    # 2 × 300 with learned masks: 0.706 → 0.717)
    # 40 refinement steps, not 5: matching with true masks on 300 validation scenes 0.917 →
    # 0.938 (20: 0.933, 80: 0.939), +8 ms a pair
    # … and with segmented masks a learned chooser instead of the hand-set choice (test
    # detection with learned masks 0.747 → 0.765; README)
    # … and on the whole moving image and the whole fixed frame, the segmenter's logits
    # averaged with its mirror image's (validation box Dice with learned masks, 2 × 300
    # scenes: 0.811 → 0.824, 0.849 → 0.866, scripts/silhouettes_validation.py; mirroring the
    # candidates' crops too, in a scratch trial: 0.833, 0.858, at three times the cost)
    "silhouettes": DatasetConfig(name="silhouettes", segmenter="learned", bright_objects=False,
                                 crop_margin=1.3, threshold=None, min_object_px=8, rerank=5,
                                 verifier=True, component_candidates=True,
                                 split_components=True, shape_weight=0.2, prefer_whole=True,
                                 chooser=True, refine_steps=40, segment_flip=True),
    # CT (fixed) and simulated ultrasound (moving): the tumour is segmented by a U-Net. The
    # SSD's top 4 boxes re-ranked by the geometry ranker (registration.ranker: target first in
    # 88.6 % of 300 validation pairs vs 77.2 % for the SSD's own order; re-ranking by mask
    # shape had lowered the box Dice there, 0.718 → 0.656, and a shape verifier to 0.632)
    # … whose features now include the view from the skin: how well the CT, as a probe aimed
    # at the candidate would see it, matches the ultrasound (ranker.view_similarity; box Dice
    # with true masks on 600 fresh validation pairs: 0.915 with fixed weights on the view,
    # 0.938 learned from 8,000 pairs; README)
    # 20 refinement steps, not 5: matching with true masks on 600 validation pairs 0.934 →
    # 0.937 (40: 0.937), no pair folding (5 steps: 0.7 % of pairs), +1 ms a pair
    # … and the view compares the ultrasound with the CT mapped through a lookup table of the
    # ultrasound grey each CT grey shows (ranker.view_lut_image; same 600 pairs, true masks:
    # box Dice 0.938 → 0.955, matching 0.937 → 0.954; learned masks: 0.847 → 0.873)
    # The chosen object is not clipped to its SSD box (snap_clip None, was 0.15): where the box
    # cut a tumour, its snapped box was too small (same pairs: true masks 0.955 → 0.962, the
    # right tumour's box Dice 0.993 → 1; learned masks 0.873 → 0.874)
    "usct": DatasetConfig(name="usct", segmenter="learned", bright_objects=False,
                          crop_margin=1.4, threshold=None, min_object_px=6, snap_clip=None,
                          query="whole", rerank=4, ranker=True, refine_steps=20),
}

DEFAULT_REFINE_STEPS = 5      # test-time refinement steps: end-to-end Dice 0.82 → 0.87 (README)
RERANK_SCORE_WEIGHT = 0.1    # re-ranking: Dice + this × the SSD score
WHOLE_OBJECT_MARGIN = 0.1     # … and how much less a whole object may value
COMPONENT_MIN_PX = 40         # px; smaller foreground components are not candidates
MAX_REFINE_SIDE = 64          # px; refinement resolution cap (cost grows with its square)
MAX_LABELS = 255              # objects in a fixed instance label image (more: a grey image)
MIN_SIDE = 8                  # px; smaller images cannot hold an object to match
MAX_PIXELS = 40_000_000       # refuse absurd arrays outright
WORK_SIDE = 512               # larger images are downscaled to this longest side to work on


class RegistrationError(ValueError):
    """The input is valid but cannot be registered (e.g. no object found). Message is plain."""


@dataclass
class Result:
    """Everything one registration produced. Crops are at the matcher's resolution (S×S).

    box, ssd_box: xyxy float pixels in the fixed image (``box`` is the SSD box snapped to the
    segmented object; ``ssd_box`` the detector's raw box); None without localization.
    box_source: "ssd" (one of the SSD's boxes) or "component" (a connected component of the
    fixed foreground, or a piece of one that touching objects joined, that the re-ranking
    preferred; its ``score`` is 0); None without localization.
    control_points: (K, 2) pixel coords in the moving crop where the TPS control points sample
    it (the grid *before* warping); control_points_warped: (K, 2) where those points land in the
    fixed crop (the regular grid *after* warping).
    """

    box: tuple | None
    score: float | None
    moving_crop: np.ndarray            # (S, S) float [0, 1]
    fixed_crop: np.ndarray             # (S, S) float [0, 1]
    moving_mask: np.ndarray            # (S, S) bool
    fixed_mask: np.ndarray             # (S, S) bool
    warped_mask: np.ndarray            # (S, S) bool, moving mask warped onto the fixed crop
    warped_image: np.ndarray           # (S, S) float, moving crop warped onto the fixed crop
    control_points: np.ndarray         # (K, 2)
    control_points_warped: np.ndarray  # (K, 2)
    warped_mask_full: np.ndarray | None = None   # (H, W) bool in the fixed image's frame
    fixed_mask_full: np.ndarray | None = None    # (H, W) bool, the fixed object's mask
    ssd_box: tuple | None = None
    crop_box: tuple | None = None      # xyxy of the fixed crop's square in the fixed image
    params: np.ndarray | None = None   # (6 + 2K,) TPS parameters
    localized: bool = True
    timings: dict = field(default_factory=dict)
    box_source: str | None = None

    @property
    def dice(self) -> float:
        """Dice of the warped moving mask against the fixed mask, on the crops."""
        from .metrics import dice
        return dice(self.warped_mask, self.fixed_mask)

    @property
    def iou(self) -> float:
        from .metrics import iou
        return iou(self.warped_mask, self.fixed_mask)


# ---------------------------------------------------------------------------------------------
# input handling

def to_gray(image, name: str = "image") -> np.ndarray:
    """numpy H×W, H×W×1, H×W×3 or H×W×4; uint8, uint16, bool or float in [0, 1] →
    float32 (H, W) in [0, 1]. Raises ValueError saying what was expected and what was got."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        if a.shape[2] == 4:   # transparent pixels become background
            alpha = a[..., 3:4].astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
            a = (a[..., :3].astype(np.float32) * alpha).astype(a.dtype) if a.dtype == np.uint8 \
                else a[..., :3] * alpha
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    elif a.ndim != 2:
        raise ValueError(f"{name}: expected shape (H, W) or (H, W, 3), got {image.shape}")
    h, w = a.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name}: expected at least {MIN_SIDE}×{MIN_SIDE} pixels, got {w}×{h}")
    if h * w > MAX_PIXELS:
        raise ValueError(f"{name}: expected at most {MAX_PIXELS:,} pixels, got {h * w:,}")
    if image.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    elif image.dtype == np.uint16:
        a = a.astype(np.float32) / 65535
    elif image.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(image.dtype, np.floating):
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: expected finite values, got NaN or infinity")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError(f"{name}: expected float values in [0, 1], got "
                             f"[{a.min():.3g}, {a.max():.3g}]")
        a = a.clip(0, 1)
    else:
        raise ValueError(f"{name}: expected uint8, uint16, bool or float dtype, got {image.dtype}")
    return np.ascontiguousarray(a)


def bright_foreground(gray: np.ndarray) -> np.ndarray:
    """Objects are bright on a dark background in all our data; invert an image whose border
    is mostly bright (a dark object on white paper)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 1 - gray if 2 * np.count_nonzero(border > 0.5) > border.size else gray


def _to_work_res(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Downscale so the longest side is at most WORK_SIDE: image, scale (work px per input px)."""
    h, w = gray.shape
    s = min(1.0, WORK_SIDE / max(h, w))
    if s < 1:
        gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                          interpolation=cv2.INTER_AREA)
    return gray, s


def _mask_arg(mask, like: np.ndarray, name: str, labels: bool = False) -> np.ndarray | None:
    """A given mask as (H, W) bool (uint8: > 127, else > 0.5; colour: its brightest channel),
    or with ``labels`` an instance label image (segment.is_label_image) of two or more objects
    as (H, W) int32 (one object, e.g. an int 0/1 mask, is a plain mask: bool)."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if labels and m.ndim == 2 and segment.is_label_image(m):
        if m.shape != like.shape:
            raise ValueError(f"{name}: expected the image's shape {like.shape}, got {m.shape}")
        if m.size and (m.min() < 0 or m.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name}: instance labels must be 0 (background) or positive "
                             f"int32 values, got {m.min()} … {m.max()}")
        n_obj = len(np.unique(m)) - bool((m == 0).any())
        if n_obj > MAX_LABELS:
            raise ValueError(f"{name}: expected an instance label image with at most "
                             f"{MAX_LABELS} objects, got {n_obj} distinct labels (a grey image? "
                             f"pass a bool or uint8 mask instead)")
        return m.astype(np.int32) if n_obj >= 2 else m > 0
    if m.ndim == 3:
        m = m[..., :3].max(axis=2)
    if m.shape != like.shape:
        raise ValueError(f"{name}: expected the image's shape {like.shape}, got {m.shape}")
    return m > (127 if m.dtype == np.uint8 else 0.5)


# ---------------------------------------------------------------------------------------------
# geometry helpers (pixels: pixel i spans [i, i+1); boxes xyxy)

def square_around(box, margin: float, min_side: float = 4.0) -> tuple[float, float, float, float]:
    """The square, xyxy, centred on ``box`` with side = margin × its longest side."""
    x0, y0, x1, y1 = [float(v) for v in box]
    side = max(min_side, margin * max(x1 - x0, y1 - y0))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def crop(image: np.ndarray, square, size: int, interp=cv2.INTER_LINEAR) -> np.ndarray:
    """Resample the xyxy ``square`` of an (H, W) float image to (size, size); zeros outside."""
    x0, y0, x1, _ = square
    k = (x1 - x0) / size
    # dst pixel u (centre u + 0.5) ← src continuous x0 + (u + 0.5)·k ← cv2 index that − 0.5
    m = np.array([[k, 0, x0 + 0.5 * k - 0.5], [0, k, y0 + 0.5 * k - 0.5]], np.float64)
    return cv2.warpAffine(image.astype(np.float32), m, (size, size),
                          flags=interp | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def crop_mask(mask: np.ndarray, square, size: int) -> np.ndarray:
    return crop(mask.astype(np.float32), square, size) > 0.5


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def paste_slices(square, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    """The (row, column) slices of an (H, W) frame's pixels whose centres lie inside the xyxy
    ``square`` (None if none)."""
    h, w = shape
    x0, y0, x1, y1 = square
    c0, r0 = max(0, int(np.ceil(x0 - 0.5))), max(0, int(np.ceil(y0 - 0.5)))
    c1, r1 = min(w, int(np.floor(x1 - 0.5)) + 1), min(h, int(np.floor(y1 - 0.5)) + 1)
    if c1 <= c0 or r1 <= r0:
        return None
    return slice(r0, r1), slice(c0, c1)


def uncrop(crop_img: np.ndarray, square, sl: tuple[slice, slice],
           border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """The inverse of :func:`crop`: an (S, S[, C]) float32 crop of the xyxy ``square``
    resampled bilinearly at the frame pixels ``sl`` (from :func:`paste_slices`) → (h, w[, C]).
    Frame pixel c (centre c + 0.5) is crop pixel index (c + 0.5 − x0)·S/side − 0.5;
    ``border``: a cv2 border mode for frame pixels beyond the crop's outermost pixel centres
    (BORDER_CONSTANT: zeros, BORDER_REPLICATE: edge values)."""
    s = crop_img.shape[0]
    x0, y0, x1, _ = square
    k = s / (x1 - x0)
    r, c = sl
    m = np.array([[k, 0, (c.start + 0.5 - x0) * k - 0.5],
                  [0, k, (r.start + 0.5 - y0) * k - 0.5]], np.float64)
    return cv2.warpAffine(crop_img, m, (c.stop - c.start, r.stop - r.start),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border,
                          borderValue=0)


def remap_normalised(image: np.ndarray, grid: np.ndarray, border: int) -> np.ndarray:
    """Sample an (h, w[, C]) float32 image bilinearly at a grid (H, W, 2) of normalised (x, y)
    coordinates in it (pixel-centre convention, as ``grid_sample(align_corners=False)``);
    ``border``: a cv2 border mode (BORDER_CONSTANT = zeros outside). → (H, W[, C])."""
    h, w = image.shape[:2]
    mx = ((grid[..., 0] + 1) * w - 1) * 0.5
    my = ((grid[..., 1] + 1) * h - 1) * 0.5
    return cv2.remap(image, mx.astype(np.float32), my.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=border, borderValue=0)


def full_frame_masks(moving: np.ndarray, fixed: np.ndarray, size: int = 112,
                     moving_fraction: float = 0.5,
                     threshold: float | None = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The no-localization setting (paper §4.2): both masks on one size×size frame.

    The moving object, cropped and scaled to ``moving_fraction`` of the frame, sits at its
    centre; the fixed image is resized to the frame and thresholded whole (every object in it).
    Inputs as :func:`to_gray`; returns two (size, size) bool masks.
    """
    mg = bright_foreground(to_gray(moving, "moving"))
    fg = bright_foreground(to_gray(fixed, "fixed"))
    m_mask = segment.object_mask(mg, threshold=threshold)
    f_small = cv2.resize(fg, (size, size), interpolation=cv2.INTER_AREA)
    return (centred_object(m_mask, size, moving_fraction),
            segment.foreground_or_otsu(f_small, threshold))


def centred_object(mask: np.ndarray, size: int, fraction: float = 0.5) -> np.ndarray:
    """The object of an (H, W) bool mask, cropped to the square 1.4 × its box and scaled to
    ``fraction`` of a size × size frame, at the frame's centre (size, size) bool."""
    b = mask_box(mask)
    if b is None:
        b = (0, 0, mask.shape[1], mask.shape[0])
    inner = max(1, round(size * fraction))
    canvas = np.zeros((size, size), bool)
    o = (size - inner) // 2
    canvas[o:o + inner, o:o + inner] = crop_mask(mask, square_around(b, 1.4), inner)
    return canvas


def full_frame_layout(moving_mask: np.ndarray, fixed_mask: np.ndarray, size: int,
                      moving_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """:func:`full_frame_masks` for given masks: the moving object centred at
    ``moving_fraction`` of the frame, the whole fixed mask resized; two (size, size) bool."""
    f = cv2.resize(fixed_mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return centred_object(moving_mask, size, moving_fraction), f > 0.5


# ---------------------------------------------------------------------------------------------

class Pipeline:
    """Localizer + matcher (+ the full-frame matcher) for one data set."""

    def __init__(self, matcher, localizer=None, matcher_full=None,
                 dataset: DatasetConfig | None = None, refine_steps: int = 0, segmenter=None,
                 verifier=None, freeze: bool = True, ranker=None, chooser=None):
        # inference copies: channels-last layout (convolutions ~1.4× faster on CPU here),
        # BatchNorms folded, forward passes frozen (registration.frozen; freeze=False: later,
        # by freeze(), e.g. in a background thread so that an app starts ~2 s sooner)
        self.matcher = matcher.for_inference(freeze)
        self.localizer = localizer.for_inference(freeze) if localizer is not None else None
        self.matcher_full = (matcher_full.for_inference(freeze) if matcher_full is not None
                             else None)
        self.dataset = dataset or DatasetConfig()
        if self.dataset.segmenter == "learned" and segmenter is None:
            raise ValueError(f"segmenter: data set {self.dataset.name!r} segments with a learned "
                             "segmenter, got None")
        self.segmenter = segmenter.for_inference(freeze) if segmenter is not None else None
        # re-ranking of the SSD's candidates by a learned same-object verifier (else by shape
        # overlap; see _rerank)
        self.verifier = verifier.eval() if verifier is not None else None
        # … or by a scorer of the pair's geometry (registration.ranker; US–CT), which wins
        self.ranker = ranker.eval() if ranker is not None else None
        # … and with a verifier, where the fixed mask is segmented, the choice among the
        # verifier's candidates by a learned scorer (registration.choose; silhouettes)
        self.chooser = chooser.eval() if chooser is not None else None
        # test-time refinement: Adam steps on each pair's TPS parameters after the network's
        # one-shot prediction (0 = the network alone, fastest)
        self.refine_steps = int(refine_steps)

    def freeze(self) -> None:
        """Freeze the networks' forward passes (:mod:`registration.frozen`) where not done yet;
        safe to call from another thread while the pipeline serves requests (until each is
        frozen it runs eagerly, with the same outputs)."""
        for net in (self.localizer, self.matcher, self.matcher_full, self.segmenter):
            if net is not None and not frozen.is_frozen(net):
                net.freeze()

    @classmethod
    def from_pretrained(cls, name: str = "mnist", refine_steps: int | None = None,
                        freeze: bool = True) -> "Pipeline":
        """Load ``checkpoints/<name>/{matcher,localizer,matcher-full}`` (else from the Hub).
        ``refine_steps``: test-time refinement steps (default: the data set's
        ``DatasetConfig.refine_steps``, else DEFAULT_REFINE_STEPS).

        The matcher (and, for data sets segmented by a network, the segmenter) is required;
        the localizer, the full-frame matcher and (silhouettes) the verifier are loaded when
        present.
        """
        if name not in DATASETS:
            raise ValueError(f"name: expected one of {sorted(DATASETS)}, got {name!r}")
        ds = DATASETS[name]
        if refine_steps is None:
            refine_steps = DEFAULT_REFINE_STEPS if ds.refine_steps is None else ds.refine_steps
        seg = checkpoint.load(name, "segmenter") if ds.segmenter == "learned" else None
        # without its verifier (e.g. a Hub revision from before it) the re-ranking falls back
        # to mask overlap, with a warning
        ver = checkpoint.try_load(name, "verifier") if ds.verifier else None
        # without its ranker, the SSD's top box (with a warning)
        rk = checkpoint.try_load(name, "ranker") if ds.ranker else None
        # without its chooser, the hand-set choice (with a warning)
        ch = checkpoint.try_load(name, "chooser") if ds.chooser and ver is not None else None
        if ds.ranker and rk is None:
            ds = dataclasses.replace(ds, rerank=0)
        return cls(checkpoint.load(name, "matcher"), checkpoint.try_load(name, "localizer"),
                   checkpoint.try_load(name, "matcher-full"), ds, refine_steps, seg, ver,
                   freeze=freeze, ranker=rk, chooser=ch)

    # -- segmentation ----------------------------------------------------------------------

    def _polarity(self, gray: np.ndarray) -> np.ndarray:
        return bright_foreground(gray) if self.dataset.bright_objects else gray

    @torch.no_grad()
    def _segnet_probs(self, crops: list[np.ndarray], flip: bool = False) -> np.ndarray:
        """Learned segmenter on (S, S) float crops → foreground probabilities (N, S, S). With
        ``flip``, the mean of its logits on each crop and on its mirror image (one batch of
        2N)."""
        x = torch.from_numpy(np.stack(crops).astype(np.float32))[:, None]
        if flip:
            n = len(x)
            y = self.segmenter(torch.cat([x, x.flip(-1)]).contiguous(
                memory_format=torch.channels_last))
            logits = 0.5 * (y[:n] + y[n:].flip(-1))
        else:
            logits = self.segmenter(x.contiguous(memory_format=torch.channels_last))
        return torch.sigmoid(logits)[:, 0].numpy()

    def _object_masks(self, grays: list[np.ndarray]) -> list[np.ndarray]:
        """The single object each whole (moving) image shows, (H, W) bool each."""
        if self.segmenter is None:
            return [segment.object_mask(g, threshold=self.dataset.threshold) for g in grays]
        s = self.segmenter.cfg.input_size
        probs = self._segnet_probs([cv2.resize(g, (s, s), interpolation=cv2.INTER_AREA)
                                    for g in grays], flip=self.dataset.segment_flip)
        return [segment.drop_specks(cv2.resize(p, g.shape[::-1],
                                               interpolation=cv2.INTER_LINEAR) > 0.5)
                for p, g in zip(probs, grays)]

    def _region_masks(self, grays: list[np.ndarray], boxes) -> list[np.ndarray]:
        """Foreground of each fixed image (H, W) inside the square around its xyxy box (a
        margin × box crop); zeros elsewhere. Learned: the segmenter on the crop, sampled back
        at the frame's pixels; else the threshold on the frame's pixels."""
        out, todo = [], []
        for g, box in zip(grays, boxes):
            region = square_around(box, self.dataset.crop_margin
                                   if self.segmenter is None else self.segmenter.cfg.margin)
            sl = paste_slices(region, g.shape)
            m = np.zeros(g.shape, bool)
            if sl is not None and self.segmenter is None:
                m[sl] = segment.foreground_or_otsu(g[sl], self.dataset.threshold)
            elif sl is not None:
                todo.append((len(out), sl, region))
            out.append(m)
        if todo:
            s = self.segmenter.cfg.input_size
            probs = self._segnet_probs([crop(grays[i], region, s) for i, _, region in todo])
            for (i, sl, region), p in zip(todo, probs):
                out[i][sl] = uncrop(np.ascontiguousarray(p), region, sl) > 0.5
        return out

    def _frame_mask(self, gray: np.ndarray, size: int) -> np.ndarray:
        """Every object of a whole (fixed) frame at size × size, for the no-localization path.
        Learned: the segmenter runs fully convolutionally at the frame's own resolution, where
        objects have about the size they have in its training crops."""
        if self.segmenter is None:
            small = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
            return segment.foreground_or_otsu(small, self.dataset.threshold)
        return cv2.resize(self._frame_probs(gray), (size, size),
                          interpolation=cv2.INTER_AREA) > 0.5

    def _frame_probs(self, gray: np.ndarray) -> np.ndarray:
        """The segmenter run fully convolutionally on a whole frame (its sides rounded to the
        U-Net's stride): foreground probabilities at about the frame's resolution."""
        h, w = gray.shape
        k = 2 ** (len(self.segmenter.cfg.channels) - 1)
        hh, ww = max(k, round(h / k) * k), max(k, round(w / k) * k)
        return self._segnet_probs([cv2.resize(gray, (ww, hh), interpolation=cv2.INTER_AREA)],
                                  flip=self.dataset.segment_flip)[0]

    @property
    def size(self) -> int:
        return self.matcher.cfg.input_size

    # -- matching --------------------------------------------------------------------------

    def _match_batch(self, mov_masks: np.ndarray, fix_masks: np.ndarray, matcher=None,
                     refine_steps: int = 0):
        """(B, S, S) bool pairs → params (B, P) float32 tensor."""
        matcher = matcher or self.matcher
        m = torch.from_numpy(mov_masks.astype(np.float32)).unsqueeze(1)
        f = torch.from_numpy(fix_masks.astype(np.float32)).unsqueeze(1)
        if refine_steps:
            return matcher.refine(m, f, steps=refine_steps)
        with torch.no_grad():
            return matcher.predict(m, f)

    def _crop_result(self, params: torch.Tensor, mov_crop, mov_mask, fix_crop, fix_mask,
                     matcher=None, grid: np.ndarray | None = None) -> dict:
        """The crop-level fields of a Result; ``grid``: the S×S sampling grid of ``params``
        (``matcher.grid_numpy``) if the caller has it."""
        matcher = matcher or self.matcher
        s = mov_mask.shape[0]
        g = matcher.grid_numpy(params, (s, s)) if grid is None else grid
        src = np.ascontiguousarray(np.stack([mov_mask.astype(np.float32),
                                             mov_crop.astype(np.float32)], -1))
        warped = remap_normalised(src, g, cv2.BORDER_CONSTANT)
        ctrl = matcher.ctrl
        theta, offsets = tps.split_params(params[None], len(ctrl))  # T(c_k) = A·[c_k; 1] + d_k
        q = (torch.cat([ctrl, torch.ones_like(ctrl[:, :1])], 1) @ theta[0].T) + offsets[0]
        return dict(moving_crop=mov_crop, fixed_crop=fix_crop, moving_mask=mov_mask,
                    fixed_mask=fix_mask, warped_mask=warped[..., 0] > 0.5,
                    warped_image=warped[..., 1].clip(0, 1),
                    control_points=norm_to_pixel(q, (s, s)).numpy(),
                    control_points_warped=norm_to_pixel(ctrl, (s, s)).numpy(),
                    params=params.numpy())

    def match(self, moving_mask, fixed_mask, refine_steps: int | None = None) -> Result:
        """The matcher alone on two object-centric masks (any equal or unequal sizes, resized
        to S×S). Returns a Result without box or full-frame fields."""
        t0 = time.perf_counter()
        s = self.size
        mm = cv2.resize(to_gray(np.asarray(moving_mask).astype(np.float32), "moving_mask"),
                        (s, s), interpolation=cv2.INTER_AREA) > 0.5
        fm = cv2.resize(to_gray(np.asarray(fixed_mask).astype(np.float32), "fixed_mask"),
                        (s, s), interpolation=cv2.INTER_AREA) > 0.5
        if not mm.any() or not fm.any():
            raise RegistrationError("a mask is empty: nothing to match")
        steps = self.refine_steps if refine_steps is None else refine_steps
        params = self._match_batch(mm[None], fm[None], refine_steps=steps)[0]
        r = Result(box=None, score=None, localized=False,
                   **self._crop_result(params, mm.astype(np.float32), mm,
                                       fm.astype(np.float32), fm))
        r.timings = {"match": (time.perf_counter() - t0) * 1e3}
        return r

    # -- the full pipeline -----------------------------------------------------------------

    def register(self, moving, fixed, localize: bool = True, moving_mask=None,
                 fixed_mask=None, refine_steps: int | None = None,
                 rerank: int | None = None) -> Result:
        """Register one pair. Images as :func:`to_gray` accepts; optional masks (bool or uint8,
        each its image's shape) replace the segmentation. ``fixed_mask`` may also be an
        instance label image (any integer dtype but uint8: 0 = background, one positive value
        per object): touching objects then stay separate objects, where a plain mask joins
        them into one. ``refine_steps`` overrides the
        pipeline's test-time refinement, ``rerank`` its SSD re-ranking (0 = top box)."""
        return self.register_batch([(moving, fixed)], localize=localize,
                                   moving_masks=[moving_mask], fixed_masks=[fixed_mask],
                                   refine_steps=refine_steps, rerank=rerank)[0]

    def _prepare(self, pairs, moving_masks, fixed_masks) -> list[dict]:
        """Per pair: grey images at working resolution (polarity fixed), the given masks, the
        moving object's mask (segmented unless given) and the square around it."""
        prep = []
        for i, (moving, fixed) in enumerate(pairs):
            mg = self._polarity(to_gray(moving, "moving"))
            fg = self._polarity(to_gray(fixed, "fixed"))
            um = _mask_arg(moving_masks[i], mg, "moving_mask")
            uf = _mask_arg(fixed_masks[i], fg, "fixed_mask", labels=True)
            mg, _ = _to_work_res(mg)
            h_in, w_in = fg.shape
            fg, scale = _to_work_res(fg)
            if um is not None:
                um = cv2.resize(um.astype(np.uint8), mg.shape[::-1],
                                interpolation=cv2.INTER_NEAREST) > 0
            uf_lab = None
            if uf is not None and uf.dtype == np.int32:      # instance labels
                uf_lab = cv2.resize(uf, fg.shape[::-1], interpolation=cv2.INTER_NEAREST)
                uf = uf_lab > 0
            elif uf is not None:
                uf = cv2.resize(uf.astype(np.uint8), fg.shape[::-1],
                                interpolation=cv2.INTER_NEAREST) > 0
            # uf: every given object (H, W) bool; uf_lab: the same split into instances
            prep.append(dict(mg=mg, fg=fg, uf=uf, uf_lab=uf_lab, m_mask=um, scale=scale,
                             shape_in=(h_in, w_in)))
        todo = [p for p in prep if p["m_mask"] is None]
        for p, m in zip(todo, self._object_masks([p["mg"] for p in todo]) if todo else []):
            p["m_mask"] = m
        for p in prep:
            mb = mask_box(p["m_mask"])
            if mb is None:
                raise RegistrationError("no object found in the moving image")
            p["m_sq"] = square_around(mb, self.dataset.crop_margin)
        return prep

    def _ssd_inputs(self, prep: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The fixed images letterboxed into the SSD's square input (B, 1, S, S), the queries
        (B, 1, q, q) and each letterbox scale (SSD px per working px)."""
        lc = self.localizer.cfg
        fixed_in, query_in, lb = [], [], []
        for p in prep:
            h, w = p["fg"].shape
            k = lc.image_size / max(h, w)
            nh, nw = max(1, round(h * k)), max(1, round(w * k))
            canvas = np.zeros((lc.image_size, lc.image_size), np.float32)
            canvas[:nh, :nw] = cv2.resize(p["fg"], (nw, nh), interpolation=cv2.INTER_AREA)
            fixed_in.append(canvas)
            query_in.append(
                cv2.resize(p["mg"], (lc.query_size, lc.query_size), interpolation=cv2.INTER_AREA)
                if self.dataset.query == "whole" else crop(p["mg"], p["m_sq"], lc.query_size))
            lb.append(k)
        return (torch.from_numpy(np.stack(fixed_in))[:, None],
                torch.from_numpy(np.stack(query_in))[:, None], lb)

    def _candidate_objects(self, prep: list[dict], cands, lb) -> list[tuple]:
        """For every SSD candidate (after NMS) of every pair: (pair index, its rank, the
        object segmented in it (H, W) bool in the working frame, its snapped box); candidates
        where nothing is segmented are left out. Each pair's objects are also kept by rank in
        ``prep[i]["candidate_objects"]``, so the chosen one need not be segmented again, and
        the share of each SSD candidate's object that its box cut off in
        ``prep[i]["candidate_cut"]`` (0 for whole objects)."""
        out = []
        for i, (p, (bx, _)) in enumerate(zip(prep, cands)):
            p["candidate_objects"], p["candidate_cut"] = {}, {}
            given = p.get("given_objects", {})    # pieces of split components, as they are
            frame = [b.numpy().astype(np.float64) / lb[i] for b in bx]
            if p["uf"] is not None:
                masks = [self._given_objects(p)] * len(frame)
            else:
                todo = [j for j in range(len(frame)) if j not in given]
                seg = dict(zip(todo, self._region_masks([p["fg"]] * len(todo),
                                                        [frame[j] for j in todo])))
                masks = [seg.get(j) for j in range(len(frame))]
            for j, (box, m) in enumerate(zip(frame, masks)):
                cut = 0.0
                if j in given:
                    obj = given[j]
                else:
                    obj = segment.select_best_fit(m, box, min_px=self.dataset.min_object_px,
                                                  clip=None)
                    if self._snap_clip(p) is not None:
                        n_px = obj.sum()
                        obj = segment.clip_to_box(obj, box, self._snap_clip(p))
                        cut = 1.0 - obj.sum() / max(n_px, 1)
                fb = mask_box(obj)
                if fb is not None:
                    out.append((i, j, obj, fb))
                    p["candidate_objects"][j] = obj
                    p["candidate_cut"][j] = float(cut)
        return out

    def _candidate_crops(self, prep: list[dict], cands, lb):
        """For every SSD candidate (after NMS) of every pair: the object segmented in it, as
        an object-centric S×S mask beside the moving object's. Returns moving masks and
        candidate masks (N, S, S) bool, the pair each belongs to (N,), the candidates' boxes
        in the SSD's frame (N, 4), their SSD scores (N,) and their snapped boxes in the
        working frame (N tuples), and each one's index in its pair's list (N,); candidates
        where nothing is segmented are left out."""
        margin, s = self.dataset.crop_margin, self.size
        found = self._candidate_objects(prep, cands, lb)
        if not found:
            e = np.zeros((0, s, s), bool)
            return (e, e, np.zeros(0, int), torch.zeros(0, 4), torch.zeros(0), [],
                    np.zeros(0, int))
        m_crops = {i: crop_mask(prep[i]["m_mask"], prep[i]["m_sq"], s) for i, *_ in found}
        return (np.stack([m_crops[i] for i, *_ in found]),
                np.stack([crop_mask(obj, square_around(fb, margin), s)
                          for _, _, obj, fb in found]),
                np.array([i for i, *_ in found]),
                torch.stack([cands[i][0][j] for i, j, *_ in found]),
                torch.stack([cands[i][1][j] for i, j, *_ in found]),
                [fb for *_, fb in found],
                np.array([j for _, j, *_ in found], int))

    def _verifier_inputs(self, prep: list[dict], mov: np.ndarray, fix: np.ndarray,
                         owner: np.ndarray, snapped: list, grey: bool):
        """The verifier's inputs from _candidate_crops' masks (N, S, S) bool: (N, C, S, S)
        float32 for the moving objects and the candidates; C = 1 (the masks), or with
        ``grey`` C = 2: each mask and the grey detail inside it (verify.object_detail) in
        the same S×S crop of the working image."""
        if not grey:
            return mov[:, None].astype(np.float32), fix[:, None].astype(np.float32)
        s, margin = self.size, self.dataset.crop_margin
        m_detail = {}
        for k, i in enumerate(owner.tolist()):
            if i not in m_detail:
                m_detail[i] = object_detail(crop(prep[i]["mg"], prep[i]["m_sq"], s), mov[k])
        f_detail = [object_detail(crop(prep[i]["fg"], square_around(fb, margin), s), f)
                    for i, f, fb in zip(owner.tolist(), fix, snapped)]
        return (np.stack([mov.astype(np.float32), np.stack([m_detail[i] for i in owner.tolist()])], 1),
                np.stack([fix.astype(np.float32), np.stack(f_detail)], 1))

    def _with_components(self, prep: list[dict], cands, lb) -> list[tuple]:
        """The SSD's candidates (boxes (k, 4) in its frame, scores (k,)) per pair, followed by
        one more box per connected component (8-connected, ≥ COMPONENT_MIN_PX) of the fixed
        image's foreground (the given fixed mask, else the segmenter's on the whole frame),
        with score 0: the SSD's top boxes miss the target in ~8 % of silhouette scenes. With
        ``split_components``, also one box per piece of a component that
        segment.split_touching splits; each piece is its candidate's object as it is (kept in
        ``prep[i]["given_objects"]`` by candidate index)."""
        out = []
        for i, (p, (bx, sc)) in enumerate(zip(prep, cands)):
            fg = (self._given_objects(p) if p["uf"] is not None
                  else self._frame_foreground(p["fg"]))
            n, lab, stats = segment.components(fg)
            keep = [c for c in range(1, n) if stats[c, cv2.CC_STAT_AREA] >= COMPONENT_MIN_PX]
            boxes = [(stats[c, cv2.CC_STAT_LEFT], stats[c, cv2.CC_STAT_TOP],
                      stats[c, cv2.CC_STAT_LEFT] + stats[c, cv2.CC_STAT_WIDTH],
                      stats[c, cv2.CC_STAT_TOP] + stats[c, cv2.CC_STAT_HEIGHT]) for c in keep]
            p["given_objects"] = {}
            if self.dataset.split_components and p["uf_lab"] is None:   # labels: no joins
                for c in keep:
                    for piece in segment.split_touching(lab == c):
                        if piece.sum() >= COMPONENT_MIN_PX:
                            p["given_objects"][len(bx) + len(boxes)] = piece
                            boxes.append(mask_box(piece))
            if not boxes:
                out.append((bx, sc))
                continue
            extra = torch.tensor(np.array(boxes, np.float32))
            out.append((torch.cat([bx, extra * lb[i]]),
                        torch.cat([sc, torch.zeros(len(boxes), dtype=sc.dtype)])))
        return out

    @staticmethod
    def _given_objects(p: dict) -> np.ndarray:
        """A pair's given fixed mask: its instance labels if it came as labels, else bool."""
        return p["uf"] if p["uf_lab"] is None else p["uf_lab"]

    def _snap_clip(self, p: dict) -> float | None:
        """How far beyond its box a chosen object may reach (DatasetConfig.snap_clip). The
        clip cuts off a touching neighbour joined to the object; given instance labels, no
        neighbour is joined, so nothing is clipped (the box would only cut the object)."""
        return None if p.get("uf_lab") is not None else self.dataset.snap_clip

    def _frame_foreground(self, gray: np.ndarray) -> np.ndarray:
        """Every object of a whole fixed frame, (H, W) bool at its resolution: the
        segmenter run fully convolutionally (else the threshold)."""
        if self.segmenter is None:
            return segment.foreground_or_otsu(gray, self.dataset.threshold)
        h, w = gray.shape
        return cv2.resize(self._frame_probs(gray), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5

    def _ranker_features(self, prep: list[dict], cands, lb, views: bool | None = None,
                         lut: np.ndarray | None = None):
        """The ranker's inputs for every candidate: features (N, F) float32, pair index (N,),
        rank (N,), snapped box in the working frame (N tuples). With ``views`` (default: when
        the ranker takes them, ``cfg.view``) the last two features are each candidate's view
        from the skin (ranker.view_similarity: normalised cross-correlation, mutual
        information), against the CT mapped through ``lut`` (ranker.view_lut_image; default:
        the ranker's ``view_lut`` where it has one, else the CT as it is)."""
        found = self._candidate_objects(prep, cands, lb)
        pfs, ctxs = {}, {}
        x = []
        if views is None:
            views = self._ranker_sees_view()
        if lut is None and views and getattr(self.ranker, "view_lut", None) is not None:
            lut = self.ranker.view_lut.numpy()
        for i, j, obj, _ in found:
            if i not in pfs:
                pfs[i] = ranker_mod.pair_features(prep[i]["mg"], prep[i]["m_mask"],
                                                  prep[i]["fg"])
                if views:
                    ctxs[i] = ranker_mod.view_context(prep[i]["mg"], prep[i]["m_mask"],
                                                      prep[i]["fg"], pfs[i]["body"], lut=lut)
            f = ranker_mod.candidate_features(pfs[i], obj, float(cands[i][1][j]), j)
            if views:
                v = (0.0, 0.0) if ctxs[i] is None else ranker_mod.view_similarity(ctxs[i], obj)
                f = np.concatenate([f, np.asarray(v, np.float32)])
            x.append(f)
        x = np.stack(x) if x else np.zeros((0, ranker_mod.N_FEATURES + 2 * views), np.float32)
        return (x, np.array([i for i, *_ in found], int),
                np.array([j for _, j, *_ in found], int), [fb for *_, fb in found])

    def _ranker_sees_view(self) -> bool:
        """Whether the ranker takes the view similarity as its last two features."""
        return bool(getattr(getattr(self.ranker, "cfg", None), "view", False))

    def _rerank(self, prep: list[dict], cands, lb) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick, per pair, the SSD candidate whose segmented object looks most like the moving
        object: with a verifier checkpoint, its probability that the two object-centric masks
        show the same kind of object; else the Dice of the two masks as they are. Plus
        RERANK_SCORE_WEIGHT × the SSD score to break ties.
        Returns boxes (B, 4) in the SSD's frame, their SSD scores (B,) and where each box
        came from ("ssd" or "component", B); leaves each pair's chosen object, as segmented
        for the choice, in ``prep[i]["snapped"]``.
        """
        # per pair: box, score, value, index in the pair's candidate list
        best = [(cands[i][0][0], cands[i][1][0], -np.inf, 0) for i in range(len(prep))]
        n_ssd = [len(c[0]) for c in cands]
        if self.ranker is not None:
            x, owner, rank, _ = self._ranker_features(prep, cands, lb)
            if len(x):
                with torch.no_grad():
                    v = self.ranker(torch.from_numpy(x))
                for k, (i, j) in enumerate(zip(owner.tolist(), rank.tolist())):
                    if float(v[k]) > best[i][2]:
                        best[i] = (cands[i][0][j], cands[i][1][j], float(v[k]), j)
            return self._chosen(prep, best, n_ssd)
        c = self._candidate_values(prep, cands, lb)
        if c is not None:
            owner, ranks, boxes, scores, v = c["owner"], c["ranks"], c["boxes"], c["scores"], c["v"]
            for k, i in enumerate(owner.tolist()):
                if float(v[k]) > best[i][2]:
                    best[i] = (boxes[k], scores[k], float(v[k]), int(ranks[k]))
            if self.dataset.component_candidates and self.dataset.prefer_whole:
                best = self._prefer_whole(prep, best, n_ssd, v, owner, ranks, boxes, scores)
            if self.chooser is not None and c["kinds_moving"] is not None:
                best = self._choose(prep, best, n_ssd, c)
        return self._chosen(prep, best, n_ssd)

    def _candidate_values(self, prep: list[dict], cands, lb) -> dict | None:
        """Every candidate of every pair (the SSD's, plus with ``component_candidates`` the
        foreground's components and pieces) with the hand-set choice's value: a dict of
        _candidate_crops' owner (N,), boxes (N, 4), scores (N,), snapped (N tuples) and ranks
        (N,); "dice" (N,) of the two object-centric masks; with a kind-classifying verifier
        "kinds_moving" and "kinds" (N, K) (else None); and "v" (N,): the verifier's same-kind
        probability (+ shape_weight × dice), or without a verifier the dice, + RERANK_SCORE_WEIGHT
        × the SSD score. None if no candidate holds an object."""
        if self.dataset.component_candidates:
            cands = self._with_components(prep, cands, lb)
        mov, fix, owner, boxes, scores, snapped, ranks = self._candidate_crops(prep, cands, lb)
        if not len(mov):
            return None
        dice = mask_overlap(torch.from_numpy(mov), torch.from_numpy(fix))
        km = kc = None
        if self.verifier is not None:
            xm, xf = self._verifier_inputs(prep, mov, fix, owner, snapped,
                                           self.verifier.cfg.grey)
            with torch.no_grad():
                if self.verifier.cfg.classes:      # as Verifier.forward, keeping the kinds
                    # each pair's moving object once, not once per candidate
                    _, first, pair_row = np.unique(owner, return_index=True, return_inverse=True)
                    km = self.verifier.kinds(torch.from_numpy(xm[first]))[pair_row]
                    kc = self.verifier.kinds(torch.from_numpy(xf))
                    match = Verifier.same_kind(km, kc)
                else:
                    match = torch.sigmoid(self.verifier(torch.from_numpy(xm),
                                                        torch.from_numpy(xf)))
            if self.dataset.shape_weight:
                match = match + self.dataset.shape_weight * dice
        else:
            # overlap of the two object-centric masks as they are: warping first (one
            # matcher pass) made every animal fit every other and chose worse (box Dice
            # 0.52 vs 0.59 on 60 validation scenes with true masks)
            match = dice
        return {"owner": owner, "boxes": boxes, "scores": scores, "snapped": snapped,
                "ranks": ranks, "dice": dice.numpy(),
                "v": match + RERANK_SCORE_WEIGHT * scores.float(),
                "kinds_moving": None if km is None else km.numpy(),
                "kinds": None if kc is None else kc.numpy()}

    @staticmethod
    def _prefer_whole(prep, best, n_ssd, v, owner, ranks, boxes, scores) -> list[tuple]:
        """Where an SSD box was chosen, switch to the best-valued whole object (a component
        or piece: index ≥ the pair's n_ssd) that is the same object (mask IoU ≥
        SAME_OBJECT_IOU) and values at most WHOLE_OBJECT_MARGIN less."""
        out = list(best)
        for k, i in enumerate(owner.tolist()):
            b, r = out[i], int(ranks[k])
            if (best[i][3] >= n_ssd[i] or r < n_ssd[i]
                    or float(v[k]) < best[i][2] - WHOLE_OBJECT_MARGIN):
                continue
            objs = prep[i]["candidate_objects"]
            a, c = objs[best[i][3]], objs[r]
            if (a & c).sum() < SAME_OBJECT_IOU * (a | c).sum():
                continue
            if b[3] < n_ssd[i] or float(v[k]) > b[2]:
                out[i] = (boxes[k], scores[k], float(v[k]), r)
        return out

    def _choose(self, prep: list[dict], best: list[tuple], n_ssd: list[int], c: dict
                ) -> list[tuple]:
        """For pairs whose fixed mask was segmented (not given): the candidate that the
        chooser (registration.choose) scores highest among _candidate_values' ``c``."""
        out = list(best)
        for i, p in enumerate(prep):
            rows = np.flatnonzero(c["owner"] == i)
            if p["uf"] is not None or not len(rows):
                continue
            x = self._choice_features(p, rows, n_ssd[i], c)
            with torch.no_grad():
                k = rows[int(torch.argmax(self.chooser(torch.from_numpy(x))))]
            out[i] = (c["boxes"][k], c["scores"][k], float(c["v"][k]), int(c["ranks"][k]))
        return out

    @staticmethod
    def _choice_features(p: dict, rows: np.ndarray, n_ssd: int, c: dict) -> np.ndarray:
        """choose.choice_features of one pair's candidates ``rows`` (indices into
        _candidate_values' ``c``); ``p``: the pair's prepared record, ``n_ssd``: its number
        of SSD candidates."""
        r = c["ranks"][rows]
        given = p.get("given_objects", {})
        return choice_features(
            c["kinds_moving"][rows[0]], c["kinds"][rows], c["dice"][rows],
            c["scores"][rows].numpy(), r >= n_ssd, np.array([int(j) in given for j in r]),
            np.array([p["candidate_cut"][int(j)] for j in r]),
            [p["candidate_objects"][int(j)] for j in r], mask_box(p["m_mask"]),
            [c["snapped"][k] for k in rows], c["v"][rows].numpy(), p["uf"] is not None)

    @staticmethod
    def _chosen(prep: list[dict], best: list[tuple], n_ssd: list[int]):
        """_rerank's return from its per-pair (box, score, value, index) choices; keeps the
        chosen object in ``prep[i]["snapped"]`` (None if it was not segmented)."""
        for p, b in zip(prep, best):
            p["snapped"] = p.pop("candidate_objects", {}).get(b[3])
            p.pop("given_objects", None)
        return (torch.stack([b[0] for b in best]), torch.stack([b[1] for b in best]),
                ["ssd" if b[3] < n else "component" for b, n in zip(best, n_ssd)])

    def register_batch(self, pairs, localize: bool = True, moving_masks=None,
                       fixed_masks=None, refine_steps: int | None = None,
                       rerank: int | None = None) -> list[Result]:
        """Register many (moving, fixed) pairs, batching the networks. ``rerank`` overrides
        the data set's number of SSD candidates re-ranked by match quality."""
        n = len(pairs)
        if n == 0:
            return []
        steps = self.refine_steps if refine_steps is None else int(refine_steps)
        moving_masks = moving_masks or [None] * n
        fixed_masks = fixed_masks or [None] * n
        if not localize:
            return [self._register_full(m, f, um, uf)
                    for (m, f), um, uf in zip(pairs, moving_masks, fixed_masks)]
        if self.localizer is None:
            raise RegistrationError("this pipeline has no localizer checkpoint")
        t = {}
        t0 = time.perf_counter()
        margin, s = self.dataset.crop_margin, self.size
        prep = self._prepare(pairs, moving_masks, fixed_masks)
        t["segment_moving"] = time.perf_counter() - t0

        # localize: letterbox the fixed image into the SSD's square input
        t0 = time.perf_counter()
        f_t, q_t, lb = self._ssd_inputs(prep)
        k_re = self.dataset.rerank if rerank is None else int(rerank)
        with torch.no_grad():
            if k_re > 1:
                cands = self.localizer.candidates(f_t, q_t, k_re)
                boxes, scores, sources = self._rerank(prep, cands, lb)
            else:
                boxes, scores = self.localizer.predict(f_t, q_t)
                sources = ["ssd"] * len(prep)
        t["localize"] = time.perf_counter() - t0

        # segment the fixed image around the box; snap the box to the object found
        t0 = time.perf_counter()
        mov_masks, fix_masks, mov_crops, fix_crops = [], [], [], []
        for p, box, k in zip(prep, boxes.numpy().astype(np.float64), lb):
            p["ssd_box"] = box / k
        # (a re-ranked pair's choice was segmented already, around the same box)
        todo = [p for p in prep if p["uf"] is None and p.get("snapped") is None]
        found = self._region_masks([p["fg"] for p in todo], [p["ssd_box"] for p in todo]) \
            if todo else []
        for p, m in zip(todo, found):
            p["uf_seg"] = m
        for p in prep:
            box, fg = p["ssd_box"], p["fg"]
            obj = p.pop("snapped", None)
            if obj is None:
                fmask = self._given_objects(p) if p["uf"] is not None else p.pop("uf_seg")
                obj = segment.select_best_fit(fmask, box, min_px=self.dataset.min_object_px,
                                              clip=self._snap_clip(p))
            fb = mask_box(obj)
            if fb is None:
                raise RegistrationError("no object found in the fixed image where the "
                                        "localizer points")
            p["box"], p["obj"] = fb, obj
            p["f_sq"] = square_around(fb, margin)
            mov_crops.append(crop(p["mg"], p["m_sq"], s))
            mov_masks.append(crop_mask(p["m_mask"], p["m_sq"], s))
            fix_crops.append(crop(fg, p["f_sq"], s))
            fix_masks.append(crop_mask(obj, p["f_sq"], s))
        t["segment"] = time.perf_counter() - t0 + t.pop("segment_moving")

        t0 = time.perf_counter()
        params = self._match_batch(np.stack(mov_masks), np.stack(fix_masks))
        if steps:
            # refine against the fixed object at (up to) its native resolution: the 28×28 crop
            # loses the thin strokes' boundaries that the full-frame result is judged on
            refined = []
            for i, pr in enumerate(prep):
                side = pr["f_sq"][2] - pr["f_sq"][0]
                n_px = int(np.clip(round(side), s, MAX_REFINE_SIDE))
                fixed_hr = crop(pr["obj"].astype(np.float32), pr["f_sq"], n_px)
                refined.append(self.matcher.refine(
                    torch.from_numpy(mov_masks[i].astype(np.float32))[None, None],
                    torch.from_numpy(fixed_hr)[None, None], params=params[i:i + 1],
                    steps=steps))
            params = torch.cat(refined)
        t["match"] = time.perf_counter() - t0

        results = []
        t_paste = 0.0
        for i, p in enumerate(prep):
            t0 = time.perf_counter()
            g = self.matcher.grid_numpy(params[i], (s, s))     # for the crop and the paste
            r = Result(box=None, score=float(scores[i]),
                       **self._crop_result(params[i], mov_crops[i], mov_masks[i], fix_crops[i],
                                           fix_masks[i], grid=g))
            full = self._paste(params[i], mov_masks[i], p["f_sq"], p["fg"].shape, grid=g)
            sc = p["scale"]
            r.warped_mask_full = self._to_input_res(full, p["shape_in"])
            r.fixed_mask_full = self._to_input_res(p["obj"], p["shape_in"])
            r.box = tuple(float(v) / sc for v in p["box"])
            r.ssd_box = tuple(float(v) / sc for v in p["ssd_box"])
            r.crop_box = tuple(float(v) / sc for v in p["f_sq"])
            r.box_source = sources[i]
            t_paste += time.perf_counter() - t0
            results.append(r)
        t["paste"] = t_paste
        ms = {k: v * 1e3 / n for k, v in t.items()}
        ms["total"] = sum(ms.values())
        for r in results:
            r.timings = dict(ms)
        return results

    def _paste(self, params: torch.Tensor, mov_mask: np.ndarray, square, shape,
               grid: np.ndarray | None = None) -> np.ndarray:
        """Warp the moving crop's mask straight into the fixed frame's pixels inside ``square``
        (full resolution, no blocky upsampling of the S×S warped mask). ``grid``: the S×S
        sampling grid of ``params`` (``Matcher.grid_numpy``) if the caller has it."""
        out = np.zeros(shape, bool)
        sl = paste_slices(square, shape)
        if sl is None:
            return out
        s = mov_mask.shape[0]
        g = self.matcher.grid_numpy(params, (s, s)) if grid is None else grid
        # The TPS grid is smooth: take it on the S×S crop's pixel centres and interpolate it
        # bilinearly at the frame's pixels (edge values beyond the outermost centres), instead
        # of evaluating the spline's log-kernels at every frame pixel (same mask up to a
        # fraction of a pixel, tested)
        frame_grid = uncrop(g, square, sl, cv2.BORDER_REPLICATE)
        out[sl] = remap_normalised(mov_mask.astype(np.float32), frame_grid,
                                   cv2.BORDER_CONSTANT) > 0.5
        return out

    @staticmethod
    def _to_input_res(mask: np.ndarray, shape_in) -> np.ndarray:
        if mask.shape == tuple(shape_in):
            return mask
        return cv2.resize(mask.astype(np.uint8), (shape_in[1], shape_in[0]),
                          interpolation=cv2.INTER_NEAREST) > 0

    def _register_full(self, moving, fixed, moving_mask=None, fixed_mask=None) -> Result:
        """Without localization: the full-frame matcher on whole frames (paper §4.2)."""
        if self.matcher_full is None:
            raise RegistrationError("this pipeline has no full-frame matcher checkpoint")
        t0 = time.perf_counter()
        size = self.matcher_full.cfg.input_size
        fg = self._polarity(to_gray(fixed, "fixed"))
        mg = self._polarity(to_gray(moving, "moving"))
        um = _mask_arg(moving_mask, mg, "moving_mask")
        uf = _mask_arg(fixed_mask, fg, "fixed_mask")
        m_obj = um if um is not None else self._object_masks([mg])[0]
        f_mask = (full_frame_layout(m_obj, uf, size)[1] if uf is not None
                  else self._frame_mask(fg, size))
        m_mask = centred_object(m_obj, size)
        if not m_mask.any() or not f_mask.any():
            raise RegistrationError("no object found")
        t_seg = time.perf_counter() - t0
        t0 = time.perf_counter()
        params = self._match_batch(m_mask[None], f_mask[None], self.matcher_full)[0]
        t_match = time.perf_counter() - t0
        m_img = np.zeros((size, size), np.float32)
        f_img = cv2.resize(fg, (size, size), interpolation=cv2.INTER_AREA)
        m_img[m_mask] = 1.0
        r = Result(box=None, score=None, localized=False,
                   **self._crop_result(params, m_img, m_mask, f_img, f_mask, self.matcher_full))
        r.warped_mask_full = self._to_input_res(r.warped_mask, fg.shape)
        r.fixed_mask_full = self._to_input_res(f_mask, fg.shape)
        r.timings = {"segment": t_seg * 1e3, "match": t_match * 1e3,
                     "total": (t_seg + t_match) * 1e3}
        return r
