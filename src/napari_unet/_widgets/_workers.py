"""Thread glue for the U-Net widgets: jobs run by napari thread workers, and their lifecycle.

A *job* is a small object whose generator method ``run`` does the long work (calling the core)
in a napari ``GeneratorWorker`` and yields often, so that ``worker.quit()`` stops it at the next
yield. napari's worker does not close an aborted generator; :meth:`Job.close` does that on the GUI
thread once the worker thread has left it, so the core's ``finally`` blocks run (the fine-tuning
records its history there).

Jobs never raise: a failure becomes ``job.failure`` (a plain message) and the worker returns a
:class:`Failure`, so nothing reaches napari's traceback notifications.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_warning
from psygnal import Signal
from qtpy.QtCore import QEvent, QObject, Qt, QTimer

from . import _layers

if TYPE_CHECKING:
    import napari
    from qtpy.QtWidgets import QProgressBar, QWidget

    from ..segmenter import Prediction, Segmenter
    from ..training import TrainProgress

__all__ = [
    "Failure",
    "PredictProgress",
    "Preview",
    "PredictJob",
    "TrainJob",
    "Task",
    "State",
    "EventedState",
    "ShutdownHook",
    "start_prediction",
    "user_message",
    "set_progress",
    "describe_result",
    "progress_bar",
    "count_objects",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- messages
@dataclass
class Failure:
    """What a job returns instead of raising."""

    message: str


def user_message(exc: BaseException) -> str:
    """A plain one-line message for the user (the core's ValueErrors are already plain)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "not enough memory for this image/model: try a smaller region, the CPU device or "
            f"a smaller model ({text.splitlines()[0]})"
        )
    if isinstance(exc, ValueError):
        return text
    return f"{type(exc).__name__}: {text}"


def set_progress(bar: QWidget, value: int) -> None:
    """``bar.setValue(value)`` without Qt's synchronous repaint.

    ``QProgressBar.setValue`` repaints at once, and in a window that holds napari's OpenGL
    canvas a synchronous repaint re-composes the whole window (~40 ms with software OpenGL).
    With updates off during the change, Qt schedules one ordinary (asynchronous) repaint.
    """
    bar.setUpdatesEnabled(False)
    try:
        bar.setValue(value)
    finally:
        bar.setUpdatesEnabled(True)


def progress_bar() -> QProgressBar:
    """A 0..1000 progress bar that shows its percentage."""
    from qtpy.QtWidgets import QProgressBar

    bar = QProgressBar()
    bar.setRange(0, 1000)
    bar.setValue(0)
    bar.setFormat("%p%")
    bar.setTextVisible(True)
    return bar


# ----------------------------------------------------------------------------- jobs
@dataclass
class PredictProgress:
    """Yielded by :class:`PredictJob`: tile ``done`` of ``total`` of request ``index``/``count``."""

    index: int
    count: int
    done: int
    total: int

    @property
    def fraction(self) -> float:
        part = self.done / self.total if self.total else 0.0
        return min(1.0, (self.index + part) / max(1, self.count))


@dataclass
class Preview:
    """Yielded by :class:`TrainJob`: labels predicted on a 2D slice during training."""

    labels: np.ndarray


class Job:
    """Base class: ``run`` is the worker's generator function, ``close`` ends it cleanly."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._inner: list[Generator] = []
        self._stop = threading.Event()

    def run(self) -> Generator[Any, None, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def request_stop(self) -> None:
        """End the job at its next yield, inside the worker (thread-safe)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _drive(self, gen: Generator) -> Generator[Any, None, Any]:
        """``yield from gen``, registered so :meth:`close` can close it; after
        :meth:`request_stop` it closes ``gen`` at its next yield and returns None."""
        self._inner.append(gen)
        try:
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return stop.value
                yield item
                if self.stop_requested:
                    return None
        finally:
            gen.close()  # a no-op once gen is exhausted
            if gen in self._inner:
                self._inner.remove(gen)

    def close(self) -> None:
        """Close the core generators (innermost first); a no-op once they are done."""
        for gen in reversed(list(self._inner)):
            try:
                gen.close()
            except ValueError:  # still executing in the worker thread: it ends by itself
                logger.warning("napari-unet: a worker was still running while being closed")
            except Exception:  # noqa: BLE001 - closing must never raise into Qt
                logger.exception("napari-unet: error while closing a worker")
        self._inner.clear()

    def _fail(self, exc: BaseException) -> Failure:
        if not isinstance(exc, ValueError):
            logger.error("napari-unet worker failed", exc_info=exc)
        self.failure = user_message(exc)
        return Failure(self.failure)


class PredictJob(Job):
    """Predict a list of :class:`~._layers.PredictRequest`; returns ``[(request, Prediction)]``."""

    def __init__(
        self,
        segmenter: Segmenter,
        requests: list[_layers.PredictRequest],
        *,
        device: str = "auto",
        probabilities: bool = False,
        num_threads: int | None = None,
    ):
        super().__init__()
        self.segmenter = segmenter
        self.requests = list(requests)
        self.device = device
        self.probabilities = probabilities
        self.num_threads = num_threads
        self.objects: dict[int, int | None] = {}  # request index -> objects found
        self.digests: dict[int, str | None] = {}  # request index -> labels_digest (2D)
        self.seconds: dict[int, float] = {}  # request index -> prediction seconds
        self.sizes: dict[int, tuple[float, float]] = {}  # request index -> (diameter, zoom)

    def run(self):
        results: list[tuple[_layers.PredictRequest, Prediction]] = []
        n = len(self.requests)
        try:
            for i, req in enumerate(self.requests):
                store = _open_store(req) if req.out_path is not None else None
                out = None if store is None else store.array
                gen = self.segmenter.predict_iter(
                    req.data,
                    req.axes,
                    device=self.device,
                    channel=req.channel,
                    return_probabilities=self.probabilities and out is None,
                    num_threads=self.num_threads,
                    scale=req.data_scale,
                    labels_out=out,
                    diameter=req.diameter if out is None else None,
                )
                with store if store is not None else contextlib.nullcontext():
                    pred = yield from self._drive(
                        _relay(gen, lambda d, t, i=i: PredictProgress(i, n, d, t))
                    )
                    if store is not None and pred is not None:  # pyramid, metadata, rename
                        pred.labels = _publish_store(store)
                if pred.diameter:
                    self.sizes[i] = (pred.diameter, pred.zoom)
                if isinstance(pred.labels, np.ndarray):  # here, not on the GUI thread
                    pred.labels = _layers.compact_labels(pred.labels)
                    self.objects[i] = count_objects(pred.labels, self.segmenter.task)
                    if pred.labels.ndim == 2:  # to see later whether the user corrected it
                        self.digests[i] = _layers.labels_digest(pred.labels)
                results.append((req, pred))
        except Exception as e:  # noqa: BLE001 - reported as a Failure, never raised
            return self._fail(e)
        return results


def count_objects(labels: np.ndarray, task: str) -> int | None:
    """Objects in instance labels (distinct non-zero ids); None for a semantic model."""
    if task != "instance":
        return None
    ids = np.unique(labels)
    return int(ids.size - (1 if ids.size and ids[0] == 0 else 0))


def describe_result(job: PredictJob, layers: list) -> str:
    """``"nuclei [unet]: 57 objects in 1.3 s"`` for each written layer, joined by '; '."""
    parts = []
    for i, layer in enumerate(layers):
        n = job.objects.get(i)
        what = f"{n} object{'s' if n != 1 else ''}" if n is not None else "segmented"
        size = ""
        if i in job.sizes:
            d, zoom = job.sizes[i]
            size = f", about {d:.0f} px across" + (f" (resized x{zoom:.2f})" if zoom != 1 else "")
        parts.append(f"{layer.name}: {what}{size} in {job.seconds.get(i, 0.0):.1f} s")
    return "; ".join(parts)


def _open_store(req: _layers.PredictRequest) -> Any:
    """A new OME-Zarr (``omezarr.LabelsWriter``) for the labels of a big layer; its level 0
    (chunks of one 1024x1024 plane) is what the prediction writes into."""
    try:
        import zarr  # noqa: F401 - the OME-Zarr store needs it
    except ImportError:
        raise ValueError(
            f"{req.source!r} is too large to segment in memory, and writing the labels to disk "
            "needs the 'zarr' package: pip install zarr (or napari-unet[all])"
        ) from None
    shape = tuple(s for a, s in zip(req.axes, np.shape(req.data), strict=True) if a != "C")
    chunks = tuple([1] * (len(shape) - 2) + [min(1024, shape[-2]), min(1024, shape[-1])])
    from .. import omezarr

    laxes = "".join(a for a in req.axes if a != "C")
    scale = req.data_scale if req.data_scale and len(req.data_scale) == len(shape) else None
    return omezarr.create_labels(
        req.out_path, shape, laxes, chunks=chunks, scale=scale, name=STORE_LABELS
    )


#: The label image's name inside the OME-Zarr of a big layer's prediction.
STORE_LABELS = "unet"


def _publish_store(store: Any) -> Any:
    """Finish the OME-Zarr (pyramid, metadata, rename into place); its level 0 for the layer."""
    import zarr

    path = store.finish()
    return zarr.open_array(str(path / "labels" / STORE_LABELS / "0"), mode="r+")


def _relay(gen: Generator, wrap: Callable[[int, int], Any]) -> Generator[Any, None, Any]:
    """Re-yield ``(done, total)`` items of ``gen`` as ``wrap(done, total)``; return its value."""
    try:
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                return stop.value
            yield wrap(done, total)
    finally:
        gen.close()


class TrainJob(Job):
    """Fine-tune ``segmenter`` (in place) and yield every :class:`TrainProgress`.

    Every ``preview_every`` seconds of training, predicts ``preview_region`` of the first image
    (a 2D slice; the GUI may replace the region while training) and yields a :class:`Preview`.
    ``last`` is the last progress event; ``failure`` a message when the core refused or failed.

    :meth:`request_stop` ends the training at its next yield (every step, every preview tile)
    *inside* the worker: the core records its history and ``save`` (when given) writes the model
    in the worker thread too, so the GUI thread never waits for a file write. ``saved`` is what
    ``save`` returned, ``save_error`` a message when it failed.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        images: list[np.ndarray],
        labels: list[np.ndarray],
        masks: list[np.ndarray] | None = None,
        *,
        preview_every: float = 0.0,
        preview_region: _layers.Region | None = None,
        preview_rgb: bool = False,
        save: Callable[[Segmenter], Any] | None = None,
        **finetune_kwargs: Any,
    ):
        super().__init__()
        self.segmenter = segmenter
        self.images, self.labels, self.masks = images, labels, masks
        self.kwargs = finetune_kwargs
        self.preview_every = float(preview_every or 0.0)
        self.preview_region = preview_region
        self.preview_rgb = preview_rgb
        self.save = save
        self.saved: Any = None
        self.save_error: str | None = None
        self.last: TrainProgress | None = None

    def run(self):
        try:
            ft = self.segmenter.finetune(self.images, self.labels, self.masks, **self.kwargs)
            self._inner.append(ft)
            due = self.preview_every
            for p in ft:
                self.last = p
                yield p
                if self.stop_requested:
                    break
                if self.preview_every > 0 and not p.done and p.seconds >= due:
                    t0 = time.perf_counter()
                    yield from self._preview()
                    if self.stop_requested:
                        break
                    due = p.seconds + (time.perf_counter() - t0) + self.preview_every
            ft.close()  # the core's finally: weights back on the CPU, history recorded
            self._inner.remove(ft)
        except Exception as e:  # noqa: BLE001 - reported as a Failure, never raised
            return self._fail(e)
        self._save()
        return self.last

    def _save(self) -> None:
        if self.save is None or self.last is None:
            return
        try:
            self.saved = self.save(self.segmenter)
        except Exception as e:  # noqa: BLE001 - the model stays in memory, the user is told
            logger.warning("napari-unet: could not save the trained model (%s)", e)
            self.save_error = user_message(e)

    def _preview(self):
        region = self.preview_region
        if region is None:
            return
        try:
            image = region.crop(self.images[0], self.preview_rgb)
            gen = self.segmenter.predict_iter(
                image,
                region.axes,
                device=self.kwargs.get("device", "auto"),
                channel=self.kwargs.get("channel"),
                return_probabilities=False,
                num_threads=self.kwargs.get("num_threads"),
            )
            pred = yield from self._drive(_relay(gen, lambda d, t: None))
        except Exception as e:  # noqa: BLE001 - a failed preview must not stop the training
            logger.warning("napari-unet: preview disabled (%s)", user_message(e))
            self.preview_every = 0.0
            return
        if pred is not None:  # None: stopped
            yield Preview(_layers.compact_labels(pred.labels))  # compacted here, not on the GUI


# ----------------------------------------------------------------------------- tasks
class Task:
    """A napari ``GeneratorWorker`` running ``job.run``, with a wait that does not need Qt.

    ``left`` is set from the worker thread when it has left the job (done, failed or aborted);
    :meth:`wait` blocks on it. Register end-of-work callbacks with :meth:`on_finished` (they run
    on the GUI thread after the job was closed); after them every signal of the worker is
    disconnected, so no Qt connection keeps the widgets or the viewer alive. ``detached`` tells
    late handlers to do nothing (the widget is gone).
    """

    _SIGNALS = ("started", "yielded", "returned", "errored", "warned", "finished", "aborted")

    def __init__(self, job: Job):
        from napari.qt.threading import create_worker

        self.job = job
        self.cancelled = False
        self.detached = False
        self.left = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.worker = create_worker(job.run, _start_thread=False, _ignore_errors=True)
        # set in the worker thread, right after the job's generator was left
        self.worker.signals.finished.connect(self.left.set, type=Qt.ConnectionType.DirectConnection)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)

    def on_finished(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _on_errored(self, exc: Exception) -> None:  # pragma: no cover - jobs catch everything
        self.job.failure = self.job.failure or user_message(exc)

    def _on_finished(self) -> None:
        try:
            self.job.close()
            for cb in list(self._callbacks):
                cb()
        finally:
            self._release()

    def _release(self) -> None:
        """Drop every connection of the worker's signals (they form reference cycles through
        Qt that Python's garbage collector cannot see)."""
        self._callbacks.clear()
        signals = getattr(self.worker, "signals", None)
        for name in self._SIGNALS:
            try:
                getattr(signals, name).disconnect()
            except (TypeError, RuntimeError, AttributeError):
                pass  # nothing connected / already gone

    def start(self) -> None:
        self.worker.start()

    def quit(self) -> None:
        self.cancelled = True
        self.worker.quit()

    @property
    def done(self) -> bool:
        return self.left.is_set()

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait for the worker thread to leave the job; True if it did within ``timeout``."""
        ok = self.left.wait(timeout)
        if ok:
            self.job.close()
        return ok

    def stop(self, timeout: float = 10.0) -> bool:
        """Quit and wait (for closing): the job is closed when the thread has left it, and
        the worker's connections are dropped (the GUI may not process its signals any more)."""
        self.detached = True
        self.quit()
        ok = self.wait(timeout)
        if ok:
            self._release()
        else:
            logger.warning("napari-unet: a worker did not stop within %.0f s", timeout)
        return ok


def start_prediction(
    viewer: napari.Viewer,
    segmenter: Segmenter,
    requests: list[_layers.PredictRequest],
    *,
    device: str = "auto",
    probabilities: bool = False,
    num_threads: int | None = None,
    progress: QProgressBar | None = None,
    on_error: Callable[[str], None],
    on_done: Callable[[list], None] | None = None,
    on_finished: Callable[[], None] | None = None,
) -> Task:
    """Predict ``requests`` in a worker and write the results as the plugin's layers.

    Used by the Predict widget and by the Train widget's "Refresh prediction". The worker
    predicts with a copy of ``segmenter`` (a training may be changing it in place). The layers
    are written on the GUI thread when the worker returns, unless the task was cancelled.
    """
    # a snapshot: a training (in another widget) may change the session's model in place
    snapshot = segmenter.copy()
    job = PredictJob(
        snapshot, requests, device=device, probabilities=probabilities, num_threads=num_threads
    )
    task = Task(job)
    task_ref = task  # closures below keep only what they need
    task_name, classes = segmenter.task, list(segmenter.config.get("classes") or [])

    def on_yield(item: Any) -> None:
        if task_ref.detached or progress is None or not isinstance(item, PredictProgress):
            return
        set_progress(progress, int(round(1000 * item.fraction)))

    def on_return(result: Any) -> None:
        if task_ref.detached or task_ref.cancelled:
            return
        if isinstance(result, Failure):
            on_error(result.message)
            return
        from ._session import session_for

        layers = []
        for _, pred in result:
            for note in getattr(pred, "notes", None) or []:
                show_warning(note)  # e.g. out of GPU memory: smaller batches, or the CPU
        session = session_for(viewer)
        try:
            for i, (req, pred) in enumerate(result):
                layer = _layers.write_prediction(
                    viewer, req, pred, task_name, classes, probabilities
                )
                # the labels layer (not a probability layer) is the one to correct
                viewer.layers.selection.active = layer
                if isinstance(layer.data, np.ndarray) and layer.data.ndim >= 3:
                    # a copy to find the corrected slices later: stacks only (in memory)
                    session.remember_prediction(layer, layer.data)
                elif isinstance(layer.data, np.ndarray):
                    # 2D: a fingerprint, to refuse training on an uncorrected prediction
                    digest = job.digests.get(i) if layer.data is pred.labels else None
                    session.remember_digest(layer, digest or _layers.labels_digest(layer.data))
                job.seconds[i] = float(getattr(pred, "seconds", 0.0) or 0.0)
                layers.append(layer)
        except Exception as e:  # noqa: BLE001 - shown, never raised into Qt
            logger.exception("napari-unet: could not write the prediction layers")
            on_error(f"could not write the prediction layers: {user_message(e)}")
            return
        if on_done is not None:
            on_done(layers)

    def finished() -> None:
        if task_ref.detached:
            return
        if progress is not None and not task_ref.cancelled and job.failure is None:
            progress.setValue(1000)
        if on_finished is not None:
            on_finished()

    if progress is not None:
        progress.setRange(0, 1000)
        progress.setValue(0)
    task.worker.yielded.connect(on_yield)
    task.worker.returned.connect(on_return)
    task.on_finished(finished)
    task.start()
    return task


# ----------------------------------------------------------------------------- state
class State(Enum):
    IDLE = "idle"
    TRAINING = "training"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"


class EventedState:
    """A value with a ``changed`` signal (emitted only on change)."""

    changed = Signal(object)

    def __init__(self, value: Any = State.IDLE):
        self._value = value

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, new: Any) -> None:
        if new != self._value:
            self._value = new
            self.changed.emit(new)


# ----------------------------------------------------------------------------- shutdown
def _call_quietly(callback: Callable[[], None] | None) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception:  # noqa: BLE001 - never raise while Qt closes or destroys objects
        logger.exception("napari-unet: error while shutting down a widget")


class ShutdownHook(QObject):
    """Calls ``callback`` once when the viewer's window closes or ``widget`` is destroyed.

    A programmatic close of the main window (``viewer.close()``, tests) calls it at once, before
    napari tears the window down; a close by the user is checked after napari's confirmation
    dialog (the window is hidden only if the user confirmed). Holds only weak references, so it
    never keeps the widget or the window alive.
    """

    def __init__(self, widget: QWidget, viewer: napari.Viewer, callback: Callable[[], None]):
        super().__init__(widget)
        self._callback = _weak_callable(callback)
        self._called = False
        self._window: Callable[[], Any] = lambda: None
        try:
            window = viewer.window._qt_window
            window.installEventFilter(self)
            self._window = weakref.ref(window)
        except Exception:  # noqa: BLE001 - headless viewer: no window to watch
            pass
        ref = self._callback
        widget.destroyed.connect(lambda *_: _call_quietly(ref()))

    def fire(self) -> None:
        if self._called:
            return
        self._called = True
        _call_quietly(self._callback())

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close and obj is self._window():
            if event.spontaneous():
                QTimer.singleShot(0, self._after_user_close)
            else:
                self.fire()
        return False

    def _after_user_close(self) -> None:
        window = self._window()
        try:
            visible = window is not None and window.isVisible()
        except RuntimeError:
            visible = False
        if not visible:
            self.fire()


def _weak_callable(callback: Callable[[], None]) -> Callable[[], Callable[[], None] | None]:
    if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
        return weakref.WeakMethod(callback)
    return lambda: callback
