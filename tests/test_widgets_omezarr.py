"""OME-Zarr written by the CLI opens in napari (the plugin's reader) as Image + Labels layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")
tifffile = pytest.importorskip("tifffile")

from napari.layers import Image, Labels  # noqa: E402

from napari_unet import cli  # noqa: E402
from napari_unet import omezarr as oz  # noqa: E402
from napari_unet._widgets import _layers  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402


def test_cli_output_opens_as_labels(make_napari_viewer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    image, _ = make_nuclei((600, 80), seed=2)  # 600 rows: 3 levels (down to 256 or less)
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, image)
    out = tmp_path / "cells.ome.zarr"
    code = cli.main(["--threads", "1", "predict", "pretrained:nuclei", str(src), "-o", str(out)])
    assert code == 0
    written = oz.read(out).labels["unet"].data.compute()
    assert written.max() > 0

    viewer = make_napari_viewer()
    layers = viewer.open(str(out), plugin="napari-unet")
    kinds = {type(ly).__name__: ly for ly in layers}
    assert set(kinds) == {"Image", "Labels"}
    labels, img = kinds["Labels"], kinds["Image"]
    assert isinstance(labels, Labels) and isinstance(img, Image)
    assert labels.name == "cells [unet]" and labels.multiscale
    assert [tuple(lv.shape) for lv in labels.data] == [(600, 80), (300, 40), (150, 20)]
    assert isinstance(labels.data[0], da.Array)  # lazy: read level by level, when drawn
    np.testing.assert_array_equal(np.asarray(labels.data[0]), written)
    np.testing.assert_array_equal(np.asarray(img.data[0]), image)
    # the multiscale image layer is what the Predict widget reads: level 0, still lazy
    assert isinstance(_layers.image_array(img), da.Array)


def test_reader_refuses_damaged_store(make_napari_viewer, tmp_path: Path) -> None:
    out = oz.write_labels(tmp_path / "d.ome.zarr", np.ones((32, 32), np.int32), chunks=(16, 16))
    (out / "labels" / "labels" / "0" / "0" / "1").unlink()
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="chunks of level 0 are missing") as e:
        viewer.open(str(out), plugin="napari-unet")
    assert str(out) in str(e.value)
