"""Reading OME-Zarr (NGFF 0.4 on zarr format 2, and 0.5 on zarr format 3), lazily.

:func:`read` opens an OME-Zarr folder: its image pyramid (if any) and its label images, each a
:class:`Multiscale` of dask arrays over the zarr arrays, full resolution first. Missing chunk
files and metadata that does not follow the specification raise :class:`OmeZarrError`, whose
message names the path and the problem; so does a chunk file that cannot be decoded (damaged),
when the data is read. Metadata is read as plain JSON; zarr opens the arrays.
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


def _file_grid(arr: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block shape, blocks per axis) of the files of a zarr array: its shards, else chunks."""
    unit = tuple(int(c) for c in (getattr(arr, "shards", None) or arr.chunks))
    grid = tuple(math.ceil(int(s) / c) for s, c in zip(arr.shape, unit, strict=True))
    return unit, grid


def _key_format(arr: Any) -> tuple[str, str] | None:
    """(prefix, separator) of the chunk file names of ``arr`` ("c/" and "/" for zarr 3's
    default "c/1/2", "" and "." for zarr 2's "1.2"), or None if they do not follow that form."""
    enc = arr.metadata
    if not hasattr(enc, "encode_chunk_key") or arr.ndim == 0:
        return None
    nd = arr.ndim
    ones = enc.encode_chunk_key((1,) * nd)
    prefix = ones[: -(2 * nd - 1)] if nd > 1 else ones[:-1]
    sep = ones[-2] if nd > 1 else "/"
    probe = tuple(range(10, 10 + nd))
    if enc.encode_chunk_key(probe) != prefix + sep.join(map(str, probe)):
        return None
    return prefix, sep


def _stored_chunks(
    arr: Any, array_path: Path, grid: tuple[int, ...]
) -> set[tuple[int, ...]] | None:
    """Grid indices of the chunk files on disk, found by listing the array's folder (time in
    proportion to the files there, not to the chunks its shape claims); None if unknown."""
    fmt = _key_format(arr)
    if fmt is None:
        return None
    prefix, sep = fmt
    nd = len(grid)
    found: set[tuple[int, ...]] = set()
    root = str(array_path)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for fn in filenames:
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix) :].split(sep)
            if len(parts) != nd or not all(q.isdigit() and q.isascii() for q in parts):
                continue
            idx = tuple(int(q) for q in parts)
            if all(i < g for i, g in zip(idx, grid, strict=True)):
                found.add(idx)
    return found


def _first_missing(present: set[tuple[int, ...]], grid: tuple[int, ...]) -> tuple[int, ...]:
    """The first grid index (C order) not in ``present`` (which holds fewer than all)."""
    flat = []
    for idx in present:
        f = 0
        for i, g in zip(idx, grid, strict=True):
            f = f * g + i
        flat.append(f)
    first = 0
    for f in sorted(flat):
        if f != first:
            break
        first += 1
    out = []
    for g in reversed(grid):
        first, i = divmod(first, g)
        out.append(i)
    return tuple(reversed(out))


def _missing_chunks(arr: Any, array_path: Path) -> tuple[int, int, tuple[int, ...] | None]:
    """(chunk files missing, chunks in all, grid index of the first missing) of a zarr array.

    The files are counted by listing the array's folder, so a shape that claims billions of
    chunks (a damaged ``.zarray``) is answered as fast as the files on disk allow."""
    _, grid = _file_grid(arr)
    total = math.prod(grid)
    if total == 0:
        return 0, 0, None
    present = _stored_chunks(arr, array_path, grid)
    if present is None:  # an unusual chunk key encoding: ask zarr (linear in the chunk slots)
        n = int(arr.nchunks_initialized)
        if n >= total:
            return 0, total, None
        first = next(
            (
                idx
                for idx in itertools.product(*[range(g) for g in grid])
                if not (array_path / arr.metadata.encode_chunk_key(idx)).exists()
            ),
            None,
        )
        return total - n, total, first
    if len(present) >= total:
        return 0, total, None
    return total - len(present), total, _first_missing(present, grid)


class _DamageNamingArray:
    """A zarr array whose reads name the chunk file that cannot be decoded.

    Only a failed read costs anything more: the good path is one ``arr[key]``.
    """

    def __init__(self, arr: Any, path: Path):
        self.arr = arr
        self.path = path
        self.shape = tuple(arr.shape)
        self.dtype = arr.dtype
        self.ndim = arr.ndim
        self.chunks = arr.chunks

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.arr[key]
        except Exception as e:  # noqa: BLE001 - codecs raise RuntimeError, OSError, zlib.error...
            err = damaged_chunk_error(self.arr, self.path, key, e)
            if err is e:
                raise
            raise err from e


def zarr_array_path(arr: Any) -> str:
    """Where a zarr array lives: a folder for a local store, else the store's URL."""
    sp = getattr(arr, "store_path", None)
    root = getattr(getattr(sp, "store", None), "root", None)
    if root is not None:
        return str(Path(root) / sp.path) if sp.path else str(root)
    return str(sp) if sp is not None else repr(arr)


def damaged_chunk_error(arr: Any, path: Any, key: Any, exc: BaseException) -> BaseException:
    """The error for a read of ``arr[key]`` that raised ``exc``: an :class:`OmeZarrError`
    naming the chunk file that cannot be decoded, else ``exc`` itself (not a chunk's fault).

    A read of several chunks is narrowed down by reading them one by one (failures only)."""
    if isinstance(exc, (MemoryError, PermissionError, OmeZarrError)):
        return exc
    unit, grid = _file_grid(arr)
    region = _region(key, arr.shape)
    if region is None:
        return exc
    ranges = [
        range(a // u, (b - 1) // u + 1) if b > a else range(0)
        for (a, b), u in zip(region, unit, strict=True)
    ]
    blocks = list(itertools.product(*ranges))
    if len(blocks) > 1:
        for idx in blocks:
            sl = tuple(
                slice(i * u, min((i + 1) * u, s))
                for i, u, s in zip(idx, unit, arr.shape, strict=True)
            )
            try:
                arr[sl]
            except Exception as e:  # noqa: BLE001 - see _DamageNamingArray
                return damaged_chunk_error(arr, path, sl, e)
        return exc
    if not blocks:
        return exc
    idx = blocks[0]
    where = "shard" if getattr(arr, "shards", None) else "chunk"
    try:
        name = f" (file {arr.metadata.encode_chunk_key(idx)})"
    except Exception:  # noqa: BLE001 - only for the message
        name = ""
    return OmeZarrError(
        f"{where} {idx} of {path} cannot be decoded: the file is damaged{name}; "
        f"{type(exc).__name__}: {str(exc).rstrip('.')}. Copy the store again from its source, "
        "or write it again"
    )


def _region(key: Any, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """[(start, stop)] per axis of a basic index (ints, step-1 slices, Ellipsis), else None."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        return None
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            a, b, step = k.indices(int(n))
            if step != 1:
                return None
            out.append((a, max(a, b)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k) + int(n) if k < 0 else int(k)
            out.append((k, k + 1))
        else:
            return None
    return out


def _lazy(arr: Any, apath: Path) -> Any:
    """A dask array over the zarr array ``arr`` (at ``apath``) whose reads name a damaged chunk."""
    import dask.array as da
    from dask.base import tokenize

    return da.from_array(
        _DamageNamingArray(arr, apath),
        chunks=arr.chunks,
        name="from-zarr-" + tokenize(arr, arr.chunks),
        meta=np.empty((0,) * arr.ndim, dtype=arr.dtype),
        asarray=True,
    )


def _read_multiscale(group_path: Path, attrs: dict[str, Any], missing_chunks: str) -> Multiscale:
    """The first multiscale image described in ``attrs`` of the group at ``group_path``."""
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
        levels.append(_lazy(arr, group_path / rel))
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
        held = total - n
        raise OmeZarrError(
            f"{apath}: {n} of {total} chunks of level {i} are missing (first: chunk "
            f"{first}; its shape {tuple(arr.shape)} claims {total} chunks but it holds {held} "
            "chunk files); the copy is incomplete or damaged, or the shape in its metadata is "
            "wrong. Copy it again; if the writer skipped empty chunks on purpose, read it with "
            "missing_chunks='fill'"
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
        Later, when the lazy data is read: a chunk file that cannot be decoded (damaged).
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
