"""Working-scale pairs and augmentation that keeps image and labels aligned."""

import numpy as np
import pytest
import torch

from labelsmart import config
from labelsmart.training.data import LabelledSet, random_scale_crop_flip


def _cfg(**train: object) -> config.Config:
    args = {"preprocess.max_side": 128, "train.crop": 64}
    args.update({f"train.{k}": v for k, v in train.items()})
    return config.load(args, env={})


def _scribbled_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 400x300 image with two one-pixel-wide strokes: class 0 horizontal, class 1 vertical."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    mask = np.full((300, 400), 255, np.uint8)
    mask[150, 40:360] = 0
    mask[20:280, 300] = 1
    return image, mask


def test_thin_scribble_survives_working_scale_and_crops_hold_labels() -> None:
    ds = LabelledSet([_scribbled_pair()], _cfg())
    image, mask = ds.items[0]
    assert image.shape == (96, 128, 3) and mask.shape == (96, 128)
    assert set(np.unique(mask).tolist()) == {0, 1, 255}
    assert (mask == 0).sum() >= 90  # the 320 px stroke crosses ~100 working-scale pixels
    for i in range(30):
        item = ds[i]
        assert item["view1"].shape == (3, 64, 64) and item["view1"].dtype == torch.float32
        assert item["view2"].shape == (3, 64, 64) and item["view2"].dtype == torch.float32
        assert item["label"].shape == (64, 64) and item["label"].dtype == torch.int64
        assert (item["label"] != 255).any(), f"crop {i} holds no labelled pixel"
        assert set(item["label"].unique().tolist()) <= {0, 1, 255}


def test_items_are_reproducible_and_views_differ() -> None:
    ds = LabelledSet([_scribbled_pair()], _cfg())
    a, b = ds[3], ds[3]
    for key in ("view1", "view2", "label"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["view1"], a["view2"])
    assert not torch.equal(ds[0]["label"], ds[1]["label"])  # index past len() draws a new crop


def test_small_image_is_padded_with_unlabelled() -> None:
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    ds = LabelledSet([(image, mask)], _cfg())
    label = ds[0]["label"]
    assert label.shape == (64, 64)
    assert (label == 255).any() and (label == 0).any()


@pytest.mark.parametrize("seed", range(16))
def test_geometry_keeps_image_and_labels_aligned(seed: int) -> None:
    # colour encodes the class: class 0 red, class 1 blue, in vertical stripes so flips matter
    w, h = 160, 120
    cls = ((np.arange(w) // 24) % 2).astype(np.uint8)  # (w,)
    mask = np.repeat(cls[None, :], h, axis=0)
    image = np.zeros((h, w, 3), np.uint8)
    image[mask == 0] = (255, 0, 0)
    image[mask == 1] = (0, 0, 255)
    mask[:, 100:] = 255  # the right part unlabelled: a flip moves it to the left
    rng = np.random.default_rng(seed)
    img_c, lab_c = random_scale_crop_flip(image, mask, 64, rng)
    assert img_c.shape == (64, 64, 3) and lab_c.shape == (64, 64)
    red, blue = img_c[..., 0] > 200, img_c[..., 2] > 200  # pure colours: away from interpolated stripe edges
    sel = (lab_c != 255) & (red | blue)
    assert sel.sum() > 100
    colour_class = blue.astype(np.uint8)
    assert (colour_class[sel] == lab_c[sel]).mean() > 0.99


def test_class_counts_are_labelled_pixels_at_working_scale() -> None:
    image, mask = _scribbled_pair()
    mask[0:4, 0:4] = 7  # a class id past the project's classes is not counted
    ds = LabelledSet([(image, mask)], _cfg())
    counts = ds.class_counts(3)
    _, small = ds.items[0]
    assert counts.tolist() == [int((small == 0).sum()), int((small == 1).sum()), 0]
    assert counts[0] >= 90 and counts[1] >= 60
