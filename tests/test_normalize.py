"""Tests for napari_unet.normalize: finite checks, percentile ranges, scaling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_unet.normalize import check_finite, normalize, percentile_range

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


@pytest.mark.parametrize("scale", [1e-7, 1e-12, 1e-40, 1e200])
def test_images_in_tiny_or_huge_units_are_not_flat(scale):
    """A float image whose values all lie under 1e-6 (small physical units) was made all
    zeros by an absolute flatness limit; the range only has to be wide for its magnitude."""
    image = np.array([[0.0, 1.0], [2.0, 4.0]]) * scale
    out = normalize(image, *percentile_range(image, 0, 100))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]], rtol=1e-5)
    assert np.all(normalize(np.full(3, 5e-9), 5e-9, 5e-9 * (1 + 1e-15)) == 0)  # still flat


def test_a_float_image_in_small_units_is_segmented_as_the_same_image_in_counts():
    import napari_unet as nu
    from napari_unet.synthetic import make_realistic_nuclei

    img, _ = make_realistic_nuclei((96, 96), seed=1)
    seg = nu.Segmenter.pretrained("nuclei")
    want = seg.predict(img).labels
    assert want.max() > 5
    for tiny in (img * 1e-9, (img * 1e-9).astype(np.float32)):  # before: no object at all
        np.testing.assert_array_equal(seg.predict(tiny).labels, want)


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


@pytest.mark.parametrize(
    "dtype, offset", [(np.int64, 2**40), (np.uint64, 2**36), (np.int32, 2**30), (np.uint32, 0)]
)
def test_wide_integers_far_from_zero_keep_their_signal(dtype, offset):
    """An int64 image of values near 2**40 lost all of its signal in float32 (its step there
    is 2**17, the image spans 255): it found no object. Now it is predicted, and fine-tuned
    on, as the same image at zero."""
    import napari_unet as nu
    from napari_unet.inference import _normalizer
    from napari_unet.synthetic import make_nuclei

    img, _ = make_nuclei((96, 96), seed=0)
    far = img.astype(dtype) + dtype(offset)
    lo, hi = offset + 10.0, offset + 200.0
    want = (img.astype(np.float64) - 10) / 190
    np.testing.assert_allclose(normalize(far, lo, hi), want, atol=1e-5)
    got = _normalizer(np.array([lo]), np.array([hi]), 0, 3)(far[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    seg = nu.Segmenter.pretrained("nuclei")
    ref = seg.predict(img, engine="torch").labels
    assert ref.max() > 10
    np.testing.assert_array_equal(seg.predict(far, engine="torch").labels, ref)


def test_a_float64_image_spanning_all_of_float64_is_not_nan():
    import napari_unet as nu

    big = np.finfo(np.float64).max
    image = np.where(np.random.default_rng(0).random((64, 64)) > 0.5, big, -big)
    np.testing.assert_array_equal(normalize(image, -big, big), (image > 0).astype(np.float32))
    pred = nu.Segmenter.pretrained("nuclei").predict(image, return_probabilities=True)
    assert np.isfinite(pred.probabilities).all()  # was NaN everywhere, and no object
