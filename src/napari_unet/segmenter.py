"""``Segmenter``: a U-Net plus everything needed to use it on real images.

The network only sees normalised float tiles. The Segmenter owns the rest: which task
(instances or semantic classes), how many channels, intensity normalisation, tile defaults,
axes handling (YX, ZYX, TYX, YXC, CYX ...), devices, post-processing, fine-tuning and files.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import os
import time
from collections.abc import Generator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _memory, data, engines, store
from .config import ModelConfig, PredictOptions, check_weights, source_name
from .inference import (  # noqa: F401 - old names, kept importable from here
    _MEMMAP_ABOVE,
    _available_memory,
    _block_cached,
    _block_sample_range,
    _Buffers,
    _cache_budget,
    _check_fits_in_memory,
    _check_labels_out,
    _from_tz,
    _gb,
    _is_oom,
    _Job,
    _normalizer,
    _plane_order,
    _release,
    _round_up,
    _Run,
    _scale,
    _signal,
    _Sizer,
    _stack_frames,
    _View,
    _write_labels,
    batch_for_memory,
)
from .model import UNet
from .postprocess import (
    classes_from_probabilities,
    instances_from_probabilities,
    link_to_previous,
)
from .postprocess3d import SliceLinker, instances_3d_from_stack
from .prediction import Prediction, resolve_device
from .tiling import BlockCache
from .training import TrainProgress, thread_limit

__all__ = ["Segmenter", "Prediction", "resolve_device", "batch_for_memory"]

logger = logging.getLogger(__name__)

TASKS = ("instance", "semantic")
_CANON = "TZCYX"
#: A prediction of at least this many pixels (all planes) frees the engine's working memory
#: after its tiles, before the post-processing (8192x8192 with OpenVINO: see
#: ``docs/benchmarks.md``, "Working memory"); smaller ones keep it for the next call.
RELEASE_PIXELS = 1 << 22
#: a 2D image of at most this many pixels leaves the zoom its prediction picked for a round
#: on it to reuse (:meth:`Segmenter._zoom_for`), if the weights are still the same: the
#: round's setup predicted the whole image again for it (0.26 s at 512x512 of a 0.97 s setup)
ZOOM_MEMO_PIXELS = 1 << 24


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


class Segmenter:
    """A U-Net with its configuration; predicts, fine-tunes, saves and loads.

    Build one with :meth:`new`, :meth:`pretrained` or :meth:`load`.
    """

    def __init__(self, net: UNet, config: dict):
        task = config.get("task")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        self.net = net.eval()
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(
        cls,
        task: str = "instance",
        in_channels: int = 1,
        *,
        num_classes: int = 2,
        ndim: int = 2,
        base_channels: int = 16,
        depth: int = 3,
        up_mode: str = "transpose",
        dropout: float = 0.0,
        seed: int | None = 0,
        name: str = "untitled",
    ) -> Segmenter:
        """An untrained model.

        Parameters
        ----------
        task
            ``"instance"`` (objects with ids; the network predicts background / interior /
            boundary) or ``"semantic"`` (``num_classes`` classes, 0 = background).
        in_channels
            Image channels the model takes (1 for a grey image, 3 for RGB ...).
        ndim
            2 for a 2D network (volumes are predicted slice by slice), 3 for a 3D network.
        base_channels, depth, up_mode, dropout
            Network size; the defaults are a small U-Net that trains fast on a CPU.
        """
        if task not in TASKS:
            raise ValueError(f"task must be 'instance' or 'semantic', not {task!r}")
        if task == "semantic" and (
            isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
        ):
            raise ValueError(f"num_classes must be a whole number, not {num_classes!r}")
        if task == "semantic" and num_classes < 2:
            raise ValueError("a semantic model needs at least 2 classes (background + one)")
        out = 3 if task == "instance" else int(num_classes)
        from .config import Architecture
        from .schema import ConfigError

        arch = dict(
            in_channels=in_channels, out_channels=out, base_channels=base_channels,
            depth=depth, ndim=ndim, up_mode=up_mode, dropout=dropout,
        )  # fmt: skip
        try:  # the checks a saved model's architecture gets, before torch sees the values
            Architecture._from(arch)
        except ConfigError as e:
            raise ValueError(f"Segmenter.new: {e.field} {e.reason}") from None
        if seed is not None:
            torch.manual_seed(seed)
        net = UNet(in_channels, out, base_channels, depth, ndim, up_mode, dropout)
        classes = (
            ["background", "interior", "boundary"]
            if task == "instance"
            else ["background"] + [f"class {k}" for k in range(1, num_classes)]
        )
        # every other field (normalisation, tiles, post-processing) takes config.py's default
        config = ModelConfig.new(task, net.config(), classes, name=name, created=_now())
        return cls(net, config.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Segmenter:
        """Load a model saved with :meth:`save` (a folder or a single ``.safetensors`` file),
        or a bioimage.io package (``.zip``) made by
        :func:`napari_unet.bioimageio.export_package`."""
        from . import bioimageio

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Segmenter.load needs a path (str or Path), not {type(path).__name__}")
        if bioimageio.is_package(path):
            return bioimageio.import_package(path)
        # the config is checked field by field, then the weights' shapes against its
        # architecture, before the network is built (nothing big is allocated for a bad file)
        src = source_name(path)
        model_config = ModelConfig.from_dict(store.read_config(path), src)
        state, _ = store.load_model(path)
        check_weights(model_config.architecture, state, src)
        config = model_config.to_dict()
        try:
            net = UNet(**config["architecture"])
            net.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError, ValueError) as e:
            raise store.ModelFileError(
                f"{path}: the weights do not fit the architecture in its config ({e})"
            ) from None
        return cls(net, config)

    @classmethod
    def pretrained(cls, name: str = "nuclei") -> Segmenter:
        """A starter model shipped inside the package (no download)."""
        root = resources.files("napari_unet") / "models"
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if name not in available:
            raise store.ModelFileError(
                f"no starter model named {name!r} ships with this napari-unet; "
                f"available: {available or 'none'}"
            )
        with resources.as_file(root / name) as p:
            return cls.load(p)

    def save(self, path: str | Path) -> Path:
        """Save weights (safetensors) and config (JSON) atomically; returns the path.

        Refused before anything is written: a config :meth:`load` would refuse (it would
        replace a good model by one that cannot be loaded), and (as every save,
        :func:`napari_unet.save.prepare_tensors`) weights that are not finite."""
        from .schema import ConfigError

        try:
            self.model_config  # noqa: B018 - validates
        except (ConfigError, ValueError) as e:
            raise ValueError(f"will not save {path}: {e}") from None
        return store.save_model(path, self.net.state_dict(), self.config)

    def copy(self) -> Segmenter:
        """An independent copy (weights and config)."""
        return Segmenter(copy.deepcopy(self.net), copy.deepcopy(self.config))

    # ------------------------------------------------------------------ properties
    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def model_config(self) -> ModelConfig:
        """The config as a typed, validated :class:`~napari_unet.config.ModelConfig`."""
        return ModelConfig.from_dict(self.config, f"the config of {self.config.get('name')!r}")

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def ndim(self) -> int:
        return self.net.ndim

    def __repr__(self) -> str:
        a = self.config["architecture"]
        return (
            f"Segmenter(name={self.config.get('name')!r}, task={self.task!r}, "
            f"in_channels={a['in_channels']}, classes={a['out_channels']}, ndim={a['ndim']}, "
            f"base_channels={a['base_channels']}, depth={a['depth']})"
        )

    # ------------------------------------------------------------------ input handling
    def _canonical(self, image: Any, axes: str | None, channel: int | None, name: str = "image"):
        """Validate and put an image into canonical TZCYX order; returns (canon, axes)."""
        if isinstance(image, torch.Tensor):  # its dtype is torch's, which numpy cannot read
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ma.MaskedArray):
            if np.ma.getmaskarray(image).any():  # what lies under the mask would be segmented
                raise ValueError(
                    f"the {name} is a masked array with masked pixels; the network needs a value "
                    "for every pixel: give image.filled(value) (e.g. the background level)"
                )
            image = np.ma.getdata(image)
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        dt = np.dtype(image.dtype)
        if dt != np.dtype(bool) and (not np.issubdtype(dt, np.number) or dt.kind == "c"):
            # lazy inputs too; their NaN/inf are found block by block as they are read
            raise ValueError(f"{name} has dtype {dt}; expected a real-valued image")
        if isinstance(image, np.ndarray):
            if image.dtype == bool:
                image = image.astype(np.float32)
            data.check_finite(image, name)
        if axes is None:
            axes = data.guess_axes(image.shape)
        axes = data.validate_axes(axes, image.ndim, tuple(image.shape))
        if self.ndim == 3 and "Z" not in axes:
            raise ValueError(
                f"this is a 3D model but the {name} has no Z axis (axes {axes!r}); "
                "use a 2D model or pass axes with Z, e.g. 'ZYX'"
            )
        canon = data.to_canonical(image, axes, _CANON)
        n_ch = canon.shape[2]
        if channel is not None:
            if not 0 <= channel < n_ch:
                raise ValueError(f"channel={channel} but the {name} has {n_ch} channel(s)")
            canon = canon[:, :, channel : channel + 1]
            n_ch = 1
        if n_ch != self.in_channels:
            hint = " (pick one with channel=...)" if self.in_channels == 1 else ""
            raise ValueError(
                f"the model takes {self.in_channels} channel(s) but the {name} has {n_ch} "
                f"(shape {tuple(image.shape)}, axes {axes!r}){hint}"
            )
        small = [s for a, s in zip(_CANON, canon.shape, strict=True) if a in "ZYX" and s < 1]
        if small:
            raise ValueError(f"the {name} is empty (shape {tuple(image.shape)})")
        return canon, axes

    def _intensity_range(self, canon: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel normalisation range; lazy inputs are sampled by whole blocks."""
        norm = self.config.get("normalization", {})
        low, high = norm.get("low", 1.0), norm.get("high", 99.8)
        lo, hi = [], []
        for c in range(canon.shape[2]):
            if isinstance(canon, BlockCache):
                lo_c, hi_c = _block_sample_range(canon, c, low, high)
            else:
                lo_c, hi_c = data.percentile_range(canon[:, :, c], low, high)
            lo.append(lo_c)
            hi.append(hi_c)
        # float64: the range of a float64 image may lie beyond float32's (1e300 ...)
        return np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def _prepare(self, image: Any, axes: str | None, channel: int | None, name: str = "image"):
        """Validate and put an image into canonical TZCYX order; returns (canon, axes, lo, hi)."""
        canon, axes = self._canonical(image, axes, channel, name)
        lo, hi = self._intensity_range(canon)
        return canon, axes, lo, hi

    # ------------------------------------------------------------------ prediction
    def _predictor(self, device: torch.device, engine: str = "torch", pixels=None, notes=None):
        """``(B, C, *tile) -> (B, K, *tile)`` probabilities on ``device`` by ``engine``; the
        function's ``engine`` attribute names the engine that ran (see
        :func:`napari_unet.engines.predictor`)."""
        return engines.predictor(self.net, device, engine, pixels=pixels, notes=notes)

    def predict(self, image: Any, axes: str | None = None, **kwargs: Any) -> Prediction:
        """Segment an image.

        Parameters
        ----------
        image
            numpy array or lazy array (dask, zarr) of any real dtype, or a list of frames of
            one shape (stacked along a new leading T axis).
        axes
            Its axes, e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``, ``"YXC"``, ``"CYX"``, ``"TZYX"``;
            guessed for 2D/3D arrays when omitted (3D with 3 or 4 last = RGB, else ZYX). For a
            list of frames, the axes of one frame (``"T"`` is prepended) or of the stack.
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        tile_shape, overlap, batch_size
            Tiling; defaults from the model's config. Without ``batch_size`` it is chosen from
            the free GPU memory on CUDA (2 on the CPU). On a GPU out-of-memory error the batch is
            halved, then the tiles, then the CPU takes over; each step is recorded in
            ``Prediction.notes`` and issued as a ``RuntimeWarning``.
        channel
            Use only this channel of a multichannel image (for a 1-channel model).
        return_probabilities
            Keep the probability maps (default: True, or False with ``labels_out``).
        labels_out
            Optional writable int array with the labels' shape (numpy, ``np.memmap``, zarr
            array opened for writing). The image is then predicted plane by plane (2D model) or
            volume by volume (3D model) and each result is written right away: neither the
            image nor its probabilities are ever whole in memory. With a 2D model on a Z stack
            the objects of consecutive slices are linked by overlap, so a 3D object keeps one
            id; ids are unique over the whole array. ``Prediction.labels`` is ``labels_out``.
        scale
            Physical pixel size per axis of the input (e.g. a napari layer's ``scale``), with
            or without an entry for the channel axis. Used by the 3D post-processing: minimum
            object sizes are volumes in isotropic voxels at the Y/X resolution.
        diameter
            Typical object diameter in pixels (like Cellpose's). A model that records the
            diameter it was trained at (``config["diameter"]``) resizes each image so its
            objects come out at about that size, and back: big nuclei are then not cut into
            pieces. None (default) estimates it from a first pass over the image, kept only
            when the objects lie outside the trained range. Not used with ``labels_out``.
        engine
            Who runs the network: ``"auto"`` (default: OpenVINO or ONNX Runtime on the CPU
            when installed, else torch), ``"torch"``, ``"openvino"``, ``"onnxruntime"``. See
            :mod:`napari_unet.engines`; a failing engine falls back to torch, with a note.

        Returns
        -------
        Prediction
        """
        gen = self.predict_iter(image, axes, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def predict_iter(
        self,
        image: Any,
        axes: str | None = None,
        *,
        device: str | torch.device = "auto",
        tile_shape: Sequence[int] | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        channel: int | None = None,
        return_probabilities: bool | None = None,
        num_threads: int | None = None,
        labels_out: Any = None,
        scale: Sequence[float] | None = None,
        diameter: float | None = None,
        engine: str = "auto",
    ) -> Generator[tuple[int, int], None, Prediction]:
        """Like :meth:`predict`, as a generator that yields ``(done, total)`` tile counts.

        Closing the generator stops the prediction promptly (used by the napari Stop button).
        The :class:`Prediction` is the generator's return value.
        """
        t0 = time.perf_counter()
        PredictOptions.checked(
            self,
            tile_shape=tile_shape,
            overlap=overlap,
            batch_size=batch_size,
            channel=channel,
            num_threads=num_threads,
            return_probabilities=return_probabilities,
        )
        engines.check_engine(engine)
        if labels_out is not None and return_probabilities:
            raise ValueError(
                "return_probabilities=True and labels_out cannot go together: with "
                "labels_out the probabilities of the whole image are never kept"
            )
        keep_probs = labels_out is None if return_probabilities is None else return_probabilities
        job = self._plan(
            image, axes, channel, scale, device, tile_shape, overlap, batch_size, labels_out,
            keep_probs, engine,
        )
        volume = job.canon.shape[1] > 1 and self.ndim == 2 and diameter is None
        sizer = _Sizer(
            self,
            diameter if labels_out is None else None,
            self.ndim,
            zoom=self.config.get("volume_zoom") if volume else None,
            volume=job.canon.shape[1] > 1,
        )
        try:
            with thread_limit(num_threads if job.run.device.type == "cpu" else None):
                if labels_out is None:
                    labels, probs_out, pp_s = yield from self._in_memory(job, sizer, keep_probs)
                else:
                    pp_s = yield from self._streaming(job, labels_out)
                    labels, probs_out = labels_out, None
        finally:
            _release(job.run.device)  # the GPU is not left full, whatever happened
            engines.start_deferred_export(job.run.fn)  # for the next prediction, if any
        if labels_out is None and diameter is None and job.canon.shape[:2] == (1, 1):
            key = self._plane_key(job.canon[0, 0])
            if key is not None:  # what a round on this image will want to know
                self._zoom_memo = (key, sizer.zoom, sizer.diameter)
        return Prediction(
            probs_out,
            labels,
            "".join(job.keep),
            time.perf_counter() - t0,
            pp_s,
            str(job.run.device),
            job.notes,
            job.scale_keep,
            sizer.diameter if labels_out is None else None,
            sizer.zoom if labels_out is None else 1.0,
            job.run.engine_used,
        )

    def _plane_key(self, plane: Any) -> tuple[str, str] | None:
        """(weights, pixels) digests of a canonical ``(C, Y, X)`` numpy plane; None for a lazy
        or big one (see :data:`ZOOM_MEMO_PIXELS`)."""
        if not isinstance(plane, np.ndarray) or plane.size > ZOOM_MEMO_PIXELS:
            return None
        return engines.weights_digest(self.net), engines.array_digest(plane)

    def _zoom_for(self, plane: np.ndarray, axes: str, volume: bool = False):
        """``(zoom, estimated diameter or None)`` :meth:`predict` picks for a 2D plane (its
        first pass, and the refinement for big objects), without the post-processing a whole
        prediction would add; ``volume``: the plane is the middle one of a volume. The last
        2D prediction's choice when it was of this very plane with these weights."""
        memo = getattr(self, "_zoom_memo", None)
        if memo is not None and not volume and axes == "CYX" and memo[0] == self._plane_key(plane):
            return memo[1], memo[2]
        job = self._plan(plane, axes, None, None, "auto", None, None, None, None, False, "torch")
        sizer = _Sizer(self, None, self.ndim, volume=volume)
        out = _memory.zeros((self.net.out_channels, *job.spatial), np.float32)
        try:
            for _ in sizer.tiles(job.run, job.source(0, 0), out, job.transform, job.spatial):
                pass
        finally:
            _release(job.run.device)
        return sizer.zoom, sizer.diameter

    def _plan(
        self, image, axes, channel, scale, device, tile_shape, overlap, batch_size, labels_out,
        keep_probs, engine,
    ) -> _Job:
        """Check the input and settle everything a prediction needs before its first tile."""
        image, axes = _stack_frames(image, axes)
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):  # nested lists
            image = np.asarray(image)
        canon, axes = self._canonical(image, axes, channel)
        keep = [a for a in axes if a != "C"]
        out_shape = tuple(int(s) for a, s in zip(axes, image.shape, strict=True) if a != "C")
        scale_keep, spacing = _scale(scale, axes, keep)
        if labels_out is not None:
            _check_labels_out(labels_out, out_shape, self.task, image)
        dev = resolve_device(device)
        T, Z, C, Y, X = canon.shape
        nd = self.ndim
        tile = list(tile_shape) if tile_shape is not None else list(self.config["tile_shape"])
        if len(tile) != nd:
            raise ValueError(f"tile_shape {tuple(tile)} must have {nd} values for a {nd}D model")
        ov = self.config["overlap"] if overlap is None else overlap
        spatial = (Y, X) if nd == 2 else (Z, Y, X)
        div = self.net.divisor
        tile_eff = [min(t, _round_up(s, div)) for t, s in zip(tile, spatial, strict=True)]
        notes: list[str] = []
        if labels_out is None:
            _check_fits_in_memory(canon.shape, self.net.out_channels, keep_probs, out_shape)
        canon = _block_cached(canon, nd, tile_eff, notes)
        lo, hi = self._intensity_range(canon)
        if batch_size is None:
            batch_size = self._auto_batch_size(dev, tile_eff)
        elif int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        run = _Run(
            self, dev, int(batch_size), tile_eff, ov, notes,
            engine=engine, pixels=T * Z * Y * X, balance=tile_shape is None,
        )
        return _Job(canon, keep, scale_keep, spacing, run, spatial, lo, hi, nd, notes)

    def _in_memory(self, job: _Job, sizer: _Sizer, keep_probs: bool):
        """Every plane into one probability array, then the post-processing of the whole."""
        T, Z, _, Y, X = job.canon.shape
        probs = _memory.zeros((self.net.out_channels, T, Z, Y, X), np.float32)
        done, per, total = 0, job.per_plane, job.total
        for t in range(T):
            for z in _plane_order(Z if job.nd == 2 else 1):
                out = probs[:, t, z] if job.nd == 2 else probs[:, t]
                src = job.source(t, z if job.nd == 2 else None)
                for d in sizer.tiles(job.run, src, out, job.transform, job.spatial):
                    yield done + int(d * per), total
                done += per
        if probs[0].size >= RELEASE_PIXELS and job.run.fn is not None:
            engines.release_memory(job.run.fn)  # not held through the post-processing
        t1 = time.perf_counter()
        labels = self._postprocess(probs, job.spacing, volume=job.signal)
        yield total, total
        pp_s = time.perf_counter() - t1
        probs_out = _from_tz(probs, job.keep, leading=1) if keep_probs else None
        return _from_tz(labels, job.keep), probs_out, pp_s

    def _streaming(self, job: _Job, labels_out: Any):
        """Plane by plane (volume by volume) into ``labels_out``; ids unique over the array.
        Returns the post-processing seconds."""
        T, Z, _, Y, X = job.canon.shape
        pp_s, done, next_id = 0.0, 0, 1
        shape = (Y, X) if job.nd == 2 else (Z, Y, X)
        with _Buffers(self.net.out_channels, shape) as (pbuf, lbuf):
            for t in range(T):
                linker = None
                for z in range(Z) if job.nd == 2 else [None]:
                    for d in job.run.tiles(job.source(t, z), pbuf, job.transform, job.spatial):
                        yield done + int(d * job.per_plane), job.total
                    done += job.per_plane
                    t1 = time.perf_counter()
                    if self.task == "semantic":
                        final = classes_from_probabilities(pbuf)
                    elif job.nd == 3:
                        self._instances_3d(pbuf, lbuf, job.spacing, job.signal(t))
                        final, next_id = link_to_previous(None, lbuf, next_id, out=lbuf)
                    elif Z > 1:  # one slice at a time, linked; the linker never chains
                        self._instances(pbuf, lbuf, job.spacing, volume=True)
                        if linker is None:
                            linker = SliceLinker(start_id=next_id)
                        final = linker(lbuf, job.signal(t, z))
                        next_id = linker.next_id
                    else:
                        self._instances(pbuf, lbuf, job.spacing)
                        final, next_id = link_to_previous(None, lbuf, next_id, out=lbuf)
                    _write_labels(labels_out, final, job.keep, t, z)
                    pp_s += time.perf_counter() - t1
        yield job.total, job.total
        return pp_s

    def _auto_batch_size(self, dev: torch.device, tile: Sequence[int]) -> int:
        """Tiles per forward pass: from the free memory on CUDA, 4 on MPS; on the CPU 2, or 1
        for tiles over 512x512 pixels (batching does not speed up the CPU, it costs memory)."""
        if dev.type == "cuda":
            try:
                free, _ = torch.cuda.mem_get_info(dev)
            except Exception:  # noqa: BLE001 - no usable CUDA runtime: a safe default
                return 8
            arch = self.config["architecture"]
            return batch_for_memory(
                free, tile, arch["base_channels"], self.in_channels, self.net.out_channels
            )
        if dev.type == "mps":
            return 4
        return 2 if math.prod(tile) <= 512 * 512 else 1

    def _seed_threshold(self, volume: bool) -> float:
        """The config's seed threshold: ``seed_threshold_3d`` for the planes and the 3D
        assembly of a volume (when set), ``seed_threshold`` otherwise."""
        pp = self.config.get("postprocess", {})
        if volume and pp.get("seed_threshold_3d") is not None:
            return float(pp["seed_threshold_3d"])
        return float(pp.get("seed_threshold", 0.5))

    def _instances(
        self, probs: np.ndarray, out: np.ndarray, spacing, volume: bool = False
    ) -> np.ndarray:
        pp = self.config.get("postprocess", {})
        return instances_from_probabilities(
            probs,
            seed_threshold=self._seed_threshold(volume),
            foreground_threshold=pp.get("foreground_threshold", 0.5),
            min_size=pp.get("min_size"),
            out=out,
            spacing=spacing if probs.ndim == 4 else None,
        )

    def _instances_3d(self, probs: np.ndarray, out: np.ndarray, spacing, image) -> np.ndarray:
        """(3, Z, Y, X) -> (Z, Y, X) objects, by the config's ``postprocess.assembly``:
        ``"3d"`` (default) or ``"2d-linked"`` (2D objects per slice, then linked)."""
        pp = self.config.get("postprocess", {})
        if pp.get("assembly") == "2d-linked":
            linker = SliceLinker()
            for z in range(probs.shape[1]):
                self._instances(probs[:, z], out[z], None, volume=True)
                out[z] = linker(out[z], None if image is None else image[z])
            return out
        kw = {k: pp[k] for k in ("min_size", "min_seed_size") if pp.get(k) is not None}
        if pp.get("smooth_3d") is not None:
            kw["smooth"] = float(pp["smooth_3d"])
        if pp.get("h_fraction_3d") is not None:
            kw["h_fraction"] = float(pp["h_fraction_3d"])
        return instances_3d_from_stack(
            probs,
            spacing,
            image=image,
            seed_threshold=self._seed_threshold(True),
            foreground_threshold=pp.get("foreground_threshold", 0.5),
            out=out,
            **kw,
        )

    def _postprocess(self, probs: np.ndarray, spacing=None, volume=None) -> np.ndarray:
        """(K, T, Z, Y, X) probabilities -> (T, Z, Y, X) int32 labels, ids unique over T.

        ``volume(t)``, when given, is frame t's (Z, Y, X) intensities for the 3D assembly."""
        _, T, Z, Y, X = probs.shape
        labels = _memory.zeros((T, Z, Y, X), np.int32)
        offset = 0
        for t in range(T):
            if self.task == "semantic":
                labels[t] = classes_from_probabilities(probs[:, t])
                continue
            p = probs[:, t] if Z > 1 else probs[:, t, 0]
            out = labels[t] if Z > 1 else labels[t, 0]
            if Z > 1:
                self._instances_3d(p, out, spacing, volume(t) if volume is not None else None)
            else:
                self._instances(p, out, spacing)
            if offset:
                lt = labels[t]
                lt[lt > 0] += offset
            offset = max(offset, int(labels[t].max()))
        return labels

    # ------------------------------------------------------------------ fine-tuning
    def finetune(
        self,
        images: Any,
        labels: Any,
        masks: Any = None,
        *,
        axes: str | None = None,
        time_limit_s: float | None = 60.0,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        patch_shape: Sequence[int] | None = None,
        val_fraction: float = 0.0,
        augment: bool = True,
        strong_augment: bool = False,
        device: str | torch.device = "auto",
        seed: int | None = 0,
        num_threads: int | None = None,
        channel: int | None = None,
        names: Sequence[str] | None = None,
        safe: bool | None = None,
    ) -> Generator[TrainProgress, None, None]:
        """Fine-tune on (image, labels) pairs; a generator of progress events.

        Parameters
        ----------
        images, labels
            One image and its labels, or lists of them. Labels are what the user paints:
            0 = background, 1..N = objects (instance) or class ids (semantic), with the image's
            spatial shape.
        masks
            Optional bool arrays (same shape as labels): True where the labels can be trusted.
            Pixels outside are ignored by the loss (partial corrections).
        time_limit_s, steps
            Budget; training stops at whichever comes first. ``close()`` the generator to stop
            earlier: the model keeps the weights of the last completed step.
        val_fraction
            Hold out this fraction (a band at the bottom of each fully annotated image) to report
            a validation F1 (instance task) and keep the best weights.
        num_threads
            CPU threads for torch during training (e.g. leave one core to the GUI).
        strong_augment
            Also blur, re-curve the contrast and add noise to training patches (used to train
            the starter; a round on the user's own images does not need it).
        safe
            Fine-tune so that the model cannot get worse (default: on for a model that was
            trained before, 2D instance models, 2D images and time series; volumes are
            assembled in 3D and are not guarded): images resized to the model's object size,
            the model's own predictions on the uncorrected parts of the images replayed
            (generated nuclei when there are none), weights pulled toward the round's start,
            normalisation
            statistics kept, a learning rate scaled to the number of corrected objects, and
            a guard that holds out some corrected objects and keeps the old weights when the
            new ones score lower on them (or on those held out in earlier rounds); the last
            event's ``reason`` says so. See :mod:`napari_unet.safeguard`.

        Yields
        ------
        TrainProgress
            step, epoch, loss, seconds, val_f1 ...; the last event has ``done=True``.
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "images", "labels")}
        from .finetune import finetune

        yield from finetune(self, images, labels, **options)
