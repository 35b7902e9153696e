"""Reading OME-Zarr (NGFF 0.4 on zarr format 2, and 0.5 on zarr format 3), lazily.

:func:`read` opens an OME-Zarr folder: its image pyramid (if any) and its label images, each a
:class:`Multiscale` of dask arrays over the zarr arrays, full resolution first. Missing chunk
files and metadata that does not follow the specification raise :class:`OmeZarrError`, whose
message names the path and the problem. Metadata is read as plain JSON; zarr opens the arrays.
Writing is :mod:`napari_unet.omezarr`'s job (which re-exports these names).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Multiscale", "OmeZarr", "OmeZarrError", "is_ome_zarr", "read"]

#: The letters napari-unet uses for the NGFF axis names, and each axis' NGFF type.
AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


class OmeZarrError(ValueError):
    """An OME-Zarr that cannot be read or written; the message names the path and the problem."""


@dataclass
class Multiscale:
    """One multiscale image (or label image) of an OME-Zarr, read lazily."""

    path: Path  # the group holding "multiscales"
    axes: str  # upper-case letters in array order, e.g. "CZYX"
    levels: list  # dask arrays, full resolution first
    scales: list[tuple[float, ...]]  # per level, one value per axis
    translations: list[tuple[float, ...]]
    name: str | None = None
    units: dict[str, str] = field(default_factory=dict)

    @property
    def data(self):
        """Level 0 (full resolution), a dask array."""
        return self.levels[0]


@dataclass
class OmeZarr:
    """An OME-Zarr folder: its image (if any) and its label images, all lazy."""

    path: Path
    image: Multiscale | None
    labels: dict[str, Multiscale]
    colors: dict[str, dict[int, tuple[float, float, float, float]]]
    version: str


def _attrs(group_path: Path) -> tuple[dict[str, Any], str | None]:
    """(attributes, zarr format "2"/"3") of the group at ``group_path``, read as plain JSON."""
    v3 = group_path / "zarr.json"
    if v3.is_file():
        meta = _json(v3)
        attrs = meta.get("attributes") or {}
        return (attrs.get("ome", attrs) if isinstance(attrs, dict) else {}), "3"
    za = group_path / ".zattrs"
    if za.is_file():
        return _json(za), "2"
    if (group_path / ".zgroup").is_file():
        return {}, "2"
    return {}, None


def _json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise OmeZarrError(f"{path}: cannot read the metadata ({e})") from None
    if not isinstance(out, dict):
        raise OmeZarrError(f"{path}: the metadata is not a JSON object")
    return out


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding OME-Zarr metadata (multiscales or labels)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    try:
        attrs, fmt = _attrs(p)
    except OmeZarrError:
        return str(p).lower().rstrip("/").endswith(".ome.zarr")
    return fmt is not None and ("multiscales" in attrs or "labels" in attrs)


def _bad(path: Path, problem: str) -> OmeZarrError:
    return OmeZarrError(
        f"{path}: {problem} (not valid OME-Zarr multiscales metadata, NGFF 0.4/0.5)"
    )


def _missing_chunks(arr: Any, array_path: Path) -> tuple[int, int, tuple[int, ...] | None]:
    """(chunk files missing, chunks in all, grid index of the first missing) of a zarr array."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    total = math.prod(grid)
    if total == 0:
        return 0, 0, None
    present = int(arr.nchunks_initialized)
    if present >= total:
        return 0, total, None
    enc = arr.metadata
    first = None
    for idx in itertools.product(*[range(g) for g in grid]):
        key = enc.encode_chunk_key(idx) if hasattr(enc, "encode_chunk_key") else None
        if key is None or not (array_path / key).exists():
            first = idx
            break
    return total - present, total, first


def _read_multiscale(group_path: Path, attrs: dict[str, Any], missing_chunks: str) -> Multiscale:
    """The first multiscale image described in ``attrs`` of the group at ``group_path``."""
    import dask.array as da

    ms = attrs.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise _bad(group_path, "'multiscales' must be a non-empty list of objects")
    m = ms[0]
    axes, units = _axes_of(group_path, m)
    datasets = m.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _bad(group_path, "'datasets' is missing or empty")
    levels, scales, translations = [], [], []
    for i, ds in enumerate(datasets):
        arr, rel = _open_level(group_path, i, ds, axes)
        scale, trans = _transforms(group_path, f"level {i} ({rel})", ds, axes)
        if missing_chunks != "fill":
            _check_chunks(arr, group_path / rel, i)
        levels.append(da.from_zarr(arr))
        scales.append(tuple(scale))
        translations.append(tuple(trans))
    for i in range(1, len(levels)):
        if any(b > a for a, b in zip(levels[i - 1].shape, levels[i].shape, strict=True)):
            raise _bad(
                group_path,
                f"level {i} {levels[i].shape} is larger than level {i - 1} {levels[i - 1].shape}",
            )
    return Multiscale(group_path, axes, levels, scales, translations, m.get("name"), units)


def _axes_of(group_path: Path, m: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(axis letters, units by letter) of a multiscales entry."""
    axes_meta = m.get("axes")
    if not isinstance(axes_meta, list) or not axes_meta:
        raise _bad(group_path, "'axes' is missing from 'multiscales'")
    letters, units = [], {}
    for a in axes_meta:
        name = a.get("name") if isinstance(a, dict) else a  # NGFF 0.3 used plain strings
        if not isinstance(name, str) or name.upper() not in AXIS_TYPES:
            raise _bad(group_path, f"axis {a!r} is not one of t, c, z, y, x")
        letters.append(name.upper())
        if isinstance(a, dict) and isinstance(a.get("unit"), str):
            units[name.upper()] = a["unit"]
    axes = "".join(letters)
    if len(set(axes)) != len(axes) or not {"Y", "X"} <= set(axes):
        raise _bad(group_path, f"axes {axes.lower()!r} must be distinct and include y and x")
    return axes, units


def _open_level(group_path: Path, i: int, ds: Any, axes: str) -> tuple[Any, str]:
    """(the zarr array, its relative path) of dataset ``i``."""
    import zarr

    rel = ds.get("path") if isinstance(ds, dict) else None
    if not isinstance(rel, str) or not rel:
        raise _bad(group_path, f"dataset {i} has no 'path'")
    apath = group_path / rel
    try:
        arr = zarr.open_array(str(apath), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several kinds for a missing array
        raise OmeZarrError(
            f"{apath}: level {i} (dataset path {rel!r}) is not a readable zarr array "
            f"({type(e).__name__}: {e})"
        ) from None
    if arr.ndim != len(axes):
        raise _bad(
            group_path,
            f"level {i} ({rel}) has {arr.ndim} dimensions but {len(axes)} axes "
            f"({axes.lower()}) are declared",
        )
    return arr, rel


def _check_chunks(arr: Any, apath: Path, i: int) -> None:
    """Refuse a level whose chunk files are not all there (zarr would read zeros)."""
    n, total, first = _missing_chunks(arr, apath)
    if n:
        raise OmeZarrError(
            f"{apath}: {n} of {total} chunks of level {i} are missing (first: chunk "
            f"{first}); the copy is incomplete or damaged. Copy it again; if the writer "
            "skipped empty chunks on purpose, read it with missing_chunks='fill'"
        )


def _transforms(
    group_path: Path, where: str, ds: dict[str, Any], axes: str
) -> tuple[list[float], list[float]]:
    """(scale, translation) of a dataset's ``coordinateTransformations``; 1 and 0 by default."""
    scale, trans = [1.0] * len(axes), [0.0] * len(axes)
    for ct in ds.get("coordinateTransformations") or []:
        kind = ct.get("type") if isinstance(ct, dict) else None
        if kind not in ("scale", "translation"):
            continue
        vec = ct.get(kind)
        if not isinstance(vec, list) or len(vec) != len(axes):
            raise _bad(
                group_path,
                f"{where}: {kind} {vec!r} needs one number per axis ({len(axes)}: {axes.lower()})",
            )
        try:
            vals = [float(v) for v in vec]
        except (TypeError, ValueError):
            raise _bad(group_path, f"{where}: {kind} {vec!r} is not numbers") from None
        if kind == "scale":
            if not all(v > 0 and math.isfinite(v) for v in vals):
                raise _bad(group_path, f"{where}: scale {vec!r} must be positive")
            scale = vals
        else:
            trans = vals
    return scale, trans


def read(path: str | os.PathLike, missing_chunks: str = "error") -> OmeZarr:
    """Open an OME-Zarr folder lazily: its image (if any) and its label images.

    Parameters
    ----------
    missing_chunks
        ``"error"`` (default): a level whose chunk files are not all on disk raises
        :class:`OmeZarrError` (zarr would silently read zeros). ``"fill"``: accept them (read
        as the fill value), for stores whose writer skipped empty chunks on purpose.

    Raises
    ------
    FileNotFoundError
        No such folder.
    OmeZarrError
        Not OME-Zarr, wrong metadata, missing chunks, a listed label image that is not there.
    """
    if missing_chunks not in ("error", "fill"):
        raise ValueError(f"missing_chunks must be 'error' or 'fill', not {missing_chunks!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(2, "OME-Zarr not found", str(p))
    if not p.is_dir():
        raise OmeZarrError(f"{p}: an OME-Zarr is a folder, this is a file")
    attrs, fmt = _attrs(p)
    if fmt is None:
        raise OmeZarrError(f"{p}: not a zarr group (no .zgroup/.zattrs or zarr.json)")
    version = str(attrs.get("version", "")) or "0.4"
    image = None
    if "multiscales" in attrs:
        image = _read_multiscale(p, attrs, missing_chunks)
        version = str(attrs["multiscales"][0].get("version", version))
    labels: dict[str, Multiscale] = {}
    colors: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    lpath = p / "labels"
    names: list[Any] = []
    if lpath.is_dir():
        lattrs, _ = _attrs(lpath)
        names = lattrs.get("labels", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise OmeZarrError(f"{lpath}: 'labels' must be a list of label image names")
    for n in names:
        gp = lpath / n
        labels[n], colors[n] = _label_image(gp, n, lpath, missing_chunks)
    if image is None and not labels:
        raise OmeZarrError(f"{p}: neither 'multiscales' nor label images found: not an OME-Zarr")
    return OmeZarr(p, image, labels, colors, version)


def _label_image(
    gp: Path, n: str, lpath: Path, missing_chunks: str
) -> tuple[Multiscale, dict[int, tuple[float, float, float, float]]]:
    """The label image ``n`` (integer, no channel axis) at ``gp`` and its colours."""
    if not gp.is_dir():
        raise OmeZarrError(f"{gp}: the label image {n!r} listed in {lpath} is not there")
    gattrs, _ = _attrs(gp)
    if "multiscales" not in gattrs:
        raise OmeZarrError(f"{gp}: the label image {n!r} has no 'multiscales' metadata")
    ms = _read_multiscale(gp, gattrs, missing_chunks)
    if not np.issubdtype(ms.data.dtype, np.integer):
        raise OmeZarrError(f"{gp}: labels must be integers, not {ms.data.dtype}")
    if "C" in ms.axes:
        raise OmeZarrError(f"{gp}: a label image cannot have a channel axis")
    il = gattrs.get("image-label")
    cmap: dict[int, tuple[float, float, float, float]] = {}
    if isinstance(il, dict):
        for c in il.get("colors") or []:
            try:
                rgba = [float(v) / 255 for v in c["rgba"]]
                cmap[int(c["label-value"])] = tuple((rgba + [1.0] * 4)[:4])
            except (KeyError, TypeError, ValueError):
                raise OmeZarrError(
                    f"{gp}: a color entry {c!r} is not {{label-value, rgba}}"
                ) from None
    return ms, cmap
