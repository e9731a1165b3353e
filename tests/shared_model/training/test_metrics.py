"""Segmentation metrics against hand-computed values and a brute-force HD95."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from shared_model.training.metrics import aggregate, as_binary, binary_metrics, boundary, hd95, segmentation_metrics


def _square(shape, top, left, side):
    m = np.zeros(shape, bool)
    m[top: top + side, left: left + side] = True
    return m


def _brute_hd95(a, b):
    pa, pb = np.argwhere(boundary(a)), np.argwhere(boundary(b))
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_two_squares_with_known_overlap():
    a = _square((40, 40), 0, 0, 10)
    b = _square((40, 40), 5, 0, 10)  # overlap 5 x 10 = 50 of 100 + 100
    m = binary_metrics(a, b)
    assert m["dice"] == pytest.approx(2 * 50 / 200)
    assert m["iou"] == pytest.approx(50 / 150)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


def test_nested_masks_precision_recall():
    small = _square((30, 30), 5, 5, 10)
    big = np.zeros((30, 30), bool)
    big[5:25, 5:15] = True  # 200 px containing the 100 px square
    m = binary_metrics(small, big)
    assert m["dice"] == pytest.approx(200 / 300) and m["iou"] == pytest.approx(0.5)
    assert m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["hd95"] == pytest.approx(10.0)  # the far edges of the two are 10 rows apart


@pytest.mark.parametrize("shift", [1, 3, 7])
def test_shifted_square_hd95_equals_shift(shift):
    a = _square((64, 64), 10, 10, 30)
    b = _square((64, 64), 10, 10 + shift, 30)
    assert hd95(a, b) == pytest.approx(shift)
    assert hd95(b, a) == pytest.approx(shift)


def test_parallel_lines_hd95():
    a = np.zeros((50, 50), bool)
    a[10, 5:45] = True
    b = np.roll(a, 12, axis=0)  # every point is exactly 12 from the other line
    assert hd95(a, b) == pytest.approx(12.0)


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = ndimage.gaussian_filter(rng.random((40, 48)), 3) > 0.5
        b = ndimage.gaussian_filter(rng.random((40, 48)), 3) > 0.5
        if a.any() and b.any():
            assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))


def test_empty_cases():
    empty = np.zeros((30, 40), bool)
    some = _square((30, 40), 3, 3, 5)
    both = binary_metrics(empty, empty)
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    for pred, target in ((empty, some), (some, empty)):
        m = binary_metrics(pred, target)
        assert m == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95": 50.0}
    assert math.hypot(30, 40) == 50.0


def test_identical_masks():
    a = _square((20, 20), 2, 3, 9)
    assert binary_metrics(a, a) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}


def test_inputs_torch_numpy_probabilities():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 4:8] = 1
    probs = target * 0.9 + 0.05  # thresholds back to target
    rows = segmentation_metrics(probs, target)
    assert len(rows) == 2 and all(r["dice"] == 1.0 for r in rows)
    rows3 = segmentation_metrics(target[:, 0].numpy().astype(np.uint8), target[:, 0].bool())
    assert rows3 == rows
    assert as_binary(torch.tensor([0.2, 0.7], dtype=torch.bfloat16)).tolist() == [False, True]
    with pytest.raises(ValueError, match=r"pred: values must be in \[0, 1\]"):
        segmentation_metrics(target * 4 - 2, target)
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(target, target[:1])
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        segmentation_metrics(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))


def test_batch_rows_are_per_image():
    pred = np.zeros((3, 1, 20, 20), bool)
    target = np.zeros((3, 1, 20, 20), bool)
    target[:, 0, 5:15, 5:15] = True
    pred[0, 0, 5:15, 5:15] = True  # perfect
    pred[1, 0, 5:15, 5:10] = True  # half
    rows = segmentation_metrics(pred, target)
    assert [r["dice"] for r in rows] == pytest.approx([1.0, 2 * 50 / 150, 0.0])
    assert rows[2]["hd95"] == pytest.approx(math.hypot(20, 20))


def test_aggregate_mean_std_n():
    rows = [{"dice": 1.0, "hd95": 0.0}, {"dice": 0.5, "hd95": 4.0}, {"dice": 0.0, "hd95": 2.0}]
    out = aggregate(rows)
    assert out["n"] == 3
    assert out["dice"] == pytest.approx(0.5) and out["dice_std"] == pytest.approx(math.sqrt(1 / 6))
    assert out["hd95"] == pytest.approx(2.0) and out["hd95_std"] == pytest.approx(math.sqrt(8 / 3))
    assert aggregate(rows[:1])["dice_std"] == 0.0
    with pytest.raises(ValueError, match="no per-image metrics"):
        aggregate([])
    with pytest.raises(ValueError, match="image 1 has metrics"):
        aggregate([{"dice": 1.0}, {"iou": 1.0}])
