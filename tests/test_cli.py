"""Command line: preannotate, evaluate and user errors (a hand-built ONNX model; no torch, no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BLUE, GREEN, RED, TOY_CLASSES, write_toy_model
from PIL import Image

from labelsmart.cli import main

ROOT = Path(__file__).resolve().parents[1]


def save_rgb(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def solid(color: tuple[int, int, int], h: int = 24, w: int = 32) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = color
    return img


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_toy_model(tmp_path / "model" / "toy.onnx", version=3)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Nested folder: red.png, sub/green.png, sub/deeper/half.jpg, and a corrupt broken.jpg."""
    root = tmp_path / "imgs"
    save_rgb(root / "red.png", solid(RED))
    save_rgb(root / "sub" / "green.png", solid(GREEN, 40, 20))
    half = solid(BLUE, 32, 32)
    half[:, :16] = RED
    save_rgb(root / "sub" / "deeper" / "half.jpg", half)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------------- preannotate


def test_preannotate_outputs_and_resume(
    model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "preannotate",
        "--model",
        str(model),
        "--images",
        str(images),
        "--out",
        str(out),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--batch",
        "2",
    ]
    assert main(argv) == 1  # one image failed
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1] == "done=3 skipped=0 failed=1"
    assert "broken.jpg" in cap.err

    with Image.open(out / "red.png") as im:
        assert im.mode == "P"
        assert np.array(im).max() == 0 and im.getpalette()[:6] == [255, 0, 0, 0, 255, 0]
    with Image.open(out / "sub" / "green.png") as im:
        assert im.size == (20, 40) and set(np.unique(np.array(im))) == {1}
    half = np.array(Image.open(out / "sub" / "deeper" / "half.png"))
    assert (half[:, :14] == 0).all() and (half[:, 18:] == 2).all()  # JPEG blurs the middle column a bit
    overlay = cv2.imread(str(out / "sub" / "deeper" / "half_overlay.jpg"))
    assert overlay.shape == (32, 32, 3)
    assert not list(out.rglob("*.tmp")) and not (out / "broken.png").exists()

    lines = manifest(out)
    assert [r["image"] for r in lines] == ["red.png", "sub/green.png", "sub/deeper/half.jpg"]  # os.walk order
    red = lines[0]
    assert red["mask"] == "red.png" and red["classes_present"] == ["red"]
    assert red["class_fractions"] == {"red": 1.0, "green": 0.0, "blue": 0.0}
    assert red["model_version"] == 3 and (red["height"], red["width"]) == (24, 32)
    assert 0.99 < red["mean_confidence"] <= 1.0
    assert lines[2]["classes_present"] == ["red", "blue"]
    errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errs] == ["broken.jpg"] and "not a readable image" in errs[0]["error"]

    # Second run: everything done is skipped, the manifest gets no new lines.
    mtime = (out / "red.png").stat().st_mtime_ns
    assert main(argv) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "done=0 skipped=3 failed=1"
    assert len(manifest(out)) == 3 and (out / "red.png").stat().st_mtime_ns == mtime

    # A fixed image is picked up; --overwrite redoes everything with a fresh manifest.
    save_rgb(images / "broken.jpg", solid(GREEN))
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "done=1 skipped=3 failed=0"
    assert len(manifest(out)) == 4
    assert main([*argv, "--overwrite"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "done=4 skipped=0 failed=0"
    assert sorted(r["image"] for r in manifest(out)) == [
        "broken.jpg",
        "red.png",
        "sub/deeper/half.jpg",
        "sub/green.png",
    ]


def test_preannotate_recovers_from_an_interrupted_run(
    model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (images / "broken.jpg").unlink()
    out = tmp_path / "out"
    argv = [
        "preannotate",
        "--model",
        str(model),
        "--images",
        str(images),
        "--out",
        str(out),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    # Simulate a crash: the last manifest line half-written, and a mask whose line never landed.
    text = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text(text[0] + text[2][:25])
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "done=2 skipped=1 failed=0"
    lines = manifest(out)
    assert sorted(r["image"] for r in lines) == ["red.png", "sub/deeper/half.jpg", "sub/green.png"]


def test_preannotate_out_inside_images_is_not_read_back(
    model: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (images / "broken.jpg").unlink()
    out = images / "preds"
    argv = [
        "preannotate",
        "--model",
        str(model),
        "--images",
        str(images),
        "--out",
        str(out),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "done=0 skipped=3 failed=0"


def test_preannotate_stem_collision_is_reported(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imgs = tmp_path / "imgs"
    save_rgb(imgs / "x.jpg", solid(RED))
    save_rgb(imgs / "x.png", solid(GREEN))
    out = tmp_path / "out"
    assert (
        main(
            [
                "preannotate",
                "--model",
                str(model),
                "--images",
                str(imgs),
                "--out",
                str(out),
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1] == "done=1 skipped=0 failed=1"
    assert "rename one of them" in cap.err


# ---------------------------------------------------------------------------------------------- evaluate


def write_layout(root: Path, classes: list[dict] = TOY_CLASSES) -> Path:
    """One 8x8 image in the shared layout whose confusion matrix is worked out by hand in the test."""
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = RED  # predicted class 0
    img[:, 4:] = GREEN  # predicted class 1
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    gt[:2, 4:] = 2  # 8 px the model gets wrong (says green)
    gt[7, :4] = 255  # 4 px ignored
    save_rgb(root / "images" / "one.png", img)
    save_rgb(root / "images" / "other.jpg", solid(BLUE, 8, 8))
    (root / "masks").mkdir(parents=True)
    cv2.imwrite(str(root / "masks" / "one.png"), gt)
    cv2.imwrite(str(root / "masks" / "other.png"), np.full((8, 8), 2, np.uint8))
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "splits.json").write_text(json.dumps({"val": ["one"], "test": ["other"]}))
    return root


def test_evaluate_gives_the_hand_computed_miou(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_layout(tmp_path / "data")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--dataset",
                str(data),
                "--split",
                "val",
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    # gt 0: 28 px all right; gt 1: 24 px all right; gt 2: 8 px predicted 1.
    # IoU0 = 28/28, IoU1 = 24/(24+32-24) = 0.75, IoU2 = 0/8; mIoU = 1.75/3; pixel acc = 52/60.
    report = json.loads((model.parent / "toy.eval-val.json").read_text())
    assert report["miou"] == pytest.approx(1.75 / 3)
    assert report["per_class_iou"] == {"red": pytest.approx(1.0), "green": pytest.approx(0.75), "blue": 0.0}
    assert report["pixel_acc"] == pytest.approx(52 / 60)
    assert (report["images"], report["split"], report["model_version"]) == (1, "val", 3)
    assert report["model"] == str(model)
    out = capsys.readouterr().out
    assert "mIoU=0.5833" in out and "green" in out

    dest = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--dataset",
                str(data),
                "--split",
                "test",
                "--out",
                str(dest),
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(dest.read_text())
    assert report["miou"] == pytest.approx(1.0)  # only blue is present in that ground truth
    assert report["per_class_iou"] == {"red": None, "green": None, "blue": pytest.approx(1.0)}


def test_evaluate_user_errors(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_layout(tmp_path / "data", classes=TOY_CLASSES[:2])
    base = ["evaluate", "--model", str(model), "--dataset", str(data), "--threads", "1", "--device", "cpu"]
    assert main([*base, "--split", "val"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "predicts 3 classes" in err[-1] and "lists 2" in err[-1]
    assert main([*base, "--split", "nope"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("no split 'nope'; pick one of: test, val.")


# ---------------------------------------------------------------------------------------------- user errors


def test_user_errors_are_one_line(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["export", "--checkpoint", str(tmp_path / "nope.pt")], "nope.pt: checkpoint not found"),
        (["export", "--dataset", str(tmp_path)], "no labelsmart project here yet"),
        (["train", "--dataset", str(tmp_path / "nothing")], "not a folder"),
        (
            ["preannotate", "--model", str(model), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
            "none: not a folder",
        ),
    ]
    (tmp_path / "same").mkdir()
    same = ["--images", str(tmp_path / "same"), "--out", str(tmp_path / "same")]
    cases.append((["preannotate", "--model", str(model), *same], "--out is the images folder"))
    bad_sidecar = tmp_path / "m2" / "x.onnx"
    bad_sidecar.parent.mkdir()
    bad_sidecar.write_bytes(model.read_bytes())
    cases.append(
        (
            ["evaluate", "--model", str(bad_sidecar), "--dataset", str(write_layout(tmp_path / "d")), "--split", "val"],
            "x.json: sidecar JSON missing",
        )
    )
    for argv, want in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and want in errors[0], (argv, err)
        assert "Traceback" not in err


def test_subprocess_missing_model(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelsmart",
            "preannotate",
            "--model",
            str(tmp_path / "missing.onnx"),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 1
    assert res.stdout == ""
    assert (
        res.stderr.strip() == f"error: {tmp_path / 'missing.onnx'}: model file not found; check the path to the "
        ".onnx file."
    )


def test_subprocess_preannotate_and_help(model: Path, images: Path, tmp_path: Path) -> None:
    (images / "broken.jpg").unlink()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelsmart",
            "preannotate",
            "--model",
            str(model),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "done=3 skipped=0 failed=0"
    assert "img/s" in res.stderr or "pre-annotating" in res.stderr  # the tqdm bar
    res = subprocess.run(
        [sys.executable, "-m", "labelsmart", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert res.returncode == 0
    for cmd in ("train", "export", "preannotate", "evaluate"):
        assert cmd in res.stdout


# ------------------------------------------------------------------------------------------- train progress


def test_train_progress_prints_one_bar_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    from labelsmart.cli import TrainProgress

    progress = TrainProgress()
    for step in range(1, 4):
        progress({"stage": "pretraining", "step": step, "total": 3, "loss": 1.0 / step, "eta_s": 3 - step})
    progress({"stage": "fine-tuning", "step": 1, "total": 5})
    progress({"stage": "exporting", "step": 5, "total": 5, "eta_s": 0.0})
    progress({"stage": "odd", "note": "no step"})
    progress.close()
    err = capsys.readouterr().err
    assert "pretraining" in err and "fine-tuning" in err and "exporting" in err and "loss=0.3333" in err


# ----------------------------------------------------------------------------- end to end (torch, slow-ish)


@pytest.mark.slow
def test_train_export_preannotate_evaluate(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    for key, value in {"TRAIN_CROP": "64", "TRAIN_BATCH_SIZE": "2", "SERVE_THREADS": "1"}.items():
        monkeypatch.setenv(f"LABELSMART_{key}", value)
    project = [
        "--dataset",
        str(tiny_dataset),
        "--workdir",
        str(tmp_path / "work"),
        "--models-dir",
        str(tmp_path / "models"),
    ]
    assert (
        main(
            [
                "train",
                *project,
                "--import-masks",
                str(tiny_dataset / "masks"),
                "--steps",
                "4",
                "--threads",
                "1",
                "--max-side",
                "128",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    onnx_path = Path(out[-2].split(": ", 1)[1])
    assert out[-2].startswith("published model v1: ") and onnx_path.name == "model.onnx" and onnx_path.is_file()
    assert out[-1].startswith("metrics: ") and "steps=4" in out[-1]

    exported = tmp_path / "exports" / "toy.onnx"
    assert main(["export", *project, "--out", str(exported)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"model: {exported}", f"sidecar: {exported.with_suffix('.json')}"]

    pre = tmp_path / "pre"
    assert (
        main(
            [
                "preannotate",
                "--model",
                str(exported),
                "--images",
                str(tiny_dataset / "images"),
                "--out",
                str(pre),
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "done=8 skipped=0 failed=0"
    assert all(r["model_version"] == 1 for r in manifest(pre))

    assert (
        main(
            [
                "evaluate",
                "--model",
                str(exported),
                "--dataset",
                str(tiny_dataset),
                "--split",
                "val",
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(exported.with_name("toy.eval-val.json").read_text())
    assert (
        0.0 <= report["miou"] <= 1.0
        and report["images"] == 4
        and set(report["per_class_iou"]) == {"sky", "road", "car"}
    )


def test_a_project_finds_its_models_from_any_working_folder(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train`` with the default (relative) models folder in one place, ``export --dataset`` in another."""
    pytest.importorskip("torch")
    for key, value in {"TRAIN_CROP": "64", "TRAIN_BATCH_SIZE": "2", "PREPROCESS_MAX_SIDE": "128"}.items():
        monkeypatch.setenv(f"LABELSMART_{key}", value)
    project = ["--dataset", str(tiny_dataset), "--workdir", str(tmp_path / "work")]
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    train = ["train", *project, "--import-masks", str(tiny_dataset / "masks"), "--steps", "2", "--threads", "1"]
    assert main([*train, "--device", "cpu"]) == 0
    assert list((here / "models").glob("*/v0001/model.pt"))
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    assert main(["export", *project, "--out", str(tmp_path / "x.onnx")]) == 0, capsys.readouterr().err
    assert (tmp_path / "x.onnx").is_file() and not (elsewhere / "models").exists()
