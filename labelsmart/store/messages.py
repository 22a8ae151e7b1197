"""Trainer messages in the store: the status record the UI shows, requests to the trainer ("Train now"),
and events a user should see (errors, restarts, skipped files)."""

from __future__ import annotations

import json
import time
from typing import Any

from labelsmart.store.db import Database


class Messages(Database):
    """Status records, trainer requests and events."""

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
