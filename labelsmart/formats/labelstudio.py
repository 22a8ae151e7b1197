"""``labelstudio``: Label Studio tasks whose ``brushlabels`` results hold Label Studio's brush RLE.

Layout: ``tasks.json`` (a list of tasks, Label Studio's own JSON import and export format) and
``labeling_config.xml`` (an ``Image`` named ``image`` and a ``BrushLabels`` named ``tag`` with one ``Label``
per class, in the class colours; paste it into the project's labelling interface). Each task is
``{"data": {"image": IMAGE_URL + the image's relative path}, "annotations": [{"result": [...]}]}`` with one
result per class present; with ``--as-predictions`` the same results go under ``"predictions"`` with a
``model_version``, so Label Studio shows them as pre-annotations to accept. ``--include predictions`` adds a
task with ``"predictions"`` (the newest model's, ``model_version`` ``labelsmart-vNNNN``, ``score`` the mean
confidence) for every image nobody labelled. ``--revisions all`` writes every revision as an annotation of its
task, oldest first, and the authors, sources and times under the task's ``meta.labelsmart`` (Label Studio
keeps a task's ``meta``; its annotations have no field for them).

Unlabelled pixels are in no result (alpha 0 in every brush layer). The RLE is Label Studio's (the
``rle-pack`` bit stream its brush tool writes and ``label_studio_sdk.converter.brush.decode_rle`` reads): a
32-bit value count, a 5-bit word size, four 4-bit run-length sizes, then runs over the RGBA values of the
image; a labelled pixel is 255 in all four channels.

Reading takes Label Studio's JSON export (or a task list this module wrote): per task the newest annotation
that was not cancelled, its brush results painted in order, label names matched to classes by name. The
image is found from the task's image URL: a local-files ``?d=`` path, an upload (whose random prefix Label
Studio adds, ``8f3a2b1c-name.png``, is dropped) or any URL whose path ends with the image's relative path.
Results of other types (rectangles, polygons) are not read.
"""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np

from labelsmart import imageio
from labelsmart.formats import (
    ExportOptions,
    FormatError,
    ImageIndex,
    PredictedImage,
    Progress,
    labelled_images,
)
from labelsmart.store import ImageRow, Store

TASKS_NAME = "tasks.json"
CONFIG_NAME = "labeling_config.xml"
LABELS_VERSION = "labelsmart-labels"  # model_version of human labels exported --as-predictions
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")

# ------------------------------------------------------------------------------------------ brush RLE

_RLE_SIZES = (3, 4, 8, 16)  # bits of a run length, chosen by a 2-bit index
_HEADER = f"{7:05b}" + "".join(f"{s - 1:04b}" for s in _RLE_SIZES)  # word size 8, then the four sizes


def _run_bits(length: int, word: str) -> Iterator[str]:
    """A run of ``length`` equal values as rle-pack blocks (1 = repeat, size index, length - 1, the value)."""
    while length > 0:
        chunk = min(length, 1 << 16)
        for index, size in enumerate(_RLE_SIZES):
            if chunk <= 1 << size:
                yield f"1{index:02b}{chunk - 1:0{size}b}{word}"
                break
        length -= chunk


def encode_rle(region: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a boolean (H, W) region: every channel of RGBA 255 inside, 0 outside."""
    flat = np.ascontiguousarray(region, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("an empty mask has no brush RLE")
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [flat.size]])) * 4
    parts = [f"{flat.size * 4:032b}", _HEADER]
    for length, inside in zip(lengths.tolist(), flat[starts].tolist(), strict=True):
        parts.extend(_run_bits(length, "11111111" if inside else "00000000"))
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def decode_rle(rle: Sequence[int], height: int, width: int, source: object = "brush RLE") -> np.ndarray:
    """The (H, W) boolean region of Label Studio's brush RLE (alpha over 127), checked against the image size.

    Raises:
        FormatError: not an RLE of a ``width`` x ``height`` image.
    """
    try:
        data = bytes(int(v) for v in rle)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{source}: the brush RLE is not a list of bytes ({exc}); export it again.") from exc
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise FormatError(f"{source}: the brush RLE ends early; export it again.")
        pos += n
        return int(bits[pos - n : pos], 2)

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if num != height * width * 4:
        raise FormatError(
            f"{source}: the brush RLE holds {num} values, not those of a {width}x{height} RGBA image; "
            "check original_width and original_height."
        )
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = min(num, i + 1 + read(sizes[read(2)]))
        if repeat:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out[3::4].reshape(height, width) > 127


# ------------------------------------------------------------------------------------ labelling config


@dataclass(frozen=True)
class LabelConfig:
    """What labelsmart needs of a Label Studio labelling config: the ``BrushLabels`` control and its image.

    Attributes:
        from_name: the ``BrushLabels`` tag's ``name``.
        to_name: the ``Image`` tag it labels.
        data_key: the task data field holding the image URL (``$image`` -> ``image``).
        labels: the ``Label`` values, in config order.
        colors: ``{label: "#rrggbb"}`` where the config gives a ``background``.
    """

    from_name: str = "tag"
    to_name: str = "image"
    data_key: str = "image"
    labels: tuple[str, ...] = ()
    colors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, xml: str, source: object = "the labelling config") -> LabelConfig:
        """Read a labelling config.

        Raises:
            FormatError: not XML, or no ``BrushLabels`` tag with an ``Image`` to label.
        """
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise FormatError(f"{source}: not a labelling config ({exc}); paste Label Studio's XML.") from exc
        brushes = [el for el in root.iter() if el.tag.lower() == "brushlabels"]
        if not brushes:
            raise FormatError(
                f"{source}: has no <BrushLabels> tag; labelsmart labels images with brushes (segmentation), so "
                "use a BrushLabels config (labeling_config.xml of an export has one)."
            )
        brush = brushes[0]
        to_name = brush.get("toName", "")
        images = [el for el in root.iter() if el.tag.lower() == "image" and el.get("name") == to_name]
        if not images or not images[0].get("value", "").startswith("$"):
            raise FormatError(f'{source}: <BrushLabels toName={to_name!r}> names no <Image value="$...">.')
        labels = [el for el in brush.iter() if el.tag.lower() == "label" and el.get("value")]
        return cls(
            from_name=brush.get("name", "tag"),
            to_name=to_name,
            data_key=images[0].get("value", "$image")[1:],
            labels=tuple(el.get("value", "") for el in labels),
            colors={el.get("value", ""): el.get("background", "") for el in labels if el.get("background")},
        )


def _hex(color: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in color[:3])


def labeling_config(classes: Iterable[tuple[str, tuple[int, int, int]]]) -> str:
    """A Label Studio labelling config for these ``(name, colour)`` classes (``image`` and ``tag``)."""
    rows = "\n".join(
        f"    <Label value={quoteattr(name)} background={quoteattr(_hex(color))}/>" for name, color in classes
    )
    return (
        '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="tag" toName="image">\n{rows}\n  </BrushLabels>\n</View>\n'
    )


def model_version_name(version: int | None) -> str:
    """The ``model_version`` Label Studio sees for a labelsmart model version (``labelsmart-none`` before one)."""
    return "labelsmart-none" if version is None else f"labelsmart-v{version:04d}"


# ------------------------------------------------------------------------------------ results <-> masks


def brush_results(
    mask: np.ndarray,
    names: Sequence[str],
    config: LabelConfig | None = None,
    confidence: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One ``brushlabels`` result per class present in ``mask`` (class ids, 255 = unlabelled).

    With ``confidence`` (a prediction's per-pixel probability), each result carries the mean over its region as
    ``score``.
    """
    config = config or LabelConfig()
    h, w = mask.shape
    out = []
    for k in np.unique(mask).tolist():
        if k >= len(names):
            continue
        region = mask == k
        result: dict[str, Any] = {
            "id": f"ls{k}",
            "type": "brushlabels",
            "from_name": config.from_name,
            "to_name": config.to_name,
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_rle(region), "brushlabels": [names[k]]},
        }
        if confidence is not None:
            result["score"] = round(float(confidence[region].mean()), 4)
        out.append(result)
    return out


def mask_from_results(
    results: Iterable[dict[str, Any]], classes: dict[str, int], height: int, width: int, source: object
) -> np.ndarray:
    """The (H, W) class-id mask of an annotation's brush results, painted in order (255 = unlabelled).

    Raises:
        FormatError: a label that is not a class, or an RLE that is not of a ``width`` x ``height`` image.
    """
    mask = np.full((height, width), 255, np.uint8)
    for result in results:
        try:
            _paint(mask, result, classes, source)
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(
                f"{source}: a result is not a Label Studio brush result ({exc}); export it again."
            ) from exc
    return mask


def _paint(mask: np.ndarray, result: dict[str, Any], classes: dict[str, int], source: object) -> None:
    """Paint one ``brushlabels`` result onto ``mask`` (other result types are passed over)."""
    height, width = mask.shape
    value = result.get("value") or {}
    if str(result.get("type", "")).lower() != "brushlabels" or "rle" not in value:
        return
    names = value.get("brushlabels") or value.get("labels") or []
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise FormatError(f"{source}: a brush result has labels {names}; give each brush stroke one label.")
    if names[0] not in classes:
        raise FormatError(
            f"{source}: label {names[0]!r} is not a class of this project ({', '.join(classes)}); add it under "
            "Classes or rename it in Label Studio."
        )
    rw, rh = result.get("original_width", width), result.get("original_height", height)
    if (int(rw), int(rh)) != (width, height):
        raise FormatError(
            f"{source}: the brush result is {rw}x{rh} but the image is {width}x{height}; export it again."
        )
    mask[decode_rle(value["rle"], height, width, source)] = classes[names[0]]


def image_name_candidates(url: str) -> list[str]:
    """Names an image URL of a task may go by in the project, most specific first."""
    parsed = urlparse(str(url))
    query = parse_qs(parsed.query)
    path = unquote(query["d"][0]) if "d" in query else unquote(parsed.path)
    parts = PurePosixPath(path.replace("\\", "/")).parts
    parts = tuple(p for p in parts if p not in ("/", ""))
    names = ["/".join(parts[k:]) for k in range(len(parts))]
    if parts and _UPLOAD_PREFIX.match(parts[-1]):
        names.append(_UPLOAD_PREFIX.sub("", parts[-1]))
    return names


def find_image(index: ImageIndex, url: str, source: object) -> int | None:
    """The project image a task's image URL points to (None when none matches and the index skips those)."""
    for name in image_name_candidates(url):
        image_id = index.lookup(name, source)
        if image_id is not None:
            return image_id
    if index.skip_unknown:
        return None
    raise FormatError(f"{source}: {url} is not an image of this project; add the image or drop its task.")


# ----------------------------------------------------------------------------------------------- write


def _revision_meta(item: Any) -> dict[str, Any]:
    r = item.revision
    return {
        "revision": r.id,
        "author": r.author,
        "source": r.source,
        "created_at": r.created_at,
        "labelled_pixels": r.labelled_pixels,
        "current": item.current,
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _label_tasks(
    store: Store, options: ExportOptions, names: list[str]
) -> Iterator[tuple[ImageRow, int, dict[str, Any]]]:
    """``(image, revisions written, task)`` per labelled image, one image's revisions at a time."""
    pending: list[Any] = []

    def task(items: list[Any]) -> tuple[ImageRow, int, dict[str, Any]]:
        image = items[-1].image
        entries = [
            {"result": brush_results(it.mask, names), "created_at": _iso(it.revision.created_at)} for it in items
        ]
        t: dict[str, Any] = {"data": {"image": options.image_url + image.path}}
        if options.as_predictions:
            t["predictions"] = [{"model_version": LABELS_VERSION, "result": e["result"]} for e in entries[-1:]]
        else:
            t["annotations"] = entries
        if options.revisions == "all":
            t["meta"] = {"labelsmart": {"revisions": [_revision_meta(it) for it in items]}}
        return image, len(items), t

    for item in labelled_images(store, options.revisions):
        if pending and pending[-1].image.id != item.image.id:
            yield task(pending)
            pending = []
        pending.append(item)
    if pending:
        yield task(pending)


def _prediction(pred: PredictedImage, names: list[str]) -> dict[str, Any]:
    return {
        "model_version": pred.model_version,
        "score": round(float(pred.score), 4),
        "result": brush_results(pred.mask, names, confidence=pred.confidence),
    }


def _with_predictions(
    tasks: Iterable[tuple[ImageRow, int, dict[str, Any]]],
    predictions: Iterable[PredictedImage],
    names: list[str],
    image_url: str,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Label tasks and pre-annotations merged by image (both come in the project's image order): an image with a
    history and a pre-annotation (labelled, then undone) is one task holding both."""
    preds = iter(predictions)
    pending = next(preds, None)
    for image, written, task in tasks:
        while pending is not None and pending.image.path < image.path:
            yield 0, {"data": {"image": image_url + pending.image.path}, "predictions": [_prediction(pending, names)]}
            pending = next(preds, None)
        if pending is not None and pending.image.id == image.id:
            task.setdefault("predictions", []).append(_prediction(pending, names))
            pending = next(preds, None)
        yield written, task
    while pending is not None:
        yield 0, {"data": {"image": image_url + pending.image.path}, "predictions": [_prediction(pending, names)]}
        pending = next(preds, None)


def write(store: Store, out: Path, options: ExportOptions, progress: Progress | None = None) -> int:
    """Write ``tasks.json`` (streamed, one image at a time) and ``labeling_config.xml``; returns the revisions
    written."""
    if options.as_predictions and options.revisions == "all":
        raise FormatError("--as-predictions writes the current labels only; drop --revisions all.")
    classes = store.classes()
    names = [c.name for c in classes]
    total = len(store.images())
    n = done = 0
    with open(out / TASKS_NAME, "w", encoding="utf-8") as fh:
        fh.write("[")
        first = True
        predictions = options.predictions() if options.predictions is not None else ()
        for written, t in _with_predictions(_label_tasks(store, options, names), predictions, names, options.image_url):
            fh.write(("\n" if first else ",\n") + json.dumps(t))
            first = False
            n += written
            done += 1
            if progress is not None:
                progress(done, total)
        fh.write("\n]\n")
    imageio.atomic_write_bytes(out / CONFIG_NAME, labeling_config((c.name, c.color) for c in classes).encode())
    return n


# ------------------------------------------------------------------------------------------------ read


def _tasks_file(path: Path) -> tuple[Path, LabelConfig]:
    """The task list of ``path`` (a file, or a folder holding ``tasks.json``) and the config beside it."""
    tasks = path / TASKS_NAME if path.is_dir() else path
    if not tasks.is_file():
        raise FormatError(f"{path}: no Label Studio tasks here; pass the JSON file Label Studio exported.")
    config_file = tasks.parent / CONFIG_NAME
    config = LabelConfig.parse(config_file.read_text(), config_file) if config_file.is_file() else LabelConfig()
    return tasks, config


def newest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's newest annotation that was not cancelled (by update time, then by order)."""
    kept = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None

    def when(k: int) -> tuple[str, int]:
        return str(kept[k].get("updated_at") or kept[k].get("created_at") or ""), k

    return kept[max(range(len(kept)), key=when)]


def task_image_url(task: dict[str, Any], config: LabelConfig) -> str | None:
    """The image URL of a task: its config's data field, else its only text field."""
    data = task.get("data") or {}
    if config.data_key in data:
        return str(data[config.data_key])
    texts = [v for v in data.values() if isinstance(v, str)]
    return texts[0] if len(texts) == 1 else None


def read(store: Store, path: Path, index: ImageIndex) -> Iterator[tuple[int | None, np.ndarray, str]]:
    """Masks of Label Studio's JSON export: each task's newest annotation, classes by label name."""
    tasks_path, config = _tasks_file(path)
    try:
        tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"{tasks_path}: not a readable JSON file ({exc}); export it from Label Studio again."
        ) from exc
    tasks = [tasks] if isinstance(tasks, dict) and "data" in tasks else tasks
    if not isinstance(tasks, list):
        raise FormatError(f"{tasks_path}: not a list of Label Studio tasks; use Label Studio's JSON export.")
    classes = {c.name: c.id for c in store.classes()}
    for k, task in enumerate(tasks):
        source = f"{tasks_path} (task {task.get('id', k + 1) if isinstance(task, dict) else k + 1})"
        if not isinstance(task, dict):
            raise FormatError(f"{source}: not a task object; use Label Studio's JSON export.")
        annotation = newest_annotation(task)
        if annotation is None:
            continue
        url = task_image_url(task, config)
        if url is None:
            raise FormatError(f"{source}: no image URL in the task's data field {config.data_key!r}.")
        image_id = find_image(index, url, source)
        if image_id is None:
            continue
        image = store.image(image_id)
        results = annotation.get("result") or []
        if not any(str(r.get("type", "")).lower() == "brushlabels" for r in results if isinstance(r, dict)):
            continue  # nothing labelsmart can read (an empty annotation, or only rectangles)
        yield image_id, mask_from_results(results, classes, image.height, image.width, source), source
