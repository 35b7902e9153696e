"""Tests for napari_unet.save: round trips, atomic saves and permissions of model files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _model_file_helpers import (
    Boom,
    assert_state_equal,
    fail_on_call,
    make_config,
    make_state,
    model_files,
)

from napari_unet.format import FORMAT, FORMAT_VERSION, load_model, read_config
from napari_unet.save import save_model

# --------------------------------------------------------------------------- round trips


def test_folder_round_trip(tmp_path):
    sd, cfg = make_state(), make_config()
    out = save_model(tmp_path / "model", sd, cfg)
    assert out == tmp_path / "model"
    assert model_files(out) == ["config.json", "weights.safetensors"]
    sd2, cfg2 = load_model(out)
    assert_state_equal(sd, sd2)
    assert cfg2 == {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg}
    # human-readable JSON, indented, format keys present
    text = (out / "config.json").read_text()
    assert '\n  "format": "napari-unet"' in text
    assert json.loads(text)["format_version"] == 1
    # weights carry the format metadata
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "napari-unet"}
    # every accepted entry point gives the same model
    for entry in (out / "config.json", out / "weights.safetensors", str(out)):
        sd3, cfg3 = load_model(entry)
        assert_state_equal(sd, sd3)
        assert cfg3 == cfg2
        assert read_config(entry) == cfg2


def test_single_file_round_trip(tmp_path):
    sd, cfg = make_state(), make_config()
    out = save_model(tmp_path / "shared.safetensors", sd, cfg)
    assert out.is_file()
    assert model_files(tmp_path) == ["shared.safetensors"]
    sd2, cfg2 = load_model(out)
    assert_state_equal(sd, sd2)
    assert cfg2 == {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg}
    assert read_config(out) == cfg2


def test_noncontiguous_and_shared_tensors(tmp_path):
    base = torch.randn(4, 6)
    sd = {"t": base.t(), "view": base[1:3], "same": base}
    sd2, _ = load_model(save_model(tmp_path / "m", sd, {}))
    assert_state_equal(sd, sd2)
    assert all(t.is_contiguous() for t in sd2.values())


def test_caller_state_and_config_not_modified(tmp_path):
    sd, cfg = make_state(), make_config()
    param = torch.nn.Parameter(torch.ones(2, 3).t())  # non-contiguous, requires grad
    sd["param"] = param
    before_ids = {k: id(v) for k, v in sd.items()}
    before_vals = {k: v.detach().clone() for k, v in sd.items()}
    cfg_before = json.loads(json.dumps(cfg))
    cfg["format"] = "something-else"  # caller's own keys are replaced in the file only
    save_model(tmp_path / "m", sd, cfg)
    save_model(tmp_path / "m.safetensors", sd, cfg)
    assert {k: id(v) for k, v in sd.items()} == before_ids
    assert_state_equal(before_vals, {k: v.detach() for k, v in sd.items()})
    assert sd["param"] is param and param.requires_grad and not param.is_contiguous()
    assert cfg == {**cfg_before, "format": "something-else"}
    assert "format_version" not in cfg
    assert load_model(tmp_path / "m")[1]["format"] == FORMAT


def test_numpy_values_in_config_are_stored(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = {"val_score": np.float32(0.5), "shape": np.array([1, 2]), "n": np.int64(3)}
    _, cfg2 = load_model(save_model(tmp_path / "m", {"w": torch.ones(1)}, cfg))
    assert cfg2["val_score"] == 0.5 and cfg2["shape"] == [1, 2] and cfg2["n"] == 3


def test_bad_inputs_to_save(tmp_path):
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        save_model(tmp_path / "m", {"w": [1, 2]}, {})
    with pytest.raises(ValueError, match="empty"):
        save_model(tmp_path / "m", {}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_model(tmp_path / "m", {"w": torch.ones(1)}, {"x": object()})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="a file with that name exists"):
        save_model(tmp_path / "afile", {"w": torch.ones(1)}, {})
    assert not (tmp_path / "m").exists()


def test_overwrite_folder_model(tmp_path):
    save_model(tmp_path / "m", {"w": torch.zeros(2)}, {"v": 1})
    save_model(tmp_path / "m", {"w": torch.ones(3)}, {"v": 2})
    sd, cfg = load_model(tmp_path / "m")
    assert torch.equal(sd["w"], torch.ones(3)) and cfg["v"] == 2
    assert model_files(tmp_path / "m") == ["config.json", "weights.safetensors"]


def test_refuses_to_overwrite_foreign_config(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="will not overwrite"):
        save_model(folder, {"w": torch.ones(1)}, {})
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "bert"}


def test_refuses_to_overwrite_other_tools_files(tmp_path):
    """Another tool's safetensors file, a folder holding only another tool's weights, and a
    config.json that is not JSON with no napari-unet weights beside it were replaced."""
    from safetensors.torch import save_file

    theirs = {"w": torch.arange(3.0)}
    single = tmp_path / "other_tool.safetensors"
    save_file(theirs, single)
    weights_only = tmp_path / "hf"
    weights_only.mkdir()
    save_file(theirs, weights_only / "weights.safetensors")
    text_cfg = tmp_path / "cfg"
    text_cfg.mkdir()
    (text_cfg / "config.json").write_text("// my settings\n{a: 1}")
    for target, kept in [
        (single, single),
        (weights_only, weights_only / "weights.safetensors"),
        (text_cfg, text_cfg / "config.json"),
    ]:
        before = kept.read_bytes()
        with pytest.raises(ValueError, match="will not overwrite"):
            save_model(target, {"w": torch.ones(1)}, {})
        assert kept.read_bytes() == before
    with pytest.raises(ValueError, match="needs a path"):
        save_model("", {"w": torch.ones(1)}, {})
    # our own model, even with its config damaged, is still replaced
    save_model(tmp_path / "m", {"w": torch.zeros(2)}, {"v": 1})
    (tmp_path / "m" / "config.json").write_text("{damaged")
    save_model(tmp_path / "m", {"w": torch.ones(2)}, {"v": 2})
    assert load_model(tmp_path / "m")[1]["v"] == 2
    save_model(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"v": 1})
    save_model(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {"v": 3})
    assert load_model(tmp_path / "m.safetensors")[1]["v"] == 3


@pytest.mark.parametrize("fail_at", [1, 2])
def test_atomic_folder_overwrite(tmp_path, monkeypatch, fail_at):
    old_sd, old_cfg = {"w": torch.zeros(4)}, {"v": "old"}
    save_model(tmp_path / "m", old_sd, old_cfg)
    # 1st os.replace moves the weights in, 2nd the config: a failure at either point
    # must leave the old model whole
    fail_on_call(monkeypatch, "replace", fail_at)
    with pytest.raises(Boom):
        save_model(tmp_path / "m", {"w": torch.ones(8)}, {"v": "new"})
    monkeypatch.undo()
    sd, cfg = load_model(tmp_path / "m")
    assert torch.equal(sd["w"], old_sd["w"]) and cfg["v"] == "old"
    assert model_files(tmp_path / "m") == ["config.json", "weights.safetensors"]


def test_atomic_fresh_folder(tmp_path, monkeypatch):
    fail_on_call(monkeypatch, "rename", 1)
    with pytest.raises(Boom):
        save_model(tmp_path / "m", {"w": torch.ones(2)}, {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # no model, no temp folder


def test_atomic_single_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_model(target, {"w": torch.zeros(4)}, {"v": "old"})
    fail_on_call(monkeypatch, "replace", 1)
    with pytest.raises(Boom):
        save_model(target, {"w": torch.ones(8)}, {"v": "new"})
    monkeypatch.undo()
    fail_on_call(monkeypatch, "replace", 1)
    with pytest.raises(Boom):
        save_model(tmp_path / "fresh.safetensors", {"w": torch.ones(8)}, {})
    monkeypatch.undo()
    sd, cfg = load_model(target)
    assert torch.equal(sd["w"], torch.zeros(4)) and cfg["v"] == "old"
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file, no partial model


def test_crash_while_writing_weights(tmp_path, monkeypatch):
    save_model(tmp_path / "m", {"w": torch.zeros(4)}, {"v": "old"})
    save_model(tmp_path / "s.safetensors", {"w": torch.zeros(4)}, {"v": "old"})
    import safetensors.torch as st

    real = st.save_file

    def half_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # leave a truncated file behind, then die
            fh.truncate(10)
        raise Boom("power cut")

    monkeypatch.setattr(st, "save_file", half_write)
    for target in (tmp_path / "m", tmp_path / "s.safetensors"):
        with pytest.raises(Boom):
            save_model(target, {"w": torch.ones(8)}, {"v": "new"})
    monkeypatch.undo()
    for target in (tmp_path / "m", tmp_path / "s.safetensors"):
        sd, cfg = load_model(target)
        assert torch.equal(sd["w"], torch.zeros(4)) and cfg["v"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["m", "s.safetensors"]
    assert model_files(tmp_path / "m") == ["config.json", "weights.safetensors"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "m", {"w": torch.zeros(2)}, {"task": "instance"})
        save_model(tmp_path / "one.safetensors", {"w": torch.zeros(2)}, {"task": "instance"})
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o644


def test_every_save_refuses_weights_that_are_not_finite(tmp_path):
    """The Train widget saves through the registry, not Segmenter.save: a diverged round
    would have been saved as a version that load refuses."""
    from napari_unet.store import ModelRegistry

    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="NaN or infinite values \\(tensor 'w'"):
        save_model(tmp_path / "m", bad, {})
    assert not (tmp_path / "m").exists()
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(ValueError, match="NaN"):
        registry.save("mine", bad, {"name": "mine"})
    assert "mine" not in [m.name for m in registry.list()]
