"""Supervised pixel contrastive loss, masked cross-entropy, a local CRF loss, class weights and bounded pixel sampling.

The contrastive loss follows Khosla et al. (SupCon) as applied to pixels by Zhao et al., "Contrastive
Learning for Label-Efficient Semantic Segmentation" (ICCV 2021): every sampled labelled pixel is an
anchor, the other samples of its class are positives, all other samples form the denominator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelsmart.config import IGNORE_INDEX

CLASS_WEIGHT_CAP = 10.0


def supervised_pixel_contrastive_loss(emb: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """SupCon over sampled pixel embeddings.

    For anchor i with positives P(i) (other samples with its label) and all other samples A(i):
    ``l_i = -1/|P(i)| * sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t))``; the loss
    is the mean of ``l_i`` over anchors with at least one positive.

    Args:
        emb: L2-normalised embeddings ``(N, D)``.
        labels: class ids ``(N,)``.
        temperature: t.

    Returns:
        Scalar loss; 0 (still attached to the graph) when no anchor has a positive.
    """
    n = emb.shape[0]
    if n < 2:
        return emb.sum() * 0.0
    emb = emb.float()
    _, cls = torch.unique(labels, return_inverse=True)  # (N,) ids 0..C-1
    counts = torch.bincount(cls)  # (C,)
    n_pos = counts[cls] - 1  # (N,) positives of each anchor
    has_pos = n_pos > 0  # (N,)
    if not bool(has_pos.any()):
        return emb.sum() * 0.0
    sim = emb @ emb.T / temperature  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)  # (N, N)
    log_denominator = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1)  # (N,) an anchor is not its own pair
    # sum over positives of z_i.z_p = z_i.(sum of its class - z_i): no (N, N) positive mask needed
    class_sum = torch.zeros(counts.numel(), emb.shape[1], dtype=emb.dtype, device=emb.device)  # (C, D)
    class_sum = class_sum.index_add(0, cls, emb)
    pos_sim = ((emb * class_sum[cls]).sum(dim=1) - (emb * emb).sum(dim=1)) / temperature  # (N,)
    per_anchor = log_denominator[has_pos] - pos_sim[has_pos] / n_pos[has_pos]  # (N_valid,)
    return per_anchor.mean()


def masked_cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy averaged over labelled pixels (weighted mean when ``weight`` is given).

    Args:
        logits: ``(B, K, H, W)``.
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: unlabelled value.
        weight: optional ``(K,)`` class weights.

    Returns:
        Scalar loss; 0 (attached to the graph, never NaN) when no pixel is labelled.
    """
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index)


def local_crf_loss(prob: Tensor, rgb: Tensor, sigma_xy: float, sigma_rgb: float, radius: int) -> Tensor:
    """A CRF regulariser of a soft segmentation over a local window, for the pixels scribbles leave unlabelled.

    The Potts relaxation of the dense CRF loss of Tang et al., "On Regularized Losses for Weakly-supervised CNN
    Segmentation" (ECCV 2018), restricted to a ``(2 radius + 1)^2`` window as in the gated CRF loss of Obukhov et
    al. (2019): ``sum_i sum_{j in W(i), j != i} k_ij (1 - p_i . p_j) / N`` with the Gaussian RGBXY kernel
    ``k_ij = exp(-|xy_i - xy_j|^2 / 2 sigma_xy^2 - |rgb_i - rgb_j|^2 / 2 sigma_rgb^2)``. Neighbours of alike colour
    are pulled towards one class; across a colour edge the kernel vanishes, so the prediction may change there.
    Each unordered pair is visited once (one shift of the tensors per offset) and counted twice.

    Args:
        prob: ``(B, K, h, w)`` class probabilities.
        rgb: ``(B, 3, h, w)`` the image at the same resolution, in the units of ``sigma_rgb`` (0..1 colour).
        sigma_xy: spatial bandwidth in pixels of ``prob``.
        sigma_rgb: colour bandwidth.
        radius: half-width of the window.

    Returns:
        Scalar loss, >= 0 (0 for a hard segmentation that is constant wherever the kernel reaches).
    """
    b, _, h, w = prob.shape
    prob, rgb = prob.float(), rgb.float()
    total = prob.new_zeros(())
    for dy in range(radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:  # the other half of each pair, or the pixel itself
                continue
            if dy >= h or abs(dx) >= w:
                continue
            xa = slice(max(0, -dx), w - max(0, dx))  # columns of i; j = i + (dy, dx)
            xb = slice(max(0, dx), w - max(0, -dx))
            p_i, p_j = prob[:, :, : h - dy, xa], prob[:, :, dy:, xb]  # (B, K, h - dy, w - |dx|)
            d_rgb = (rgb[:, :, : h - dy, xa] - rgb[:, :, dy:, xb]).square().sum(1)  # (B, h - dy, w - |dx|)
            kernel = torch.exp(-(dy * dy + dx * dx) / (2 * sigma_xy**2) - d_rgb / (2 * sigma_rgb**2))
            total = total + (kernel * (1.0 - (p_i * p_j).sum(1))).sum()
    return 2.0 * total / (b * h * w)


def class_weights(counts: np.ndarray, alpha: float, cap: float = CLASS_WEIGHT_CAP) -> np.ndarray:
    """Cross-entropy class weights from labelled-pixel counts: ``w_k = (n_k / median n)^-alpha``.

    ``alpha`` 0 gives equal weights, 1 median-frequency balancing (Eigen & Fergus; SegNet), 0.5 its square
    root. Only classes with labelled pixels enter the median; weights are clipped to ``[1/cap, cap]`` so a
    class with a handful of labelled pixels cannot dominate the loss. Classes without pixels get 1 (they
    contribute no term anyway).

    Args:
        counts: ``(K,)`` labelled pixels per class.
        alpha: balancing exponent, >= 0.
        cap: largest weight ratio to the median class.

    Returns:
        ``(K,)`` float32 weights.
    """
    counts = np.asarray(counts, dtype=np.float64)  # (K,)
    weights = np.ones(counts.shape, dtype=np.float64)  # (K,)
    present = counts > 0
    if alpha > 0 and present.any():
        weights[present] = (counts[present] / np.median(counts[present])) ** -alpha
    return np.clip(weights, 1.0 / cap, cap).astype(np.float32)


def sample_pixels(
    labels: Tensor, per_class: int, generator: torch.Generator | None = None, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample at most ``per_class`` labelled pixels per class per image, uniformly without replacement.

    Args:
        labels: ``(B, H, W)`` class ids, ``ignore_index`` for unlabelled pixels.
        per_class: bound per (image, class).
        generator: random generator (its device is used for the draw).
        ignore_index: unlabelled value.

    Returns:
        ``(b_idx, y_idx, x_idx, cls)``, each ``(N,)`` int64 on the device of ``labels``, grouped by image
        and class.
    """
    b, h, w = labels.shape
    flat = labels.reshape(-1)  # (B*H*W,)
    idx = torch.nonzero(flat != ignore_index).squeeze(1)  # (M,)
    cls = flat[idx].long()  # (M,)
    if idx.numel() == 0 or per_class <= 0:
        empty = idx[:0]
        return empty, empty, empty, cls[:0]
    rand_device = generator.device if generator is not None else labels.device
    keys = torch.rand(idx.numel(), generator=generator, device=rand_device).to(labels.device)  # (M,)
    group = (idx // (h * w)) * 256 + cls  # (M,) one group per (image, class)
    order = torch.argsort(keys)  # random order ...
    order = order[torch.argsort(group[order], stable=True)]  # ... within each group
    group_sorted = group[order]  # (M,)
    _, counts = torch.unique_consecutive(group_sorted, return_counts=True)  # (G,)
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    rank = torch.arange(idx.numel(), device=labels.device) - torch.repeat_interleave(starts, counts)  # (M,)
    chosen = idx[order[rank < per_class]]  # (N,)
    b_idx = chosen // (h * w)
    y_idx = (chosen % (h * w)) // w
    x_idx = chosen % w
    return b_idx, y_idx, x_idx, flat[chosen].long()
