"""The sidecar JSON beside every exported ``.onnx`` file: what a model is, read and written in one place.

A model is rebuilt for serving from its two files alone: the ONNX graph (image in, logits out) and this
sidecar (classes and colours, the preprocessing it was trained with, its version and metrics, how it was
exported). :func:`labelsmart.training.export.export_onnx` writes it, :class:`Sidecar.read` checks it for the
predictor, the CLI and the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelsmart.config import PreprocessConfig

SIDECAR_FORMAT = "labelsmart-onnx/1"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
REQUIRED_KEYS = ("version", "classes", "num_classes", "mean", "std", "max_side", "pad_multiple")
OUTPUT_DESCRIPTION = "logits (B, K, H, W) at input size; softmax over K"
HINT = "export the model with `python -m labelsmart export` so it has one."


def sidecar_path(onnx_path: Path) -> Path:
    """The sidecar of an ``.onnx`` file: same folder and stem, ``.json``."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class Sidecar:
    """The sidecar of one exported model.

    Attributes:
        classes: ``[{"id", "name", "color"}]`` sorted by id; output channel k is class k.
        preprocess: the working scale, padding and normalisation the model expects.
        metrics: the round's metrics (validation mIoU, steps, ...), as recorded at export.
        details: the rest of the file (architecture, exporter, opset, parity, time), kept as written.
    """

    version: int
    classes: tuple[dict[str, Any], ...]
    preprocess: PreprocessConfig
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """K, the number of output channels."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Class names in id order."""
        return [str(c["name"]) for c in self.classes]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        """Class colours ``(r, g, b)`` in id order."""
        return [(int(c["color"][0]), int(c["color"][1]), int(c["color"][2])) for c in self.classes]

    def to_json(self) -> dict[str, Any]:
        """The JSON object written beside the model."""
        pp = self.preprocess
        return {
            "format": SIDECAR_FORMAT,
            "version": int(self.version),
            "classes": [dict(c) for c in self.classes],
            "num_classes": self.num_classes,
            "mean": list(pp.mean),
            "std": list(pp.std),
            "max_side": int(pp.max_side),
            "pad_multiple": int(pp.pad_multiple),
            "input_name": self.input_name,
            "output_name": self.output_name,
            "output": OUTPUT_DESCRIPTION,
            "metrics": self.metrics,
            **self.details,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "sidecar") -> Sidecar:
        """Check and read a sidecar object.

        Raises:
            ValueError: a required key is missing, the format is another, or the classes do not add up;
                the message names ``source`` and what to do.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: sidecar JSON is not an object; {HINT}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source}: sidecar JSON lacks {', '.join(missing)}; {HINT}")
        fmt = data.get("format", SIDECAR_FORMAT)
        if fmt != SIDECAR_FORMAT:
            raise ValueError(f"{source}: sidecar format {fmt!r} is not {SIDECAR_FORMAT!r}; {HINT}")
        if len(data["classes"]) != int(data["num_classes"]):
            raise ValueError(
                f"{source}: sidecar lists {len(data['classes'])} classes but num_classes is {data['num_classes']}; "
                f"{HINT}"
            )
        known = {*REQUIRED_KEYS, "format", "input_name", "output_name", "output", "metrics"}
        return cls(
            version=int(data["version"]),
            classes=tuple(sorted((dict(c) for c in data["classes"]), key=lambda c: int(c["id"]))),
            preprocess=PreprocessConfig(
                max_side=int(data["max_side"]),
                pad_multiple=int(data["pad_multiple"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
            ),
            input_name=str(data.get("input_name", INPUT_NAME)),
            output_name=str(data.get("output_name", OUTPUT_NAME)),
            metrics=dict(data.get("metrics") or {}),
            details={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def read(cls, onnx_path: Path) -> Sidecar:
        """Read and check the sidecar next to an ``.onnx`` file.

        Raises:
            ValueError: the sidecar is missing, not JSON, or not a labelsmart sidecar.
        """
        path = sidecar_path(onnx_path)
        if not path.is_file():
            raise ValueError(f"{path}: sidecar JSON missing; {HINT}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: sidecar JSON is corrupt ({exc}); {HINT}") from exc
        return cls.from_json(data, path)


def load_sidecar(onnx_path: Path) -> Sidecar:
    """The checked sidecar of an ``.onnx`` file (:meth:`Sidecar.read`)."""
    return Sidecar.read(onnx_path)
