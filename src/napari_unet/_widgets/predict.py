"""Predict dock widget: segment an image layer with the viewer's current U-Net.

Thin: reads the layer and the options, runs :meth:`Segmenter.predict_iter` in a napari thread
worker, shows its ``(done, total)`` progress and writes the result as the plugin's own layers
(``"<image> [unet]"``, optionally ``"<image> [unet prob]"``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from ..engines import ENGINES
from . import _layers
from ._launch import TabsWithSiblings
from ._session import session_for
from ._workers import (
    ShutdownHook,
    Task,
    describe_result,
    progress_bar,
    start_prediction,
    user_message,
)
from .suggest import SuggestPanel

if TYPE_CHECKING:
    import napari

    from ..segmenter import Segmenter

__all__ = ["PredictWidget", "DEVICES"]

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


def _not_plugin_output(layer) -> bool:
    """Exclude the plugin's probability/preview layers from the image choices."""
    return (layer.metadata or {}).get(_layers.PLUGIN_KEY) is True


def describe_model(name: str, seg: Segmenter) -> str:
    # "2D network": a bare "2D" beside nuclei-volumes, the volume starter, read as a mistake
    # (its network is 2D, applied plane by plane and assembled in 3D)
    nd = f"{seg.ndim}D network"
    return f"{name}  ({seg.task}, {seg.in_channels} channel(s), {nd})"


class PredictWidget(TabsWithSiblings, QWidget):
    """Segment the chosen image layer with the viewer's current model."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = _layers.unwrap_viewer(napari_viewer)
        self.session = session_for(self.viewer)
        self._task: Task | None = None
        self._closed = False

        from napari.layers import Image

        self.image_combo = _layers.LayerCombo(self.viewer, (Image,), exclude=_not_plugin_output)
        self.channel_list = _layers.ChannelList(self.viewer, exclude=_not_plugin_output)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(_layers.SCOPES)
        self.probs_check = QCheckBox("also add probabilities")
        self.engine_combo = QComboBox()
        self.engine_combo.addItems(ENGINES)
        self.engine_combo.setToolTip(
            "Who runs the network. 'auto': OpenVINO or ONNX Runtime on the CPU when installed "
            "(several times faster than torch, same result within 1e-4), torch on a GPU."
        )
        self.diameter_box = QDoubleSpinBox()
        self.diameter_box.setRange(0.0, 2000.0)
        self.diameter_box.setDecimals(0)
        self.diameter_box.setSuffix(" px")
        self.diameter_box.setSpecialValueText("auto")  # 0: estimated from the image
        self.diameter_box.setToolTip(
            "Typical nucleus diameter in pixels. 'auto' measures it from a first pass; the "
            "image is resized so its nuclei have the size the model was trained at."
        )
        self.predict_button = QPushButton("Predict")
        self.cancel_button = QPushButton("Cancel")
        for w, tip in (
            (self.device_combo, "where the network runs: auto = CUDA, then Apple MPS, then CPU"),
            (self.scope_combo, "what to segment: the whole layer, the slice shown, or the part "
             "of it in view (fast, to try settings)"),
            (self.probs_check, "also add the class probabilities as image layers"),
            (self.predict_button, "segment the chosen image into '<image> [unet]'; edited "
             "results are kept as '<image> [corrected]'"),
            (self.cancel_button, "stop the prediction; no layer changes"),
        ):  # fmt: skip
            w.setToolTip(tip)
        self.progress = progress_bar()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Extra channels", self.channel_list)
        self._channels_row = form.rowCount() - 1
        self._form = form
        form.addRow("Model", self.model_label)
        form.addRow("Device", self.device_combo)
        form.addRow("Scope", self.scope_combo)
        form.addRow("Object diameter", self.diameter_box)
        form.addRow("Engine", self.engine_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.predict_button)
        buttons.addWidget(self.cancel_button)
        layout = _layers.scrolling_body(self)
        layout.addLayout(form)
        layout.addWidget(self.probs_check)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        self.suggest = SuggestPanel(
            self.viewer,
            self.session,
            self.image_combo,
            self.scope_combo,
            self.device_combo,
            self.progress,
            on_change=self._update_buttons,
            channels=self.extra_channels,
        )
        layout.addWidget(self.suggest)
        layout.addStretch(1)

        self.predict_button.clicked.connect(self.predict)
        self.cancel_button.clicked.connect(self.cancel)
        self.session.model_changed.connect(self._on_model_changed)
        self._on_model_changed()
        self._update_buttons()
        self._hook = ShutdownHook(self, self.viewer, self.shutdown)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._task is not None

    def _update_buttons(self) -> None:
        if self._closed:
            return
        busy = self.suggest.running
        self.predict_button.setEnabled(not self.running and not busy)
        self.cancel_button.setEnabled(self.running or busy)
        self.suggest.run_button.setEnabled(not self.running and not busy)

    def _on_model_changed(self, *_) -> None:
        if self._closed:
            return
        try:
            seg = self.session.segmenter  # first: loading the starter model sets the name
            self.model_label.setText(describe_model(self.session.model_name, seg))
            if self.status_label.text() and not self.running:
                self.status_label.setText("")  # it described the previous model's result
            # extra channel layers only mean something for a model with several channels
            self._form.setRowVisible(self._channels_row, seg.in_channels > 1)
        except RuntimeError:  # the Qt widget is gone
            self._closed = True
        except Exception as e:  # noqa: BLE001 - a model that fails to load is shown, not raised
            self.model_label.setText(f"(no model: {user_message(e)})")

    # ------------------------------------------------------------------ actions
    def predict(self) -> Task | None:
        """Start predicting the chosen layer; returns the running task (None when refused)."""
        if self.running:
            show_warning("a prediction is already running")
            return None
        layer = self.image_combo.value()
        if layer is None:
            self._refuse("no image layer to segment: open or choose an image first")
            return None
        try:
            seg = self.session.segmenter_for(_layers.is_volume(layer, self.viewer))
            if self.session.training_lock.locked():
                show_info("a training is running: predicting with a snapshot of the current model")
            request = _layers.make_request(
                self.viewer,
                layer,
                seg,
                self.scope_combo.currentText(),
                channels=self.extra_channels(layer, seg),
            )
        except ValueError as e:
            self._refuse(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - never an uncaught traceback
            logger.exception("napari-unet: cannot prepare the prediction")
            self._refuse(user_message(e))
            return None
        if self.diameter_box.value() > 0:
            factor = request.region.factor  # a coarser level of a multiscale layer
            shrink = float(np.mean(factor[-2:])) if factor else 1.0
            request.diameter = float(self.diameter_box.value()) / shrink
        request.engine = self.engine_combo.currentText()
        for note in request.notes:
            show_info(note)
        planes = dict(zip(request.axes, np.shape(request.data), strict=False)).get("Z", 0)
        if 1 < planes <= 4 and not getattr(layer, "rgb", False):
            # a (3, Y, X) file of 3 channels was segmented as a 3-plane stack without a word
            show_info(
                f"{layer.name!r} is segmented as a stack of {planes} planes (Z); if its first "
                "axis holds channels, split it (right-click the layer > Split Stack) and "
                "segment the nuclei channel"
            )
        self.status_label.setText(f"predicting {layer.name!r} ...")
        self._task = start_prediction(
            self.viewer,
            seg,
            [request],
            device=self.device_combo.currentText(),
            probabilities=self.probs_check.isChecked(),
            progress=self.progress,
            on_error=self._on_error,
            on_done=self._on_done,
            on_finished=self._on_finished,
        )
        self._update_buttons()
        return self._task

    def _on_error(self, message: str) -> None:
        if not self._closed:
            self.status_label.setText(f"failed: {message}")
        show_error(message)

    def _on_done(self, layers: list) -> None:
        """Say what came out: objects and seconds, and where to correct."""
        if self._closed or self._task is None:
            return
        text = describe_result(self._task.job, layers)
        if layers and not self._task.job.segmenter.config.get("history"):
            # "0 objects, correct it with the brush" left a first user to guess why
            text += (
                " — the model is untrained: its result means nothing yet; correct the labels "
                "(or load labelled ones) and press Train"
            )
        elif layers:
            text += " — correct it with the brush, then Train"
        self.status_label.setText(text)
        show_info(text)

    def extra_channels(self, layer, seg: Segmenter) -> list:
        """The ticked channel layers (for a model with several channels), without ``layer``."""
        if seg.in_channels < 2:
            return []
        return [ly for ly in self.channel_list.checked() if ly is not layer]

    def cancel(self) -> None:
        """Stop the running prediction; no layer is changed."""
        if self._task is not None:
            self._task.quit()
        self.suggest.cancel()

    def _on_finished(self) -> None:
        task, self._task = self._task, None
        if task is not None and task.cancelled and not self._closed:
            self.progress.setValue(0)
            self.status_label.setText("cancelled: no layer changed")
        self._update_buttons()

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Stop a running prediction and wait for its thread (window closing / widget gone)."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.stop(timeout=10.0)
        self.suggest.shutdown()
        try:
            self.session.model_changed.disconnect(self._on_model_changed)
        except Exception:  # noqa: BLE001 - already disconnected
            pass
        try:
            self.image_combo.disconnect_viewer()
            self.channel_list.disconnect_viewer()
        except Exception:  # noqa: BLE001 - the viewer may already be torn down
            pass

    def _refuse(self, message: str) -> None:
        """A click that cannot start: said in the widget's status line (a notification alone
        was cut after a few words and went away) and as a notification."""
        self.status_label.setText(f"not started: {message}")
        show_error(message)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)
