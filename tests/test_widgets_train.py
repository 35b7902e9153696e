"""TrainWidget in a real (hidden) napari viewer, with a tiny model and tiny images."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import capture_notifications  # noqa: E402
from qtpy.QtCore import QThreadPool  # noqa: E402

from napari_unet._widgets import _layers  # noqa: E402
from napari_unet._widgets import train as train_mod  # noqa: E402
from napari_unet._widgets._workers import State  # noqa: E402
from napari_unet._widgets.train import TrainWidget  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402


def tiny() -> Segmenter:
    return Segmenter.new(base_channels=4, depth=2, seed=0)


def weights(seg: Segmenter) -> dict:
    return {k: v.detach().clone() for k, v in seg.net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei((64, 64), seed=5)


@pytest.fixture
def messages(monkeypatch):
    return capture_notifications(monkeypatch, train_mod)


@pytest.fixture
def setup(viewer_session, qtbot, nuclei):
    """A viewer with a tiny model, an image 'img' and labels 'truth', and a TrainWidget."""
    viewer, session = viewer_session
    session.set_segmenter(tiny(), name="tiny")
    image, labels = nuclei
    img = viewer.add_image(image, name="img")
    lab = viewer.add_labels(labels.copy(), name="truth")
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="U-Net Train")
    w.image_combo.set_value(img)
    w.labels_combo.set_value(lab)
    w.preview_spin.setValue(0)
    w.threads_spin.setValue(1)
    w.device_combo.setCurrentText("cpu")
    yield viewer, w, session
    qtbot.waitUntil(lambda: w.state.value not in (State.TRAINING, State.STOPPING), timeout=20_000)
    qtbot.waitUntil(lambda: not w.refreshing, timeout=20_000)
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=5_000)
    assert not session.training_lock.locked()


def train_steps(qtbot, w, steps=3, timeout=30_000):
    w.seconds_spin.setValue(0)
    w.steps_spin.setValue(steps)
    task = w.train()
    assert task is not None, "training refused"
    qtbot.waitUntil(lambda: w.state.value in (State.DONE, State.FAILED), timeout=timeout)
    return task


def test_short_training_then_refresh(setup, qtbot, nuclei, messages):
    viewer, w, session = setup
    before = weights(session.segmenter)
    labels_before = viewer.layers["truth"].data.copy()
    image_before = viewer.layers["img"].data.copy()
    train_steps(qtbot, w, steps=3)
    assert w.state.value == State.DONE, messages
    assert not messages["error"], messages
    assert not same(before, weights(session.segmenter))  # trained in place
    assert w.last_progress is not None and w.last_progress.step == 3
    assert w.progress.value() > 0
    assert w.curve.steps and w.curve.draws > 0
    assert "step" in w.status_label.text() or "saved" in w.status_label.text()
    infos = session.registry.versions("tiny")
    assert len(infos) == 1 and infos[0].config["history"][-1]["steps"] == 3
    assert any("saved" in m for m in messages["info"])
    # the user's layers are untouched and nothing else was added
    np.testing.assert_array_equal(viewer.layers["truth"].data, labels_before)
    np.testing.assert_array_equal(viewer.layers["img"].data, image_before)
    assert [ly.name for ly in viewer.layers] == ["img", "truth"]

    # refresh prediction: a new plugin layer for the trained image (the labels are not touched)
    assert w.refresh_button.isEnabled()
    assert w.refresh_prediction() is not None
    qtbot.waitUntil(lambda: not w.refreshing, timeout=20_000)
    out = _layers.find_own_layer(viewer, "img")
    assert out is not None and out.data.shape == nuclei[0].shape and out.data.dtype == np.uint16
    np.testing.assert_array_equal(viewer.layers["truth"].data, labels_before)

    # training on the plugin's own layer makes it the user's: refresh never overwrites it
    w.labels_combo.set_value(out)
    out.data = nuclei[1].astype(np.int32)
    train_steps(qtbot, w, steps=2)
    assert w.state.value == State.DONE, messages
    assert out.name == "img [corrected]" and out.metadata["napari_unet"] is False
    w.refresh_prediction()
    qtbot.waitUntil(lambda: not w.refreshing, timeout=20_000)
    np.testing.assert_array_equal(out.data, nuclei[1])
    assert _layers.find_own_layer(viewer, "img") not in (None, out)
    assert len(session.registry.versions("tiny")) == 2


def test_stop_long_training(setup, qtbot, messages):
    viewer, w, session = setup
    w.seconds_spin.setValue(60)
    w.steps_spin.setValue(0)
    w.preview_spin.setValue(0.3)
    assert w.train() is not None
    assert w.state.value == State.TRAINING and w.stop_button.isEnabled()
    # the preview layer is made at the click (not mid-training), then filled while training
    assert any((ly.metadata or {}).get("kind") == "preview" for ly in viewer.layers)
    qtbot.waitUntil(lambda: w.previews_shown > 0, timeout=20_000)
    assert viewer.layers["unet preview"].data.shape == (64, 64)
    # a second training while one runs: refused with a warning
    assert w.train() is None
    assert messages["warning"] == ["a training is already running"]
    t0 = time.perf_counter()
    w.stop()
    assert w.state.value == State.STOPPING
    qtbot.waitUntil(lambda: w.state.value == State.DONE, timeout=5_000)
    assert time.perf_counter() - t0 < 2.0
    assert w.last_progress is not None and not w.last_progress.done
    info = session.registry.versions("tiny")[-1]
    assert info.config["history"][-1]["stopped"] == "stopped by the user"
    assert any("stopped" in m for m in messages["info"]), messages
    assert not messages["error"], messages


def test_shapes_region_ignores_outside(setup, qtbot, nuclei, messages):
    viewer, w, session = setup
    _, truth = nuclei
    lab = viewer.layers["truth"]
    # the corrected region: rows 0..27, all columns (two ways: a rectangle and a polygon)
    shapes = viewer.add_shapes(
        [
            np.array([[-0.5, -0.5], [15, -0.5], [15, 63.5], [-0.5, 63.5]]),
            np.array([[14, -0.5], [27.5, -0.5], [27.5, 63.5], [14, 63.5]]),
        ],
        shape_type=["rectangle", "polygon"],
        name="checked",
    )
    mask = _layers.shapes_to_mask(shapes, lab)
    assert mask[:28].all() and not mask[28:].any()
    w.shapes_combo.set_value(shapes)

    def run_with(labels_data, use_shapes=True):
        session.set_segmenter(tiny(), name="tiny")
        lab.data = labels_data
        w.shapes_combo.set_value(shapes if use_shapes else None)
        train_steps(qtbot, w, steps=3)
        assert w.state.value == State.DONE, messages
        return weights(session.segmenter)

    other = truth.copy()
    other[40:] = 0  # labels far outside the region differ
    other[45:55, 10:20] = 99
    a = run_with(truth.copy())
    b = run_with(other)
    assert same(a, b)
    c = run_with(other, use_shapes=False)  # without the region the difference matters
    assert not same(a, c)
    np.testing.assert_array_equal(lab.data, other)  # never modified by training
    assert not messages["error"], messages


def test_bad_inputs_give_messages(setup, qtbot, nuclei, messages):
    viewer, w, session = setup
    image, truth = nuclei
    user_layers = {ly.name: np.array(ly.data) for ly in viewer.layers}

    def refused(expect: str):
        n = len(messages["error"])
        task = w.train()
        if task is not None:  # refused by the core, in the worker
            qtbot.waitUntil(lambda: w.state.value == State.FAILED, timeout=20_000)
        assert len(messages["error"]) == n + 1, messages
        assert expect in messages["error"][-1].lower(), messages["error"][-1]
        assert not session.training_lock.locked()
        assert w.train_button.isEnabled()

    w.seconds_spin.setValue(0)
    w.steps_spin.setValue(2)
    # labels of another shape than the image
    small = viewer.add_labels(truth[:32, :32].copy(), name="small")
    w.labels_combo.set_value(small)
    refused("shape")
    # empty labels and no region
    empty = viewer.add_labels(np.zeros_like(truth), name="empty")
    w.labels_combo.set_value(empty)
    refused("empty")
    # a shapes region outside the image
    far = viewer.add_shapes(
        [np.array([[200, 200], [220, 200], [220, 230], [200, 230]])], name="far"
    )
    w.labels_combo.set_value(viewer.layers["truth"])
    w.shapes_combo.set_value(far)
    refused("outside")
    w.shapes_combo.set_value(None)
    # NaN in a float image
    bad = image.astype(np.float32)
    bad[5, 5] = np.nan
    w.image_combo.set_value(viewer.add_image(bad, name="nan"))
    refused("nan")
    w.image_combo.set_value(viewer.layers["img"])
    # a model whose channel count does not fit the image
    session.set_segmenter(Segmenter.new(in_channels=3, base_channels=4, depth=2), name="rgb")
    refused("channel")
    session.set_segmenter(tiny(), name="tiny")
    # no budget
    w.steps_spin.setValue(0)
    refused("budget")
    # the user's layers are unchanged and no model was saved
    for name, data in user_layers.items():
        np.testing.assert_array_equal(viewer.layers[name].data, data)
    assert session.registry.list() == []


def test_viewer_close_while_training_stops_and_saves(setup, qtbot, messages):
    viewer, w, session = setup
    w.seconds_spin.setValue(60)
    w.steps_spin.setValue(0)
    w.train()
    qtbot.waitUntil(lambda: w.last_progress is not None, timeout=20_000)
    t0 = time.perf_counter()
    viewer.close()  # the window's close stops and waits for the worker
    assert time.perf_counter() - t0 < 10.0
    assert not session.training_lock.locked()
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=2_000)
    assert session.registry.versions("tiny")


@pytest.mark.parametrize("first_axis", ["z", "time"])
def test_stack_trains_on_the_corrected_slices_only(setup, qtbot, messages, first_axis):
    """Predict a Z stack (or a time series), correct one slice (frame), train: only that one
    reaches the loss."""
    from napari_unet._widgets._workers import start_prediction

    viewer, w, session = setup
    stack, truth = zip(*(make_nuclei((48, 48), seed=s) for s in (20, 21, 22)), strict=True)
    stack, truth = np.stack(stack), np.stack(truth)
    img = viewer.add_image(stack, name="stack", axis_labels=(first_axis, "y", "x"))
    viewer.dims.ndisplay = 2
    expected_axes = "TYX" if first_axis == "time" else "ZYX"
    assert _layers.image_axes(img, viewer) == expected_axes
    seg = session.segmenter
    req = _layers.make_request(viewer, img, seg, _layers.SCOPES[0])
    task = start_prediction(viewer, seg, [req], device="cpu", on_error=messages["error"].append)
    qtbot.waitUntil(lambda: task.done, timeout=20_000)
    qtbot.waitUntil(lambda: _layers.find_own_layer(viewer, "stack") is not None, timeout=20_000)
    pred = _layers.find_own_layer(viewer, "stack")
    assert pred.data.shape == stack.shape  # labels keep the layer's full shape

    w.image_combo.set_value(img)
    w.labels_combo.set_value(pred)
    w.shapes_combo.set_value(None)
    # nothing corrected yet: refused with a plain message
    assert w.train() is None
    assert "no slice" in messages["error"][-1], messages

    # the user corrects slice 1 (paints the truth there)
    data = np.array(pred.data)
    data[1] = truth[1]
    pred.data = data
    task = train_steps(qtbot, w, steps=2)
    assert w.state.value == State.DONE, messages
    (mask,) = task.job.masks
    assert mask.shape == stack.shape
    assert mask[1].all() and not mask[0].any() and not mask[2].any()
    assert any("1 of 3 slices" in m for m in messages["info"]), messages["info"]
    # a Z stack's round is not guarded: the user is told where the previous model is
    unchecked = [m for m in messages["info"] if "previous version in Models" in m]
    assert bool(unchecked) == (first_axis == "z"), messages["info"]
    # the layer became the user's, and training did not change it
    assert pred.name == "stack [corrected]"
    np.testing.assert_array_equal(pred.data[1], truth[1])

    # a stack the user labelled by hand: the slices holding labels are the trusted ones
    own = np.zeros_like(truth)
    own[2] = truth[2]
    w.labels_combo.set_value(viewer.add_labels(own, name="hand"))
    task = train_steps(qtbot, w, steps=2)
    assert w.state.value == State.DONE, messages
    (mask,) = task.job.masks
    assert mask[2].all() and not mask[:2].any()


def test_two_channel_model_trains_on_two_layers(setup, qtbot, nuclei, messages):
    viewer, w, session = setup
    session.set_segmenter(Segmenter.new(in_channels=2, base_channels=4, depth=2), name="two")
    assert w._data_form.isRowVisible(w._channels_row)
    second = viewer.add_image(nuclei[0][:, ::-1].copy(), name="second channel")
    w.image_combo.set_value(viewer.layers["img"])
    w.channel_list.set_checked([second])
    task = train_steps(qtbot, w, steps=2)
    assert w.state.value == State.DONE, messages
    assert task.job.images[0].shape == (*nuclei[0].shape, 2)
    assert any("channels: 'img', 'second channel'" in m for m in messages["info"])


def test_each_preview_shows_the_latest_labels_and_the_user_layers_stay(setup, nuclei):
    """Previews are written into the preview layer's own array (faster than replacing it):
    every write shows the newest labels, a new size or id range replaces the array, and the
    user's layers are never touched."""
    viewer, _, _ = setup
    image, labels = nuclei
    truth = viewer.layers["truth"]
    before = np.array(truth.data)
    first = _layers.write_preview(viewer, labels, viewer.layers["img"])
    second = (labels > 0).astype(np.int32) * 3
    layer = _layers.write_preview(viewer, second, viewer.layers["img"])
    assert layer is first and np.array_equal(np.asarray(layer.data), second)
    bigger = np.arange(64 * 64, dtype=np.int64).reshape(64, 64) + 70_000  # ids beyond uint16
    layer = _layers.write_preview(viewer, bigger, viewer.layers["img"])
    assert layer.data.dtype == np.int32 and np.array_equal(np.asarray(layer.data), bigger)
    mine = np.ones((64, 64), np.uint16)  # already compact: the layer must copy it
    layer = _layers.write_preview(viewer, mine, viewer.layers["img"])
    _layers.write_preview(viewer, mine * 2, viewer.layers["img"])
    assert (mine == 1).all() and (np.asarray(layer.data) == 2).all()
    np.testing.assert_array_equal(truth.data, before)


def test_a_round_that_kept_the_previous_model_saves_no_new_version(viewer_session):
    """ "kept the previous model ...; saved as 'nuclei' v3": v2, v3 and v4 had the same
    weights, listed as versions of their own."""
    import torch

    from napari_unet._widgets._train_plan import TrainPlan
    from napari_unet.runs import Outcome, RunState

    viewer, session = viewer_session
    seg = Segmenter.new(base_channels=4, depth=2)
    session.set_segmenter(seg, name="mine")
    image, labels = make_nuclei((32, 32), seed=0)
    plan = TrainPlan([], seg, False, [image], [labels], None, {})
    run = plan.start(session, None)
    assert run.save(seg) is None  # the weights the round started from: nothing saved
    assert "mine" not in [m.name for m in session.registry.list()]
    with torch.no_grad():
        next(seg.net.parameters()).add_(0.1)
    info = run.save(seg)
    assert info is not None and info.version == 1
    unchanged = Outcome(RunState.DONE, "3 steps", last=object())
    assert "unchanged: no new version saved" in train_mod._words(unchanged)
    assert "saved as 'mine' v1" in train_mod._words(
        Outcome(RunState.DONE, "3 steps", last=object(), saved=info)
    )
