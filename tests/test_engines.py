"""Inference engines: torch (BatchNorm folded), OpenVINO and ONNX Runtime give the same
probabilities; a missing or failing engine falls back to torch and says so; fine-tuning
invalidates the exported network; balanced tiles cover an image with fewer pixels."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from napari_unet import engines
from napari_unet.data import make_nuclei
from napari_unet.model import UNet
from napari_unet.segmenter import Segmenter, _Run

CPU_ENGINES = [
    pytest.param(e, marks=pytest.mark.skipif(
        importlib.util.find_spec(e) is None, reason=f"{e} not installed"))
    for e in ("openvino", "onnxruntime")
]


@pytest.fixture(scope="module")
def trained():
    """A tiny instance model after a few steps, so its BatchNorm statistics are not trivial."""
    torch.manual_seed(0)
    seg = Segmenter.new(base_channels=8, depth=2)
    img, lab = make_nuclei((96, 96), seed=1)
    list(seg.finetune([img], [lab], steps=6, patch_shape=(64, 64), batch_size=2,
                      device="cpu", safe=False, time_limit_s=None))
    return seg, make_nuclei((128, 160), seed=2)[0]


def test_folding_batchnorm_changes_no_output():
    net = UNet(1, 3, base_channels=8, depth=2).eval()
    for m in net.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 1, 64, 48)
    fused = engines.fused_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # original kept
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_cpu_engine_equals_torch_within_1e4(trained, engine):
    seg, img = trained
    ref = seg.predict(img, device="cpu", engine="torch")
    got = seg.predict(img, device="cpu", engine=engine)
    assert got.engine == engine and ref.engine == "torch"
    assert got.notes == []
    assert np.abs(got.probabilities - ref.probabilities).max() < 1e-4
    assert np.array_equal(got.labels, ref.labels)


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("batch", [2, 3])
def test_cpu_engine_equals_torch_on_batches_of_tiles(trained, engine, batch):
    """Several tiles per call (OpenVINO sends them to two streams at once): still torch's."""
    seg, img = trained
    kw = {"device": "cpu", "tile_shape": (64, 64), "batch_size": batch, "num_threads": 2}
    ref = seg.predict(img, engine="torch", **kw)
    got = seg.predict(img, engine=engine, **kw)
    assert got.engine == engine and got.notes == []
    assert np.abs(got.probabilities - ref.probabilities).max() < 1e-4
    assert np.array_equal(got.labels, ref.labels)


def test_a_missing_engine_falls_back_to_torch_and_says_so(trained, monkeypatch):
    seg, img = trained
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    ref = seg.predict(img, device="cpu", engine="torch")
    got = seg.predict(img, device="cpu", engine="onnxruntime")
    assert got.engine == "torch"
    assert any("not installed" in n and "onnxruntime" in n for n in got.notes)
    assert np.array_equal(got.labels, ref.labels)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_a_failing_export_falls_back_to_torch_and_says_so(trained, engine, monkeypatch,
                                                           tmp_path):
    seg, img = trained
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path))  # nothing exported yet
    monkeypatch.setattr(engines, "_onnx", type(engines._onnx)())
    monkeypatch.setattr(engines, "_sessions", type(engines._sessions)())
    monkeypatch.setattr(engines, "_failed", {})

    def broken(net):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(engines, "_export_bytes", broken)
    got = seg.predict(img, device="cpu", engine=engine)
    ref = seg.predict(img, device="cpu", engine="torch")
    assert got.engine == "torch"
    assert any("unsupported operator" in n and "torch" in n for n in got.notes)
    assert np.array_equal(got.labels, ref.labels)


def test_an_engine_failing_mid_prediction_hands_over_to_torch(trained, monkeypatch):
    seg, img = trained
    if not engines.available_engines():
        pytest.skip("no CPU engine installed")

    def maker(path, threads):
        def fn(batch):
            raise RuntimeError("cannot compile this shape")
        return fn

    monkeypatch.setattr(engines, "_sessions", type(engines._sessions)())
    monkeypatch.setitem(engines._MAKERS, engines.available_engines()[0], maker)
    ref = seg.predict(img, device="cpu", engine="torch")
    got = seg.predict(img, device="cpu", engine=engines.available_engines()[0])
    assert any("cannot compile" in n for n in got.notes)
    assert got.engine == "torch"  # the engine that really ran
    assert np.array_equal(got.labels, ref.labels)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_finetuning_invalidates_the_exported_network(trained, engine):
    seg, img = trained
    seg = seg.copy()
    before = seg.predict(img, device="cpu", engine=engine)
    d0 = engines.weights_digest(seg.net)
    a, b = make_nuclei((96, 96), seed=5)
    list(seg.finetune([a], [b], steps=4, patch_shape=(64, 64), batch_size=2, device="cpu",
                      safe=False, lr=1e-2, time_limit_s=None))
    assert engines.weights_digest(seg.net) != d0
    after = seg.predict(img, device="cpu", engine=engine)
    now = seg.predict(img, device="cpu", engine="torch")
    assert after.engine == engine
    assert np.abs(after.probabilities - now.probabilities).max() < 1e-4
    assert np.abs(after.probabilities - before.probabilities).max() > 1e-3  # not the old net


def test_auto_exports_in_the_background_for_small_images(monkeypatch, tmp_path):
    if not engines.available_engines():
        pytest.skip("no CPU engine installed")
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path))
    seg = Segmenter.new(base_channels=8, depth=2, seed=7)  # weights no other test exported
    img = make_nuclei((64, 64), seed=0)[0]
    first = seg.predict(img, device="cpu")  # no export yet: torch, export started
    assert first.engine == "torch"
    digest = engines.weights_digest(seg.net)
    engines.export_in_background(seg.net, digest).join(60)
    assert engines.is_exported(digest)
    second = seg.predict(img, device="cpu")
    assert second.engine == engines.available_engines()[0]
    assert np.abs(second.probabilities - first.probabilities).max() < 1e-4


def test_the_background_export_starts_once_the_prediction_is_done(monkeypatch, tmp_path):
    """Run alongside the prediction it was started by, the export took the CPU from it: a
    512x512 refresh after a round took 1.23 s instead of 0.31 s."""
    if not engines.available_engines():
        pytest.skip("no CPU engine installed")
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path))
    events: list[str] = []
    real_torch, real_export = engines._torch_predictor, engines.export_in_background

    def torch_predictor(*a, **k):
        fn = real_torch(*a, **k)

        def tile(batch):
            events.append("tile")
            return fn(batch)

        return tile

    def export(net, digest):
        events.append("export")
        return real_export(net, digest)

    monkeypatch.setattr(engines, "_torch_predictor", torch_predictor)
    monkeypatch.setattr(engines, "export_in_background", export)
    seg = Segmenter.new(base_channels=8, depth=2, seed=11)
    img = make_nuclei((64, 64), seed=0)[0]
    before = engines.weights_digest(seg.net)
    first = seg.predict(img, device="cpu")
    assert first.engine == "torch"
    assert "tile" in events and events[-1] == "export" and events.count("export") == 1
    assert events.index("export") > max(i for i, e in enumerate(events) if e == "tile")
    engines.wait_for_exports()
    assert engines.is_exported(before)


def test_an_unknown_engine_is_refused_by_name():
    seg = Segmenter.new(base_channels=8, depth=2)
    with pytest.raises(ValueError, match="engine must be one of.*'torch'"):
        seg.predict(np.zeros((32, 32), np.float32), engine="tensorrt")


def test_balanced_tiles_put_fewer_pixels_through_the_network():
    seg = Segmenter.new(base_channels=8, depth=3)
    run = _Run(seg, torch.device("cpu"), 1, [512, 512], 32, [], balance=True)
    assert run.tile_for((2048, 2048)) == [536, 536]  # 4 tiles a side instead of 5
    assert run.tile_for((1024, 700)) == [528, 368]
    assert run.tile_for((300, 512)) == [512, 512]  # fits in one tile: unchanged
    fixed = _Run(seg, torch.device("cpu"), 1, [512, 512], 32, [])  # a tile_shape given
    assert fixed.tile_for((2048, 2048)) == [512, 512]


def test_the_command_line_offers_exactly_the_engines():
    from napari_unet import _cli_predict

    assert _cli_predict.ENGINE_CHOICES == engines.ENGINES


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_a_damaged_cached_export_falls_back_once_then_is_made_again(trained, engine,
                                                                    monkeypatch, tmp_path):
    seg, img = trained
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path))
    monkeypatch.setattr(engines, "_onnx", type(engines._onnx)())
    monkeypatch.setattr(engines, "_sessions", type(engines._sessions)())
    digest = engines.weights_digest(seg.net)
    engines.cache_dir().mkdir(parents=True)
    (engines.cache_dir() / f"{digest}.onnx").write_bytes(b"not an onnx file")
    first = seg.predict(img, device="cpu", engine=engine)
    assert first.engine == "torch" and any("failed" in n for n in first.notes)
    second = seg.predict(img, device="cpu", engine=engine)
    assert second.engine == engine and second.notes == []
    assert np.array_equal(first.labels, second.labels)


def test_a_process_that_exits_during_a_background_export_waits_for_it(tmp_path):
    """The CLI predicts and exits while ``auto`` exports the new weights in the background: the
    exit waits for the export (before, the process was aborted in the middle of it, exit
    status 134 in 4 of 12 runs of ``napari-unet predict``, and nothing was cached)."""
    import subprocess
    import sys

    code = (
        "import napari_unet as nu\n"
        "from napari_unet import engines\n"
        "seg = nu.Segmenter.new(base_channels=4, depth=2, seed=11)\n"
        "d = engines.weights_digest(seg.net)\n"
        "engines.export_in_background(seg.net, d)\n"
        "print(d)\n"  # and exit at once, the export still running
    )
    env = {**os.environ, "NAPARI_UNET_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-500:]
    digest = run.stdout.split()[-1]
    assert (tmp_path / "engines" / f"{digest}.onnx").is_file()


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_a_big_prediction_frees_the_engines_memory_before_post_processing(trained, monkeypatch):
    """OpenVINO keeps its activations between calls (about 180 MB for two streams of 536x536
    tiles); a prediction of RELEASE_PIXELS or more frees them after its tiles, and the next
    prediction still equals torch's. A release that fails costs nothing but a log line."""
    import napari_unet.segmenter as segmenter

    seg, img = trained
    kw = {"device": "cpu", "tile_shape": (64, 64), "batch_size": 2, "num_threads": 2}
    released = []
    real = engines.release_memory

    def spy(fn):
        released.append(getattr(fn, "engine", None))
        real(fn)

    monkeypatch.setattr(engines, "release_memory", spy)
    seg.predict(img, engine="openvino", **kw)
    assert released == []  # under RELEASE_PIXELS: kept for the next call
    monkeypatch.setattr(segmenter, "RELEASE_PIXELS", img.size)
    first = seg.predict(img, engine="openvino", **kw)
    assert released == ["openvino"]
    again = seg.predict(img, engine="openvino", **kw)  # after the release
    ref = seg.predict(img, engine="torch", **kw)
    assert np.abs(again.probabilities - ref.probabilities).max() < 1e-4
    assert np.array_equal(again.labels, first.labels)

    def broken():
        raise RuntimeError("no memory to release")

    fn = engines.predictor(seg.net, torch.device("cpu"), "openvino", notes=[])
    monkeypatch.setattr(fn, "release", broken)
    real(fn)  # logged, not raised
