"""What the trainer and the predictor leave for the UI: the index of cached predictions, the uncertainty scores
of images per model version (active learning) and the images' near-duplicate thumbnails."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from labelsmart import imageio
from labelsmart.store.db import Database


class Scores(Database):
    """Prediction index, uncertainty scores and thumbnails."""

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

    # ------------------------------------------------------------------------- uncertainty scores (active)

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
