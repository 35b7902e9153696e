"""napari reader contribution (``napari-unet.read_omezarr``): OME-Zarr folders, lazily.

Returns the image (a multiscale Image layer, split by channel when it has one) and every label
image under ``labels/`` (multiscale Labels layers), each level a dask array over its zarr array:
nothing is read until napari draws it. Uses :mod:`napari_unet.omezarr`; no napari import here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import omezarr as oz


def get_reader(path: str | os.PathLike | list):
    """The reader for ``path`` if it is an OME-Zarr folder, else None (napari tries others)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if not p.is_dir():
        return None
    if not (oz.is_ome_zarr(p) or p.name.lower().endswith(".ome.zarr")):
        return None
    return read_omezarr


def _levels(ms: oz.Multiscale) -> Any:
    return ms.levels if len(ms.levels) > 1 else ms.levels[0]


def read_omezarr(path: str | os.PathLike | list) -> list[tuple[Any, dict[str, Any], str]]:
    """Layer data tuples for an OME-Zarr: ``[(image, {...}, "image"), (labels, {...},
    "labels"), ...]``. Raises :class:`~napari_unet.omezarr.OmeZarrError` (napari shows its
    message) for missing chunks or wrong metadata."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    ome = oz.read(path)
    stem = Path(ome.path).name
    for suffix in (".ome.zarr", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    layers: list[tuple[Any, dict[str, Any], str]] = []
    if ome.image is not None:
        ms = ome.image
        meta: dict[str, Any] = {
            "name": ms.name if ms.name and ms.name != "image" else stem,
            "metadata": {"ome_zarr": str(ms.path), "axes": ms.axes},
        }
        keep = [d for d, a in enumerate(ms.axes) if a != "C"]
        if "C" in ms.axes:
            meta["channel_axis"] = ms.axes.index("C")
        meta["scale"] = tuple(ms.scales[0][d] for d in keep)
        meta["translate"] = tuple(ms.translations[0][d] for d in keep)
        layers.append((_levels(ms), meta, "image"))
    for name, ms in ome.labels.items():
        meta = {
            "name": f"{stem} [{name}]",  # e.g. "cells [unet]"
            "scale": ms.scales[0],
            "translate": ms.translations[0],
            "metadata": {"ome_zarr": str(ms.path), "axes": ms.axes},
        }
        if ome.colors.get(name):
            meta["colormap"] = {None: (0.0, 0.0, 0.0, 0.0), **ome.colors[name]}
        layers.append((_levels(ms), meta, "labels"))
    return layers
