"""The widgets' jobs: long work (calling the core) as generators for napari thread workers.

A *job*'s generator method ``run`` does the work and yields often, so that :meth:`Job.stop`
ends it at its next yield, inside the worker, through its own ``finally`` blocks. Jobs never
raise: a failure becomes ``job.failure`` (a plain message) and the worker returns a
:class:`~._messages.Failure`, so nothing reaches napari's traceback notifications.

Training has no job here: its controller is the core's :class:`napari_unet.runs.TrainRun`;
:class:`TrainPreview` is what the Train widget interleaves with its steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _layers
from ._messages import Failure, user_message

if TYPE_CHECKING:
    from ..segmenter import Prediction, Segmenter
    from ..training import TrainProgress

__all__ = [
    "Job",
    "PredictJob",
    "PredictProgress",
    "Preview",
    "TrainPreview",
    "count_objects",
    "describe_result",
]

logger = logging.getLogger(__name__)


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
    """Yielded by :class:`TrainPreview`: labels predicted on a 2D slice during training."""

    labels: np.ndarray


class Job:
    """Base class: ``run`` is the worker's generator function, :meth:`stop` ends it."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._stop = threading.Event()

    def run(self) -> Generator[Any, None, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def stop(self) -> None:
        """End the job at its next yield, inside the worker (thread-safe)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _drive(self, gen: Generator) -> Generator[Any, None, Any]:
        """``yield from gen``; after :meth:`stop` it closes ``gen`` at its next yield and
        returns None."""
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
                    engine=req.engine,
                )
                with store if store is not None else contextlib.nullcontext():
                    pred = yield from self._drive(
                        _relay(gen, lambda d, t, i=i: PredictProgress(i, n, d, t))
                    )
                    if pred is None:  # stopped
                        return None
                    if store is not None:  # pyramid, metadata, rename
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


class TrainPreview:
    """The Train widget's preview: every ``every`` seconds of training, ``region`` of ``image``
    (a 2D slice; the GUI may move ``region`` while training) predicted as a :class:`Preview`.

    Called by :class:`napari_unet.runs.TrainRun` after each step (``interleave``); a failed
    preview turns the previews off, the training goes on.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        image: np.ndarray,
        region: _layers.Region,
        *,
        every: float,
        rgb: bool = False,
        device: str = "auto",
        channel: int | None = None,
        num_threads: int | None = None,
    ):
        self.segmenter, self.image, self.region, self.rgb = segmenter, image, region, rgb
        self.every, self.due = float(every), float(every)
        # torch: the weights change between previews, an export for each would never pay
        self.predict_kwargs = {
            "device": device, "channel": channel, "num_threads": num_threads, "engine": "torch"
        }

    def __call__(self, p: TrainProgress) -> Iterator[Any]:
        if self.every <= 0 or p.seconds < self.due:
            return
        t0 = time.perf_counter()
        try:
            image = self.region.crop(self.image, self.rgb)
            gen = self.segmenter.predict_iter(
                image, self.region.axes, return_probabilities=False, **self.predict_kwargs
            )
            pred = yield from _relay(gen, lambda d, t: None)
        except Exception as e:  # noqa: BLE001 - a failed preview must not stop the training
            logger.warning("napari-unet: preview disabled (%s)", user_message(e))
            self.every = 0.0
            return
        yield Preview(_layers.compact_labels(pred.labels))  # compacted here, not on the GUI
        self.due = p.seconds + (time.perf_counter() - t0) + self.every
