"""Streaming batch pre-annotation (labelsmart.preannotate.pipeline) and its COCO output, on a hand-built ONNX model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import synth_scene, write_toy_model
from pycocotools import mask as mask_utils

from labelsmart import imageio
from labelsmart.cli import main
from labelsmart.preannotate import pipeline
from labelsmart.preannotate.coco import read_manifest, write_coco
from labelsmart.serving.onnx_model import OnnxModel


def write_images(root: Path, n: int, sizes: list[tuple[int, int]]) -> list[Path]:
    """``n`` synthetic scenes cycling through ``sizes`` (H, W), in two folders."""
    rels = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img, _ = synth_scene(i, h, w)
        rel = Path("a" if i % 2 else "b") / f"img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rels.append(rel)
    return rels


@pytest.fixture
def model(tmp_path: Path) -> OnnxModel:
    return OnnxModel(write_toy_model(tmp_path / "m" / "toy.onnx", version=7), threads=1, device="cpu")


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[pipeline.Outcome] = []

    def __call__(self, outcome: pipeline.Outcome) -> None:
        self.outcomes.append(outcome)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return {o.rel.as_posix(): o.record for o in self.outcomes if o.record is not None}


@pytest.mark.parametrize(("batch_size", "io_threads"), [(1, 1), (3, 2), (8, 4)])
def test_pipeline_writes_what_predict_gives(model: OnnxModel, tmp_path: Path, batch_size: int, io_threads: int) -> None:
    images = tmp_path / "imgs"
    rels = write_images(images, 11, [(48, 64), (40, 40), (48, 64), (30, 70)])  # three padded sizes
    out = tmp_path / "out"
    rec = Recorder()
    pipeline.run_local(model, images, out, rels, rec, batch=batch_size, io_threads=io_threads)
    assert sorted(rec.records) == sorted(r.as_posix() for r in rels)
    assert all(o.error is None for o in rec.outcomes)
    for rel in rels:
        img = imageio.read_image(images / rel)
        pred = model.predict(img)
        mask = imageio.read_mask(out / rel.with_suffix(".png"), shape=img.shape[:2])
        np.testing.assert_array_equal(mask, pred.mask)
        assert (out / rel.with_name(f"{rel.stem}_overlay.jpg")).is_file()
        r = rec.records[rel.as_posix()]
        assert r["model_version"] == 7 and (r["height"], r["width"]) == img.shape[:2]
        assert abs(r["mean_confidence"] - pred.mean_confidence) < 1e-5
        assert 0.0 <= r["low_confidence_fraction"] <= 1.0
        assert abs(sum(r["class_fractions"].values()) - 1.0) < 1e-4


def test_pipeline_memory_stays_bounded(model: OnnxModel, tmp_path: Path) -> None:
    """The pipeline pulls paths only a bounded distance ahead of the images it has finished."""
    images = tmp_path / "imgs"
    rels = write_images(images, 40, [(32, 32), (24, 40)])
    pulled = 0
    worst = 0
    done = 0

    def paths():
        nonlocal pulled, worst
        for rel in rels:
            pulled += 1
            worst = max(worst, pulled - done)
            yield rel

    def on_outcome(outcome: pipeline.Outcome) -> None:
        nonlocal done
        assert outcome.error is None
        done += 1

    pipeline.run_local(model, images, tmp_path / "out", paths(), on_outcome, batch=2, io_threads=2)
    assert done == 40
    # read-ahead (3 x batch) + one partial batch per padded size + writes in flight (3 x batch) + slack
    assert worst <= 3 * 2 + 2 * 2 + 3 * 2 + 2, worst


class FlakyModel:
    """Wraps a model; any batch holding an image whose top-left pixel is pure black fails."""

    def __init__(self, inner: OnnxModel) -> None:
        self.inner = inner
        self.pp = inner.pp
        self.version, self.class_names, self.colors = inner.version, inner.class_names, inner.colors
        self.calls: list[int] = []

    def logits(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if np.any(np.all(x[:, :, 0, 0] == 0.0, axis=1)):
            raise RuntimeError("bad input")
        return self.inner.logits(x)


def test_a_failing_image_fails_alone(model: OnnxModel, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    rels = write_images(images, 6, [(32, 32)])
    bad = cv2.imread(str(images / rels[2]))
    bad[0, 0] = 0
    cv2.imwrite(str(images / rels[2]), bad)
    (images / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rec = Recorder()
    flaky = FlakyModel(model)
    pipeline.run_local(flaky, images, tmp_path / "out", [*rels, Path("b/broken.jpg")], rec, batch=3, io_threads=2)
    errors = {o.rel.as_posix(): o.error for o in rec.outcomes if o.error}
    assert set(errors) == {rels[2].as_posix(), "b/broken.jpg"}
    assert "inference failed (bad input)" in errors[rels[2].as_posix()]
    assert "broken.jpg" in errors["b/broken.jpg"]
    assert len(rec.records) == 5
    assert 3 in flaky.calls and 1 in flaky.calls  # the failing batch of 3 was retried one by one


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode
def test_coco_round_trips_the_masks(model: OnnxModel, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    rels = write_images(images, 5, [(48, 64), (40, 40)])
    out = tmp_path / "out"
    out.mkdir()
    journal = pipeline.Journal(out, overwrite=False)
    pipeline.run_local(model, images, out, rels, lambda o: journal.record(o.record), batch=2, overlays=False)
    journal.close()
    assert not list(out.rglob("*.jpg"))  # overlays off
    n_img, n_ann = write_coco(out, out / "coco.json", model.class_names)
    coco = json.loads((out / "coco.json").read_text())
    assert n_img == 5 == len(coco["images"]) and n_ann == len(coco["annotations"]) > 5
    assert [c["name"] for c in coco["categories"]] == model.class_names
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    by_id = {im["id"]: im for im in coco["images"]}
    for im in coco["images"]:
        mask = imageio.read_mask(out / Path(im["file_name"]).with_suffix(".png"))
        rebuilt = np.full(mask.shape, 255, np.uint8)
        for ann in coco["annotations"]:
            if ann["image_id"] != im["id"]:
                continue
            seg = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            m = mask_utils.decode(seg).astype(bool)
            assert ann["area"] == int(m.sum()) and ann["iscrowd"] == 1
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert not (rebuilt[m] != 255).any()  # annotations of one image do not overlap
            rebuilt[m] = ann["category_id"] - 1
        np.testing.assert_array_equal(rebuilt, mask)
        assert by_id[im["id"]]["height"] == mask.shape[0]


def test_manifest_last_line_wins_and_offsets(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    lines = [{"image": "a", "v": 1}, {"image": "b", "v": 1}, {"image": "a", "v": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
    assert list(read_manifest(path)) == [{"image": "a", "v": 2}, {"image": "b", "v": 1}]


def test_cli_preannotate_coco_and_resume(tmp_path: Path) -> None:
    model = write_toy_model(tmp_path / "m" / "toy.onnx", version=2)
    images = tmp_path / "imgs"
    rels = write_images(images, 7, [(40, 56), (32, 32)])
    out = tmp_path / "out"
    argv = ["preannotate", "--model", str(model), "--images", str(images), "--out", str(out), "--threads", "1"]
    assert main([*argv, "--batch", "3", "--coco", "--no-overlays"]) == 0
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(r.as_posix() for r in rels)
    assert not list(out.rglob("*_overlay.jpg"))
    before = (out / "manifest.jsonl").read_text()
    (out / rels[0].with_suffix(".png")).unlink()  # a lost mask is done again on resume, nothing else
    assert main([*argv, "--coco", str(tmp_path / "c2.json")]) == 0
    after = (out / "manifest.jsonl").read_text().splitlines()
    assert after[: len(before.splitlines())] == before.splitlines() and len(after) == 8
    assert json.loads(after[-1])["image"] == rels[0].as_posix()
    assert len(json.loads((tmp_path / "c2.json").read_text())["images"]) == 7


def test_cli_address_needs_ray_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_toy_model(tmp_path / "m" / "toy.onnx")
    (tmp_path / "imgs").mkdir()
    argv = ["preannotate", "--model", str(model), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--address", "ray://x:10001"]) == 1
    assert "add --engine ray" in capsys.readouterr().err


def test_postprocessing_in_the_graph_matches_the_host(tmp_path: Path) -> None:
    """The masks ONNX Runtime makes (post-processing appended to the graph) are the host's masks."""
    model = OnnxModel(write_toy_model(tmp_path / "m" / "toy.onnx", max_side=32), threads=1, device="cpu")
    images = tmp_path / "imgs"
    rels = write_images(images, 6, [(48, 64), (60, 40), (20, 30)])  # down-scaled, and one kept as is
    outs = {}
    for mode in ("host", "graph"):
        rec = Recorder()
        pipeline.run_local(model, images, tmp_path / mode, rels, rec, batch=2, postprocess=mode)
        assert all(o.error is None for o in rec.outcomes) and len(rec.records) == 6
        outs[mode] = rec.records
    for rel in rels:
        img = imageio.read_image(images / rel)
        x, meta = imageio.prepare(img, model.pp)
        host_mask, host_conf = imageio.logits_to_mask(model.logits(x[None])[0], meta)
        mask, conf = model.masks(x[None], meta)
        assert mask.shape == (1, *img.shape[:2]) and mask.dtype == np.uint8
        assert np.mean(mask[0] == host_mask) > 0.995
        np.testing.assert_allclose(conf[0], host_conf, atol=2e-3)
        written = imageio.read_mask(tmp_path / "graph" / rel.with_suffix(".png"))
        np.testing.assert_array_equal(written, mask[0])
        assert outs["graph"][rel.as_posix()]["classes_present"] == outs["host"][rel.as_posix()]["classes_present"]
    assert pipeline.choose_postprocess("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "graph"
    assert pipeline.choose_postprocess("auto", ["CPUExecutionProvider"]) == "host"
