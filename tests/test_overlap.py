"""Tests for napari_unet.overlap: the sparse overlap table and label-input checks (iou_matrix,
which metrics re-exports, is tested with the metrics in test_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import metrics
from napari_unet.overlap import as_labels, iou_matrix, overlap


def test_overlap_lists_only_the_pairs_that_share_pixels():
    pred = np.zeros((6, 6), np.int32)
    true = np.zeros((6, 6), np.uint16)
    pred[:3, :3] = 7  # 9 px, overlaps true 2 on 3 px
    pred[4:, 4:] = 9  # 4 px, touches nothing
    true[2:4, :3] = 2  # 6 px
    ov = overlap(pred, true)
    np.testing.assert_array_equal(ov.pred_ids, [7, 9])
    np.testing.assert_array_equal(ov.true_ids, [2])
    assert (ov.n_pred, ov.n_true) == (2, 1)
    assert list(zip(ov.rows, ov.cols, strict=True)) == [(0, 0)]
    np.testing.assert_allclose(ov.ious, [3 / (9 + 6 - 3)])
    assert metrics.iou_matrix is iou_matrix


def test_as_labels_accepts_bools_and_whole_floats_and_refuses_the_rest():
    assert as_labels(np.array([True, False]), "x").dtype == np.uint8
    assert as_labels(np.array([1.0, 2.0]), "x").dtype == np.int64
    with pytest.raises(ValueError, match="non-integer"):
        as_labels(np.array([1.5]), "x")
    with pytest.raises(ValueError, match="negative"):
        as_labels(np.array([-1]), "x")
    with pytest.raises(TypeError, match="dtype"):
        as_labels(np.array(["a"]), "x")
