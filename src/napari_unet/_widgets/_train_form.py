"""The Train widget's two forms: the training data (layers, pairs, regions) and the options."""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..cpu import BusyWatch, default_threads
from ..runs import VAL_FRACTION
from . import _layers
from .predict import DEVICES

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels

__all__ = ["TrainDataBox", "TrainOptionsBox", "NONE"]

NONE = "(none)"
#: the widget's budget and preview defaults (a round of corrections is short)
SECONDS, PREVIEW_S = 30, 5.0


def _labels_choice(layer) -> bool:
    """Exclude the plugin's preview layer from the labels choices."""
    md = layer.metadata or {}
    return md.get(_layers.PLUGIN_KEY) is True and md.get("kind") == "preview"


def _image_choice(layer) -> bool:
    return (layer.metadata or {}).get(_layers.PLUGIN_KEY) is True


class TrainDataBox(QGroupBox):
    """Image, labels, extra channels, a list of (image, labels) pairs and corrected regions."""

    def __init__(self, viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__("Training data", parent)
        from napari.layers import Image, Labels, Shapes

        self.viewer = viewer
        self._pairs: list[tuple[weakref.ref, weakref.ref]] = []
        self.image_combo = _layers.LayerCombo(viewer, (Image,), exclude=_image_choice)
        self.labels_combo = _layers.LayerCombo(viewer, (Labels,), exclude=_labels_choice)
        self.shapes_combo = _layers.LayerCombo(viewer, (Shapes,), none_label=NONE)
        self.channel_list = _layers.ChannelList(viewer, exclude=_image_choice)
        self.add_pair_button = QPushButton("Add pair")
        self.remove_pair_button = QPushButton("Remove pair")
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(48)
        self.pair_list.setToolTip(
            "pairs to train on; when empty, the Image/Labels choice above is used"
        )
        self.shapes_combo.setToolTip(
            "a Shapes layer whose rectangles/polygons mark where the labels were checked; "
            "pixels outside are ignored by training"
        )
        form = self.form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Extra channels", self.channel_list)
        self.channels_row = form.rowCount() - 1
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_pair_button)
        buttons.addWidget(self.remove_pair_button)
        form.addRow(buttons)
        form.addRow(self.pair_list)
        form.addRow("Corrected regions", self.shapes_combo)
        self.setLayout(form)
        self.add_pair_button.clicked.connect(self.add_pair)
        self.remove_pair_button.clicked.connect(self.remove_selected_pair)
        self.labels_combo.currentIndexChanged.connect(self._follow_labels)
        viewer.layers.events.removed.connect(self._prune_pairs)

    def _follow_labels(self, *_: Any) -> None:
        """A prediction layer chosen as Labels brings its image along (``source`` metadata)."""
        labels = self.labels_combo.value()
        source = (getattr(labels, "metadata", None) or {}).get("source")
        if not source or source not in self.viewer.layers:
            return
        image = self.viewer.layers[source]
        if image is not self.image_combo.value():
            try:
                self.image_combo.set_value(image)
            except ValueError:  # not an image choice
                pass

    def add_pair(self) -> None:
        image, labels = self.image_combo.value(), self.labels_combo.value()
        if image is None or labels is None:
            show_error("choose an image layer and a labels layer to add a pair")
            return
        for im, lab in self._pairs:
            if im() is image and lab() is labels:
                show_warning(f"the pair {image.name!r} / {labels.name!r} is already in the list")
                return
        self._pairs.append((weakref.ref(image), weakref.ref(labels)))
        self.refresh_pair_list()

    def remove_selected_pair(self) -> None:
        row = self.pair_list.currentRow()
        if 0 <= row < len(self._pairs):
            del self._pairs[row]
            self.refresh_pair_list()

    @property
    def listed(self) -> bool:
        """Whether pairs were added to the list."""
        return bool(self._pairs)

    def pairs(self) -> list[tuple[Image, Labels]]:
        """The pairs to train on: the list, or else the current combo choice."""
        out = [(im(), lab()) for im, lab in self._pairs]
        out = [(im, lab) for im, lab in out if im is not None and lab is not None]
        if out:
            return out
        image, labels = self.image_combo.value(), self.labels_combo.value()
        if image is None or labels is None:
            raise _layers.LayerError(
                "choose an image layer and its labels layer (paint labels on a Labels layer first)"
            )
        return [(image, labels)]

    def refresh_pair_list(self) -> None:
        self.pair_list.clear()
        for im, lab in self._pairs:
            i, j = im(), lab()
            if i is not None and j is not None:
                self.pair_list.addItem(f"{i.name}  \u2190  {j.name}")

    def _prune_pairs(self, event=None) -> None:
        alive = set(map(id, self.viewer.layers))
        self._pairs = [
            (im, lab)
            for im, lab in self._pairs
            if im() is not None and lab() is not None and id(im()) in alive and id(lab()) in alive
        ]
        try:
            self.refresh_pair_list()
        except RuntimeError:  # the Qt widget is gone
            pass

    def set_busy(self, busy: bool) -> None:
        for w in (self.add_pair_button, self.remove_pair_button):
            w.setEnabled(not busy)

    def disconnect_viewer(self) -> None:
        try:
            self.viewer.layers.events.removed.disconnect(self._prune_pairs)
        except Exception:  # noqa: BLE001 - the viewer may already be torn down
            pass
        for combo in (self.image_combo, self.labels_combo, self.shapes_combo, self.channel_list):
            try:
                combo.disconnect_viewer()
            except Exception:  # noqa: BLE001
                pass


class TrainOptionsBox(QGroupBox):
    """Budget, learning rate, starting model, validation, stacks, preview, threads, device."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Options", parent)
        self.seconds_spin = _spin(0, 24 * 3600, SECONDS, "no limit", " s")
        self.steps_spin = _spin(0, 10_000_000, 0, "no limit")
        self.lr_edit = QLineEdit()
        self.lr_edit.setPlaceholderText("default")
        self.from_current_check = QCheckBox("start from the current model")
        self.from_current_check.setChecked(True)
        self.val_check = QCheckBox(f"hold out {VAL_FRACTION:.0%} for validation")
        self.edited_check = QCheckBox("stacks: only the slices/frames I corrected")
        self.edited_check.setChecked(True)
        self.edited_check.setToolTip(
            "for a Z stack or a time series, train on the slices (frames) you changed since the "
            "plugin's prediction (or, in a layer you made, the slices holding labels); the "
            "others are ignored by the loss"
        )
        self.preview_spin = QDoubleSpinBox()
        self.preview_spin.setRange(0, 3600)
        self.preview_spin.setDecimals(1)
        self.preview_spin.setValue(PREVIEW_S)
        self.preview_spin.setSuffix(" s")
        self.preview_spin.setSpecialValueText("off")
        self.threads_spin = _spin(0, max(1, os.cpu_count() or 1), 0, "auto (free cores - 1)")
        self.threads_spin.setToolTip(
            "torch threads for training; auto uses the cores other programs left free in the "
            "last second before you press Train and keeps one for the viewer (more threads "
            "than free cores slow training down many times over)"
        )
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        for w, tip in (
            (self.seconds_spin, "how long the round trains; preparing and checking it add "
             "about 3 s (20 s took 22.8-23.1 s on 2 CPU cores)"),
            (self.steps_spin, "or how many steps; with both, whichever comes first"),
            (self.lr_edit, "leave empty: the rate is chosen from how much you corrected"),
            (self.from_current_check, "fine-tune the model in use (unticked: a new, untrained "
             "model of the same size)"),
            (self.val_check, "keep part of the labels out of training to report a validation "
             "score while it trains"),
            (self.preview_spin, "how often the preview layer shows the model's current "
             "prediction (off: never)"),
            (self.device_combo, "where the network trains: auto = CUDA, then Apple MPS, then "
             "CPU"),
        ):  # fmt: skip
            w.setToolTip(tip)
        # the CPU use of other programs, read every second (no wait at the Train click)
        self._busy = BusyWatch()
        self._busy_timer = QTimer(self)
        self._busy_timer.setInterval(1000)
        self._busy_timer.timeout.connect(self._busy.busy)
        self._busy_timer.start()
        form = QFormLayout()
        form.addRow("Time budget", self.seconds_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_edit)
        form.addRow(self.from_current_check)
        form.addRow(self.val_check)
        form.addRow(self.edited_check)
        form.addRow("Preview every", self.preview_spin)
        form.addRow("CPU threads", self.threads_spin)
        form.addRow("Device", self.device_combo)
        self.setLayout(form)

    def options(self) -> dict:
        """The fine-tuning options; a ValueError with a plain message for a bad entry."""
        secs = float(self.seconds_spin.value()) or None
        steps = int(self.steps_spin.value()) or None
        if secs is None and steps is None:
            raise ValueError("set a time budget or a number of steps (both are 'no limit')")
        return {
            "time_limit_s": secs,
            "steps": steps,
            "lr": self._lr(),
            "val_fraction": VAL_FRACTION if self.val_check.isChecked() else 0.0,
            "device": self.device_combo.currentText(),
            "num_threads": self.threads(),
        }

    def _lr(self) -> float | None:
        text = self.lr_edit.text().strip()
        if not text:
            return None
        try:
            lr = float(text)
        except ValueError:
            raise ValueError(f"learning rate {text!r} is not a number (e.g. 0.001)") from None
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"the learning rate must be a positive number, not {text!r}")
        return lr

    def threads(self) -> int:
        """The CPU threads to use: the spin box, or (auto) the free cores less one (from the
        CPU use the box watches in the background: the click does not wait to measure it)."""
        return int(self.threads_spin.value()) or default_threads(gui=True, busy=self._busy.busy())


def _spin(lo: int, hi: int, value: int, special: str, suffix: str = "") -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(value)
    spin.setSuffix(suffix)
    spin.setSpecialValueText(special)
    return spin
