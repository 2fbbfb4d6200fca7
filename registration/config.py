"""Config dataclasses. Each model is built from one of these, and it is saved beside the weights
as ``config.json`` so a checkpoint always rebuilds the exact network that produced it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MatcherConfig:
    """STN that maps a (moving, fixed) mask pair to TPS parameters (paper Table 2)."""

    input_size: int = 28          # masks are resized to input_size × input_size
    grid_size: int = 8            # √K: control points on a grid_size × grid_size lattice
    channels: tuple[int, int, int] = (32, 64, 128)
    pooled: int = 4               # adaptive average pool before the FC head keeps it small
    hidden: int = 256             # FC width (paper: 256 for MNIST)
    leaky_slope: float = 1e-4     # paper: leaky ReLU α = 1e-4
    smooth_weight: float = 1.0    # λ in the paper's loss (eq. 3)
    fold_weight: float = 1.0      # penalty on negative Jacobian determinants of the dense warp
    # cascade: at inference the network is applied this many times, each pass to the moving
    # mask as warped so far, and the warps are composed into one TPS (1 = the paper's one shot)
    passes: int = 1
    # channels per mask: 1 = plain masks; 2 = part-labelled masks (one channel per part,
    # registration.data.silhouettes.split_parts), Dice summed over parts
    mask_channels: int = 1
    # "regress": the paper's design, conv features → FC → TPS parameters; "flow": a small
    # U-Net predicts a displacement at every pixel, and a fixed least-squares projection turns
    # it into TPS parameters (so the output is still one TPS with its control grid)
    arch: str = "regress"
    unet_channels: tuple[int, ...] = (16, 32, 64)
    # "flow": the U-Net's decoder stops at 1/flow_scale of the input resolution (1, 2, 4, …:
    # the TPS needs no per-pixel detail, and the full-resolution layers cost most of the time)
    flow_scale: int = 1
    # the folding penalty is relu(fold_margin − det J): a margin above 0 keeps warps away from
    # the fold instead of stopping at its edge
    fold_margin: float = 0.0
    # test-time refinement's Adam step size (normalised units; Matcher.refine). Tuned per
    # design on validation pairs: 0.02 for the regressor, 0.01 for the flow matcher, whose
    # start is closer
    refine_lr: float = 0.02
    # refinement judges folding on a grid this many times finer than the pixels (1 = the
    # pixel grid, as in training); creases narrower than a pixel only show on a finer one
    fold_supersample: int = 1
    kind: str = "matcher"


# Named matcher designs (``python -m registration.train matcher --preset NAME``):
# "default": what ships — the flow U-Net projected onto a 12×12 TPS, one pass, a folding
#   penalty with a margin (README, "The flow matcher");
# "cascade": the previous default — the paper's regressor with an 8×8 grid applied 3 times;
# "paper": the paper's TPS layer as published (4×4 = 16 control points, one pass, no folding
#   penalty).
MATCHER_PRESETS = {
    "default": {"arch": "flow", "grid_size": 12, "flow_scale": 2, "passes": 1,
                "fold_weight": 10.0, "fold_margin": 0.2, "refine_lr": 0.01},
    "cascade": {"arch": "regress", "grid_size": 8, "passes": 3, "fold_weight": 1.0},
    "paper": {"arch": "regress", "grid_size": 4, "passes": 1, "fold_weight": 0.0},
}


@dataclass
class LocalizerConfig:
    """Query-conditioned SSD (paper Table 1)."""

    image_size: int = 112
    query_size: int = 28
    # first layer: "conv" (the paper's: a 5×5 conv at full resolution, then pooling) or
    # "unshuffle" (each 2×2 block of pixels becomes 4 channels, then a 3×3 conv at half
    # resolution: the same stride-2 start with no single-channel convolution over every pixel)
    stem: str = "conv"
    channels: tuple[int, ...] = (32, 48, 64, 64, 48, 48, 32)
    conditioning: str = "film"    # "film" (query encoder scales/shifts features) or "stack" (paper)
    film_layers: tuple[int, ...] = (2, 3, 4)   # 0-based conv indices modulated by FiLM
    query_dim: int = 64
    head_layers: tuple[int, ...] = (3, 4, 5, 6)  # c4..c7 carry anchors
    # anchor sizes per head level as a fraction of image_size; fitted to the data's 20–56 px
    # targets within the paper's 0.08–0.96 range
    scales: tuple[float, ...] = (0.2, 0.38, 0.6, 0.96)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)   # width / height
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    pos_iou: float = 0.5
    neg_ratio: int = 3
    kind: str = "localizer"


@dataclass
class DatasetConfig:
    """How the pipeline turns images into masks for one data set."""

    name: str = "mnist"
    segmenter: str = "otsu"       # "otsu" or "learned" (checkpoints/<name>/segmenter)
    # objects are bright on a dark background; an image with a mostly bright border is inverted
    # (False where polarity varies and the learned segmenter copes with both)
    bright_objects: bool = True
    # a fixed foreground threshold in [0, 1] (MNIST masks are pixels > 127 by definition);
    # None = Otsu's threshold per image. Otsu is also the fallback when the fixed one finds nothing
    threshold: float | None = None
    crop_margin: float = 1.4      # square side = margin × longest box side (MNIST: 28/20)
    # the localizer's query: "object" = the moving image cropped around its object (box ×
    # crop_margin); "whole" = the whole moving image (US–CT: the fan's anatomy around the
    # tumour tells which of several tumours it is)
    query: str = "object"
    # re-rank the SSD's top ``rerank`` boxes (after NMS) by how much the object segmented in
    # each looks like the moving object (Dice of the object-centric masks); 0 or 1 = top box
    rerank: int = 0
    # re-rank with a learned same-object verifier (checkpoints/<name>/verifier) instead of
    # the shape overlap
    verifier: bool = False
    # add the fixed foreground's connected components to the re-ranked candidates (the given
    # fixed mask's, else the segmenter's on the whole frame)
    component_candidates: bool = False
    # … and the pieces of each component that an erosion splits in two or more (animals that
    # touch are one component; registration.segment.split_touching)
    split_components: bool = False
    # with a verifier, add this × the Dice of the two object-centric masks as they are (the
    # shapes agree) to each candidate's value
    shape_weight: float = 0.0
    # with component candidates: where the choice is an SSD box, take instead a whole object
    # (component or piece) that is the same object (registration.choose.SAME_OBJECT_IOU) and
    # values at most registration.pipeline.WHOLE_OBJECT_MARGIN less
    prefer_whole: bool = False
    # with a kind-classifying verifier, where the fixed mask is segmented (not given): choose
    # among the candidates with a learned scorer (checkpoints/<name>/chooser,
    # registration.choose) instead of the hand-set choice above
    chooser: bool = False
    # re-rank the SSD's candidates with a learned scorer of the pair's geometry
    # (checkpoints/<name>/ranker, registration.ranker; US–CT), before the above
    ranker: bool = False
    min_object_px: int = 4
    # test-time refinement steps for Pipeline.from_pretrained (None: its default)
    refine_steps: int | None = None
    snap_clip: float | None = 0.1  # the fixed mask is clipped to the SSD box grown by this
    # learned segmenter: on the whole moving image and the whole fixed frame, average its
    # logits with those on the mirror image (test-time augmentation; the crops around the
    # localizer's candidates are segmented once)
    segment_flip: bool = False


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuild a config, turning JSON lists back into tuples and ignoring unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            continue
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


# Per-data-set model settings, over the dataclass defaults (which are MNIST's).
# Silhouettes: 128×128 fixed scenes, 64×64 moving images (registration.data.silhouettes).
DATASET_MODELS: dict[str, dict[str, dict]] = {
    "silhouettes": {"localizer": {"image_size": 128, "query_size": 64},
                    "matcher": {"input_size": 32},
                    "matcher-full": {"input_size": 64, "grid_size": 16}},
    # US–CT: the 256-px CT is seen by the SSD at 128 px, where tumours are 7–17 px; anchors
    # therefore sit on c3–c6 (strides 4–32 px) with small scales, the query is the 64-px crop
    # around the ultrasound's tumour; tumour masks are matched at 32 px
    "usct": {"localizer": {"image_size": 128, "query_size": 64, "head_layers": (2, 3, 4, 5),
                           "scales": (0.06, 0.1, 0.16, 0.26)},
             "matcher": {"input_size": 32},
             "matcher-full": {"input_size": 64, "grid_size": 16}},
}

@dataclass
class SegNetConfig:
    """Learned segmenter (registration.segnet): a small U-Net for object-centric crops."""

    input_size: int = 64                      # crops are resized to input_size × input_size
    channels: tuple[int, ...] = (16, 32, 64)  # one entry per level, the last is the bottleneck
    margin: float = 1.4                       # crop side = margin × the box's longest side
    dice_weight: float = 1.0                  # loss = dice_weight·(1 − soft Dice) + bce_weight·BCE
    bce_weight: float = 1.0
    kind: str = "segnet"


@dataclass
class VerifierConfig:
    """Same-object verifier (registration.verify): two object-centric masks → one logit."""

    input_size: int = 32          # the matcher's crop size for the data set
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 64
    # 0: one network sees both masks and says "same" or not; n > 0: one network classifies
    # each mask into the data set's n kinds and "same" is the chance both are the same kind
    classes: int = 0
    # the "bn" design (--verifier-arch bn): BatchNorm after every convolution, global average
    # pooling and dropout before the logits instead of the flattened hidden layer, and each
    # mask's kind averaged with its mirror image's ("plain": the first design)
    arch: str = "plain"
    dropout: float = 0.0
    # classes > 0 only: also see the grey detail inside each object (a second input channel,
    # registration.verify.object_detail), not just its outline
    grey: bool = False
    kind: str = "verifier"


@dataclass
class RankerConfig:
    """Candidate re-ranker from the pair's geometry (registration.ranker): features → logit."""

    features: int = 17
    hidden: tuple[int, ...] = (32, 32)
    top_k: int = 4                # the SSD's candidates it re-ranks (after NMS)
    kind: str = "ranker"
    # the last two features are the view from the skin (ranker.view_similarity: NCC, mutual
    # information), computed by the pipeline and appended to the geometry's
    view: bool = False
    # … with the CT first mapped to the ultrasound grey each CT grey is expected to show, by a
    # lookup table estimated from the training pairs and kept as the buffer ``view_lut``
    # (ranker.view_lut_image, ranker.estimate_view_lut); needs ``view``
    view_lut: bool = False


# the localizer's "unshuffle" stem (``--stem unshuffle``): the 2×2 pixel blocks replace the
# full-resolution first layer, so one block fewer reaches the same head maps (14, 7, 3, 1 on a
# 112-px image) with two thirds of the multiply-adds (~60 M vs ~92 M) and no single-channel
# convolution over every pixel
UNSHUFFLE_LOCALIZER = {"stem": "unshuffle", "channels": (48, 96, 64, 64, 48, 32),
                       "film_layers": (1, 2, 3), "head_layers": (2, 3, 4, 5)}

CONFIGS = {"matcher": MatcherConfig, "localizer": LocalizerConfig, "segnet": SegNetConfig,
           "verifier": VerifierConfig, "ranker": RankerConfig}
