"""Training faults that must lose nothing: a step out of memory (smaller batch, retry, or one clear sentence) and
a trainer killed mid-publish, between the rename of the version's folder and the flip of its row."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from labelsmart.config import Config
from labelsmart.project import open_project
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store, staging_dir, version_dir
from labelsmart.training import round as training_round
from labelsmart.training.round import RoundData, RoundFailed, crops_per_batch, is_out_of_memory, run_round
from labelsmart.training.trainer import TrainerLoop, run_one_round

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes. Error code 12"
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.2 GiB total capacity)"
VERSION_FILES = ["model.json", "model.onnx", "model.pt"]


def _labelled(cfg: Config) -> Store:
    """The tiny project with strokes of two classes on its first image."""
    store = open_project(cfg)
    img = store.images()[0]
    mask = np.full((img.height, img.width), 255, np.uint8)
    mask[:5], mask[-5:] = 0, 1
    store.save_label(img.id, mask)
    return store


def _batch8(cfg: Config) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8))


class _OutOfMemoryInBackward(torch.autograd.Function):
    """Passes the loss through; its backward fails as the CUDA allocator does."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(CUDA_OOM)


def test_what_counts_as_out_of_memory_and_the_smallest_batch() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError(CPU_OOM)) and is_out_of_memory(RuntimeError(CUDA_OOM))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error
    tc = Config().train
    # BatchNorm after ASPP's global pooling needs two samples: two crops, or one crop's two views
    assert crops_per_batch(tc, 1) == 2 and crops_per_batch(tc, 8) == 8
    joint = dataclasses.replace(tc, contrastive_weight=0.5)
    assert crops_per_batch(joint, 1) == 1 and crops_per_batch(joint, 8) == 4


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_step_out_of_memory_is_retried_with_half_the_batch_and_the_round_publishes(
    tiny_cfg, monkeypatch, caplog, where: str
) -> None:
    torch.set_num_threads(1)
    cfg = _batch8(tiny_cfg)
    store = _labelled(cfg)
    real = training_round.finetune_step
    sizes: list[int] = []

    def tight(ctx, batch):  # memory for two crops, not more
        sizes.append(int(batch["view1"].shape[0]))
        if sizes[-1] <= 2:
            return real(ctx, batch)
        if where == "forward":
            raise RuntimeError(CPU_OOM)
        return _OutOfMemoryInBackward.apply(real(ctx, batch))

    monkeypatch.setattr(training_round, "finetune_step", tight)
    caplog.set_level("WARNING", logger="labelsmart.training.round")
    row = run_one_round(cfg, store, steps=3)

    assert sizes == [8, 4, 2, 2, 2]  # the failed steps are not counted: three steps at batch 2
    assert row.version == 1 and row.status == "published" and store.latest_published().version == 1
    assert row.metrics["steps"] == 3 and row.metrics["batch_size"] == 2 and row.metrics["out_of_memory_retries"] == 2
    said = [e[3] for e in store.events() if e[1] == "warning" and e[2] == "trainer"]
    assert "round v1: out of memory at batch 8; retrying with batch 4" in said
    assert "round v1: out of memory at batch 4; retrying with batch 2" in said
    assert "out of memory at batch 8; retrying with batch 4" in caplog.text
    assert sorted(p.name for p in row.folder.iterdir()) == VERSION_FILES
    assert Predictor(store, cfg).version == 1


def test_a_round_out_of_memory_at_the_smallest_batch_fails_with_a_sentence_and_publishes_nothing(
    tiny_cfg, monkeypatch
) -> None:
    torch.set_num_threads(1)
    cfg = _batch8(tiny_cfg)
    store = _labelled(cfg)
    first = run_one_round(cfg, store, steps=2)
    assert first.metrics["batch_size"] == 8 and "out_of_memory_retries" not in first.metrics
    predictor = Predictor(store, cfg)
    assert predictor.version == 1
    sizes: list[int] = []

    def never_fits(ctx, batch):
        sizes.append(int(batch["view1"].shape[0]))
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(training_round, "finetune_step", never_fits)
    with pytest.raises(RoundFailed) as failed:
        run_one_round(cfg, store, steps=3)
    msg = str(failed.value)
    assert msg.startswith("round v2: out of memory at batch 2 in fine-tuning step 1, the smallest batch")
    assert "nothing was saved" in msg and "Lower train.crop (now 64" in msg and "preprocess.max_side" in msg
    assert msg.endswith("or train on a machine with more memory.")
    assert sizes == [8, 4, 2]
    rows = {m.version: m for m in store.models()}
    assert rows[2].status == "failed" and "out of memory at batch 2" in rows[2].error
    assert store.latest_published().version == first.version == 1
    models = first.folder.parent
    assert sorted(p.name for p in models.iterdir()) == ["v0001"]  # no v0002, no staging folder
    assert predictor.refresh() is False and predictor.version == 1


def test_an_error_that_is_not_out_of_memory_is_not_retried(tiny_cfg, monkeypatch) -> None:
    torch.set_num_threads(1)
    store = _labelled(tiny_cfg)
    calls: list[int] = []

    def broken(ctx, batch):
        calls.append(1)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(training_round, "finetune_step", broken)
    pairs = [(store.read_image(i), store.load_revision(r)) for i, r in store.snapshot().revisions]
    data = RoundData(train=pairs, classes=[{"id": c.id, "name": c.name, "color": c.color} for c in store.classes()])
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        run_round(tiny_cfg, data, 1, steps=3)
    assert calls == [1]


def _round_killed_mid_publish(cfg: Config) -> None:
    """A round in a child process that dies as a kill would, right after the rename and before the row flips."""
    from labelsmart.store import registry
    from labelsmart.training import trainer

    registry.Registry.publish_model = lambda self, *a, **kw: os._exit(9)
    trainer.run_one_round(cfg, Store(cfg.db_path, image_root=cfg.image_root), steps=2)


def test_a_trainer_killed_mid_publish_serves_the_version_before_and_the_next_start_recovers(tiny_cfg) -> None:
    torch.set_num_threads(1)
    store = _labelled(tiny_cfg)
    first = run_one_round(tiny_cfg, store, steps=2)
    models = first.folder.parent
    v2 = version_dir(models, 2)

    proc = mp.get_context("spawn").Process(target=_round_killed_mid_publish, args=(tiny_cfg,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9, f"the child round ended with {proc.exitcode}, not at the publish step"

    # what the kill left: the files in place, the row still training, nothing in staging
    rows = {m.version: m for m in store.models()}
    assert rows[2].status == "training" and rows[2].folder == v2
    assert sorted(p.name for p in v2.iterdir()) == VERSION_FILES and not staging_dir(v2).exists()
    predictor = Predictor(store, tiny_cfg)  # a page opened now serves the version before
    assert predictor.version == 1 and store.latest_published().version == 1

    TrainerLoop(tiny_cfg, store).recover()  # what the next trainer start does first
    rows = {m.version: m for m in store.models()}
    assert rows[2].status == "failed" and rows[2].error.startswith("interrupted")
    assert not v2.exists() and first.folder.is_dir()  # the unpublished files go, the served ones stay
    assert predictor.refresh() is False and predictor.version == 1

    # a leftover at the next number (say, from a registry restored from a backup) is replaced, not mixed in
    v3 = version_dir(models, 3)
    v3.mkdir()
    (v3 / "model.onnx").write_bytes(b"a stale model")
    (v3 / "stale.bin").write_bytes(b"x")
    row = run_one_round(tiny_cfg, store, steps=2)
    assert row.version == 3 and row.status == "published" and row.folder == v3
    assert sorted(p.name for p in v3.iterdir()) == VERSION_FILES
    assert predictor.refresh() is True and predictor.version == 3
    assert sorted(p.name for p in models.iterdir()) == ["v0001", "v0003"]


_BEGIN_AND_SLEEP = """
import sys, time
from pathlib import Path
from labelsmart.store import Store, staging_dir, version_dir
store = Store(Path(sys.argv[1]), image_root=Path(sys.argv[2]))
version = store.begin_model(Path(sys.argv[3]), store.snapshot())  # what a CLI round does first
staging_dir(version_dir(Path(sys.argv[3]), version)).mkdir(parents=True)
print(version, flush=True)
time.sleep(600)
"""


def test_a_round_of_another_live_process_survives_recovery_and_is_failed_once_that_process_died(tiny_cfg) -> None:
    import subprocess
    import sys

    store = _labelled(tiny_cfg)
    models = tiny_cfg.project_models_dir
    args = [str(tiny_cfg.db_path), str(tiny_cfg.image_root), str(models)]
    proc = subprocess.Popen([sys.executable, "-c", _BEGIN_AND_SLEEP, *args], stdout=subprocess.PIPE, text=True)
    try:
        version = int(proc.stdout.readline())
        row = store.models()[-1]
        assert row.version == version and row.owner is not None and row.owner.pid == proc.pid
        assert row.owner.start is not None  # the start time too, so a reused pid is not taken for it
        TrainerLoop(tiny_cfg, store).recover()  # the app's trainer starting while the CLI round runs
        row = store.models()[-1]
        assert row.status == "training" and staging_dir(version_dir(models, version)).is_dir()
    finally:
        proc.kill()
        proc.wait()
    TrainerLoop(tiny_cfg, store).recover()  # the next start, after that process died
    row = store.models()[-1]
    assert row.status == "failed" and row.error.startswith("interrupted")
    assert not staging_dir(version_dir(models, version)).exists()


def test_a_reused_pid_or_a_row_without_owner_is_failed_by_recovery(tiny_cfg) -> None:
    from labelsmart.store.registry import RoundOwner

    store = _labelled(tiny_cfg)
    models = tiny_cfg.project_models_dir
    me = RoundOwner.current()
    for version in (1, 2, 3):
        store.add_model(version, version_dir(models, version), store.snapshot())  # no owner, as older rows
    with store.transaction() as con:  # 1: this live pid, but started at another time (a later process under it)
        stale = dataclasses.replace(me, start=f"{me.start}0" if me.start else "proc:another-boot:1")
        con.execute("UPDATE models SET owner=? WHERE version=1", (stale.to_json(),))
        con.execute("UPDATE models SET owner=? WHERE version=3", (me.to_json(),))  # this very process: alive
    TrainerLoop(tiny_cfg, store).recover()
    assert [m.status for m in store.models()] == ["failed", "failed", "training"]
