"""Thread glue for the U-Net widgets (the names of before the split, kept importable).

The pieces live apart: :mod:`._messages` (plain messages, progress bars), :mod:`._jobs` (the
prediction job, the training preview), :mod:`._tasks` (thread workers, state, shutdown) and the
core's :mod:`napari_unet.runs` (the training controller). Here: :func:`start_prediction`, the
prediction the Predict and Train widgets start and whose layers it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_info, show_warning

from . import _layers
from ._jobs import (
    Job,
    PredictJob,
    PredictProgress,
    Preview,
    TrainPreview,
    count_objects,
    describe_result,
)
from ._messages import Failure, progress_bar, set_progress, user_message
from ._tasks import EventedState, ShutdownHook, State, Task

if TYPE_CHECKING:
    import napari
    from qtpy.QtWidgets import QProgressBar

    from ..segmenter import Segmenter

__all__ = [
    "Failure",
    "Job",
    "PredictProgress",
    "Preview",
    "PredictJob",
    "TrainPreview",
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
        for _, pred in result:
            for note in getattr(pred, "notes", None) or []:
                show_warning(note)  # e.g. out of GPU memory: smaller batches, or the CPU
        try:
            layers = _write_results(viewer, job, result, task_name, classes, probabilities)
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


def keep_edited(viewer, session, req: _layers.PredictRequest):
    """Before a new result replaces the plugin's ``"<image> [unet]"`` layer: if the user
    changed it since the plugin wrote it (brush, eraser ...), it becomes theirs (renamed
    ``"<image> [corrected]"``, as Train does) and the result goes to a new layer. Predicting
    again (another diameter, or Refresh) replaced the edits without a word, and undo could
    not bring them back. Returns the kept layer (None when nothing was kept); a partial
    region's new layer starts from its labels."""
    if req.region.view or req.region.to_disk:
        return None
    own = _layers.find_own_layer(viewer, req.source, "labels")
    if own is None or not isinstance(own.data, np.ndarray):
        return None
    if session.unchanged_since_prediction(own) or not _layers.adopt_layer(own):
        return None
    show_info(
        f"your edits in '{req.source} [unet]' are kept as '{own.name}'; the new prediction "
        f"is '{req.source} [unet]'"
    )
    return own


def _write_results(viewer, job: PredictJob, result, task_name, classes, probabilities) -> list:
    """The results of ``job`` as the plugin's layers (GUI thread); remembers what the user
    will correct: the prediction of a stack, the fingerprint of a 2D prediction."""
    from ._session import session_for

    session = session_for(viewer)
    layers = []
    for i, (req, pred) in enumerate(result):
        kept = keep_edited(viewer, session, req)
        base = None if kept is None or req.region.is_whole else np.asarray(kept.data)
        layer = _layers.write_prediction(
            viewer, req, pred, task_name, classes, probabilities, base=base
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
    return layers
