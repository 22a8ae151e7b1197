"""Databases made by older versions of labelsmart: opening one adds what it lacks, and keeps what it holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from labelsmart.store import Snapshot, Store
from labelsmart.store.db import ADDED_COLUMNS, SCHEMA
from labelsmart.store.registry import RoundOwner

# the models table as it was before rounds recorded their owner
OLD_MODELS = """CREATE TABLE models (
    version INTEGER PRIMARY KEY, path TEXT NOT NULL, status TEXT NOT NULL, metrics TEXT NOT NULL,
    label_revision INTEGER NOT NULL, labelled_images INTEGER NOT NULL, labelled_pixels INTEGER NOT NULL,
    created_at REAL NOT NULL, published_at REAL, error TEXT);"""


def _old_database(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(OLD_MODELS)
    con.execute(
        "INSERT INTO models VALUES (1, ?, 'published', '{}', 3, 1, 10, 1.0, 2.0, NULL)", (str(path.parent / "v1"),)
    )
    con.execute("INSERT INTO models VALUES (2, ?, 'training', '{}', 4, 1, 10, 3.0, NULL, NULL)", ("v2",))
    con.commit()
    con.close()


def test_an_older_database_gains_the_owner_column_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "project.sqlite"
    _old_database(db)
    store = Store(db)
    columns = {r[1] for r in store._con().execute("PRAGMA table_info(models)")}
    assert {c for t, c, _ in ADDED_COLUMNS if t == "models"} <= columns
    rows = store.models()
    assert [(m.version, m.status, m.owner) for m in rows] == [(1, "published", None), (2, "training", None)]
    version = store.begin_model(tmp_path / "models", Snapshot(0, (), 0))
    assert version == 3 and store.models()[-1].owner == RoundOwner.current()
    Store(db).close()  # opening it again changes nothing
    assert [m.version for m in Store(db).models()] == [1, 2, 3]


def test_every_added_column_is_in_the_schema_of_a_new_database(tmp_path: Path) -> None:
    for table, column, _ in ADDED_COLUMNS:  # so a new database and a migrated one are the same
        assert column in SCHEMA.split(f"CREATE TABLE IF NOT EXISTS {table} (")[1].split(");")[0]
    Store(tmp_path / "new.sqlite")  # and nothing to migrate there
