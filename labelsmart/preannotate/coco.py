"""COCO output of a pre-annotated folder: one JSON file with an RLE mask (pycocotools) per image and class."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
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
    from pycocotools import mask as mask_utils

    coco_path = Path(coco_path)
    coco_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = coco_path.with_name(f".{coco_path.name}.{os.getpid()}.tmp")
    n_images = n_anns = 0
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            categories = [{"id": i + 1, "name": n, "supercategory": "labelsmart"} for i, n in enumerate(class_names)]
            fh.write('{"info": ' + json.dumps({"description": "labelsmart pre-annotations", "version": "1.0"}))
            fh.write(', "categories": ' + json.dumps(categories) + ', "images": [')
            manifest = out / MANIFEST_NAME
            if not manifest.is_file():
                raise FileNotFoundError(manifest)
            for i, rec in enumerate(read_manifest(manifest)):
                n_images += 1
                entry = {
                    "id": i + 1,
                    "file_name": rec["image"],
                    "height": rec["height"],
                    "width": rec["width"],
                    "model_version": rec.get("model_version"),
                }
                fh.write(("" if i == 0 else ", ") + json.dumps(entry))
            fh.write('], "annotations": [')
            for i, rec in enumerate(read_manifest(manifest)):
                mask = imageio.read_mask(out / rec["mask"], shape=(rec["height"], rec["width"]))
                for k in np.unique(mask):
                    if int(k) >= len(class_names):
                        continue
                    rle = mask_utils.encode(np.asfortranarray(mask == k, dtype=np.uint8))
                    ann = {
                        "id": n_anns + 1,
                        "image_id": i + 1,
                        "category_id": int(k) + 1,
                        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                        "area": int(mask_utils.area(rle)),
                        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                        "iscrowd": 1,
                    }
                    fh.write(("" if n_anns == 0 else ", ") + json.dumps(ann))
                    n_anns += 1
            fh.write("]}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, coco_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n_images, n_anns
