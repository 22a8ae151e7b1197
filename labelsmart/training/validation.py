"""Validation of a network in training, through the predictor's own preprocessing path.

:func:`predict_mask` makes a full-size mask exactly as the served ONNX model makes it (``imageio.prepare`` ->
network -> ``imageio.logits_to_mask``), so a round's validation mIoU is the mIoU its exported model gets.

Validation runs one image at a time, at the size the predictor uses (a smaller input would change the score). An
image that runs out of memory is retried once after freeing memory (the CUDA cache on a GPU); out of memory again on
a GPU, it and the rest of validation run on the CPU (warnings say so, and the metrics record ``val_device`` and
``val_out_of_memory_retries``); again on the CPU, the round fails with what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from labelsmart import imageio, metrics
from labelsmart.config import Config, PreprocessConfig
from labelsmart.training.model import SegModel

log = logging.getLogger(__name__)


def out_of_memory(exc: BaseException) -> bool:
    """An allocator out of memory: torch's (:func:`labelsmart.training.round.is_out_of_memory`) or Python's
    ``MemoryError`` (numpy's arrays, turning logits into a mask)."""
    from labelsmart.training.round import is_out_of_memory  # round imports this module

    return is_out_of_memory(exc) or isinstance(exc, MemoryError)


def free_memory(device: torch.device) -> None:
    """Give the memory of released objects back: collect cycles, and empty the CUDA cache on a GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _logits(model: SegModel, x: np.ndarray, device: torch.device) -> np.ndarray:
    """The network's logits ``(K, Hp, Wp)`` float32 of one prepared input ``(3, Hp, Wp)``."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        logits = model(torch.from_numpy(x)[None].to(device))  # (1, K, Hp, Wp)
    return logits[0].float().cpu().numpy()


@torch.inference_mode()
def predict_mask(
    model: SegModel,
    image: np.ndarray,
    pp: PreprocessConfig,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> np.ndarray:
    """Class ids ``(H, W)`` of an RGB uint8 image, made exactly as the predictor makes them (prepare -> model ->
    logits_to_mask); the model must be in eval mode.

    ``scales`` other than ``(1.0,)`` or ``flip`` average instead the class probabilities of several passes (test-time
    augmentation, which the predictor does not do; the label-efficiency benchmark measures what it would gain): the
    image at each working scale ``scale * pp.max_side``, and with ``flip`` mirrored left-right too (its probabilities
    mirrored back), each resized to the image's size. With ``flip`` the mask of a mirrored image is the mirrored mask.
    """
    if tuple(scales) == (1.0,) and not flip:
        x, meta = imageio.prepare(image, pp)  # (3, Hp, Wp)
        mask, _ = imageio.logits_to_mask(_logits(model, x, device), meta)  # (H, W)
        return mask

    def probabilities(img: np.ndarray, scaled: PreprocessConfig) -> np.ndarray:  # (H, W, K) float32
        x, meta = imageio.prepare(img, scaled)
        h, w = meta.work_hw
        probs = imageio.softmax(np.ascontiguousarray(_logits(model, x, device)[:, :h, :w]))  # (K, h, w)
        probs = cv2.resize(np.ascontiguousarray(probs.transpose(1, 2, 0)), meta.orig_hw[::-1])  # (H, W, K)
        return probs.reshape(*meta.orig_hw, -1)  # OpenCV drops a single class's axis

    total: np.ndarray | None = None
    for scale in scales:
        scaled = dataclasses.replace(pp, max_side=max(pp.pad_multiple, round(scale * pp.max_side)))
        probs = probabilities(image, scaled)
        if flip:  # one sum per scale, so that a mirrored image's sums are these mirrored, to the last bit
            probs = probs + probabilities(np.ascontiguousarray(image[:, ::-1]), scaled)[:, ::-1]
        total = probs if total is None else total + probs
    if total is None:
        raise ValueError("predict_mask: scales is empty; give at least one scale, such as (1.0,).")
    return total.argmax(axis=2).astype(np.uint8)


@torch.inference_mode()
def validate(
    model: SegModel,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: Config,
    num_classes: int,
    device: torch.device,
) -> dict[str, Any]:
    """mIoU of full-size predictions made exactly as the predictor makes them (:func:`predict_mask`).

    Out of memory: the image is retried once after freeing memory; out of memory again on a GPU, it and the rest
    are validated on the CPU, and the model is back on ``device`` afterwards. Every image is one forward pass
    already, at the predictor's size, so there is nothing smaller to retry with.

    Returns:
        ``{"val_miou", "val_per_class_iou", "val_pixel_acc"}``, and after an out-of-memory retry also
        ``val_out_of_memory_retries`` and ``val_device`` (where validation ended).

    Raises:
        RoundFailed: out of memory twice on the CPU; the message says what to change.
    """
    from labelsmart.training.round import RoundFailed

    was_training = model.training
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    on, retries = device, 0
    try:
        for i, (image, label) in enumerate(pairs):
            attempts = 0
            while True:
                try:
                    mask = predict_mask(model, image, cfg.preprocess, on)
                    break
                except Exception as exc:  # noqa: BLE001 - only out of memory is retried, the rest re-raised
                    if not out_of_memory(exc):
                        raise
                # out of the except block, so the failed forward's tensors (held by the traceback) are released
                attempts += 1
                retries += 1
                free_memory(on)
                where = f"validation image {i + 1} of {len(pairs)} ({image.shape[1]}x{image.shape[0]})"
                if attempts == 1:
                    log.warning("out of memory in %s on %s; freed memory, retrying", where, on)
                elif on.type != "cpu":
                    log.warning("out of memory in %s on %s again; validating the rest on the CPU", where, on)
                    on = torch.device("cpu")
                    model.to(on)
                    free_memory(device)
                else:
                    raise RoundFailed(
                        f"out of memory in {where} on the CPU; nothing was saved. Lower preprocess.max_side "
                        f"(now {cfg.preprocess.max_side}, LABELSMART_PREPROCESS_MAX_SIDE), or train on a machine "
                        "with more memory."
                    )
            conf += metrics.confusion_matrix(label, mask, num_classes)
    finally:
        if on != device:
            model.to(device)
        model.train(was_training)
    s = metrics.scores(conf)
    out: dict[str, Any] = {"val_miou": s["miou"], "val_per_class_iou": s["per_class_iou"]}
    out["val_pixel_acc"] = s["pixel_acc"]
    if retries:
        out.update(val_out_of_memory_retries=retries, val_device=on.type)
    return out
