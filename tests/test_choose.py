"""The learned chooser among the silhouettes verifier's candidates (registration.choose)."""
import json

import numpy as np
import pytest
import torch

from registration import train
from registration.choose import N_FEATURES, choice_features, choice_table, mask_iou_matrix
from registration.pipeline import Pipeline
from scenehelpers import rect_scene


def _rect(y0, y1, x0, x1, shape=(40, 40)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_matrix_known_answers():
    a, b, c = _rect(0, 10, 0, 10), _rect(0, 10, 5, 15), _rect(20, 30, 20, 30)
    m = mask_iou_matrix([a, b, c, a])
    assert m.shape == (4, 4)
    assert m[0, 3] == 1.0 and m[0, 2] == 0.0
    assert m[0, 1] == pytest.approx(50 / 150) and np.allclose(m, m.T)
    assert mask_iou_matrix([]).shape == (0, 0)


def test_choice_features_describe_a_cut_and_its_whole_object():
    whole, cut, other = _rect(0, 10, 0, 20), _rect(0, 10, 0, 12), _rect(25, 35, 25, 35)
    mk = np.array([0.8, 0.2])
    kinds = np.array([[0.6, 0.4], [0.9, 0.1], [0.1, 0.9]])      # cut, whole, other
    value = np.array([0.7, 0.65, 0.2])
    x = choice_features(mk, kinds, dice=np.array([0.9, 0.8, 0.3]),
                        scores=np.array([0.3, 0.0, 0.0]), whole=np.array([False, True, True]),
                        piece=np.array([False, False, True]), cut=np.array([0.4, 0.0, 0.0]),
                        objs=[cut, whole, other], moving_box=(0, 0, 20, 10),
                        boxes=[(0, 0, 12, 10), (0, 0, 20, 10), (25, 25, 35, 35)],
                        value=value, given=True)
    assert x.shape == (3, N_FEATURES) and x.dtype == np.float32
    same = kinds @ mk
    assert np.allclose(x[:, 0], same) and np.allclose(x[:, 1], same - same.max())
    assert x[:, 4].tolist() == [0, 1, 1] and x[:, 5].tolist() == [0, 0, 1]
    assert x[0, 6] == pytest.approx(0.4)
    # the cut is smaller than the whole object it is part of; the whole is its largest version
    assert x[0, 7] == pytest.approx(np.log(120 / 200)) and x[1, 7] == 0.0
    # the cut has a whole twin that the verifier rates higher; the others have none
    assert x[0, 9] == 1.0 and x[0, 8] == pytest.approx(same[1] - same[0])
    assert x[1, 9] == 0.0 and x[2, 9] == 0.0
    assert x[1, 10] == pytest.approx(0.0)                        # same aspect as the moving
    assert x[0, 13] == pytest.approx(0.6)                        # p(the moving's top kind)
    assert np.allclose(x[:, 15], value) and np.allclose(x[:, 16], value - 0.7)
    assert (x[:, 17] == 1.0).all()
    with pytest.raises(ValueError, match="expected 3 candidates"):
        choice_features(mk, kinds, np.zeros(2), np.zeros(3), np.zeros(3, bool),
                        np.zeros(3, bool), np.zeros(3), [cut, whole, other], (0, 0, 1, 1),
                        [(0, 0, 1, 1)] * 3, value, False)


class SmallestChooser(torch.nn.Module):
    """Scores a candidate by how small its object is against the scene's (feature 14)."""

    def forward(self, x):
        return -x[:, 14]


def test_the_chooser_decides_only_where_the_fixed_mask_was_segmented():
    from registration.config import VerifierConfig
    from registration.verify import Verifier
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    torch.manual_seed(0)
    pipe.verifier = Verifier(VerifierConfig(classes=3, arch="bn", grey=True)).eval()
    pipe.chooser = SmallestChooser()
    # the first object is the smaller
    prep, lb, _ = rect_scene(pipe, [(10, 30, 20, 50), (60, 110, 60, 100)])
    cands = [(torch.tensor([[0.0, 115.0, 10.0, 125.0]]) * lb[0], torch.tensor([0.9]))]
    c = pipe._candidate_values(prep, cands, lb)
    areas = [int(prep[0]["candidate_objects"][int(j)].sum()) for j in c["ranks"]]
    k = int(np.argmax(areas))                                # start from the largest
    best = [(c["boxes"][k], c["scores"][k], float(c["v"][k]), int(c["ranks"][k]))]
    assert pipe._choose(prep, best, [1], c) == best          # the mask was given: no change
    prep[0]["uf"] = None                                     # as if segmented
    chosen = pipe._choose(prep, best, [1], c)[0]
    assert chosen[3] == int(c["ranks"][int(np.argmin(areas))])
    assert chosen[3] != best[0][3]


def test_choice_table_labels_at_most_one_target_per_scene():
    from registration.data.silhouettes import SceneGenerator
    pipe = Pipeline.from_pretrained("silhouettes", refine_steps=0, freeze=False)
    pipe.chooser = None
    scenes = SceneGenerator("val", seed=5).batch(4)
    x, y, g, pos = choice_table(pipe, scenes, given_masks=True)
    assert x.shape == (len(y), N_FEATURES) and len(g) == len(pos) == len(y)
    for s in np.unique(g):
        assert y[g == s].sum() <= 1
        assert sorted(pos[g == s].tolist()) == list(range((g == s).sum()))
    assert y.sum() >= 2                               # true masks: the target is found
    assert (x[:, 17] == 1.0).all()                    # given masks, said so


def test_chooser_cli_trains_and_refuses_other_data_sets(tmp_path):
    out = tmp_path / "chooser"
    train.main(["chooser", "--dataset", "silhouettes", "--pool", "6", "--val-pairs", "4",
                "--steps", "2", "--val-every", "1", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "val_top1" in metrics and "val_top1_hand_set" in metrics
    with pytest.raises(SystemExit):
        train.main(["chooser", "--dataset", "mnist", "--steps", "1", "--out", str(tmp_path / "x")])
