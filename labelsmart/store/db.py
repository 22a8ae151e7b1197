"""Plumbing of the project store: one SQLite database in WAL mode, a connection per thread, transactions.

Every logical change is one transaction, so a crash of any process loses nothing that was saved. Each
process (and each thread) opens its own connection; readers never block the writer.

A write that cannot land is one sentence naming the file: :class:`StoreFullError` when the disk is full
(SQLite has rolled the transaction back, so nothing of it is on disk), :class:`StoreLockedError` when another
program holds the write lock for longer than the busy timeout (``BUSY_TIMEOUT_S``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 30.0  # how long a write waits for another connection's lock before it gives up

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
    created_at REAL NOT NULL, published_at REAL, error TEXT, owner TEXT);
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

# Columns added to SCHEMA's tables after databases were made without them: (table, column, declaration).
# A new database has them from SCHEMA; an older one gets them once, when it is next opened (:func:`_migrate`).
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("models", "owner", "TEXT"),  # the process training a version (registry.RoundOwner as JSON); NULL before
)


class StoreError(ValueError):
    """A request the store refuses, with a sentence a user can act on."""


class StoreFullError(StoreError):
    """The disk holding the database is full: the change was rolled back; earlier ones are safe."""


class StoreLockedError(StoreError):
    """Another program held the database's write lock past the busy timeout; the change was not written."""


def _write_error(db_path: Path, exc: sqlite3.OperationalError, timeout_s: float) -> StoreError | None:
    """The sentence for a write SQLite refused because the disk is full or the file is locked; None otherwise."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None  # extended codes (SQLITE_BUSY_SNAPSHOT...) too
    if primary == sqlite3.SQLITE_FULL:
        return StoreFullError(
            f"the disk holding {db_path} is full; free space and save again (this change was not written, "
            "everything saved before it is safe)."
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreLockedError(
            f"{db_path} is locked by another program (waited {timeout_s:g} s); close it and save again "
            "(this change was not written)."
        )
    return None


class Database:
    """One SQLite file, with a connection per thread. The store's parts (images, labels, registry, messages,
    scores) are built on it and share its connections, so one transaction may span several of them."""

    def __init__(self, db_path: Path, image_root: Path | None = None, busy_timeout_s: float | None = None) -> None:
        """Open (and create) the database.

        Args:
            busy_timeout_s: how long a write waits for another connection's lock (default ``BUSY_TIMEOUT_S``).
        """
        self.db_path = Path(db_path)
        self.busy_timeout_s = BUSY_TIMEOUT_S if busy_timeout_s is None else float(busy_timeout_s)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.image_root = Path(image_root) if image_root is not None else None
        self._local = threading.local()
        self._con().executescript(SCHEMA)  # executescript manages its own transaction
        self._migrate()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.db_path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it lands, or none of it.

        Raises:
            StoreFullError: the disk is full; nothing of the transaction was written.
            StoreLockedError: another program held the write lock past the busy timeout; nothing was written.
        """
        con = self._con()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL); a second ROLLBACK would hide them.
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            error = _write_error(self.db_path, exc, self.busy_timeout_s)
            if error is None:
                raise
            raise error from exc

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same state."""
        con = self._con()
        con.execute("BEGIN")
        try:
            yield con
        finally:
            con.execute("COMMIT")

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self._con().execute(f"PRAGMA table_info({table})").fetchall()}

    def _migrate(self) -> None:
        """Add the :data:`ADDED_COLUMNS` an older database lacks, in one transaction.

        Looked at without a lock first, so opening a current database writes nothing; the write lock is taken
        only when something is missing, and the columns are looked at again under it, so two processes opening
        the same older database at once add each column once.
        """
        if all(column in self._columns(table) for table, column, _ in ADDED_COLUMNS):
            return
        with self.transaction() as con:
            for table, column, declaration in ADDED_COLUMNS:
                if column not in self._columns(table):
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

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
