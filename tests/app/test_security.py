"""Path traversal and upload size, over real HTTP against the launched app: every name the server takes from a
request (Gradio's ``file=`` route, the upload route's file names, the export format, the image URLs of Label
Studio's tasks) stays inside the folders it is meant for, an upload over ``--max-upload`` is refused, and so is any
other request body over ``--max-request`` (declared or chunked)."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import write_dataset
from test_session import launch_app, stop_app

from labelsmart import config, imageio
from labelsmart.project import open_project

SECRET = "labelsmart-secret-3f9c1e"  # in a file outside every folder the server may serve
LIMIT = 64 << 10  # --max-upload of the launched app
REQUEST_LIMIT = 32 << 10  # its --max-request: below LIMIT, so an upload that fits shows uploads keep their own limit


class App:
    """The launched app and the folders around it."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp = tmp
        self.url = url.rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.uploads = tmp / "gradio-uploads"  # GRADIO_TEMP_DIR: where Gradio keeps uploads and outputs
        self.secret = tmp / "secret.txt"
        self.dataset = tmp / "data"
        self.workdir = tmp / "work"

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` exactly as written (http.client sends it unnormalised, ``..`` and escapes included)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("security")
    write_dataset(tmp / "data", n=3)
    (tmp / "secret.txt").write_text(SECRET)
    proc, url = launch_app(
        tmp / "data",
        tmp,
        extra_env={"GRADIO_TEMP_DIR": str(tmp / "gradio-uploads")},
        extra_args=[
            *("--no-trainer", "--max-upload", f"{LIMIT // 1024}kb", "--max-request", f"{REQUEST_LIMIT // 1024}kb")
        ],
    )
    try:
        yield App(tmp, url)
    finally:
        stop_app(proc)


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "labelsmartboundary7d1f"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _upload(app: App, name: str, data: bytes) -> tuple[int, bytes]:
    body, content_type = _multipart(name, data)
    return app.post("/gradio_api/upload", body, content_type)


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_gradios_file_route_serves_only_what_the_app_made(app: App):
    """``/gradio_api/file=`` with ``..``, its URL-encoded forms, backslashes, absolute paths of the project (its
    images, its database) and of this machine: refused, the secret never sent; a file the app itself holds is."""
    status, body = _upload(app, "ok.txt", b"uploaded by the test")
    assert status == 200, body
    (uploaded,) = json.loads(body)
    assert Path(uploaded).resolve().is_relative_to(app.uploads.resolve())
    status, body = app.get("/gradio_api/file=" + quote(uploaded))
    assert (status, body) == (200, b"uploaded by the test")  # the route works: the refusals below mean something

    inside = Path(uploaded).parent
    up = "../" * (len(app.secret.resolve().parts) + 2)  # more than enough ..s to reach / from anywhere
    attempts = [
        f"{up}etc/passwd",
        f"{up}{app.secret.resolve().as_posix().lstrip('/')}",
        quote(f"{up}etc/passwd", safe=""),  # ..%2F..%2F
        f"{up}etc/passwd".replace(".", "%2e"),  # %2e%2e/
        quote(quote(f"{up}etc/passwd", safe=""), safe=""),  # encoded twice
        f"{up}etc/passwd".replace("/", "\\"),
        f"{up}etc/passwd".replace("/", "%5c"),
        "/etc/passwd",
        str(app.secret.resolve()),
        quote(str(app.secret.resolve()), safe=""),
        f"{inside}/../../../secret.txt",  # out of an allowed folder
        f"{inside}/{'..%2f' * 3}secret.txt",
        f"{app.uploads}/../secret.txt",
        f"{app.uploads}/..%2fsecret.txt",
        str((app.dataset / "images" / "frame_000.png").resolve()),  # the project's own files are not served
        str((app.workdir / "project.sqlite").resolve()),
        str(app.workdir.resolve()),
        f"file://{app.secret.resolve()}",
        f"http://127.0.0.1:{app.port}/gradio_api/file={quote(str(app.secret.resolve()))}",  # no fetch of loopback
    ]
    for target in attempts:
        for prefix in ("/gradio_api/file=", "/file="):
            status, body = app.get(prefix + target)
            assert SECRET.encode() not in body and b"root:x:0:0" not in body, (prefix + target, status)
            assert b"SQLite format" not in body and b"\x89PNG" not in body, (prefix + target, status)
            if prefix == "/gradio_api/file=":
                assert status in (400, 403, 404), (target, status, body[:200])


def test_an_upload_over_the_limit_is_refused_and_upload_names_stay_in_the_upload_folder(app: App):
    status, body = app.get("/config")
    assert status == 200 and json.loads(body)["max_file_size"] == LIMIT
    before = _files_under(app.tmp) - _files_under(app.uploads)
    status, body = _upload(app, "big.png", b"\0" * (LIMIT + 1))
    assert status == 413 and b"maximum allowed size" in body, (status, body[:200])
    assert _upload(app, "fits.png", b"\0" * (LIMIT - 1024))[0] == 200
    absolute = app.tmp / "evil-abs.png"  # an absolute path outside the upload folder
    for name in ["../../../evil.png", str(absolute), "..\\..\\evil.png", "%2e%2e%2fevil.png"]:
        status, body = _upload(app, name, b"x")
        assert status == 200, (name, body)
        (kept,) = json.loads(body)
        assert Path(kept).resolve().is_relative_to(app.uploads.resolve()), (name, kept)
    assert _files_under(app.tmp) - _files_under(app.uploads) == before  # nothing written outside the upload folder
    assert not absolute.exists()


def _post_chunked(app: App, path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """POST a body with ``Transfer-Encoding: chunked``: no length declared, the server learns it as it reads."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=120)
    try:
        conn.request("POST", path, body=iter(chunks), headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (BrokenPipeError, ConnectionResetError):  # refused before all of it was sent: read what it said
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_json_body_over_the_request_limit_is_refused_declared_or_chunked(app: App):
    """Gradio's JSON routes and the Label Studio backend's take bodies up to ``--max-request``; over it, declared in
    Content-Length or streamed in chunks, 413 with a sentence naming the option; a normal request passes."""
    many = {"tasks": [{"id": k, "data": {"image": f"/data/local-files/?d=x/frame_{k:03d}.png"}} for k in range(2000)]}
    big = json.dumps(many).encode()
    assert len(big) > REQUEST_LIMIT
    sentence = (
        f"the request body is over the {REQUEST_LIMIT >> 10} KB this server takes; send less at once, or start the "
        "app with a larger --max-request."
    )
    status, body = app.post("/labelstudio/predict", big, "application/json")
    assert (status, json.loads(body)) == (413, {"error": sentence})
    status, body = app.post("/gradio_api/queue/join", big, "application/json")
    assert (status, json.loads(body)) == (413, {"detail": sentence})
    chunks = [big[i : i + 4096] for i in range(0, len(big), 4096)]
    for path in ("/labelstudio/webhook", "/gradio_api/queue/join"):
        status, body = _post_chunked(app, path, chunks)
        assert status == 413 and sentence in body.decode(), (path, status, body[:200])

    small = json.dumps({"tasks": many["tasks"][:1]}).encode()
    status, body = app.post("/labelstudio/predict", small, "application/json")
    assert status == 200 and "results" in json.loads(body), body[:200]  # the project's own image, no model yet
    status, body = _post_chunked(app, "/labelstudio/predict", [small[:10], small[10:]])
    assert status == 200, body[:200]
    assert app.get("/labelstudio/health")[0] == 200 and app.get("/config")[0] == 200


def test_the_default_upload_limit_holds_the_largest_image_the_editor_sends():
    import app as app_module

    limit = app_module.parse_args([]).max_upload
    assert limit == 500 << 20 and limit > imageio.MAX_PIXELS * 4  # a 100-megapixel RGBA layer
    assert app_module.parse_args(["--max-upload", "2mb"]).max_upload == 2 << 20
    with pytest.raises(SystemExit):
        app_module.parse_args(["--max-upload", "lots"])


def test_export_names_its_own_zip_whatever_the_format_says(app: App):
    """The page's Export takes a format from a list and names the zip itself: a format that is a path is refused
    and writes nothing; the zip it makes is served from Gradio's folder, named after the project and the time."""
    from gradio_client import Client

    client = Client(app.url + "/", verbose=False)
    before = _files_under(app.tmp) - _files_under(app.uploads)
    for fmt in ["../../../evil", str(app.tmp / "evil"), "png/../../evil"]:
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict(fmt, "current", False, api_name="/export_labels")
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict("png", f"../{fmt}", False, api_name="/export_labels")
    assert _files_under(app.tmp) - _files_under(app.uploads) == before
    path, message = client.predict("png", "current", False, api_name="/export_labels")
    name = Path(path).name
    assert "Exported" in message and re.fullmatch(r"data-[0-9a-f]+-labels-png-\d{8}-\d{6}\.zip", name), (path, message)
    assert [p.name for p in app.uploads.rglob(name)] == [name]  # served from Gradio's folder, under the name it made


class _AnyImage(http.server.BaseHTTPRequestHandler):
    """Label Studio's file server: one PNG for any path; the paths asked for are kept."""

    png = imageio.encode_png(np.full((6, 8, 3), 90, np.uint8))
    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        type(self).asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args) -> None:
        pass


def test_label_studio_task_urls_write_only_into_the_projects_received_folder(app: App):
    """Task image URLs with ``..`` (plain, encoded, backslashed, in ``?d=``), absolute paths and a very long name:
    the fetched image lands in ``received/`` under a plain name, nothing is written anywhere else; a ``file://``
    URL of an image on this machine is refused (it used to be copied into the project)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnyImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    received = app.workdir / "received"
    outside = (_files_under(app.tmp) - _files_under(received)) - _files_under(app.uploads)
    urls = [
        f"{host}/data/upload/1/../../../../evil1.png",
        f"{host}/data/upload/1/..%2F..%2F..%2Fevil2.png",
        f"{host}/data/upload/1/%2e%2e%5c%2e%2e%5cevil3.png",
        f"{host}/data/local-files/?d=../../../../{app.tmp.as_posix().lstrip('/')}/evil4.png",
        f"{host}/data/local-files/?d={quote(str(app.tmp / 'evil5.png'))}",
        f"{host}/data/upload/1/{'n' * 400}.png",
    ]
    try:
        for k, url in enumerate(urls):
            body = json.dumps({"tasks": [{"id": k, "data": {"image": url}}]}).encode()
            status, answer = app.post("/labelstudio/predict", body, "application/json")
            assert status == 200, (url, answer)
        local = app.dataset / "images" / "frame_001.png"  # an image of this machine, given as a file:// URL
        copy = app.tmp / "elsewhere" / "private.png"
        copy.parent.mkdir()
        copy.write_bytes(local.read_bytes())
        body = json.dumps({"tasks": [{"id": 99, "data": {"image": f"file://{copy}"}}]}).encode()
        status, answer = app.post("/labelstudio/predict", body, "application/json")
        assert status == 400 and "http(s) only" in json.loads(answer)["error"]
    finally:
        server.shutdown()
    kept = _files_under(received)
    assert len(kept) == len(urls) and all(p.parent == received for p in kept), sorted(kept)
    assert all(not p.name.startswith(".") and len(p.name) <= 120 and "/" not in p.name for p in kept)
    now_outside = (_files_under(app.tmp) - _files_under(received)) - _files_under(app.uploads)
    new = {p for p in now_outside - outside if p.name != "app.log" and "project.sqlite" not in p.name}
    assert new == {copy}, sorted(new)  # only the test's own file


NASTY = [
    "../../x.png",
    "/etc/x.png",
    "..\\..\\x.png",
    "x/../../x.png",
    "C:\\Windows\\x.png",
    "",
    "..",
    ".",
    "/",
    ".hidden.png",
    "\x00.png",
    "%2e%2e%2fx.png",
    "é.png",
    "a" * 200 + ".png",
    "a" * 5000 + ".png",
]


@pytest.mark.parametrize("name", NASTY)
def test_add_received_image_keeps_any_name_inside_the_received_folder(tmp_path: Path, name: str):
    write_dataset(tmp_path / "data", n=1, h=8, w=8)
    cfg = config.load(
        {"dataset": str(tmp_path / "data"), "workdir": str(tmp_path / "work"), "models_dir": str(tmp_path / "m")},
        env={},
    )
    store = open_project(cfg)
    before = _files_under(tmp_path)
    image_id = store.add_received_image(name, imageio.encode_png(np.zeros((4, 5, 3), np.uint8)))
    path = store.image_path(image_id)
    assert path.parent == store.received_dir and path.is_file() and not path.name.startswith(".")
    assert store.read_image(image_id).shape == (4, 5, 3)
    written = _files_under(tmp_path) - before
    assert {p for p in written if "project.sqlite" not in p.name} == {path}
