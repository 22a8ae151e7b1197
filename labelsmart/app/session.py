"""The UI's handlers: plain functions on numpy arrays and ids, on one :class:`Session` per project.

They never touch Gradio types beyond plain dicts, so they are tested without a browser;
:func:`labelsmart.app.layout.build_ui` wires them to the page, and only ``app.py`` calls ``launch()``.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX, Config
from labelsmart.serving import active
from labelsmart.store import ANY_REVISION, ImageRow, StaleRevisionError, Store, StoreError

if TYPE_CHECKING:
    from labelsmart.serving.predictor import Predictor
    from labelsmart.training.trainer import Supervisor

log = logging.getLogger(__name__)

STATE_MARK = {"labelled": "●", "pre-annotated": "◐", "unlabelled": "○"}
HEARTBEAT_STALE_S = 20.0
EXPORT_KEEP_S = 3600.0  # export zips older than this are removed at the next export

# The editor shows labels translucent, so the photo stays visible under them while they are corrected: the brush
# paints class colours at LABEL_OPACITY and the labels the page puts in the editor (saved ones, a pre-annotation)
# carry the same alpha. A pixel's class is read from its colour alone, so saved masks do not depend on it.
LABEL_OPACITY = 0.5
LABEL_ALPHA = round(255 * LABEL_OPACITY)  # 128: alpha of a labelled pixel in the editor's layer
# A layer pixel at least half as opaque as one stroke is painted; the fainter anti-aliased rim of a stroke is not
# (an opaque layer, alpha 255, is painted too).
MIN_ALPHA = LABEL_ALPHA // 2
# A painted pixel is the class whose colour it is within this much in each of R, G and B (the nearest one, where
# several are): the browser keeps a translucent layer premultiplied by its alpha and rounds its colours by a few
# units on the way back. A colour further from every class is not a label (unlabelled), never a guess.
COLOR_TOLERANCE = 16


def hex_color(rgb: tuple[int, int, int] | list[int]) -> str:
    """``(r, g, b)`` -> ``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*[int(v) for v in rgb])


@dataclass
class View:
    """What the page shows for one image."""

    image_id: int
    editor: dict[str, Any]  # ImageEditor value: background, layers, composite
    overlay: np.ndarray | None  # image with the pre-annotation blended over it
    overlay_info: str  # markdown: model version, confidence, providers
    image_info: str  # markdown: path, size, state, revisions
    version: int | None  # model version of the overlay
    uncertainty: np.ndarray | None = None  # the model's uncertainty drawn over the image
    uncertainty_info: str = ""  # markdown: what the map shows, the image's score and rank
    revision: int | None = None  # label revision in the editor (None: the image had none); saves are based on it


@dataclass(frozen=True)
class SaveResult:
    """What a save did.

    Attributes:
        revision: the image's revision the editor now matches (the new one, or the unchanged newest);
            None when nothing was saved.
        stale: someone else saved the image after the revision the editor was based on; nothing was saved.
    """

    message: str
    revision: int | None = None
    stale: bool = False


def label_layer(mask: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """Index mask -> the editor's RGBA label layer: class colours at ``LABEL_ALPHA``, unlabelled (255) transparent.

    Ids without a colour are black (as :func:`labelsmart.imageio.colorize` draws them), which no class reads back.
    """
    lut = np.zeros((256, 4), np.uint8)
    k = min(len(colors), IGNORE_INDEX)
    if k:
        lut[:k, :3] = np.asarray(colors[:k], np.uint8)
    lut[:IGNORE_INDEX, 3] = LABEL_ALPHA
    packed = lut.view(np.uint32).ravel()  # one RGBA pixel a word: one gather instead of four
    return np.take(packed, mask).view(np.uint8).reshape(*mask.shape, 4)  # (H, W, 4)


def _nearest_within(px: np.ndarray, pal: np.ndarray, tol: int) -> np.ndarray:
    """Class of each ``(N, 3)`` pixel: the nearest palette colour (largest channel difference; the lower id on a
    tie) no further than ``tol``, else ``IGNORE_INDEX``. Compares with every colour: for the few pixels that
    :func:`_classes_of` cannot settle alone."""
    out = np.full(len(px), IGNORE_INDEX, np.uint8)
    step = max(1, (1 << 22) // (3 * len(pal)))  # pixels a chunk: a few MB of differences at a time
    for lo in range(0, len(px), step):
        d = np.abs(px[lo : lo + step, None, :].astype(np.int16) - pal[None, :, :]).max(axis=2)  # (n, K)
        best = d.argmin(axis=1)
        near = d[np.arange(len(best)), best] <= tol
        out[lo : lo + step][near] = best[near]
    return out


def _classes_of(px: np.ndarray, pal: np.ndarray, tol: int) -> np.ndarray:
    """:func:`_nearest_within` of ``(N, 3)`` pixels, fast: per channel and value, the classes whose colour is within
    ``tol`` there, as bits of 64-bit words; a pixel's candidates are the classes within ``tol`` in all three
    channels. One candidate is its class (nearly every pixel), none is unlabelled, and the pixels with several
    (class colours closer than ``2 tol``) go to :func:`_nearest_within`."""
    k = len(pal)
    values = np.arange(256, dtype=np.int16)[:, None]  # (256, 1)
    channels = [np.ascontiguousarray(px[:, c]) for c in range(3)]  # 3 x (N,) uint8
    ids = np.full(len(px), IGNORE_INDEX, np.uint8)
    found = np.zeros(len(px), np.int8)  # candidates seen so far, counted up to 2
    for w0 in range(0, k, 64):
        bits = np.left_shift(np.uint64(1), np.arange(min(64, k - w0), dtype=np.uint64))  # (k_w,)
        cand = np.full(len(px), ~np.uint64(0))
        for c in range(3):
            near = np.abs(values - pal[None, w0 : w0 + 64, c]) <= tol  # (256, k_w)
            lut = np.where(near, bits, np.uint64(0)).sum(axis=1, dtype=np.uint64)  # (256,) bit sets
            cand &= np.take(lut, channels[c])
        has = cand != 0
        one = has & ((cand & (cand - np.uint64(1))) == 0)
        bit = np.log2((cand | np.uint64(1)).astype(np.float64)).astype(np.int64)  # (N,) the bit, where there is one
        np.copyto(ids, (w0 + bit).astype(np.uint8), where=one)
        found += has.astype(np.int8) + (has & ~one).astype(np.int8)
        np.minimum(found, 2, out=found)
    several = found > 1
    if several.any():
        ids[several] = _nearest_within(px[several], pal, tol)
    return ids


def layer_to_mask(layer: np.ndarray, colors: list[tuple[int, int, int]], tol: int = COLOR_TOLERANCE) -> np.ndarray:
    """The editor's RGBA (or RGB on black) layer -> index mask; what is not a class colour is unlabelled.

    A pixel is painted if its alpha is at least ``MIN_ALPHA`` (RGB: not black), whatever the alpha beyond that: the
    translucent brush and label layer (``LABEL_ALPHA``), opaque layers, strokes painted over strokes. A painted
    pixel is the class whose colour it is exactly, else the nearest class colour within ``tol`` in every channel
    (the browser's rounding of translucent colours), else unlabelled. The alpha never picks the class: a straight
    (not premultiplied) colour is what PNG holds and what the page sends.
    """
    if layer.ndim != 3 or layer.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA layer, got shape {layer.shape}")
    out = np.full(layer.shape[:2], IGNORE_INDEX, np.uint8)
    painted = layer[..., 3] >= MIN_ALPHA if layer.shape[2] == 4 else layer.any(axis=2)
    if colors and painted.any():
        pal = np.asarray(colors, np.int16)  # (K, 3)
        px = np.stack([layer[..., c][painted] for c in range(3)], axis=1)  # (N, 3), one channel at a time: cheaper
        out[painted] = _classes_of(px, pal, tol)  # (N,) ids
    return out


def _layer_array(layer: Any, k: int) -> np.ndarray:
    """Layer ``k`` of the editor's value as a uint8 ``(H, W)`` or ``(H, W, 3|4)`` array.

    Raises:
        ImageError: it is not one (another type, dtype or channel count, or empty).
    """
    try:
        arr = np.asarray(layer)
    except (ValueError, TypeError):  # ragged lists, objects NumPy cannot hold
        arr = None
    ok = (
        arr is not None
        and arr.dtype == np.uint8
        and arr.size > 0
        and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)))
    )
    if not ok:
        what = f"{arr.dtype} {arr.shape}" if arr is not None else type(layer).__name__
        raise imageio.ImageError(
            f"the editor's layer {k + 1} is not an 8-bit RGB or RGBA image ({what}); reload the image and paint again."
        )
    return np.ascontiguousarray(arr)


class Session:
    """The UI's handlers over one project.

    Args:
        cfg: configuration.
        store: the project store.
        predictor: the project's predictor (the page shows what it serves).
        supervisor: the trainer supervisor, or None when no trainer runs in this process.
    """

    def __init__(self, cfg: Config, store: Store, predictor: Predictor, supervisor: Supervisor | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.predictor = predictor
        self.supervisor = supervisor
        self._exports: Path | None = None  # export zips to download, made on the first export

    # ------------------------------------------------------------------------------------- classes

    def colors(self) -> list[tuple[int, int, int]]:
        """Class colours in id order."""
        return [c.color for c in self.store.classes()]

    def legend_html(self) -> str:
        """The class palette as coloured chips."""
        classes = self.store.classes()
        if not classes:
            return "<p><b>No classes yet.</b> Add them under <i>Classes</i> before painting.</p>"
        chips = "".join(
            f'<span class="ls-chip" style="display:inline-block;margin:2px 8px 2px 0">'
            f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;vertical-align:middle;'
            f'background:{hex_color(c.color)};border:1px solid #0004"></span> '
            f"{c.id}: {html.escape(c.name)}</span>"
            for c in classes
        )
        return f'<div class="ls-legend">{chips}</div>'

    def add_class(self, name: str, color: str | None) -> str:
        """Add a class from the UI; returns a message."""
        try:
            row = self.store.add_class(name, color or None)
        except StoreError as exc:
            return f"⚠️ {exc}"
        return f"Added class {row.id}: {row.name}."

    # -------------------------------------------------------------------------------------- images

    def image_choices(self, rows: list[ImageRow] | None = None) -> list[tuple[str, int]]:
        """Dropdown choices ``(mark + path, id)``; marks: ● labelled, ◐ pre-annotated, ○ unlabelled.

        ``rows``: the store's image list when the caller has just read it (one read for several answers).
        """
        return [(f"{STATE_MARK[r.state]} {r.path}", r.id) for r in (self.store.images() if rows is None else rows)]

    def first_image(self) -> int:
        """The first unlabelled image, else the first image."""
        rows = self.store.images()
        for r in rows:
            if r.state != "labelled":
                return r.id
        return rows[0].id

    def neighbour(self, image_id: int | None, step: int) -> int:
        """The image ``step`` places after (or before) ``image_id`` in the list, wrapping around."""
        ids = [r.id for r in self.store.images()]
        if image_id not in ids:
            return ids[0]
        return ids[(ids.index(image_id) + step) % len(ids)]

    def progress_md(self, rows: list[ImageRow] | None = None) -> str:
        """Counts of labelled / pre-annotated / remaining images (``rows`` as in :meth:`image_choices`)."""
        rows = self.store.images() if rows is None else rows
        n = {s: 0 for s in STATE_MARK}
        for r in rows:
            n[r.state] += 1
        remaining = n["pre-annotated"] + n["unlabelled"]
        lines = [
            f"**{len(rows)} images** · ● {n['labelled']} labelled · ◐ {n['pre-annotated']} pre-annotated · "
            f"○ {n['unlabelled']} unlabelled · **{remaining} remaining**"
        ]
        counts = self.store.class_pixel_counts()
        if counts:
            chips = []
            for c in self.store.classes():
                sw = (
                    f'<span style="display:inline-block;width:10px;height:10px;border-radius:2px;'
                    f'background:{hex_color(c.color)}"></span>'
                )
                chips.append(f"{sw} {html.escape(c.name)} {counts.get(c.id, 0):,}")
            lines.append("Labelled pixels per class: " + " · ".join(chips))
        return "<br>".join(lines)

    def next_image(self, image_id: int | None, picked: list[int] | None = None, order: str | None = None) -> tuple:
        """What "Next" opens, and why: ``(image id, reason)``.

        ``suggested`` (the default, ``active.order``): the unlabelled image the newest scored model is least
        sure of, skipping near-duplicates of labelled images and of images offered before in this session
        (``picked``); ``sequential``: the next image in the list.
        """
        order = order or self.cfg.active.order
        if order == "sequential":
            return self.neighbour(image_id, 1), ""
        s = active.suggest(self.store, self.cfg.active, picked=picked or (), after=image_id)
        if s is None:
            return self.neighbour(image_id, 1), "Every image is labelled; Next goes through the list in order."
        return s.image_id, s.reason

    def uncertainty(self, image_id: int, image: np.ndarray | None = None) -> tuple[np.ndarray | None, str]:
        """Where the serving model is unsure of an image (bright = unsure), and a line about it.

        The uncertainty map stored when the trainer scored the image with the serving version (normalised
        entropy or margin, :mod:`labelsmart.serving.active`) where there is one; otherwise the low confidence of
        the pre-annotation (1 − the winning class's probability), and the line says which it is.
        """
        version = self.predictor.version
        if version is None:
            return None, ""
        umap = self.store.score_map(int(image_id), version)
        scores = self.store.scores(version) if umap is not None else {}
        if umap is not None:
            method = self.store.score_method(version)
            mine = scores[int(image_id)]
            rank = 1 + sum(1 for v in scores.values() if v > mine)
            info = (
                f"Uncertainty of **model v{version}** ({method}; bright = unsure): mean **{mine:.2f}**, "
                f"rank {rank} of {len(scores)} scored images."
            )
        else:
            pred = self.predictor.predict(int(image_id))
            if pred is None:
                return None, ""
            umap = 1.0 - np.asarray(pred.confidence, dtype=np.float32)
            info = (
                f"Low confidence of **model v{version}** (1 − confidence of the winning class; bright = unsure): "
                f"mean {float(umap.mean()):.2f}. Its uncertainty ({self.cfg.active.method}) shows once the trainer "
                "has scored this image."
            )
        if image is None:
            image = self.store.read_image(int(image_id))
        return active.heatmap(image, umap), info

    def miou_curve(self) -> Any:
        """Validation mIoU (%) of each published version against the labels spent (a pandas DataFrame)."""
        import pandas as pd

        rows = [
            {
                "labelled pixels": m.labelled_pixels,
                "labelled images": m.labelled_images,
                "val mIoU %": round(100 * float(m.metrics["val_miou"]), 1),
                "version": f"v{m.version}",
            }
            for m in self.store.models()
            if m.status == "published" and m.metrics.get("val_miou") is not None
        ]
        return pd.DataFrame(rows, columns=["labelled pixels", "labelled images", "val mIoU %", "version"])

    def class_iou_rows(self) -> tuple[list[list[Any]], str]:
        """Per-class validation IoU (%) of the newest published version that has one, and a caption."""
        names = {c.id: c.name for c in self.store.classes()}
        for m in reversed(self.store.models()):
            per = m.metrics.get("val_per_class_iou") if m.status == "published" else None
            if per:
                rows = [
                    [names.get(int(k), str(k)), "" if v is None else f"{100 * float(v):.1f}"]
                    for k, v in sorted(per.items(), key=lambda kv: int(kv[0]))
                ]
                return rows, f"Per-class validation IoU of model v{m.version} ({m.labelled_images} labelled images)"
        tc = self.cfg.train
        return [], (
            f"Per-class IoU appears once {tc.val_min_images} images are labelled "
            f"(every {tc.val_every}th is held out for validation)."
        )

    def view(self, image_id: int | None, alpha: float = 0.5) -> View:
        """Everything the page shows for one image: editor with its current labels, pre-annotation overlay."""
        if image_id is None:
            image_id = self.first_image()
        image_id = int(image_id)
        image = self.store.read_image(image_id)
        current = self.store.current_revision(image_id)
        mask = self.store.load_revision(current.id) if current is not None else None
        layer = label_layer(
            mask if mask is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8), self.colors()
        )
        editor = {"background": image, "layers": [layer], "composite": None}
        overlay, overlay_info, version = self.preannotation(image_id, image, alpha)
        info = self.image_info(image_id)  # after predicting, so the state says pre-annotated
        umap, uinfo = self.uncertainty(image_id, image) if version is not None else (None, "")
        revision = current.id if current is not None else None
        return View(image_id, editor, overlay, overlay_info, info, version, umap, uinfo, revision)

    def image_info(self, image_id: int) -> str:
        """One line about an image: path, size, state, labelled pixels, revisions."""
        row = self.store.image(image_id)
        n = len(self.store.history(image_id))
        return (
            f"**{html.escape(row.path)}** · {row.width}×{row.height} · {row.state} · "
            f"{row.labelled_pixels} labelled pixels · {n} label revision{'s' if n != 1 else ''}"
        )

    def preannotation(
        self,
        image_id: int,
        image: np.ndarray | None = None,
        alpha: float = 0.5,
    ) -> tuple[np.ndarray | None, str, int | None]:
        """The newest model's prediction blended over the image, and a line about it."""
        self.predictor.refresh()
        try:
            pred = self.predictor.predict(image_id)
        except Exception as exc:  # noqa: BLE001 - a failed prediction must not break the page
            log.exception("prediction failed for image %s", image_id)
            return None, f"⚠️ prediction failed: {exc}", None
        if pred is None:
            return None, "No model yet: save labels of at least two classes and the trainer starts on its own.", None
        if image is None:
            image = self.store.read_image(image_id)
        classes = self.store.classes()
        colors = [c.color for c in classes]
        blended = imageio.overlay(image, pred.mask, colors, alpha=alpha)
        counts = np.bincount(pred.mask.ravel(), minlength=len(classes))
        present = ", ".join(
            f"{html.escape(c.name)} {100 * counts[c.id] / pred.mask.size:.0f}%"
            for c in classes
            if c.id < len(counts) and counts[c.id]
        )
        providers = ", ".join(p.replace("ExecutionProvider", "") for p in self.predictor.providers)
        info = (
            f"Pre-annotation by **model v{pred.version}** · mean confidence **{pred.mean_confidence:.2f}** · "
            f"ONNX Runtime on {providers}<br>{present}"
        )
        return blended, info, pred.version

    def preannotation_layer(self, image_id: int) -> dict[str, Any] | None:
        """The editor value with the pre-annotation as editable strokes (None if there is no model), translucent
        like every label layer of the editor (:func:`label_layer`), so the photo shows through it."""
        self.predictor.refresh()
        pred = self.predictor.predict(int(image_id))
        if pred is None:
            return None
        image = self.store.read_image(int(image_id))
        return {"background": image, "layers": [label_layer(pred.mask, self.colors())], "composite": None}

    # -------------------------------------------------------------------------------------- saving

    def editor_to_mask(self, image_id: int, editor: dict[str, Any] | None) -> np.ndarray:
        """Merge the editor's layers (later layers win) into one index mask at the image's size.

        Each layer is read by :func:`layer_to_mask` (class colours at any opacity; what is not a class colour is
        unlabelled). No value, no layers, a ``None`` layer and a 2-D layer add nothing; a layer at another size is
        resized to the image (nearest neighbour, so it keeps its class colours).

        Raises:
            ImageError: the value is not what the editor sends (not a dict, layers that are not a list, a layer
                that is not an 8-bit RGB or RGBA image); nothing is saved.
        """
        row = self.store.image(image_id)
        shape = (row.height, row.width)
        mask = np.full(shape, IGNORE_INDEX, np.uint8)
        if editor is None:
            return mask
        if not isinstance(editor, dict):
            raise imageio.ImageError(
                f"the editor sent {type(editor).__name__}, not its value; reload the image and paint again."
            )
        layers = editor.get("layers")
        if layers is None:
            return mask
        if not isinstance(layers, (list, tuple)):
            raise imageio.ImageError(
                f"the editor's layers are {type(layers).__name__}, not a list; reload the image and paint again."
            )
        colors = self.colors()
        for k, layer in enumerate(layers):
            if layer is None:
                continue
            layer = _layer_array(layer, k)
            if layer.ndim == 2:
                continue
            if layer.shape[:2] != shape:
                import cv2

                log.warning("editor layer is %s, image is %s; resizing the layer", layer.shape[:2], shape)
                layer = cv2.resize(layer, (row.width, row.height), interpolation=cv2.INTER_NEAREST)
            m = layer_to_mask(layer, colors)
            mask = np.where(m != IGNORE_INDEX, m, mask)
        return mask

    def save(
        self,
        image_id: int | None,
        editor: dict[str, Any] | None,
        based_on: int | None | object = ANY_REVISION,
        author: str | None = None,
    ) -> str:
        """Save the editor's strokes as a new label revision of the image; returns the message of
        :meth:`save_labels`."""
        return self.save_labels(image_id, editor, based_on, author).message

    def save_labels(
        self,
        image_id: int | None,
        editor: dict[str, Any] | None,
        based_on: int | None | object = ANY_REVISION,
        author: str | None = None,
    ) -> SaveResult:
        """Save the editor's strokes as a new label revision of the image.

        ``based_on`` is the revision the editor was loaded with (:attr:`View.revision`): if someone else saved
        the image since, nothing is saved and the result says so (:meth:`merge` or :meth:`keep_mine` then).
        ``author`` is the logged-in user (``cfg.author`` without a login).
        """
        if image_id is None:
            return SaveResult("⚠️ No image selected.")
        image_id = int(image_id)
        if not self.store.classes():
            return SaveResult("⚠️ Add classes before saving labels.")
        try:
            mask = self.editor_to_mask(image_id, editor)
        except imageio.ImageError as exc:
            return SaveResult(f"⚠️ {exc}")
        return self._save_mask(image_id, mask, based_on, author)

    def _save_mask(
        self, image_id: int, mask: np.ndarray, based_on: int | None | object, author: str | None
    ) -> SaveResult:
        current = self.store.current_revision(image_id)
        if current is not None and np.array_equal(self.store.load_revision(current.id), mask):
            return SaveResult("Nothing changed since the last save.", current.id)
        try:
            rev = self.store.save_label(image_id, mask, author=author or self.cfg.author, based_on=based_on)
        except StaleRevisionError as exc:
            return SaveResult(f"⚠️ {exc}", stale=True)
        except StoreError as exc:
            return SaveResult(f"⚠️ {exc}")
        n = int((mask != IGNORE_INDEX).sum())
        return SaveResult(f"Saved revision {rev}: {n} labelled pixels ({time.strftime('%H:%M:%S')}).", rev)

    def revision(self, image_id: int | None) -> int | None:
        """The image's newest label revision id (None without one): what the editor shows after a save."""
        current = self.store.current_revision(int(image_id)) if image_id is not None else None
        return current.id if current is not None else None

    def conflict(self, image_id: int | None, based_on: int | None) -> np.ndarray | None:
        """The newer labels someone else saved over the revision the editor is based on, drawn over the image;
        None when the editor is based on the newest revision."""
        if image_id is None or self.revision(image_id) == based_on:
            return None
        mask = self.store.current_label(int(image_id))
        image = self.store.read_image(int(image_id))
        return imageio.overlay(image, mask, self.colors(), alpha=0.6) if mask is not None else image

    def merge(
        self, image_id: int | None, editor: dict[str, Any] | None, based_on: int | None, author: str | None = None
    ) -> str:
        """Save this person's strokes onto the newer labels: pixels they changed from the revision they painted on
        take their value, every other pixel keeps the newer revision's (a three-way merge)."""
        if image_id is None:
            return "⚠️ No image selected."
        image_id = int(image_id)
        newest = self.store.current_revision(image_id)
        try:
            mine = self.editor_to_mask(image_id, editor)
        except imageio.ImageError as exc:
            return f"⚠️ {exc}"
        row = self.store.image(image_id)
        blank = np.full((row.height, row.width), IGNORE_INDEX, np.uint8)
        base = self.store.load_revision(based_on) if based_on is not None else blank
        theirs = self.store.load_revision(newest.id) if newest is not None else blank
        changed = mine != base
        merged = np.where(changed, mine, theirs).astype(np.uint8)
        msg = self._save_mask(image_id, merged, newest.id if newest is not None else None, author).message
        return msg.replace("Saved revision", "Merged your strokes onto the newer labels: revision", 1)

    def keep_mine(self, image_id: int | None, editor: dict[str, Any] | None, author: str | None = None) -> str:
        """Save the editor's labels as they are, over the newer revision (which stays in the history)."""
        if image_id is None:
            return "⚠️ No image selected."
        return self.save(image_id, editor, based_on=self.revision(image_id), author=author)

    def undo(
        self, image_id: int | None, based_on: int | None | object = ANY_REVISION, author: str | None = None
    ) -> str:
        """Undo the last save of the image (appends the previous revision); with ``based_on``, not someone
        else's newer save."""
        if image_id is None:
            return "⚠️ No image selected."
        try:
            rev = self.store.undo_label(int(image_id), author=author or self.cfg.author, based_on=based_on)
        except StoreError as exc:
            return f"⚠️ {exc}"
        return (
            "Nothing to undo." if rev is None else f"Undone: restored the labels before the last save (revision {rev})."
        )

    # -------------------------------------------------------------------------------------- export

    def export_labels(
        self,
        fmt: str,
        revisions: str = "current",
        progress: Callable[[int, int], None] | None = None,
        include_predictions: bool = False,
    ) -> tuple[str | None, str]:
        """The project's labels in ``fmt`` as a zip to download: ``(zip path or None, message)``.

        The zips go to one temporary folder of this session (Gradio copies a download into its own cache); zips
        older than an hour are removed at the next export, and the folder when the app ends.
        """
        import shutil

        from labelsmart.formats import ExportOptions, FormatError, export_labels

        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{self.cfg.project}-labels-{fmt}-{stamp}"
        work = self._export_folder()
        try:
            predictions = None
            if include_predictions:
                from labelsmart.preannotate.project import unlabelled_predictions

                predictions = unlabelled_predictions(self.store, self.cfg)
            options = ExportOptions(revisions=revisions, predictions=predictions)
            n = export_labels(self.store, fmt, work / name, progress=progress, options=options)
        except FormatError as exc:
            return None, f"⚠️ {exc}"
        try:
            archive = shutil.make_archive(str(work / name), "zip", root_dir=work, base_dir=name)
        except OSError as exc:
            (work / f"{name}.zip").unlink(missing_ok=True)  # no half-written zip to download
            why = "the disk is full; free space and" if imageio.is_disk_full(exc) else f"{exc};"
            return None, f"⚠️ the labels could not be zipped in {work}: {why} export again."
        finally:
            shutil.rmtree(work / name, ignore_errors=True)
        extra = " with pre-annotations" if include_predictions else ""
        return archive, f"Exported {n} label revisions ({fmt}, {revisions}){extra} as {Path(archive).name}."

    def _export_folder(self) -> Path:
        """This session's folder for export zips, cleared of zips older than an hour."""
        import atexit
        import shutil
        import tempfile

        if self._exports is None:
            self._exports = Path(tempfile.mkdtemp(prefix="labelsmart-export-"))
            atexit.register(shutil.rmtree, self._exports, True)
        for old in self._exports.iterdir():
            if time.time() - old.stat().st_mtime > EXPORT_KEEP_S:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
        return self._exports

    # ------------------------------------------------------------------------------------- trainer

    def train_now(self) -> str:
        """Ask the trainer for a round now."""
        self.store.request("train_now")
        return "Asked the trainer for a round; it starts as soon as the current one (if any) ends."

    def trainer_md(self) -> str:
        """What the trainer is doing, in words (and which model serves; a newer published one is swapped in)."""
        self.predictor.refresh()
        rec = self.store.get_status("trainer")
        lines = []
        if rec is None:
            running = self.supervisor is not None
            lines.append(
                "**Trainer:** starting…" if running else "**Trainer:** not running (started with --no-trainer)"
            )
        else:
            st, written = rec
            state = st.get("state", "?")
            age = time.time() - float(st.get("heartbeat", written))
            if self.supervisor is not None and not self.supervisor.alive:
                lines.append("**Trainer:** ⚠️ the trainer process is not running; it is being restarted.")
            elif age > HEARTBEAT_STALE_S and state not in ("pretraining", "fine-tuning", "exporting", "validating"):
                lines.append(f"**Trainer:** no sign of life for {age:.0f} s.")
            if state in ("pretraining", "fine-tuning", "validating", "exporting", "starting"):
                parts = [f"**Trainer: {state}**"]
                if st.get("step") is not None and st.get("total"):
                    parts.append(f"step {st['step']}/{st['total']}")
                if st.get("loss") is not None:
                    parts.append(f"loss {float(st['loss']):.3f}")
                if st.get("eta_s") is not None:
                    parts.append(f"about {float(st['eta_s']):.0f} s left")
                if st.get("device"):
                    parts.append(f"on {st['device']}")
                lines.append(" · ".join(parts))
            elif state == "error":
                lines.append(
                    f"**Trainer:** ⚠️ {html.escape(str(st.get('message', 'error')))} — the last good "
                    "model keeps serving; save more labels or press Train now to retry."
                )
            else:
                lines.append(f"**Trainer: {state}** — {html.escape(str(st.get('message', '')))}")
        version = self.predictor.version
        providers = ", ".join(self.predictor.providers) if version is not None else "—"
        lines.append(f"Serving model **v{version}** on {providers}" if version is not None else "Serving: no model yet")
        counts = self.store.class_pixel_counts()
        if counts:
            names = {c.id: c.name for c in self.store.classes()}
            lines.append(
                "Labelled pixels: "
                + ", ".join(f"{html.escape(names.get(k, str(k)))} {v}" for k, v in sorted(counts.items()))
            )
        for t, level, _source, message in self.store.events(limit=3):
            if level in ("error", "warning") and time.time() - t < 3600:
                lines.append(f"⚠️ {time.strftime('%H:%M:%S', time.localtime(t))} {html.escape(message)}")
        return "<br>".join(lines)

    def versions_rows(self) -> list[list[Any]]:
        """Rows for the versions table, newest first."""
        rows = []
        for m in reversed(self.store.models()):
            miou = m.metrics.get("val_miou")
            rows.append(
                [
                    f"v{m.version}",
                    m.status,
                    m.labelled_images,
                    m.labelled_pixels,
                    "" if miou is None else f"{100 * miou:.1f}",
                    m.metrics.get("steps", ""),
                    m.metrics.get("round_seconds", ""),
                    time.strftime("%H:%M:%S", time.localtime(m.published_at or m.created_at)),
                ]
            )
        return rows
