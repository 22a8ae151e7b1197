"""Labels in and out, in the formats other tools and training code read: ``png``, ``voc``, ``coco``.

:func:`export_labels` writes a project's human labels (the current revision of every labelled image, or, with
``revisions="all"``, the whole history where the format can hold it) into a new folder, built beside it and
moved into place with one rename, so an interrupted export leaves nothing half-written. :func:`import_labels`
reads the same formats back as label revisions whose ``source`` is the format, classes matched by name, in one
transaction: a file with an unknown class or a mask of the wrong size is one sentence naming it, and nothing of
that import lands. Importing the same labels twice adds nothing.

How each format says "unlabelled" (sparse scribbles stay sparse): ``png`` and ``voc`` masks hold 255 there (VOC's
own "void"); ``coco`` has no annotation covering those pixels, ``labelstudio`` no brush result.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from labelsmart import imageio
from labelsmart.store import ImageRow, Revision, Store, StoreError

# Each format is a module of this package with ``write(store, out, options, progress)`` and
# ``read(store, path, index)``.
FORMATS = ("png", "voc", "coco", "labelstudio", "cvat")
REVISIONS = ("current", "all")
Progress = Callable[[int, int], None]  # (done, total)


class FormatError(ValueError):
    """Labels that cannot be exported or imported as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class LabelledImage:
    """One revision of one image's labels, as an export writes it."""

    image: ImageRow
    revision: Revision
    mask: np.ndarray  # (H, W) uint8 class ids, 255 = unlabelled
    current: bool  # the image's newest revision


@dataclass(frozen=True)
class PredictedImage:
    """The newest model's pre-annotation of an image nobody labelled, as ``--include predictions`` writes it.

    They come in the project's image order (:meth:`Store.images`), as the labels do, so a format can merge both.
    """

    image: ImageRow
    mask: np.ndarray  # (H, W) uint8 class ids of the prediction
    confidence: np.ndarray  # (H, W) float32 softmax probability of the predicted class
    score: float  # mean confidence
    model_version: str  # "labelsmart-vNNNN"


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes besides the current labels.

    Attributes:
        revisions: ``current`` or ``all`` (the history, where the format holds it).
        predictions: with ``--include predictions``, the pre-annotations of the images nobody labelled (one in
            memory at a time); None without.
        as_predictions: Label Studio only: write the labels as predictions (with ``model_version``), not as
            annotations.
        image_url: Label Studio only: the prefix of each task's image URL (the image's relative path follows).
    """

    revisions: str = "current"
    predictions: Callable[[], Iterator[PredictedImage]] | None = None
    as_predictions: bool = False
    image_url: str = ""


def format_module(fmt: str) -> ModuleType:
    """The module that reads and writes ``fmt``.

    Raises:
        FormatError: an unknown format.
    """
    if fmt not in FORMATS:
        raise FormatError(f"--format {fmt}: use one of {', '.join(FORMATS)}.")
    return importlib.import_module(f"labelsmart.formats.{fmt}")


def labelled_images(store: Store, revisions: str = "current") -> Iterator[LabelledImage]:
    """The project's human labels, one mask in memory at a time, in image path order.

    ``current``: the newest revision of every image that has labelled pixels; ``all``: every revision of every
    image that has any, oldest first (undos and imports included, as the history holds them).
    """
    if revisions not in REVISIONS:
        raise FormatError(f"--revisions {revisions}: use current or all.")
    for image in store.images():
        history = store.history(image.id)
        if not history:
            continue
        if revisions == "current":
            if history[-1].labelled_pixels == 0:
                continue
            history = history[-1:]
        for rev in history:
            yield LabelledImage(image, rev, store.load_revision(rev.id), rev.id == history[-1].id)


def class_table(store: Store) -> list[dict[str, object]]:
    """The project's classes as the classes file writes them: ``[{"id", "name", "color"}]``."""
    return [{"id": c.id, "name": c.name, "color": list(c.color)} for c in store.classes()]


def export_labels(
    store: Store,
    fmt: str,
    out: Path,
    revisions: str = "current",
    progress: Progress | None = None,
    options: ExportOptions | None = None,
) -> int:
    """Write the project's labels in ``fmt`` into the new folder ``out``; returns the label revisions written.

    ``options`` (when given) replaces ``revisions``.

    Raises:
        FormatError: an unknown format, ``out`` exists and is not empty, the format cannot hold what was asked,
            or the disk filled up (nothing of the export is left).
    """
    module = format_module(fmt)
    options = options if options is not None else ExportOptions(revisions=revisions)
    if options.revisions not in REVISIONS:
        raise FormatError(f"--revisions {options.revisions}: use current or all.")
    if not store.classes():
        raise FormatError(f"{store.db_path}: the project has no classes yet, so no labels to export.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FormatError(f"{out}: exists and is not an empty folder; pick a new folder for the export.")
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        n = module.write(store, tmp, options, progress)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is meant to be shared
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if imageio.is_disk_full(exc):
            raise FormatError(
                f"{out}: the disk is full, so the export was not written (nothing of it was left behind); "
                "free space and export again."
            ) from exc
        raise
    return n


def import_labels(
    store: Store,
    fmt: str,
    path: Path,
    author: str = "import",
    source: str | None = None,
    only_unlabelled: bool = False,
    skip_unknown_images: bool = False,
) -> int:
    """Read labels in ``fmt`` from ``path`` as label revisions (``source`` = the format), in one transaction.

    Images are matched by their path relative to the image root, else by a unique file stem; classes by name.
    A mask equal to the image's current labels is skipped, so importing twice adds nothing. ``--import-masks``
    is this with ``only_unlabelled`` (images that have labels already are left alone), ``skip_unknown_images``
    (masks of images outside the project are passed over) and ``source`` "import".

    Returns:
        The number of label revisions added.

    Raises:
        FormatError: the file or folder is not of the format, names an unknown class or image, or holds a mask
            of the wrong size; nothing was imported.
    """
    module = format_module(fmt)
    index = ImageIndex(store, skip_unknown=skip_unknown_images)
    if not store.classes():
        raise FormatError(f"{path}: cannot import labels before the project has classes; pass --classes FILE.")
    items = []
    for image_id, mask, origin in module.read(store, Path(path), index):
        if image_id is None:
            continue
        current = store.current_revision(image_id)
        if current is not None and (only_unlabelled or np.array_equal(store.load_revision(current.id), mask)):
            continue
        image = store.image(image_id)
        if mask.shape != (image.height, image.width):
            raise FormatError(
                f"{origin}: the mask is {mask.shape[1]}x{mask.shape[0]} but {image.path} is "
                f"{image.width}x{image.height}; resize the mask to its image, or export it at each image's own size."
            )
        items.append((image_id, mask))
    try:
        return len(store.save_labels(items, author=author, source=source or fmt))
    except StoreError as exc:
        raise FormatError(f"{path}: {exc}") from exc


class ImageIndex:
    """Finds a project image by the name another tool wrote: its relative path, else a unique file stem."""

    def __init__(self, store: Store, skip_unknown: bool = False) -> None:
        self.skip_unknown = skip_unknown
        self.by_path = {img.path: img.id for img in store.images()}
        self.by_stem: dict[str, list[int]] = {}
        for p, i in self.by_path.items():
            self.by_stem.setdefault(Path(p).with_suffix("").as_posix(), []).append(i)
            self.by_stem.setdefault(Path(p).stem, []).append(i)

    def lookup(self, name: str, source: object) -> int | None:
        """The image id of ``name`` (a path, with or without its suffix), or None when no image goes by it.

        Raises:
            FormatError: ``name`` fits several images.
        """
        name = Path(name).as_posix()
        if name in self.by_path:
            return self.by_path[name]
        hits = self.by_stem.get(Path(name).with_suffix("").as_posix()) or self.by_stem.get(Path(name).stem) or []
        if len(set(hits)) == 1:
            return hits[0]
        if hits:
            raise FormatError(f"{source}: {name} matches {len(set(hits))} images of the project; name it by its path.")
        return None

    def find(self, name: str, source: object) -> int | None:
        """The image id of ``name``; None for an unknown name when the index skips those.

        Raises:
            FormatError: an unknown name (when the index does not skip those), or one that fits several images.
        """
        image_id = self.lookup(name, source)
        if image_id is not None or self.skip_unknown:
            return image_id
        raise FormatError(f"{source}: {name} is not an image of this project; add the image or drop its labels.")


def map_classes(store: Store, names: dict[int, str], source: object) -> dict[int, int]:
    """``{id in another file: the project's class id}``, by class name.

    Raises:
        FormatError: a name the project has no class for.
    """
    ours = {c.name: c.id for c in store.classes()}
    for name in names.values():
        if name not in ours:
            raise FormatError(
                f"{source}: class {name!r} is not a class of this project ({', '.join(ours)}); add it under "
                "Classes or rename it in the file."
            )
    return {int(k): ours[name] for k, name in names.items()}


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """``mapping`` of mask values as a (256,) uint8 table for ``table[mask]``; 255 (unlabelled) stays 255."""
    table = np.full(256, 255, np.uint8)
    for k, v in mapping.items():
        if 0 <= k < 255:
            table[k] = v
    return table
