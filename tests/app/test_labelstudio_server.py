"""labelsmart behind a real Label Studio (1.23, in its own virtualenv): Label Studio connects to ``/labelstudio``,
retrieves predictions of an image labelsmart has and of one it has never seen, and an annotation saved in Label Studio
becomes a label revision in labelsmart's store that starts a training round; Label Studio's "Start training" is
"Train now"."""

from __future__ import annotations

import http.cookiejar
import json
import math
import os
import re
import socket
import sqlite3
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, interop_python, scribbles, synth_scene, write_dataset
from PIL import Image
from test_session import launch_app, stop_app, wait_for

from labelsmart import config
from labelsmart.app.ml_backend import ACCESS_TTL_S
from labelsmart.formats import ExportOptions, export_labels, import_labels
from labelsmart.formats import labelstudio as ls
from labelsmart.project import open_project
from labelsmart.store import Store

pytestmark = pytest.mark.labelstudio
USER, PASSWORD = "annotator@example.com", "labelsmart-test-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A Label Studio server on a new database, and a client logged in with a personal access token."""

    def __init__(self, python: str, tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",  # labelsmart listens on loopback
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",  # or the webhooks to it are skipped
            LABEL_STUDIO_BASE_DATA_DIR=str(tmp / "ls-data"),
        )
        self.log = open(tmp / "label-studio.log", "w")  # noqa: SIM115 - closed in stop()
        cmd = [str(Path(python).parent / "label-studio"), "start", "--no-browser", "--port", str(self.port)]
        cmd += ["--host", self.url, "--data-dir", str(tmp / "ls-data"), "--username", USER, "--password", PASSWORD]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.tmp = tmp
        self.token = ""
        self.access: str | None = None
        self.access_at = -math.inf

    def wait_ready(self, timeout: float = 300) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, (self.tmp / "label-studio.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, timeout, "Label Studio to start")

    def personal_access_token(self) -> str:
        """Log in as a person would and create a personal access token (Account & Settings)."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        opener.open(self.url + "/user/login/", timeout=30).read()
        csrf = next(c.value for c in jar if c.name == "csrftoken")
        form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf, "email": USER, "password": PASSWORD}).encode()
        headers = {"Referer": self.url + "/user/login/"}
        opener.open(urllib.request.Request(self.url + "/user/login/", data=form, headers=headers), timeout=30).read()
        csrf = next(c.value for c in jar if c.name == "csrftoken")
        req = urllib.request.Request(
            self.url + "/api/token/", data=b"", headers={"X-CSRFToken": csrf, "Referer": self.url + "/"}
        )
        self.token = json.loads(opener.open(req, timeout=30).read())["token"]
        self._refresh()
        return self.token

    def _refresh(self) -> None:
        """A new access token for the personal access token (they live 5 minutes; a busy machine's test outlives
        one)."""
        self.access = self.call("POST", "/api/token/refresh/", {"refresh": self.token}, auth=False)["access"]
        self.access_at = time.monotonic()

    def call(self, method: str, path: str, body: object = None, auth: bool = True, files: dict | None = None):
        if auth and time.monotonic() - self.access_at > ACCESS_TTL_S:
            self._refresh()
        headers = {"Authorization": f"Bearer {self.access}"} if auth else {}
        data = None
        if files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for name, (filename, content) in files.items():
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: image/png\r\n\r\n".encode()
                    + content
                    + b"\r\n"
                )
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from exc
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _png(rgb: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_label_studio_uses_labelsmart_as_its_model(tmp_path: Path):
    python = interop_python("labelstudio")
    server = LabelStudio(python, tmp_path)  # starts first: a new database takes Label Studio about a minute
    data = write_dataset(tmp_path / "data", n=6)
    cfg = config.load(
        {"dataset": str(data), "workdir": str(tmp_path / "work"), "models_dir": str(tmp_path / "models")}, env={}
    )
    store = open_project(cfg)
    first, known = store.images()[0], store.images()[1]
    truth = np.asarray(Image.open(data / "masks" / Path(first.path).with_suffix(".png").name))
    store.save_label(first.id, scribbles(truth), author="alice")  # so the trainer publishes v1 on start
    try:
        server.wait_ready()
        pat = server.personal_access_token()
        proc, url = launch_app(data, tmp_path, extra_env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": pat})
        try:
            wait_for(lambda: any(m.status == "published" for m in store.models()), 240, "labelsmart's first model")
            names = [c["name"] for c in CLASSES]
            xml = ls.labeling_config((c["name"], tuple(c["color"])) for c in CLASSES)
            project = server.call("POST", "/api/projects/", {"title": "streets", "label_config": xml})
            pid = project["id"]
            new_rgb, _ = synth_scene(99)
            files = {
                "a": (Path(known.path).name, (store.image_path(known.id)).read_bytes()),
                "b": ("never seen.png", _png(new_rgb)),
            }
            server.call("POST", f"/api/projects/{pid}/import", files=files)
            tasks = server.call("GET", f"/api/tasks/?project={pid}")["tasks"]
            assert len(tasks) == 2 and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)

            ml = server.call("POST", "/api/ml/", {"url": url + "labelstudio", "project": pid, "title": "labelsmart"})
            assert ml["state"] == "CO", ml  # connected: /health and /setup answered
            server.call(
                "POST",
                f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                {"selectedItems": {"all": True, "excluded": []}},
            )
            version = ls.model_version_name(max(m.version for m in store.models() if m.status == "published"))
            received = wait_for(
                lambda: [r for r in store.images() if r.path.startswith("@received/")], 60, "the new image"
            )
            assert len(received) == 1 and (received[0].height, received[0].width) == new_rgb.shape[:2]
            classes = {n: k for k, n in enumerate(names)}
            for task in tasks:
                preds = server.call("GET", f"/api/predictions/?task={task['id']}")
                assert len(preds) == 1 and preds[0]["model_version"] == version
                assert preds[0]["result"] and 0 < preds[0]["score"] <= 1
                r = preds[0]["result"][0]
                mask = ls.mask_from_results(preds[0]["result"], classes, r["original_height"], r["original_width"], "p")
                assert (mask != 255).all()  # a prediction covers the image

            task = next(t for t in tasks if re.search(re.escape(Path(known.path).stem), t["data"]["image"]))
            known_truth = np.asarray(Image.open(data / "masks" / Path(known.path).with_suffix(".png").name))
            labels = scribbles(known_truth)
            server.call("POST", f"/api/tasks/{task['id']}/annotations/", {"result": ls.brush_results(labels, names)})
            wait_for(lambda: store.history(known.id), 60, "the annotation to become a revision")
            (rev,) = store.history(known.id)
            assert rev.source == "labelstudio" and np.array_equal(store.current_label(known.id), labels)
            wait_for(lambda: len([m for m in store.models() if m.status == "published"]) >= 2, 240, "a new round")

            before = _train_now_requests(store)
            server.call("POST", f"/api/ml/{ml['id']}/train", {})
            wait_for(lambda: _train_now_requests(store) > before, 30, "Start training to reach labelsmart")

            # Labels out to Label Studio and back: its own import takes our tasks (history included), and what its
            # own JSON export gives back imports into a new labelsmart project as the same masks.
            export_labels(store, "labelstudio", tmp_path / "out", options=ExportOptions(revisions="all"))
            other = server.call("POST", "/api/projects/", {"title": "imported", "label_config": xml})["id"]
            tasks_out = json.loads((tmp_path / "out" / ls.TASKS_NAME).read_text())
            server.call("POST", f"/api/projects/{other}/import", tasks_out)
            exported = server.call("GET", f"/api/projects/{other}/export?exportType=JSON")
            assert len(exported) == len(tasks_out)
            (tmp_path / "from-ls.json").write_text(json.dumps(exported))
            fresh = open_project(config.load({"dataset": str(data), "workdir": str(tmp_path / "b")}, env={}))
            assert import_labels(fresh, "labelstudio", tmp_path / "from-ls.json") == 2
            for row in (first, known):
                assert np.array_equal(
                    fresh.current_label(fresh.image_id_by_path(row.path)), store.current_label(row.id)
                )
        finally:
            stop_app(proc)
    finally:
        server.stop()


def _train_now_requests(store: Store) -> int:
    with sqlite3.connect(store.db_path) as con:
        return int(con.execute("SELECT COUNT(*) FROM requests WHERE kind='train_now'").fetchone()[0])
