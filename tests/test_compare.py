"""The app's "compare with a classical method" option: demons on the same crops."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, needs_pipeline

pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def app_module():
    threads = torch.get_num_threads()
    import app
    yield app
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@needs_pipeline
def test_demons_runs_on_the_same_crops_and_reports_both(app_module):
    ex = ROOT / "assets" / "mnist"
    moving = np.asarray(Image.open(ex / "03_moving.png").convert("RGB"))
    fixed = np.asarray(Image.open(ex / "03_fixed.png").convert("RGB"))
    image, text = app_module.compare_classical("mnist", moving, fixed)
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[1] > 2 * 280
    nums = [float(x) for x in __import__("re").findall(r"Dice (\d\.\d+)", text)]
    assert len(nums) == 2 and all(0.6 < d <= 1 for d in nums), text   # both really match
    assert "demons" in text and "learned" in text


@needs_pipeline
def test_compare_with_bad_input_gives_a_plain_message(app_module):
    import gradio as gr
    with pytest.raises(gr.Error):
        app_module.compare_classical("mnist", np.zeros((40, 40, 3), np.uint8),
                                     np.zeros((112, 112, 3), np.uint8))
