"""Tests for napari_unet.store: safe model files and the named-model registry."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_unet import fileio, registry, save, store
from napari_unet import format as model_format
from napari_unet.store import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    ModelInfo,
    ModelRegistry,
    default_root,
    load_model,
    read_config,
    save_model,
)


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enc.0.weight": torch.randn(4, 2, 3, 3, generator=g),
        "enc.0.bias": torch.randn(4, generator=g).to(torch.float16),
        "dec.w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "lut": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "f64": torch.linspace(0, 1, 4, dtype=torch.float64),
    }


def make_config() -> dict:
    return {
        "architecture": {"depth": 2, "base_channels": 4, "in_channels": 2},
        "task": "nuclei",
        "normalisation": {"kind": "percentile", "low": 1.0, "high": 99.8},
        "history": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}],
        "trained_on": ["img1.tif", "img2.tif"],
        "val_score": 0.75,
    }


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def model_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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


# --------------------------------------------------------------------------- atomicity


class Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, func_name: str, n: int) -> None:
    """Make os.<func_name> raise on its n-th call (1-based)."""
    real = getattr(os, func_name)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, func_name, fake)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_atomic_folder_overwrite(tmp_path, monkeypatch, fail_at):
    old_sd, old_cfg = {"w": torch.zeros(4)}, {"v": "old"}
    save_model(tmp_path / "m", old_sd, old_cfg)
    # 1st os.replace moves the weights in, 2nd the config: a failure at either point
    # must leave the old model whole
    _fail_on_call(monkeypatch, "replace", fail_at)
    with pytest.raises(Boom):
        save_model(tmp_path / "m", {"w": torch.ones(8)}, {"v": "new"})
    monkeypatch.undo()
    sd, cfg = load_model(tmp_path / "m")
    assert torch.equal(sd["w"], old_sd["w"]) and cfg["v"] == "old"
    assert model_files(tmp_path / "m") == ["config.json", "weights.safetensors"]


def test_atomic_fresh_folder(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, "rename", 1)
    with pytest.raises(Boom):
        save_model(tmp_path / "m", {"w": torch.ones(2)}, {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # no model, no temp folder


def test_atomic_single_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_model(target, {"w": torch.zeros(4)}, {"v": "old"})
    _fail_on_call(monkeypatch, "replace", 1)
    with pytest.raises(Boom):
        save_model(target, {"w": torch.ones(8)}, {"v": "new"})
    monkeypatch.undo()
    _fail_on_call(monkeypatch, "replace", 1)
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


# --------------------------------------------------------------------------- refusals


def test_missing_path(tmp_path):
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError, match="no model at"):
            fn(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no model at"):
        load_model(tmp_path / "empty")


class Evil:
    """Unpickling this creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _assert_pickle_refused(path: Path, marker: Path) -> None:
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError) as info:
            fn(path)
        msg = str(info.value)
        assert "pickle" in msg and "never unpickles" in msg, msg
        assert "Segmenter.save" in msg
        assert not marker.exists(), "the pickle was executed!"


@pytest.mark.parametrize("name", ["model.pkl", "model.safetensors", "model", "model.bin"])
def test_pickle_refused_and_never_executed(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=4))
    # sanity check: the payload really would run if unpickled
    pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    _assert_pickle_refused(path, marker)


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.ckpt", "model.safetensors"])
def test_torch_checkpoint_refused_and_never_executed(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": Evil(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    _assert_pickle_refused(path, marker)


def test_legacy_torch_checkpoint_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "old_format"
    torch.save({"evil": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[0] == 0x80
    _assert_pickle_refused(path, marker)


def test_pickle_disguised_as_weights_in_folder(tmp_path):
    marker = tmp_path / "PWNED"
    folder = save_model(tmp_path / "m", {"w": torch.ones(2)}, {})
    torch.save({"evil": Evil(marker)}, folder / "weights.safetensors")
    assert read_config(folder)["format"] == FORMAT  # the config alone is fine
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_model(folder)
    assert not marker.exists()


def test_folder_with_only_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(1)}, folder / "best.pth")
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_model(folder)


@pytest.mark.parametrize("module", [store, fileio, model_format, registry, save])
def test_module_never_unpickles(module):
    src = Path(module.__file__).read_text()
    assert "torch.load(" not in src.replace("torch.load(..., weights_only=True)", "")
    assert "import pickle" not in src and "allow_pickle" not in src


def test_safetensors_header_starting_with_0x80_is_not_taken_for_pickle(tmp_path):
    """A valid file whose 8-byte length prefix begins 0x80 0x02 must still load."""
    cfg = json.dumps({"format": FORMAT, "format_version": 1, "task": "x"})
    header = {
        "__metadata__": {"format": FORMAT, "napari_unet_config": cfg},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    raw = json.dumps(header).encode()
    n = 0x0280  # little-endian bytes 0x80 0x02 ... look like pickle protocol 2
    raw = raw + b" " * (n - len(raw))
    path = tmp_path / "odd.safetensors"
    path.write_bytes(n.to_bytes(8, "little") + raw + torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert path.read_bytes()[:2] == b"\x80\x02"
    sd, config = load_model(path)
    assert torch.equal(sd["w"], torch.tensor([1.0, 2.0])) and config["task"] == "x"


@pytest.mark.parametrize("cut", ["data", "header", "tiny"])
def test_truncated_safetensors(tmp_path, cut):
    path = save_model(tmp_path / "m.safetensors", {"w": torch.randn(64, 64)}, {"a": 1})
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    keep = {"data": len(data) - 100, "header": 8 + header_len // 2, "tiny": 5}[cut]
    path.write_bytes(data[:keep])
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError, match="truncated or corrupt"):
            fn(path)


def test_truncated_weights_in_folder(tmp_path):
    folder = save_model(tmp_path / "m", {"w": torch.randn(32, 32)}, {})
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-17])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(folder)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk"])
def test_random_bytes(tmp_path, name):
    import random

    data = bytearray(random.Random(1).randbytes(4096))
    data[0] = 0x13  # keep the deterministic junk from resembling a pickle
    path = tmp_path / name
    path.write_bytes(bytes(data))
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError, match="truncated or corrupt"):
            fn(path)


def test_corrupt_tensor_table(tmp_path):
    """Header length is right but a tensor's size does not match its shape."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(path)


def _folder_with_config(tmp_path: Path, text: str) -> Path:
    folder = save_model(tmp_path / "m", {"w": torch.ones(1)}, {})
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("", ["not valid JSON"]),
        ("[1, 2, 3]", ["not a napari-unet model", "not a JSON object"]),
        (
            json.dumps({"architectures": ["BertModel"], "model_type": "bert"}),
            ["not a napari-unet model", "'format': 'napari-unet'", "Hugging Face"],
        ),
        (
            json.dumps({"model_type": "cyto3", "diam_mean": 30.0, "nchan": 2}),
            ["not a napari-unet model", "'format': 'napari-unet'"],
        ),
        (json.dumps({"format": "cellpose"}), ["not a napari-unet model"]),
        (json.dumps({"format": FORMAT}), ["format_version"]),
        (json.dumps({"format": FORMAT, "format_version": "1"}), ["format_version"]),
    ],
)
def test_bad_config_json(tmp_path, text, words):
    folder = _folder_with_config(tmp_path, text)
    for fn in (load_model, read_config):
        for entry in (folder, folder / "config.json", folder / "weights.safetensors"):
            with pytest.raises(ModelFileError) as info:
                fn(entry)
            for w in words:
                assert w in str(info.value), (w, str(info.value))


def test_non_utf8_config(tmp_path):
    folder = save_model(tmp_path / "m", {"w": torch.ones(1)}, {})
    (folder / "config.json").write_bytes(b"\xff\xfe\x00garbage\x9c")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(folder)


def test_newer_format_version(tmp_path):
    folder = save_model(tmp_path / "m", {"w": torch.ones(1)}, {})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(cfg))
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError) as info:
            fn(folder)
        msg = str(info.value)
        assert "newer" in msg and "Upgrade napari-unet" in msg and "version 2" in msg


def test_newer_format_version_single_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    cfg = json.dumps({"format": FORMAT, "format_version": 99})
    save_file({"w": torch.ones(1)}, str(path), metadata={"napari_unet_config": cfg})
    with pytest.raises(ModelFileError, match="Upgrade napari-unet"):
        load_model(path)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"  # e.g. a Hugging Face weights file
    save_file({"w": torch.ones(1)}, str(path), metadata={"format": "pt"})
    for fn in (load_model, read_config):
        with pytest.raises(ModelFileError, match="not a napari-unet model"):
            fn(path)


def test_missing_weights(tmp_path):
    folder = save_model(tmp_path / "m", {"w": torch.ones(1)}, {})
    (folder / "weights.safetensors").unlink()
    for fn in (load_model, read_config):
        for entry in (folder, folder / "config.json"):
            with pytest.raises(ModelFileError) as info:
                fn(entry)
            assert "weights" in str(info.value) and "missing" in str(info.value)


def test_missing_config(tmp_path):
    folder = save_model(tmp_path / "m", {"w": torch.ones(1)}, {})
    (folder / "config.json").unlink()
    for entry in (folder, folder / "weights.safetensors"):
        with pytest.raises(ModelFileError, match="config.json is missing"):
            load_model(entry)


def test_other_json_file_refused(tmp_path):
    path = tmp_path / "cellpose_settings.json"
    path.write_text("{}")
    with pytest.raises(ModelFileError, match="not a napari-unet model"):
        load_model(path)


def test_errors_are_value_errors():
    assert issubclass(ModelFileError, ValueError)


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
    _fail_on_call(monkeypatch, "rename", 1)
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
