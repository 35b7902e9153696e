"""Tests for napari_unet.axes: validating, guessing and rearranging axes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.axes import from_canonical, guess_axes, to_canonical, validate_axes

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
