"""A server on the network needs a login: every HTTP route refuses a request without one, a user's saves carry
their name, and the app will not listen beyond loopback without --auth unless told --insecure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import pytest
from conftest import CLASSES, scribbles, synth_scene
from test_session import ROOT, launch_app, stop_app

from labelsmart import auth, imageio
from labelsmart.store import Store


def test_the_app_will_not_listen_beyond_loopback_without_a_login(tiny_dataset: Path, tmp_path: Path):
    args = [sys.executable, str(ROOT / "app.py"), "--dataset", str(tiny_dataset), "--workdir", str(tmp_path / "w")]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.run([*args, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--host 0.0.0.0 lets anyone" in errors[0] and "--auth USERS_FILE" in errors[0]
    assert not (tmp_path / "w").exists()  # refused before anything was written
    proc = subprocess.run([*args, "--auth", str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.json: users file not found" in proc.stderr


def test_every_route_wants_a_login_and_saves_carry_the_users_name(tiny_dataset: Path, tmp_path: Path):
    from gradio_client import Client, handle_file

    users = tmp_path / "users.json"
    auth.add_user(users, "alice", "alice's password")
    proc, url = launch_app(tiny_dataset, tmp_path, extra_args=["--auth", str(users), "--no-trainer"])
    try:
        image_file = tiny_dataset / "images" / "frame_000.png"
        anonymous = [
            ("GET", "config", None),
            ("GET", "gradio_api/info", None),
            ("POST", "gradio_api/call/images", {"data": []}),
            ("POST", "gradio_api/call/save", {"data": [None]}),
            ("POST", "gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}),
            ("GET", f"gradio_api/file={image_file}", None),
        ]
        with httpx.Client(base_url=url, timeout=30) as http:
            for method, route, body in anonymous:
                res = http.request(method, route, json=body)
                assert res.status_code in (401, 403), (route, res.status_code, res.text[:200])
            res = http.post("gradio_api/upload", files={"files": ("x.png", b"\x89PNG", "image/png")})
            assert res.status_code in (401, 403), ("upload", res.status_code)
        with pytest.raises(Exception):  # noqa: B017, PT011 - gradio_client raises its own error types
            Client(url, auth=("alice", "wrong password"), verbose=False)

        client = Client(url, auth=("alice", "alice's password"), verbose=False)
        first = client.predict(api_name="/images")[0][0]
        client.predict(first, 0.5, api_name="/open_image")
        _, truth = synth_scene(0)
        layer = imageio.mask_to_rgba(scribbles(truth), [c["color"] for c in CLASSES])
        cv2.imwrite(str(tmp_path / "layer.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
        value = {"background": None, "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}
        msg, *_ = client.predict({**value, "id": None}, api_name="/save")
        assert msg.startswith("Saved revision"), msg
    finally:
        stop_app(proc)
    history = Store(tmp_path / "work" / "project.sqlite").history(first)
    assert [r.author for r in history] == ["alice"]
