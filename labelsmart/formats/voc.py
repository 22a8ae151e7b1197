"""``voc``: the Pascal VOC segmentation layout, as Datumaro and CVAT read and write it.

Layout: ``SegmentationClass/<image path without suffix>.png`` (palette masks of the class ids, 255 where a pixel
is unlabelled: Pascal VOC's "void", in VOC's void colour 224,224,192), ``ImageSets/Segmentation/default.txt``
(the image names, one a line), ``labelmap.txt`` (``name:r,g,b::`` per class, in id order: a mask's index is its
class's line) and ``dataset_meta.json`` (Datumaro's own label list: the classes in id order with their colours,
then ``ignored`` in 224,224,192, the name and colour Datumaro's Pascal VOC label map gives index 255). The images
themselves are not copied (labelsmart only reads them). VOC holds one mask per image, so only the current
revisions.

Datumaro's ``voc_segmentation`` reader reads the masks by colour alone, each colour through its label list to a
label, and stops at a colour the list does not declare (it has no void of its own); it reads that list from
``dataset_meta.json`` when there is one, instead of ``labelmap.txt``. So it reads each class as a mask of that
class and the unlabelled pixels as one mask labelled ``ignored``, which is no class of the project.
``labelmap.txt`` holds the classes only, as before: no void line, and no ``background:0,0,0::`` first as CVAT and
Datumaro write it, which would move every class one line down from its index. Training code reads the indices
(255 is VOC's ignore index) and not the colours.

Colours: since a colour is all Datumaro reads of a pixel, a class whose colour is the void's or an earlier class's
is written in the first Pascal VOC colour no class uses (CVAT's own scheme), with a warning in the log; the
palettes, ``labelmap.txt`` and ``dataset_meta.json`` carry the colours written, and the project keeps its own. A
class named ``ignored`` leaves the void the first of ``ignored_``, ``ignored__``, ... that no class is named.

Reading takes the indices, not the colours: classes by the names in ``labelmap.txt`` (by id without one), 255
unlabelled; so exports from before ``dataset_meta.json`` (void black) read the same.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from labelsmart import imageio
from labelsmart.formats import ExportOptions, FormatError, ImageIndex, Progress, labelled_images
from labelsmart.formats.cvat import voc_color
from labelsmart.store import ClassRow, Store

log = logging.getLogger(__name__)

MASKS = Path("SegmentationClass")
IMAGE_SET = Path("ImageSets") / "Segmentation" / "default.txt"
LABELMAP = "labelmap.txt"
META = "dataset_meta.json"
VOID_NAME = "ignored"  # Datumaro's VocLabel.ignored, index 255
VOID_COLOR = (224, 224, 192)  # Pascal VOC's void, colour 255 of its colour map

Color = tuple[int, int, int]


def class_colors(classes: Sequence[ClassRow]) -> list[Color]:
    """The colour of each class in the export: its own, unless that is the void's or taken by an earlier class,
    then the first VOC colour no class uses."""
    taken = {tuple(c.color) for c in classes} | {VOID_COLOR}
    fresh = (col for col in map(voc_color, itertools.count(1)) if col not in taken)
    out: list[Color] = []
    for c in classes:
        color: Color = (int(c.color[0]), int(c.color[1]), int(c.color[2]))
        if color == VOID_COLOR or color in out:
            color = next(fresh)
            log.warning(
                "voc export: class %r is written in colour %s, as its own is VOC's void or taken", c.name, color
            )
        out.append(color)
    return out


def mask_png(mask: np.ndarray, colors: Sequence[Color]) -> bytes:
    """The palette PNG of a mask: the class ids as they are, the class colours, VOC's void colour at 255."""
    from PIL import Image

    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)
    palette[255] = VOID_COLOR
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # "L"; the palette makes it "P"
    im.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def meta_json(classes: Sequence[ClassRow], colors: Sequence[Color]) -> str:
    """Datumaro's ``dataset_meta.json``: the labels in id order, the void last, each with its colour."""
    names = {c.name for c in classes}
    void = VOID_NAME
    while void in names:
        void += "_"
    labels = [c.name for c in classes] + [void]
    meta = {
        "labels": labels,
        "label_map": {str(k): name for k, name in enumerate(labels)},
        "segmentation_colors": [list(c) for c in colors] + [list(VOID_COLOR)],
    }
    return json.dumps(meta) + "\n"


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write the current masks, the image set, the label map and Datumaro's meta file into ``out``; returns the
    masks written."""
    revisions = options.revisions
    if revisions != "current":
        raise FormatError("--format voc holds one mask per image; export the history with --format png or coco.")
    if options.predictions is not None:
        raise FormatError(
            "--format voc cannot mark masks as predictions; export them with --format png, coco, labelstudio or cvat."
        )
    classes = store.classes()
    colors = class_colors(classes)
    total = len(store.images())
    names = []
    for n, item in enumerate(labelled_images(store, "current"), 1):
        name = Path(item.image.path).with_suffix("").as_posix()
        imageio.atomic_write_bytes(out / MASKS / f"{name}.png", mask_png(item.mask, colors))
        names.append(name)
        if progress is not None:
            progress(n, total)
    imageio.atomic_write_bytes(out / IMAGE_SET, "".join(f"{n}\n" for n in names).encode())
    lines = ["# label:color_rgb:parts:actions"] + [
        f"{c.name}:{r},{g},{b}::" for c, (r, g, b) in zip(classes, colors, strict=True)
    ]
    imageio.atomic_write_bytes(out / LABELMAP, ("\n".join(lines) + "\n").encode())
    imageio.atomic_write_bytes(out / META, meta_json(classes, colors).encode())
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
