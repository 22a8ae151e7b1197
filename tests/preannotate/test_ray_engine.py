"""``preannotate --engine ray`` on a local Ray instance gives the same files as the local engine."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import cv2
import pytest
from conftest import synth_scene, write_toy_model

from labelsmart.cli import main

pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install -r requirements-ray.txt")


def manifest_by_image(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_ray_engine_matches_local_engine(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    for i in range(9):
        img, _ = synth_scene(i, 40 if i % 3 else 56, 64)  # two padded sizes
        rel = Path(f"set{i % 2}") / f"frame{i}.png"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (images / "set0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = write_toy_model(tmp_path / "m" / "toy.onnx", version=4)
    common = ["preannotate", "--model", str(model), "--images", str(images), "--batch", "3", "--threads", "1"]

    assert main([*common, "--out", str(tmp_path / "local"), "--coco"]) == 1  # 1: the broken image failed
    assert main([*common, "--out", str(tmp_path / "ray"), "--coco", "--engine", "ray"]) == 1

    local, ray = tmp_path / "local", tmp_path / "ray"
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))
    assert len(files) == 18  # 9 masks + 9 overlays
    assert sorted(p.relative_to(ray) for p in ray.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")) == files
    match, mismatch, errors = filecmp.cmpfiles(local, ray, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    assert manifest_by_image(ray) == manifest_by_image(local)
    assert [json.loads(line)["image"] for line in (ray / "errors.jsonl").read_text().splitlines()] == [
        "set0/broken.jpg"
    ]
    coco_l, coco_r = (json.loads((d / "coco.json").read_text()) for d in (local, ray))
    key = {im["id"]: im["file_name"] for im in coco_l["images"]}
    key_r = {im["id"]: im["file_name"] for im in coco_r["images"]}
    anns = sorted((key[a["image_id"]], a["category_id"], a["segmentation"]["counts"]) for a in coco_l["annotations"])
    anns_r = sorted(
        (key_r[a["image_id"]], a["category_id"], a["segmentation"]["counts"]) for a in coco_r["annotations"]
    )
    assert anns == anns_r and len(anns) >= 9

    # resume: a second ray run finds everything done
    assert main([*common, "--out", str(ray), "--engine", "ray"]) == 1  # the broken image fails again
    assert len((ray / "manifest.jsonl").read_text().splitlines()) == 9
