"""One fit -> checkpoint -> ONNX export on a tiny synthetic project; time budget, cancel and failed exports."""

import json
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import scribbles, synth_scene

from labelsmart import config
from labelsmart.project import open_project
from labelsmart.store import Store
from labelsmart.training import export
from labelsmart.training.data import LabelledSet
from labelsmart.training.export import ExportError, export_onnx
from labelsmart.training.losses import class_weights
from labelsmart.training.model import build_model, load_checkpoint, save_checkpoint
from labelsmart.training.round import (
    FINETUNE,
    Budget,
    RoundCancelled,
    RoundResult,
    adamw,
    network_and_optimiser,
    run_round,
    split_validation,
)
from labelsmart.training.trainer import load_snapshot, round_data, unlabelled_images


@pytest.fixture
def project(tmp_path: Path) -> tuple[config.Config, Store]:
    data = tmp_path / "scenes"
    data.mkdir()
    masks = {}
    for i in range(6):
        img, mask = synth_scene(i)
        cv2.imwrite(str(data / f"s{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        masks[f"s{i}.png"] = mask
    cfg = config.load(
        {
            "dataset": str(data),
            "workdir": str(tmp_path / "work"),
            "models_dir": str(tmp_path / "models"),
            "train.steps": 30,
            "train.pretrain_fraction": 0.3,  # these tests exercise both stages; the default has none
            "train.crop": 64,
            "train.batch_size": 2,
            "train.threads": 1,
            "train.val_min_images": 5,
            "train.val_every": 3,
            "preprocess.max_side": 128,
        },
        env={},
    )
    store = open_project(cfg)
    for name, color in (("sky", (128, 128, 255)), ("ground", (80, 80, 80)), ("box", (255, 0, 0))):
        store.add_class(name, color)
    for row in store.images():
        store.save_label(row.id, scribbles(masks[row.path], width=2))
    return cfg, store


def train_round(cfg: config.Config, store: Store, version: int, out_dir: Path, **kw) -> tuple[RoundResult, Path]:
    """A round on the store's current labels, as the trainer runs it, and its checkpoint saved in ``out_dir``."""
    result = run_round(cfg, round_data(store, store.snapshot(), cfg.train), version, **kw)
    return result, result.save(out_dir / "model.pt")


def test_round_then_export_then_failed_export_leaves_nothing(project, tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    events: list[dict] = []
    out_dir = tmp_path / "models" / "v0001"
    result, checkpoint = train_round(cfg, store, 1, out_dir, progress=events.append)

    assert isinstance(result, RoundResult)
    assert checkpoint == out_dir / "model.pt" and checkpoint.is_file()
    assert result.steps == 30 and result.device == "cpu" and result.version == 1
    m = result.metrics
    assert m["train_images"] == 4 and m["val_images"] == 2  # ids at positions 2 and 5 held out
    assert m["pretrain_steps"] == 9 and m["finetune_steps"] == 21
    assert np.isfinite(m["train_loss"]) and np.isfinite(m["contrastive_loss"])
    assert 0.0 <= m["val_miou"] <= 1.0 and 0.0 <= m["val_pixel_acc"] <= 1.0
    assert set(m["val_per_class_iou"]) == {0, 1, 2}
    stages = [e["stage"] for e in events]
    assert stages[0] == "pretraining" and "fine-tuning" in stages and stages[-1] == "validating"
    assert set(events[0]) == {"stage", "step", "total", "loss", "eta_s", "device"}
    assert events[-1]["total"] == 30

    model, ckpt = load_checkpoint(checkpoint)
    assert (
        ckpt["version"] == 1 and ckpt["step"] == 30 and [c["name"] for c in ckpt["classes"]] == ["sky", "ground", "box"]
    )

    onnx_path = tmp_path / "exports" / "m.onnx"
    sidecar = export_onnx(checkpoint, onnx_path).to_json()
    assert onnx_path.is_file() and onnx_path.with_suffix(".json").is_file()
    assert json.loads(onnx_path.with_suffix(".json").read_text())["version"] == 1
    assert sidecar["format"] == "labelsmart-onnx/1" and sidecar["num_classes"] == 3
    assert sidecar["input_name"] == "image" and sidecar["output_name"] == "logits"
    assert 0.0 <= sidecar["parity_max_abs_diff"] < 1e-3
    assert sidecar["metrics"]["val_images"] == 2 and sidecar["max_side"] == 128
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["m.json", "m.onnx"]

    # the exported model takes any batch and size, and agrees with PyTorch on a new one
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 128, 160)
    with torch.no_grad():
        ref = model(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (3, 3, 128, 160)
    np.testing.assert_allclose(got, ref, atol=1e-3)

    # a model whose ONNX output does not match PyTorch is refused and leaves nothing behind
    monkeypatch.setattr(export, "PARITY_RTOL", -1.0)
    bad = tmp_path / "bad" / "m.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(checkpoint, bad)
    assert list(bad.parent.iterdir()) == []


def test_export_takes_the_torchscript_exporter_and_falls_back_to_dynamo_where_it_is_gone(
    project, tmp_path: Path, monkeypatch
) -> None:
    torch.set_num_threads(1)
    cfg, _ = project
    classes = [{"id": i, "name": n, "color": [i, i, i]} for i, n in enumerate(["sky", "ground", "box"])]
    checkpoint = tmp_path / "v1" / "model.pt"
    checkpoint.parent.mkdir()
    torch.manual_seed(0)
    save_checkpoint(checkpoint, build_model(cfg.model, 3), cfg, classes, version=1, step=0, metrics={})
    model, _ = load_checkpoint(checkpoint)
    x = torch.rand(2, 3, 96, 128)  # another batch and size than the export's example
    with torch.no_grad():
        ref = model(x).numpy()

    def serves(path: Path) -> None:
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
        assert got.shape == (2, 3, 96, 128)
        np.testing.assert_allclose(got, ref, atol=1e-3)

    first = tmp_path / "ts" / "m.onnx"
    assert export_onnx(checkpoint, first).details["exporter"] == "torchscript"
    serves(first)

    # a PyTorch release without the deprecated TorchScript exporter: the dynamo exporter writes the same model
    def gone(*args, **kwargs):
        raise RuntimeError("the TorchScript-based ONNX exporter was removed")

    monkeypatch.setattr(export, "export_torchscript", gone)
    second = tmp_path / "dynamo" / "m.onnx"
    sidecar = export_onnx(checkpoint, second)
    assert sidecar.details["exporter"] == "dynamo" and sidecar.details["parity_max_abs_diff"] < 1e-3
    serves(second)
    assert sorted(p.name for p in second.parent.iterdir()) == ["m.json", "m.onnx"]


def test_time_budget_bounds_the_round_and_cancel_stops_it(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    cfg = config.load({**_args(cfg), "train.max_round_seconds": 3.0}, env={})
    t0 = time.monotonic()
    result, _ = train_round(cfg, store, 2, tmp_path / "v2", steps=100_000)
    took = time.monotonic() - t0
    assert took < 15.0, f"a 3 s round took {took:.1f} s"  # 3.5 s on a quiet machine; margin for a busy one
    assert 2 <= result.steps < 100_000
    assert result.metrics["pretrain_steps"] >= 1 and result.metrics["finetune_steps"] >= 1

    polls = []
    with pytest.raises(RoundCancelled):
        train_round(
            cfg,
            store,
            3,
            tmp_path / "v3",
            steps=50,
            should_stop=lambda: polls.append(1) or len(polls) > 2,
        )
    assert len(polls) == 3 and not (tmp_path / "v3" / "model.pt").exists()


def test_warm_start_survives_a_new_class(project, tmp_path: Path, caplog) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    _, first = train_round(cfg, store, 1, tmp_path / "v1", steps=2)
    store.add_class("extra")
    caplog.set_level("INFO", logger="labelsmart.training.round")
    _, second = train_round(cfg, store, 2, tmp_path / "v2", init_checkpoint=first, steps=2)
    assert "class head reset: 3 -> 4 classes" in caplog.text
    model, ckpt = load_checkpoint(second)
    assert ckpt["num_classes"] == 4
    prev, _ = load_checkpoint(first)
    # same-class warm start: the third round starts from the second's weights exactly (lr 0 keeps them)
    cfg0 = config.load({**_args(cfg), "train.lr": 0.0}, env={})
    _, third = train_round(cfg0, store, 3, tmp_path / "v3", init_checkpoint=second, steps=1)
    again, _ = load_checkpoint(third)
    key = next(k for k in model.state_dict() if k.startswith("net.encoder.") and k.endswith(".weight"))  # 1st conv
    torch.testing.assert_close(again.state_dict()[key], model.state_dict()[key])
    assert not torch.equal(prev.state_dict()[key], load_checkpoint(tmp_path / "v2" / "model.pt")[0].state_dict()[key])


def _args(cfg: config.Config) -> dict:
    return {
        "dataset": str(cfg.dataset),
        "workdir": str(cfg.workdir),
        "models_dir": str(cfg.models_dir),
        "train.steps": cfg.train.steps,
        "train.pretrain_fraction": cfg.train.pretrain_fraction,
        "train.crop": cfg.train.crop,
        "train.batch_size": cfg.train.batch_size,
        "train.threads": 1,
        "train.val_min_images": cfg.train.val_min_images,
        "train.val_every": cfg.train.val_every,
        "preprocess.max_side": cfg.preprocess.max_side,
    }


def test_joint_objective_trains_ce_and_contrastive_in_one_stage(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    joint = config.load({**_args(cfg), "train.pretrain_fraction": 0.0, "train.contrastive_weight": 0.5}, env={})
    result, checkpoint = train_round(joint, store, 1, tmp_path / "v1", steps=3)
    m = result.metrics
    assert result.steps == 3 and m["pretrain_steps"] == 0 and m["finetune_steps"] == 3
    assert np.isfinite(m["train_loss"]) and m["contrastive_loss"] is None  # no separate contrastive stage
    model, _ = load_checkpoint(checkpoint)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_semi_supervised_objective_takes_pseudo_labels_from_unlabelled_images_only(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    labelled = {row.id for row in store.images()}
    assert unlabelled_images(store, labelled, 10, 0) == []  # every image labelled: nothing to draw from
    for i in (6, 7, 8):
        img, _ = synth_scene(i)
        cv2.imwrite(str(Path(cfg.dataset) / f"u{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    store.sync_images()
    new = [row for row in store.images() if row.id not in labelled]
    assert len(new) == 3
    drawn = unlabelled_images(store, labelled, 2, 0)
    assert len(drawn) == 2 and all(any(np.array_equal(d, store.read_image(r.id)) for r in new) for d in drawn)

    def semi(threshold: float) -> dict:
        args = {
            **_args(cfg),
            "train.pretrain_fraction": 0.0,
            "train.pseudo_weight": 0.5,
            "train.pseudo_threshold": threshold,
            "train.pseudo_after": 0.5,
        }
        result, _ = train_round(config.load(args, env={}), store, 1, tmp_path / f"t{threshold}", steps=4)
        return result.metrics

    every = semi(0.0)  # every pixel of an unlabelled crop is confident enough
    assert every["pseudo_steps"] == 2 and every["finetune_steps"] == 4  # half the steps are the CE warm-up
    assert every["pseudo_confident_share"] == pytest.approx(1.0)
    assert np.isfinite(every["train_loss"])
    none = semi(1.01)  # no probability reaches it: labelled pixels alone in the contrastive loss
    assert none["pseudo_steps"] == 2 and none["pseudo_confident_share"] == 0.0 and np.isfinite(none["train_loss"])


def test_self_training_round_learns_from_unlabelled_images_with_a_mean_teacher(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    for i in (6, 7):
        img, _ = synth_scene(i)
        cv2.imwrite(str(Path(cfg.dataset) / f"u{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    store.sync_images()
    args = {**_args(cfg), "train.pretrain_fraction": 0.0, "train.unlabelled_weight": 1.0, "train.pseudo_after": 0.5}

    def run(extra: dict, name: str) -> dict:
        result, checkpoint = train_round(config.load({**args, **extra}, env={}), store, 1, tmp_path / name, steps=4)
        model, _ = load_checkpoint(checkpoint)  # the student is what a round saves and publishes
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        return result.metrics

    every = run({"train.teacher_ema": 0.9, "train.pseudo_threshold": 0.0}, "mean-teacher")
    assert every["pseudo_steps"] == 2 and every["finetune_steps"] == 4  # half the steps are the CE warm-up
    assert every["pseudo_confident_share"] == pytest.approx(1.0) and np.isfinite(every["train_loss"])
    none = run({"train.pseudo_threshold": 1.01, "train.pseudo_min_threshold": 1.01}, "none")
    assert none["pseudo_steps"] == 2 and none["pseudo_confident_share"] == 0.0
    with pytest.raises(ValueError, match="pick one way"):
        run({"train.pseudo_weight": 0.5}, "both")


def test_class_balanced_round_weighs_the_rare_class_up(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    balanced = config.load({**_args(cfg), "train.pretrain_fraction": 0.0, "train.class_balance": 1.0}, env={})
    result, _ = train_round(balanced, store, 1, tmp_path / "v1", steps=3)
    weights = np.array(result.metrics["class_weights"])
    ids = [image_id for image_id, _ in store.snapshot().revisions]
    train_ids, _ = split_validation(ids, balanced.train)  # the round counts its training images only
    pairs = dict(zip(ids, load_snapshot(store, store.snapshot()), strict=True))
    counts = LabelledSet([pairs[i] for i in train_ids], balanced).class_counts(3)
    assert counts.min() > 0 and counts.max() > 2 * counts.min()  # the classes are unbalanced
    np.testing.assert_allclose(weights, class_weights(counts, 1.0), rtol=1e-4)
    assert int(np.argmax(weights)) == int(np.argmin(counts)) and int(np.argmin(weights)) == int(np.argmax(counts))
    plain_cfg = config.load({**_args(cfg), "train.pretrain_fraction": 0.0, "train.class_balance": 0.0}, env={})
    plain, _ = train_round(plain_cfg, store, 1, tmp_path / "v2", steps=1)
    assert "class_weights" not in plain.metrics


def test_a_loss_that_becomes_nan_fails_the_round_and_publishes_nothing(tiny_cfg, monkeypatch) -> None:
    """A NaN loss stops the round at that step with a sentence; the version is failed, the one before serves."""
    from labelsmart.training import round as training_round
    from labelsmart.training.trainer import run_one_round

    store = open_project(tiny_cfg)
    img = store.images()[0]
    mask = np.full((img.height, img.width), 255, np.uint8)
    mask[:5], mask[-5:] = 0, 1
    store.save_label(img.id, mask)
    first = run_one_round(tiny_cfg, store, steps=2)
    real = training_round.finetune_step
    calls = []

    def poisoned(ctx, batch):
        calls.append(1)
        loss = real(ctx, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training_round, "finetune_step", poisoned)
    with pytest.raises(training_round.RoundFailed, match=r"fine-tuning loss became nan at step 2; nothing was saved"):
        run_one_round(tiny_cfg, store, steps=5)
    assert len(calls) == 2  # stopped at the step that went wrong
    rows = {m.version: m for m in store.models()}
    assert rows[2].status == "failed" and "became nan" in rows[2].error
    assert store.latest_published().version == first.version == 1
    assert not list(first.folder.parent.glob(".*.tmp"))


def test_a_capped_plan_shrinks_for_a_slow_stretch_and_grows_back_after_it() -> None:
    budget = Budget(1000, 0.0, 100.0, 0.0, time.monotonic())
    for _ in range(5):  # 1 s a step: 1000 steps would take 1000 s of a 100 s cap
        budget.record(FINETUNE, 1.0, 1.0)
    shrunk = budget.planned[FINETUNE]
    assert 5 < shrunk < 100  # fits about 95 s at 1 s a step
    for _ in range(40):  # then 0.01 s a step: the recent median says there is time for all of them again
        budget.record(FINETUNE, 1.0, 0.01)
    assert budget.planned[FINETUNE] == 1000  # back to what was asked, never more
    budget.record(FINETUNE, 1.0, 0.01)
    assert budget.planned[FINETUNE] == 1000
    for _ in range(40):  # slow again: shrinks again
        budget.record(FINETUNE, 1.0, 1.0)
    assert budget.planned[FINETUNE] < 200


def test_an_uncapped_plan_keeps_its_steps() -> None:
    budget = Budget(50, 0.0, 0.0, 0.0, time.monotonic())
    for _ in range(10):
        budget.record(FINETUNE, 1.0, 5.0)
    assert budget.planned[FINETUNE] == 50


@pytest.mark.parametrize(
    ("precision", "has_bf16", "want"),
    [
        ("fp32", True, None),
        ("bf16", False, torch.bfloat16),
        ("auto", True, torch.bfloat16),
        ("auto", False, None),
    ],
)
def test_precision_picks_the_autocast_dtype_of_the_step(tiny_cfg, monkeypatch, precision, has_bf16, want) -> None:
    from labelsmart.training import round as training_round

    monkeypatch.setattr(training_round, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    assert training_round.autocast_dtype(precision, cpu) == want
    cfg = config.load({**_args(tiny_cfg), "train.precision": precision}, env={})
    ctx, _ = training_round.network_and_optimiser(cfg, 3, cpu)
    with ctx.autocast:
        logits = ctx.model(torch.rand(2, 3, 64, 64))
    assert logits.dtype == (want or torch.float32)  # the forward pass runs in the dtype picked
    assert all(p.dtype == torch.float32 for p in ctx.model.parameters())  # the weights stay float32


def test_the_optimiser_is_a_fused_adamw_that_steps_as_the_plain_one_and_falls_back_to_it(tiny_cfg, monkeypatch) -> None:
    tc = tiny_cfg.train
    _, optimizer = network_and_optimiser(tiny_cfg, 3, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == tc.lr and optimizer.defaults["weight_decay"] == tc.weight_decay

    torch.manual_seed(0)
    nets = [torch.nn.Conv2d(3, 4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    grads = [torch.randn_like(p) for p in nets[0].parameters()]
    plain_real = torch.optim.AdamW
    steppers = [
        adamw(nets[0].parameters(), tc),
        plain_real(nets[1].parameters(), lr=tc.lr, weight_decay=tc.weight_decay),
    ]
    for _ in range(3):
        for net, opt in zip(nets, steppers, strict=True):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), start, strict=True):
        assert (a - a0).abs().min() > 0  # every weight moved, and both optimisers moved it alike
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    def without_fused(params, **kw):  # a device without a fused kernel
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return plain_real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused)
    fallback = adamw(nets[0].parameters(), tc, lr=0.5)
    assert isinstance(fallback, plain_real) and not fallback.defaults["fused"] and fallback.defaults["lr"] == 0.5


def test_auto_precision_is_bf16_on_cuda_and_a_bad_value_is_one_sentence(monkeypatch) -> None:
    from labelsmart.training import round as training_round

    monkeypatch.setattr(training_round, "cpu_has_bf16", lambda: False)
    assert training_round.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match=r"train.precision is 'fp16'; set LABELSMART_TRAIN_PRECISION to one of"):
        training_round.autocast_dtype("fp16", torch.device("cpu"))


def test_a_bf16_round_trains_and_saves_float32_weights(project, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, store = project
    bf16 = config.load({**_args(cfg), "train.pretrain_fraction": 0.0, "train.precision": "bf16"}, env={})
    result, checkpoint = train_round(bf16, store, 1, tmp_path / "v1", steps=3)
    assert result.steps == 3 and np.isfinite(result.metrics["train_loss"])
    model, _ = load_checkpoint(checkpoint)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.rand(1, 3, 64, 64)).dtype == torch.float32  # served in float32, as exported
