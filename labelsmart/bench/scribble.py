"""Simulated annotator strokes, deterministic, exactly as ``shared/BENCHMARK.md`` defines them.

For each class c: connected components of ``mask == c`` (8-connectivity); components under 64 px are
skipped; each is eroded with a 7x7 elliptical kernel (if nothing is left, the component is kept as is),
skeletonised, dilated with a 3x3 square, and clipped to the component. Those pixels get label c, every
other pixel 255.
"""

from __future__ import annotations

import cv2
import numpy as np

from labelsmart.config import IGNORE_INDEX

MIN_COMPONENT_PX = 64
_ERODE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
_DILATE = np.ones((3, 3), np.uint8)


def simulate_scribbles(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Dense index mask ``(H, W)`` -> sparse scribble mask of the same shape (255 = unlabelled)."""
    from skimage.morphology import skeletonize

    out = np.full(mask.shape, ignore_index, dtype=np.uint8)
    for c in np.unique(mask):
        if c == ignore_index:
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] < MIN_COMPONENT_PX:
                continue
            x, y, w, h = stats[k, :4]
            # Work in the component's bounding box padded by the kernels' reach, to stay fast on big images.
            y0, y1 = max(0, y - 4), min(mask.shape[0], y + h + 4)
            x0, x1 = max(0, x - 4), min(mask.shape[1], x + w + 4)
            region = (comp[y0:y1, x0:x1] == k).astype(np.uint8)
            eroded = cv2.erode(region, _ERODE, borderType=cv2.BORDER_CONSTANT, borderValue=0)
            if not eroded.any():
                eroded = region
            skeleton = skeletonize(eroded.astype(bool)).astype(np.uint8)
            stroke = cv2.dilate(skeleton, _DILATE) & region
            out[y0:y1, x0:x1][stroke.astype(bool)] = c
    return out
