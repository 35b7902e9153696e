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
import shutil
import tempfile
import time
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data, engines, store
from .config import ModelConfig, PredictOptions, check_weights, source_name
from .model import UNet
from .postprocess import (
    classes_from_probabilities,
    instances_from_probabilities,
    link_to_previous,
)
from .postprocess3d import SliceLinker, instances_3d_from_stack
from .scale import diameter_of_foreground, rescale_factor, resize_image, zoomed_shape
from .tiling import BlockCache, chunk_shape, plan_tiles, tiled_inference
from .training import TrainProgress, thread_limit

__all__ = ["Segmenter", "Prediction", "resolve_device", "batch_for_memory"]

logger = logging.getLogger(__name__)

TASKS = ("instance", "semantic")
_CANON = "TZCYX"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then MPS, then CPU. An unavailable device is a clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='auto' or 'cpu', or install a CUDA build"
        )
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' was asked for but is not available on this machine")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'")
    return torch.device(name)


@dataclass
class Prediction:
    """Result of :meth:`Segmenter.predict`.

    Attributes
    ----------
    probabilities
        float32 ``(K, *spatial)``: per-class probabilities (instance: background, interior,
        boundary), ``None`` when not requested.
    labels
        int32 ``(*spatial)``: instance ids (0 = background) or class ids.
    axes
        The spatial axes of ``labels``, in the input's order (e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``).
    seconds
        Wall time of the prediction, post-processing included.
    postprocess_seconds
        Wall time of the post-processing alone.
    device
        The device that ran the network (the last one, after any fallback).
    notes
        What happened that the user should know: out-of-memory retries with smaller batches
        or tiles, a fall back to the CPU, blocks read more than once. Empty when all went to
        plan; each note was also issued as a ``RuntimeWarning``.
    scale
        The ``scale`` given to :meth:`Segmenter.predict` (one value per axis of ``labels``),
        or None.
    diameter
        The typical object diameter in pixels of the input: the one given, or the one
        estimated from the image (2D models that record the diameter they were trained at);
        None when not used.
    zoom
        The factor by which the image was resized for the network (1.0: as it is).
    engine
        The inference engine that ran the network (``"torch"``, ``"openvino"``,
        ``"onnxruntime"``; see :mod:`napari_unet.engines`).
    """

    probabilities: np.ndarray | None
    labels: Any
    axes: str
    seconds: float
    postprocess_seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    scale: tuple[float, ...] | None = None
    diameter: float | None = None
    zoom: float = 1.0
    engine: str = "torch"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _round_up(n: int, d: int) -> int:
    return int(math.ceil(n / d) * d)


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
        if task == "semantic" and num_classes < 2:
            raise ValueError("a semantic model needs at least 2 classes (background + one)")
        out = 3 if task == "instance" else num_classes
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
        """Save weights (safetensors) and config (JSON) atomically; returns the path."""
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
        small = [s for a, s in zip(_CANON, canon.shape, strict=True) if a in "YX" and s < 1]
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
        """``(B, C, *tile) -> (B, K, *tile)`` probabilities on ``device`` by ``engine``, and the
        engine used (see :func:`napari_unet.engines.predictor`)."""
        fn, used = engines.predictor(self.net, device, engine, pixels=pixels, notes=notes)
        self._engine_used = used
        return fn

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
        image, axes = _stack_frames(image, axes)
        canon, axes = self._canonical(image, axes, channel)
        keep = [a for a in axes if a != "C"]
        out_shape = tuple(int(s) for a, s in zip(axes, image.shape, strict=True) if a != "C")
        scale_keep, spacing = _scale(scale, axes, keep)
        if labels_out is not None:
            if return_probabilities:
                raise ValueError(
                    "return_probabilities=True and labels_out cannot go together: with "
                    "labels_out the probabilities of the whole image are never kept"
                )
            _check_labels_out(labels_out, out_shape, self.task)
        keep_probs = labels_out is None if return_probabilities is None else return_probabilities
        dev = resolve_device(device)
        T, Z, C, Y, X = canon.shape
        k = self.net.out_channels
        nd = self.ndim
        tile = list(tile_shape) if tile_shape is not None else list(self.config["tile_shape"])
        if len(tile) != nd:
            raise ValueError(f"tile_shape {tuple(tile)} must have {nd} values for a {nd}D model")
        ov = self.config["overlap"] if overlap is None else overlap
        div = self.net.divisor
        spatial = (Y, X) if nd == 2 else (Z, Y, X)
        tile_eff = [min(t, _round_up(s, div)) for t, s in zip(tile, spatial, strict=True)]
        notes: list[str] = []
        if labels_out is None:
            _check_fits_in_memory(canon.shape, k, keep_probs, out_shape)
        if not isinstance(canon, np.ndarray):
            chunks = chunk_shape(canon)
            if chunks is not None:
                budget, enough = _cache_budget(canon, chunks, nd, tile_eff)
                if not enough:
                    notes.append(
                        "the blocks of the image needed at once do not fit in the memory "
                        "budget: some blocks are read more than once (rechunk the input with "
                        "fewer planes per block)"
                    )
                canon = BlockCache(canon, budget, chunks)
        lo, hi = self._intensity_range(canon)
        if batch_size is None:
            batch_size = self._auto_batch_size(dev, tile_eff)
        elif int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        engines.check_engine(engine)
        run = _Run(self, dev, int(batch_size), tile_eff, ov, notes)
        run.engine, run.pixels = engine, T * Z * Y * X
        run.balance = tile_shape is None
        planes = T * Z if nd == 2 else T
        per_plane = len(plan_tiles(spatial, run.tile_for(spatial), run.overlap(spatial), div))
        total = planes * per_plane + 1  # +1: post-processing
        transform = _normalizer(lo, hi, channel_axis=0, ndim=nd + 1)

        def source(t: int, z: int | None):
            if nd == 2:
                return canon[t, z] if isinstance(canon, np.ndarray) else _View(canon, (t, z))
            if isinstance(canon, np.ndarray):
                return canon[t].transpose(1, 0, 2, 3)
            return _View(canon, (t,), order=(1, 0, 2, 3))

        try:
            with thread_limit(num_threads if dev.type == "cpu" else None):
                if labels_out is None:
                    probs = np.zeros((k, T, Z, Y, X), np.float32)
                    done = 0
                    sizer = _Sizer(self, diameter, nd)
                    for t in range(T):
                        for z in _plane_order(Z if nd == 2 else 1):
                            out = probs[:, t, z] if nd == 2 else probs[:, t]
                            src = source(t, z if nd == 2 else None)
                            for d in sizer.tiles(run, src, out, transform, spatial):
                                yield done + int(d * per_plane), total
                            done += per_plane
                    t1 = time.perf_counter()
                    labels = self._postprocess(
                        probs, spacing, volume=lambda t: _signal(canon, lo, hi, t)
                    )
                    yield total, total
                    t2 = time.perf_counter()
                    labels = _from_tz(labels, keep)
                    probs_out = _from_tz(probs, keep, leading=1) if keep_probs else None
                    pp_s = t2 - t1
                else:
                    pp_s = 0.0
                    buf_shape = (Y, X) if nd == 2 else (Z, Y, X)
                    with _Buffers(k, buf_shape) as (pbuf, lbuf):
                        done, next_id = 0, 1
                        for t in range(T):
                            prev = None
                            for z in range(Z) if nd == 2 else [None]:
                                for d in run.tiles(source(t, z), pbuf, transform, spatial):
                                    yield done + int(d * per_plane), total
                                done += per_plane
                                t1 = time.perf_counter()
                                if self.task == "semantic":
                                    final = classes_from_probabilities(pbuf)
                                else:
                                    if nd == 3:
                                        sig = _signal(canon, lo, hi, t)
                                        self._instances_3d(pbuf, lbuf, spacing, sig)
                                    else:
                                        self._instances(pbuf, lbuf, spacing)
                                    linking = nd == 2 and Z > 1
                                    if linking:  # one slice at a time; the linker never chains
                                        if z == 0:
                                            prev = SliceLinker(start_id=next_id)
                                        final = prev(lbuf, _signal(canon, lo, hi, t, z))
                                        next_id = prev.next_id
                                    else:
                                        final, next_id = link_to_previous(
                                            None, lbuf, next_id, out=lbuf
                                        )
                                _write_labels(labels_out, final, keep, t, z)
                                pp_s += time.perf_counter() - t1
                    yield total, total
                    labels, probs_out = labels_out, None
        finally:
            _release(run.device)  # the GPU is not left full, whatever happened
        t2 = time.perf_counter()
        return Prediction(
            probs_out,
            labels,
            "".join(keep),
            t2 - t0,
            pp_s,
            str(run.device),
            notes,
            scale_keep,
            sizer.diameter if labels_out is None else None,
            sizer.zoom if labels_out is None else 1.0,
            run.engine_used,
        )

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

    def _instances(self, probs: np.ndarray, out: np.ndarray, spacing) -> np.ndarray:
        pp = self.config.get("postprocess", {})
        return instances_from_probabilities(
            probs,
            seed_threshold=pp.get("seed_threshold", 0.5),
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
                self._instances(probs[:, z], out[z], None)
                out[z] = linker(out[z], None if image is None else image[z])
            return out
        kw = {k: pp[k] for k in ("min_size", "min_seed_size") if pp.get(k) is not None}
        return instances_3d_from_stack(
            probs,
            spacing,
            image=image,
            seed_threshold=pp.get("seed_threshold", 0.5),
            foreground_threshold=pp.get("foreground_threshold", 0.5),
            out=out,
            **kw,
        )

    def _postprocess(self, probs: np.ndarray, spacing=None, volume=None) -> np.ndarray:
        """(K, T, Z, Y, X) probabilities -> (T, Z, Y, X) int32 labels, ids unique over T.

        ``volume(t)``, when given, is frame t's (Z, Y, X) intensities for the 3D assembly."""
        _, T, Z, Y, X = probs.shape
        labels = np.zeros((T, Z, Y, X), np.int32)
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


def _signal(canon: Any, lo: np.ndarray, hi: np.ndarray, t: int, z: int | None = None):
    """Normalised intensity, mean over channels, of frame ``t`` (Z, Y, X) or its slice ``z``."""
    x = np.array(canon[t] if z is None else canon[t, z], np.float32)  # (Z,) C, Y, X; a copy
    shape = [1] * x.ndim
    shape[x.ndim - 3] = -1
    x -= lo.reshape(shape)
    x /= np.maximum(hi - lo, 1e-6).reshape(shape)
    return x.mean(axis=x.ndim - 3)


def _normalizer(lo: np.ndarray, hi: np.ndarray, channel_axis: int, ndim: int):
    """Per-channel ``(x - lo) / (hi - lo)`` as float32 (a constant channel becomes 0).

    Inputs wider than float32 (float64 ...), or a range float32 cannot hold, are normalised
    in float64 and clipped to +-1e6 ranges before the cast, so a finite image never becomes
    inf or NaN on the way to the network.
    """
    shape = [1] * ndim
    shape[channel_axis] = -1
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    span = hi64 - lo64
    scale64 = np.where(span > 1e-6, 1.0 / np.maximum(span, 1e-6), 0.0)
    f32 = np.finfo(np.float32).max
    lo_b = np.clip(lo64, -f32, f32).astype(np.float32).reshape(shape)
    scale_b = scale64.astype(np.float32).reshape(shape)
    lo_w, scale_w = lo64.reshape(shape), scale64.reshape(shape)
    narrow_ok = bool(np.all(np.abs(lo64) < 1e30) and np.all(np.abs(hi64) < 1e30))

    def transform(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if narrow_ok and (x.dtype.kind not in "fc" or x.dtype.itemsize <= 4):
            x = x.astype(np.float32, copy=True)
            x -= lo_b
            x *= scale_b
            return x
        w = (x.astype(np.float64) - lo_w) * scale_w
        return np.clip(w, -1e6, 1e6, out=w).astype(np.float32)

    return transform


def _plane_order(n: int) -> list[int]:
    """Planes of a stack, the middle one first (the object size is measured on it)."""
    mid = n // 2
    return [mid] + [i for i in range(n) if i != mid]


class _Sizer:
    """Resizes the planes of one prediction so the objects come out at the model's diameter.

    The zoom is decided once, on the first plane predicted: from the ``diameter`` given, or
    from the objects of a first pass at the native size (:mod:`napari_unet.scale`).
    """

    def __init__(self, seg: Segmenter, diameter: float | None, nd: int):
        if diameter is not None and not (
            isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0
        ):
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
        self.model_d = seg.config.get("diameter")
        self.active = nd == 2 and seg.task == "instance" and bool(self.model_d)
        self.diameter = float(diameter) if diameter is not None else None
        self.zoom: float = 1.0
        self.decided = False
        self.refined = diameter is not None  # a diameter given is not second-guessed
        if self.active and self.diameter is not None:
            self.zoom, self.decided = rescale_factor(self.diameter, self.model_d), True

    def tiles(self, run, src, out: np.ndarray, transform, spatial) -> Generator[float, None, None]:
        """Predict one plane ``src`` (C, Y, X) into ``out`` (K, Y, X); yields progress 0..1."""
        if not self.active:
            yield from run.tiles(src, out, transform, spatial)
            return
        if not self.decided:
            # first pass at the native size; its foreground tells the objects' size
            for d in run.tiles(src, out, transform, spatial):
                yield 0.5 * d
            self.decided = True
            self.diameter = diameter_of_foreground(out[0] < 0.5)
            self.zoom = rescale_factor(self.diameter, self.model_d)
            if self.zoom == 1.0:
                yield 1.0
                return
        if self.zoom == 1.0:
            yield from run.tiles(src, out, transform, spatial)
            return
        plane = np.asarray(src[tuple(slice(None) for _ in range(3))], np.float32)
        small = zoomed_shape(spatial, self.zoom)
        buf = np.zeros((out.shape[0], *small), np.float32)
        for d in run.tiles(resize_image(plane, small), buf, transform, small):
            yield d
        if not self.refined and self.zoom < 1.0:
            # big objects were measured on a pass at the native size, where the network cuts
            # them into pieces: measure again at this size and shrink further if they are bigger
            self.refined = True
            again = diameter_of_foreground(buf[0] < 0.5)
            better = rescale_factor(again / self.zoom, self.model_d) if again else 1.0
            if better < 0.85 * self.zoom:
                self.diameter, self.zoom = again / self.zoom, better
                yield from self.tiles(run, src, out, transform, spatial)
                return
        out[...] = resize_image(buf, spatial)


def _from_tz(arr: np.ndarray, keep: list[str], leading: int = 0) -> np.ndarray:
    """(lead..., T, Z, Y, X) -> the user's spatial axes ``keep`` (subset of TZYX, any order)."""
    src = "TZYX"
    idx: list[Any] = [slice(None)] * leading
    present = []
    for a in src:
        if a in keep:
            idx.append(slice(None))
            present.append(a)
        else:
            idx.append(0)
    out = arr[tuple(idx)]
    order = list(range(leading)) + [leading + present.index(a) for a in keep]
    out = np.transpose(out, order)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------- prediction helpers

_MEMMAP_ABOVE = 1 << 30  # plane/volume buffers larger than this go to temporary files


def batch_for_memory(
    free_bytes: int,
    tile_shape: Sequence[int],
    base_channels: int,
    in_channels: int = 1,
    out_channels: int = 3,
    max_batch: int = 32,
) -> int:
    """Tiles per forward pass that fit in half of ``free_bytes`` of device memory.

    A conservative estimate of the activations of one tile: about ``12 * base_channels``
    float32 feature maps at full resolution (the encoder's skip connections plus the working
    maps of the widest level) and the input and output.
    """
    voxels = math.prod(int(t) for t in tile_shape)
    per_tile = 4 * voxels * (in_channels + 2 * out_channels + 12 * base_channels)
    return int(max(1, min(max_batch, (0.5 * free_bytes) // max(per_tile, 1))))


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _release(dev: torch.device) -> None:
    """Give cached device memory back (the GPU is not left full after a run)."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif dev.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            mps.empty_cache()


class _Run:
    """Device, predictor and tiling of one prediction; degrades them on out-of-memory errors.

    Order of retreat: half the batch (down to 1), then half the tiles (down to 128 pixels),
    then the CPU. Every step is recorded in ``notes`` and issued as a ``RuntimeWarning``.
    """

    def __init__(self, seg: Segmenter, dev, batch: int, tile: list[int], overlap: int, notes):
        self.seg = seg
        self.device = dev
        self.batch = batch
        self.tile = list(tile)
        self.tile0 = list(tile)
        self.ov = overlap
        self.notes = notes
        self.div = seg.net.divisor
        self.k = seg.net.out_channels
        self.engine, self.pixels = "torch", None
        self.balance = False  # True: tiles sized to each image (see tile_for)
        self.fn = None  # made at the first tile, under the prediction's thread limit
        self.engine_used = "torch"

    def tile_for(self, spatial: Sequence[int]) -> list[int]:
        """The tile for an image of ``spatial`` size. With ``balance`` (the model's default
        tile), the fewest tiles of at most 1/8 over the default that cover each axis, made as
        small as they can be: 2048 px take 4 tiles of 536 instead of 5 of 512 (1.10x the
        pixels through the network instead of 1.56x)."""
        if not self.balance:
            return list(self.tile)
        out = []
        for t, s in zip(self.tile, spatial, strict=True):
            ov = min(self.ov, t - self.div)
            if s <= t or ov < 0:
                out.append(t)
                continue
            big = _round_up(t + t // 8, self.div)
            n = max(1, math.ceil((s - ov) / (big - ov)))
            out.append(min(big, _round_up(math.ceil((s + (n - 1) * ov) / n), self.div)))
        return out

    def overlap(self, spatial: Sequence[int]) -> tuple[int, ...]:
        # one tile along an axis needs no overlap; otherwise keep step >= divisor
        return tuple(
            0 if t >= s else max(0, min(self.ov, t - self.div))
            for t, s in zip(self.tile_for(spatial), spatial, strict=True)
        )

    def tiles(self, src, out, transform, spatial) -> Generator[float, None, None]:
        """Predict ``src`` into ``out``; yields the fraction of tiles done."""
        if self.fn is None:
            self.fn = self.seg._predictor(self.device, self.engine, self.pixels, self.notes)
            self.engine_used = self.seg._engine_used
        while True:
            gen = tiled_inference(
                self.fn,
                src,
                out_channels=self.k,
                tile_shape=self.tile_for(spatial),
                overlap=self.overlap(spatial),
                batch_size=self.batch,
                divisor=self.div,
                transform=transform,
                out=out,
            )
            try:
                for d, n in gen:
                    yield d / n
                return
            except Exception as e:
                if not _is_oom(e):
                    raise
                gen.close()  # the tile reader thread stops before the retry starts
                self._retreat(e)
            finally:
                gen.close()

    def _retreat(self, error: BaseException) -> None:
        dev = self.device
        _release(dev)
        where = f"out of memory on {dev}"
        if self.batch > 1:
            new = self.batch // 2
            msg = f"{where} with {self.batch} tiles per batch: retrying with {new}"
            self.batch = new
        elif max(self.tile) >= 128:
            axis = int(np.argmax(self.tile))
            old = tuple(self.tile)
            self.tile[axis] = _round_up(self.tile[axis] // 2, self.div)
            msg = f"{where} with one {old} tile per batch: retrying with {tuple(self.tile)} tiles"
        elif dev.type != "cpu":
            cpu = torch.device("cpu")
            msg = (
                f"{where} even with one {tuple(self.tile)} tile per batch: continuing on the "
                "CPU (slower); close other programs using the GPU or use a smaller model"
            )
            self.device, self.fn = cpu, self.seg._predictor(cpu, self.engine, self.pixels)
            self.engine_used = self.seg._engine_used
            self.batch, self.tile = 2, list(self.tile0)
            _release(dev)
        else:
            raise MemoryError(
                f"out of memory on the CPU even with one {tuple(self.tile)} tile per batch "
                f"({error})"
            ) from error
        self.notes.append(msg)
        logger.warning("napari-unet: %s", msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


class _View:
    """``base[prefix]`` of a :class:`BlockCache`, axes permuted by ``order``, read lazily."""

    def __init__(self, base: BlockCache, prefix: tuple[int, ...], order=None):
        self.base, self.prefix, self.order = base, prefix, order
        rest = base.shape[len(prefix) :]
        self.shape = tuple(rest[i] for i in order) if order else tuple(rest)
        self.dtype = base.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        if self.order is None:
            return self.base[self.prefix + key]
        base_key: list[Any] = [None] * self.ndim
        for i, o in enumerate(self.order):
            base_key[o] = key[i]
        return self.base[self.prefix + tuple(base_key)].transpose(self.order)


class _Buffers:
    """Probability and label buffers of one plane/volume; temporary files when very large."""

    def __init__(self, k: int, shape: tuple[int, ...]):
        self.k, self.shape, self.dir = k, shape, None

    def __enter__(self):
        n = math.prod(self.shape)
        if n * (4 * self.k + 4) <= _MEMMAP_ABOVE:
            return np.zeros((self.k, *self.shape), np.float32), np.zeros(self.shape, np.int32)
        self.dir = tempfile.mkdtemp(prefix="napari-unet-")
        p = np.lib.format.open_memmap(
            os.path.join(self.dir, "p.npy"), "w+", np.float32, (self.k, *self.shape)
        )
        lab = np.lib.format.open_memmap(os.path.join(self.dir, "l.npy"), "w+", np.int32, self.shape)
        return p, lab

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _write_labels(out: Any, final: np.ndarray, keep: list[str], t: int, z: int | None) -> None:
    """Write one plane (Y, X) or volume (Z, Y, X) of labels into ``out`` (axes ``keep``)."""
    names = "YX" if final.ndim == 2 else "ZYX"
    index: list[Any] = []
    rest: list[str] = []
    for a in keep:
        if a == "T":
            index.append(t)
        elif a == "Z" and z is not None:
            index.append(z)
        else:
            index.append(slice(None))
            rest.append(a)
    perm = [names.index(a) for a in rest]
    if perm != sorted(perm):
        final = final.transpose(perm)
    out[tuple(index)] = final.astype(np.dtype(out.dtype), copy=False)


def _check_labels_out(out: Any, shape: tuple[int, ...], task: str) -> None:
    """``labels_out`` must be a writable integer array of the labels' shape (checked up front)."""
    if type(out).__module__.split(".")[0] == "dask":
        raise ValueError(
            "labels_out is a dask array, which cannot be written into; give a numpy array, an "
            "np.memmap or a zarr array opened for writing"
        )
    if not hasattr(out, "shape") or not hasattr(out, "__setitem__"):
        raise ValueError(
            f"labels_out must be a writable array (numpy, np.memmap, zarr), not {type(out)!r}"
        )
    store = getattr(out, "store", None)
    if getattr(out, "read_only", False) or getattr(store, "read_only", False):
        raise ValueError(
            "labels_out is read-only (a zarr store opened with mode='r'?): open it with "
            "mode='r+' or 'a', or create one with zarr.open_array(path, mode='w', "
            f"shape={shape}, dtype='int32')"
        )
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("labels_out is a read-only numpy array; give a writable one")
    if tuple(int(s) for s in out.shape) != tuple(shape):
        raise ValueError(
            f"labels_out has shape {tuple(out.shape)} but the labels of this image have shape "
            f"{tuple(shape)} (the image's shape without its channel axis)"
        )
    dt = np.dtype(out.dtype)
    if dt.kind not in "iu":
        raise ValueError(f"labels_out has dtype {dt}; labels need an integer dtype (int32)")
    if task == "instance" and dt.itemsize < 4:
        raise ValueError(f"labels_out has dtype {dt}, too small for instance ids; use int32")


def _available_memory() -> int | None:
    """Bytes of RAM available to this process now (psutil, /proc/meminfo or sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _check_fits_in_memory(
    canon_shape: tuple[int, ...], k: int, keep_probs: bool, out_shape: tuple[int, ...]
) -> None:
    """Refuse an in-memory prediction whose probabilities and labels would not fit in RAM."""
    T, Z, _, Y, X = canon_shape
    voxels = T * Z * Y * X
    # probabilities, labels, and the watershed's work arrays (elevation, markers, mask ...)
    need = voxels * (4 * k + 4 + 24)
    avail = _available_memory()
    if avail is None or need <= 0.8 * avail:
        return
    raise ValueError(
        f"predicting this image (labels shape {out_shape}) in memory needs about {_gb(need)} "
        f"but only {_gb(avail)} are available; pass labels_out=... (e.g. a zarr array on disk: "
        f"zarr.open_array('labels.zarr', mode='w', shape={out_shape}, dtype='int32', "
        f"chunks=...)) to predict it plane by plane without holding the probabilities"
    )


def _cache_budget(canon: Any, chunks: tuple[int, ...], nd: int, tile: Sequence[int]):
    """Bytes of blocks to cache so that each block of a lazy input is read once.

    Returns ``(budget, enough)``; ``enough`` is False when the blocks needed at once exceed a
    quarter of the available memory (the budget is then capped and some blocks are re-read).
    """
    T, Z, C, Y, X = canon.shape
    ct, cz, cc, cy, cx = chunks
    item = np.dtype(canon.dtype).itemsize
    plane = _round_up(C, cc) * _round_up(Y, cy) * _round_up(X, cx) * item
    if nd == 2:
        if ct > 1 and T > 1:  # a block spans frames: keep whole frames of every plane
            need = min(ct, T) * Z * plane
        elif cz > 1 and Z > 1:  # a block spans slices: keep a slab of slices
            need = min(cz, Z) * plane
        else:  # one plane per block: keep a band of block rows under the tile rows
            rows = min(_round_up(Y, cy), (math.ceil(tile[0] / cy) + 2) * cy)
            need = plane * rows // _round_up(Y, cy)
    else:
        zs = min(_round_up(Z, cz), (math.ceil(tile[0] / cz) + 2) * cz)
        need = min(ct, T) * zs * plane
    need = int(need * 1.25) + 16 * math.prod(chunks) * item  # + the intensity sample
    avail = _available_memory() or 8 * 2**30
    cap = max(256 * 2**20, avail // 4)
    if need > cap:
        return cap, False
    return max(need, 64 * 2**20), True


def _block_sample_range(
    cache: BlockCache, c: int, low: float, high: float, max_blocks: int = 16
) -> tuple[float, float]:
    """Percentile range of channel ``c`` from up to ``max_blocks`` whole blocks, evenly spread.

    Reading whole blocks (through the cache the prediction then reads from) instead of a
    strided sample keeps each block read once; a strided sample would touch every block.
    """
    ct, cz, cc, cy, cx = cache.chunks
    T, Z, _, Y, X = cache.shape
    grid = (math.ceil(T / ct), math.ceil(Z / cz), math.ceil(Y / cy), math.ceil(X / cx))
    n = math.prod(grid)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_blocks)).round().astype(np.int64))
    values = []
    for f in picks:
        t, z, y, x = (int(v) for v in np.unravel_index(int(f), grid))
        key = (
            slice(t * ct, (t + 1) * ct),
            slice(z * cz, (z + 1) * cz),
            c,
            slice(y * cy, (y + 1) * cy),
            slice(x * cx, (x + 1) * cx),
        )
        values.append(cache[key].reshape(-1))
    return data.percentile_range(np.concatenate(values), low, high)


def _stack_frames(image: Any, axes: str | None) -> tuple[Any, str | None]:
    """A list of frames becomes one array with a new leading axis; frames must share a shape.

    ``axes`` may name the axes of one frame (``"T"`` is then prepended) or of the stack.
    """
    if not isinstance(image, (list, tuple)) or not image:
        return image, axes
    if not all(hasattr(f, "shape") and hasattr(f, "dtype") for f in image):
        return image, axes
    shape0 = tuple(int(s) for s in image[0].shape)
    for i, f in enumerate(image):
        if tuple(int(s) for s in f.shape) != shape0:
            raise ValueError(
                f"frame {i} has shape {tuple(f.shape)} but frame 0 has shape {shape0}: all "
                "frames of a time series must have the same shape (crop or pad them first)"
            )
    if axes is not None and len(axes.strip()) == len(shape0):
        if "T" in axes.upper():
            raise ValueError(
                f"axes {axes!r} already have a T axis; a list of frames is stacked along a new "
                "first axis (T): give the axes of one frame, e.g. 'YX'"
            )
        axes = "T" + axes.strip()
    if all(isinstance(f, np.ndarray) for f in image):
        return np.stack(image), axes
    import dask.array as da

    lazy = [
        f
        if type(f).__module__.split(".")[0] == "dask"
        else da.from_array(f, chunks=chunk_shape(f) or "auto")
        for f in image
    ]
    return da.stack(lazy), axes


def _scale(scale: Sequence[float] | None, axes: str, keep: list[str]):
    """Validate ``scale``; returns (scale per axis of the labels, (Z, Y, X) spacing) or Nones."""
    if scale is None:
        return None, None
    try:
        vals = [float(v) for v in scale]
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a sequence of numbers, got {scale!r}") from None
    if len(vals) == len(axes) and len(axes) != len(keep):
        vals = [v for a, v in zip(axes, vals, strict=True) if a != "C"]
    if len(vals) != len(keep):
        raise ValueError(
            f"scale has {len(vals)} value(s) but the image has {len(keep)} axes "
            f"{''.join(keep)!r} besides channels: give one physical size per axis, e.g. a "
            "napari layer's scale"
        )
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"scale values must be positive and finite, got {tuple(vals)}")
    d = dict(zip(keep, vals, strict=True))
    return tuple(vals), (d.get("Z", 1.0), d["Y"], d["X"])
