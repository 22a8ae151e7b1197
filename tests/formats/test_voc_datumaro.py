"""The ``voc`` export read by Datumaro's own ``voc_segmentation`` importer (in its own virtualenv), and by our own
reader, old exports included."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, interop_python, scribbles
from PIL import Image
from test_formats import _project, current_masks, labelled  # noqa: F401

from labelsmart import imageio
from labelsmart.formats import export_labels, import_labels
from labelsmart.store import Store

VOID = "ignored"  # Datumaro's name for Pascal VOC's void (index 255, colour 224,224,192)

DATUMARO_SCRIPT = """
import json, sys
import numpy as np
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset

ds = Dataset.import_from(sys.argv[1], "voc_segmentation")
labels = ds.categories()[AnnotationType.label]
colors = ds.categories()[AnnotationType.mask].colormap
out = {"labels": [[l.name, list(map(int, colors[i]))] for i, l in enumerate(labels.items)], "items": {}}
for item in ds:
    out["items"][item.id] = [
        [labels[a.label].name, list(np.asarray(a.image).shape), np.flatnonzero(np.asarray(a.image, bool)).tolist()]
        for a in item.annotations
        if a.type == AnnotationType.mask
    ]
print(json.dumps(out))
"""


def _label(store: Store, data: Path) -> None:
    """The ``labelled`` fixture's labels in another project: three images scribbled (one densely), one undone."""
    rows = store.images()
    for k, row in enumerate(rows[:4]):
        truth = np.asarray(Image.open(data / "masks" / Path(row.path).with_suffix(".png").name))
        store.save_label(row.id, truth.astype(np.uint8) if k == 0 else scribbles(truth), author="alice")
    store.undo_label(rows[3].id)


def _datumaro(python: str, folder: Path) -> dict:
    proc = subprocess.run(
        [python, "-c", DATUMARO_SCRIPT, str(folder)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.interop
@pytest.mark.parametrize("colours", ["own", "void and repeated"])
def test_datumaro_reads_the_voc_export_as_our_masks_with_unlabelled_pixels_void(tmp_path: Path, colours: str):
    python = interop_python("datumaro")
    classes = CLASSES
    if colours != "own":  # sky in VOC's void colour, car in road's
        classes = [{"name": "sky", "color": [224, 224, 192]}, {"name": "road", "color": [128, 0, 0]}]
        classes.append({"name": "car", "color": [128, 0, 0]})
    _, store = _project(tmp_path, "c", classes=classes)
    _label(store, tmp_path / "data")
    out = tmp_path / "voc"
    assert export_labels(store, "voc", out) == 3
    got = _datumaro(python, out)

    names = [c.name for c in store.classes()]
    assert [n for n, _ in got["labels"]] == [*names, VOID]
    colors = {name: tuple(color) for name, color in got["labels"]}
    assert colors[VOID] == (224, 224, 192) and len(set(colors.values())) == len(colors)  # every label apart
    want = {Path(p).with_suffix("").as_posix(): m for p, m in current_masks(store).items()}
    assert sorted(got["items"]) == sorted(want)
    assert any((m == 255).any() for m in want.values()) and any((m != 255).all() for m in want.values())
    for item, mask in want.items():
        decoded = np.full(mask.size, 254, np.uint8)  # 254: a pixel no Datumaro annotation covered
        seen = []
        for name, shape, pixels in got["items"][item]:
            assert shape == list(mask.shape) and name not in seen  # one full-size mask per label
            seen.append(name)
            assert (decoded[pixels] == 254).all()  # one label per pixel
            decoded[pixels] = 255 if name == VOID else names.index(name)
        # every pixel read, the classes exactly ours, unlabelled pixels VOC's void (no class of ours)
        assert np.array_equal(decoded.reshape(mask.shape), mask)
        assert (VOID in seen) == bool((mask == 255).any())


def test_the_void_colour_and_repeated_colours_get_colours_of_their_own(tmp_path: Path, caplog):
    classes = [{"name": "sky", "color": [224, 224, 192]}, {"name": "road", "color": [128, 0, 0]}]
    classes.append({"name": "car", "color": [128, 0, 0]})
    _, store = _project(tmp_path, "c", classes=classes)
    _label(store, tmp_path / "data")
    out = tmp_path / "voc"
    with caplog.at_level(logging.WARNING, logger="labelsmart.formats.voc"):
        assert export_labels(store, "voc", out) == 3
    assert "'sky'" in caplog.text and "'car'" in caplog.text and "'road'" not in caplog.text
    lines = (out / "labelmap.txt").read_text().splitlines()[1:]
    assert lines == ["sky:0,128,0::", "road:128,0,0::", "car:128,128,0::"]  # the first VOC colours free
    meta = json.loads((out / "dataset_meta.json").read_text())
    assert meta["labels"] == ["sky", "road", "car", VOID]
    assert meta["segmentation_colors"] == [[0, 128, 0], [128, 0, 0], [128, 128, 0], [224, 224, 192]]
    for path, mask in current_masks(store).items():
        with Image.open(out / "SegmentationClass" / Path(path).with_suffix(".png")) as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im), mask)  # ids stay ids, 255 stays 255
            palette = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
        assert palette[:3].tolist() == [[0, 128, 0], [128, 0, 0], [128, 128, 0]]
        assert palette[255].tolist() == [224, 224, 192]  # VOC's void
    assert [c.color for c in store.classes()] == [(224, 224, 192), (128, 0, 0), (128, 0, 0)]  # the project's own


def test_a_class_named_like_the_void_leaves_the_void_another_name(tmp_path: Path):
    _, store = _project(tmp_path, "c", classes=[{"name": VOID, "color": [1, 2, 3]}, "other"])
    out = tmp_path / "voc"
    export_labels(store, "voc", out)
    assert json.loads((out / "dataset_meta.json").read_text())["labels"] == [VOID, "other", f"{VOID}_"]


def test_our_reader_reads_old_exports_with_black_void_and_no_meta_file(labelled: Store, tmp_path: Path):  # noqa: F811
    out = tmp_path / "voc"
    export_labels(labelled, "voc", out)
    (out / "dataset_meta.json").unlink()  # as exports before it wrote one
    colors = [c.color for c in labelled.classes()]
    for path, mask in current_masks(labelled).items():  # palette index 255 black, as they wrote it
        imageio.atomic_write_bytes(
            out / "SegmentationClass" / Path(path).with_suffix(".png"), imageio.palette_png_bytes(mask, colors)
        )
    _, other = _project(tmp_path, "b", classes=CLASSES)
    assert import_labels(other, "voc", out) == 3
    for path, mask in current_masks(labelled).items():
        row = next(r for r in other.images() if r.path == path)
        assert np.array_equal(other.current_label(row.id), mask)
