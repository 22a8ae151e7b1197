"""The continuous trainer: saves absorbed while it trains, the publishing rules, the regression gate, idling, kills."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from labelsmart.project import open_project
from labelsmart.store import Store
from labelsmart.training import continuous
from labelsmart.training.continuous import ContinuousTrainer, LabelPool, held_out
from labelsmart.training.trainer import make_loop


def _cfg(cfg, **trigger):
    return dataclasses.replace(cfg, trigger=dataclasses.replace(cfg.trigger, mode="continuous", **trigger))


def _label(store: Store, image_id: int, rows: int = 5) -> int:
    """Stripes of class 0 at the top and class 1 at the bottom; returns the revision."""
    img = store.image(image_id)
    mask = np.full((img.height, img.width), 255, np.uint8)
    mask[:rows], mask[-rows:] = 0, 1
    return store.save_label(image_id, mask)


def _wait(cond, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class _Running:
    """A trainer running in a thread of the test, stopped at exit."""

    def __init__(self, trainer: ContinuousTrainer) -> None:
        self.trainer = trainer
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=trainer.run, args=(self.stopped.is_set,), daemon=True)

    def __enter__(self) -> ContinuousTrainer:
        self.thread.start()
        return self.trainer

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_held_out_images_stay_on_their_side_as_the_set_grows():
    sides = {i: held_out(i, 5) for i in range(1, 2001)}
    share = sum(sides.values()) / len(sides)
    assert 0.15 < share < 0.25  # about one in five
    assert all(held_out(i, 5) == s for i, s in sides.items())  # a function of the id alone
    assert not any(held_out(i, 1) for i in range(100))  # val_every < 2: nothing held out


def test_the_label_pool_reads_only_images_whose_labels_changed(tiny_cfg, monkeypatch):
    store = open_project(tiny_cfg)
    ids = [r.id for r in store.images()]
    for i in ids[:3]:
        _label(store, i)
    reads = []
    real = store.read_image
    monkeypatch.setattr(store, "read_image", lambda i: reads.append(i) or real(i))
    pool = LabelPool(store, tiny_cfg)
    assert pool.refresh() and sorted(reads) == sorted(ids[:3]) and len(pool.train) == 3
    assert not pool.refresh()  # nothing new
    reads.clear()
    _label(store, ids[1], rows=7)
    assert pool.refresh() and reads == [ids[1]]
    assert pool.snapshot is not None and pool.snapshot.revisions == store.snapshot().revisions
    h, w = pool.train[ids[0]][1].shape  # working scale
    assert max(h, w) <= tiny_cfg.preprocess.max_side


def test_a_save_joins_training_within_seconds_and_is_published(tiny_cfg):
    cfg = _cfg(tiny_cfg, first_publish_steps=3, publish_min_steps=3, publish_min_interval_s=0, keep_versions=0)
    store = open_project(cfg)
    ids = [r.id for r in store.images()]
    _label(store, ids[0])
    with _Running(ContinuousTrainer(cfg, store)) as t:
        _wait(lambda: store.latest_published() is not None, what="the first version")
        first = store.latest_published()
        assert first.metrics["mode"] == "continuous" and first.metrics["publish_reason"] == "first model"
        assert first.onnx.is_file() and "graph template" in (first.folder / "model.json").read_text()
        steps_before = t.steps
        rev = _label(store, ids[1])
        saved = time.monotonic()
        _wait(lambda: ids[1] in t.pool.revisions, timeout=30, what="the save to join the training set")
        absorbed_s = time.monotonic() - saved
        assert t.steps >= steps_before  # the same run went on: no restart
        _wait(lambda: store.latest_published().label_revision >= rev, what="a version trained on the save")
        row = store.latest_published()
        assert row.version > first.version and row.labelled_images == 2
        assert row.metrics["steps"] > first.metrics["steps"]
    assert absorbed_s < 15  # polled every 0.2 s; generous for a busy machine
    status, _ = store.get_status("trainer")
    assert status["mode"] == "continuous"


def test_a_candidate_worse_than_the_served_version_is_not_published(tiny_cfg, monkeypatch):
    cfg = _cfg(tiny_cfg, publish_tolerance=0.02)
    store = open_project(cfg)
    ids = [r.id for r in store.images()]
    for i in ids[:3]:
        _label(store, i)
    t = ContinuousTrainer(cfg, store)
    t._poll()
    t._train_slice(0.1)
    pub = t.publisher
    scores = iter([0.6, 0.3, 0.6, 0.59, 0.6, 0.1])  # candidate alone; then candidate, served (twice); alone
    monkeypatch.setattr(continuous, "validate", lambda *a, **k: {"val_miou": next(scores)} | _NO_IOU)
    held = [(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))] * cfg.trigger.publish_gate_images

    def candidate(val):
        c = t._candidate("new labels")
        c.val = val
        return c

    assert t.publish(candidate(held), pub) is not None  # nothing served yet: published (no comparison made)
    served = store.latest_published()
    assert t.publish(candidate(held), pub) is None  # 0.3 against 0.6
    assert store.latest_published().version == served.version and len(store.models()) == 1
    assert "not published" in pub.last_result and "30.0 %" in pub.last_result
    assert t.publish(candidate(held), pub) is not None  # 0.59 against 0.6: within the tolerance
    assert store.latest_published().version == served.version + 1
    assert t.publish(candidate(held[:1]), pub) is not None  # one held-out image is too few to judge by: no gate
    assert store.latest_published().version == served.version + 2


_NO_IOU = {"val_per_class_iou": None, "val_pixel_acc": None}


def test_the_trainer_idles_without_news_and_wakes_at_the_next_save(tiny_cfg):
    cfg = _cfg(tiny_cfg, first_publish_steps=2, idle_after_s=1.0, publish_min_interval_s=0)
    store = open_project(cfg)
    ids = [r.id for r in store.images()]
    _label(store, ids[0])
    with _Running(ContinuousTrainer(cfg, store)) as t:
        _wait(lambda: t.idle, what="the trainer to go idle")
        steps = t.steps
        time.sleep(1.0)
        assert t.steps == steps  # idle: no steps
        assert store.get_status("trainer")[0]["state"] == "idle"
        _label(store, ids[1])
        _wait(lambda: t.steps > steps, what="training to resume after a save")


def test_new_classes_restart_the_head_and_the_next_version_has_them(tiny_cfg):
    cfg = _cfg(tiny_cfg, first_publish_steps=2, publish_min_steps=2, publish_min_interval_s=0)
    store = open_project(cfg)
    ids = [r.id for r in store.images()]
    _label(store, ids[0])
    with _Running(ContinuousTrainer(cfg, store)):
        _wait(lambda: store.latest_published() is not None, what="the first version")
        k = len(store.classes())
        store.add_class("extra", (1, 2, 3))
        img = store.image(ids[1])
        mask = np.full((img.height, img.width), 255, np.uint8)
        mask[:4], mask[4:8], mask[-4:] = 0, 1, k
        rev = store.save_label(ids[1], mask)
        _wait(lambda: store.latest_published().label_revision >= rev, what="a version with the new class")
    from labelsmart.serving.sidecar import load_sidecar

    assert len(load_sidecar(store.latest_published().onnx).classes) == k + 1


def _continuous_until_killed(cfg) -> None:
    """The continuous trainer with an export that writes half a file and never ends (it will be killed)."""
    from labelsmart.training import export

    def stuck(checkpoint, out, **kw):
        Path(out).write_bytes(b"half an onnx file")
        time.sleep(600)

    export.export_onnx = stuck
    store = Store(cfg.db_path, image_root=cfg.image_root)
    make_loop(cfg, store).run()


def test_a_kill_mid_export_leaves_the_served_version_intact_and_the_next_start_resumes(tiny_cfg):
    import multiprocessing as mp
    import signal

    cfg = _cfg(tiny_cfg, first_publish_steps=2, publish_min_steps=2, publish_min_interval_s=0)
    store = open_project(cfg)
    ids = [r.id for r in store.images()]
    _label(store, ids[0])
    with _Running(ContinuousTrainer(cfg, store)):
        _wait(lambda: store.latest_published() is not None, what="the first version")
    served = store.latest_published()
    _label(store, ids[1])
    proc = mp.get_context("spawn").Process(target=_continuous_until_killed, args=(cfg,))
    proc.start()
    staging = served.folder.with_name(f".v{served.version + 1:04d}.tmp")
    _wait(lambda: (staging / "model.onnx").exists(), what="the export to begin")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert store.latest_published().version == served.version and served.onnx.is_file()
    assert store.models()[-1].status == "training"  # left as it died
    with _Running(ContinuousTrainer(cfg, store)):  # the next start recovers, then publishes what it learns
        _wait(lambda: store.latest_published().version > served.version + 1, what="a version after the kill")
    rows = {m.version: m for m in store.models()}
    assert rows[served.version + 1].status == "failed" and not staging.exists()


@pytest.mark.parametrize("mode", ["continuous", "rounds"])
def test_the_mode_setting_picks_the_loop(tiny_cfg, mode):
    from labelsmart.training.trainer import TrainerLoop

    cfg = dataclasses.replace(tiny_cfg, trigger=dataclasses.replace(tiny_cfg.trigger, mode=mode))
    loop = make_loop(cfg, open_project(cfg))
    assert isinstance(loop, ContinuousTrainer) == (mode == "continuous") and isinstance(loop, TrainerLoop)
    with pytest.raises(ValueError, match="LABELSMART_TRIGGER_MODE"):
        make_loop(dataclasses.replace(tiny_cfg, trigger=dataclasses.replace(tiny_cfg.trigger, mode="x")), None)
