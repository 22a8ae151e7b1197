"""The shared data-folder layout, read and checked in one place, and evaluation of a model over a split.

A folder in the layout of ``../shared/data/*`` holds ``images/`` (the photos), ``masks/`` (``<name>.png`` index
masks, class ids, 255 = void), ``classes.json`` (the classes file :func:`labelsmart.store.load_classes_file`
reads) and ``splits.json`` (``{split name: [image names without extension]}``). ``python -m labelsmart
evaluate``, the benchmarks and the scripts all open it through :meth:`DataFolder.open` and score a model with
:func:`evaluate`: one confusion matrix over every pixel of the split at full mask resolution, void ignored,
as ``../shared/BENCHMARK.md`` measures mIoU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio, metrics
from labelsmart.config import IGNORE_INDEX, IMAGE_EXTENSIONS
from labelsmart.store import StoreError, load_classes_file

LAYOUT = "images/, masks/, splits.json and classes.json"


class DatasetError(ValueError):
    """A data folder that does not follow the layout; the message names the file and what to do."""


@dataclass(frozen=True)
class DataFolder:
    """A checked folder in the shared layout.

    Attributes:
        classes: class names in id order (mask value k is ``classes[k]``).
        colors: their colours ``(r, g, b)`` (black where ``classes.json`` gives none).
        splits: ``{split name: [image names]}`` as ``splits.json`` lists them.
    """

    root: Path
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    splits: dict[str, list[str]]

    @classmethod
    def open(cls, root: Path, flag: str = "--dataset") -> DataFolder:
        """Check and read a data folder given on the command line with ``flag``.

        Raises:
            DatasetError: a missing part or an unreadable ``splits.json`` / ``classes.json``.
        """
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                f"{root}: not a folder, so {root / 'images'} is missing; pass {flag} a folder with {LAYOUT}."
            )
        for part in ("images", "masks", "splits.json", "classes.json"):
            if not (root / part).exists():
                raise DatasetError(f"{root / part} is missing; pass {flag} a folder with {LAYOUT}.")
        try:
            splits = json.loads((root / "splits.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{root / 'splits.json'}: not readable JSON ({exc}); fix it.") from exc
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise DatasetError(f"{root / 'splits.json'}: expected {{split name: [image names]}}; fix it.")
        try:
            classes = load_classes_file(root / "classes.json")
        except StoreError as exc:
            raise DatasetError(str(exc)) from exc
        colors = tuple(c if c is not None else (0, 0, 0) for _, c in classes)
        return cls(root, tuple(n for n, _ in classes), colors, {k: [str(n) for n in v] for k, v in splits.items()})

    def names(self, split: str) -> list[str]:
        """Image names (no extension) of a split, as listed.

        Raises:
            DatasetError: no such split, or it is empty.
        """
        if split not in self.splits:
            raise DatasetError(
                f"{self.root / 'splits.json'}: no split {split!r}; pick one of: {', '.join(sorted(self.splits))}."
            )
        names = self.splits[split]
        if not names:
            raise DatasetError(f"{self.root / 'splits.json'}: split {split!r} is empty; pick another.")
        return names

    def image_rel(self, name: str) -> Path:
        """Path of an image relative to ``images/`` (``.jpg`` and ``.png`` first, then the other image types).

        Raises:
            DatasetError: no image file has this name.
        """
        images = self.root / "images"
        for ext in (".jpg", ".png", *IMAGE_EXTENSIONS):
            for cand in (f"{name}{ext}", f"{name}{ext.upper()}"):
                if (images / cand).is_file():
                    return Path(cand)
        raise DatasetError(f"{images / name}: no image file with this name (.jpg/.png); check splits.json.")

    def mask_path(self, name: str) -> Path:
        """The ground-truth mask of an image."""
        return self.root / "masks" / f"{name}.png"

    def read_mask(self, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The ground-truth mask ``(H, W)`` uint8 of an image, class ids checked; 255 = void."""
        return imageio.read_mask(self.mask_path(name), shape=shape, num_classes=len(self.classes))

    def read_image(self, name: str) -> np.ndarray:
        """The RGB uint8 image ``(H, W, 3)`` of one name."""
        return imageio.read_image(self.root / "images" / self.image_rel(name))

    def read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image RGB uint8 (H, W, 3), mask uint8 (H, W))`` of one name; 255 = void."""
        image = self.read_image(name)
        return image, self.read_mask(name, shape=image.shape[:2])


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray], folder: DataFolder, names: Iterable[str], progress: Any = None
) -> dict[str, Any]:
    """Score a model over images of a folder: one confusion matrix at full mask resolution, 255 ignored.

    Args:
        predict: RGB uint8 ``(H, W, 3)`` -> class ids ``(H, W)``.
        folder: where the images and masks are.
        names: the evaluation images (read one at a time).
        progress: optional tqdm-like object, ``update(1)`` per image.

    Returns:
        :func:`labelsmart.metrics.scores` of the matrix plus ``"confusion"`` (nested lists) and ``"images"``.
    """
    k = len(folder.classes)
    conf = np.zeros((k, k), dtype=np.int64)
    n = 0
    for name in names:
        image, gt = folder.read(name)
        conf += metrics.confusion_matrix(gt, predict(image), k, ignore_index=IGNORE_INDEX)
        n += 1
        if progress is not None:
            progress.update(1)
    out = metrics.scores(conf)
    out.update(confusion=conf.tolist(), images=n)
    return out
