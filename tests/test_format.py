"""Tests for napari_unet.format: reading model files; refusing pickles, damaged and foreign
files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from napari_unet.format import FORMAT, FORMAT_VERSION, ModelFileError, load_model, read_config
from napari_unet.save import save_model

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


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
        (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
        (lambda t: t.to(torch.int64), "floating-point weights"),
    ],
)
def test_damaged_weights_refused_at_load(tmp_path, damage, words):
    """Weights that load but cannot predict (NaN, inf, integers) were taken: every
    probability came out NaN and no object was found, without a word."""
    from safetensors.torch import load_file, save_file

    from napari_unet import Segmenter

    good = Segmenter.new(base_channels=4, depth=2).save(tmp_path / "m")
    path = Path(good) / "weights.safetensors"
    state = load_file(path)
    meta = read_metadata_of(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[key] = damage(state[key])
    save_file(state, path, metadata=meta)
    with pytest.raises(ModelFileError, match=words) as info:
        Segmenter.load(good)
    assert key in str(info.value)


def read_metadata_of(path):
    from napari_unet.format import read_metadata

    return read_metadata(Path(path))
