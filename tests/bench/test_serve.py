"""``bench serve``: ONNX Runtime alone (a hand-built model) and against PyTorch (a tiny exported checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from conftest import CLASSES, synth_scene, write_toy_model

from labelsmart.bench.cli import main

KEYS = {
    "engine",
    "device",
    "providers",
    "batch",
    "images_per_s",
    "p50_ms",
    "p95_ms",
    "threads",
    "input_hw",
    "model",
    "commit",
    "cpu",
    "date",
}


def write_images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _ = synth_scene(i, 40, 56)
        assert cv2.imwrite(str(root / f"im_{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root


def read_records(out: Path) -> list[dict]:
    lines = (out / "serve.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_record(rec: dict) -> None:
    assert KEYS <= set(rec)
    assert rec["images_per_s"] > 0 and rec["p50_ms"] > 0 and rec["p95_ms"] >= rec["p50_ms"]
    assert rec["threads"] == 1 and rec["device"] == "cpu" and rec["cpu"] and rec["date"]


def test_bench_serve_onnxruntime_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_toy_model(tmp_path / "toy.onnx")  # max_side 64, pad multiple 8
    images = write_images(tmp_path / "imgs")  # 3 images; batch 2 takes the first two
    out = tmp_path / "bench"
    argv = ["bench", "serve", "--model", str(model), "--images", str(images), "--out", str(out)]
    argv += ["--batch", "1,2", "--repeat", "3", "--warmup", "1", "--threads", "1", "--size", "64x48"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[-1] == "ort_over_torch=n/a"
    recs = read_records(out)
    assert [(r["engine"], r["batch"]) for r in recs] == [("onnxruntime", 1), ("onnxruntime", 2)]
    for rec in recs:
        check_record(rec)
        assert rec["input_hw"] == [48, 64]  # 64x48 fits max_side 64, and both sides are multiples of 8
        assert "CPUExecutionProvider" in rec["providers"]

    assert main(argv[:-2] + ["--size", "32x24", "--batch", "3"]) == 0  # overwrites, and cycles images
    assert [(r["batch"], r["input_hw"]) for r in read_records(out)] == [(3, [24, 32])]


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--batch", "1,x", "--batch"), ("--batch", "0", "--batch"), ("--size", "640", "--size")],
)
def test_bench_serve_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, needle: str
) -> None:
    model = write_toy_model(tmp_path / "toy.onnx")
    images = write_images(tmp_path / "imgs", 1)
    argv = ["bench", "serve", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main([*argv, flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]


def test_bench_serve_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_toy_model(tmp_path / "toy.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "missing.onnx", empty, "missing.onnx"),
        (model, tmp_path / "nope", "nope"),
        (model, empty, "no images"),
    ]
    for m, imgs, needle in cases:
        assert main(["bench", "serve", "--model", str(m), "--images", str(imgs), "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bench_serve_against_pytorch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from labelsmart import config
    from labelsmart.config import ModelConfig
    from labelsmart.training.export import export_onnx
    from labelsmart.training.model import build_model, save_checkpoint

    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, build_model(ModelConfig(), 3), config.Config(), CLASSES, version=1, step=0, metrics={})
    onnx_path = tmp_path / "m.onnx"
    export_onnx(ckpt, onnx_path)
    images = write_images(tmp_path / "imgs", 1)
    out = tmp_path / "bench"
    argv = ["bench", "serve", "--model", str(onnx_path), "--checkpoint", str(ckpt), "--images", str(images)]
    argv += ["--out", str(out), "--batch", "1", "--repeat", "3", "--warmup", "1", "--threads", "1"]
    assert main([*argv, "--size", "64x64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-1]
    assert last.startswith("ort_over_torch=")
    limit = next(line for line in lines if line.startswith("model: "))
    assert "GFLOP per 64x64 input" in limit and "matrix-product peak on 1 threads" in limit
    assert float(last.split("=", 1)[1]) > 0
    recs = read_records(out)
    assert [(r["engine"], r["batch"]) for r in recs] == [("onnxruntime", 1), ("pytorch", 1)]
    for rec in recs:
        check_record(rec)
        assert rec["input_hw"] == [64, 64]


def test_flops_scale_with_pixels(tmp_path: Path) -> None:
    from labelsmart import config
    from labelsmart.bench import serve as bench
    from labelsmart.config import ModelConfig
    from labelsmart.training.model import build_model, save_checkpoint

    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, build_model(ModelConfig(), 3), config.Config(), CLASSES, version=1, step=0, metrics={})
    small, large = bench.flops_per_image(ckpt, (64, 64)), bench.flops_per_image(ckpt, (128, 128))
    assert small > 1e8  # a DeepLabV3+ is far above 0.1 GFLOP even at 64x64
    assert 3.8 < large / small < 4.2  # a convolutional network: work grows with the pixels


def test_bench_serve_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_toy_model(tmp_path / "toy.onnx")
    images = write_images(tmp_path / "imgs")
    out = tmp_path / "bench"
    argv = ["bench", "serve", "--model", str(model), "--images", str(images), "--out", str(out), "--tune"]
    assert main([*argv, "--batch", "1", "--repeat", "2", "--warmup", "1", "--threads", "2", "--size", "64x48"]) == 0
    assert "tuning: " in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "tune.jsonl").read_text().splitlines()]
    options = {(r["option"], str(r["value"])) for r in recs}
    assert {("threads", "1"), ("threads", "2"), ("optimization", "disable"), ("optimization", "all")} <= options
    assert {("spinning", "True"), ("spinning", "False"), ("postprocess", "host"), ("postprocess", "graph")} <= options
    graph = next(r for r in recs if r["option"] == "postprocess" and r["value"] == "graph")
    assert graph["agreement"] == 1.0  # no resize at this size: argmax in the graph must equal the host's
    first = next(r for r in recs if r["option"] == "first_call_ms")
    assert first["p50_ms"] > 0 and first["new_shape_ms"] > 0


def test_bench_preannotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_toy_model(tmp_path / "toy.onnx")
    images = write_images(tmp_path / "imgs", 5)
    (images / "bad.png").write_bytes(b"nope")
    out = tmp_path / "bench"
    argv = ["bench", "preannotate", "--model", str(model), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--batch", "2", "--threads", "1", "--io-threads", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("e2e_over_inference=")
    rec = json.loads((out / "preannotate.jsonl").read_text())
    assert rec["images"] == 6 and rec["failed"] == 1
    assert rec["inference_images_per_s"] > 0 and rec["end_to_end_images_per_s"] > 0 and rec["e2e_over_inference"] > 0
    assert len(list((out / "preannotations").glob("im_*.png"))) == 5
    assert len((out / "preannotations" / "manifest.jsonl").read_text().splitlines()) == 5
