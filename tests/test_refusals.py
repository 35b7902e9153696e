"""Inputs that are refused before any work, with a message naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet import Segmenter, batch
from napari_unet.synthetic import make_nuclei


@pytest.fixture(scope="module")
def tiny():
    return Segmenter.new(base_channels=4, depth=2)


def test_labels_out_that_is_the_image_is_refused_and_the_image_kept(tiny, tmp_path):
    image, _ = make_nuclei((64, 64), seed=0)
    x = image.astype(np.int32)
    before = x.copy()
    for out in (x, x[:, :]):  # the array, or a view of it
        with pytest.raises(ValueError, match="labels_out is the image itself"):
            tiny.predict(x, labels_out=out)
    assert np.array_equal(x, before)
    z = zarr.open_array(tmp_path / "s.zarr", mode="w", shape=(2, 64, 64), dtype="i4")
    z[:] = np.stack([x, x])
    again = zarr.open_array(tmp_path / "s.zarr", mode="r+")  # the same store, opened twice
    with pytest.raises(ValueError, match="labels_out is the image itself"):
        tiny.predict(z, axes="ZYX", labels_out=again)
    assert np.array_equal(z[0], before)
    with pytest.raises(ValueError, match="labels_out is the image itself"):
        batch.predict_array(tiny, z, "ZYX", labels_out=z)
    other = np.zeros((2, 64, 64), np.int32)  # a separate array is fine
    tiny.predict(z, axes="ZYX", labels_out=other)


def test_predict_array_checks_labels_out_as_predict_does(tiny):
    stack, _ = make_nuclei((3, 48, 48), seed=2)
    for dtype, words in [(np.uint8, "too small for instance ids"), (np.float16, "integer")]:
        with pytest.raises(ValueError, match=words):
            batch.predict_array(tiny, stack, "TYX", labels_out=np.zeros((3, 48, 48), dtype))
    with pytest.raises(ValueError, match="shape"):
        batch.predict_array(tiny, stack, "TYX", labels_out=np.zeros((3, 48, 47), np.int32))


def test_an_empty_z_axis_is_refused(tiny):
    with pytest.raises(ValueError, match="is empty"):
        tiny.predict(np.zeros((0, 64, 64), np.float32), axes="ZYX")


@pytest.mark.parametrize("scale", [(1e-6, 1, 1), (1, 1000, 1000), (1e-30, 1, 1)])
def test_a_scale_mixing_units_is_refused(tiny, scale):
    """(1e-6, 1, 1) hung the 3D assembly; (1, 1000, 1000) found nothing without a word."""
    v, _ = make_nuclei((6, 32, 32), seed=1)
    with pytest.raises(ValueError, match="same unit"):
        tiny.predict(v, axes="ZYX", scale=scale)


def test_a_time_step_may_differ_from_the_pixel_size(tiny):
    stack, _ = make_nuclei((2, 32, 32), seed=1)
    pred = tiny.predict(stack, axes="TYX", scale=(600.0, 0.1, 0.1))  # 10 minutes, 0.1 um
    assert pred.labels.shape == (2, 32, 32)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dropout=2.0), "dropout"),
        (dict(task="semantic", num_classes=2.5), "num_classes"),
        (dict(in_channels="1"), "in_channels"),
        (dict(depth=0), "depth"),
    ],
)
def test_new_refuses_bad_network_sizes_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Segmenter.new(**kwargs)


def test_a_torch_tensor_is_predicted_as_its_numpy_array():
    import torch

    seg = Segmenter.pretrained("nuclei")
    image, _ = make_nuclei((64, 64), seed=0)
    want = seg.predict(image.astype(np.float32)).labels
    assert want.max() > 3
    got = seg.predict(torch.from_numpy(image.astype(np.float32))).labels
    np.testing.assert_array_equal(got, want)


def test_load_needs_a_path():
    for bad in (None, 3):
        with pytest.raises(TypeError, match="needs a path"):
            Segmenter.load(bad)


def test_save_refuses_what_load_would_refuse_and_keeps_the_good_model(tmp_path):
    import torch

    seg = Segmenter.new(base_channels=4, depth=2)
    good = seg.save(tmp_path / "m")
    before = (good / "weights.safetensors").read_bytes()
    broken = seg.copy()
    broken.config["tile_shape"] = [0, 0]
    with pytest.raises(ValueError, match="tile_shape"):
        broken.save(good)
    diverged = seg.copy()
    with torch.no_grad():
        next(diverged.net.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        diverged.save(good)
    assert (good / "weights.safetensors").read_bytes() == before
    Segmenter.load(good)


def test_a_mask_with_nan_is_refused(tiny):
    image, labels = make_nuclei((64, 64), seed=0)
    mask = np.ones((64, 64), np.float32)
    mask[:8] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        for _ in tiny.finetune(image, labels, masks=mask, steps=1):
            pass


def test_evaluate_of_a_complex_tiff_is_a_clear_error(tmp_path, capsys):
    import tifffile

    from napari_unet import cli

    path = tmp_path / "c.tif"
    tifffile.imwrite(path, (np.ones((8, 8)) + 1j).astype(np.complex64))
    assert cli.main(["evaluate", str(path), "--truth", str(path)]) == 2
    err = capsys.readouterr().err
    assert "complex64" in err and "Traceback" not in err


def test_predict_files_into_a_file_is_refused(tiny, tmp_path):
    import tifffile

    image, _ = make_nuclei((32, 32), seed=0)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, image)
    with pytest.raises(batch.BatchError, match="is a file"):
        batch.predict_files(tiny, [path], path)
    np.testing.assert_array_equal(tifffile.imread(path), image)


def test_a_damaged_chunk_of_a_zarr_array_given_to_predict_is_named(tiny, tmp_path):
    image, _ = make_nuclei((64, 64), seed=0)
    z = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=(64, 64), chunks=(32, 32), dtype="u2")
    z[:] = image
    chunk = next(p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file() and p.name == "1")
    chunk.write_bytes(b"0123456789")  # one chunk file overwritten
    with pytest.raises(ValueError, match="cannot be decoded"):
        tiny.predict(zarr.open_array(tmp_path / "a.zarr", mode="r"))


def test_a_masked_array_with_masked_pixels_is_refused(tiny):
    image, _ = make_nuclei((32, 32), seed=0)
    masked = np.ma.masked_greater(image, image.mean())
    with pytest.raises(ValueError, match="masked array"):
        tiny.predict(masked)
    whole = np.ma.masked_array(image, mask=False)  # nothing masked: its data
    np.testing.assert_array_equal(tiny.predict(whole).labels, tiny.predict(image).labels)
