"""Bad bioimage.io packages: a clear PackageError naming the field, never a deep traceback."""

from __future__ import annotations

import copy
import os
import re
import zipfile

import numpy as np
import pytest
import yaml

import napari_unet as nu
from napari_unet import bioimageio as bio

_PSD = ("weights", "pytorch_state_dict")
_KW = (*_PSD, "architecture", "kwargs")
_SCALE = ("inputs", 0, "preprocessing", 0, "kwargs")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A tiny package from the exporter: its files and its parsed rdf.yaml."""
    seg = nu.Segmenter.new(base_channels=8, depth=2, name="tiny")
    out = bio.export_package(seg, tmp_path_factory.mktemp("pkg") / "tiny.zip", torchscript=False)
    with zipfile.ZipFile(out) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    return files, yaml.safe_load(files["rdf.yaml"])


def _zip(package, path, *edits, foreign=False):
    """The package with ``edits`` ((key path, value) or (key path, DELETE)) applied."""
    files, rdf = dict(package[0]), copy.deepcopy(package[1])
    if foreign:  # not napari-unet's: read through the pytorch_state_dict architecture
        del rdf["config"]["napari_unet"]
    for keys, value in edits:
        d = rdf
        for k in keys[:-1]:
            d = d[k]
        if value is DELETE:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    files["rdf.yaml"] = yaml.safe_dump(rdf).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    return path


DELETE = object()

CASES = [
    # (id, edits, foreign, message the error must contain)
    ("config-str", [(("config",), "x")], False, "'config' must be a mapping, got the string 'x'"),
    (
        "own-config-str",
        [(("config", "napari_unet"), "x")],
        False,
        "'config.napari_unet' must be a mapping",
    ),
    (
        "version-str",
        [(("config", "napari_unet", "version"), "abc")],
        False,
        "'config.napari_unet.version' must be a whole number",
    ),
    (
        "version-list",
        [(("config", "napari_unet", "version"), [1])],
        False,
        "'config.napari_unet.version' must be a whole number of at least 0, got a list",
    ),
    ("attachments-str", [(("attachments",), "x")], False, "'attachments' must be a list"),
    (
        "attachments-of-str",
        [(("attachments",), ["weights.safetensors"])],
        False,
        "'attachments[0]' must be a mapping, got the string 'weights.safetensors'",
    ),
    (
        "own-weights-name-number",
        [(("config", "napari_unet", "weights"), 7)],
        False,
        "'config.napari_unet.weights' must be a string, got the number 7",
    ),
    ("weights-list", [(("weights",), [1, 2])], True, "'weights' must be a mapping, got a list"),
    ("weights-str", [(("weights",), "x")], True, "'weights' must be a mapping"),
    (
        "architecture-str",
        [((*_PSD, "architecture"), "UNet")],
        True,
        "'weights.pytorch_state_dict.architecture' must be a mapping",
    ),
    (
        "kwargs-list",
        [(_KW, ["in_channels", "out_channels"])],
        True,
        "'weights.pytorch_state_dict.architecture.kwargs' must be a mapping, got a list",
    ),
    (
        "no-source",
        [((*_PSD, "source"), DELETE)],
        True,
        "'weights.pytorch_state_dict.source' is missing",
    ),
    (
        "source-list",
        [((*_PSD, "source"), ["weights.pt"])],
        True,
        "'weights.pytorch_state_dict.source' must be a string, got a list",
    ),
    ("inputs-str", [(("inputs",), "abc")], True, "'inputs' must be a list of mappings"),
    (
        "min-percentile-str",
        [((*_SCALE, "min_percentile"), "a")],
        True,
        "'inputs[0].preprocessing[0].kwargs.min_percentile' must be a number, got the string 'a'",
    ),
    (
        "out-channels-negative",
        [((*_KW, "out_channels"), -1)],
        True,
        "kwargs.out_channels' must be a whole number from 1 to 4096, got the number -1",
    ),
    (
        "in-channels-str",
        [((*_KW, "in_channels"), "one")],
        True,
        "kwargs.in_channels' must be a whole number from 1 to 4096, got the string 'one'",
    ),
    ("name-list", [(("name",), ["x"])], True, "'name' must be a string, got a list"),
]


@pytest.mark.parametrize(
    ("edits", "foreign", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_rdf_is_a_package_error_naming_the_field(
    package, tmp_path, edits, foreign, message
):
    path = _zip(package, tmp_path / "bad.zip", *edits, foreign=foreign)
    with pytest.raises(bio.PackageError, match=re.escape(message)) as e:
        bio.import_package(path)
    assert str(e.value).startswith(f"{path}: rdf.yaml: ")
    with pytest.raises(bio.PackageError, match=re.escape(message)):
        nu.Segmenter.load(path)


def test_cli_import_of_malformed_package_is_a_clear_error(package, tmp_path, monkeypatch, capsys):
    from napari_unet import cli

    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "home"))
    path = _zip(package, tmp_path / "bad.zip", (("config",), "x"))
    assert cli.main(["import", str(path), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "'config' must be a mapping" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_unusable_foreign_name_falls_back_to_imported(package, tmp_path):
    path = _zip(package, tmp_path / "f.zip", (("name",), "!!!"), foreign=True)
    assert bio.import_package(path).model_config.name == "imported"


def _folder(package, path):
    """The package unpacked as a folder."""
    path.mkdir()
    for name, data in package[0].items():
        (path / name).write_bytes(data)
    return path


def _symlink(target, link):
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links cannot be made here")


def _foreign_folder(path, weights_name="w.pt"):
    path.mkdir()
    rdf = {
        "type": "model",
        "name": "foreign",
        "weights": {
            "pytorch_state_dict": {
                "source": weights_name,
                "architecture": {
                    "callable": "UNet",
                    "kwargs": {"in_channels": 1, "out_channels": 3},
                },
            }
        },
    }
    (path / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    return path


def test_folder_package_refuses_links_out_of_the_package(tmp_path):
    outside = tmp_path / "passwd"
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    pkg = _foreign_folder(tmp_path / "pkg")
    _symlink(outside, pkg / "w.pt")
    with pytest.raises(bio.PackageError, match="leads outside the package folder"):
        bio.import_package(pkg)
    # a link to a folder holding a file: outside too, however it is named
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.pt").write_bytes(b"x")
    pkg2 = _foreign_folder(tmp_path / "pkg2", "sub/w.pt")
    _symlink(tmp_path / "elsewhere", pkg2 / "sub")
    with pytest.raises(bio.PackageError, match="leads outside the package folder"):
        bio.import_package(pkg2)


def test_folder_package_refuses_linked_rdf_and_allows_links_inside(package, tmp_path):
    pkg = _folder(package, tmp_path / "ours")
    # a link that stays inside the package is fine
    (pkg / "weights.safetensors").rename(pkg / "real.safetensors")
    _symlink("real.safetensors", pkg / "weights.safetensors")
    assert bio.import_package(pkg).model_config.name == "tiny"
    (tmp_path / "rdf_elsewhere.yaml").write_bytes(package[0]["rdf.yaml"])
    (pkg / "rdf.yaml").unlink()
    _symlink(tmp_path / "rdf_elsewhere.yaml", pkg / "rdf.yaml")
    with pytest.raises(bio.PackageError, match="leads outside the package folder"):
        bio.import_package(pkg)


@pytest.mark.parametrize(
    "data",
    [
        b"root:x:0:0:root:/root:/bin/bash\n",  # IndexError inside torch's unpickler
        b"hello",  # KeyError
        b"",  # EOFError
        np.random.default_rng(54).bytes(64),  # UnicodeDecodeError
    ],
    ids=["text", "short", "empty", "random"],
)
def test_junk_pt_weights_are_a_package_error(tmp_path, data):
    pkg = _foreign_folder(tmp_path / "pkg")
    (pkg / "w.pt").write_bytes(data)
    with pytest.raises(bio.PackageError, match=r"w\.pt is not a readable PyTorch state dict"):
        bio.import_package(pkg)


def test_weights_that_are_a_folder_are_a_package_error(tmp_path):
    pkg = _foreign_folder(tmp_path / "pkg")
    (pkg / "w.pt").mkdir()
    with pytest.raises(bio.PackageError, match="cannot read 'w.pt'"):
        bio.import_package(pkg)
