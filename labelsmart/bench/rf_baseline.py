"""The ilastik-style peer of BENCHMARK.md section 1: per-pixel features + a random forest.

``skimage.feature.multiscale_basic_features`` (RGB; intensity, edges and texture at sigmas 1-16) computed at
half resolution, and a scikit-learn ``RandomForestClassifier(n_estimators=50)`` fitted on the labelled pixels
(at most 400,000, uniformly subsampled with seed 0). A prediction is made at half resolution and upsampled to
the image size with nearest neighbour. NumPy, OpenCV, scikit-image and scikit-learn only; no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX

log = logging.getLogger(__name__)

N_ESTIMATORS = 50
MAX_PIXELS = 400_000
SIGMA_MIN, SIGMA_MAX = 1.0, 16.0
FEATURE_SCALE = 0.5  # features are computed at half resolution


def half_size(height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` of the feature map of an image of ``height`` x ``width``."""
    return max(1, round(height * FEATURE_SCALE)), max(1, round(width * FEATURE_SCALE))


def pixel_features(image: np.ndarray) -> np.ndarray:
    """Features of an RGB uint8 image ``(H, W, 3)`` at half resolution: float32 ``(h, w, F)`` (F = 60 for RGB)."""
    from skimage.feature import multiscale_basic_features

    small = imageio.resize_image(image, half_size(*image.shape[:2]))  # (h, w, 3)
    feats = multiscale_basic_features(
        small,
        intensity=True,
        edges=True,
        texture=True,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        channel_axis=-1,
    )  # (h, w, F)
    return np.ascontiguousarray(feats, dtype=np.float32)


def _half_index(mask_shape: tuple[int, int], feat_shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Flat feature-map index of full-resolution pixels ``(ys, xs)`` (the half-resolution pixel covering each)."""
    fy = np.minimum(ys * feat_shape[0] // mask_shape[0], feat_shape[0] - 1)
    fx = np.minimum(xs * feat_shape[1] // mask_shape[1], feat_shape[1] - 1)
    return fy * feat_shape[1] + fx


class RandomForestPeer:
    """Fit on (image, sparse or dense mask) pairs, predict full-size masks."""

    def __init__(
        self, n_estimators: int = N_ESTIMATORS, max_pixels: int = MAX_PIXELS, seed: int = 0, n_jobs: int | None = None
    ) -> None:
        self.n_estimators = n_estimators
        self.max_pixels = max_pixels
        self.seed = seed
        self.n_jobs = n_jobs
        self.forest = None
        self.fitted_pixels = 0

    def fit(
        self, count: int, load: Callable[[int], tuple[np.ndarray, np.ndarray]], masks: Sequence[np.ndarray]
    ) -> None:
        """Fit the forest on the labelled pixels of ``count`` images.

        The subsample is drawn over all labelled pixels of all images at once (uniformly, without
        replacement, ``numpy.random.default_rng(seed)``), then features are computed one image at a time, so
        memory holds one feature map and the chosen pixels only.

        Args:
            count: number of images.
            load: ``load(i)`` -> ``(image RGB uint8 (H, W, 3), mask uint8 (H, W))``, 255 = unlabelled.
            masks: the same masks as ``load`` returns, to count labelled pixels before any feature is made.

        Raises:
            ValueError: no labelled pixel, or fewer than two classes.
        """
        from sklearn.ensemble import RandomForestClassifier

        per_image = [int((np.asarray(m) != IGNORE_INDEX).sum()) for m in masks]
        total = sum(per_image)
        if total == 0:
            raise ValueError("the random-forest peer got no labelled pixel; label some pixels first.")
        rng = np.random.default_rng(self.seed)
        take = np.arange(total) if total <= self.max_pixels else np.sort(rng.choice(total, self.max_pixels, False))
        xs_all: list[np.ndarray] = []
        ys_all: list[np.ndarray] = []
        start = 0
        for i in range(count):
            n = per_image[i]
            sel = take[(take >= start) & (take < start + n)] - start  # ranks among this image's labelled pixels
            start += n
            if sel.size == 0:
                continue
            image, mask = load(i)
            yy, xx = np.nonzero(mask != IGNORE_INDEX)  # row-major order: the ranks above index into it
            yy, xx = yy[sel], xx[sel]
            feats = pixel_features(image)  # (h, w, F)
            flat = feats.reshape(-1, feats.shape[2])  # (h*w, F)
            xs_all.append(flat[_half_index(mask.shape, feats.shape[:2], yy, xx)])
            ys_all.append(mask[yy, xx])
        x = np.concatenate(xs_all)  # (M, F)
        y = np.concatenate(ys_all)  # (M,)
        if np.unique(y).size < 2:
            raise ValueError("the random-forest peer needs labels of at least two classes; label another class.")
        self.forest = RandomForestClassifier(n_estimators=self.n_estimators, random_state=self.seed, n_jobs=self.n_jobs)
        self.forest.fit(x, y)
        self.fitted_pixels = int(y.size)
        log.info("random forest: %d trees on %d pixels x %d features", self.n_estimators, y.size, x.shape[1])

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class ids ``(H, W)`` uint8 of an RGB uint8 image ``(H, W, 3)``."""
        if self.forest is None:
            raise RuntimeError("fit the random-forest peer before predicting.")
        feats = pixel_features(image)  # (h, w, F)
        pred = self.forest.predict(feats.reshape(-1, feats.shape[2])).astype(np.uint8)  # (h*w,)
        small = pred.reshape(feats.shape[:2])  # (h, w)
        return cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)  # (H, W)
