"""Label revisions: append-only PNG-encoded uint8 masks (255 = unlabelled), undo as a new revision, and
consistent snapshots of the current labels for training."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX
from labelsmart.store.db import StoreError
from labelsmart.store.images import ImageRow, Images

log = logging.getLogger(__name__)


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


ANY_REVISION = object()  # save_label / undo_label without a check of the revision the labels were painted on


class StaleRevisionError(StoreError):
    """A save (or undo) against a revision that is no longer the newest: someone else saved the image since.

    Attributes:
        current: the image's newest revision, the one the save would have silently replaced.
    """

    def __init__(self, message: str, current: Revision) -> None:
        super().__init__(message)
        self.current = current


_REVISION_COLUMNS = "id, image_id, labelled_pixels, author, source, created_at"


def _check_newest(con: sqlite3.Connection, path: str, image_id: int, based_on: int | None) -> None:
    """Raise :class:`StaleRevisionError` unless ``based_on`` is the image's newest revision (inside the write
    transaction, so no save can come between the check and the insert)."""
    row = con.execute(
        f"SELECT {_REVISION_COLUMNS} FROM labels WHERE image_id=? ORDER BY id DESC LIMIT 1", (image_id,)
    ).fetchone()
    if row is None or int(row[0]) == based_on:
        if row is None and based_on is not None:
            raise StoreError(f"{path}: revision {based_on} is not a revision of this image; reload the image.")
        return
    current = Revision(*row)
    when = time.strftime("%H:%M:%S", time.localtime(current.created_at))
    seen = "no labels" if based_on is None else f"revision {based_on}"
    raise StaleRevisionError(
        f"{path} was saved by {current.author} at {when} (revision {current.id}) after you opened it with {seen}; "
        "nothing was saved. Merge your strokes onto the newer labels, or keep yours as a new revision.",
        current,
    )


def _insert_label(
    con: sqlite3.Connection,
    image_id: int,
    blob: bytes,
    labelled: int,
    class_pixels: dict[str, int],
    author: str,
    source: str,
) -> int:
    cur = con.execute(
        "INSERT INTO labels(image_id, mask, labelled_pixels, class_pixels, author, source, created_at) "
        "VALUES (?,?,?,?,?,?,?)",
        (image_id, blob, labelled, json.dumps(class_pixels), author, source, time.time()),
    )
    return int(cur.lastrowid)


class Labels(Images):
    """Label revisions of the project's images."""

    def save_label(
        self,
        image_id: int,
        mask: np.ndarray,
        author: str = "annotator",
        source: str = "human",
        based_on: int | None | object = ANY_REVISION,
    ) -> int:
        """Append a label revision for an image in one transaction. Returns the revision id.

        Args:
            based_on: the revision the labels were painted on (None: the image had none). When given, the save
                lands only if that is still the image's newest revision; ``ANY_REVISION`` (imports, benchmarks)
                appends whatever came before.

        Raises:
            StaleRevisionError: someone saved the image after ``based_on``; nothing was saved.
            StoreError: the mask has the wrong size or holds an unknown class id.
        """
        img, blob, labelled, class_pixels = self._label_row(image_id, mask)
        with self.transaction() as con:
            if based_on is not ANY_REVISION:
                _check_newest(con, img.path, image_id, based_on)
            rev = _insert_label(con, image_id, blob, labelled, class_pixels, author, source)
        log.info("saved label revision %d for %s (%d labelled pixels)", rev, img.path, labelled)
        return rev

    def save_labels(self, items: Sequence[tuple[int, np.ndarray]], author: str, source: str) -> list[int]:
        """Append a label revision for each ``(image id, mask)``, all in one transaction: every mask is checked
        first, and either all of them land or none (an import is never half done). Returns the revision ids.

        Raises:
            StoreError: a mask has the wrong size or holds an unknown class id; nothing was saved.
        """
        rows = [(image_id, *self._label_row(image_id, mask)[1:]) for image_id, mask in items]
        with self.transaction() as con:
            revs = [_insert_label(con, i, blob, n, pixels, author, source) for i, blob, n, pixels in rows]
        log.info("saved %d label revisions (%s, by %s)", len(revs), source, author)
        return revs

    def _label_row(self, image_id: int, mask: np.ndarray) -> tuple[ImageRow, bytes, int, dict[str, int]]:
        """A checked mask as a row: ``(image, PNG blob, labelled pixels, {class id: pixels})``."""
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
        return img, imageio.encode_png(mask), int(mask.size - counts[IGNORE_INDEX]), class_pixels

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

    def undo_label(
        self, image_id: int, author: str = "annotator", based_on: int | None | object = ANY_REVISION
    ) -> int | None:
        """Undo the last save of an image by appending the revision before it (history stays whole).

        Args:
            based_on: the revision the person undoing sees; when given, someone else's newer save is not undone.

        Returns the new revision id, or None when there is nothing to undo.

        Raises:
            StaleRevisionError: someone saved the image after ``based_on``; nothing was undone.
        """
        img = self.image(image_id)
        with self.transaction() as con:
            if based_on is not ANY_REVISION:
                _check_newest(con, img.path, image_id, based_on)
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
