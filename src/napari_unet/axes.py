"""Axes of an image: checking, guessing and rearranging axis strings such as ``"ZYX"``.

Axis letters are ``T`` (time), ``Z``, ``C`` (channels; ``S`` is accepted as an alias),
``Y`` and ``X``. :func:`to_canonical` and :func:`from_canonical` rearrange with views (numpy)
or lazy operations (dask), never copies; zarr and other array-likes are wrapped lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "AXIS_LETTERS",
    "CANONICAL_AXES",
    "from_canonical",
    "guess_axes",
    "to_canonical",
    "validate_axes",
]

#: Axis letters understood by the axis helpers, in canonical order.
AXIS_LETTERS = "TZCYX"
#: Canonical axis order used internally.
CANONICAL_AXES = "TZCYX"


def is_array_like(x: Any) -> bool:
    """True for lazy array-likes (dask, zarr, h5py, ...) that support slicing."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


_SUGGESTIONS = {
    2: ("YX",),
    3: ("ZYX", "TYX", "CYX", "YXC"),
    4: ("TZYX", "ZCYX", "TYXC"),
    5: ("TZCYX", "TZYXC"),
}


def _normalize_letters(axes: str, what: str = "axes") -> str:
    """Uppercase, map S -> C and check the letters are known and unique."""
    if not isinstance(axes, str):
        raise TypeError(f"{what} must be a string such as 'ZYX', got {type(axes).__name__}")
    norm = axes.strip().upper().replace("S", "C")
    bad = sorted({ch for ch in norm if ch not in AXIS_LETTERS})
    if bad:
        raise ValueError(
            f"{what} {axes!r} contain unknown letter(s) {''.join(bad)!r}; "
            "use only T (time), Z, C (channels, or S), Y and X"
        )
    dup = sorted({ch for ch in norm if norm.count(ch) > 1})
    if dup:
        raise ValueError(
            f"{what} {axes!r} name axis {''.join(dup)!r} more than once; each letter may "
            "appear at most once ('S' counts as 'C')"
        )
    return norm


def validate_axes(axes: str, ndim: int, shape: tuple[int, ...] | None = None) -> str:
    """Check an axes string against an array's dimensionality and normalise it.

    Parameters
    ----------
    axes : str
        One letter per dimension from ``TZCYX`` (case-insensitive, ``S`` is an
        alias for ``C``), e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``, ``"YXC"``.
    ndim : int
        Number of dimensions of the image.
    shape : tuple of int, optional
        Image shape, only used to make error messages more helpful.

    Returns
    -------
    str
        The normalised (uppercase, ``S`` -> ``C``) axes.

    Raises
    ------
    ValueError
        With a plain-language message if the letters are unknown or repeated,
        Y or X is missing, or the length differs from ``ndim``.
    """
    norm = _normalize_letters(axes)
    missing = [ch for ch in "YX" if ch not in norm]
    if missing:
        raise ValueError(
            f"axes {axes!r} must include both Y and X (missing {' and '.join(missing)})"
        )
    ndim = int(ndim)
    if len(norm) != ndim:
        dims = f"{ndim} (shape {tuple(int(s) for s in shape)})" if shape is not None else f"{ndim}"
        hint = _SUGGESTIONS.get(ndim)
        if hint:
            examples = " or ".join(f"'{h}'" for h in hint[:2])
            advice = f"; pass axes such as {examples}"
        else:
            advice = "; images must have between 2 and 5 dimensions (T, Z, C, Y, X)"
        word = "dimension" if len(norm) == 1 else "dimensions"
        raise ValueError(f"axes {axes!r} name {len(norm)} {word} but the image has {dims}{advice}")
    return norm


def guess_axes(shape: tuple[int, ...], rgb: bool | None = None) -> str:
    """Guess the axes of an image from its shape.

    Rules: 2D -> ``YX``; 3D whose last dimension is 3 or 4 -> ``YXC``
    (RGB/RGBA), other 3D -> ``ZYX``; 4D whose last dimension is 3 or 4 ->
    ``ZYXC``; 5D -> ``TZYXC`` if the last dimension is 3 or 4, else
    ``TZCYX`` (ImageJ hyperstack order).  Other 4D shapes are ambiguous
    and raise.

    Parameters
    ----------
    shape : tuple of int
        Image shape.
    rgb : bool, optional
        ``True``: the last dimension is colour samples; ``False``: it is never;
        ``None``: decide from its size (3 or 4).

    Returns
    -------
    str
        Axes string.

    Raises
    ------
    ValueError
        For 0D/1D, 6D or more, ambiguous 4D shapes, or ``rgb=True`` on a 2D
        shape; the message asks the caller to pass ``axes`` explicitly.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"an image needs at least 2 dimensions (Y, X), got shape {shape} ({ndim}D)"
        )
    if ndim > 5:
        raise ValueError(
            f"cannot handle a {ndim}D image with shape {shape}: at most 5 axes (T, Z, C, Y, X) "
            "are supported"
        )
    is_rgb = shape[-1] in (3, 4) if rgb is None else bool(rgb)
    if ndim == 2:
        if rgb:
            raise ValueError(f"a 2D image with shape {shape} cannot have colour samples")
        return "YX"
    if ndim == 3:
        return "YXC" if is_rgb else "ZYX"
    if ndim == 4:
        if is_rgb:
            return "ZYXC"
        raise ValueError(
            f"cannot guess the axes of a 4D image with shape {shape}: it could be TZYX, CZYX, "
            "ZCYX or TCYX; pass axes explicitly, e.g. axes='TZYX'"
        )
    return "TZYXC" if is_rgb else "TZCYX"


def _lazy_or_numpy(array: Any) -> Any:
    """numpy and dask arrays pass through; other array-likes are wrapped lazily."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.split(".")[0] == "dask":
        return array
    if is_array_like(array):
        try:
            import dask.array as da
        except ImportError:
            return np.asarray(array)
        chunks = getattr(array, "chunks", None)
        ok = isinstance(chunks, tuple) and all(isinstance(c, (int, np.integer)) for c in chunks)
        if ok and type(array).__module__.split(".")[0] == "zarr":
            from .omezarr_read import _lazy, zarr_array_path  # a damaged chunk is named

            return _lazy(array, zarr_array_path(array))
        return da.from_array(array, chunks=chunks if ok else "auto")
    return np.asarray(array)


def _rearrange(array: Any, source: str, target: str) -> Any:
    """Reorder ``array`` (axes ``source``) to axes ``target`` using views/lazy ops only.

    Axes of ``source`` missing from ``target`` must have length 1 and are
    dropped; axes of ``target`` missing from ``source`` are inserted with
    length 1.
    """
    index: list[Any] = []
    kept: list[str] = []
    for ch, n in zip(source, array.shape, strict=True):
        if ch in target:
            index.append(slice(None))
            kept.append(ch)
        elif int(n) == 1:
            index.append(0)
        else:
            raise ValueError(
                f"cannot drop axis {ch!r} of length {n}: axes {target!r} have no {ch!r}"
            )
    if any(not isinstance(i, slice) for i in index):
        array = array[tuple(index)]
    present = [ch for ch in target if ch in kept]
    perm = [kept.index(ch) for ch in present]
    if perm != list(range(len(perm))):
        array = array.transpose(perm)
    if len(present) != len(target):
        expand = tuple(slice(None) if ch in kept else None for ch in target)
        array = array[expand]
    return array


def to_canonical(image: Any, axes: str, target: str = CANONICAL_AXES) -> Any:
    """Return ``image`` with its axes rearranged to exactly ``target``.

    Missing axes are inserted with length 1; axes of ``image`` that are not in
    ``target`` must have length 1 and are dropped.  A numpy input gives a view
    (never a copy); a dask input gives a lazy dask array; zarr and other
    array-likes are wrapped lazily with :func:`dask.array.from_array` (or
    loaded with :func:`numpy.asarray` if dask is not installed).

    Parameters
    ----------
    image : array-like
        Image whose dimensions are named by ``axes``.
    axes : str
        Axes of ``image``, e.g. ``"YXC"``; validated with :func:`validate_axes`.
    target : str
        Output axes, default ``"TZCYX"``.

    Returns
    -------
    array
        Array with ``len(target)`` dimensions in ``target`` order.
    """
    arr = _lazy_or_numpy(image)
    src = validate_axes(axes, arr.ndim, arr.shape)
    tgt = _normalize_letters(target, "target axes")
    return _rearrange(arr, src, tgt)


def from_canonical(array: Any, target_axes: str, source: str = CANONICAL_AXES) -> Any:
    """Inverse of :func:`to_canonical`: rearrange ``array`` from ``source`` to ``target_axes``.

    Length-1 axes of ``source`` that are not in ``target_axes`` are dropped,
    the rest are transposed into ``target_axes`` order (axes of
    ``target_axes`` missing from ``source`` are inserted with length 1).  For
    example labels computed in ``TZCYX`` for an image with axes ``"YXC"`` are
    returned with ``target_axes="YX"``.  numpy inputs give views, dask inputs
    stay lazy.

    Parameters
    ----------
    array : array-like
        Array with axes ``source``.
    target_axes : str
        Desired output axes.
    source : str
        Axes of ``array``, default ``"TZCYX"``.

    Returns
    -------
    array
        Array with axes ``target_axes``.
    """
    arr = _lazy_or_numpy(array)
    src = _normalize_letters(source, "source axes")
    if len(src) != arr.ndim:
        raise ValueError(
            f"source axes {source!r} name {len(src)} dimensions but the array has {arr.ndim} "
            f"(shape {tuple(arr.shape)})"
        )
    tgt = _normalize_letters(target_axes, "target axes")
    return _rearrange(arr, src, tgt)
