"""A real browser (Debian's Chromium through Playwright): paint with the translucent brush, save, see a newly
published pre-annotation, use it with the photo showing through, save it back exactly."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CLASSES, write_dataset
from test_session import launch_app, stop_app

from labelsmart.app.session import LABEL_ALPHA, MIN_ALPHA
from labelsmart.config import ActiveConfig
from labelsmart.serving import active
from labelsmart.store import Store

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

H, W = 360, 480
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium not installed (apt-get install -y chromium)"),
]


def _stroke(page, box: dict, y_frac: float, x_from: float = 0.15, x_to: float = 0.85) -> None:
    y = box["y"] + box["height"] * y_frac
    page.mouse.move(box["x"] + box["width"] * x_from, y)
    page.mouse.down()
    # Few points: the brush joins them with straight segments, and each event costs a software-rendered redraw
    # (about a second on 2 cores), so 40 events made a stroke take 30-45 s.
    for i in range(1, 7):
        page.mouse.move(box["x"] + box["width"] * (x_from + (x_to - x_from) * i / 6), y)
    page.mouse.up()


def _sent_layers(events: list[bytes]) -> list[np.ndarray]:
    """The label layers (RGBA) of the editor values the page sent with its events, in order: the page uploads them
    first, and the event names the uploaded files (on this machine, so the test reads them)."""
    out = []
    for body in events:
        for value in json.loads(body).get("data", []):
            if isinstance(value, dict) and value.get("layers"):
                bgra = cv2.imread(value["layers"][0]["path"], cv2.IMREAD_UNCHANGED)
                out.append(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA))
    return out


def _editor_shot(page, path: Path) -> np.ndarray:
    shot = cv2.imdecode(np.frombuffer(page.locator("#ls-editor").screenshot(), np.uint8), 1)
    cv2.imwrite(str(path), shot)
    return cv2.cvtColor(shot, cv2.COLOR_BGR2RGB).reshape(-1, 3).astype(int)


def _near(rgb: np.ndarray, colors, tol: int = 30) -> int:
    return int(sum((np.abs(rgb - np.asarray(c)).max(axis=1) <= tol).sum() for c in colors))


def test_paint_save_and_see_preannotation(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    tiny_dataset = write_dataset(tmp_path / "data", h=H, w=W)  # CamVid's size: the editor must align its layers

    proc, url = launch_app(tiny_dataset, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            events: list[bytes] = []  # the events the page sends with the editor's value (save)
            page.on(
                "request",
                lambda r: (
                    "queue/join" in r.url
                    and b'"layers"' in (r.post_data_buffer or b"")
                    and events.append(r.post_data_buffer)
                ),
            )
            page.goto(url)
            page.wait_for_selector("#ls-editor canvas", timeout=60_000)
            page.wait_for_function(
                "document.querySelector('#ls-image-info').innerText.includes('frame_000')", timeout=60_000
            )
            page.wait_for_timeout(1000)
            canvas = page.query_selector("#ls-editor canvas")
            # The image fills the canvas' width; find the image's box from its aspect.
            box = canvas.bounding_box()
            img_h = box["width"] * H / W
            img_box = {
                "x": box["x"],
                "y": box["y"] + (box["height"] - img_h) / 2,
                "width": box["width"],
                "height": img_h,
            }
            page.click("#ls-editor button[aria-label='Brush']")
            page.keyboard.press("Escape")
            _stroke(page, img_box, 0.12)  # class 0 (sky), the default colour, across the top
            page.mouse.click(5, 5)  # focus the page, then the shortcut "2" picks class 1 (road) as brush colour
            page.keyboard.press("2")
            # the palette opens and the swatch is clicked asynchronously; slow (software-rendered) pages take seconds
            page.wait_for_function("document.body.dataset.lsBrushClass === '1'", timeout=30_000)
            page.wait_for_timeout(300)
            _stroke(page, img_box, 0.92)  # across the bottom
            # The strokes are translucent: the toy photo (sky on top, road below) shows through its class colours.
            rgb = _editor_shot(page, tmp_path / "strokes.png")
            sky, road = np.array((170, 200, 235)), np.array((70, 70, 75))
            through = _near(rgb, [(sky + CLASSES[0]["color"]) / 2, (road + CLASSES[1]["color"]) / 2], tol=20)
            opaque = _near(rgb, [CLASSES[0]["color"], CLASSES[1]["color"]], tol=10)
            assert through > 500 and opaque < 0.05 * through, (through, opaque)
            page.keyboard.press("s")  # the Save shortcut
            page.wait_for_function(
                "document.querySelector('#ls-save-msg').innerText.includes('Saved revision')", timeout=60_000
            )
            assert "labelled pixels" in page.inner_text("#ls-save-msg")
            painted = _sent_layers(events)[-1]
            alpha = painted[..., 3]
            assert painted.shape == (H, W, 4) and (alpha >= MIN_ALPHA).sum() > 100
            assert abs(int(np.median(alpha[alpha >= MIN_ALPHA])) - LABEL_ALPHA) <= 1  # the brush's opacity
            colours = painted[alpha >= MIN_ALPHA][:, :3].astype(int)
            error = np.min([np.abs(colours - c["color"]).max(axis=1) for c in CLASSES[:2]], axis=0)  # from its class
            print("painted layer: alpha", np.unique(alpha).tolist(), "largest colour error", int(error.max()))
            # No button pressed: the background trainer runs a round, publishes v1, the page shows it.
            page.wait_for_function(
                "document.querySelector('#ls-overlay-info').innerText.includes('model v1')", timeout=240_000
            )
            assert page.query_selector("#ls-overlay img") is not None
            assert "Serving model v1" in page.inner_text("#ls-trainer")
            # A fresh page (as after a reload), the next image: accept the pre-annotation as editable strokes,
            # check it is drawn over the image where it belongs, and save it as that image's labels.
            page.reload()
            page.wait_for_selector("#ls-editor canvas", timeout=60_000)
            page.wait_for_function(
                "document.querySelector('#ls-image-info').innerText.includes('frame_001')", timeout=60_000
            )
            page.wait_for_timeout(1000)
            # "Next" opens the image model v1 is least sure of (once the trainer has scored the images).
            probe = Store(tmp_path / "work" / "project.sqlite", image_root=tiny_dataset / "images")
            deadline = time.time() + 60
            while time.time() < deadline and len(probe.scores(1)) < 7:
                time.sleep(0.5)
            current = probe.image_id_by_path("frame_001.png")
            expected = active.suggest(probe, ActiveConfig(), after=current)
            assert expected is not None and expected.version == 1
            suggested_name = probe.image(expected.image_id).path
            page.click("#ls-next")
            page.wait_for_function(
                f"document.querySelector('#ls-image-info').innerText.includes('{suggested_name}')"
                " && document.querySelector('#ls-overlay-info').innerText.includes('model v1')",
                timeout=60_000,
            )
            assert "least sure" in page.inner_text("#ls-why")
            assert page.query_selector("#ls-uncertainty img") is not None
            page.click("#ls-accept")
            page.wait_for_function(
                "document.querySelector('#ls-save-msg').innerText.includes('Pre-annotation copied')", timeout=60_000
            )
            # Shown where it belongs, and see-through: the class colours cover the whole image at half opacity, so
            # the editor shows them blended with the photo (sky, road, car), neither the photo bare (a shifted
            # layer leaves a quadrant uncovered) nor the pure class colours (an opaque layer hides the photo).
            scene = [np.array(c) for c in ((170, 200, 235), (70, 70, 75), (200, 30, 30))]
            blends = [(p + np.array(c["color"])) / 2 for p in scene for c in CLASSES]
            for _ in range(30):  # the editor redraws once the new value has loaded
                page.wait_for_timeout(1000)
                rgb = _editor_shot(page, tmp_path / "editor.png")
                through, raw = _near(rgb, blends, tol=20), _near(rgb, scene, tol=20)
                opaque = _near(rgb, [c["color"] for c in CLASSES], tol=10)
                if through > 10_000:
                    break
            assert through > 10_000 and raw < 0.01 * through and opaque < 0.05 * through, (through, raw, opaque)
            page.click("#ls-save")
            page.wait_for_function(
                "document.querySelector('#ls-save-msg').innerText.includes('Saved revision')", timeout=60_000
            )
            accepted_layer = _sent_layers(events)[-1]  # the pre-annotation as the page sent it back
            a = accepted_layer[..., 3]
            assert abs(int(np.median(a[a > 0])) - LABEL_ALPHA) <= 1, np.unique(a)
            page.keyboard.press("p")  # Previous goes back to where Next came from
            page.wait_for_function(
                "document.querySelector('#ls-image-info').innerText.includes('frame_001')", timeout=60_000
            )
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        stop_app(proc)
    from labelsmart import config

    cfg = config.load({"dataset": str(tiny_dataset), "workdir": str(tmp_path / "work")}, env={})
    store = Store(cfg.db_path, image_root=cfg.image_root)
    first = store.images()[0]
    strokes = store.load_revision(store.history(first.id)[0].id)
    assert set(np.unique(strokes).tolist()) == {0, 1, 255}  # exactly the classes painted, the rest unlabelled
    assert (strokes == 0).sum() > 50 and (strokes == 1).sum() > 50  # both strokes landed with their class
    assert (strokes[:30] != 1).all() and (strokes[-30:] != 0).all()  # ... where they were painted
    assert np.array_equal(strokes != 255, painted[..., 3] >= MIN_ALPHA)  # every painted pixel, no more
    # The accepted pre-annotation was saved where the model put it: pixel for pixel, not shifted.
    from labelsmart.serving.onnx_model import OnnxModel

    model = OnnxModel(Path(store.latest_published().path).parent / "v0001" / "model.onnx", threads=1, device="cpu")
    second = store.image(expected.image_id)
    predicted = model.predict(store.read_image(second.id)).mask
    assert predicted.shape == (H, W)
    accepted = store.current_label(second.id)
    assert np.array_equal(accepted, predicted)  # pixel for pixel, through the translucent layer and back
