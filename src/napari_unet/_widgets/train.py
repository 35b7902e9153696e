"""Train dock widget: fine-tune the viewer's U-Net on the user's (image, labels) pairs.

Thin: :func:`~._train_plan.plan_training` reads the layers (copies: training never touches
them) and the options of the two forms (:mod:`._train_form`); the core's
:class:`~napari_unet.runs.TrainRun` trains, stops, saves and sums up, in a napari thread worker
(``Task(run, run.iterate)``); this widget turns what it yields into a progress bar, a status
line, a loss curve (:mod:`._loss_curve`) and an optional preview layer, and at the end tells the
other widgets.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

# torch's optimisers import torch._dynamo the first time one is built: ~2.7 s of import work
# that holds the GIL. Done here (when napari loads the widget) instead of in the training
# worker, where it froze the viewer for ~0.5 s right after the first Train click.
import torch._dynamo  # noqa: F401, E402
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from ..cpu import LoadMonitor
from ..runs import Outcome, TrainRun
from ..training import TrainProgress
from . import _layers
from ._jobs import Preview, describe_result
from ._launch import TabsWithSiblings
from ._loss_curve import LossCurve
from ._messages import progress_bar, user_message
from ._session import session_for
from ._tasks import EventedState, ShutdownHook, State, Task
from ._train_form import NONE, TrainDataBox, TrainOptionsBox
from ._train_plan import TrainPlan, plan_training
from ._workers import start_prediction

if TYPE_CHECKING:
    import napari

__all__ = ["TrainWidget", "TrainRun", "Outcome", "LossCurve", "NONE"]

logger = logging.getLogger(__name__)

UPDATE_MS = 400  # progress, status and loss curve repaint together at most this often


class _StatusRelay(QObject):
    """Carries the run's status changes (emitted in the training's thread) to the GUI thread:
    a Qt signal emitted from another thread is delivered queued."""

    changed = Signal()

    def relay(self, *_: Any) -> None:
        self.changed.emit()


class TrainWidget(TabsWithSiblings, QWidget):
    """Fine-tune the viewer's current model on (image, labels) pairs."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = _layers.unwrap_viewer(napari_viewer)
        self.session = session_for(self.viewer)
        self.state = EventedState(State.IDLE)
        self._run: TrainRun | None = None
        self._task: Task | None = None
        self._plan: TrainPlan | None = None
        self._refresh_task: Task | None = None
        self._trained: list[weakref.ref] = []
        self._corrected: list = []  # (weak ref to a trained labels layer, its mask) per pair
        self._trained_volume = False  # the last training's images held a Z stack
        self._closed = False
        self.previews_shown = 0  # previews drawn in the current/last training
        self.last_progress: TrainProgress | None = None
        self.monitor: LoadMonitor | None = None
        # one repaint of the widget (bar, text and curve together) every UPDATE_MS while
        # training: every repaint of a widget re-composes the window with napari's OpenGL
        # canvas, which costs CPU the training needs (worker/main-thread throughput 0.76 with a
        # repaint per step, 0.98-0.99 batched: docs/benchmarks.md)
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(UPDATE_MS)
        self._status_timer.timeout.connect(self._show_progress)
        # the run's evented status -> one repaint within UPDATE_MS (on the GUI thread)
        self._status_relay = _StatusRelay(self)
        self._status_relay.changed.connect(self._status_changed)
        self._build()
        self.state.changed.connect(self._apply_state)
        self.viewer.dims.events.current_step.connect(self._on_dims)
        self._apply_state()
        self._hook = ShutdownHook(self, self.viewer, self.shutdown)
        self.session.model_changed.connect(self._on_model_changed)
        self._on_model_changed()

    def _build(self) -> None:
        self.data_box = data = TrainDataBox(self.viewer)
        self.options_box = opts = TrainOptionsBox()
        # the forms' widgets, as the widget's own (tests and scripts reach them here)
        self.image_combo, self.labels_combo = data.image_combo, data.labels_combo
        self.shapes_combo, self.channel_list = data.shapes_combo, data.channel_list
        self.pair_list = data.pair_list
        self.add_pair_button = data.add_pair_button
        self.remove_pair_button = data.remove_pair_button
        self._data_form, self._channels_row = data.form, data.channels_row
        self.seconds_spin, self.steps_spin = opts.seconds_spin, opts.steps_spin
        self.lr_edit, self.from_current_check = opts.lr_edit, opts.from_current_check
        self.val_check, self.edited_check = opts.val_check, opts.edited_check
        self.preview_spin, self.threads_spin = opts.preview_spin, opts.threads_spin
        self.device_combo = opts.device_combo
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.refresh_button = QPushButton("Refresh prediction")
        self.train_button.setToolTip(
            "fine-tune the model on your corrections; it is saved as a new version when it "
            "changed"
        )
        self.stop_button.setToolTip("end the round after the step under way; it is checked, kept")
        self.refresh_button.setToolTip(
            "predict the trained image(s) again with the new model, into a new '<image> [unet]'"
        )
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
        layout.addWidget(data)
        layout.addLayout(run_buttons)
        for w in (self.refresh_button, self.progress, self.status_label, self.curve, opts):
            layout.addWidget(w)
        layout.addStretch(1)
        self.train_button.clicked.connect(self.train)
        self.stop_button.clicked.connect(self.stop)
        self.refresh_button.clicked.connect(self.refresh_prediction)

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

    def pairs(self) -> list:
        """The pairs to train on: the list, or else the current combo choice."""
        return self.data_box.pairs()

    def threads(self) -> int:
        return self.options_box.threads()

    # ------------------------------------------------------------------ state
    @property
    def refreshing(self) -> bool:
        return self._refresh_task is not None

    def _apply_state(self, *_: Any) -> None:
        if self._closed:
            return
        st = self.state.value
        self.train_button.setEnabled(not st.busy and not self.refreshing)
        self.stop_button.setEnabled(st == State.TRAINING)
        self.refresh_button.setEnabled(
            st == State.DONE and not self.refreshing and bool(self._trained)
        )
        self.data_box.set_busy(st.busy)
        self.from_current_check.setEnabled(not st.busy)
        if st == State.STOPPING:
            # a stopped round is judged like a finished one before it is kept (the held-out
            # and replay checks): 1.4-1.7 s on 2 cores for a fully corrected 512x512 image
            self.status_label.setText("stopping: checking the round before keeping it ...")

    # ------------------------------------------------------------------ training
    def train(self) -> Task | None:
        """Start training; returns the task (None when refused)."""
        lock = self.session.training_lock
        if self.state.value.busy or self.refreshing or lock.locked():
            show_warning("a training is already running")
            return None
        run = None
        try:
            plan = plan_training(self.viewer, self.session, self.data_box, self.options_box)
            run = plan.start(self.session, lock)
            task = Task(run, run.iterate)
        except Exception as e:  # noqa: BLE001 - never an uncaught traceback
            if run is not None:
                run.finish()  # never started: its lock released
            if not isinstance(e, ValueError):
                logger.exception("napari-unet: cannot prepare the training")
            self._refuse(user_message(e))
            return None
        self._begin(plan, run, task)
        task.start()
        return task

    def _begin(self, plan: TrainPlan, run: TrainRun, task: Task) -> None:
        if plan.note:
            show_info(plan.note)
        for _, labels in plan.pairs:
            if _layers.adopt_layer(labels):
                show_info(
                    f"training on the prediction layer: it is now your layer {labels.name!r}; "
                    "new predictions go to a new layer"
                )
                self.data_box.refresh_pair_list()
        if plan.preview is not None:
            # napari needs ~0.3 s of GUI time to create a Labels layer: do it now, on the click,
            # not in the middle of the training (later previews only replace its data); from
            # the second training on, the hidden layer of the last one is shown again
            try:
                _layers.ensure_preview(self.viewer, plan.pairs[0][0])
            except Exception:  # noqa: BLE001 - a preview is optional
                logger.exception("napari-unet: could not create the preview layer")
        self._run, self._task, self._plan = run, task, plan
        run.status.events.connect(self._status_relay.relay)  # step, loss, score ...
        self._trained = [weakref.ref(im) for im, _ in plan.pairs]
        # the corrected regions of each pair, carried into the refreshed prediction
        masks = plan.masks if plan.masks is not None else [None] * len(plan.pairs)
        self._corrected = [
            (weakref.ref(lab), m) if m is not None else None
            for (_, lab), m in zip(plan.pairs, masks, strict=True)
        ]
        self._trained_volume = "Z" in plan.options["axes"]  # the axes the plan settled
        self.last_progress = None
        self.previews_shown = 0
        task.worker.yielded.connect(self._on_yield)
        task.on_finished(self._on_train_finished)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.curve.show_val = plan.options.get("val_fraction", 0.0) > 0
        self.curve.clear()
        threads = plan.options.get("num_threads") or 1
        self.monitor = LoadMonitor(threads)
        self.status_label.setText(f"starting ({threads} CPU thread{'s' if threads > 1 else ''})")
        self.state.value = State.TRAINING

    def stop(self) -> None:
        """Stop the training at its next step; the model keeps the last completed step."""
        if self._run is not None and self.state.value == State.TRAINING:
            self._run.stop()  # the worker stops at its next yield, then saves
            self.state.value = self._run.status.state

    def _on_yield(self, item: Any) -> None:
        if self._closed or self._run is None or self._task.detached:
            return
        if isinstance(item, TrainProgress):
            # every step goes to the curve; bar, text and curve repaint every UPDATE_MS
            self.last_progress = item
            self.curve.add(item)
            warning = self.monitor.update(item.step, item.seconds) if self.monitor else None
            if warning:
                show_warning(warning)
        elif isinstance(item, Preview):
            try:
                image = self._trained[0]() if self._trained else None
                _layers.write_preview(self.viewer, item.labels, image)
                self.previews_shown += 1
            except Exception:  # noqa: BLE001 - a preview is optional
                logger.exception("napari-unet: could not show the preview")

    def _status_changed(self) -> None:
        if not self._closed and not self._status_timer.isActive():
            self._status_timer.start()

    def _show_progress(self) -> None:
        run = self._run
        if self._closed or run is None or self.state.value != State.TRAINING:
            return
        st = run.status  # written by the training's thread; read here as plain values
        # one asynchronous repaint for the bar, the text and the curve (see set_progress)
        self.setUpdatesEnabled(False)
        try:
            self.progress.setValue(int(round(1000 * st.fraction)))
            text = f"step {st.step}"
            if st.step == 0 and st.loss is None:
                # before the first step the round checks the corrections and predicts the
                # image once (about a second); "step 0" alone looked stuck
                text = "preparing the round: reading the corrections, scoring the model ..."
            if st.loss is not None:
                text += f"  loss {st.loss:.4f}  {st.patches_per_s:.1f} patches/s"
            if st.val_score is not None:
                text += f"  val F1 {st.val_score:.3f}"
            self.status_label.setText(text)
            self.curve.draw_now()
        finally:
            self.setUpdatesEnabled(True)

    def _on_dims(self, event=None) -> None:
        plan = self._plan
        if self._run is None or plan is None or plan.preview is None or not self._trained:
            return
        image = self._trained[0]()
        if image is None or image not in self.viewer.layers:
            return
        try:
            plan.preview.region = _layers.plan_region(image, self.viewer, _layers.SCOPES[1], 2)
        except ValueError:
            pass

    def _end_run(self) -> Outcome | None:
        """The run's outcome, once its thread has left it; the session told of a new model."""
        run, plan = self._run, self._plan
        self._run = self._task = self._plan = None
        if run is None:
            return None
        outcome = run.finish()
        if outcome.trained:
            if plan.replace:
                self.session.set_segmenter(run.segmenter, name=self.session.model_name)
            self.session.notify_trained()
        return outcome

    def _on_train_finished(self) -> None:
        if self._closed:
            return
        outcome = self._end_run()
        if outcome is None:
            return
        self.curve.draw_now()
        try:  # the preview has served (the result comes from 'Refresh prediction'): hidden,
            # and shown again at the next Train click; a new layer would cost ~0.2-0.3 s there
            _layers.hide_preview(self.viewer)
        except Exception:  # noqa: BLE001 - a preview is optional
            logger.exception("napari-unet: could not hide the preview layer")
        if outcome.state == State.FAILED:
            self.status_label.setText(f"failed: {outcome.message}")
            show_error(outcome.message)
            self.state.value = State.FAILED
            return
        message = _words(outcome)
        last = outcome.last
        if self._trained_volume and last is not None and last.step > 0:
            # volume rounds are never guarded (they keep 3/4 of their change). Measured: 30 s
            # rounds on half volumes still lowered the other half on 2-3 of 14 (docs/benchmarks)
            message += (
                "; a round on a Z stack is not checked on corrections it did not train on: "
                "if the refreshed prediction is worse, load the previous version in Models"
            )
        if self.monitor is not None and self.monitor.note:
            message += f" (note: {self.monitor.note})"
        if not outcome.stopped:
            self.progress.setValue(1000)
        else:  # how far it got, said as such (a bare "4%" looked like a training under way)
            self.progress.setFormat("stopped at %p%")
        self.status_label.setText(message)
        show_info(message)
        self.state.value = State.DONE
        self._apply_state()

    # ------------------------------------------------------------------ refresh
    def refresh_prediction(self) -> Task | None:
        """Predict the trained image(s) again, replacing the plugin's own prediction layers."""
        if self.refreshing or self.state.value.busy:
            show_warning("wait for the running training or prediction to finish")
            return None
        images = [ref() for ref in self._trained]
        images = [im for im in images if im is not None and im in self.viewer.layers]
        if not images:
            self._refuse("the trained image layers are gone: nothing to predict")
            return None
        seg = self.session.segmenter
        try:
            requests = [_layers.make_request(self.viewer, im, seg) for im in images]
        except ValueError as e:
            self._refuse(str(e))
            return None
        self.progress.setFormat("%p%")
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
        if self._closed or self._refresh_task is None:
            return
        carried = 0
        for layer, entry in zip(layers, getattr(self, "_corrected", []), strict=False):
            if entry is not None and _layers.carry_corrections(
                self.session, layer, entry[0](), entry[1]
            ):
                carried += 1
        text = "prediction refreshed: " + describe_result(self._refresh_task.job, layers)
        if carried:
            # otherwise the next round's rectangles covered the refreshed prediction, trained on
            # as if corrected, and the corrections were spread over two layers
            text += "; your corrected regions were carried into it"
        self.status_label.setText(text)

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

        A stopped training is still saved (by its run, in its thread).
        """
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.stop(timeout=10.0)
            outcome = self._end_run()
            logger.info("napari-unet: training ended at close: %s", outcome.message)
            self.state.value = outcome.state
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.stop(timeout=10.0)
        try:
            self.session.model_changed.disconnect(self._on_model_changed)
        except Exception:  # noqa: BLE001 - already disconnected
            pass
        try:
            self.viewer.dims.events.current_step.disconnect(self._on_dims)
        except Exception:  # noqa: BLE001 - the viewer may already be torn down
            pass
        self.data_box.disconnect_viewer()

    def _refuse(self, message: str) -> None:
        """A click that cannot start: said in the widget's status line (a notification alone
        was cut after a few words and went away) and as a notification."""
        self.status_label.setText(f"not started: {message}")
        show_error(message)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)


def _words(outcome: Outcome) -> str:
    """The user's line for a run that did not fail."""
    if outcome.last is None:
        return outcome.message
    verb = "stopped" if outcome.stopped else "finished"
    info = outcome.saved
    saved = f"; saved as {info.name!r} v{info.version}" if info is not None else ""
    if info is None and outcome.save_error is None:
        saved = "; the model is unchanged: no new version saved"
    return f"training {verb}: {outcome.message}{saved}"
