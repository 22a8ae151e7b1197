"""The ``cvat`` format: CVAT's Segmentation mask zip and CVAT for images XML, checked with an RLE decoder written
from CVAT's definition, round trips between projects, the files CVAT itself writes, and Datumaro's own readers
(in their own virtualenv: ``.interop/datumaro`` or ``LABELSMART_DATUMARO_PYTHON``, as conftest's
``interop_python`` finds it)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import test_formats
from conftest import CLASSES, interop_python, scribbles
from PIL import Image
from test_formats import _project, current_masks

from labelsmart.formats import ExportOptions, FormatError, PredictedImage, export_labels, import_labels
from labelsmart.formats.cvat import rle_decode, rle_encode
from labelsmart.store import Store

labelled = test_formats.labelled  # the shared fixture: three labelled images, one undone, two never labelled

REORDERED = [{"name": c["name"], "color": c["color"]} for c in reversed(CLASSES)]  # car=0, road=1, sky=2
REMAP = np.arange(256, dtype=np.uint8)
REMAP[:3] = [2, 1, 0]  # the labelled project's ids -> the reordered project's


def _cvat_decode(rle: str, width: int, height: int) -> np.ndarray:
    """CVAT's definition, pixel by pixel: runs over the box in row-major order, the first one of 0s."""
    box = np.zeros(width * height, bool)
    offset, value = 0, False
    for run in (int(v) for v in rle.split(",")):
        box[offset : offset + run] = value
        offset, value = offset + run, not value
    assert offset == width * height
    return box.reshape(height, width)


def _xml_masks(xml: Path, sources: tuple[str, ...] = ("manual",)) -> dict[str, np.ndarray]:
    """``{image name: (H, W) label index mask, 255 elsewhere}`` of our XML, by the label list order."""
    root = ET.parse(xml).getroot()
    names = [label.findtext("name") for label in root.iter("label")]
    out = {}
    for image in root.iter("image"):
        w, h = int(image.get("width")), int(image.get("height"))
        mask = np.full((h, w), 255, np.uint8)
        for m in image.iter("mask"):
            if m.get("source") not in sources:
                continue
            left, top, bw, bh = (int(m.get(k)) for k in ("left", "top", "width", "height"))
            box = _cvat_decode(m.get("rle"), bw, bh)
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # a tight box
            region = mask[top : top + bh, left : left + bw]
            assert (region[box] == 255).all()  # one class per pixel
            region[box] = names.index(m.get("label"))
        out[image.get("name")] = mask
    return out


def _label(store: Store, data: Path) -> None:
    """The ``labelled`` fixture's labels, in another project: three images labelled, one undone."""
    rows = store.images()
    for row in rows[:4]:
        truth = np.asarray(Image.open(data / "masks" / Path(row.path).with_suffix(".png").name))
        store.save_label(row.id, scribbles(truth), author="alice")
    store.undo_label(rows[3].id)


def _rezip(path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite the zip at ``path`` with some members replaced."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_rle_runs_are_row_major_over_the_box_and_start_with_background():
    assert rle_encode(np.array([[0, 1, 1], [1, 0, 0]], bool)) == [1, 3, 2]
    assert rle_encode(np.array([[1, 0], [0, 1]], bool)) == [0, 1, 2, 1]  # first pixel set: an empty first run
    assert rle_encode(np.ones((2, 3), bool)) == [0, 6]
    rng = np.random.default_rng(0)
    box = rng.random((7, 11)) < 0.4
    assert np.array_equal(rle_decode(rle_encode(box), 11, 7, "x"), box)
    assert np.array_equal(_cvat_decode(", ".join(map(str, rle_encode(box))), 11, 7), box)
    with pytest.raises(FormatError, match="covers 5 pixels but its box is 2x3"):
        rle_decode([1, 4], 2, 3, "x")


def test_export_is_a_segmentation_mask_zip_and_an_xml_of_the_same_labels(labelled: Store, tmp_path: Path):
    out = tmp_path / "cvat"
    assert export_labels(labelled, "cvat", out) == 3
    assert sorted(p.name for p in out.iterdir()) == ["annotations.xml", "segmentation_mask.zip"]
    want = current_masks(labelled)
    stems = sorted(Path(p).with_suffix("").as_posix() for p in want)
    with zipfile.ZipFile(out / "segmentation_mask.zip") as z:
        assert z.read("labelmap.txt").decode().splitlines() == [
            "# label:color_rgb:parts:actions",
            "background:0,0,0::",
            "sky:128,128,128::",
            "road:128,64,128::",
            "car:64,0,128::",
        ]
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == stems
        assert sorted(n for n in z.namelist() if n.startswith("SegmentationClass/")) == [
            f"SegmentationClass/{s}.png" for s in stems
        ]
        assert not any(n.startswith("SegmentationObject/") for n in z.namelist())
        colors = np.array([c["color"] for c in CLASSES] + [[0, 0, 0]] * 253, np.uint8)
        colors[255] = 0
        for path, mask in want.items():
            with Image.open(io.BytesIO(z.read(f"SegmentationClass/{Path(path).with_suffix('').as_posix()}.png"))) as im:
                assert im.mode == "RGB"
                assert np.array_equal(np.asarray(im), colors[mask])  # class colours, unlabelled black
    root = ET.parse(out / "annotations.xml").getroot()
    assert root.findtext("version") == "1.1" and root.find("meta/task") is not None
    labels = [(x.findtext("name"), x.findtext("color"), x.findtext("type")) for x in root.iter("label")]
    assert labels == [("sky", "#808080", "mask"), ("road", "#804080", "mask"), ("car", "#400080", "mask")]
    images = root.findall("image")
    assert [i.get("name") for i in images] == sorted(want)
    assert [i.get("id") for i in images] == ["0", "1", "2"]  # places in the project's path order
    assert {(m.get("source"), m.get("occluded"), m.get("z_order")) for m in root.iter("mask")} == {("manual", "0", "0")}
    masks = _xml_masks(out / "annotations.xml")
    assert masks.keys() == want.keys()
    for path, mask in want.items():
        assert np.array_equal(masks[path], mask)  # unlabelled pixels are in no mask


@pytest.mark.parametrize("given", ["folder", "zip", "xml"])
def test_round_trip_into_a_project_with_the_classes_in_another_order(labelled: Store, tmp_path: Path, given: str):
    out = tmp_path / "cvat"
    export_labels(labelled, "cvat", out)
    path = {"folder": out, "zip": out / "segmentation_mask.zip", "xml": out / "annotations.xml"}[given]
    _, other = _project(tmp_path, "b", classes=REORDERED)
    assert import_labels(other, "cvat", path) == 3
    for p, mask in current_masks(labelled).items():
        row = next(r for r in other.images() if r.path == p)
        assert np.array_equal(other.current_label(row.id), REMAP[mask])
        assert other.current_revision(row.id).source == "cvat"
    assert import_labels(other, "cvat", path) == 0  # the same labels again add nothing


def test_black_and_repeated_colours_get_colours_of_their_own(tmp_path: Path, caplog):
    classes = [{"name": "sky", "color": [0, 0, 0]}, {"name": "road", "color": [128, 0, 0]}]
    classes.append({"name": "car", "color": [128, 0, 0]})
    _, store = _project(tmp_path, "c", classes=classes)
    _label(store, tmp_path / "data")
    out = tmp_path / "cvat"
    with caplog.at_level(logging.WARNING, logger="labelsmart.formats.cvat"):
        assert export_labels(store, "cvat", out) == 3
    assert "'sky'" in caplog.text and "'car'" in caplog.text and "'road'" not in caplog.text
    with zipfile.ZipFile(out / "segmentation_mask.zip") as z:
        lines = z.read("labelmap.txt").decode().splitlines()[1:]
    # sky: VOC colour 1 (128,0,0) is road's, so colour 2; car: the next one free
    assert lines == ["background:0,0,0::", "sky:0,128,0::", "road:128,0,0::", "car:128,128,0::"]
    root = ET.parse(out / "annotations.xml").getroot()
    assert [x.findtext("color") for x in root.iter("label")] == ["#008000", "#800000", "#808000"]
    assert [c.color for c in store.classes()] == [(0, 0, 0), (128, 0, 0), (128, 0, 0)]  # the project keeps its own
    _, other = _project(tmp_path, "b", classes=REORDERED)
    assert import_labels(other, "cvat", out / "segmentation_mask.zip") == 3
    for p, mask in current_masks(store).items():
        row = next(r for r in other.images() if r.path == p)
        assert np.array_equal(other.current_label(row.id), REMAP[mask])


@pytest.mark.parametrize(
    ("name", "match"), [("background", "named 'background'.*--format coco"), ("a:b", "holds ':'.*--format coco")]
)
def test_class_names_the_zip_cannot_carry_are_refused(tmp_path: Path, name: str, match: str):
    _, store = _project(tmp_path, "c", classes=[{"name": name, "color": [1, 2, 3]}, "other"])
    with pytest.raises(FormatError, match=match):
        export_labels(store, "cvat", tmp_path / "cvat")
    assert not (tmp_path / "cvat").exists() and not list(tmp_path.glob(".cvat.*"))


def test_the_history_is_refused(labelled: Store, tmp_path: Path):
    with pytest.raises(FormatError, match="one mask set per image.*--format png or coco"):
        export_labels(labelled, "cvat", tmp_path / "cvat-all", revisions="all")
    assert not (tmp_path / "cvat-all").exists() and not list(tmp_path.glob(".cvat-all.*"))  # nothing half-written


def test_predictions_go_into_the_xml_as_auto_and_are_not_imported(labelled: Store, tmp_path: Path):
    rows = labelled.images()
    unlabelled = [r for r in rows if r.labelled_pixels == 0]  # frame_003 (undone) and the two never labelled
    preds = []
    for r in unlabelled:
        mask = np.zeros((r.height, r.width), np.uint8)
        mask[r.height // 2 :] = 1
        mask[:4, :5] = 2
        preds.append(PredictedImage(r, mask, np.ones(mask.shape, np.float32), 1.0, "labelsmart-v0001"))
    out = tmp_path / "cvat"
    options = ExportOptions(predictions=lambda: iter(preds))
    assert export_labels(labelled, "cvat", out, options=options) == 3
    root = ET.parse(out / "annotations.xml").getroot()
    assert [i.get("id") for i in root.findall("image")] == [str(k) for k in range(len(rows))]  # merged in order
    auto = _xml_masks(out / "annotations.xml", sources=("auto",))
    for p in preds:
        assert np.array_equal(auto[p.image.path], p.mask)
        assert {m.get("source") for m in root.find(f"image[@name='{p.image.path}']").iter("mask")} == {"auto"}
    manual = _xml_masks(out / "annotations.xml")
    for path, mask in current_masks(labelled).items():
        assert np.array_equal(manual[path], mask)
    with zipfile.ZipFile(out / "segmentation_mask.zip") as z:
        assert sum(n.startswith("SegmentationClass/") for n in z.namelist()) == 3  # human labels only
    _, other = _project(tmp_path, "b", classes=CLASSES)
    assert import_labels(other, "cvat", out) == 3
    assert all(not other.history(r.id) for r in unlabelled)


def test_cvat_made_xml_with_polygons_boxes_z_order_and_auto_shapes(labelled: Store, tmp_path: Path):
    xml = tmp_path / "cvat.xml"
    xml.write_text(
        textwrap.dedent(
            """\
            <?xml version="1.0" encoding="utf-8"?>
            <annotations>
              <version>1.1</version>
              <meta><job><labels><label><name>car</name></label><label><name>road</name></label></labels></job></meta>
              <image id="7" name="frame_004.png" width="128" height="96">
                <box label="road" source="manual" occluded="0" xtl="10" ytl="10" xbr="20" ybr="20" z_order="1"/>
                <polygon label="car" source="manual" occluded="0" points="0,0;8,0;8,8;0,8" z_order="0"/>
                <mask label="car" source="manual" occluded="0" rle="1, 2, 2, 1" left="15" top="15" width="3"
                      height="2" z_order="2"/>
                <mask label="road" source="auto" occluded="0" rle="0, 6" left="0" top="50" width="3" height="2"/>
                <points label="car" source="manual" occluded="0" points="50,50" z_order="0"/>
              </image>
              <image id="8" name="frame_005.png" width="128" height="96">
                <polygon label="car" source="auto" occluded="0" points="0,0;8,0;8,8" z_order="0"/>
              </image>
            </annotations>
            """
        )
    )
    _, other = _project(tmp_path, "b", classes=CLASSES)
    assert import_labels(other, "cvat", xml) == 1  # frame_005 holds only a pre-annotation
    row = next(r for r in other.images() if r.path == "frame_004.png")
    got = other.current_label(row.id)
    want = np.full((96, 128), 255, np.uint8)
    want[0:9, 0:9] = 2  # the polygon, its edges included (cv2.fillPoly)
    want[10:21, 10:21] = 1  # the box, over the polygon's z_order
    want[15, 16:18] = 2  # the mask (runs 1, 2 / 2, 1 over its 3x2 box), over the box's z_order
    want[16, 17] = 2
    assert np.array_equal(got, want)


def test_cvat_made_zip_one_folder_down_with_an_index_mask(labelled: Store, tmp_path: Path):
    path = tmp_path / "task.zip"
    index_mask = np.zeros((96, 128), np.uint8)
    index_mask[:10] = 2
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[50:] = (1, 2, 3)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "task/labelmap.txt", "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncar:9,9,9::\nsky:1,2,3::\n"
        )
        z.writestr("task/ImageSets/Segmentation/default.txt", "frame_000\nframe_001\nframe_005\n")
        z.writestr("task/SegmentationClass/frame_000.png", _png(index_mask))  # 1-channel: labelmap line index
        z.writestr("task/SegmentationClass/frame_001.png", _png(rgb))
        z.writestr("task/SegmentationClass/frame_005.png", _png(np.zeros((96, 128, 3), np.uint8)))  # no labels
    _, other = _project(tmp_path, "b", classes=CLASSES)
    assert import_labels(other, "cvat", path) == 2
    rows = {r.path: r.id for r in other.images()}
    want = np.full((96, 128), 255, np.uint8)
    want[:10] = 0  # sky
    assert np.array_equal(other.current_label(rows["frame_000.png"]), want)
    want = np.full((96, 128), 255, np.uint8)
    want[50:] = 0
    assert np.array_equal(other.current_label(rows["frame_001.png"]), want)
    assert not other.history(rows["frame_005.png"])


def test_unknown_classes_colours_and_wrong_sizes_import_nothing_and_name_the_file(labelled: Store, tmp_path: Path):
    out = tmp_path / "cvat"
    export_labels(labelled, "cvat", out)
    _, other = _project(tmp_path, "b", classes=CLASSES)
    xml, zpath = out / "annotations.xml", out / "segmentation_mask.zip"
    text = xml.read_text()
    xml.write_text(text.replace('label="car"', 'label="truck"'))
    with pytest.raises(FormatError, match=r"annotations\.xml: class 'truck' is not a class of this project"):
        import_labels(other, "cvat", out)
    last = text.rindex('width="128" height="96">')  # the last image read is the wrong size
    xml.write_text(text[:last] + 'width="200" height="96">' + text[last + len('width="128" height="96">') :])
    with pytest.raises(FormatError, match=r"annotations\.xml \(frame_002\.png\): the mask is 200x96 but"):
        import_labels(other, "cvat", xml)
    with zipfile.ZipFile(zpath) as z:
        labelmap = z.read("labelmap.txt").decode()
    _rezip(zpath, {"labelmap.txt": labelmap.replace("car:", "truck:").encode()})
    with pytest.raises(FormatError, match=r"segmentation_mask\.zip \(labelmap\.txt\): class 'truck' is not a class"):
        import_labels(other, "cvat", zpath)
    small = np.zeros((5, 5, 3), np.uint8)
    small[0, 0] = CLASSES[2]["color"]
    _rezip(zpath, {"labelmap.txt": labelmap.encode(), "SegmentationClass/frame_002.png": _png(small)})
    with pytest.raises(
        FormatError, match=r"segmentation_mask\.zip \(SegmentationClass/frame_002\.png\): the mask is 5x5"
    ):
        import_labels(other, "cvat", zpath)
    small[1, 1] = (7, 7, 7)
    _rezip(zpath, {"SegmentationClass/frame_002.png": _png(small)})
    with pytest.raises(FormatError, match=r"frame_002\.png\): colour \(7, 7, 7\) is not in labelmap\.txt"):
        import_labels(other, "cvat", zpath)
    assert all(not other.history(r.id) for r in other.images())  # one transaction: the good masks did not land
    with pytest.raises(FormatError, match="holds neither annotations.xml nor segmentation_mask.zip"):
        import_labels(other, "cvat", tmp_path / "data")


DATUMARO_SCRIPT = """
import json, sys
import numpy as np
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset

out = {}
for key, path, fmt in (("zip", sys.argv[1], "voc_segmentation"), ("xml", sys.argv[2], "cvat")):
    ds = Dataset.import_from(path, fmt)
    labels = ds.categories()[AnnotationType.label]
    items = {}
    for item in ds:
        per = {}
        for ann in item.annotations:
            if ann.type == AnnotationType.mask:
                m = np.asarray(ann.image, bool)
                name = labels[ann.label].name
                per[name] = m if name not in per else per[name] | m
        items[item.id] = {n: [list(m.shape), np.flatnonzero(m).tolist()] for n, m in per.items()}
    out[key] = items
print(json.dumps(out))
"""


@pytest.mark.interop
@pytest.mark.parametrize("colours", ["own", "black and repeated"])
def test_datumaro_reads_the_zip_and_the_xml_as_our_masks(tmp_path: Path, colours: str):
    python = interop_python("datumaro")
    classes = CLASSES if colours == "own" else [{"name": c["name"], "color": [0, 0, 0]} for c in CLASSES]
    _, store = _project(tmp_path, "c", classes=classes)
    _label(store, tmp_path / "data")
    out = tmp_path / "cvat"
    export_labels(store, "cvat", out)
    voc, cvat = tmp_path / "dm-zip", tmp_path / "dm-xml"
    with zipfile.ZipFile(out / "segmentation_mask.zip") as z:
        z.extractall(voc)
    cvat.mkdir()
    (cvat / "annotations.xml").write_bytes((out / "annotations.xml").read_bytes())
    (cvat / "images").symlink_to(tmp_path / "data" / "images")  # Datumaro's cvat reader wants the images there
    proc = subprocess.run(
        [python, "-c", DATUMARO_SCRIPT, str(voc), str(cvat)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = {Path(p).with_suffix("").as_posix(): m for p, m in current_masks(store).items()}
    assert sorted(got["zip"]) == sorted(got["xml"]) == sorted(want)
    names = [c.name for c in store.classes()]
    for item, mask in want.items():
        expect = {n: np.flatnonzero(mask == k).tolist() for k, n in enumerate(names) if (mask == k).any()}
        xml = {n: pixels for n, (shape, pixels) in got["xml"][item].items()}
        assert all(shape == list(mask.shape) for shape, _ in got["xml"][item].values())
        assert xml == expect
        zipped = {n: pixels for n, (shape, pixels) in got["zip"][item].items()}
        assert all(shape == list(mask.shape) for shape, _ in got["zip"][item].values())
        background = np.flatnonzero(mask == 255).tolist()
        assert zipped == (expect | {"background": background} if background else expect)
