"""Tests for napari_unet.registry: named, versioned models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _model_file_helpers import (
    Boom,
    assert_state_equal,
    fail_on_call,
    model_files,
)

from napari_unet.format import FORMAT, ModelFileError, load_model
from napari_unet.registry import ModelInfo, ModelRegistry, default_root
from napari_unet.save import save_model

# --------------------------------------------------------------------------- registry


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home"
    assert ModelRegistry().root == tmp_path / "home"
    assert not (tmp_path / "home").exists()  # not created until a save
    ModelRegistry().save("m", {"w": torch.ones(1)}, {})
    assert (tmp_path / "home" / "m" / "v0001" / "config.json").is_file()

    monkeypatch.delenv("NAPARI_UNET_HOME")
    root = default_root()
    assert root.parts[-2:] == ("napari-unet", "models")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert default_root() == tmp_path / "xdg" / "napari-unet" / "models"
        monkeypatch.delenv("XDG_DATA_HOME")
        assert default_root() == Path.home() / ".local/share/napari-unet/models"


def test_import_does_not_create_root(tmp_path):
    env = {**os.environ, "NAPARI_UNET_HOME": str(tmp_path / "home")}
    code = "import napari_unet.store as s; s.ModelRegistry(); print(s.default_root())"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert not (tmp_path / "home").exists()


def test_registry_versions_increment(tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.list() == [] and not reg.exists("nuclei")
    infos = [
        reg.save("nuclei", {"w": torch.full((2,), float(i))}, {"task": "nuclei", "i": i})
        for i in range(3)
    ]
    assert [i.version for i in infos] == [1, 2, 3]
    assert [p.name for p in sorted((tmp_path / "nuclei").iterdir())] == ["v0001", "v0002", "v0003"]
    assert reg.exists("nuclei")
    assert [i.version for i in reg.versions("nuclei")] == [1, 2, 3]
    sd, cfg = reg.load("nuclei")
    assert torch.equal(sd["w"], torch.full((2,), 2.0)) and cfg["i"] == 2
    sd, cfg = reg.load("nuclei", 1)
    assert torch.equal(sd["w"], torch.zeros(2)) and cfg["i"] == 0
    assert reg.path("nuclei") == tmp_path / "nuclei" / "v0003"
    assert reg.path("nuclei", 2) == tmp_path / "nuclei" / "v0002"
    # a version folder is a plain model folder, and the model folder loads its latest
    assert load_model(reg.path("nuclei", 2))[1]["i"] == 1
    assert load_model(tmp_path / "nuclei")[1]["i"] == 2
    # older versions are untouched by newer saves
    assert reg.load("nuclei", 1)[1]["created"] == infos[0].created


def test_model_info_fields(tmp_path):
    reg = ModelRegistry(tmp_path)
    info = reg.save(
        "cells",
        {"w": torch.ones(1)},
        {"task": "cells", "trained_on": ["a.tif", "b.tif"], "val_score": 0.8125},
    )
    assert isinstance(info, ModelInfo)
    assert (info.name, info.version, info.task) == ("cells", 1, "cells")
    assert info.trained_on == ["a.tif", "b.tif"] and info.val_score == 0.8125
    assert info.path == tmp_path / "cells" / "v0001"
    assert info.created.startswith("20") and "T" in info.created
    assert info.config["format"] == FORMAT
    [listed] = reg.list()
    assert listed == info

    bare = reg.save("bare", {"w": torch.ones(1)}, {"val_score": None})
    assert bare.task is None and bare.trained_on == [] and bare.val_score is None
    # "created" falls back to the folder mtime when the config lacks it
    cfg_path = bare.path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["created"]
    cfg_path.write_text(json.dumps(cfg))
    assert reg.versions("bare")[0].created.startswith("20")


def test_registry_list_skips_broken(tmp_path, caplog):
    reg = ModelRegistry(tmp_path)
    reg.save("b_good", {"w": torch.ones(1)}, {})
    reg.save("a_good", {"w": torch.ones(1)}, {})
    reg.save("mixed", {"w": torch.ones(1)}, {"v": 1})
    reg.save("mixed", {"w": torch.ones(1)}, {"v": 2})
    (tmp_path / "mixed" / "v0002" / "config.json").write_text("{broken")
    broken = tmp_path / "c_broken" / "v0001"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "d_empty").mkdir()
    (tmp_path / "stray.txt").write_text("hello")
    (tmp_path / ".hidden").mkdir()
    infos = reg.list()
    assert [i.name for i in infos] == ["a_good", "b_good", "mixed"]
    mixed = infos[-1]
    assert mixed.version == 1 and mixed.config["v"] == 1  # latest readable version
    assert [i.version for i in reg.versions("mixed")] == [1]
    # the next save never reuses the broken version's number
    assert reg.save("mixed", {"w": torch.ones(1)}, {}).version == 3
    with pytest.raises(ModelFileError, match="no readable version"):
        reg.load("c_broken")
    with pytest.raises(ModelFileError, match="not a napari-unet model"):
        reg.load("c_broken", 1)


def test_registry_rename(tmp_path):
    reg = ModelRegistry(tmp_path)
    reg.save("old", {"w": torch.ones(1)}, {"v": 1})
    reg.save("old", {"w": torch.ones(1)}, {"v": 2})
    reg.save("taken", {"w": torch.ones(1)}, {})
    with pytest.raises(ValueError, match="already exists"):
        reg.rename("old", "taken")
    with pytest.raises(ValueError):
        reg.rename("old", "a/b")
    with pytest.raises(ModelFileError, match="no model named"):
        reg.rename("ghost", "new")
    reg.rename("old", "new")
    assert not reg.exists("old") and reg.exists("new")
    assert [i.version for i in reg.versions("new")] == [1, 2]
    assert [i.name for i in reg.list()] == ["new", "taken"]
    assert reg.load("new")[1]["v"] == 2


def test_registry_delete(tmp_path):
    reg = ModelRegistry(tmp_path)
    for v in range(3):
        reg.save("m", {"w": torch.ones(1)}, {"v": v})
    reg.save("other", {"w": torch.ones(1)}, {})
    reg.delete("m", 3)
    assert [i.version for i in reg.versions("m")] == [1, 2]
    assert reg.save("m", {"w": torch.ones(1)}, {}).version == 3  # max + 1
    with pytest.raises(ModelFileError, match="no version 7"):
        reg.delete("m", 7)
    reg.delete("m")
    assert not reg.exists("m") and [i.name for i in reg.list()] == ["other"]
    with pytest.raises(ModelFileError, match="no model named"):
        reg.delete("m")
    # deleting the only version removes the model
    reg.delete("other", 1)
    assert not reg.exists("other") and reg.list() == []
    assert [p for p in tmp_path.iterdir()] == []


def test_registry_rollback(tmp_path):
    reg = ModelRegistry(tmp_path)
    sd1 = {"w": torch.randn(3, 3), "h": torch.randn(2).half()}
    reg.save("m", sd1, {"task": "nuclei", "val_score": 0.9})
    reg.save("m", {"w": torch.zeros(3, 3), "h": torch.zeros(2).half()}, {"val_score": 0.1})
    info = reg.rollback("m", 1)
    assert info.version == 3 and info.val_score == 0.9
    assert [i.version for i in reg.versions("m")] == [1, 2, 3]  # history kept
    sd3, cfg3 = reg.load("m")
    assert_state_equal(sd1, sd3)
    _, cfg1 = reg.load("m", 1)
    assert cfg3["rolled_back_from"] == 1
    skip = {"created", "rolled_back_from"}
    assert {k: v for k, v in cfg3.items() if k not in skip} == {
        k: v for k, v in cfg1.items() if k not in skip
    }
    assert reg.load("m", 2)[1]["val_score"] == 0.1  # untouched
    with pytest.raises(ModelFileError):
        reg.rollback("m", 9)


def test_registry_atomic_save(tmp_path, monkeypatch):
    reg = ModelRegistry(tmp_path)
    reg.save("m", {"w": torch.zeros(2)}, {"v": "old"})
    fail_on_call(monkeypatch, "rename", 1)
    with pytest.raises(Boom):
        reg.save("m", {"w": torch.ones(2)}, {"v": "new"})
    monkeypatch.undo()
    assert model_files(tmp_path / "m") == ["v0001"]  # no partial version, no temp folder
    sd, cfg = reg.load("m")
    assert torch.equal(sd["w"], torch.zeros(2)) and cfg["v"] == "old"
    # a leftover temp folder from a hard crash is ignored by list/versions
    (tmp_path / "m" / ".tmp-xyz.partial").mkdir()
    assert [i.version for i in reg.versions("m")] == [1]
    assert reg.save("m", {"w": torch.ones(2)}, {}).version == 2


def test_registry_never_overwrites_existing_version(tmp_path, monkeypatch):
    reg = ModelRegistry(tmp_path)
    reg.save("m", {"w": torch.zeros(2)}, {"v": 1})
    # pretend another process grabbed v0002 after we listed the versions
    real = ModelRegistry._version_dirs

    def stale(model_dir):
        return [d for d in real(model_dir) if d[0] == 1]

    (tmp_path / "m" / "v0002").mkdir()
    save_model(tmp_path / "m" / "v0002", {"w": torch.ones(2)}, {"v": 2})
    monkeypatch.setattr(ModelRegistry, "_version_dirs", staticmethod(stale))
    info = reg.save("m", {"w": torch.full((2,), 3.0)}, {"v": 3})
    monkeypatch.undo()
    assert info.version == 3
    assert reg.load("m", 2)[1]["v"] == 2 and reg.load("m", 3)[1]["v"] == 3


@pytest.mark.parametrize(
    "name",
    ["", "   ", "a/b", "a\\b", "..", ".hidden", "x" * 101, "CON", "a:b", "tab\there", "end.", 5],
)
def test_invalid_names_refused(tmp_path, name):
    reg = ModelRegistry(tmp_path)
    with pytest.raises(ValueError):
        reg.save(name, {"w": torch.ones(1)}, {})
    assert not reg.exists(name)
    assert list(tmp_path.iterdir()) == []


def test_valid_names(tmp_path):
    reg = ModelRegistry(tmp_path)
    for name in ("nuclei v2", "cells_2024-05-01", "x" * 100, "Zellkerne-ü", "model.a"):
        reg.save(name, {"w": torch.ones(1)}, {})
        assert reg.exists(name)
    assert len(reg.list()) == 5


def test_missing_model_lookup(tmp_path):
    reg = ModelRegistry(tmp_path / "nothing-here")
    assert reg.list() == []
    with pytest.raises(ModelFileError, match="no model named 'x'"):
        reg.load("x")
    with pytest.raises(ModelFileError):
        reg.versions("x")


def test_model_info_reads_fields_as_model_config_types_them(tmp_path):
    reg = ModelRegistry(tmp_path)
    odd = {"task": 5, "trained_on": [1, "a"], "val_score": "high", "created": 3}
    info = reg.save("odd", {"w": torch.ones(1)}, odd)  # the registry sets "created"
    assert info.task is None and info.trained_on == [] and info.val_score is None
    info = ModelInfo.from_config("odd", 1, info.path, odd)
    assert info.created.startswith("20")  # not text: the folder's time
    info = ModelInfo.from_config("x", 1, tmp_path / "gone", {"val_score": 1, "task": "cells"})
    assert info.val_score == 1.0 and info.task == "cells" and info.created == ""
