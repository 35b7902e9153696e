"""Image-sized buffers mapped up front (``napari_unet._memory``)."""

import mmap

import numpy as np
import pytest

from napari_unet import _memory
from napari_unet.tiling import predict_tiled


@pytest.mark.parametrize("make", [_memory.zeros, _memory.empty])
@pytest.mark.parametrize("shape", [(3, 5), (2, 1500, 1500), 7])
def test_buffers_have_the_shape_and_dtype_asked_for_and_are_writable(make, shape):
    arr = make(shape, np.int32)
    want = (shape,) if isinstance(shape, int) else shape
    assert arr.shape == want and arr.dtype == np.int32 and arr.flags.writeable
    arr[...] = 5
    assert int(arr.sum()) == 5 * arr.size


def _owner(arr):
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


@pytest.mark.skipif(not hasattr(mmap, "MAP_POPULATE"), reason="Linux only")
def test_large_zeros_come_from_a_populated_mapping_and_are_zero():
    big = _memory.zeros((3, 1500, 1500), np.float32)  # 27 MB: over the threshold
    assert isinstance(_owner(big), mmap.mmap)
    assert not np.any(big)
    small = _memory.zeros((3, 64, 64), np.float32)
    assert _owner(small) is None  # numpy's own
    assert not np.any(small)


def test_tiled_prediction_into_a_mapped_buffer_equals_numpy_zeros():
    rng = np.random.default_rng(0)
    image = rng.random((1, 2100, 2100), dtype=np.float32)  # 53 MB output: mapped

    def fn(batch):
        return np.concatenate([batch, batch * 2, 1 - batch], axis=1)

    got = predict_tiled(fn, image, out_channels=3, tile_shape=512, overlap=32, batch_size=2)
    ref = predict_tiled(
        fn,
        image,
        out_channels=3,
        tile_shape=512,
        overlap=32,
        batch_size=2,
        out=np.zeros((3, 2100, 2100), np.float32),
    )
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got[0], image[0], atol=1e-6)
