import pytest
import torch

from registration import anchors as anc
from registration.config import LocalizerConfig
from registration.localizer import Localizer, ssd_loss


def test_anchor_count_and_positions_for_a_known_map():
    a = anc.generate_anchors([2], 100, [0.2], [1.0, 2.0])
    assert a.shape == (2 * 2 * 3, 4)
    # first location (centre 25, 25): square 20×20, then aspect 2 (w = 20√2, h = 20/√2),
    # then the extra square of side √(0.2·1.0)·100
    s2 = 2 ** 0.5
    side = (0.2 * 1.0) ** 0.5 * 100
    expected = torch.tensor([[15.0, 15.0, 35.0, 35.0],
                             [25 - 10 * s2, 25 - 10 / s2, 25 + 10 * s2, 25 + 10 / s2],
                             [25 - side / 2, 25 - side / 2, 25 + side / 2, 25 + side / 2]])
    assert torch.allclose(a[:3], expected, atol=1e-4)
    # the last anchor type of location (row 1, col 1) is centred at (75, 75)
    last = a[-1]
    assert torch.allclose((last[:2] + last[2:]) / 2, torch.tensor([75.0, 75.0]))


def test_default_localizer_has_1020_anchors_on_c4_to_c7():
    m = Localizer(LocalizerConfig())
    assert m.feature_sizes() == [14, 7, 3, 1]
    assert m.anchors.shape == ((14 * 14 + 7 * 7 + 3 * 3 + 1) * 4, 4)


def test_box_coding_round_trip():
    g = torch.Generator().manual_seed(0)
    a = anc.generate_anchors([7], 112, [0.3], [0.5, 1.0, 2.0])
    xy = torch.rand(len(a), 2, generator=g) * 80
    wh = torch.rand(len(a), 2, generator=g) * 30 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    back = anc.decode(anc.encode(boxes, a), a)
    assert (back - boxes).abs().max() < 1e-3
    # NumPy arrays decode the same (Localizer.predict decodes its one box per image so)
    off = anc.encode(boxes, a)
    back_np = anc.decode(off.double().numpy(), a.double().numpy())
    assert abs(back_np - back.double().numpy()).max() < 1e-3


def test_box_convert_equals_torchvision_both_ways():
    from torchvision.ops import box_convert
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 40], 1)
    for a, b in (("xyxy", "cxcywh"), ("cxcywh", "xyxy")):
        assert torch.allclose(anc.box_convert(boxes, a, b), box_convert(boxes, a, b), atol=1e-5)
    assert torch.allclose(anc.box_convert(anc.box_convert(boxes, "xyxy", "cxcywh"), "cxcywh",
                                          "xyxy"), boxes, atol=1e-4)
    with pytest.raises(ValueError, match="expected 'xyxy' or 'cxcywh'"):
        anc.box_convert(boxes, "xywh", "xyxy")


@pytest.mark.parametrize("stem", ["conv", "unshuffle"])
def test_both_stems_reach_the_same_head_maps_and_anchors(stem):
    from registration.config import UNSHUFFLE_LOCALIZER
    cfg = LocalizerConfig(**(UNSHUFFLE_LOCALIZER if stem == "unshuffle" else {}))
    m = Localizer(cfg).eval()
    assert m.feature_sizes() == [14, 7, 3, 1] and len(m.anchors) == 1020
    logits, offsets = m(torch.rand(2, 1, 112, 112), torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 1020) and offsets.shape == (2, 1020, 4)
    with pytest.raises(ValueError, match="stem"):
        Localizer(LocalizerConfig(stem="strided"))


def test_loss_is_finite_without_positives_and_box_term_zero():
    m = Localizer(LocalizerConfig())
    f, q = torch.rand(3, 1, 112, 112), torch.rand(3, 1, 28, 28)
    gt = torch.tensor([[10.0, 10, 30, 40]] * 3)
    loss, parts = m.loss(f, q, gt, valid=torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(loss) and parts["box"] == 0
    loss.backward()


def test_loss_has_at_least_one_positive_per_target():
    a = anc.generate_anchors([4], 64, [0.3], [1.0])
    logits, offsets = torch.zeros(1, len(a)), torch.zeros(1, len(a), 4)
    tiny = torch.tensor([[1.0, 1.0, 3.0, 3.0]])     # IoU < 0.5 with every anchor
    loss, parts = ssd_loss(logits, offsets, a, tiny)
    assert parts["box"] > 0


@pytest.mark.parametrize("cond", ["film", "stack"])
def test_predict_shapes_and_bad_input(cond):
    m = Localizer(LocalizerConfig(conditioning=cond)).eval()
    boxes, scores = m.predict(torch.rand(2, 1, 112, 112), torch.rand(2, 1, 28, 28))
    assert boxes.shape == (2, 4) and scores.shape == (2,)
    assert (boxes >= 0).all() and (boxes <= 112).all()
    with pytest.raises(ValueError, match="expected"):
        m(torch.rand(2, 1, 100, 100), torch.rand(2, 1, 28, 28))
