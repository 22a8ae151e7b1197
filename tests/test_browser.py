"""A real browser (Debian's Chromium through Playwright): paint, save, see a newly published pre-annotation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_ui import launch_app, stop_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium not installed (apt-get install -y chromium)"),
]


def _stroke(page, box: dict, y_frac: float, x_from: float = 0.15, x_to: float = 0.85) -> None:
    y = box["y"] + box["height"] * y_frac
    page.mouse.move(box["x"] + box["width"] * x_from, y)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(box["x"] + box["width"] * (x_from + (x_to - x_from) * i / 20), y, steps=2)
    page.mouse.up()


def test_paint_save_and_see_preannotation(tiny_dataset: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    proc, url = launch_app(tiny_dataset, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#ls-editor canvas", timeout=60_000)
            page.wait_for_function(
                "document.querySelector('#ls-image-info').innerText.includes('frame_000')", timeout=60_000
            )
            page.wait_for_timeout(1000)
            canvas = page.query_selector("#ls-editor canvas")
            # The image fills the canvas' width; find the image's box from its aspect (128x96).
            box = canvas.bounding_box()
            img_h = box["width"] * 96 / 128
            img_box = {
                "x": box["x"],
                "y": box["y"] + (box["height"] - img_h) / 2,
                "width": box["width"],
                "height": img_h,
            }
            page.click("#ls-editor button[aria-label='Brush']")
            page.keyboard.press("Escape")
            _stroke(page, img_box, 0.12)  # class 0 (sky), the default colour, across the top
            page.click("#ls-editor button[aria-label='Color']")
            page.locator("#ls-editor button.color").nth(1).click()  # class 1 (road)
            page.keyboard.press("Escape")
            _stroke(page, img_box, 0.92)  # across the bottom
            page.click("#ls-save")
            page.wait_for_function(
                "document.querySelector('#ls-save-msg').innerText.includes('Saved revision')", timeout=60_000
            )
            assert "labelled pixels" in page.inner_text("#ls-save-msg")
            # No button pressed: the background trainer runs a round, publishes v1, the page shows it.
            page.wait_for_function(
                "document.querySelector('#ls-overlay-info').innerText.includes('model v1')", timeout=240_000
            )
            assert page.query_selector("#ls-overlay img") is not None
            assert "Serving model v1" in page.inner_text("#ls-trainer")
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        stop_app(proc)
    from labelsmart import config
    from labelsmart.store import Store

    cfg = config.load({"dataset": str(tiny_dataset), "workdir": str(tmp_path / "work")}, env={})
    store = Store(cfg.db_path)
    first = store.images()[0]
    counts = store.class_pixel_counts()
    assert store.current_revision(first.id) is not None
    assert counts.get(0, 0) > 50 and counts.get(1, 0) > 50  # both strokes landed with their class
