"""OME-Zarr in and out (NGFF 0.4, zarr format 2), written with zarr directly.

What is written (``OUT.ome.zarr``)::

    OUT.ome.zarr/            root group; with an image: "multiscales" (the image pyramid)
      0/ 1/ ...              the image levels (when an image is given)
      labels/                group, attrs {"labels": ["<name>"]}
        <name>/              "multiscales" + "image-label" (version, colors, source)
          0/ 1/ ...          label levels: level k is level 0 sampled every 2**k pixels in Y, X

NGFF 0.4 on zarr format 2 (``.zattrs``, ``/`` as chunk separator) is what napari-ome-zarr,
ome-zarr-py, vizarr, Fiji (MoBIE / n5-zarr) and OMERO read today; 0.5 (zarr format 3, attributes
under ``"ome"``) is read as well. Label pyramids use nearest-neighbour sampling (ids are never
averaged); image pyramids use 2x2 means.

Writing goes chunk by chunk (a dask array is stored block by block; a numpy array is copied one
chunk at a time; each pyramid level is computed from the level above it, one output chunk at a
time), so a big output is never whole in memory. Everything is written into a hidden
``.<name>.new-<random>.tmp`` folder next to the target and renamed into place at the end: a
reader never sees a half-written store, and a crash leaves the target as it was. An existing
target is kept unless ``overwrite=True``.

Reading is lazy: every level is a dask array over its zarr array. Missing chunk files and
metadata that does not follow the specification raise :class:`OmeZarrError`, whose message names
the path and the problem. Reading lives in :mod:`napari_unet.omezarr_read`; its names are
importable from here too.

This module imports neither napari nor Qt (see ``napari_unet._reader`` for the napari reader).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import fileio
from .omezarr_read import AXIS_TYPES, Multiscale, OmeZarr, OmeZarrError, is_ome_zarr, read

__all__ = [
    "LabelsWriter",
    "Multiscale",
    "OmeZarr",
    "OmeZarrError",
    "create_labels",
    "is_ome_zarr",
    "read",
    "write_labels",
]

NGFF_VERSION = "0.4"
_NGFF_ORDER = "TCZYX"
DEFAULT_CHUNK = 512  # Y and X; other axes get 1
_MIN_LEVEL = 256  # pyramid levels are added until Y and X are at most this


# ============================================================================ writing


def _axes_meta(axes: str, units: dict[str, str] | None = None) -> list[dict[str, str]]:
    out = []
    for a in axes:
        d = {"name": a.lower(), "type": AXIS_TYPES[a]}
        if units and a in units:
            d["unit"] = units[a]
        out.append(d)
    return out


def _check_axes(axes: str, ndim: int, what: str) -> str:
    axes = str(axes).upper()
    if len(axes) != ndim:
        raise ValueError(f"{what}: axes {axes!r} do not match an array of {ndim} dimensions")
    if not set(axes) <= set(AXIS_TYPES) or len(set(axes)) != len(axes):
        raise ValueError(f"{what}: axes {axes!r} must be distinct letters of {_NGFF_ORDER}")
    if not {"Y", "X"} <= set(axes):
        raise ValueError(f"{what}: axes {axes!r} need Y and X")
    return axes


def _check_scale(scale: Any, n: int, what: str) -> list[float] | None:
    """``scale`` as ``n`` positive finite floats (None stays None); ValueError otherwise."""
    if scale is None:
        return None
    if isinstance(scale, (str, bytes)) or not hasattr(scale, "__iter__"):
        raise ValueError(f"{what} must be a sequence of {n} numbers (one per axis), not {scale!r}")
    try:
        vals = [float(v) for v in scale]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {scale!r} must be numbers (one pixel size per axis)") from None
    if len(vals) != n:
        raise ValueError(f"{what} {tuple(scale)} has {len(vals)} value(s); give one per axis ({n})")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(
            f"{what} {tuple(scale)} must be positive and finite (physical pixel sizes)"
        )
    return vals


def _check_chunks(chunks: Any, shape: Sequence[int], axes: str, what: str) -> tuple[int, ...]:
    """``chunks`` as one positive int per axis (None: the default); ValueError otherwise."""
    if chunks is None:
        return _default_chunks(shape, axes)
    if isinstance(chunks, (str, bytes)) or not hasattr(chunks, "__iter__"):
        raise ValueError(f"{what} chunks must be a sequence of {len(shape)} ints, not {chunks!r}")
    chunks = tuple(chunks)
    if len(chunks) != len(shape):
        raise ValueError(
            f"{what} chunks {chunks} have {len(chunks)} value(s) but the array has "
            f"{len(shape)} axes ({axes}): give one chunk size per axis"
        )
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in chunks) or (
        min(chunks, default=1) < 1
    ):
        raise ValueError(f"{what} chunks {chunks} must be positive integers (pixels per chunk)")
    return tuple(int(c) for c in chunks)


def _check_levels(levels: Any) -> int | None:
    if levels is None:
        return None
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be a whole number of at least 1, not {levels!r}")
    return int(levels)


def _check_image(
    image: Any,
    axes: str | None,
    scale: Any,
    labels_axes: str,
    labels_shape: tuple[int, ...],
) -> tuple[Any, str, list[float] | None]:
    """Validate the image written next to the labels; returns (image, axes, scale)."""
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        image = np.asarray(image)
    if axes is None:
        raise ValueError("image_axes are needed with an image (e.g. 'YX', 'CYX', 'ZYX')")
    axes = _check_axes(axes, len(image.shape), "image")
    dt = np.dtype(image.dtype)
    if dt.kind not in "biuf":
        raise ValueError(f"the image has dtype {dt}; expected a real-valued (integer or float) one")
    scale = _check_scale(scale, len(axes), "image_scale")
    ishape = {a: int(n) for a, n in zip(axes, image.shape, strict=True) if a != "C"}
    lshape = dict(zip(labels_axes, labels_shape, strict=True))
    if set(ishape) != set(lshape) or any(ishape[a] != lshape[a] for a in lshape):
        raise ValueError(
            f"the image ({axes} {tuple(int(n) for n in image.shape)}) does not match the labels "
            f"({labels_axes} {labels_shape}): apart from C, the image must have the labels' axes "
            "and sizes; crop or pad one of them, or check image_axes"
        )
    return image, axes, scale


def _default_levels(shape: Sequence[int], axes: str) -> int:
    yx = [shape[axes.index("Y")], shape[axes.index("X")]]
    n = 1
    while max(yx) > _MIN_LEVEL and min(yx) >= 2 and n < 8:
        yx = [math.ceil(s / 2) for s in yx]
        n += 1
    return n


def _default_chunks(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    return tuple(
        max(1, min(int(s), DEFAULT_CHUNK)) if a in "YX" else 1
        for a, s in zip(axes, shape, strict=True)
    )


def _level_shape(shape: Sequence[int], axes: str, k: int) -> tuple[int, ...]:
    return tuple(
        math.ceil(int(s) / 2**k) if a in "YX" else int(s) for a, s in zip(axes, shape, strict=True)
    )


def _blocks(shape: Sequence[int], chunks: Sequence[int]):
    """Slices of every chunk of an array of ``shape``."""
    ranges = [range(0, int(s), int(c)) for s, c in zip(shape, chunks, strict=True)]
    for starts in itertools.product(*ranges):
        yield tuple(
            slice(st, min(st + c, s)) for st, c, s in zip(starts, chunks, shape, strict=True)
        )


def _new_array(group: Any, name: str, shape, chunks, dtype) -> Any:
    return group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=np.dtype(dtype),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},  # NGFF 0.4: "/" separator
        config={"write_empty_chunks": True},  # every chunk on disk: a missing one is damage
    )


def _copy_into(target: Any, source: Any) -> None:
    """Copy ``source`` (numpy, dask, zarr, ...) into the zarr array ``target`` chunk by chunk."""
    if type(source).__module__.split(".")[0] == "dask":
        import dask.array as da

        da.store(source.rechunk(target.chunks), target, lock=False)
        return
    for sl in _blocks(target.shape, target.chunks):
        target[sl] = np.asarray(source[sl]).astype(target.dtype, copy=False)


def _downsample(src: Any, dst: Any, axes: str, how: str) -> None:
    """``dst`` = ``src`` halved in Y and X (nearest: every 2nd pixel; mean: 2x2 means)."""
    yx = [axes.index("Y"), axes.index("X")]
    for sl in _blocks(dst.shape, dst.chunks):
        src_sl = tuple(
            slice(2 * s.start, min(2 * s.stop, src.shape[d])) if d in yx else s
            for d, s in enumerate(sl)
        )
        block = np.asarray(src[src_sl])
        if how == "nearest":
            block = block[
                tuple(slice(None, None, 2) if d in yx else slice(None) for d in range(block.ndim))
            ]
        else:
            pad = [(0, block.shape[d] % 2) if d in yx else (0, 0) for d in range(block.ndim)]
            if any(p[1] for p in pad):
                block = np.pad(block, pad, mode="edge")
            shape = []
            for d, n in enumerate(block.shape):
                shape += [n // 2, 2] if d in yx else [n]
            mean_axes = tuple(d + sum(1 for e in yx if e < d) + 1 for d in yx)
            mean = block.reshape(shape).mean(axis=mean_axes)
            if np.issubdtype(dst.dtype, np.integer):
                mean = np.rint(mean)
            block = mean
        dst[sl] = block.astype(dst.dtype, copy=False)


def _write_multiscale(
    group: Any,
    data: Any,
    axes: str,
    *,
    scale: Sequence[float] | None,
    chunks: Sequence[int] | None,
    levels: int | None,
    how: str,
    name: str,
    dtype: Any = None,
    units: dict[str, str] | None = None,
) -> list[Any]:
    """Write ``data`` and its pyramid into ``group`` (arrays ``0``, ``1``, ...); set the
    ``multiscales`` attribute. Returns the zarr arrays."""
    shape = tuple(int(s) for s in data.shape)
    n = _check_levels(levels) or _default_levels(shape, axes)
    chunks = _check_chunks(chunks, shape, axes, name)
    base = _check_scale(scale, len(shape), f"{name} scale") or [1.0] * len(shape)
    arrays = [_new_array(group, "0", shape, chunks, dtype or data.dtype)]
    _copy_into(arrays[0], data)
    datasets = []
    for k in range(n):
        if k:
            lshape = _level_shape(shape, axes, k)
            lchunks = tuple(min(c, s) for c, s in zip(chunks, lshape, strict=True))
            arrays.append(_new_array(group, str(k), lshape, lchunks, arrays[0].dtype))
            _downsample(arrays[k - 1], arrays[k], axes, how)
        f = 2**k
        s = [b * f if a in "YX" else b for a, b in zip(axes, base, strict=True)]
        ct: list[dict[str, Any]] = [{"type": "scale", "scale": s}]
        if how == "mean" and k:  # a 2x2 mean sits at the centre of the pixels it averages
            t = [b * (f - 1) / 2 if a in "YX" else 0.0 for a, b in zip(axes, base, strict=True)]
            ct.append({"type": "translation", "translation": t})
        datasets.append({"path": str(k), "coordinateTransformations": ct})
    group.attrs["multiscales"] = [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": _axes_meta(axes, units),
            "datasets": datasets,
            "type": "nearest" if how == "nearest" else "mean",
            "metadata": {"method": "napari_unet.omezarr", "downsample": "2 in Y and X"},
        }
    ]
    return arrays


def _colors_meta(colors: Any) -> list[dict[str, Any]]:
    """The NGFF ``colors`` entries of ``{label value: (r, g, b[, a])}`` (0..1 floats or 0..255
    ints); ValueError, naming the entry, for anything else."""
    if colors is None:
        return []
    if not isinstance(colors, dict):
        raise ValueError(
            f"colors must be a dict {{label value: (r, g, b, a)}}, not {type(colors).__name__}"
        )
    out = []
    for value, rgba in colors.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"colors: the key {value!r} is not a label value (an integer)")
        bad = ValueError(
            f"colors: the colour of label {value} is {rgba!r}; give (r, g, b) or (r, g, b, a) "
            "numbers, all 0..1 floats or all 0..255 ints (e.g. (1.0, 0.0, 0.0, 1.0))"
        )
        if isinstance(rgba, (str, bytes)) or not hasattr(rgba, "__iter__"):
            raise bad
        try:
            c = [float(v) for v in rgba]
        except (TypeError, ValueError):
            raise bad from None
        if len(c) not in (3, 4) or not all(math.isfinite(v) and 0 <= v <= 255 for v in c):
            raise bad
        if all(v <= 1.0 for v in c):  # napari-style 0..1 floats -> the spec's 0..255 ints
            c = [round(v * 255) for v in c]
        c = [int(v) for v in (c + [255] * 4)[:4]]
        out.append({"label-value": int(value), "rgba": c})
    return sorted(out, key=lambda e: e["label-value"])


def _temp_for(target: Path) -> Path:
    return target.parent / f".{target.name}.new-{uuid.uuid4().hex[:12]}.tmp"


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FileExistsError(
            17,
            "already exists (pass overwrite=True, or --overwrite on the command line)",
            str(target),
        )
    if target.exists() and not target.is_dir():
        raise OmeZarrError(f"{target}: a file is in the way of the OME-Zarr folder")


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` store to ``target`` (swapping out an old one if allowed)."""
    fileio.fsync_dir(tmp)
    if target.exists():
        if not overwrite:
            raise FileExistsError(17, "appeared while writing; kept it", str(target))
        fileio.replace_folder(target, tmp)
    else:
        os.rename(tmp, target)
        fileio.fsync_dir(target.parent)


class LabelsWriter:
    """An OME-Zarr under construction: :attr:`array` (level 0 of the labels, a writable zarr
    array) is filled by the caller (e.g. ``Segmenter.predict(..., labels_out=w.array)``), then
    :meth:`finish` builds the pyramid, writes the metadata and renames the store into place.

    Use as a context manager: leaving the ``with`` without :meth:`finish` (an exception, a
    stopped prediction) removes the temporary store; the target is untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        axes: str,
        *,
        dtype: Any = "int32",
        scale: Sequence[float] | None = None,
        chunks: Sequence[int] | None = None,
        name: str = "labels",
        image: Any = None,
        image_axes: str | None = None,
        image_scale: Sequence[float] | None = None,
        overwrite: bool = False,
        units: dict[str, str] | None = None,
        levels: int | None = None,
    ):
        import zarr

        # everything is checked before anything is written
        self.path = Path(path).expanduser()
        self.axes = _check_axes(axes, len(shape), "labels")
        if "C" in self.axes:
            raise ValueError(f"labels cannot have a channel axis (axes {self.axes!r})")
        if not str(name) or "/" in str(name) or str(name).startswith("."):
            raise ValueError(f"label name {name!r} must be a plain folder name")
        if not np.issubdtype(np.dtype(dtype), np.integer):
            raise ValueError(f"labels must be integers, not {np.dtype(dtype)}")
        self.name = str(name)
        self.shape = tuple(int(s) for s in shape)
        if min(self.shape, default=1) < 0:
            raise ValueError(f"labels shape {self.shape} has a negative size")
        self.scale = _check_scale(scale, len(self.shape), "scale")
        self.chunks = _check_chunks(chunks, self.shape, self.axes, "labels")
        if units is not None and (
            not isinstance(units, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in units.items())
        ):
            raise ValueError(f"units must be a dict of axis letter: unit name, not {units!r}")
        self.units = units
        self.overwrite = overwrite
        self.levels = _check_levels(levels) or _default_levels(self.shape, self.axes)
        if image is not None:
            image, image_axes, image_scale = _check_image(
                image, image_axes, image_scale, self.axes, self.shape
            )
        _check_target(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_for(self.path)
        self.root = zarr.open_group(str(self.tmp), mode="w-", zarr_format=2)
        try:
            if image is not None:
                self._write_image(image, image_axes, image_scale)
            lgroup = self.root.create_group("labels")
            lgroup.attrs["labels"] = [self.name]
            self.group = lgroup.create_group(self.name)
            self.array = _new_array(self.group, "0", self.shape, self.chunks, dtype)
        except BaseException:
            self.abort()
            raise
        self.done = False

    def _write_image(self, image: Any, axes: str | None, scale: Sequence[float] | None) -> None:
        assert axes is not None  # checked by _check_image
        order = sorted(range(len(axes)), key=lambda d: _NGFF_ORDER.index(axes[d]))
        if order != list(range(len(axes))):  # NGFF wants t, c, z, y, x
            if type(image).__module__.split(".")[0] != "dask":
                import dask.array as da

                image = da.from_array(image, chunks=_default_chunks(image.shape, axes))
            image = image.transpose(order)
            scale = None if scale is None else [scale[d] for d in order]
            axes = "".join(axes[d] for d in order)
        _write_multiscale(
            self.root,
            image,
            axes,
            scale=scale,
            chunks=None,
            levels=self.levels,  # as many as the labels'
            how="mean",
            name="image",
            units=self.units,
        )

    def finish(
        self, levels: int | None = None, colors: dict[int, Sequence[float]] | None = None
    ) -> Path:
        """Build the pyramid (``levels`` in all, default: the writer's ``levels``, else halve
        Y and X until both are at most 256),
        write the metadata, and rename the store to :attr:`path`. Returns :attr:`path`."""
        try:
            n = _check_levels(levels) or self.levels
            color_meta = _colors_meta(colors)
            arrays = [self.array]
            base = list(self.scale) if self.scale is not None else [1.0] * len(self.shape)
            datasets = [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": base}]}
            ]
            for k in range(1, n):
                lshape = _level_shape(self.shape, self.axes, k)
                lchunks = tuple(min(c, s) for c, s in zip(self.chunks, lshape, strict=True))
                arrays.append(_new_array(self.group, str(k), lshape, lchunks, self.array.dtype))
                _downsample(arrays[k - 1], arrays[k], self.axes, "nearest")
                s = [b * 2**k if a in "YX" else b for a, b in zip(self.axes, base, strict=True)]
                datasets.append(
                    {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                )
            self.group.attrs["multiscales"] = [
                {
                    "version": NGFF_VERSION,
                    "name": self.name,
                    "axes": _axes_meta(self.axes, self.units),
                    "datasets": datasets,
                    "type": "nearest",
                    "metadata": {
                        "method": "napari_unet.omezarr",
                        "downsample": "every 2nd pixel in Y and X",
                    },
                }
            ]
            label_meta: dict[str, Any] = {"version": NGFF_VERSION}
            if color_meta:
                label_meta["colors"] = color_meta
            if "multiscales" in self.root.attrs:
                label_meta["source"] = {"image": "../../"}
            self.group.attrs["image-label"] = label_meta
            _publish(self.tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary store (the target is untouched)."""
        with contextlib.suppress(OSError):
            shutil.rmtree(self.tmp)

    def __enter__(self) -> LabelsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not getattr(self, "done", False):  # an error, or left without finish()
            self.abort()


def create_labels(
    path: str | os.PathLike, shape: Sequence[int], axes: str, **kwargs: Any
) -> LabelsWriter:
    """Start an OME-Zarr whose labels are filled later; see :class:`LabelsWriter`."""
    return LabelsWriter(path, shape, axes, **kwargs)


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    axes: str | None = None,
    *,
    scale: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    name: str = "labels",
    colors: dict[int, Sequence[float]] | None = None,
    image: Any = None,
    image_axes: str | None = None,
    image_scale: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``labels`` (numpy, dask or zarr; integer) as OME-Zarr labels at ``path``.

    Parameters
    ----------
    labels
        Integer array, ``(*spatial)`` with optional leading T (axes ``"YX"``, ``"ZYX"``,
        ``"TYX"``, ``"TZYX"``). Copied chunk by chunk; never loaded whole.
    axes
        Its axes; default: ``"YX"`` for 2D, ``"ZYX"`` for 3D, ``"TZYX"`` for 4D.
    scale
        Physical pixel size per axis of level 0 (default 1). Level k has ``2**k`` times that
        in Y and X.
    chunks
        Chunk shape of level 0 (default: 512 in Y and X, 1 elsewhere).
    levels
        Pyramid levels in all (default: halve Y and X until both are at most 256).
    name
        The label image's name (``labels/<name>``).
    colors
        Optional ``{label value: (r, g, b, a)}`` (0..1 floats or 0..255 ints).
    image, image_axes, image_scale
        The image the labels belong to, written at the root as its own pyramid (2x2 means),
        so that any OME-Zarr viewer shows both.
    overwrite
        Replace an existing ``path`` (atomically); without it an existing path raises
        ``FileExistsError``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Arguments that would make an inconsistent or unreadable store (an image whose sizes
        differ from the labels', a complex image, a scale that is not positive and finite,
        chunks that are not one positive int per axis, colours that are not the above), before
        anything is written.
    """
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"labels must be integers, not {np.dtype(labels.dtype)}")
    _colors_meta(colors)  # refused before anything is written
    _check_levels(levels)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(labels.ndim)
        if axes is None:
            raise ValueError(f"give the axes of a {labels.ndim}-D labels array")
    w = LabelsWriter(
        path,
        labels.shape,
        axes,
        dtype=labels.dtype,
        scale=scale,
        chunks=chunks,
        name=name,
        image=image,
        image_axes=image_axes,
        image_scale=image_scale,
        overwrite=overwrite,
        levels=levels,
    )
    with w:
        _copy_into(w.array, labels)
        return w.finish(levels, colors)
