"""Label-efficiency benchmark on tiny synthetic data: subset, scribbles, rows, resume, outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset

from labelsmart.bench import label_efficiency as labeleff
from labelsmart.bench.cli import main as bench_main
from labelsmart.bench.label_efficiency import BenchSpec, Cell
from labelsmart.config import TrainConfig

NET_SETTINGS = {"train.crop": 64, "train.batch_size": 2, "preprocess.max_side": 128}
KEYS = {
    "row",
    "n_labeled",
    "labels",
    "miou",
    "per_class_iou",
    "pixel_acc",
    "labelled_pixels",
    "train_seconds",
    "steps",
    "peak_rss_mb",
    "device",
    "commit",
    "eval_split",
    "cell",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 toy scenes: train = frame_000..003, val = frame_004..007, val_b = frame_006..007."""
    root = write_dataset(tmp_path_factory.mktemp("le") / "data", n=8)
    splits = json.loads((root / "splits.json").read_text())
    splits["val_b"] = splits["val"][2:]
    (root / "splits.json").write_text(json.dumps(splits))
    return root


def test_subset_is_sorted_then_permuted_with_seed_0_and_nested():
    names = [f"img_{i:02d}" for i in range(30)]
    shuffled = list(reversed(names))
    perm = np.random.default_rng(0).permutation(30)
    assert labeleff.select_subset(shuffled, 5) == [names[i] for i in perm[:5]]
    assert labeleff.select_subset(names, 5) == labeleff.select_subset(shuffled, 5)
    assert labeleff.select_subset(names, 20)[:5] == labeleff.select_subset(names, 5)  # N=5 within N=20
    with pytest.raises(labeleff.BenchError, match="only 30 images"):
        labeleff.select_subset(names, 31)


HAND_MADE = """
........................................
........................................
.....111111111111111111111111111111.....
.....111111111111111111111111111111.....
.....11111111111111111111111111111......
........................................
"""


def test_scribble_labels_match_a_hand_made_example():
    mask = np.full((6, 40), 255, np.uint8)
    mask[2:5, 5:35] = 1  # 3 x 30 = 90 px bar: the 7x7 erosion leaves nothing, so the bar itself is thinned
    mask[0:2, 0:30] = 2  # 60 px: under 64 px, no stroke
    # The skeleton is the centre row, x 6..33, whose last pixel skimage's thinning moves one row down; the 3x3
    # dilation, clipped to the bar, covers the bar except its bottom-right corner.
    rows = HAND_MADE.strip().splitlines()
    expected = np.array([[255 if ch == "." else int(ch) for ch in row] for row in rows], np.uint8)
    out = labeleff.make_labels(mask, "scribble")
    assert np.array_equal(out, expected)
    assert np.array_equal(labeleff.make_labels(mask, "dense"), mask)
    with pytest.raises(labeleff.BenchError, match="unknown label form"):
        labeleff.make_labels(mask, "polygons")


def _spec(data: Path, out: Path, **kw) -> BenchSpec:
    base = dict(pool=data, eval=data, out=out, n_labeled=(2,), labels=("dense", "scribble"), threads=1, isolate=False)
    base.update(kw)
    return BenchSpec(**base)


def test_rf_row_runs_writes_all_outputs_and_resumes(data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    records = labeleff.run_benchmark(_spec(data, out, rows=("rf",), eval_splits=("val", "val_b")))
    assert len(records) == 4  # 2 label forms x 2 evaluation splits
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for r in lines:
        assert KEYS <= set(r)
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_acc"] <= 1.0
        assert set(r["per_class_iou"]) == {"sky", "road", "car"}
        assert r["row"] == "rf" and r["n_labeled"] == 2 and r["steps"] is None and r["peak_rss_mb"] > 0
        assert r["images"] == labeleff.select_subset(["frame_000", "frame_001", "frame_002", "frame_003"], 2)
    dense = [r for r in lines if r["labels"] == "dense" and r["eval_split"] == "val"][0]
    scrib = [r for r in lines if r["labels"] == "scribble" and r["eval_split"] == "val"][0]
    assert dense["labelled_pixels"] == 2 * 96 * 128 and 0 < scrib["labelled_pixels"] < dense["labelled_pixels"]
    assert dense["miou"] > 0.8  # the toy scenes are easy for colour features
    table = (out / "table.md").read_text()
    assert "| rf | dense |" in table and "train → val" in table
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"

    # Resume: finished cells are not run again; a new N is.
    ran: list[str] = []
    real = labeleff.run_cell

    def spy(spec: BenchSpec, cell: Cell, splits: list[str]):
        ran.append(cell.key(spec))
        return real(spec, cell, splits)

    monkeypatch.setattr(labeleff, "run_cell", spy)
    labeleff.run_benchmark(_spec(data, out, rows=("rf",), eval_splits=("val", "val_b")))
    assert ran == []
    monkeypatch.chdir(data.parent)  # the same folders spelled relative to another working directory
    labeleff.run_benchmark(_spec(Path(data.name), out, rows=("rf",), eval_splits=("val", "val_b")))
    assert ran == []
    labeleff.run_benchmark(_spec(data, out, rows=("rf",), eval_splits=("val",), n_labeled=(2, 3), labels=("dense",)))
    assert ran == ["rf|dense|n3|train|seed0"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    # A run given a relative folder returns its records (they hold the folder as it was spelled).
    fresh = labeleff.run_benchmark(_spec(Path(data.name), tmp_path / "rel", rows=("rf",), labels=("dense",)))
    assert [r["eval"] for r in fresh] == [data.name]


def test_net_rows_train_through_run_round(data: Path, tmp_path: Path, monkeypatch):
    from labelsmart.training import round as training_round

    seen: list[tuple[float, int]] = []
    real = training_round.run_round

    def spy(cfg, data, version, **kw):
        assert len(data.train) == 2 and len(data.unlabelled()) == 2  # N labelled, the rest of the pool split at hand
        seen.append((cfg.train.pretrain_fraction, kw["steps"], cfg.train.class_balance))
        return real(cfg, data, version, **kw)

    monkeypatch.setattr(training_round, "run_round", spy)
    rows = ("labelsmart", "ce-only", "contrastive")
    spec = _spec(data, tmp_path / "out", rows=rows, labels=("scribble",), steps=4, overrides=NET_SETTINGS)
    records = labeleff.run_benchmark(spec)
    assert [r["row"] for r in records] == list(rows)
    assert [s[1] for s in seen] == [4, 4, 4]  # same steps for every row
    # labelsmart trains with the shipped split, ce-only with none, contrastive with the paper's whatever ships
    assert [s[0] for s in seen] == [TrainConfig().pretrain_fraction, 0.0, labeleff.PAPER_PRETRAIN_FRACTION]
    # ce-only is plain cross-entropy; the others keep the shipped class balancing
    assert [s[2] for s in seen] == [TrainConfig().class_balance, 0.0, TrainConfig().class_balance]
    assert TrainConfig().class_balance > 0
    lab, ce, con = records
    assert ce["pretrain_steps"] == 0 and con["pretrain_steps"] == round(4 * labeleff.PAPER_PRETRAIN_FRACTION) > 0
    assert lab["steps"] == ce["steps"] == con["steps"] == 4
    assert len(lab["class_weights"]) == 3 and ce.get("class_weights") is None
    assert lab["train_config"]["crop"] == 64 and lab["budget"] == "4 steps" and lab["device"] == "cpu"


def test_cli_runs_a_cell_in_its_own_process_and_refuses_bad_input(data: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    argv = ["bench", "label-efficiency", "--pool", str(data), "--eval-split", "val", "--n-labeled", "2"]
    assert bench_main([*argv, "--labels", "dense", "--rows", "rf", "--threads", "1", "--out", str(out)]) == 0
    rec = json.loads((out / "results.jsonl").read_text())
    assert rec["row"] == "rf" and rec["peak_rss_mb"] > 0
    assert "| rf | dense |" in capsys.readouterr().out

    assert bench_main(["bench", "label-efficiency", "--pool", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "nope: not a folder" in capsys.readouterr().err
    assert bench_main([*argv, "--rows", "svm", "--out", str(out)]) == 1
    assert "unknown row" in capsys.readouterr().err
    # The labelled images must never be evaluation images.
    assert bench_main([*argv[:-4], "--eval-split", "train", "--n-labeled", "2", "--out", str(out)]) == 1
    assert "pick disjoint splits" in capsys.readouterr().err


def test_rf_joins_the_net_budgets_of_its_own_splits_only():
    def rec(row: str, pool: str, budget: str) -> dict:
        return {"row": row, "eval_split": "val", "pool_split": pool, "budget": budget}

    records = [
        rec("ce-only", "train", "300 steps"),
        rec("ce-only", "train", "900 steps"),
        rec("rf", "train", "rf"),
        rec("rf", "train_b", "rf"),  # no network ran on this pool split
    ]
    groups = labeleff._groups(records)
    assert sorted(groups) == [("val", "train", "300 steps"), ("val", "train", "900 steps"), ("val", "train_b", "rf")]
    assert [r["row"] for r in groups[("val", "train", "900 steps")]] == ["ce-only", "rf"]
    assert [r["pool_split"] for r in groups[("val", "train_b", "rf")]] == ["train_b"]


def test_self_supervised_pretraining_runs_once_and_every_net_cell_starts_from_it(
    data: Path, tmp_path: Path, monkeypatch
):
    from labelsmart.training import pretrain
    from labelsmart.training import round as training_round

    pretrained: list[int] = []
    real_pretrain = pretrain.pretrain

    def spy_pretrain(cfg, images, num_classes, steps, *args, **kw):
        pretrained.append(len(images))
        return real_pretrain(cfg, images, num_classes, steps, *args, **kw)

    starts: list[Path | None] = []
    real_round = training_round.run_round

    def spy_round(cfg, data, version, **kw):
        starts.append(kw.get("init_checkpoint"))
        return real_round(cfg, data, version, **kw)

    monkeypatch.setattr(pretrain, "pretrain", spy_pretrain)
    monkeypatch.setattr(training_round, "run_round", spy_round)
    out = tmp_path / "out"
    spec = _spec(
        data, out, rows=("labelsmart", "ce-only"), labels=("scribble",), steps=2, ssl_steps=2, overrides=NET_SETTINGS
    )
    records = labeleff.run_benchmark(spec)
    assert pretrained == [4]  # once, on every image of the pool split (labelled or not)
    path = labeleff.ssl_checkpoint_path(spec)
    assert starts == [path, path] and path.is_file()
    assert all(r["ssl"]["steps"] == 2 and r["budget"] == "2 steps + ssl 2 steps" for r in records)
    assert "ssl2steps" in records[0]["cell"]
    # Another budget of fine-tuning reuses the pretraining; without ssl the cells are other cells, from scratch.
    labeleff.run_benchmark(dataclasses.replace(spec, steps=3))
    assert pretrained == [4] and len(starts) == 4
    labeleff.run_benchmark(dataclasses.replace(spec, ssl_steps=None))
    assert starts[-2:] == [None, None]
    with pytest.raises(labeleff.BenchError, match="--ssl-steps 0"):
        labeleff.run_benchmark(dataclasses.replace(spec, ssl_steps=0))


def test_ce_only_is_plain_cross_entropy_whatever_set_turned_on() -> None:
    on = TrainConfig(
        pretrain_fraction=0.3, contrastive_weight=1.0, pseudo_weight=1.0, unlabelled_weight=0.5, crf_weight=0.03
    )
    plain = labeleff.ce_only(on)
    assert (plain.pretrain_fraction, plain.contrastive_weight, plain.pseudo_weight) == (0.0, 0.0, 0.0)
    assert (plain.unlabelled_weight, plain.class_balance, plain.crf_weight) == (0.0, 0.0, 0.0)
    assert plain.steps == on.steps and plain.crop == on.crop  # the rest of the round is the same


def test_inference_modes_score_one_trained_network_several_ways(data: Path, tmp_path: Path, monkeypatch):
    from labelsmart.training import round as training_round

    trained: list[int] = []
    real = training_round.run_round

    def spy(cfg, data, version, **kw):
        trained.append(version)
        return real(cfg, data, version, **kw)

    monkeypatch.setattr(training_round, "run_round", spy)
    out = tmp_path / "out"
    spec = _spec(
        data, out, rows=("labelsmart", "rf"), labels=("scribble",), steps=2, overrides=NET_SETTINGS,
        eval_splits=("val", "val_b"), inference=("plain", "flip"),
    )  # fmt: skip
    records = labeleff.run_benchmark(spec)
    assert len(trained) == 1  # one network, scored twice on each split
    net = [(r["eval_split"], r["inference"]) for r in records if r["row"] == "labelsmart"]
    assert net == [("val", "plain"), ("val", "flip"), ("val_b", "plain"), ("val_b", "flip")]
    assert [r["inference"] for r in records if r["row"] == "rf"] == ["plain", "plain"]  # the forest has one way
    assert records[0]["cell"].endswith("|inference=plain+flip")
    table = (out / "table.md").read_text()
    assert "| labelsmart (flip) | scribble |" in table and "| labelsmart | scribble |" in table
    # the same cell scored the plain way only is another cell; an unknown mode is refused before anything trains
    plain = dataclasses.replace(spec, inference=("plain",))
    assert Cell("labelsmart", 2, "scribble").key(spec) != Cell("labelsmart", 2, "scribble").key(plain)
    with pytest.raises(labeleff.BenchError, match="--inference mirror: unknown mode"):
        labeleff.run_benchmark(dataclasses.replace(spec, inference=("mirror",)))
    assert len(trained) == 1
