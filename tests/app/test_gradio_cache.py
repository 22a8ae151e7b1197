"""Gradio's image cache under several annotators: a cached image is written whole (temporary file, then a rename)
and never rewritten in place while another request may be reading it."""

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
    layout.build_ui(Session(tiny_cfg, store, Predictor(store, tiny_cfg)))
    assert processing_utils.save_pil_to_cache is layout._save_pil_to_cache
