"""Training-speed benchmark on tiny shapes: records, FLOP counts, the peak, failures, bad input. No timing claims."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from labelsmart.bench import train_speed
from labelsmart.bench.cli import main as bench_main
from labelsmart.config import Config, TrainConfig

TINY = [
    "--set",
    "train.crop=64",
    "--set",
    "train.batch_size=2",
    "--seconds",
    "0.2",
    "--warmup",
    "1",
    "--peak-size",
    "256",
]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train_speed.RESULTS_NAME).read_text().splitlines()]


def test_two_variants_give_one_record_each_with_counts_speed_and_peak(tmp_path: Path):
    out = tmp_path / "speed"
    argv = ["bench", "train-speed", "--variants", "deeplabv3plus,deeplabv3plus-cl", "--in-process", "--out", str(out)]
    assert bench_main(argv + TINY) == 0
    records = _records(out)
    assert [r["variant"] for r in records] == ["deeplabv3plus", "deeplabv3plus-cl"]
    for r in records:
        assert r["error"] is None
        assert r["steps_per_s"] > 0 and r["steps_per_s_mean"] > 0 and r["steps"] >= train_speed.MIN_STEPS
        assert r["first_step_s"] > 0 and len(r["warmup_step_s"]) == 1
        assert r["flops_per_step"] > 0 and r["achieved_gflops"] > 0 and r["peak_share"] > 0
        assert r["peak_gflops"] > 0 and r["peak_dtype"] == "float32" and r["threads"] == 1
        assert (r["crop"], r["batch_size"], r["device"]) == (64, 2, "cpu")
        assert r["commit"] is not None and "cores" in r["cpu"] and r["date"].startswith("20")
    contiguous, channels_last = records
    assert (contiguous["memory_format"], channels_last["memory_format"]) == ("contiguous", "channels_last")
    assert contiguous["flops_per_step"] == channels_last["flops_per_step"]  # same arithmetic, another layout
    crop128 = Config(train=dataclasses.replace(TrainConfig(), crop=128, batch_size=2))
    assert train_speed.step_flops(crop128) > 3 * contiguous["flops_per_step"]  # 4x the pixels of crop 64
    table = (out / train_speed.TABLE_NAME).read_text()
    assert "deeplabv3plus-cl" in table and "% of peak" in table


def test_precision_variants_say_their_dtype_and_count_the_same_flops(tmp_path: Path):
    out = tmp_path / "speed"
    argv = ["bench", "train-speed", "--variants", "deeplabv3plus-fp32,deeplabv3plus-bf16", "--in-process"]
    assert bench_main(argv + ["--out", str(out)] + TINY) == 0
    fp32, bf16 = _records(out)
    assert (fp32["autocast"], bf16["autocast"]) == (None, "bfloat16")
    assert fp32["flops_per_step"] == bf16["flops_per_step"]  # the same arithmetic in another dtype
    assert fp32["steps_per_s"] > 0 and bf16["steps_per_s"] > 0 and bf16["peak_share"] > 0
    if bf16["peak_bfloat16_gflops"] is not None:  # a CPU with native bfloat16: the share is against its peak
        assert bf16["peak_share"] == pytest.approx(bf16["achieved_gflops"] / bf16["peak_bfloat16_gflops"], rel=1e-3)
    assert fp32["peak_share"] == pytest.approx(fp32["achieved_gflops"] / fp32["peak_float32_gflops"], rel=1e-3)
    table = (out / train_speed.TABLE_NAME).read_text()
    assert "| bfloat16 |" in table and "| float32 |" in table


def test_a_failing_variant_is_recorded_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "speed"
    argv = ["bench", "train-speed", "--variants", "deeplabv3plus,fpn", "--in-process", "--out", str(out)]
    assert bench_main(argv + TINY + ["--set", "model.encoder=no-such-encoder"]) == 1  # every variant failed
    records = _records(out)
    assert [r["variant"] for r in records] == ["deeplabv3plus", "fpn"]
    assert all(r["error"] and "\n" not in r["error"] and "steps_per_s" not in r for r in records)
    assert "2 variant(s) failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--variants", "deeplabv3plus,resnet-9000"], "--variants resnet-9000: unknown variant; use any of"),
        (["--seconds", "0"], "--seconds 0.0: give a positive number"),
        (["--set", "train.crop=100"], "crop 100 is not a multiple of 32"),
        (["--set", "model.arch=Unet"], "--set model.arch: set it with --variants"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str):
    assert bench_main(["bench", "train-speed", "--out", str(tmp_path / "o"), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.mark.slow
def test_a_variant_runs_in_its_own_spawned_process(tmp_path: Path):
    spec = train_speed.SpeedSpec(
        out=tmp_path / "speed",
        variants=("fpn",),
        seconds=0.2,
        warmup=1,
        overrides={"train.crop": "64", "train.batch_size": "2"},
        peak_size=128,
    )
    (record,) = train_speed.run_benchmark(spec)
    assert record["isolated"] and record["error"] is None and record["steps_per_s"] > 0
    assert record["arch"] == "FPN" and record["peak_rss_mb"] > 0


def test_all_names_every_variant_once():
    assert train_speed.parse_variants("all") == train_speed.DEFAULT_VARIANTS == tuple(train_speed.VARIANTS)
    assert train_speed.parse_variants(" fpn , unet ") == ("fpn", "unet")
    with pytest.raises(train_speed.SpeedError, match="named twice"):
        train_speed.parse_variants("fpn,fpn")
