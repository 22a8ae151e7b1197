"""Batch pre-annotation of a folder: a streaming pipeline where decoding, inference and writing overlap.

The work per image is split in three functions shared by every engine (the local pipeline here and the Ray
engine in :mod:`labelsmart.preannotate.ray_engine`), so both write byte-identical files:

- :func:`load_item`: read and decode the image, prepare the network input (any thread or process);
- the model's :meth:`~labelsmart.serving.onnx_model.OnnxModel.logits` on a batch of inputs of one padded size;
- :func:`finish_item`: logits -> mask and confidence at the image's size, overlay and palette mask written
  atomically, and the image's manifest record.

:func:`run_local` runs them as a bounded pipeline: a pool of threads decodes ahead of inference and
encodes/writes behind it (OpenCV, NumPy and ONNX Runtime release the GIL), so however many images there
are, at most a few batches are in memory. :func:`plan` decides what to do (resume, stem collisions);
:func:`labelsmart.preannotate.coco.write_coco` turns the finished masks into one COCO JSON file. A full disk
stops a run with :class:`OutputFullError`: every file is written atomically and an image's manifest line
follows its files, so the same command run again goes on where it stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import cv2
import numpy as np

from labelsmart import imageio
from labelsmart.config import PreprocessConfig

if TYPE_CHECKING:
    from labelsmart.serving.onnx_model import OnnxModel

MANIFEST_NAME = "manifest.jsonl"
ERRORS_NAME = "errors.jsonl"
DISK_FULL_ERRNOS = imageio.DISK_FULL_ERRNOS


class OutputFullError(ValueError):
    """The disk holding the output folder is full: the run stops, with one sentence naming the folder.

    Nothing half-written stays (files are written atomically) and the image whose write failed has no manifest
    line, so the same command run again after freeing space does it and the rest.
    """


@contextmanager
def stop_when_full(out: Path, what: str) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``, ``EDQUOT``) met inside into :class:`OutputFullError`; ``what`` says what
    did not land ("a/b.png was not written")."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise OutputFullError(
            f"the disk holding {out} is full, so the run stopped ({what}); free space and run the "
            "same command again: it goes on where it stopped."
        ) from exc


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`finish_item` needs to know of the model (picklable, for other processes)."""

    version: int
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, model: OnnxModel) -> ModelInfo:
        """What a model's files say of it."""
        return cls(int(model.version), tuple(model.class_names), tuple(tuple(c) for c in model.colors))


@dataclass
class Item:
    """One image on its way through the pipeline; ``error`` set means it is skipped with that message."""

    rel: Path
    image: np.ndarray | None = None  # RGB uint8 (H, W, 3)
    x: np.ndarray | None = None  # network input (3, Hp, Wp) float32
    meta: imageio.Meta | None = None
    error: str | None = None


def load_item(root: Path, rel: Path, pp: PreprocessConfig) -> Item:
    """Read, decode and prepare one image; a file that cannot be read becomes an :class:`Item` with an error."""
    try:
        image = imageio.read_image(root / rel)
    except imageio.ImageError as exc:
        return Item(rel, error=" ".join(str(exc).split()))
    x, meta = imageio.prepare(image, pp)
    return Item(rel, image=image, x=x, meta=meta)


def low_confidence_fraction(confidence: np.ndarray) -> float:
    """The fraction of an image's pixels whose winning class has a probability below 0.5 (where no class holds
    the majority), in [0, 1]: where to look first when checking a folder's pre-annotations. (Not the
    uncertainty "Next" ranks by, the normalised entropy of :mod:`labelsmart.serving.active`: a manifest line
    only has the winning class's probability.)"""
    return float(np.count_nonzero(confidence < 0.5)) / float(max(confidence.size, 1))


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """RGB uint8 -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def output_paths(rel: Path) -> tuple[Path, Path]:
    """``(mask, overlay)`` paths of an image, relative to the output folder."""
    return rel.with_suffix(".png"), rel.with_name(f"{rel.stem}_overlay.jpg")


def write_outputs(
    out: Path, rel: Path, image: np.ndarray, mask: np.ndarray, confidence: np.ndarray, info: ModelInfo, overlays: bool
) -> dict[str, Any]:
    """Write the overlay (optional) and the palette mask of one image atomically, mask last (a mask on disk
    means its overlay landed too); returns the image's manifest record."""
    mask_rel, overlay_rel = output_paths(rel)
    if overlays:
        imageio.atomic_write_bytes(out / overlay_rel, encode_jpeg(imageio.overlay(image, mask, info.colors, 0.5)))
    imageio.atomic_write_bytes(out / mask_rel, imageio.palette_png_bytes(mask, info.colors))
    names = info.class_names
    counts = np.bincount(mask.ravel(), minlength=len(names))[: len(names)]
    n = float(mask.size)
    record: dict[str, Any] = {
        "image": rel.as_posix(),
        "mask": mask_rel.as_posix(),
    }
    if overlays:
        record["overlay"] = overlay_rel.as_posix()
    record.update(
        {
            "classes_present": [names[i] for i in range(len(names)) if counts[i]],
            "class_fractions": {names[i]: round(float(counts[i]) / n, 6) for i in range(len(names))},
            "mean_confidence": round(float(confidence.mean()), 6),
            "low_confidence_fraction": round(low_confidence_fraction(confidence), 6),
            "model_version": info.version,
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
        }
    )
    return record


def finish_item(out: Path, item: Item, logits: np.ndarray, info: ModelInfo, overlays: bool) -> dict[str, Any]:
    """Logits ``(K, Hp, Wp)`` of one prepared image -> its files and manifest record."""
    assert item.image is not None and item.meta is not None
    mask, conf = imageio.logits_to_mask(logits, item.meta)
    return write_outputs(out, item.rel, item.image, mask, conf, info, overlays)


# ------------------------------------------------------------------------------------------------ planning


def walk_inputs(images: Path, out: Path) -> Iterator[Path]:
    """Relative image paths under ``images``, leaving out anything under ``out`` (it may sit inside)."""
    out_abs = out.resolve()
    root_abs = images.resolve()
    inside = out_abs == root_abs or root_abs in out_abs.parents
    for rel in imageio.list_images(images):
        if inside:
            full = (root_abs / rel).resolve()
            if out_abs in full.parents:
                continue
        yield rel


def manifest_images(path: Path) -> set[str]:
    """Images that have a line in a manifest (read line by line)."""
    done: set[str] = set()
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                done.add(json.loads(line)["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


@dataclass(frozen=True)
class Planned:
    """One decision of :func:`plan`: do the image, skip it (done before), or fail it with a message."""

    rel: Path
    action: str  # "do", "skip" or "fail"
    message: str = ""


def plan(images: Path, out: Path, overwrite: bool, done_before: set[str]) -> Iterator[Planned]:
    """What to do with each image under ``images``, streamed in listing order.

    An image is skipped when its mask exists and the manifest has its line (unless ``overwrite``); two
    images of one folder with the same stem (``a.jpg``, ``a.png``) would write the same mask, so the second
    fails with a message.
    """
    seen_dir: Path | None = None
    seen_stems: set[str] = set()
    for rel in walk_inputs(images, out):
        if rel.parent != seen_dir:
            seen_dir, seen_stems = rel.parent, set()
        if rel.stem in seen_stems:
            yield Planned(
                rel,
                "fail",
                f"another image in {rel.parent.as_posix() or '.'} has the stem {rel.stem!r}, so their masks "
                "would collide; rename one of them.",
            )
            continue
        seen_stems.add(rel.stem)
        mask_rel, _ = output_paths(rel)
        if not overwrite and rel.as_posix() in done_before and (out / mask_rel).is_file():
            yield Planned(rel, "skip")
        else:
            yield Planned(rel, "do")


# ------------------------------------------------------------------------------------------ local pipeline


@dataclass(frozen=True)
class Outcome:
    """The result of one image: a manifest record, or an error message."""

    rel: Path
    record: dict[str, Any] | None = None
    error: str | None = None


INFERENCE_FAILED = "inference failed ({}); check that the file is a normal photo."
WRITE_FAILED = "cannot write its outputs ({}); check the free space and permissions of {}."


def run_local(
    model: OnnxModel,
    images: Path,
    out: Path,
    todo: Iterable[Path],
    on_outcome: Callable[[Outcome], None],
    batch: int = 4,
    io_threads: int = 2,
    overlays: bool = True,
    postprocess: str = "host",
) -> None:
    """Pre-annotate ``todo`` (paths relative to ``images``) with ``model``, overlapping decode, inference and
    writes; calls ``on_outcome`` in this thread once per image as it finishes (not necessarily in order).

    Decoding runs up to ``3 * batch`` images ahead of inference, inputs wait for a full batch of their padded
    size, and at most ``3 * batch`` images are being written, so memory stays flat. A batch that fails is
    retried image by image, so one bad image fails alone.

    ``postprocess``: ``host`` turns logits into masks in the I/O threads (:func:`finish_item`); ``graph``
    does it inside ONNX Runtime (:meth:`~labelsmart.serving.onnx_model.OnnxModel.masks`), the winner on a GPU, where
    the host would otherwise resize every class's logits; images then batch by padded, working and
    original size together.

    Raises:
        OutputFullError: the disk filled up; the images reported so far are done, the rest are not.
    """
    if postprocess not in ("host", "graph"):
        raise ValueError(f"postprocess {postprocess!r}: use host or graph.")
    cv2.setNumThreads(1)  # the pipeline's threads are the parallelism; OpenCV's own pool would oversubscribe
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="preannotate-io") as pool:
        try:
            _LocalPipeline(model, images, out, on_outcome, pool, batch, io_threads, overlays, postprocess).run(todo)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop at once: queued reads and writes never start
            raise


class _LocalPipeline:
    """The state of one :func:`run_local` run: reads ahead, inputs waiting for a full batch, writes behind."""

    def __init__(
        self,
        model: OnnxModel,
        images: Path,
        out: Path,
        on_outcome: Callable[[Outcome], None],
        pool: ThreadPoolExecutor,
        batch: int,
        io_threads: int,
        overlays: bool,
        postprocess: str,
    ) -> None:
        self.model, self.images, self.out, self.on_outcome, self.pool = model, images, out, on_outcome, pool
        self.batch, self.overlays, self.graph = batch, overlays, postprocess == "graph"
        self.info = ModelInfo.of(model)
        self.lookahead = max(3 * batch, 2 * io_threads)
        self.max_writes = max(3 * batch, 2 * io_threads)
        self.reads: deque[Future[Item]] = deque()
        self.writes: deque[tuple[Path, Future[dict[str, Any]]]] = deque()
        self.groups: dict[Any, list[Item]] = {}  # inputs waiting for a full batch, by what a batch shares

    def run(self, todo: Iterable[Path]) -> None:
        """Decode ahead, infer full batches as they form (then the rest), and finish every write."""
        paths = iter(todo)
        self._fill(paths)
        while self.reads:
            item = self.reads.popleft().result()
            self._fill(paths)
            if item.error is not None:
                self.on_outcome(Outcome(item.rel, error=item.error))
                continue
            assert item.meta is not None
            key = item.meta if self.graph else item.meta.pad_hw
            group = self.groups.setdefault(key, [])
            group.append(item)
            if len(group) >= self.batch:
                self._infer(self.groups.pop(key))
            self._drain(self.max_writes)
        for key in list(self.groups):
            self._infer(self.groups.pop(key))
        self._drain(0)

    def _fill(self, paths: Iterator[Path]) -> None:
        while len(self.reads) < self.lookahead:
            rel = next(paths, None)
            if rel is None:
                return
            self.reads.append(self.pool.submit(load_item, self.images, rel, self.model.pp))

    def _finish_write(self, rel: Path, fut: Future[dict[str, Any]]) -> None:
        try:
            with stop_when_full(self.out, f"the outputs of {rel.as_posix()} were not written"):
                record = fut.result()
        except OutputFullError:
            raise
        except OSError as exc:
            self.on_outcome(Outcome(rel, error=WRITE_FAILED.format(exc, self.out)))
        except Exception as exc:  # noqa: BLE001 - one image's bad output must not stop the run
            self.on_outcome(Outcome(rel, error=INFERENCE_FAILED.format(" ".join(str(exc).split()))))
        else:
            self.on_outcome(Outcome(rel, record=record))

    def _drain(self, limit: int) -> None:
        while len(self.writes) > limit or (self.writes and self.writes[0][1].done()):
            self._finish_write(*self.writes.popleft())

    def _run_model(self, x: np.ndarray, meta: imageio.Meta) -> list[Any]:
        if self.graph:
            masks, confs = self.model.masks(x, meta)
            return list(zip(masks, confs, strict=True))
        return list(self.model.logits(x))

    def _infer(self, items: list[Item]) -> None:
        meta = items[0].meta
        assert meta is not None
        try:
            results: list[Any] = self._run_model(np.stack([it.x for it in items]), meta)
        except Exception:  # noqa: BLE001 - find the image that breaks the batch, keep the others
            results = []
            for it in items:
                try:
                    results.append(self._run_model(it.x[None], meta)[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        for it, res in zip(items, results, strict=True):
            if isinstance(res, Exception):
                self.on_outcome(Outcome(it.rel, error=INFERENCE_FAILED.format(" ".join(str(res).split()))))
                continue
            if self.graph:
                assert it.image is not None
                job = self.pool.submit(
                    write_outputs, self.out, it.rel, it.image, res[0], res[1], self.info, self.overlays
                )
            else:
                job = self.pool.submit(finish_item, self.out, it, res, self.info, self.overlays)
            self.writes.append((it.rel, job))
        self._drain(self.max_writes)


def choose_postprocess(choice: str, providers: Sequence[str]) -> str:
    """``auto`` -> ``graph`` where the model runs on CUDA (measured: the host cannot keep up with the GPU),
    ``host`` on the CPU (exactly the predictor's path); ``host``/``graph`` stay as given."""
    if choice == "auto":
        return "graph" if "CUDAExecutionProvider" in providers else "host"
    return choice


# ------------------------------------------------------------------------------------------------- journal


class Journal:
    """The manifest and the error list of a run, appended by one thread.

    A manifest line is written only after the image's files landed; lines are flushed at once and made
    durable (fsync) every ``sync_every`` lines and on close. After a crash, images whose line did not reach
    the disk are simply done again by the next run; a full disk is :class:`OutputFullError`.
    """

    def __init__(self, out: Path, overwrite: bool, sync_every: int = 64) -> None:
        self.manifest_path = out / MANIFEST_NAME
        self.errors_path = out / ERRORS_NAME
        if overwrite:
            # Start the manifest afresh: every image gets a new line. If this run is cut short, images done
            # before it keep their masks but lose their line, and the next (resuming) run redoes them.
            imageio.atomic_write_bytes(self.manifest_path, b"")
        repair_jsonl(self.manifest_path)
        repair_jsonl(self.errors_path)
        self.done_before: set[str] = set() if overwrite else manifest_images(self.manifest_path)
        self._manifest: TextIO = open(self.manifest_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._errors: TextIO | None = None
        self._unsynced = 0
        self.sync_every = sync_every
        self._lock = threading.Lock()

    def record(self, record: dict[str, Any]) -> None:
        """Append one image's manifest line."""
        with (
            self._lock,
            stop_when_full(self.manifest_path.parent, f"the manifest line of {record.get('image')} was not written"),
        ):
            self._manifest.write(json.dumps(record) + "\n")
            self._manifest.flush()
            self._unsynced += 1
            if self._unsynced >= self.sync_every:
                os.fsync(self._manifest.fileno())
                self._unsynced = 0

    def error(self, rel: Path, message: str) -> None:
        """Append one failed image to ``errors.jsonl`` (durable at once: errors are rare)."""
        with self._lock, stop_when_full(self.errors_path.parent, f"the error line of {rel.as_posix()} was not written"):
            if self._errors is None:
                self._errors = open(self.errors_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._errors.write(json.dumps({"image": rel.as_posix(), "error": message, "time": time.time()}) + "\n")
            self._errors.flush()
            os.fsync(self._errors.fileno())

    def close(self) -> None:
        """Make everything durable and close the files (both, even when the disk is full)."""
        with (
            self._lock,
            stop_when_full(self.manifest_path.parent, "the manifest was not closed"),
            ExitStack() as closing,
        ):
            files = [fh for fh in (self._manifest, self._errors) if fh is not None and not fh.closed]
            for fh in files:
                closing.callback(fh.close)
            for fh in files:
                fh.flush()
                os.fsync(fh.fileno())


def repair_jsonl(path: Path) -> None:
    """Cut a partial last line (left by a crash in the middle of an append)."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        tail = max(0, size - (1 << 16))
        fh.seek(tail)
        chunk = fh.read()
        cut = chunk.rfind(b"\n")
        fh.truncate(tail + cut + 1 if cut >= 0 else 0)
