"""Tiny synthetic projects made in tmp_path; nothing here reads ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CLASSES = [
    {"id": 0, "name": "sky", "color": [128, 128, 128]},
    {"id": 1, "name": "road", "color": [128, 64, 128]},
    {"id": 2, "name": "car", "color": [64, 0, 128]},
]


def synth_scene(seed: int, h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A street-like toy scene: bright sky on top, dark road below, a red car box somewhere. RGB + mask."""
    rng = np.random.default_rng(seed)
    horizon = int(h * rng.uniform(0.35, 0.55))
    img = np.empty((h, w, 3), np.float32)
    mask = np.empty((h, w), np.uint8)
    img[:horizon] = (170, 200, 235)
    mask[:horizon] = 0
    img[horizon:] = (70, 70, 75)
    mask[horizon:] = 1
    bh, bw = int(h * rng.uniform(0.15, 0.3)), int(w * rng.uniform(0.15, 0.3))
    y0 = int(rng.integers(horizon - bh // 2, h - bh))
    x0 = int(rng.integers(0, w - bw))
    img[y0 : y0 + bh, x0 : x0 + bw] = (200, 30, 30)
    mask[y0 : y0 + bh, x0 : x0 + bw] = 2
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def scribbles(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Sparse strokes: a horizontal line through the middle of each class region, the rest unlabelled."""
    out = np.full_like(mask, 255)
    for c in np.unique(mask):
        ys, xs = np.nonzero(mask == c)
        yc = int(np.median(ys))
        row = xs[ys == yc]
        x_lo, x_hi = int(row.min()), int(row.max())
        sel = np.zeros_like(mask, bool)
        sel[max(0, yc - width // 2) : yc + width // 2 + 1, x_lo : x_hi + 1] = True
        out[sel & (mask == c)] = c
    return out


def write_dataset(root: Path, n: int = 8, h: int = 96, w: int = 128, seed0: int = 0) -> Path:
    """A folder in the shared layout: images/, masks/, classes.json, splits.json."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    names = []
    for i in range(n):
        img, mask = synth_scene(seed0 + i, h, w)
        name = f"frame_{i:03d}"
        cv2.imwrite(str(root / "images" / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
        names.append(name)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    half = max(1, n // 2)
    (root / "splits.json").write_text(json.dumps({"train": names[:half], "val": names[half:]}))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """8 toy street scenes (96x128, 3 classes) in the shared layout."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def tiny_cfg(tiny_dataset: Path, tmp_path: Path):
    """A fast configuration for the tiny data set (few steps, small crops, everything under tmp_path)."""
    from labelsmart import config

    return config.load(
        {
            "dataset": str(tiny_dataset),
            "workdir": str(tmp_path / "work"),
            "models_dir": str(tmp_path / "models"),
            "train.steps": 12,
            "train.first_round_steps": 12,
            "train.crop": 64,
            "train.batch_size": 2,
            "train.threads": 1,
            "preprocess.max_side": 128,
            "serve.threads": 1,
            "trigger.min_interval_s": 0,
            "trigger.poll_s": 0.2,
        },
        env={},
    )


# A hand-built ONNX model with a sidecar, for predictor and CLI tests that need no training.
TOY_CLASSES = [
    {"id": 0, "name": "red", "color": [255, 0, 0]},
    {"id": 1, "name": "green", "color": [0, 255, 0]},
    {"id": 2, "name": "blue", "color": [0, 0, 255]},
]
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_toy_model(
    path: Path, version: int = 1, perm: tuple[int, ...] = (0, 1, 2), max_side: int = 64, pad_multiple: int = 8
) -> Path:
    """A 1x1 convolution whose class ``k`` is colour channel ``perm[k]`` (times 10), plus its sidecar JSON.

    With mean 0 and std 1 the input is the colour in 0..1, so a pure red image is class ``perm.index(0)``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = len(perm)
    w = np.zeros((k, 3, 1, 1), np.float32)
    for cls, ch in enumerate(perm):
        w[cls, ch, 0, 0] = 10.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"])],
        "toy",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k, "height", "width"])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(k, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    sidecar = {
        "format": "labelsmart-onnx/1",
        "version": version,
        "classes": TOY_CLASSES[:k],
        "num_classes": k,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "max_side": max_side,
        "pad_multiple": pad_multiple,
        "input_name": "image",
        "output_name": "logits",
        "opset": 18,
        "metrics": {},
        "arch": "toy",
        "encoder": "none",
        "exporter": "onnx.helper",
        "created_at": "2026-01-01T00:00:00Z",
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def interop_python(tool: str) -> str:
    """The interpreter of another tool's own virtualenv (``labelstudio``, ``datumaro``), or a visible skip.

    ``scripts/interop_envs.sh`` makes them in ``.interop/<tool>``; ``LABELSMART_LS_PYTHON`` /
    ``LABELSMART_DATUMARO_PYTHON`` point elsewhere.
    """
    var = {"labelstudio": "LABELSMART_LS_PYTHON", "datumaro": "LABELSMART_DATUMARO_PYTHON"}[tool]
    path = os.environ.get(var) or str(Path(__file__).resolve().parents[1] / ".interop" / tool / "bin" / "python")
    if not os.access(path, os.X_OK):
        pytest.skip(f"{tool} is not installed in its own virtualenv; run scripts/interop_envs.sh or set {var}")
    return path
