"""bioimage.io export and import: packages pass ``bioimageio test`` offline and come back exact."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
import yaml

import napari_unet as nu
from napari_unet import bioimageio as bio
from napari_unet.synthetic import make_nuclei


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network for bioimageio: dead proxies, a private cache; imports bioimageio.core."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "bioimageio-cache"))
    core = pytest.importorskip("bioimageio.core")
    from bioimageio.spec import settings

    monkeypatch.setattr(settings, "cache_path", tmp_path / "bioimageio-cache")
    return core


def _bioimageio_test(core, path, weight_format=None) -> None:
    summary = core.test_model(path, weight_format=weight_format)
    failed = [d for d in summary.details if d.status == "failed"]
    assert summary.status in ("passed", "valid-format"), "\n".join(
        f"{d.name}: {d.errors}" for d in failed
    )


def _tiny(seed: int = 0) -> nu.Segmenter:
    return nu.Segmenter.new("instance", 1, base_channels=4, depth=2, seed=seed, name="tiny")


def _same_prediction(a: nu.Segmenter, b: nu.Segmenter, image: np.ndarray) -> None:
    pa = a.predict(image, axes="YX", device="cpu")
    pb = b.predict(image, axes="YX", device="cpu")
    np.testing.assert_array_equal(pa.labels, pb.labels)
    np.testing.assert_allclose(pa.probabilities, pb.probabilities, atol=1e-6)


def test_starter_export_passes_bioimageio_test_and_imports_exactly(offline, tmp_path):
    seg = nu.Segmenter.pretrained("nuclei")
    img, _ = make_nuclei((64, 64), seed=3)
    out = bio.export_package(seg, tmp_path / "nuclei.zip", test_image=img)
    _bioimageio_test(offline, out)
    # import: same labels as the original, same config (post-processing included)
    back = nu.Segmenter.load(out)
    assert back.config["postprocess"] == seg.config["postprocess"]
    assert back.config["normalization"] == seg.config["normalization"]
    assert back.config["architecture"] == seg.config["architecture"]
    big, _ = make_nuclei((160, 200), seed=5)
    _same_prediction(seg, back, big)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        readme = zf.read("README.md").decode()
    assert {"weights.pt", "weights_torchscript.pt", "unet_architecture.py", "cover.png"} <= names
    assert rdf["format_version"].startswith("0.5")
    pre = rdf["inputs"][0]["preprocessing"][0]
    assert pre["id"] == "scale_range"
    assert (pre["kwargs"]["min_percentile"], pre["kwargs"]["max_percentile"]) == (1.0, 99.8)
    assert (
        "Validation" in readme and f"{seg.config['val_score']}" in readme and "watershed" in readme
    )


def test_finetuned_export_with_changed_postprocess(offline, tmp_path):
    seg = _tiny()
    img, lab = make_nuclei((64, 64), seed=1)
    for _ in seg.finetune(img, lab, steps=3, time_limit_s=None, device="cpu", batch_size=2):
        pass
    seg.config["postprocess"]["seed_threshold"] = 0.6
    seg.config["postprocess"]["min_size"] = 5
    out = bio.export_package(seg, tmp_path / "tuned.zip", progress=lambda *a: None)
    _bioimageio_test(offline, out)
    back = bio.import_package(out)
    assert back.config["postprocess"] == seg.config["postprocess"]
    assert back.config["history"] == json.loads(json.dumps(seg.config["history"]))
    _same_prediction(seg, back, img)


def test_export_refuses_existing_file_and_reports_progress(tmp_path):
    seg = _tiny()
    out = tmp_path / "m.zip"
    out.write_bytes(b"keep me")
    with pytest.raises(bio.PackageError, match="exists already"):
        bio.export_package(seg, out, torchscript=False)
    assert out.read_bytes() == b"keep me"
    steps = []
    bio.export_package(
        seg, out, torchscript=False, overwrite=True, progress=lambda *a: steps.append(a)
    )
    assert steps[-1][0] == steps[-1][1] and zipfile.is_zipfile(out)
    with pytest.raises(bio.PackageError, match=r"\.zip"):
        bio.export_package(seg, tmp_path / "m.tar", torchscript=False)


def test_export_without_possible_test_image_is_a_clear_error(tmp_path):
    seg = nu.Segmenter.new("instance", 2, base_channels=4, depth=2)
    with pytest.raises(bio.PackageError, match="test image"):
        bio.export_package(seg, tmp_path / "rgb.zip")
    assert not (tmp_path / "rgb.zip").exists()
    img = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    out = bio.export_package(
        seg, tmp_path / "rgb.zip", test_image=img, axes="CYX", torchscript=False
    )
    assert bio.import_package(out).in_channels == 2


def _repack(src, dst, change):
    """Copy a package, letting ``change(files, rdf)`` edit its files and description."""
    with zipfile.ZipFile(src) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    rdf = yaml.safe_load(files["rdf.yaml"])
    change(files, rdf)
    files["rdf.yaml"] = yaml.safe_dump(rdf).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    return dst


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_foreign_packages(tmp_path, capsys):
    seg = _tiny()
    src = bio.export_package(seg, tmp_path / "ours.zip", torchscript=False)

    def foreign(files, rdf):  # same UNet, but no napari-unet config: mapped onto UNet
        del rdf["config"]["napari_unet"]

    mapped = bio.import_package(_repack(src, tmp_path / "f.zip", foreign))
    img, _ = make_nuclei((48, 48), seed=2)
    _same_prediction(seg, mapped, img)

    def other_arch(files, rdf):
        foreign(files, rdf)
        rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] = "StarDist2D"

    with pytest.raises(bio.PackageError, match="cannot be mapped"):
        bio.import_package(_repack(src, tmp_path / "o.zip", other_arch))

    def pickled_code(files, rdf):  # weights that run code when unpickled
        foreign(files, rdf)
        buf = io.BytesIO()
        torch.save({"w": _Evil()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
        files["weights.pt"] = buf.getvalue()
        rdf["weights"]["pytorch_state_dict"]["sha256"] = bio.sha256(buf.getvalue())

    with pytest.raises(bio.PackageError, match="refused"):
        bio.import_package(_repack(src, tmp_path / "evil.zip", pickled_code))
    assert "pwned" not in capsys.readouterr().out

    def tampered(files, rdf):
        files["weights.safetensors"] = files["weights.safetensors"][:-4] + b"\0\0\0\0"

    with pytest.raises(bio.PackageError, match="sha256"):
        bio.import_package(_repack(src, tmp_path / "t.zip", tampered))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(bio.PackageError, match="not a zip"):
        nu.Segmenter.load(tmp_path / "junk.zip")


def test_cli_export_and_import(tmp_path, monkeypatch, capsys):
    from napari_unet import cli

    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "home"))
    seg = _tiny()
    seg.save(tmp_path / "tiny")
    out = tmp_path / "tiny.zip"
    assert cli.main(["export", str(tmp_path / "tiny"), str(out), "--no-torchscript"]) == 0
    assert cli.main(["export", str(tmp_path / "tiny"), str(out)]) == 2  # exists: refused
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["import", str(out), "--name", "back"]) == 0
    back = cli.load_segmenter("registry:back")
    img, _ = make_nuclei((48, 48), seed=4)
    _same_prediction(seg, back, img)
    (tmp_path / "plain.zip").write_bytes(b"PK")
    assert cli.main(["import", str(tmp_path / "plain.zip")]) == 2
