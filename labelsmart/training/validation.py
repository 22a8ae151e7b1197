"""Validation of a network in training, through the predictor's own preprocessing path.

:func:`predict_mask` makes a full-size mask exactly as the served ONNX model makes it (``imageio.prepare`` ->
network -> ``imageio.logits_to_mask``), so a round's validation mIoU is the mIoU its exported model gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from labelsmart import imageio, metrics
from labelsmart.config import Config, PreprocessConfig
from labelsmart.training.model import SegModel


@torch.inference_mode()
def predict_mask(model: SegModel, image: np.ndarray, pp: PreprocessConfig, device: torch.device) -> np.ndarray:
    """Class ids ``(H, W)`` of an RGB uint8 image, made exactly as the predictor makes them (prepare -> model ->
    logits_to_mask); the model must be in eval mode."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    x, meta = imageio.prepare(image, pp)  # (3, Hp, Wp)
    with autocast:
        logits = model(torch.from_numpy(x)[None].to(device))  # (1, K, Hp, Wp)
    mask, _ = imageio.logits_to_mask(logits[0].float().cpu().numpy(), meta)  # (H, W)
    return mask


@torch.inference_mode()
def validate(
    model: SegModel,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: Config,
    num_classes: int,
    device: torch.device,
) -> dict[str, Any]:
    """mIoU of full-size predictions made exactly as the predictor makes them (:func:`predict_mask`).

    Returns:
        ``{"val_miou", "val_per_class_iou", "val_pixel_acc"}``.
    """
    was_training = model.training
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image, label in pairs:
        conf += metrics.confusion_matrix(label, predict_mask(model, image, cfg.preprocess, device), num_classes)
    model.train(was_training)
    s = metrics.scores(conf)
    return {"val_miou": s["miou"], "val_per_class_iou": s["per_class_iou"], "val_pixel_acc": s["pixel_acc"]}
