"""The continuous trainer: saves absorbed while it trains, the publishing rules, the regression gate, idling, kills."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from labelsmart.config import Config
from labelsmart.project import open_project
from labelsmart.store import ModelRow, Store
from labelsmart.training import continuous
from labelsmart.training.continuous import ContinuousTrainer, LabelPool, held_out
from labelsmart.training.device_data import DeviceBatches
from labelsmart.training.trainer import make_loop

QUICK = {"first_publish_steps": 2, "publish_min_steps": 2, "publish_min_interval_s": 0}  # publish every two steps


def _wait(cond: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    """Wait for ``cond()``; the deadline is only there so that a broken trainer fails the test instead of hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Project:
    """A project store of the tiny data set, in continuous mode; ``ids`` are its images in order."""

    cfg: Config
    store: Store
    ids: list[int]

    def label(self, k: int, rows: int = 5) -> int:
        """Label image ``ids[k]``: stripes of class 0 at the top and class 1 at the bottom. Returns the revision."""
        img = self.store.image(self.ids[k])
        mask = np.full((img.height, img.width), 255, np.uint8)
        mask[:rows], mask[-rows:] = 0, 1
        return self.store.save_label(self.ids[k], mask)

    @contextlib.contextmanager
    def running(self, trainer: ContinuousTrainer | None = None) -> Iterator[ContinuousTrainer]:
        """A trainer (a new one by default) running in a thread of the test, stopped at exit."""
        trainer = trainer or ContinuousTrainer(self.cfg, self.store)
        stopped = threading.Event()
        thread = threading.Thread(target=trainer.run, args=(stopped.is_set,), daemon=True)
        thread.start()
        try:
            yield trainer
        finally:
            stopped.set()
            thread.join(60)
        assert not thread.is_alive()

    def published(self, what: str, until: Callable[[ModelRow], bool] = lambda row: True) -> ModelRow:
        """The newest published version, once there is one and ``until`` holds for it."""
        _wait(lambda: (row := self.store.latest_published()) is not None and until(row), what=what)
        row = self.store.latest_published()
        assert row is not None
        return row


@pytest.fixture
def project(tiny_cfg: Config) -> Callable[..., Project]:
    """``project(labelled=1, **trigger)``: the tiny project with its first ``labelled`` images labelled, in
    continuous mode with these ``trigger`` settings."""

    def make(labelled: int = 1, **trigger: object) -> Project:
        cfg = dataclasses.replace(tiny_cfg, trigger=dataclasses.replace(tiny_cfg.trigger, mode="continuous", **trigger))
        store = open_project(cfg)
        p = Project(cfg, store, [r.id for r in store.images()])
        for k in range(labelled):
            p.label(k)
        return p

    return make


def test_held_out_images_stay_on_their_side_as_the_set_grows():
    sides = {i: held_out(i, 5) for i in range(1, 2001)}
    share = sum(sides.values()) / len(sides)
    assert 0.15 < share < 0.25  # about one in five
    assert all(held_out(i, 5) == s for i, s in sides.items())  # a function of the id alone
    assert not any(held_out(i, 1) for i in range(100))  # val_every < 2: nothing held out


def test_the_label_pool_reads_only_images_whose_labels_changed(project, monkeypatch):
    p = project(labelled=3)
    reads = []
    real = p.store.read_image
    monkeypatch.setattr(p.store, "read_image", lambda i: reads.append(i) or real(i))
    pool = LabelPool(p.store, p.cfg)
    assert pool.refresh() and sorted(reads) == sorted(p.ids[:3]) and len(pool.train) == 3
    assert not pool.refresh()  # nothing new
    reads.clear()
    p.label(1, rows=7)
    assert pool.refresh() and reads == [p.ids[1]]
    assert pool.snapshot is not None and pool.snapshot.revisions == p.store.snapshot().revisions
    h, w = pool.train[p.ids[0]][1].shape  # working scale
    assert max(h, w) <= p.cfg.preprocess.max_side


def test_a_save_joins_training_at_the_next_poll_and_is_published(project):
    p = project(first_publish_steps=3, publish_min_steps=3, publish_min_interval_s=0, keep_versions=0)
    t = ContinuousTrainer(p.cfg, p.store)
    # Counted in the trainer's own progress, not in seconds: for each poll of the store and each training slice
    # that begins after the save, whether the save is in the training set by then.
    saved = threading.Event()
    polls: list[bool] = []
    slices: list[bool] = []
    refresh, train_slice = t.pool.refresh, t._train_slice

    def counted_refresh() -> bool:
        after = saved.is_set()
        changed = refresh()
        if after:
            polls.append(p.ids[1] in t.pool.revisions)
        return changed

    def counted_slice(seconds: float) -> None:
        if saved.is_set():
            slices.append(p.ids[1] in t.pool.revisions)
        train_slice(seconds)

    t.pool.refresh, t._train_slice = counted_refresh, counted_slice
    with p.running(t):
        first = p.published("the first version")
        assert first.metrics["mode"] == "continuous" and first.metrics["publish_reason"] == "first model"
        assert first.onnx.is_file() and "graph template" in (first.folder / "model.json").read_text()
        steps_before = t.steps
        rev = p.label(1)
        saved.set()
        _wait(lambda: polls, what="a poll of the store after the save")
        assert polls[0]  # the first poll after the save took it in
        assert slices.count(False) <= 1  # training went on for at most the slice under way when the save came
        assert t.steps >= steps_before  # the same run went on: no restart
        row = p.published("a version trained on the save", lambda r: r.label_revision >= rev)
        assert row.version > first.version and row.labelled_images == 2
        assert row.metrics["steps"] > first.metrics["steps"]
    status, _ = p.store.get_status("trainer")
    assert status["mode"] == "continuous"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_continuous_trainer_takes_its_crops_from_device_batches(project, monkeypatch):
    made: list[int] = []
    real = DeviceBatches.batch
    monkeypatch.setattr(DeviceBatches, "batch", lambda self, n: made.append(n) or real(self, n))
    p = project(labelled=2, **QUICK)
    p.cfg = dataclasses.replace(p.cfg, train=dataclasses.replace(p.cfg.train, device="cuda"))
    t = ContinuousTrainer(p.cfg, p.store)
    with p.running(t):
        row = p.published("the first version on CUDA")
    assert t.device.type == "cuda" and row.metrics["device"] == "cuda"
    assert len(made) >= row.metrics["steps"]  # every step's labelled crops were made on the GPU


def test_a_candidate_worse_than_the_served_version_is_not_published(project, monkeypatch):
    p = project(labelled=3, publish_tolerance=0.02)
    t = ContinuousTrainer(p.cfg, p.store)
    t._poll()
    t._train_slice(0.1)
    pub = t.publisher
    scores = iter([0.6, 0.3, 0.6, 0.59, 0.6, 0.1])  # candidate alone; then candidate, served (twice); alone
    monkeypatch.setattr(continuous, "validate", lambda *a, **k: {"val_miou": next(scores)} | _NO_IOU)
    held = [(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))] * p.cfg.trigger.publish_gate_images

    def candidate(val):
        c = t._candidate("new labels")
        c.val = val
        return c

    assert t.publish(candidate(held), pub) is not None  # nothing served yet: published (no comparison made)
    served = p.store.latest_published()
    assert t.publish(candidate(held), pub) is None  # 0.3 against 0.6
    assert p.store.latest_published().version == served.version and len(p.store.models()) == 1
    assert "not published" in pub.last_result and "30.0 %" in pub.last_result
    assert t.publish(candidate(held), pub) is not None  # 0.59 against 0.6: within the tolerance
    assert p.store.latest_published().version == served.version + 1
    assert t.publish(candidate(held[:1]), pub) is not None  # one held-out image is too few to judge by: no gate
    assert p.store.latest_published().version == served.version + 2


_NO_IOU = {"val_per_class_iou": None, "val_pixel_acc": None}


def test_saves_that_come_faster_than_the_publish_steps_do_not_put_the_next_version_off(project):
    # A slow CPU: the annotator saves before every step, fewer than publish_min_steps steps apart. A version
    # trained on the saves is still due publish_min_steps steps after the oldest save the served version lacks.
    p = project(first_publish_steps=1, publish_min_steps=4, publish_min_interval_s=0, publish_every_s=1e9)
    t = ContinuousTrainer(p.cfg, p.store)
    t._poll()
    t._train_slice(0)  # one step
    t._poll()
    first = t.publisher.inbox.get_nowait()
    assert first.reason == "first model" and t.publish(first, t.publisher) is not None
    offered: dict[int, str] = {}  # save number -> the reason of a candidate offered at the poll after it
    for k in range(1, 6):
        p.label(k)
        t._poll()  # takes the save in, and offers a candidate if the rules say so
        with contextlib.suppress(queue.Empty):
            offered[k] = t.publisher.inbox.get_nowait().reason
        t._train_slice(0)
    # four steps after the first of the unserved saves, although the newest came zero steps before the poll
    assert offered == {5: "new labels"}
    assert t.steps - t.steps_at_publish == 5


def test_the_trainer_idles_without_news_and_wakes_at_the_next_save(project):
    p = project(first_publish_steps=2, idle_after_s=1.0, publish_min_interval_s=0)
    with p.running() as t:
        _wait(lambda: t.idle, what="the trainer to go idle")
        steps = t.steps
        time.sleep(1.0)
        assert t.steps == steps  # idle: no steps
        assert p.store.get_status("trainer")[0]["state"] == "idle"
        p.label(1)
        _wait(lambda: t.steps > steps, what="training to resume after a save")


def test_new_classes_restart_the_head_and_the_next_version_has_them(project):
    p = project(**QUICK)
    with p.running():
        p.published("the first version")
        k = len(p.store.classes())
        p.store.add_class("extra", (1, 2, 3))
        img = p.store.image(p.ids[1])
        mask = np.full((img.height, img.width), 255, np.uint8)
        mask[:4], mask[4:8], mask[-4:] = 0, 1, k
        rev = p.store.save_label(p.ids[1], mask)
        p.published("a version with the new class", lambda r: r.label_revision >= rev)
    from labelsmart.serving.sidecar import load_sidecar

    assert len(load_sidecar(p.store.latest_published().onnx).classes) == k + 1


def _continuous_until_killed(cfg) -> None:
    """The continuous trainer with an export that writes half a file and never ends (it will be killed)."""
    from labelsmart.training import export

    def stuck(checkpoint, out, **kw):
        Path(out).write_bytes(b"half an onnx file")
        time.sleep(600)

    export.export_onnx = stuck
    store = Store(cfg.db_path, image_root=cfg.image_root)
    make_loop(cfg, store).run()


def test_a_kill_mid_export_leaves_the_served_version_intact_and_the_next_start_resumes(project):
    import multiprocessing as mp
    import signal

    p = project(**QUICK)
    with p.running():
        served = p.published("the first version")
    p.label(1)
    proc = mp.get_context("spawn").Process(target=_continuous_until_killed, args=(p.cfg,))
    proc.start()
    staging = served.folder.with_name(f".v{served.version + 1:04d}.tmp")
    _wait(lambda: (staging / "model.onnx").exists(), what="the export to begin")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert p.store.latest_published().version == served.version and served.onnx.is_file()
    assert p.store.models()[-1].status == "training"  # left as it died
    with p.running():  # the next start recovers, then publishes what it learns
        p.published("a version after the kill", lambda r: r.version > served.version + 1)
    rows = {m.version: m for m in p.store.models()}
    assert rows[served.version + 1].status == "failed" and not staging.exists()


@pytest.mark.parametrize("mode", ["continuous", "rounds"])
def test_the_mode_setting_picks_the_loop(tiny_cfg, mode):
    from labelsmart.training.trainer import TrainerLoop

    cfg = dataclasses.replace(tiny_cfg, trigger=dataclasses.replace(tiny_cfg.trigger, mode=mode))
    loop = make_loop(cfg, open_project(cfg))
    assert isinstance(loop, ContinuousTrainer) == (mode == "continuous") and isinstance(loop, TrainerLoop)
    with pytest.raises(ValueError, match="LABELSMART_TRIGGER_MODE"):
        make_loop(dataclasses.replace(tiny_cfg, trigger=dataclasses.replace(tiny_cfg.trigger, mode="x")), None)
    with pytest.raises(ValueError, match="LABELSMART_TRAIN_PRECISION"):  # refused before the trainer starts
        make_loop(dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, precision="fp8")), None)
