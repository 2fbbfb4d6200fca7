"""The US–CT simulator: physics in simple cases with known answers, and the pairs' geometry."""
import numpy as np
import pytest

from registration.data import usct


def _lines(hu: float, label: int, n_samples: int = 200, n_lines: int = 8, echo: float = 1.0):
    return (np.full((n_samples, n_lines), hu, np.float32),
            np.full((n_samples, n_lines), label, np.uint8),
            np.full((n_samples, n_lines), echo, np.float32))


def test_acoustic_properties_from_hu():
    rho, c = usct.acoustic(np.array([0.0, -1000.0, 1000.0], np.float32))
    assert rho[0] == pytest.approx(1000) and c[0] == pytest.approx(1540)
    assert c[1] < 400 and rho[1] < 2           # gas: slow and light
    assert c[2] > 3000 and rho[2] == pytest.approx(2000)


def test_uniform_medium_falls_with_depth_by_the_attenuation_law_and_tgc_flattens_it():
    hu, lab, echo = _lines(40.0, usct.LIVER)
    step = 0.75                                   # mm
    raw = usct.beamform(hu, lab, echo, step, None, tgc=False, speckle=False,
                        skin=np.zeros(8, int))
    assert np.all(np.diff(raw[:, 0]) < 0)         # strictly falling
    # known answer: two-way loss of α·f dB per cm per MHz, amplitude ratio per step
    want = 10 ** (-2 * usct.ATTENUATION[usct.LIVER] * usct.FREQ_MHZ * step / 10 / 20)
    assert raw[101, 0] / raw[100, 0] == pytest.approx(want, rel=1e-4)
    flat = usct.beamform(hu, lab, echo, step, None, tgc=True, speckle=False,
                         skin=np.zeros(8, int))
    # TGC assumes 0.55 dB/cm/MHz, the liver has 0.5: nearly flat, slightly rising
    assert flat[-1, 0] / flat[1, 0] == pytest.approx(
        10 ** (2 * (usct.SOFT_ATTENUATION - usct.ATTENUATION[usct.LIVER]) * usct.FREQ_MHZ
               * step * 198 / 10 / 20), rel=1e-3)


@pytest.mark.parametrize("obstacle,hu", [(usct.BONE, 700.0), (usct.GAS, -900.0)])
def test_bone_and_gas_cast_a_shadow_behind_a_bright_interface(obstacle, hu):
    h, lab, echo = _lines(40.0, usct.SOFT)
    h[80:90, :4], lab[80:90, :4] = hu, obstacle   # an obstacle on the first four lines
    amp = usct.beamform(h, lab, echo, 0.75, None, speckle=False, skin=np.zeros(8, int))
    assert amp[80, 0] > 10 * amp[80, 6]           # its front surface reflects strongly
    assert np.all(amp[100:, :4] < 0.05 * amp[100:, 4:].mean())   # and darkness behind it
    assert np.allclose(amp[100:, 4:], amp[100:, 4:5])            # unshadowed lines unaffected


def test_speckle_is_multiplicative_with_unit_power():
    hu, lab, echo = _lines(40.0, usct.LIVER, n_samples=400, n_lines=400)
    rng = np.random.default_rng(0)
    a = usct.beamform(hu, lab, echo, 0.75, rng, tgc=True, speckle=True, skin=np.zeros(400, int))
    b = usct.beamform(hu, lab, echo, 0.75, None, tgc=True, speckle=False,
                      skin=np.zeros(400, int))
    sp = a / b                                    # the speckle factor alone
    assert (sp ** 2).mean() == pytest.approx(1.0, abs=0.05)
    assert sp.std() / sp.mean() == pytest.approx(0.52, abs=0.05)   # Rayleigh: √(4/π − 1)


def test_phantom_is_seeded_and_its_tumours_lie_in_the_liver():
    a = usct.phantom(np.random.default_rng(7))
    b = usct.phantom(np.random.default_rng(7))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.tumours, b.tumours)
    assert a.target_mask().sum() > 0
    assert a.liver[a.tumours > 0].all()
    assert a.hu.shape == (usct.SIZE, usct.SIZE) and a.hu.dtype == np.float32
    inside = a.hu[a.body]
    assert -150 < np.median(inside) < 100        # mostly soft tissue
    assert (a.hu[~a.body] < -900).all()          # air around


def test_window_maps_level_to_mid_grey():
    assert usct.window(np.array([40.0, -160.0, 240.0, 1000.0])).tolist() == [128, 0, 255, 255]


def test_pair_ground_truth_is_consistent():
    p = usct.PairGenerator("test", seed=3).sample()
    assert p.moving.shape == (usct.US_SIZE, usct.US_SIZE) and p.moving.dtype == np.uint8
    assert p.fixed.shape == (usct.SIZE, usct.SIZE)
    assert p.moving_mask.sum() > 10 and p.target_mask.sum() >= 30
    assert np.array_equal(p.box, usct.mask_box(p.target_mask))
    assert p.all_mask[p.target_mask].all()
    # the tumour is seen roughly in the middle of the fan, not cut by its edge
    ys, xs = np.nonzero(p.moving_mask)
    assert 0.15 * usct.US_SIZE < xs.mean() < 0.85 * usct.US_SIZE


def test_parts_draw_from_disjoint_streams():
    a = usct.PairGenerator("train", 0).sample()
    b = usct.PairGenerator("test", 0).sample()
    assert not np.array_equal(a.fixed, b.fixed)
    with pytest.raises(ValueError, match="part"):
        usct.PairGenerator("holdout")


def test_read_mrc_known_answer_and_refusals(tmp_path):
    import struct
    data = np.arange(2 * 3 * 4, dtype="<i2").reshape(2, 3, 4)
    header = struct.pack("<4i", 4, 3, 2, 1) + bytes(1024 - 16)
    (tmp_path / "a.mrc").write_bytes(header + data.tobytes())
    assert np.array_equal(usct.read_mrc(tmp_path / "a.mrc"), data)
    (tmp_path / "short.mrc").write_bytes(header + data.tobytes()[:10])
    with pytest.raises(ValueError, match="data bytes"):
        usct.read_mrc(tmp_path / "short.mrc")
    (tmp_path / "mode.mrc").write_bytes(struct.pack("<4i", 4, 3, 2, 99) + bytes(1008))
    with pytest.raises(ValueError, match="mode"):
        usct.read_mrc(tmp_path / "mode.mrc")


def _have_lits() -> bool:
    import importlib.util
    return importlib.util.find_spec(usct.LITS_PACKAGE) is not None


@pytest.mark.skipif(not _have_lits(), reason="liver-ct-segmentation-package not installed")
def test_real_ct_volume_loads_and_gives_pairs():
    hu, lab = usct.lits_volume()
    assert hu.shape == lab.shape == (128, 128, 128)
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    assert 0 < float(np.median(hu[lab == 1])) < 200      # liver is soft tissue (HU)
    pairs = usct.real_pairs(2, seed=0)
    assert len(pairs) == 2
    for p in pairs:
        assert p.moving_mask.sum() > 0 and p.target_mask.sum() >= 30
