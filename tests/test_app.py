"""The Gradio app end to end: a real server in a subprocess, called with gradio_client."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from apphelpers import app_server, examples  # noqa: F401  (app_server is a fixture)
from conftest import needs_pipeline

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = needs_pipeline

COLD_START_LIMIT_S = 15.0
MIN_DICE = 0.6
# a pair from the held-out scenes: a big target among three distractor digits
PAIR = next(e for e in examples() if e["caption"].startswith("3 distractors, big"))


@pytest.fixture(scope="module")
def client(app_server):  # noqa: F811
    return Client(app_server.url, verbose=False)


def call(client, moving, fixed, moving_mask=None, fixed_mask=None):
    mm = handle_file(moving_mask) if moving_mask else None
    fm = handle_file(fixed_mask) if fixed_mask else None
    return client.predict("mnist", handle_file(moving), handle_file(fixed), mm, fm,
                          api_name="/register")


def numbers_of(out) -> dict:
    numbers = out[-1]
    assert isinstance(numbers, dict), f"last output should be the JSON numbers, got {numbers!r}"
    return numbers


def assert_plain(message: str) -> None:
    assert message and "Traceback" not in message
    assert not re.search(r"/(tmp|work|root|home|usr)/", message), message


def test_cold_start(app_server):  # noqa: F811
    print(f"cold start (process start → first HTTP 200): {app_server.cold_start_s:.2f} s")
    assert app_server.cold_start_s <= COLD_START_LIMIT_S


def test_api_is_register_only(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert list(endpoints) == ["/register"]


def test_register_with_and_without_localization(client):
    out = call(client, PAIR["moving"], PAIR["fixed"])
    n = numbers_of(out)
    print(f"{PAIR['caption']}: Dice {n['dice']:.3f} with localization, "
          f"{n['dice_without_localization']:.3f} without")
    assert n["dice"] >= MIN_DICE
    assert 0 <= n["iou"] <= n["dice"] <= 1
    assert isinstance(n["dice_without_localization"], float)
    assert 0 <= n["dice_without_localization"] <= 1
    assert set(n["timings_ms"]) >= {"localize", "segment", "match", "total"}
    # the headline says both numbers, as the JSON does
    m = re.search(r"With localization Dice \*\*([0-9.]+)\*\* vs without \*\*([0-9.]+)", out[0])
    assert m, out[0]
    assert abs(float(m.group(1)) - n["dice"]) < 0.006
    assert abs(float(m.group(2)) - n["dice_without_localization"]) < 0.006
    for path in out[1:8]:    # seven pictures, all real images
        with Image.open(path) as im:
            assert min(im.size) >= 100


def test_user_masks_are_used(client, tmp_path):
    """Supplying the masks the pipeline would find itself gives a sensible result."""
    moving = np.asarray(Image.open(PAIR["moving"]))
    mm = tmp_path / "moving_mask.png"
    Image.fromarray(((moving > 127) * 255).astype(np.uint8)).save(mm)
    n = numbers_of(call(client, PAIR["moving"], PAIR["fixed"], moving_mask=str(mm)))
    assert n["dice"] >= MIN_DICE


def _bad_files(tmp_path):
    text = tmp_path / "not_an_image.png"
    text.write_text("this is text, not a PNG\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(PAIR["fixed"], "rb").read()[:60])
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((112, 112), np.uint8)).save(blank)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tiny)
    huge = tmp_path / "huge.png"   # 25 Mpx of black compresses to a few kB: check before decoding
    Image.new("L", (5000, 5000)).save(huge)
    return {"text renamed .png": text, "truncated PNG": truncated, "blank black image": blank,
            "4×4 image": tiny, "5000×5000 image": huge}


def test_bad_uploads_give_plain_errors_and_the_app_recovers(client, tmp_path):
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(AppError) as err:
            call(client, PAIR["moving"], str(path))
        msg = str(err.value)
        print(f"{what}: {msg}")
        assert_plain(msg)
    with pytest.raises(AppError) as err:   # a bad moving image, too
        call(client, str(tmp_path / "not_an_image.png"), PAIR["fixed"])
    assert_plain(str(err.value))
    n = numbers_of(call(client, PAIR["moving"], PAIR["fixed"]))   # the next request works
    assert n["dice"] >= MIN_DICE


def test_inverted_example_works(client):
    """Dark-on-light uploads are handled like light-on-dark ones."""
    inv = [e for e in examples() if e["inverted"]]
    assert inv, "assets should hold dark-on-light examples"
    n = numbers_of(call(client, inv[0]["moving"], inv[0]["fixed"]))
    assert n["dice"] >= MIN_DICE


@pytest.mark.parametrize("name", ["silhouettes", "usct"])
def test_other_data_sets_register_their_examples(client, name):
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if not (root / "checkpoints" / name / "segmenter" / "model.safetensors").is_file():
        pytest.skip(f"{name} checkpoints not shipped")
    assets = root / "assets" / name
    items = json.loads((assets / "examples.json").read_text())["examples"]
    assert len(items) >= 8
    it = items[0]
    out = client.predict(name, handle_file(str(assets / it["moving"])),
                         handle_file(str(assets / it["fixed"])), None, None,
                         api_name="/register")
    n = numbers_of(out)
    assert 0.0 <= n["dice"] <= 1.0 and len(n["box"]) == 4
    assert n["dice_without_localization"] is not None
