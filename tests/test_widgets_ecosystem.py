"""Widgets of the ecosystem features: 'Export to bioimage.io…' in the Models widget."""

from __future__ import annotations

import zipfile

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_unet._widgets import _model_actions as model_actions  # noqa: E402
from napari_unet._widgets import _model_files as model_files  # noqa: E402
from napari_unet._widgets import models as models_mod  # noqa: E402
from napari_unet._widgets.models import ModelManagerWidget  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402


def test_export_to_bioimageio_button(viewer_session, qtbot, tmp_path, monkeypatch):
    viewer, session = viewer_session
    got = {"info": [], "error": []}
    for kind in got:
        for module in (models_mod, model_files, model_actions):
            monkeypatch.setattr(module, f"show_{kind}", got[kind].append, raising=False)
    monkeypatch.setattr(models_mod, "_starter_entries", lambda: [])
    session.set_segmenter(Segmenter.new(base_channels=4, depth=2), name="tiny")
    w = ModelManagerWidget(viewer)
    target = tmp_path / "tiny"  # the dialog's answer without the suffix
    monkeypatch.setattr(
        model_files.QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), "")
    )
    w.bioimageio_button.click()
    worker = w._export_worker
    steps = []
    worker.yielded.connect(steps.append)
    qtbot.waitUntil(lambda: bool(got["info"] or got["error"]), timeout=60_000)
    assert not got["error"], got["error"]
    out = tmp_path / "tiny.zip"
    assert zipfile.is_zipfile(out) and "bioimage.io package written" in got["info"][0]
    assert Segmenter.load(out).config["name"] == "tiny"
