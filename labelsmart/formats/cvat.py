"""``cvat``: CVAT's "Segmentation mask 1.1" zip and its "CVAT for images 1.1" XML, side by side.

Layout: ``segmentation_mask.zip`` and ``annotations.xml``, both holding the current labels (CVAT keeps one mask set
per image, so ``--revisions all`` is refused: export the history with ``png`` or ``coco``).

``segmentation_mask.zip`` is the layout CVAT exports and imports as "Segmentation mask 1.1" (Datumaro's
``voc_segmentation`` format; CVAT reads it with its own Datumaro's ``voc``): ``labelmap.txt``
(``# label:color_rgb:parts:actions``, ``background:0,0,0::``, then ``name:r,g,b::`` per class in id order),
``ImageSets/Segmentation/default.txt`` (the image paths without suffix) and
``SegmentationClass/<image path without suffix>.png``, RGB masks in the class colours where unlabelled pixels are
the background's 0,0,0. No ``SegmentationObject/``: Datumaro's VOC reader takes the class masks alone (one mask
per colour), and semantic labels have no instances to put there.

Colours: a pixel's colour is all the zip says about it, so a class whose colour is 0,0,0 (the background's) or
repeats an earlier class's is given the first unused colour of the Pascal VOC colour map (CVAT's own scheme), with
a warning in the log; ``labelmap.txt`` and the XML's label list carry the colours actually used, and the project's
colours are unchanged. A class named ``background`` is refused: in the zip that name means "unlabelled", so the
class and the unlabelled pixels could not be told apart (export such a project with ``coco``, which CVAT imports
as well). So is a name holding ``:``, ``labelmap.txt``'s field separator.

``annotations.xml`` has ``<meta><task>`` with the labels (name, colour, type ``mask``) and one ``<image id name
width height>`` per labelled image (``id`` is the image's place in the project's path order, as the frame number of
a CVAT task made from the same folder), holding one ``<mask label source="manual" occluded="0" rle left top width
height z_order="0">`` per class present. CVAT's ``rle`` (read the same way by CVAT's own importer and Datumaro's
``cvat`` reader, which decodes it with pycocotools as a column-major (width, height) mask and transposes it) is the
run lengths of the class's pixels over its bounding box in row-major order, alternating and starting with the
run of pixels outside the class (0 when the box's first pixel is in it); ``width``/``height`` are the box's size.
Unlabelled pixels are in no mask. With ``--include predictions`` the pre-annotated images are in the XML too, their
masks with ``source="auto"`` (without score or model version, which CVAT's XML has no place for); the zip holds
human labels only.

Reading takes the export folder (the XML when both files are there: it is exact, whatever the colours), the zip,
or the XML. From the zip (or a CVAT "Segmentation mask" export, also with its files one folder down): colours map
through ``labelmap.txt`` to label names and by name to the project's classes; ``background``, and 0,0,0 where no
label claims it, is unlabelled; 1-channel masks hold label indices (line order of ``labelmap.txt``), as CVAT
allows; masks without a labelled pixel are passed over. From the XML (or a zip holding ``annotations.xml``, as
CVAT's "CVAT for images" export is): each image's ``<mask>``, ``<polygon>`` and ``<box>`` shapes are painted onto
an unlabelled mask in ``z_order`` (then file order), labels matched by name (``background`` too: in the XML it is
an ordinary label); shapes with ``source="auto"`` are skipped, as pre-annotations are not human labels; other
shapes (points, polylines, tracks, tags) carry no segmentation and are ignored. The XML is read with the standard
library's expat parser (2.4 and later stop entity-expansion bombs).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX
from labelsmart.formats import (
    ExportOptions,
    FormatError,
    ImageIndex,
    LabelledImage,
    PredictedImage,
    Progress,
    labelled_images,
    map_classes,
)
from labelsmart.store import ClassRow, ImageRow, Store

log = logging.getLogger(__name__)

ZIP_NAME = "segmentation_mask.zip"
XML_NAME = "annotations.xml"
MASKS = "SegmentationClass"
IMAGE_SET = "ImageSets/Segmentation/default.txt"
LABELMAP = "labelmap.txt"
BACKGROUND = "background"
BLACK = (0, 0, 0)
SHAPES = ("mask", "polygon", "box")

Color = tuple[int, int, int]


# ------------------------------------------------------------------------------------------ colours and RLE


def voc_color(index: int) -> Color:
    """Colour ``index`` of the Pascal VOC colour map (0 is black), the scheme CVAT and Datumaro generate from."""
    rgb = [0, 0, 0]
    for bit in range(7, -1, -1):
        for c in range(3):
            rgb[c] |= ((index >> c) & 1) << bit
        index >>= 3
    return rgb[0], rgb[1], rgb[2]


def label_colors(classes: Sequence[ClassRow]) -> list[Color]:
    """The colour of each class in the export: its own, unless that is black or taken by an earlier class, then
    the first VOC colour no class uses."""
    taken = {tuple(c.color) for c in classes} | {BLACK}
    fresh = (col for col in map(voc_color, itertools.count(1)) if col not in taken)
    out: list[Color] = []
    for c in classes:
        color: Color = (int(c.color[0]), int(c.color[1]), int(c.color[2]))
        if color == BLACK or color in out:
            color = next(fresh)
            log.warning("cvat export: class %r is written in colour %s, as its own is black or taken", c.name, color)
        out.append(color)
    return out


def rle_encode(region: np.ndarray) -> list[int]:
    """CVAT's run lengths of a (h, w) bool box: row-major, alternating, starting with a run of False."""
    flat = region.ravel()  # (h * w,) row-major
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return [int(v) for v in runs]


def rle_decode(counts: Sequence[int], width: int, height: int, where: str) -> np.ndarray:
    """The (height, width) bool box of CVAT run lengths.

    Raises:
        FormatError: the runs do not cover the box exactly.
    """
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or int(runs.sum()) != width * height:
        raise FormatError(
            f"{where}: a mask's rle covers {int(runs.sum())} pixels but its box is {width}x{height}; "
            "export the file again."
        )
    values = (np.arange(runs.size) % 2).astype(bool)
    return np.repeat(values, runs).reshape(height, width)


def mask_shapes(mask: np.ndarray, num_classes: int) -> Iterator[tuple[int, list[int], int, int, int, int]]:
    """``(class id, rle, left, top, width, height)`` of each class present in ``mask`` (class ids, 255 = none)."""
    for k in np.unique(mask):
        if int(k) >= num_classes:
            continue
        sel = mask == k  # (H, W)
        rows, cols = np.flatnonzero(sel.any(axis=1)), np.flatnonzero(sel.any(axis=0))
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        box = sel[top : bottom + 1, left : right + 1]
        yield int(k), rle_encode(box), left, top, right - left + 1, bottom - top + 1


# ------------------------------------------------------------------------------------------------- export


def check_classes(store: Store, classes: Sequence[ClassRow]) -> None:
    """Refuse class names the zip cannot carry.

    Raises:
        FormatError: a class named ``background`` or holding ``:``.
    """
    for c in classes:
        if c.name == BACKGROUND:
            raise FormatError(
                f"{store.db_path}: class {c.id} is named 'background', which CVAT's segmentation_mask.zip uses for "
                "unlabelled pixels, so the two could not be told apart; export this project with --format coco."
            )
        if ":" in c.name:
            raise FormatError(
                f"{store.db_path}: class {c.name!r} holds ':', the field separator of CVAT's labelmap.txt; export "
                "this project with --format coco."
            )


def labelmap_text(classes: Sequence[ClassRow], colors: Sequence[Color]) -> str:
    """``labelmap.txt``: the header, the background, then one ``name:r,g,b::`` per class in id order."""
    lines = ["# label:color_rgb:parts:actions", f"{BACKGROUND}:0,0,0::"]
    lines += [f"{c.name}:{r},{g},{b}::" for c, (r, g, b) in zip(classes, colors, strict=True)]
    return "\n".join(lines) + "\n"


def meta_xml(classes: Sequence[ClassRow], colors: Sequence[Color], size: int) -> str:
    """The XML's opening: version and ``<meta><task>`` with the labels (``size`` = the project's images)."""
    labels = "".join(
        f"        <label>\n          <name>{escape(c.name)}</name>\n"
        f"          <color>#{r:02x}{g:02x}{b:02x}</color>\n          <type>mask</type>\n"
        "          <attributes>\n          </attributes>\n        </label>\n"
        for c, (r, g, b) in zip(classes, colors, strict=True)
    )
    dumped = time.strftime("%Y-%m-%d %H:%M:%S.000000+00:00", time.gmtime())
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n    <task>\n'
        f"      <id>0</id>\n      <name>labelsmart</name>\n      <size>{size}</size>\n      <mode>annotation</mode>\n"
        f"      <overlap>0</overlap>\n      <start_frame>0</start_frame>\n      <stop_frame>{max(size - 1, 0)}"
        f"</stop_frame>\n      <subset>default</subset>\n      <labels>\n{labels}      </labels>\n    </task>\n"
        f"    <dumped>{dumped}</dumped>\n  </meta>\n"
    )


def image_xml(frame: int, image: ImageRow, masks: Iterable[tuple[str, np.ndarray]], names: Sequence[str]) -> str:
    """One ``<image>`` with a ``<mask>`` per class present in each ``(source, mask)``."""
    out = [f'  <image id="{frame}" name={quoteattr(image.path)} width="{image.width}" height="{image.height}">\n']
    for source, mask in masks:
        for k, rle, left, top, width, height in mask_shapes(mask, len(names)):
            counts = ", ".join(map(str, rle))  # CVAT writes ", "; readers split on "," and strip
            out.append(
                f'    <mask label={quoteattr(names[k])} source="{source}" occluded="0" rle="{counts}" '
                f'left="{left}" top="{top}" width="{width}" height="{height}" z_order="0">\n    </mask>\n'
            )
    out.append("  </image>\n")
    return "".join(out)


def merged(
    labels: Iterable[LabelledImage], predictions: Iterable[PredictedImage], order: dict[int, int]
) -> Iterator[tuple[ImageRow, np.ndarray | None, PredictedImage | None]]:
    """``(image, human mask or None, pre-annotation or None)``, both streams merged in project image order."""
    preds = iter(predictions)
    pending = next(preds, None)
    for item in labels:
        while pending is not None and order[pending.image.id] < order[item.image.id]:
            yield pending.image, None, pending
            pending = next(preds, None)
        if pending is not None and pending.image.id == item.image.id:
            yield item.image, item.mask, pending
            pending = next(preds, None)
        else:
            yield item.image, item.mask, None
    while pending is not None:
        yield pending.image, None, pending
        pending = next(preds, None)


@contextlib.contextmanager
def synced(path: Path, mode: str, **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)``, flushed and fsynced before it closes."""
    with open(path, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def predicted_mask(pred: PredictedImage) -> np.ndarray:
    """The pre-annotation at its image's own size (nearest neighbour when it came at another)."""
    h, w = pred.image.height, pred.image.width
    if pred.mask.shape == (h, w):
        return pred.mask
    return cv2.resize(pred.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write ``segmentation_mask.zip`` and ``annotations.xml`` into ``out`` (one mask in memory at a time);
    returns the label revisions written."""
    if options.revisions != "current":
        raise FormatError("--format cvat holds one mask set per image; export the history with --format png or coco.")
    classes = store.classes()
    check_classes(store, classes)
    colors = label_colors(classes)
    names = [c.name for c in classes]
    paint = np.zeros((256, 3), np.uint8)  # class id -> RGB; 255 (unlabelled) -> the background's black
    paint[: len(colors)] = colors
    rows = store.images()
    order = {img.id: k for k, img in enumerate(rows)}
    preds = options.predictions() if options.predictions is not None else ()
    stems: dict[str, str] = {}
    with (
        synced(out / ZIP_NAME, "wb") as zfh,
        zipfile.ZipFile(zfh, "w", zipfile.ZIP_DEFLATED) as z,
        synced(out / XML_NAME, "w", encoding="utf-8") as xml,
    ):
        xml.write(meta_xml(classes, colors, len(rows)))
        for image, human, pred in merged(labelled_images(store, "current"), preds, order):
            masks = []
            if human is not None:
                stem = Path(image.path).with_suffix("").as_posix()
                if stem in stems:
                    raise FormatError(
                        f"{image.path}: its mask would be {MASKS}/{stem}.png, as is that of {stems[stem]}; rename one "
                        "of the two images, or export with --format coco."
                    )
                stems[stem] = image.path
                png = imageio.encode_png(paint[human])  # (H, W, 3) RGB
                z.writestr(f"{MASKS}/{stem}.png", png, compress_type=zipfile.ZIP_STORED)
                masks.append(("manual", human))
                if progress is not None:
                    progress(len(stems), len(rows))
            if pred is not None:
                masks.append(("auto", predicted_mask(pred)))
            xml.write(image_xml(order[image.id], image, masks, names))
        xml.write("</annotations>\n")
        z.writestr(IMAGE_SET, "".join(f"{s}\n" for s in stems))
        z.writestr(LABELMAP, labelmap_text(classes, colors))
    return len(stems)


# ------------------------------------------------------------------------------------------------- import


def read(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, str]]:
    """Masks of a ``cvat`` export folder (its XML), a Segmentation mask zip, or a CVAT for images XML file."""
    path = Path(path)
    if path.is_dir():
        if (path / XML_NAME).is_file():
            path = path / XML_NAME
        elif (path / ZIP_NAME).is_file():
            path = path / ZIP_NAME
        else:
            raise FormatError(f"{path}: holds neither {XML_NAME} nor {ZIP_NAME}; pass the folder a cvat export wrote.")
    if not path.is_file():
        raise FormatError(f"{path}: not found; pass the {XML_NAME}, {ZIP_NAME} or folder a cvat export wrote.")
    if zipfile.is_zipfile(path):
        return read_zip(store, path, index)
    return read_xml(store, path, str(path), index)


def read_zip(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, str]]:
    """Masks of a Segmentation mask zip, or of the ``annotations.xml`` a zip holds instead."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable zip ({exc}); download the export again.") from exc
    with z:
        members = z.namelist()
        labelmaps = sorted((m for m in members if PurePosixPath(m).name == LABELMAP), key=len)
        if not labelmaps:
            xmls = sorted((m for m in members if PurePosixPath(m).name == XML_NAME), key=len)
            if not xmls:
                raise FormatError(
                    f"{path}: holds neither {LABELMAP} nor {XML_NAME}; pass a CVAT Segmentation mask or CVAT for "
                    "images export."
                )
            with z.open(xmls[0]) as fh:
                yield from read_xml(store, fh, f"{path} ({xmls[0]})", index)
            return
        parent = str(PurePosixPath(labelmaps[0]).parent)
        masks = f"{MASKS}/" if parent == "." else f"{parent}/{MASKS}/"
        colors, indices = read_labelmap(store, z.read(labelmaps[0]).decode("utf-8"), f"{path} ({labelmaps[0]})")
        for member in sorted(m for m in members if m.startswith(masks) and m.lower().endswith(".png")):
            origin = f"{path} ({member})"
            mask = decode_mask(z.read(member), colors, indices, origin)
            if (mask != IGNORE_INDEX).any():
                yield index.find(member[len(masks) : -len(".png")], origin), mask, origin


def read_labelmap(store: Store, text: str, origin: str) -> tuple[dict[Color, int], np.ndarray]:
    """``({colour: class id}, (256,) table of label index -> class id)`` of ``labelmap.txt``; the background,
    and black where no label claims it, is unlabelled (255).

    Raises:
        FormatError: a label the project has no class for, a malformed colour, or two labels sharing a colour.
    """
    rows: list[tuple[str, Color | None]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        field = rest.partition(":")[0].strip()
        values = [v.strip() for v in field.split(",")] if field else []
        if field and (len(values) != 3 or not all(v.isdigit() and int(v) <= 255 for v in values)):
            raise FormatError(f"{origin}: label {name!r} has colour {field!r}; write it as name:r,g,b::.")
        rows.append((name.strip(), (int(values[0]), int(values[1]), int(values[2])) if field else None))
    ids = map_classes(store, {k: n for k, (n, _) in enumerate(rows) if n != BACKGROUND}, origin)
    ids.update({k: IGNORE_INDEX for k, (n, _) in enumerate(rows) if n == BACKGROUND})
    colors: dict[Color, int] = {}
    for k, (name, rgb) in enumerate(rows):
        if rgb is None:
            continue
        if rgb in colors and colors[rgb] != ids[k]:
            raise FormatError(f"{origin}: label {name!r} shares colour {rgb} with another label; give each its own.")
        colors[rgb] = ids[k]
    colors.setdefault(BLACK, IGNORE_INDEX)
    indices = np.full(256, -1, np.int16)  # 1-channel masks: value k is the k-th label; -1 = not listed
    indices[: min(len(rows), 256)] = [ids[k] for k in range(min(len(rows), 256))]
    return colors, indices


def decode_mask(data: bytes, colors: dict[Color, int], indices: np.ndarray, origin: str) -> np.ndarray:
    """A zip's mask PNG as (H, W) class ids: RGB (and palette) by colour, 1-channel by label index.

    Raises:
        FormatError: an unreadable PNG, or a colour or index ``labelmap.txt`` does not list.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            single = im.mode in ("L", "I", "I;16")
            arr = np.asarray(im) if single else np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on a bad file
        raise FormatError(f"{origin}: not a readable PNG mask ({exc}); export it again.") from exc
    if single:
        if arr.max(initial=0) > 255 or (indices[arr] < 0).any():
            bad = sorted(set(np.unique(arr).tolist()) - set(np.flatnonzero(indices >= 0).tolist()))
            raise FormatError(f"{origin}: holds label indices {bad} that {LABELMAP} does not list; fix the labelmap.")
        return indices[arr].astype(np.uint8)
    key = (arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2]  # (H, W)
    uniq, inverse = np.unique(key, return_inverse=True)
    table = np.empty(uniq.size, np.uint8)
    for i, v in enumerate(uniq.tolist()):
        rgb = ((v >> 16) & 255, (v >> 8) & 255, v & 255)
        if rgb not in colors:
            raise FormatError(f"{origin}: colour {rgb} is not in {LABELMAP}; add its label there or repaint it.")
        table[i] = colors[rgb]
    return table[inverse.reshape(key.shape)]


def read_xml(
    store: Store, source: Path | IO[bytes], origin: str, index: ImageIndex
) -> Iterator[tuple[int | None, np.ndarray, str]]:
    """Semantic masks of a CVAT for images XML file, one ``<image>`` at a time (streamed)."""
    ids: dict[str, int] = {}
    image: dict[str, str] | None = None
    shapes: list[tuple[str, dict[str, str]]] = []
    root = None
    try:
        for event, el in ET.iterparse(source, events=("start", "end")):
            if event == "start":
                if root is None and el.tag != "annotations":
                    raise FormatError(f"{origin}: the root element is <{el.tag}>, not CVAT's <annotations>.")
                root = root if root is not None else el
                if el.tag == "image":
                    image, shapes = dict(el.attrib), []
                continue
            if el.tag in SHAPES and image is not None and el.get("source") != "auto":
                shapes.append((el.tag, dict(el.attrib)))
            elif el.tag == "image" and image is not None:
                if shapes:
                    yield paint_image(store, image, shapes, ids, origin, index)
                image = None
            el.clear()
    except ET.ParseError as exc:
        raise FormatError(f"{origin}: not a readable CVAT XML file ({exc}); export it again.") from exc


def paint_image(
    store: Store,
    image: dict[str, str],
    shapes: Sequence[tuple[str, dict[str, str]]],
    ids: dict[str, int],
    origin: str,
    index: ImageIndex,
) -> tuple[int | None, np.ndarray, str]:
    """``(image id, mask, where)`` of one ``<image>``: its shapes painted in ``z_order``, then file order.

    Args:
        ids: ``{label name: class id}`` found so far (filled here).
    """
    name = image.get("name", "")
    where = f"{origin} ({name})"
    try:
        width, height = int(image["width"]), int(image["height"])
        ordered = sorted(shapes, key=lambda s: int(s[1].get("z_order") or 0))
    except (KeyError, ValueError) as exc:
        raise FormatError(
            f"{where}: an <image> needs a whole-number width and height and its shapes a whole-number z_order ({exc}); "
            "export the file again."
        ) from exc
    mask = np.full((height, width), IGNORE_INDEX, np.uint8)
    for tag, attrs in ordered:
        label = attrs.get("label", "")
        if label not in ids:
            ids[label] = map_classes(store, {0: label}, origin)[0]
        mask[shape_region(tag, attrs, height, width, where)] = ids[label]
    return index.find(name, where), mask, where


def shape_region(tag: str, attrs: dict[str, str], height: int, width: int, where: str) -> np.ndarray:
    """The (height, width) bool pixels of one ``<mask>``, ``<polygon>`` or ``<box>``.

    Raises:
        FormatError: missing or malformed coordinates, or a mask box outside its image.
    """
    try:
        if tag == "mask":
            left, top = int(attrs["left"]), int(attrs["top"])
            w, h = int(attrs["width"]), int(attrs["height"])
            counts = [int(v) for v in attrs["rle"].split(",")]
        elif tag == "polygon":
            points = [[float(v) for v in p.split(",")] for p in attrs["points"].split(";")]
        else:
            x0, y0, x1, y1 = (float(attrs[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
            points = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            angle = np.deg2rad(float(attrs.get("rotation") or 0))
            if angle:
                c, s, cx, cy = np.cos(angle), np.sin(angle), (x0 + x1) / 2, (y0 + y1) / 2
                points = [[cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c] for x, y in points]
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{where}: a <{tag}> has no readable coordinates ({exc}); export the file again.") from exc
    region = np.zeros((height, width), bool)
    if tag == "mask":
        if left < 0 or top < 0 or left + w > width or top + h > height:
            raise FormatError(
                f"{where}: a <mask> box {w}x{h} at ({left}, {top}) leaves the {width}x{height} image; "
                "export the file again."
            )
        region[top : top + h, left : left + w] = rle_decode(counts, w, h, where)
        return region
    poly = np.round(np.asarray(points, np.float64).reshape(-1, 2)).astype(np.int32)  # (N, 2) x, y
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [poly], 1)
    return canvas.astype(bool)
