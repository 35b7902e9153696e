"""PredictWidget in a real (hidden) napari viewer, with a tiny model and tiny images."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import capture_notifications  # noqa: E402
from qtpy.QtCore import QThreadPool  # noqa: E402

from napari_unet._widgets import _layers  # noqa: E402
from napari_unet._widgets import _workers as workers_mod  # noqa: E402
from napari_unet._widgets import predict as predict_mod  # noqa: E402
from napari_unet._widgets._session import session_for  # noqa: E402
from napari_unet._widgets.predict import PredictWidget  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402
from napari_unet.store import ModelRegistry  # noqa: E402


def eager_model(**kwargs) -> Segmenter:
    """A tiny untrained model biased to 'interior' everywhere: its labels are never empty."""
    seg = Segmenter.new(base_channels=4, depth=2, seed=0, **kwargs)
    with torch.no_grad():
        seg.net.outc.bias.copy_(torch.tensor([0.0, 6.0, 0.0]))
    return seg


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei((64, 64), seed=1)


@pytest.fixture
def messages(monkeypatch):
    got = capture_notifications(monkeypatch, predict_mod)
    monkeypatch.setattr(workers_mod, "show_info", got["info"].append)
    return got


@pytest.fixture
def make_widget(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    made = []

    def make(segmenter: Segmenter | None = None):
        viewer = make_napari_viewer()
        session = session_for(viewer)
        session.registry = ModelRegistry(tmp_path / "models")
        seg = segmenter or eager_model()
        session.set_segmenter(seg, name="tiny")
        widget = PredictWidget(viewer)
        viewer.window.add_dock_widget(widget, name="U-Net Predict")
        made.append(widget)
        return viewer, widget

    yield make
    for w in made:
        qtbot.waitUntil(lambda w=w: not w.running, timeout=10_000)
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=5_000)


def run(qtbot, widget, timeout=20_000):
    task = widget.predict()
    assert task is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    return task


def own_layers(viewer):
    return [ly for ly in viewer.layers if (ly.metadata or {}).get("napari_unet") is True]


def test_predict_adds_and_replaces_own_layer(make_widget, qtbot, nuclei, messages):
    viewer, w = make_widget()
    image, truth = nuclei
    img = viewer.add_image(image, name="nuc", scale=(2.0, 0.5), translate=(10, -4))
    # a user layer with the very name the plugin uses: never touched
    user = viewer.add_labels(truth.copy(), name="nuc [unet]")
    w.image_combo.set_value(img)
    w.probs_check.setChecked(True)
    run(qtbot, w)
    assert not messages["error"], messages
    out = _layers.find_own_layer(viewer, "nuc")
    assert out is not None and out is not user
    assert out.data.shape == image.shape and np.issubdtype(out.data.dtype, np.integer)
    assert out.name.startswith("nuc [unet]")
    assert out.metadata["napari_unet"] is True and out.metadata["source"] == "nuc"
    np.testing.assert_allclose(out.scale, img.scale)
    np.testing.assert_allclose(out.translate, img.translate)
    prob = _layers.find_own_layer(viewer, "nuc", "probabilities", 1)
    assert prob is not None and prob.name == "nuc [unet prob]"
    assert prob.data.shape == image.shape and prob.data.dtype == np.float32
    assert w.progress.value() == w.progress.maximum()
    assert "the model is untrained" in w.status_label.text()  # not "correct it" alone

    # re-predict, nothing edited: same layer objects, data replaced, no new layer
    n_layers = len(viewer.layers)
    run(qtbot, w)
    assert len(viewer.layers) == n_layers
    assert _layers.find_own_layer(viewer, "nuc") is out
    np.testing.assert_array_equal(user.data, truth)
    # re-predict after the user edited the result: their layer is kept, a new one gets the
    # result (the edits were replaced, and undo could not bring them back)
    edited = np.asarray(out.data).copy()
    edited[:10, :10] = 77
    out.data = edited
    run(qtbot, w)
    assert not messages["error"], messages
    assert len(viewer.layers) == n_layers + 1
    assert out.name == "nuc [corrected]" and out.metadata["napari_unet"] is False
    np.testing.assert_array_equal(out.data, edited)
    new = _layers.find_own_layer(viewer, "nuc")
    assert new is not None and new is not out and new.name.startswith("nuc [unet]")
    assert any("kept as 'nuc [corrected]'" in m for m in messages["info"]), messages
    np.testing.assert_array_equal(user.data, truth)


def test_predict_stack_slice_and_rgb(make_widget, qtbot, messages):
    viewer, w = make_widget()
    stack, _ = make_nuclei((3, 48, 48), seed=2)
    img = viewer.add_image(stack, name="stack", scale=(3.0, 1.0, 1.0))
    w.image_combo.set_value(img)
    assert _layers.image_axes(img, viewer) == "ZYX"
    # current slice only: the other planes stay empty
    viewer.dims.set_current_step(0, 1)
    w.scope_combo.setCurrentText("current slice")
    run(qtbot, w)
    out = _layers.find_own_layer(viewer, "stack")
    assert out.data.shape == stack.shape and out.data.dtype == np.uint16  # compact: ids fit
    np.testing.assert_allclose(out.scale, (3.0, 1.0, 1.0))
    assert out.data[1].any()
    assert not out.data[0].any() and not out.data[2].any()
    plane1 = out.data[1].copy()
    # whole stack: every plane predicted (same model, same plane -> same result)
    w.scope_combo.setCurrentText("whole layer")
    run(qtbot, w)
    assert _layers.find_own_layer(viewer, "stack") is out
    np.testing.assert_array_equal(out.data[1] > 0, plane1 > 0)
    assert out.data[0].any() and out.data[2].any()

    # RGB with a 1-channel model: the green channel is used, and the user is told
    grey, _ = make_nuclei((48, 48), seed=4, dtype=np.uint8)
    rgb = np.stack([grey // 2, grey, grey // 3], axis=-1)
    rgb_layer = viewer.add_image(rgb, name="colour", rgb=True)
    assert _layers.image_axes(rgb_layer, viewer) == "YXC"
    w.image_combo.set_value(rgb_layer)
    run(qtbot, w)
    out = _layers.find_own_layer(viewer, "colour")
    assert out.data.shape == (48, 48) and out.data.dtype == np.uint16  # compact: ids fit
    assert any("green" in m for m in messages["info"])
    assert not messages["error"], messages


def test_predict_field_of_view(make_widget, qtbot, nuclei, monkeypatch, messages):
    viewer, w = make_widget()
    image, _ = nuclei
    img = viewer.add_image(image, name="nuc", translate=(5, 5))
    w.image_combo.set_value(img)
    corners = _layers.visible_world_corners(viewer)  # the real canvas can be read
    assert corners.shape == (2, viewer.dims.ndim) and np.all(np.isfinite(corners))
    # a known view: world rows 15..34, cols 25..54 -> data rows 10..29, cols 20..49
    view = np.array([[15.0, 25.0], [34.0, 54.0]])
    monkeypatch.setattr(_layers, "visible_world_corners", lambda v: view)
    w.scope_combo.setCurrentText("current field of view")
    run(qtbot, w)
    out = _layers.find_own_layer(viewer, "nuc")
    assert out.data.shape == image.shape
    inside = np.zeros(image.shape, bool)
    inside[10:31, 20:51] = True  # +1 pixel margin of the rounding
    assert out.data[inside].any()
    assert not out.data[~inside].any()
    np.testing.assert_allclose(out.translate, img.translate)
    # predicting the view again keeps the rest of the layer; new ids do not collide with it
    run(qtbot, w)
    assert _layers.find_own_layer(viewer, "nuc") is out  # not edited: updated in place
    # edited (outside the view here): the edited layer is kept whole, and the new layer holds
    # the rest of it with the view predicted again
    edited = np.where(inside, 0, 500).astype(np.int32)
    out.data = edited
    run(qtbot, w)
    new = _layers.find_own_layer(viewer, "nuc")
    assert new is not out and out.name == "nuc [corrected]"
    np.testing.assert_array_equal(out.data, edited)
    assert (new.data[~inside] == 500).all()
    assert new.data[inside].any() and (new.data[inside & (new.data > 0)] > 500).all()
    assert not messages["error"], messages


def test_cancel_leaves_no_layer(make_widget, qtbot, nuclei, monkeypatch, messages):
    viewer, w = make_widget()
    closed = []

    def slow_predict_iter(self, image, axes=None, **kwargs):
        try:
            for k in range(1000):
                time.sleep(0.01)
                yield k, 1000
        finally:
            closed.append(True)
        raise AssertionError("never reached")  # pragma: no cover

    monkeypatch.setattr(Segmenter, "predict_iter", slow_predict_iter)
    img = viewer.add_image(nuclei[0], name="nuc")
    w.image_combo.set_value(img)
    w.predict()
    assert w.running and w.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: w.progress.value() > 0, timeout=5_000)
    t0 = time.perf_counter()
    w.cancel()
    qtbot.waitUntil(lambda: not w.running, timeout=5_000)
    assert time.perf_counter() - t0 < 2.0
    assert closed  # the core generator was closed
    assert own_layers(viewer) == []
    assert w.predict_button.isEnabled()
    assert not messages["error"], messages


def test_bad_input_gives_messages(make_widget, qtbot, nuclei, messages):
    viewer, w = make_widget()
    w.predict()  # no image at all
    assert messages["error"] and "image" in messages["error"][-1]
    # said where it stays: the notification alone was cut after a few words
    assert w.status_label.text().startswith("not started: no image layer to segment")

    bad = nuclei[0].astype(np.float32)
    bad[3, 4] = np.nan
    viewer.add_image(bad, name="nan image")
    run(qtbot, w)
    assert "nan" in messages["error"][-1].lower()
    assert own_layers(viewer) == []

    # a 3-channel model on a grey image: the core's message about channels
    session_for(viewer).set_segmenter(Segmenter.new(in_channels=3, base_channels=4, depth=2))
    w.image_combo.set_value(viewer.add_image(nuclei[0], name="grey"))
    run(qtbot, w)
    assert "channel" in messages["error"][-1]
    assert own_layers(viewer) == []
    assert "3 channel" in w.model_label.text()


def test_compact_labels_keeps_every_id():
    small = np.array([[0, 1], [65534, 7]], np.int32)
    out = _layers.compact_labels(small)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, small)
    big = np.array([[0, 70_000]], np.int64)
    out = _layers.compact_labels(big)  # ids past uint16 stay exact
    assert out.dtype == np.int32 and out[0, 1] == 70_000


def test_field_of_view_of_big_and_multiscale_layers(make_widget, qtbot, monkeypatch, messages):
    """Big layers: the view goes to its own positioned layer, at the resolution napari shows."""
    viewer, w = make_widget()
    image, _ = make_nuclei((128, 128), seed=3)
    view = np.array([[32.0, 16.0], [95.0, 79.0]])  # world = data here (scale 1, no translate)
    monkeypatch.setattr(_layers, "visible_world_corners", lambda v: view)
    w.scope_combo.setCurrentText("current field of view")

    # a layer "too big" for a full-size labels layer (threshold lowered for the test)
    monkeypatch.setattr(_layers, "BIG_LAYER_PIXELS", 100 * 100)
    big = viewer.add_image(image, name="big")
    w.image_combo.set_value(big)
    run(qtbot, w)
    assert not messages["error"], messages
    out = viewer.layers["big [unet view]"]
    assert _layers.find_own_layer(viewer, "big") is None  # no 128x128 full-size layer
    assert out.data.shape == (64, 64) and out.data.any()
    np.testing.assert_allclose(out.translate, (32, 16))
    np.testing.assert_allclose(out.scale, (1, 1))

    # a multiscale layer shown at level 1: predicted at half resolution, placed over the image
    pyramid = [image, image[::2, ::2]]
    ms = viewer.add_image(pyramid, multiscale=True, name="ms", scale=(0.5, 0.5))
    ms.locked_data_level = 1
    assert ms.data_level == 1
    w.image_combo.set_value(ms)
    run(qtbot, w)
    assert not messages["error"], messages
    out = viewer.layers["ms [unet view]"]
    # world rows 32..95, cols 16..79 -> level-0 data x2 -> level-1 pixels rows 32..63 (the
    # image ends there), cols 16..63
    assert out.data.shape == (32, 48) and out.data.any()
    np.testing.assert_allclose(out.scale, (1.0, 1.0))  # 0.5 x 2
    # level-1 pixel 32 is level-0 pixels 64-65: its centre is at world 0.5 * 64.5
    np.testing.assert_allclose(out.translate, (32.25, 16.25))
    lo = np.asarray(out.translate)
    hi = lo + np.asarray(out.scale) * (np.asarray(out.data.shape) - 1)
    assert np.all(lo >= view[0] - 1.0) and np.all(hi <= view[1] + 1.0), (lo, hi)

    # a view too large to predict at once: a plain message
    monkeypatch.setattr(_layers, "MAX_VIEW_PIXELS", 50 * 50)
    w.image_combo.set_value(big)
    assert w.predict() is None
    assert "zoom in" in messages["error"][-1]


def test_whole_big_layer_goes_to_a_zarr_store_and_slices_to_their_own_layer(
    make_widget, qtbot, monkeypatch, messages, tmp_path
):
    zarr = pytest.importorskip("zarr")
    viewer, w = make_widget(Segmenter.pretrained("nuclei"))
    monkeypatch.setattr(_layers, "BIG_LAYER_PIXELS", 100 * 100)
    image, truth = make_nuclei((128, 128), seed=4)
    img = viewer.add_image(image, name="huge")
    w.image_combo.set_value(img)
    run(qtbot, w, timeout=60_000)
    assert not messages["error"], messages
    out = _layers.find_own_layer(viewer, "huge")
    assert isinstance(out.data, zarr.Array) and out.data.shape == image.shape
    path = out.metadata["path"]
    assert path.startswith(str(tmp_path)) and path.endswith(".ome.zarr")
    from napari_unet import omezarr

    ome = omezarr.read(path)  # OME-Zarr labels: a pyramid and image-label metadata
    on_disk = np.asarray(ome.labels["unet"].data)
    np.testing.assert_array_equal(on_disk, np.asarray(out.data))
    from napari_unet.metrics import instance_f1

    assert instance_f1(on_disk, truth) > 0.8  # real labels were written there
    assert any("written to disk" in m for m in messages["info"]), messages["info"]

    # a stack too big for a full-size layer: 'current slice' gives the slice its own layer
    stack = np.stack([image, image[::-1]])
    st = viewer.add_image(stack, name="bigstack")
    viewer.dims.set_point(0, 1)
    w.image_combo.set_value(st)
    w.scope_combo.setCurrentText("current slice")
    run(qtbot, w, timeout=60_000)
    assert not messages["error"], messages
    view = viewer.layers["bigstack [unet view]"]
    assert view.data.shape == image.shape and view.data.any()
    assert _layers.find_own_layer(viewer, "bigstack") is None


def test_model_with_two_channels_takes_a_second_layer(make_widget, qtbot, nuclei, messages):
    """napari shows multichannel files as one layer per channel: tick the other channels."""
    viewer, w = make_widget(eager_model(in_channels=2))
    assert w._form.isRowVisible(w._channels_row)  # shown for a 2-channel model
    nuc = viewer.add_image(nuclei[0], name="nuc")
    viewer.add_image(nuclei[0][::-1].copy(), name="cyto")
    viewer.add_image(np.zeros((32, 32), np.float32), name="small")
    w.image_combo.set_value(nuc)
    # one channel only: the core says how many the model wants
    run(qtbot, w)
    assert "2 channel" in messages["error"][-1]
    assert own_layers(viewer) == []
    # a layer of another shape as second channel: refused with both shapes named
    w.channel_list.set_checked([viewer.layers["small"]])
    assert w.predict() is None
    assert "different shapes" in messages["error"][-1]
    w.channel_list.set_checked([viewer.layers["cyto"]])
    run(qtbot, w)
    out = _layers.find_own_layer(viewer, "nuc")
    assert out is not None and out.data.shape == nuclei[0].shape and out.data.any()
    assert any("channels: 'nuc', 'cyto'" in m for m in messages["info"]), messages["info"]
    # a one-channel model hides the list again
    session_for(viewer).set_segmenter(eager_model(), name="one")
    assert not w._form.isRowVisible(w._channels_row)


def test_prediction_notes_reach_the_user_and_labels_are_compacted_in_the_worker(
    make_widget, qtbot, nuclei, monkeypatch, messages
):
    """What the core had to change (e.g. out of GPU memory: the CPU took over) is shown."""
    from napari_unet._widgets import _workers

    warned: list[str] = []
    monkeypatch.setattr(_workers, "show_warning", warned.append)
    original = Segmenter.predict_iter

    def with_a_note(self, *args, **kwargs):
        pred = yield from original(self, *args, **kwargs)
        pred.notes.append("out of memory on cuda: continuing on the CPU")
        assert pred.labels.dtype == np.int32  # the core's labels; the worker compacts them
        return pred

    monkeypatch.setattr(Segmenter, "predict_iter", with_a_note)
    viewer, w = make_widget()
    w.image_combo.set_value(viewer.add_image(nuclei[0], name="nuc"))
    run(qtbot, w)
    assert warned == ["out of memory on cuda: continuing on the CPU"]
    assert _layers.find_own_layer(viewer, "nuc").data.dtype == np.uint16


def test_starter_model_named_when_the_widget_opens(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    widget = PredictWidget(make_napari_viewer())  # the session loads the shipped starter
    assert widget.model_label.text().startswith("nuclei "), widget.model_label.text()


def test_a_volume_gets_the_volume_starter_until_the_user_picks_a_model(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, nuclei
):
    """With no model chosen, a ZYX layer is predicted with the starter for volumes and an
    image with the 2D starter, and the widget names the one in use; a model the user loads
    (or trains) is kept for both."""
    from napari_unet.synthetic3d import make_nuclei_3d

    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    s = session_for(viewer)
    s.registry = ModelRegistry(tmp_path / "models")
    w = PredictWidget(viewer)
    assert s.model_name == "nuclei"
    vol, _ = make_nuclei_3d((6, 48, 48), anisotropy=2.0, seed=1)
    w.image_combo.set_value(viewer.add_image(vol, name="vol"))
    run(qtbot, w, timeout=60_000)
    assert s.model_name == "nuclei-volumes"
    assert w.model_label.text().startswith("nuclei-volumes "), w.model_label.text()
    assert _layers.find_own_layer(viewer, "vol").data.max() > 0
    w.image_combo.set_value(viewer.add_image(nuclei[0], name="nuc"))
    run(qtbot, w, timeout=60_000)
    assert s.model_name == "nuclei"
    s.set_segmenter(eager_model(), name="mine")  # as the Models widget's Load does
    w.image_combo.set_value(viewer.layers["vol"])
    run(qtbot, w, timeout=60_000)
    assert s.model_name == "mine"


def test_engine_choice_reaches_the_prediction_and_a_fallback_is_shown(
    make_widget, qtbot, nuclei, monkeypatch, messages
):
    """The Engine box picks who runs the network; an engine that is missing falls back to torch
    and the user is told."""
    import importlib.util

    from napari_unet._widgets import _workers

    warned: list[str] = []
    monkeypatch.setattr(_workers, "show_warning", warned.append)
    used: list[str] = []
    original = Segmenter.predict_iter

    def spy(self, *args, **kwargs):
        pred = yield from original(self, *args, **kwargs)
        used.append((kwargs.get("engine"), pred.engine))
        return pred

    monkeypatch.setattr(Segmenter, "predict_iter", spy)
    viewer, w = make_widget()
    assert w.engine_combo.currentText() == "auto"
    w.image_combo.set_value(viewer.add_image(nuclei[0], name="nuc"))
    w.engine_combo.setCurrentText("torch")
    run(qtbot, w)
    assert used[-1] == ("torch", "torch")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a)
    )
    w.engine_combo.setCurrentText("openvino")
    run(qtbot, w)
    assert used[-1] == ("openvino", "torch")
    assert any("openvino" in m and "not installed" in m for m in warned)


def test_the_compiled_watershed_is_loaded_when_the_plugin_starts(monkeypatch):
    """numba's kernel is loaded with the plugin, before its objects are frozen out of the
    collector's reach: not inside the first big prediction, where importing numba froze the
    window for 155-181 ms."""
    pytest.importorskip("numba")
    import napari_unet.postprocess as pp
    from napari_unet._widgets import _session

    monkeypatch.setattr(_session, "_FROZEN", False)
    monkeypatch.setattr(pp, "_kernel", [])
    _session._freeze_startup_objects()
    assert pp._kernel, "the kernel was not looked for at the plugin's start"


def test_a_few_plane_stack_is_said_to_be_taken_as_planes(make_widget, qtbot, nuclei, messages):
    """A (3, Y, X) file of 3 channels was segmented as a 3-plane stack without a word."""
    viewer, w = make_widget()
    image = np.stack([nuclei[0]] * 3)
    w.image_combo.set_value(viewer.add_image(image, name="three"))
    run(qtbot, w)
    assert any("stack of 3 planes" in m and "Split Stack" in m for m in messages["info"])
    big = np.stack([nuclei[0]] * 8)
    messages["info"].clear()
    w.image_combo.set_value(viewer.add_image(big, name="eight"))
    run(qtbot, w)
    assert not any("planes (Z)" in m for m in messages["info"])
