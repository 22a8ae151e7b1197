"""Try labelsmart as a new user would, scripted: start the app on a data set, save simulated scribbles on a
few images through the UI's own API, wait for the background trainer's first model, evaluate it and take
a screenshot of the page showing a pre-annotation of an image nobody labelled.

    python scripts/user_trial.py --dataset ../shared/data/camvid --images 5 --out exports/trial-camvid

Writes ``trial.json`` (timings, versions, evaluation) and ``screenshot.png`` under ``--out``. The app runs with
the shipped defaults (pass extra ``LABELSMART_*`` variables through the environment to change them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelsmart import imageio  # noqa: E402
from labelsmart.bench.common import seeded_order  # noqa: E402
from labelsmart.bench.scribble import simulate_scribbles  # noqa: E402
from labelsmart.datasets import DataFolder  # noqa: E402
from labelsmart.serving.sidecar import Sidecar  # noqa: E402
from labelsmart.store.registry import ONNX_NAME  # noqa: E402

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


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(url: str, stem: str, colors: list[list[int]], path: Path) -> None:
    """Open ``stem`` in the page, press "Use pre-annotation", wait until the editor shows it, take a picture."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 980})
        page.goto(url)
        page.wait_for_selector("#ls-editor canvas", timeout=180_000)
        page.wait_for_timeout(1500)
        page.click("#ls-picker input")
        page.keyboard.press("Control+A")
        page.keyboard.type(stem)
        page.wait_for_timeout(500)
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#ls-image-info').innerText.includes('{stem}')", timeout=60_000)
        page.wait_for_function(
            "document.querySelector('#ls-overlay-info').innerText.includes('model v')", timeout=60_000
        )
        page.click("#ls-accept")
        pal = np.asarray(colors)
        for _ in range(120):  # software WebGL in headless Chromium can take a while to draw the new layer
            page.wait_for_timeout(1000)
            shot = cv2.imdecode(np.frombuffer(page.locator("#ls-editor").screenshot(), np.uint8), cv2.IMREAD_COLOR)
            rgb = cv2.cvtColor(shot, cv2.COLOR_BGR2RGB).reshape(-1, 1, 3).astype(int)
            if (np.abs(rgb - pal[None]).sum(axis=2).min(axis=1) < 10).mean() > 0.3:
                break
        page.wait_for_timeout(1000)
        page.screenshot(path=str(path))
        browser.close()


def main() -> int:
    """Run the trial."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="folder in the shared layout (images/, masks/, splits.json)")
    ap.add_argument("--images", type=int, default=5, help="images to label with simulated scribbles")
    ap.add_argument("--split", default="train", help="split the labelled images come from (random, seed 0)")
    ap.add_argument("--eval-split", default="val", help="split(s) to evaluate every version on, comma-separated")
    ap.add_argument("--rounds", type=int, default=1, help="rounds to wait for (after the first: Train now)")
    ap.add_argument("--out", default="exports/trial")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    from gradio_client import Client, handle_file

    dataset = Path(args.dataset).resolve()
    folder = DataFolder.open(dataset)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="labelsmart-trial-"))
    port = free_port()
    log = open(out / "app.log", "w")  # noqa: SIM115
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--dataset",
            str(dataset),
            "--workdir",
            str(work / "state"),
            "--models-dir",
            str(work / "models"),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    result: dict = {"dataset": str(dataset), "images": args.images}
    try:
        client = None
        for _ in range(240):
            try:
                client = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        assert client is not None, "app did not start"
        by_path = {p: i for i, p, _ in client.predict(api_name="/images")}
        chosen = seeded_order(folder.names(args.split))[: args.images]
        colors = [list(c) for c in folder.colors]
        saves = []
        for name in chosen:
            rel = next(p for p in by_path if Path(p).stem == name)
            image_id = by_path[rel]
            client.predict(image_id, 0.5, api_name="/open_image")
            bg, truth = folder.read(name)
            layer = imageio.mask_to_rgba(simulate_scribbles(truth), colors)
            cv2.imwrite(str(work / "bg.png"), cv2.cvtColor(bg, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(work / "layer.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
            t = time.time()
            msg = client.predict(
                {
                    "background": handle_file(str(work / "bg.png")),
                    "layers": [handle_file(str(work / "layer.png"))],
                    "composite": None,
                    "id": None,
                },
                api_name="/save",
            )[0]
            saves.append({"image": rel, "message": msg, "save_s": round(time.time() - t, 3)})
            print(f"saved {rel}: {msg}", flush=True)
        first_save = time.time() - sum(s["save_s"] for s in saves)
        t0 = time.time()
        while time.time() - t0 < args.timeout:
            status = client.predict(api_name="/status")
            if "Serving model **v1**" in status:
                break
            time.sleep(2)
        else:
            raise SystemExit("no model was published in time; see app.log")
        result["seconds_from_last_save_to_first_model"] = round(time.time() - t0, 1)
        result["seconds_from_first_save_to_first_model"] = round(time.time() - first_save, 1)
        result["saves"] = saves
        for version in range(2, args.rounds + 1):  # more rounds on the same labels: "Train now", warm-started
            client.predict(api_name="/train_now")
            t = time.time()
            while f"Serving model **v{version}**" not in client.predict(api_name="/status"):
                if time.time() - t > args.timeout:
                    raise SystemExit(f"v{version} was not published in time; see app.log")
                time.sleep(2)
            result[f"seconds_train_now_to_v{version}"] = round(time.time() - t, 1)
        result["versions"] = {}
        eval_splits = args.eval_split.split(",")
        for onnx_path in sorted((work / "models").glob(f"*/v*/{ONNX_NAME}")):
            version = onnx_path.parent.name
            result["versions"][version] = {"metrics": Sidecar.read(onnx_path).metrics, "eval": {}}
            for split in eval_splits:
                ev = out / f"{version}.eval-{split}.json"
                cmd = [sys.executable, "-m", "labelsmart", "evaluate", "--model", str(onnx_path)]
                cmd += ["--dataset", str(dataset), "--split", split, "--out", str(ev)]
                subprocess.run(cmd, cwd=ROOT, check=True)
                result["versions"][version]["eval"][split] = json.loads(ev.read_text())
        (out / "trial.json").write_text(json.dumps(result, indent=2))  # the numbers, whatever the picture does
        # A picture of the page on an image nobody labelled, its pre-annotation copied into the editor.
        unseen = sorted(folder.names(eval_splits[0]))[0]
        rel = next(p for p in by_path if Path(p).stem == unseen)
        screenshot(url, Path(rel).stem, colors, out / "screenshot.png")
        result["screenshot_image"] = rel
    finally:
        proc.terminate()
        proc.wait(30)
    (out / "trial.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "saves"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
