import dataclasses
import json

import numpy as np
import pytest
import torch

from registration import checkpoint, train
from registration.config import VerifierConfig
from registration.pipeline import DATASETS, RERANK_SCORE_WEIGHT, Pipeline
from registration.verify import Verifier, verifier_loss


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
    fixed = np.zeros((128, 128), bool)
    fixed[10:30, 20:50] = True
    fixed[60:110, 60:100] = True                 # the largest object
    img = (fixed * 200 + 20).astype(np.uint8)
    moving = np.zeros((64, 64), np.uint8)
    moving[10:50, 10:50] = 220
    prep = pipe._prepare([(moving, img)], [None], [fixed])
    f_t, q_t, lb = pipe._ssd_inputs(prep)
    miss = [(torch.tensor([[0.0, 115.0, 10.0, 125.0]]) * lb[0], torch.tensor([0.9]))]
    chosen, score, source = pipe._rerank(prep, miss, lb)
    assert torch.allclose(chosen[0] / lb[0], torch.tensor([60.0, 60.0, 100.0, 110.0]))
    assert float(score[0]) == 0.0 and source == ["component"]
    pipe.dataset = dataclasses.replace(pipe.dataset, component_candidates=False)
    chosen, _, source = pipe._rerank(prep, miss, lb)   # without them: the SSD's box only
    assert torch.equal(chosen[0], miss[0][0][0]) and source == ["ssd"]
