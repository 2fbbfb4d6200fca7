import numpy as np
import pytest
import torch
import torch.nn.functional as F

from registration import tps
from registration.coords import identity_grid, norm_to_pixel, pixel_to_norm


def rand_params(b, grid, scale=0.1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, tps.n_params(grid), generator=g, dtype=dtype) * scale


def test_zero_params_give_identity_grid():
    ctrl = tps.control_grid(4)
    grid = tps.tps_grid(torch.zeros(2, tps.n_params(4)), ctrl, (28, 28))
    assert torch.allclose(grid, identity_grid((28, 28)).expand(2, -1, -1, -1), atol=1e-5)


def test_affine_only_equals_affine_grid():
    ctrl = tps.control_grid(5, torch.float64)
    p = torch.zeros(3, tps.n_params(5), dtype=torch.float64)
    p[:, :6] = rand_params(3, 5, 0.3)[:, :6]
    grid = tps.tps_grid(p, ctrl, (20, 24))
    theta, _ = tps.split_params(p, 25)
    ref = F.affine_grid(theta, (3, 1, 20, 24), align_corners=False)
    assert (grid - ref).abs().max() < 1e-10


def test_control_points_land_where_parameters_say():
    ctrl = tps.control_grid(4, torch.float64)
    p = rand_params(2, 4, 0.2)
    theta, offsets = tps.split_params(p, 16)
    expected = torch.cat([ctrl, torch.ones(16, 1, dtype=ctrl.dtype)], 1) @ theta.transpose(1, 2)
    expected = expected + offsets
    assert (tps.warp_points(ctrl, p, ctrl) - expected).abs().max() < 1e-10


def test_agrees_with_scipy_rbf_interpolator():
    from scipy.interpolate import RBFInterpolator
    rng = np.random.default_rng(0)
    ctrl = torch.from_numpy(rng.uniform(-1, 1, (12, 2)))
    p = rand_params(1, 2, 0.2)[:, :6]
    offsets = torch.from_numpy(rng.normal(0, 0.1, (1, 24)))
    p = torch.cat([p, offsets], 1)
    targets = tps.warp_points(ctrl, p, ctrl)[0].numpy()
    pts = rng.uniform(-1, 1, (200, 2))
    ref = RBFInterpolator(ctrl.numpy(), targets, kernel="thin_plate_spline")(pts)
    ours = tps.warp_points(torch.from_numpy(pts), p, ctrl)[0].numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_gradcheck_float64():
    ctrl = tps.control_grid(3, torch.float64)
    p = rand_params(2, 3, 0.1).requires_grad_(True)
    pts = torch.rand(7, 2, dtype=torch.float64) * 2 - 1
    assert torch.autograd.gradcheck(lambda q: tps.warp_points(pts, q, ctrl), (p,))
    img = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q: tps.warp_image(img, tps.tps_grid(q, ctrl, (5, 5))), (p,))


def test_identity_warp_returns_the_image():
    img = torch.rand(1, 1, 28, 28)
    out = tps.warp_image(img, tps.tps_grid(torch.zeros(1, tps.n_params(8)),
                                           tps.control_grid(8), (28, 28)))
    assert (out - img).abs().max() < 1e-5


def test_pixel_norm_round_trip_and_pixel_centres():
    pts = torch.tensor([[0.0, 0.0], [27.0, 13.5]])
    assert torch.allclose(norm_to_pixel(pixel_to_norm(pts, (28, 28)), (28, 28)), pts, atol=1e-5)
    # align_corners=False: pixel 0's centre is at -1 + 1/W
    assert torch.allclose(pixel_to_norm(torch.tensor([[0.0, 0.0]]), (10, 4)),
                          torch.tensor([[-1 + 1 / 4, -1 + 1 / 10]]))


def test_bad_shapes_raise_with_expected_and_got():
    with pytest.raises(ValueError, match="expected shape"):
        tps.split_params(torch.zeros(1, 7), 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        tps.warp_points(torch.zeros(3, 3), torch.zeros(1, 14), tps.control_grid(2))
    with pytest.raises(ValueError, match="grid_size"):
        tps.control_grid(1)
