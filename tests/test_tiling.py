"""Tests for napari_unet.tiling (tiled, blended inference)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_unet.tiling import Cancelled, plan_tiles, predict_tiled, tiled_inference


def identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


def ones_like(batch: np.ndarray) -> np.ndarray:
    return np.ones_like(batch)


class RecordingArray:
    """Array-like that records every read: shape of each ``__getitem__`` result."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.reads: list[tuple[int, ...]] = []
        self.keys: list[tuple] = []

    def __getitem__(self, key):
        result = self._data[key]
        self.reads.append(result.shape)
        self.keys.append(key)
        return result


# --------------------------------------------------------------------------------------------
# plan_tiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, tile, overlap, divisor",
    [
        ((100, 77), (32, 32), 8, 4),
        ((513, 260), (128, 64), 32, 16),
        ((1, 50), (16, 16), 4, 4),
        ((3, 3), (256, 256), 32, 16),
        ((20, 70, 90), (16, 32, 32), (4, 8, 8), 4),
        ((64, 64), (64, 64), 16, 16),
        ((65, 200), (64, 64), 0, 16),
    ],
)
def test_plan_covers_image(shape, tile, overlap, divisor):
    tiles = plan_tiles(shape, tile, overlap, divisor)
    cover = np.zeros(shape, dtype=np.int32)
    for sl in tiles:
        assert len(sl) == len(shape)
        for s, n in zip(sl, shape, strict=True):
            assert 0 <= s.start < s.stop <= n
        cover[sl] += 1
    assert (cover >= 1).all()
    for axis, n in enumerate(shape):
        starts = sorted({sl[axis].start for sl in tiles})
        # all starts are multiples of divisor, except possibly a last tile flush with the
        # border when the size itself is not a multiple
        for s in starts:
            last_flush = any(sl[axis].start == s and sl[axis].stop == n for sl in tiles)
            assert s % divisor == 0 or (last_flush and n % divisor != 0)
        # tiles are of full size unless the axis is shorter than the tile
        t = tile[axis] if isinstance(tile, tuple) else tile
        for sl in tiles:
            length = sl[axis].stop - sl[axis].start
            assert length == min(n, (t // divisor) * divisor)


def test_plan_overlap_and_count():
    tiles = plan_tiles((192, 160), (64, 64), 32, 4)
    ys = sorted({sl[0].start for sl in tiles})
    xs = sorted({sl[1].start for sl in tiles})
    assert ys == [0, 32, 64, 96, 128]
    assert xs == [0, 32, 64, 96]
    assert len(tiles) == len(ys) * len(xs)
    # single tile when the image fits
    assert plan_tiles((50, 40), 64, 16, 16) == [(slice(0, 50), slice(0, 40))]


# --------------------------------------------------------------------------------------------
# exactness with simple predictors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, tile, overlap, divisor",
    [
        ((1, 100, 77), (32, 32), 8, 4),
        ((1, 1, 50), (16, 16), 4, 4),
        ((1, 3, 3), (256, 256), 32, 16),
        ((2, 513, 260), (128, 96), 32, 16),
        ((1, 20, 70, 90), (16, 32, 32), (4, 12, 8), 4),
        ((3, 40, 33), (16, 16), 6, 1),
        ((1, 150, 150), (64, 64), 48, 16),
    ],
)
def test_identity_predictor_is_exact(shape, tile, overlap, divisor):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    calls = []

    def predict(batch):
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        assert all(t % divisor == 0 for t in batch.shape[2:])
        calls.append(batch.shape)
        return batch.copy()

    result = predict_tiled(
        predict,
        image,
        out_channels=shape[0],
        tile_shape=tile,
        overlap=overlap,
        batch_size=3,
        divisor=divisor,
    )
    assert result.shape == shape and result.dtype == np.float32
    np.testing.assert_allclose(result, image, atol=1e-6, rtol=0)
    assert len({c[1:] for c in calls}) == 1  # all tiles have the same shape
    assert all(c[0] <= 3 for c in calls)


def test_integer_input_and_float16_prediction():
    image = np.arange(2 * 70 * 50, dtype=np.uint16).reshape(2, 70, 50) % 1000
    result = predict_tiled(
        lambda b: b[:, :1].astype(np.float16) * 0 + 0.5,
        image,
        out_channels=1,
        tile_shape=32,
        overlap=8,
        divisor=8,
    )
    np.testing.assert_allclose(result, 0.5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((1, 300, 211), (64, 64), 32), ((1, 30, 70, 90), (16, 32, 32), 8), ((1, 5, 7), 64, 32)],
)
def test_weights_sum_to_one(shape, tile, overlap):
    image = np.zeros(shape, dtype=np.float32)
    result = predict_tiled(
        ones_like, image, out_channels=1, tile_shape=tile, overlap=overlap, divisor=8
    )
    np.testing.assert_allclose(result, 1.0, atol=1e-6, rtol=0)


def test_smooth_blend_between_disagreeing_tiles():
    """Tiles predicting different constants blend smoothly (no jumps) and stay in range."""
    image = np.zeros((1, 64, 256), dtype=np.float32)
    counter = iter(range(1000))

    def per_tile_constant(batch):
        return np.stack([np.full(batch.shape[1:], float(next(counter) % 2)) for _ in batch])

    result = predict_tiled(
        per_tile_constant,
        image,
        out_channels=1,
        tile_shape=(64, 64),
        overlap=32,
        batch_size=1,
        divisor=16,
    )[0]
    assert result.min() >= -1e-6 and result.max() <= 1 + 1e-6
    rows = np.diff(result, axis=1)
    # a hard seam would be a jump of 1; a ~16-pixel raised cosine changes < 0.15 per pixel
    assert np.abs(rows).max() < 0.15
    assert np.ptp(result[:, 100]) < 1e-6  # constant along the untiled axis


# --------------------------------------------------------------------------------------------
# accuracy against a whole-image CNN prediction
# --------------------------------------------------------------------------------------------


def test_matches_whole_image_cnn():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    F = torch.nn.functional

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.ReLU(),
        )

    class TinyUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.e0, self.e1, self.bottom = block(2, 8), block(8, 16), block(16, 16)
            self.d1, self.d0 = block(32, 8), block(16, 8)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            a = self.e0(x)
            b = self.e1(F.max_pool2d(a, 2))
            c = self.bottom(F.max_pool2d(b, 2))
            d = self.d1(torch.cat([F.interpolate(c, scale_factor=2), b], 1))
            e = self.d0(torch.cat([F.interpolate(d, scale_factor=2), a], 1))
            return self.head(e)

    torch.manual_seed(0)
    net = TinyUNet().eval()

    def predict(batch):
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    rng = np.random.default_rng(1)
    image = rng.random((2, 192, 160), dtype=np.float32)
    reference = predict(image[None])[0]
    result = predict_tiled(
        predict,
        image,
        out_channels=3,
        tile_shape=(64, 64),
        overlap=32,
        divisor=4,
        batch_size=4,
    )
    assert np.abs(result - reference).max() < 1e-3


# --------------------------------------------------------------------------------------------
# lazy inputs and outputs
# --------------------------------------------------------------------------------------------


def test_dask_and_zarr_inputs_match_numpy():
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(2)
    image = rng.random((2, 130, 97)).astype(np.float32)
    kw = dict(out_channels=2, tile_shape=(48, 48), overlap=16, divisor=8, batch_size=2)
    expected = predict_tiled(lambda b: b * 2 + 1, image, **kw)

    lazy = da.from_array(image, chunks=(2, 40, 40))
    np.testing.assert_allclose(predict_tiled(lambda b: b * 2 + 1, lazy, **kw), expected, atol=1e-6)

    z = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=image.shape,
        chunks=(2, 32, 32),
        dtype="float32",
    )
    z[...] = image
    np.testing.assert_allclose(predict_tiled(lambda b: b * 2 + 1, z, **kw), expected, atol=1e-6)


def test_reads_each_tile_once():
    rng = np.random.default_rng(3)
    data = rng.random((1, 300, 250)).astype(np.float32)
    image = RecordingArray(data)
    tile, overlap = 64, 16
    result = predict_tiled(
        identity, image, out_channels=1, tile_shape=tile, overlap=overlap, divisor=16
    )
    np.testing.assert_allclose(result, data, atol=1e-6)
    plan = plan_tiles(data.shape[1:], tile, overlap, 16)
    assert len(image.reads) == len(plan)

    def bounds(slices):
        return tuple((s.start, s.stop) for s in slices)

    # every read is one planned tile region (all channels), each read exactly once
    assert all(k[0] == slice(None) for k in image.keys)
    assert sorted(bounds(k[1:]) for k in image.keys) == sorted(bounds(p) for p in plan)
    assert max(int(np.prod(r)) for r in image.reads) <= tile * tile
    total = sum(int(np.prod(r)) for r in image.reads)
    factor = (tile / (tile - overlap)) ** 2  # (64/48)^2 ~ 1.78 from the overlap
    assert total <= 1.5 * factor * data.size


def test_out_zarr_and_memmap(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(4)
    image = rng.random((1, 90, 70)).astype(np.float32)
    kw = dict(out_channels=2, tile_shape=32, overlap=8, divisor=8)

    def predict(b):
        return np.concatenate([b, 1 - b], axis=1)

    expected = np.concatenate([image, 1 - image])

    z = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(2, 90, 70),
        chunks=(1, 25, 25),
        dtype="float32",
        fill_value=7.0,  # stale content must be overwritten
    )
    assert predict_tiled(predict, image, out=z, **kw) is z
    np.testing.assert_allclose(z[...], expected, atol=1e-6)

    mm = np.memmap(tmp_path / "out.dat", dtype=np.float32, mode="w+", shape=(2, 90, 70))
    mm[...] = np.nan  # garbage content
    assert predict_tiled(predict, image, out=mm, **kw) is mm
    mm.flush()
    np.testing.assert_allclose(np.asarray(mm), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# generator protocol, progress, cancellation
# --------------------------------------------------------------------------------------------


def test_generator_progress_and_return_value():
    image = np.ones((1, 100, 100), dtype=np.float32)
    kw = dict(out_channels=1, tile_shape=32, overlap=8, divisor=8, batch_size=4)
    total = len(plan_tiles((100, 100), 32, 8, 8))

    def caller():
        result = yield from tiled_inference(identity, image, **kw)
        return result

    gen = caller()
    progress = []
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert all(t == total for _, t in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert progress[-1] == (total, total)
    assert len(progress) == -(-total // 4)
    np.testing.assert_allclose(result, 1.0, atol=1e-6)


def test_close_stops_work_and_thread():
    image = np.ones((1, 256, 256), dtype=np.float32)
    calls = []

    def predict(batch):
        calls.append(1)
        return batch

    before = threading.active_count()
    gen = tiled_inference(
        predict, image, out_channels=1, tile_shape=32, overlap=8, divisor=8, batch_size=2
    )
    assert next(gen)[0] == 2
    assert threading.active_count() == before + 1  # the prefetch thread
    gen.close()
    assert threading.active_count() == before
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n == 1


def test_should_stop_raises_cancelled():
    image = np.ones((1, 128, 128), dtype=np.float32)
    flag = {"stop": False}
    before = threading.active_count()
    gen = tiled_inference(
        identity,
        image,
        out_channels=1,
        tile_shape=32,
        overlap=8,
        divisor=8,
        batch_size=1,
        should_stop=lambda: flag["stop"],
    )
    next(gen)
    flag["stop"] = True
    with pytest.raises(Cancelled):
        next(gen)
    assert threading.active_count() == before


def test_errors_in_predict_fn_propagate_and_clean_up():
    image = np.ones((1, 64, 64), dtype=np.float32)
    before = threading.active_count()
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        predict_tiled(
            lambda b: b[:, :, :10], image, out_channels=1, tile_shape=32, overlap=8, divisor=8
        )
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        predict_tiled(identity, image, out_channels=2, tile_shape=32, overlap=8, divisor=8)
    assert threading.active_count() == before


# --------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_shape, kw, match",
    [
        ((64, 64), {}, "dimensions"),
        ((1, 2, 3, 64, 64), {}, "dimensions"),
        ((1, 64, 64), {"tile_shape": 32, "overlap": 32}, "larger than the overlap"),
        ((1, 64, 64), {"tile_shape": 32, "overlap": -1}, "negative"),
        ((1, 64, 64), {"tile_shape": 32, "overlap": 28, "divisor": 8}, "at least the divisor"),
        ((1, 64, 64), {"tile_shape": 8, "divisor": 16}, "smaller than the divisor"),
        ((1, 64, 64), {"tile_shape": (32, 32, 32)}, "spatial dimensions"),
        ((1, 64, 64), {"batch_size": 0}, "batch_size"),
        ((1, 64, 64), {"out_channels": 0}, "out_channels"),
        ((1, 64, 64), {"divisor": 0}, "divisor"),
        ((1, 64, 64), {"pad_mode": "nonsense"}, "pad_mode"),
        ((1, 64, 64), {"out": np.zeros((1, 64, 65), np.float32)}, "out has shape"),
        ((1, 0, 64), {}, "empty"),
    ],
)
def test_bad_arguments(image_shape, kw, match):
    params = dict(out_channels=1, tile_shape=32, overlap=8, divisor=8)
    params.update(kw)
    image = np.zeros(image_shape, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        predict_tiled(identity, image, **params)


def test_plan_tiles_bad_arguments():
    with pytest.raises(ValueError, match="larger than the overlap"):
        plan_tiles((100, 100), (32, 32), 40)
    with pytest.raises(ValueError, match="spatial dimensions"):
        plan_tiles((100, 100), (32, 32), (8, 8, 8))


def test_transform_is_applied_and_checked():
    image = np.full((1, 50, 50), 10, dtype=np.uint8)
    result = predict_tiled(
        identity,
        image,
        out_channels=1,
        tile_shape=32,
        overlap=8,
        divisor=8,
        transform=lambda t: (t.astype(np.float32) - 10) / 2 + 3,
    )
    np.testing.assert_allclose(result, 3.0, atol=1e-6)
    with pytest.raises(ValueError, match="transform changed"):
        predict_tiled(
            identity,
            image,
            out_channels=1,
            tile_shape=32,
            overlap=8,
            divisor=8,
            transform=lambda t: t[:, :5],
        )
