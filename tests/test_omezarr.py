"""OME-Zarr in and out (napari_unet.omezarr) and ``napari-unet predict`` with OME-Zarr.

Tiny arrays; no napari, no Qt (the napari reader is tested in test_widgets_omezarr.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")
tifffile = pytest.importorskip("tifffile")

from napari_unet import cli  # noqa: E402
from napari_unet import omezarr as oz  # noqa: E402
from napari_unet._reader import get_reader  # noqa: E402
from napari_unet.synthetic import make_nuclei  # noqa: E402


@pytest.fixture(autouse=True)
def registry_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "registry"
    monkeypatch.setenv("NAPARI_UNET_HOME", str(home))
    return home


def _labels(shape=(40, 52), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 7, shape).astype(np.int32)


def _zattrs(path: Path) -> dict:
    return json.loads((path / ".zattrs").read_text())


# ----------------------------------------------------------------------------- writing


def test_round_trip_and_pyramid(tmp_path: Path) -> None:
    lab = _labels()
    img = np.random.default_rng(1).random((40, 52)).astype(np.float32)
    out = oz.write_labels(
        tmp_path / "a.ome.zarr",
        lab,
        "YX",
        scale=(0.5, 0.25),
        chunks=(16, 16),
        levels=3,
        name="cells",
        colors={1: (1.0, 0.0, 0.0, 1.0)},
        image=img,
        image_axes="YX",
    )
    ome = oz.read(out)
    L = ome.labels["cells"]
    assert L.axes == "YX" and isinstance(L.data, da.Array)
    np.testing.assert_array_equal(L.data.compute(), lab)
    assert [lv.shape for lv in L.levels] == [(40, 52), (20, 26), (10, 13)]
    for k, lv in enumerate(L.levels):  # nearest neighbour: ids never averaged
        np.testing.assert_array_equal(lv.compute(), lab[:: 2**k, :: 2**k])
    assert L.scales == [(0.5, 0.25), (1.0, 0.5), (2.0, 1.0)]
    assert ome.colors["cells"] == {1: (1.0, 0.0, 0.0, 1.0)}
    np.testing.assert_array_equal(ome.image.data.compute(), img)
    np.testing.assert_allclose(
        ome.image.levels[1].compute(), img.reshape(20, 2, 26, 2).mean(axis=(1, 3)), rtol=1e-6
    )
    # the metadata on disk, as NGFF 0.4 readers want it (zarr format 2, "/" separator)
    root = _zattrs(out)
    assert root["multiscales"][0]["version"] == "0.4"
    assert _zattrs(out / "labels") == {"labels": ["cells"]}
    meta = _zattrs(out / "labels" / "cells")
    ms = meta["multiscales"][0]
    assert ms["axes"] == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert ms["datasets"][2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [2.0, 1.0]}
    ]
    assert meta["image-label"]["version"] == "0.4"
    assert meta["image-label"]["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
    assert meta["image-label"]["source"] == {"image": "../../"}
    zarray = json.loads((out / "labels" / "cells" / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temp folder left


def test_dask_input_3d_and_default_levels(tmp_path: Path) -> None:
    lab = np.zeros((3, 600, 300), np.int32)
    lab[:, 100:200, 50:90] = 5
    out = oz.write_labels(tmp_path / "v.ome.zarr", da.from_array(lab, chunks=(1, 128, 128)))
    L = oz.read(out).labels["labels"]
    assert L.axes == "ZYX"
    # halved in Y and X (never Z) until both are at most 256
    assert [lv.shape for lv in L.levels] == [(3, 600, 300), (3, 300, 150), (3, 150, 75)]
    np.testing.assert_array_equal(L.levels[2].compute(), lab[:, ::4, ::4])
    assert L.levels[0].chunksize == (1, 512, 300)


def test_writer_fills_level0_then_finish(tmp_path: Path) -> None:
    """The path of big predictions: level 0 written piece by piece, then the pyramid."""
    lab = _labels((33, 17))
    target = tmp_path / "w.ome.zarr"
    w = oz.create_labels(target, lab.shape, "YX", chunks=(8, 8))
    assert not target.exists()  # only a hidden temp folder until finish
    for y in range(0, 33, 8):
        w.array[y : y + 8] = lab[y : y + 8]
    w.finish(levels=2)
    np.testing.assert_array_equal(oz.read(target).labels["labels"].levels[1], lab[::2, ::2])


def test_no_overwrite_and_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.ome.zarr"
    oz.write_labels(target, np.ones((8, 8), np.int32), levels=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        oz.write_labels(target, np.zeros((8, 8), np.int32))
    np.testing.assert_array_equal(oz.read(target).labels["labels"].data, 1)
    oz.write_labels(target, np.full((8, 8), 2, np.int32), levels=1, overwrite=True)
    np.testing.assert_array_equal(oz.read(target).labels["labels"].data, 2)
    with pytest.raises(RuntimeError), oz.create_labels(tmp_path / "y.ome.zarr", (8, 8), "YX"):
        raise RuntimeError("prediction failed")
    assert sorted(os.listdir(tmp_path)) == ["x.ome.zarr"]  # no y, no temp folder
    with pytest.raises(ValueError, match="integers"):
        oz.write_labels(tmp_path / "f.ome.zarr", np.zeros((4, 4), np.float32))


# ----------------------------------------------------------------------------- bad input


def test_missing_chunk_is_named(tmp_path: Path) -> None:
    out = oz.write_labels(tmp_path / "m.ome.zarr", _labels((32, 32)), chunks=(16, 16), levels=1)
    os.remove(out / "labels" / "labels" / "0" / "1" / "0")
    with pytest.raises(oz.OmeZarrError) as e:
        oz.read(out)
    msg = str(e.value)
    assert str(out / "labels" / "labels" / "0") in msg
    assert "1 of 4 chunks of level 0 are missing" in msg and "(1, 0)" in msg
    lab = oz.read(out, missing_chunks="fill").labels["labels"].data.compute()
    assert (lab[16:, :16] == 0).all()  # read as the fill value when asked for


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.pop("axes"), "'axes' is missing"),
        (lambda m: m["axes"].insert(0, {"name": "z"}), "2 dimensions but 3 axes"),
        (lambda m: m["axes"].pop(), "must be distinct and include y and x"),
        (lambda m: m["axes"][0].update(name="q"), "is not one of t, c, z, y, x"),
        (lambda m: m.update(datasets=[]), "'datasets' is missing or empty"),
        (lambda m: m["datasets"][0].update(path="7"), "level 0 (dataset path '7')"),
        (
            lambda m: m["datasets"][0]["coordinateTransformations"][0].update(scale=[1.0]),
            "needs one number per axis",
        ),
        (
            lambda m: m["datasets"][0]["coordinateTransformations"][0].update(scale=[0, 1]),
            "must be positive",
        ),
        (lambda m: m["datasets"].reverse(), "is larger than level 0"),
    ],
)
def test_wrong_metadata_is_named(tmp_path: Path, edit, needle: str) -> None:
    out = oz.write_labels(tmp_path / "b.ome.zarr", _labels((16, 16)), levels=2)
    attrs_path = out / "labels" / "labels" / ".zattrs"
    attrs = json.loads(attrs_path.read_text())
    edit(attrs["multiscales"][0])
    attrs_path.write_text(json.dumps(attrs))
    with pytest.raises(oz.OmeZarrError) as e:
        oz.read(out)
    assert needle in str(e.value) and str(out) in str(e.value)


def test_not_ome_zarr(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        oz.read(tmp_path / "none.ome.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=2)
    with pytest.raises(oz.OmeZarrError, match="not an OME-Zarr"):
        oz.read(plain)
    (tmp_path / "listed.ome.zarr" / "labels").mkdir(parents=True)
    (tmp_path / "listed.ome.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    (tmp_path / "listed.ome.zarr" / "labels" / ".zattrs").write_text('{"labels": ["gone"]}')
    with pytest.raises(oz.OmeZarrError, match="'gone' listed in .* is not there"):
        oz.read(tmp_path / "listed.ome.zarr")
    assert get_reader(str(plain)) is None and get_reader(str(tmp_path / "x.tif")) is None


def test_reads_ngff_05_zarr_v3(tmp_path: Path) -> None:
    p = tmp_path / "v3.ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=3)
    a = g.create_array("s0", shape=(2, 8, 6), chunks=(1, 8, 6), dtype="uint16")
    a[:] = np.arange(96, dtype=np.uint16).reshape(2, 8, 6)
    axes = [{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}]
    ct = [{"type": "scale", "scale": [1.0, 0.3, 0.3]}]
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "s0", "coordinateTransformations": ct}]}
        ],
    }
    ome = oz.read(p)
    assert ome.image.axes == "CYX" and ome.image.scales == [(1.0, 0.3, 0.3)]
    np.testing.assert_array_equal(ome.image.data.compute(), a[:])


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def image_tif(tmp_path: Path) -> Path:
    image, _ = make_nuclei((96, 80), seed=1)
    p = tmp_path / "cells.tif"
    tifffile.imwrite(p, image)
    return p


def run(*argv: str) -> int:
    return cli.main(["--threads", "1", *argv])


def test_cli_predict_to_ome_zarr_equals_tiff(
    tmp_path: Path, image_tif: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "pretrained:nuclei"  # finds objects, so the comparison is not of two blank images
    assert (
        run("predict", model, str(image_tif), "-o", str(tmp_path / "t"), "--cluster", "none") == 0
    )
    out = tmp_path / "cells.ome.zarr"
    assert run("predict", model, str(image_tif), "-o", str(out)) == 0
    assert "cells.ome.zarr (labels/unet, OME-Zarr)" in capsys.readouterr().out
    expected = tifffile.imread(tmp_path / "t" / "cells_labels.tif")
    assert expected.max() > 0
    ome = oz.read(out)
    np.testing.assert_array_equal(ome.labels["unet"].data.compute(), expected)
    np.testing.assert_array_equal(ome.image.data.compute(), tifffile.imread(image_tif))
    # never over an existing output without --overwrite
    code = run("predict", model, str(image_tif), "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "exists already; add --overwrite" in err and str(out) in err
    assert run("predict", model, str(image_tif), "-o", str(out), "--overwrite") == 0
    # an OME-Zarr input (read lazily) into a folder: <stem>_labels.ome.zarr
    assert run("predict", model, str(out), "-o", str(tmp_path / "z")) == 0
    again = oz.read(tmp_path / "z" / "cells_labels.ome.zarr").labels["unet"].data.compute()
    np.testing.assert_array_equal(again, expected)


def test_cli_ome_zarr_errors(
    tmp_path: Path, image_tif: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o.ome.zarr")
    assert run("predict", "new", str(image_tif), str(image_tif), "-o", out) == 2
    assert "takes one image, not 2" in capsys.readouterr().err
    bad = oz.write_labels(tmp_path / "in.ome.zarr", np.zeros((8, 8), np.int32), levels=1)
    assert run("predict", "new", str(bad), "-o", str(tmp_path / "d")) == 2
    assert "holds label images but no image" in capsys.readouterr().err
    img = oz.write_labels(
        tmp_path / "im.ome.zarr",
        np.zeros((32, 32), np.int32),
        chunks=(16, 16),
        levels=1,
        image=np.ones((32, 32), np.float32),
        image_axes="YX",
    )
    os.remove(img / "0" / "0" / "0")  # the image is one 32x32 chunk
    assert run("predict", "new", str(img), "-o", str(tmp_path / "d")) == 2
    err = capsys.readouterr().err
    assert "chunks of level 0 are missing" in err and str(img / "0") in err
    assert not (tmp_path / "d" / "im_labels.ome.zarr").exists()
