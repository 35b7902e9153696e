"""Segmenter: prediction on every supported layout, bad input refused, files, fine-tuning."""

import numpy as np
import pytest
import torch

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.store import ModelFileError


@pytest.fixture(scope="module")
def tiny():
    return nu.Segmenter.new(base_channels=4, depth=2, seed=0)


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei((96, 96), seed=3)


@pytest.mark.parametrize(
    "shape, axes, spatial",
    [
        ((40, 50), "YX", "YX"),
        ((5, 40, 50), "ZYX", "ZYX"),
        ((3, 40, 50), "TYX", "TYX"),
        ((40, 50, 1), "YXC", "YX"),
        ((1, 40, 50), "CYX", "YX"),
        ((2, 3, 40, 50), "TZYX", "TZYX"),
        ((40, 2, 50), "YTX", "YTX"),
    ],
)
def test_predict_layouts(tiny, shape, axes, spatial):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    pred = tiny.predict(img, axes=axes, device="cpu")
    want = tuple(s for a, s in zip(axes, shape, strict=True) if a != "C")
    assert pred.labels.shape == want and pred.labels.dtype == np.int32
    assert pred.probabilities.shape == (3, *want) and pred.probabilities.dtype == np.float32
    assert pred.axes == spatial
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int32, bool])
def test_dtypes_accepted_and_input_untouched(tiny, nuclei, dtype):
    img = nuclei[0].astype(dtype)
    before = img.copy()
    pred = tiny.predict(img, device="cpu")
    assert pred.labels.shape == img.shape
    assert np.array_equal(img, before)


def test_nested_lists_predict_like_the_array(tiny, nuclei):
    img = nuclei[0][:40, :48].astype(np.float32)
    as_list = tiny.predict(img.tolist(), device="cpu")  # before: AttributeError ('list' ... shape)
    np.testing.assert_array_equal(as_list.labels, tiny.predict(img, device="cpu").labels)


def test_tiled_equals_whole(tiny, nuclei):
    img = nuclei[0]
    whole = tiny.predict(img, tile_shape=(96, 96)).probabilities
    tiled = tiny.predict(img, tile_shape=(48, 48), overlap=24).probabilities
    assert np.abs(whole - tiled).max() < 1e-3


def test_rgb_and_multichannel():
    rgb = np.random.default_rng(1).integers(0, 255, (40, 44, 3), dtype=np.uint8)
    seg3 = nu.Segmenter.new(in_channels=3, base_channels=4, depth=2)
    assert seg3.predict(rgb).labels.shape == (40, 44)  # guessed YXC
    seg1 = nu.Segmenter.new(base_channels=4, depth=2)
    with pytest.raises(ValueError, match="takes 1 channel.*has 3"):
        seg1.predict(rgb)
    assert seg1.predict(rgb, channel=1).labels.shape == (40, 44)


def test_3d_network_whole_volume():
    seg = nu.Segmenter.new(ndim=3, base_channels=4, depth=2)
    vol = np.random.default_rng(0).random((10, 30, 34)).astype(np.float32)
    pred = seg.predict(vol, axes="ZYX")
    assert pred.labels.shape == (10, 30, 34)
    with pytest.raises(ValueError, match="3D model"):
        seg.predict(vol[0], axes="YX")


@pytest.mark.parametrize(
    "image, axes, message",
    [
        (np.full((20, 20), np.nan, np.float32), None, "only NaN"),
        (np.pad(np.full((1, 1), np.inf), 5), None, "NaN or infinite"),
        (np.zeros((2, 3, 4, 20, 20)), "TZYX", "name 4 dimensions but the image has 5"),
        (np.zeros((2, 3, 4, 5, 20, 20)), None, "axes"),
        (np.zeros((20, 20)), "YY", "Y"),
        (np.zeros((20, 20)), "QX", "Q"),
        (np.zeros((0, 20)), None, "empty"),
        (np.zeros((20, 20), complex), None, "real-valued"),
    ],
)
def test_bad_images_refused(tiny, image, axes, message):
    with pytest.raises(ValueError, match=message):
        tiny.predict(image, axes=axes)


def test_constant_and_tiny_images_give_no_objects_not_errors(tiny):
    for img in (
        np.zeros((30, 30)),
        np.full((30, 30), 7, np.uint16),
        np.ones((1, 1)),
        np.ones((1, 50)),
    ):
        pred = tiny.predict(img)
        assert pred.labels.shape == img.shape
        assert np.isfinite(pred.probabilities).all()


def test_device_errors(tiny):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            tiny.predict(np.zeros((16, 16)), device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        tiny.predict(np.zeros((16, 16)), device="tpu")


def test_predict_iter_progress_and_cancel(tiny, nuclei):
    gen = tiny.predict_iter(nuclei[0], tile_shape=(32, 32), overlap=8)
    first = next(gen)
    assert first[0] >= 1 and first[1] > first[0]
    gen.close()  # stopping early must not hang or raise
    events = []
    gen = tiny.predict_iter(nuclei[0], tile_shape=(32, 32), overlap=8)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        pred = stop.value
    assert events[-1][0] == events[-1][1]
    assert [d for d, _ in events] == sorted(d for d, _ in events)
    assert pred.labels.shape == nuclei[0].shape


def test_save_load_round_trip(tmp_path, tiny, nuclei):
    a = tiny.predict(nuclei[0]).probabilities
    for path in (tmp_path / "model", tmp_path / "model.safetensors"):
        tiny.save(path)
        again = nu.Segmenter.load(path)
        assert again.config["architecture"] == tiny.config["architecture"]
        np.testing.assert_allclose(again.predict(nuclei[0]).probabilities, a, atol=1e-6)


def test_foreign_and_corrupt_model_files(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelFileError):
        nu.Segmenter.load(bad)
    ckpt = tmp_path / "net.pth"
    torch.save(nu.UNet(1, 3, 4, 2).state_dict(), ckpt)
    with pytest.raises(ModelFileError, match="pickle"):
        nu.Segmenter.load(ckpt)
    # a napari-unet file whose weights do not fit its architecture
    seg = nu.Segmenter.new(base_channels=4, depth=2)
    seg.config["architecture"]["base_channels"] = 8
    seg.save(tmp_path / "mismatch")
    with pytest.raises(ModelFileError, match="do not fit"):
        nu.Segmenter.load(tmp_path / "mismatch")


def test_pretrained_unknown_name():
    with pytest.raises(ModelFileError, match="no starter model named 'cats'"):
        nu.Segmenter.pretrained("cats")


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_bad_input(nuclei):
    img, lab = nuclei
    seg = nu.Segmenter.new(base_channels=4, depth=2)
    with pytest.raises(ValueError, match="must match pixel for pixel"):
        next(seg.finetune(img, lab[:50], steps=1))
    with pytest.raises(ValueError, match="labels are empty"):
        next(seg.finetune(img, np.zeros_like(lab), steps=1))
    with pytest.raises(ValueError, match="selects no pixel"):
        next(seg.finetune(img, lab, np.zeros(lab.shape, bool), steps=1))
    with pytest.raises(ValueError, match="NaN"):
        bad = img.astype(np.float32)
        bad[3, 3] = np.nan
        next(seg.finetune(bad, lab, steps=1))
    with pytest.raises(ValueError, match="2 image"):
        next(seg.finetune([img, img], [lab], steps=1))
    with pytest.raises(ValueError, match="time limit"):
        next(seg.finetune(img, lab, steps=None, time_limit_s=None))
    with pytest.raises(ValueError, match="class id"):
        sem = nu.Segmenter.new("semantic", num_classes=2, base_channels=4, depth=2)
        next(sem.finetune(img, lab, steps=1))


def test_finetune_takes_labels_with_huge_ids(nuclei):
    """Object ids such as 2**40 (other tools' label images): before, a MemoryError from a
    per-id table; the same objects as numbered 1..N, and the input untouched."""
    img, lab = nuclei
    huge = lab.astype(np.uint64) * np.uint64(2**40)
    before = huge.copy()
    runs = []
    for labels in (lab, huge):
        seg = nu.Segmenter.new(base_channels=4, depth=2, seed=0)
        runs.append(list(seg.finetune(img, labels, steps=2, time_limit_s=None, seed=0))[-1])
        runs[-1] = (seg.config["history"][-1]["objects"], runs[-1].loss)
    assert runs[0] == runs[1] and runs[0][0] == lab.max()
    np.testing.assert_array_equal(huge, before)
    with pytest.raises(ValueError, match="class id"):  # class ids are not renumbered
        sem = nu.Segmenter.new("semantic", num_classes=2, base_channels=4, depth=2)
        next(sem.finetune(img, (lab > 0) * 2**40, steps=1))


def test_finetune_changes_weights_records_history_and_leaves_input(nuclei):
    img, lab = nuclei
    img0, lab0 = img.copy(), lab.copy()
    seg = nu.Segmenter.new(base_channels=4, depth=2)
    w0 = seg.net.outc.weight.detach().clone()
    events = list(seg.finetune(img, lab, steps=3, time_limit_s=None, names=["cells.tif"]))
    assert [e.step for e in events[:-1]] == [1, 2]
    assert events[-1].done and events[-1].step == 3 and "step limit" in events[-1].reason
    assert not torch.equal(w0, seg.net.outc.weight)
    assert np.array_equal(img, img0) and np.array_equal(lab, lab0)
    h = seg.config["history"][-1]
    assert h["steps"] == 3 and h["trained_on"] == ["cells.tif"]
    assert seg.config["trained_on"] == ["cells.tif"]


def test_finetune_stop_keeps_a_usable_model(nuclei):
    img, lab = nuclei
    seg = nu.Segmenter.new(base_channels=4, depth=2)
    gen = seg.finetune(img, lab, time_limit_s=600)
    ev = next(gen)
    gen.close()  # the Stop button
    assert ev.step == 1
    assert seg.config["history"][-1]["stopped"] == "stopped by the user"
    assert all(torch.isfinite(p).all() for p in seg.net.parameters())
    assert seg.predict(img).labels.shape == img.shape


def test_finetune_is_deterministic(nuclei):
    img, lab = nuclei
    outs = []
    for _ in range(2):
        seg = nu.Segmenter.new(base_channels=4, depth=2, seed=1)
        list(seg.finetune(img, lab, steps=2, time_limit_s=None, seed=5, num_threads=1))
        outs.append(seg.net.outc.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


def test_masked_pixels_are_ignored(nuclei):
    """Labels outside the mask do not matter: garbage there gives the same weights."""
    img, lab = nuclei
    mask = np.zeros(lab.shape, bool)
    mask[:48] = True
    garbage = lab.copy()
    garbage[48:] = np.random.default_rng(0).integers(0, 50, garbage[48:].shape)
    outs = []
    for labels in (lab, garbage):
        seg = nu.Segmenter.new(base_channels=4, depth=2, seed=1)
        list(seg.finetune(img, labels, mask, steps=2, time_limit_s=None, seed=5, num_threads=1))
        outs.append(seg.net.outc.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


def test_semantic_task_trains_and_predicts_classes():
    img, lab = make_nuclei((64, 64), seed=2)
    seg = nu.Segmenter.new("semantic", num_classes=2, base_channels=4, depth=2)
    list(seg.finetune(img, (lab > 0).astype(np.uint8), steps=2, time_limit_s=None))
    pred = seg.predict(img)
    assert pred.probabilities.shape == (2, 64, 64)
    assert set(np.unique(pred.labels)) <= {0, 1}


def test_finetune_3d_volume_with_2d_and_3d_nets():
    vol, lab = make_nuclei((8, 48, 48), seed=4)
    for ndim in (2, 3):
        seg = nu.Segmenter.new(ndim=ndim, base_channels=4, depth=2)
        events = list(seg.finetune(vol, lab, axes="ZYX", steps=2, time_limit_s=None))
        assert events[-1].done
        assert seg.predict(vol, axes="ZYX").labels.shape == vol.shape


def test_lazy_inputs_match_numpy(tiny, nuclei):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    img = nuclei[0]
    ref = tiny.predict(img, tile_shape=(48, 48), overlap=16)
    lazy = tiny.predict(da.from_array(img, chunks=(32, 32)), tile_shape=(48, 48), overlap=16)
    z = zarr.create_array(
        store=zarr.storage.MemoryStore(), shape=img.shape, chunks=(32, 32), dtype=img.dtype
    )
    z[:] = img
    zpred = tiny.predict(z, tile_shape=(48, 48), overlap=16)
    for other in (lazy, zpred):
        np.testing.assert_allclose(other.probabilities, ref.probabilities, atol=1e-5)
        assert np.array_equal(other.labels, ref.labels)
