"""Plumbing of the project store: one SQLite database in WAL mode, a connection per thread, transactions.

Every logical change is one transaction, so a crash of any process loses nothing that was saved. Each
process (and each thread) opens its own connection; readers never block the writer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class StoreError(ValueError):
    """A request the store refuses, with a sentence a user can act on."""


class Database:
    """One SQLite file, with a connection per thread. The store's parts (images, labels, registry, messages,
    scores) are built on it and share its connections, so one transaction may span several of them."""

    def __init__(self, db_path: Path, image_root: Path | None = None) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.image_root = Path(image_root) if image_root is not None else None
        self._local = threading.local()
        self._con().executescript(SCHEMA)  # executescript manages its own transaction

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
