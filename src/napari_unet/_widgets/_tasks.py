"""Thread lifecycle of the widgets: a napari thread worker per job, the widgets' state, and the
hook that stops the workers when the viewer closes.

The thread wrappers are one-liners: ``Task(job)`` runs ``job.run`` (or ``Task(run, run.iterate)``
a :class:`napari_unet.runs.TrainRun`) in a napari ``GeneratorWorker``. Stopping is the job's own
``stop()`` (the generator ends at its next yield, through its ``finally`` blocks); the worker
is never aborted from outside.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from psygnal import Signal
from qtpy.QtCore import QEvent, QObject, Qt, QTimer

from ..runs import RunState
from ._messages import user_message

if TYPE_CHECKING:
    import napari
    from qtpy.QtWidgets import QWidget

__all__ = ["Task", "State", "EventedState", "ShutdownHook"]

logger = logging.getLogger(__name__)

#: The widgets' states are the runs' (one vocabulary).
State = RunState


class Task:
    """A napari ``GeneratorWorker`` running ``job.run``, with a wait that does not need Qt.

    ``left`` is set from the worker thread when it has left the job (done, failed or aborted);
    :meth:`wait` blocks on it. Register end-of-work callbacks with :meth:`on_finished` (they run
    on the GUI thread after the worker has left the job); after them every signal of the worker is
    disconnected, so no Qt connection keeps the widgets or the viewer alive. ``detached`` tells
    late handlers to do nothing (the widget is gone).
    """

    _SIGNALS = ("started", "yielded", "returned", "errored", "warned", "finished", "aborted")

    def __init__(self, job: Any, work: Callable[[], Generator] | None = None):
        from napari.qt.threading import create_worker

        self.job = job
        self.cancelled = False
        self.detached = False
        self.left = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.worker = create_worker(work or job.run, _start_thread=False, _ignore_errors=True)
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
        """Stop the job at its next yield (its generator ends by itself, in the worker)."""
        self.cancelled = True
        self.job.stop()

    @property
    def done(self) -> bool:
        return self.left.is_set()

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait for the worker thread to leave the job; True if it did within ``timeout``."""
        return self.left.wait(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Quit and wait (for closing): once the thread has left the job, the worker's
        connections are dropped (the GUI may not process its signals any more)."""
        self.detached = True
        self.quit()
        ok = self.wait(timeout)
        if ok:
            self._release()
        else:
            logger.warning("napari-unet: a worker did not stop within %.0f s", timeout)
        return ok


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
