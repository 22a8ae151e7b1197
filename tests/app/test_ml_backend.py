"""The Label Studio ML-backend routes, driven through FastAPI's test client (a real Label Studio server drives them in
test_labelstudio_server.py): setup and class mapping, predictions in task order with one model version, webhooks
that become label revisions or "Train now", images fetched from Label Studio, and Basic auth."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, write_toy_model
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from labelsmart.app import ml_backend
from labelsmart.formats import labelstudio as ls
from labelsmart.project import open_project
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store


def _config_xml(names: list[str]) -> str:
    return ls.labeling_config((n, (10 * k, 20, 30)) for k, n in enumerate(names))


def _client(store: Store, predictor: Predictor, check=None) -> TestClient:
    app = FastAPI()
    app.include_router(ml_backend.router(ml_backend.LabelStudioBackend(store, predictor), check))
    return TestClient(app)


@pytest.fixture
def served(tiny_cfg, tmp_path: Path) -> Iterator[tuple[Store, Predictor, TestClient]]:
    store = open_project(tiny_cfg)
    write_toy_model(tmp_path / "toy" / "v0001" / "model.onnx", max_side=64)
    store.add_model(1, tmp_path / "toy" / "v0001", store.snapshot(), status="published")
    store.publish_model(1, {})
    predictor = Predictor(store, tiny_cfg)
    assert predictor.version == 1
    with _client(store, predictor) as client:
        yield store, predictor, client


def test_health_and_setup_return_the_model_version_predict_uses(served):
    store, predictor, client = served
    assert client.get("/labelstudio/health").json()["status"] == "UP"
    names = [c["name"] for c in CLASSES]
    setup = client.post("/labelstudio/setup", json={"schema": _config_xml(names), "hostname": "http://ls:8080"})
    assert setup.status_code == 200 and setup.json()["model_version"] == "labelsmart-v0001"
    rows = store.images()[:3]
    tasks = [{"id": 10 + k, "data": {"image": f"/data/local-files/?d=x/{r.path}"}} for k, r in enumerate(rows)]
    out = client.post("/labelstudio/predict", json={"tasks": tasks, "label_config": _config_xml(names)}).json()
    assert len(out["results"]) == 3
    for row, result in zip(rows, out["results"], strict=True):  # in task order
        assert result["model_version"] == setup.json()["model_version"]
        pred = predictor.predict(row.id)
        mask = ls.mask_from_results(result["result"], {n: k for k, n in enumerate(names)}, row.height, row.width, "t")
        assert np.array_equal(mask, pred.mask) and result["score"] == pytest.approx(pred.mean_confidence, abs=1e-3)


def test_setup_refuses_labels_the_project_lacks_and_fills_an_empty_project(served, tmp_path: Path):
    store, predictor, client = served
    bad = client.post("/labelstudio/setup", json={"schema": _config_xml(["sky", "pedestrian"])})
    assert bad.status_code == 400 and "['pedestrian']" in bad.json()["error"]
    assert client.post("/labelstudio/setup", json={"schema": "<View/>"}).status_code == 400
    empty = Store(tmp_path / "empty.sqlite", image_root=store.image_root)
    empty.sync_images()
    with _client(empty, Predictor(empty, predictor.cfg)) as c:
        r = c.post("/labelstudio/setup", json={"schema": _config_xml(["cat", "dog"])})
        assert r.status_code == 200 and r.json()["model_version"] == "labelsmart-none"
    assert [c.name for c in empty.classes()] == ["cat", "dog"]


def test_an_annotation_webhook_becomes_a_revision_and_start_training_is_train_now(served):
    store, _, client = served
    row = store.images()[1]
    mask = np.full((row.height, row.width), 255, np.uint8)
    mask[4:20, 5:30] = 2
    mask[40:44, :] = 0
    names = [c.name for c in store.classes()]
    annotation = {"id": 7, "completed_by": 3, "result": ls.brush_results(mask, names)}
    task = {"id": 70, "data": {"image": f"/data/upload/1/0a1b2c3d-{Path(row.path).name}"}}
    r = client.post(
        "/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task}
    )
    assert r.status_code == 200
    assert np.array_equal(store.current_label(row.id), mask)
    (rev,) = store.history(row.id)
    assert (rev.source, rev.author) == ("labelstudio", "labelstudio:3")
    client.post("/labelstudio/webhook", json={"action": "ANNOTATION_UPDATED", "annotation": annotation, "task": task})
    assert len(store.history(row.id)) == 1  # the same labels again add nothing
    assert client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200
    assert store.pending_requests("train_now") == 0
    assert client.post("/labelstudio/webhook", json={"action": "START_TRAINING"}).status_code == 200
    assert client.post("/labelstudio/train", json={}).status_code == 200
    assert store.pending_requests("train_now") == 2


def test_a_bad_annotation_is_an_event_not_a_revision(served):
    store, _, client = served
    row = store.images()[0]
    result = ls.brush_results(np.zeros((row.height, row.width), np.uint8), ["pedestrian"])
    task = {"id": 1, "data": {"image": row.path}}
    body = {"action": "ANNOTATION_CREATED", "annotation": {"result": result}, "task": task}
    assert client.post("/labelstudio/webhook", json=body).status_code == 200  # answered at once, saved after
    assert store.history(row.id) == []
    assert any("pedestrian" in message for *_, message in store.events(limit=5))
    no_payload = client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}})
    assert no_payload.status_code == 400 and "Send payload" in no_payload.json()["error"]


class _Files(http.server.BaseHTTPRequestHandler):
    """Label Studio's file server, for one image, behind a token."""

    png = b""
    token = "secret-token"

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        if self.headers.get("Authorization") != f"Token {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args) -> None:
        pass


def test_a_task_whose_image_labelsmart_lacks_is_fetched_with_the_token_and_added(served):
    store, predictor, client = served
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[:, :20, 0] = 255  # red left half, green right half: the toy model's classes 0 and 1
    rgb[:, 20:, 1] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    _Files.png = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        names = [c.name for c in store.classes()]
        n = len(store.images())
        task = {"id": 5, "data": {"image": "/data/upload/1/../../9f8e7d6c-new photo.png"}}
        denied = client.post("/labelstudio/predict", json={"tasks": [task], "label_config": _config_xml(names)})
        assert denied.status_code == 400 and "does not know where Label Studio is" in denied.json()["error"]
        client.post("/labelstudio/setup", json={"schema": _config_xml(names), "hostname": host, "access_token": "x"})
        assert client.post("/labelstudio/predict", json={"tasks": [task]}).status_code == 400  # wrong token
        client.post(
            "/labelstudio/setup", json={"schema": _config_xml(names), "hostname": host, "access_token": _Files.token}
        )
        out = client.post("/labelstudio/predict", json={"tasks": [task, task]}).json()
        assert len(store.images()) == n + 1  # added once
        new = [r for r in store.images() if r.path.startswith("@received/")][0]
        assert (new.width, new.height) == (40, 24)
        assert re.fullmatch(r"@received/9f8e7d6c-new_photo-[0-9a-f]{10}\.png", new.path), new.path
        assert store.image_path(new.id).parent == store.received_dir  # no '..' escapes the folder
        mask = ls.mask_from_results(out["results"][0]["result"], {n: k for k, n in enumerate(names)}, 24, 40, "t")
        assert (mask[:, :20] == 0).all() and (mask[:, 20:] == 1).all()
    finally:
        server.shutdown()


def test_basic_auth_guards_the_routes(served):
    store, predictor, _ = served
    users = {"ls": "pw"}
    with _client(store, predictor, lambda u, p: users.get(u) == p) as client:
        assert client.get("/labelstudio/health").status_code == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
        assert client.get("/labelstudio/health", headers=wrong).status_code == 401
        right = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
        assert client.get("/labelstudio/health", headers=right).status_code == 200


def test_the_app_serves_the_page_and_the_backend_on_one_port(tiny_dataset: Path, tmp_path: Path):
    import urllib.request

    from test_session import launch_app, stop_app

    proc, url = launch_app(tiny_dataset, tmp_path, extra_args=["--no-trainer"])
    try:
        with urllib.request.urlopen(url + "labelstudio/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "UP"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b"gradio" in r.read().lower()
        from gradio_client import Client

        client = Client(url, verbose=False)  # an open stream must not hold the shutdown
        assert len(client.predict(api_name="/images")) == 8
        proc.terminate()
        assert proc.wait(20) == 143  # SIGTERM unwinds through app.py's finally (which stops the trainer)
    finally:
        stop_app(proc)


def test_an_annotation_without_brush_strokes_leaves_the_labels_alone(served):
    store, _, client = served
    row = store.images()[2]
    mask = np.full((row.height, row.width), 255, np.uint8)
    mask[:5, :5] = 1
    store.save_label(row.id, mask, author="alice")
    rect = {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["sky"]}}
    body = {
        "action": "ANNOTATION_UPDATED",
        "annotation": {"result": [rect]},
        "task": {"id": 3, "data": {"image": row.path}},
    }
    assert client.post("/labelstudio/webhook", json=body).status_code == 200
    assert len(store.history(row.id)) == 1 and np.array_equal(store.current_label(row.id), mask)


def test_images_of_the_same_file_name_from_two_places_stay_two_images():
    a, b = ml_backend._file_name("/data/a/img.png"), ml_backend._file_name("/data/b/img.png")
    assert a != b and a == ml_backend._file_name("/data/a/img.png")
    assert a.startswith("img-") and a.endswith(".png")
    assert len(ml_backend._file_name("/x/" + "n" * 900 + ".png")) <= ml_backend.MAX_NAME
