"""The app in a real browser: click an example, press Register, read the Dice off the page.

Saves screenshots to tests/artifacts/ (browser.png: the result page; browser-error.png: the
message after a broken upload) for a human to look at.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from apphelpers import app_server, examples  # noqa: F401  (app_server is a fixture)
from conftest import needs_pipeline

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MIN_DICE = 0.6
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [
    needs_pipeline,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no browser at {CHROMIUM}"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

PAIR = next(e for e in examples() if e["caption"].startswith("3 distractors, big"))


def test_example_register_and_dice_on_page(app_server, tmp_path):  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(app_server.url)
            button = page.locator("#register-button")
            button.wait_for()

            # the examples table shows each pair's caption; clicking it fills the inputs
            page.get_by_text(PAIR["caption"], exact=True).first.click()
            about = page.get_by_label("About", exact=True)
            sync_api.expect(about).to_have_value(PAIR["caption"])
            # both image inputs now show a picture
            sync_api.expect(page.locator("img").first).to_be_visible()

            button.click()
            headline = page.locator("#headline")
            sync_api.expect(headline).to_contain_text("Dice", timeout=60_000)
            text = headline.inner_text()
            m = re.search(r"With localization Dice\s*([0-9.]+)\s*vs without\s*([0-9.]+)", text)
            assert m, f"no Dice in the headline: {text!r}"
            with_loc, without = float(m.group(1)), float(m.group(2))
            print(f"page says: Dice {with_loc:.2f} with localization, {without:.2f} without")
            # the pictures have arrived too (the comparison pair carries their own Dice)
            for elem in ("#with-localization img", "#without-localization img"):
                sync_api.expect(page.locator(elem)).to_be_visible()
            page.wait_for_timeout(500)   # let the images paint before the screenshot
            page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
            assert with_loc >= MIN_DICE
            assert 0 <= without <= 1

            # a broken upload after that: a plain message on the page, no traceback or path
            bad = tmp_path / "not_an_image.png"
            bad.write_text("this is text, not a PNG\n")
            page.locator("#fixed-input").get_by_role("button", name="Remove Image").click()
            page.locator("#fixed-input input[type=file]").set_input_files(str(bad))
            page.wait_for_timeout(500)
            button.click()
            toast = page.get_by_text("could not be read as an image")
            sync_api.expect(toast.first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(600)   # the message slides in
            page.screenshot(path=str(ARTIFACTS / "browser-error.png"), full_page=True)
            body = page.locator("body").inner_text()
            assert "Traceback" not in body and "/tmp/" not in body
        finally:
            browser.close()
