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
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, urljoin, urlparse

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from labelsmart import imageio
from labelsmart.formats import FormatError, ImageIndex
from labelsmart.formats import labelstudio as ls
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store, StoreError, parse_color, received_path

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
        schema = _text(body.get("schema"), "setup's schema") or ""
        hostname = _text(body.get("hostname"), "setup's hostname")
        if hostname and _scheme(hostname) not in ("http", "https"):
            log.warning("setup's hostname %r is not an http(s) address; not used to fetch images", hostname)
            hostname = None
        token = _text(body.get("access_token"), "setup's access_token")
        config = ls.LabelConfig.parse(schema, "Label Studio's labelling config")
        self.match_classes(config)
        self.connection = Connection(
            url=self.env.url or hostname or self.connection.url,
            token=self.env.token or token or self.connection.token,
            config=config,
        )
        return {"model_version": self.model_version()}

    def match_classes(self, config: ls.LabelConfig) -> None:
        """A project without classes takes the config's labels; otherwise every label must be a class."""
        ours = [c.name for c in self.store.classes()]
        if not ours:
            if not config.labels:
                raise BackendError("the BrushLabels tag has no <Label> values; add one per class.")
            _check_new_classes(config.labels)  # every label becomes a class, or none does
            self.store.ensure_classes(
                [(name, _color(config.colors.get(name))) for name in config.labels], source="Label Studio's config"
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
        tasks = body.get("tasks")
        if tasks is not None and not isinstance(tasks, list):
            raise BackendError(f"predict's tasks are {type(tasks).__name__}, not a list of tasks; send Label Studio's.")
        results = []
        for task in tasks or []:
            _check_task(task)
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
            for annotation, task in pairs:
                _check_task(task)
                self.image_url(task, self.connection.config or ls.LabelConfig())
                _check_annotation(annotation, task)

            def save() -> None:
                for annotation, task in pairs:
                    self._save_annotation(annotation, task, action)

            return f"saving {len(pairs)} annotation(s)", save
        return f"{action or 'an event'} is not used by labelsmart", None

    # ----------------------------------------------------------------------------------- the parts

    def _config(self, xml: Any) -> ls.LabelConfig:
        if xml:
            return ls.LabelConfig.parse(_text(xml, "the label_config") or "", "Label Studio's labelling config")
        return self.connection.config or ls.LabelConfig()

    @staticmethod
    def image_url(task: dict[str, Any], config: ls.LabelConfig) -> str:
        """The image URL of a task (checked by :func:`_check_task`).

        Raises:
            BackendError: there is none, or it is not text a URL can be read from.
        """
        data = task.get("data") or {}
        value = data.get(config.data_key)
        if value is not None and not isinstance(value, str):
            raise BackendError(
                f"task {task.get('id')}: its data field {config.data_key!r} is {_kind(value)}, not an image URL."
            )
        url = ls.task_image_url(task, config)
        if url is None:
            raise BackendError(f"task {task.get('id')}: no image URL in its data field {config.data_key!r}.")
        try:
            urlparse(url)
        except ValueError as exc:  # an IPv6 host without its "]", for one
            raise BackendError(f"task {task.get('id')}: {url!r} is not an image URL ({exc}); fix the task.") from exc
        return url

    def image_for(self, task: dict[str, Any], config: ls.LabelConfig) -> int:
        """The project image of a task: one labelsmart has (by its URL's path or file name), else fetched."""
        url = self.image_url(task, config)
        received = self.store.image_id_by_path(received_path(_file_name(url)))
        if received is not None:  # fetched for an earlier task with this URL
            return received
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
        if urlparse(full).scheme not in ("http", "https"):  # urllib also opens file://, ftp:// and data: URLs
            raise BackendError(
                f"{url}: labelsmart fetches images over http(s) only, never from this machine's files; give the task "
                "an image URL of Label Studio or of a file labelsmart has."
            )
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
    """``(annotation, its task)`` of an annotation event (one, or a list for ``ANNOTATIONS_CREATED``, matched by task
    id: a number or a string)."""
    annotations, tasks = body.get("annotation"), body.get("task")
    if isinstance(annotations, dict) and isinstance(tasks, dict):
        return [(annotations, tasks)]
    if isinstance(annotations, list) and isinstance(tasks, list):
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict) and _is_id(t.get("id"))}
        return [
            (a, by_id[a.get("task")])
            for a in annotations
            if isinstance(a, dict) and _is_id(a.get("task")) and a.get("task") in by_id
        ]
    return []


# ------------------------------------------------------------------------------------ input validation
# What Label Studio sends is checked for the shapes the code below relies on, so a body of another shape is a 400
# with a sentence, in the request, rather than an exception in it or in the work left for after a webhook's answer.


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, what: str) -> str | None:
    """``value`` when it is text (None when absent).

    Raises:
        BackendError: it is another JSON type.
    """
    if value is None or isinstance(value, str):
        return value
    raise BackendError(f"{what} is {_kind(value)}, not text; send what Label Studio sends.")


def _scheme(url: str) -> str:
    try:
        return urlparse(url).scheme.lower()
    except ValueError:
        return ""


def _check_body(body: Any) -> None:
    """Text in the body must be Unicode (JSON can carry lone surrogates, which nothing can store or echo back).

    Raises:
        BackendError: it is not.
    """
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError) as exc:
        raise BackendError(f"the request holds text that is not Unicode ({exc}); send UTF-8 JSON.") from exc


def _check_new_classes(labels: tuple[str, ...]) -> None:
    """Labels that can all become classes of an empty project (checked before the first is added).

    Raises:
        BackendError: one has spaces around it or none at all, one comes twice, or there are more than 255.
    """
    odd = [name for name in labels if not name.strip() or name != name.strip()]
    twice = sorted({name for name in labels if labels.count(name) > 1})
    if odd or twice or len(labels) > 255:
        why = (
            f"labels {odd} have spaces around them"
            if odd
            else f"labels {twice} come twice"
            if twice
            else f"{len(labels)} labels are more than an 8-bit mask holds (255)"
        )
        raise BackendError(f"Label Studio's labelling config: {why}; fix its <Label> values. No class was added.")


def _color(value: str | None) -> str | None:
    """A label's ``background`` when it is ``#rrggbb`` (what labelsmart reads); None (the default colour) for the
    other CSS colours Label Studio takes."""
    try:
        return "#{:02x}{:02x}{:02x}".format(*parse_color(value)) if value else None
    except (StoreError, ValueError, TypeError):
        log.info("label colour %r is not #rrggbb; the class gets a default colour", value)
        return None


def _check_task(task: Any) -> None:
    """A task object whose ``data``, when there, is an object (:meth:`LabelStudioBackend.image_url` reads it).

    Raises:
        BackendError: it is not.
    """
    if not isinstance(task, dict):
        raise BackendError(f"a task is {_kind(task)}, not a task object; send Label Studio's tasks.")
    data = task.get("data")
    if data is not None and not isinstance(data, dict):
        raise BackendError(f"task {task.get('id')}: its data is {_kind(data)}, not an object; send the task's data.")


def _check_annotation(annotation: Any, task: dict[str, Any]) -> None:
    """An annotation whose results are objects, and whose brush results hold what a mask is read from: a ``value``
    object with one list of label names, an ``rle`` list of numbers 0..255 and whole-number image sizes.

    Raises:
        BackendError: it is not.
    """
    where = f"task {task.get('id')}, annotation {annotation.get('id') if isinstance(annotation, dict) else '?'}"
    if not isinstance(annotation, dict):
        raise BackendError(f"{where}: is {_kind(annotation)}, not an annotation object.")
    results = annotation.get("result")
    if results is not None and not isinstance(results, list):
        raise BackendError(f"{where}: its result is {_kind(results)}, not a list of results.")
    for k, result in enumerate(results or []):
        if not isinstance(result, dict):
            continue  # not a result labelsmart reads (brush results are objects)
        value = result.get("value")
        if value is not None and not isinstance(value, dict):
            raise BackendError(f"{where}: result {k + 1} has a value of {_kind(value)}, not an object.")
        if str(result.get("type", "")).lower() != "brushlabels" or "rle" not in (value or {}):
            continue  # rectangles, polygons: not read
        names = value.get("brushlabels") or value.get("labels") or []
        rle = value["rle"]
        sizes = [result[key] for key in ("original_width", "original_height") if result.get(key) is not None]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BackendError(f"{where}: result {k + 1}'s brushlabels are not a list of label names.")
        if not isinstance(rle, list) or not all(isinstance(v, int) and 0 <= v <= 255 for v in rle):
            raise BackendError(f"{where}: result {k + 1}'s rle is not a list of bytes (0..255); export it again.")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            raise BackendError(f"{where}: result {k + 1}'s original_width and original_height are not whole numbers.")


MAX_NAME = 120  # characters of a received image's file name (a file system takes 255 bytes, the temporary name more)


def _file_name(url: str) -> str:
    """The file name a fetched image is kept under: the URL's last part with a short hash of the whole URL, so two
    tasks whose images share a file name (``a/img.png``, ``b/img.png``) stay two images, and one URL stays one."""
    parsed = urlparse(url)
    name = (ls.image_name_candidates(url) or [parsed.path.rsplit("/", 1)[-1] or "image"])[0].rsplit("/", 1)[-1]
    tag = hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    suffix = PurePosixPath(name).suffix[:16]
    return f"{PurePosixPath(name).stem[: MAX_NAME - len(suffix) - 11]}-{tag}{suffix}"


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


class _ProtocolRoute(APIRoute):
    """A route whose refusals of a body it cannot read are the protocol's: FastAPI's own 400 (nesting too deep, a
    number too long) as ``{"error": sentence}``, its 422 (not a JSON object) without echoing the input (which may hold
    NaN or lone surrogates, which no JSON response can carry)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
                sentence = "the request body is not a JSON object of Label Studio's; send what Label Studio sends."
                return JSONResponse({"error": sentence, "detail": detail}, status_code=422)
            except StarletteHTTPException as exc:
                if exc.status_code != 400:
                    raise
                sentence = f"the request body cannot be read ({exc.detail}); send a JSON object, as Label Studio does."
                return JSONResponse({"error": sentence}, status_code=400)

        return route


def router(backend: LabelStudioBackend, check: Callable[[str, str], bool] | None = None) -> APIRouter:
    """The protocol's routes under :data:`PREFIX`; ``check(user, password)`` guards them when given."""
    r = APIRouter(prefix=PREFIX, dependencies=[Depends(_basic_auth(check))], route_class=_ProtocolRoute)

    def answer(fn: Callable[[], dict[str, Any]], body: Any) -> Any:
        try:
            _check_body(body)
            return fn()
        except (BackendError, FormatError, StoreError, imageio.ImageError) as exc:
            log.warning("Label Studio request refused: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=400)

    @r.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "labelsmart"}

    @r.post("/setup")
    def setup(body: dict[str, Any]) -> Any:
        return answer(lambda: backend.setup(body), body)

    @r.post("/predict")
    def predict(body: dict[str, Any]) -> Any:
        return answer(lambda: backend.predict(body), body)

    @r.post("/webhook")
    def webhook(body: dict[str, Any], tasks: BackgroundTasks) -> Any:
        def handle() -> dict[str, Any]:
            what, work = backend.webhook(body)
            if work is not None:
                tasks.add_task(work)
            return {"status": "ok", "what": what}

        return answer(handle, body)

    @r.post("/train")
    def train(body: dict[str, Any]) -> Any:  # Label Studio without its webhook-training flag posts here
        return answer(lambda: backend.webhook({"action": "START_TRAINING"})[0] and {"status": "ok"}, body)

    return r
