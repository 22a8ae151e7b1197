"""The project store: one SQLite database in WAL mode.

Holds images (relative path, size, content hash), classes, append-only label revisions (PNG-encoded
uint8 masks, 255 = unlabelled), model versions, trainer status, train requests, events and the
prediction index. Every logical change is one transaction, so a crash of any process loses nothing that
was saved. Each process (and each thread) opens its own connection; readers never block the writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER NOT NULL, height INTEGER NOT NULL,
    sha1 TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS classes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, color TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id), mask BLOB NOT NULL,
    labelled_pixels INTEGER NOT NULL, class_pixels TEXT NOT NULL, author TEXT NOT NULL, source TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS labels_image ON labels(image_id, id);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY, path TEXT NOT NULL, status TEXT NOT NULL, metrics TEXT NOT NULL,
    label_revision INTEGER NOT NULL, labelled_images INTEGER NOT NULL, labelled_pixels INTEGER NOT NULL,
    created_at REAL NOT NULL, published_at REAL, error TEXT);
CREATE TABLE IF NOT EXISTS status (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, created_at REAL NOT NULL, handled_at REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, level TEXT NOT NULL, source TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS predictions (
    image_id INTEGER NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, mean_confidence REAL NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (image_id, version));
CREATE TABLE IF NOT EXISTS scores (
    image_id INTEGER NOT NULL, version INTEGER NOT NULL, score REAL NOT NULL, method TEXT NOT NULL,
    map BLOB, created_at REAL NOT NULL, PRIMARY KEY (version, image_id));
CREATE TABLE IF NOT EXISTS thumbnails (image_id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""

# Distinct, readable default colours for classes created without one (tab10-like, then more).
DEFAULT_COLORS: list[tuple[int, int, int]] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 128, 128),
    (128, 0, 128),
    (0, 0, 255),
    (255, 0, 0),
    (0, 255, 0),
]


class StoreError(ValueError):
    """A request the store refuses, with a sentence a user can act on."""


@dataclass(frozen=True)
class ImageRow:
    """One image of the project and its state."""

    id: int
    path: str  # relative to the image root
    width: int
    height: int
    labelled_pixels: int = 0  # of the current label revision
    predicted_version: int | None = None  # newest model version with a cached prediction

    @property
    def state(self) -> str:
        """``labelled``, ``pre-annotated`` or ``unlabelled``."""
        if self.labelled_pixels > 0:
            return "labelled"
        if self.predicted_version is not None:
            return "pre-annotated"
        return "unlabelled"


@dataclass(frozen=True)
class ClassRow:
    """A class: its id is its index in masks and model outputs."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Revision:
    """A label revision (metadata; the mask is loaded on demand)."""

    id: int
    image_id: int
    labelled_pixels: int
    author: str
    source: str
    created_at: float


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of the current labels: one revision per labelled image."""

    max_revision: int  # newest label revision id in the store at snapshot time
    revisions: tuple[tuple[int, int], ...]  # (image_id, revision_id) of images with labelled pixels
    labelled_pixels: int

    @property
    def image_ids(self) -> list[int]:
        """Images with labels in this snapshot."""
        return [i for i, _ in self.revisions]


@dataclass(frozen=True)
class ModelRow:
    """A model version in the registry."""

    version: int
    path: str  # folder holding model.pt, model.onnx, model.json
    status: str  # training | published | failed
    metrics: dict[str, Any]
    label_revision: int
    labelled_images: int
    labelled_pixels: int
    created_at: float
    published_at: float | None
    error: str | None


def file_sha1(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file, read in chunks."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_color(value: Any) -> tuple[int, int, int]:
    """``[r, g, b]`` or ``"#rrggbb"`` -> ``(r, g, b)``."""
    if isinstance(value, str):
        s = value.strip().lstrip("#")
        if len(s) != 6:
            raise StoreError(f"colour {value!r} is not #rrggbb; write it as #rrggbb or [r, g, b].")
        return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
    vals = [int(v) for v in value]
    if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
        raise StoreError(f"colour {value!r} is not three numbers 0..255; write it as [r, g, b].")
    return vals[0], vals[1], vals[2]


def load_classes_file(path: Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Read a classes file: a JSON list of names, or of ``{"name", "color"}`` (optional ``"id"`` order).

    Raises:
        StoreError: the file is not such a list.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the classes file ({exc}); give a JSON list of class names.") from exc
    if not isinstance(data, list) or not data:
        raise StoreError(f"{path}: expected a non-empty JSON list of names or of {{'name','color'}} objects.")
    if all(isinstance(d, dict) and "id" in d for d in data):
        data = sorted(data, key=lambda d: int(d["id"]))
        if [int(d["id"]) for d in data] != list(range(len(data))):
            raise StoreError(f"{path}: class ids must be 0..{len(data) - 1} without gaps; renumber them.")
    out: list[tuple[str, tuple[int, int, int] | None]] = []
    for item in data:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            color = item.get("color", item.get("colour"))
            try:
                out.append((item["name"], parse_color(color) if color is not None else None))
            except StoreError as exc:
                raise StoreError(f"{path}: {exc}") from exc
        else:
            raise StoreError(f"{path}: entry {item!r} is neither a name nor an object with a 'name'; fix it.")
    if len({n for n, _ in out}) != len(out):
        raise StoreError(f"{path}: class names repeat; give each class once.")
    if len(out) > 255:
        raise StoreError(f"{path}: {len(out)} classes; at most 255 fit in an 8-bit mask.")
    return out


class Store:
    """Project store over one SQLite file. Safe to use from several threads and processes."""

    def __init__(self, db_path: Path, image_root: Path | None = None) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.image_root = Path(image_root) if image_root is not None else None
        self._local = threading.local()
        self._con().executescript(SCHEMA)  # executescript manages its own transaction

    # ------------------------------------------------------------------------------------ plumbing

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it lands, or none of it."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same state."""
        con = self._con()
        con.execute("BEGIN")
        try:
            yield con
        finally:
            con.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value from the meta table."""
        row = self._con().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value."""
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -------------------------------------------------------------------------------------- images

    def sync_images(self, root: Path | None = None, paths: Iterable[Path] | None = None) -> int:
        """Register images found under ``root`` that the store does not know yet. Images are only read.

        Unreadable files are logged as events and skipped. Returns the number of images added.
        """
        root = Path(root or self.image_root)
        known = {r[0] for r in self._con().execute("SELECT path FROM images")}
        added = 0
        batch: list[tuple[str, int, int, str, float]] = []
        for rel in paths if paths is not None else imageio.list_images(root):
            rel_s = Path(rel).as_posix()
            if rel_s in known:
                continue
            full = root / rel
            try:
                h, w = imageio.read_image(full).shape[:2]
            except imageio.ImageError as exc:
                self.add_event("warning", "store", str(exc))
                log.warning("%s", exc)
                continue
            batch.append((rel_s, w, h, file_sha1(full), time.time()))
            if len(batch) >= 256:
                added += self._insert_images(batch)
                batch = []
        added += self._insert_images(batch)
        return added

    def _insert_images(self, rows: Sequence[tuple[str, int, int, str, float]]) -> int:
        if not rows:
            return 0
        with self.transaction() as con:
            con.executemany(
                "INSERT OR IGNORE INTO images(path, width, height, sha1, added_at) VALUES (?,?,?,?,?)", rows
            )
        return len(rows)

    # An image row with its state: labelled pixels of its newest revision, newest cached prediction.
    _IMAGE_SQL = """
        SELECT i.id, i.path, i.width, i.height,
               COALESCE((SELECT l.labelled_pixels FROM labels l WHERE l.image_id=i.id
                         ORDER BY l.id DESC LIMIT 1), 0),
               (SELECT MAX(p.version) FROM predictions p WHERE p.image_id=i.id)
        FROM images i"""

    def images(self) -> list[ImageRow]:
        """All images with their state, in path order."""
        return [ImageRow(*r) for r in self._con().execute(self._IMAGE_SQL + " ORDER BY i.path")]

    def image(self, image_id: int) -> ImageRow:
        """One image by id."""
        r = self._con().execute(self._IMAGE_SQL + " WHERE i.id=?", (image_id,)).fetchone()
        if r is None:
            raise StoreError(f"image id {image_id} is not in this project; refresh the image list.")
        return ImageRow(*r)

    def image_id_by_path(self, rel: str) -> int | None:
        """Id of the image at a relative path, or None."""
        r = self._con().execute("SELECT id FROM images WHERE path=?", (Path(rel).as_posix(),)).fetchone()
        return r[0] if r else None

    def image_path(self, image_id: int) -> Path:
        """Absolute path of an image."""
        assert self.image_root is not None, "store opened without an image root"
        return self.image_root / self.image(image_id).path

    def read_image(self, image_id: int) -> np.ndarray:
        """RGB pixels of an image."""
        return imageio.read_image(self.image_path(image_id))

    # ------------------------------------------------------------------------------------- classes

    def classes(self) -> list[ClassRow]:
        """Classes in id order."""
        rows = self._con().execute("SELECT id, name, color FROM classes ORDER BY id").fetchall()
        return [ClassRow(i, n, tuple(json.loads(c))) for i, n, c in rows]

    def add_class(self, name: str, color: Sequence[int] | str | None = None) -> ClassRow:
        """Append a class (id = next index)."""
        name = name.strip()
        if not name:
            raise StoreError("a class needs a name; type one before adding it.")
        with self.transaction() as con:
            n = con.execute("SELECT COUNT(*) FROM classes").fetchone()[0]
            if n >= 255:
                raise StoreError("255 classes is the most an 8-bit mask holds.")
            if con.execute("SELECT 1 FROM classes WHERE name=?", (name,)).fetchone():
                raise StoreError(f"class {name!r} exists already; pick another name.")
            rgb = parse_color(color) if color is not None else DEFAULT_COLORS[n % len(DEFAULT_COLORS)]
            con.execute("INSERT INTO classes(id, name, color) VALUES (?,?,?)", (n, name, json.dumps(list(rgb))))
        return ClassRow(n, name, rgb)

    def ensure_classes(self, specs: Sequence[tuple[str, Sequence[int] | None]], source: str = "classes file") -> None:
        """Create the given classes in an empty project, or check that they match the existing ones."""
        existing = self.classes()
        if not existing:
            for name, color in specs:
                self.add_class(name, color)
            return
        names = [c.name for c in existing]
        wanted = [n for n, _ in specs]
        if names[: len(wanted)] != wanted:
            raise StoreError(
                f"{source} lists classes {wanted} but this project has {names}; use the same classes "
                "or another --workdir."
            )

    # -------------------------------------------------------------------------------------- labels

    def save_label(self, image_id: int, mask: np.ndarray, author: str = "annotator", source: str = "human") -> int:
        """Append a label revision for an image in one transaction. Returns the revision id.

        Raises:
            StoreError: the mask has the wrong size or holds an unknown class id.
        """
        img = self.image(image_id)
        mask = np.asarray(mask)
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise StoreError(f"label mask for {img.path} must be a 2-D uint8 array, got {mask.dtype} {mask.shape}.")
        if mask.shape != (img.height, img.width):
            raise StoreError(
                f"label mask for {img.path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                f"{img.width}x{img.height}; paint on the image at its own size."
            )
        k = len(self.classes())
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [i for i in np.nonzero(counts[:255])[0].tolist() if i >= k]
        if bad:
            raise StoreError(f"label mask for {img.path} uses class ids {bad} but the project has {k} classes.")
        class_pixels = {str(i): int(counts[i]) for i in range(k) if counts[i]}
        labelled = int(mask.size - counts[IGNORE_INDEX])
        blob = imageio.encode_png(mask)
        with self.transaction() as con:
            cur = con.execute(
                "INSERT INTO labels(image_id, mask, labelled_pixels, class_pixels, author, source, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (image_id, blob, labelled, json.dumps(class_pixels), author, source, time.time()),
            )
            rev = int(cur.lastrowid)
        log.info("saved label revision %d for %s (%d labelled pixels)", rev, img.path, labelled)
        return rev

    def current_revision(self, image_id: int) -> Revision | None:
        """Newest label revision of an image."""
        r = (
            self._con()
            .execute(
                "SELECT id, image_id, labelled_pixels, author, source, created_at FROM labels "
                "WHERE image_id=? ORDER BY id DESC LIMIT 1",
                (image_id,),
            )
            .fetchone()
        )
        return Revision(*r) if r else None

    def current_label(self, image_id: int) -> np.ndarray | None:
        """The current mask of an image, or None if it was never labelled."""
        r = (
            self._con()
            .execute("SELECT mask FROM labels WHERE image_id=? ORDER BY id DESC LIMIT 1", (image_id,))
            .fetchone()
        )
        return imageio.decode_png(r[0]) if r else None

    def load_revision(self, revision_id: int) -> np.ndarray:
        """The mask of one label revision."""
        r = self._con().execute("SELECT mask FROM labels WHERE id=?", (revision_id,)).fetchone()
        if r is None:
            raise StoreError(f"label revision {revision_id} does not exist.")
        return imageio.decode_png(r[0])

    def history(self, image_id: int) -> list[Revision]:
        """All label revisions of an image, oldest first."""
        rows = (
            self._con()
            .execute(
                "SELECT id, image_id, labelled_pixels, author, source, created_at FROM labels "
                "WHERE image_id=? ORDER BY id",
                (image_id,),
            )
            .fetchall()
        )
        return [Revision(*r) for r in rows]

    def undo_label(self, image_id: int, author: str = "annotator") -> int | None:
        """Undo the last save of an image by appending the revision before it (history stays whole).

        Returns the new revision id, or None when there is nothing to undo.
        """
        img = self.image(image_id)
        with self.transaction() as con:
            rows = con.execute(
                "SELECT mask, labelled_pixels, class_pixels, source FROM labels WHERE image_id=? ORDER BY id",
                (image_id,),
            ).fetchall()
            # Replay the history as a stack: a save pushes its state, an undo pops one.
            stack: list[tuple[bytes, int, str]] = []
            for blob, labelled, class_pixels, source in rows:
                if source == "undo":
                    if stack:
                        stack.pop()
                else:
                    stack.append((blob, labelled, class_pixels))
            if not stack:
                return None
            stack.pop()
            if stack:
                blob, labelled, class_pixels = stack[-1]
            else:
                blob = imageio.encode_png(np.full((img.height, img.width), IGNORE_INDEX, np.uint8))
                labelled, class_pixels = 0, "{}"
            cur = con.execute(
                "INSERT INTO labels(image_id, mask, labelled_pixels, class_pixels, author, source, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (image_id, blob, labelled, class_pixels, author, "undo", time.time()),
            )
            return int(cur.lastrowid)

    def snapshot(self) -> Snapshot:
        """The current revision of every labelled image, read in one transaction."""
        with self.reading() as con:
            max_rev = con.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0]
            rows = con.execute(
                """SELECT l.image_id, l.id, l.labelled_pixels FROM labels l
                   JOIN (SELECT image_id, MAX(id) AS id FROM labels GROUP BY image_id) c ON c.id = l.id
                   WHERE l.labelled_pixels > 0 ORDER BY l.image_id"""
            ).fetchall()
        return Snapshot(
            max_revision=int(max_rev),
            revisions=tuple((int(i), int(r)) for i, r, _ in rows),
            labelled_pixels=int(sum(p for _, _, p in rows)),
        )

    def new_pixels_since(self, revision: int) -> int:
        """Labelled pixels in revisions saved after ``revision`` (the trigger for the next round)."""
        r = (
            self._con()
            .execute("SELECT COALESCE(SUM(labelled_pixels), 0) FROM labels WHERE id > ?", (revision,))
            .fetchone()
        )
        return int(r[0])

    def class_pixel_counts(self) -> dict[int, int]:
        """Labelled pixels per class over the current revisions."""
        rows = (
            self._con()
            .execute(
                """SELECT l.class_pixels FROM labels l
               JOIN (SELECT image_id, MAX(id) AS id FROM labels GROUP BY image_id) c ON c.id = l.id"""
            )
            .fetchall()
        )
        total: dict[int, int] = {}
        for (cp,) in rows:
            for k, v in json.loads(cp).items():
                total[int(k)] = total.get(int(k), 0) + int(v)
        return total

    # -------------------------------------------------------------------------------------- models

    def next_version(self) -> int:
        """The version number the next training round gets."""
        r = self._con().execute("SELECT COALESCE(MAX(version), 0) FROM models").fetchone()
        return int(r[0]) + 1

    def add_model(self, version: int, path: Path, snapshot: Snapshot, status: str = "training") -> None:
        """Register a model version under a given number and path (tests and imports; rounds use begin_model)."""
        with self.transaction() as con:
            con.execute(
                "INSERT INTO models(version, path, status, metrics, label_revision, labelled_images, labelled_pixels, "
                "created_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    version,
                    str(path),
                    status,
                    "{}",
                    snapshot.max_revision,
                    len(snapshot.revisions),
                    snapshot.labelled_pixels,
                    time.time(),
                ),
            )

    def begin_model(self, models_dir: Path, snapshot: Snapshot) -> int:
        """Allocate the next version number and register it as training, in one transaction.

        Two processes training at once (the background trainer and a CLI round) get different numbers.
        The version's folder is ``models_dir / f"v{version:04d}"``.
        """
        with self.transaction() as con:
            version = int(con.execute("SELECT COALESCE(MAX(version), 0) FROM models").fetchone()[0]) + 1
            con.execute(
                "INSERT INTO models(version, path, status, metrics, label_revision, labelled_images, labelled_pixels, "
                "created_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    version,
                    str(Path(models_dir) / f"v{version:04d}"),
                    "training",
                    "{}",
                    snapshot.max_revision,
                    len(snapshot.revisions),
                    snapshot.labelled_pixels,
                    time.time(),
                ),
            )
        return version

    def publish_model(self, version: int, metrics: dict[str, Any] | None = None) -> None:
        """Flip a version to published (its files must already be in place)."""
        with self.transaction() as con:
            con.execute(
                "UPDATE models SET status='published', metrics=?, published_at=? WHERE version=?",
                (json.dumps(metrics or {}), time.time(), version),
            )

    def fail_model(self, version: int, error: str) -> None:
        """Mark a version as failed; it is never served."""
        with self.transaction() as con:
            con.execute("UPDATE models SET status='failed', error=? WHERE version=?", (error, version))

    def models(self) -> list[ModelRow]:
        """All versions, oldest first."""
        rows = (
            self._con()
            .execute(
                "SELECT version, path, status, metrics, label_revision, labelled_images, labelled_pixels, created_at, "
                "published_at, error FROM models ORDER BY version"
            )
            .fetchall()
        )
        return [ModelRow(r[0], r[1], r[2], json.loads(r[3]), *r[4:]) for r in rows]

    def latest_published(self) -> ModelRow | None:
        """The newest published version, or None."""
        pub = [m for m in self.models() if m.status == "published"]
        return pub[-1] if pub else None

    def last_round_revision(self) -> int:
        """Label revision the newest round (published, failed or running) started from; 0 if none."""
        r = self._con().execute("SELECT label_revision FROM models ORDER BY version DESC LIMIT 1").fetchone()
        return int(r[0]) if r else 0

    # ------------------------------------------------------------------------- status, requests, events

    def set_status(self, key: str, value: dict[str, Any]) -> None:
        """Replace a status record (the trainer writes ``"trainer"``)."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO status(key, value, updated_at) VALUES (?,?,?)",
                (key, json.dumps(value), time.time()),
            )

    def get_status(self, key: str) -> tuple[dict[str, Any], float] | None:
        """A status record and the time it was written."""
        r = self._con().execute("SELECT value, updated_at FROM status WHERE key=?", (key,)).fetchone()
        return (json.loads(r[0]), float(r[1])) if r else None

    def request(self, kind: str) -> None:
        """Queue a request for the trainer (``train_now``)."""
        with self.transaction() as con:
            con.execute("INSERT INTO requests(kind, created_at) VALUES (?, ?)", (kind, time.time()))

    def take_requests(self, kind: str) -> int:
        """Mark all pending requests of a kind handled; returns how many there were."""
        with self.transaction() as con:
            n = con.execute("SELECT COUNT(*) FROM requests WHERE kind=? AND handled_at IS NULL", (kind,)).fetchone()[0]
            con.execute("UPDATE requests SET handled_at=? WHERE kind=? AND handled_at IS NULL", (time.time(), kind))
        return int(n)

    def pending_requests(self, kind: str) -> int:
        """Unhandled requests of a kind."""
        r = self._con().execute("SELECT COUNT(*) FROM requests WHERE kind=? AND handled_at IS NULL", (kind,)).fetchone()
        return int(r[0])

    def add_event(self, level: str, source: str, message: str) -> None:
        """Record something a user should see (errors, restarts, skipped files)."""
        with self.transaction() as con:
            con.execute(
                "INSERT INTO events(time, level, source, message) VALUES (?,?,?,?)",
                (time.time(), level, source, message),
            )

    def events(self, limit: int = 20) -> list[tuple[float, str, str, str]]:
        """Newest events first: ``(time, level, source, message)``."""
        return (
            self._con()
            .execute("SELECT time, level, source, message FROM events ORDER BY id DESC LIMIT ?", (limit,))
            .fetchall()
        )

    # ---------------------------------------------------------------------------------- predictions

    def record_prediction(self, image_id: int, version: int, path: Path, mean_confidence: float) -> None:
        """Index a cached prediction file."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO predictions(image_id, version, path, mean_confidence, created_at) "
                "VALUES (?,?,?,?,?)",
                (image_id, version, str(path), float(mean_confidence), time.time()),
            )

    def prediction(self, image_id: int, version: int) -> tuple[str, float] | None:
        """``(path, mean_confidence)`` of a cached prediction."""
        r = (
            self._con()
            .execute(
                "SELECT path, mean_confidence FROM predictions WHERE image_id=? AND version=?", (image_id, version)
            )
            .fetchone()
        )
        return (r[0], float(r[1])) if r else None

    # ----------------------------------------------------------------------- uncertainty scores (active)

    def save_scores(self, version: int, method: str, rows: Sequence[tuple[int, float, bytes | None]]) -> None:
        """Store uncertainty scores of images under a model version: ``(image_id, score, png map or None)``."""
        if not rows:
            return
        now = time.time()
        with self.transaction() as con:
            con.executemany(
                "INSERT OR REPLACE INTO scores(image_id, version, score, method, map, created_at) VALUES (?,?,?,?,?,?)",
                [(int(i), int(version), float(s), method, m, now) for i, s, m in rows],
            )

    def scores(self, version: int) -> dict[int, float]:
        """``{image_id: score}`` of one version."""
        rows = self._con().execute("SELECT image_id, score FROM scores WHERE version=?", (version,)).fetchall()
        return {int(i): float(s) for i, s in rows}

    def score_method(self, version: int) -> str | None:
        """The uncertainty measure a version's scores use."""
        r = self._con().execute("SELECT method FROM scores WHERE version=? LIMIT 1", (version,)).fetchone()
        return r[0] if r else None

    def latest_scored_version(self) -> int | None:
        """The newest model version with stored scores."""
        r = self._con().execute("SELECT MAX(version) FROM scores").fetchone()
        return int(r[0]) if r and r[0] is not None else None

    def score_map(self, image_id: int, version: int) -> np.ndarray | None:
        """The stored uncertainty map (uint8, 0..255, small) of an image under a version."""
        r = self._con().execute("SELECT map FROM scores WHERE image_id=? AND version=?", (image_id, version)).fetchone()
        return imageio.decode_png(r[0]) if r and r[0] is not None else None

    def save_thumbnail(self, image_id: int, vector: np.ndarray) -> None:
        """Store an image's near-duplicate descriptor (float32)."""
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO thumbnails(image_id, vector) VALUES (?, ?)", (image_id, blob))

    def thumbnail(self, image_id: int) -> np.ndarray | None:
        """An image's stored near-duplicate descriptor, or None."""
        r = self._con().execute("SELECT vector FROM thumbnails WHERE image_id=?", (image_id,)).fetchone()
        return np.frombuffer(r[0], dtype=np.float32) if r else None
