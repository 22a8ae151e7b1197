"""Config: defaults, environment, flags (flags win), project paths."""

from __future__ import annotations

from pathlib import Path

from labelsmart import config


def test_flags_beat_environment_beat_defaults(tmp_path: Path):
    env = {"LABELSMART_TRAIN_STEPS": "7", "LABELSMART_TRIGGER_MIN_INTERVAL_S": "2.5", "LABELSMART_PORT": "9000"}
    cfg = config.load({"dataset": str(tmp_path)}, env=env)
    assert cfg.train.steps == 7 and cfg.trigger.min_interval_s == 2.5 and cfg.port == 9000
    cfg = config.load({"dataset": str(tmp_path), "steps": 3, "minutes": 1.5}, env=env)
    assert cfg.train.steps == 3 and cfg.train.max_round_seconds == 90.0
    assert config.load(env={}).train.steps == config.TrainConfig().steps


def test_shared_layout_and_workdir(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "classes.json").write_text('["a", "b"]')
    cfg = config.load({"dataset": str(tmp_path)}, env={})
    assert cfg.image_root == tmp_path / "images"
    assert cfg.classes_file == tmp_path / "classes.json"
    assert cfg.workdir == tmp_path / ".labelsmart"
    assert cfg.project.startswith(tmp_path.name + "-")


def test_read_only_dataset_gets_a_per_user_workdir(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:  # the mode bits decide, even for root (which could write anyway): a shared data set stays untouched
        cfg = config.load({"dataset": str(ro)}, env={"XDG_DATA_HOME": str(tmp_path / "x")})
        assert cfg.workdir == tmp_path / "x" / "labelsmart" / "projects" / cfg.project
    finally:
        ro.chmod(0o755)
