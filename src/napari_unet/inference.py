"""The machinery of one prediction, under :meth:`Segmenter.predict_iter`.

* :class:`_Run`: device, predictor and tile size of one prediction; on an out-of-memory error
  it retreats (half the batch, half the tiles, then the CPU) and says so in the notes.
* :class:`_Sizer`: resizes each 2D plane so its objects have the model's trained diameter.
* :class:`_View`, :class:`_Buffers`: lazy planes of a block-cached input; plane/volume buffers
  of the streaming path (``labels_out``), in memory or in temporary files.
* Input preparation: normalisation (:func:`_normalizer`), frames stacked (:func:`_stack_frames`),
  the ``scale`` checked (:func:`_scale`), memory checks and the block-cache budget.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _memory, data
from .normalize import float32_keeps, inverse_span
from .scale import (
    NEAR,
    densest_window,
    diameter_of_foreground,
    rescale_factor,
    resize_image,
    zoomed_shape,
)
from .tiling import BlockCache, _plan, chunk_shape, plan_tiles, tiled_inference

if TYPE_CHECKING:
    from .segmenter import Segmenter

logger = logging.getLogger("napari_unet.segmenter")


def _round_up(n: int, d: int) -> int:
    return int(math.ceil(n / d) * d)


def _signal(canon: Any, lo: np.ndarray, hi: np.ndarray, t: int, z: int | None = None):
    """Normalised intensity, mean over channels, of frame ``t`` (Z, Y, X) or its slice ``z``."""
    inv = inverse_span(lo, hi)  # 0 for a flat channel
    narrow = bool(np.all(inv < 1e30))  # else float32 would lose the values (under 1e-30)
    x = np.array(canon[t] if z is None else canon[t, z], np.float32 if narrow else np.float64)
    shape = [1] * x.ndim  # x: (Z,) C, Y, X; a copy
    shape[x.ndim - 3] = -1
    x -= lo.reshape(shape)
    x *= inv.astype(x.dtype).reshape(shape)
    return x.mean(axis=x.ndim - 3).astype(np.float32, copy=False)


def _normalizer(lo: np.ndarray, hi: np.ndarray, channel_axis: int, ndim: int):
    """Per-channel ``(x - lo) / (hi - lo)`` as float32 (a constant channel becomes 0).

    Inputs wider than float32 (float64 ...), or a range float32 cannot hold, are normalised
    in float64 and clipped to +-1e6 ranges before the cast, so a finite image never becomes
    inf or NaN on the way to the network.
    """
    shape = [1] * ndim
    shape[channel_axis] = -1
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale64 = inverse_span(lo64, hi64)  # 0 for a flat (constant) channel
    f32 = np.finfo(np.float32).max
    lo_b = np.clip(lo64, -f32, f32).astype(np.float32).reshape(shape)
    scale_b = np.clip(scale64, 0, f32).astype(np.float32).reshape(shape)
    lo_w, scale_w = (lo64 * 0.5).reshape(shape), (scale64 * 2.0).reshape(shape)
    narrow: dict = {}  # dtype -> whether float32 keeps its signal (normalize.float32_keeps)

    def transform(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        ok = narrow.get(x.dtype)
        if ok is None:
            ok = narrow[x.dtype] = float32_keeps(x.dtype, lo64, hi64, scale64)
        if ok:
            x = x.astype(np.float32, copy=True)
            x -= lo_b
            x *= scale_b
            return x
        w = (x.astype(np.float64) * 0.5 - lo_w) * scale_w  # halves: a finite x never gives inf
        return np.clip(w, -1e6, 1e6, out=w).astype(np.float32)

    return transform


def _as_float32(x: np.ndarray) -> np.ndarray:
    """The transform of a plane that is normalised already."""
    return np.array(x, np.float32)  # a copy, as the normaliser gives


def _plane_order(n: int) -> list[int]:
    """Planes of a stack, the middle one first (the object size is measured on it)."""
    mid = n // 2
    return [mid] + [i for i in range(n) if i != mid]


class _Sizer:
    """Resizes the planes of one prediction so the objects come out at the model's diameter.

    The zoom is decided once, on the first plane predicted: from the ``diameter`` given, the
    ``zoom`` given (a volume round's ``volume_zoom``), or
    from the objects of a first pass at the native size (:mod:`napari_unet.scale`).
    """

    def __init__(self, seg: Segmenter, diameter: float | None, nd: int, zoom=None, volume=False):
        if diameter is not None and not (
            isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0
        ):
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
        self.model_d = seg.config.get("diameter")
        # see safeguard.size_bias; volumes have their own (config["volume_size_bias"]): the
        # 2D one on the ovule zoomed its middle plane 0.71 instead of 0.60 and lost 0.750 ->
        # 0.737, while on 17 generated volumes their middle plane measured as it is gave a
        # zoom too small (mean F1 0.537; 0.561 with 1.25, docs/benchmarks.md)
        key = "volume_size_bias" if volume else "size_bias"
        self.bias = float(seg.config.get(key) or 1.0)
        self.active = nd == 2 and seg.task == "instance" and bool(self.model_d)
        self.diameter = float(diameter) if diameter is not None else None
        self.zoom: float = 1.0
        self.decided = False
        # a diameter given is not second-guessed; else up to REFINE_STEPS looks after a shrink
        self.refine_left = 0 if diameter is not None else REFINE_STEPS
        if self.active and self.diameter is not None:
            self.zoom, self.decided = rescale_factor(self.diameter, self.model_d), True
        elif self.active and zoom is not None:  # the zoom a volume round trained at
            self.zoom, self.decided, self.refine_left = float(zoom), True, 0
            self.diameter = float(self.model_d) / self.zoom

    def _measured(self, foreground: np.ndarray) -> float | None:
        """The objects' diameter from the model's foreground, less the model's size bias."""
        d = diameter_of_foreground(foreground)
        return d / self.bias if d else d

    def _coarse_look(self, run, src, fg: np.ndarray, classes: int, transform) -> float | None:
        """The objects' diameter seen at half size and below, when it says the native pass cut
        big objects into pieces; else None.

        A network trained at one size finds pieces of about that size inside nuclei many times
        bigger, so the native pass alone measures 11-32 px for nuclei of 70-280 px (DSB2018
        images enlarged 3x: F1 0.28). Only when no shrink is decided (a shrink is followed by
        measurements at the new size, :data:`REFINE_STEPS`). One window of at most 1 Mpx
        (the densest of the native foreground ``fg``) is predicted again at half size: objects
        measured there more than :data:`COARSE_JUMP` times bigger than at the native size mean
        pieces, and the window is halved again until the diameter stops growing by more than
        :data:`COARSE_STABLE`. On the 13 DSB2018 images at their own size the half-size
        diameter was at most 1.46x the native one; enlarged 3x, 2.9-10.7x for the nuclei over
        70 px.
        """
        if self.diameter is not None and self.diameter > NEAR * self.model_d:
            return None  # a shrink is decided: the looks after it (REFINE_STEPS) measure again
        if self.diameter is not None and self.diameter < COARSE_FROM * self.model_d:
            # small nuclei: at half size the network draws its own blobs around them (DSB2018
            # f4c4 at 0.6x, 7 px nuclei: 94 px measured); pieces of big nuclei come out at
            # about the trained size (11-25 px for 18 px in the images enlarged 3x)
            return None
        win = densest_window(fg, 1 << 20)
        crop = transform(np.asarray(src[(slice(None), *win)]))
        z, found = 1.0, None
        while True:
            z *= 0.5
            small = zoomed_shape(crop.shape[1:], z)
            if min(small) < 64:
                return None  # never confirmed by a second, coarser look
            buf = _memory.zeros((classes, *small), np.float32)
            for _ in run.tiles(resize_image(crop, small), buf, _as_float32, small):
                pass
            d = self._measured(buf[0] < 0.5)
            if d is None:
                return None
            d /= z
            if found is None:
                if self.diameter is not None and d <= COARSE_JUMP * self.diameter:
                    return None  # the same size at half size: the native pass was right
            elif d <= COARSE_STABLE * found:
                return found  # stopped growing: the objects' size
            found = d

    def tiles(self, run, src, out: np.ndarray, transform, spatial) -> Generator[float, None, None]:
        """Predict one plane ``src`` (C, Y, X) into ``out`` (K, Y, X); yields progress 0..1
        that never goes back: each pass after the first (the resized one, the looks after a
        shrink) fills what is left of the bar."""
        base = shown = last = 0.0
        for d in self._passes(run, src, out, transform, spatial):
            if d < last:  # a new pass began
                base = shown
            last = d
            shown = max(shown, base + (1.0 - base) * d)
            yield shown

    def _passes(self, run, src, out, transform, spatial) -> Generator[float, None, None]:
        """:meth:`tiles`, with each pass's own progress 0..1 (the first pass's 0..0.5)."""
        if not self.active:
            yield from run.tiles(src, out, transform, spatial)
            return
        if not self.decided:
            # first pass at the native size; its foreground tells the objects' size
            fg = None
            look = math.prod(spatial) >= 2 * EARLY_PIXELS
            gen = run.tiles(src, out, transform, spatial)
            for d in gen:
                yield 0.5 * d
                rows = _final_rows(run, spatial, d) if look else 0
                if rows * spatial[1] >= EARLY_PIXELS:
                    look = False  # one look, at the first rows no tile will change again
                    early = out[0, :rows] < 0.5
                    measured = self._measured(early)
                    # only a shrink: nuclei measured small may be pieces of big ones, which
                    # the look at half size (_coarse_look) tells after the whole pass (DSB2018
                    # ad9d enlarged 3x: its first rows measured 9.8 px, and the whole pass
                    # 11.0 at half resolution, which the look found to be 94 px nuclei)
                    if measured and rescale_factor(measured, self.model_d) < 1.0:
                        gen.close()  # to be shrunk: the rest of this pass would be thrown away
                        fg, self.diameter = early, measured
                        break
            self.decided = True
            if fg is None:
                fg = out[0] < 0.5
                self.diameter = self._measured(fg)
            bigger = self._coarse_look(run, src, fg, out.shape[0], transform)
            del fg
            if bigger is not None:
                self.diameter = bigger
            self.zoom = rescale_factor(self.diameter, self.model_d)
            if self.zoom == 1.0:
                yield 1.0
                return
        if self.zoom == 1.0:
            yield from run.tiles(src, out, transform, spatial)
            return
        # normalised before the resizing (both are linear): a raw plane beyond float32's range
        # (float64 x 1e300) would overflow to inf in a float32 resize
        plane = transform(np.asarray(src[tuple(slice(None) for _ in range(3))]))
        small = zoomed_shape(spatial, self.zoom)
        buf = _memory.zeros((out.shape[0], *small), np.float32)
        for d in run.tiles(resize_image(plane, small), buf, _as_float32, small):
            yield d
        if self.refine_left > 0 and self.zoom < 1.0:
            # big objects were measured on a pass at the native size, where the network cuts
            # them into pieces: measure again at this size and shrink further if they are
            # bigger, again while they keep growing (at most REFINE_STEPS times)
            self.refine_left -= 1
            again = self._measured(buf[0] < 0.5)
            better = rescale_factor(again / self.zoom, self.model_d) if again else 1.0
            if better < 0.85 * self.zoom:
                self.diameter, self.zoom = again / self.zoom, better
                yield from self._passes(run, src, out, transform, spatial)
                return
        out[...] = resize_image(buf, spatial)


#: A first pass over an image of at least twice this many pixels measures the objects once its
#: first rows of at least this many pixels are final; when they call for a shrink, the rest of
#: the pass is not predicted (see :func:`_final_rows`).
EARLY_PIXELS = 1 << 19


def _final_rows(run: _Run, spatial: Sequence[int], done: float) -> int:
    """The rows of a plane's output that no tile changes any more once the fraction ``done``
    of its tiles is predicted (the tiles run row of tiles after row of tiles)."""
    ys, xs = _plan(spatial, run.tile_for(spatial), run.overlap(spatial), run.div)
    full = round(done * len(ys.starts) * len(xs.starts)) // len(xs.starts)
    return spatial[0] if full >= len(ys.starts) else ys.starts[full]


#: The half-size look (:meth:`_Sizer._coarse_look`) takes over when it measures objects this
#: many times bigger than the native pass, and goes on halving while they still grow this much.
COARSE_JUMP, COARSE_STABLE = 2.0, 1.5
#: ... and only looks when the native pass measured at least this fraction of the trained size.
COARSE_FROM = 0.6
#: Looks again after each shrink, while the objects measured keep growing, at most this often.
REFINE_STEPS = 4


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

    def __init__(
        self, seg: Segmenter, dev, batch: int, tile: list[int], overlap: int, notes, *,
        engine: str = "torch", pixels: int | None = None, balance: bool = False,
    ):  # fmt: skip
        self.seg = seg
        self.device = dev
        self.batch = batch
        self.tile = list(tile)
        self.tile0 = list(tile)
        self.ov = overlap
        self.notes = notes
        self.div = seg.net.divisor
        self.k = seg.net.out_channels
        self.engine, self.pixels = engine, pixels
        self.balance = balance  # True: tiles sized to each image (see tile_for)
        self.fn = None  # made at the first tile, under the prediction's thread limit

    @property
    def engine_used(self) -> str:
        """The engine that ran the last tiles (torch after a fallback)."""
        return getattr(self.fn, "engine", "torch")

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
            return _memory.zeros((self.k, *self.shape), np.float32), _memory.zeros(
                self.shape, np.int32
            )
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


def _same_array(a: Any, b: Any) -> bool:
    """Whether writing into ``b`` would write into ``a``: numpy arrays sharing memory, or zarr
    arrays at the same place of the same store."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    sa, sb = getattr(a, "store_path", None), getattr(b, "store_path", None)
    if sa is not None and sb is not None:
        try:
            return bool(sa == sb)
        except Exception:  # noqa: BLE001 - a store that cannot compare is another store
            return False
    return a is b


def _check_labels_out(out: Any, shape: tuple[int, ...], task: str, image: Any = None) -> None:
    """``labels_out`` must be a writable integer array of the labels' shape (checked up front),
    and not the image itself (the labels were written over it)."""
    if image is not None and _same_array(image, out):
        raise ValueError(
            "labels_out is the image itself (or shares its memory or zarr store): the labels "
            "would be written over it; give a separate array"
        )
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
    sizes = {a: d[a] for a in "ZYX" if a in d}
    ratio = max(sizes.values()) / min(sizes.values())
    if ratio > MAX_ANISOTROPY:
        sides = ", ".join(f"{a} {v:g}" for a, v in sizes.items())
        raise ValueError(
            f"scale {tuple(vals)} makes one voxel side {ratio:.3g} times another ({sides}): "
            "more than "
            f"{MAX_ANISOTROPY:g}x is taken for a unit mix-up (Z in um and Y/X in nm?); give every "
            "axis in the same unit"
        )
    return tuple(vals), (d.get("Z", 1.0), d["Y"], d["X"])


#: the largest ratio of voxel sides ``scale`` may give (1e-6 in Z hung the 3D assembly, 1000
#: in Y/X found nothing, without a word); light-sheet and FIB-SEM stacks stay well under it
MAX_ANISOTROPY = 100.0


@dataclass
class _Job:
    """What one prediction settled before its first tile (see ``Segmenter._plan``)."""

    canon: Any  # (T, Z, C, Y, X): numpy, or a BlockCache over a lazy array
    keep: list[str]  # the labels' axes, in the input's order
    scale_keep: tuple[float, ...] | None
    spacing: tuple[float, float, float] | None
    run: _Run
    spatial: tuple[int, ...]  # (Y, X) for a 2D model, (Z, Y, X) for a 3D one
    lo: np.ndarray
    hi: np.ndarray
    nd: int
    notes: list[str]
    transform: Any = field(init=False)
    per_plane: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        T, Z = self.canon.shape[:2]
        self.transform = _normalizer(self.lo, self.hi, channel_axis=0, ndim=self.nd + 1)
        sp = self.spatial
        div = self.run.div
        self.per_plane = len(plan_tiles(sp, self.run.tile_for(sp), self.run.overlap(sp), div))
        planes = T * Z if self.nd == 2 else T
        self.total = planes * self.per_plane + 1  # +1: post-processing

    def source(self, t: int, z: int | None):
        """Plane ``(t, z)`` (C, Y, X) of a 2D model, or volume ``t`` (C, Z, Y, X) of a 3D one."""
        canon = self.canon
        if self.nd == 2:
            return canon[t, z] if isinstance(canon, np.ndarray) else _View(canon, (t, z))
        if isinstance(canon, np.ndarray):
            return canon[t].transpose(1, 0, 2, 3)
        return _View(canon, (t,), order=(1, 0, 2, 3))

    def signal(self, t: int, z: int | None = None) -> np.ndarray:
        """Normalised intensities of frame ``t`` (or its slice ``z``), for the 3D assembly."""
        return _signal(self.canon, self.lo, self.hi, t, z)


def _block_cached(canon: Any, nd: int, tile: Sequence[int], notes: list[str]) -> Any:
    """A lazy chunked input behind a :class:`BlockCache` sized for the tiles (numpy as is)."""
    if isinstance(canon, np.ndarray):
        return canon
    chunks = chunk_shape(canon)
    if chunks is None:
        return canon
    budget, enough = _cache_budget(canon, chunks, nd, tile)
    if not enough:
        notes.append(
            "the blocks of the image needed at once do not fit in the memory budget: some "
            "blocks are read more than once (rechunk the input with fewer planes per block)"
        )
    return BlockCache(canon, budget, chunks)
