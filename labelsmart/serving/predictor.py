"""The UI's predictor: the newest published version of a project, swapped in atomically when a newer one appears,
with predictions cached per ``(image, version)`` in memory and on disk. Nothing here imports torch.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.config import Config
from labelsmart.serving.onnx_model import OnnxModel, Prediction, frozen_prediction
from labelsmart.store import Store, StoreError, version_name

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- cache files


def encode_prediction(pred: Prediction) -> bytes:
    """A compressed ``.npz`` of a prediction (confidence quantised to 16 bits)."""
    buf = io.BytesIO()
    q = np.round(pred.confidence * 65535.0).astype(np.uint16)
    np.savez_compressed(buf, mask=pred.mask, confidence=q, version=np.int64(pred.version))
    return buf.getvalue()


def decode_prediction(path: Path, mean_confidence: float | None = None) -> Prediction:
    """Inverse of :func:`encode_prediction`, read from a file."""
    with np.load(path, allow_pickle=False) as z:
        mask = np.ascontiguousarray(z["mask"], dtype=np.uint8)
        conf = z["confidence"].astype(np.float32) / np.float32(65535.0)
        version = int(z["version"])
    pred = frozen_prediction(mask, conf, version)
    if mean_confidence is not None:
        pred = Prediction(pred.mask, pred.confidence, version, float(mean_confidence))
    return pred


# ---------------------------------------------------------------------------------------------- predictor


class Predictor:
    """The UI's model: newest published version, atomic hot swap, predictions cached per (image, version).

    Thread-safe: handlers may call :meth:`predict` from several threads while :meth:`refresh` loads a new
    version; a call sees either the old model or the new one, never a half-loaded one.
    """

    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg
        root = cfg.workdir if cfg.workdir is not None else store.db_path.parent
        self.cache_dir = Path(root) / "predictions"
        self._model: OnnxModel | None = None
        self._swap_lock = threading.Lock()  # guards self._model
        self._load_lock = threading.Lock()  # one loader at a time
        self._cache: OrderedDict[tuple[int, int], Prediction] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple[int, int], threading.Lock] = {}
        self._key_guard = threading.Lock()
        self._failed: set[int] = set()  # versions that failed to load; not retried
        self.refresh()

    # --------------------------------------------------------------------------------------- model

    @property
    def model(self) -> OnnxModel | None:
        """The model now serving (None before the first published version)."""
        with self._swap_lock:
            return self._model

    @property
    def version(self) -> int | None:
        """Version now serving."""
        m = self.model
        return m.version if m is not None else None

    @property
    def providers(self) -> list[str]:
        """Execution providers of the serving session (what ONNX Runtime actually gave)."""
        m = self.model
        return list(m.providers) if m is not None else []

    def refresh(self) -> bool:
        """Load the newest published version if it is newer than the one serving.

        A version that fails to load is logged, recorded as an event and skipped (never retried); the
        model serving keeps serving, and on first start older published versions are tried in turn.

        Returns immediately (False) when another thread is loading a version right now, so UI handlers that
        call it on every request never wait for a load.

        Returns:
            True when a new version was swapped in.
        """
        if not self._load_lock.acquire(blocking=False):
            return False
        try:
            current = self.version
            try:
                rows = self.store.models()
            except sqlite3.Error as exc:  # a busy or damaged store must not break the UI's polling
                log.warning("cannot read the model registry (%s); keeping model v%s", exc, current)
                return False
            candidates = [
                m
                for m in reversed(rows)
                if m.status == "published"
                and (current is None or m.version > current)
                and m.version not in self._failed
            ]
            for row in candidates:
                path = row.onnx
                try:
                    model = OnnxModel(
                        path, threads=self.cfg.serve.threads or None, device=self.cfg.serve.device, version=row.version
                    )
                except Exception as exc:  # any failure: keep serving the old model
                    self._failed.add(row.version)
                    msg = f"model v{row.version} cannot be served: {exc}"
                    log.error("%s", msg)
                    try:
                        self.store.add_event("error", "predictor", msg)
                    except Exception:  # the store being busy must not take serving down
                        log.exception("could not record the event")
                    continue
                if model.sidecar.version != row.version:
                    log.warning(
                        "%s: sidecar says version %s, registry says %d; using %d",
                        path,
                        model.sidecar.version,
                        row.version,
                        row.version,
                    )
                try:  # before the swap, so no annotator waits for a first run
                    t0 = time.perf_counter()
                    warmed = model.warm_up((im.height, im.width) for im in self.store.images())
                    log.info("model v%d warmed up at %s in %.2f s", row.version, warmed, time.perf_counter() - t0)
                except Exception:  # noqa: BLE001 - a failed warm-up only costs the first prediction time
                    log.warning("model v%d: warm-up failed", row.version, exc_info=True)
                with self._swap_lock:
                    self._model = model
                log.info("serving model v%d on %s", row.version, ", ".join(model.providers))
                return True
            return False
        finally:
            self._load_lock.release()

    # ---------------------------------------------------------------------------------- prediction

    def cache_path(self, image_id: int, version: int) -> Path:
        """Where the prediction of an image by a version is cached on disk."""
        return self.cache_dir / version_name(version) / f"{image_id}.npz"

    def _remember(self, key: tuple[int, int], pred: Prediction) -> None:
        with self._cache_lock:
            self._cache[key] = pred
            self._cache.move_to_end(key)
            while len(self._cache) > max(0, self.cfg.serve.cache_size):
                self._cache.popitem(last=False)

    def _cached(self, key: tuple[int, int]) -> Prediction | None:
        with self._cache_lock:
            pred = self._cache.get(key)
            if pred is not None:
                self._cache.move_to_end(key)
            return pred

    def _from_disk(self, image_id: int, version: int) -> Prediction | None:
        row = self.store.prediction(image_id, version)
        if row is None:
            return None
        path, mean_conf = row
        try:
            return decode_prediction(Path(path), mean_conf)
        except Exception as exc:  # a missing or damaged cache file is recomputed
            log.warning("cached prediction %s unusable (%s); predicting again", path, exc)
            return None

    def predict(self, image_id: int) -> Prediction | None:
        """The serving model's prediction for an image, from the cache when it has one.

        Returns:
            None when no model is published yet.

        Raises:
            ImageError: the image file cannot be read.
            StoreError: the image id is unknown.
        """
        model = self.model
        if model is None:
            return None
        key = (int(image_id), model.version)
        pred = self._cached(key)
        if pred is not None:
            return pred
        with self._key_guard:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:  # two threads asking for the same image compute it once
                pred = self._cached(key)
                if pred is None:
                    pred = self._from_disk(*key)
                if pred is None:
                    pred = self._compute(model, int(image_id))
                self._remember(key, pred)
        finally:
            with self._key_guard:
                self._key_locks.pop(key, None)
        return pred

    def _compute(self, model: OnnxModel, image_id: int) -> Prediction:
        t0 = time.perf_counter()
        pred = model.predict(self.store.read_image(image_id))
        path = self.cache_path(image_id, model.version)
        imageio.atomic_write_bytes(path, encode_prediction(pred))
        self._record(image_id, model.version, path, pred.mean_confidence)
        log.debug("predicted image %d with v%d in %.0f ms", image_id, model.version, 1e3 * (time.perf_counter() - t0))
        return pred

    def _record(self, image_id: int, version: int, path: Path, mean_confidence: float) -> None:
        """The cache's index row; a store locked by another program (or a full disk) costs only that row: the
        answer is returned, and an unrecorded file is predicted again after a restart."""
        try:
            self.store.record_prediction(image_id, version, path, mean_confidence)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("prediction of image %d by v%d not recorded in the store: %s", image_id, version, exc)

    def predict_many(self, image_ids: Iterable[int], progress: Callable[[int, int], Any] | None = None) -> int:
        """Pre-annotate several images (for example the next ones in the queue) into the cache.

        Images that cannot be read are logged and skipped. Stops early when the serving version changes,
        so background work never fills the cache for a replaced model.

        Args:
            image_ids: images to predict, in order.
            progress: called as ``progress(done, total)`` after each image.

        Returns:
            The number of images that now have a prediction by the version that started the work.
        """
        ids = list(image_ids)
        model = self.model
        if model is None:
            return 0
        done = 0
        for n, image_id in enumerate(ids, 1):
            if self.version != model.version:
                log.info("model changed to v%s; stopping pre-annotation by v%d", self.version, model.version)
                break
            try:
                if self.predict(image_id) is not None:
                    done += 1
            except (imageio.ImageError, ValueError) as exc:
                log.warning("pre-annotation of image %d skipped: %s", image_id, exc)
            if progress is not None:
                progress(n, len(ids))
        return done
