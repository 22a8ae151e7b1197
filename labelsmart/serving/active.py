"""Active learning: which image to label next.

After each published version the trainer scores the unlabelled images by how unsure the model is of them
(:func:`score_version`), and stores the scores with that version. "Next" then offers the most uncertain
image that does not look like one already labelled or already picked (:func:`suggest`): consecutive video
frames are common, and labelling two near-identical frames teaches the model little more than one.

- **Uncertainty** per pixel is the normalised entropy of the class probabilities, ``H(p) / log K`` in
  [0, 1] (or ``1 - (p1 - p2)``, the margin between the two most likely classes, with ``method="margin"``),
  computed on the network output at working scale; an image's score is the mean over its pixels.
- **Near-duplicates** are judged on a 32x24 colour thumbnail, mean-removed per channel and L2-normalised:
  two images whose thumbnails have a cosine similarity of at least ``duplicate_similarity`` count as the
  same view (on CamVid, frames one second apart have a median similarity of 0.90, random pairs 0.64).

NumPy, OpenCV and ONNX Runtime only; nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from labelsmart import imageio
from labelsmart.config import ActiveConfig
from labelsmart.store import ModelRow, Store

if TYPE_CHECKING:
    from labelsmart.serving.onnx_model import OnnxModel

log = logging.getLogger(__name__)

THUMB_SIZE = (32, 24)  # (W, H) of the near-duplicate thumbnail
MAP_MAX_SIDE = 160  # stored uncertainty maps are at most this big (the UI upsamples them)


# ------------------------------------------------------------------------------------------- uncertainty


def uncertainty_map(logits: np.ndarray, method: str = "entropy") -> np.ndarray:
    """Per-pixel uncertainty in [0, 1] from class logits.

    Args:
        logits: ``(K, H, W)`` raw class scores.
        method: ``entropy`` (normalised Shannon entropy) or ``margin`` (``1 - (p1 - p2)``).

    Returns:
        ``(H, W)`` float32; 0 = certain, 1 = as unsure as it gets.
    """
    k = logits.shape[0]
    if k < 2:
        return np.zeros(logits.shape[1:], np.float32)
    probs = imageio.softmax(np.asarray(logits, dtype=np.float32).copy(), axis=0)  # (K, H, W)
    if method == "entropy":
        ent = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=0)  # (H, W)
        return np.clip(ent / math.log(k), 0.0, 1.0).astype(np.float32)
    if method == "margin":
        top2 = np.partition(probs, k - 2, axis=0)[k - 2 :]  # (2, H, W): second largest, largest
        return np.clip(1.0 - (top2[1] - top2[0]), 0.0, 1.0).astype(np.float32)
    raise ValueError(f"uncertainty method {method!r} is unknown; use entropy or margin.")


def pool(umap: np.ndarray) -> float:
    """An image's score: the mean pixel uncertainty."""
    return float(umap.mean()) if umap.size else 0.0


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Near-duplicate descriptor of an RGB image: ``(24 * 32 * 3,)`` float32, mean-removed, unit length."""
    t = cv2.resize(image, THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)  # (24, 32, 3)
    t -= t.mean(axis=(0, 1))
    v = t.ravel()
    n = float(np.linalg.norm(v))
    return (v / n if n > 1e-6 else v).astype(np.float32)


def small_map(umap: np.ndarray, max_side: int = MAP_MAX_SIDE) -> np.ndarray:
    """An uncertainty map as uint8 (0..255) no bigger than ``max_side``, for storing with the score."""
    h, w = umap.shape
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        umap = cv2.resize(umap, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(umap * 255.0), 0, 255).astype(np.uint8)


def heatmap(image: np.ndarray, umap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """An uncertainty map (uint8 0..255 or float 0..1, any size) drawn over an RGB image (magma-like colours)."""
    h, w = image.shape[:2]
    u = umap.astype(np.float32) / (255.0 if umap.dtype == np.uint8 else 1.0)
    if u.shape != (h, w):
        u = cv2.resize(u, (w, h), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.clip(u * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colored
    return np.clip(out, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- scoring


def image_thumbnail(store: Store, image_id: int, image: np.ndarray | None = None) -> np.ndarray:
    """The stored thumbnail of an image, computed (and stored) on first use."""
    t = store.thumbnail(image_id)
    if t is None:
        t = thumbnail(image if image is not None else store.read_image(image_id))
        store.save_thumbnail(image_id, t)
    return t


def score_version(
    store: Store,
    model: OnnxModel,
    version: int,
    acfg: ActiveConfig,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Score the unlabelled images with one model version and store the scores with it.

    At most ``acfg.max_images`` images are scored (a seeded random sample of the unlabelled ones when
    there are more) and for at most ``acfg.max_seconds``; work stops early when ``should_stop()`` is true.
    Scores land in batches, so a stopped run leaves the images scored so far usable.

    Args:
        store: the project store.
        model: the version's model (only ``logits(batch)`` and ``pp`` are used).
        version: the registry version of ``model``.
        acfg: active-learning settings.
        should_stop: polled between images.
        progress: called as ``progress(done, total)``.

    Returns:
        The number of images scored.
    """
    ids = [r.id for r in store.images() if r.labelled_pixels == 0]
    if len(ids) > acfg.max_images > 0:
        rng = np.random.default_rng(version)
        ids = sorted(rng.choice(ids, size=acfg.max_images, replace=False).tolist())
    t0 = time.monotonic()
    rows: list[tuple[int, float, bytes]] = []
    done = 0
    for n, image_id in enumerate(ids, 1):
        if (should_stop is not None and should_stop()) or (
            acfg.max_seconds > 0 and time.monotonic() - t0 > acfg.max_seconds
        ):
            log.info("scoring with v%d stopped after %d of %d images", version, done, len(ids))
            break
        try:
            image = store.read_image(image_id)
        except imageio.ImageError as exc:
            log.warning("scoring skipped image %d: %s", image_id, exc)
            continue
        x, meta = imageio.prepare(image, model.pp)  # (3, Hp, Wp)
        logits = model.logits(x[None])[0]  # (K, Hp, Wp)
        h, w = meta.work_hw
        umap = uncertainty_map(logits[:, :h, :w], acfg.method)  # (h, w)
        rows.append((image_id, pool(umap), imageio.encode_png(small_map(umap))))
        image_thumbnail(store, image_id, image)
        done += 1
        if len(rows) >= 16:
            store.save_scores(version, acfg.method, rows)
            rows = []
        if progress is not None:
            progress(n, len(ids))
    store.save_scores(version, acfg.method, rows)
    log.info("scored %d images with v%d (%s) in %.1f s", done, version, acfg.method, time.monotonic() - t0)
    return done


def score_published(store: Store, row: ModelRow, acfg: ActiveConfig, threads: int = 1, **kw: Any) -> int:
    """Load a published version's ONNX model on the CPU and score with it (what the trainer runs)."""
    from labelsmart.serving.onnx_model import OnnxModel

    model = OnnxModel(row.onnx, threads=threads, device="cpu", version=row.version)
    return score_version(store, model, row.version, acfg, **kw)


# ------------------------------------------------------------------------------------------- suggesting


@dataclass(frozen=True)
class Suggestion:
    """The image "Next" offers, and why."""

    image_id: int
    score: float | None  # pooled uncertainty (None when no version scored it)
    version: int | None  # model version whose scores ranked it
    rank: int | None  # 1 = most uncertain of the scored unlabelled images
    scored: int  # unlabelled images with a score
    skipped: tuple[tuple[int, int, float], ...]  # (more uncertain image, the image it duplicates, similarity)
    nearest: tuple[int, float] | None  # most similar labelled image and its similarity
    reason: str  # one or two sentences for the page


def _similarities(t: np.ndarray, others: np.ndarray) -> np.ndarray:
    return others @ t if len(others) else np.zeros(0, np.float32)


def suggest(
    store: Store,
    acfg: ActiveConfig,
    picked: Sequence[int] = (),
    after: int | None = None,
    names: Callable[[int], str] | None = None,
) -> Suggestion | None:
    """The most uncertain unlabelled image that is no near-duplicate of a labelled or already picked one.

    Ranks by the newest version's scores. Images in ``picked`` (offered already, for example earlier in
    this session) are not offered again and count as labelled for the duplicate check. When nothing is
    scored yet (no model), the next unlabelled image in list order after ``after`` is offered instead.
    If every scored candidate is a near-duplicate, the most uncertain one is offered all the same.

    Returns:
        None when every image is labelled (or picked).
    """
    name = names or (lambda i: store.image(i).path)
    rows = store.images()
    labelled = [r.id for r in rows if r.labelled_pixels > 0]
    picked_set = set(int(i) for i in picked)
    candidates = [r.id for r in rows if r.labelled_pixels == 0 and r.id not in picked_set]
    if not candidates:
        return None
    version = store.latest_scored_version()
    scores = store.scores(version) if version is not None else {}
    ranked = sorted((i for i in candidates if i in scores), key=lambda i: (-scores[i], i))
    if not ranked:
        order = [r.id for r in rows]
        start = order.index(after) + 1 if after in order else 0
        nxt = next((i for i in order[start:] + order[:start] if i in set(candidates)), candidates[0])
        why = (
            "No model has scored the images yet, so Next goes through the list in order; once a model is "
            "published it offers the image the model is least sure of."
        )
        return Suggestion(nxt, None, None, None, 0, (), None, why)

    guard_ids = labelled + [i for i in picked if i not in set(labelled)]
    guard = np.stack([image_thumbnail(store, i) for i in guard_ids]) if guard_ids else np.zeros((0, 1), np.float32)
    skipped: list[tuple[int, int, float]] = []
    choice: int | None = None
    nearest: tuple[int, float] | None = None
    for i in ranked:
        sims = _similarities(image_thumbnail(store, i), guard)
        j = int(np.argmax(sims)) if len(sims) else -1
        if j >= 0 and sims[j] >= acfg.duplicate_similarity:
            skipped.append((i, guard_ids[j], float(sims[j])))
            continue
        choice = i
        nearest = (guard_ids[j], float(sims[j])) if j >= 0 else None
        break
    fallback = choice is None
    if fallback:
        choice = ranked[0]
    rank = ranked.index(choice) + 1
    parts = [
        f"Suggested because model v{version} is least sure of it: mean uncertainty ({store.score_method(version)}) "
        f"{scores[choice]:.2f}, rank {rank} of {len(ranked)} unlabelled images scored."
    ]
    if skipped and not fallback:
        shown = ", ".join(f"{name(a)} (looks like {name(b)}, similarity {s:.2f})" for a, b, s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        parts.append(f"Skipped more uncertain near-duplicates of labelled images: {shown}{more}.")
    elif fallback:
        parts.append(
            "Every more uncertain image looks like one already labelled, so the most uncertain one is offered."
        )
    if nearest is not None and not fallback:
        parts.append(f"Most similar labelled image: {name(nearest[0])} (similarity {nearest[1]:.2f}).")
    return Suggestion(choice, scores[choice], version, rank, len(ranked), tuple(skipped), nearest, " ".join(parts))
