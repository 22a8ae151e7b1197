"""The simulated scribbles match a hand-made example."""

from __future__ import annotations

import numpy as np

from labelsmart.bench.scribble import simulate_scribbles


def test_bar_becomes_its_centre_line():
    mask = np.full((20, 40), 255, np.uint8)
    mask[5:14, 2:38] = 3  # a 9 px tall bar: eroded by the 7x7 ellipse to its 3 middle rows, skeleton = row 9
    out = simulate_scribbles(mask)
    # Eroded bar: rows 8..10, x 5..34. Its skeleton is the centre row 9 (skimage may bend the last pixel),
    # dilated by a 3x3 square: rows 8..10 along the bar, a few pixels in from each end.
    assert set(np.unique(out).tolist()) == {3, 255}
    assert (out[8:11, 6:32] == 3).all()
    ys, xs = np.nonzero(out == 3)
    assert ys.min() >= 7 and ys.max() <= 11 and xs.min() >= 4 and xs.max() <= 35
    assert (out == 3).sum() < 3 * 32 + 6  # a stroke, not the bar (9 x 36 = 324 px)
    assert ((out == 3) <= (mask == 3)).all()  # never outside the component


def test_small_components_are_skipped_and_thin_ones_kept():
    mask = np.full((30, 30), 255, np.uint8)
    mask[1:8, 1:8] = 0  # 49 px < 64: skipped
    mask[20, 0:30] = 1  # 30 px line: skipped (under 64)
    mask[10:12, 0:30] = 2  # 60 px: skipped
    mask[14:17, 0:30] = 4  # 90 px, 3 px thin: erosion leaves nothing, so the component itself is skeletonised
    out = simulate_scribbles(mask)
    assert not (out == 0).any() and not (out == 1).any() and not (out == 2).any()
    assert (out == 4).sum() > 0 and ((out == 4) <= (mask == 4)).all()


def test_deterministic_and_ignores_void():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (60, 80)).astype(np.uint8)
    mask = np.kron(mask[::10, ::10], np.ones((10, 10), np.uint8))
    mask[:5] = 255
    a, b = simulate_scribbles(mask), simulate_scribbles(mask)
    assert np.array_equal(a, b)
    assert (a[:5] == 255).all()
    labelled = a != 255
    assert (a[labelled] == mask[labelled]).all()
