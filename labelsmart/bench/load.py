"""Several annotators at once: ``bench load`` starts the app with its trainer, and N clients, each with a session of
its own through ``gradio_client`` (the page's own API), open, save, undo and read images at the same time.

Two clients share each image, so saves race on the same revision. Every answer is checked: a save that says
"Saved revision N" must be revision N of that image in the store, holding exactly the mask that client painted; a
refused save or undo must say why (it starts with ⚠️ and names who saved); nothing else is allowed. Latencies per
call kind (p50, p99) and the count of lost revisions go to ``load.json``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from labelsmart import config, imageio
from labelsmart.app.session import label_layer
from labelsmart.bench.common import provenance
from labelsmart.store import Store

ROOT = Path(__file__).resolve().parents[2]
RESULTS_NAME = "load.json"
SAVED = re.compile(r"Saved revision (\d+)")
# The default (continuous) trainer on one thread with small crops: it trains, publishes and scores throughout the
# load, on one of the two cores (below the app's priority, as always). The round settings are for
# LABELSMART_TRIGGER_MODE=rounds, where short rounds run back to back.
TRAINER_ENV = {
    "LABELSMART_TRAIN_STEPS": "20",
    "LABELSMART_TRAIN_FIRST_ROUND_STEPS": "20",
    "LABELSMART_TRAIN_CROP": "64",
    "LABELSMART_TRAIN_BATCH_SIZE": "2",
    "LABELSMART_TRAIN_THREADS": "1",
    "LABELSMART_SERVE_THREADS": "1",
    "LABELSMART_TRIGGER_MIN_INTERVAL_S": "0",
    "LABELSMART_TRIGGER_MIN_NEW_PIXELS": "50",
    "LABELSMART_TRIGGER_POLL_S": "0.5",
}


@dataclass
class ClientLog:
    """What one client saw: latencies per call kind, its saves and every answer that was not a plain success."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    saved: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (image id, revision, mask painted)
    refused: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def timed(self, kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.latencies.setdefault(kind, []).append(time.perf_counter() - t0)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(dataset: Path, work: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``app.py`` on a free loopback port with a fast trainer; returns the process and its URL once it answers."""
    dataset, work = Path(dataset).resolve(), Path(work).resolve()  # the app runs in ``work``
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **TRAINER_ENV, **(extra_env or {})}
    cmd = [sys.executable, str(ROOT / "app.py"), "--dataset", str(dataset), "--workdir", str(work / "state")]
    cmd += ["--models-dir", str(work / "models"), "--port", str(port)]
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "app.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited early:\n{(work / 'app.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not start:\n{(work / 'app.log').read_text()[-3000:]}")


@functools.cache  # one for every client of the run
def _client_ssl_context() -> ssl.SSLContext:
    """One SSL context for all the clients' connections.

    ``gradio_client`` hands its ``ssl_verify`` to every ``httpx`` client it makes (several a call), and ``httpx``
    loads the CA bundle into a new context for each one unless it is given a context, even for plain HTTP on
    loopback: measured with one client, 175 ms of the benchmark's own CPU per save, more than the app spent on it.
    The clients run on the app's two cores, so their latencies measured that too. A browser does nothing like it; a
    shared default context verifies certificates the same way.
    """
    return ssl.create_default_context()


def _layers(store: Store, image_id: int, client: int, folder: Path, variants: int) -> list[tuple[str, np.ndarray]]:
    """A few scribble masks for one client on one image, as editor layer files, with the masks they mean."""
    image = store.image(image_id)
    colors = [c.color for c in store.classes()]
    rng = np.random.default_rng(1000 * image_id + client)
    out = []
    for v in range(variants):
        mask = np.full((image.height, image.width), 255, np.uint8)
        for _ in range(3):
            k = int(rng.integers(len(colors)))
            y, x = int(rng.integers(image.height - 4)), int(rng.integers(image.width - 20))
            mask[y : y + 3, x : x + 20] = k
        path = folder / f"layer-{client}-{image_id}-{v}.png"
        Image.fromarray(label_layer(mask, colors), "RGBA").save(path)  # translucent, as the page paints
        out.append((str(path), mask))
    return out


def run_client(url: str, store: Store, image_id: int, client: int, ops: int, folder: Path, log: ClientLog) -> None:
    """One annotator: open the image, then save, read the image list, undo and open again, ``ops`` calls in all."""
    from gradio_client import Client, handle_file

    api = Client(url, verbose=False, ssl_verify=_client_ssl_context())
    layers = _layers(store, image_id, client, folder, variants=4)
    bg = folder / f"bg-{image_id}.png"
    if not bg.exists():
        Image.fromarray(store.read_image(image_id), "RGB").save(bg)
    log.timed("open", api.predict, image_id, 0.5, api_name="/open_image")
    done = 1
    k = 0
    while done < ops:
        path, mask = layers[k % len(layers)]
        value = {"background": handle_file(str(bg)), "layers": [handle_file(path)], "composite": None, "id": None}
        msg = log.timed("save", api.predict, value, api_name="/save")[0]
        if m := SAVED.search(msg):
            log.saved.append((image_id, int(m.group(1)), mask))
        elif msg.startswith("⚠️ ") and len(msg) > 40:  # refused, in words (someone saved it first)
            log.refused.append(msg)
            log.timed("open", api.predict, image_id, 0.5, api_name="/open_image")  # see the newer labels
            done += 1
        elif not msg.startswith("Nothing changed"):
            log.wrong.append(f"save: {msg}")
        log.timed("images", api.predict, api_name="/images")
        done += 2
        if k % 3 == 2:
            msg = log.timed("undo", api.predict, 0.5, api_name="/undo")[0]
            if msg.startswith("⚠️ ") and len(msg) > 40:
                log.refused.append(msg)
                log.timed("open", api.predict, image_id, 0.5, api_name="/open_image")
                done += 1
            elif not (msg.startswith("Undone") or msg.startswith("Nothing to undo")):
                log.wrong.append(f"undo: {msg}")
            done += 1
        k += 1


def check(store: Store, logs: list[ClientLog]) -> list[str]:
    """Every save a client was told about is in the store, at that revision, with that client's mask."""
    lost = []
    for log in logs:
        for image_id, rev, mask in log.saved:
            history = {r.id for r in store.history(image_id)}
            if rev not in history:
                lost.append(f"revision {rev} of image {image_id} is not in the store")
            elif not np.array_equal(store.load_revision(rev), mask):
                lost.append(f"revision {rev} of image {image_id} holds other labels than were saved")
    return lost


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, float)
    return {"n": int(a.size), "p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99))}


def run_load(dataset: Path, work: Path, clients: int = 8, ops: int = 200) -> dict[str, Any]:
    """Start the app, run ``clients`` annotators doing ``ops`` calls each (two per image), check and summarise."""
    proc, url = start_app(dataset, work)
    try:
        cfg = config.load({"dataset": str(dataset), "workdir": str(work / "state")}, env={})
        store = Store(cfg.db_path, image_root=cfg.image_root)
        ids = [r.id for r in store.images()][: max(1, clients // 2)]
        folder = work / "layers"
        folder.mkdir(parents=True, exist_ok=True)
        logs = [ClientLog() for _ in range(clients)]
        threads = [
            threading.Thread(target=_guarded, args=(url, store, ids[c % len(ids)], c, ops, folder, logs[c]))
            for c in range(clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lost = check(store, logs)
        models = [m.version for m in store.models() if m.status == "published"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    merged: dict[str, list[float]] = {}
    for log in logs:
        for kind, values in log.latencies.items():
            merged.setdefault(kind, []).extend(values)
    return {
        "clients": clients,
        "ops_per_client": ops,
        "wall_s": wall,
        "saves": sum(len(log.saved) for log in logs),
        "refused": sum(len(log.refused) for log in logs),
        "wrong": [w for log in logs for w in log.wrong],
        "lost": lost,
        "published_versions": models,
        "latency": {kind: percentiles(v) for kind, v in sorted(merged.items())},
        **provenance(),
    }


def _guarded(url: str, store: Store, image_id: int, client: int, ops: int, folder: Path, log: ClientLog) -> None:
    try:
        run_client(url, store, image_id, client, ops, folder, log)
    except Exception as exc:  # noqa: BLE001 - a client that dies is a finding, not a crash of the benchmark
        log.wrong.append(f"client {client} stopped: {type(exc).__name__}: {exc}")


def format_table(result: dict[str, Any]) -> str:
    lines = ["| call | n | p50 (ms) | p99 (ms) |", "|---|---|---|---|"]
    for kind, p in result["latency"].items():
        lines.append(f"| {kind} | {p['n']} | {1e3 * p['p50_s']:.0f} | {1e3 * p['p99_s']:.0f} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    imageio.atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return path
