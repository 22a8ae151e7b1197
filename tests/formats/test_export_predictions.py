"""``export-labels --include predictions``: the newest model's pre-annotations of the images nobody labelled go out
beside the labels, marked as predictions in each format's own way, and never come back in as labels."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_toy_model
from PIL import Image
from test_formats import _project, labelled  # noqa: F401 - labelled is a fixture

from labelsmart import config
from labelsmart.app.session import Session
from labelsmart.cli import main
from labelsmart.formats import import_labels
from labelsmart.formats import labelstudio as ls
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store


@pytest.fixture
def with_model(labelled: Store, tmp_path: Path) -> tuple[Store, dict[str, np.ndarray], list[str]]:  # noqa: F811
    """The labelled project with the toy model published; its predictions of the unlabelled images by path."""
    write_toy_model(tmp_path / "toy" / "v0001" / "model.onnx", max_side=64)
    labelled.add_model(1, tmp_path / "toy" / "v0001", labelled.snapshot(), status="published")
    labelled.publish_model(1, {})
    cfg = config.load({"dataset": str(tmp_path / "data"), "workdir": str(tmp_path / "a")}, env={})
    predictor = Predictor(labelled, cfg)
    unlabelled = [r for r in labelled.images() if r.labelled_pixels == 0]
    assert len(unlabelled) == 3  # two never labelled, one undone
    return labelled, {r.path: predictor.predict(r.id).mask for r in unlabelled}, ["--dataset", str(tmp_path / "data")]


def _export(tmp_path: Path, fmt: str, project: list[str]) -> Path:
    out = tmp_path / f"out-{fmt}"
    args = [*project, "--workdir", str(tmp_path / "a"), "--format", fmt, "--out", str(out)]
    assert main(["export-labels", *args, "--include", "predictions"]) == 0
    return out


def test_png_puts_them_in_their_own_folder(with_model, tmp_path: Path):
    store, predicted, project = with_model
    out = _export(tmp_path, "png", project)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["image"] for r in rows} == set(predicted) and all(r["model_version"] == "labelsmart-v0001" for r in rows)
    for r in rows:
        assert np.array_equal(np.asarray(Image.open(out / r["mask"])), predicted[r["image"]])
    _, other = _project(tmp_path, "b")
    assert import_labels(other, "png", out) == 3  # the labels only
    assert all(other.current_label(other.image_id_by_path(p)) is None for p in predicted)


def test_coco_marks_each_annotation_and_pycocotools_reads_them(with_model, tmp_path: Path):
    from pycocotools.coco import COCO

    store, predicted, project = with_model
    out = _export(tmp_path, "coco", project)
    coco = COCO(str(out / "coco.json"))
    by_name = {coco.imgs[i]["file_name"]: i for i in coco.imgs}
    for path, mask in predicted.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[by_name[path]]))
        preds = [a for a in anns if a.get("prediction")]
        assert preds and all(a["model_version"] == "labelsmart-v0001" and 0 < a["score"] <= 1 for a in preds)
        painted = np.full(mask.shape, 255, np.uint8)
        for a in preds:
            painted[coco.annToMask(a).astype(bool)] = a["category_id"] - 1
        assert np.array_equal(painted, mask)
    _, other = _project(tmp_path, "b")
    assert import_labels(other, "coco", out) == 3


def test_label_studio_and_cvat_mark_them_their_own_way(with_model, tmp_path: Path):
    store, predicted, project = with_model
    tasks = json.loads((_export(tmp_path, "labelstudio", project) / ls.TASKS_NAME).read_text())
    by_image = {t["data"]["image"]: t for t in tasks}
    assert len(by_image) == len(tasks) == len(store.images())
    for path, mask in predicted.items():
        (pred,) = by_image[path]["predictions"]
        assert pred["model_version"] == "labelsmart-v0001"
        classes = {c.name: c.id for c in store.classes()}
        assert np.array_equal(ls.mask_from_results(pred["result"], classes, *mask.shape, path), mask)
    root = ET.parse(_export(tmp_path, "cvat", project) / "annotations.xml").getroot()
    auto = {img.get("name") for img in root.iter("image") if any(m.get("source") == "auto" for m in img.iter("mask"))}
    assert auto == set(predicted)


def test_without_a_model_it_is_one_sentence_and_nothing_is_written(labelled: Store, tmp_path: Path, capsys):  # noqa: F811
    project = ["--dataset", str(tmp_path / "data"), "--workdir", str(tmp_path / "a")]
    args = [*project, "--format", "png", "--out", str(tmp_path / "o"), "--include", "predictions"]
    assert main(["export-labels", *args]) != 0
    assert "no model is published yet" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_page_exports_them_too(with_model, tmp_path: Path):
    store, predicted, _ = with_model
    cfg = config.load({"dataset": str(tmp_path / "data"), "workdir": str(tmp_path / "a")}, env={})
    session = Session(cfg, store, Predictor(store, cfg))
    path, msg = session.export_labels("png", "current", include_predictions=True)
    assert path is not None and "with pre-annotations" in msg
    with zipfile.ZipFile(path) as z:
        assert sum(n.endswith(".png") and "/predictions/" in n for n in z.namelist()) == len(predicted)
    assert session.export_labels("voc", "current", include_predictions=True)[0] is None
    assert list(Path(path).parent.iterdir()) == [Path(path)]  # nothing left behind but the zip


def test_a_full_disk_while_zipping_leaves_no_zip_and_says_so(labelled: Store, tmp_path: Path, monkeypatch):  # noqa: F811
    import errno
    import shutil

    cfg = config.load({"dataset": str(tmp_path / "data"), "workdir": str(tmp_path / "a")}, env={})
    session = Session(cfg, labelled, Predictor(labelled, cfg))

    def full(base_name: str, *_args, **_kwargs):
        Path(base_name + ".zip").write_bytes(b"PK half")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "make_archive", full)
    path, msg = session.export_labels("png", "current")
    assert path is None and "disk is full" in msg and msg.startswith("⚠️")
    assert list(session._export_folder().iterdir()) == []  # neither the zip nor the export folder
