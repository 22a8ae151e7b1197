"""Dense self-supervised pretraining on a project's own images, before any label (issue 13).

A pixel's embedding in one augmented view of a crop should be closest to the embedding of the same scene point in
a second view, among the embeddings of every other sampled point of the batch: a pixel-level InfoNCE across
views (VADeR, Pinheiro et al., NeurIPS 2020; the positives of PixPro, Xie et al., CVPR 2021). The second view is a
random sub-region of the first (rescaled to the crop, maybe flipped), both photometrically jittered, so the network
has to recognise a point under a change of scale, position, colour and blur. Points of the same crop closer than
``near`` (a share of the crop side) are neither positives nor negatives: a neighbour is usually the same thing.

The network it trains is the one fine-tuning starts from (:func:`labelsmart.training.round.warm_start`); the class
head stays at its initialisation. Off unless asked for: ``bench label-efficiency --ssl-steps/--ssl-minutes``
measures it (BENCHMARKS.md, "Label efficiency, fifth pass").
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelsmart import imageio
from labelsmart.config import Config
from labelsmart.training.data import UnlabelledSet, photometric, random_scale_crop_flip
from labelsmart.training.model import SegModel
from labelsmart.training.objectives import StepContext, sample_features

log = logging.getLogger(__name__)

SECOND_VIEW_SIDE = (0.5, 1.0)  # side of the second view's region, as a share of the crop side
POINTS = 64  # points sampled per crop (the batch's points are each other's negatives)
TEMPERATURE = 0.2
NEAR = 0.1  # points of one crop closer than this share of the crop side are not negatives of each other
WARMUP_STEPS = 10


class ViewPairSet(UnlabelledSet):
    """Two views of one random crop of an unlabelled image, and where ``POINTS`` points of the second lie in the
    first: ``{"view1", "view2": (3, c, c) float32, "points1": (P, 2) float32, "points2": (P, 2) float32}``, points
    as (row, column) pixel coordinates (pixel centres at integers) of view 1 and view 2."""

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        image = self.items[int(index) % len(self.items)]
        every = np.zeros(image.shape[:2], dtype=np.uint8)
        base, _ = random_scale_crop_flip(image, every, self.crop, rng, self.fill)  # (c, c, 3)
        c = self.crop
        side = max(2, round(rng.uniform(*SECOND_VIEW_SIDE) * c))
        y0, x0 = int(rng.integers(0, c - side + 1)), int(rng.integers(0, c - side + 1))
        second = imageio.resize_image(base[y0 : y0 + side, x0 : x0 + side], (c, c))  # (c, c, 3)
        flip = bool(rng.random() < 0.5)
        if flip:
            second = np.ascontiguousarray(second[:, ::-1])
        rows = rng.integers(0, c, POINTS).astype(np.float32)  # (P,) in view 2
        cols = rng.integers(0, c, POINTS).astype(np.float32)  # (P,)
        unflipped = (c - 1 - cols) if flip else cols
        scale = side / c  # view-2 pixel -> region pixel, pixel centres mapped as cv2.resize maps them
        points1 = np.stack([y0 + (rows + 0.5) * scale - 0.5, x0 + (unflipped + 0.5) * scale - 0.5], axis=1)
        return {
            "view1": torch.from_numpy(imageio.normalize(photometric(base, rng), self.mean, self.std)),
            "view2": torch.from_numpy(imageio.normalize(photometric(second, rng), self.mean, self.std)),
            "points1": torch.from_numpy(points1.astype(np.float32)),  # (P, 2)
            "points2": torch.from_numpy(np.stack([rows, cols], axis=1)),  # (P, 2)
        }


def dense_info_nce(z1: Tensor, z2: Tensor, owner: Tensor, where: Tensor, near: float, temperature: float) -> Tensor:
    """Symmetric InfoNCE of point embeddings in two views: ``z1[i]``'s positive is ``z2[i]``, its negatives every
    ``z2[j]`` of another crop or of the same crop at least ``near`` away.

    Args:
        z1, z2: ``(N, D)`` unit-length embeddings of the same N scene points in view 1 and view 2.
        owner: ``(N,)`` the crop each point comes from.
        where: ``(N, 2)`` the points' coordinates in one frame (view 1's pixels).
        near: distance below which two points of a crop are left out of each other's negatives.
        temperature: softmax temperature of the similarities.
    """
    logits = z1.float() @ z2.float().T / temperature  # (N, N)
    n = logits.shape[0]
    same = owner[:, None] == owner[None, :]  # (N, N)
    close = torch.cdist(where.float(), where.float()) < near  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & close & ~eye, float("-inf"))
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2.0


def dense_step(ctx: StepContext, batch: dict[str, Tensor]) -> Tensor:
    """The pixel-level InfoNCE of one batch of :class:`ViewPairSet` items (one forward pass over both views)."""
    b, c = batch["view1"].shape[0], batch["view1"].shape[-1]
    views = ctx.images(batch["view1"], batch["view2"])  # (2B, 3, c, c)
    device = ctx.device
    p1 = batch["points1"].reshape(-1, 2).to(device)  # (B * P, 2)
    p2 = batch["points2"].reshape(-1, 2).to(device)  # (B * P, 2)
    owner = torch.arange(b, device=device).repeat_interleave(batch["points1"].shape[1])  # (B * P,)
    with ctx.autocast:
        feats = ctx.model.forward_features(views)  # (2B, C, h, w)
        picked = torch.cat(
            [
                sample_features(feats, owner, p1[:, 0], p1[:, 1], (c, c)),
                sample_features(feats, owner + b, p2[:, 0], p2[:, 1], (c, c)),
            ]
        )  # (2N, C)
        z = ctx.model.project(picked[:, :, None, None]).flatten(1)  # (2N, D)
    with torch.autocast(device.type, enabled=False):  # similarities / temperature in float32
        z1, z2 = z.float().chunk(2)
        return dense_info_nce(z1, z2, owner, p1, NEAR * c, TEMPERATURE)


def _lr_factor(step: int, steps: int, elapsed: float, seconds: float) -> float:
    """Warm-up over the first steps, then cosine decay to 5 % over the steps or the seconds, whichever ends first."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    done = max(step / max(1, steps), elapsed / seconds if seconds > 0 else 0.0)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def pretrain(
    cfg: Config,
    images: Sequence[np.ndarray],
    num_classes: int,
    steps: int,
    max_seconds: float = 0.0,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[SegModel, dict[str, Any]]:
    """Train a fresh network by dense self-supervised contrast on ``images`` (no labels).

    Args:
        cfg: configuration (``model``, ``preprocess``, and ``train``'s crop, batch size, lr, device, threads, seed).
        images: RGB uint8 ``(H, W, 3)`` images of the project, at any size.
        num_classes: K of the network's (untrained) class head, so the result warm-starts fine-tuning whole.
        steps: optimisation steps at most.
        max_seconds: wall-clock budget (0 = none); the run ends at whichever comes first.
        progress: called with ``(step, steps, loss)`` after every step.
        should_stop: polled every step; True ends the run early (the network so far is returned).

    Returns:
        The network (on its device, in train mode) and ``{"steps", "seconds", "loss", "images"}``.

    Raises:
        ValueError: no images, or a crop that is not a multiple of 32.
    """
    from labelsmart.training.round import endless_batches, network_and_optimiser, resolve_device

    tc = cfg.train
    if not images:
        raise ValueError("self-supervised pretraining needs images; add images to the project first.")
    if tc.crop % 32:
        raise ValueError(f"train.crop is {tc.crop}; set it to a multiple of 32 (the network's stride).")
    t_start = time.monotonic()
    device = resolve_device(tc.device)
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    torch.manual_seed(tc.seed)
    dataset = ViewPairSet(images, cfg)
    cuda = device.type == "cuda"
    workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    batches = endless_batches(dataset, tc.seed + 2, max(2, tc.batch_size), workers, pin_memory=cuda)
    ctx, optimizer = network_and_optimiser(cfg, num_classes, device)
    losses: list[float] = []
    step = 0
    while step < steps:
        elapsed = time.monotonic() - t_start
        if (max_seconds > 0 and elapsed >= max_seconds) or (should_stop is not None and should_stop()):
            break
        for group in optimizer.param_groups:
            group["lr"] = tc.lr * _lr_factor(step, steps, elapsed, max_seconds)
        loss = dense_step(ctx, next(batches))
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"self-supervised pretraining: the loss became {float(loss)} at step {step + 1}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if progress is not None:
            progress(step, steps, losses[-1])
    seconds = time.monotonic() - t_start
    tail = float(np.mean(losses[-20:])) if losses else None
    log.info("self-supervised pretraining: %d steps on %d images in %.1f s, loss %s", step, len(images), seconds, tail)
    return ctx.model, {"steps": step, "seconds": round(seconds, 2), "loss": tail, "images": len(images)}
