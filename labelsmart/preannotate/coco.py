"""COCO output of a pre-annotated folder: one JSON file, the annotations of :mod:`labelsmart.formats.coco`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from labelsmart import imageio
from labelsmart.formats.coco import JsonArrayWriter, categories, mask_annotations
from labelsmart.preannotate.pipeline import MANIFEST_NAME


def read_manifest(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a manifest, one per image (the last line of an image wins), in first-seen order.

    Only the byte offset of each image's line is held in memory; the records are read again one at a time.
    """
    offsets: dict[str, int] = {}
    with open(path, "rb") as fh:
        pos = 0
        for line in fh:
            try:
                offsets[json.loads(line)["image"]] = pos
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                pass
            pos += len(line)
        for off in offsets.values():
            fh.seek(off)
            yield json.loads(fh.readline())


def write_coco(out: Path, coco_path: Path, class_names: Sequence[str]) -> tuple[int, int]:
    """One COCO JSON file (``images``, ``annotations`` with RLE masks, ``categories``) for every image in the
    manifest of ``out``, streamed to disk (one mask in memory at a time) and written atomically.

    Each class present in an image is one annotation (``iscrowd`` 1, RLE ``segmentation`` from pycocotools,
    ``area`` and ``bbox``); category ids are class id + 1 (COCO reserves 0).

    Returns:
        ``(images, annotations)`` written.
    """
    coco_path = Path(coco_path)
    coco_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = coco_path.with_name(f".{coco_path.name}.{os.getpid()}.tmp")
    manifest = out / MANIFEST_NAME
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"info": ' + json.dumps({"description": "labelsmart pre-annotations", "version": "1.0"}))
            fh.write(', "categories": ' + json.dumps(categories(class_names)) + ', "images": [')
            if not manifest.is_file():
                raise FileNotFoundError(manifest)
            images = JsonArrayWriter(fh)
            images.write(
                {
                    "id": i + 1,
                    "file_name": rec["image"],
                    "height": rec["height"],
                    "width": rec["width"],
                    "model_version": rec.get("model_version"),
                }
                for i, rec in enumerate(read_manifest(manifest))
            )
            fh.write('], "annotations": [')
            anns = JsonArrayWriter(fh)
            for i, rec in enumerate(read_manifest(manifest)):
                mask = imageio.read_mask(out / rec["mask"], shape=(rec["height"], rec["width"]))
                anns.write(mask_annotations(mask, len(class_names), i + 1, anns.count + 1))
            fh.write("]}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, coco_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return images.count, anns.count
