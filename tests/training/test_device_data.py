"""Batches augmented by torch ops on the device: what a DataLoader over LabelledSet gives, with labels aligned."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from labelsmart import config
from labelsmart.training.data import LabelledSet
from labelsmart.training.device_data import DeviceBatches

CROP = 48
CPU = torch.device("cpu")
COLOURS = np.array([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 220, 30]], np.uint8)  # class k has COLOURS[k]


def _cfg(seed: int = 0) -> config.Config:
    return config.load({"preprocess.max_side": 128, "train.crop": CROP, "train.seed": seed}, env={})


def _blocks(h: int, w: int, seed: int, cell: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random square cells of classes 0-3 (colour ``COLOURS[k]``) and unlabelled grey cells (255)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 5, (-(-h // cell), -(-w // cell)))  # 4 = unlabelled
    mask = np.kron(cells, np.ones((cell, cell), np.int64))[:h, :w]
    image = np.full((h, w, 3), 128, np.uint8)
    for k, colour in enumerate(COLOURS):
        image[mask == k] = colour
    return image, np.where(mask == 4, 255, mask).astype(np.uint8)


def _pixels(view: torch.Tensor, cfg: config.Config) -> torch.Tensor:
    """A normalised view ``(B, 3, c, c)`` back in 0..1."""
    mean = torch.tensor(cfg.preprocess.mean)[:, None, None]
    std = torch.tensor(cfg.preprocess.std)[:, None, None]
    return view * std + mean


def test_batches_have_the_loader_keys_shapes_and_dtypes() -> None:
    cfg = _cfg()
    pairs = [_blocks(96, 128, 0), _blocks(30, 40, 1)] * 2  # the second is smaller than the crop
    expected = next(iter(DataLoader(LabelledSet(pairs, cfg), batch_size=4)))
    batch = DeviceBatches(LabelledSet(pairs, cfg).items, cfg, CPU).batch(4)
    assert set(batch) == set(expected) == {"view1", "view2", "label"}
    for key in batch:
        assert batch[key].shape == expected[key].shape, key
        assert batch[key].dtype == expected[key].dtype, key
        assert batch[key].device == CPU
    assert batch["view1"].shape == (4, 3, CROP, CROP) and batch["label"].shape == (4, CROP, CROP)
    assert torch.isfinite(batch["view1"]).all() and torch.isfinite(batch["view2"]).all()


def test_labels_are_never_interpolated() -> None:
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 3, 7, 255], np.uint8), (90, 120))  # per-pixel noise: any blend shows
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    batches = DeviceBatches([(image, mask)], _cfg(), CPU, photometric=False).batches(4)
    seen: set[int] = set()
    for _ in range(10):
        seen |= set(next(batches)["label"].unique().tolist())
    assert seen <= {0, 3, 7, 255}
    assert {0, 3, 7} <= seen


def test_image_and_labels_stay_aligned_through_scale_pad_crop_and_flip() -> None:
    cfg = _cfg()
    pairs = [_blocks(96, 128, 0), _blocks(72, 100, 1), _blocks(30, 40, 2)]
    batches = DeviceBatches(pairs, cfg, CPU, photometric=False).batches(6)
    colours = torch.from_numpy(COLOURS).float() / 255  # (4, 3)
    checked = 0
    for _ in range(4):
        batch = next(batches)
        label = batch["label"].float()[:, None]  # (B, 1, c, c)
        # Pixels whose 5x5 neighbourhood is one class: away from the cell edges the resize blends.
        inside = (F.max_pool2d(label, 5, 1, 2) == label) & (-F.max_pool2d(-label, 5, 1, 2) == label)
        inside = inside[:, 0] & (batch["label"] < len(COLOURS))  # (B, c, c)
        inside[:, :2] = inside[:, -2:] = inside[:, :, :2] = inside[:, :, -2:] = False  # neighbours outside the crop
        pixels = _pixels(batch["view1"], cfg).permute(0, 2, 3, 1)  # (B, c, c, 3)
        want = colours[batch["label"][inside]]  # (N, 3)
        assert torch.allclose(pixels[inside], want, atol=0.02)
        assert torch.equal(batch["view1"], batch["view2"])  # no photometric op
        checked += int(inside.sum())
    assert checked > 1000


def test_every_crop_holds_a_labelled_pixel_when_the_mask_has_one() -> None:
    image = np.full((240, 320, 3), 90, np.uint8)
    mask = np.full((240, 320), 255, np.uint8)
    mask[228:231, 308:311] = 2  # a 3x3 blob in a corner: random tries rarely hit it, the fallback must
    batches = DeviceBatches([(image, mask)], _cfg(), CPU, photometric=False).batches(8)
    for _ in range(5):
        label = next(batches)["label"]  # (B, c, c)
        assert (label == 2).flatten(1).any(1).all()
    nothing = np.full((240, 320), 255, np.uint8)
    label = DeviceBatches([(image, nothing)], _cfg(), CPU, photometric=False).batch(4)["label"]
    assert (label == 255).all()


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    pairs = [_blocks(96, 128, 0), _blocks(72, 100, 1)]
    a, b = DeviceBatches(pairs, _cfg(), CPU).batches(3), DeviceBatches(pairs, _cfg(), CPU).batches(3)
    c = DeviceBatches(pairs, _cfg(seed=1), CPU).batches(3)
    for _ in range(2):
        x, y, z = next(a), next(b), next(c)
        for key in x:
            assert torch.equal(x[key], y[key]), key
        assert not torch.equal(x["view1"], z["view1"])
        assert not torch.equal(x["label"], z["label"])


def test_flip_happens_about_half_the_time() -> None:
    cfg = _cfg()
    ramp = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (96, 1))  # red grows left to right
    image = np.stack([ramp, np.full_like(ramp, 128), np.full_like(ramp, 128)], axis=2)
    batch = DeviceBatches([(image, np.zeros((96, 128), np.uint8))], cfg, CPU, photometric=False).batch(64)
    red = _pixels(batch["view1"], cfg)[:, 0]  # (B, c, c)
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)  # (B,)
    assert (left != right).all()
    flipped = int((left > right).sum())
    assert 16 <= flipped <= 48, flipped  # binomial(64, 0.5): 4 standard deviations


def test_small_image_is_padded_with_the_mean_colour_and_unlabelled() -> None:
    cfg = _cfg()
    image, mask = np.full((30, 40, 3), 200, np.uint8), np.zeros((30, 40), np.uint8)
    batch = DeviceBatches([(image, mask)], cfg, CPU, photometric=False).batch(8)
    label, view = batch["label"], batch["view1"]  # (B, c, c), (B, 3, c, c)
    assert (label[:, -1] == 255).all()  # 30 rows at most 1.5x: the bottom of a 48 crop is always padding
    assert (label == 0).flatten(1).any(1).all()
    padding = (label == 255)[:, None].expand_as(view)
    assert view[padding].abs().max() < 0.02  # the mean colour normalises to about 0
    assert torch.allclose(_pixels(view, cfg).permute(0, 2, 3, 1)[label == 0], torch.tensor([200 / 255] * 3), atol=0.01)


def test_photometric_views_differ_stay_in_range_and_are_sometimes_grey() -> None:
    cfg = _cfg()
    batch = DeviceBatches([_blocks(96, 128, 0), _blocks(72, 100, 1)], cfg, CPU).batch(48)
    views = torch.cat([batch["view1"], batch["view2"]])  # (2B, 3, c, c)
    pixels = _pixels(views, cfg)
    assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4  # every op clamps to 0..1
    assert (batch["view1"] != batch["view2"]).flatten(1).any(1).float().mean() > 0.9
    grey = (pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1) < 1e-4  # (2B,) R = G = B everywhere
    assert 4 <= int(grey.sum()) <= 40, int(grey.sum())  # p = 0.2 of 96 views: about 19


def test_making_a_batch_never_reads_a_value_back_from_the_device() -> None:
    """On the meta device (shapes, no values) any ``.item()``, ``nonzero`` or ``if tensor`` raises: a batch that is
    made there queues behind the previous step on a GPU instead of waiting for it."""
    pairs = [_blocks(96, 128, 0), _blocks(30, 40, 1)]
    batch = DeviceBatches(pairs, _cfg(), torch.device("meta")).batch(4)
    assert batch["view1"].shape == (4, 3, CROP, CROP) and batch["label"].dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu_batches() -> None:
    pairs = [_blocks(96, 128, 0), _blocks(30, 40, 1)]
    on_cpu = DeviceBatches(pairs, _cfg(), CPU).batches(8)
    on_gpu = DeviceBatches(pairs, _cfg(), torch.device("cuda")).batches(8)
    next(on_cpu), next(on_gpu)  # the first batch allocates (pinned memory, kernels)
    torch.cuda.set_sync_debug_mode("error")  # making a batch never waits for the device
    try:
        cpu, gpu = next(on_cpu), next(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu["view1"].is_cuda and gpu["label"].is_cuda
    assert torch.equal(cpu["label"], gpu["label"].cpu())
    for key in ("view1", "view2"):
        assert torch.allclose(cpu[key], gpu[key].cpu(), atol=0.05), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_round_takes_its_labelled_crops_from_device_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from labelsmart.training import round as training_round

    made: list[int] = []
    real = DeviceBatches.batch

    def spy(self: DeviceBatches, batch_size: int) -> dict[str, torch.Tensor]:
        made.append(batch_size)
        return real(self, batch_size)

    monkeypatch.setattr(DeviceBatches, "batch", spy)
    classes = [{"id": k, "name": f"c{k}", "color": COLOURS[k].tolist()} for k in range(4)]
    data = training_round.RoundData(train=[_blocks(96, 128, 0), _blocks(96, 128, 1)], classes=classes)
    cfg = config.load({"preprocess.max_side": 128, "train.crop": 64, "train.device": "cuda"}, env={})
    result = training_round.run_round(cfg, data, 1, steps=3)
    assert result.steps == 3 and result.device == "cuda" and len(made) >= 3
    off = config.load(
        {"preprocess.max_side": 128, "train.crop": 64, "train.device": "cuda", "train.device_augment": False}, env={}
    )
    made.clear()
    training_round.run_round(off, data, 1, steps=2)
    assert made == []  # the loader path, as on the CPU
