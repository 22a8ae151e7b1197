"""``voc``: the Pascal VOC segmentation layout, as Datumaro and CVAT read and write it.

Layout: ``SegmentationClass/<image path without suffix>.png`` (palette masks, class ids; 255 = unlabelled, VOC's
"void"), ``ImageSets/Segmentation/default.txt`` (the image names, one a line) and ``labelmap.txt`` (``name:r,g,b::``
per class, in id order). The images themselves are not copied (labelsmart only reads them). VOC holds one mask
per image, so only the current revisions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from labelsmart import imageio
from labelsmart.formats import ExportOptions, FormatError, ImageIndex, Progress, labelled_images
from labelsmart.store import Store

MASKS = Path("SegmentationClass")
IMAGE_SET = Path("ImageSets") / "Segmentation" / "default.txt"
LABELMAP = "labelmap.txt"


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write the current masks, the image set and the label map into ``out``; returns the masks written."""
    revisions = options.revisions
    if revisions != "current":
        raise FormatError("--format voc holds one mask per image; export the history with --format png or coco.")
    if options.predictions is not None:
        raise FormatError(
            "--format voc cannot mark masks as predictions; export them with --format png, coco, labelstudio or cvat."
        )
    classes = store.classes()
    colors = [c.color for c in classes]
    total = len(store.images())
    names = []
    for n, item in enumerate(labelled_images(store, "current"), 1):
        name = Path(item.image.path).with_suffix("").as_posix()
        imageio.atomic_write_bytes(out / MASKS / f"{name}.png", imageio.palette_png_bytes(item.mask, colors))
        names.append(name)
        if progress is not None:
            progress(n, total)
    imageio.atomic_write_bytes(out / IMAGE_SET, "".join(f"{n}\n" for n in names).encode())
    lines = ["# label:color_rgb:parts:actions"] + [
        f"{c.name}:{c.color[0]},{c.color[1]},{c.color[2]}::" for c in classes
    ]
    imageio.atomic_write_bytes(out / LABELMAP, ("\n".join(lines) + "\n").encode())
    return len(names)


def read(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, Path]]:
    """Masks of a VOC folder; classes by the names in ``labelmap.txt`` (by id without one)."""
    from labelsmart.formats.png import read_masks

    labelmap = path / LABELMAP
    if not (path / MASKS).is_dir():
        raise FormatError(
            f"{path / MASKS}: missing; pass a folder in the VOC layout (SegmentationClass/, labelmap.txt)."
        )
    names = None
    if labelmap.is_file():
        rows = [line for line in labelmap.read_text().splitlines() if line.strip() and not line.startswith("#")]
        names = {k: line.split(":", 1)[0] for k, line in enumerate(rows)}
    yield from read_masks(store, path / MASKS, names, labelmap, index)
