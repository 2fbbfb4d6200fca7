"""Which tumour does the ultrasound show? Re-ranking the SSD's candidates by the pair's geometry.

On US–CT the query-conditioned SSD puts the target tumour among its top 4 boxes in ~98 % of
validation pairs but first in only ~75 %: slices hold 1–3 tumours, mostly hypodense and
hypoechoic, and the 64-px view of the ultrasound that conditions the SSD says little about
*which* one it shows. The ultrasound does say it, in its geometry: the probe sits on the skin
and is aimed at the target, so the target lies on the fan's centre line at a depth below the
skin, with a size, and no fan scale is needed to compare the *ratio* of the two with a CT
candidate's size and its distance to the skin. This module turns such measurements of each
candidate (and the SSD's own score and rank) into a feature vector (:func:`pair_features`,
:func:`candidate_features`) and scores it with a small MLP (:class:`Ranker`) trained on the
pipeline's own candidates (``python -m registration.train ranker --dataset usct``).

Measurements (pixels of the pipeline's working images; the US–CT geometry: a 256-px CT at
1.5 mm, a 128-px fan whose outside is exactly 0):

- ultrasound: the tumour's size √area, its depth below the top of the fan in its column, the
  fan's height below that top, and the tumour's mean grey minus a 4-px ring around it;
- CT: the candidate's size √area, its distance to the body outline (the largest bright
  component of the window, holes filled), the same ring contrast, and its distance to the
  skin along 13 directions from straight up to up-left/up-right (where a probe on the
  anterior or right-lateral wall can be: the probe's side is a prior of this set-up,
  radiological convention);
- features: the SSD's logit and rank; |log(size/depth)| differences between the two images
  (scale-free); the sizes, depths and contrasts themselves; whether the contrasts agree in
  sign; how well the skin distances predict the tumour's depth fraction in the fan.

:func:`view_similarity` looks at the images themselves: the CT as a probe on the skin aimed at
the candidate would see it, against the ultrasound; a ranker with ``cfg.view`` takes its
correlation and mutual information as two more features. The two modalities do not share
their greys (vessels are bright in CT and dark in ultrasound, fat darker in CT, ...), so a
ranker with ``cfg.view_lut`` first maps the CT to the ultrasound grey each CT grey shows on
average (:func:`view_lut_image`), a 64-entry table estimated from training pairs
(:func:`estimate_view_lut`) and kept with its weights.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from .config import RankerConfig

N_FEATURES = 17
RING_PX = 4
BODY_LEVEL = 0.02              # CT window grey above which a pixel is body, not air
# directions from a candidate towards the probe: angles of (cos, sin) in image coordinates
# (y down), from up-left (-0.95π) over straight up (-π/2) to up-right (-0.35π)
PROBE_DIRECTIONS = np.linspace(-0.95 * np.pi, -0.35 * np.pi, 13)
APEX_BACK_PX = 20.0            # typical apex distance behind the skin (CT px)
BEYOND_PX = 52.0               # typical depth the fan reaches beyond its target (CT px)


def body_mask(ct: np.ndarray) -> np.ndarray:
    """(H, W) float CT window in [0, 1] → (H, W) bool: the largest component above
    BODY_LEVEL with its holes (bowel gas, lungs) filled."""
    fg = (ct > BODY_LEVEL).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg)
    if n < 2:
        return np.zeros(ct.shape, bool)
    body = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    outside = body.copy()
    cv2.floodFill(outside, np.zeros((ct.shape[0] + 2, ct.shape[1] + 2), np.uint8), (0, 0), 1)
    return (body | (1 - outside)).astype(bool)


def ring_contrast(image: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None,
                  ring: int = RING_PX) -> float:
    """Mean of ``image`` inside ``mask`` minus its mean in a ``ring``-px band around it (only
    where ``valid``); 0 when either is empty."""
    k = np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)
    band = (cv2.dilate(mask.astype(np.uint8), k) > 0) & ~mask
    if valid is not None:
        band &= valid
    if not mask.any() or not band.any():
        return 0.0
    return float(image[mask].mean() - image[band].mean())


def skin_distances(body: np.ndarray, centre, directions=PROBE_DIRECTIONS) -> np.ndarray:
    """Distance (px) from ``centre`` (x, y) to the first pixel outside ``body`` along each
    direction (radians, image coordinates), or to the image edge. (len(directions),)"""
    h, w = body.shape
    d = np.asarray(directions, np.float64)
    steps = np.arange(1, 2 * max(h, w), dtype=np.float64)
    x = centre[0] + steps[None] * np.cos(d)[:, None]            # (D, T)
    y = centre[1] + steps[None] * np.sin(d)[:, None]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    xi = np.clip(x, 0, w - 1).astype(np.intp)
    yi = np.clip(y, 0, h - 1).astype(np.intp)
    out = ~body[yi, xi] & inside                                # left the body in the image
    edge = inside.sum(1)                                        # steps before the image edge
    return np.maximum(np.where(out.any(1), out.argmax(1) + 1.0, edge), 1.0)

def pair_features(us: np.ndarray, us_mask: np.ndarray, ct: np.ndarray) -> dict:
    """Per-pair measurements: the ultrasound (H, W) float [0, 1] and its tumour mask (H, W)
    bool, the CT window (H', W') float [0, 1]. The body mask and its distance map are kept for
    :func:`candidate_features`."""
    fan = us > 0
    ys, xs = np.nonzero(us_mask)
    if len(xs):
        col = np.flatnonzero(fan[:, int(round(xs.mean()))])
        top = float(col[0]) if len(col) else 0.0
        depth = max(float(ys.mean()) - top, 1.0)
        size = float(np.sqrt(len(xs)))
        contrast = ring_contrast(us, us_mask, fan)
    else:
        top, depth, size, contrast = 0.0, 1.0, 1.0, 0.0
    rows = np.flatnonzero(fan.any(1))
    height = max(float(rows[-1]) - top, 1.0) if len(rows) else float(us.shape[0])
    body = body_mask(ct)
    return dict(us_depth=depth, us_size=size, us_contrast=contrast,
                us_fraction=min(depth / height, 1.0), body=body, ct=ct,
                ct_dist=cv2.distanceTransform(body.astype(np.uint8), cv2.DIST_L2, 5))


def candidate_features(pf: dict, obj: np.ndarray, score: float, rank: int) -> np.ndarray:
    """(N_FEATURES,) float32 for one candidate: its segmented object (H', W') bool in the CT
    frame of ``pf`` (:func:`pair_features`), its SSD score in (0, 1) and its rank (0 = top)."""
    ys, xs = np.nonzero(obj)
    if len(xs) == 0:
        raise ValueError("obj: expected a non-empty mask")
    cy, cx = float(ys.mean()), float(xs.mean())
    size = float(np.sqrt(len(xs)))
    dist = max(float(pf["ct_dist"][int(cy), int(cx)]), 1.0)
    contrast = ring_contrast(pf["ct"], obj, pf["body"])
    along = skin_distances(pf["body"], (cx + 0.5, cy + 0.5))
    us_size, us_depth = pf["us_size"], pf["us_depth"]
    ratio = np.log(size / dist) - np.log(us_size / us_depth)
    ratio_along = np.abs(np.log(size / (along + APEX_BACK_PX))
                         - np.log(us_size / (us_depth + 8.0)))
    fraction = (along + APEX_BACK_PX) / (along + APEX_BACK_PX + BEYOND_PX)
    miss = np.abs(fraction - pf["us_fraction"])
    p = float(np.clip(score, 1e-6, 1 - 1e-6))
    return np.array([
        np.log(p) - np.log1p(-p), rank, abs(ratio), ratio, np.log(size), np.log(us_size),
        np.log(dist), np.log(us_depth), np.sign(contrast) * np.sign(pf["us_contrast"]),
        abs(contrast) * 5.1, abs(pf["us_contrast"]) * 5.1, miss.min(), np.median(miss),
        ratio_along.min(), np.log(along.min()), np.log(np.median(along)), pf["us_fraction"],
    ], np.float32)


# ---------------------------------------------------------------------------------------------
# the view from the skin: how well does the CT, seen as a probe aimed at a candidate would see
# it, look like the ultrasound?

VIEW_HALF_ANGLES = np.deg2rad((28.0, 32.0, 36.0))   # fan half opening angles tried (rad)
VIEW_CT_BLUR = 1.0             # px (CT): Gaussian σ before sampling the CT into the fan
VIEW_US_BLUR = 2.0             # px (ultrasound): Gaussian σ against the speckle
VIEW_MIN_PX = 500              # a view must share this many fan pixels with the ultrasound
VIEW_BINS = 16                 # grey levels of the mutual information's joint histogram
VIEW_STRIDE = 2                # px: every 2nd fan pixel each way (both images are blurred)


VIEW_LUT_BINS = 64              # CT grey levels of the lookup table (ranker.cfg.view_lut)
VIEW_LUT_PRE_BLUR = 1.0         # px (CT): Gaussian σ before the lookup (CT noise)
VIEW_LUT_POST_BLUR = 3.0        # px (CT): … and after it, to the ultrasound's blur


def view_lut_image(ct: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """The ultrasound grey that each CT pixel is expected to show: the CT window (H, W) float
    [0, 1] blurred by VIEW_LUT_PRE_BLUR, looked up in ``lut`` (VIEW_LUT_BINS,) (the mean
    ultrasound grey per CT grey bin, :func:`estimate_view_lut`) and blurred by
    VIEW_LUT_POST_BLUR. (H, W) float32."""
    lut = np.asarray(lut, np.float32)
    if lut.shape != (VIEW_LUT_BINS,):
        raise ValueError(f"lut: expected ({VIEW_LUT_BINS},), got {lut.shape}")
    q = cv2.GaussianBlur(ct.astype(np.float32), (0, 0), VIEW_LUT_PRE_BLUR)
    idx = np.clip((q * VIEW_LUT_BINS).astype(np.int32), 0, VIEW_LUT_BINS - 1)
    return cv2.GaussianBlur(lut[idx], (0, 0), VIEW_LUT_POST_BLUR)


def view_context(us: np.ndarray, us_mask: np.ndarray, ct: np.ndarray,
                 body: np.ndarray | None = None, lut: np.ndarray | None = None) -> dict | None:
    """What :func:`view_similarity` needs of one pair, computed once: the ultrasound (H, W)
    float [0, 1] and its tumour mask (H, W) bool, the CT window (H', W') float [0, 1] and its
    body mask (default :func:`body_mask`). The CT is compared as it is (blurred by
    VIEW_CT_BLUR), or with ``lut`` (VIEW_LUT_BINS,) as the ultrasound grey it is expected to
    show (:func:`view_lut_image`). None when the ultrasound has no tumour or no fan."""
    ys, xs = np.nonzero(us_mask)
    fan = cv2.morphologyEx((us > 0).astype(np.uint8), cv2.MORPH_CLOSE,
                           np.ones((5, 5), np.uint8)) > 0
    if len(xs) == 0 or fan.sum() < VIEW_MIN_PX:
        return None
    fy, fx = np.nonzero(fan[::VIEW_STRIDE, ::VIEW_STRIDE])
    fy, fx = fy * VIEW_STRIDE, fx * VIEW_STRIDE
    blurred = cv2.GaussianBlur(us.astype(np.float32), (0, 0), VIEW_US_BLUR)
    w = us.shape[1]
    seen = (cv2.GaussianBlur(ct.astype(np.float32), (0, 0), VIEW_CT_BLUR) if lut is None
            else view_lut_image(ct, lut))
    return dict(u=(fx + 0.5 - w / 2).astype(np.float32), v=(fy + 0.5).astype(np.float32),
                us=np.clip(blurred[fy, fx], 0, 1), row=float(ys.mean()) + 0.5, shape=us.shape,
                ct=seen, body=body_mask(ct) if body is None else body)


def view_samples(ctx: dict, obj: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The CT of ``ctx`` (:func:`view_context`) as probes aimed at the candidate ``obj``
    ((H', W') bool) see it: for each direction of PROBE_DIRECTIONS and half angle of
    VIEW_HALF_ANGLES, a curvilinear probe on the skin (its apex APEX_BACK_PX behind it),
    scaled so the candidate's centre lands on the ultrasound tumour's row, samples the CT at
    the ultrasound's fan pixels. Returns the samples (V, N) float32 and where each view's fan
    covers them (V, N) bool, for the V possible views and the N fan pixels of ``ctx``; None if
    no view is possible.

    The probe model is the data set's (registration.data.usct.place_probe, Probe.to_ct): a
    fan whose width fills the image, r0 = apex to skin."""
    ys, xs = np.nonzero(obj)
    if len(xs) == 0:
        raise ValueError("obj: expected a non-empty mask")
    t = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    along = skin_distances(ctx["body"], t)
    d = np.stack([np.cos(PROBE_DIRECTIONS), np.sin(PROBE_DIRECTIONS)], 1)      # (D, 2)
    r0 = APEX_BACK_PX
    apex = t[None] + (along + r0)[:, None] * d                                # (D, 2)
    axis = -d
    depth = along + r0                                                        # apex → centre
    h = VIEW_HALF_ANGLES
    # per (direction, half angle): CT px per ultrasound px, from the tumour's row
    scale = (depth[:, None] - r0 * np.cos(h)[None]) / ctx["row"]             # (D, A)
    r1 = scale * ctx["shape"][1] / (2 * np.sin(h)[None])
    ok = (scale > 0) & (r1 > depth[:, None])
    di, ai = np.nonzero(ok)
    if not len(di):
        return None
    s = scale[di, ai][:, None].astype(np.float32)
    big_x = ctx["u"][None] * s                                                # (V, N)
    big_y = ctx["v"][None] * s + (r0 * np.cos(h[ai]))[:, None].astype(np.float32)
    r2 = big_x * big_x + big_y * big_y
    inside = ((np.abs(big_x) <= big_y * np.tan(h[ai])[:, None].astype(np.float32))
              & (r2 >= r0 * r0) & (r2 <= (r1[di, ai] ** 2)[:, None].astype(np.float32)))
    ax = axis[di, 0][:, None].astype(np.float32)
    ay = axis[di, 1][:, None].astype(np.float32)
    cx = (apex[di, 0] - 0.5)[:, None].astype(np.float32) + big_y * ax - big_x * ay
    cy = (apex[di, 1] - 0.5)[:, None].astype(np.float32) + big_y * ay + big_x * ax
    ct = cv2.remap(ctx["ct"], cx, cy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=0)
    return ct, inside


def view_scores(ct: np.ndarray, inside: np.ndarray, us: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: normalised cross-correlation and mutual information (nats, VIEW_BINS grey
    levels) of the samples ``ct`` (V, N) with ``us`` (N,) over the pixels ``inside`` (V, N),
    and whether the view covers VIEW_MIN_PX of the fan (all (V,))."""
    n = inside.sum(1)
    valid = n * VIEW_STRIDE ** 2 >= VIEW_MIN_PX
    nf = np.maximum(n, 1).astype(np.float64)
    m = inside.astype(np.float32)
    cm = ct * m
    s_c, s_u = cm.sum(1, dtype=np.float64), m @ us
    s_cc = (cm * ct).sum(1, dtype=np.float64)
    s_uu, s_cu = m @ (us * us), cm @ us
    cov = s_cu - s_c * s_u / nf
    var_c = np.maximum(s_cc - s_c * s_c / nf, 0.0)
    var_u = np.maximum(s_uu - s_u * s_u / nf, 0.0)
    ncc = cov / (np.sqrt(var_c * var_u) + 1e-9)
    b = VIEW_BINS
    qa = np.clip((ct * b).astype(np.int32), 0, b - 1)
    qb = np.clip((us * b).astype(np.int32), 0, b - 1)
    idx = (np.arange(len(ct), dtype=np.int32)[:, None] * b + qa) * b + qb[None]
    joint = np.bincount(idx[inside], minlength=len(ct) * b * b)
    p = joint.reshape(len(ct), b, b) / nf[:, None, None]
    pa, pb = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / (pa * pb)), 0.0)
    return ncc, terms.sum((1, 2)), valid


def _valid_views(ctx: dict, obj: np.ndarray):
    """:func:`view_samples` scored by :func:`view_scores`: (samples, inside, ncc, mi) of the
    views that cover VIEW_MIN_PX of the fan, or None if none does."""
    views = view_samples(ctx, obj)
    if views is None:
        return None
    ncc, mi, valid = view_scores(*views, ctx["us"])
    if not valid.any():
        return None
    return views[0][valid], views[1][valid], ncc[valid], mi[valid]


def view_similarity(ctx: dict, obj: np.ndarray) -> tuple[float, float]:
    """The best agreement between the ultrasound and the CT seen from the skin, over probes
    aimed at the candidate ``obj`` ((H', W') bool in the CT of ``ctx``, from
    :func:`view_context`; the views of :func:`view_samples`). Returns (normalised
    cross-correlation, mutual information in nats) with the blurred ultrasound, each the
    maximum over the views; (0, 0) if no view shares VIEW_MIN_PX pixels with the fan."""
    views = _valid_views(ctx, obj)
    if views is None:
        return 0.0, 0.0
    return float(views[2].max()), float(views[3].max())


def best_view(ctx: dict, obj: np.ndarray) -> tuple[np.ndarray, float] | None:
    """For pictures: the view of the candidate ``obj`` with the highest normalised
    cross-correlation (:func:`view_samples`, :func:`view_scores`) as an image on the
    ultrasound's grid of fan pixels, every VIEW_STRIDE-th each way ((H/VIEW_STRIDE,
    W/VIEW_STRIDE) float32, 0 outside that view's fan), and its correlation; None if no view
    shares VIEW_MIN_PX pixels with the fan."""
    views = _valid_views(ctx, obj)
    if views is None:
        return None
    samples, inside, ncc, _ = views
    k = int(np.argmax(ncc))
    h, w = ctx["shape"]
    img = np.zeros((-(-h // VIEW_STRIDE), -(-w // VIEW_STRIDE)), np.float32)
    rows = (ctx["v"] // VIEW_STRIDE).astype(np.intp)
    cols = ((ctx["u"] + w / 2) // VIEW_STRIDE).astype(np.intp)
    img[rows[inside[k]], cols[inside[k]]] = samples[k][inside[k]]
    return img, float(ncc[k])


def estimate_view_lut(samples, min_mi: float = 0.2, min_count: int = 50) -> np.ndarray:
    """The lookup table of :func:`view_lut_image` from pairs whose target is known: for
    each (ultrasound (H, W) float [0, 1], its tumour mask (H, W) bool, CT window (H', W')
    float [0, 1], the target's mask in the CT (H', W') bool), the view of the target with the
    highest mutual information (views of :func:`view_samples` of the CT blurred by
    VIEW_LUT_PRE_BLUR) is taken where that is at least ``min_mi`` nats; the table is the
    mean blurred-ultrasound grey per CT grey bin over those views' fan pixels. Bins with
    fewer than ``min_count`` pixels take their nearest filled neighbour's value.
    Returns (VIEW_LUT_BINS,) float32."""
    total = np.zeros(VIEW_LUT_BINS)
    count = np.zeros(VIEW_LUT_BINS)
    for us, us_mask, ct, target in samples:
        ctx = view_context(us, us_mask, ct)
        if ctx is None or not target.any():
            continue
        ctx["ct"] = cv2.GaussianBlur(ct.astype(np.float32), (0, 0), VIEW_LUT_PRE_BLUR)
        views = _valid_views(ctx, target)
        if views is None or views[3].max() < min_mi:
            continue
        k = int(np.argmax(views[3]))
        ct_k, inside = views[0][k], views[1][k]
        b = np.clip((ct_k[inside] * VIEW_LUT_BINS).astype(np.int64), 0, VIEW_LUT_BINS - 1)
        total += np.bincount(b, weights=ctx["us"][inside], minlength=VIEW_LUT_BINS)
        count += np.bincount(b, minlength=VIEW_LUT_BINS)
    filled = np.flatnonzero(count >= min_count)
    if not len(filled):
        raise ValueError("estimate_view_lut: no pair gave a view of its target; expected "
                         "pairs whose ultrasound shows the target tumour in a fan")
    lut = np.zeros(VIEW_LUT_BINS, np.float32)
    lut[filled] = total[filled] / count[filled]
    empty = np.flatnonzero(count < min_count)
    if len(empty):
        near = filled[np.abs(empty[:, None] - filled[None]).argmin(1)]
        lut[empty] = lut[near]
    return lut


class Ranker(nn.Module):
    """(B, N_FEATURES) candidate features → (B,) logits, "this candidate is the target":
    features standardised by buffers set from the training set (:meth:`set_scale`), then an
    MLP (``cfg.hidden`` ReLU layers)."""

    def __init__(self, cfg: RankerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RankerConfig()
        self.register_buffer("mean", torch.zeros(cfg.features))
        self.register_buffer("std", torch.ones(cfg.features))
        if cfg.view_lut:
            if not cfg.view:
                raise ValueError("cfg.view_lut: expected cfg.view too (the table maps the "
                                 "view's CT), got view=False")
            # set by the training (estimate_view_lut); the identity until then
            self.register_buffer("view_lut", (torch.arange(VIEW_LUT_BINS) + 0.5) / VIEW_LUT_BINS)
        layers: list[nn.Module] = []
        c = cfg.features
        for h in cfg.hidden:
            layers += [nn.Linear(c, h), nn.ReLU()]
            c = h
        self.mlp = nn.Sequential(*layers, nn.Linear(c, 1))

    def set_scale(self, x: torch.Tensor) -> None:
        """Standardise by the mean and spread of training features x (N, F)."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.cfg.features:
            raise ValueError(f"x: expected (B, {self.cfg.features}), got {tuple(x.shape)}")
        return self.mlp((x - self.mean) / self.std)[:, 0]


def group_table(groups: np.ndarray, ranks: np.ndarray, labels: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (N,) as rows of their pair: index (G, k) into the N candidates (-1 where
    a pair has fewer) and each row's positive column (G,), for the G pairs with exactly one
    positive candidate."""
    rows, target = [], []
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        pos = sel[labels[sel] > 0.5]
        if len(pos) != 1:
            continue
        row = np.full(k, -1, np.int64)
        row[ranks[sel]] = sel
        rows.append(row)
        target.append(int(ranks[pos[0]]))
    if not rows:
        return np.zeros((0, k), np.int64), np.zeros(0, np.int64)
    return np.stack(rows), np.array(target, np.int64)


def listwise_loss(logits: torch.Tensor, table: torch.Tensor, target: torch.Tensor
                  ) -> torch.Tensor:
    """Cross-entropy of each pair's softmax over its candidates against its target:
    candidate logits (N,), ``table`` (G, k) indices into them (-1: none), target (G,)."""
    x = logits[table.clamp_min(0)].masked_fill(table < 0, float("-inf"))
    return torch.nn.functional.cross_entropy(x, target)


@torch.no_grad()
def candidate_table(pipe, scenes, k: int, batch: int = 32, view: bool = False,
                    lut: np.ndarray | None = None):
    """The pipeline's top-k SSD candidates on scenes with known target boxes, as the ranker
    sees them: features (N, F) float32 (with ``view``, the view similarity's two appended;
    with ``lut``, against the CT mapped through it, :func:`view_lut_image`),
    labels (N,) (1: the snapped box overlaps the target's with IoU ≥ 0.5), the scene index
    (N,) and the rank (N,) of each."""
    from .metrics import box_iou
    from .verify import POSITIVE_IOU, _prepared_chunks
    xs, labels, groups, ranks = [], [], [], []
    for start, chunk, prep in _prepared_chunks(pipe, scenes, batch):
        f_t, q_t, lb = pipe._ssd_inputs(prep)
        cands = pipe.localizer.candidates(f_t, q_t, k)
        x, owner, rank, boxes = pipe._ranker_features(prep, cands, lb, views=view, lut=lut)
        for f, i, j, b in zip(x, owner.tolist(), rank.tolist(), boxes):
            sc = prep[i]["scale"]
            xs.append(f)
            labels.append(float(box_iou([v / sc for v in b], chunk[i].box.tolist())
                                >= POSITIVE_IOU))
            groups.append(start + i)
            ranks.append(j)
    if not xs:
        return (np.zeros((0, N_FEATURES + 2 * view), np.float32), np.zeros(0, np.float32),
                np.zeros(0, np.int64), np.zeros(0, np.int64))
    return (np.stack(xs), np.array(labels, np.float32), np.array(groups, np.int64),
            np.array(ranks, np.int64))
