"""Self-training on unlabelled images (``train.unlabelled_weight``): FlexMatch thresholds, the FixMatch step by
hand, and the strong view's alignment with the weak one."""

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelsmart import config
from labelsmart.config import IGNORE_INDEX
from labelsmart.training.data import WeakStrongSet, cut_out
from labelsmart.training.objectives import PseudoThresholds, StepContext, crf_loss, self_training_step


def test_thresholds_lower_the_bar_for_classes_seldom_predicted_with_confidence() -> None:
    th = PseudoThresholds(3, tau=0.9, balance=True, floor=0.5, momentum=0.0)
    assert torch.equal(th.thresholds(), torch.full((3,), 0.9))  # nothing confident yet: every class has tau
    pred = torch.tensor([[[0, 0, 0, 0, 1, 2]]])  # (1, 1, 6)
    conf = torch.tensor([[[0.95, 0.95, 0.95, 0.95, 0.95, 0.6]]])  # class 2's only pixel is not confident
    th.update(conf, pred)
    t = th.thresholds()
    assert t[0] == pytest.approx(0.9)  # the most confident class keeps tau
    assert t[1] == pytest.approx(max(0.5, 0.9 * 0.25 / 1.75))  # beta = 1/4, mapped x / (2 - x), floored
    assert t[2] == pytest.approx(0.5)  # never confident: the floor
    flat = PseudoThresholds(3, tau=0.9, balance=False, floor=0.5, momentum=0.0)
    flat.update(conf, pred)
    assert torch.equal(flat.thresholds(), torch.full((3,), 0.9))


class _Fixed(torch.nn.Module):
    """A 'network' whose logits are a fixed per-pixel map plus a learnable bias, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits  # (K, c, c)
        self.bias = torch.nn.Parameter(torch.zeros(logits.shape[0], 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.logits + self.bias).expand(x.shape[0], -1, -1, -1) + 0.0 * x.mean()


def _ctx(model: torch.nn.Module, weight: float) -> StepContext:
    tc = config.TrainConfig(unlabelled_weight=weight, class_balance=0.0)
    return StepContext(
        model, tc, torch.device("cpu"), torch.Generator(), torch.contiguous_format, contextlib.nullcontext()
    )


def test_self_training_step_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    k, c = 3, 8
    student = _Fixed(torch.randn(k, c, c, generator=g))
    teacher_logits = torch.randn(k, c, c, generator=g) * 3
    teacher = _Fixed(teacher_logits)
    label = torch.full((2, c, c), IGNORE_INDEX, dtype=torch.int64)
    label[:, :2] = 1  # two labelled rows
    batch = {"view1": torch.rand(2, 3, c, c), "label": label}
    ubatch = {"weak": torch.rand(1, 3, c, c), "strong": torch.rand(1, 3, c, c)}
    th = PseudoThresholds(k, tau=0.8, balance=False, floor=0.5)
    loss, share = self_training_step(_ctx(student, 0.7), batch, ubatch, teacher, th)

    conf, pseudo = teacher_logits.softmax(0).max(0)  # (c, c)
    keep = conf >= 0.8
    assert share == pytest.approx(float(keep.float().mean())) and 0 < share < 1
    s = student.logits[None]  # (1, K, c, c)
    labelled = F.cross_entropy(s.expand(2, -1, -1, -1), label, ignore_index=IGNORE_INDEX)
    per_pixel = F.cross_entropy(s, pseudo[None], reduction="none")[0]  # (c, c)
    expected = labelled + 0.7 * (per_pixel * keep).sum() / keep.numel()  # kept pixels over all the pixels
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert student.bias.grad is not None and teacher.bias.grad is None  # the teacher only gives targets

    none, share0 = self_training_step(_ctx(student, 0.7), batch, ubatch, teacher, PseudoThresholds(k, 1.01, False, 0.5))
    assert share0 == 0.0 and float(none.detach()) == pytest.approx(float(labelled.detach()), rel=1e-5)
    warmup, no_share = self_training_step(_ctx(student, 0.7), batch, None, teacher, th)
    assert no_share is None and float(warmup.detach()) == pytest.approx(float(labelled.detach()), rel=1e-5)


def test_the_crf_term_joins_the_labelled_crops_with_and_without_unlabelled_ones() -> None:
    g = torch.Generator().manual_seed(1)
    k, c = 3, 8
    student, teacher = _Fixed(torch.randn(k, c, c, generator=g)), _Fixed(torch.randn(k, c, c, generator=g) * 3)
    label = torch.full((2, c, c), IGNORE_INDEX, dtype=torch.int64)
    label[:, :2] = 1
    batch = {"view1": torch.rand(2, 3, c, c, generator=g), "label": label}
    ubatch = {"weak": torch.rand(1, 3, c, c, generator=g), "strong": torch.rand(1, 3, c, c, generator=g)}
    plain, with_crf = (
        _ctx(student, 0.7),
        dataclasses.replace(
            _ctx(student, 0.7),
            tc=config.TrainConfig(unlabelled_weight=0.7, class_balance=0.0, crf_weight=0.5, crf_radius=2),
        ),
    )
    term = 0.5 * crf_loss(with_crf, batch["view1"], student(batch["view1"])).detach()  # the labelled crops' term
    assert float(term) > 0
    for ub in (ubatch, None):  # after the warm-up and during it
        th = PseudoThresholds(k, tau=0.8, balance=False, floor=0.5)
        base, _ = self_training_step(plain, batch, ub, teacher, th)
        th = PseudoThresholds(k, tau=0.8, balance=False, floor=0.5)
        more, _ = self_training_step(with_crf, batch, ub, teacher, th)
        assert float(more.detach()) == pytest.approx(float((base + term).detach()), rel=1e-5)


def test_strong_view_is_the_weak_crop_recoloured_with_a_cut_out() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    cfg = config.load({"train.crop": 64, "preprocess.max_side": 120}, env={})
    ds = WeakStrongSet([image], cfg)
    item = ds[3]
    assert item["weak"].shape == item["strong"].shape == (3, 64, 64)
    assert item["weak"].dtype == torch.float32 and not torch.equal(item["weak"], item["strong"])
    again = ds[3]
    assert torch.equal(again["weak"], item["weak"]) and torch.equal(again["strong"], item["strong"])  # seeded
    out = cut_out(image, np.random.default_rng(1), (7, 8, 9))
    filled = (out == np.array([7, 8, 9], dtype=np.uint8)).all(axis=2)  # (H, W)
    ys, xs = np.nonzero(filled & ~(image == np.array([7, 8, 9], dtype=np.uint8)).all(axis=2))
    assert ys.size > 0  # one rectangle, the rest untouched
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert filled[box].all() and np.array_equal(out[~filled], image[~filled])
    assert ys.max() - ys.min() + 1 <= 45 and xs.max() - xs.min() + 1 <= 60  # at most half of each side
