"""Images and classes of a project: the image list (relative path, size, content hash) and the classes whose
ids are the values of label masks and model outputs, with the classes-file format that defines them."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.store.db import StoreError
from labelsmart.store.messages import Messages

log = logging.getLogger(__name__)

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


# Images received from another tool are named "@received/<file>" (no image under the image root starts with "@" in
# practice); SAFE_NAME keeps their file names plain.
RECEIVED_PREFIX = "@received/"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


RECEIVED_NAME_MAX = 120  # characters of a received file's name (a file system takes 255 bytes, a temporary name more)


def received_path(name: str) -> str:
    """The store path of an image received under ``name``: ``@received/`` and a plain file name (no folders, no
    ``..``, only ``A-Za-z0-9._-``, at most :data:`RECEIVED_NAME_MAX` characters, its suffix kept)."""
    plain = SAFE_NAME.sub("_", Path(name.replace("\\", "/")).name).lstrip(".") or "image"
    if len(plain) > RECEIVED_NAME_MAX:
        suffix = Path(plain).suffix[:16]
        plain = Path(plain).stem[: RECEIVED_NAME_MAX - len(suffix)] + suffix
    return RECEIVED_PREFIX + plain


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


class Images(Messages):
    """The project's images (only ever read) and classes."""

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
        """Absolute path of an image (under the image root, or, received from another tool, the project folder)."""
        rel = self.image(image_id).path
        if rel.startswith(RECEIVED_PREFIX):
            return self.received_dir / rel[len(RECEIVED_PREFIX) :]
        assert self.image_root is not None, "store opened without an image root"
        return self.image_root / rel

    @property
    def received_dir(self) -> Path:
        """Where images another tool sent (Label Studio's uploads) are kept: the project folder, never the data."""
        return Path(self.db_path).parent / "received"

    def add_received_image(self, name: str, data: bytes) -> int:
        """Keep an image another tool sent (a Label Studio upload) in the project and register it; returns its id.

        ``name`` is reduced to a plain file name (no folders, no ``..``), so a sender cannot write outside
        :attr:`received_dir`. An image received before under the same name is not written again.

        Raises:
            ImageError: ``data`` is not an image labelsmart reads (nothing is kept).
        """
        rel = received_path(name)
        stem = rel[len(RECEIVED_PREFIX) :]
        known = self.image_id_by_path(rel)
        if known is not None:
            return known
        path = self.received_dir / stem
        imageio.atomic_write_bytes(path, data)
        try:
            h, w = imageio.read_image(path).shape[:2]
        except imageio.ImageError:
            path.unlink(missing_ok=True)
            raise
        self._insert_images([(rel, w, h, file_sha1(path), time.time())])
        image_id = self.image_id_by_path(rel)
        assert image_id is not None
        return image_id

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
