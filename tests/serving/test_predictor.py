"""ONNX Runtime predictor: a hand-built ONNX model, the prediction cache, hot swap, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BLUE, GREEN, RED, write_toy_model

from labelsmart import config
from labelsmart.serving.onnx_model import OnnxModel, Prediction
from labelsmart.serving.predictor import Predictor
from labelsmart.serving.sidecar import load_sidecar
from labelsmart.store import Snapshot, Store


def three_colour_image(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Left half red, right top green, right bottom blue; and its class-id mask (identity model)."""
    img = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    img[:, : w // 2] = RED
    img[: h // 2, w // 2 :] = GREEN
    mask[: h // 2, w // 2 :] = 1
    img[h // 2 :, w // 2 :] = BLUE
    mask[h // 2 :, w // 2 :] = 2
    return img, mask


# ------------------------------------------------------------------------------------------------ OnnxModel


def test_load_sidecar_missing_and_corrupt(tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"m\.json: sidecar JSON missing; export the model"):
        load_sidecar(onnx_path)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m\.json: sidecar JSON is corrupt"):
        load_sidecar(onnx_path)
    (tmp_path / "m.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="lacks classes"):
        load_sidecar(onnx_path)


def test_onnx_model_predicts_argmax_colour(tmp_path: Path) -> None:
    model = OnnxModel(write_toy_model(tmp_path / "toy.onnx", version=7), threads=1, device="cpu")
    assert model.providers == ["CPUExecutionProvider"]
    assert model.version == 7 and model.num_classes == 3
    assert model.colors == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    img, want = three_colour_image()
    pred = model.predict(img)
    assert isinstance(pred, Prediction)
    assert pred.mask.dtype == np.uint8 and pred.mask.shape == (40, 60)
    assert pred.confidence.dtype == np.float32 and pred.confidence.shape == (40, 60)
    np.testing.assert_array_equal(pred.mask, want)
    assert 0.0 <= pred.confidence.min() and pred.confidence.max() <= 1.0
    assert pred.mean_confidence == pytest.approx(float(pred.confidence.mean()))
    assert pred.mean_confidence > 0.99  # logits 10 vs 0
    assert pred.version == 7
    assert not pred.mask.flags.writeable  # shared through the cache


def test_onnx_model_resizes_large_images_back(tmp_path: Path) -> None:
    model = OnnxModel(write_toy_model(tmp_path / "toy.onnx", max_side=32), threads=1, device="cpu")
    img, want = three_colour_image(120, 200)  # predicted at 19x32 (padded 24x32), mapped back to 120x200
    pred = model.predict(img)
    assert pred.mask.shape == (120, 200)
    assert (pred.mask == want).mean() > 0.95


def test_predict_batch_matches_single(tmp_path: Path) -> None:
    model = OnnxModel(write_toy_model(tmp_path / "toy.onnx"), threads=1, device="cpu")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (33, 57), (64, 16), (40, 60)]]
    batch = model.predict_batch(imgs)
    assert len(batch) == 4
    for img, got in zip(imgs, batch, strict=True):
        single = model.predict(img)
        np.testing.assert_array_equal(got.mask, single.mask)
        np.testing.assert_allclose(got.confidence, single.confidence, atol=1e-6)
    assert model.predict_batch([]) == []


def test_corrupt_onnx_is_one_sentence(tmp_path: Path) -> None:
    path = write_toy_model(tmp_path / "bad.onnx")
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=r"bad\.onnx: ONNX Runtime cannot load this model .*export it again") as ei:
        OnnxModel(path, threads=1, device="cpu")
    assert "\n" not in str(ei.value)
    with pytest.raises(FileNotFoundError, match="missing.onnx: model file not found"):
        OnnxModel(tmp_path / "missing.onnx", threads=1, device="cpu")


def test_sidecar_class_count_must_match_model(tmp_path: Path) -> None:
    path = write_toy_model(tmp_path / "toy.onnx")
    side = json.loads(path.with_suffix(".json").read_text())
    side["classes"] = side["classes"][:2]
    side["num_classes"] = 2
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="outputs 3 classes but its sidecar lists 2"):
        OnnxModel(path, threads=1, device="cpu")


def test_importing_and_predicting_does_not_import_torch(tmp_path: Path) -> None:
    path = write_toy_model(tmp_path / "toy.onnx")
    code = (
        "import sys, numpy as np\n"
        "import labelsmart.serving.predictor, labelsmart.serving.onnx_model, labelsmart.cli\n"
        f"m = labelsmart.serving.onnx_model.OnnxModel({str(path)!r}, threads=1, device='cpu')\n"
        "p = m.predict(np.zeros((20, 30, 3), np.uint8))\n"
        "assert p.mask.shape == (20, 30)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------ Predictor


def _publish(store: Store, models: Path, version: int, **kw: object) -> Path:
    folder = models / f"v{version:04d}"
    write_toy_model(folder / "model.onnx", version=version, **kw)  # type: ignore[arg-type]
    store.add_model(version, folder, Snapshot(0, (), 0))
    store.publish_model(version, {"miou": 0.5})
    return folder


@pytest.fixture
def project(tmp_path: Path) -> tuple[Store, config.Config, Path]:
    """A store with two images (a three-colour one and a blue one) and a config serving on one CPU thread."""
    images = tmp_path / "images"
    images.mkdir()
    img, _ = three_colour_image()
    cv2.imwrite(str(images / "a.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    blue = np.zeros((30, 30, 3), np.uint8)
    blue[:] = BLUE
    cv2.imwrite(str(images / "b.png"), cv2.cvtColor(blue, cv2.COLOR_RGB2BGR))
    cfg = config.load(
        {
            "dataset": str(images),
            "workdir": str(tmp_path / "work"),
            "models_dir": str(tmp_path / "m"),
            "serve.threads": 1,
            "serve.device": "cpu",
            "serve.cache_size": 4,
        },
        env={},
    )
    store = Store(cfg.db_path, image_root=cfg.image_root)
    assert store.sync_images() == 2
    return store, cfg, tmp_path / "m"


def test_predictor_without_model_returns_none(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, _ = project
    pred = Predictor(store, cfg)
    assert pred.version is None and pred.providers == []
    assert pred.predict(store.image_id_by_path("a.png")) is None
    assert pred.refresh() is False


def test_predictor_caches_in_memory_and_on_disk(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    predictor = Predictor(store, cfg)
    assert predictor.version == 1 and predictor.providers == ["CPUExecutionProvider"]
    a = store.image_id_by_path("a.png")
    first = predictor.predict(a)
    assert first is not None and first.version == 1
    np.testing.assert_array_equal(first.mask, three_colour_image()[1])
    assert predictor.predict(a) is first  # in-memory hit: the same arrays

    path = cfg.workdir / "predictions" / "v0001" / f"{a}.npz"
    assert path.is_file()
    assert store.prediction(a, 1) == (str(path), pytest.approx(first.mean_confidence))
    assert store.image(a).state == "pre-annotated"

    fresh = Predictor(store, cfg)  # empty memory cache: comes from disk
    again = fresh.predict(a)
    assert again is not None and again is not first
    np.testing.assert_array_equal(again.mask, first.mask)
    np.testing.assert_allclose(again.confidence, first.confidence, atol=1 / 65535)
    assert again.mean_confidence == pytest.approx(first.mean_confidence)

    path.write_bytes(b"damaged")  # a damaged cache file is recomputed, not an error
    third = Predictor(store, cfg).predict(a)
    assert third is not None
    np.testing.assert_array_equal(third.mask, first.mask)


def test_predictor_hot_swap_and_bad_version(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    predictor = Predictor(store, cfg)
    b = store.image_id_by_path("b.png")
    assert predictor.predict(b).mask.max() == 2  # blue -> class 2 with the identity model
    assert predictor.refresh() is False

    _publish(store, models, 2, perm=(2, 1, 0))  # v2: blue -> class 0
    assert predictor.refresh() is True
    assert predictor.version == 2
    p2 = predictor.predict(b)
    assert p2.version == 2 and p2.mask.max() == 0
    assert store.prediction(b, 1) is not None and store.prediction(b, 2) is not None

    folder = _publish(store, models, 3)
    (folder / "model.onnx").write_bytes(b"\x00corrupt")
    assert predictor.refresh() is False
    assert predictor.version == 2
    assert predictor.predict(b).version == 2
    errors = [e for e in store.events() if e[2] == "predictor"]
    assert len(errors) == 1 and errors[0][1] == "error" and "v3" in errors[0][3] and "model.onnx" in errors[0][3]
    assert predictor.refresh() is False  # a failed version is not retried (no event storm)
    assert len([e for e in store.events() if e[2] == "predictor"]) == 1


def test_predictor_starts_on_an_older_version_when_the_newest_is_broken(
    project: tuple[Store, config.Config, Path],
) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    (_publish(store, models, 2) / "model.json").unlink()
    predictor = Predictor(store, cfg)
    assert predictor.version == 1
    assert "sidecar JSON missing" in store.events()[0][3]


def test_predict_during_swap_sees_whole_models(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    predictor = Predictor(store, cfg)
    ids = [store.image_id_by_path("a.png"), store.image_id_by_path("b.png")]
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                for i in ids:
                    p = predictor.predict(i)
                    want = 2 if p.version == 1 else 0  # b is blue; v2 maps blue to 0
                    if i == ids[1]:
                        assert p.mask.max() == want
                    seen.append(p.version)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    _publish(store, models, 2, perm=(2, 1, 0))
    assert predictor.refresh() is True
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert set(seen) <= {1, 2} and 2 in seen


def test_predict_many_fills_the_cache(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    predictor = Predictor(store, cfg)
    ids = [r.id for r in store.images()]
    calls: list[tuple[int, int]] = []
    assert predictor.predict_many(ids, progress=lambda d, t: calls.append((d, t))) == 2
    assert calls == [(1, 2), (2, 2)]
    assert all(store.prediction(i, 1) is not None for i in ids)


def test_predict_many_skips_unreadable_images(project: tuple[Store, config.Config, Path]) -> None:
    store, cfg, models = project
    _publish(store, models, 1)
    (Path(cfg.image_root) / "b.png").write_bytes(b"broken")
    predictor = Predictor(store, cfg)
    ids = [r.id for r in store.images()]
    assert predictor.predict_many(ids) == 1
    assert store.prediction(store.image_id_by_path("b.png"), 1) is None


def test_cached_prediction_is_fast_at_480x360(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "big.png"), rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))
    cfg = config.load(
        {"dataset": str(images), "workdir": str(tmp_path / "w"), "serve.threads": 1, "serve.device": "cpu"}, env={}
    )
    store = Store(cfg.db_path, image_root=cfg.image_root)
    store.sync_images()
    folder = tmp_path / "m" / "v0001"
    write_toy_model(folder / "model.onnx", max_side=320, pad_multiple=32)
    store.add_model(1, folder, Snapshot(0, (), 0))
    store.publish_model(1)
    predictor = Predictor(store, cfg)
    i = store.images()[0].id
    t0 = time.perf_counter()
    predictor.predict(i)
    uncached = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor.predict(i)
    memory = time.perf_counter() - t0
    t0 = time.perf_counter()
    Predictor(store, cfg).predict(i)  # includes loading the session
    t1 = time.perf_counter()
    disk_predictor = Predictor(store, cfg)
    t2 = time.perf_counter()
    disk_predictor.predict(i)
    disk = time.perf_counter() - t2
    print(
        f"\n480x360 toy model: uncached {1e3 * uncached:.1f} ms, memory hit {1e3 * memory:.3f} ms, "
        f"disk hit {1e3 * disk:.1f} ms (fresh predictor incl. session {1e3 * (t1 - t0):.1f} ms)"
    )
    assert memory < 0.2 and disk < 0.2


def test_new_version_is_warmed_up_at_the_projects_input_shapes(
    project: tuple[Store, config.Config, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, cfg, models = project
    seen: list[tuple[int, ...]] = []
    real = OnnxModel.logits

    def spy(self: OnnxModel, batch: np.ndarray) -> np.ndarray:
        seen.append(tuple(batch.shape))
        return real(self, batch)

    monkeypatch.setattr(OnnxModel, "logits", spy)
    _publish(store, models, 1)  # max_side 64, pad multiple 8
    pred = Predictor(store, cfg)
    assert pred.version == 1
    # a.png 40x60 -> input 40x64; b.png 30x30 -> 32x32: both warmed before anything was asked
    assert sorted(seen) == [(1, 3, 32, 32), (1, 3, 40, 64)]
    assert pred.model is not None and pred.model.warm_up([(40, 60)] * 3 + [(30, 30)], buckets=1) == [(40, 64)]
