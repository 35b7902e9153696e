"""Bad input to the OME-Zarr reader and writer: damaged chunk files, inconsistent or unreadable
arguments to ``write_labels``, and metadata whose shape claims far more chunks than are stored.

Tiny stores in tmp_path; no napari, no Qt.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")

from napari_unet import omezarr as oz  # noqa: E402
from napari_unet import omezarr_read  # noqa: E402
from napari_unet.blockcache import BlockCache  # noqa: E402


def _labels(shape=(32, 32)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 5, shape).astype(np.int32)


def _image(shape=(32, 32)) -> np.ndarray:
    return np.random.default_rng(1).random(shape).astype(np.float32)


def _store_with_image(tmp_path: Path, chunks=None) -> Path:
    return oz.write_labels(
        tmp_path / "a.ome.zarr",
        _labels(),
        chunks=chunks,
        levels=1,
        image=_image(),
        image_axes="YX",
    )


def _damage(chunk_file: Path) -> None:
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"\x01\x02garbage!")  # 10 bytes no codec can decode


# ------------------------------------------------------------------------ damaged chunks


def test_damaged_chunk_is_named(tmp_path: Path) -> None:
    out = _store_with_image(tmp_path)  # the image is one 32x32 chunk: 0/0/0
    _damage(out / "0" / "0" / "0")
    ome = oz.read(out)  # metadata and chunk presence are fine: reading the data fails
    with pytest.raises(oz.OmeZarrError) as e:
        np.asarray(ome.image.data)
    msg = str(e.value)
    assert f"chunk (0, 0) of {out / '0'} cannot be decoded: the file is damaged" in msg
    assert "Copy the store again" in msg
    assert isinstance(e.value.__cause__, Exception)  # the codec's error is kept as the cause
    # the labels (another array) still read
    assert (ome.labels["labels"].data.compute() == _labels()).all()


def test_damaged_chunk_through_predict(tmp_path: Path) -> None:
    from napari_unet import Segmenter

    out = _store_with_image(tmp_path)
    _damage(out / "0" / "0" / "0")
    with pytest.raises(oz.OmeZarrError, match=r"chunk \(0, 0\) of .* cannot be decoded"):
        Segmenter.new().predict(omezarr_read.read(out).image.data)


def test_damaged_chunk_in_a_bigger_block_is_found(tmp_path: Path) -> None:
    """A read spanning several chunks names the damaged one (found only once a read failed)."""
    out = oz.write_labels(tmp_path / "b.ome.zarr", _labels(), chunks=(16, 16), levels=1)
    arr_dir = out / "labels" / "labels" / "0"
    _damage(arr_dir / "1" / "0")
    data = oz.read(out).labels["labels"].data
    assert data.chunksize == (16, 16)
    assert (data[:16].compute() == _labels()[:16]).all()  # the good half reads
    with pytest.raises(oz.OmeZarrError, match=r"chunk \(1, 0\) of .* cannot be decoded"):
        data.rechunk((32, 32)).compute()
    with pytest.raises(oz.OmeZarrError, match=r"chunk \(1, 0\) of .*labels.0 cannot be decoded"):
        BlockCache(data)[:, :]


def test_damaged_chunk_zarr_v3(tmp_path: Path) -> None:
    """NGFF 0.5 on zarr format 3 (chunk files ``c/i/j``), written with zarr directly."""
    p = tmp_path / "v3.ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=3)
    a = g.create_array("0", shape=(32, 32), chunks=(16, 16), dtype="float32")
    a[:] = _image()
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}
                ],
            }
        ],
    }
    assert (oz.read(p).image.data.compute() == _image()).all()
    _damage(p / "0" / "c" / "0" / "1")
    with pytest.raises(oz.OmeZarrError, match=r"chunk \(0, 1\) of .* cannot be decoded"):
        oz.read(p).image.data.compute()
    os.remove(p / "0" / "c" / "0" / "1")  # missing chunk files are still found in v3 stores
    with pytest.raises(oz.OmeZarrError, match=r"1 of 4 chunks of level 0 are missing.*\(0, 1\)"):
        oz.read(p)


def test_damaged_chunk_of_a_zarr_array_in_blockcache(tmp_path: Path) -> None:
    p = tmp_path / "plain.zarr"
    a = zarr.create_array(str(p), shape=(16, 16), chunks=(8, 8), dtype="uint16", zarr_format=2)
    a[:] = 7
    _damage(p / "1.1")
    cache = BlockCache(zarr.open_array(str(p), mode="r"))
    assert (cache[:8, :] == 7).all()
    with pytest.raises(ValueError, match=r"chunk \(1, 1\) of .*plain.zarr cannot be decoded"):
        cache[8:, 8:]


# ------------------------------------------------------------------ write_labels refuses


_LAB = np.zeros((24, 24), np.int32)
_IMG = np.zeros((24, 24), np.float32)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(image=_IMG[:10], image_axes="YX"), "does not match the labels"),
        (dict(image=np.zeros((2, 24, 20), np.float32), image_axes="CYX"), "does not match"),
        (dict(image=np.zeros((3, 24, 24), np.float32), image_axes="ZYX"), "does not match"),
        (dict(image=_IMG.astype(np.complex64), image_axes="YX"), "real-valued"),
        (dict(image=_IMG.astype(object), image_axes="YX"), "real-valued"),
        (dict(image=_IMG), "image_axes are needed"),
        (dict(image=_IMG, image_axes="YX", image_scale=(0, 1)), "positive and finite"),
        (dict(scale=(-1, 1)), "positive and finite"),
        (dict(scale=(float("nan"), 1)), "positive and finite"),
        (dict(scale=(1, float("inf"))), "positive and finite"),
        (dict(scale=(1,)), "one per axis"),
        (dict(scale="11"), "sequence of 2 numbers"),
        (dict(scale=("a", 1)), "must be numbers"),
        (dict(chunks=(0, 0)), "positive integers"),
        (dict(chunks=(8.5, 8)), "positive integers"),
        (dict(chunks=(8,)), "one chunk size per axis"),
        (dict(levels=0), "at least 1"),
        (dict(colors={1: "red"}), "the colour of label 1 is 'red'"),
        (dict(colors={1: (1, 0)}), "the colour of label 1"),
        (dict(colors={1: (300, 0, 0)}), "0..255"),
        (dict(colors={1: (float("nan"), 0, 0)}), "the colour of label 1"),
        (dict(colors={"a": (1, 0, 0)}), "not a label value"),
        (dict(colors=[(1, 0, 0)]), "must be a dict"),
    ],
)
def test_write_labels_refuses_before_writing(tmp_path: Path, kwargs, needle) -> None:
    out = tmp_path / "w" / "x.ome.zarr"
    with pytest.raises(ValueError, match=needle):
        oz.write_labels(out, _LAB, "YX", **kwargs)
    assert not (tmp_path / "w").exists()  # nothing written, not even the parent folder


def test_create_labels_refuses_unreadable_stores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="labels must be integers"):
        oz.create_labels(tmp_path / "f.ome.zarr", (8, 8), "YX", dtype="float32")
    with pytest.raises(ValueError, match="units"):
        oz.create_labels(tmp_path / "u.ome.zarr", (8, 8), "YX", units={"Y": 1})
    with oz.create_labels(tmp_path / "c.ome.zarr", (8, 8), "YX") as w:
        with pytest.raises(ValueError, match="colour of label 2"):
            w.finish(colors={2: "blue"})
    assert not os.listdir(tmp_path)


def test_valid_arguments_still_round_trip(tmp_path: Path) -> None:
    img = np.random.default_rng(2).random((3, 24, 24)).astype(np.float32)
    out = oz.write_labels(
        tmp_path / "ok.ome.zarr",
        _LAB,
        "YX",
        scale=(0.5, 0.5),
        chunks=(np.int64(8), 8),
        levels=2,
        colors={1: (255, 0, 0), np.int32(2): (0.0, 1.0, 0.0, 0.5)},
        image=img,
        image_axes="CYX",
        image_scale=(1, 0.5, 0.5),
    )
    ome = oz.read(out)
    assert ome.labels["labels"].scales[0] == (0.5, 0.5)
    assert ome.colors["labels"][1] == (1.0, 0.0, 0.0, 1.0)
    assert ome.colors["labels"][2] == (0.0, 1.0, 0.0, round(0.5 * 255) / 255)
    assert np.allclose(ome.image.data.compute(), img)


# ------------------------------------------------- metadata claiming many more chunks


def _claim_shape(tmp_path: Path, shape: list[int]) -> Path:
    out = oz.write_labels(tmp_path / "c.ome.zarr", np.ones((96, 96), np.int32), levels=1)
    za = out / "labels" / "labels" / "0" / ".zarray"
    meta = json.loads(za.read_text())
    assert meta["chunks"] == [96, 96]
    meta["shape"] = shape
    za.write_text(json.dumps(meta))
    return out


def test_shape_claiming_a_hundred_million_chunks_is_refused_fast(tmp_path: Path) -> None:
    out = _claim_shape(tmp_path, [1_000_000, 1_000_000])  # 10417**2 = 1.1e8 chunk slots
    t = time.perf_counter()
    with pytest.raises(oz.OmeZarrError) as e:
        oz.read(out)
    assert time.perf_counter() - t < 2
    msg = str(e.value)
    assert "108513888 of 108513889 chunks of level 0 are missing" in msg
    assert "claims 108513889 chunks but it holds 1 chunk files" in msg
    assert "first: chunk (0, 1)" in msg


def test_million_chunk_slots_keep_the_count_message(tmp_path: Path) -> None:
    out = _claim_shape(tmp_path, [96_000, 96_000])
    t = time.perf_counter()
    with pytest.raises(oz.OmeZarrError, match="999999 of 1000000 chunks of level 0 are missing"):
        oz.read(out)
    assert time.perf_counter() - t < 1


def test_missing_chunk_found_with_dot_separator(tmp_path: Path) -> None:
    """zarr 2's default "i.j" chunk names (not what write_labels writes) are counted too."""
    p = tmp_path / "dot.ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=2)
    a = g.create_array("0", shape=(20, 30), chunks=(10, 10), dtype="uint8")
    a[:] = 1
    g.attrs["multiscales"] = [
        {"version": "0.4", "axes": ["y", "x"], "datasets": [{"path": "0"}]}  # 0.3-style axes
    ]
    assert oz.read(p).image.data.compute().sum() == 600
    os.remove(p / "0" / "0.0")
    os.remove(p / "0" / "1.2")
    with pytest.raises(oz.OmeZarrError, match=r"2 of 6 chunks .* \(first: chunk \(0, 0\)"):
        oz.read(p)
