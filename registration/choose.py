"""Which candidate is the target? A learned chooser over the verifier's candidates (silhouettes).

With learned masks the silhouettes' candidates are rough: the segmenter joins touching animals
and frays outlines, an SSD box cuts an animal where it misses part of it, and the same animal
comes back as several candidates (SSD boxes, its component, pieces of it). The hand-set choice
(the verifier's probability + ``DatasetConfig.shape_weight`` × the masks' Dice + 0.1 × the SSD
score, a whole object preferred to a cut of it) is tuned for true masks. This module describes
each candidate of a pair by what that choice sees and more (:func:`choice_features`): the kind
probabilities of the moving object and the candidate, how much of its object its box cut off,
its size against the other candidates that are the same object, whether a whole object is among
those, its aspect against the moving object's, and the hand-set value itself. A small MLP
(``registration.ranker.Ranker`` with ``RankerConfig(features=N_FEATURES)``) scores them, trained
with a listwise softmax loss on the pipeline's own candidates in validation-part scenes
(``python -m registration.train chooser --dataset silhouettes``); the pipeline uses it where the
fixed mask is segmented (``DatasetConfig.chooser``), and the hand-set choice where it is given.
"""
from __future__ import annotations

import numpy as np
import torch

N_FEATURES = 18
HAND_SET_FEATURE = 15       # the column of choice_features that is the hand-set value
SAME_OBJECT_IOU = 0.5       # candidates whose objects overlap this much are one object
POSITIVE_IOU = 0.82         # training: the best candidate is the target if its box IoU ≥ this


def mask_iou_matrix(objs: list[np.ndarray]) -> np.ndarray:
    """(N, N) IoU of N (H, W) bool masks, computed inside their joint bounding box."""
    n = len(objs)
    if n == 0:
        return np.zeros((0, 0))
    union = np.logical_or.reduce(objs)
    ys, xs = np.nonzero(union)
    if len(ys) == 0:
        return np.zeros((n, n))
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    flat = np.stack([o[sl].ravel() for o in objs]).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1)


def _log_aspect(box) -> float:
    return float(np.log(max(box[2] - box[0], 1e-3) / max(box[3] - box[1], 1e-3)))


def choice_features(moving_kinds: np.ndarray, kinds: np.ndarray, dice: np.ndarray,
                    scores: np.ndarray, whole: np.ndarray, piece: np.ndarray,
                    cut: np.ndarray, objs: list[np.ndarray], moving_box, boxes,
                    value: np.ndarray, given: bool) -> np.ndarray:
    """Features (N, N_FEATURES) float32 of one pair's N candidates.

    moving_kinds (K,) and kinds (N, K): the verifier's kind probabilities; dice (N,): Dice of
    the object-centric masks; scores (N,): SSD scores (0 for whole objects); whole, piece (N,)
    bool: a foreground component or a piece of one (both are whole objects), not an SSD box's
    object; cut (N,): the share of an SSD candidate's object that its box cut off (0 for whole
    objects); objs: the N objects, (H, W) bool in one frame; moving_box and boxes (N): xyxy
    boxes of the moving object and the candidates' objects (px); value (N,): the hand-set
    choice's value; given: the fixed mask was given, not segmented.
    """
    n = len(kinds)
    if not (len(dice) == len(scores) == len(whole) == len(piece) == len(cut) == len(objs)
            == len(boxes) == len(value) == n) or kinds.ndim != 2 \
            or kinds.shape[1] != len(moving_kinds):
        raise ValueError(f"choice_features: expected {n} candidates × {len(moving_kinds)} kinds "
                         f"in every input, got kinds {kinds.shape}, dice {len(dice)}, scores "
                         f"{len(scores)}, objs {len(objs)}, boxes {len(boxes)}")
    if n == 0:
        return np.zeros((0, N_FEATURES), np.float32)
    same = kinds @ moving_kinds
    area = np.array([o.sum() for o in objs], np.float64).clip(1)
    m = mask_iou_matrix(objs) >= SAME_OBJECT_IOU
    whole = np.asarray(whole, bool)
    typical = np.median(area[whole]) if whole.any() else np.median(area)
    top = int(np.argmax(moving_kinds))
    entropy = -(kinds * np.log(kinds + 1e-9)).sum(1)
    a_mov = _log_aspect(moving_box)
    out = np.zeros((n, N_FEATURES), np.float32)
    for c in range(n):
        twins = [k for k in range(n) if k != c and m[c, k] and whole[k]]
        out[c] = [same[c], same[c] - same.max(), dice[c], scores[c], float(whole[c]),
                  float(piece[c]), cut[c], np.log(area[c] / area[m[c]].max()),
                  max(same[k] for k in twins) - same[c] if twins else 0.0, float(bool(twins)),
                  abs(_log_aspect(boxes[c]) - a_mov), moving_kinds.max(), entropy[c],
                  kinds[c, top], np.log(area[c] / typical), value[c], value[c] - value.max(),
                  float(given)]
    return out


@torch.no_grad()
def choice_table(pipe, scenes, given_masks: bool, batch: int = 32):
    """The chooser's inputs on scenes with known target boxes, as the pipeline sees them:
    features (N, N_FEATURES) float32, labels (N,) (1: the scene's candidate whose snapped box
    overlaps the target's most, if by IoU ≥ POSITIVE_IOU), scene index (N,) and position
    among its scene's candidates (N,). ``given_masks``: the pipeline is given the true moving
    mask and fixed foreground (else it segments them); the chooser is used without."""
    from .metrics import box_iou
    from .verify import _prepared_chunks
    xs, labels, groups, pos = [], [], [], []
    for start, chunk, prep in _prepared_chunks(pipe, scenes, batch, given_masks):
        f_t, q_t, lb = pipe._ssd_inputs(prep)
        cands = pipe.localizer.candidates(f_t, q_t, pipe.dataset.rerank)
        n_ssd = [len(c[0]) for c in cands]
        c = pipe._candidate_values(prep, cands, lb)
        if c is None or c["kinds_moving"] is None:
            continue
        for i, p in enumerate(prep):
            rows = np.flatnonzero(c["owner"] == i)
            if not len(rows):
                continue
            sc = p["scale"]
            iou = np.array([box_iou([v / sc for v in c["snapped"][k]], chunk[i].box.tolist())
                            for k in rows])
            y = np.zeros(len(rows), np.float32)
            if iou.max() >= POSITIVE_IOU:
                y[int(np.argmax(iou))] = 1.0
            xs.append(pipe._choice_features(p, rows, n_ssd[i], c))
            labels.append(y)
            groups.append(np.full(len(rows), start + i))
            pos.append(np.arange(len(rows)))
    if not xs:
        return (np.zeros((0, N_FEATURES), np.float32), np.zeros(0, np.float32),
                np.zeros(0, np.int64), np.zeros(0, np.int64))
    return (np.concatenate(xs), np.concatenate(labels), np.concatenate(groups).astype(np.int64),
            np.concatenate(pos).astype(np.int64))
