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


def test_param_matrix_is_the_warp_linear_map():
    torch.manual_seed(0)
    ctrl = tps.control_grid(4, torch.float64)
    pts = torch.rand(50, 2, dtype=torch.float64) * 2 - 1
    params = torch.randn(3, tps.n_params(4), dtype=torch.float64) * 0.1
    lin = tps.param_matrix(pts, tps.tps_basis(pts, ctrl))
    want = tps.warp_points(pts, params, ctrl) - pts
    got = (params @ lin.T).reshape(3, 50, 2)
    assert torch.allclose(got, want, atol=1e-12)


def test_composing_with_the_identity_changes_nothing():
    torch.manual_seed(1)
    ctrl = tps.control_grid(5, torch.float64)
    pts = identity_grid((16, 16), torch.float64).reshape(-1, 2)
    p = torch.randn(2, tps.n_params(5), dtype=torch.float64) * 0.05
    zero = torch.zeros_like(p)
    want = tps.warp_points(pts, p, ctrl)
    for got in (tps.compose_params(p, zero, ctrl, pts), tps.compose_params(zero, p, ctrl, pts)):
        assert torch.allclose(tps.warp_points(pts, got, ctrl), want, atol=1e-8)
        assert torch.allclose(got, tps.canonical_params(p, ctrl), atol=1e-8)


def test_canonical_params_keep_the_warp_and_move_affine_offsets_to_the_affine_part():
    ctrl = tps.control_grid(4, torch.float64)
    e = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.1, -0.1]], dtype=torch.float64)
    offsets = torch.cat([ctrl, torch.ones(16, 1, dtype=torch.float64)], 1) @ e.T   # affine
    p = torch.cat([torch.zeros(6, dtype=torch.float64), offsets.reshape(-1)])[None]
    c = tps.canonical_params(p, ctrl)
    assert torch.allclose(c[0, :6], e.reshape(6), atol=1e-10)
    assert torch.allclose(c[0, 6:], torch.zeros(32, dtype=torch.float64), atol=1e-10)
    pts = torch.rand(30, 2, dtype=torch.float64) * 2 - 1
    assert torch.allclose(tps.warp_points(pts, c, ctrl), tps.warp_points(pts, p, ctrl),
                          atol=1e-10)


def test_composing_two_affines_multiplies_their_matrices():
    ctrl = tps.control_grid(4, torch.float64)
    pts = identity_grid((12, 12), torch.float64).reshape(-1, 2)
    a = torch.tensor([[0.9, 0.1, 0.05], [-0.2, 1.1, -0.1]], dtype=torch.float64)
    b = torch.tensor([[1.2, 0.0, 0.1], [0.1, 0.8, 0.2]], dtype=torch.float64)
    to_params = lambda m: torch.cat([(m - torch.eye(2, 3, dtype=m.dtype)).reshape(6),
                                     torch.zeros(32, dtype=m.dtype)])[None]
    got = tps.compose_params(to_params(a), to_params(b), ctrl, pts)
    # outer(inner(x)) = A·(B·x + b) + a
    sq = lambda m: torch.cat([m, torch.tensor([[0, 0, 1.0]], dtype=m.dtype)])
    want = to_params((sq(a) @ sq(b))[:2])
    assert torch.allclose(got, want, atol=1e-8)


def test_composition_projector_ignores_rounding_in_the_coefficients():
    # the parameterisation has a null space (affine twice); float32 rounding of the spline
    # coefficients must not leak into the fit through it
    ctrl = tps.control_grid(8)
    pts = identity_grid((28, 28)).reshape(-1, 2)
    exact = tps.composition_projector(ctrl, pts)
    rounded = tps.composition_projector(ctrl, pts, tps.tps_coefficients(ctrl).float())
    assert (exact - rounded).abs().max() < 1e-4
