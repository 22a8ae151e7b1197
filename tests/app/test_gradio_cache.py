"""What the page sends and takes through Gradio, kept cheap: a cached image is written whole (temporary file, then a
rename) and never rewritten in place while another request may be reading it; the editor's background is encoded
once per image; a save decodes only the editor's layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gradio import processing_utils
from PIL import Image

from labelsmart.app import layout


def test_a_cached_image_is_written_once_and_whole(tmp_path: Path):
    img = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    first = Path(layout._save_pil_to_cache(img, str(tmp_path)))
    inode = first.stat().st_ino
    again = Path(layout._save_pil_to_cache(img, str(tmp_path), format="webp"))
    assert again == first and again.stat().st_ino == inode  # not truncated and rewritten under a reader
    assert np.asarray(Image.open(first).convert("RGB")).shape == (48, 64, 3)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left
    png = Path(layout._save_pil_to_cache(img, str(tmp_path), format="png"))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(img))


def test_the_page_uses_it(tiny_cfg):
    from labelsmart.app.session import Session
    from labelsmart.project import open_project
    from labelsmart.serving.predictor import Predictor

    store = open_project(tiny_cfg)
    demo = layout.build_ui(Session(tiny_cfg, store, Predictor(store, tiny_cfg)))
    assert processing_utils.save_pil_to_cache is layout._save_pil_to_cache
    editor = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ls-editor")
    assert "preprocess" in vars(editor)  # reads only the layers
    assert not Path(layout.__file__).with_suffix(".pyi").exists()  # no component class of ours for Gradio to stub


def test_a_png_is_lossless_at_the_cheaper_level_and_the_same_bytes_make_one_file(tmp_path: Path):
    rgba = np.random.default_rng(0).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    path = Path(layout._save_pil_to_cache(Image.fromarray(rgba, "RGBA"), str(tmp_path), format="png"))
    assert np.array_equal(np.asarray(Image.open(path)), rgba)
    jpeg = Path(layout._save_pil_to_cache(Image.fromarray(rgba[..., :3]), str(tmp_path), format="jpeg"))
    assert Image.open(jpeg).format == "JPEG"


def test_the_editor_background_is_encoded_once_per_image_and_again_when_the_file_changes(tiny_cfg, tmp_path: Path):
    import os

    from labelsmart.app.session import Session
    from labelsmart.project import open_project
    from labelsmart.serving.predictor import Predictor

    store = open_project(tiny_cfg)
    session = Session(tiny_cfg, store, Predictor(store, tiny_cfg))
    backgrounds = layout._Backgrounds(session, str(tmp_path / "cache"))
    row = store.images()[0]
    value = session.view(row.id).editor
    first = backgrounds.editor_value(row.id, value)
    path = Path(first["background"])
    assert first["layers"] is value["layers"] and np.array_equal(np.asarray(Image.open(path)), value["background"])
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime - 10**9, mtime - 10**9))  # a rewrite would move it forward
    again = backgrounds.editor_value(row.id, session.view(row.id).editor)
    assert again["background"] == str(path) and path.stat().st_mtime_ns == mtime - 10**9
    path.unlink()  # Gradio's cache was cleared: made again
    assert Path(backgrounds.editor_value(row.id, value)["background"]).is_file()
    source = store.image_path(row.id)  # the image itself changed: its new pixels
    img = np.asarray(Image.open(source).convert("RGB"))
    Image.fromarray(255 - img).save(source)
    changed = backgrounds.editor_value(row.id, session.view(row.id).editor)
    assert np.array_equal(np.asarray(Image.open(changed["background"])), 255 - img)


def test_the_editor_reads_only_its_layers(tmp_path: Path):
    import gradio as gr
    from gradio.components.image_editor import EditorData, EditorDataBlobs
    from gradio.data_classes import FileData

    editor = layout._read_layers_only(gr.ImageEditor(type="numpy", image_mode="RGBA", format="png", render=False))
    layer = np.zeros((6, 8, 4), np.uint8)
    layer[2:4, 1:5] = (128, 64, 128, 128)
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    (tmp_path / "broken.png").write_bytes(b"not an image: never opened")
    sent = EditorData(
        background=FileData(path=str(tmp_path / "broken.png")),
        layers=[FileData(path=str(tmp_path / "layer.png"))],
        composite=FileData(path=str(tmp_path / "broken.png")),
    )
    value = editor.preprocess(sent)
    assert value["background"] is None and value["composite"] is None
    assert len(value["layers"]) == 1 and np.array_equal(value["layers"][0], layer)
    # The page sends its images ahead as blobs and then the value with their id: taken once.
    png = (tmp_path / "layer.png").read_bytes()
    editor.blob_storage["x"] = EditorDataBlobs(background=b"junk", layers=[png], composite=b"junk")
    value = editor.preprocess(EditorData(id="x"))
    assert np.array_equal(value["layers"][0], layer) and "x" not in editor.blob_storage
    assert editor.preprocess(EditorData(id="x")) == {"background": None, "layers": [], "composite": None}
    assert editor.preprocess(None) is None
