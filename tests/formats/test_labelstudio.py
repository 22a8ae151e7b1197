"""Label Studio tasks out and in: brush RLE that label-studio-sdk's own decoder reads (and that we read from its
encoder), round trips between projects, predictions, the labelling config, and clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import interop_python
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_formats import _project, current_masks, labelled  # noqa: F401 - labelled is a fixture

from labelsmart.formats import ExportOptions, FormatError, PredictedImage, export_labels, import_labels
from labelsmart.formats import labelstudio as ls
from labelsmart.store import Store


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_brush_rle_round_trips_any_mask(region: np.ndarray):
    h, w = region.shape
    assert np.array_equal(ls.decode_rle(ls.encode_rle(region), h, w), region)


def test_brush_rle_of_a_long_run_splits_into_blocks():
    region = np.zeros((300, 300), bool)  # 360 000 equal RGBA values: more than one 16-bit run
    region[-1, -1] = True
    assert np.array_equal(ls.decode_rle(ls.encode_rle(region), 300, 300), region)


def test_brush_rle_of_another_size_is_refused():
    with pytest.raises(FormatError, match="not those of a 5x4"):
        ls.decode_rle(ls.encode_rle(np.ones((3, 3), bool)), 4, 5, "x.json")


_SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
case = json.load(open(sys.argv[1]))
decoded = [(decode_rle(r).reshape(h, w, 4)[..., 3] > 127).astype(int).tolist() for r, h, w in case["ours"]]
encoded = [mask2rle(np.array(m, np.uint8) * 255) for m in case["masks"]]
json.dump({"decoded": decoded, "encoded": encoded}, open(sys.argv[2], "w"))
"""


@pytest.mark.interop
def test_label_studio_sdks_own_decoder_reads_our_rle_and_we_read_its_encoder(tmp_path: Path):
    python = interop_python("labelstudio")
    rng = np.random.default_rng(3)
    masks = [rng.random((17, 23)) < 0.3, np.zeros((5, 9), bool), np.ones((64, 48), bool)]
    masks[1][2, 4] = True
    case = {
        "ours": [[ls.encode_rle(m), *m.shape] for m in masks],
        "masks": [m.astype(int).tolist() for m in masks],
    }
    (tmp_path / "case.json").write_text(json.dumps(case))
    (tmp_path / "sdk.py").write_text(_SDK_SCRIPT)
    subprocess.run([python, "sdk.py", "case.json", "out.json"], cwd=tmp_path, check=True, timeout=120)
    out = json.loads((tmp_path / "out.json").read_text())
    for mask, decoded, encoded in zip(masks, out["decoded"], out["encoded"], strict=True):
        assert np.array_equal(np.array(decoded, bool), mask)
        assert np.array_equal(ls.decode_rle(encoded, *mask.shape), mask)


def test_export_is_tasks_and_a_brush_labels_config(labelled: Store, tmp_path: Path):  # noqa: F811
    out = tmp_path / "ls"
    n = export_labels(labelled, "labelstudio", out, options=ExportOptions(image_url="/data/local-files/?d=cam/"))
    tasks = json.loads((out / ls.TASKS_NAME).read_text())
    config = ls.LabelConfig.parse((out / ls.CONFIG_NAME).read_text())
    names = [c.name for c in labelled.classes()]
    assert n == len(tasks) == 3 and config.labels == tuple(names)
    assert (config.from_name, config.to_name, config.data_key) == ("tag", "image", "image")
    truth = current_masks(labelled)
    by_path = {r.path: r for r in labelled.images()}
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=cam/")
        row = by_path[url.removeprefix("/data/local-files/?d=cam/")]
        (annotation,) = task["annotations"]
        mask = ls.mask_from_results(
            annotation["result"], {n: k for k, n in enumerate(names)}, row.height, row.width, url
        )
        assert np.array_equal(mask, truth[row.path])
        assert all(r["from_name"] == "tag" and r["to_name"] == "image" for r in annotation["result"])


@pytest.mark.parametrize("as_predictions", [False, True])
def test_round_trip_into_a_project_with_the_classes_in_another_order(
    labelled: Store,  # noqa: F811
    tmp_path: Path,
    as_predictions: bool,
):
    out = tmp_path / "ls"
    export_labels(labelled, "labelstudio", out, options=ExportOptions(as_predictions=as_predictions))
    classes = [{"name": c.name, "color": list(c.color)} for c in reversed(labelled.classes())]
    _, other = _project(tmp_path, "b", classes)
    if as_predictions:
        tasks = json.loads((out / ls.TASKS_NAME).read_text())
        assert all(t["predictions"][0]["model_version"] == ls.LABELS_VERSION and "annotations" not in t for t in tasks)
        assert import_labels(other, "labelstudio", out) == 0  # predictions are not labels
        return
    assert import_labels(other, "labelstudio", out / ls.TASKS_NAME) == 3
    assert import_labels(other, "labelstudio", out) == 0  # twice adds nothing
    names_a = {c.id: c.name for c in labelled.classes()}
    ids_b = {c.name: c.id for c in other.classes()}
    table = np.full(256, 255, np.uint8)
    for k, name in names_a.items():
        table[k] = ids_b[name]
    a, b = current_masks(labelled), current_masks(other)
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(table[a[path]], b[path])
    assert {r.source for r in other.history(other.images()[0].id)} == {"labelstudio"}


def test_the_history_and_predictions_go_out_marked(labelled: Store, tmp_path: Path):  # noqa: F811
    rows = labelled.images()
    unlabelled = [r for r in rows if r.labelled_pixels == 0]

    def predictions():
        for r in unlabelled:
            mask = np.zeros((r.height, r.width), np.uint8)
            yield PredictedImage(r, mask, np.full(mask.shape, 0.75, np.float32), 0.75, "labelsmart-v0007")

    out = tmp_path / "ls"
    export_labels(labelled, "labelstudio", out, options=ExportOptions(revisions="all", predictions=predictions))
    tasks = {t["data"]["image"]: t for t in json.loads((out / ls.TASKS_NAME).read_text())}
    first = tasks[rows[0].path]
    assert len(first["annotations"]) == 2  # alice's scribbles, then bob's dense mask
    assert [r["author"] for r in first["meta"]["labelsmart"]["revisions"]] == ["alice", "bob"]
    undone = tasks[rows[3].path]  # labelled, then undone: the history holds both, the newest empty
    assert undone["annotations"][-1]["result"] == [] and len(undone["predictions"]) == 1
    assert len(tasks) == len(rows)  # one task per image
    for r in unlabelled:
        (pred,) = tasks[r.path]["predictions"]
        assert pred["model_version"] == "labelsmart-v0007" and pred["score"] == 0.75
        assert "annotations" not in tasks[r.path] or r.id == rows[3].id
    _, other = _project(tmp_path, "b")
    import_labels(other, "labelstudio", out)  # newest annotation of each task; predictions are left out
    assert current_masks(other).keys() == current_masks(labelled).keys()


def test_label_studios_upload_and_local_file_urls_find_the_image(labelled: Store, tmp_path: Path):  # noqa: F811
    row = [r for r in labelled.images() if r.labelled_pixels > 0][0]
    mask = labelled.current_label(row.id)
    result = ls.brush_results(mask, [c.name for c in labelled.classes()])
    _, other = _project(tmp_path, "b")
    name = Path(row.path).name
    for k, url in enumerate([f"/data/upload/3/8f3a2b1c-{name}", f"/data/local-files/?d=some/root/{row.path}"]):
        task = {"id": 40 + k, "data": {"img": url}, "annotations": [{"result": result, "was_cancelled": False}]}
        (tmp_path / "t.json").write_text(json.dumps([task]))
        other.undo_label(other.image_id_by_path(row.path)) if k else None
        assert import_labels(other, "labelstudio", tmp_path / "t.json") == 1
        assert np.array_equal(other.current_label(other.image_id_by_path(row.path)), mask)


def test_unknown_labels_and_images_import_nothing_and_name_the_task(labelled: Store, tmp_path: Path):  # noqa: F811
    row = [r for r in labelled.images() if r.labelled_pixels > 0][0]
    good = ls.brush_results(labelled.current_label(row.id), [c.name for c in labelled.classes()])
    bad = json.loads(json.dumps(good))
    bad[0]["value"]["brushlabels"] = ["pedestrian"]
    _, other = _project(tmp_path, "b")
    cases = [
        (
            [
                {"id": 1, "data": {"image": row.path}, "annotations": [{"result": good}]},
                {"id": 2, "data": {"image": row.path}, "annotations": [{"result": bad}]},
            ],
            "task 2.*'pedestrian'",
        ),
        ([{"id": 5, "data": {"image": "elsewhere.png"}, "annotations": [{"result": good}]}], "task 5.*not an image"),
        ({"tasks": []}, "not a list of Label Studio tasks"),
    ]
    for tasks, message in cases:
        (tmp_path / "t.json").write_text(json.dumps(tasks))
        with pytest.raises(FormatError, match=message):
            import_labels(other, "labelstudio", tmp_path / "t.json")
        assert current_masks(other) == {}


def test_a_config_without_brush_labels_is_refused():
    with pytest.raises(FormatError, match="no <BrushLabels>"):
        ls.LabelConfig.parse('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"/></View>')
    config = ls.LabelConfig.parse(
        '<View><Image name="img" value="$photo"/><BrushLabels name="seg" toName="img">'
        '<Label value="sky" background="#0080ff"/><Label value="road"/></BrushLabels></View>'
    )
    assert (config.from_name, config.to_name, config.data_key, config.labels) == (
        "seg",
        "img",
        "photo",
        ("sky", "road"),
    )
    assert config.colors == {"sky": "#0080ff"}


@pytest.mark.parametrize(
    "result",
    [
        {"type": "brushlabels", "value": {"rle": [1e400], "brushlabels": ["sky"]}},
        {"type": "brushlabels", "value": {"rle": "abc", "brushlabels": [["sky"]]}},
        {"type": "brushlabels", "value": {"rle": None, "brushlabels": ["sky"]}},
        {"type": "brushlabels", "value": {"rle": [1, 2], "brushlabels": ["sky"]}, "original_width": "wide"},
        "a string, not a result",
    ],
)
def test_a_result_of_the_wrong_shape_is_one_sentence(result: object):
    with pytest.raises(FormatError, match="tasks.json"):
        ls.mask_from_results([result], {"sky": 0}, 4, 5, "tasks.json")
