""" "Where to correct next": an uncertainty layer and a clickable list of regions to correct.

Thin: the map and the ranking are computed by :mod:`napari_unet.uncertainty` in a napari thread
worker (:class:`SuggestJob`); this panel writes the map as the plugin's own Image layer
(``"<image> [unet uncertainty]"``), lists the best regions and moves the viewer to one when it
is clicked (the slice or frame, the camera centre and the zoom).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ..uncertainty import Region, rank_regions, uncertainty_iter
from . import _layers
from ._jobs import Job
from ._messages import Failure, set_progress, user_message
from ._tasks import Task

if TYPE_CHECKING:
    import napari
    from napari.layers import Image
    from qtpy.QtWidgets import QProgressBar, QWidget

    from ..segmenter import Segmenter
    from ._session import Session

__all__ = ["SuggestJob", "SuggestPanel", "camera_of", "jump_to"]

logger = logging.getLogger(__name__)

MODES = {
    "flips and rotations (8 views)": ("tta", 8),
    "flips (4 views, faster)": ("tta", 4),
    "single pass (fastest)": ("entropy", 1),
}


class SuggestJob(Job):
    """Compute the uncertainty map of a request's data and rank regions; returns
    ``(map, [Region, ...])`` (regions in the coordinates of the layer's spatial axes)."""

    def __init__(
        self,
        segmenter: Segmenter,
        request: _layers.PredictRequest,
        *,
        mode: str,
        augmentations: int,
        existing: np.ndarray | None,
        labels: np.ndarray | None,
        device: str = "auto",
        top: int = 10,
        tile: int = 128,
        num_threads: int | None = None,
    ):
        super().__init__()
        self.segmenter, self.request = segmenter, request
        self.mode, self.augmentations = mode, augmentations
        self.existing, self.labels = existing, labels
        self.device, self.top, self.num_threads = device, top, num_threads
        self.tile = tile

    def run(self):
        req = self.request
        try:
            gen = uncertainty_iter(
                self.segmenter,
                req.data,
                req.axes,
                mode=self.mode,
                augmentations=self.augmentations,
                device=self.device,
                channel=req.channel,
                num_threads=self.num_threads,
            )
            u = yield from self._drive(gen)
            if u is None:  # stopped
                return None
            if req.region.view:  # a field of view of a big layer: a positioned layer of its own
                full = u
            else:
                full = _layers._merge(self.existing, u, req.region, np.float32, relabel=False)
            labels = self.labels
            if labels is not None and tuple(labels.shape) != tuple(full.shape):
                labels = None
            # 2D: square tiles; stacks: whole slices / frames
            shape = (self.tile, self.tile) if full.ndim == 2 else None
            regions = rank_regions(full, shape, labels=labels, top=self.top)
        except Exception as e:  # noqa: BLE001 - reported as a Failure, never raised
            return self._fail(e)
        return full, regions


def camera_of(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    camera = getattr(scene, "camera", None)
    return camera if camera is not None else viewer.camera


def jump_to(viewer: napari.Viewer, layer: Image, region: Region) -> None:
    """Show ``region`` of ``layer``: its slice/frame, centred, zoomed to fit (2D display)."""
    centre = np.asarray(region.centre, dtype=float)
    world = np.asarray(layer.data_to_world(centre), dtype=float)
    # the axes before Y, X (Z, T ...): go to the region's slice
    for axis in range(len(world) - 2):
        viewer.dims.set_point(axis, float(world[axis]))
    camera = camera_of(viewer)
    camera.center = tuple(float(w) for w in world[-2:])
    extent = np.asarray(region.shape[-2:], float) * np.abs(np.asarray(layer.scale[-2:], float))
    # canvas pixels: viewer.canvas.size (napari >= 0.6), viewer._canvas_size before
    canvas = getattr(getattr(viewer, "canvas", None), "size", None)
    if canvas is None:
        canvas = getattr(viewer, "_canvas_size", None)
    if canvas is not None and np.all(extent > 0):
        side = float(min(canvas[-2:]))
        if side > 1:
            camera.zoom = 0.9 * side / float(extent.max())


class SuggestPanel(QGroupBox):
    """The "Where to correct next" box of the Predict widget."""

    def __init__(
        self,
        viewer: napari.Viewer,
        session: Session,
        image_combo: _layers.LayerCombo,
        scope_combo: QComboBox,
        device_combo: QComboBox,
        progress: QProgressBar,
        parent: QWidget | None = None,
        on_change: Callable[[], None] | None = None,
        channels: Callable[[Any, Any], list] | None = None,
    ):
        super().__init__("Where to correct next", parent)
        self.viewer, self.session = viewer, session
        self.image_combo, self.scope_combo = image_combo, scope_combo
        self.device_combo, self.progress = device_combo, progress
        self.task: Task | None = None
        self.regions: list[Region] = []
        self._source: str | None = None
        self._map_layer: str | None = None
        self._axes = ""
        self._closed = False
        self._on_change = on_change or (lambda: None)
        self._channels = channels  # (layer, model) -> extra channel layers

        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 100)
        self.top_spin.setValue(10)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 4096)
        self.tile_spin.setSingleStep(16)
        self.tile_spin.setValue(128)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("size of the square regions ranked in a 2D image")
        self.run_button = QPushButton("Show uncertainty")
        self.run_button.setToolTip(
            "predict under flips/rotations and show where the model is unsure; the list ranks "
            "the tiles (2D) or slices/frames (stacks) where a correction should help most"
        )
        self.region_list = QListWidget()
        self.region_list.setMaximumHeight(150)
        self.region_list.setToolTip("click a region to go there")
        form = QFormLayout()
        form.addRow("Views", self.mode_combo)
        form.addRow("Regions listed", self.top_spin)
        form.addRow("Region size (2D)", self.tile_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.region_list)
        self.run_button.clicked.connect(self.start)
        self.region_list.itemClicked.connect(self._on_click)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    @property
    def running(self) -> bool:
        return self.task is not None

    def start(self) -> Task | None:
        """Compute the uncertainty of the chosen image (scope as for Predict)."""
        if self.running:
            show_warning("the uncertainty is already being computed")
            return None
        layer = self.image_combo.value()
        if layer is None:
            show_error("no image layer: open or choose an image first")
            return None
        seg = self.session.segmenter_for(_layers.is_volume(layer, self.viewer))
        try:
            channels = self._channels(layer, seg) if self._channels is not None else None
            req = _layers.make_request(
                self.viewer, layer, seg, self.scope_combo.currentText(), channels=channels
            )
        except ValueError as e:
            show_error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - never an uncaught traceback
            logger.exception("napari-unet: cannot prepare the uncertainty map")
            show_error(user_message(e))
            return None
        prev = _layers.find_own_layer(self.viewer, req.source, "uncertainty")
        own = _layers.find_own_layer(self.viewer, req.source, "labels")
        mode, views = MODES[self.mode_combo.currentText()]
        job = SuggestJob(
            seg.copy(),  # a training may change the session's model in place
            req,
            mode=mode,
            augmentations=views,
            existing=None if prev is None else np.asarray(prev.data),
            labels=None if own is None else np.asarray(own.data),
            device=self.device_combo.currentText(),
            top=int(self.top_spin.value()),
            tile=int(self.tile_spin.value()),
        )
        task = Task(job)
        self.task = task
        self._source = req.source
        self._axes = _layers.image_axes(layer, self.viewer).replace("C", "")

        def on_yield(item: Any) -> None:
            if not task.detached and isinstance(item, tuple) and len(item) == 2 and item[1]:
                set_progress(self.progress, int(round(1000 * item[0] / item[1])))

        def on_return(result: Any) -> None:
            if task.detached or task.cancelled:
                return
            if isinstance(result, Failure):
                show_error(result.message)
                return
            try:
                self._show(req, *result)
            except Exception as e:  # noqa: BLE001 - shown, never raised into Qt
                logger.exception("napari-unet: could not show the uncertainty")
                show_error(f"could not show the uncertainty: {user_message(e)}")

        task.worker.yielded.connect(on_yield)
        task.worker.returned.connect(on_return)
        task.on_finished(self._on_finished)
        set_progress(self.progress, 0)
        self.run_button.setEnabled(False)
        task.start()
        self._on_change()
        return task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.quit()

    def _on_finished(self) -> None:
        task, self.task = self.task, None
        if self._closed:
            return
        if task is not None and not task.cancelled and task.job.failure is None:
            set_progress(self.progress, 1000)
        self.run_button.setEnabled(True)
        self._on_change()

    def _show(self, req: _layers.PredictRequest, umap: np.ndarray, regions: list) -> None:
        prev = _layers.find_own_layer(self.viewer, req.source, "uncertainty")
        layer = _layers._put_layer(
            self.viewer,
            "image",
            umap,
            f"{req.source} [unet uncertainty]",
            {_layers.PLUGIN_KEY: True, "source": req.source, "kind": "uncertainty"},
            req.scale,
            req.translate,
            prev,
            colormap="inferno",
            contrast_limits=(0.0, max(0.05, float(umap.max()))),
            blending="additive",
            opacity=0.7,
        )
        self._map_layer = layer.name  # regions are in its pixel coordinates
        self.regions = list(regions)
        self.region_list.clear()
        for k, r in enumerate(self.regions, 1):
            text = _describe(r, self._axes, tuple(umap.shape))
            item = QListWidgetItem(f"{k}. {text}")
            item.setData(Qt.ItemDataRole.UserRole, k - 1)
            self.region_list.addItem(item)
        if self.regions:
            show_info(
                f"uncertainty of {req.source!r}: {len(self.regions)} regions listed, the most "
                "doubtful first; click one to go there"
            )

    def _on_click(self, item: QListWidgetItem) -> None:
        k = item.data(Qt.ItemDataRole.UserRole)
        self.go_to(int(k))

    def go_to(self, k: int) -> None:
        """Move the viewer to region ``k`` of the list."""
        layer = self._layer()
        if layer is None or not 0 <= k < len(self.regions):
            show_warning("the uncertainty layer of these suggestions is gone")
            return
        try:
            jump_to(self.viewer, layer, self.regions[k])
        except Exception as e:  # noqa: BLE001 - never raised into Qt
            logger.exception("napari-unet: could not move the camera")
            show_error(user_message(e))

    def _on_layer_removed(self, event=None) -> None:
        """The uncertainty layer removed: its regions are no longer listed (they would point
        into a layer that is gone)."""
        if self._closed or self._map_layer is None or self._layer() is not None:
            return
        self.regions, self._map_layer = [], None
        try:
            self.region_list.clear()
        except RuntimeError:  # the Qt widget is gone
            self._closed = True

    def _layer(self):
        """The uncertainty layer: the regions are in its pixel coordinates."""
        for layer in self.viewer.layers:
            if layer.name == self._map_layer:
                return layer
        return None

    def shutdown(self) -> None:
        self._closed = True
        try:
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        except (TypeError, ValueError, RuntimeError):  # never connected, or already gone
            pass
        task, self.task = self.task, None
        if task is not None:
            task.stop(timeout=10.0)


def _describe(r: Region, axes: str, full_shape: tuple[int, ...]) -> str:
    """E.g. ``z 12`` (a whole slice), ``y 128-256, x 0-128`` (a tile), with the score."""
    names = [a.lower() for a in axes]
    if len(names) != len(r.slices):
        names = [f"axis {i}" for i in range(len(r.slices))]
    parts = []
    for name, s, n, full in zip(names, r.slices, r.shape, full_shape, strict=True):
        if n == 1 and full > 1:
            parts.append(f"{name} {s.start}")
        elif n < full:
            parts.append(f"{name} {s.start}-{s.stop}")
    return f"{', '.join(parts) or 'whole image'}   (uncertainty {r.score:.3f})"
