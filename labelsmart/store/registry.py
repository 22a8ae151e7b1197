"""The model registry: versions, their status and metrics, and the one layout of a version's files.

A version lives in ``<models dir>/vNNNN/`` (:func:`version_dir`) and holds ``model.pt`` (the checkpoint),
``model.onnx`` and its sidecar ``model.json``; it is built in a hidden staging folder beside it
(:func:`staging_dir`) and moved into place with one rename before its row flips to published.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelsmart.store.db import Database
from labelsmart.store.labels import Snapshot

CHECKPOINT_NAME = "model.pt"
ONNX_NAME = "model.onnx"


def version_name(version: int) -> str:
    """``v0007``: the name of a version's folder (and of its cached predictions)."""
    return f"v{version:04d}"


def version_dir(models_dir: Path, version: int) -> Path:
    """Registry folder of a model version: ``models_dir / "vNNNN"``."""
    return Path(models_dir) / version_name(version)


def staging_dir(folder: Path) -> Path:
    """The hidden folder a version's files are built in before one rename moves them to ``folder``."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.tmp")


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

    @property
    def folder(self) -> Path:
        """The version's folder."""
        return Path(self.path)

    @property
    def checkpoint(self) -> Path:
        """The version's PyTorch checkpoint."""
        return self.folder / CHECKPOINT_NAME

    @property
    def onnx(self) -> Path:
        """The version's ONNX model (its sidecar JSON beside it)."""
        return self.folder / ONNX_NAME


def _insert_model(con: sqlite3.Connection, version: int, folder: Path, status: str, snapshot: Snapshot) -> None:
    con.execute(
        "INSERT INTO models(version, path, status, metrics, label_revision, labelled_images, labelled_pixels, "
        "created_at) VALUES (?,?,?,?,?,?,?,?)",
        (
            version,
            str(folder),
            status,
            "{}",
            snapshot.max_revision,
            len(snapshot.revisions),
            snapshot.labelled_pixels,
            time.time(),
        ),
    )


class Registry(Database):
    """Model versions: allocated as training, then published or failed."""

    def add_model(self, version: int, path: Path, snapshot: Snapshot, status: str = "training") -> None:
        """Register a model version under a given number and path (tests and imports; rounds use begin_model)."""
        with self.transaction() as con:
            _insert_model(con, version, Path(path), status, snapshot)

    def begin_model(self, models_dir: Path, snapshot: Snapshot) -> int:
        """Allocate the next version number and register it as training, in one transaction.

        Two processes training at once (the background trainer and a CLI round) get different numbers.
        The version's folder is :func:`version_dir` of ``models_dir``.
        """
        with self.transaction() as con:
            version = int(con.execute("SELECT COALESCE(MAX(version), 0) FROM models").fetchone()[0]) + 1
            _insert_model(con, version, version_dir(models_dir, version), "training", snapshot)
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

    def resolve_model_paths(self, project_models_dir: Path) -> int:
        """Make relative version folders absolute, in one transaction; returns how many rows changed.

        Registries written before folders were recorded absolute hold ``models/<project>/vNNNN``, read against
        whatever folder a command was started from. Each such row gets the first of these that exists: the
        path against the current folder, then the version's folder in ``project_models_dir``. Rows whose files
        are nowhere keep their path (they stay unserved, as before).
        """
        changed = 0
        with self.transaction() as con:
            for version, path in con.execute("SELECT version, path FROM models").fetchall():
                folder = Path(path)
                if folder.is_absolute():
                    continue
                found = next(
                    (c for c in (folder.resolve(), Path(project_models_dir) / folder.name) if c.is_dir()), None
                )
                if found is not None:
                    con.execute("UPDATE models SET path=? WHERE version=?", (str(found), version))
                    changed += 1
        return changed

    def latest_published(self) -> ModelRow | None:
        """The newest published version, or None."""
        pub = [m for m in self.models() if m.status == "published"]
        return pub[-1] if pub else None

    def last_round_revision(self) -> int:
        """Label revision the newest round (published, failed or running) started from; 0 if none."""
        r = self._con().execute("SELECT label_revision FROM models ORDER BY version DESC LIMIT 1").fetchone()
        return int(r[0]) if r else 0
