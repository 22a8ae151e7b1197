"""Augmented batches of labelled crops made on the device, so that a GPU round is not bound by CPU augmentation.

:class:`DeviceBatches` uploads the working-scale pairs a :class:`~labelsmart.training.data.LabelledSet` holds once,
as uint8, and makes each batch with torch ops where the network runs: the batches a DataLoader over the
``LabelledSet`` gives (same keys, shapes, dtypes, value ranges), with the same augmentation:

- geometry (:func:`~labelsmart.training.data.random_scale_crop_flip`): a random scale in ``SCALE_RANGE`` per crop
  (bilinear with antialiasing for the image, so shrinking averages like OpenCV's area filter; ``nearest-exact`` for
  the labels, which are never blended), bottom/right padding with the mean colour and 255 when the scaled image is
  smaller than the crop, a square crop that holds labelled pixels (``CROP_TRIES`` random tries, then a crop around a
  random labelled pixel), a horizontal flip with p = 0.5;
- two photometric views (:func:`~labelsmart.training.data.photometric`): colour jitter (p = 0.8; brightness,
  contrast, saturation in 1 +- 0.4 and hue in +- 0.1 of the colour circle, in a random order), grey (p = 0.2),
  Gaussian blur (p = 0.5, sigma 0.1-2), then normalisation with mean/std.

The photometric ops are torchvision's (``transforms.v2.functional``), which take one factor per call, so each view
of each crop is one call per op (a loop over the batch). Hue is ``adjust_hue``: RGB -> HSV in torch, a shift of H,
HSV -> RGB, all on the device. Differences from the CPU path, none of which changes what is learnt: contrast
blends with the mean of the grey image (torchvision) rather than the mean of all channels; values stay float
between ops instead of being rounded to uint8; a scale below 1 samples labels by nearest neighbour, so a one-pixel
stroke loses up to a quarter of its pixels in that crop (the working-scale masks keep thin strokes; this is per
crop only).

Random parameters come from one CPU ``torch.Generator`` seeded from the seed, so two instances with the same seed
and the same calls give the same batches. Drawing them on the CPU and uploading the integers once per batch (no
``.item()`` on the device) keeps batch making free of device synchronisation, so it queues behind the previous step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from labelsmart.config import IGNORE_INDEX, Config
from labelsmart.training.data import BLUR_P, BLUR_SIGMA, CROP_TRIES, GREY_P, HUE, JITTER, JITTER_P, SCALE_RANGE

log = logging.getLogger(__name__)

Op = tuple[Callable[..., Tensor], tuple]  # a photometric op and its arguments after the image


@dataclass(frozen=True)
class _Plan:
    """The random draws of one crop, made on the CPU before any device work.

    Attributes:
        item: index into the uploaded pairs.
        size: ``(h', w')`` of the scaled image.
        tries: ``CROP_TRIES`` random crop origins ``(y0, x0)`` in the padded scaled image.
        pick: a random non-negative integer; modulo the labelled pixel count it picks the fallback pixel.
        shift: ``(dy, dx)`` in ``[0, crop)``: where the fallback pixel sits in its crop (before clipping).
        flip: horizontal flip.
        views: the photometric ops of the two views, in order.
    """

    item: int
    size: tuple[int, int]
    tries: tuple[tuple[int, int], ...]
    pick: int
    shift: tuple[int, int]
    flip: bool
    views: tuple[tuple[Op, ...], tuple[Op, ...]]


class DeviceBatches:
    """Endless augmented batches of labelled crops, made on ``device`` from pairs uploaded once.

    ``batch(n)`` (or ``next(batches(n))``) is ``{"view1": (n, 3, c, c) float32, "view2": (n, 3, c, c) float32,
    "label": (n, c, c) int64}`` on ``device``: two photometric views of one geometric crop, normalised, and its labels
    (255 = unlabelled). Items are taken in shuffled passes over the pairs, like the round's ``EndlessSampler``.

    Example::

        batches = DeviceBatches(dataset.items, cfg, torch.device("cuda")).batches(cfg.train.batch_size)
        batch = next(batches)
    """

    def __init__(
        self,
        items: Sequence[tuple[np.ndarray, np.ndarray]],
        cfg: Config,
        device: torch.device,
        seed: int | None = None,
        photometric: bool = True,
    ) -> None:
        """Upload the pairs (uint8) to the device.

        Args:
            items: working-scale ``(image RGB uint8 (h, w, 3), mask uint8 (h, w))`` pairs, as ``LabelledSet.items``
                holds them (not resized again here).
            cfg: configuration (``train.crop``, ``preprocess.mean``/``std``, ``train.seed``).
            device: where the pairs live and the batches are made.
            seed: seed of the generator; ``cfg.train.seed`` when None.
            photometric: False gives both views as the plain normalised crop (geometry only).
        """
        if not items:
            raise ValueError("DeviceBatches needs at least one labelled image.")
        self.crop = cfg.train.crop
        self.device = torch.device(device)
        self.photometric = photometric
        self.generator = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
        # Padding takes the mean colour (0..255), which normalises to about 0 like the predictor's padding.
        fill = [round(255 * m) for m in cfg.preprocess.mean]
        self.fill = torch.tensor(fill, dtype=torch.float32, device=self.device)[:, None, None]  # (3, 1, 1)
        self.mean = torch.tensor(cfg.preprocess.mean, dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(cfg.preprocess.std, dtype=torch.float32, device=self.device)[:, None, None]
        self.images: list[Tensor] = []  # (3, h, w) uint8
        self.masks: list[Tensor] = []  # (h, w) uint8
        for image, mask in items:
            if image.shape[:2] != mask.shape:
                raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size.")
            self.images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().to(device))
            self.masks.append(torch.from_numpy(np.ascontiguousarray(mask)).to(device))
        self._order: list[int] = []
        self._arange = torch.arange(self.crop, device=self.device)  # (c,)
        log.info("device batches: %d images on %s", len(self.images), self.device)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Endless batches of ``batch_size`` crops."""
        while True:
            yield self.batch(batch_size)

    @torch.no_grad()
    def batch(self, batch_size: int) -> dict[str, Tensor]:
        """One batch of ``batch_size`` crops (keys, shapes and dtypes in the class docstring)."""
        plans = [self._plan() for _ in range(batch_size)]
        # Every integer a crop's choice needs on the device, uploaded at once: (B, 2 * CROP_TRIES + 3).
        ints = torch.tensor([[v for yx in p.tries for v in yx] + [p.pick, *p.shift] for p in plans], dtype=torch.int64)
        if self.device.type == "cuda":
            ints = ints.pin_memory()
        ints = ints.to(self.device, non_blocking=True)
        views1, views2, labels = [], [], []
        for p, row in zip(plans, ints, strict=True):
            image, label = self._crop(p, row)  # (3, c, c) float 0..1, (c, c) uint8
            views1.append(self._view(image, p.views[0]))
            views2.append(self._view(image, p.views[1]))
            labels.append(label)
        return {
            "view1": (torch.stack(views1) - self.mean) / self.std,  # (B, 3, c, c)
            "view2": (torch.stack(views2) - self.mean) / self.std,  # (B, 3, c, c)
            "label": torch.stack(labels).long(),  # (B, c, c)
        }

    # ------------------------------------------------------------------------------------------ draws (CPU)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _int(self, high: int) -> int:
        """A random integer in ``[0, high)``."""
        return int(torch.randint(high, (), generator=self.generator))

    def _next_item(self) -> int:
        if not self._order:
            self._order = torch.randperm(len(self.images), generator=self.generator).tolist()
        return self._order.pop(0)

    def _plan(self) -> _Plan:
        item = self._next_item()
        h, w = self.masks[item].shape
        s = self._uniform(*SCALE_RANGE)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        ph, pw = max(size[0], self.crop), max(size[1], self.crop)  # padded size
        tries = tuple((self._int(ph - self.crop + 1), self._int(pw - self.crop + 1)) for _ in range(CROP_TRIES))
        pick = self._int(2**62)
        shift = (self._int(self.crop), self._int(self.crop))
        flip = self._uniform(0.0, 1.0) < 0.5
        views = (self._photometric_ops(), self._photometric_ops()) if self.photometric else ((), ())
        return _Plan(item, size, tries, pick, shift, flip, views)

    def _photometric_ops(self) -> tuple[Op, ...]:
        """The ops of one view, drawn as :func:`~labelsmart.training.data.photometric` draws them."""
        ops: list[Op] = []
        if self._uniform(0.0, 1.0) < JITTER_P:
            for op in torch.randperm(4, generator=self.generator).tolist():
                if op == 0:
                    ops.append((TF.adjust_brightness, (self._uniform(*JITTER),)))
                elif op == 1:
                    ops.append((TF.adjust_contrast, (self._uniform(*JITTER),)))
                elif op == 2:
                    ops.append((TF.adjust_saturation, (self._uniform(*JITTER),)))
                else:
                    ops.append((TF.adjust_hue, (self._uniform(*HUE),)))
        if self._uniform(0.0, 1.0) < GREY_P:
            ops.append((TF.rgb_to_grayscale, (3,)))
        if self._uniform(0.0, 1.0) < BLUR_P:
            sigma = self._uniform(*BLUR_SIGMA)
            k = min(int(round(8 * sigma + 1)) | 1, 2 * self.crop - 1)  # OpenCV's size for sigma (float images)
            ops.append((TF.gaussian_blur, ([k, k], [sigma, sigma])))
        return tuple(ops)

    # ---------------------------------------------------------------------------------------- device work

    def _crop(self, p: _Plan, row: Tensor) -> tuple[Tensor, Tensor]:
        """The scaled, padded, cropped and flipped image (``(3, c, c)`` float in 0..1) and labels (``(c, c)`` uint8).

        Args:
            p: the crop's draws.
            row: the same draws' integers on the device, ``(2 * CROP_TRIES + 3,)``.
        """
        c = self.crop
        image = self.images[p.item][None].float()  # (1, 3, h, w)
        mask = self.masks[p.item][None, None]  # (1, 1, h, w) uint8
        image = F.interpolate(image, size=p.size, mode="bilinear", align_corners=False, antialias=True)[0]
        mask = F.interpolate(mask, size=p.size, mode="nearest-exact")[0, 0]  # (h', w'), never blended
        ph, pw = max(p.size[0], c), max(p.size[1], c)
        if (ph, pw) != p.size:
            padded = self.fill.expand(3, ph, pw).clone()  # (3, ph, pw)
            padded[:, : p.size[0], : p.size[1]] = image
            image = padded
            mask = F.pad(mask, (0, pw - p.size[1], 0, ph - p.size[0]), value=IGNORE_INDEX)  # (ph, pw)

        # The first try that holds a labelled pixel; else a crop around a random labelled pixel; else the last try.
        labelled = mask != IGNORE_INDEX  # (ph, pw)
        hits = torch.stack([labelled[y : y + c, x : x + c].any() for y, x in p.tries])  # (T,)
        tries = row[: 2 * CROP_TRIES].view(CROP_TRIES, 2)  # (T, 2)
        any_hit = hits.any()
        first = torch.where(any_hit, hits.int().argmax(), CROP_TRIES - 1)  # () the first hit, else the last try
        tried = tries.index_select(0, first[None])[0]  # (2,), a gather: indexing with a tensor would sync
        counts = labelled.flatten().cumsum(0)  # (ph * pw,)
        total = counts[-1]
        k = row[2 * CROP_TRIES] % total.clamp(min=1)  # the k-th labelled pixel (0-based)
        at = torch.searchsorted(counts, (k + 1)[None]).clamp(max=counts.numel() - 1)[0]  # its flat index
        y0 = torch.where(any_hit | (total == 0), tried[0], (at // pw - row[-2]).clamp(0, ph - c))
        x0 = torch.where(any_hit | (total == 0), tried[1], (at % pw - row[-1]).clamp(0, pw - c))

        rows = y0 + self._arange  # (c,)
        cols = x0 + (self._arange.flip(0) if p.flip else self._arange)  # (c,), the flip folded into the crop
        image = image.index_select(1, rows).index_select(2, cols) * (1.0 / 255.0)  # (3, c, c)
        mask = mask.index_select(0, rows).index_select(1, cols)  # (c, c)
        return image, mask

    @staticmethod
    def _view(image: Tensor, ops: Sequence[Op]) -> Tensor:
        """One photometric view of a crop (``(3, c, c)`` float in 0..1; each op clamps to 0..1)."""
        for op, args in ops:
            image = op(image, *args)
        return image
