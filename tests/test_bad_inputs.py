"""The bad-input corpus of issue 10 (tests/make_bad_inputs.py) through the library and the app.

Every file is decoded the way the app decodes uploads (``app.decode_image``), then registered
with ``Pipeline.register``; and it is sent to the running app through ``gradio_client``. Each
must give a result or a plain message (what it says is checked), within 5 s, and a good
request right after must give the good pair's Dice again.
"""
from __future__ import annotations

import atexit
import functools
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apphelpers import app_server  # noqa: F401  (a fixture)
from conftest import needs_pipeline
from make_bad_inputs import BOMB_SIDE, BadInput, good_pair, make
from registration.metrics import box_iou

pytestmark = needs_pipeline

LIMIT_S = 5.0
DICE_TOL = 0.05          # a re-encoded good image against the good image itself
MIN_BOX_IOU = 0.8        # …and the box it finds
PATHS = re.compile(r"(?:[A-Za-z]:)?[\\/](?:tmp|work|root|home|usr|etc|var|proc|opt|srv)\b"
                   r"|site-packages|\.py\b")


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, BadInput]:
    out = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return {it.name: it for it in make(out)}


NAMES = list(corpus())
PAIR = good_pair()


def assert_plain(message: str) -> None:
    """Fit to show a user: short, one thought, no traceback, no server path or source file."""
    assert message and message.strip(), "empty message"
    assert "Traceback" not in message and 'File "' not in message, message
    assert not PATHS.search(message), message
    assert len(message) < 400, message


def check_outcome(item: BadInput, role: str, error: str | None, dice: float | None, box,
                  good: dict) -> None:
    """What must come of ``item`` used as the ``role`` image: see make_bad_inputs.py."""
    expect = item.expect if role == "fixed" or item.expect == "refused" else "either"
    if error is not None:
        assert_plain(error)
        assert expect != "registered", f"{item.name} ({role}) was refused: {error}"
        if role == "fixed" or item.expect == "refused":
            assert item.match and re.search(item.match, error), \
                f"{item.name} ({role}): unexpected message {error!r}"
        return
    assert expect != "refused", f"{item.name} ({role}) was registered, expected a refusal"
    assert 0.0 <= dice <= 1.0
    if role == "fixed" and item.like_good:
        assert abs(dice - good["dice"]) <= DICE_TOL, (item.name, dice, good["dice"])
        assert box_iou(box, good["box"]) >= MIN_BOX_IOU, (item.name, box, good["box"])


# ---------------------------------------------------------------------------------------------
# the files are what they claim to be (so a Pillow change cannot quietly weaken the corpus)


def test_corpus_files_are_what_they_claim():
    c = corpus()
    raw = c["bomb.png"].path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert struct.unpack(">II", raw[16:24]) == (BOMB_SIDE, BOMB_SIDE)
    assert len(raw) < 200_000                       # 900 Mpx in ~110 kB
    assert c["empty.png"].path.stat().st_size == 0
    assert c["pdf_header.png"].path.read_bytes().startswith(b"%PDF-")
    expected_modes = {"grey16.png": "I;16", "rgba_light_ink.png": "RGBA",
                      "rgba_dark_ink.png": "RGBA", "palette.png": "P", "cmyk.jpg": "CMYK",
                      "float_nan.tiff": "F", "1x1.png": "L", "3x3.png": "L"}
    for name, mode in expected_modes.items():
        with Image.open(c[name].path) as im:
            assert im.mode == mode, (name, im.mode)
    with Image.open(c["animated.gif"].path) as im:
        assert im.format == "GIF" and im.n_frames == 3
    with Image.open(c["exif_rotated.jpg"].path) as im:
        assert im.getexif()[0x0112] == 6
        assert im.size == (112, 112)
    with Image.open(c["float_nan.tiff"].path) as im:
        assert np.isnan(np.asarray(im)).sum() == 64
    with Image.open(c["strip_4000x20.png"].path) as im:
        assert im.size == (4000, 20)
    for name in ("truncated.png", "truncated.jpg"):
        with pytest.raises(OSError):
            with Image.open(c[name].path) as im:
                im.load()


# ---------------------------------------------------------------------------------------------
# through the library, decoded as the app decodes


@pytest.fixture(scope="module")
def app_module():
    threads = torch.get_num_threads()
    import app        # loads the pipelines and builds the UI; sets the app's torch threads (1)
    # one thread, as the app runs: one pair at a time is too small to gain from two, and two
    # threads contend with whatever else runs (pytest-xdist, a training job)
    torch.set_num_threads(1)
    yield app
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)   # the app turns it on; torch's default, for later tests


@pytest.fixture(scope="module")
def pipe(app_module):
    return app_module.PIPELINES["mnist"]   # Pipeline.from_pretrained("mnist"), as the app has it


def _decode(app_module, path: Path, what: str) -> np.ndarray:
    return app_module.decode_image(str(path), what)


def _register(app_module, pipe, moving: np.ndarray, fixed: np.ndarray) -> dict:
    from registration.metrics import dice
    r = pipe.register(moving, fixed)
    return {"dice": dice(r.warped_mask_full, r.fixed_mask_full), "box": r.box}


@pytest.fixture(scope="module")
def good_lib(app_module, pipe) -> dict:
    m = _decode(app_module, Path(PAIR["moving"]), "moving")
    f = _decode(app_module, Path(PAIR["fixed"]), "fixed")
    return dict(_register(app_module, pipe, m, f), moving=m, fixed=f)


def test_good_pair_known_answer(good_lib):
    assert good_lib["dice"] >= 0.85
    assert box_iou(good_lib["box"], PAIR["true_box"]) >= 0.8


def test_decoder_reads_reencoded_images_as_the_original(app_module):
    """Each re-encoding of the good fixed image decodes to (nearly) the same picture, up to
    the inversion the pipeline undoes (dark ink on a transparent background)."""
    from registration.pipeline import bright_foreground, to_gray
    good = bright_foreground(to_gray(_decode(app_module, Path(PAIR["fixed"]), "fixed")))
    tol = {"cmyk.jpg": 0.03, "exif_rotated.jpg": 0.03, "palette.png": 0.03,
           "animated.gif": 0.03}
    for item in corpus().values():
        if not item.like_good:
            continue
        got = bright_foreground(to_gray(_decode(app_module, item.path, "fixed")))
        err = float(np.abs(got - good).mean())
        assert got.shape == good.shape and err <= tol.get(item.name, 0.005), (item.name, err)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_through_the_pipeline(name, app_module, pipe, good_lib):
    import gradio as gr
    item = corpus()[name]
    for role in ("fixed", "moving"):
        if role == "moving" and (item.moving is not None or item.like_good):
            continue     # its own moving image is part of the test; re-encodings decode alike
        t0 = time.perf_counter()
        error = result = None
        try:
            bad = _decode(app_module, item.path, role)
            if role == "fixed":
                moving = (_decode(app_module, item.moving, "moving") if item.moving is not None
                          else good_lib["moving"])
                result = _register(app_module, pipe, moving, bad)
            else:
                result = _register(app_module, pipe, bad, good_lib["fixed"])
        except gr.Error as e:
            error = e.message
        except ValueError as e:   # RegistrationError is a ValueError
            error = str(e)
        elapsed = time.perf_counter() - t0
        print(f"{name} as {role}: {elapsed:.2f} s, "
              f"{error if error is not None else 'Dice %.3f' % result['dice']}")
        assert elapsed < LIMIT_S, f"{name} ({role}) took {elapsed:.1f} s"
        check_outcome(item, role, error, None if result is None else result["dice"],
                      None if result is None else result["box"], good_lib)
        after = _register(app_module, pipe, good_lib["moving"], good_lib["fixed"])
        assert after["dice"] == pytest.approx(good_lib["dice"], abs=1e-6)
        assert after["box"] == pytest.approx(good_lib["box"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# through the app's API


@pytest.fixture(scope="module")
def client(app_server):  # noqa: F811
    from gradio_client import Client
    # numbers only: the pictures are checked in test_app.py
    return Client(app_server.url, verbose=False, ssl_verify=False, download_files=False)


def call(client, moving, fixed):
    from gradio_client import handle_file
    return client.predict("mnist", handle_file(str(moving)), handle_file(str(fixed)), None, None,
                          api_name="/register")[-1]


@pytest.fixture(scope="module")
def good_app(client) -> dict:
    return call(client, PAIR["moving"], PAIR["fixed"])


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_through_the_app(name, client, good_app, app_server):  # noqa: F811
    from gradio_client.exceptions import AppError
    item = corpus()[name]
    log_start = len(app_server.log())
    t0 = time.perf_counter()
    error = numbers = None
    try:
        numbers = call(client, item.moving or PAIR["moving"], item.path)
    except AppError as e:
        error = str(e)
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.2f} s, {error if error is not None else numbers['dice']}")
    assert elapsed < LIMIT_S, f"{name} took {elapsed:.1f} s"
    check_outcome(item, "fixed", error, None if numbers is None else numbers["dice"],
                  None if numbers is None else numbers["box"], good_app)
    if item.expect == "refused":        # decoding refusals are the same for the moving image
        with pytest.raises(AppError) as err:
            call(client, item.path, PAIR["fixed"])
        assert_plain(str(err.value))
        assert re.search(item.match, str(err.value)), str(err.value)
    after = call(client, PAIR["moving"], PAIR["fixed"])
    assert after["dice"] == pytest.approx(good_app["dice"], abs=1e-6)
    assert after["box"] == good_app["box"]
    assert "Traceback" not in app_server.log()[log_start:]
