"""Confusion matrix and scores on a 3-class example computed by hand."""

import numpy as np
import pytest

from labelsmart.metrics import confusion_matrix, scores


def test_three_class_example_by_hand() -> None:
    gt = np.array([[0, 0, 0, 1, 1], [2, 2, 2, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 0, 1, 1, 2], [2, 2, 0, 1, 2]], dtype=np.uint8)
    conf = confusion_matrix(gt, pred, 3)
    # rows = ground truth, columns = prediction; the two 255 pixels are not counted
    expected = np.array(
        [
            [2, 1, 0],  # gt 0 -> pred 0, 0, 1
            [0, 1, 1],  # gt 1 -> pred 1, 2
            [1, 0, 2],  # gt 2 -> pred 2, 2, 0
        ]
    )
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    s = scores(conf)
    # IoU = TP / (row sum + column sum - TP)
    iou0 = 2 / (3 + 3 - 2)  # 0.5
    iou1 = 1 / (2 + 2 - 1)  # 1/3
    iou2 = 2 / (3 + 3 - 2)  # 0.5
    assert s["per_class_iou"] == pytest.approx({0: iou0, 1: iou1, 2: iou2})
    assert s["miou"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 8)


def test_class_absent_from_ground_truth_is_not_averaged() -> None:
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 3, 1, 1])  # class 3 is predicted but never in the ground truth
    s = scores(confusion_matrix(gt, pred, 4))
    assert s["per_class_iou"][2] is None and s["per_class_iou"][3] is None
    assert s["per_class_iou"][0] == pytest.approx(0.5)
    assert s["per_class_iou"][1] == pytest.approx(1.0)
    assert s["miou"] == pytest.approx(0.75)
    assert s["pixel_acc"] == pytest.approx(0.75)


def test_all_ignored_gives_zero_not_nan() -> None:
    conf = confusion_matrix(np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.uint8), 2)
    assert conf.sum() == 0
    s = scores(conf)
    assert s == {"miou": 0.0, "per_class_iou": {0: None, 1: None}, "pixel_acc": 0.0}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
