"""Huge and lazy inputs: streaming into labels_out, blocks read once, border-crossing objects,
out-of-memory fallbacks (simulated) and the bad-input list of issue 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_unet as nu
from napari_unet import segmenter as seg_mod
from napari_unet.metrics import instance_f1
from napari_unet.postprocess import instances_from_probabilities, link_to_previous
from napari_unet.synthetic import make_nuclei
from napari_unet.tiling import BlockCache

da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def nuclei_model():
    return nu.Segmenter.pretrained("nuclei")


@pytest.fixture()
def tiny():
    return nu.Segmenter.new(base_channels=4, depth=2, seed=0)


def _zarr(shape, chunks, dtype="int32", fill_value=0):
    return zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
    )


class ChunkedRecorder:
    """A chunked lazy array that records every (non-empty) read."""

    def __init__(self, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        self._data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.chunks = chunks
        self.keys: list[tuple[tuple[int, int], ...]] = []

    def __getitem__(self, key):
        out = self._data[key]
        if out.size:
            idx = key if isinstance(key, tuple) else (key,)
            self.keys.append(tuple((s.start, s.stop) for s in idx if isinstance(s, slice)))
        return out


# ------------------------------------------------------------------------------ block cache


def test_block_cache_assembles_regions_and_reads_each_block_once():
    data = np.arange(5 * 37 * 41, dtype=np.int32).reshape(5, 37, 41)
    rec = ChunkedRecorder(data, (2, 10, 16))
    cache = BlockCache(rec, max_bytes=1 << 30)
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = [int(rng.integers(0, n)) for n in data.shape]
        b = [int(rng.integers(lo + 1, n + 1)) for lo, n in zip(a, data.shape, strict=True)]
        key = tuple(slice(lo, hi) for lo, hi in zip(a, b, strict=True))
        np.testing.assert_array_equal(cache[key], data[key])
    np.testing.assert_array_equal(cache[3, 5:20, -7:], data[3, 5:20, -7:])
    assert len(rec.keys) == len(set(rec.keys)) == cache.block_reads <= 3 * 4 * 3
    # a budget of one block still gives correct regions (blocks are then read again)
    small = BlockCache(ChunkedRecorder(data, (2, 10, 16)), max_bytes=1)
    np.testing.assert_array_equal(small[1:4, 3:30, 2:40], data[1:4, 3:30, 2:40])


def test_lazy_zyx_input_reads_every_block_exactly_once(tiny):
    vol = make_nuclei((4, 96, 80), seed=1)[0]
    rec = ChunkedRecorder(vol, (2, 32, 32))
    pred = tiny.predict(
        rec, axes="ZYX", device="cpu", tile_shape=(48, 48), overlap=16, labels_out=None
    )
    n_blocks = 2 * 3 * 3
    assert len(rec.keys) == n_blocks  # the intensity sample and all tiles: one read per block
    assert len(set(rec.keys)) == n_blocks
    expected = tiny.predict(vol, axes="ZYX", device="cpu", tile_shape=(48, 48), overlap=16)
    # same result (the intensity range comes from a sample of whole blocks: ~1e-5 apart)
    np.testing.assert_allclose(pred.probabilities, expected.probabilities, atol=1e-3)


# ------------------------------------------------------------------- streaming into labels_out


def test_time_series_streamed_into_zarr_equals_in_memory(nuclei_model):
    frames = np.stack([make_nuclei((96, 96), seed=s)[0] for s in range(3)])
    lazy = da.from_array(frames, chunks=(1, 48, 48))
    out = _zarr(frames.shape, (1, 96, 96))
    pred = nuclei_model.predict(lazy, axes="TYX", device="cpu", labels_out=out)
    assert pred.labels is out and pred.probabilities is None and pred.axes == "TYX"
    # streaming predicts at the image's own size (no object-size zoom): compare at that size
    d = nuclei_model.config["diameter"]
    mem = nuclei_model.predict(frames, axes="TYX", device="cpu", diameter=d)
    got = out[...]
    np.testing.assert_array_equal(got, mem.labels)
    ids = [set(np.unique(got[t])) - {0} for t in range(3)]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # unique over frames


def test_zyx_streamed_slice_by_slice_keeps_3d_objects_whole(nuclei_model):
    vol, truth = make_nuclei((10, 112, 112), seed=2)
    mem = nuclei_model.predict(vol, axes="ZYX", device="cpu")
    out = np.zeros(vol.shape, np.int32)
    pred = nuclei_model.predict(vol, axes="ZYX", device="cpu", labels_out=out)
    assert pred.labels is out
    f1_mem = instance_f1(mem.labels, truth, iou_threshold=0.5)
    f1_stream = instance_f1(out, truth, iou_threshold=0.5)
    assert f1_stream > 0.8 and f1_stream >= f1_mem - 0.05
    # a true 3D object spanning several slices is one predicted id, not one id per slice
    spans = 0
    whole = 0
    for i in np.unique(truth)[1:]:
        m = truth == i
        zs = np.flatnonzero(m.any(axis=(1, 2)))
        if len(zs) < 4:
            continue
        spans += 1
        ids, counts = np.unique(out[m], return_counts=True)
        counts, ids = counts[ids > 0], ids[ids > 0]
        if len(ids) and counts.max() >= 0.8 * m.sum():
            whole += 1
    assert spans >= 10 and whole >= 0.8 * spans


def test_link_to_previous_matches_by_overlap():
    prev = np.zeros((10, 10), np.int32)
    prev[1:5, 1:5] = 7
    prev[6:9, 6:9] = 9
    cur = np.zeros((10, 10), np.int32)
    cur[2:5, 1:5] = 1  # continues 7
    cur[0:2, 7:10] = 2  # new object
    final, nxt = link_to_previous(prev, cur, next_id=10)
    assert set(np.unique(final[2:5, 1:5])) == {7}
    assert set(np.unique(final[0:2, 7:10])) == {10} and nxt == 11


def test_objects_crossing_tile_and_block_borders_stay_one_object(nuclei_model):
    img, truth = make_nuclei((160, 160), seed=5)
    whole = nuclei_model.predict(img, device="cpu")
    tiled = nuclei_model.predict(img, device="cpu", tile_shape=(48, 48), overlap=16)
    z = _zarr(img.shape, (40, 40), dtype="uint16")
    z[...] = img
    out = _zarr(img.shape, (64, 64))
    nuclei_model.predict(z, device="cpu", tile_shape=(48, 48), overlap=16, labels_out=out)
    # the image has objects cut by the tile grid (every 32 px) and by the blocks (every 40 px)
    crossing = [
        i for i in np.unique(truth)[1:] if len(np.unique(np.nonzero(truth == i)[0] // 32)) > 1
    ]
    assert len(crossing) > 10
    n_whole = len(np.unique(whole.labels)) - 1
    f1_whole = instance_f1(whole.labels, truth)
    for labels in (tiled.labels, out[...]):
        assert abs((len(np.unique(labels)) - 1) - n_whole) <= 1
        assert instance_f1(labels, truth) >= f1_whole - 0.02
        for i in crossing:  # not cut in two at a tile/block border
            ids, counts = np.unique(labels[truth == i], return_counts=True)
            assert counts[ids > 0].max(initial=0) >= 0.7 * (truth == i).sum()


def test_missing_zarr_chunks_give_no_objects_and_no_crash(nuclei_model):
    img = make_nuclei((128, 128), seed=4)[0]
    z = _zarr(img.shape, (64, 64), dtype="uint16")
    z[:, :64] = img[:, :64]  # the right half's chunks are never written: fill_value 0
    pred = nuclei_model.predict(z, device="cpu")
    assert pred.labels[:, :64].max() > 0
    assert pred.labels[:, 72:].max() == 0
    out = np.zeros(img.shape, np.int32)
    nuclei_model.predict(z, device="cpu", labels_out=out)
    assert out[:, :64].max() > 0 and out[:, 72:].max() == 0


# -------------------------------------------------------------------------- memory / devices


def _failing_over_batch(seg, limit=1):
    real = seg._predictor

    def predictor(dev, *args):
        fn = real(dev, *args)

        def predict_fn(batch):
            if batch.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(batch)

        return predict_fn

    return predictor


def test_simulated_oom_retries_with_smaller_batches(tiny, monkeypatch):
    img = make_nuclei((96, 96), seed=0)[0]
    kw = dict(device="cpu", tile_shape=(32, 32), overlap=8)
    ref = tiny.predict(img, batch_size=1, **kw)
    monkeypatch.setattr(tiny, "_predictor", _failing_over_batch(tiny))
    with pytest.warns(RuntimeWarning, match="out of memory"):
        pred = tiny.predict(img, batch_size=4, **kw)
    np.testing.assert_array_equal(pred.labels, ref.labels)
    assert len(pred.notes) == 2  # 4 -> 2 -> 1
    assert "retrying with 2" in pred.notes[0] and "retrying with 1" in pred.notes[1]


def test_simulated_cuda_oom_falls_back_to_cpu_and_frees_the_gpu(tiny, monkeypatch):
    img = make_nuclei((64, 64), seed=0)[0]
    ref = tiny.predict(img, device="cpu", tile_shape=(64, 64))
    real = tiny._predictor
    used = []

    def predictor(dev, *args):
        used.append(dev.type)
        if dev.type == "cuda":

            def oom(batch):
                raise RuntimeError("CUDA error: out of memory")

            return oom
        return real(dev, *args)

    freed = []
    monkeypatch.setattr(seg_mod, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(tiny, "_predictor", predictor)
    monkeypatch.setattr(tiny, "_auto_batch_size", lambda dev, tile: 2)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    with pytest.warns(RuntimeWarning):
        pred = tiny.predict(img, device="cuda", tile_shape=(64, 64))
    assert used == ["cuda", "cpu"] and pred.device == "cpu"
    assert "CPU" in pred.notes[-1] and "retrying with 1" in pred.notes[0]
    np.testing.assert_array_equal(pred.labels, ref.labels)
    assert freed  # torch.cuda.empty_cache() was called


def test_batch_size_follows_free_memory():
    small = seg_mod.batch_for_memory(1 << 30, (512, 512), 16)
    big = seg_mod.batch_for_memory(40 << 30, (512, 512), 16)
    assert 1 <= small < big <= 32
    assert seg_mod.batch_for_memory(1, (512, 512), 16) == 1


# ------------------------------------------------------------------------------- bad input


def test_axes_that_do_not_match_the_data(tiny):
    lazy = da.zeros((4, 32, 32), chunks=(1, 32, 32), dtype=np.uint16)
    with pytest.raises(ValueError, match="axes 'YX' name 2 dimensions but the image has 3"):
        tiny.predict(lazy, axes="YX", device="cpu")


def test_3d_model_on_a_2d_image_says_so():
    seg3 = nu.Segmenter.new(ndim=3, base_channels=4, depth=2)
    with pytest.raises(ValueError, match="3D model but the image has no Z axis"):
        seg3.predict(np.zeros((32, 32), np.float32), axes="YX", device="cpu")


def test_scale_is_validated_recorded_and_used_for_3d_sizes(tiny):
    img = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    pred = tiny.predict(img, axes="ZYX", device="cpu", scale=(4.0, 1.0, 1.0))
    assert pred.scale == (4.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="scale has 2 value"):
        tiny.predict(img, axes="ZYX", device="cpu", scale=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        tiny.predict(img, axes="ZYX", device="cpu", scale=(0.0, 1.0, 1.0))
    # a 3x3x3-voxel object is below the 3D minimum size (40) with isotropic voxels, but with
    # slices 4x thicker it is 108 isotropic voxels and is kept
    prob = np.zeros((3, 3, 12, 12), np.float32)
    prob[0] = 1.0
    prob[:, :, 4:7, 4:7] = np.array([0.0, 1.0, 0.0])[:, None, None, None]
    assert instances_from_probabilities(prob).max() == 0
    assert instances_from_probabilities(prob, spacing=(4.0, 1.0, 1.0)).max() == 1


def test_read_only_zarr_labels_out_is_refused_before_any_work(tiny, monkeypatch):
    store = zarr.storage.MemoryStore()
    zarr.create_array(store=store, shape=(64, 64), chunks=(32, 32), dtype="int32")
    ro = zarr.open_array(store, mode="r")
    calls = []
    monkeypatch.setattr(tiny, "_predictor", lambda dev, *a: calls.append(dev))
    with pytest.raises(ValueError, match="read-only"):
        tiny.predict(np.zeros((64, 64), np.float32), device="cpu", labels_out=ro)
    with pytest.raises(ValueError, match="shape"):
        tiny.predict(np.zeros((64, 64), np.float32), labels_out=np.zeros((64, 65), np.int32))
    with pytest.raises(ValueError, match="integer"):
        tiny.predict(np.zeros((64, 64), np.float32), labels_out=np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="return_probabilities"):
        tiny.predict(
            np.zeros((64, 64)), labels_out=np.zeros((64, 64), np.int32), return_probabilities=True
        )
    assert calls == []


def test_time_series_as_frames_of_changing_shape(tiny):
    frames = [np.zeros((32, 32), np.float32)] * 2 + [np.zeros((32, 40), np.float32)]
    with pytest.raises(ValueError, match=r"frame 2 has shape \(32, 40\) but frame 0"):
        tiny.predict(frames, axes="YX", device="cpu")
    same = [make_nuclei((32, 32), seed=s)[0] for s in range(3)]
    pred = tiny.predict(same, axes="YX", device="cpu")
    assert pred.axes == "TYX" and pred.labels.shape == (3, 32, 32)


def test_too_big_for_memory_suggests_labels_out(tiny, monkeypatch):
    from napari_unet import inference

    monkeypatch.setattr(inference, "_available_memory", lambda: 1 << 20)  # 1 MB free
    img = np.zeros((8, 64, 64), np.float32)
    with pytest.raises(ValueError, match="labels_out"):
        tiny.predict(img, axes="ZYX", device="cpu")
    out = np.zeros(img.shape, np.int32)
    pred = tiny.predict(img, axes="ZYX", device="cpu", labels_out=out)
    assert pred.labels is out


def test_3d_and_semantic_models_stream_like_in_memory():
    seg3 = nu.Segmenter.new(ndim=3, base_channels=4, depth=2, seed=0)
    vol = np.stack([make_nuclei((12, 40, 40), seed=s)[0] for s in range(2)])
    lazy = da.from_array(vol, chunks=(1, 6, 20, 20))
    kw = dict(axes="TZYX", device="cpu", tile_shape=(8, 32, 32), overlap=4)
    mem = seg3.predict(vol, **kw)
    lazy_mem = seg3.predict(lazy, **kw)
    np.testing.assert_allclose(lazy_mem.probabilities, mem.probabilities, atol=1e-3)
    out = np.zeros(vol.shape, np.int32)
    seg3.predict(lazy, labels_out=out, **kw)
    assert (out > 0).sum() == (mem.labels > 0).sum()
    sem = nu.Segmenter.new(task="semantic", num_classes=3, base_channels=4, depth=2, seed=0)
    frames = np.stack([make_nuclei((48, 48), seed=s)[0] for s in range(2)])
    out = _zarr(frames.shape, (1, 48, 48), dtype="uint8")
    sem.predict(da.from_array(frames, chunks=(1, 24, 24)), axes="TYX", labels_out=out)
    np.testing.assert_array_equal(out[...], sem.predict(frames, axes="TYX").labels)


def test_plane_buffers_on_disk_for_huge_planes_give_the_same_labels(tiny, monkeypatch):
    img = make_nuclei((96, 96), seed=6)[0]
    ref = tiny.predict(img, device="cpu", tile_shape=(48, 48), overlap=16)
    monkeypatch.setattr(seg_mod, "_MEMMAP_ABOVE", 0)  # every plane counts as huge
    out = np.zeros(img.shape, np.int32)
    tiny.predict(img, device="cpu", tile_shape=(48, 48), overlap=16, labels_out=out)
    np.testing.assert_array_equal(out, ref.labels)
