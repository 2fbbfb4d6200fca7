"""Property-based tests (hypothesis) of the pure functions: TPS, box coding, cropping, pasting
back. Each property states a known answer that must hold for every shape, dtype and value
hypothesis draws; a few dozen examples per test keep each one to a second or two."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from registration import anchors, tps  # noqa: E402
from registration.coords import identity_grid  # noqa: E402
from registration.pipeline import (crop, crop_mask, paste_slices, uncrop,  # noqa: E402
                                   square_around)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def floats(lo, hi):
    # no subnormals: the app (imported by other tests in the same process) turns on torch's
    # flush-denormal mode, and hypothesis refuses to draw subnormal floats when it is on
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)
DTYPES = st.sampled_from([torch.float32, torch.float64])
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def tensor(draw, shape, lo, hi, dtype) -> torch.Tensor:
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


# ---------------------------------------------------------------------------------------------
# TPS


@st.composite
def tps_case(draw):
    dtype = draw(DTYPES)
    g = draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def rand(shape, lo, hi):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    return dict(dtype=dtype, grid=g, ctrl=tps.control_grid(g, dtype=dtype),
                batch=draw(st.integers(1, 3)),
                size=(draw(st.integers(1, 24)), draw(st.integers(1, 24))), seed_tensor=rand)


@FAST
@given(tps_case())
def test_zero_parameters_are_the_identity(c):
    k = c["grid"] ** 2
    zero = torch.zeros(c["batch"], 6 + 2 * k, dtype=c["dtype"])
    grid = tps.tps_grid(zero, c["ctrl"], c["size"])
    assert grid.shape == (c["batch"], *c["size"], 2) and grid.dtype == c["dtype"]
    ident = identity_grid(c["size"], dtype=c["dtype"]).expand_as(grid)
    assert torch.allclose(grid, ident, atol=TOL[c["dtype"]], rtol=0)
    pts = c["seed_tensor"]((17, 2), -1.5, 1.5)
    out = tps.warp_points(pts, zero, c["ctrl"])
    assert out.dtype == c["dtype"]
    assert torch.allclose(out, pts.expand_as(out), atol=TOL[c["dtype"]], rtol=0)


@FAST
@given(tps_case())
def test_control_points_go_exactly_where_the_parameters_say(c):
    """T(c_k) = A·[c_k; 1] + d_k: the spline interpolates the offsets at the control points."""
    k = c["grid"] ** 2
    params = c["seed_tensor"]((c["batch"], 6 + 2 * k), -0.3, 0.3)
    theta, offsets = tps.split_params(params, k)
    homog = torch.cat([c["ctrl"], torch.ones(k, 1, dtype=c["dtype"])], 1)
    expected = homog @ theta.transpose(1, 2) + offsets
    got = tps.warp_points(c["ctrl"], params, c["ctrl"])
    tol = 1e-4 if c["dtype"] == torch.float32 else 1e-9
    assert torch.allclose(got, expected, atol=tol, rtol=0)


@FAST
@given(tps_case())
def test_affine_offsets_give_that_affine_warp_everywhere(c):
    """Offsets that are an affine function E·[c; 1] of the control points are reproduced
    exactly by the spline, so the warp is the affine map (A + E) at every point."""
    k = c["grid"] ** 2
    a = c["seed_tensor"]((c["batch"], 2, 3), -0.3, 0.3)
    e = c["seed_tensor"]((c["batch"], 2, 3), -0.3, 0.3)
    homog = torch.cat([c["ctrl"], torch.ones(k, 1, dtype=c["dtype"])], 1)
    offsets = homog @ e.transpose(1, 2)                                   # (B, K, 2)
    params = torch.cat([a.reshape(-1, 6), offsets.reshape(-1, 2 * k)], 1)
    pts = c["seed_tensor"]((25, 2), -1, 1)
    eye = torch.eye(2, 3, dtype=c["dtype"])
    homog_pts = torch.cat([pts, torch.ones(25, 1, dtype=c["dtype"])], 1)
    expected = homog_pts @ (eye + a + e).transpose(1, 2)
    tol = 2e-4 if c["dtype"] == torch.float32 else 1e-8
    assert torch.allclose(tps.warp_points(pts, params, c["ctrl"]), expected, atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# box coding


@st.composite
def boxes_and_anchors(draw):
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 20))
    t = lambda shape, lo, hi: tensor(draw, shape, lo, hi, dtype)  # noqa: E731
    def xyxy(ctr, wh):
        return torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    anc = xyxy(t((n, 2), 0, 112), t((n, 2), 4, 100))
    # boxes within a factor 40 of their anchor's size (decode clamps beyond 62.5)
    ratio = torch.exp(t((n, 2), np.log(1 / 40), np.log(40)))
    box = xyxy(t((n, 2), -50, 160), (anc[:, 2:] - anc[:, :2]) * ratio)
    return dtype, box, anc


@FAST
@given(boxes_and_anchors())
def test_box_coding_round_trip(case):
    dtype, box, anc = case
    off = anchors.encode(box, anc)
    assert off.shape == box.shape and off.dtype == dtype and torch.isfinite(off).all()
    back = anchors.decode(off, anc)
    scale = (box[:, 2:] - box[:, :2]).abs().max(1, keepdim=True).values.clamp_min(1)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert ((back - box).abs() / scale).max() <= tol
    # an anchor codes to zero offsets, and zero offsets decode to the anchor
    assert anchors.encode(anc, anc).abs().max() <= tol
    assert torch.allclose(anchors.decode(torch.zeros_like(anc), anc), anc,
                          atol=tol * 100, rtol=0)


@FAST
@given(boxes_and_anchors(), st.integers(1, 3))
def test_box_decoding_is_batched_over_leading_dims(case, b):
    _, box, anc = case
    off = anchors.encode(box, anc)
    many = anchors.decode(off.expand(b, *off.shape), anc)
    assert many.shape == (b, *box.shape)
    assert torch.equal(many[-1], anchors.decode(off, anc))


# ---------------------------------------------------------------------------------------------
# cropping and pasting back


def image(draw, h, w):
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


@FAST
@given(st.data(), st.integers(1, 48))
def test_crop_of_the_whole_square_image_at_its_own_size_is_the_image(data, n):
    img = image(data.draw, n, n)
    assert np.abs(crop(img, (0, 0, n, n), n) - img).max() < 1e-5


@FAST
@given(st.data(), st.integers(4, 40), st.integers(4, 40), st.integers(1, 30),
       st.integers(-20, 50), st.integers(-20, 50))
def test_crop_at_integer_offsets_is_a_zero_padded_slice(data, h, w, n, x0, y0):
    img = image(data.draw, h, w)
    pad = 80
    padded = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    padded[pad:pad + h, pad:pad + w] = img
    expected = padded[pad + y0:pad + y0 + n, pad + x0:pad + x0 + n]
    got = crop(img, (x0, y0, x0 + n, y0 + n), n)
    assert got.shape == (n, n) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5


@FAST
@given(st.data(), st.integers(1, 24))
def test_crop_at_half_size_averages_2x2_blocks(data, n):
    img = image(data.draw, 2 * n, 2 * n)
    blocks = img.reshape(n, 2, n, 2).mean(axis=(1, 3))
    assert np.abs(crop(img, (0, 0, 2 * n, 2 * n), n) - blocks).max() < 1e-5


@FAST
@given(st.data(), st.integers(1, 40))
def test_crop_mask_of_the_whole_mask_is_the_mask(data, n):
    mask = image(data.draw, n, n) > 0.5
    got = crop_mask(mask, (0, 0, n, n), n)
    assert got.dtype == bool and np.array_equal(got, mask)


box_coords = floats(-50, 150)


@FAST
@given(box_coords, box_coords, floats(0, 80), floats(0, 80), floats(1, 3),
       floats(0, 10))
def test_square_around_is_a_centred_square_holding_the_box(x0, y0, bw, bh, margin, min_side):
    box = (x0, y0, x0 + bw, y0 + bh)
    sx0, sy0, sx1, sy1 = square_around(box, margin, min_side)
    side = max(min_side, margin * max(bw, bh))
    assert sx1 - sx0 == pytest.approx(side, abs=1e-9)
    assert sy1 - sy0 == pytest.approx(side, abs=1e-9)
    assert (sx0 + sx1) / 2 == pytest.approx(x0 + bw / 2, abs=1e-9)
    assert (sy0 + sy1) / 2 == pytest.approx(y0 + bh / 2, abs=1e-9)
    eps = 1e-9
    assert sx0 <= box[0] + eps and sy0 <= box[1] + eps and sx1 >= box[2] - eps \
        and sy1 >= box[3] - eps


@FAST
@given(st.integers(1, 60), st.integers(1, 60), box_coords, box_coords, floats(0.5, 90),
       st.integers(4, 64))
def test_paste_slices_are_the_pixels_inside_the_square_and_uncrop_maps_them(h, w, x0, y0, side,
                                                                            s):
    square = (x0, y0, x0 + side, y0 + side)
    sl = paste_slices(square, (h, w))
    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    inside_c = cols[(cols >= x0) & (cols <= x0 + side)]
    inside_r = rows[(rows >= y0) & (rows <= y0 + side)]
    if sl is None:
        assert len(inside_c) == 0 or len(inside_r) == 0
        return
    rs, cs = sl
    assert 0 <= rs.start < rs.stop <= h and 0 <= cs.start < cs.stop <= w
    # every pixel whose centre is strictly inside is pasted (boundary centres may go either way)
    strict_c = cols[(cols > x0 + 1e-6) & (cols < x0 + side - 1e-6)]
    strict_r = rows[(rows > y0 + 1e-6) & (rows < y0 + side - 1e-6)]
    assert cs.stop - cs.start >= len(strict_c) and rs.stop - rs.start >= len(strict_r)
    # uncrop of the crop's own normalised pixel-centre coordinates gives each pasted pixel's
    # normalised coordinates in the square (a linear ramp is interpolated exactly, up to
    # OpenCV's 1/32-pixel fixed point), clamped to the outermost centres by BORDER_REPLICATE
    ident = identity_grid((s, s)).numpy()
    got = uncrop(ident, square, sl, cv2.BORDER_REPLICATE)
    assert got.shape == (rs.stop - rs.start, cs.stop - cs.start, 2)
    lim = 1 - 1 / s
    gx = np.clip(2 * (np.arange(cs.start, cs.stop) + 0.5 - x0) / side - 1, -lim, lim)
    gy = np.clip(2 * (np.arange(rs.start, rs.stop) + 0.5 - y0) / side - 1, -lim, lim)
    tol = 2 / (32 * s) + 1e-5
    assert np.allclose(got[..., 0], gx[None, :], atol=tol)
    assert np.allclose(got[..., 1], gy[:, None], atol=tol)


@FAST
@given(st.integers(1, 50))
def test_uncrop_of_a_square_frame_cropped_at_its_own_size_is_the_identity(n):
    sl = paste_slices((0, 0, n, n), (n, n))
    assert sl == (slice(0, n), slice(0, n))
    img = np.random.default_rng(n).random((n, n)).astype(np.float32)
    assert np.allclose(uncrop(img, (0, 0, n, n), sl), img, atol=1e-6)
    assert np.allclose(uncrop(crop(img, (0, 0, n, n), n), (0, 0, n, n), sl), img, atol=1e-6)


@pytest.fixture(scope="module")
def identity_pipeline():
    from registration.matcher import Matcher
    from registration.pipeline import Pipeline
    return Pipeline(Matcher())        # an untrained matcher: its warps come from params alone


@st.composite
def ellipse_mask(draw):
    """(mask, smaller radius): a filled ellipse inside an h×w frame."""
    h, w = draw(st.integers(24, 120)), draw(st.integers(24, 120))
    ry = draw(floats(3, h / 2 - 1))
    rx = draw(floats(3, w / 2 - 1))
    cy = draw(floats(ry, h - ry))
    cx = draw(floats(rx, w - rx))
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1, min(rx, ry)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(ellipse_mask(), floats(1.0, 2.0))
def test_crop_and_paste_back_with_identity_params_returns_the_mask(identity_pipeline, case,
                                                                  margin):
    import cv2

    from registration.metrics import dice
    from registration.pipeline import mask_box
    mask, radius = case
    s = identity_pipeline.size
    square = square_around(mask_box(mask), margin)
    k = (square[2] - square[0]) / s          # image pixels per crop pixel
    small = crop_mask(mask, square, s)
    zero = torch.zeros(6 + 2 * identity_pipeline.matcher.n_ctrl)
    back = identity_pipeline._paste(zero, small, square, mask.shape)
    assert back.shape == mask.shape and back.dtype == bool
    # outside the square nothing is pasted
    sl = paste_slices(square, mask.shape)
    outside = np.ones(mask.shape, bool)
    outside[sl] = False
    assert not back[outside].any()
    # a round trip through S×S can only change pixels within about one crop pixel of the
    # object's outline; everything farther in or out comes back as it was. (The frame's edge
    # is an outline too: crops see zeros beyond it.)
    u8 = np.pad(mask, 1).astype(np.uint8)
    depth = np.where(u8, cv2.distanceTransform(u8, cv2.DIST_L2, 5),
                     cv2.distanceTransform(1 - u8, cv2.DIST_L2, 5))[1:-1, 1:-1]
    far = depth > 1.5 * k + 1
    assert np.array_equal(back[far], mask[far]), (k, int((back != mask)[far].sum()))
    if radius >= 4 * k:                      # an object many crop pixels thick: nearly all back
        assert dice(back, mask) >= 0.9
