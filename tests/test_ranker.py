"""The US–CT candidate ranker: its measurements with known answers, its loss, the pipeline's
use of it, and its training command."""
import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from registration import checkpoint, ranker, train
from registration.config import RankerConfig
from registration.metrics import group_top1
from registration.pipeline import DATASETS, Pipeline


def disc(size, centre, r):
    yy, xx = np.mgrid[:size, :size]
    return (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 <= r * r


def test_body_mask_is_the_largest_bright_component_with_its_holes_filled():
    ct = np.zeros((64, 64), np.float32)
    ct[disc(64, (32, 32), 20)] = 0.5
    ct[disc(64, (30, 30), 5)] = 0.0          # gas inside the body
    ct[2:5, 2:5] = 0.9                       # a speck outside it
    body = ranker.body_mask(ct)
    assert np.array_equal(body, disc(64, (32, 32), 20))


def test_skin_distances_from_the_centre_of_a_disc_are_its_radius():
    body = disc(101, (50.5, 50.5), 30)
    d = ranker.skin_distances(body, (50.5, 50.5))
    assert d.shape == (13,)
    assert np.all(np.abs(d - 30) <= 1.5)
    # from a point near the top, the way straight up is the shortest
    d_top = ranker.skin_distances(body, (50.5, 30.5), [-np.pi / 2, -0.95 * np.pi])
    assert abs(d_top[0] - 10) <= 1.5 and abs(d_top[1] - 19.4) <= 1.5


def test_ring_contrast_is_inside_minus_around():
    img = np.full((40, 40), 0.3, np.float32)
    m = disc(40, (20, 20), 6)
    img[m] = 0.8
    assert ranker.ring_contrast(img, m) == pytest.approx(0.5)
    assert ranker.ring_contrast(img, np.zeros_like(m)) == 0.0


def test_pair_features_measure_the_tumour_below_the_top_of_the_fan():
    us = np.zeros((128, 128), np.float32)
    us[10:110, 20:108] = 0.5                 # the fan: rows 10–109
    m = np.zeros((128, 128), bool)
    m[40:51, 60:69] = True                   # centroid row 45, 99 px
    us[m] = 0.2
    ct = np.zeros((64, 64), np.float32)
    ct[disc(64, (32, 32), 25)] = 0.5
    pf = ranker.pair_features(us, m, ct)
    assert pf["us_depth"] == pytest.approx(35.0)
    assert pf["us_size"] == pytest.approx(np.sqrt(99))
    assert pf["us_fraction"] == pytest.approx(35 / 99)
    assert pf["us_contrast"] == pytest.approx(-0.3)


def test_size_to_depth_ratio_is_compared_without_a_scale():
    """A CT candidate with the ultrasound's size/depth ratio scores |ratio| = 0, one twice
    as large at the same depth log 2."""
    us = np.zeros((128, 128), np.float32)
    us[0:120, :] = 0.5
    m = np.zeros((128, 128), bool)
    m[45:55, 59:69] = True                   # size 10, depth 49.5
    ct = np.zeros((256, 256), np.float32)
    ct[disc(256, (128, 128), 100)] = 0.5
    pf = ranker.pair_features(us, m, ct)
    dist_map = pf["ct_dist"]
    obj = np.zeros((256, 256), bool)
    obj[64:74, 123:133] = True                # size 10
    f = ranker.candidate_features(pf, obj, 0.5, 0)
    d_ct = max(float(dist_map[int(np.nonzero(obj)[0].mean()), int(np.nonzero(obj)[1].mean())]), 1)
    want = np.log(10 / d_ct) - np.log(10 / 49.5)
    assert f.shape == (ranker.N_FEATURES,) and f[0] == pytest.approx(0.0)
    assert f[3] == pytest.approx(want, abs=1e-5) and f[2] == pytest.approx(abs(want), abs=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        ranker.candidate_features(pf, np.zeros_like(obj), 0.5, 0)


def _ct_seen_by_probe(ct, target, centre, direction, half_angle, size=128):
    """The CT window ``ct`` sampled at the fan pixels of a probe on the body's skin (the
    disc's edge) aimed at ``centre`` from ``direction`` (radians), as
    registration.data.usct.Probe.to_ct maps them, scaled so the fan fills ``size`` px;
    zeros outside the fan. Returns the image and the ``target`` mask seen the same way."""
    from registration.data.usct import Probe
    body = ranker.body_mask(ct)
    t = np.array(centre, np.float64)
    along = ranker.skin_distances(body, t, [direction])[0]
    d = np.array([np.cos(direction), np.sin(direction)])
    r0 = ranker.APEX_BACK_PX
    apex = t + (along + r0) * d
    probe = Probe(apex=apex, axis=-d, half_angle=half_angle, r0=r0, r1=along + r0 + 50.0)
    cx, cy, inside = probe.to_ct(size)
    img, seen = (cv2.remap(a.astype(np.float32), cx - 0.5, cy - 0.5, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0) for a in (ct, target))
    # the fan's grey never reaches exactly 0 inside (the fan is what is > 0)
    return (np.where(inside, np.maximum(img, 0.02), 0.0).astype(np.float32),
            (seen > 0.5) & inside)


def _two_tumour_ct():
    """A 256-px CT window: a bright body disc with soft-tissue texture and two dark tumours,
    the target at (100, 150) and another at (170, 110); returns the CT and both masks."""
    rng = np.random.default_rng(3)
    ct = np.zeros((256, 256), np.float32)
    body = disc(256, (128, 128), 110)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (256, 256)).astype(np.float32), (0, 0), 6)
    ct[body] = 0.55 + 0.6 * tex[body]
    target, other = disc(256, (100, 150), 12), disc(256, (170, 110), 12)
    ct[target | other] = 0.2
    ct[disc(256, (128, 128), 110) & ~disc(256, (128, 128), 104)] = 0.3     # a fat layer
    return np.clip(ct, 0, 1), target, other


def test_view_similarity_finds_the_ct_as_the_probe_sees_it():
    ct, target, other = _two_tumour_ct()
    direction = ranker.PROBE_DIRECTIONS[4]
    us, us_mask = _ct_seen_by_probe(ct, target, (100.5, 150.5), direction,
                                    ranker.VIEW_HALF_ANGLES[1])
    ctx = ranker.view_context(us, us_mask, ct)
    ncc_t, mi_t = ranker.view_similarity(ctx, target)
    ncc_o, mi_o = ranker.view_similarity(ctx, other)
    # the view from the right direction reproduces the image up to the blurs and the
    # tumour row's rounding
    assert ncc_t > 0.9
    assert ncc_t > ncc_o + 0.1 and mi_t > mi_o
    # the picture of the best view is the "ultrasound" itself, on the every-2nd-pixel grid
    img, ncc = ranker.best_view(ctx, target)
    assert img.shape == (64, 64) and ncc == pytest.approx(ncc_t)
    both = (us[::2, ::2] > 0) & (img > 0)
    assert both.sum() > 0.8 * (us[::2, ::2] > 0).sum()
    assert np.corrcoef(img[both], us[::2, ::2][both])[0, 1] > 0.9
    with pytest.raises(ValueError, match="non-empty"):
        ranker.view_similarity(ctx, np.zeros_like(target))


def test_view_lut_image_with_the_identity_table_is_the_blurred_ct():
    ct, _, _ = _two_tumour_ct()
    identity = (np.arange(ranker.VIEW_LUT_BINS) + 0.5) / ranker.VIEW_LUT_BINS
    want = cv2.GaussianBlur(cv2.GaussianBlur(ct, (0, 0), ranker.VIEW_LUT_PRE_BLUR), (0, 0),
                            ranker.VIEW_LUT_POST_BLUR)
    got = ranker.view_lut_image(ct, identity)
    assert got.shape == ct.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.5 / ranker.VIEW_LUT_BINS + 1e-6   # bin centres
    with pytest.raises(ValueError, match=r"lut: expected \(64,\), got \(10,\)"):
        ranker.view_lut_image(ct, np.zeros(10))


def test_the_lookup_table_learns_an_inverted_contrast_and_finds_the_target_through_it():
    """An "ultrasound" that shows the CT's grey inverted (1 − CT, like vessels bright in CT
    and dark in ultrasound): the plain view anti-correlates with it; the table estimated
    from such pairs maps the CT to 1 − CT, and through it the target's view correlates
    again and beats the other tumour's."""
    ct, target, other = _two_tumour_ct()
    pairs = []
    for k in (3, 4, 6, 8):
        us, us_mask = _ct_seen_by_probe(ct, target, (100.5, 150.5), ranker.PROBE_DIRECTIONS[k],
                                        ranker.VIEW_HALF_ANGLES[1])
        pairs.append((np.where(us > 0, np.maximum(1 - us, 0.02), 0).astype(np.float32),
                      us_mask, ct, target))
    lut = ranker.estimate_view_lut(pairs)
    assert lut.shape == (ranker.VIEW_LUT_BINS,) and lut.dtype == np.float32
    centres = (np.arange(ranker.VIEW_LUT_BINS) + 0.5) / ranker.VIEW_LUT_BINS
    # the CT's greys: tumours 0.2, fat 0.3, tissue 0.55 ± texture; the blurs pull the
    # table's means towards each other, but not its order
    seen = (centres > 0.15) & (centres < 0.65)
    assert np.corrcoef(lut[seen], centres[seen])[0, 1] < -0.9
    tumour, tissue = lut[int(0.2 * ranker.VIEW_LUT_BINS)], lut[int(0.55 * ranker.VIEW_LUT_BINS)]
    assert tumour > tissue + 0.2
    us, us_mask = pairs[1][:2]
    plain = ranker.view_context(us, us_mask, ct)
    assert ranker.view_similarity(plain, target)[0] < 0   # every view anti-correlates
    mapped = ranker.view_context(us, us_mask, ct, lut=lut)
    ncc_t, _ = ranker.view_similarity(mapped, target)
    ncc_o, _ = ranker.view_similarity(mapped, other)
    assert ncc_t > 0.8 and ncc_t > ncc_o + 0.1
    with pytest.raises(ValueError, match="no pair gave a view"):
        ranker.estimate_view_lut([(np.zeros_like(us), us_mask, ct, target)])


def test_a_view_lut_ranker_needs_the_view_and_keeps_its_table():
    with pytest.raises(ValueError, match="view_lut"):
        ranker.Ranker(RankerConfig(view_lut=True))
    r = ranker.Ranker(RankerConfig(features=ranker.N_FEATURES + 2, view=True, view_lut=True))
    assert r.view_lut.shape == (ranker.VIEW_LUT_BINS,)
    assert "view_lut" in r.state_dict() and "view_lut" not in ranker.Ranker().state_dict()


def test_view_context_is_none_without_a_tumour_or_a_fan():
    ct, target, _ = _two_tumour_ct()
    us = np.full((128, 128), 0.5, np.float32)
    assert ranker.view_context(us, np.zeros((128, 128), bool), ct) is None
    mask = np.zeros((128, 128), bool)
    mask[60:70, 60:70] = True
    assert ranker.view_context(np.zeros((128, 128), np.float32), mask, ct) is None
    ctx = ranker.view_context(us, mask, ct)
    assert ctx is not None and abs(ctx["row"] - 65.0) < 1e-6


def test_group_table_and_listwise_loss_by_hand():
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    ranks = np.array([0, 1, 2, 0, 1, 0, 1])
    labels = np.array([0, 1, 0, 1, 0, 0, 0], np.float32)      # pair 2: target not among them
    table, target = ranker.group_table(groups, ranks, labels, 3)
    assert table.tolist() == [[0, 1, 2], [3, 4, -1]] and target.tolist() == [1, 0]
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 5.0, 5.0])
    loss = ranker.listwise_loss(logits, torch.from_numpy(table), torch.from_numpy(target))
    a = -(1.0 - np.log(np.exp(0) + np.exp(1) + np.exp(2)))
    b = -(3.0 - np.log(np.exp(3) + np.exp(0)))
    assert float(loss) == pytest.approx((a + b) / 2, rel=1e-6)
    assert group_top1([0, 1, 2, 3, 0, 5, 5], labels, groups) == pytest.approx(0.5)


def test_ranker_standardises_and_checks_its_input():
    r = ranker.Ranker(RankerConfig(hidden=(4,)))
    x = torch.randn(50, 17) * 3 + 2
    r.set_scale(x)
    assert torch.allclose(((x - r.mean) / r.std).mean(0), torch.zeros(17), atol=1e-5)
    assert r(x).shape == (50,)
    with pytest.raises(ValueError, match=r"x: expected \(B, 17\), got \(50, 3\)"):
        r(x[:, :3])


class RankTwo(torch.nn.Module):
    """Prefers each pair's second candidate (feature 1 is the rank)."""

    def forward(self, x):
        return -(x[:, 1] - 1).abs()


class ByMutualInformation(torch.nn.Module):
    """A ranker with the view features (cfg.view): scores by the last one, the MI."""

    cfg = RankerConfig(features=ranker.N_FEATURES + 2, view=True)

    def forward(self, x):
        assert x.shape[1] == ranker.N_FEATURES + 2
        return x[:, -1]


@pytest.fixture(scope="module")
def usct_pairs():
    from registration.data.usct import PairGenerator
    return [p for p in PairGenerator("test", seed=3).batch(12) if p.n_distractors >= 1][:3]


def test_pipeline_takes_the_candidate_the_ranker_scores_highest(usct_pairs):
    pipe = Pipeline.from_pretrained("usct", freeze=False)
    pipe.dataset = dataclasses.replace(DATASETS["usct"], rerank=4, ranker=True)
    pipe.ranker = RankTwo()
    pairs = [(p.moving, p.fixed) for p in usct_pairs]
    prep = pipe._prepare(pairs, [None] * len(pairs), [None] * len(pairs))
    f_t, q_t, lb = pipe._ssd_inputs(prep)
    cands = pipe.localizer.candidates(f_t, q_t, 4)
    x, owner, rank, _ = pipe._ranker_features(prep, cands, lb)
    assert x.shape[1] == ranker.N_FEATURES             # no view without cfg.view
    chosen, _, _ = pipe._rerank(prep, cands, lb)
    for i in range(len(pairs)):
        ranks = rank[owner == i]
        want = 1 if 1 in ranks else ranks[0]
        assert torch.equal(chosen[i], cands[i][0][want])
    # a ranker that takes the view from the skin as its last two features (cfg.view) gets
    # them appended; this one scores by the mutual information
    pipe.ranker = ByMutualInformation()
    x, owner, rank, _ = pipe._ranker_features(prep, cands, lb)
    assert x.shape[1] == ranker.N_FEATURES + 2
    view = x[:, -2:]
    assert view.shape == (len(x), 2) and np.all(np.abs(view[:, 0]) <= 1)
    assert np.all(view[:, 1] >= 0)
    chosen, _, _ = pipe._rerank(prep, cands, lb)
    for i in range(len(pairs)):
        want = rank[owner == i][np.argmax(view[owner == i, 1])]
        assert torch.equal(chosen[i], cands[i][0][want])
    # with a lookup table in the ranker (cfg.view_lut) the view is of the CT mapped through it
    lut = np.linspace(0.9, 0.1, ranker.VIEW_LUT_BINS).astype(np.float32)     # inverted
    pipe.ranker = ByMutualInformation()
    pipe.ranker.view_lut = torch.from_numpy(lut)
    x_lut, owner_lut, _, _ = pipe._ranker_features(prep, cands, lb)
    assert np.array_equal(owner_lut, owner) and np.array_equal(x_lut[:, :-2], x[:, :-2])
    want = []
    for i in range(len(pairs)):
        ctx = ranker.view_context(prep[i]["mg"], prep[i]["m_mask"], prep[i]["fg"], lut=lut)
        want += [ranker.view_similarity(ctx, prep[i]["candidate_objects"][j])
                 for j in rank[owner == i]]
    assert np.allclose(x_lut[:, -2:], np.array(want, np.float32), atol=1e-6)


def test_ranker_trains_on_usct_and_refuses_other_data_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRATION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ranker"
    train.main(["ranker", "--dataset", "usct", "--pairs", "4", "--pair-seeds", "0", "1",
                "--val-pairs", "4", "--rerank-k", "4", "--steps", "3", "--batch", "4",
                "--val-every", "1", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_pairs"] == 8                  # two cached sets of 4
    assert metrics["train_candidates"] >= 8 and 0 <= metrics["val_top1"] <= 1
    r = checkpoint.load_folder(out)
    assert r.cfg.top_k == 4 and float(r.std.min()) > 0 and not r.cfg.view
    # --view: the view from the skin as two more features, saved in the config
    train.main(["ranker", "--dataset", "usct", "--pairs", "4", "--val-pairs", "4",
                "--rerank-k", "4", "--steps", "2", "--batch", "4", "--val-every", "1",
                "--threads", "1", "--view", "--out", str(tmp_path / "ranker-view")])
    r = checkpoint.load_folder(tmp_path / "ranker-view")
    assert r.cfg.view and r.cfg.features == ranker.N_FEATURES + 2 and r.mean.shape == (19,)
    assert not r.cfg.view_lut and not hasattr(r, "view_lut")
    # --view-lut: the table is estimated from the training pairs and saved with the weights
    train.main(["ranker", "--dataset", "usct", "--pairs", "4", "--val-pairs", "4",
                "--rerank-k", "4", "--steps", "2", "--batch", "4", "--val-every", "1",
                "--threads", "1", "--view", "--view-lut", "--out", str(tmp_path / "lut")])
    r = checkpoint.load_folder(tmp_path / "lut")
    identity = (torch.arange(ranker.VIEW_LUT_BINS) + 0.5) / ranker.VIEW_LUT_BINS
    assert r.cfg.view_lut and not torch.allclose(r.view_lut, identity)
    assert float(r.view_lut.min()) >= 0 and float(r.view_lut.max()) <= 1
    with pytest.raises(SystemExit):
        train.main(["ranker", "--dataset", "usct", "--view-lut", "--steps", "1"])
    with pytest.raises(SystemExit):
        train.main(["ranker", "--dataset", "silhouettes", "--steps", "1"])
