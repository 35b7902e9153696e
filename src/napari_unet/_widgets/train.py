"""Train dock widget: fine-tune the viewer's U-Net on the user's (image, labels) pairs.

Thin: reads the layers (copies: training never touches them) and the options, runs
:meth:`Segmenter.finetune` in a napari thread worker, and turns its :class:`TrainProgress`
events into a progress bar, a status line, a loss curve and an optional preview layer. At the end
(finished or stopped) the model is saved to the registry and the other widgets are told.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

# torch's optimisers import torch._dynamo the first time one is built: ~2.7 s of import work
# that holds the GIL. Done here (when napari loads the widget) instead of in the training
# worker, where it froze the viewer for ~0.5 s right after the first Train click.
import torch._dynamo  # noqa: F401, E402
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..cpu import LoadMonitor, default_threads
from ..segmenter import Segmenter
from ..training import TrainProgress
from . import _layers
from ._session import Session, session_for
from ._workers import (
    EventedState,
    Preview,
    ShutdownHook,
    State,
    Task,
    TrainJob,
    describe_result,
    progress_bar,
    start_prediction,
    user_message,
)
from .predict import DEVICES

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels

__all__ = ["TrainWidget", "TrainRun", "Outcome"]

logger = logging.getLogger(__name__)

NONE = "(none)"
UPDATE_MS = 400  # progress, status and loss curve repaint together at most this often


# ----------------------------------------------------------------------------- the run (no Qt)
@dataclass
class Outcome:
    """How a training ended: ``status`` is done / stopped / failed."""

    status: str
    message: str
    saved: Any = None  # the registry's ModelInfo when saved


class TrainRun:
    """One training: its task and what to do when it ends. Plain Python (usable at shutdown)."""

    def __init__(self, session: Session, segmenter: Segmenter, replace: bool, task: Task):
        self.session = session
        self.segmenter = segmenter
        self.replace = replace  # a fresh model: it becomes the session's model at the end
        self.task = task
        self.name = session.model_name  # saved under the name it had when training started
        self.outcome: Outcome | None = None

    def save(self, segmenter: Segmenter) -> Any:
        """Write ``segmenter`` to the registry under the run's name (any thread)."""
        return self.session.registry.save(self.name, segmenter.net.state_dict(), segmenter.config)

    @property
    def job(self) -> TrainJob:
        return self.task.job  # type: ignore[return-value]

    def finish(self) -> Outcome:
        """Close the job, save the trained model, tell the other widgets; release the lock.

        Call on the GUI thread once the worker has left the job. Idempotent.
        """
        if self.outcome is not None:
            return self.outcome
        if not self.task.done:
            # the thread did not stop in time: leave everything (and the lock) to it
            self.outcome = Outcome("failed", "the training thread did not stop in time")
            return self.outcome
        try:
            self.job.close()  # the core's finally: weights on the CPU, history recorded
            self.outcome = self._conclude()
        except Exception as e:  # noqa: BLE001 - reported, never raised into Qt
            logger.exception("napari-unet: error at the end of a training")
            self.outcome = Outcome("failed", user_message(e))
        finally:
            try:
                self.session.training_lock.release()
            except RuntimeError:  # not held
                pass
        return self.outcome

    def _conclude(self) -> Outcome:
        job, s = self.job, self.session
        if job.failure is not None:
            return Outcome("failed", job.failure)
        last = job.last
        if last is None:
            return Outcome("stopped", "training stopped before its first step: model unchanged")
        status = "done" if last.done else "stopped"
        if self.replace:
            s.set_segmenter(self.segmenter, name=self.name)
        loss = "n/a" if last.loss is None or not np.isfinite(last.loss) else f"{last.loss:.4f}"
        what = f"{last.step} steps in {last.seconds:.0f} s, loss {loss}"
        # what the core adds to the stop reason (e.g. that it kept the previous model)
        extra = last.reason.split("; ", 1)[1] if "; " in (last.reason or "") else ""
        if extra:
            what += f" ({extra})"
        if last.val_f1 is not None:
            what += f", validation F1 {last.val_f1:.3f}"
        info = job.saved  # normally written by the worker thread (no file I/O on the GUI)
        error = job.save_error
        if info is None and error is None:  # aborted (viewer closing): save here
            try:
                info = self.save(self.segmenter)
            except Exception as e:  # noqa: BLE001 - the model stays in memory, the user is told
                error = user_message(e)
        if error is not None:
            s.notify_trained()
            return Outcome(status, f"trained ({what}) but not saved: {error}")
        s.notify_trained()
        verb = "finished" if status == "done" else "stopped"
        return Outcome(
            status, f"training {verb}: {what}; saved as {info.name!r} v{info.version}", info
        )


# ----------------------------------------------------------------------------- loss curve
class LossCurve(QWidget):
    """Loss per step (blue line, left scale) and validation F1 (orange dots, 0..1 right scale).

    Painted with QPainter: a repaint of 1,000 steps costs ~2.7 ms, so the curve never stalls
    the event loop (a matplotlib canvas took ~180 ms per redraw here, the largest GUI stall
    while training). :meth:`add` only records; the owner calls :meth:`draw_now` (the Train
    widget does, with the progress bar, every ``UPDATE_MS``).
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.vals: list[float] = []
        self.setMinimumHeight(120)
        self.draws = 0
        self.show_val = False  # a hold-out gives validation F1 points (set by the owner)

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.val_steps.clear()
        self.vals.clear()
        self.draw_now()

    def add(self, p: TrainProgress) -> None:
        if p.loss is not None and np.isfinite(p.loss):
            self.steps.append(p.step)
            self.losses.append(float(p.loss))
        if p.val_f1 is not None and (not self.vals or p.val_f1 != self.vals[-1] or p.done):
            self.val_steps.append(p.step)
            self.vals.append(float(p.val_f1))

    def caption(self, x_max: int) -> str:
        """The line under the plot: names only the curves that are drawn."""
        text = f"step {x_max}   loss (blue)"
        if self.show_val or self.vals:
            text += "   val F1 (orange, 0..1)"
        return text

    def draw_now(self) -> None:
        self.draws += 1
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        from qtpy.QtCore import QPointF, QRectF, Qt
        from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF

        qp = QPainter(self)
        try:
            qp.setRenderHint(QPainter.RenderHint.Antialiasing)
            fg = self.palette().color(self.foregroundRole())
            left, right, top, bottom = 40, 34, 8, 18
            plot = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
            qp.setPen(QPen(fg, 1))
            qp.drawRect(plot)
            font = qp.font()
            font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
            qp.setFont(font)
            if not self.steps and not self.vals:
                qp.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss curve (during training)")
                return
            x_max = max(self.steps[-1] if self.steps else 1, self.val_steps[-1] if self.vals else 1)
            lo, hi = (min(self.losses), max(self.losses)) if self.losses else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1.0

            def px(step: float) -> float:
                return plot.left() + plot.width() * step / max(x_max, 1)

            def py(value: float, v0: float, v1: float) -> float:
                return plot.bottom() - plot.height() * (value - v0) / (v1 - v0)

            qp.drawText(QRectF(0, top - 6, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{hi:.3g}")
            qp.drawText(
                QRectF(0, plot.bottom() - 8, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{lo:.3g}"
            )
            qp.drawText(
                QRectF(plot.left(), plot.bottom() + 2, plot.width(), 14),
                Qt.AlignmentFlag.AlignCenter,
                self.caption(x_max),
            )
            if len(self.steps) > 1:
                # at most ~2 points per pixel column: drawing stays cheap on long runs
                stride = max(1, len(self.steps) // max(1, int(plot.width()) * 2))
                poly = QPolygonF(
                    [
                        QPointF(px(st), py(v, lo, hi))
                        for st, v in zip(self.steps[::stride], self.losses[::stride], strict=True)
                    ]
                )
                qp.setPen(QPen(QColor(31, 119, 180), 1.5))
                qp.drawPolyline(poly)
            if self.vals:
                qp.setPen(QPen(QColor(255, 127, 14), 1))
                qp.setBrush(QColor(255, 127, 14))
                for st, v in zip(self.val_steps, self.vals, strict=True):
                    qp.drawEllipse(QPointF(px(st), py(v, 0.0, 1.0)), 2.5, 2.5)
                qp.drawText(
                    QRectF(plot.right() + 3, top - 6, right, 14), Qt.AlignmentFlag.AlignLeft, "1"
                )
                qp.drawText(
                    QRectF(plot.right() + 3, plot.bottom() - 8, right, 14),
                    Qt.AlignmentFlag.AlignLeft,
                    "0",
                )
        finally:
            qp.end()


# ----------------------------------------------------------------------------- the widget
def _labels_choice(layer) -> bool:
    """Exclude the plugin's preview layer from the labels choices."""
    md = layer.metadata or {}
    return md.get(_layers.PLUGIN_KEY) is True and md.get("kind") == "preview"


def _image_choice(layer) -> bool:
    return (layer.metadata or {}).get(_layers.PLUGIN_KEY) is True


class TrainWidget(QWidget):
    """Fine-tune the viewer's current model on (image, labels) pairs."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image, Labels, Shapes

        self.viewer = _layers.unwrap_viewer(napari_viewer)
        self.session = session_for(self.viewer)
        self.state = EventedState(State.IDLE)
        self._run: TrainRun | None = None
        self._refresh_task: Task | None = None
        self._pairs: list[tuple[weakref.ref, weakref.ref]] = []
        self._trained: list[weakref.ref] = []
        self._preview_image: weakref.ref | None = None
        self._closed = False
        self.previews_shown = 0  # previews drawn in the current/last training
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        # one repaint of the widget (bar, text and curve together) every UPDATE_MS while
        # training: every repaint of a widget re-composes the window with napari's OpenGL
        # canvas, which costs CPU the training needs (worker/main-thread throughput 0.76 with a
        # repaint per step, 0.98-0.99 batched: docs/benchmarks.md)
        self._status_timer.setInterval(UPDATE_MS)
        self._status_timer.timeout.connect(self._show_progress)
        self.last_progress: TrainProgress | None = None
        self.monitor: LoadMonitor | None = None

        # data
        self.image_combo = _layers.LayerCombo(self.viewer, (Image,), exclude=_image_choice)
        self.labels_combo = _layers.LayerCombo(self.viewer, (Labels,), exclude=_labels_choice)
        self.shapes_combo = _layers.LayerCombo(self.viewer, (Shapes,), none_label=NONE)
        self.add_pair_button = QPushButton("Add pair")
        self.remove_pair_button = QPushButton("Remove pair")
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(48)
        data_box = QGroupBox("Training data")
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        self.channel_list = _layers.ChannelList(self.viewer, exclude=_image_choice)
        form.addRow("Extra channels", self.channel_list)
        self._channels_row, self._data_form = form.rowCount() - 1, form
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(self.add_pair_button)
        pair_buttons.addWidget(self.remove_pair_button)
        form.addRow(pair_buttons)
        form.addRow(self.pair_list)
        form.addRow("Corrected regions", self.shapes_combo)
        data_box.setLayout(form)
        self.pair_list.setToolTip(
            "pairs to train on; when empty, the Image/Labels choice above is used"
        )
        self.shapes_combo.setToolTip(
            "a Shapes layer whose rectangles/polygons mark where the labels were checked; "
            "pixels outside are ignored by training"
        )

        # options
        self.seconds_spin = QSpinBox()
        self.seconds_spin.setRange(0, 24 * 3600)
        self.seconds_spin.setValue(30)
        self.seconds_spin.setSuffix(" s")
        self.seconds_spin.setSpecialValueText("no limit")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 10_000_000)
        self.steps_spin.setValue(0)
        self.steps_spin.setSpecialValueText("no limit")
        self.lr_edit = QLineEdit()
        self.lr_edit.setPlaceholderText("default")
        self.from_current_check = QCheckBox("start from the current model")
        self.from_current_check.setChecked(True)
        self.val_check = QCheckBox("hold out 10% for validation")
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
        self.preview_spin.setValue(5)
        self.preview_spin.setSuffix(" s")
        self.preview_spin.setSpecialValueText("off")
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(0, max(1, os.cpu_count() or 1))
        self.threads_spin.setValue(0)
        self.threads_spin.setSpecialValueText("auto (free cores - 1)")
        self.threads_spin.setToolTip(
            "torch threads for training; auto measures the cores other programs leave free when "
            "you press Train and keeps one for the viewer (more threads than free cores slow "
            "training down many times over)"
        )
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        opt_box = QGroupBox("Options")
        opts = QFormLayout()
        opts.addRow("Time budget", self.seconds_spin)
        opts.addRow("Steps", self.steps_spin)
        opts.addRow("Learning rate", self.lr_edit)
        opts.addRow(self.from_current_check)
        opts.addRow(self.val_check)
        opts.addRow(self.edited_check)
        opts.addRow("Preview every", self.preview_spin)
        opts.addRow("CPU threads", self.threads_spin)
        opts.addRow("Device", self.device_combo)
        opt_box.setLayout(opts)

        # run
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.refresh_button = QPushButton("Refresh prediction")
        self.refresh_button.setToolTip("predict the trained image(s) again with the new model")
        self.progress = progress_bar()
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)
        self.curve = LossCurve()
        run_buttons = QHBoxLayout()
        run_buttons.addWidget(self.train_button)
        run_buttons.addWidget(self.stop_button)

        layout = _layers.scrolling_body(self)
        # data, then the run (buttons, progress, status, curve), then the options: on a 768 px
        # screen the loss curve stays in sight while training; the options scroll below it
        layout.addWidget(data_box)
        layout.addLayout(run_buttons)
        layout.addWidget(self.refresh_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.curve)
        layout.addWidget(opt_box)
        layout.addStretch(1)

        self.add_pair_button.clicked.connect(self.add_pair)
        self.remove_pair_button.clicked.connect(self.remove_selected_pair)
        self.train_button.clicked.connect(self.train)
        self.stop_button.clicked.connect(self.stop)
        self.refresh_button.clicked.connect(self.refresh_prediction)
        self.labels_combo.currentIndexChanged.connect(self._follow_labels)
        self.state.changed.connect(self._apply_state)
        self.viewer.layers.events.removed.connect(self._prune_pairs)
        self.viewer.dims.events.current_step.connect(self._on_dims)
        self._apply_state()
        self._hook = ShutdownHook(self, self.viewer, self.shutdown)
        self.session.model_changed.connect(self._on_model_changed)
        self._on_model_changed()

    def _on_model_changed(self, *_: Any) -> None:
        """Show 'Extra channels' only for a model with several input channels."""
        if self._closed:
            return
        try:
            several = self.session.segmenter.in_channels > 1
            self._data_form.setRowVisible(self._channels_row, several)
        except RuntimeError:  # the Qt widget is gone
            self._closed = True
        except Exception:  # noqa: BLE001 - a model that fails to load: nothing to show
            logger.exception("napari-unet: cannot read the current model")

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

    # ------------------------------------------------------------------ pairs
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
        self._refresh_pair_list()

    def remove_selected_pair(self) -> None:
        row = self.pair_list.currentRow()
        if 0 <= row < len(self._pairs):
            del self._pairs[row]
            self._refresh_pair_list()

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

    def _refresh_pair_list(self) -> None:
        if self._closed:
            return
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
        self._refresh_pair_list()

    # ------------------------------------------------------------------ state
    @property
    def refreshing(self) -> bool:
        return self._refresh_task is not None

    def _apply_state(self, *_: Any) -> None:
        if self._closed:
            return
        st = self.state.value
        busy = st in (State.TRAINING, State.STOPPING)
        self.train_button.setEnabled(not busy and not self.refreshing)
        self.stop_button.setEnabled(st == State.TRAINING)
        self.refresh_button.setEnabled(
            st == State.DONE and not self.refreshing and bool(self._trained)
        )
        for w in (self.add_pair_button, self.remove_pair_button, self.from_current_check):
            w.setEnabled(not busy)
        if st == State.STOPPING:
            self.status_label.setText("stopping ...")

    # ------------------------------------------------------------------ training
    def _read_options(self) -> dict:
        secs = float(self.seconds_spin.value()) or None
        steps = int(self.steps_spin.value()) or None
        if secs is None and steps is None:
            raise ValueError("set a time budget or a number of steps (both are 'no limit')")
        text = self.lr_edit.text().strip()
        lr = None
        if text:
            try:
                lr = float(text)
            except ValueError:
                raise ValueError(f"learning rate {text!r} is not a number (e.g. 0.001)") from None
            if not (np.isfinite(lr) and lr > 0):
                raise ValueError(f"the learning rate must be a positive number, not {text!r}")
        return {
            "time_limit_s": secs,
            "steps": steps,
            "lr": lr,
            "val_fraction": 0.1 if self.val_check.isChecked() else 0.0,
            "device": self.device_combo.currentText(),
            "num_threads": self.threads(),
        }

    def threads(self) -> int:
        """The CPU threads to use: the spin box, or (auto) the free cores less one."""
        return int(self.threads_spin.value()) or default_threads(gui=True)

    def _model(self) -> tuple[Segmenter, bool]:
        seg = self.session.segmenter
        if self.from_current_check.isChecked():
            return seg, False
        arch = seg.config.get("architecture", {})
        new = Segmenter.new(
            task=seg.task,
            in_channels=seg.in_channels,
            num_classes=max(2, int(arch.get("out_channels", 2))),
            ndim=seg.ndim,
            base_channels=int(arch.get("base_channels", 16)),
            depth=int(arch.get("depth", 3)),
            up_mode=arch.get("up_mode", "transpose"),
            dropout=float(arch.get("dropout", 0.0)),
            name=self.session.model_name,
        )
        return new, True

    def _plan(self) -> dict:
        """Read layers and options; raises ValueError with a plain message on bad input."""
        opts = self._read_options()
        pairs = self.pairs()
        axes = None
        for image, labels in pairs:
            ax = _layers.image_axes(image, self.viewer)
            if axes is None:
                axes = ax
            elif ax != axes:
                raise _layers.LayerError(
                    f"all training images must have the same axes: {pairs[0][0].name!r} is "
                    f"{axes}, {image.name!r} is {ax}"
                )
            want = _layers.spatial_shape(image)
            got = tuple(np.shape(labels.data))
            if got != want:
                raise _layers.LayerError(
                    f"labels {labels.name!r} have shape {got} but image {image.name!r} has "
                    f"shape {want}; they must match pixel for pixel"
                )
        seg, replace = self._model()
        channel, note = _layers.model_channel(pairs[0][0], seg)
        masks = None
        shapes = self.shapes_combo.value()
        self._check_corrected(pairs, seg.ndim, regions=shapes is not None)
        if shapes is not None:
            masks = [_layers.shapes_to_mask(shapes, labels) for _, labels in pairs]
        if shapes is None and self.edited_check.isChecked():
            masks, parts = self._edited_masks(pairs, seg.ndim)
            if parts:
                done = "; ".join(parts)
                note = f"{note}; {done}" if note else done
        # copies: training reads these, the user may keep painting
        images = [np.array(_layers.image_array(im)) for im, _ in pairs]
        rgb = bool(getattr(pairs[0][0], "rgb", False))
        extra = [ly for ly in self.channel_list.checked() if ly is not pairs[0][0]]
        if seg.in_channels > 1 and extra:
            if len(pairs) > 1 or self._pairs:
                raise _layers.LayerError(
                    "extra channel layers work with the Image/Labels choice above, not with a "
                    "list of pairs"
                )
            images = [np.array(_layers.stack_channels([pairs[0][0], *extra]))]
            axes, channel, rgb = axes + "C", None, True
            names = ", ".join(repr(ly.name) for ly in [pairs[0][0], *extra])
            note = f"{note}; channels: {names}" if note else f"channels: {names}"
        labels = [np.array(lab.data) for _, lab in pairs]
        preview_region = None
        every = float(self.preview_spin.value())
        if every > 0 and seg.ndim == 2:
            preview_region = _layers.plan_region(pairs[0][0], self.viewer, _layers.SCOPES[1], 2)
        return {
            "pairs": pairs,
            "segmenter": seg,
            "replace": replace,
            "note": note,
            "job": TrainJob(
                seg,
                images,
                labels,
                masks,
                preview_every=every if preview_region is not None else 0.0,
                preview_region=preview_region,
                preview_rgb=rgb,
                axes=axes,
                channel=channel,
                names=[im.name for im, _ in pairs],
                **opts,
            ),
        }

    def _check_corrected(self, pairs, model_ndim: int, regions: bool = False) -> None:
        """Refuse 2D labels that are exactly the plugin's uncorrected prediction, or empty.

        (Stacks are checked slice by slice in :meth:`_edited_masks`.) Training on a prediction
        nobody corrected teaches the model its own mistakes: measured, F1 0.70 -> 0.52. That
        holds inside corrected regions too (after 'Refresh prediction' Train follows the new
        prediction layer, while the rectangles still mark the corrections of the old one).
        Empty labels are fine inside corrected ``regions`` (an area with no object).
        """
        for _, labels in pairs:
            data = labels.data
            if not isinstance(data, np.ndarray) or data.ndim > model_ndim:
                continue
            if self.session.unchanged_since_prediction(labels):
                raise _layers.LayerError(
                    f"nothing in {labels.name!r} was corrected since the prediction: fix some "
                    "objects with the brush or the eraser first, or choose as Labels the layer "
                    "that holds your corrections (training on an uncorrected prediction "
                    "teaches the model its own mistakes)"
                )
            if not regions and not data.any():
                raise _layers.LayerError(
                    f"{labels.name!r} is empty: paint some objects first (or predict, then "
                    "correct the prediction)"
                )

    def _edited_masks(self, pairs, model_ndim: int) -> tuple[list | None, list[str]]:
        """Masks of whole corrected planes for the stacks among ``pairs`` (None for 2D)."""
        masks: list = []
        parts: list[str] = []
        for _, labels in pairs:
            data = np.asarray(labels.data)
            if data.ndim <= model_ndim:
                masks.append(None)
                continue
            ref = self.session.prediction_snapshot(labels)
            edited = _layers.edited_planes(data, ref, model_ndim)
            if not edited.any():
                what = "changed since the prediction" if ref is not None else "with labels"
                raise _layers.LayerError(
                    f"no slice or frame of {labels.name!r} is {what}: correct at least one "
                    "slice, or untick 'only the slices/frames I corrected' to train on all"
                )
            idx = [", ".join(map(str, i)) for i in np.argwhere(edited)[:8]]
            more = " ..." if edited.sum() > 8 else ""
            parts.append(
                f"training on {int(edited.sum())} of {edited.size} slices/frames of "
                f"{labels.name!r} ({'; '.join(idx)}{more}); the others are ignored"
            )
            masks.append(_layers.planes_mask(edited, data.shape))
        if all(m is None for m in masks):
            return None, []
        return masks, parts

    def train(self) -> Task | None:
        """Start training; returns the task (None when refused)."""
        if self.state.value in (State.TRAINING, State.STOPPING) or self.refreshing:
            show_warning("a training is already running")
            return None
        if not self.session.training_lock.acquire(blocking=False):
            show_warning("a training is already running")
            return None
        try:
            plan = self._plan()
        except ValueError as e:
            self.session.training_lock.release()
            show_error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - never an uncaught traceback
            self.session.training_lock.release()
            logger.exception("napari-unet: cannot prepare the training")
            show_error(user_message(e))
            return None
        if plan["note"]:
            show_info(plan["note"])
        for _, labels in plan["pairs"]:
            if _layers.adopt_layer(labels):
                show_info(
                    f"training on the prediction layer: it is now your layer {labels.name!r}; "
                    "new predictions go to a new layer"
                )
                self._refresh_pair_list()
        try:
            task = Task(plan["job"])
        except Exception as e:  # noqa: BLE001 - never an uncaught traceback
            self.session.training_lock.release()
            logger.exception("napari-unet: cannot start the training worker")
            show_error(user_message(e))
            return None
        self._run = TrainRun(self.session, plan["segmenter"], plan["replace"], task)
        plan["job"].save = self._run.save
        if plan["job"].preview_region is not None:
            # napari needs ~0.3 s of GUI time to create a Labels layer: do it now, on the click,
            # not in the middle of the training (later previews only replace its data)
            try:
                _layers.ensure_preview(self.viewer, plan["pairs"][0][0])
            except Exception:  # noqa: BLE001 - a preview is optional
                logger.exception("napari-unet: could not create the preview layer")
        self._trained = [weakref.ref(im) for im, _ in plan["pairs"]]
        self._preview_image = weakref.ref(plan["pairs"][0][0])
        self.last_progress = None
        self.previews_shown = 0
        task.worker.yielded.connect(self._on_yield)
        task.on_finished(self._on_train_finished)
        self.progress.setValue(0)
        self.curve.show_val = plan["job"].kwargs.get("val_fraction", 0.0) > 0
        self.curve.clear()
        threads = plan["job"].kwargs.get("num_threads") or 1
        self.monitor = LoadMonitor(threads)
        self.status_label.setText(f"starting ({threads} CPU thread{'s' if threads > 1 else ''})")
        self.state.value = State.TRAINING
        task.start()
        return task

    def stop(self) -> None:
        """Stop the training at its next step; the model keeps the last completed step."""
        if self._run is not None and self.state.value == State.TRAINING:
            self.state.value = State.STOPPING
            self._run.job.request_stop()  # the worker stops at its next yield, then saves

    def _on_yield(self, item: Any) -> None:
        if self._closed or self._run is None or self._run.task.detached:
            return
        if isinstance(item, TrainProgress):
            # every step goes to the curve; bar, text and curve repaint every UPDATE_MS
            self.last_progress = item
            self.curve.add(item)
            warning = self.monitor.update(item.step, item.seconds) if self.monitor else None
            if warning:
                show_warning(warning)
            if not self._status_timer.isActive():
                self._status_timer.start()
            return
        if isinstance(item, Preview):
            try:
                image = self._preview_image() if self._preview_image is not None else None
                _layers.write_preview(self.viewer, item.labels, image)
                self.previews_shown += 1
            except Exception:  # noqa: BLE001 - a preview is optional
                logger.exception("napari-unet: could not show the preview")

    def _show_progress(self) -> None:
        item = self.last_progress
        if self._closed or item is None or self.state.value != State.TRAINING:
            return
        # one asynchronous repaint for the bar, the text and the curve (see set_progress)
        self.setUpdatesEnabled(False)
        try:
            self.progress.setValue(int(round(1000 * item.fraction)))
            text = (
                f"step {item.step}  loss {item.loss:.4f}  {item.patches_per_s:.1f} patches/s"
                if item.loss is not None and np.isfinite(item.loss)
                else f"step {item.step}"
            )
            if item.val_f1 is not None:
                text += f"  val F1 {item.val_f1:.3f}"
            self.status_label.setText(text)
            self.curve.draw_now()
        finally:
            self.setUpdatesEnabled(True)

    def _on_dims(self, event=None) -> None:
        run = self._run
        if run is None or run.job.preview_region is None or self._preview_image is None:
            return
        image = self._preview_image()
        if image is None or image not in self.viewer.layers:
            return
        try:
            run.job.preview_region = _layers.plan_region(image, self.viewer, _layers.SCOPES[1], 2)
        except ValueError:
            pass

    def _on_train_finished(self) -> None:
        run, self._run = self._run, None
        if run is None or self._closed:
            return
        outcome = run.finish()
        self.curve.draw_now()
        try:  # the preview has served; the final result comes from 'Refresh prediction'
            _layers.remove_preview(self.viewer)
        except Exception:  # noqa: BLE001 - a preview is optional
            logger.exception("napari-unet: could not remove the preview layer")
        if outcome.status != "failed" and self.monitor is not None and self.monitor.note:
            outcome.message += f" (note: {self.monitor.note})"
        if outcome.status == "failed":
            self.status_label.setText(f"failed: {outcome.message}")
            show_error(outcome.message)
            self.state.value = State.FAILED
            return
        if outcome.status == "done":
            self.progress.setValue(1000)
        self.status_label.setText(outcome.message)
        show_info(outcome.message)
        self.state.value = State.DONE
        self._apply_state()

    # ------------------------------------------------------------------ refresh
    def refresh_prediction(self) -> Task | None:
        """Predict the trained image(s) again, replacing the plugin's own prediction layers."""
        if self.refreshing or self.state.value in (State.TRAINING, State.STOPPING):
            show_warning("wait for the running training or prediction to finish")
            return None
        images = [ref() for ref in self._trained]
        images = [im for im in images if im is not None and im in self.viewer.layers]
        if not images:
            show_error("the trained image layers are gone: nothing to predict")
            return None
        seg = self.session.segmenter
        try:
            requests = [_layers.make_request(self.viewer, im, seg) for im in images]
        except ValueError as e:
            show_error(str(e))
            return None
        self._refresh_task = start_prediction(
            self.viewer,
            seg,
            requests,
            device=self.device_combo.currentText(),
            num_threads=self.threads(),
            progress=self.progress,
            on_error=show_error,
            on_done=self._on_refreshed,
            on_finished=self._on_refresh_finished,
        )
        self.status_label.setText("predicting the trained image(s) ...")
        self._apply_state()
        return self._refresh_task

    def _on_refreshed(self, layers: list) -> None:
        if not self._closed and self._refresh_task is not None:
            self.status_label.setText(
                "prediction refreshed: " + describe_result(self._refresh_task.job, layers)
            )

    def _on_refresh_finished(self) -> None:
        self._refresh_task = None
        if self._closed:
            return
        if self.status_label.text().startswith("predicting"):
            self.status_label.setText("prediction not refreshed")
        self._apply_state()

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Stop training/prediction and wait for the threads (window closing, widget gone).

        A stopped training is still saved.
        """
        if self._closed:
            return
        self._closed = True
        run, self._run = self._run, None
        if run is not None:
            run.task.stop(timeout=10.0)
            outcome = run.finish()
            logger.info("napari-unet: training ended at close: %s", outcome.message)
            self.state.value = State.FAILED if outcome.status == "failed" else State.DONE
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.stop(timeout=10.0)
        try:
            self.session.model_changed.disconnect(self._on_model_changed)
        except Exception:  # noqa: BLE001 - already disconnected
            pass
        for emitter, cb in (
            (self.viewer.layers.events.removed, self._prune_pairs),
            (self.viewer.dims.events.current_step, self._on_dims),
        ):
            try:
                emitter.disconnect(cb)
            except Exception:  # noqa: BLE001 - the viewer may already be torn down
                pass
        for combo in (self.image_combo, self.labels_combo, self.shapes_combo, self.channel_list):
            try:
                combo.disconnect_viewer()
            except Exception:  # noqa: BLE001
                pass

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)
