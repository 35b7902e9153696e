"""Tests for napari_unet.metrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.metrics import (
    DEFAULT_THRESHOLDS,
    MatchResult,
    average_precision,
    dice,
    evaluate,
    instance_f1,
    iou,
    iou_matrix,
    match_instances,
    semantic_iou,
)


def _square(shape, r0, c0, size, value=1, dtype=np.int32):
    img = np.zeros(shape, dtype=dtype)
    img[r0 : r0 + size, c0 : c0 + size] = value
    return img


def _random_labels(shape, seed, sigma=2.0, level=0.6):
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    labels, _ = ndi.label(smooth > level)
    return labels


# ------------------------------------------------------------------------------ pixel metrics


def test_iou_dice_shifted_squares():
    a = _square((10, 10), 2, 2, 4)
    b = _square((10, 10), 2, 3, 4)  # shifted one column: overlap 4x3 = 12, union 20
    assert iou(a, b) == pytest.approx(12 / 20)
    assert dice(a, b) == pytest.approx(2 * 12 / 32)
    c = _square((10, 10), 4, 4, 4)  # shifted (2, 2): overlap 2x2 = 4, union 28
    assert iou(a, c) == pytest.approx(4 / 28)
    assert dice(a, c) == pytest.approx(8 / 32)


def test_iou_dice_nonzero_is_foreground_and_empty():
    a = np.array([[0, 3], [7, 0]])
    b = np.array([[0, 1], [0, 0]], dtype=bool)
    assert iou(a, b) == pytest.approx(0.5)
    assert dice(a, b) == pytest.approx(2 / 3)
    z = np.zeros((3, 3))
    assert iou(z, z) == 1.0
    assert dice(z, z) == 1.0
    assert iou(z, np.ones((3, 3))) == 0.0
    assert dice(z, np.ones((3, 3))) == 0.0


def test_iou_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


def test_semantic_iou():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0]])
    res = semantic_iou(pred, true)
    assert set(res) == {0, 1, 2}
    assert res[0] == pytest.approx(3 / 6)  # inter 3, union 4 + 5 - 3
    assert res[1] == pytest.approx(4 / 5)
    assert res[2] == pytest.approx(2 / 4)

    res_nb = semantic_iou(pred, true, ignore_background=True)
    assert set(res_nb) == {1, 2}
    assert res_nb[1] == res[1]

    res4 = semantic_iou(pred, true, num_classes=4)
    assert set(res4) == {0, 1, 2, 3}
    assert math.isnan(res4[3])  # absent from both images

    with pytest.raises(ValueError, match="num_classes"):
        semantic_iou(pred, true, num_classes=2)
    with pytest.raises(ValueError, match="shape"):
        semantic_iou(pred, true[:2])


# ------------------------------------------------------------------------------ iou_matrix


def test_iou_matrix_matches_brute_force():
    true = _random_labels((40, 50), seed=1)
    pred = _random_labels((40, 50), seed=3)
    pred = np.where(pred > 0, pred * 3 + 5, 0)  # non-sequential ids
    mat, pid, tid = iou_matrix(pred, true)
    np.testing.assert_array_equal(pid, np.unique(pred[pred > 0]))
    np.testing.assert_array_equal(tid, np.unique(true[true > 0]))
    assert mat.shape == (pid.size, tid.size)
    expected = np.array([[iou(pred == p, true == t) for t in tid] for p in pid])
    np.testing.assert_allclose(mat, expected)
    assert pid.size > 3 and tid.size > 3 and np.count_nonzero(mat) > 0


def test_iou_matrix_huge_ids_same_as_small_ids():
    true = _random_labels((30, 30), seed=3)
    pred = _random_labels((30, 30), seed=4)
    big = np.where(pred > 0, pred.astype(np.int64) * 1_000_003 + 10**12, 0)
    m_small, p_small, _ = iou_matrix(pred, true)
    m_big, p_big, _ = iou_matrix(big, true)
    np.testing.assert_array_equal(m_small, m_big)
    np.testing.assert_array_equal(p_big, p_small * 1_000_003 + 10**12)


def test_iou_matrix_empty():
    mat, pid, tid = iou_matrix(np.zeros((5, 5), int), _square((5, 5), 0, 0, 2))
    assert mat.shape == (0, 1)
    assert pid.size == 0
    np.testing.assert_array_equal(tid, [1])


# ------------------------------------------------------------------------------ matching


def test_identical_labels_are_perfect():
    labels = _random_labels((64, 64), seed=5)
    n = int(labels.max())
    assert n > 5
    m = match_instances(labels, labels.copy())
    assert (m.tp, m.fp, m.fn) == (n, 0, 0)
    assert m.precision == m.recall == m.f1 == 1.0
    assert m.mean_matched_iou == pytest.approx(1.0)
    np.testing.assert_array_equal(m.pairs[:, 0], m.pairs[:, 1])
    mean_ap, per = average_precision(labels, labels)
    assert mean_ap == 1.0
    assert list(per) == list(DEFAULT_THRESHOLDS)
    assert all(v == 1.0 for v in per.values())
    assert match_instances(labels, labels, iou_threshold=1.0).tp == n


def test_permuted_ids_still_match_perfectly():
    true = _random_labels((64, 64), seed=6)
    n = int(true.max())
    rng = np.random.default_rng(0)
    lut = np.zeros(n + 1, dtype=np.uint16)
    lut[1:] = rng.permutation(np.arange(1, n + 1)) * 7 + 100
    pred = lut[true]
    m = match_instances(pred, true)
    assert m.f1 == 1.0 and m.tp == n
    # every pair maps a permuted id back to its original
    np.testing.assert_array_equal(lut[m.pairs[:, 1]], m.pairs[:, 0])
    assert average_precision(pred, true)[0] == 1.0


def test_split_object_one_tp_one_fp():
    true = _square((8, 8), 0, 0, 4)  # 16 px
    pred = np.zeros((8, 8), np.int32)
    pred[0:4, 0:3] = 1  # 12 px -> IoU 0.75
    pred[0:4, 3] = 2  # 4 px -> IoU 0.25
    m = match_instances(pred, true)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.precision == 0.5 and m.recall == 1.0
    assert m.f1 == pytest.approx(2 / 3)
    assert m.mean_matched_iou == pytest.approx(0.75)
    np.testing.assert_array_equal(m.pairs, [[1, 1]])
    ap, per = average_precision(pred, true, thresholds=(0.5, 0.75, 0.8))
    assert per == {0.5: 0.5, 0.75: 0.5, 0.8: 0.0}
    assert ap == pytest.approx(1 / 3)


def test_merged_object_at_exact_half_iou():
    true = np.zeros((8, 8), np.int32)
    true[0:4, 0:2] = 1  # 8 px
    true[0:4, 2:4] = 2  # 8 px
    pred = _square((8, 8), 0, 0, 4, value=9)  # covers both: IoU 8/16 = 0.5 each
    m = match_instances(pred, true, iou_threshold=0.5)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert m.pairs.shape == (1, 2) and m.pairs[0, 0] == 9
    assert m.mean_matched_iou == pytest.approx(0.5)
    m2 = match_instances(pred, true, iou_threshold=0.51)
    assert (m2.tp, m2.fp, m2.fn) == (0, 1, 2)
    assert m2.f1 == 0.0 and m2.pairs.shape == (0, 2)


def test_threshold_edge_exact_half_counts():
    true = _square((6, 6), 0, 0, 4)  # 16 px
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:4] = 3  # 8 px inside -> IoU exactly 0.5
    assert match_instances(pred, true, 0.5).tp == 1
    assert instance_f1(pred, true, 0.5) == 1.0
    assert match_instances(pred, true, 0.5 + 1e-6).tp == 0
    assert instance_f1(pred, true, 0.5 + 1e-6) == 0.0
    # a threshold from float arithmetic that is 0.5 only up to rounding still accepts it
    assert match_instances(pred, true, np.arange(0.3, 0.55, 0.05)[4]).tp == 1


def test_matching_maximises_number_of_pairs():
    # One row of 30 px. True X = cols 0..9, Y = cols 10..29. Pred A = cols 1..12, B = col 0.
    # IoU(A, X) = 9/13, IoU(A, Y) = 3/29, IoU(B, X) = 1/10. A greedy or IoU-sum matching would
    # take only A-X; the optimal one-to-one matching takes A-Y and B-X.
    true = np.zeros((1, 30), np.int32)
    true[0, 0:10] = 1
    true[0, 10:30] = 2
    pred = np.zeros((1, 30), np.int32)
    pred[0, 1:13] = 5
    pred[0, 0] = 6
    m = match_instances(pred, true, iou_threshold=0.09)
    assert m.tp == 2
    assert {tuple(p) for p in m.pairs.tolist()} == {(5, 2), (6, 1)}
    assert m.mean_matched_iou == pytest.approx((3 / 29 + 1 / 10) / 2)
    m50 = match_instances(pred, true, iou_threshold=0.5)
    assert m50.tp == 1
    np.testing.assert_array_equal(m50.pairs, [[5, 1]])
    assert m50.mean_matched_iou == pytest.approx(9 / 13)


def test_matching_prefers_higher_iou_among_equal_size_matchings():
    # one pred overlapping two true objects, both above the threshold -> the higher IoU wins
    true = np.zeros((4, 8), np.int32)
    true[:, 0:4] = 1
    true[:, 4:8] = 2
    pred = np.zeros((4, 8), np.int32)
    pred[:, 1:6] = 1  # 20 px: IoU 12/24 with true 1, 8/28 with true 2
    m = match_instances(pred, true, iou_threshold=0.2)
    np.testing.assert_array_equal(m.pairs, [[1, 1]])
    assert m.mean_matched_iou == pytest.approx(0.5)


def test_3d_inputs():
    true = np.zeros((6, 6, 6), np.uint8)
    true[1:4, 1:4, 1:4] = 1  # 27 voxels
    true[4:6, 4:6, 4:6] = 2
    pred = np.zeros_like(true, dtype=np.int64)
    pred[2:5, 1:4, 1:4] = 4  # shifted by one plane: overlap 18, union 36 -> IoU 0.5
    mat, pid, tid = iou_matrix(pred, true)
    np.testing.assert_array_equal(pid, [4])
    np.testing.assert_array_equal(tid, [1, 2])
    assert mat[0, 0] == pytest.approx(0.5)
    assert mat[0, 1] == 0.0
    m = match_instances(pred, true)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert m.precision == 1.0 and m.recall == 0.5
    assert iou(pred, true) == pytest.approx(18 / (27 + 8 + 9))


def test_empty_cases():
    empty = np.zeros((5, 5), np.int32)
    obj = _square((5, 5), 1, 1, 2)
    m = match_instances(empty, empty)
    assert (m.tp, m.fp, m.fn, m.n_pred, m.n_true) == (0, 0, 0, 0, 0)
    assert m.precision == m.recall == m.f1 == 1.0
    assert m.mean_matched_iou == 0.0
    assert average_precision(empty, empty) == (1.0, {t: 1.0 for t in DEFAULT_THRESHOLDS})
    ev = evaluate(empty, empty)
    assert ev["f1"] == ev["map"] == ev["ap50"] == ev["ap75"] == 1.0

    for pred, true in [(empty, obj), (obj, empty)]:
        m = match_instances(pred, true)
        assert m.precision == m.recall == m.f1 == 0.0
        assert m.tp == 0 and m.fp + m.fn == 1
        assert average_precision(pred, true)[0] == 0.0
        assert instance_f1(pred, true) == 0.0


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"shape mismatch.*\(4, 4\).*\(4, 5\)"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(3, 4\)"):
        average_precision(np.zeros((2, 3, 4), int), np.zeros((3, 4), int))


def test_input_validation():
    good = _square((4, 4), 0, 0, 2)
    with pytest.raises(ValueError, match="non-integer"):
        match_instances(good.astype(float) * 0.5, good)
    with pytest.raises(ValueError, match="negative"):
        match_instances(good, -good)
    with pytest.raises(ValueError, match="negative"):
        iou_matrix(good.astype(float) * -1, good)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.full((4, 4), np.nan), good)
    with pytest.raises(ValueError, match="threshold"):
        match_instances(good, good, iou_threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        average_precision(good, good, thresholds=(0.5, 1.5))
    # whole-number floats and booleans are accepted
    assert match_instances(good.astype(np.float32), good).f1 == 1.0
    assert match_instances(good.astype(bool), good).f1 == 1.0


def test_inputs_not_modified():
    true = _random_labels((32, 32), seed=7)
    pred = np.roll(true, 1, axis=0).astype(np.float64)
    true_c, pred_c = true.copy(), pred.copy()
    evaluate(pred, true)
    iou_matrix(pred, true)
    semantic_iou(pred > 0, true > 0)
    np.testing.assert_array_equal(true, true_c)
    np.testing.assert_array_equal(pred, pred_c)
    assert pred.dtype == np.float64


def test_match_result_pairs_read_only():
    labels = _square((4, 4), 0, 0, 2)
    m = match_instances(labels, labels)
    assert isinstance(m, MatchResult)
    assert m.pairs.dtype == np.int64
    with pytest.raises(ValueError):
        m.pairs[0, 0] = 5


def test_average_precision_monotone_on_perturbed_example():
    true = _random_labels((128, 128), seed=8, sigma=2.5, level=0.55)
    rng = np.random.default_rng(1)
    pred = np.roll(true, (1, 2), axis=(0, 1))
    pred = ndi.grey_erosion(pred, size=(2, 2))  # shrink objects unevenly
    n = int(true.max())
    drop = rng.choice(np.arange(1, n + 1), size=n // 5, replace=False)
    pred[np.isin(pred, drop)] = 0  # missed objects
    pred[100:110, 5:15] = n + 50  # a spurious object
    thresholds = np.round(np.arange(0.05, 1.0001, 0.05), 2)
    mean_ap, per = average_precision(pred, true, thresholds=thresholds)
    values = [per[float(t)] for t in thresholds]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < values[0] < 1.0  # a non-trivial example
    assert mean_ap == pytest.approx(np.mean(values))
    # consistent with the per-threshold matching
    for t in (0.5, 0.75):
        m = match_instances(pred, true, t)
        assert per[t] == pytest.approx(m.tp / (m.tp + m.fp + m.fn))


def test_evaluate_summary():
    true = np.zeros((8, 8), np.int32)
    true[0:4, 0:4] = 1
    true[5:8, 5:8] = 2
    pred = np.zeros((8, 8), np.int32)
    pred[0:4, 0:3] = 1  # IoU .75 with true 1
    pred[6:8, 6:8] = 2  # IoU 4/9 with true 2
    ev = evaluate(pred, true)
    assert ev["n_pred"] == 2 and ev["n_true"] == 2
    assert (ev["tp"], ev["fp"], ev["fn"]) == (1, 1, 1)
    assert ev["precision"] == ev["recall"] == ev["f1"] == 0.5
    assert ev["ap50"] == pytest.approx(1 / 3)
    assert ev["ap75"] == pytest.approx(1 / 3)
    assert ev["map"] == pytest.approx(average_precision(pred, true)[0])
    assert ev["map"] == pytest.approx(6 * (1 / 3) / 10)  # matched at 0.5 .. 0.75 only
    assert ev["mean_matched_iou"] == pytest.approx(0.75)
    assert all(isinstance(v, (int, float)) for v in ev.values())


def test_large_image_is_fast():
    n, s = 2048, 37
    r, c = np.mgrid[:n, :n]
    true = ((r // s) * (n // s + 1) + (c // s) + 1).astype(np.int32)  # ~3100 blocks
    rng = np.random.default_rng(0)
    lut = rng.permutation(int(true.max()) + 1).astype(np.int32) + 1
    lut[0] = 0
    pred = lut[np.roll(true, (3, 5), axis=(0, 1))]
    t0 = time.perf_counter()
    m = match_instances(pred, true)
    elapsed = time.perf_counter() - t0
    assert m.n_true == m.n_pred > 3000
    # interior blocks are 37x37 shifted by (3, 5): IoU = 34*32 / (2*37**2 - 34*32) > 0.5
    assert m.tp == (n // s) ** 2
    assert elapsed < 2.0, f"match_instances took {elapsed:.2f} s"
