"""The background trainer: label snapshots as round input, the trigger rule, failure handling, supervision."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import pid_alive

from labelsmart.config import TriggerConfig
from labelsmart.project import open_project
from labelsmart.store import Store
from labelsmart.training.trainer import Supervisor, TrainerLoop, TriggerState, load_snapshot, should_start

TRIG = TriggerConfig(min_new_pixels=100, min_interval_s=30.0, min_classes=2)


@pytest.mark.parametrize(
    ("state", "start"),
    [
        (TriggerState(500, 1, False, None), False),  # one class only: nothing to separate
        (TriggerState(500, 1, True, None), False),  # not even with Train now
        (TriggerState(50, 2, False, None), False),  # too few new pixels
        (TriggerState(150, 2, False, None), True),  # first round: no interval to wait for
        (TriggerState(150, 2, False, 10.0), False),  # too soon after the last round
        (TriggerState(150, 2, False, 31.0), True),
        (TriggerState(0, 2, True, 1.0), True),  # Train now ignores pixels and interval
        (TriggerState(10_000, 3, True, None, round_running=True), False),  # a running round is never restarted
    ],
)
def test_trigger_rule(state: TriggerState, start: bool):
    assert should_start(state, TRIG)[0] is start


def _label(store, image_id: int, classes: tuple[int, ...]) -> None:
    img = store.image(image_id)
    m = np.full((img.height, img.width), 255, np.uint8)
    for i, c in enumerate(classes):
        m[4 * i : 4 * i + 2, :] = c
    store.save_label(image_id, m)


def test_loop_waits_then_trains_and_a_failed_round_is_reported_not_fatal(tiny_cfg, monkeypatch):
    from labelsmart.training import trainer

    store = open_project(tiny_cfg)
    calls = []

    def fake_round(cfg, st, progress=None, **kw):
        calls.append(st.snapshot().max_revision)
        progress({"stage": "pretraining", "step": 1, "total": 2, "loss": 1.0, "eta_s": 1.0})
        raise MemoryError("out of memory")

    monkeypatch.setattr(trainer, "run_one_round", fake_round)
    loop = TrainerLoop(tiny_cfg, store)
    assert loop.step() is False  # nothing labelled
    assert "at least 2 classes" in store.get_status("trainer")[0]["message"]
    _label(store, store.images()[0].id, (0, 1))
    assert loop.step() is True and len(calls) == 1
    st = store.get_status("trainer")[0]
    assert st["state"] == "error" and "MemoryError" in st["message"]
    assert any("MemoryError" in e[3] for e in store.events())


def test_train_now_request_is_consumed(tiny_cfg, monkeypatch):
    from labelsmart.training import trainer

    store = open_project(tiny_cfg)
    _label(store, store.images()[0].id, (0, 2))
    ran = []
    monkeypatch.setattr(trainer, "run_one_round", lambda cfg, st, progress=None, **kw: ran.append(1) or _Row())
    loop = TrainerLoop(tiny_cfg, store)
    store.request("train_now")
    assert loop.step() is True
    assert store.pending_requests("train_now") == 0
    assert store.get_status("trainer")[0]["message"] == "published version 7"


class _Row:
    version = 7


def _crash_once(cfg) -> None:  # a trainer process that dies as an OOM kill would
    from labelsmart.store import Store

    store = Store(cfg.db_path)
    store.set_status("trainer", {"state": "waiting", "message": f"alive {os.getpid()}", "heartbeat": time.time()})
    if not store.get_meta("crashed"):
        store.set_meta("crashed", "1")
        os._exit(137)
    while True:
        time.sleep(0.2)


def test_supervisor_restarts_a_dead_trainer_and_says_so(tiny_cfg):
    store = open_project(tiny_cfg)
    sup = Supervisor(tiny_cfg, store, target=_crash_once)
    sup.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (sup.restarts == 1 and sup.alive):
            time.sleep(0.2)
        assert sup.restarts == 1 and sup.alive
        assert any("exited with code 137" in e[3] for e in store.events())
    finally:
        sup.stop()
    assert not sup.alive


def test_trainer_exits_when_the_app_is_killed(tiny_cfg):
    import subprocess
    import sys

    open_project(tiny_cfg).close()
    code = (
        "import os, sys, time\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from labelsmart import config\n"
        "from labelsmart.store import Store\n"
        "from labelsmart.training.trainer import Supervisor\n"
        f"cfg = config.load({{'dataset': {str(tiny_cfg.dataset)!r}, 'workdir': {str(tiny_cfg.workdir)!r}, "
        "'trigger.poll_s': 0.2}, env={})\n"
        "sup = Supervisor(cfg, Store(cfg.db_path, image_root=cfg.image_root)); sup.start()\n"
        "print(sup.pid, flush=True); time.sleep(8); os._exit(0)  # killed: no cleanup runs\n"
    )
    app = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    trainer_pid = int(app.stdout.readline())
    assert pid_alive(trainer_pid)
    app.wait(60)
    # The trainer may still be importing torch when the app dies (tens of seconds on a busy 2-core machine); it
    # notices at its first poll after that, then lets its publisher finish (at most 30 s).
    deadline = time.time() + 120
    while time.time() < deadline and pid_alive(trainer_pid):
        time.sleep(0.2)
    assert not pid_alive(trainer_pid), "the trainer outlived the app"


def test_background_rounds_are_capped_in_time_unless_the_user_set_a_cap(tiny_cfg, monkeypatch):
    import dataclasses

    from labelsmart.training import trainer

    store = open_project(tiny_cfg)
    _label(store, store.images()[0].id, (0, 1))
    caps = []

    def fake_round(cfg, st, progress=None, **kw):
        caps.append(cfg.train.max_round_seconds)
        snap = st.snapshot()
        version = st.begin_model(cfg.project_models_dir, snap)
        st.publish_model(version, {})
        return next(m for m in st.models() if m.version == version)

    monkeypatch.setattr(trainer, "run_one_round", fake_round)
    off = dataclasses.replace(tiny_cfg, active=dataclasses.replace(tiny_cfg.active, score=False))
    loop = TrainerLoop(off, store)
    assert loop.step() is True  # the first round: short, so the first pre-annotation comes soon
    store.request("train_now")
    assert loop.step() is True
    assert caps == [off.trigger.first_round_seconds, off.trigger.round_seconds] == [120.0, 240.0]
    mine = dataclasses.replace(off, train=dataclasses.replace(off.train, max_round_seconds=30.0))
    store.request("train_now")
    assert TrainerLoop(mine, store).step() is True and caps[-1] == 30.0


def test_load_snapshot_reads_current_revisions(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        cv2.imwrite(str(root / f"im{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    store = Store(tmp_path / "db.sqlite", image_root=root)
    store.sync_images()
    store.add_class("a")
    store.add_class("b")
    ids = [r.id for r in store.images()]
    m = np.full((20, 30), 255, np.uint8)
    m[5, :] = 1
    store.save_label(ids[0], m)
    m2 = m.copy()
    m2[6, :] = 0
    store.save_label(ids[0], m2)  # newer revision wins
    store.save_label(ids[2], m)
    snap = store.snapshot()
    pairs = load_snapshot(store, snap)
    assert len(pairs) == 2
    np.testing.assert_array_equal(pairs[0][1], m2)
    assert pairs[1][0].shape == (20, 30, 3) and pairs[1][0][0, 0, 0] == 80
    only = load_snapshot(store, snap, ids=[ids[2]])
    assert len(only) == 1 and only[0][0][0, 0, 0] == 80


def _round_until_killed(cfg, where: str) -> None:
    """A round that will be killed: a long training stage, or an export that never ends after a partial file."""
    import dataclasses

    from labelsmart.store import Store
    from labelsmart.training import export, trainer

    store = Store(cfg.db_path, image_root=cfg.image_root)
    if where == "export":

        def stuck(checkpoint, out, **kw):
            Path(out).write_bytes(b"half an onnx file")
            time.sleep(600)

        export.export_onnx = stuck
        trainer.run_one_round(cfg, store, steps=2)
    else:
        long = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_round_seconds=0.0))
        trainer.run_one_round(long, store, steps=1_000_000)


@pytest.mark.parametrize("where", ["round", "export"])
def test_a_trainer_killed_mid_round_or_mid_export_publishes_nothing_and_the_next_start_resumes(tiny_cfg, where):
    import multiprocessing as mp
    import signal

    from labelsmart.training.trainer import run_one_round

    store = open_project(tiny_cfg)
    img = store.images()[0]
    mask = np.full((img.height, img.width), 255, np.uint8)
    mask[:5], mask[-5:] = 0, 1
    store.save_label(img.id, mask)
    first = run_one_round(tiny_cfg, store, steps=2)
    staging = first.folder.with_name(".v0002.tmp")
    proc = mp.get_context("spawn").Process(target=_round_until_killed, args=(tiny_cfg, where))
    proc.start()
    marker = "model.onnx" if where == "export" else "."
    deadline = time.time() + 120
    while time.time() < deadline and not (staging / marker).exists():
        time.sleep(0.1)
    if where == "round":  # well into training: the status says so
        while time.time() < deadline and store.models()[-1].status != "training":
            time.sleep(0.1)
        time.sleep(1.0)
    assert (staging / marker).exists(), "the killed round never got going"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert store.latest_published().version == 1 and store.models()[-1].status == "training"  # left as it died
    TrainerLoop(tiny_cfg, store).recover()  # what the next trainer start does first
    rows = {m.version: m for m in store.models()}
    assert rows[2].status == "failed" and "interrupted" in rows[2].error and not staging.exists()
    assert not (first.folder.parent / "v0002").exists() and store.latest_published().version == 1
    assert run_one_round(tiny_cfg, store, steps=2).version == 3  # and training goes on
