"""The objectives a round trains with, one optimisation step each, on a batch of :class:`LabelledSet` crops.

- :func:`finetune_step`: masked cross-entropy on the labelled pixels (class-weighted when the round balances
  classes): the shipped objective; with ``crf_weight``, plus a local CRF loss over all pixels of the crops
  (:func:`labelled_loss`, which the joint and self-training steps take for their labelled crops too; the
  semi-supervised step keeps plain cross-entropy);
- :func:`contrastive_step`: the supervised pixel contrastive loss of Zhao et al. (ICCV 2021) over two
  photometric views, the pretraining stage;
- :func:`joint_step`: both at once, from one forward pass over the two views;
- :func:`semi_step`: the joint step with confident pseudo-labels of unlabelled crops in the contrastive loss
  (the paper's semi-supervised variant);
- :func:`self_training_step`: cross-entropy on the labelled crops plus cross-entropy on a teacher's confident
  pseudo-labels of unlabelled crops, learnt on a strongly augmented view (FixMatch; with a moving-average
  teacher, a mean teacher), with per-class thresholds (:class:`PseudoThresholds`).

Each returns the loss (the caller steps the optimiser). :class:`StepContext` holds what every step needs
besides its batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelsmart.config import IGNORE_INDEX, IMAGENET_STD, TrainConfig
from labelsmart.training.losses import (
    local_crf_loss,
    masked_cross_entropy,
    sample_pixels,
    supervised_pixel_contrastive_loss,
)
from labelsmart.training.model import SegModel

MAX_CONTRASTIVE_SAMPLES = 1024  # per view; bounds the (2N, 2N) similarity matrix (its cost grows as N^2)


@dataclass(frozen=True)
class StepContext:
    """The network and the settings every step shares.

    Attributes:
        ce_weight: ``(K,)`` class weights of the cross-entropy, or None for plain cross-entropy.
        generator: CPU generator of the contrastive pixel samples.
        std: the per-channel standard deviation the crops were normalised with (the CRF loss's colours).
    """

    model: SegModel
    tc: TrainConfig
    device: torch.device
    generator: torch.Generator
    memory_format: torch.memory_format
    autocast: contextlib.AbstractContextManager
    ce_weight: Tensor | None = None
    std: tuple[float, float, float] = IMAGENET_STD

    def images(self, *parts: Tensor) -> Tensor:
        """Image crops ``(B, 3, c, c)`` (concatenated in order) on the device, in its memory format."""
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """Masked (and, with ``ce_weight``, class-weighted) cross-entropy in float32."""
        return masked_cross_entropy(logits.float(), target, weight=self.ce_weight)


def sample_features(feats: Tensor, b_idx: Tensor, y: Tensor, x: Tensor, label_hw: tuple[int, int]) -> Tensor:
    """Bilinear features at label-resolution pixels, as ``F.interpolate(align_corners=False)`` would give.

    Args:
        feats: ``(B, C, h, w)`` features at reduced resolution.
        b_idx, y, x: ``(N,)`` image index and pixel coordinates at label resolution ``label_hw``.

    Returns:
        ``(N, C)``.
    """
    _, _, h, w = feats.shape
    fy = ((y.float() + 0.5) * (h / label_hw[0]) - 0.5).clamp(0, h - 1)  # (N,)
    fx = ((x.float() + 0.5) * (w / label_hw[1]) - 0.5).clamp(0, w - 1)  # (N,)
    y0, x0 = fy.floor().long(), fx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    wy, wx = (fy - y0).unsqueeze(1), (fx - x0).unsqueeze(1)  # (N, 1)
    f = feats.permute(0, 2, 3, 1)  # (B, h, w, C)
    top = f[b_idx, y0, x0] * (1 - wx) + f[b_idx, y0, x1] * wx  # (N, C)
    bottom = f[b_idx, y1, x0] * (1 - wx) + f[b_idx, y1, x1] * wx  # (N, C)
    return top * (1 - wy) + bottom * wy  # (N, C)


def contrastive_loss(ctx: StepContext, feats: Tensor, label: Tensor) -> Tensor:
    """Supervised pixel contrastive loss of the features of two views; positives across views and images.

    Args:
        feats: ``(2B, C, h, w)``: view 1 of the B crops, then view 2.
        label: ``(B, c, c)`` labels of the crops (CPU), 255 = unlabelled.
    """
    b = label.shape[0]
    b_idx, y, x, cls = sample_pixels(label, ctx.tc.pixels_per_class, generator=ctx.generator)  # (N,) each
    if b_idx.numel() > MAX_CONTRASTIVE_SAMPLES:
        keep = torch.randperm(b_idx.numel(), generator=ctx.generator)[:MAX_CONTRASTIVE_SAMPLES]
        b_idx, y, x, cls = b_idx[keep], y[keep], x[keep], cls[keep]
    device = ctx.device
    b_idx, y, x = b_idx.to(device), y.to(device), x.to(device)
    both = torch.cat([b_idx, b_idx + b])  # (2N,) same pixel in view 1 and view 2
    picked = sample_features(feats, both, torch.cat([y, y]), torch.cat([x, x]), tuple(label.shape[1:]))  # (2N, C)
    emb = ctx.model.project(picked[:, :, None, None]).flatten(1)  # (2N, D)
    with torch.autocast(device.type, enabled=False):  # similarities / temperature need float32, not bf16
        return supervised_pixel_contrastive_loss(emb.float(), torch.cat([cls, cls]).to(device), ctx.tc.temperature)


def contrastive_step(ctx: StepContext, batch: dict[str, Tensor]) -> Tensor:
    """Supervised pixel contrastive loss over both views; positives across views and images."""
    views = ctx.images(batch["view1"], batch["view2"])  # (2B, 3, c, c)
    with ctx.autocast:
        feats = ctx.model.forward_features(views)  # (2B, C, h, w)
        return contrastive_loss(ctx, feats, batch["label"])


def crf_loss(ctx: StepContext, x: Tensor, logits: Tensor) -> Tensor:
    """The local CRF loss of the crops ``x`` (normalised, ``(B, 3, c, c)``) and their ``logits``, both shrunk
    ``crf_downsample`` times (area averages of colours and of probabilities)."""
    tc = ctx.tc
    std = torch.tensor(ctx.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = x.float() * std  # 0..1 colour less the mean, which cancels in a difference
    prob = logits.float().softmax(1)  # (B, K, c, c)
    if tc.crf_downsample > 1:
        rgb = F.avg_pool2d(rgb, tc.crf_downsample)
        prob = F.avg_pool2d(prob, tc.crf_downsample)
    return local_crf_loss(prob, rgb, tc.crf_sigma_xy, tc.crf_sigma_rgb, tc.crf_radius)


def labelled_loss(ctx: StepContext, x: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """What every cross-entropy objective learns from labelled crops ``x``: the context's cross-entropy on their
    labelled pixels plus, with ``crf_weight``, that times the local CRF loss of the crops."""
    loss = ctx.ce(logits, target)
    if ctx.tc.crf_weight > 0:
        loss = loss + ctx.tc.crf_weight * crf_loss(ctx, x, logits)
    return loss


def finetune_step(ctx: StepContext, batch: dict[str, Tensor]) -> Tensor:
    """Masked cross-entropy on view 1 (255 ignored), class-weighted when the context has ``ce_weight``; with
    ``crf_weight``, plus that times the local CRF loss of the crops (:func:`labelled_loss`)."""
    x = ctx.images(batch["view1"])  # (B, 3, c, c)
    target = batch["label"].to(ctx.device, non_blocking=True)  # (B, c, c)
    with ctx.autocast:
        logits = ctx.model(x)  # (B, K, c, c)
    return labelled_loss(ctx, x, logits, target)


def joint_step(ctx: StepContext, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy on both views plus ``contrastive_weight`` x the pixel contrastive loss, one forward pass."""
    label = batch["label"]  # (B, c, c)
    views = ctx.images(batch["view1"], batch["view2"])  # (2B, 3, c, c)
    target = torch.cat([label, label]).to(ctx.device, non_blocking=True)  # (2B, c, c)
    with ctx.autocast:
        feats = ctx.model.forward_features(views)  # (2B, C, h, w)
        logits = ctx.model.forward_head(feats)  # (2B, K, c, c)
        contrastive = contrastive_loss(ctx, feats, label)
    return labelled_loss(ctx, views, logits, target) + ctx.tc.contrastive_weight * contrastive


def semi_step(
    ctx: StepContext, batch: dict[str, Tensor], ubatch: dict[str, Tensor] | None
) -> tuple[Tensor, float | None]:
    """The semi-supervised joint step: CE on both views of the labelled crops plus ``pseudo_weight`` x the
    pixel contrastive loss over labelled pixels and confident pseudo-labels of the unlabelled crops, one
    forward pass. Without ``ubatch`` (the CE warm-up that makes the pseudo-labels worth having) only the CE.

    Returns:
        The loss and the share of unlabelled pixels that became pseudo-labels (None without ``ubatch``).
    """
    label = batch["label"]  # (Bl, c, c)
    bl = label.shape[0]
    if ubatch is None:
        parts = [batch["view1"], batch["view2"]]
    else:  # view 1 of every crop, then view 2, the order contrastive_loss pairs by
        parts = [batch["view1"], ubatch["view1"], batch["view2"], ubatch["view2"]]
    views = ctx.images(*parts)
    b = views.shape[0] // 2  # crops per view
    target = label.to(ctx.device, non_blocking=True)  # (Bl, c, c)
    with ctx.autocast:
        feats = ctx.model.forward_features(views)  # (2b, C, h, w)
        logits = ctx.model.forward_head(feats)  # (2b, K, c, c)
    ce = ctx.ce(logits[:bl], target) + ctx.ce(logits[b : b + bl], target)
    if ubatch is None:
        return ce / 2.0, None
    with torch.no_grad():  # the two views of a crop agree on its pseudo-labels (mean probability)
        prob = (logits[bl:b].float().softmax(1) + logits[b + bl :].float().softmax(1)) / 2.0  # (Bu, K, c, c)
        conf, pseudo = prob.max(1)  # (Bu, c, c)
        keep = conf >= ctx.tc.pseudo_threshold
        pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
        share = float(keep.float().mean())
    label_all = torch.cat([label, pseudo.cpu().to(label.dtype)])  # (b, c, c), on the CPU for the sampler
    with ctx.autocast:
        contrastive = contrastive_loss(ctx, feats, label_all)
    return ce / 2.0 + ctx.tc.pseudo_weight * contrastive, share


class PseudoThresholds:
    """Per-class confidence thresholds of pseudo-labels, FlexMatch's curriculum (Zhang et al., NeurIPS 2021).

    ``sigma_k`` is a running count of unlabelled pixels predicted as class k with probability >= ``tau``; class k's
    threshold is ``tau * M(sigma_k / max sigma)`` with ``M(x) = x / (2 - x)``, at least ``floor``: a class the
    network is already sure of keeps ``tau``, a class it rarely predicts confidently gets a lower bar, so rare
    classes get pseudo-labels too. Without ``balance`` (or before any pixel was confident) every class has ``tau``.
    """

    def __init__(self, num_classes: int, tau: float, balance: bool, floor: float, momentum: float = 0.99) -> None:
        self.tau, self.balance, self.floor, self.momentum = float(tau), bool(balance), float(floor), float(momentum)
        self.sigma = np.zeros(num_classes, dtype=np.float64)  # (K,)

    def thresholds(self) -> Tensor:
        """``(K,)`` float32 thresholds."""
        top = float(self.sigma.max())
        if not self.balance or top <= 0:
            return torch.full((self.sigma.size,), self.tau, dtype=torch.float32)
        beta = self.sigma / top  # (K,) in [0, 1]
        return torch.from_numpy(np.clip(self.tau * beta / (2.0 - beta), min(self.floor, self.tau), self.tau)).float()

    def update(self, conf: Tensor, pred: Tensor) -> None:
        """Count this batch's confident pixels per class (``conf``, ``pred``: ``(B, H, W)`` on any device)."""
        sure = pred[conf >= self.tau]
        counts = torch.bincount(sure.flatten().cpu(), minlength=self.sigma.size)[: self.sigma.size].numpy()  # (K,)
        self.sigma = self.momentum * self.sigma + (1.0 - self.momentum) * counts


def self_training_step(
    ctx: StepContext,
    batch: dict[str, Tensor],
    ubatch: dict[str, Tensor] | None,
    teacher: torch.nn.Module,
    thresholds: PseudoThresholds,
) -> tuple[Tensor, float | None]:
    """FixMatch for segmentation: CE on the labelled crops (view 1) plus ``unlabelled_weight`` x the CE of the
    network's prediction on the strong view of each unlabelled crop against the teacher's pseudo-labels of its weak
    view, where they reach their class's threshold; summed over the kept pixels and divided by all the unlabelled
    pixels (FixMatch's mean over the batch, so the term grows as the teacher grows sure). One forward pass with
    gradients (labelled and strong crops together), one without (the teacher on the weak crops). Without
    ``ubatch`` (the CE warm-up) only the labelled CE.

    Args:
        teacher: the network itself, or a moving average of it (in eval mode).

    Returns:
        The loss and the share of unlabelled pixels that became pseudo-labels (None without ``ubatch``).
    """
    if ubatch is None:
        return finetune_step(ctx, batch), None
    label = batch["label"]  # (Bl, c, c)
    bl = label.shape[0]
    with torch.no_grad():
        with ctx.autocast:
            t_logits = teacher(ctx.images(ubatch["weak"]))  # (Bu, K, c, c)
        conf, pseudo = t_logits.float().softmax(1).max(1)  # (Bu, c, c)
        keep = conf >= thresholds.thresholds().to(conf.device)[pseudo]
        thresholds.update(conf, pseudo)
        share = float(keep.float().mean())
        pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
    x = ctx.images(batch["view1"], ubatch["strong"])  # (Bl + Bu, 3, c, c)
    with ctx.autocast:
        logits = ctx.model(x)  # (Bl + Bu, K, c, c)
    ce = labelled_loss(ctx, x[:bl], logits[:bl], label.to(ctx.device, non_blocking=True))
    unlabelled = F.cross_entropy(logits[bl:].float(), pseudo, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce + ctx.tc.unlabelled_weight * unlabelled / pseudo.numel(), share
