"""Tests for napari_unet.synthetic: generated nuclei with exact labels (make_nuclei, series)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.synthetic import make_nuclei, make_nuclei_series
from napari_unet.synthetic_render import relabel_sequential

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _assert_valid_labels(labels: np.ndarray, min_size: int) -> int:
    """Check int32, sequential ids, one connected piece per id; return the count."""
    assert labels.dtype == np.int32
    ids = np.unique(labels)
    ids = ids[ids != 0]
    assert np.array_equal(ids, np.arange(1, ids.size + 1))
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        mask = labels[sl] == k
        _, n_pieces = ndi.label(mask)
        assert n_pieces == 1, f"object {k} is split into {n_pieces} pieces"
        assert mask.sum() >= min_size
    return int(ids.size)


def _n_adjacent_pixel_pairs(labels: np.ndarray) -> int:
    """Number of face-neighbouring pixel pairs that belong to two different objects."""
    total = 0
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        total += int(np.count_nonzero((lo > 0) & (hi > 0) & (lo != hi)))
    return total


def _best_time(fn, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------
# make_nuclei
# ---------------------------------------------------------------------------


def test_same_seed_is_reproducible():
    img1, lab1 = make_nuclei((96, 128), seed=7)
    img2, lab2 = make_nuclei((96, 128), seed=7)
    assert np.array_equal(img1, img2)
    assert np.array_equal(lab1, lab2)


def test_different_seeds_differ():
    img1, lab1 = make_nuclei((96, 128), seed=1)
    img2, lab2 = make_nuclei((96, 128), seed=2)
    assert not np.array_equal(lab1, lab2)
    assert np.mean(img1 != img2) > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_labels_are_sequential_connected_instances_2d(seed):
    img, lab = make_nuclei((160, 160), seed=seed)
    assert img.shape == lab.shape == (160, 160)
    n = _assert_valid_labels(lab, min_size=20)
    assert 25 <= n <= 120
    coverage = np.mean(lab > 0)
    assert 0.22 <= coverage <= 0.40


def test_labels_are_valid_in_crowded_and_extreme_settings():
    for kw in (
        {"n_objects": 400},
        {"touching": 1.0},
        {"radius": (3.0, 5.0)},
        {"radius": (15.0, 25.0)},
    ):
        _, lab = make_nuclei((128, 128), seed=3, **kw)
        assert _assert_valid_labels(lab, min_size=20) > 0, kw


def test_requested_object_count_is_respected():
    _, lab = make_nuclei((128, 128), n_objects=10, seed=0)
    assert 8 <= lab.max() <= 10
    img, lab = make_nuclei((64, 64), n_objects=0, seed=0)
    assert lab.max() == 0
    assert img.shape == (64, 64)


def test_touching_objects_exist_and_share_boundaries():
    _, lab = make_nuclei((192, 192), touching=0.5, seed=4)
    pairs = _n_adjacent_pixel_pairs(lab)
    assert pairs > 0
    _, lab_none = make_nuclei((192, 192), touching=0.0, seed=4)
    _, lab_all = make_nuclei((192, 192), touching=1.0, seed=4)
    assert _n_adjacent_pixel_pairs(lab_all) > _n_adjacent_pixel_pairs(lab_none)
    # every pair of touching objects is still two separate instances
    _assert_valid_labels(lab_all, min_size=20)


def test_uint16_range():
    img, lab = make_nuclei((128, 128), seed=0)
    assert img.dtype == np.uint16
    background = np.median(img[lab == 0])
    objects = np.mean(img[lab > 0])
    assert 80 <= background <= 700  # offset ~100 plus some illumination
    assert 500 <= objects <= 3000
    assert img.max() <= 4095


def test_uint8_and_float_ranges():
    img8, lab = make_nuclei((128, 128), dtype=np.uint8, seed=0)
    assert img8.dtype == np.uint8
    assert img8.max() > 150
    assert len(np.unique(img8)) > 100
    imgf, _ = make_nuclei((128, 128), dtype=np.float32, seed=0)
    assert imgf.dtype == np.float32
    assert imgf.min() > -0.2
    assert imgf.max() < 1.2
    assert np.mean(imgf[lab > 0]) > 0.3


def test_objects_are_brighter_than_background():
    for background in ("uneven", "flat", "none"):
        img, lab = make_nuclei((128, 128), background=background, seed=5)
        inside = img[lab > 0].astype(float).mean()
        outside = img[lab == 0].astype(float).mean()
        assert inside > 2.0 * outside, background


def test_per_object_brightness_varies():
    img, lab = make_nuclei((128, 128), snr=None, blur=0.0, background="none", seed=2)
    means = ndi.mean(img.astype(float), lab, np.arange(1, lab.max() + 1))
    means -= 100.0  # camera offset
    assert means.max() / means.min() > 1.8


def test_uneven_background_varies_and_flat_does_not():
    uneven, _ = make_nuclei((128, 128), n_objects=0, snr=None, background="uneven", seed=1)
    flat, _ = make_nuclei((128, 128), n_objects=0, snr=None, background="flat", seed=1)
    none, _ = make_nuclei((128, 128), n_objects=0, snr=None, background="none", seed=1)
    assert int(uneven.max()) - int(uneven.min()) > 100  # > 10 % of object brightness
    assert int(flat.max()) - int(flat.min()) <= 1
    assert flat.mean() > none.mean()


def test_higher_snr_means_less_noise():
    def noise_std(snr):
        img, lab = make_nuclei((128, 128), snr=snr, background="flat", blur=0.0, seed=3)
        return img[lab == 0].astype(float).std()

    assert noise_std(4.0) > 3.0 * noise_std(32.0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="shape"):
        make_nuclei((4, 64, 64, 64))
    with pytest.raises(ValueError, match="background"):
        make_nuclei((64, 64), background="stripes")
    with pytest.raises(ValueError, match="anisotropy"):
        make_nuclei((8, 64, 64), anisotropy=0)


def test_3d_shape_and_anisotropy():
    shape = (24, 96, 96)
    img, lab = make_nuclei(shape, seed=0)
    assert img.shape == lab.shape == shape
    _assert_valid_labels(lab, min_size=20)

    def z_over_y_extent(labels):
        boxes = [b for b in ndi.find_objects(labels) if b is not None]
        # ignore objects cut by the borders
        inner = [
            b
            for b in boxes
            if all(s.start > 0 and s.stop < n for s, n in zip(b, labels.shape, strict=True))
        ]
        z = np.mean([b[0].stop - b[0].start for b in inner])
        y = np.mean([b[1].stop - b[1].start for b in inner])
        return z / y

    _, lab_iso = make_nuclei((40, 64, 64), seed=1, anisotropy=1.0)
    _, lab_aniso = make_nuclei((40, 64, 64), seed=1, anisotropy=3.0)
    assert 0.7 < z_over_y_extent(lab_iso) < 1.3
    assert 0.2 < z_over_y_extent(lab_aniso) < 0.55


def test_series_drifts_and_keeps_ids():
    imgs, labs = make_nuclei_series(4, (96, 96), seed=2, dtype=np.uint8)
    assert imgs.shape == labs.shape == (4, 96, 96)
    assert imgs.dtype == np.uint8
    assert labs.dtype == np.int32
    for t in range(4):
        assert labs[t].max() > 5
        for k, sl in enumerate(ndi.find_objects(labs[t]), start=1):
            if sl is not None:
                assert ndi.label(labs[t][sl] == k)[1] == 1
    # objects move a little, but the same id stays in roughly the same place
    assert not np.array_equal(labs[0], labs[-1])
    same = np.mean(labs[0][labs[0] > 0] == labs[1][labs[0] > 0])
    assert same > 0.6
    assert not np.array_equal(imgs[0], imgs[1])
    with pytest.raises(TypeError):
        make_nuclei_series(2, (64, 64), colour="red")


def test_speed():
    make_nuclei((64, 64))  # warm up imports
    assert _best_time(lambda: make_nuclei((256, 256))) < 3 * 0.08
    assert _best_time(lambda: make_nuclei((512, 512))) < 3 * 0.25
    assert _best_time(lambda: make_nuclei((32, 128, 128)), repeats=1) < 3 * 1.5


def test_relabel_sequential_maps_ids_to_1_to_n_and_returns_the_old_ids():
    lab = np.array([[0, 5, 5], [9, 0, 7]], np.int32)
    out, old = relabel_sequential(lab)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 1, 1], [3, 0, 2]])
    np.testing.assert_array_equal(old, [5, 7, 9])
    out, old = relabel_sequential(np.array([[4, 4], [6, 4]], np.int32))  # no background
    np.testing.assert_array_equal(out, [[1, 1], [2, 1]])
    np.testing.assert_array_equal(old, [4, 6])
    out, old = relabel_sequential(np.zeros((3, 3), np.int32))
    assert not out.any() and old.size == 0
