"""Segmentation metrics from a confusion matrix (NumPy only, so the predictor and the CLI run without torch).

mIoU is the mean IoU over the classes present in the ground truth, as BENCHMARK.md measures it: one
confusion matrix over all evaluation pixels, unlabelled pixels (255) ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labelsmart.config import IGNORE_INDEX


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Count ``(ground truth, prediction)`` pairs.

    Args:
        gt: ground-truth class ids, any shape; ``ignore_index`` marks pixels that are not counted.
        pred: predicted class ids, same shape as ``gt``.
        num_classes: K; ids outside ``0..K-1`` (other than ``ignore_index`` in ``gt``) are an error.
        ignore_index: ground-truth value of unlabelled pixels.

    Returns:
        ``(K, K)`` int64 matrix, rows = ground truth, columns = prediction.

    Raises:
        ValueError: shapes differ or a class id is out of range.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(
            f"ground truth {gt.shape} and prediction {pred.shape} differ in shape; compare masks of one size."
        )
    keep = gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"class ids outside 0..{num_classes - 1} in the ground truth or the prediction.")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def scores(conf: np.ndarray, present: np.ndarray | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of a confusion matrix.

    Args:
        conf: ``(K, K)`` counts, rows = ground truth, columns = prediction.
        present: boolean ``(K,)`` of the classes that count for the mean; by default the classes present in
            the ground truth (row sum > 0).

    Returns:
        ``{"miou": float, "per_class_iou": {class_id: float or None}, "pixel_acc": float}``; fractions in
        [0, 1]; a class absent from the ground truth has IoU None. With no labelled pixel at all, ``miou``
        and ``pixel_acc`` are 0.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)  # (K,)
    gt_total = conf.sum(axis=1)  # (K,)
    pred_total = conf.sum(axis=0)  # (K,)
    union = gt_total + pred_total - tp  # (K,)
    present = gt_total > 0 if present is None else np.asarray(present, dtype=bool)
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)  # (K,)
    per_class = {int(k): (float(iou[k]) if present[k] else None) for k in range(conf.shape[0])}
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": per_class,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
    }
