"""Active learning: uncertainty scores, the near-duplicate guard, what "Next" offers, scoring after a round."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TOY_CLASSES, write_toy_model

from labelsmart import config
from labelsmart.config import ActiveConfig
from labelsmart.project import open_project
from labelsmart.serving import active
from labelsmart.serving.onnx_model import OnnxModel

H, W = 48, 64


def _grey_gradient(seed: int | None = None) -> np.ndarray:
    """Equal R, G and B everywhere: the toy model's three classes tie, so it is as unsure as it gets."""
    g = np.tile(np.linspace(60, 200, W, dtype=np.float32), (H, 1))
    if seed is not None:
        g += np.random.default_rng(seed).normal(0, 3, g.shape)
    return np.repeat(np.clip(g, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def _scenes() -> dict[str, np.ndarray]:
    checker = ((np.indices((H, W)).sum(axis=0) // 8) % 2 * 80 + 90).astype(np.float32)
    tinted = np.stack([checker + 12, checker, checker], axis=2)  # a little red: a little less unsure
    red = np.zeros((H, W, 3), np.float32)
    red[..., 0] = np.linspace(150, 255, H)[:, None]
    return {
        "a_grey": _grey_gradient(),
        "b_grey_again": _grey_gradient(seed=1),  # a near-duplicate of a_grey
        "c_checker": np.clip(tinted, 0, 255).astype(np.uint8),
        "d_red": red.astype(np.uint8),
    }


@pytest.fixture
def project(tmp_path: Path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name, img in _scenes().items():
        cv2.imwrite(str(root / "images" / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "classes.json").write_text(json.dumps(TOY_CLASSES))
    cfg = config.load({"dataset": str(root), "workdir": str(tmp_path / "work"), "models_dir": str(tmp_path / "m")}, {})
    store = open_project(cfg)
    model = OnnxModel(write_toy_model(tmp_path / "m" / "v0001" / "model.onnx"), threads=1, device="cpu")
    ids = {Path(r.path).stem: r.id for r in store.images()}
    return cfg, store, model, ids


def test_uncertainty_maps_are_bounded_and_ordered():
    certain = np.array([10.0, 0.0, 0.0])[:, None, None] * np.ones((3, 2, 2))
    tie = np.zeros((3, 2, 2))
    two_way = np.array([5.0, 5.0, -5.0])[:, None, None] * np.ones((3, 2, 2))
    for method in ("entropy", "margin"):
        c, t, w = (active.uncertainty_map(x, method) for x in (certain, tie, two_way))
        assert c.shape == (2, 2) and c.dtype == np.float32
        assert (c < 0.01).all() and np.allclose(t, 1.0, atol=1e-5)
        assert (c < w).all() and (w <= t + 1e-6).all()
    assert np.allclose(active.uncertainty_map(two_way, "margin"), 1.0, atol=1e-4)  # a perfect two-way tie
    with pytest.raises(ValueError, match="entropy or margin"):
        active.uncertainty_map(tie, "guess")


def test_thumbnails_see_near_duplicates():
    s = _scenes()
    t = {k: active.thumbnail(v) for k, v in s.items()}
    assert abs(float(np.linalg.norm(t["a_grey"])) - 1.0) < 1e-4
    assert float(t["a_grey"] @ t["b_grey_again"]) > 0.95
    assert float(t["a_grey"] @ t["c_checker"]) < 0.5


def test_scores_are_stored_with_the_version_and_rank_the_unsure_first(project):
    cfg, store, model, ids = project
    assert active.score_version(store, model, 1, cfg.active) == 4
    scores = store.scores(1)
    assert store.latest_scored_version() == 1 and store.score_method(1) == "entropy"
    assert scores[ids["a_grey"]] > 0.99 and scores[ids["d_red"]] < 0.2
    assert scores[ids["a_grey"]] > scores[ids["c_checker"]] > scores[ids["d_red"]]
    umap = store.score_map(ids["c_checker"], 1)
    assert umap.dtype == np.uint8 and umap.ndim == 2 and umap.max() > 100
    # Labelled images are not scored; a stop request ends the work early, keeping what was scored.
    mask = np.full((H, W), 255, np.uint8)
    mask[:4] = 0
    store.save_label(ids["d_red"], mask)
    calls = []
    n = active.score_version(
        store, model, 2, cfg.active, should_stop=lambda: len(calls) >= 2, progress=lambda d, t: calls.append(d)
    )
    assert n == 2 and len(store.scores(2)) == 2 and ids["d_red"] not in store.scores(2)
    sampled = dataclasses.replace(cfg.active, max_images=2)
    assert active.score_version(store, model, 3, sampled) == 2


def test_next_offers_the_most_uncertain_image_that_is_no_near_duplicate(project):
    cfg, store, model, ids = project
    first = active.suggest(store, cfg.active)  # no scores yet: list order
    assert first.image_id == ids["a_grey"] and first.version is None and "in order" in first.reason
    assert active.suggest(store, cfg.active, after=ids["a_grey"]).image_id == ids["b_grey_again"]
    active.score_version(store, model, 1, cfg.active)
    mask = np.full((H, W), 255, np.uint8)
    mask[:4] = 1
    store.save_label(ids["a_grey"], mask)
    s = active.suggest(store, cfg.active)
    # b_grey_again is as unsure as it gets, but it is a near-duplicate of the labelled a_grey.
    assert s.image_id == ids["c_checker"] and s.rank == 2 and s.version == 1
    assert s.skipped and s.skipped[0][:2] == (ids["b_grey_again"], ids["a_grey"])
    assert "b_grey_again.png (looks like a_grey.png" in s.reason and "model v1" in s.reason
    # Already picked images count too: picking c_checker leaves the certain red image.
    assert active.suggest(store, cfg.active, picked=[ids["c_checker"]]).image_id == ids["d_red"]
    # With the guard off, the most uncertain image wins.
    off = dataclasses.replace(cfg.active, duplicate_similarity=1.01)
    assert active.suggest(store, off).image_id == ids["b_grey_again"]
    # When every candidate duplicates a labelled image, the most uncertain is offered and it says so.
    strict = ActiveConfig(duplicate_similarity=-1.0)
    fb = active.suggest(store, strict)
    assert fb.image_id == ids["b_grey_again"] and "least sure" in fb.reason and "looks like one already" in fb.reason
    for name in ("b_grey_again", "c_checker", "d_red"):
        store.save_label(ids[name], mask)
    assert active.suggest(store, cfg.active) is None


def test_heatmap_is_drawn_at_the_image_size():
    img = _scenes()["c_checker"]
    out = active.heatmap(img, np.full((6, 8), 255, np.uint8))
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


def test_trainer_scores_after_publishing(tiny_cfg, tmp_path, monkeypatch):
    from labelsmart.training import trainer
    from labelsmart.training.trainer import TrainerLoop

    store = open_project(tiny_cfg)
    img = store.images()[0]
    m = np.full((img.height, img.width), 255, np.uint8)
    m[:3], m[-3:] = 0, 1
    store.save_label(img.id, m)
    onnx = write_toy_model(tmp_path / "m" / "v0001" / "model.onnx", max_side=32)

    folder = str(onnx.parent)

    @dataclasses.dataclass
    class Row:  # what the trainer loop reads of a published registry row
        version: int = 1
        path: str = folder

        @property
        def onnx(self) -> Path:
            return Path(self.path) / "model.onnx"

    monkeypatch.setattr(trainer, "run_one_round", lambda cfg, st, progress=None, **kw: Row())
    loop = TrainerLoop(tiny_cfg, store)
    assert loop.step() is True
    scores = store.scores(1)
    assert len(scores) == 7 and img.id not in scores  # every unlabelled image, none of the labelled
    assert store.get_status("trainer")[0]["message"] == "published version 1"
    # Scoring off: nothing is scored, and a failure to score is an event, not a crash.
    store2_cfg = dataclasses.replace(tiny_cfg, active=dataclasses.replace(tiny_cfg.active, score=False))
    loop2 = TrainerLoop(store2_cfg, store)
    monkeypatch.setattr(trainer, "run_one_round", lambda cfg, st, progress=None, **kw: Row(version=2))
    store.request("train_now")
    assert loop2.step() is True and store.scores(2) == {}
    monkeypatch.setattr(trainer, "run_one_round", lambda cfg, st, progress=None, **kw: Row(3, str(tmp_path / "nope")))
    store.request("train_now")
    assert loop.step() is True
    assert any("scoring images with v3 failed" in e[3] for e in store.events())
