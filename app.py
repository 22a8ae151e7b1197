"""labelsmart: open a labelling session in the browser, with the trainer in the background.

    python app.py                       # a small demo project made from photos that ship with scikit-image
    python app.py --dataset DIR         # your own folder of images (nested folders included)

Wiring only: parse arguments, open the store, start the trainer process and the predictor, build the UI,
launch it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# The page's upload limit, per file. Saving sends the editor's layer and composite as PNGs at the image's size, which
# for the largest image labelsmart opens (100 megapixels, RGBA) is at most 400 MB, so the limit sits above that.
MAX_UPLOAD = "500mb"
# Every other request body (Gradio's JSON calls, the Label Studio backend's /predict with many tasks and /webhook with
# an annotation's brush RLE) is held in memory and parsed whole. Brush RLE as JSON: 0.2 MB for a 12-megapixel mask of
# 30 regions, 4 MB for a 1-megapixel mask of pixel noise; the limit sits well above what Label Studio sends and keeps
# one request from taking the server's memory.
MAX_REQUEST = "64mb"
UPLOAD_ROUTES = ("/gradio_api/upload",)  # bodies Gradio streams to disk itself, under --max-upload
_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def upload_size(text: str) -> int:
    """``--max-upload`` (``500mb``, ``64kb``, ``1gb``, a number of bytes) in bytes."""
    value = text.strip().lower()
    unit = next((u for u in ("kb", "mb", "gb", "b") if value.endswith(u)), "")
    number = value[: len(value) - len(unit)].strip()
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it as 500mb, 64kb, 1gb or a number of bytes")
    return int(number) * _UNITS[unit or "b"]


class RequestBodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 with a sentence naming ``--max-request``.

    The declared ``Content-Length`` is checked before the app sees the request; a chunked body (no length) is
    counted as it streams, and once over the limit the app's reading fails and its answer is replaced by the 413.
    ``exempt`` paths (uploads, with their own limit) pass untouched.
    """

    def __init__(self, app: Any, limit: int, exempt: tuple[str, ...] = UPLOAD_ROUTES) -> None:
        self.app, self.limit, self.exempt = app, int(limit), exempt

    def sentence(self) -> str:
        """What a refused request is told."""
        units = ((1 << 20, "MB"), (1 << 10, "KB"), (1, "bytes"))
        size = next(f"{self.limit // u} {name}" for u, name in units if self.limit % u == 0)
        return (
            f"the request body is over the {size} this server takes; send less at once, or "
            "start the app with a larger --max-request."
        )

    async def refuse(self, scope: dict[str, Any], send: Any) -> None:
        """Answer 413 as JSON: ``{"error": sentence}`` under the Label Studio backend, ``{"detail": ...}`` elsewhere."""
        import json

        from labelsmart.app.ml_backend import PREFIX

        key = "error" if scope.get("path", "").startswith(PREFIX) else "detail"
        body = json.dumps({key: self.sentence()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))  # the rest of the body is not read
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.exempt:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, send)
        seen, over, started = 0, False, False

        async def counted() -> dict[str, Any]:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise RequestBodyTooLarge(self.sentence())
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            if over and not started:  # the app's own answer to the failed read (a 400, a 500): the 413 goes instead
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not over:
                raise
        if over and not started:  # (an answer already under way when the body passed the limit is cut short)
            await self.refuse(scope, send)


class RequestBodyTooLarge(Exception):
    """Raised into the app when a streamed request body passes :class:`RequestBodyLimit`'s limit."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of the labelling app."""
    p = argparse.ArgumentParser(description="labelsmart labelling session (browser UI + background trainer)")
    p.add_argument("--dataset", help="folder of images (default: a small demo project)")
    p.add_argument("--classes", help="JSON list of class names or of {name, color} (default: DIR/classes.json)")
    p.add_argument("--import-masks", dest="import_masks", help="folder of <stem>.png index masks to load once")
    p.add_argument("--workdir", help="project state folder (default: DIR/.labelsmart, or a per-user folder)")
    p.add_argument("--models-dir", dest="models_dir", help="model registry folder (default: models/)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default auto)")
    p.add_argument("--arch", help="smp architecture (default DeepLabV3Plus)")
    p.add_argument("--encoder", help="smp / timm encoder (default tu-resnet10t)")
    p.add_argument("--encoder-weights", dest="encoder_weights", help="local encoder weights file")
    p.add_argument("--author", help="name recorded with each saved label revision")
    p.add_argument("--no-trainer", action="store_true", help="do not start the background trainer")
    p.add_argument("--auth", help="users file: only its users get in (python -m labelsmart add-user --users FILE NAME)")
    p.add_argument(
        "--insecure", action="store_true", help="listen on a non-loopback --host without --auth (anyone may edit)"
    )
    p.add_argument(
        "--max-upload",
        dest="max_upload",
        type=upload_size,
        default=upload_size(MAX_UPLOAD),
        help=f"largest file the page takes in one upload, larger ones are refused (default {MAX_UPLOAD})",
    )
    p.add_argument(
        "--max-request",
        dest="max_request",
        type=upload_size,
        default=upload_size(MAX_REQUEST),
        help=f"largest body of any other request (Gradio's calls, the Label Studio backend's), default {MAX_REQUEST}",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the app; returns an exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from labelsmart import config, demo
    from labelsmart.app import ml_backend
    from labelsmart.app.layout import build_ui
    from labelsmart.app.session import Session
    from labelsmart.auth import AuthError, Users, is_loopback
    from labelsmart.imageio import ImageError
    from labelsmart.project import ProjectError, open_project
    from labelsmart.serving.predictor import Predictor
    from labelsmart.store import StoreError
    from labelsmart.training.trainer import Supervisor

    app_only = ("no_trainer", "auth", "insecure", "max_upload", "max_request")
    flags = {k: v for k, v in vars(args).items() if k not in app_only}
    try:
        if flags.get("dataset") is None:
            flags["dataset"] = str(demo.demo_dataset(demo.default_demo_root(os.environ)))
        cfg = config.load(flags)
        users = Users(Path(args.auth)) if args.auth else None
        if users is None and not args.insecure and not is_loopback(cfg.host):
            raise AuthError(
                f"--host {cfg.host} lets anyone who reaches this machine read and change every label; pass --auth "
                "USERS_FILE (make it with `python -m labelsmart add-user --users FILE NAME`), or --insecure if "
                "the network is yours alone."
            )
        store = open_project(cfg)
    except (AuthError, ProjectError, StoreError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info(
        "project %s; state in %s; models in %s", cfg.project, cfg.workdir, cfg.project_models_dir
    )
    supervisor = None
    if not args.no_trainer:
        supervisor = Supervisor(cfg, store)
        supervisor.start()
    predictor = Predictor(store, cfg)
    predictor.refresh()
    demo_ui = build_ui(Session(cfg, store, predictor, supervisor))
    check = users.check if users is not None else None
    server = FastAPI(title=f"labelsmart · {cfg.project}")
    # Label Studio's ML backend first: the page, mounted at the root, answers every other path.
    server.include_router(ml_backend.router(ml_backend.LabelStudioBackend(store, predictor, cfg.author), check))
    gr.mount_gradio_app(
        server,
        demo_ui.queue(default_concurrency_limit=4),
        path="",
        show_error=True,
        auth=check,
        auth_message=f"labelsmart · {cfg.project}: log in with your user name and password.",
        max_file_size=args.max_upload,  # bytes; Gradio refuses a larger upload with 413, the page before sending it
    )
    server.add_middleware(RequestBodyLimit, limit=args.max_request)  # every body but uploads
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"labelsmart on {url}  ·  Label Studio ML backend: {url}{ml_backend.PREFIX}", flush=True)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # uvicorn re-raises the signal once it has shut down: unwind to the finally

    signal.signal(signal.SIGTERM, terminate)
    try:  # uvicorn ends on SIGINT and SIGTERM; the finally below then stops the trainer
        # Open streams (the page's, a gradio_client's) would hold a graceful shutdown forever: give them 3 s.
        uvicorn.run(server, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
