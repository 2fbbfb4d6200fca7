import numpy as np
import torch

from registration import losses, metrics, tps
from registration.coords import identity_grid


def test_soft_dice_known_values():
    a = torch.zeros(1, 1, 4, 4)
    a[..., :2, :] = 1
    b = torch.zeros(1, 1, 4, 4)
    b[..., :, :] = 1
    assert abs(float(losses.soft_dice(a, a)) - 1) < 1e-6
    assert abs(float(losses.soft_dice(a, b)) - 2 * 8 / 24) < 1e-6


def test_smoothness_zero_for_constant_offsets_positive_otherwise():
    off = torch.full((1, 16, 2), 0.3)
    assert float(losses.control_smoothness(off)) == 0
    off[0, 5] += 0.1
    assert float(losses.control_smoothness(off)) > 0


def test_jacobian_identity_one_and_reflection_negative():
    g = identity_grid((10, 12))[None]
    assert torch.allclose(losses.jacobian_det(g), torch.ones(1, 9, 11), atol=1e-5)
    flipped = g.clone()
    flipped[..., 0] = -flipped[..., 0]
    assert (losses.jacobian_det(flipped) < 0).all()
    assert float(losses.fold_penalty(g)) == 0


def test_hard_metrics_known_answers():
    a = np.zeros((10, 10), bool)
    a[:, :5] = True
    b = np.zeros((10, 10), bool)
    b[:, 2:7] = True
    assert metrics.dice(a, b) == 2 * 30 / 100
    assert metrics.iou(a, b) == 30 / 70
    assert metrics.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert metrics.box_dice((0, 0, 10, 10), (5, 0, 15, 10)) == 100 / 200


def test_loss_at_identity_is_one_minus_dice():
    from registration.matcher import Matcher
    from registration.config import MatcherConfig
    m = Matcher(MatcherConfig(grid_size=4))
    a = torch.zeros(2, 1, 28, 28)
    a[..., 5:20, 8:14] = 1
    b = torch.zeros(2, 1, 28, 28)
    b[..., 5:20, 10:18] = 1
    loss, parts = m.loss(a, b)
    assert abs(float(loss) - (1 - float(losses.soft_dice(a, b).mean()))) < 1e-5


def test_jacobian_metric_identity_reflection_and_folding():
    zero = np.zeros((12, 10, 2))
    assert np.allclose(metrics.jacobian_determinant(zero), 1)
    assert metrics.folding(zero) == 0
    ys, xs = np.mgrid[0:12, 0:10]
    mirror = np.stack([(9 - xs) - xs, np.zeros_like(ys)], -1).astype(float)   # x ↦ 9 - x
    assert np.allclose(metrics.jacobian_determinant(mirror), -1)
    assert metrics.folding(mirror) == 1
    # a TPS grid from the identity parameters is the zero displacement
    g = tps.tps_grid(torch.zeros(1, tps.n_params(4)), tps.control_grid(4), (12, 10))[0]
    assert np.allclose(metrics.grid_to_displacement(g.numpy()), 0, atol=1e-5)


def test_hausdorff95_of_a_shift_is_the_shift():
    a = np.zeros((40, 40), bool)
    a[10:25, 8:22] = True
    for k in (1, 3, 5):
        b = np.roll(a, k, axis=1)
        assert abs(metrics.hausdorff95(a, b) - k) < 1e-3
    assert metrics.hausdorff95(a, a) == 0
    assert metrics.hausdorff95(a, np.zeros_like(a)) == float("inf")


def test_ncc_inside_mask_known_answers():
    from registration.evaluate import _ncc_inside
    a = torch.rand(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    assert torch.allclose(_ncc_inside(a, a, mask), torch.ones(2), atol=1e-5)
    assert torch.allclose(_ncc_inside(a, 3 - 2 * a, mask), -torch.ones(2), atol=1e-5)
    b = a.clone()
    b[~mask] = torch.rand(int((~mask).sum()))        # outside the mask does not count
    assert torch.allclose(_ncc_inside(a, b, mask), torch.ones(2), atol=1e-5)
    assert torch.equal(_ncc_inside(a, torch.ones_like(a), mask), torch.zeros(2))   # flat → 0


def test_fold_penalty_margin_counts_the_gap_below_it():
    from registration.coords import identity_grid
    g = identity_grid((9, 9))[None]                      # det J = 1 everywhere
    assert float(losses.fold_penalty(g, margin=0.5)) == 0
    assert abs(float(losses.fold_penalty(g, margin=1.5)) - 0.5) < 1e-6
