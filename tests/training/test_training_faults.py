"""Training faults that must lose nothing: a step out of memory (smaller batch, retry, or one clear sentence) and
a trainer killed mid-publish, between the rename of the version's folder and the flip of its row."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path

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


# ------------------------------------------------------------------------------------------ out of memory in validation


def _pairs(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (40, 48, 3), np.uint8), rng.integers(0, 3, (40, 48), np.uint8)) for _ in range(n)]


class _Model(torch.nn.Module):
    """Stands in for the network (predict_mask is faked): remembers where it was moved."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, device: torch.device | str) -> _Model:  # type: ignore[override]
        self.moves.append(torch.device(device).type)
        return self


def _tight_predictor(monkeypatch: pytest.MonkeyPatch, fails: dict[tuple[int, str], int], error: str) -> list:
    """predict_mask that runs out of memory ``fails[(image, device)]`` times, then answers the label itself."""
    from labelsmart.training import validation

    calls: list[tuple[int, str]] = []
    left = dict(fails)

    def predict(model, image, pp, device):
        i = next(k for k, (im, _) in enumerate(PAIRS) if im is image)
        calls.append((i, device.type))
        if left.get((i, device.type), 0) > 0:
            left[(i, device.type)] -= 1
            raise torch.OutOfMemoryError(error) if device.type == "cuda" else RuntimeError(error)
        return PAIRS[i][1]

    monkeypatch.setattr(validation, "predict_mask", predict)
    return calls


PAIRS = _pairs()


def test_validation_out_of_memory_on_the_gpu_is_retried_then_goes_on_on_the_cpu(tiny_cfg, monkeypatch, caplog) -> None:
    from labelsmart.training import validation

    cuda = torch.device("cuda")
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    _tight_predictor(monkeypatch, {}, CUDA_OOM)
    clean = validation.validate(_Model(), PAIRS, tiny_cfg, 3, torch.device("cpu"))
    assert clean["val_miou"] == 1.0 and "val_device" not in clean  # no retry: the metrics as before

    calls = _tight_predictor(monkeypatch, {(1, "cuda"): 1}, CUDA_OOM)  # once: freeing the cache is enough
    model = _Model()
    with caplog.at_level("WARNING", logger="labelsmart.training.validation"):
        once = validation.validate(model, PAIRS, tiny_cfg, 3, cuda)
    assert calls == [(0, "cuda"), (1, "cuda"), (1, "cuda"), (2, "cuda")] and emptied and model.moves == []
    assert once["val_miou"] == 1.0 and once["val_out_of_memory_retries"] == 1 and once["val_device"] == "cuda"
    assert "out of memory in validation image 2 of 3 (48x40) on cuda; freed memory, retrying" in caplog.text

    calls = _tight_predictor(monkeypatch, {(1, "cuda"): 2}, CUDA_OOM)  # twice: the rest on the CPU
    model = _Model()
    with caplog.at_level("WARNING", logger="labelsmart.training.validation"):
        twice = validation.validate(model, PAIRS, tiny_cfg, 3, cuda)
    assert calls == [(0, "cuda"), (1, "cuda"), (1, "cuda"), (1, "cpu"), (2, "cpu")]
    assert model.moves == ["cpu", "cuda"] and model.training  # back on the GPU, in the mode it came in
    assert {k: twice[k] for k in clean} == clean and twice["val_device"] == "cpu"
    assert twice["val_out_of_memory_retries"] == 2
    assert "on cuda again; validating the rest on the CPU" in caplog.text


def test_validation_out_of_memory_twice_on_the_cpu_fails_the_round_in_a_sentence(tiny_cfg, monkeypatch) -> None:
    from labelsmart.training import validation

    calls = _tight_predictor(monkeypatch, {(2, "cpu"): 1}, CPU_OOM)
    assert validation.validate(_Model(), PAIRS, tiny_cfg, 3, torch.device("cpu"))["val_out_of_memory_retries"] == 1
    assert calls[-2:] == [(2, "cpu"), (2, "cpu")]
    _tight_predictor(monkeypatch, {(0, "cpu"): 2}, CPU_OOM)
    model = _Model().train()
    with pytest.raises(RoundFailed, match=r"out of memory in validation image 1 of 3 \(48x40\) on the CPU.*max_side"):
        validation.validate(model, PAIRS, tiny_cfg, 3, torch.device("cpu"))
    assert model.training  # left as it was found

    def broken(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(validation, "predict_mask", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # not out of memory: not retried
        validation.validate(_Model(), PAIRS, tiny_cfg, 3, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ out of memory in export


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of a fresh network and its ONNX graph, exported once (the tests below copy the graph)."""
    from labelsmart import config
    from labelsmart.training.export import export_onnx
    from labelsmart.training.model import build_model, save_checkpoint

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    cfg = config.load({"preprocess.max_side": 128})
    classes = [{"id": i, "name": n, "color": [i, i, i]} for i, n in enumerate(["sky", "road", "car"])]
    checkpoint = tmp / "model.pt"
    save_checkpoint(checkpoint, build_model(cfg.model, 3), cfg, classes, version=1, step=0, metrics={})
    export_onnx(checkpoint, tmp / "graph" / "model.onnx")
    return checkpoint, tmp / "graph" / "model.onnx"


def _graph_copier(onnx: Path, fails: int, error: BaseException) -> tuple[Callable, list[int]]:
    import shutil

    calls: list[int] = []

    def graph(model, path, opset):
        calls.append(1)
        if len(calls) <= fails:
            raise error
        shutil.copyfile(onnx, path)
        return "copied"

    return graph, calls


def test_an_export_out_of_memory_is_retried_once_sparing_memory_and_publishes(exported, tmp_path, monkeypatch, caplog):
    from labelsmart.training import export

    checkpoint, onnx = exported
    frugal: list[bool] = []
    real_parity = export.check_parity

    def parity(model, path, threads=None, **kw):
        frugal.append(kw.get("frugal", False))
        if len(frugal) == 1:
            raise RuntimeError(CPU_OOM)  # the parity check runs out of memory the first time
        return real_parity(model, path, threads, **kw)

    monkeypatch.setattr(export, "check_parity", parity)
    graph, calls = _graph_copier(onnx, 0, RuntimeError())
    out = tmp_path / "v1" / "model.onnx"
    with caplog.at_level("WARNING", logger="labelsmart.training.export"):
        sidecar = export.export_onnx(checkpoint, out, graph=graph)
    assert frugal == [False, True] and len(calls) == 2  # the whole export again, sparing memory
    assert "out of memory exporting" in caplog.text and "retrying once on the CPU" in caplog.text
    assert sidecar.details["parity_max_abs_diff"] < 1e-3
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx"]  # no temporary file left

    out = tmp_path / "v2" / "model.onnx"  # the exporter itself out of memory once (ONNX Runtime's words too)
    monkeypatch.setattr(export, "check_parity", real_parity)
    graph, calls = _graph_copier(onnx, 1, torch.OutOfMemoryError(CUDA_OOM))
    export.export_onnx(checkpoint, out, graph=graph)
    assert len(calls) == 2 and sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx"]
    assert export.out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation"))
    wrapped = export.ExportError("ONNX export failed with both exporters")
    wrapped.__cause__ = MemoryError()
    assert export.out_of_memory(wrapped) and not export.out_of_memory(export.ExportError("differs from PyTorch"))


def test_an_export_out_of_memory_twice_is_one_sentence_and_writes_nothing(exported, tmp_path) -> None:
    from labelsmart.training import export

    checkpoint, onnx = exported
    graph, calls = _graph_copier(onnx, 2, RuntimeError(CPU_OOM))
    out = tmp_path / "v1" / "model.onnx"
    with pytest.raises(export.ExportError, match=r"out of memory exporting .*model\.onnx, also when retried on the"):
        export.export_onnx(checkpoint, out, graph=graph)
    assert len(calls) == 2 and list(out.parent.iterdir()) == []

    graph, calls = _graph_copier(onnx, 1, export.ExportError("ONNX export failed with both exporters (ValueError: x)."))
    with pytest.raises(export.ExportError, match="both exporters"):  # not out of memory: not retried
        export.export_onnx(checkpoint, out, graph=graph)
    assert len(calls) == 1 and list(out.parent.iterdir()) == []


def test_a_frugal_parity_check_gives_the_same_answer(exported) -> None:
    from labelsmart.training import export
    from labelsmart.training.model import load_checkpoint

    checkpoint, onnx = exported
    model, _ = load_checkpoint(checkpoint)
    plain = export.check_parity(model, onnx, threads=1)
    frugal = export.check_parity(model, onnx, threads=1, frugal=True)
    assert plain < 1e-3 and frugal < 1e-3 and abs(plain - frugal) < 1e-4
