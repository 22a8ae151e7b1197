"""labelsmart as Label Studio's model: the ML-backend protocol (``/health``, ``/setup``, ``/predict``, ``/webhook``).

``app.py`` mounts :func:`router` beside the page (``http://HOST:PORT/labelstudio`` is the URL to give Label Studio),
so the same store, predictor and trainer serve both:

- ``/setup`` reads the project's labelling config (its ``BrushLabels``), maps its labels to labelsmart's classes by
  name (a project without classes takes them from the config; a label labelsmart does not know is an error), keeps
  Label Studio's address and token for fetching images, and returns the serving ``model_version``.
- ``/predict`` answers each task, in task order, with one ``brushlabels`` result per predicted class (Label Studio's
  brush RLE), the mean confidence as ``score``, and the same ``model_version``. A task whose image labelsmart has
  never seen (Label Studio's own uploads) is fetched from Label Studio and added to the project.
- ``/webhook`` turns ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` into label revisions (``source``
  ``labelstudio``) of the task's image, after the response (Label Studio waits 1 s for a webhook), and
  ``START_TRAINING`` into "Train now". Deleting an annotation in Label Studio deletes nothing here: labels are
  never lost, and the revision history keeps every save.

With ``--auth`` these routes want HTTP Basic credentials of a labelsmart user (Label Studio's "Basic auth" fields of
the model connection).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlparse

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from labelsmart import imageio
from labelsmart.formats import FormatError, ImageIndex
from labelsmart.formats import labelstudio as ls
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store, StoreError

log = logging.getLogger(__name__)

PREFIX = "/labelstudio"
MAX_IMAGE_BYTES = 256 << 20  # an image fetched from Label Studio; read_image refuses over 100 megapixels anyway
FETCH_TIMEOUT_S = 30.0
ACCESS_TTL_S = 240.0  # Label Studio's JWT access tokens live 5 minutes
JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
LABEL_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


class BackendError(ValueError):
    """A request labelsmart cannot answer; the message says what to change (in Label Studio or here)."""


@dataclass
class Connection:
    """Where Label Studio is and how to read its files.

    ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (as Label Studio's own ML backends read them) win over what
    ``/setup`` sends (its ``hostname`` and the project owner's legacy token, which Label Studio 1.23 turns off by
    default). The key may be a legacy token (sent as ``Token``) or a personal access token (a JWT: exchanged at
    ``/api/token/refresh/`` for a short-lived access token, sent as ``Bearer``).
    """

    url: str | None = None
    token: str | None = None
    config: ls.LabelConfig | None = None
    _access: str | None = None
    _access_at: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Connection:
        return cls(url=env.get("LABEL_STUDIO_URL") or None, token=env.get("LABEL_STUDIO_API_KEY") or None)

    def absolute(self, url: str) -> str:
        """``url`` on Label Studio's host when it is relative (``/data/upload/...``)."""
        if urlparse(url).scheme:
            return url
        if not self.url:
            raise BackendError(
                f"{url}: labelsmart does not know where Label Studio is; connect the model in Label Studio "
                "(it sends its address on /setup) or set LABEL_STUDIO_URL."
            )
        return urljoin(self.url.rstrip("/") + "/", url.lstrip("/"))

    def headers(self, fresh: bool = False) -> dict[str, str]:
        """The ``Authorization`` header for Label Studio's files and API (none without a token)."""
        if not self.token:
            return {}
        if not JWT.match(self.token):
            return {"Authorization": f"Token {self.token}"}
        if fresh or self._access is None or time.time() - self._access_at > ACCESS_TTL_S:
            body = json.dumps({"refresh": self.token}).encode()
            req = urllib.request.Request(
                self.absolute("/api/token/refresh/"), data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 - Label Studio's URL
                    self._access = str(json.loads(resp.read())["access"])
            except (urllib.error.URLError, OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                raise BackendError(
                    f"Label Studio at {self.url} did not accept LABEL_STUDIO_API_KEY as a personal access token "
                    f"({exc}); copy a new one from Label Studio's Account & Settings page."
                ) from exc
            self._access_at = time.time()
        return {"Authorization": f"Bearer {self._access}"}


class LabelStudioBackend:
    """The protocol's handlers on plain values (the routes of :func:`router` only parse and answer)."""

    def __init__(self, store: Store, predictor: Predictor, author: str = "labelstudio") -> None:
        self.store = store
        self.predictor = predictor
        self.author = author
        self.env = Connection.from_env()
        self.connection = Connection.from_env()
        self._lock = threading.Lock()  # two fetches of one new image add it once

    # ------------------------------------------------------------------------------------- protocol

    def model_version(self) -> str:
        """The ``model_version`` of the model now serving."""
        self.predictor.refresh()
        return ls.model_version_name(self.predictor.version)

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check the labelling config against the classes and remember Label Studio's address and token."""
        config = ls.LabelConfig.parse(str(body.get("schema") or ""), "Label Studio's labelling config")
        self.match_classes(config)
        self.connection = Connection(
            url=self.env.url or body.get("hostname") or self.connection.url,
            token=self.env.token or body.get("access_token") or self.connection.token,
            config=config,
        )
        return {"model_version": self.model_version()}

    def match_classes(self, config: ls.LabelConfig) -> None:
        """A project without classes takes the config's labels; otherwise every label must be a class."""
        ours = [c.name for c in self.store.classes()]
        if not ours:
            if not config.labels:
                raise BackendError("the BrushLabels tag has no <Label> values; add one per class.")
            self.store.ensure_classes(
                [(name, config.colors.get(name) or None) for name in config.labels], source="Label Studio's config"
            )
            log.info("classes taken from Label Studio's labelling config: %s", ", ".join(config.labels))
            return
        unknown = [name for name in config.labels if name not in ours]
        if unknown:
            raise BackendError(
                f"Label Studio's labelling config has labels {unknown} that this labelsmart project does not "
                f"have (its classes: {', '.join(ours)}); rename them in the config or add them under Classes."
            )

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """One prediction per task, in task order."""
        config = self._config(body.get("label_config"))
        names = [c.name for c in self.store.classes()]
        results = []
        for task in body.get("tasks") or []:
            image_id = self.image_for(task, config)
            pred = self.predictor.predict(image_id)
            if pred is None:
                results.append({"result": [], "score": 0.0, "model_version": ls.model_version_name(None)})
                continue
            results.append(
                {
                    "result": ls.brush_results(pred.mask, names, config, pred.confidence),
                    "score": round(float(pred.mean_confidence), 4),
                    "model_version": ls.model_version_name(pred.version),
                }
            )
        return {"results": results, "model_version": self.model_version()}

    def webhook(self, body: dict[str, Any]) -> tuple[str, Callable[[], None] | None]:
        """What an event means: ``(what was done, work to do after the response or None)``."""
        action = str(body.get("action", ""))
        if action == "START_TRAINING":
            self.store.request("train_now")
            return "training requested", None
        if action in LABEL_EVENTS:
            pairs = _annotated_tasks(body)
            if not pairs or not all(task.get("data") for _, task in pairs):
                raise BackendError(f"{action} came without the task's data; turn on 'Send payload' for the webhook.")

            def save() -> None:
                for annotation, task in pairs:
                    self._save_annotation(annotation, task, action)

            return f"saving {len(pairs)} annotation(s)", save
        return f"{action or 'an event'} is not used by labelsmart", None

    # ----------------------------------------------------------------------------------- the parts

    def _config(self, xml: Any) -> ls.LabelConfig:
        if xml:
            return ls.LabelConfig.parse(str(xml), "Label Studio's labelling config")
        return self.connection.config or ls.LabelConfig()

    def image_for(self, task: dict[str, Any], config: ls.LabelConfig) -> int:
        """The project image of a task: one labelsmart has (by its URL's path or file name), else fetched."""
        url = ls.task_image_url(task, config)
        if url is None:
            raise BackendError(f"task {task.get('id')}: no image URL in its data field {config.data_key!r}.")
        index = ImageIndex(self.store, skip_unknown=True)
        image_id = ls.find_image(index, url, f"task {task.get('id')}")
        if image_id is not None:
            return image_id
        with self._lock:
            image_id = ls.find_image(ImageIndex(self.store, skip_unknown=True), url, f"task {task.get('id')}")
            if image_id is None:
                image_id = self.store.add_received_image(_file_name(url), self.fetch(url))
                log.info("image of task %s fetched from Label Studio as image %d", task.get("id"), image_id)
        return image_id

    def fetch(self, url: str) -> bytes:
        """The bytes of an image Label Studio serves (a relative URL is on Label Studio's host)."""
        full = quote(self.connection.absolute(url), safe=":/?&=%#@+,;~")  # Label Studio keeps spaces in names
        try:
            try:
                data = _get(full, self.connection.headers())
            except urllib.error.HTTPError as exc:
                if exc.code != 401 or not self.connection.token:
                    raise
                data = _get(full, self.connection.headers(fresh=True))  # an access token that just expired
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            raise BackendError(
                f"{full}: cannot fetch the image from Label Studio ({exc}); check LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY (a token of a Label Studio user who can read the project)."
            ) from exc
        if len(data) > MAX_IMAGE_BYTES:
            raise BackendError(f"{full}: the image is over {MAX_IMAGE_BYTES >> 20} MiB; tile it.")
        return data

    def _save_annotation(self, annotation: dict[str, Any], task: dict[str, Any], action: str) -> None:
        """An annotation as a label revision of its image; a failure is an event the page shows."""
        try:
            config = self.connection.config or ls.LabelConfig()
            image_id = self.image_for(task, config)
            image = self.store.image(image_id)
            classes = {c.name: c.id for c in self.store.classes()}
            source = f"Label Studio task {task.get('id')}, annotation {annotation.get('id')}"
            results = [r for r in annotation.get("result") or [] if isinstance(r, dict)]
            if not any(str(r.get("type", "")).lower() == "brushlabels" for r in results):
                log.info(
                    "%s: task %s has no brush strokes; labelsmart's labels stay as they are", action, task.get("id")
                )
                return  # rectangles or an emptied annotation: never a reason to drop labels here
            mask = ls.mask_from_results(results, classes, image.height, image.width, source)
            current = self.store.current_label(image_id)
            if current is not None and (current == mask).all():
                return
            rev = self.store.save_label(image_id, mask, author=_author(annotation, self.author), source="labelstudio")
            log.info("%s: task %s is revision %d of %s", action, task.get("id"), rev, image.path)
        except Exception as exc:  # noqa: BLE001 - after the response nobody else sees it: it must reach the page
            log.exception("Label Studio annotation of task %s not saved", task.get("id"))
            try:
                self.store.add_event("error", "labelstudio", f"a Label Studio annotation was not saved: {exc}")
            except Exception:  # noqa: BLE001 - a store that cannot even record it: the log has it
                log.exception("could not record the event")


def _get(url: str, headers: dict[str, str]) -> bytes:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 - Label Studio's URL
        return resp.read(MAX_IMAGE_BYTES + 1)


def _annotated_tasks(body: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(annotation, its task)`` of an annotation event (one, or a list for ``ANNOTATIONS_CREATED``)."""
    annotations, tasks = body.get("annotation"), body.get("task")
    if isinstance(annotations, dict) and isinstance(tasks, dict):
        return [(annotations, tasks)]
    if isinstance(annotations, list) and isinstance(tasks, list):
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        return [(a, by_id[a.get("task")]) for a in annotations if isinstance(a, dict) and a.get("task") in by_id]
    return []


def _file_name(url: str) -> str:
    parsed = urlparse(url)
    return (ls.image_name_candidates(url) or [parsed.path.rsplit("/", 1)[-1] or "image"])[0].rsplit("/", 1)[-1]


def _author(annotation: dict[str, Any], default: str) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    return f"{default}:{who}" if who not in (None, "") else default


# -------------------------------------------------------------------------------------------------- routes


def _basic_auth(check: Callable[[str, str], bool] | None) -> Callable[[Request], None]:
    def guard(request: Request) -> None:
        if check is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme.lower() != "basic" or not check(user, password):
            raise HTTPException(401, "log in with a labelsmart user", headers={"WWW-Authenticate": "Basic"})

    return guard


def router(backend: LabelStudioBackend, check: Callable[[str, str], bool] | None = None) -> APIRouter:
    """The protocol's routes under :data:`PREFIX`; ``check(user, password)`` guards them when given."""
    r = APIRouter(prefix=PREFIX, dependencies=[Depends(_basic_auth(check))])

    def answer(fn: Callable[[], dict[str, Any]]) -> Any:
        try:
            return fn()
        except (BackendError, FormatError, StoreError, imageio.ImageError) as exc:
            log.warning("Label Studio request refused: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=400)

    @r.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "labelsmart"}

    @r.post("/setup")
    def setup(body: dict[str, Any]) -> Any:
        return answer(lambda: backend.setup(body))

    @r.post("/predict")
    def predict(body: dict[str, Any]) -> Any:
        return answer(lambda: backend.predict(body))

    @r.post("/webhook")
    def webhook(body: dict[str, Any], tasks: BackgroundTasks) -> Any:
        def handle() -> dict[str, Any]:
            what, work = backend.webhook(body)
            if work is not None:
                tasks.add_task(work)
            return {"status": "ok", "what": what}

        return answer(handle)

    @r.post("/train")
    def train(body: dict[str, Any]) -> Any:  # Label Studio without its webhook-training flag posts here
        return answer(lambda: backend.webhook({"action": "START_TRAINING"})[0] and {"status": "ok"})

    return r
