"""Torch datasets over labelled images: working-scale pairs, geometric and photometric augmentation.

Images and masks are resized to working scale once (the same :mod:`labelsmart.imageio` path the predictor
uses; masks with the stroke-preserving resize). Each item is a random scale / crop / flip applied to
image and label together, then two photometric views of the crop for the contrastive stage. Every item
draws from its own NumPy generator seeded by ``(seed, index)``, so a run is reproducible with any number
of loader workers; indices past ``len()`` wrap around and give fresh augmentations of the same pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX, Config

log = logging.getLogger(__name__)

SCALE_RANGE = (0.75, 1.5)
CROP_TRIES = 5  # random crops tried before centring one on a labelled pixel
# The photometric view (:func:`photometric`; the device path, :mod:`labelsmart.training.device_data`, draws the same)
JITTER_P, GREY_P, BLUR_P = 0.8, 0.2, 0.5  # chance of colour jitter, of grey, of blur
JITTER = (0.6, 1.4)  # brightness, contrast and saturation factors
HUE = (-0.1, 0.1)  # hue shift, share of the colour circle
BLUR_SIGMA = (0.1, 2.0)


# ------------------------------------------------------------------------------------------ augmentation


def random_scale_crop_flip(
    image: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator, fill: Sequence[int] = (0, 0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale (0.75-1.5), square crop and horizontal flip of an image and its labels together.

    An image smaller than the crop is padded bottom/right with ``fill`` (image) and 255 (labels). A few
    random crops are tried for one that holds labelled pixels; then a crop is placed around a random
    labelled pixel.

    Returns:
        ``(image (crop, crop, 3) uint8, mask (crop, crop) uint8)``.
    """
    h, w = mask.shape
    s = rng.uniform(*SCALE_RANGE)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    image = imageio.resize_image(image, size)  # (h', w', 3)
    mask = imageio.resize_labels(mask, size)  # (h', w')
    ph, pw = max(crop - size[0], 0), max(crop - size[1], 0)
    if ph or pw:
        padded = np.empty((size[0] + ph, size[1] + pw, 3), dtype=np.uint8)
        padded[...] = np.asarray(fill, dtype=np.uint8)
        padded[: size[0], : size[1]] = image
        image = padded
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    h, w = mask.shape
    y0 = x0 = 0
    for _ in range(CROP_TRIES):
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        if (mask[y0 : y0 + crop, x0 : x0 + crop] != IGNORE_INDEX).any():
            break
    else:
        ys, xs = np.nonzero(mask != IGNORE_INDEX)
        if ys.size:
            k = int(rng.integers(ys.size))
            y0 = int(np.clip(ys[k] - rng.integers(0, crop), 0, h - crop))
            x0 = int(np.clip(xs[k] - rng.integers(0, crop), 0, w - crop))
    image = image[y0 : y0 + crop, x0 : x0 + crop]
    mask = mask[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One photometric view: colour jitter (p=0.8), random grey (p=0.2), Gaussian blur (p=0.5).

    Args:
        image: RGB uint8 ``(H, W, 3)``.

    Returns:
        RGB uint8 ``(H, W, 3)``.
    """
    x = image.astype(np.float32)  # (H, W, 3) in 0..255
    if rng.random() < JITTER_P:
        for op in rng.permutation(4):
            if op == 0:  # brightness
                x *= rng.uniform(*JITTER)
            elif op == 1:  # contrast
                grey = x.mean()
                x = (x - grey) * rng.uniform(*JITTER) + grey
            elif op == 2:  # saturation
                grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
                x = (x - grey[..., None]) * rng.uniform(*JITTER) + grey[..., None]
            else:  # hue
                hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)  # H in 0..179
                shift = int(round(rng.uniform(*HUE) * 180))
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
            x = np.clip(x, 0, 255)
    if rng.random() < GREY_P:
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
        x = np.repeat(grey[..., None], 3, axis=2)
    if rng.random() < BLUR_P:
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=rng.uniform(*BLUR_SIGMA))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class LabelledSet(Dataset):
    """Labelled images at working scale, augmented for contrastive pretraining and fine-tuning.

    Items are ``{"view1": (3, c, c) float32, "view2": (3, c, c) float32, "label": (c, c) int64}``: two
    photometric views of one geometric crop and its labels (255 = unlabelled).
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: Config, seed: int | None = None) -> None:
        """Resize the pairs to working scale once.

        Args:
            pairs: ``(image RGB uint8 (H, W, 3), mask uint8 (H, W))`` at any size.
            cfg: configuration (``preprocess.max_side``, mean/std, ``train.crop``).
            seed: base seed of the per-item generators; ``cfg.train.seed`` when None.
        """
        self.crop = cfg.train.crop
        self.mean = cfg.preprocess.mean
        self.std = cfg.preprocess.std
        self.seed = cfg.train.seed if seed is None else seed
        # Padding takes the mean colour, which normalises to 0 like the predictor's padding.
        self.fill = tuple(int(round(255 * m)) for m in self.mean)
        self.items: list[tuple[np.ndarray, np.ndarray]] = []
        for image, mask in pairs:
            size = imageio.working_size(image.shape[0], image.shape[1], cfg.preprocess.max_side)
            self.items.append((imageio.resize_image(image, size), imageio.resize_labels(mask, size)))

    def __len__(self) -> int:
        return len(self.items)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Labelled pixels per class over all items at working scale, ``(num_classes,)`` int64."""
        counts = np.zeros(num_classes, dtype=np.int64)  # (K,)
        for _, mask in self.items:
            labelled = mask[mask != IGNORE_INDEX]
            counts += np.bincount(labelled[labelled < num_classes], minlength=num_classes)[:num_classes]
        return counts

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        image, mask = self.items[int(index) % len(self.items)]
        image, label = random_scale_crop_flip(image, mask, self.crop, rng, self.fill)  # (c, c, 3), (c, c)
        view1 = imageio.normalize(photometric(image, rng), self.mean, self.std)  # (3, c, c)
        view2 = imageio.normalize(photometric(image, rng), self.mean, self.std)  # (3, c, c)
        return {
            "view1": torch.from_numpy(view1),
            "view2": torch.from_numpy(view2),
            "label": torch.from_numpy(label.astype(np.int64)),
        }


class UnlabelledSet(Dataset):
    """Unlabelled images at working scale for the semi-supervised objective (``train.pseudo_weight``).

    Items are ``{"view1", "view2"}``: two photometric views ``(3, c, c) float32`` of one random scale / crop /
    flip, the same augmentation as :class:`LabelledSet` without labels. The network's confident predictions
    on the crop become its pseudo-labels during training.
    """

    def __init__(self, images: Sequence[np.ndarray], cfg: Config, seed: int | None = None) -> None:
        """Resize the images to working scale once (``images``: RGB uint8 ``(H, W, 3)`` at any size)."""
        self.crop = cfg.train.crop
        self.mean = cfg.preprocess.mean
        self.std = cfg.preprocess.std
        self.seed = (cfg.train.seed if seed is None else seed) + 1  # not the labelled set's draws
        self.fill = tuple(int(round(255 * m)) for m in self.mean)
        self.items: list[np.ndarray] = []
        for image in images:
            size = imageio.working_size(image.shape[0], image.shape[1], cfg.preprocess.max_side)
            self.items.append(imageio.resize_image(image, size))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        image = self.items[int(index) % len(self.items)]
        every = np.zeros(image.shape[:2], dtype=np.uint8)  # all "labelled": any crop will do
        image, _ = random_scale_crop_flip(image, every, self.crop, rng, self.fill)  # (c, c, 3)
        return {
            "view1": torch.from_numpy(imageio.normalize(photometric(image, rng), self.mean, self.std)),
            "view2": torch.from_numpy(imageio.normalize(photometric(image, rng), self.mean, self.std)),
        }


def cut_out(image: np.ndarray, rng: np.random.Generator, fill: Sequence[int], max_share: float = 0.5) -> np.ndarray:
    """A copy of ``image`` (``(H, W, 3)`` uint8) with one random rectangle, up to ``max_share`` of each side,
    filled with ``fill`` (FixMatch's cut-out; the pseudo-labels under it still apply)."""
    h, w = image.shape[:2]
    ch, cw = int(rng.integers(1, max(2, int(h * max_share) + 1))), int(rng.integers(1, max(2, int(w * max_share) + 1)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = image.copy()
    out[y0 : y0 + ch, x0 : x0 + cw] = np.asarray(fill, dtype=np.uint8)
    return out


class WeakStrongSet(UnlabelledSet):
    """Unlabelled crops for self-training (``train.unlabelled_weight``): ``{"weak", "strong"}``, each
    ``(3, c, c) float32``: one random scale / crop / flip (the weak view, from which the teacher's pseudo-labels
    come) and the same crop strongly augmented (:func:`photometric`, then :func:`cut_out`), pixel-aligned with it,
    which the network learns the pseudo-labels on."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        image = self.items[int(index) % len(self.items)]
        every = np.zeros(image.shape[:2], dtype=np.uint8)
        image, _ = random_scale_crop_flip(image, every, self.crop, rng, self.fill)  # (c, c, 3)
        strong = cut_out(photometric(image, rng), rng, self.fill)
        return {
            "weak": torch.from_numpy(imageio.normalize(image, self.mean, self.std)),
            "strong": torch.from_numpy(imageio.normalize(strong, self.mean, self.std)),
        }
