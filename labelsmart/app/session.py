"""The browser UI: plain handler functions on numpy arrays and ids, and one ``build_ui`` that wires them.

Handlers live on :class:`Session` and never touch Gradio types beyond plain dicts, so they are tested
without a browser. ``build_ui`` holds all layout and wiring; only ``app.py`` calls ``launch()``.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX, Config
from labelsmart.serving import active
from labelsmart.store import Store, StoreError

if TYPE_CHECKING:
    from labelsmart.serving.predictor import Predictor
    from labelsmart.training.trainer import Supervisor

log = logging.getLogger(__name__)

STATE_MARK = {"labelled": "●", "pre-annotated": "◐", "unlabelled": "○"}
HEARTBEAT_STALE_S = 20.0


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

    def image_choices(self) -> list[tuple[str, int]]:
        """Dropdown choices ``(mark + path, id)``; marks: ● labelled, ◐ pre-annotated, ○ unlabelled."""
        return [(f"{STATE_MARK[r.state]} {r.path}", r.id) for r in self.store.images()]

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

    def progress_md(self) -> str:
        """Counts of labelled / pre-annotated / remaining images."""
        rows = self.store.images()
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
        """The serving model's uncertainty over an image (bright = unsure), and a line about it.

        The map stored when the trainer scored the image with the serving version (normalised entropy or
        margin) is shown where there is one; otherwise 1 − the pre-annotation's confidence.
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
                f"Uncertainty of **model v{version}** (1 − confidence; bright = unsure): mean {float(umap.mean()):.2f}."
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
        mask = self.store.current_label(image_id)
        colors = self.colors()
        layer = imageio.mask_to_rgba(
            mask if mask is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8), colors
        )
        editor = {"background": image, "layers": [layer], "composite": None}
        overlay, overlay_info, version = self.preannotation(image_id, image, alpha)
        info = self.image_info(image_id)  # after predicting, so the state says pre-annotated
        umap, uinfo = self.uncertainty(image_id, image) if version is not None else (None, "")
        return View(image_id, editor, overlay, overlay_info, info, version, umap, uinfo)

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
        """The editor value with the pre-annotation as editable strokes (None if there is no model)."""
        self.predictor.refresh()
        pred = self.predictor.predict(int(image_id))
        if pred is None:
            return None
        image = self.store.read_image(int(image_id))
        return {"background": image, "layers": [imageio.mask_to_rgba(pred.mask, self.colors())], "composite": None}

    # -------------------------------------------------------------------------------------- saving

    def editor_to_mask(self, image_id: int, editor: dict[str, Any] | None) -> np.ndarray:
        """Merge the editor's layers (later layers win) into one index mask at the image's size."""
        row = self.store.image(image_id)
        shape = (row.height, row.width)
        mask = np.full(shape, IGNORE_INDEX, np.uint8)
        if not editor:
            return mask
        colors = self.colors()
        for layer in editor.get("layers") or []:
            if layer is None:
                continue
            layer = np.asarray(layer)
            if layer.ndim == 2:
                continue
            if layer.shape[:2] != shape:
                import cv2

                log.warning("editor layer is %s, image is %s; resizing the layer", layer.shape[:2], shape)
                layer = cv2.resize(layer, (row.width, row.height), interpolation=cv2.INTER_NEAREST)
            m = imageio.rgba_to_mask(layer, colors)
            mask = np.where(m != IGNORE_INDEX, m, mask)
        return mask

    def save(self, image_id: int | None, editor: dict[str, Any] | None) -> str:
        """Save the editor's strokes as a new label revision of the image; returns a message."""
        if image_id is None:
            return "⚠️ No image selected."
        image_id = int(image_id)
        if not self.store.classes():
            return "⚠️ Add classes before saving labels."
        mask = self.editor_to_mask(image_id, editor)
        previous = self.store.current_label(image_id)
        if previous is not None and np.array_equal(previous, mask):
            return "Nothing changed since the last save."
        try:
            rev = self.store.save_label(image_id, mask, author=self.cfg.author)
        except StoreError as exc:
            return f"⚠️ {exc}"
        n = int((mask != IGNORE_INDEX).sum())
        return f"Saved revision {rev}: {n} labelled pixels ({time.strftime('%H:%M:%S')})."

    def undo(self, image_id: int | None) -> str:
        """Undo the last save of the image (appends the previous revision)."""
        if image_id is None:
            return "⚠️ No image selected."
        rev = self.store.undo_label(int(image_id), author=self.cfg.author)
        return (
            "Nothing to undo." if rev is None else f"Undone: restored the labels before the last save (revision {rev})."
        )

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


# Keyboard shortcuts, bound once per page; keys typed into a text field or with a modifier are left alone.
SHORTCUTS = {"n": "#ls-next", "p": "#ls-prev", "s": "#ls-save", "a": "#ls-accept", "u": "#ls-undo"}
SHORTCUTS_MD = (
    "Keys: **n** next · **p** previous · **s** save · **a** use pre-annotation · **u** undo last save · "
    "**1**–**9** class 0–8 as brush colour"
)
SHORTCUTS_JS = """
() => {
  if (window.__labelsmartKeys) return;
  window.__labelsmartKeys = true;
  const keys = __KEYS__;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const q = (sel) => document.querySelector(sel);
  const swatches = () => document.querySelectorAll("#ls-editor button.color");
  async function pickClass(i) {
    const brush = q("#ls-editor button[aria-label='Brush']");
    if (brush && !brush.classList.contains("highlight")) { brush.click(); await sleep(50); }
    if (!swatches().length) {
      const color = q("#ls-editor button[aria-label='Color']");
      if (color) color.click();
      for (let t = 0; t < 40 && !swatches().length; t++) await sleep(50);  // the palette opens
    }
    const s = swatches();
    if (s[i]) s[i].click();
  }
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    const tag = ((t && t.tagName) || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" || (t && t.isContentEditable)) return;
    const k = (e.key || "").toLowerCase();
    if (keys[k]) { const el = q(keys[k]); if (el) { e.preventDefault(); el.click(); } return; }
    if (/^[1-9]$/.test(k)) { e.preventDefault(); pickClass(parseInt(k, 10) - 1); }
  }, true);
}
""".replace("__KEYS__", json.dumps(SHORTCUTS))
CLASS_IOU_HEADERS = ["class", "IoU %"]
ORDER_CHOICES = [
    ("the most uncertain image (active learning)", "suggested"),
    ("the next image in the list", "sequential"),
]

VERSION_HEADERS = ["version", "status", "labelled images", "labelled pixels", "val mIoU %", "steps", "seconds", "time"]


def build_ui(session: Session, poll_s: float = 2.0) -> Any:
    """All layout and wiring of the labelling page. Returns a ``gr.Blocks``; the caller launches it."""
    import gradio as gr

    def brush() -> gr.Brush:
        colors = [hex_color(c) for c in session.colors()] or ["#000000"]
        return gr.Brush(colors=colors, default_color=colors[0], color_mode="fixed", default_size=8)

    with gr.Blocks(title="labelsmart") as demo:
        current = gr.State(None)  # image id on screen
        shown_version = gr.State(None)  # model version of the overlay on screen
        picked = gr.State([])  # images Next offered in this session (not offered again)
        back = gr.State([])  # images left with Next, for Previous
        seen_models = gr.State(None)  # number of model versions when the progress plot was drawn
        gr.Markdown(f"## labelsmart · {html.escape(session.cfg.project)}")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                progress = gr.Markdown(session.progress_md(), elem_id="ls-progress")
                picker = gr.Dropdown(
                    choices=session.image_choices(),
                    label="Image (● labelled ◐ pre-annotated ○ unlabelled)",
                    elem_id="ls-picker",
                    interactive=True,
                )
                with gr.Row():
                    prev_btn = gr.Button("◀ Previous", elem_id="ls-prev")
                    next_btn = gr.Button("Next ▶", elem_id="ls-next")
                order = gr.Radio(ORDER_CHOICES, value=session.cfg.active.order, label="Next opens", elem_id="ls-order")
                image_info = gr.Markdown(elem_id="ls-image-info")
                why = gr.Markdown(elem_id="ls-why")
                gr.Markdown(SHORTCUTS_MD, elem_id="ls-keys")
                with gr.Accordion("Classes", open=not session.store.classes()):
                    new_class = gr.Textbox(label="New class name", elem_id="ls-new-class")
                    new_color = gr.ColorPicker(label="Colour (optional)")
                    add_class_btn = gr.Button("Add class")
                    class_msg = gr.Markdown()
            with gr.Column(scale=3):
                legend = gr.HTML(session.legend_html(), elem_id="ls-legend")
                editor = gr.ImageEditor(
                    type="numpy",
                    format="png",
                    image_mode="RGBA",
                    brush=brush(),
                    eraser=gr.Eraser(default_size=16),
                    layers=gr.LayerOptions(allow_additional_layers=False, layers=["labels"]),
                    sources=(),
                    transforms=(),
                    label="Paint labels (brush = class colour, eraser = unlabelled)",
                    elem_id="ls-editor",
                    height=560,
                    # Smaller than any image on purpose: Gradio 6 places value layers (saved labels, the
                    # copied pre-annotation) off by half the canvas when the image is smaller than the
                    # canvas; an image at least the canvas size gets its layers aligned, at full resolution.
                    canvas_size=(64, 64),
                    interactive=True,
                )
                with gr.Row():
                    save_btn = gr.Button("Save", variant="primary", elem_id="ls-save")
                    accept_btn = gr.Button("Use pre-annotation", elem_id="ls-accept")
                    undo_btn = gr.Button("Undo last save", elem_id="ls-undo")
                save_msg = gr.Markdown(elem_id="ls-save-msg")
            with gr.Column(scale=2, min_width=300):
                overlay = gr.Image(label="Pre-annotation", type="numpy", interactive=False, elem_id="ls-overlay")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                overlay_info = gr.Markdown(elem_id="ls-overlay-info")
                uncertainty = gr.Image(
                    label="Uncertainty (bright = unsure)", type="numpy", interactive=False, elem_id="ls-uncertainty"
                )
                uncertainty_info = gr.Markdown(elem_id="ls-uncertainty-info")
                trainer_md = gr.Markdown(session.trainer_md(), elem_id="ls-trainer")
                train_btn = gr.Button("Train now", elem_id="ls-train-now")
                versions = gr.Dataframe(
                    headers=VERSION_HEADERS,
                    value=session.versions_rows(),
                    label="Model versions",
                    interactive=False,
                    elem_id="ls-versions",
                )
                with gr.Accordion("Progress of the model", open=True):
                    curve = gr.LinePlot(
                        session.miou_curve(),
                        x="labelled pixels",
                        y="val mIoU %",
                        title="Validation mIoU against labels spent",
                        tooltip="all",
                        elem_id="ls-curve",
                    )
                    iou_rows, iou_caption = session.class_iou_rows()
                    class_iou_caption = gr.Markdown(iou_caption, elem_id="ls-class-iou-caption")
                    class_iou = gr.Dataframe(
                        headers=CLASS_IOU_HEADERS, value=iou_rows, interactive=False, elem_id="ls-class-iou"
                    )

        def show(image_id: int | None, a: float) -> tuple:
            v = session.view(image_id, a)
            return (
                v.image_id,
                v.editor,
                v.overlay,
                v.overlay_info,
                v.image_info,
                v.version,
                gr.Dropdown(choices=session.image_choices(), value=v.image_id),
                v.uncertainty,
                v.uncertainty_info,
            )

        view_outputs = [
            current,
            editor,
            overlay,
            overlay_info,
            image_info,
            shown_version,
            picker,
            uncertainty,
            uncertainty_info,
        ]

        def go_next(image_id: int | None, a: float, seen: list[int], left: list[int], how: str) -> tuple:
            nxt, reason = session.next_image(image_id, seen, how)
            seen = [*(seen or []), nxt] if how == "suggested" else list(seen or [])
            left = [*(left or []), image_id][-100:] if image_id is not None else list(left or [])
            return (*show(nxt, a), reason, seen, left)

        def go_previous(image_id: int | None, a: float, left: list[int]) -> tuple:
            left = list(left or [])
            prev = left.pop() if left else session.neighbour(image_id, -1)
            return (*show(prev, a), "", left)

        def open_image(image_id: int | None, a: float) -> tuple:
            return (*show(image_id, a), "")

        demo.load(lambda a: show(None, a), inputs=[alpha], outputs=view_outputs, api_name="load")
        demo.load(None, js=SHORTCUTS_JS)
        picker.input(open_image, inputs=[picker, alpha], outputs=[*view_outputs, why], api_name="open_image")
        prev_btn.click(
            go_previous, inputs=[current, alpha, back], outputs=[*view_outputs, why, back], api_name="previous"
        )
        next_btn.click(
            go_next,
            inputs=[current, alpha, picked, back, order],
            outputs=[*view_outputs, why, picked, back],
            api_name="next",
        )

        def save(image_id: int | None, value: dict | None) -> tuple:
            msg = session.save(image_id, value)
            info = session.image_info(int(image_id)) if image_id is not None else ""
            return msg, info, session.progress_md(), gr.Dropdown(choices=session.image_choices(), value=image_id)

        save_btn.click(
            save, inputs=[current, editor], outputs=[save_msg, image_info, progress, picker], api_name="save"
        )

        def undo(image_id: int | None, a: float) -> tuple:
            msg = session.undo(image_id)
            return (msg, *show(image_id, a))

        undo_btn.click(undo, inputs=[current, alpha], outputs=[save_msg, *view_outputs], api_name="undo")

        def accept(image_id: int | None) -> tuple:
            value = session.preannotation_layer(image_id) if image_id is not None else None
            if value is None:
                return gr.skip(), "No pre-annotation yet."
            return value, "Pre-annotation copied into the editor: correct it, then Save."

        accept_btn.click(accept, inputs=[current], outputs=[editor, save_msg], api_name="use_preannotation")

        def redraw(image_id: int | None, a: float) -> tuple:
            if image_id is None:
                return gr.skip(), gr.skip(), gr.skip()
            ov, info, version = session.preannotation(int(image_id), alpha=a)
            return ov, info, version

        alpha.release(redraw, inputs=[current, alpha], outputs=[overlay, overlay_info, shown_version])

        def add_class(name: str, color: str | None) -> tuple:
            msg = session.add_class(name, color)
            return msg, session.legend_html(), gr.ImageEditor(brush=brush()), ""

        add_class_btn.click(
            add_class,
            inputs=[new_class, new_color],
            outputs=[class_msg, legend, editor, new_class],
            api_name="add_class",
        )
        train_btn.click(session.train_now, outputs=[save_msg], api_name="train_now")

        def poll(image_id: int | None, version: int | None, a: float, n_seen: int | None) -> tuple:
            session.predictor.refresh()
            status = session.trainer_md()
            rows = session.versions_rows()
            n_models = len(session.store.models())
            if n_models != n_seen:  # redraw the progress plot and table only when a version came or went
                iou_rows, iou_caption = session.class_iou_rows()
                plots = (session.miou_curve(), iou_rows, iou_caption, n_models)
            else:
                plots = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
            if image_id is not None and session.predictor.version is not None and session.predictor.version != version:
                ov, info, new_version = session.preannotation(int(image_id), alpha=a)
                umap, uinfo = session.uncertainty(int(image_id))
                return status, rows, ov, info, new_version, session.progress_md(), umap, uinfo, *plots
            skip = gr.skip()
            return status, rows, skip, skip, skip, session.progress_md(), skip, skip, *plots

        timer = gr.Timer(poll_s)
        timer.tick(
            poll,
            inputs=[current, shown_version, alpha, seen_models],
            outputs=[
                trainer_md,
                versions,
                overlay,
                overlay_info,
                shown_version,
                progress,
                uncertainty,
                uncertainty_info,
                curve,
                class_iou,
                class_iou_caption,
                seen_models,
            ],
            api_name="poll",
            show_progress="hidden",
        )

        def status() -> str:
            return session.trainer_md()

        def images() -> list[list]:
            return [[r.id, r.path, r.state] for r in session.store.images()]

        gr.api(status, api_name="status")
        gr.api(images, api_name="images")
    return demo
