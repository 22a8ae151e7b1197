"""Tiny-input model tests: shapes, projection head, checkpoint round trip, corrupt files."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from labelsmart.config import Config, ModelConfig
from labelsmart.training.model import CheckpointError, build_model, load_checkpoint, save_checkpoint

CLASSES = [{"id": 0, "name": "a", "color": [1, 2, 3]}, {"id": 1, "name": "b", "color": [4, 5, 6]}]


def test_default_model_shapes() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        emb = model.project(feats)
    assert logits.shape == (1, 3, 64, 64)
    assert feats.shape == (1, model.feature_channels, 16, 16)  # DeepLabV3+ decoder at 1/4 scale
    assert model.feature_channels == ModelConfig().decoder_channels
    assert emb.shape == (1, ModelConfig().proj_dim, 16, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1, 16, 16))


def test_unet_takes_a_tuple_of_decoder_widths() -> None:
    model = build_model(ModelConfig(arch="Unet", decoder_channels=32), 2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 96)).shape == (2, 2, 64, 96)
    assert model.feature_channels == 8  # last Unet block: 32 // 4


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = Config(model=ModelConfig(decoder_channels=64, proj_dim=32))
    model = build_model(cfg.model, 2).eval()
    path = tmp_path / "v0001" / "model.pt"
    path.parent.mkdir()
    save_checkpoint(path, model, cfg, CLASSES, version=1, step=7, metrics={"val_miou": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training
    assert ckpt["classes"] == CLASSES and ckpt["num_classes"] == 2
    assert ckpt["version"] == 1 and ckpt["step"] == 7 and ckpt["metrics"] == {"val_miou": 0.5}
    assert ckpt["model"] == dataclasses.asdict(cfg.model)
    assert ckpt["preprocess"]["max_side"] == cfg.preprocess.max_side
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.project(loaded.forward_features(x)), model.project(model.forward_features(x)))


def test_corrupt_or_foreign_checkpoint_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.pt"):
        load_checkpoint(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(CheckpointError, match="not a labelsmart checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_encoder_weights_from_a_local_file(tmp_path: Path) -> None:
    src = build_model(ModelConfig(decoder_channels=32), 2)
    weights = tmp_path / "encoder.pth"
    torch.save(src.net.encoder.state_dict(), weights)
    model = build_model(ModelConfig(decoder_channels=32, encoder_weights=str(weights)), 2)
    for k, v in src.net.encoder.state_dict().items():
        torch.testing.assert_close(model.net.encoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        build_model(ModelConfig(encoder_weights="imagenet"), 2)


def test_test_time_averaging_is_mirror_equivariant_and_plain_is_the_predictors_pass() -> None:
    """predict_mask with ``flip`` gives a mirrored image the mirrored mask (a plain pass need not); with several
    scales too; the plain pass is the argmax of the logits at the one working scale."""
    from labelsmart import imageio
    from labelsmart.config import ModelConfig, PreprocessConfig
    from labelsmart.training.model import build_model
    from labelsmart.training.validation import predict_mask

    torch.manual_seed(0)
    # a random ResNet-18 net gives a mask of several classes here (a random ResNet-10-T one a single class, which
    # every mirror equals, so the test would prove nothing)
    model = build_model(ModelConfig(encoder="resnet18", decoder_channels=16), num_classes=3).eval()
    pp = PreprocessConfig(max_side=96)
    cpu = torch.device("cpu")
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)  # not a multiple of 32
    mirror = np.ascontiguousarray(image[:, ::-1])
    plain = predict_mask(model, image, pp, cpu)
    x, meta = imageio.prepare(image, pp)
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)[None])[0].numpy()
    assert np.array_equal(plain, imageio.logits_to_mask(logits, meta)[0])
    assert len(np.unique(plain)) > 1  # not one class everywhere, so mirror equivariance is not trivial
    assert not np.array_equal(predict_mask(model, mirror, pp, cpu), plain[:, ::-1])  # a random net is not symmetric
    for scales in ((1.0,), (0.75, 1.0, 1.25)):
        averaged = predict_mask(model, image, pp, cpu, scales, flip=True)
        assert averaged.shape == image.shape[:2] and averaged.dtype == np.uint8
        assert np.array_equal(predict_mask(model, mirror, pp, cpu, scales, flip=True), averaged[:, ::-1])
    with pytest.raises(ValueError, match="scales is empty"):
        predict_mask(model, image, pp, cpu, (), flip=False)
