"""The project store: one SQLite database in WAL mode, in one file per concern.

- :mod:`~labelsmart.store.db`: connections (one per thread and process), transactions, the schema;
- :mod:`~labelsmart.store.images`: images (relative path, size, content hash) and classes;
- :mod:`~labelsmart.store.labels`: append-only label revisions (PNG-encoded uint8 masks, 255 = unlabelled),
  undo, snapshots;
- :mod:`~labelsmart.store.registry`: model versions and the layout of their files;
- :mod:`~labelsmart.store.messages`: the trainer's status, requests to it and events for the user;
- :mod:`~labelsmart.store.scores`: the prediction index, uncertainty scores and thumbnails.

:class:`Store` is all of them over one database: the parts share its connections, so a caller holds one
object and every logical change is still one transaction. A crash of any process loses nothing that was
saved; readers never block the writer. A full disk or a lock held by another program past the busy timeout
fails the write with one sentence (:class:`StoreFullError`, :class:`StoreLockedError`) and writes nothing.
"""

from __future__ import annotations

from labelsmart.store.db import StoreError, StoreFullError, StoreLockedError
from labelsmart.store.images import (
    DEFAULT_COLORS,
    RECEIVED_PREFIX,
    ClassRow,
    ImageRow,
    file_sha1,
    load_classes_file,
    parse_color,
    received_path,
)
from labelsmart.store.labels import ANY_REVISION, Labels, Revision, Snapshot, StaleRevisionError
from labelsmart.store.registry import ModelRow, Registry, staging_dir, version_dir, version_name
from labelsmart.store.scores import Scores

__all__ = [
    "ANY_REVISION",
    "DEFAULT_COLORS",
    "RECEIVED_PREFIX",
    "ClassRow",
    "ImageRow",
    "ModelRow",
    "Revision",
    "Snapshot",
    "StaleRevisionError",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "file_sha1",
    "load_classes_file",
    "received_path",
    "parse_color",
    "staging_dir",
    "version_dir",
    "version_name",
]


class Store(Labels, Registry, Scores):
    """Project store over one SQLite file. Safe to use from several threads and processes."""
