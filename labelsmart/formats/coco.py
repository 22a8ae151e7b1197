"""``coco``: one COCO JSON file, one annotation per (image, class) with an RLE mask from pycocotools.

Layout: ``coco.json`` with ``images`` (``file_name`` = the path relative to the image root, its size),
``categories`` (id = class id + 1, as COCO reserves 0) and ``annotations`` (``segmentation`` RLE, ``area``,
``bbox``, ``iscrowd`` 1: a class's pixels in an image are one region, not one object). Unlabelled pixels are in
no annotation. With ``--revisions all`` every revision is there, each annotation carrying ``revision``,
``author``, ``source``, ``created_at`` and ``current``. With ``--include predictions`` the newest model's
pre-annotations of the images nobody labelled are there too, each annotation marked ``"prediction": true`` with its
``model_version`` and ``score`` (the mean confidence over its region); reading leaves them out. Pre-annotations
(``preannotate --coco``) use the same annotations. Reading takes RLE (compressed or not) and polygons, through
pycocotools' own ``COCO`` index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from labelsmart.formats import ExportOptions, FormatError, ImageIndex, Progress, labelled_images, map_classes
from labelsmart.store import Store

COCO_NAME = "coco.json"


def categories(class_names: Sequence[str]) -> list[dict[str, Any]]:
    """COCO categories of the classes: id = class id + 1."""
    return [{"id": i + 1, "name": n, "supercategory": "labelsmart"} for i, n in enumerate(class_names)]


def mask_annotations(mask: np.ndarray, num_classes: int, image_id: int, first_id: int, **extra: Any) -> list[dict]:
    """One annotation per class present in ``mask`` (class ids, 255 = none): RLE, area, bbox, ``iscrowd`` 1."""
    from pycocotools import mask as mask_utils

    out = []
    for k in np.unique(mask):
        if int(k) >= num_classes:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask == k, dtype=np.uint8))
        out.append(
            {
                "id": first_id + len(out),
                "image_id": image_id,
                "category_id": int(k) + 1,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                "area": int(mask_utils.area(rle)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                "iscrowd": 1,
                **extra,
            }
        )
    return out


class JsonArrayWriter:
    """Writes the items of one JSON array as they come (``[`` and ``]`` by the caller), comma-separated."""

    def __init__(self, fh: TextIO) -> None:
        self.fh, self.count = fh, 0

    def write(self, items: Iterable[dict[str, Any]]) -> None:
        """Append items to the array."""
        for item in items:
            self.fh.write(("" if self.count == 0 else ", ") + json.dumps(item))
            self.count += 1


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write ``coco.json`` into ``out`` (streamed: one mask in memory at a time); returns the revisions written."""
    revisions = options.revisions
    classes = store.classes()
    rows = store.images()
    image_ids = {img.id: k + 1 for k, img in enumerate(rows)}
    n = done = 0
    with open(out / COCO_NAME, "w", encoding="utf-8") as fh:
        fh.write('{"info": ' + json.dumps({"description": "labelsmart labels", "version": "1.0"}))
        fh.write(', "categories": ' + json.dumps(categories([c.name for c in classes])) + ', "images": [')
        JsonArrayWriter(fh).write(
            {"id": image_ids[img.id], "file_name": img.path, "height": img.height, "width": img.width}
            for img in rows
            if img.labelled_pixels > 0
            or (revisions == "all" and store.current_revision(img.id) is not None)
            or options.predictions is not None
        )
        fh.write('], "annotations": [')
        anns = JsonArrayWriter(fh)
        last = None
        for item in labelled_images(store, revisions):
            extra: dict[str, Any] = {}
            if revisions == "all":
                r = item.revision
                extra = {"revision": r.id, "author": r.author, "source": r.source, "created_at": r.created_at}
                extra["current"] = item.current
            anns.write(mask_annotations(item.mask, len(classes), image_ids[item.image.id], anns.count + 1, **extra))
            n += 1
            if progress is not None and item.image.id != last:
                last, done = item.image.id, done + 1
                progress(done, len(rows))
        if options.predictions is not None:
            for pred in options.predictions():
                extra = {"prediction": True, "model_version": pred.model_version}
                first = anns.count + 1
                found = mask_annotations(pred.mask, len(classes), image_ids[pred.image.id], first, **extra)
                for ann in found:
                    region = pred.mask == ann["category_id"] - 1
                    ann["score"] = round(float(pred.confidence[region].mean()), 4)
                anns.write(found)
        fh.write("]}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return n


def read(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, str]]:
    """Semantic masks of a COCO file (or a folder holding ``coco.json``): each image's annotations painted in
    file order onto an unlabelled mask, categories matched to classes by name. With a history (``revision``
    fields), only the annotations marked ``current``."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    path = path / COCO_NAME if path.is_dir() else path
    if not path.is_file():
        raise FormatError(f"{path}: no COCO file here; pass the coco.json an export wrote.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise FormatError(f"{path}: not a readable COCO file ({exc}); export it again.") from exc
    names = {int(c["id"]): str(c["name"]) for c in coco.loadCats(coco.getCatIds())}
    table = map_classes(store, names, path)
    for coco_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(coco_id)[0]
        h, w = int(info["height"]), int(info["width"])
        mask = np.full((h, w), 255, np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[coco_id]))
        anns = [a for a in anns if a.get("current", True) and not a.get("prediction")]
        for ann in sorted(anns, key=lambda a: int(a["id"])):
            if int(ann["category_id"]) not in names:
                raise FormatError(
                    f"{path}: annotation {ann['id']} has category {ann['category_id']}, not in categories."
                )
            try:
                region = coco.annToMask(ann).astype(bool)  # (h, w)
            except Exception as exc:  # noqa: BLE001 - pycocotools raises many types on a bad segmentation
                raise FormatError(f"{path}: annotation {ann['id']} has no readable segmentation ({exc}).") from exc
            mask[region] = table[int(ann["category_id"])]
        if anns:
            yield index.find(str(info["file_name"]), path), mask, f"{path} ({info['file_name']})"
