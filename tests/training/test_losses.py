"""Contrastive loss values by hand, masked cross-entropy, the local CRF loss, bounded pixel sampling."""

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelsmart.config import IGNORE_INDEX, IMAGENET_STD, TrainConfig
from labelsmart.training.losses import (
    class_weights,
    local_crf_loss,
    masked_cross_entropy,
    sample_pixels,
    supervised_pixel_contrastive_loss,
)
from labelsmart.training.objectives import StepContext, finetune_step


def test_contrastive_loss_by_hand_symmetric() -> None:
    # four unit vectors on the axes; +x and -x are class 0, +y and -y class 1; temperature 1
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # anchor +x: positive -x (dot -1); others +y, -y (dot 0): -log(e^-1 / (e^0 + e^-1 + e^0)); all anchors alike
    expected = 1.0 + math.log(2.0 + math.exp(-1.0))
    got = supervised_pixel_contrastive_loss(emb, labels, temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_by_hand_anchor_without_positive() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # anchor 0: positive 1 (dot 0.6), others: 1 (0.6), 2 (0.0)
    l0 = -0.6 + math.log(math.exp(0.6) + math.exp(0.0))
    # anchor 1: positive 0 (dot 0.6), others: 0 (0.6), 2 (0.8)
    l1 = -0.6 + math.log(math.exp(0.6) + math.exp(0.8))
    # anchor 2 has no positive and is left out of the mean
    got = supervised_pixel_contrastive_loss(emb, labels, temperature=1.0)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # temperature 0.5 doubles every similarity
    l0 = -1.2 + math.log(math.exp(1.2) + 1.0)
    l1 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6))
    got = supervised_pixel_contrastive_loss(emb, labels, temperature=0.5)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_contrastive_loss_falls_when_classes_cluster() -> None:
    labels = torch.tensor([0, 0, 1, 1])

    def unit(angles_deg: list[float]) -> torch.Tensor:
        a = torch.tensor(angles_deg) * math.pi / 180
        return torch.stack([torch.cos(a), torch.sin(a)], dim=1)

    spread = unit([0, 90, 45, 135])  # same-class pairs 90 degrees apart, classes interleaved
    together = unit([0, 10, 180, 190])  # same-class pairs 10 degrees apart, classes opposite
    loss_spread = supervised_pixel_contrastive_loss(spread, labels, 0.1)
    loss_together = supervised_pixel_contrastive_loss(together, labels, 0.1)
    assert loss_together < loss_spread


def test_contrastive_loss_without_positives_is_zero_with_grad() -> None:
    emb = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    loss = supervised_pixel_contrastive_loss(emb, torch.tensor([0, 1, 2]), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None


def test_cross_entropy_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255, dtype=torch.long)
    loss = masked_cross_entropy(logits, target)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_cross_entropy_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=gen)
    target = torch.randint(0, 3, (2, 5, 6), generator=gen)
    target[0, :2] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert masked_cross_entropy(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5])
    ref_w = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert masked_cross_entropy(logits, target, weight=w).item() == pytest.approx(ref_w.item(), rel=1e-6)


def test_sample_pixels_bounds_per_class_per_image() -> None:
    labels = torch.full((2, 20, 30), 255, dtype=torch.long)
    labels[0, 5, :] = 0  # 30 pixels of class 0
    labels[0, :, 7] = 1  # 20 pixels of class 1 (one of them overwrites class 0)
    labels[1, 2:4, 3:5] = 0  # 4 pixels of class 0
    gen = torch.Generator().manual_seed(0)
    b, y, x, cls = sample_pixels(labels, per_class=10, generator=gen)
    assert torch.equal(labels[b, y, x], cls)
    counts = {}
    for bi, ci in zip(b.tolist(), cls.tolist(), strict=True):
        counts[(bi, ci)] = counts.get((bi, ci), 0) + 1
    assert counts == {(0, 0): 10, (0, 1): 10, (1, 0): 4}
    flat = b * 600 + y * 30 + x
    assert flat.unique().numel() == flat.numel()  # without replacement
    b2, y2, x2, _ = sample_pixels(labels, per_class=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, b2) and torch.equal(y, y2) and torch.equal(x, x2)
    empty = sample_pixels(torch.full((1, 4, 4), 255), per_class=5)
    assert all(t.numel() == 0 for t in empty)


def test_contrastive_loss_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(12, 5, generator=gen), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 7, 7])  # class 2 has a single sample
    t = 0.3
    total, anchors = 0.0, 0
    for i in range(12):
        others = [a for a in range(12) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_den = math.log(sum(math.exp(float(emb[i] @ emb[a]) / t) for a in others))
        total += -sum(float(emb[i] @ emb[p]) / t - log_den for p in positives) / len(positives)
        anchors += 1
    got = supervised_pixel_contrastive_loss(emb, labels, t)
    assert got.item() == pytest.approx(total / anchors, rel=1e-5)


def test_class_weights_by_hand() -> None:
    counts = np.array([1000, 100, 10, 0, 1])  # median of the labelled classes: 55
    assert np.allclose(class_weights(counts, 0.0), 1.0)  # off
    w = class_weights(counts, 1.0)  # median-frequency balancing, clipped to [0.1, 10]
    assert w.dtype == np.float32 and w.shape == (5,)
    assert w[0] == pytest.approx(0.1) and w[1] == pytest.approx(0.55) and w[2] == pytest.approx(5.5)
    assert w[3] == 1.0 and w[4] == pytest.approx(10.0)  # no pixels: 1; a handful: capped
    half = class_weights(counts, 0.5)
    assert half[0] == pytest.approx((1000 / 55) ** -0.5, rel=1e-6)
    assert half[2] == pytest.approx((10 / 55) ** -0.5, rel=1e-6)
    assert list(np.argsort(half[[0, 1, 2]])) == [0, 1, 2]  # rarer classes weigh more


def test_local_crf_loss_matches_every_pair_of_the_window() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, h, w, r, s_xy, s_rgb = 2, 3, 5, 6, 2, 1.5, 0.3
    prob = torch.randn(b, k, h, w, generator=g).softmax(1)
    rgb = torch.rand(b, 3, h, w, generator=g)
    expected = 0.0
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for v in range(max(0, y - r), min(h, y + r + 1)):
                    for u in range(max(0, x - r), min(w, x + r + 1)):
                        if (v, u) == (y, x):
                            continue
                        d_rgb = float((rgb[n, :, y, x] - rgb[n, :, v, u]).square().sum())
                        kern = math.exp(-((y - v) ** 2 + (x - u) ** 2) / (2 * s_xy**2) - d_rgb / (2 * s_rgb**2))
                        expected += kern * (1 - float((prob[n, :, y, x] * prob[n, :, v, u]).sum()))
    expected /= b * h * w
    assert float(local_crf_loss(prob, rgb, s_xy, s_rgb, r)) == pytest.approx(expected, rel=1e-5)


def test_local_crf_loss_prefers_the_segmentation_that_follows_the_colour_edge() -> None:
    h, w = 12, 12
    rgb = torch.zeros(1, 3, h, w)
    rgb[:, :, :, 6:] = 1.0  # dark left half, bright right half

    def hard(split: int) -> torch.Tensor:  # class 0 left of column split, class 1 from it on
        p = torch.zeros(1, 2, h, w)
        p[:, 0, :, :split], p[:, 1, :, split:] = 1.0, 1.0
        return p

    on_edge = float(local_crf_loss(hard(6), rgb, 3.0, 0.1, 3))
    off_edge = float(local_crf_loss(hard(3), rgb, 3.0, 0.1, 3))
    assert on_edge < 1e-6 < off_edge  # the cut across alike colours costs, the cut along the edge does not
    assert float(local_crf_loss(hard(0), rgb, 3.0, 0.1, 3)) == 0.0  # one class everywhere: no pair disagrees


def test_the_crf_term_teaches_from_crops_without_a_labelled_pixel() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)
    tc = TrainConfig(class_balance=0.0, crf_weight=0.5, crf_radius=2, crf_downsample=2)
    ctx = StepContext(
        net, tc, torch.device("cpu"), torch.Generator(), torch.contiguous_format, contextlib.nullcontext()
    )
    x = torch.randn(2, 3, 8, 8)
    batch = {"view1": x, "label": torch.full((2, 8, 8), IGNORE_INDEX, dtype=torch.int64)}
    loss = finetune_step(ctx, batch)
    loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    prob = F.avg_pool2d(net(x).softmax(1), 2)
    expected = 0.5 * local_crf_loss(prob, F.avg_pool2d(x * std, 2), tc.crf_sigma_xy, tc.crf_sigma_rgb, 2).detach()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5) and float(loss.detach()) > 0
    off = dataclasses.replace(ctx, tc=TrainConfig(class_balance=0.0))
    assert float(finetune_step(off, batch).detach()) == 0.0  # without the term nothing is learnt from such a crop
