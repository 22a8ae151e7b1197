"""Labels out and back in: png, voc and coco, read with the libraries other tools read them with (Pillow for the
PNG masks, pycocotools for COCO), round trips between projects, atomic imports and exports."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, scribbles, write_dataset
from PIL import Image

from labelsmart import config
from labelsmart.cli import main
from labelsmart.formats import FormatError, export_labels, import_labels
from labelsmart.project import open_project
from labelsmart.store import Store


def _project(tmp_path: Path, name: str, classes: list[dict] | None = None) -> tuple[config.Config, Store]:
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, n=6)
    if classes is not None:
        (tmp_path / f"{name}-classes.json").write_text(json.dumps(classes))
    cfg = config.load(
        {
            "dataset": str(data),
            "workdir": str(tmp_path / name),
            "models_dir": str(tmp_path / f"{name}-models"),
            "classes": str(tmp_path / f"{name}-classes.json") if classes is not None else None,
        },
        env={},
    )
    return cfg, open_project(cfg)


@pytest.fixture
def labelled(tmp_path: Path) -> Store:
    """Three labelled images (one saved twice), one labelled then undone, two never labelled."""
    _, store = _project(tmp_path, "a")
    data = tmp_path / "data"
    rows = store.images()
    for k, row in enumerate(rows[:4]):
        truth = np.asarray(Image.open(data / "masks" / Path(row.path).with_suffix(".png").name))
        store.save_label(row.id, scribbles(truth), author="alice")
        if k == 0:
            store.save_label(row.id, truth.astype(np.uint8), author="bob")  # dense, a second revision
    store.undo_label(rows[3].id)
    return store


def current_masks(store: Store) -> dict[str, np.ndarray]:
    return {r.path: store.current_label(r.id) for r in store.images() if r.labelled_pixels > 0}


def test_png_export_is_palette_masks_pillow_reads_and_a_classes_file(labelled: Store, tmp_path: Path):
    out = tmp_path / "png"
    assert export_labels(labelled, "png", out) == 3
    want = current_masks(labelled)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(p).with_suffix(".png").name for p in want)
    for path, mask in want.items():
        with Image.open(out / Path(path).with_suffix(".png")) as im:
            assert im.mode == "P" and im.size == (mask.shape[1], mask.shape[0])
            assert np.array_equal(np.asarray(im), mask)  # class ids, 255 where unlabelled
            palette = im.getpalette()
        for c in CLASSES:
            assert palette[3 * c["id"] : 3 * c["id"] + 3] == c["color"]
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    with pytest.raises(FormatError, match="exists and is not an empty folder"):
        export_labels(labelled, "png", out)


def test_coco_export_decodes_with_pycocotools_to_the_same_masks(labelled: Store, tmp_path: Path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    export_labels(labelled, "coco", out)
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "road", "car"]
    want = current_masks(labelled)
    assert sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds())) == sorted(want)
    for info in coco.loadImgs(coco.getImgIds()):
        mask = np.full((info["height"], info["width"]), 255, np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            region = coco.annToMask(ann).astype(bool)
            assert ann["iscrowd"] == 1 and ann["area"] == int(region.sum())
            assert not (mask[region] != 255).any()  # one class per pixel
            mask[region] = ann["category_id"] - 1
        assert np.array_equal(mask, want[info["file_name"]])  # unlabelled pixels are in no annotation


def test_voc_export_has_the_layout_datumaro_and_cvat_read(labelled: Store, tmp_path: Path):
    out = tmp_path / "voc"
    export_labels(labelled, "voc", out)
    want = current_masks(labelled)
    names = (out / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    assert sorted(names) == sorted(Path(p).with_suffix("").as_posix() for p in want)
    for path, mask in want.items():
        with Image.open(out / "SegmentationClass" / Path(path).with_suffix(".png")) as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im), mask)
    lines = (out / "labelmap.txt").read_text().splitlines()
    assert lines == ["# label:color_rgb:parts:actions", "sky:128,128,128::", "road:128,64,128::", "car:64,0,128::"]
    with pytest.raises(FormatError, match="one mask per image"):
        export_labels(labelled, "voc", tmp_path / "voc-all", revisions="all")
    assert not (tmp_path / "voc-all").exists() and not list(tmp_path.glob(".voc-all.*"))  # nothing half-written


def test_the_history_goes_out_with_authors_and_sources(labelled: Store, tmp_path: Path):
    revisions = sum(len(labelled.history(r.id)) for r in labelled.images())
    out = tmp_path / "png-all"
    assert export_labels(labelled, "png", out, revisions="all") == revisions == 6  # 4 saves, bob's, 1 undo
    lines = [json.loads(line) for line in (out / "revisions.jsonl").read_text().splitlines()]
    assert [h["author"] for h in lines].count("bob") == 1 and {h["source"] for h in lines} == {"human", "undo"}
    for h in lines:
        with Image.open(out / h["mask"]) as im:
            assert np.array_equal(np.asarray(im), labelled.load_revision(h["revision"]))
    coco = json.loads(_coco(labelled, tmp_path / "coco-all").read_text())
    assert len(coco["images"]) == 4  # the images with a history (one of them undone to nothing), not all six
    assert {a["revision"] for a in coco["annotations"]} <= {h["revision"] for h in lines}
    assert all(
        a["current"] is (a["revision"] in {h["revision"] for h in lines if h["current"]}) for a in coco["annotations"]
    )


def _coco(store: Store, out: Path) -> Path:
    export_labels(store, "coco", out, revisions="all")
    return out / "coco.json"


@pytest.mark.parametrize("fmt", ["png", "voc", "coco"])
def test_round_trip_into_a_project_with_the_classes_in_another_order(labelled: Store, tmp_path: Path, fmt: str):
    out = tmp_path / fmt
    export_labels(labelled, fmt, out)
    reordered = [{"name": c["name"], "color": c["color"]} for c in reversed(CLASSES)]
    _, other = _project(tmp_path, "b", classes=reordered)  # car=0, road=1, sky=2
    assert [c.name for c in other.classes()] == ["car", "road", "sky"]
    assert import_labels(other, fmt, out) == 3
    remap = np.arange(256, dtype=np.uint8)
    remap[:3] = [2, 1, 0]
    for path, mask in current_masks(labelled).items():
        row = next(r for r in other.images() if r.path == path)
        assert np.array_equal(other.current_label(row.id), remap[mask])
        assert other.current_revision(row.id).source == fmt
    assert import_labels(other, fmt, out) == 0  # the same labels again add nothing


def test_an_import_with_a_bad_file_imports_nothing(labelled: Store, tmp_path: Path):
    out = tmp_path / "coco"
    export_labels(labelled, "coco", out)
    data = json.loads((out / "coco.json").read_text())
    data["categories"][2]["name"] = "truck"
    (out / "coco.json").write_text(json.dumps(data))
    _, other = _project(tmp_path, "b", classes=CLASSES)
    with pytest.raises(FormatError, match=r"coco\.json: class 'truck' is not a class of this project"):
        import_labels(other, "coco", out)
    png = tmp_path / "png"
    export_labels(labelled, "png", png)
    first = sorted(png.glob("*.png"))[-1]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(first)  # the last mask read is the wrong size
    with pytest.raises(FormatError, match=rf"{first.name}: the mask is 5x5 but .* resize the mask"):
        import_labels(other, "png", png)
    assert all(not other.history(r.id) for r in other.images())  # one transaction: the good masks did not land


def test_cli_and_the_page_export_and_import(labelled: Store, tmp_path: Path, capsys):
    from labelsmart.app.session import Session
    from labelsmart.serving.predictor import Predictor

    cfg_a = config.load({"dataset": str(tmp_path / "data"), "workdir": str(tmp_path / "a")}, env={})
    project = ["--dataset", str(tmp_path / "data"), "--workdir", str(tmp_path / "a")]
    assert main(["export-labels", *project, "--format", "coco", "--out", str(tmp_path / "cli")]) == 0
    assert "3 label revisions of 6 images" in capsys.readouterr().out
    cfg_b, other = _project(tmp_path, "b", classes=CLASSES)
    into = ["--dataset", str(tmp_path / "data"), "--workdir", str(tmp_path / "b")]
    assert main(["import-labels", *into, "--format", "coco", str(tmp_path / "cli" / "coco.json")]) == 0
    assert capsys.readouterr().out.strip().startswith("imported 3 label revisions")
    assert main(["import-labels", *into, "--format", "coco", str(tmp_path / "nope.json")]) == 1
    assert "nope.json: no COCO file here" in capsys.readouterr().err

    session = Session(cfg_a, labelled, Predictor(labelled, cfg_a))
    path, msg = session.export_labels("voc", "current")
    assert path is not None and msg.startswith("Exported 3 label revisions")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert (
        any(n.endswith("labelmap.txt") for n in names)
        and sum("SegmentationClass/" in n and n.endswith(".png") for n in names) == 3
    )
    assert session.export_labels("voc", "all")[0] is None  # refused in words, no file
