"""The limit on request bodies (``app.py --max-request``): an ASGI middleware over the whole server, uploads aside."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import app as app_module

LIMIT = 4 << 10


def _server() -> FastAPI:
    server = FastAPI()

    @server.post("/labelstudio/predict")
    async def predict(body: dict) -> dict:  # FastAPI reads and parses the body, as for the backend's routes
        return {"tasks": len(body.get("tasks", []))}

    @server.post("/gradio_api/queue/join")
    async def join(request: Request) -> dict:
        try:
            return {"bytes": len(await request.body())}
        except Exception:  # noqa: BLE001 - an app that swallows a failed read still answers no 200
            return {"bytes": -1}

    @server.post("/gradio_api/upload")
    async def upload(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    server.add_middleware(app_module.RequestBodyLimit, limit=LIMIT)
    return server


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    yield b'{"tasks": ["'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"]}'


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(_server()) as c:
        yield c


def test_a_declared_body_over_the_limit_is_413_with_a_sentence_naming_the_option(client: TestClient) -> None:
    big = {"tasks": ["x" * LIMIT]}
    r = client.post("/labelstudio/predict", json=big)
    assert r.status_code == 413
    assert r.json() == {
        "error": "the request body is over the 4 KB this server takes; send less at once, or start the app with a "
        "larger --max-request."
    }
    r = client.post("/gradio_api/queue/join", json=big)
    assert r.status_code == 413 and "--max-request" in r.json()["detail"]


@pytest.mark.parametrize("route", ["/labelstudio/predict", "/gradio_api/queue/join"])
def test_a_chunked_body_over_the_limit_is_counted_as_it_streams_and_refused(client: TestClient, route: str) -> None:
    r = client.post(route, content=_chunks(3 * LIMIT), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # sent chunked: nothing declared
    assert r.status_code == 413 and "--max-request" in r.text


def test_bodies_within_the_limit_and_uploads_pass(client: TestClient) -> None:
    assert client.post("/labelstudio/predict", json={"tasks": [1, 2, 3]}).json() == {"tasks": 3}
    r = client.post("/labelstudio/predict", content=_chunks(LIMIT // 2), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json() == {"tasks": 1}
    r = client.post("/gradio_api/upload", content=b"\0" * (10 * LIMIT))  # uploads keep their own --max-upload
    assert r.status_code == 200 and r.json() == {"bytes": 10 * LIMIT}


def test_the_default_request_limit_holds_what_label_studio_sends() -> None:
    args = app_module.parse_args([])
    assert args.max_request == 64 << 20 < args.max_upload
    assert app_module.parse_args(["--max-request", "1mb"]).max_request == 1 << 20
