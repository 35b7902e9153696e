"""ModelManagerWidget in a real (hidden) napari viewer, with tiny models in a temporary registry."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import torch  # noqa: E402

from napari_unet._widgets import _model_actions as model_actions  # noqa: E402
from napari_unet._widgets import _model_dialogs  # noqa: E402
from napari_unet._widgets import _model_files as model_files  # noqa: E402
from napari_unet._widgets import models as models_mod  # noqa: E402
from napari_unet._widgets._session import session_for  # noqa: E402
from napari_unet._widgets.models import ModelManagerWidget  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402
from napari_unet.store import ModelRegistry  # noqa: E402


def tiny(seed: int = 0, **kw) -> Segmenter:
    return Segmenter.new(base_channels=4, depth=2, seed=seed, **kw)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def messages(monkeypatch):
    got: dict[str, list[str]] = {"error": [], "info": []}
    for kind, sink in got.items():
        for module in (models_mod, model_files, model_actions):  # the widget and its parts
            monkeypatch.setattr(module, f"show_{kind}", sink.append, raising=False)
    return got


@pytest.fixture
def widget(make_napari_viewer, tmp_path, monkeypatch, messages):
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    # the registry rows alone; the shipped starter row has its own test below
    monkeypatch.setattr(models_mod, "_starter_entries", lambda: [])
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.registry = ModelRegistry(tmp_path / "models")
    session.set_segmenter(tiny(0), name="tiny")
    w = ModelManagerWidget(viewer)
    viewer.window.add_dock_widget(w, name="U-Net Models")
    return w


def row_text(w: ModelManagerWidget, name: str) -> list[str]:
    r = w.model_names().index(name)
    return [w.table.item(r, c).text() for c in range(w.table.columnCount())]


def test_save_as_lists_versions_and_load(widget, messages):
    w, s = widget, widget.session
    assert "tiny" in w.in_use_label.text() and "not saved" in w.in_use_label.text()
    assert "tiny" not in w.model_names()

    info = w.save_as("tiny")
    assert info is not None and info.version == 1
    assert "tiny" in w.model_names()
    cells = row_text(w, "tiny")
    assert cells[1] == "v1" and cells[0].startswith("●")  # in use: marked
    assert "not saved" not in w.in_use_label.text()

    # a validation score and a training history show up in the lists
    s.segmenter.config["val_score"] = 0.75
    s.segmenter.config["history"] = [{"steps": 12}, {"steps": 30}]
    s.segmenter.config["trained_on"] = ["a", "b", "c"]
    assert w.save_as("tiny").version == 2
    cells = row_text(w, "tiny")
    assert cells[1] == "v2" and cells[3] == "0.750" and cells[5] == "a, b +1"
    assert w.select("tiny")
    assert w.versions_shown() == [2, 1]
    assert w.versions_table.item(0, 2).text() == "42"  # steps trained
    assert w.versions_table.item(1, 3).text() == "–"

    # save the model under another name, then load "tiny" v1 back: its weights are in the session
    other = tiny(seed=5)
    s.set_segmenter(other, name="other")
    assert "in use: other" in w.in_use_label.text()
    w.save_as("other")
    assert w.model_names() == ["other", "tiny"]
    assert w.select("tiny", version=1)
    assert w.selected_version() == 1
    assert w.load()
    assert s.model_name == "tiny"
    want, _ = s.registry.load("tiny", 1)
    assert same_weights(s.segmenter.net.state_dict(), want)
    assert not same_weights(s.segmenter.net.state_dict(), other.net.state_dict())
    assert row_text(w, "tiny")[0].startswith("●") and not row_text(w, "other")[0].startswith("●")
    assert not messages["error"], messages


def test_refreshes_when_the_session_changes(widget, messages):
    w, s = widget, widget.session
    w.save_as("tiny")
    # e.g. Train saving a new version, then telling the widgets
    s.registry.save("tiny", s.segmenter.net.state_dict(), dict(s.segmenter.config, val_score=0.5))
    assert row_text(w, "tiny")[1] == "v1"
    s.notify_trained()
    assert row_text(w, "tiny")[1] == "v2" and row_text(w, "tiny")[3] == "0.500"
    # a model saved by another program shows after Refresh
    s.registry.save("outside", tiny(1).net.state_dict(), tiny(1).config)
    assert "outside" not in w.model_names()
    w.refresh_button.click()
    assert "outside" in w.model_names()
    assert not messages["error"], messages


def test_rename_and_delete(widget, messages, monkeypatch):
    w, s = widget, widget.session
    w.save_as("tiny")
    s.registry.save("spare", tiny(2).net.state_dict(), tiny(2).config)
    w.refresh()

    # taken and invalid names: plain error, nothing changes
    assert not w.rename("spare", old="tiny")
    assert not w.rename("a/b", old="tiny")
    assert len(messages["error"]) == 2
    assert "already exists" in messages["error"][0]
    assert w.model_names() == ["spare", "tiny"]

    # renaming the model in use renames it in the session too
    assert w.rename("cells", old="tiny")
    assert w.model_names() == ["cells", "spare"]
    assert s.model_name == "cells" and "in use: cells" in w.in_use_label.text()

    # the Rename… button asks for the name
    monkeypatch.setattr(_model_dialogs, "ask_text", lambda *a, **k: "spare two")
    w.select("spare")
    w.rename_button.click()
    assert w.model_names() == ["cells", "spare two"]

    # Delete asks; "no" keeps the model
    monkeypatch.setattr(_model_dialogs, "ask_yes_no", lambda *a, **k: False)
    w.select("spare two")
    w.delete_button.click()
    assert "spare two" in w.model_names()
    monkeypatch.setattr(_model_dialogs, "ask_yes_no", lambda *a, **k: True)
    w.delete_button.click()
    assert w.model_names() == ["cells"]

    # deleting the model in use does not unload it
    seg = s.segmenter
    assert w.delete("cells")
    assert w.model_names() == []
    assert s.segmenter is seg and s.model_name == "cells"
    assert "not saved" in w.in_use_label.text()
    assert len(messages["error"]) == 2, messages


def test_rollback_creates_a_copy_of_the_old_version(widget, messages):
    w, s = widget, widget.session
    v1 = w.save_as("tiny")
    s.set_segmenter(tiny(seed=3), name="tiny")
    w.save_as("tiny")
    assert w.select("tiny")
    assert not w.rollback_button.isEnabled()  # no version picked yet
    assert w.select("tiny", version=1)
    assert w.rollback_button.isEnabled()
    w.rollback_button.click()
    assert w.versions_shown() == [3, 2, 1]
    assert row_text(w, "tiny")[1] == "v3"
    assert w.versions_table.item(0, 0).text() == "v3 (copy of v1)"
    old, _ = s.registry.load("tiny", 1)
    new, cfg = s.registry.load("tiny", 3)
    assert same_weights(old, new) and cfg["rolled_back_from"] == 1
    assert same_weights(s.segmenter.net.state_dict(), old)  # and it is in use
    assert v1.path.is_dir()  # history kept
    assert not messages["error"], messages


def test_import_refuses_corrupt_and_pickle_files(widget, messages, tmp_path):
    w = widget
    w.save_as("tiny")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    pt = tmp_path / "model.pt"
    torch.save(w.session.segmenter.net.state_dict(), pt)
    missing = tmp_path / "nothing-here"

    for p in (bad, pt, missing):
        assert w.import_path(p) is None
    errs = messages["error"]
    assert len(errs) == 3, errs
    assert "not a valid safetensors file" in errs[0]
    assert "pickle" in errs[1]
    assert "does not exist" in errs[2]
    assert w.model_names() == ["tiny"]
    assert w.session.model_name == "tiny"


def test_export_import_round_trip(widget, messages, tmp_path, monkeypatch):
    w, s = widget, widget.session
    w.save_as("tiny")
    assert w.select("tiny")
    file = w.export_path(tmp_path / "out" / "shared.safetensors")
    assert file is not None and file.is_file()
    folder = w.export_path(tmp_path / "out" / "shared-folder")
    assert folder is not None and (folder / "config.json").is_file()

    # "tiny" is taken: the import gets a free name and does not change the model in use
    info = w.import_path(file)
    assert info is not None and info.name == "tiny (imported)"
    # the folder form, picked through the button (its config.json)
    monkeypatch.setattr(_model_dialogs, "ask_open_path", lambda *a: str(folder / "config.json"))
    w.import_button.click()
    assert w.model_names() == ["tiny", "tiny (imported 2)", "tiny (imported)"]
    assert s.model_name == "tiny"
    want = s.segmenter.net.state_dict()
    for name in ("tiny (imported)", "tiny (imported 2)"):
        got, cfg = s.registry.load(name)
        assert same_weights(got, want) and cfg["name"] == name

    # nothing selected: Export… writes the model in use
    w.table.clearSelection()
    monkeypatch.setattr(_model_dialogs, "ask_save_path", lambda *a: str(tmp_path / "current"))
    w.export_button.click()
    assert same_weights(Segmenter.load(tmp_path / "current").net.state_dict(), want)
    assert not messages["error"], messages


def test_new_untrained_and_save_as_button(widget, messages, monkeypatch):
    w, s = widget, widget.session
    seg = w.new_model("semantic", 2, num_classes=3, base_channels=4, depth=2)
    assert seg is not None and s.segmenter is seg
    assert (seg.task, seg.in_channels, seg.net.out_channels) == ("semantic", 2, 3)
    assert s.model_name == "untitled" and "not saved" in w.in_use_label.text()

    monkeypatch.setattr(_model_dialogs, "ask_text", lambda *a, **k: "seg3")
    w.save_as_button.click()
    assert w.model_names() == ["seg3"] and s.model_name == "seg3"
    assert row_text(w, "seg3")[2] == "semantic"

    # a bad name: plain error, no exception
    assert w.save_as("") is None
    assert len(messages["error"]) == 1 and "empty" in messages["error"][0]

    # a training running in this viewer: the model in use is not swapped under it
    s.training_lock.acquire()
    try:
        assert w.new_model(base_channels=4, depth=2) is None
        assert not w.load("seg3")
        assert "training is running" in messages["error"][-1]
    finally:
        s.training_lock.release()
    assert s.model_name == "seg3"


def test_starter_row_is_read_only(widget, messages, monkeypatch):
    w, s = widget, widget.session
    starter = tiny(7)
    monkeypatch.setattr(
        models_mod,
        "_starter_entries",
        lambda: [models_mod.Entry("nuclei", True, None, dict(starter.config))],
    )
    monkeypatch.setattr(Segmenter, "pretrained", classmethod(lambda cls, name: starter.copy()))
    w.refresh()
    assert w.model_names() == ["starter: nuclei"]
    assert w.select("starter: nuclei")
    assert w.load_button.isEnabled()
    assert not w.rename_button.isEnabled() and not w.delete_button.isEnabled()
    assert not w.rename("x", old="starter: nuclei") and not w.delete("starter: nuclei")
    assert len(messages["error"]) == 2
    assert w.load()
    assert s.model_name == "nuclei" and "(starter)" in w.in_use_label.text()
    assert same_weights(s.segmenter.net.state_dict(), starter.net.state_dict())
    assert row_text(w, "starter: nuclei")[0] == "● starter: nuclei"


def test_shipped_starter_is_listed(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    session_for(viewer).registry = ModelRegistry(tmp_path / "models")
    w = ModelManagerWidget(viewer)
    assert w.model_names() == ["starter: nuclei", "starter: nuclei-volumes"]


def test_a_new_session_on_the_starter_does_not_claim_the_users_model_of_its_name(
    make_napari_viewer, tmp_path, monkeypatch
):
    """A new session marked the user's trained 'nuclei' v4 as in use while it predicted with
    the built-in starter of the same name."""
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    registry = ModelRegistry(tmp_path / "models")
    trained = tiny(3)
    registry.save("nuclei", trained.net.state_dict(), {**trained.config, "name": "nuclei"})
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.registry = registry
    w = ModelManagerWidget(viewer)
    assert session._auto and session.model_name == "nuclei"  # the built-in starter
    text = w.in_use_label.text()
    assert "built-in starter" in text and "not loaded" in text, text
    assert row_text(w, "starter: nuclei")[0].startswith("●")
    assert not row_text(w, "nuclei")[0].startswith("●")
