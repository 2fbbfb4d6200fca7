import dataclasses
import json

import numpy as np
import pytest
import torch

from registration import checkpoint, train
from registration.config import VerifierConfig
from registration.pipeline import DATASETS, RERANK_SCORE_WEIGHT, Pipeline
from registration.verify import Verifier, verifier_loss
from scenehelpers import rect_scene


def test_verifier_checks_its_inputs_and_gives_one_logit_per_pair():
    v = Verifier(VerifierConfig(input_size=32))
    assert v(torch.zeros(3, 1, 32, 32), torch.ones(3, 1, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match=r"candidate: expected \(B, 1, 32, 32\), got \(3, 1, 28, 28\)"):
        v(torch.zeros(3, 1, 32, 32), torch.zeros(3, 1, 28, 28))


def test_verifier_loss_balances_the_classes():
    class Const(torch.nn.Module):
        def forward(self, m, c):
            return torch.zeros(len(m))
    labels = torch.tensor([1.0, 0, 0, 0])
    # zero logits: every sample costs log 2 whatever the weights, which average to 1
    loss = verifier_loss(Const(), torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), labels)
    assert float(loss) == pytest.approx(np.log(2))


class AreaVerifier(torch.nn.Module):
    """Scores a candidate by its object's area: the re-ranking must pick the largest."""

    cfg = VerifierConfig()                  # a mask verifier: one channel per object

    def forward(self, moving, candidate):
        return candidate.sum((1, 2, 3)) / 100 - 5


def test_rerank_picks_the_candidate_the_verifier_scores_highest():
    from registration.data.scenes import test_scenes
    pipe = Pipeline.from_pretrained("mnist")
    pipe.dataset = dataclasses.replace(DATASETS["mnist"], rerank=5)
    pipe.verifier = AreaVerifier()
    scenes = [s for s in test_scenes(40, seed=4) if s.n_distractors >= 2][:4]
    assert len(scenes) == 4
    prep = pipe._prepare([(s.moving, s.fixed) for s in scenes], [None] * 4, [None] * 4)
    f_t, q_t, lb = pipe._ssd_inputs(prep)
    cands = pipe.localizer.candidates(f_t, q_t, 5)
    mov, fix, owner, boxes, scores, *_ = pipe._candidate_crops(prep, cands, lb)
    chosen, _, _ = pipe._rerank(prep, cands, lb)
    area = torch.from_numpy(fix.sum((1, 2))).float()
    value = (torch.sigmoid(area / 100 - 5) + RERANK_SCORE_WEIGHT * scores).numpy()
    for i in range(4):
        mine = np.flatnonzero(owner == i)
        assert len(mine) >= 2                                        # a real choice
        want = boxes[mine[np.argmax(value[mine])]]
        assert torch.equal(chosen[i], want)


def test_verifier_trains_from_the_pipelines_candidates_and_refuses_mnist(tmp_path):
    out = tmp_path / "verifier"
    train.main(["verifier", "--dataset", "silhouettes", "--pool", "6", "--val-pairs", "4",
                "--steps", "2", "--batch", "16", "--val-every", "1", "--threads", "1",
                "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_samples"] > 6 and "val_top1_shape_overlap" in metrics
    assert checkpoint.load_folder(out).cfg.input_size == 32
    with pytest.raises(SystemExit):
        train.main(["verifier", "--dataset", "mnist", "--steps", "1"])


def test_verifier_trains_for_usct_whose_pipeline_takes_the_top_box(tmp_path, monkeypatch):
    """The README's US–CT verifier command: the pipeline no longer re-ranks (rerank 0), the
    verifier still trains on the SSD's top --rerank-k candidates."""
    monkeypatch.setenv("REGISTRATION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "usct-verifier"
    train.main(["verifier", "--dataset", "usct", "--pairs", "6", "--pool", "6", "--val-pairs",
                "4", "--steps", "2", "--batch", "16", "--val-every", "1", "--threads", "1",
                "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text())["val_scenes"] == 4


def test_kind_classifying_verifier_trains_on_the_rows_and_scores_pairs(tmp_path):
    out = tmp_path / "kinds"
    train.main(["verifier", "--dataset", "silhouettes", "--classes", "10", "--val-pairs", "4",
                "--verifier-channels", "8", "16", "--steps", "2", "--batch", "16",
                "--val-every", "1", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val_class_accuracy"] <= 1
    v = checkpoint.load_folder(out)
    assert (v.cfg.classes, tuple(v.cfg.channels), v.cfg.hidden) == (10, (8, 16), 32)
    m = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        same = torch.sigmoid(v(m, m))
        p = torch.softmax(v.classify(m), 1)
    # the score is the chance both masks are of one kind: Σ_k p(k)² for identical masks
    assert torch.allclose(same, (p * p).sum(1), atol=1e-5)


def test_silhouettes_pipeline_without_its_verifier_falls_back_to_mask_overlap(monkeypatch):
    real_load = checkpoint.load

    def load(dataset, model):
        if model == "verifier":
            raise checkpoint.CheckpointNotFound("checkpoint silhouettes/verifier not found")
        return real_load(dataset, model)
    monkeypatch.setattr(checkpoint, "load", load)
    with pytest.warns(UserWarning, match="verifier"):
        pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0)
    assert pipe.verifier is None and pipe.dataset.rerank == 5
    from registration.data.silhouettes import test_scenes
    s = test_scenes(1, seed=3)[0]
    r = pipe.register(s.moving, s.fixed)               # re-ranks by overlap, no error
    assert r.warped_mask_full.shape == s.fixed.shape[:2]


def test_labelled_scene_masks_are_the_moving_and_target_objects_with_the_scene_kind():
    from registration.data.silhouettes import SceneGenerator
    from registration.pipeline import crop_mask, mask_box, square_around
    from registration.verify import labelled_scene_masks
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0)
    scenes = SceneGenerator("train", seed=5).batch(3)
    masks, labels = labelled_scene_masks(pipe, scenes)
    assert masks.shape == (6, 32, 32) and labels.tolist() == [s.label for s in scenes for _ in "mt"]
    for k, s in enumerate(scenes):          # the target's crop as the true mask would give it
        want = crop_mask(s.target_mask, square_around(mask_box(s.target_mask), 1.3), 32)
        got = masks[2 * k + 1]
        assert 2 * (want & got).sum() / (want.sum() + got.sum()) > 0.6


def test_component_candidates_are_one_box_per_object_of_the_given_fixed_mask():
    from registration.pipeline import COMPONENT_MIN_PX
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    fixed = np.zeros((128, 128), bool)
    fixed[10:30, 20:50] = True                   # 600 px
    fixed[70:100, 60:70] = True                  # 300 px
    fixed[120:125, 0:5] = True                   # a speck: 25 px < COMPONENT_MIN_PX
    assert 25 < COMPONENT_MIN_PX
    img = (fixed * 200 + 20).astype(np.uint8)
    moving = np.zeros((64, 64), np.uint8)
    moving[10:50, 10:50] = 220
    prep = pipe._prepare([(moving, img)], [None], [fixed])
    ssd = (torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.7]))
    (boxes, scores), = pipe._with_components(prep, [ssd], [0.5])
    assert boxes.tolist() == [[0, 0, 10, 10], [10, 5, 25, 15], [30, 35, 35, 50]]
    assert scores.tolist() == pytest.approx([0.7, 0.0, 0.0])


def test_component_candidates_rescue_a_target_the_ssd_missed():
    """The SSD's only box is on empty ground; the verifier (here: the larger object wins)
    chooses among the fixed mask's objects instead."""
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    pipe.verifier = AreaVerifier()
    # the second object is the largest
    prep, lb, _ = rect_scene(pipe, [(10, 30, 20, 50), (60, 110, 60, 100)], given_moving=False)
    miss = [(torch.tensor([[0.0, 115.0, 10.0, 125.0]]) * lb[0], torch.tensor([0.9]))]
    chosen, score, source = pipe._rerank(prep, miss, lb)
    assert torch.allclose(chosen[0] / lb[0], torch.tensor([60.0, 60.0, 100.0, 110.0]))
    assert float(score[0]) == 0.0 and source == ["component"]
    pipe.dataset = dataclasses.replace(pipe.dataset, component_candidates=False)
    chosen, _, source = pipe._rerank(prep, miss, lb)   # without them: the SSD's box only
    assert torch.equal(chosen[0], miss[0][0][0]) and source == ["ssd"]


# -- the grey verifier: the detail inside each object, not just its outline ------------------

def test_object_detail_standardises_the_interior_and_ignores_brightness_and_contrast():
    from registration.verify import DETAIL_CLIP, object_detail
    mask = np.zeros((16, 16), bool)
    mask[3:13, 3:13] = True
    stripes = np.tile((np.arange(16) % 4 < 2).astype(np.float32), (16, 1))
    g = 0.4 + 0.1 * stripes
    d = object_detail(g, mask)
    core = np.zeros_like(mask)
    core[4:12, 4:12] = True                  # the mask eroded by one pixel
    assert np.all(d[~core] == 0)             # outside, and the outline's ring, are 0
    v = g[core]
    want = (v - np.median(v)) / (v.std() + 1e-2)
    assert np.allclose(d[core], want, atol=1e-6)
    # a brighter copy with 3× the contrast gives nearly the same pattern (the 0.01 floor
    # under the standard deviation is all that differs: ±0.83 vs ±0.94), where the grey
    # values themselves moved by 0.2–0.4
    g2 = 0.6 + 3.0 * (g - 0.4)
    d2 = object_detail(g2, mask)
    assert np.allclose(d2, d, atol=0.12) and np.abs(g2 - g)[core].min() >= 0.2
    assert np.all(object_detail(np.full((16, 16), 0.3, np.float32), mask) == 0)   # flat
    spike = g.copy()
    spike[8, 8] = 100.0
    assert object_detail(spike, mask).max() == DETAIL_CLIP
    assert np.all(object_detail(g, np.zeros_like(mask)) == 0)                    # empty
    with pytest.raises(ValueError, match="differ"):
        object_detail(g, mask[:8])


def test_grey_verifier_takes_two_channels_and_needs_kinds():
    v = Verifier(VerifierConfig(input_size=32, classes=10, arch="bn", grey=True))
    assert v(torch.zeros(3, 2, 32, 32), torch.zeros(3, 2, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match=r"expected \(B, 2, 32, 32\), got \(3, 1, 32, 32\)"):
        v.classify(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="grey"):
        Verifier(VerifierConfig(input_size=32, classes=0, grey=True))


def test_pipeline_gives_a_grey_verifier_each_candidates_detail():
    """The re-ranking's inputs: channel 0 the object-centric masks, channel 1 the grey detail
    of the same crop of the working image."""
    from registration.data.silhouettes import test_scenes
    from registration.pipeline import crop, square_around
    from registration.verify import object_detail
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0)
    s = test_scenes(2, seed=8)
    prep = pipe._prepare([(x.moving, x.fixed) for x in s], [None] * 2, [None] * 2)
    f_t, q_t, lb = pipe._ssd_inputs(prep)
    cands = pipe.localizer.candidates(f_t, q_t, 3)
    mov, fix, own, _, _, snapped, _ = pipe._candidate_crops(prep, cands, lb)
    xm, xf = pipe._verifier_inputs(prep, mov, fix, own, snapped, grey=True)
    assert xm.shape == xf.shape == (len(mov), 2, 32, 32)
    assert np.array_equal(xm[:, 0] > 0.5, mov) and np.array_equal(xf[:, 0] > 0.5, fix)
    k = len(mov) - 1
    i = own[k]
    want = object_detail(crop(prep[i]["fg"], square_around(snapped[k], 1.3), 32), fix[k])
    assert np.allclose(xf[k, 1], want)
    assert np.abs(xf[:, 1]).max() > 0.5      # there is detail to see
    one_m, one_f = pipe._verifier_inputs(prep, mov, fix, own, snapped, grey=False)
    assert one_m.shape == (len(mov), 1, 32, 32) and np.array_equal(one_f[:, 0] > 0.5, fix)


def test_grey_verifier_trains_on_cut_out_objects(tmp_path):
    out = tmp_path / "grey"
    train.main(["verifier", "--dataset", "silhouettes", "--classes", "10", "--verifier-grey",
                "--verifier-arch", "bn", "--pool", "8", "--val-pairs", "3",
                "--verifier-channels", "8", "16", "--steps", "2", "--batch", "8",
                "--val-every", "1", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val_class_accuracy"] <= 1 and "val_top1" in metrics
    v = checkpoint.load_folder(out)
    assert v.cfg.grey and v.cfg.classes == 10
    with pytest.raises(SystemExit):
        train.main(["verifier", "--dataset", "silhouettes", "--verifier-grey", "--steps", "1"])


# -- touching animals: one component, split into its pieces ----------------------------------

def _two_discs(neck: int = 3):
    import cv2
    m = np.zeros((64, 96), np.uint8)
    cv2.circle(m, (25, 32), 14, 1, -1)
    cv2.circle(m, (66, 32), 12, 1, -1)
    m[32 - neck // 2:32 - neck // 2 + neck, 30:62] = 1          # the neck joining them
    return m.astype(bool)


def test_split_touching_cuts_two_joined_discs_at_the_neck_and_keeps_one_animal_whole():
    import cv2
    from registration.segment import split_touching
    m = _two_discs()
    pieces = split_touching(m)
    assert len(pieces) == 2
    assert not (pieces[0] & pieces[1]).any()
    assert np.array_equal(pieces[0] | pieces[1], m)                # every pixel goes somewhere
    for p, cx in zip(sorted(pieces, key=lambda p: np.nonzero(p)[1].mean()), (25, 66)):
        xs = np.nonzero(p)[1]
        assert abs(np.median(xs) - cx) < 3                         # each piece is one disc
        assert xs.max() - xs.min() < 2 * 14 + 16                   # … with at most half the neck
    # one body with a thin leg: the erosion cuts the leg off, but it is too small to count
    one = np.zeros((64, 64), np.uint8)
    cv2.circle(one, (32, 24), 14, 1, -1)
    one[38:60, 30:33] = 1
    assert split_touching(one.astype(bool)) == []
    assert split_touching(np.zeros((8, 8), bool)) == []
    # a wide neck survives every erosion radius tried: not split
    assert split_touching(_two_discs(neck=13), radii=(1, 2)) == []


def test_pieces_of_a_joined_component_are_candidates_as_they_are():
    from registration.segment import split_touching
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    fixed = np.zeros((128, 128), bool)
    fixed[20:84, 10:106] = _two_discs()
    img = (fixed * 200 + 20).astype(np.uint8)
    moving = np.zeros((64, 64), np.uint8)
    moving[10:50, 10:50] = 220
    prep = pipe._prepare([(moving, img)], [None], [fixed])
    ssd = (torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.7]))
    cands = pipe._with_components(prep, [ssd], [1.0])
    boxes, scores = cands[0]
    assert len(boxes) == 4 and scores.tolist() == pytest.approx([0.7, 0, 0, 0])
    uf = prep[0]["uf"]
    want = split_touching(uf)
    assert sorted(prep[0]["given_objects"]) == [2, 3]
    for j, piece in zip((2, 3), want):
        assert np.array_equal(prep[0]["given_objects"][j], piece)
    objs = {j: obj for _, j, obj, _ in pipe._candidate_objects(prep, cands, [1.0])}
    assert np.array_equal(objs[1], uf)                      # the joined component, whole
    assert np.array_equal(objs[2], want[0]) and np.array_equal(objs[3], want[1])
    pipe.dataset = dataclasses.replace(pipe.dataset, split_components=False)
    assert len(pipe._with_components(prep, [ssd], [1.0])[0][0]) == 2


def test_evaluate_cli_turns_the_split_pieces_off_and_says_so(tmp_path):
    from registration import evaluate
    evaluate.main(["pipeline", "--dataset", "silhouettes", "-n", "2", "--no-figure",
                   "--threads", "1", "--no-split", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "silhouettes_pipeline_refine40_rerank5_nosplit.json").read_text())
    assert out["component_candidates"] and not out["split_components"]
    evaluate.main(["pipeline", "--dataset", "silhouettes", "-n", "2", "--no-figure",
                   "--threads", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "silhouettes_pipeline_refine40_rerank5.json").read_text())
    assert out["split_components"]


# -- the choice: shape agreement, and a whole object over an SSD box's cut of it --------------
class ConstVerifier(torch.nn.Module):
    """Rates every candidate alike (logit 0): the shape term, the SSD score and the
    preference for whole objects decide."""

    cfg = VerifierConfig()

    def forward(self, moving, candidate):
        return torch.zeros(len(moving))


def _cut_scene():
    """A 40 × 60 px object, a small one elsewhere, and a square moving object (true masks)."""
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    pipe.verifier = ConstVerifier()
    prep, lb, _ = rect_scene(pipe, [(40, 80, 20, 80), (100, 115, 100, 115)], square=(12, 52))
    return pipe, prep, lb


def test_choice_adds_the_shape_term_and_prefers_the_whole_object_within_the_margin():
    from registration.pipeline import WHOLE_OBJECT_MARGIN
    pipe, prep, lb = _cut_scene()
    # an SSD box whose cut of the object (clipped to the box grown by snap_clip) is the
    # object's left 40 × 40 px, square like the moving object
    cut = torch.tensor([[20.0, 40.0, 56.0, 76.0]]) * lb[0]
    whole = torch.tensor([20.0, 40.0, 80.0, 80.0])
    cands = pipe._with_components(prep, [(cut, torch.tensor([0.0]))], lb)
    mov, fix, _, _, _, snapped, ranks = pipe._candidate_crops(prep, cands, lb)
    assert ranks.tolist() == [0, 1, 2]                  # the cut, the object, the small one
    dice = (2 * (mov & fix).sum((1, 2)) / (mov.sum((1, 2)) + fix.sum((1, 2)))).astype(float)
    assert dice[0] > dice[1]                            # the cut is as square as the query
    gap = pipe.dataset.shape_weight * (dice[0] - dice[1])
    for ssd_score, prefer, want in [
            (0.0, False, "ssd"),                        # the shape term alone: the cut
            (0.0, True, "component"),                   # the same object, whole, within the margin
            ((WHOLE_OBJECT_MARGIN - gap) / RERANK_SCORE_WEIGHT + 0.05, True, "ssd")]:  # beyond
        pipe.dataset = dataclasses.replace(pipe.dataset, prefer_whole=prefer)
        chosen, _, source = pipe._rerank(prep, [(cut, torch.tensor([ssd_score]))], lb)
        assert source == [want], (ssd_score, prefer)
        if want == "component":
            assert torch.allclose(chosen[0] / lb[0], whole)
    # without the shape term the two tie at the verifier's 0.5, and the SSD score decides
    pipe.dataset = dataclasses.replace(pipe.dataset, shape_weight=0.0, prefer_whole=False)
    _, _, source = pipe._rerank(prep, [(cut, torch.tensor([0.01]))], lb)
    assert source == ["ssd"]
    _, _, source = pipe._rerank(prep, [(torch.tensor([[0.0, 0.0, 4.0, 4.0]]) * lb[0],
                                        torch.tensor([0.0]))], lb)
    assert source == ["component"]                      # an empty box: a component wins


def test_evaluate_cli_plain_choice_turns_the_shape_term_and_whole_objects_off(tmp_path):
    from registration import evaluate
    evaluate.main(["pipeline", "--dataset", "silhouettes", "-n", "2", "--no-figure",
                   "--threads", "1", "--refine-steps", "5", "--plain-choice",
                   "--out", str(tmp_path)])
    out = json.loads((tmp_path / "silhouettes_pipeline_refine5_rerank5_plainchoice.json")
                     .read_text())
    assert out["shape_weight"] == 0.0 and out["prefer_whole"] is False
    assert out["refine_steps"] == 5
    assert DATASETS["silhouettes"].shape_weight > 0 and DATASETS["silhouettes"].prefer_whole


def test_from_pretrained_takes_the_data_sets_refinement_steps():
    assert DATASETS["silhouettes"].refine_steps == 40
    assert Pipeline.from_pretrained("silhouettes").refine_steps == 40
    from registration.pipeline import DEFAULT_REFINE_STEPS
    assert DATASETS["mnist"].refine_steps is None
    assert Pipeline.from_pretrained("mnist").refine_steps == DEFAULT_REFINE_STEPS
    assert Pipeline.from_pretrained("silhouettes", refine_steps=3).refine_steps == 3
