"""Dense self-supervised pretraining (issue 13): the two views' point correspondence, the pixel InfoNCE by hand,
and a run that fine-tuning warm-starts from whole."""

import math

import numpy as np
import pytest
import torch

from labelsmart import config
from labelsmart.training import pretrain
from labelsmart.training import round as training_round
from labelsmart.training.model import build_model, save_checkpoint
from labelsmart.training.objectives import sample_features
from labelsmart.training.round import warm_start


def _smooth_image(h: int, w: int) -> np.ndarray:
    """A smooth image whose colour differs from place to place (so a wrong correspondence shows)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 11.0), 128 + 100 * np.cos(y / 9.0), 128 + 100 * np.sin((x + y) / 17.0)], 2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_the_points_of_view_two_show_the_same_scene_in_view_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain, "photometric", lambda image, rng: image)  # geometry only
    cfg = config.load({"train.crop": 64, "preprocess.max_side": 160}, env={})
    ds = pretrain.ViewPairSet([_smooth_image(120, 160)], cfg)
    matched, shuffled = [], []
    for index in range(12):  # flipped and unflipped second views, regions from half to all of the crop
        item = ds[index]
        assert item["view1"].shape == item["view2"].shape == (3, 64, 64)
        p1, p2 = item["points1"], item["points2"]  # (P, 2) each
        assert p1.shape == p2.shape == (pretrain.POINTS, 2)
        assert float(p1.min()) >= -0.5 and float(p1.max()) <= 63.5  # inside view 1
        feats = torch.stack([item["view1"], item["view2"]])  # (2, 3, c, c)
        zero, one = torch.zeros(len(p1), dtype=torch.long), torch.ones(len(p2), dtype=torch.long)
        a = sample_features(feats, zero, p1[:, 0], p1[:, 1], (64, 64))  # (P, 3)
        b = sample_features(feats, one, p2[:, 0], p2[:, 1], (64, 64))  # (P, 3)
        matched.append(float((a - b).abs().mean()))
        shuffled.append(float((a - b.roll(7, 0)).abs().mean()))
    assert np.mean(matched) < 0.1 * np.mean(shuffled)  # the same point, not some point
    again = ds[3]
    assert torch.equal(again["points1"], ds[3]["points1"]) and torch.equal(again["view2"], ds[3]["view2"])  # seeded


def test_dense_info_nce_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    owner = torch.tensor([0, 0, 0, 1, 1])
    where = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [0.0, 0.5], [20.0, 20.0]])
    t, near = 0.5, 2.0
    loss = pretrain.dense_info_nce(z1, z2, owner, where, near, t)

    def direction(a: torch.Tensor, b: torch.Tensor) -> float:
        total = 0.0
        for i in range(5):
            terms = []
            for j in range(5):
                close = owner[i] == owner[j] and math.dist(where[i].tolist(), where[j].tolist()) < near
                if j == i or not close:  # a near point of the same crop is no negative
                    terms.append(float(a[i] @ b[j]) / t)
            total += -(float(a[i] @ b[i]) / t - math.log(sum(math.exp(v) for v in terms)))
        return total / 5

    expected = (direction(z1, z2) + direction(z2, z1)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # points 0 and 1 are near each other in crop 0; point 3 is as near point 0 but in another crop: a negative
    unmasked = pretrain.dense_info_nce(z1, z2, owner, where, 0.0, t)
    assert float(unmasked) != pytest.approx(float(loss))


def test_a_pretrained_network_warm_starts_fine_tuning_whole(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    cfg = config.load(
        {"train.crop": 32, "train.batch_size": 2, "train.threads": 1, "train.device": "cpu", "preprocess.max_side": 64},
        env={},
    )
    initial: dict[str, torch.Tensor] = {}

    def build(mcfg, k):
        model = build_model(mcfg, k)
        initial.update({name: v.clone() for name, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(training_round, "build_model", build)
    seen: list[int] = []
    model, facts = pretrain.pretrain(cfg, images, 3, steps=3, progress=lambda s, n, loss: seen.append(s))
    assert facts["steps"] == 3 and seen == [1, 2, 3] and facts["images"] == 3 and math.isfinite(facts["loss"])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])}
    assert any(k.startswith("net.encoder.") for k in changed) and any(k.startswith("net.decoder.") for k in changed)
    assert any(k.startswith("proj_head.") for k in changed)
    assert not any(k.startswith("net.segmentation_head.") for k in changed)  # no labels: the class head is untouched
    monkeypatch.undo()

    classes = [{"id": k, "name": f"c{k}", "color": [k, k, k]} for k in range(3)]
    path = tmp_path / "ssl.pt"
    save_checkpoint(path, model, cfg, classes, 0, facts["steps"], {"ssl": facts})
    student = build_model(cfg.model, 3)
    warm_start(student, path)
    ours = student.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())

    _, none = pretrain.pretrain(cfg, images, 3, steps=50, should_stop=lambda: True)
    assert none["steps"] == 0 and none["loss"] is None
    with pytest.raises(ValueError, match="needs images"):
        pretrain.pretrain(cfg, [], 3, steps=1)
