"""Animal silhouettes in clutter: the paper's Caltech-101 experiment (§4.3) on shipped data.

**Source.** The ``animal-shape-mnist==0.39`` wheel (MIT) ships 10,000 real animal silhouettes
as two gzipped pickles, ``animal_shape_mnist/data/Animal Shape/animal_data_version_3.gz``
and ``…/animal_label_version_3.gz``. Only those two files are read, from the installed
package's folder (found with ``importlib.util.find_spec``, which does not import the
package), through :class:`NumpyUnpickler`, which resolves nothing but numpy's array
reconstruction, so the files cannot execute code. Nothing is downloaded.

**What is in them** (checked on 0.39):

- images: ``(10000, 28, 28) uint8``, values 0–255 (all 256 levels occur). About 61 % of
  pixels are exactly 0 (background), 16 % exactly 255; most silhouettes are flat white, but
  zebras (and some giraffes) carry their stripes/patches as mid greys (96–224) inside the body.
- labels: ``(10000,) int64``, sorted, 10 classes × 1,000: 0 bear, 1 bird, 2 cat, 3 cow, 4 dog,
  5 elephant, 6 giraffe, 7 horse, 8 sheep, 9 zebra (the package's alphabetical list, checked
  by eye against the images).
- the animal's tight box is 24 × 24 px at the median (3–28 px); 25 % of the silhouettes touch
  the 28×28 border; 75 % are one 8-connected component at ``> 127``.
- 284 pairs of byte-identical images, always within one class (188 pairs among birds).
  The split keeps each pair on one side, so no test image also appears in training.

**Masks** are pixels ``> MASK_THRESHOLD`` (31), not MNIST's 127: at 127 a zebra loses its dark
stripes (a third of its body), at 31 it keeps its outline while the background (0 and the
faint anti-aliasing around the body) stays out.

**Split** (by instance, fixed, seeded with ``SPLIT_SEED``): per class, 800 training and 200
test rows; the last 80 training rows of each class (in the seeded order) are the validation
rows, as in ``mnist.rows('val')``. ``rows('train')`` is 720 per class.

**Scenes** (:class:`SceneGenerator`). Moving image: ``MOVING_SIZE``² (64 × 64) with one animal
whose box's longest side is 60–85 % of the side ("over half the frame", paper §4.1). Fixed
image: ``SIZE``² (128 × 128) with another instance of the same class whose box's longest side
is 20–45 % of the side (so both sides are under half the frame), at a random place, plus 1–3
animals of other classes (box overlap with the target ≤ 10 % of the target box's area), drawn
*under* the target so the target's mask is all visible. Backgrounds are random crops of
scikit-image's real textures ``brick``, ``grass``, ``gravel`` (zoom, flips, 90° turns,
gamma, contrast, an illumination ramp); test scenes crop only the bottom 128 rows of each
texture, training/validation scenes only the rest. Every animal of a scene is painted with
the same "paint": one of the three textures, smoother (magnified more), never the one behind
them, at its own mean grey, lighter or darker than the background by a modest step (0.15–0.28 against a
background spread of 0.08–0.15; polarity random per scene), plus the silhouette's own grey
detail (zebra stripes). So a plain threshold fails: see ``scripts/silhouette_samples.py``.

The moving instance is mirrored when its mirror image matches the target's outline better
(IoU of the two masks stretched to a common box): the data mixes left- and right-facing
animals, and a TPS warp cannot turn one into the other (Caltech-101's categories are mostly
photographed in one pose). ``align_facing=False`` turns this off.

Ground truth: the target's mask (bool, fixed frame) and its tight box, xyxy pixels (x1, y1
exclusive); the moving animal's mask and box likewise.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .scenes import mask_box

try:                                   # numpy ≥ 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:                    # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
N_PER_CLASS = 1000
N_TRAIN_PER_CLASS = 800
N_TEST_PER_CLASS = N_PER_CLASS - N_TRAIN_PER_CLASS
N_VAL_PER_CLASS = 80        # the last 80 of each class's 800 training rows validate
MASK_THRESHOLD = 31
SPLIT_SEED = 0

SIZE = 128                  # fixed image side
MOVING_SIZE = 64            # moving image side
MOVING_FRAC = (0.60, 0.85)  # moving animal: longest box side / MOVING_SIZE
TARGET_FRAC = (0.20, 0.45)  # target and distractors: longest box side / SIZE
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_TEST_ROWS = 128     # test scenes crop textures from their last 128 rows only

DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"

# ---------------------------------------------------------------------------------------------
# reading the shipped pickles safely

# Every global a pickled plain numpy array may name (pickle protocols 3–5, numpy 1.x or 2.x
# module names), and nothing else. ``scalar`` rebuilds numpy scalars and only wraps bytes in
# a dtype; ``_frombuffer`` is how protocol 5 rebuilds an array from its bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    ``find_class`` is the only way a pickle reaches callables; it returns numpy's array
    reconstruction helpers and raises ``pickle.UnpicklingError`` for every other global
    (``os.system``, ``builtins.eval``, …) before anything is called.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: expected only numpy array reconstruction "
                f"({', '.join(sorted({f'{m}.{n}' for m, n in _ALLOWED_GLOBALS}))})") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}")


def load_array(path: str | Path) -> np.ndarray:
    """One gzipped pickle of a numpy array, through :class:`NumpyUnpickler`. Object arrays are
    refused too (their items would be arbitrary Python objects)."""
    with gzip.open(path, "rb") as f:
        arr = NumpyUnpickler(f).load()
    if not isinstance(arr, np.ndarray):
        raise pickle.UnpicklingError(f"{path}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype.hasobject:
        raise pickle.UnpicklingError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def _package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of a top-level package, without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"package {package!r} not installed; install it with "
                                f"`pip install {pip_name}`")
    return Path(locations[0])


def data_dir() -> Path:
    """``…/site-packages/animal_shape_mnist/data/Animal Shape``."""
    return _package_dir("animal_shape_mnist", "animal-shape-mnist==0.39") / "data" / "Animal Shape"


@functools.lru_cache(maxsize=1)
def load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 silhouettes: images (N, 28, 28) uint8 and labels (N,) int64, read-only."""
    d = data_dir()
    for name in (DATA_FILE, LABEL_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} missing; reinstall animal-shape-mnist==0.39")
    images, labels = load_array(d / DATA_FILE), load_array(d / LABEL_FILE)
    if images.shape != (len(CLASSES) * N_PER_CLASS, 28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{DATA_FILE}: expected (10000, 28, 28) uint8, got "
                         f"{images.shape} {images.dtype}")
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=len(CLASSES)) if labels.min() >= 0 else None
    if labels.shape != (len(images),) or counts is None or len(counts) != len(CLASSES) \
            or not (counts == N_PER_CLASS).all():
        raise ValueError(f"{LABEL_FILE}: expected 10 classes × {N_PER_CLASS} labels, got shape "
                         f"{labels.shape} with counts {counts}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# ---------------------------------------------------------------------------------------------
# the split

def _fill(groups: list[np.ndarray], quota: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Take whole groups, in order, until exactly ``quota`` rows are taken (skipping groups
    that would overshoot). Returns (taken, left)."""
    taken, left, n = [], [], 0
    for g in groups:
        if n + len(g) <= quota:
            taken.append(g)
            n += len(g)
        else:
            left.append(g)
    if n != quota:
        raise RuntimeError(f"split: could not fill {quota} rows from whole duplicate groups")
    return taken, left


@functools.lru_cache(maxsize=1)
def _parts() -> np.ndarray:
    """Part of every row: 0 train, 1 val, 2 test. (N,) int8. Byte-identical images share a
    part; within each part the seeded order decides membership."""
    images, labels = load_all()
    first: dict[bytes, int] = {}
    group = np.array([first.setdefault(im.tobytes(), i) for i, im in enumerate(images)])
    rng = np.random.default_rng(SPLIT_SEED)
    part = np.zeros(len(labels), np.int8)
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        ids = np.unique(group[idx])
        groups = [idx[group[idx] == g] for g in rng.permutation(ids)]
        test, rest = _fill(groups, N_TEST_PER_CLASS)
        val, _ = _fill(rest[::-1], N_VAL_PER_CLASS)   # the end of the training order
        for g in test:
            part[g] = 2
        for g in val:
            part[g] = 1
    return part


def indices(part: str) -> np.ndarray:
    """Row indices into :func:`load_all` of 'train' (720 per class), 'val' (80), 'test' (200),
    or 'train+val' (the 800 training rows per class). Sorted ascending."""
    codes = {"train": (0,), "val": (1,), "test": (2,), "train+val": (0, 1)}
    if part not in codes:
        raise ValueError(f"part: expected one of {sorted(codes)}, got {part!r}")
    return np.flatnonzero(np.isin(_parts(), codes[part]))


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (800 rows per class) or 'test' (200): images, labels."""
    if name not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {name!r}")
    images, labels = load_all()
    idx = indices("train+val" if name == "train" else "test")
    return images[idx], labels[idx]


def rows(part: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (720 rows per class), 'val' (80, from the 800 training rows) or 'test' (200)."""
    if part not in ("train", "val", "test"):
        raise ValueError(f"part: expected 'train', 'val' or 'test', got {part!r}")
    images, labels = load_all()
    idx = indices(part)
    return images[idx], labels[idx]


def masks(images: np.ndarray) -> np.ndarray:
    """Silhouette masks: pixels > MASK_THRESHOLD. Same shape, bool."""
    return np.asarray(images) > MASK_THRESHOLD


# ---------------------------------------------------------------------------------------------
# textures

def texture_dir() -> Path:
    return _package_dir("skimage", "scikit-image==0.26.0") / "data"


@functools.lru_cache(maxsize=None)
def texture(name: str) -> np.ndarray:
    """scikit-image's ``{name}.png`` as float32 (512, 512) in [0, 1], read-only."""
    if name not in TEXTURES:
        raise ValueError(f"texture: expected one of {TEXTURES}, got {name!r}")
    path = texture_dir() / f"{name}.png"
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"{path} missing or unreadable; install scikit-image==0.26.0")
    out = img.astype(np.float32) / 255
    out.setflags(write=False)
    return out


def texture_patch(name: str, side: int, rng: np.random.Generator, test: bool,
                  zoom: tuple[float, float] = (1.0, 2.0)) -> np.ndarray:
    """A random (side, side) crop of a texture, magnified by a factor in ``zoom``, flipped /
    turned at random, gamma-changed, then standardised to mean 0, std 1. float32."""
    tex = texture(name)
    h, w = tex.shape
    r0, r1 = (h - TEXTURE_TEST_ROWS, h) if test else (0, h - TEXTURE_TEST_ROWS)
    src = int(round(side / rng.uniform(*zoom)))
    src = max(4, min(src, r1 - r0, w))
    y = int(rng.integers(r0, r1 - src + 1))
    x = int(rng.integers(0, w - src + 1))
    patch = cv2.resize(np.ascontiguousarray(tex[y:y + src, x:x + src]), (side, side),
                       interpolation=cv2.INTER_LINEAR)
    patch = np.rot90(patch, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = np.clip(patch, 0, 1) ** rng.uniform(0.7, 1.4)
    return ((patch - patch.mean()) / (patch.std() + 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# drawing animals

@dataclass
class Scene:
    moving: np.ndarray        # (MOVING_SIZE, MOVING_SIZE) uint8
    fixed: np.ndarray         # (SIZE, SIZE) uint8
    target_mask: np.ndarray   # (SIZE, SIZE) bool
    box: np.ndarray           # (4,) float32 xyxy pixels, tight box of target_mask
    label: int
    n_distractors: int
    moving_mask: np.ndarray   # (MOVING_SIZE, MOVING_SIZE) bool
    moving_box: np.ndarray    # (4,) float32 xyxy, tight box of moving_mask
    distractor_labels: tuple[int, ...] = ()   # classes of the placed distractors, in order
    all_mask: np.ndarray | None = None        # (SIZE, SIZE) bool: every animal, target included
    # (SIZE, SIZE) int32: every animal's own mask, 0 = ground, 1 … k+1 numbered by the left
    # edge of their boxes (the numbers say nothing of which is the target); where animals
    # overlap, the one drawn on top (the target is drawn last)
    all_labels: np.ndarray | None = None


@dataclass
class _Paint:
    """How one scene's animals and backgrounds look."""
    bg_mean: float
    bg_std: float
    polarity: float           # +1: animals lighter than the background, −1 darker
    step: float               # |animal mean − background mean|
    fill: str                 # texture inside the animals
    fill_std: float
    detail: float             # weight of the silhouette's own grey detail (zebra stripes)


def _new_paint(rng: np.random.Generator) -> _Paint:
    return _Paint(bg_mean=rng.uniform(0.35, 0.65), bg_std=rng.uniform(0.08, 0.15),
                  polarity=float(rng.choice([-1.0, 1.0])), step=rng.uniform(0.15, 0.28),
                  fill=str(rng.choice(TEXTURES)), fill_std=rng.uniform(0.04, 0.10),
                  detail=rng.uniform(0.2, 0.5))


def _shape_iou(a: np.ndarray, b: np.ndarray, side: int = 32) -> float:
    """IoU of two masks each cut to its tight box and stretched to side × side."""
    def norm(m):
        x0, y0, x1, y1 = mask_box(m).astype(int)
        return cv2.resize(m[y0:y1, x0:x1].astype(np.float32), (side, side)) > 0.5
    p, q = norm(a), norm(b)
    return float((p & q).sum() / max(1, (p | q).sum()))


def _place(image: np.ndarray, longest: float, rng: np.random.Generator, size: int):
    """Scale a 28×28 silhouette so its box's longest side is ``longest`` px and put it at a
    random place fully inside a size × size canvas.

    Returns alpha (size, size) float32 in [0, 1] (soft edges; the mask is alpha > 0.5),
    detail (size, size) float32 (the silhouette's grey level minus its median, on pixels one
    28-px step inside the outline, else 0), and the tight xyxy box of alpha > 0.5.
    """
    m = image > MASK_THRESHOLD
    x0, y0, x1, y1 = mask_box(m).astype(int)
    # grey detail only strictly inside: the anti-aliased rim would otherwise draw a dark
    # outline around every animal, a give-away no real photograph has
    core = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0) > 0
    grey = image.astype(np.float32) / 255
    detail = np.where(core, grey - (np.median(grey[core]) if core.any() else 0.0), 0.0)
    pad = 1
    a = np.pad(m.astype(np.float32), pad)[y0:y1 + 2 * pad, x0:x1 + 2 * pad]
    g = np.pad(detail.astype(np.float32), pad)[y0:y1 + 2 * pad, x0:x1 + 2 * pad]
    f = longest / max(x1 - x0, y1 - y0)
    w, h = max(1, int(round(a.shape[1] * f))), max(1, int(round(a.shape[0] * f)))
    a = np.clip(cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)
    g = cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)
    pbox = mask_box(a > 0.5)
    if pbox[2] - pbox[0] > size or pbox[3] - pbox[1] > size:
        return _place(image, longest * 0.9, rng, size)
    detail = g
    ox = int(rng.integers(int(-pbox[0]), int(size - pbox[2]) + 1))
    oy = int(rng.integers(int(-pbox[1]), int(size - pbox[3]) + 1))
    alpha = np.zeros((size, size), np.float32)
    det = np.zeros((size, size), np.float32)
    cx0, cy0, cx1, cy1 = max(0, ox), max(0, oy), min(size, ox + w), min(size, oy + h)
    alpha[cy0:cy1, cx0:cx1] = a[cy0 - oy:cy1 - oy, cx0 - ox:cx1 - ox]
    det[cy0:cy1, cx0:cx1] = detail[cy0 - oy:cy1 - oy, cx0 - ox:cx1 - ox]
    return alpha, det, pbox + np.array([ox, oy, ox, oy], np.float32)


def _background(paint: _Paint, size: int, rng: np.random.Generator, test: bool) -> np.ndarray:
    # never the animals' own texture: then only the grey step would tell them apart
    bg = texture_patch(str(rng.choice([t for t in TEXTURES if t != paint.fill])), size, rng, test)
    return (paint.bg_mean + paint.bg_std * bg).astype(np.float32)


def _draw(canvas: np.ndarray, alpha: np.ndarray, detail: np.ndarray, paint: _Paint,
          rng: np.random.Generator, test: bool) -> np.ndarray:
    """Composite one animal onto ``canvas`` (in place and returned)."""
    size = canvas.shape[0]
    mean = paint.bg_mean + paint.polarity * paint.step * rng.uniform(0.85, 1.15)
    fill = texture_patch(paint.fill, size, rng, test, zoom=(1.5, 3.0))
    fg = mean + paint.fill_std * fill + paint.detail * detail
    canvas *= 1 - alpha
    canvas += alpha * fg
    return canvas


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Illumination ramp, sensor noise, clip, → uint8."""
    size = img.shape[0]
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img = img + rng.uniform(0, 0.15) * (np.cos(theta) * xx + np.sin(theta) * yy)
    img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _instance_labels(masks_: list[np.ndarray]) -> np.ndarray:
    """Bool masks in drawing order (later on top) → (H, W) int32 labels, 0 = ground, objects
    numbered 1 … n by their boxes' left edges (then top edges), not by drawing order."""
    boxes = [mask_box(m) for m in masks_]
    order = sorted(range(len(masks_)), key=lambda i: (boxes[i][0], boxes[i][1]))
    number = {i: k + 1 for k, i in enumerate(order)}
    out = np.zeros(masks_[0].shape, np.int32)
    for i, m in enumerate(masks_):
        out[m] = number[i]
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy


class SceneGenerator:
    """Seeded scene sampler over one part of the silhouettes: 'train', 'val' or 'test' rows.

    ``sample()`` → :class:`Scene`. Targets, moving animals and distractors all come from the
    chosen part's rows; test scenes also crop textures only from the test rows of the
    texture images.
    """

    def __init__(self, part: str = "train", seed: int = 0, size: int = SIZE,
                 moving_size: int = MOVING_SIZE, min_distractors: int = 1,
                 max_distractors: int = 3, max_overlap: float = 0.1,
                 align_facing: bool = True):
        if size < 32 or moving_size < 16:
            raise ValueError(f"size, moving_size: expected ≥ 32 and ≥ 16, got {size}, "
                             f"{moving_size}")
        if not 0 <= min_distractors <= max_distractors:
            raise ValueError(f"distractors: expected 0 ≤ min ≤ max, got {min_distractors}, "
                             f"{max_distractors}")
        self.images, self.labels = rows(part)
        self.test = part == "test"
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.moving_size = moving_size
        self.min_distractors = min_distractors
        self.max_distractors = max_distractors
        self.max_overlap = max_overlap
        self.align_facing = align_facing

    def sample(self, n_distractors: int | None = None) -> Scene:
        rng, test, size = self.rng, self.test, self.size
        classes = list(self.by_class)
        label = int(rng.choice(classes))
        i_mov, i_tgt = rng.choice(self.by_class[label], size=2, replace=False)
        tgt_img = self.images[i_tgt]
        if rng.random() < 0.5:
            tgt_img = tgt_img[:, ::-1]
        mov_img = self.images[i_mov]
        if self.align_facing:
            tm = masks(tgt_img)
            if _shape_iou(masks(mov_img[:, ::-1]), tm) > _shape_iou(masks(mov_img), tm):
                mov_img = mov_img[:, ::-1]
        paint = _new_paint(rng)

        # moving: one animal filling most of the frame
        ms = self.moving_size
        alpha, detail, _ = _place(mov_img, rng.uniform(*MOVING_FRAC) * ms, rng, ms)
        moving = _draw(_background(paint, ms, rng, test), alpha, detail, paint, rng, test)
        moving_mask = alpha > 0.5

        # fixed: distractors first, the target on top so its whole mask is visible
        t_alpha, t_detail, tbox = _place(tgt_img, rng.uniform(*TARGET_FRAC) * size, rng, size)
        t_area = max(1.0, float((tbox[2] - tbox[0]) * (tbox[3] - tbox[1])))
        fixed = _background(paint, size, rng, test)
        k = (int(rng.integers(self.min_distractors, self.max_distractors + 1))
             if n_distractors is None else n_distractors)
        others = [c for c in classes if c != label]
        placed: list[int] = []
        all_mask = t_alpha > 0.5
        drawn: list[np.ndarray] = []           # each distractor's mask, in drawing order
        for _ in range(k):
            d_label = int(rng.choice(others))
            img = self.images[rng.choice(self.by_class[d_label])]
            if rng.random() < 0.5:
                img = img[:, ::-1]
            for _try in range(30):
                d_alpha, d_detail, dbox = _place(img, rng.uniform(*TARGET_FRAC) * size, rng, size)
                if _overlap(dbox, tbox) <= self.max_overlap * t_area:
                    _draw(fixed, d_alpha, d_detail, paint, rng, test)
                    all_mask |= d_alpha > 0.5
                    drawn.append(d_alpha > 0.5)
                    placed.append(d_label)
                    break
        _draw(fixed, t_alpha, t_detail, paint, rng, test)
        target_mask = t_alpha > 0.5
        return Scene(all_labels=_instance_labels(drawn + [target_mask]), moving=_finish(moving, rng), fixed=_finish(fixed, rng),
                     target_mask=target_mask, box=mask_box(target_mask), label=label,
                     n_distractors=len(placed), moving_mask=moving_mask,
                     moving_box=mask_box(moving_mask), distractor_labels=tuple(placed),
                     all_mask=all_mask)

    def batch(self, n: int) -> list[Scene]:
        return [self.sample() for _ in range(n)]


def test_scenes(n: int = 1000, seed: int = 0) -> list[Scene]:
    """The held-out benchmark: n seeded scenes from the test rows (and test texture rows)."""
    return SceneGenerator("test", seed=seed).batch(n)


# ---------------------------------------------------------------------------------------------
# object-centric mask pairs for the matcher

CROP_MARGIN = 1.3           # matcher crops: square side = margin × the box's longest side
PART_KERNEL = 5             # px at the matcher's 32-px input: limbs thinner than this are "thin"


def _shape_codes(masks_: np.ndarray, side: int = 32) -> np.ndarray:
    """Each mask cut to its tight box and stretched to side × side, flattened: (N, side²) bool."""
    out = np.zeros((len(masks_), side * side), bool)
    for i, m in enumerate(masks_):
        if m.any():
            x0, y0, x1, y1 = mask_box(m).astype(int)
            out[i] = (cv2.resize(m[y0:y1, x0:x1].astype(np.float32), (side, side)) > 0.5).ravel()
    return out


def split_parts(masks_, kernel: int = PART_KERNEL):
    """Two part labels per object (the paper's Fig. 5 part masks): the *core* (what survives a
    morphological opening with a kernel × kernel square: torso, head) and the *thin* parts
    (the rest: legs, tails, necks, ears, trunks). Limbs are where same-class animals differ
    most, and a plain mask does not say which lobe of the outline is a leg.

    masks_: torch (B, 1, H, W) in {0, 1} → (B, 2, H, W) float: channel 0 core, 1 thin.
    """
    import torch
    import torch.nn.functional as F
    if masks_.ndim != 4 or masks_.shape[1] != 1:
        raise ValueError(f"masks: expected (B, 1, H, W), got {tuple(masks_.shape)}")
    pad = kernel // 2
    eroded = 1 - F.max_pool2d(1 - masks_, kernel, 1, pad)
    core = F.max_pool2d(eroded, kernel, 1, pad) * masks_
    return torch.cat([core, masks_ - core], 1)


class MaskPairs:
    """Same-class silhouette mask pairs cropped like the pipeline crops them, for the matcher.

    Each pair: a target instance (mirrored with probability ½) and another instance of its
    class, mirrored when that faces it the same way (as :class:`SceneGenerator` does); each
    mask cut to ``square_around(box, margin)`` (jittered by up to ``shift`` of the side and
    ``scale`` in size: the pipeline's boxes come from segmented, not true, masks) and
    resampled to size × size (bilinear, > 0.5), as ``pipeline.crop_mask`` does.

    ``batch(n)`` → moving, fixed: torch (n, C, size, size) float in {0, 1}, C = 2 with
    ``parts`` (:func:`split_parts`), else 1; with ``grey=True`` also the two silhouettes'
    grey images cropped the same way (n, 1, size, size) in [0, 1].
    """

    def __init__(self, part: str, seed: int, size: int = 32, margin: float = CROP_MARGIN,
                 parts: bool = False, shift: float = 0.03, scale: float = 0.06):
        import torch
        images, self.labels = rows(part)
        self.grey = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)
        m = masks(images)
        self.masks = torch.from_numpy(m.astype(np.float32)).unsqueeze(1)
        self.boxes = np.stack([mask_box(x) for x in m]).astype(np.float64)
        self.codes = _shape_codes(m)
        self.codes_flip = _shape_codes(m[:, :, ::-1])
        self.by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        self.rng = np.random.default_rng(seed)
        self.size, self.margin, self.parts = size, margin, parts
        self.shift, self.scale = shift, scale

    def _thetas(self, boxes: np.ndarray, flips: np.ndarray, jitter: bool) -> np.ndarray:
        """Affine sampling matrices (n, 2, 3) for grid_sample (align_corners=False) that crop
        each (mirrored) 28×28 source to its jittered square."""
        n, w = len(boxes), 28.0
        x0 = np.where(flips, w - boxes[:, 2], boxes[:, 0])
        x1 = np.where(flips, w - boxes[:, 0], boxes[:, 2])
        y0, y1 = boxes[:, 1], boxes[:, 3]
        side = self.margin * np.maximum(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if jitter:
            r = self.rng
            cx = cx + r.uniform(-self.shift, self.shift, n) * side
            cy = cy + r.uniform(-self.shift, self.shift, n) * side
            side = side * r.uniform(1 - self.scale, 1 + self.scale, n)
        th = np.zeros((n, 2, 3))
        th[:, 0, 0] = th[:, 1, 1] = side / w
        # a mirrored source is sampled at −x, so its crop square is mirrored back here
        th[:, 0, 0] *= np.where(flips, -1, 1)
        th[:, 0, 2] = np.where(flips, -(2 * cx / w - 1), 2 * cx / w - 1)
        th[:, 1, 2] = 2 * cy / w - 1
        return th

    def indices(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """n pairs: moving rows, fixed rows, moving mirrored, fixed mirrored (bool)."""
        r = self.rng
        cls = r.integers(0, len(self.by_class), n)
        ij = np.stack([r.choice(self.by_class[c], 2, replace=False) for c in cls])
        i, j = ij[:, 0], ij[:, 1]
        flip_f = r.random(n) < 0.5
        tgt = np.where(flip_f[:, None], self.codes_flip[j], self.codes[j])

        def iou(a, b):
            return (a & b).sum(1) / np.maximum(1, (a | b).sum(1))
        same = np.where(flip_f[:, None], self.codes[i], self.codes_flip[i])   # mirrored like tgt
        keep = np.where(flip_f[:, None], self.codes_flip[i], self.codes[i])
        flip_m = np.where(iou(same, tgt) > iou(keep, tgt), ~flip_f, flip_f)
        return i, j, flip_m, flip_f

    def crops(self, rows_: np.ndarray, flips: np.ndarray, jitter: bool = True, grey: bool = False):
        import torch
        import torch.nn.functional as F
        th = torch.from_numpy(self._thetas(self.boxes[rows_], flips, jitter)).float()
        grid = F.affine_grid(th, (len(rows_), 1, self.size, self.size), align_corners=False)
        src = self.grey if grey else self.masks
        out = F.grid_sample(src[torch.from_numpy(rows_)], grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        return out if grey else (out > 0.5).float()

    def batch(self, n: int, grey: bool = False, jitter: bool = True):
        i, j, fm, ff = self.indices(n)
        mov, fix = self.crops(i, fm, jitter), self.crops(j, ff, jitter)
        if self.parts:
            mov, fix = split_parts(mov), split_parts(fix)
        if grey:
            return mov, fix, self.crops(i, fm, jitter=False, grey=True), \
                self.crops(j, ff, jitter=False, grey=True)
        return mov, fix
