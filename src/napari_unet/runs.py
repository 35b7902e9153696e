"""Run controllers: one training from its start to its saved model, without Qt.

A :class:`TrainRun` owns what every front end of a training needs and used to repeat: the stop
flag, the training lock, the save, the outcome and its summary, and one evented
:class:`RunStatus` (state, step, loss, validation score, message) to watch. The command line
calls :meth:`TrainRun.run`; the Train widget hands :meth:`TrainRun.iterate` to a napari thread
worker and draws what it yields::

    run = TrainRun(seg, image, labels, save=lambda s: s.save("model"), steps=100)
    run.status.events.state.connect(print)
    outcome = run.run()          # or: for progress in run.iterate(): ...  (run.stop() to end)
    print(outcome.message)

There is one way to stop (:meth:`TrainRun.stop`, from any thread: the training ends at its next
step), one place that saves and one that releases the lock (:meth:`TrainRun._conclude`, reached
whether the training ends, is stopped, is closed or raises).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from psygnal import evented

if TYPE_CHECKING:
    from .segmenter import Segmenter
    from .training import TrainProgress

__all__ = [
    "RunState",
    "RunStatus",
    "Outcome",
    "TrainRun",
    "RunBusy",
    "summary",
    "untrained_like",
    "VAL_FRACTION",
]

logger = logging.getLogger(__name__)

#: the share of each image the front ends hold out for validation when asked to
VAL_FRACTION = 0.1


class RunState(Enum):
    """Where a run is. A run the user stopped ends DONE too (its model is kept and saved);
    :attr:`Outcome.stopped` tells the two apart."""

    IDLE = "idle"
    TRAINING = "training"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        return self in (RunState.TRAINING, RunState.STOPPING)


@evented
@dataclass
class RunStatus:
    """What a run shows; each field has a signal (``status.events.<field>``) emitted on change,
    in the thread that changed it (the training's)."""

    state: RunState = RunState.IDLE
    step: int = 0
    loss: float | None = None
    val_score: float | None = None
    #: fraction of the budget (steps or time) used, 0..1
    fraction: float = 0.0
    patches_per_s: float = 0.0
    message: str = ""


@dataclass
class Outcome:
    """How a run ended. ``saved`` is what the save returned; ``error`` the exception of a
    failed run (``message`` says it in words), ``save_error`` that of a failed save."""

    state: RunState
    message: str
    stopped: bool = False
    last: TrainProgress | None = None
    saved: Any = None
    error: BaseException | None = field(default=None, repr=False)
    save_error: BaseException | None = field(default=None, repr=False)

    @property
    def trained(self) -> bool:
        """The model's weights changed (at least one step, no failure)."""
        return self.state is RunState.DONE and self.last is not None


class RunBusy(ValueError):
    """Another training holds the lock."""


def user_message(exc: BaseException) -> str:
    """A plain one-line message (the core's ValueErrors are already plain)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "not enough memory for this image/model: try a smaller region, the CPU device or "
            f"a smaller model ({text.splitlines()[0]})"
        )
    if isinstance(exc, ValueError):
        return text
    return f"{type(exc).__name__}: {text}"


def summary(last: TrainProgress, stopped: bool = False) -> str:
    """``"15 steps in 10.7 s (time limit reached); loss 1.0008, 11.3 patches/s, validation
    F1@0.5 0.837"``: what a training did, in the words of every front end."""
    # a stopped round's reason, when it has one, is "stopped by the user" and its checks' verdict
    reason = (last.reason or "stopped by the user") if stopped else (last.reason or "done")
    loss = "n/a" if last.loss is None or not math.isfinite(last.loss) else f"{last.loss:.4f}"
    text = (
        f"{last.step} steps in {last.seconds:.1f} s ({reason}); "
        f"loss {loss}, {last.patches_per_s:.1f} patches/s"
    )
    if last.val_f1 is not None:
        text += f", validation F1@0.5 {last.val_f1:.3f}"
    return text


def untrained_like(seg: Segmenter, name: str) -> Segmenter:
    """A new, untrained model with the task and the architecture of ``seg``."""
    from .segmenter import Segmenter

    arch = seg.model_config.architecture
    return Segmenter.new(
        task=seg.task,
        in_channels=arch.in_channels,
        num_classes=max(2, arch.out_channels),
        ndim=arch.ndim,
        base_channels=arch.base_channels,
        depth=arch.depth,
        up_mode=arch.up_mode,
        dropout=arch.dropout,
        name=name,
    )


class TrainRun:
    """One fine-tuning of ``segmenter`` (in place) on ``images``/``labels``/``masks``.

    Parameters
    ----------
    segmenter, images, labels, masks
        As :meth:`Segmenter.finetune`; ``finetune_kwargs`` are its other parameters.
    save
        ``save(segmenter) -> anything``, called once when the run trained at least one step
        and did not fail (also after a stop); its result is :attr:`Outcome.saved`.
    lock
        A lock held for the whole run (taken without waiting: :class:`RunBusy` when another
        run holds it) and released when the run ends, whatever ends it.
    interleave
        ``interleave(progress) -> iterator``, called after every step that is not the last:
        its items are yielded between the steps (the Train widget's previews). A stop is
        honoured after each of them too; an error in it ends only the interleaving.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        images: Any,
        labels: Any,
        masks: Any = None,
        *,
        save: Callable[[Segmenter], Any] | None = None,
        lock: threading.Lock | None = None,
        interleave: Callable[[TrainProgress], Iterator[Any]] | None = None,
        **finetune_kwargs: Any,
    ):
        self.segmenter = segmenter
        self.images, self.labels, self.masks = images, labels, masks
        self.kwargs = finetune_kwargs
        self.save = save
        self.interleave = interleave
        self.status = RunStatus()
        self.outcome: Outcome | None = None
        self.last: TrainProgress | None = None
        self._stop = threading.Event()
        self._guard = threading.Lock()  # the run's start and end happen once, in order
        self._entered = False
        self._lock = lock
        if lock is not None and not lock.acquire(blocking=False):
            raise RunBusy("a training is already running")

    # ---------------------------------------------------------------- control
    def stop(self) -> None:
        """End the training at its next step (any thread); the round's checks judge it as at
        its end (what they keep is saved). A no-op once the run has ended."""
        self._stop.set()
        if self.status.state is RunState.TRAINING:
            self.status.state = RunState.STOPPING

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def run(self, on_event: Callable[[Any], None] | None = None) -> Outcome:
        """Train to the end (or a stop, or Ctrl-C) in this thread; returns the outcome."""
        gen = self.iterate()
        try:
            for item in gen:
                if on_event is not None:
                    on_event(item)
        except KeyboardInterrupt:  # in on_event: Ctrl-C stops and saves
            self.stop()
        finally:
            gen.close()
        return self.finish()

    def finish(self) -> Outcome:
        """The outcome; concludes a run that never started (its lock released). While the
        run's thread is still in it, a FAILED outcome that says so (the thread concludes)."""
        with self._guard:
            if self.outcome is None and not self._entered:
                self._entered = True
                self._conclude(None, stopped=True)
        if self.outcome is None:
            return Outcome(RunState.FAILED, "the training thread did not stop in time")
        return self.outcome

    # ---------------------------------------------------------------- the run
    def iterate(self) -> Generator[Any, None, Outcome | None]:
        """The training as a generator of :class:`~napari_unet.training.TrainProgress` (and
        the ``interleave`` items); returns the :class:`Outcome`. Never raises: a failure is
        the outcome's. Closing it (or Ctrl-C inside it) is a stop."""
        with self._guard:
            if self._entered:
                return self.outcome
            self._entered = True
        error: BaseException | None = None
        stopped = False
        self.status.state = RunState.TRAINING
        try:
            stopped = yield from self._steps()
        except KeyboardInterrupt:
            stopped = True
        except Exception as e:  # noqa: BLE001 - the outcome carries it
            error = e
        except GeneratorExit:  # closed by the caller at a yield: a stop
            stopped = True
            raise
        finally:
            self._conclude(error, stopped=stopped or self.stop_requested)
        return self.outcome

    def _steps(self) -> Generator[Any, None, bool]:
        """Yield the fine-tuning's events; True when stopped before its end."""
        if self.stop_requested:  # stopped before it started
            return True
        ft = self.segmenter.finetune(self.images, self.labels, self.masks, **self.kwargs)
        try:
            for p in ft:
                self.last = p
                self._show(p)
                yield p
                if self.stop_requested:
                    return not p.done
                if self.interleave is not None and not p.done:
                    yield from self._interleaved(p)
                    if self.stop_requested:
                        return True
            return False
        finally:
            ft.close()  # the core's finally: weights back on the CPU, history recorded

    def _interleaved(self, p: TrainProgress) -> Generator[Any, None, None]:
        extra = iter(self.interleave(p))
        try:
            for item in extra:
                yield item
                if self.stop_requested:
                    return
        except Exception as e:  # noqa: BLE001 - an extra must not stop the training
            logger.warning("napari-unet: %s", user_message(e))
        finally:
            close = getattr(extra, "close", None)
            if close is not None:
                close()  # a stop in the middle: the extra's own work ends too

    def _show(self, p: TrainProgress) -> None:
        st = self.status
        with st.events.paused():  # one emission per field, after all are set
            st.step = p.step
            st.loss = p.loss if p.loss is not None and math.isfinite(p.loss) else None
            st.val_score = p.val_f1
            st.fraction = p.fraction
            st.patches_per_s = p.patches_per_s

    def _conclude(self, error: BaseException | None, stopped: bool) -> None:
        """The end of every run: save once, set the outcome and the status, release the lock."""
        try:
            self.outcome = self._outcome(error, stopped)
        except BaseException as e:  # noqa: BLE001 - the lock is released all the same
            self.outcome = Outcome(RunState.FAILED, user_message(e), error=e)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        st = self.status
        with st.events.paused():
            st.message = self.outcome.message
            st.state = self.outcome.state

    def _outcome(self, error: BaseException | None, stopped: bool) -> Outcome:
        last = self.last
        if error is not None:
            if not isinstance(error, ValueError):
                logger.error("napari-unet: the training failed", exc_info=error)
            return Outcome(RunState.FAILED, user_message(error), last=last, error=error)
        if last is None:
            return Outcome(
                RunState.DONE,
                "training stopped before its first step: model unchanged",
                stopped=True,
            )
        stopped = stopped and not last.done
        out = Outcome(RunState.DONE, summary(last, stopped), stopped=stopped, last=last)
        if self.save is not None:
            try:
                out.saved = self.save(self.segmenter)
            except Exception as e:  # noqa: BLE001 - the model stays in memory, the user is told
                logger.warning("napari-unet: could not save the trained model (%s)", e)
                out.save_error = e
                out.message += f"; not saved: {user_message(e)}"
        return out
