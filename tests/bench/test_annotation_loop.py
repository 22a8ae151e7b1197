"""The annotation loop benchmark on tiny synthetic data: real store, trainer process and predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from labelsmart import cli
from labelsmart.bench import annotation_loop as loop
from labelsmart.bench.cli import main as bench_main

FAST = {
    "train.steps": 10,
    "train.first_round_steps": 10,
    "train.crop": 64,
    "train.batch_size": 2,
    "train.threads": 1,
    "preprocess.max_side": 128,
    "serve.threads": 1,
    "trigger.min_interval_s": 0,
    "trigger.min_new_pixels": 50,
    "trigger.poll_s": 0.2,
}


def test_labels_scribble_and_correct():
    gt = np.zeros((40, 40), np.uint8)
    gt[20:] = 1
    gt[:2] = 255
    pred = np.zeros_like(gt)  # wrong on the bottom half
    mask, changed = loop.labels_for("correct", gt, pred)
    assert changed == 800 and (mask[2:] == gt[2:]).all() and (mask[:2] == 255).all()
    assert loop.labels_for("correct", gt, None)[1] == 38 * 40  # no model: every known pixel is painted
    scrib, n = loop.labels_for("scribble", gt, pred)
    assert 0 < n < 0.5 * gt.size and set(np.unique(scrib)) <= {0, 1, 255}
    s = loop.image_scores(gt, pred, 2)
    assert s["pixel_acc"] == pytest.approx(18 * 40 / (38 * 40)) and s["change_fraction"] == pytest.approx(0.5263, 1e-3)


def test_loop_runs_the_real_trainer_and_writes_results(tiny_dataset: Path, tmp_path: Path):
    settings = loop.LoopSettings(
        pool=tiny_dataset,
        eval_dir=tiny_dataset,
        eval_splits=("val",),
        out=tmp_path / "out",
        workdir=tmp_path / "work",
        pool_split="train",
        images=2,
        order="suggested",
        seconds_per_image=0.0,
        wait_model_s=240.0,  # a patient annotator: the next image waits for a model trained on this one
        eval_threads=1,
        overrides=FAST,
        rf_every=1,
        tag="cont",
    )
    summary = loop.run_loop(settings)
    lines = [
        json.loads(x) for x in (tmp_path / "out" / "cont-suggested-scribble" / "loop.jsonl").read_text().splitlines()
    ]
    recs, last = lines[:-1], lines[-1]
    assert last == json.loads(json.dumps(summary)) and last["summary"] and last["order"] == "suggested"
    assert [r["k"] for r in recs] == [1, 2] and len({r["image"] for r in recs}) == 2
    for key in ("image", "preannotation_miou", "preannotation_pixel_acc", "model_version", "seconds_since_first_save"):
        assert all(key in r for r in recs)
    assert recs[0]["model_version"] is None and recs[0]["preannotation_miou"] is None
    assert recs[1]["model_version"] >= 1 and 0.0 <= recs[1]["preannotation_miou"] <= 1.0
    assert recs[1]["show_cached_ms"] is not None and recs[0]["save_to_new_model_s"] is not None
    assert last["time_to_first_prediction_s"] > 0 and last["save_to_new_model_s_median"] > 0
    assert last["versions"] and all(0.0 <= v["eval"]["val"]["miou"] <= 1.0 for v in last["versions"])
    assert "suggested" in recs[1]  # what Next offered (the list order until a model has scored the images)
    assert [r["k"] for r in last["rf"]] == [1, 2]  # the random forest on the strokes of images 1..k
    assert all(0.0 <= r["rf"]["val"]["miou"] <= 1.0 for r in last["rf"]) and last["rf"][1]["served"]
    md = (tmp_path / "out" / "loop.md").read_text()
    assert (
        "cont-suggested-scribble" in md
        and "rf on the same strokes" in md
        and (tmp_path / "out" / "loop.png").stat().st_size > 1000
    )


def test_bench_loop_refuses_a_wrong_folder_in_one_sentence(tmp_path: Path, capsys):
    code = bench_main(["bench", "loop", "--pool", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_FAILED and len(err) == 1
    assert err[0].startswith("error: ") and "nope/images is missing; pass --pool a folder" in err[0]
    code = bench_main(["bench", "loop", "--pool", str(tmp_path), "--order", "random", "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_FAILED and "--order random" in capsys.readouterr().err
