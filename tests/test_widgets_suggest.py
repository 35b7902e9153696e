"""'Where to correct next' in the Predict widget: uncertainty layer, ranked regions, jumps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import capture_notifications  # noqa: E402
from qtpy.QtCore import QThreadPool  # noqa: E402

from napari_unet._widgets import suggest as suggest_mod  # noqa: E402
from napari_unet._widgets.predict import PredictWidget  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402


@pytest.fixture(scope="module")
def starter():
    return Segmenter.pretrained("nuclei")


@pytest.fixture
def messages(monkeypatch):
    return capture_notifications(monkeypatch, suggest_mod)


@pytest.fixture
def setup(viewer_session, qtbot, starter):
    viewer, session = viewer_session
    session.set_segmenter(starter.copy(), name="nuclei")
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="U-Net Predict")
    yield viewer, widget
    qtbot.waitUntil(lambda: not widget.suggest.running, timeout=20_000)
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=5_000)


def _spoiled_image(seed: int = 3):
    """Generated nuclei whose bottom-right quadrant is heavily blurred (out of domain)."""
    image, _ = make_nuclei((128, 128), seed=seed, dtype="float32")
    image = image.astype(np.float32)
    image[64:, 64:] = ndi.gaussian_filter(image, 4.0)[64:, 64:]
    return image


def test_uncertainty_layer_and_jump_to_the_worst_region(setup, qtbot, messages):
    viewer, w = setup
    image = _spoiled_image()
    before = image.copy()
    layer = viewer.add_image(image, name="img", scale=(0.5, 0.5))
    w.image_combo.set_value(layer)
    w.suggest.mode_combo.setCurrentIndex(1)  # 4 views: faster
    w.suggest.tile_spin.setValue(64)  # 4 quadrants
    panel = w.suggest
    assert panel.start() is not None
    assert w.cancel_button.isEnabled() and not w.predict_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    assert not messages["error"], messages
    u = viewer.layers["img [unet uncertainty]"]
    assert u.data.shape == image.shape and u.data.dtype == np.float32
    assert tuple(u.scale) == (0.5, 0.5)
    # the blurred quadrant is where the model is least sure, and the list says so first
    assert u.data[64:, 64:].mean() > 2 * u.data[:64, :64].mean()
    assert panel.region_list.count() >= 2
    first = panel.regions[0]
    assert first.slices[0].start >= 64 - 1 and first.slices[1].start >= 64 - 1, first
    # a click moves the camera to the region's centre (world coordinates: scale 0.5)
    panel.region_list.itemClicked.emit(panel.region_list.item(0))
    centre = np.asarray(suggest_mod.camera_of(viewer).center[-2:])
    np.testing.assert_allclose(centre, 0.5 * np.asarray(first.centre), atol=1.0)
    # and zooms so the 64-pixel region (32 world units) fills most of the canvas
    side = min(viewer.canvas.size)
    assert suggest_mod.camera_of(viewer).zoom == pytest.approx(0.9 * side / 32, rel=0.05)
    np.testing.assert_array_equal(image, before)  # the user's image is untouched
    assert w.predict_button.isEnabled()


def test_stack_regions_are_slices_and_jump_changes_slice(setup, qtbot, messages):
    viewer, w = setup
    clean, _ = make_nuclei((64, 64), seed=5, dtype="float32")
    stack = np.stack([clean, clean, ndi.gaussian_filter(clean.astype(np.float32), 4.0), clean])
    layer = viewer.add_image(stack.astype(np.float32), name="stack")
    w.image_combo.set_value(layer)
    w.suggest.mode_combo.setCurrentIndex(2)  # one pass: fastest
    w.suggest.start()
    qtbot.waitUntil(lambda: not w.suggest.running, timeout=60_000)
    assert not messages["error"], messages
    assert viewer.layers["stack [unet uncertainty]"].data.shape == stack.shape
    regions = w.suggest.regions
    assert [r.shape[0] for r in regions] == [1] * len(regions)  # whole slices
    assert regions[0].index[0] == 2  # the blurred slice first
    assert w.suggest.region_list.item(0).text().startswith("1. z 2")
    viewer.dims.set_point(0, 0)
    w.suggest.go_to(0)
    assert viewer.dims.current_step[0] == 2
    # the uncertainty layer deleted: its regions are no longer listed
    viewer.layers.remove("stack [unet uncertainty]")
    assert w.suggest.region_list.count() == 0 and w.suggest.regions == []


def test_cancel_and_bad_input(setup, qtbot, messages):
    viewer, w = setup
    w.suggest.start()  # no image at all
    assert messages["error"] and "image" in messages["error"][-1]
    big = np.zeros((512, 512), np.float32)
    big[::7, ::5] = 1.0
    layer = viewer.add_image(big, name="big")
    w.image_combo.set_value(layer)
    assert w.suggest.start() is not None
    w.cancel()
    qtbot.waitUntil(lambda: not w.suggest.running, timeout=20_000)
    assert "big [unet uncertainty]" not in [ly.name for ly in viewer.layers]
    # a NaN image: a plain message, no layer
    bad = np.ones((64, 64), np.float32)
    bad[5, 5] = np.nan
    w.image_combo.set_value(viewer.add_image(bad, name="nan"))
    w.suggest.start()
    qtbot.waitUntil(lambda: not w.suggest.running, timeout=20_000)
    assert "nan" in messages["error"][-1].lower()
    assert "nan [unet uncertainty]" not in [ly.name for ly in viewer.layers]
