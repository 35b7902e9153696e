"""Batch prediction on dask.distributed: many files, or the frames of one big array.

The same code runs on a laptop (a ``LocalCluster`` of worker processes), on a running cluster
(``scheduler="tcp://HOST:PORT"``) or on Slurm (dask-jobqueue's ``SLURMCluster``):

- the model travels once to each worker, as data (safetensors bytes + its JSON config,
  broadcast with ``Client.scatter``), and each worker builds it once and keeps it;
- each worker limits torch to ``threads_per_worker`` threads (no oversubscription);
- a failed task is retried once (``retries``), on any worker; a file whose prediction fails
  twice is reported in :attr:`BatchResult.failed` and skipped while the others finish; a
  worker that dies takes no file with it: the scheduler runs its tasks elsewhere;
- outputs are those of a local run, file for file (each file is predicted exactly as
  ``napari-unet predict`` does it in one process) and are written atomically next to no
  existing result unless ``overwrite``.

Workers read the input files and write the outputs themselves, so on a real cluster the input
and output folders must be on a file system every node sees (as on any Slurm cluster).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .segmenter import Segmenter

__all__ = [
    "BatchError",
    "BatchResult",
    "connect",
    "output_path",
    "predict_array",
    "predict_files",
]

Progress = Callable[[int, int, str], None]

# worker side: models built on this process, by digest (each worker builds a model once)
_MODELS: dict[str, Segmenter] = {}
BUILDS = {"count": 0}


class BatchError(ValueError):
    """A batch that cannot start (no scheduler, a bad option, dask missing)."""


@dataclass
class BatchResult:
    """What a batch did: outputs written, files skipped (results there already), failures."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0
    summaries: dict[str, str] = field(default_factory=dict)


# ============================================================================ model as data


def model_bytes(seg: Segmenter) -> tuple[bytes, str, str]:
    """``(safetensors bytes, config JSON, digest)``: the model as plain data for the workers."""
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in seg.net.state_dict().items()}
    weights = st_save(state)
    config = json.dumps(seg.config, default=str)
    digest = hashlib.sha256(weights + config.encode()).hexdigest()[:16]
    return weights, config, digest


def _model_on_worker(payload: tuple[bytes, str, str], threads: int | None) -> Segmenter:
    import torch

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    weights, config, digest = payload
    seg = _MODELS.get(digest)
    if seg is None:
        from safetensors.torch import load as st_load

        from .model import UNet
        from .segmenter import Segmenter

        cfg = json.loads(config)
        net = UNet(**cfg["architecture"])
        net.load_state_dict(st_load(weights), strict=True)
        seg = _MODELS[digest] = Segmenter(net, cfg)
        BUILDS["count"] += 1
    return seg


# ============================================================================ clusters


def connect(
    scheduler: str | None = None,
    *,
    cluster: str = "local",
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | None = None,
    slurm: dict[str, Any] | None = None,
    timeout: float = 10.0,
):
    """A ``distributed.Client`` (and the cluster it started, or None), as a context manager.

    Parameters
    ----------
    scheduler
        ``tcp://HOST:PORT`` of a running scheduler (``dask scheduler``); a scheduler that does
        not answer within ``timeout`` seconds is a :class:`BatchError`.
    cluster
        Without ``scheduler``: ``"local"`` (a ``LocalCluster`` of ``n_workers`` processes with
        ``threads_per_worker`` threads each) or ``"slurm"`` (dask-jobqueue's ``SLURMCluster``;
        ``slurm`` holds its options: ``queue``, ``cores``, ``memory``, ``walltime``, ``jobs``;
        missing ones come from the dask config file, ``jobqueue.slurm``).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BatchError(
            "batch prediction on a cluster needs dask.distributed: pip install distributed"
        ) from None

    @contextlib.contextmanager
    def ctx() -> Iterator[Any]:
        if scheduler:
            if not str(scheduler).startswith(("tcp://", "tls://", "inproc://", "ucx://")):
                raise BatchError(
                    f"--scheduler {scheduler!r} is not an address like tcp://HOST:PORT"
                )
            try:
                client = Client(scheduler, timeout=timeout)
            except (OSError, TimeoutError) as e:
                raise BatchError(
                    f"no dask scheduler answered at {scheduler} within {timeout:g} s ({e}); "
                    "is 'dask scheduler' running there and the port open?"
                ) from None
            with client:
                yield client
            return
        if cluster == "local":
            n = n_workers or max(1, min(4, (os.cpu_count() or 2) // max(1, threads_per_worker)))
            kw: dict[str, Any] = {"memory_limit": memory_limit} if memory_limit else {}
            with (
                LocalCluster(
                    n_workers=n,
                    threads_per_worker=threads_per_worker,
                    processes=True,
                    dashboard_address=None,
                    **kw,
                ) as lc,
                Client(lc) as client,
            ):
                yield client
            return
        if cluster == "slurm":
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError:
                raise BatchError(
                    "--cluster slurm needs dask-jobqueue: pip install dask-jobqueue"
                ) from None
            opts = dict(slurm or {})
            jobs = int(opts.pop("jobs", 1) or 1)
            opts = {k: v for k, v in opts.items() if v is not None}
            with SLURMCluster(**opts) as sc:
                sc.scale(jobs=jobs)
                with Client(sc) as client:
                    yield client
            return
        raise BatchError(f"cluster must be 'local' or 'slurm', not {cluster!r}")

    return ctx()


# ============================================================================ files


def output_path(out_dir: Path, image: Path) -> Path:
    """Where the labels of ``image`` go: ``OUTDIR/<stem>_labels.tif``, as in ``predict``."""
    from .cli import _stem

    return Path(out_dir) / f"{_stem(Path(image))}_labels.tif"


def _predict_file(
    payload: tuple[bytes, str, str],
    image: str,
    out: str,
    axes: str | None,
    threads: int | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """On a worker: read one TIFF, predict it, write its labels atomically."""
    from .cli import _describe, _image_axes, _label_dtype, read_tiff, write_tiff

    seg = _model_on_worker(payload, threads)
    t0 = time.perf_counter()
    arr, meta_axes = read_tiff(image, "image")
    ax = _image_axes(arr, meta_axes, axes, Path(image))
    pred = seg.predict(arr, ax, **kwargs)
    labels = pred.labels.astype(_label_dtype(pred.labels))
    target = Path(out)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        write_tiff(tmp, labels, pred.axes)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "image": image,
        "out": out,
        "summary": _describe(seg, pred.labels),
        "seconds": time.perf_counter() - t0,
        "worker": os.getpid(),
    }


def predict_files(
    model: Segmenter,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    client: Any = None,
    axes: str | None = None,
    overwrite: bool = False,
    retries: int = 1,
    threads_per_worker: int | None = 1,
    progress: Progress | None = None,
    **predict_kwargs: Any,
) -> BatchResult:
    """Predict many TIFF files on a dask cluster; labels go to ``OUTDIR/<stem>_labels.tif``.

    Parameters
    ----------
    model
        The :class:`Segmenter`.
    images, out_dir
        Input TIFF files and the output folder (created; on a cluster: a shared file system).
    client
        A ``distributed.Client``; None predicts in this process (the local reference run).
    overwrite
        Replace existing outputs; without it files whose labels exist are skipped.
    retries
        How many times a failed file is tried again (on any worker) before it is reported in
        ``failed`` and skipped.
    threads_per_worker
        torch threads per worker.
    progress
        ``progress(done, total, image_name)`` after each file.
    predict_kwargs
        Passed to :meth:`Segmenter.predict` (``device``, ``tile_shape``, ``channel`` ...).
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BatchError(f"the output folder {out} is a file; give a folder for the labels")
    res = BatchResult()
    todo = _plan_outputs([Path(p).expanduser() for p in images], out, overwrite, res)
    out.mkdir(parents=True, exist_ok=True)
    payload = model_bytes(model)
    kwargs = dict(predict_kwargs)
    kwargs.setdefault("device", "cpu")
    tally = _Tally(res, len(todo), progress)
    if client is None:
        for p, target in todo:
            for attempt in range(retries + 1):
                try:
                    tally.finished(_predict_file(payload, str(p), str(target), axes, None, kwargs))
                    break
                except Exception as e:  # noqa: BLE001 - reported per file, the others go on
                    if attempt == retries:
                        tally.failed(p, e)
    else:
        res.workers = len(client.scheduler_info().get("workers", {}))
        _files_on_cluster(client, todo, payload, axes, threads_per_worker, kwargs, retries, tally)
    res.seconds = time.perf_counter() - t0
    return res


def _plan_outputs(
    paths: list[Path], out: Path, overwrite: bool, res: BatchResult
) -> list[tuple[Path, Path]]:
    """The (image, labels file) pairs to predict; existing outputs go to ``res.skipped``
    unless ``overwrite``. An output that is an input, or two inputs with one output, raise."""
    inputs = {p.resolve() for p in paths}
    todo: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    for p in paths:
        target = output_path(out, p)
        if target.resolve() in inputs:
            raise BatchError(f"the output {target} would overwrite an input; choose another -o")
        if target in seen:
            raise BatchError(f"{seen[target]} and {p} would both be written as {target.name}")
        seen[target] = p
        if target.exists() and not overwrite:
            res.skipped.append(p)
            continue
        todo.append((p, target))
    return todo


@dataclass
class _Tally:
    """Counts finished and failed files into a :class:`BatchResult` and reports progress."""

    res: BatchResult
    total: int
    progress: Progress | None
    done: int = 0

    def finished(self, info: dict[str, Any]) -> None:
        self.res.written.append(Path(info["out"]))
        self.res.summaries[Path(info["image"]).name] = info["summary"]
        self._count(Path(info["image"]).name)

    def failed(self, p: Path, e: BaseException) -> None:
        self.res.failed[str(p)] = f"{type(e).__name__}: {e}"
        self._count(p.name)

    def _count(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)


def _files_on_cluster(
    client: Any,
    todo: list[tuple[Path, Path]],
    payload: tuple[bytes, str, str],
    axes: str | None,
    threads: int | None,
    kwargs: dict[str, Any],
    retries: int,
    tally: _Tally,
) -> None:
    """One task per file, the model scattered to every worker once; results as they come."""
    from distributed import as_completed

    shared = client.scatter(payload, broadcast=True, hash=False)
    futures = {}
    for p, target in todo:
        f = client.submit(
            _predict_file,
            shared,
            str(p),
            str(target),
            axes,
            threads,
            kwargs,
            retries=retries,
            pure=False,
            key=f"napari-unet-predict-{p.name}-{os.urandom(4).hex()}",
        )
        futures[f] = p
    for f in as_completed(futures):
        try:
            tally.finished(f.result())
        except Exception as e:  # noqa: BLE001 - a file that failed twice: reported, skipped
            tally.failed(futures[f], e)


# ============================================================================ one big array


def _predict_frame(
    payload: tuple[bytes, str, str],
    frame: np.ndarray,
    axes: str,
    threads: int | None,
    kwargs: dict[str, Any],
) -> np.ndarray:
    seg = _model_on_worker(payload, threads)
    return seg.predict(np.asarray(frame), axes, **kwargs).labels


def predict_array(
    model: Segmenter,
    array: Any,
    axes: str,
    *,
    client: Any = None,
    labels_out: Any = None,
    retries: int = 1,
    threads_per_worker: int | None = 1,
    progress: Progress | None = None,
    **predict_kwargs: Any,
) -> np.ndarray | Any:
    """Predict the frames of one big array (numpy, dask or zarr) on a dask cluster.

    The array is cut along its first axis when that is ``T`` (a time series or a stack of
    images), else along ``Z`` for a 2D model; each frame is one task, normalised and
    post-processed on its own (as :meth:`Segmenter.predict` would do it for that frame), and
    its object ids are shifted so they are unique over the array (frame ``k`` continues after
    the largest id of the frames before it). A dask array stays lazy: the workers compute the
    frames they need. Results equal those of ``client=None`` (the same frames in this process).

    Returns
    -------
    The labels (``int32``, the array's axes without ``C``), in ``labels_out`` when given.
    """
    frame_axes, out_shape = _frames_of(model, array, axes)
    if labels_out is not None:  # as Segmenter.predict checks it
        from .inference import _check_labels_out

        _check_labels_out(labels_out, out_shape, model.task, array)
    labels = np.zeros(out_shape, np.int32) if labels_out is None else labels_out
    payload = model_bytes(model)
    kwargs = dict(predict_kwargs)
    kwargs.setdefault("device", "cpu")
    n = int(array.shape[0])
    writer = _FrameWriter(labels, n, progress)
    if client is None:
        for k in range(n):
            writer.add(k, _predict_frame(payload, np.asarray(array[k]), frame_axes, None, kwargs))
        return labels

    from distributed import as_completed

    shared = client.scatter(payload, broadcast=True, hash=False)
    is_dask = hasattr(array, "dask") and hasattr(array, "compute")
    futures = {}
    for k in range(n):
        frame = client.compute(array[k]) if is_dask else client.scatter(np.asarray(array[k]))
        f = client.submit(
            _predict_frame, shared, frame, frame_axes, threads_per_worker, kwargs,
            retries=retries, pure=False,
        )  # fmt: skip
        futures[f] = k
    for f in as_completed(futures):
        writer.add(futures[f], f.result())
    return labels


def _frames_of(model: Segmenter, array: Any, axes: str) -> tuple[str, tuple[int, ...]]:
    """Check that ``array`` can be cut into frames along its first axis; returns (the axes of
    a frame, the shape of the labels)."""
    from .segmenter import Segmenter

    if not isinstance(model, Segmenter):
        raise TypeError("model must be a Segmenter")
    axes = axes.upper()
    if len(axes) != len(array.shape):
        raise ValueError(f"axes {axes!r} do not match the array's {len(array.shape)} dimensions")
    lead = axes[0]
    if lead != "T" and not (lead == "Z" and model.ndim == 2):
        raise ValueError(
            f"predict_array cuts the array along a leading T axis (or Z for a 2D model); the "
            f"axes are {axes!r}"
        )
    out_shape = tuple(int(s) for a, s in zip(axes, array.shape, strict=True) if a != "C")
    return axes[1:], out_shape


@dataclass
class _FrameWriter:
    """Writes frame labels in frame order, each frame's ids shifted past those before it (so
    ids are unique and do not depend on the order in which frames finish)."""

    labels: Any
    n: int
    progress: Progress | None
    next_frame: int = 0
    offset: int = 0
    waiting: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, k: int, lab: np.ndarray) -> None:
        self.waiting[k] = lab
        while self.next_frame in self.waiting:
            lab = self.waiting.pop(self.next_frame).astype(np.int32)
            if self.offset:
                lab[lab > 0] += self.offset
            self.labels[self.next_frame] = lab
            self.offset = max(self.offset, int(lab.max()) if lab.size else 0)
            self.next_frame += 1
            if self.progress is not None:
                self.progress(self.next_frame, self.n, f"frame {self.next_frame}")
