"""The labelling page: all layout and wiring in one ``build_ui``, over the handlers of :class:`Session`.

Only ``app.py`` calls ``launch()``. Gradio is imported by this module only (the handlers in
:mod:`~labelsmart.app.session` run without it); at module level, so that handlers can ask for ``gr.Request``.
"""

from __future__ import annotations

import html
import io
import json
import os
import tempfile
import types
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio import processing_utils
from PIL import Image

from labelsmart.app.session import LABEL_OPACITY, Session, hex_color

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
      for (let t = 0; t < 200 && !swatches().length; t++) await sleep(50);  // the palette opens (slow pages too)
    }
    const s = swatches();
    if (s[i]) { s[i].click(); document.body.dataset.lsBrushClass = String(i); }  // said, for scripts and tests
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

EXPORT_FORMATS = [
    ("PNG masks + classes.json", "png"),
    ("Pascal VOC", "voc"),
    ("COCO JSON (RLE)", "coco"),
    ("Label Studio tasks (brush RLE)", "labelstudio"),
    ("CVAT (segmentation mask zip + XML)", "cvat"),
]
VERSION_HEADERS = ["version", "status", "labelled images", "labelled pixels", "val mIoU %", "steps", "seconds", "time"]


# How the page encodes the images it sends: PNG at zlib level 1 (lossless, 4x faster than Gradio's level 6, about 15 %
# larger), JPEG at quality 90 (the overlays and maps, pictures to look at, never read back).
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90
# The editor's background is the project's own image and the same file for every annotator and every open, so it is
# encoded once per image (``_Backgrounds``); this many are remembered.
BACKGROUNDS_KEPT = 4096
# Gradio recomputes its monitoring summary (a pandas group-by over up to 10 000 past events, about 7 ms) after every
# event by default; every 100 events is plenty for the monitoring page.
ANALYTICS_EVERY = "100"


def _encode(img: Any, format: str) -> bytes:  # noqa: A002
    """An image's bytes in ``format``: Gradio's ``encode_pil_to_bytes``, with cheaper settings for PNG and JPEG."""
    fmt = format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        return processing_utils.encode_pil_to_bytes(img, format)
    with io.BytesIO() as out:
        if fmt == "png":
            img.save(out, "png", pnginfo=processing_utils.get_pil_metadata(img), compress_level=PNG_COMPRESS_LEVEL)
        else:
            img.convert("RGB").save(out, "jpeg", quality=JPEG_QUALITY)
        return out.getvalue()


def _save_pil_to_cache(img: Any, cache_dir: str, name: str = "image", format: str = "webp") -> str:  # noqa: A002
    """Gradio 6.31's ``processing_utils.save_pil_to_cache``, written through a temporary file and ``os.replace``.

    Gradio names a cached image by the hash of its bytes and rewrites the file in place on every call, so when two
    annotators open the same image at once, one download can read the file while the other request truncates and
    rewrites it (h11: "Too little data for declared Content-Length"; found by ``bench load``). The same bytes make
    the same file, so a file already there is kept, and a new one appears whole or not at all. PNG and JPEG are
    encoded with the cheaper settings of :func:`_encode`.
    """
    data = _encode(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return str(path)


def _read_layers_only(editor: gr.ImageEditor) -> gr.ImageEditor:
    """``editor``, made to decode only the layers of the values the page sends (``background`` and ``composite``
    come back None).

    A save reads the painted layers alone: the background is the project's own image and the composite only the two
    drawn together, and decoding both (two more full-size PNGs) was most of a save's own work. It is this instance's
    ``preprocess`` rather than a subclass because Gradio writes a ``.pyi`` stub next to the module of every
    component class (and fails where it cannot write). A session that gets a new editor from an update (Add class)
    decodes everything again: slower, the same labels.
    """

    def preprocess(self: gr.ImageEditor, payload: Any) -> dict[str, Any] | None:
        if payload is None:
            return None
        if payload.id is not None:  # images sent ahead as blobs (accept_blobs): taken once
            cached = self.blob_storage.pop(payload.id, None)
            files = cached.layers if cached is not None else []
        else:
            files = payload.layers
        layers = [self.convert_and_format_image(f) for f in files or []]
        return {"background": None, "layers": [x for x in layers if x is not None], "composite": None}

    editor.preprocess = types.MethodType(preprocess, editor)
    return editor


class _Backgrounds:
    """The editor's background of each image as a file in Gradio's cache, encoded once (not at every open).

    A file is reused while the image file keeps its size and modification time, and while it is still there.
    """

    def __init__(self, session: Session, cache_dir: str) -> None:
        self.session = session
        self.cache_dir = cache_dir
        self._files: dict[int, tuple[tuple[int, int], str]] = {}

    def file(self, image_id: int, image: np.ndarray) -> str:
        """The cached file of ``image`` (the pixels of image ``image_id``), made now if there is none."""
        st = self.session.store.image_path(image_id).stat()
        stamp = (st.st_mtime_ns, st.st_size)
        known = self._files.get(image_id)
        if known is not None and known[0] == stamp and os.path.exists(known[1]):
            return known[1]
        path = _save_pil_to_cache(Image.fromarray(image), self.cache_dir, name="background", format="png")
        if len(self._files) >= BACKGROUNDS_KEPT:
            self._files.pop(next(iter(self._files)))
        self._files[image_id] = (stamp, path)
        return path

    def editor_value(self, image_id: int, value: dict[str, Any]) -> dict[str, Any]:
        """``value`` (background, layers, composite) with its background array replaced by the cached file."""
        bg = value.get("background")
        if isinstance(bg, np.ndarray):
            value = {**value, "background": self.file(image_id, bg)}
        return value


def build_ui(session: Session, poll_s: float = 2.0) -> Any:
    """All layout and wiring of the labelling page. Returns a ``gr.Blocks``; the caller launches it.

    One long function on purpose (STYLE.md, convention 7): Gradio wires events to components created inside the
    same ``gr.Blocks`` context, and the page's twenty-odd components are read and written by many events, so
    the page reads top to bottom here as it looks, and every handler it calls is a plain, tested method of
    :class:`Session`.
    """
    processing_utils.save_pil_to_cache = _save_pil_to_cache  # see there: several annotators on one image
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", ANALYTICS_EVERY)  # read by demo.queue(), in app.py

    def brush() -> gr.Brush:
        # Class colours at the label layer's opacity (Gradio's (colour, opacity) pairs): strokes show the photo
        # under them, and read back as their class whatever their alpha (session.layer_to_mask).
        colors = [(hex_color(c), LABEL_OPACITY) for c in session.colors()] or [("#000000", LABEL_OPACITY)]
        return gr.Brush(colors=colors, default_color=colors[0], color_mode="fixed", default_size=8)

    with gr.Blocks(title="labelsmart") as demo:
        current = gr.State(None)  # image id on screen
        base_rev = gr.State(None)  # label revision the editor was loaded with; a save is based on it
        shown_version = gr.State(None)  # model version of the overlay on screen
        picked = gr.State([])  # images Next offered in this session (not offered again)
        back = gr.State([])  # images left with Next, for Previous
        seen_models = gr.State(None)  # number of model versions when the progress plot was drawn
        listed = gr.State(None)  # the image list the picker holds: sent again only when it changed
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
                with gr.Accordion("Export labels", open=False):
                    export_format = gr.Dropdown(EXPORT_FORMATS, value="png", label="Format", elem_id="ls-export-format")
                    export_revisions = gr.Radio(
                        [("current labels", "current"), ("the whole history", "all")], value="current", label="What"
                    )
                    export_predictions = gr.Checkbox(
                        False, label="Add the newest model's pre-annotations of unlabelled images (marked)"
                    )
                    export_btn = gr.Button("Export labels", elem_id="ls-export")
                    export_file = gr.File(label="Download", interactive=False, elem_id="ls-export-file")
                    export_msg = gr.Markdown(elem_id="ls-export-msg")
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
                _read_layers_only(editor)
                with gr.Row():
                    save_btn = gr.Button("Save", variant="primary", elem_id="ls-save")
                    accept_btn = gr.Button("Use pre-annotation", elem_id="ls-accept")
                    undo_btn = gr.Button("Undo last save", elem_id="ls-undo")
                save_msg = gr.Markdown(elem_id="ls-save-msg")
                with gr.Column(visible=False, elem_id="ls-conflict") as conflict_box:  # someone else saved meanwhile
                    conflict_img = gr.Image(
                        label="Saved meanwhile by someone else",
                        type="numpy",
                        format="jpeg",
                        interactive=False,
                        elem_id="ls-newer",
                    )
                    with gr.Row():
                        merge_btn = gr.Button("Merge my strokes onto theirs", elem_id="ls-merge")
                        keep_btn = gr.Button("Keep mine", elem_id="ls-keep-mine")
            with gr.Column(scale=2, min_width=300):
                overlay = gr.Image(
                    label="Pre-annotation", type="numpy", format="jpeg", interactive=False, elem_id="ls-overlay"
                )
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                overlay_info = gr.Markdown(elem_id="ls-overlay-info")
                uncertainty = gr.Image(
                    label="Uncertainty (bright = unsure)",
                    type="numpy",
                    format="jpeg",
                    interactive=False,
                    elem_id="ls-uncertainty",
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

        backgrounds = _Backgrounds(session, editor.GRADIO_CACHE)

        def picker_update(image_id: int, shown: list | None) -> tuple[Any, Any]:
            """The picker on ``image_id``, and the list it holds: the list is sent only when it changed."""
            choices = session.image_choices()
            if choices == shown:
                return gr.Dropdown(value=image_id), gr.skip()
            return gr.Dropdown(choices=choices, value=image_id), choices

        def show(image_id: int | None, a: float, shown: list | None) -> tuple:
            v = session.view(image_id, a)
            picker_value, shown = picker_update(v.image_id, shown)
            return (
                v.image_id,
                backgrounds.editor_value(v.image_id, v.editor),
                v.overlay,
                v.overlay_info,
                v.image_info,
                v.version,
                picker_value,
                v.uncertainty,
                v.uncertainty_info,
                v.revision,
                gr.Column(visible=False),
                shown,
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
            base_rev,
            conflict_box,
            listed,
        ]

        def go_next(
            image_id: int | None, a: float, shown: list | None, seen: list[int], left: list[int], how: str
        ) -> tuple:
            nxt, reason = session.next_image(image_id, seen, how)
            seen = [*(seen or []), nxt] if how == "suggested" else list(seen or [])
            left = [*(left or []), image_id][-100:] if image_id is not None else list(left or [])
            return (*show(nxt, a, shown), reason, seen, left)

        def go_previous(image_id: int | None, a: float, shown: list | None, left: list[int]) -> tuple:
            left = list(left or [])
            prev = left.pop() if left else session.neighbour(image_id, -1)
            return (*show(prev, a, shown), "", left)

        def open_image(image_id: int | None, a: float, shown: list | None) -> tuple:
            return (*show(image_id, a, shown), "")

        demo.load(lambda a, shown: show(None, a, shown), inputs=[alpha, listed], outputs=view_outputs, api_name="load")
        demo.load(None, js=SHORTCUTS_JS)
        picker.input(open_image, inputs=[picker, alpha, listed], outputs=[*view_outputs, why], api_name="open_image")
        prev_btn.click(
            go_previous, inputs=[current, alpha, listed, back], outputs=[*view_outputs, why, back], api_name="previous"
        )
        next_btn.click(
            go_next,
            inputs=[current, alpha, listed, picked, back, order],
            outputs=[*view_outputs, why, picked, back],
            api_name="next",
        )

        def save(
            image_id: int | None, value: dict | None, base: int | None, shown: list | None, request: gr.Request
        ) -> tuple:
            result = session.save_labels(image_id, value, based_on=base, author=request.username)
            info = session.image_info(int(image_id)) if image_id is not None else ""
            newer = session.conflict(image_id, base) if result.stale else None
            if result.revision is not None:
                base = result.revision  # saved (or nothing to save): the editor holds that revision now
            box = (gr.Column(visible=newer is not None), newer if newer is not None else gr.skip())
            rows = session.store.images()  # read once for the list and the counts
            choices = session.image_choices(rows)
            if image_id is None or choices == shown:  # the picker shows this image already, with these marks
                picker_value, shown = gr.skip(), gr.skip()
            else:
                picker_value, shown = gr.Dropdown(choices=choices, value=image_id), choices
            return result.message, info, session.progress_md(rows), picker_value, base, *box, shown

        save_btn.click(
            save,
            inputs=[current, editor, base_rev, listed],
            outputs=[save_msg, image_info, progress, picker, base_rev, conflict_box, conflict_img, listed],
            api_name="save",
        )

        def merge(
            image_id: int | None,
            value: dict | None,
            base: int | None,
            a: float,
            shown: list | None,
            request: gr.Request,
        ) -> tuple:
            return (session.merge(image_id, value, base, author=request.username), *show(image_id, a, shown))

        merge_btn.click(
            merge,
            inputs=[current, editor, base_rev, alpha, listed],
            outputs=[save_msg, *view_outputs],
            api_name="merge",
        )

        def keep_mine(
            image_id: int | None, value: dict | None, a: float, shown: list | None, request: gr.Request
        ) -> tuple:
            return (session.keep_mine(image_id, value, author=request.username), *show(image_id, a, shown))

        keep_btn.click(
            keep_mine, inputs=[current, editor, alpha, listed], outputs=[save_msg, *view_outputs], api_name="keep_mine"
        )

        def undo(image_id: int | None, a: float, base: int | None, shown: list | None, request: gr.Request) -> tuple:
            msg = session.undo(image_id, based_on=base, author=request.username)
            return (msg, *show(image_id, a, shown))

        undo_btn.click(
            undo, inputs=[current, alpha, base_rev, listed], outputs=[save_msg, *view_outputs], api_name="undo"
        )

        def accept(image_id: int | None) -> tuple:
            value = session.preannotation_layer(image_id) if image_id is not None else None
            if value is None:
                return gr.skip(), "No pre-annotation yet."
            value = backgrounds.editor_value(int(image_id), value)
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

        def export_labels(fmt: str, revisions: str, predictions: bool, progress: gr.Progress = gr.Progress()) -> tuple:
            def step(done: int, total: int) -> None:
                progress((done, total), desc="exporting labels", unit="images")

            path, msg = session.export_labels(fmt, revisions, step, include_predictions=bool(predictions))
            return path, msg

        export_btn.click(
            export_labels,
            inputs=[export_format, export_revisions, export_predictions],
            outputs=[export_file, export_msg],
            api_name="export_labels",
        )

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
