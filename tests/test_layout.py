"""The layout keeps its promises: imports point one way between the parts, the product never imports the
benchmarks, the training round never reads the store, and serving and pre-annotation run without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_toy_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "labelsmart"

# Which parts of labelsmart each part may import (besides itself); ../shared/STYLE.md's direction:
# config, imageio <- store, datasets <- training, serving <- preannotate <- app <- cli <- app.py; bench on top.
BASE = {"config", "imageio", "metrics"}
ALLOWED = {
    "config": set(),
    "imageio": {"config"},
    "metrics": {"config"},
    "store": {"config", "imageio"},
    "formats": BASE | {"store"},
    "project": {"config", "imageio", "store", "formats"},
    "demo": {"config", "imageio"},
    "auth": {"config", "imageio"},
    "datasets": BASE | {"store"},
    "serving": BASE | {"store"},
    "training": BASE | {"store", "serving"},  # the sidecar it writes, the scoring after a round
    "preannotate": BASE | {"store", "serving", "formats"},  # COCO annotations; a project's pre-annotations for export
    "app": BASE | {"store", "serving", "training", "formats", "preannotate"},  # training: the Supervisor's type only
    "cli": BASE | {"store", "project", "datasets", "serving", "training", "preannotate", "formats", "auth"},
    "bench": BASE | {"store", "project", "datasets", "serving", "training", "preannotate", "formats", "app", "cli"},
    "__main__": {"cli", "bench"},
}
TORCH = {"torch", "torchvision", "segmentation_models_pytorch", "timm"}
# The training round and what it is built of take labelled images, not the store.
STORE_FREE = ["round", "objectives", "validation", "data", "device_data", "losses", "model", "export", "pretrain"]


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (function bodies and TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "labelsmart":  # from labelsmart import config, imageio
                found += [(node.lineno, f"labelsmart.{alias.name}") for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_imports_point_one_way_between_the_parts():
    wrong = []
    for path in _modules():
        part = _part(path)
        assert part in ALLOWED, f"{path}: a part the layout does not know; add it to ALLOWED with its reason"
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "labelsmart" or len(parts) < 2 or parts[1] == part:
                continue
            if parts[1] not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_the_product_never_imports_the_benchmarks():
    for path in _modules():
        if _part(path) in ("bench", "__main__"):
            continue
        names = [n for _, n in _imports(path) if n == "labelsmart.bench" or n.startswith("labelsmart.bench.")]
        assert not names, f"{path} imports {names}"


@pytest.mark.parametrize("module", STORE_FREE)
def test_the_round_and_its_parts_take_no_store(module: str):
    path = PACKAGE / "training" / f"{module}.py"
    names = [n for _, n in _imports(path) if n == "labelsmart.store" or n.startswith("labelsmart.store.")]
    assert not names, f"{path} imports {names}"


def test_serving_and_preannotate_never_import_torch():
    for path in _modules():
        if _part(path) in ("serving", "preannotate"):
            heavy = [n for _, n in _imports(path) if n.split(".")[0] in TORCH or n.startswith("labelsmart.training")]
            assert not heavy, f"{path} imports {heavy}"


def test_serving_and_preannotate_run_without_torch_installed(tmp_path: Path):
    """With torch (and smp, timm) impossible to import, every serving and pre-annotation module loads, a model
    predicts, and ``preannotate`` writes masks, a manifest and COCO for a folder."""
    import cv2
    import numpy as np

    model = write_toy_model(tmp_path / "toy.onnx")
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(0, 0, 255), (0, 255, 0)]):  # BGR: red, green
        cv2.imwrite(str(images / f"im{i}.png"), np.full((24, 32, 3), color, np.uint8))
    code = f"""
import importlib, importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {sorted(TORCH)!r}:
            raise ImportError(f"No module named {{name!r}} (not installed here)")

sys.meta_path.insert(0, NoTorch())
import numpy as np
import labelsmart.preannotate, labelsmart.serving
for package in (labelsmart.serving, labelsmart.preannotate):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
from labelsmart.cli import main
from labelsmart.serving.onnx_model import OnnxModel
pred = OnnxModel({str(model)!r}, threads=1, device="cpu").predict(np.zeros((20, 30, 3), np.uint8))
assert pred.mask.shape == (20, 30)
code = main(["preannotate", "--model", {str(model)!r}, "--images", {str(images)!r}, "--out", {str(tmp_path / "out")!r},
             "--threads", "1", "--device", "cpu", "--coco"])
assert code == 0, code
assert not any(m.split(".")[0] in {sorted(TORCH)!r} for m in sys.modules), "torch was imported"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png"]
    assert (out / "manifest.jsonl").read_text().count("\n") == 2 and (out / "coco.json").is_file()
