"""Silhouette data (registration.data.silhouettes) and the learned segmenter (registration.segnet)."""
import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

from registration.data import silhouettes as sil
from registration.data.scenes import mask_box
from registration.segnet import (SegNet, SegNetConfig, count_parameters, object_crop,
                                 scene_crops, segmentation_loss)


# ------------------------------------------------------------------ the restricted unpickler

class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Evil(f"echo hi > {marker}"))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        sil.NumpyUnpickler(io.BytesIO(payload)).load()
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(pickle.UnpicklingError):
        sil.load_array(path)
    assert not marker.exists()


def test_unpickler_refuses_object_arrays_and_builtins(tmp_path):
    with pytest.raises(pickle.UnpicklingError):
        sil.NumpyUnpickler(io.BytesIO(pickle.dumps(print))).load()
    path = tmp_path / "obj.gz"
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError):
        sil.load_array(path)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_unpickler_reads_plain_arrays(tmp_path, protocol):
    a = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    path = tmp_path / "a.gz"
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(a, protocol=protocol))
    np.testing.assert_array_equal(sil.load_array(path), a)


# ------------------------------------------------------------------ data and split

def test_data_shapes():
    images, labels = sil.load_all()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert (np.bincount(labels) == 1000).all() and len(sil.CLASSES) == 10
    assert not images.flags.writeable


def test_split_sizes_and_disjoint():
    tr, te = sil.indices("train+val"), sil.indices("test")
    _, labels = sil.load_all()
    assert (np.bincount(labels[tr]) == 800).all() and (np.bincount(labels[te]) == 200).all()
    assert not set(tr) & set(te)
    t, v = sil.indices("train"), sil.indices("val")
    assert (np.bincount(labels[t]) == 720).all() and (np.bincount(labels[v]) == 80).all()
    assert set(t) | set(v) == set(tr) and not set(t) & set(v)
    assert sil.split("train")[0].shape == (8000, 28, 28)
    assert sil.rows("test")[0].shape == (2000, 28, 28)


def test_no_identical_image_in_train_and_test():
    images, _ = sil.load_all()
    flat = images.reshape(len(images), -1)
    train = {r.tobytes() for r in flat[sil.indices("train+val")]}
    assert not any(r.tobytes() in train for r in flat[sil.indices("test")])


def test_bad_part():
    with pytest.raises(ValueError, match="expected"):
        sil.rows("dev")


# ------------------------------------------------------------------ scenes

@pytest.fixture(scope="module")
def scenes():
    return sil.test_scenes(12, seed=3)


def test_scenes_seeded(scenes):
    again = sil.SceneGenerator("test", seed=3).batch(3)
    for a, b in zip(scenes[:3], again):
        np.testing.assert_array_equal(a.fixed, b.fixed)
        np.testing.assert_array_equal(a.moving, b.moving)
        np.testing.assert_array_equal(a.target_mask, b.target_mask)
    other = sil.SceneGenerator("test", seed=4).sample()
    assert not np.array_equal(other.fixed, scenes[0].fixed)


def test_scene_geometry(scenes):
    for s in scenes:
        assert s.fixed.shape == (sil.SIZE, sil.SIZE) and s.fixed.dtype == np.uint8
        assert s.moving.shape == (sil.MOVING_SIZE, sil.MOVING_SIZE)
        assert s.target_mask.dtype == bool and s.target_mask.any()
        np.testing.assert_array_equal(s.box, mask_box(s.target_mask))
        np.testing.assert_array_equal(s.moving_box, mask_box(s.moving_mask))
        w, h = s.box[2] - s.box[0], s.box[3] - s.box[1]
        assert max(w, h) < sil.SIZE / 2                       # target under half the frame
        mw, mh = s.moving_box[2] - s.moving_box[0], s.moving_box[3] - s.moving_box[1]
        assert max(mw, mh) > sil.MOVING_SIZE / 2              # moving animal over half
        assert 1 <= s.n_distractors == len(s.distractor_labels) <= 3
        assert s.label not in s.distractor_labels


def test_scenes_draw_from_their_part():
    gen = sil.SceneGenerator("test", seed=0)
    np.testing.assert_array_equal(gen.images, sil.rows("test")[0])
    assert sil.SceneGenerator("val", seed=0).images.shape[0] == 800


# ------------------------------------------------------------------ segmenter

def test_segnet_shapes_and_size():
    net = SegNet(SegNetConfig()).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert 50_000 < count_parameters(net) < 200_000


@pytest.mark.parametrize("x", [torch.rand(1, 3, 64, 64), torch.rand(1, 1, 62, 62),
                               torch.rand(1, 64, 64), torch.zeros(1, 1, 64, 64, dtype=torch.uint8)])
def test_segnet_bad_input(x):
    with pytest.raises(ValueError, match="expected"):
        SegNet()(x)


def test_loss_perfect_vs_inverted():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 3:10] = 1
    perfect = (target * 2 - 1) * 20
    good, info = segmentation_loss(perfect, target)
    bad, _ = segmentation_loss(-perfect, target)
    assert good.item() < 0.01 and info["dice"] > 0.99
    assert bad.item() > 1.0
    with pytest.raises(ValueError, match="expected"):
        segmentation_loss(perfect, target[:, :, :8])


def test_crops(scenes):
    imgs, masks = scene_crops(scenes[:3], size=64, rng=np.random.default_rng(0))
    assert imgs.shape == masks.shape == (6, 1, 64, 64)
    assert imgs.dtype == np.float32 and 0 <= imgs.min() and imgs.max() <= 1
    assert set(np.unique(masks)) <= {0.0, 1.0}
    s = scenes[0]
    crop, m = object_crop(s.fixed, s.target_mask, s.box, size=64, margin=1.4)
    # exact crop: the object spans about 1/1.4 of the crop's longest side
    b = mask_box(m)
    assert abs(max(b[2] - b[0], b[3] - b[1]) - 64 / 1.4) <= 3


# ---------------------------------------------------------------------------------------------
# matcher pairs, part labels

def test_split_parts_known_answer():
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 8:20, 8:20] = 1          # a 12×12 body
    m[0, 0, 20:28, 10] = 1           # a 1-px leg below it
    parts = sil.split_parts(m)
    assert parts.shape == (1, 2, 32, 32)
    assert torch.equal(parts[0, 0], m[0, 0] * (torch.arange(32)[:, None] < 20).float())
    assert torch.equal(parts[0, 1, 20:28, 10], torch.ones(8))
    assert torch.equal(parts.sum(1), m[:, 0])          # a partition of the mask


def test_mask_pairs_crop_like_the_pipeline_and_mirror_consistently():
    from registration.pipeline import crop_mask, square_around
    pairs = sil.MaskPairs("test", seed=0)
    rows_ = np.array([3, 250])
    plain = pairs.crops(rows_, np.array([False, False]), jitter=False)
    mirrored = pairs.crops(rows_, np.array([True, True]), jitter=False)
    assert torch.equal(plain.flip(-1), mirrored)
    m = sil.masks(sil.rows("test")[0][rows_])
    for k in range(2):
        want = crop_mask(m[k], square_around(mask_box(m[k]), sil.CROP_MARGIN), 32)
        assert np.array_equal(plain[k, 0].numpy() > 0.5, want)


def test_mask_pairs_are_same_class_and_seeded():
    a = sil.MaskPairs("val", seed=4).batch(16)
    b = sil.MaskPairs("val", seed=4).batch(16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    p = sil.MaskPairs("val", seed=4)
    i, j, _, _ = p.indices(64)
    assert np.array_equal(p.labels[i], p.labels[j]) and not np.any(i == j)
    mov, fix = sil.MaskPairs("val", seed=4, parts=True).batch(4)
    assert mov.shape == fix.shape == (4, 2, 32, 32)


def test_all_mask_holds_the_target_and_the_distractors(scenes):
    for s in scenes:
        assert s.all_mask[s.target_mask].all()
        if s.n_distractors:
            assert s.all_mask.sum() > s.target_mask.sum()


def test_all_labels_give_each_animal_its_own_number(scenes):
    """Instance labels: they cover exactly all_mask, the target (drawn on top) is one whole
    label, there is one label per animal, and the numbers follow the boxes' left edges."""
    for s in scenes:
        lab = s.all_labels
        assert lab.dtype == np.int32 and lab.shape == s.all_mask.shape
        assert np.array_equal(lab > 0, s.all_mask)
        values = np.unique(lab[s.target_mask])
        assert len(values) == 1 and np.array_equal(lab == values[0], s.target_mask)
        ids = np.unique(lab[lab > 0])
        assert np.array_equal(ids, np.arange(1, s.n_distractors + 2))
    lefts = [np.flatnonzero((s.all_labels == v).any(0))[0] for s in scenes[:1]
             for v in range(1, scenes[0].n_distractors + 2) if (s.all_labels == v).any()]
    assert lefts == sorted(lefts)
