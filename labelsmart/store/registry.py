"""The model registry: versions, their status and metrics, and the one layout of a version's files.

A version lives in ``<models dir>/vNNNN/`` (:func:`version_dir`) and holds ``model.pt`` (the checkpoint),
``model.onnx`` and its sidecar ``model.json``; it is built in a hidden staging folder beside it
(:func:`staging_dir`) and moved into place with one rename before its row flips to published.

A version in training records its owner (:class:`RoundOwner`: the process running the round), so a trainer
starting up fails only the rounds whose process is gone, not a ``python -m labelsmart train`` still running.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import asdict, dataclass
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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from ``/proc/<pid>/stat``; None without it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in brackets may hold spaces and brackets
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def _start_token(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: ``proc:<boot id>:<start ticks>`` on Linux,
    ``psutil:<create time>`` where psutil is installed, None where neither is (then only the pid is checked).
    The token names its method, so it is always read back the way it was written."""
    stat = _proc_stat(pid)
    boot = _boot_id()
    if stat is not None and boot is not None:
        return f"proc:{boot}:{stat[1]}"
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    except OSError:  # Windows: no such process
        return False
    return True


@dataclass(frozen=True)
class RoundOwner:
    """The process running a round: its pid, host and start (:func:`_start_token`), so a pid reused by a later
    process is not taken for it."""

    pid: int
    host: str
    start: str | None

    @classmethod
    def current(cls) -> RoundOwner:
        """This process."""
        return cls(os.getpid(), socket.gethostname(), _start_token(os.getpid()))

    def to_json(self) -> str:
        """As stored in the registry's ``owner`` column."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> RoundOwner | None:
        """From the ``owner`` column; None for rows written before owners were recorded (or unreadable)."""
        if not text:
            return None
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), None if d.get("start") is None else str(d["start"]))
        except (ValueError, TypeError, KeyError):
            return None

    def is_alive(self) -> bool:
        """True while this process runs. A process on another host cannot be looked at, so it counts as alive
        (its round is left to it); a zombie, or a later process under the same pid, counts as gone."""
        if self.host != socket.gethostname():
            return True
        if not _pid_exists(self.pid):
            return False
        if self.start is None:
            return True
        if self.start.startswith("proc:"):
            stat = _proc_stat(self.pid)
            if stat is None or stat[0] in ("Z", "X"):
                return False
            return self.start == f"proc:{_boot_id()}:{stat[1]}"
        if self.start.startswith("psutil:"):
            try:
                import psutil
            except ImportError:  # written by a process that had it: the pid is all this one can check
                return True
            try:
                proc = psutil.Process(self.pid)
                alive = proc.status() != psutil.STATUS_ZOMBIE
                return alive and self.start == f"psutil:{proc.create_time():.3f}"
            except psutil.Error:
                return False
        return True


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
    owner: RoundOwner | None = None  # the process that began it; None in rows from older registries

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


def _insert_model(
    con: sqlite3.Connection,
    version: int,
    folder: Path,
    status: str,
    snapshot: Snapshot,
    owner: RoundOwner | None = None,
) -> None:
    con.execute(
        "INSERT INTO models(version, path, status, metrics, label_revision, labelled_images, labelled_pixels, "
        "created_at, owner) VALUES (?,?,?,?,?,?,?,?,?)",
        (
            version,
            str(folder),
            status,
            "{}",
            snapshot.max_revision,
            len(snapshot.revisions),
            snapshot.labelled_pixels,
            time.time(),
            None if owner is None else owner.to_json(),
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
        The version's folder is :func:`version_dir` of ``models_dir``; its owner is this process
        (:meth:`RoundOwner.current`), so another trainer's start-up recovery leaves it alone while it runs.
        """
        owner = RoundOwner.current()
        with self.transaction() as con:
            version = int(con.execute("SELECT COALESCE(MAX(version), 0) FROM models").fetchone()[0]) + 1
            _insert_model(con, version, version_dir(models_dir, version), "training", snapshot, owner)
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
                "published_at, error, owner FROM models ORDER BY version"
            )
            .fetchall()
        )
        return [ModelRow(r[0], r[1], r[2], json.loads(r[3]), *r[4:10], RoundOwner.from_json(r[10])) for r in rows]

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
