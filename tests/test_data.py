"""Tests for napari_unet.data: synthetic nuclei, normalisation and axes helpers."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.data import (
    check_finite,
    from_canonical,
    guess_axes,
    make_nuclei,
    make_nuclei_series,
    normalize,
    percentile_range,
    to_canonical,
    validate_axes,
)

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


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_normalize_maps_range_and_keeps_input(dtype):
    image = np.array([[0, 10], [20, 40]], dtype=dtype)
    before = image.copy()
    out = normalize(image, 10, 20)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1.0, 0.0], [1.0, 3.0]])
    assert np.array_equal(image, before)
    assert image.dtype == dtype


def test_normalize_bool_and_out():
    image = np.array([True, False, True])
    np.testing.assert_array_equal(normalize(image, 0, 1), [1.0, 0.0, 1.0])
    buf = np.full(3, 7.0, dtype=np.float32)
    res = normalize(np.array([2, 4, 6], np.uint16), 2, 6, out=buf)
    assert res is buf
    np.testing.assert_allclose(buf, [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        normalize(np.zeros(3), 0, 1, out=np.zeros(3, dtype=np.float64))


def test_normalize_constant_image_gives_zeros_without_warning():
    image = np.full((8, 8), 300, dtype=np.uint16)
    lo, hi = percentile_range(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize(image, lo, hi)
    assert out.dtype == np.float32
    assert np.all(out == 0)
    assert np.all(image == 300)


def test_percentile_range_numpy_matches_percentile_and_ignores_nan():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, size=(200, 300)).astype(np.float32)
    lo, hi = percentile_range(image, 1, 99.8)
    exp = np.percentile(image, [1, 99.8])
    assert lo == pytest.approx(exp[0], rel=1e-5)
    assert hi == pytest.approx(exp[1], rel=1e-5)
    with_nan = image.copy()
    with_nan[:10] = np.nan
    with_nan[10, :5] = np.inf
    lo2, hi2 = percentile_range(with_nan)
    assert np.isfinite(lo2) and np.isfinite(hi2)
    assert lo2 == pytest.approx(lo, rel=0.05)
    assert hi2 == pytest.approx(hi, rel=0.05)
    assert percentile_range(np.array([[True, False]])) == (0.0, 1.0)
    assert percentile_range(np.full((4, 4), np.nan)) == (0.0, 0.0)
    with pytest.raises(ValueError):
        percentile_range(image, 50, 10)


class _CountingArray:
    """Minimal lazy array-like that records how many values were read."""

    def __init__(self, data: np.ndarray):
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.values_read = 0

    def __getitem__(self, index):
        out = np.asarray(self._data[index])
        self.values_read += out.size
        return out


def test_percentile_range_reads_only_a_strided_subsample():
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 1000, size=(40, 500, 500)).astype(np.float32)
    lazy = _CountingArray(data)
    lo, hi = percentile_range(lazy, 1, 99, max_samples=50_000)
    assert 0 < lazy.values_read <= 50_000
    assert lo == pytest.approx(10.0, abs=5.0)
    assert hi == pytest.approx(990.0, abs=5.0)


def test_percentile_range_dask_is_close_to_numpy():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(2)
    data = rng.normal(500.0, 50.0, size=(32, 256, 256)).astype(np.float32)
    lazy = da.from_array(data, chunks=(16, 128, 128))
    exp = np.percentile(data, [1, 99.8])
    lo, hi = percentile_range(lazy, max_samples=100_000)
    assert lo == pytest.approx(exp[0], rel=0.02)
    assert hi == pytest.approx(exp[1], rel=0.02)


def test_percentile_range_zarr_is_close_to_numpy():
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(3)
    data = rng.integers(100, 4000, size=(300, 400)).astype(np.uint16)
    if hasattr(zarr, "create_array"):
        z = zarr.create_array(store={}, shape=data.shape, chunks=(64, 64), dtype=data.dtype)
    else:  # zarr 2
        z = zarr.zeros(data.shape, chunks=(64, 64), dtype=data.dtype)
    z[:] = data
    exp = np.percentile(data, [1, 99.8])
    lo, hi = percentile_range(z, max_samples=20_000)
    assert lo == pytest.approx(exp[0], rel=0.1)
    assert hi == pytest.approx(exp[1], rel=0.02)
    lo_full, hi_full = percentile_range(z)  # small enough to read completely
    assert lo_full == pytest.approx(exp[0])
    assert hi_full == pytest.approx(exp[1])


def test_check_finite_messages():
    image = np.ones((20, 20), dtype=np.float32)
    check_finite(image)  # fine
    check_finite(np.zeros((3, 3), dtype=np.uint16))  # integers are always finite
    image[0, :10] = np.nan
    image[1, :2] = np.inf
    with pytest.raises(ValueError) as err:
        check_finite(image)
    assert str(err.value) == (
        "image contains 12 NaN or infinite pixels; replace them (e.g. with numpy.nan_to_num) "
        "before segmenting"
    )
    with pytest.raises(ValueError, match="^mask contains 12 NaN"):
        check_finite(image, name="mask")
    with pytest.raises(ValueError) as err:
        check_finite(np.full((4, 4), np.nan))
    assert str(err.value) == "image contains only NaN or infinite values"


def test_check_finite_lazy_arrays_are_sampled():
    da = pytest.importorskip("dask.array")
    data = np.ones((64, 64), dtype=np.float32)
    data[:32] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_finite(da.from_array(data, chunks=16))
    with pytest.raises(ValueError, match="only NaN"):
        check_finite(da.full((64, 64), np.nan, chunks=16))
    check_finite(da.ones((64, 64), chunks=16))


# ---------------------------------------------------------------------------
# axes
# ---------------------------------------------------------------------------


def test_validate_axes_normalises():
    assert validate_axes("yx", 2) == "YX"
    assert validate_axes("ZYXS", 4) == "ZYXC"
    assert validate_axes("TZCYX", 5) == "TZCYX"


def test_validate_axes_errors():
    with pytest.raises(ValueError) as err:
        validate_axes("YX", 3, shape=(5, 64, 64))
    assert str(err.value) == (
        "axes 'YX' name 2 dimensions but the image has 3 (shape (5, 64, 64)); "
        "pass axes such as 'ZYX' or 'TYX'"
    )
    with pytest.raises(ValueError, match="name 2 dimensions but the image has 3"):
        validate_axes("YX", 3)
    with pytest.raises(ValueError, match="more than once"):
        validate_axes("YXX", 3)
    with pytest.raises(ValueError, match="more than once"):
        validate_axes("CSYX", 4)  # S is an alias of C
    with pytest.raises(ValueError, match="must include both Y and X"):
        validate_axes("ZX", 2)
    with pytest.raises(ValueError, match="unknown letter"):
        validate_axes("QYX", 3)


@pytest.mark.parametrize(
    ("shape", "rgb", "expected"),
    [
        ((64, 64), None, "YX"),
        ((64, 64, 3), None, "YXC"),
        ((64, 64, 4), None, "YXC"),
        ((5, 64, 64), None, "ZYX"),
        ((64, 64, 3), False, "ZYX"),
        ((64, 64, 2), True, "YXC"),
        ((5, 64, 64, 3), None, "ZYXC"),
        ((2, 5, 3, 64, 64), None, "TZCYX"),
    ],
)
def test_guess_axes(shape, rgb, expected):
    assert guess_axes(shape, rgb=rgb) == expected


@pytest.mark.parametrize(
    "shape", [(64,), (2, 5, 64, 64), (1, 2, 3, 4, 5, 6), (5, 64, 64, 3)], ids=str
)
def test_guess_axes_errors(shape):
    if shape == (5, 64, 64, 3):
        with pytest.raises(ValueError, match="pass axes"):
            guess_axes(shape, rgb=False)
    else:
        with pytest.raises(ValueError):
            guess_axes(shape)


@pytest.mark.parametrize(
    ("axes", "shape", "canonical"),
    [
        ("YX", (6, 7), (1, 1, 1, 6, 7)),
        ("YXC", (6, 7, 3), (1, 1, 3, 6, 7)),
        ("CYX", (2, 6, 7), (1, 1, 2, 6, 7)),
        ("TZYX", (3, 4, 6, 7), (3, 4, 1, 6, 7)),
        ("yxs", (6, 7, 3), (1, 1, 3, 6, 7)),
    ],
)
def test_canonical_round_trip_numpy(axes, shape, canonical):
    image = np.arange(np.prod(shape)).reshape(shape)
    view = to_canonical(image, axes)
    assert view.shape == canonical
    assert np.shares_memory(view, image)
    # the value at a given (named) position is preserved
    src_axes = validate_axes(axes, image.ndim)
    last = tuple(n - 1 for n in shape)
    canon_index = tuple(last[src_axes.index(ch)] if ch in src_axes else 0 for ch in "TZCYX")
    assert view[canon_index] == image[last]
    back = from_canonical(view, axes)
    assert back.shape == image.shape
    assert np.array_equal(back, image)
    assert np.shares_memory(back, image)


def test_from_canonical_drops_channel_for_labels():
    image = np.zeros((6, 7, 3))
    canon = to_canonical(image, "YXC")
    labels = np.arange(42, dtype=np.int32).reshape(1, 1, 1, 6, 7)
    out = from_canonical(labels, "YX")
    assert out.shape == (6, 7)
    assert np.shares_memory(out, labels)
    with pytest.raises(ValueError, match="cannot drop axis 'C'"):
        from_canonical(canon, "YX")


def test_to_canonical_custom_target():
    image = np.zeros((3, 6, 7))
    assert to_canonical(image, "ZYX", target="ZYX").shape == (3, 6, 7)
    assert to_canonical(image, "ZYX", target="CZYX").shape == (1, 3, 6, 7)
    with pytest.raises(ValueError, match="cannot drop axis 'Z'"):
        to_canonical(image, "ZYX", target="YX")
    with pytest.raises(ValueError, match="name 4 dimensions but the image has 3"):
        to_canonical(image, "TZYX")


def test_canonical_round_trip_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    calls = []

    def make_block(block):
        calls.append(1)
        return block

    data = np.arange(3 * 4 * 6 * 7).reshape(3, 4, 6, 7)
    lazy = da.from_array(data, chunks=(1, 2, 6, 7)).map_blocks(make_block, dtype=data.dtype)
    calls.clear()
    view = to_canonical(lazy, "TZYX")
    back = from_canonical(view, "TZYX")
    assert isinstance(view, da.Array) and isinstance(back, da.Array)
    assert view.shape == (3, 4, 1, 6, 7)
    assert not calls  # nothing computed so far
    assert np.array_equal(np.asarray(back), data)
    assert np.array_equal(np.asarray(view)[:, :, 0], data)


def test_to_canonical_wraps_zarr_lazily():
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    data = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    if hasattr(zarr, "create_array"):
        z = zarr.create_array(store={}, shape=data.shape, chunks=(2, 6, 3), dtype=data.dtype)
    else:  # zarr 2
        z = zarr.zeros(data.shape, chunks=(2, 6, 3), dtype=data.dtype)
    z[:] = data
    view = to_canonical(z, "YXC")
    assert isinstance(view, da.Array)
    assert view.shape == (1, 1, 3, 5, 6)
    assert np.array_equal(np.asarray(from_canonical(view, "YXC")), data)
