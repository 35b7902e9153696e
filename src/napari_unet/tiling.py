"""Tiled, blended inference for images of any size.

The network itself is unknown to this module: the caller passes a ``predict_fn`` that maps a
float32 batch ``(B, C, *tile_shape)`` to ``(B, out_channels, *tile_shape)``. The image is read
tile by tile (numpy, dask, zarr or any array-like with numpy-style slicing), so it never has to
fit in memory, and the prediction is accumulated on the CPU into ``out``.

Design
------
* **Tile grid.** Along each spatial axis tiles start at multiples of ``divisor`` (the U-Net is
  only translation-equivariant for shifts that are multiples of ``2**depth``), the step is
  ``tile - overlap`` rounded down to a multiple of ``divisor`` and the last tile is shifted back
  so that it ends exactly at the image border. The grid is the Cartesian product of the per-axis
  tile positions. An axis shorter than the tile gets one tile, padded up to a multiple of
  ``divisor`` and cropped back afterwards.
* **Blending.** Each tile is weighted by the outer product of 1D windows. On a side shared with
  a neighbouring tile (actual overlap ``ov``) the window is 0 over the outer ``ov // 4`` pixels
  (they are corrupted by the zero padding inside the network), rises with a raised cosine over
  the next ``~ov / 2`` pixels and is 1 beyond; a side on the image border has weight 1 up to the
  edge. The two ramps of a pair of neighbours are mirror images and sum to exactly 1.
* **No weight map.** Because the grid is a product grid and the windows are separable, the sum
  of weights at a pixel is the product over axes of 1D sums. These 1D sums are precomputed and
  each tile's window is normalised by them, so ``out`` holds final values as soon as every tile
  covering a pixel has been added. Working memory is ``O(batch_size * tile size)``.
* **Prefetch.** The next batch is read and transformed in a background thread while
  ``predict_fn`` runs on the current one. Closing the generator stops the reader and joins the
  thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _memory
from .blockcache import BlockCache, chunk_shape  # noqa: F401 - re-exported (old home)

__all__ = [
    "BlockCache",
    "Cancelled",
    "chunk_shape",
    "plan_tiles",
    "tiled_inference",
    "predict_tiled",
]

_PAD_MODES = ("reflect", "symmetric", "edge", "constant", "wrap")


class Cancelled(Exception):
    """Raised inside the generator when the caller asked to stop."""


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisPlan:
    """Tile layout along one spatial axis.

    Attributes
    ----------
    size : int
        Image size along the axis.
    tile : int
        Size of the tile fed to the network along the axis (a multiple of ``divisor``).
    starts : tuple of int
        Tile start positions, increasing.
    lengths : tuple of int
        Number of valid (in-image) pixels of each tile: ``tile`` or ``size`` if the axis is
        shorter than the tile (the remainder is padding).
    """

    size: int
    tile: int
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(s + n for s, n in zip(self.starts, self.lengths, strict=True))


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    try:
        values = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints") from None
    if len(values) != ndim:
        raise ValueError(
            f"{name} has {len(values)} values but the image has {ndim} spatial dimensions"
        )
    return values


def _validate_grid(
    spatial_shape: Sequence[int],
    tile_shape: int | Sequence[int],
    overlap: int | Sequence[int],
    divisor: int,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """Check and normalise grid parameters; tile sizes are rounded down to ``divisor``."""
    shape = tuple(int(s) for s in spatial_shape)
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("the image needs at least one spatial dimension")
    if any(s < 1 for s in shape):
        raise ValueError(f"the image is empty: spatial shape {shape}")
    divisor = int(divisor)
    if divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    tiles = _as_tuple(tile_shape, ndim, "tile_shape")
    overlaps = _as_tuple(overlap, ndim, "overlap")
    for t in tiles:
        if t < divisor:
            raise ValueError(f"tile size {t} is smaller than the divisor {divisor}")
    tiles = tuple((t // divisor) * divisor for t in tiles)
    for t, o in zip(tiles, overlaps, strict=True):
        if o < 0:
            raise ValueError(f"overlap must not be negative, got {o}")
        if o >= t:
            raise ValueError(f"tile size {t} must be larger than the overlap {o}")
        if t - o < divisor:
            raise ValueError(
                f"tile size {t} minus overlap {o} must be at least the divisor {divisor}"
            )
    return shape, tiles, overlaps, divisor


def _plan_axis(size: int, tile: int, overlap: int, divisor: int) -> _AxisPlan:
    """Tile positions along one axis (arguments already validated)."""
    if size <= tile:
        # One tile, padded at the end up to a multiple of the divisor.
        padded = -(-size // divisor) * divisor
        return _AxisPlan(size, padded, (0,), (size,))
    step = ((tile - overlap) // divisor) * divisor
    starts = list(range(0, size - tile, step))  # every start with start + tile < size
    starts.append(size - tile)  # last tile flush with the border
    return _AxisPlan(size, tile, tuple(starts), (tile,) * len(starts))


def _plan(
    spatial_shape: Sequence[int],
    tile_shape: int | Sequence[int],
    overlap: int | Sequence[int],
    divisor: int,
) -> list[_AxisPlan]:
    shape, tiles, overlaps, divisor = _validate_grid(spatial_shape, tile_shape, overlap, divisor)
    return [_plan_axis(n, t, o, divisor) for n, t, o in zip(shape, tiles, overlaps, strict=True)]


def plan_tiles(
    spatial_shape: Sequence[int],
    tile_shape: int | Sequence[int],
    overlap: int | Sequence[int],
    divisor: int = 1,
) -> list[tuple[slice, ...]]:
    """Regions of the image covered by each tile.

    Parameters
    ----------
    spatial_shape : sequence of int
        Spatial shape of the image, ``(Y, X)`` or ``(Z, Y, X)``.
    tile_shape : int or sequence of int
        Requested tile size per spatial axis; rounded down to a multiple of ``divisor``.
    overlap : int or sequence of int
        Minimum overlap between neighbouring tiles, in pixels, per axis.
    divisor : int, optional
        Tile sizes and tile starts are multiples of ``divisor`` (the start of the last tile
        along an axis is not when the image size along that axis is not a multiple).

    Returns
    -------
    list of tuple of slice
        One tuple of ``len(spatial_shape)`` slices per tile, in C order of the tile grid.
        Slices never extend past the image; along an axis shorter than the tile the slice is
        the whole axis (the tile is padded during inference).

    Raises
    ------
    ValueError
        If the arguments are inconsistent (overlap not smaller than the tile, ...).
    """
    axes = _plan(spatial_shape, tile_shape, overlap, divisor)
    per_axis = [[slice(s, e) for s, e in zip(ax.starts, ax.stops, strict=True)] for ax in axes]
    return [tuple(combo) for combo in itertools.product(*per_axis)]


# --------------------------------------------------------------------------------------------
# blending windows
# --------------------------------------------------------------------------------------------


def _ramp(length: int) -> np.ndarray:
    """Raised-cosine ramp rising from ~0 to ~1, shape ``(length,)``.

    ``ramp[j] + ramp[length - 1 - j] == 1`` so mirrored ramps of two neighbours sum to one.
    """
    j = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (j + 0.5) / max(length, 1))


def _side_profile(overlap: int) -> tuple[int, int]:
    """Zero band and ramp length for a side shared with a neighbour overlapping by ``overlap``."""
    zero = overlap // 4
    return zero, overlap - 2 * zero


def _axis_windows(ax: _AxisPlan) -> list[np.ndarray]:
    """Normalised 1D blending windows for every tile along one axis.

    Returns
    -------
    list of ndarray
        ``windows[i]`` has shape ``(ax.lengths[i],)``, float64. Summed over the tiles covering a
        pixel the windows give exactly one (up to rounding).
    """
    starts, stops = ax.starts, ax.stops
    count = len(starts)
    raw = []
    for i in range(count):
        length = ax.lengths[i]
        w = np.ones(length, dtype=np.float64)
        if i > 0:  # left neighbour: zero band, then rising ramp
            zero, ramp = _side_profile(stops[i - 1] - starts[i])
            w[:zero] = 0.0
            w[zero : zero + ramp] *= _ramp(ramp)
        if i < count - 1:  # right neighbour: falling ramp, then zero band
            zero, ramp = _side_profile(stops[i] - starts[i + 1])
            w[length - zero - ramp : length - zero] *= _ramp(ramp)[::-1]
            w[length - zero :] = 0.0
        raw.append(w)

    total = np.zeros(ax.size, dtype=np.float64)
    for s, e, w in zip(starts, stops, raw, strict=True):
        total[s:e] += w
    bad = total <= 1e-6
    if bad.any():  # pragma: no cover - cannot happen with a valid plan; plain averaging
        for s, e, w in zip(starts, stops, raw, strict=True):
            w[bad[s:e]] = 1.0
        total[:] = 0.0
        for s, e, w in zip(starts, stops, raw, strict=True):
            total[s:e] += w
    return [w / total[s:e] for s, e, w in zip(starts, stops, raw, strict=True)]


def _outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Outer product of 1D arrays, shape ``tuple(len(v) for v in vectors)``, float32."""
    ndim = len(vectors)
    result = np.ones((1,) * ndim, dtype=np.float32)
    for axis, v in enumerate(vectors):
        shape = [1] * ndim
        shape[axis] = len(v)
        result = result * v.astype(np.float32).reshape(shape)
    return result


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _pad_tile(tile: np.ndarray, target: Sequence[int], pad_mode: str) -> np.ndarray:
    """Pad ``tile`` (C, *region) at the end of each spatial axis up to ``target``."""
    for axis, want in enumerate(target, start=1):
        have = tile.shape[axis]
        if have == want:
            continue
        mode = pad_mode
        if mode == "reflect" and have < 2:
            mode = "edge"  # reflect needs two pixels; symmetric == edge for one pixel
        if mode == "symmetric" and have < 1:  # pragma: no cover - empty tiles are rejected
            mode = "edge"
        widths = [(0, 0)] * tile.ndim
        widths[axis] = (0, want - have)
        tile = np.pad(tile, widths, mode=mode)
    return tile


def _default_transform(tile: np.ndarray) -> np.ndarray:
    return tile.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------


def tiled_inference(
    predict_fn: Callable[[np.ndarray], Any],
    image: Any,
    *,
    out_channels: int,
    tile_shape: int | Sequence[int] = (256, 256),
    overlap: int | Sequence[int] = 32,
    batch_size: int = 4,
    divisor: int = 16,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    out: Any = None,
    pad_mode: str = "reflect",
    dtype: Any = np.float32,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[tuple[int, int], None, Any]:
    """Predict ``image`` tile by tile, blending overlapping tiles (generator).

    Yields ``(tiles_done, tiles_total)`` after each batch and *returns* the output array, so
    callers write ``result = yield from tiled_inference(...)`` or use :func:`predict_tiled`.
    Arguments are validated when the generator is first advanced, before anything is read.

    Parameters
    ----------
    predict_fn : callable
        ``predict_fn(batch) -> prediction``. ``batch`` is a C-contiguous float32 array of shape
        ``(B, C, *tile)`` with ``B <= batch_size`` (all tiles of a call have the same shape);
        the prediction must be array-like of shape ``(B, out_channels, *tile)`` (float32 or
        float16).
    image : array-like
        Shape ``(C, Y, X)`` or ``(C, Z, Y, X)``: numpy, dask, zarr or anything with ``shape``,
        ``dtype`` and numpy-style slicing. Read one tile region at a time.
    out_channels : int
        Number of channels returned by ``predict_fn``.
    tile_shape : int or sequence of int, optional
        Tile size per spatial axis, rounded down to a multiple of ``divisor`` and clipped to the
        image size rounded up to a multiple of ``divisor``.
    overlap : int or sequence of int, optional
        Minimum overlap between neighbouring tiles in pixels (int: same for all axes).
    batch_size : int, optional
        Maximum number of tiles per ``predict_fn`` call.
    divisor : int, optional
        Tile sizes and starts are multiples of it (use ``2**depth`` of the U-Net).
    transform : callable, optional
        Applied to each tile as read, ``(C, *region) -> float32 (C, *region)``, e.g. intensity
        normalisation. Default: conversion to float32.
    out : array-like, optional
        Output of shape ``(out_channels, *spatial)`` (numpy array, ``np.memmap``, zarr array,
        ...). Its previous content is ignored and overwritten. Default: new ``np.zeros``.
    pad_mode : str, optional
        ``np.pad`` mode used when the image is smaller than a tile ('reflect' falls back to
        'edge' along axes of a single pixel).
    dtype : numpy dtype, optional
        dtype of the output allocated when ``out`` is None.
    should_stop : callable, optional
        Polled before every tile read (from the prefetch thread) and before every batch;
        when it returns True the generator raises :class:`Cancelled`. Closing the generator
        (``gen.close()``) or throwing into it stops the work as well.

    Yields
    ------
    tuple of int
        ``(tiles_done, tiles_total)``.

    Returns
    -------
    array-like
        ``out``, shape ``(out_channels, *spatial)``.

    Raises
    ------
    ValueError
        For inconsistent arguments or a prediction of the wrong shape.
    Cancelled
        When ``should_stop()`` returned True.
    """
    shape, out, transform = _checked(
        predict_fn, image, out_channels, batch_size, pad_mode, transform, out, dtype
    )
    tiler = _Tiler(image, shape, _plan(shape[1:], tile_shape, overlap, divisor), transform,
                   out, pad_mode, should_stop)
    grid = list(itertools.product(*(range(len(ax.starts)) for ax in tiler.axes)))
    batch_size, total = int(batch_size), len(grid)
    batches = [grid[i : i + batch_size] for i in range(0, total, batch_size)]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-tiling")
    pending: Future[np.ndarray] | None = None
    try:
        pending = executor.submit(tiler.read_batch, batches[0])
        done = 0
        for number, indices in enumerate(batches):
            data = pending.result()
            pending = None
            if number + 1 < len(batches):  # the next batch is read while this one runs
                pending = executor.submit(tiler.read_batch, batches[number + 1])
            if tiler.stop():
                raise Cancelled("tiled inference was cancelled")
            pred = np.asarray(predict_fn(data))
            expected = (len(indices), int(out_channels), *tiler.tile_size)
            if pred.shape != expected:
                raise ValueError(f"predict_fn returned shape {pred.shape}, expected {expected}")
            for b, index in enumerate(indices):
                tiler.accumulate(index, pred[b])
            done += len(indices)
            yield done, total
        return out
    finally:
        tiler.abort.set()
        if pending is not None:
            pending.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _checked(predict_fn, image, out_channels, batch_size, pad_mode, transform, out, dtype):
    """Validate :func:`tiled_inference`'s arguments; returns (shape, out, transform)."""
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) not in (3, 4):
        raise ValueError(
            f"image must have shape (C, Y, X) or (C, Z, Y, X), got {len(shape)} dimensions"
        )
    if shape[0] < 1:
        raise ValueError("image has no channels")
    if int(out_channels) < 1:
        raise ValueError(f"out_channels must be a positive integer, got {out_channels}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(_PAD_MODES)}, got {pad_mode!r}")
    if transform is not None and not callable(transform):
        raise ValueError("transform must be callable")
    if not callable(predict_fn):
        raise ValueError("predict_fn must be callable")
    out_shape = (int(out_channels), *shape[1:])
    if out is None:
        out = _memory.zeros(out_shape, dtype)
    elif tuple(getattr(out, "shape", ())) != out_shape:
        raise ValueError(f"out has shape {tuple(getattr(out, 'shape', ()))}, expected {out_shape}")
    return shape, out, (_default_transform if transform is None else transform)


class _Tiler:
    """Reads tiles of ``image`` (in the prefetch thread) and blends predictions into ``out``."""

    def __init__(self, image, shape, axes, transform, out, pad_mode, should_stop):
        self.image, self.shape, self.axes, self.transform = image, shape, axes, transform
        self.out, self.pad_mode = out, pad_mode
        self.stop = should_stop if should_stop is not None else (lambda: False)
        self.tile_size = tuple(ax.tile for ax in axes)
        self.windows = [_axis_windows(ax) for ax in axes]
        self.abort = threading.Event()

    def region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(ax.starts[i], ax.stops[i]) for ax, i in zip(self.axes, index, strict=True)
        )

    def read_batch(self, indices: list[tuple[int, ...]]) -> np.ndarray:
        data = np.empty((len(indices), self.shape[0], *self.tile_size), dtype=np.float32)
        for b, index in enumerate(indices):
            if self.abort.is_set() or self.stop():
                raise Cancelled("tiled inference was cancelled")
            raw = np.asarray(self.image[(slice(None), *self.region(index))])
            tile = np.asarray(self.transform(raw), dtype=np.float32)
            if tile.shape != raw.shape:
                raise ValueError(
                    f"transform changed the tile shape from {raw.shape} to {tile.shape}"
                )
            data[b] = _pad_tile(tile, self.tile_size, self.pad_mode)
        return data

    def accumulate(self, index: tuple[int, ...], pred: np.ndarray) -> None:
        reg = self.region(index)
        lengths = tuple(s.stop - s.start for s in reg)
        crop = pred[(slice(None), *(slice(0, n) for n in lengths))]
        weights = _outer([self.windows[k][i] for k, i in enumerate(index)])
        contrib = np.multiply(crop, weights, dtype=np.float32)  # no extra copy of the crop
        # Pixels of this tile not covered by any earlier tile (C order over the product grid)
        # form one box: along each axis, those past the end of the previous tile.
        fresh = tuple(
            slice(ax.stops[i - 1] - ax.starts[i] if i > 0 else 0, None)
            for ax, i in zip(self.axes, index, strict=True)
        )
        key = (slice(None), *reg)
        out = self.out
        if isinstance(out, np.ndarray):  # in place (includes np.memmap)
            view = out[key]
            view[(slice(None), *fresh)] = 0
            view += contrib
        else:
            current = np.array(out[key], dtype=np.float32)
            current[(slice(None), *fresh)] = 0
            current += contrib
            out[key] = current


def predict_tiled(predict_fn: Callable[[np.ndarray], Any], image: Any, **kw: Any) -> Any:
    """Run :func:`tiled_inference` to completion and return its output.

    Parameters
    ----------
    predict_fn : callable
        See :func:`tiled_inference`.
    image : array-like
        Shape ``(C, Y, X)`` or ``(C, Z, Y, X)``.
    **kw
        Keyword arguments of :func:`tiled_inference`.

    Returns
    -------
    array-like
        Prediction of shape ``(out_channels, *spatial)``.
    """
    gen = tiled_inference(predict_fn, image, **kw)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
