"""The shared data-folder layout (one reader, checked) and evaluation over a split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset

from labelsmart.datasets import DataFolder, DatasetError, evaluate


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """8 toy scenes in the shared layout: train = frame_000..003, val = frame_004..007."""
    return write_dataset(tmp_path / "data", n=8)


def test_metric_matches_a_hand_computed_confusion_matrix(data: Path):
    folder = DataFolder.open(data, "--eval")
    names = folder.names("val")[:2]
    gts = [folder.read(n)[1] for n in names]
    # Predict "road" (1) everywhere: row c of the confusion matrix puts all pixels of class c in column 1.
    res = evaluate(lambda image: np.ones(image.shape[:2], np.uint8), folder, names)
    counts = np.bincount(np.concatenate([g.ravel() for g in gts]), minlength=3)[:3]
    expected = np.zeros((3, 3), np.int64)
    expected[:, 1] = counts
    assert np.array_equal(np.array(res["confusion"]), expected)
    road_iou = counts[1] / counts.sum()  # tp = road pixels; union = all pixels (everything predicted road)
    assert res["per_class_iou"] == {0: 0.0, 1: pytest.approx(road_iou), 2: 0.0}
    assert res["miou"] == pytest.approx(road_iou / 3)
    assert res["pixel_acc"] == pytest.approx(road_iou)
    assert res["images"] == 2


def test_folder_reads_splits_classes_images_and_masks(data: Path):
    folder = DataFolder.open(data)
    assert folder.classes == ("sky", "road", "car") and folder.colors[1] == (128, 64, 128)
    assert folder.names("train") == ["frame_000", "frame_001", "frame_002", "frame_003"]
    assert folder.image_rel("frame_004") == Path("frame_004.png")
    image, mask = folder.read("frame_004")
    assert image.shape == (96, 128, 3) and mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 1, 2}


def test_a_folder_off_the_layout_is_one_sentence_naming_the_file(data: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match="nope: not a folder.*pass --pool a folder with images/"):
        DataFolder.open(tmp_path / "nope", "--pool")
    (data / "splits.json").rename(data / "splits.old")
    with pytest.raises(DatasetError, match=r"splits.json is missing; pass --dataset a folder"):
        DataFolder.open(data)
    (data / "splits.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"splits.json: not readable JSON"):
        DataFolder.open(data)
    (data / "splits.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DatasetError, match=r"expected \{split name: \[image names\]\}"):
        DataFolder.open(data)
    (data / "splits.json").write_text(json.dumps({"val": [], "test": ["ghost"]}))
    (data / "classes.json").write_text(json.dumps([{"name": "a", "color": "red"}]))
    with pytest.raises(DatasetError, match=r"classes.json: colour 'red' is not #rrggbb"):
        DataFolder.open(data)
    (data / "classes.json").write_text(json.dumps(["sky", "road"]))
    folder = DataFolder.open(data)
    with pytest.raises(DatasetError, match=r"no split 'train'; pick one of: test, val\."):
        folder.names("train")
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        folder.names("val")
    with pytest.raises(DatasetError, match="ghost: no image file with this name"):
        folder.image_rel(folder.names("test")[0])
    with pytest.raises(ValueError, match="class ids"):  # masks hold class 2, classes.json lists two classes
        folder.read("frame_000")
