"""The shared preprocessing path: resize, pad, normalise, logits -> mask, colour layers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from labelsmart import imageio
from labelsmart.config import PreprocessConfig


def test_read_image_converts_grey_and_alpha_and_names_bad_files(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((4, 6), 9, np.uint8))
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([np.zeros((4, 6, 3), np.uint8), np.full((4, 6), 255, np.uint8)]))
    assert imageio.read_image(tmp_path / "g.png").shape == (4, 6, 3)
    assert imageio.read_image(tmp_path / "a.png").shape == (4, 6, 3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(imageio.ImageError, match=r"bad\.jpg: not a readable image"):
        imageio.read_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_applies_it(tmp_path: Path, orientation: int):
    """A phone photo (EXIF orientation 6: taken upright, stored sideways) is read the right way up; every
    orientation as Pillow's own ``ImageOps.exif_transpose`` turns it."""
    from PIL import Image, ImageOps

    rgb = np.zeros((40, 64, 3), np.uint8)  # asymmetric: a bright block in the top-left corner, a ramp
    rgb[:10, :16] = (250, 40, 40)
    rgb[..., 2] = np.linspace(0, 200, 64, dtype=np.uint8)[None, :]
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=100, exif=exif)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = imageio.read_image(path)
    assert got.shape == want.shape == ((64, 40, 3) if orientation >= 5 else (40, 64, 3))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0  # two JPEG decoders, the same pixels


def test_16_bit_images_are_stretched_by_their_real_range(tmp_path: Path):
    ramp = np.tile(np.linspace(100, 4095, 64).astype(np.uint16), (8, 1))  # 12-bit microscopy in a 16-bit file
    cv2.imwrite(str(tmp_path / "em.png"), ramp)
    img = imageio.read_image(tmp_path / "em.png")
    assert img.dtype == np.uint8 and img.shape == (8, 64, 3)
    assert img.min() == 0 and img.max() == 255  # not 0..16, as dividing by 257 gave
    assert (np.diff(img[0, :, 0].astype(int)) >= 0).all()  # the order of intensities is kept
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((4, 4), 1000, np.uint16))
    assert imageio.read_image(tmp_path / "flat.png").max() == 0


def huge_png_header(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A PNG whose header says ``width`` x ``height`` (its pixel data is that of an 8x8 image): what a reader
    sees of a huge image before it decodes anything, without the gigabytes."""
    import struct
    import zlib

    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_a_huge_image_is_refused_from_its_header(tmp_path: Path):
    path = huge_png_header(tmp_path / "slide.png", 12_000, 12_000)
    with pytest.raises(imageio.ImageError, match=r"slide\.png: 12000x12000 pixels is more than labelsmart opens"):
        imageio.read_image(path)
    big = huge_png_header(tmp_path / "wide.png", 20_000, 20_000)  # past what Pillow itself opens
    with pytest.raises(imageio.ImageError, match="its pixels are more than labelsmart opens.*split it into tiles"):
        imageio.read_image(big)


def test_bgr_to_rgb(tmp_path: Path):
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    cv2.imwrite(str(tmp_path / "r.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert imageio.read_image(tmp_path / "r.png")[0, 0].tolist() == [200, 0, 0]


def test_prepare_and_back_keeps_geometry():
    pp = PreprocessConfig(max_side=64, pad_multiple=32)
    img = np.zeros((90, 120, 3), np.uint8)
    x, meta = imageio.prepare(img, pp)
    assert meta.work_hw == (48, 64) and meta.pad_hw == (64, 64) and x.shape == (3, 64, 64)
    assert x.dtype == np.float32
    logits = np.zeros((3, 64, 64), np.float32)
    logits[2, :24] = 5.0  # top half of the working image -> class 2
    mask, conf = imageio.logits_to_mask(logits, meta)
    assert mask.shape == (90, 120) and conf.shape == (90, 120)
    assert (mask[:40] == 2).all() and (mask[50:] == 0).all()
    assert conf.min() >= 1 / 3 - 1e-6 and conf.max() <= 1.0


def test_normalize_matches_hand_computation():
    img = np.array([[[255, 0, 128]]], np.uint8)
    x = imageio.normalize(img, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert np.allclose(x[:, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 1.0], atol=1e-5)


def test_resize_labels_keeps_thin_strokes():
    mask = np.full((300, 400), 255, np.uint8)
    mask[150, 20:380] = 1  # a one-pixel line
    mask[10:12, 10:12] = 0
    small = imageio.resize_labels(mask, (75, 100))
    assert (small == 1).sum() >= 80  # the line survives a 4x shrink
    assert (small == 0).sum() >= 1
    assert set(np.unique(small).tolist()) <= {0, 1, 255}


def test_rgba_round_trip_and_antialiased_edges():
    colors = [(128, 128, 128), (128, 64, 128), (64, 0, 128)]
    mask = np.full((5, 7), 255, np.uint8)
    mask[1, 1:4] = 2
    mask[3, 5] = 0
    rgba = imageio.mask_to_rgba(mask, colors)
    assert np.array_equal(imageio.rgba_to_mask(rgba, colors), mask)
    rgba[1, 1, :3] = (70, 5, 120)  # an anti-aliased near-colour still maps to its class
    rgba[0, 0] = (64, 0, 128, 40)  # faint edge pixel stays unlabelled
    out = imageio.rgba_to_mask(rgba, colors)
    assert out[1, 1] == 2 and out[0, 0] == 255


def test_palette_png_keeps_ids(tmp_path: Path):
    from PIL import Image

    mask = np.array([[0, 1], [2, 255]], np.uint8)
    data = imageio.palette_png_bytes(mask, [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    p = tmp_path / "m.png"
    imageio.atomic_write_bytes(p, data)
    with Image.open(p) as im:
        assert im.mode == "P" and np.array_equal(np.array(im), mask)
        assert im.getpalette()[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert np.array_equal(imageio.read_mask(p, shape=(2, 2), num_classes=3), mask)
    assert list(tmp_path.iterdir()) == [p]  # no temporary file left behind


def test_list_images_skips_hidden_and_non_images(tmp_path: Path):
    (tmp_path / ".labelsmart").mkdir()
    (tmp_path / ".labelsmart" / "x.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    for n in ("sub/b.TIF", "a.webp", "notes.txt"):
        (tmp_path / n).write_bytes(b"")
    assert [p.as_posix() for p in imageio.list_images(tmp_path)] == ["a.webp", "sub/b.TIF"]


def test_confidence_is_the_winning_probability():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 16, 24)).astype(np.float32) * 3
    meta = imageio.Meta(orig_hw=(16, 24), work_hw=(16, 24), pad_hw=(16, 24))
    mask, conf = imageio.logits_to_mask(logits, meta)
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    np.testing.assert_array_equal(mask, probs.argmax(axis=0))
    np.testing.assert_allclose(conf, probs.max(axis=0), rtol=1e-5)


def test_overlay_blends_labelled_pixels_only():
    img = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 255], [1, 0, 255]], np.uint8)
    out = imageio.overlay(img, mask, [(200, 0, 0), (0, 0, 50)], alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 1].tolist() == [50, 50, 75]
    assert out[0, 2].tolist() == [100, 100, 100] and out[1, 2].tolist() == [100, 100, 100]
