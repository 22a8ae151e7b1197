"""``png``: one palette index mask per labelled image, at the image's own size, and ``classes.json``.

Layout: ``<image path without suffix>.png`` (class ids; 255 = unlabelled; the palette gives each class its
colour, so the masks also look right in an image viewer) and ``classes.json`` (``[{"id", "name", "color"}]``,
the classes file ``--classes`` reads). With ``--revisions all``: ``revisions/<image path without suffix>/<id>.png``
for every revision and ``revisions.jsonl`` (image, revision, author, source, time, labelled pixels, current). With
``--include predictions``: ``predictions/<image path without suffix>.png`` (the newest model's masks, every pixel a
class) and ``predictions.jsonl`` (image, mask, model version, mean confidence) for the images nobody labelled;
reading skips both folders.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from labelsmart import imageio
from labelsmart.formats import (
    ExportOptions,
    FormatError,
    ImageIndex,
    PredictedImage,
    Progress,
    class_table,
    labelled_images,
    lookup_table,
    map_classes,
)
from labelsmart.store import Store, StoreError, load_classes_file

CLASSES_NAME = "classes.json"
HISTORY_NAME = "revisions.jsonl"
PREDICTIONS_DIR = Path("predictions")
PREDICTIONS_NAME = "predictions.jsonl"


def mask_name(image_path: str) -> Path:
    """Where an image's mask goes, relative to the export folder."""
    return Path(image_path).with_suffix(".png")


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write the masks (and the history) into ``out``; returns the revisions written."""
    revisions = options.revisions
    colors = [c.color for c in store.classes()]
    total = sum(1 for _ in store.images())
    n = done = 0
    history = []
    last = None
    for item in labelled_images(store, revisions):
        rel = mask_name(item.image.path)
        if item.current:
            imageio.atomic_write_bytes(out / rel, imageio.palette_png_bytes(item.mask, colors))
        if revisions == "all":
            imageio.atomic_write_bytes(
                out / "revisions" / rel.with_suffix("") / f"{item.revision.id}.png",
                imageio.palette_png_bytes(item.mask, colors),
            )
            r = item.revision
            history.append(
                {
                    "image": item.image.path,
                    "revision": r.id,
                    "mask": (Path("revisions") / rel.with_suffix("") / f"{r.id}.png").as_posix(),
                    "author": r.author,
                    "source": r.source,
                    "created_at": r.created_at,
                    "labelled_pixels": r.labelled_pixels,
                    "current": item.current,
                }
            )
        n += 1
        if progress is not None and item.image.id != last:
            last, done = item.image.id, done + 1
            progress(done, total)
    if options.predictions is not None:
        write_predictions(out, options.predictions(), colors)
    imageio.atomic_write_bytes(out / CLASSES_NAME, (json.dumps(class_table(store), indent=2) + "\n").encode())
    if revisions == "all":
        imageio.atomic_write_bytes(out / HISTORY_NAME, "".join(json.dumps(h) + "\n" for h in history).encode())
    return n


def write_predictions(out: Path, predictions: Iterable[PredictedImage], colors: list[tuple[int, int, int]]) -> int:
    """``predictions/<image path without suffix>.png`` and ``predictions.jsonl`` (image, mask, model version, mean
    confidence) for the pre-annotations; returns how many."""
    rows = []
    for pred in predictions:
        rel = PREDICTIONS_DIR / mask_name(pred.image.path)
        imageio.atomic_write_bytes(out / rel, imageio.palette_png_bytes(pred.mask, colors))
        rows.append(
            {
                "image": pred.image.path,
                "mask": rel.as_posix(),
                "model_version": pred.model_version,
                "score": round(float(pred.score), 4),
            }
        )
    imageio.atomic_write_bytes(out / PREDICTIONS_NAME, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return len(rows)


def read_masks(
    store: Store, masks: Path, names: dict[int, str] | None, names_source: Path | None, index: ImageIndex
) -> Iterator[tuple[int | None, np.ndarray, Path]]:
    """``(image id, mask in the project's class ids, file)`` for every ``*.png`` under ``masks``.

    Args:
        names: ``{id in the files: class name}`` from the export's class list (matched to the project's classes
            by name); None when the files use the project's ids.
        names_source: the file ``names`` came from, for messages.
    """
    if not masks.is_dir():
        raise FormatError(f"{masks}: not a folder of PNG masks; pass the folder an export wrote.")
    table = lookup_table(map_classes(store, names, names_source)) if names is not None else None
    k = len(store.classes())
    for path in sorted(masks.rglob("*.png")):
        rel = path.relative_to(masks)
        if rel.parts[0] in ("revisions", PREDICTIONS_DIR.name):  # the history, the pre-annotations: not labels
            continue
        try:
            mask = imageio.read_mask(path, num_classes=None if names is not None else k)
        except imageio.ImageError as exc:
            raise FormatError(str(exc)) from exc
        if table is not None:
            unknown = sorted(set(np.unique(mask).tolist()) - {255} - set(names))
            if unknown:
                raise FormatError(f"{path}: holds class ids {unknown} that {names_source} does not list.")
            mask = table[mask]
        yield index.find(rel.with_suffix("").as_posix(), path), mask, path


def read(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, Path]]:
    """Masks of a ``png`` export (or any folder of ``<stem>.png`` index masks, in the project's class ids when
    no ``classes.json`` lies beside them)."""
    names = None
    if (path / CLASSES_NAME).is_file():
        try:
            names = {k: n for k, (n, _) in enumerate(load_classes_file(path / CLASSES_NAME))}
        except StoreError as exc:
            raise FormatError(str(exc)) from exc
    return read_masks(store, path, names, path / CLASSES_NAME, index)
