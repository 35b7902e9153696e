"""Intensity normalisation: finite-value checks, robust percentile ranges, scaling to 0..1.

Lazy arrays (dask, zarr, anything with ``shape``, ``dtype`` and slicing) are never loaded
whole: :func:`check_finite` and :func:`percentile_range` read a strided subsample.
Pure numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .axes import is_array_like

__all__ = ["check_finite", "normalize", "percentile_range"]


def _subsample_steps(shape: tuple[int, ...], max_samples: int) -> list[int]:
    """Integer step per axis so that a strided read has at most ``max_samples`` values."""
    steps = [1] * len(shape)
    counts = [int(n) for n in shape]
    while math.prod(counts) > max_samples:
        i = int(np.argmax(counts))
        if counts[i] <= 1:
            break
        steps[i] += max(1, steps[i] // 8)
        counts[i] = -(-int(shape[i]) // steps[i])
    return steps


def _strided_sample(image: Any, max_samples: int) -> np.ndarray:
    """Read a regularly strided subsample (at most ~``max_samples`` values) as numpy."""
    shape = tuple(int(s) for s in image.shape)
    if math.prod(shape) <= max_samples:
        return np.asarray(image if isinstance(image, np.ndarray) else image[...])
    steps = _subsample_steps(shape, max_samples)
    # offset each axis by half a step so the sample is centred, not biased to the top-left
    index = tuple(slice(min(s // 2, n - 1), None, s) for s, n in zip(steps, shape, strict=True))
    return np.asarray(image[index])


def _as_numpy_or_lazy(image: Any) -> tuple[Any, bool]:
    """Return (array, is_lazy)."""
    if isinstance(image, np.ndarray):
        return image, False
    if is_array_like(image):
        return image, True
    return np.asarray(image), False


def check_finite(image: Any, name: str = "image", max_samples: int = 2_000_000) -> None:
    """Raise a helpful ``ValueError`` if ``image`` contains NaN or infinite values.

    numpy arrays are checked completely.  Lazy arrays (dask, zarr or any
    array-like with ``shape``, ``dtype`` and slicing) are *not* loaded: a
    strided subsample of at most ~``max_samples`` values is checked instead,
    so isolated NaNs in a huge lazy array can be missed.  Integer and bool
    images are always finite and are not inspected.

    Parameters
    ----------
    image : array-like
        Image to check.
    name : str
        Name used in the error message.
    max_samples : int
        Size of the subsample checked for lazy arrays.

    Raises
    ------
    ValueError
        ``"image contains 12 NaN or infinite pixels; replace them (e.g. with
        numpy.nan_to_num) before segmenting"``, or ``"image contains only NaN
        or infinite values"``.
    """
    arr, lazy = _as_numpy_or_lazy(image)
    if np.dtype(arr.dtype).kind not in "fc":
        return
    values = _strided_sample(arr, max_samples) if lazy else arr
    n_bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if n_bad == 0:
        return
    if n_bad == values.size:
        raise ValueError(f"{name} contains only NaN or infinite values")
    if lazy:
        count = f"NaN or infinite pixels ({n_bad} in a sample of {values.size})"
    else:
        count = f"{n_bad} NaN or infinite pixels"
    raise ValueError(
        f"{name} contains {count}; replace them (e.g. with numpy.nan_to_num) before segmenting"
    )


def percentile_range(
    image: Any, low: float = 1.0, high: float = 99.8, max_samples: int = 2_000_000
) -> tuple[float, float]:
    """Robust intensity range ``(lo, hi)`` given by two percentiles.

    Arrays with more than ``max_samples`` elements, and all lazy arrays
    (dask, zarr, anything with ``shape`` and slicing), are read with a step
    along each axis so that at most ~``max_samples`` values are read; the
    whole array is never loaded.  NaN and infinite values are ignored.

    Parameters
    ----------
    image : array-like
        Image (any dimensionality).
    low, high : float
        Percentiles in ``[0, 100]``.
    max_samples : int
        Maximum number of values to read.

    Returns
    -------
    (float, float)
        ``(lo, hi)``.  ``(0.0, 1.0)`` for bool images and ``(0.0, 0.0)`` if
        there are no finite values.
    """
    if not 0.0 <= low <= high <= 100.0:
        raise ValueError(f"need 0 <= low <= high <= 100, got low={low}, high={high}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    arr, _ = _as_numpy_or_lazy(image)
    if np.dtype(arr.dtype) == np.bool_:
        return 0.0, 1.0
    if math.prod(arr.shape) == 0:
        return 0.0, 0.0
    sample = _strided_sample(arr, max_samples)
    if sample.dtype.kind in "fc":
        finite = np.isfinite(sample)
        if not finite.all():
            sample = sample[finite]
        if sample.size == 0:
            return 0.0, 0.0
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


#: A range narrower than this fraction of its own magnitude is flat: a constant image, or one
#: whose only variation is float64 rounding. (An absolute limit, 1e-6 before, made every image
#: whose values all lie under 1e-6, a float image in small physical units, flat: no object.)
FLAT = 1e-12


def inverse_span(lo: Any, hi: Any) -> np.ndarray:
    """``1 / (hi - lo)`` in float64, 0 where the range is flat (see :data:`FLAT`). Taken
    from half the span, so that a range as wide as float64 itself (-max to max) does not
    overflow to an infinite span (whose inverse, 0, made every pixel NaN)."""
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    half = hi64 * 0.5 - lo64 * 0.5
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = 0.5 / half
        ok = (half > 0.5 * FLAT * np.maximum(np.abs(lo64), np.abs(hi64))) & np.isfinite(inv)
    return np.where(ok, inv, 0.0)


def float32_keeps(dtype: Any, lo: Any, hi: Any, inv: Any) -> bool:
    """Whether ``(x - lo) * inv`` computed in float32 keeps an image's signal.

    Not when the range or its inverse does not fit float32, nor for wider floats, nor for
    4- and 8-byte integers far from zero compared with their range (an int64 image of values
    near 2**40 spans 255: float32's step there is 2**17, and every pixel became the same):
    those are normalised in float64 (:func:`normalize` and ``inference._normalizer``).
    """
    dt = np.dtype(dtype)
    lo64, hi64, inv64 = (np.asarray(v, np.float64) for v in (lo, hi, inv))
    big = np.maximum(np.abs(lo64), np.abs(hi64))
    if not (np.all(big < 1e30) and np.all(inv64 < 1e30)):
        return False
    if dt.kind in "fc":
        return dt.itemsize <= 4
    # float32 holds integers exactly to 2**24; beyond, its step (big * 2**-23) must stay
    # under a thousandth of the range (1 / inv)
    return dt.itemsize <= 2 or bool(np.all(big < 2**24) or np.all(big * inv64 < 8e3))


def normalize(image: Any, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 1`` as float32: ``(image - lo) / (hi - lo)``.

    Values are not clipped.  If the range is flat (:func:`inverse_span`: a constant image) the
    result is all zeros, without a division warning.  The input is never
    modified.  Lazy arrays are loaded with :func:`numpy.asarray`.

    Parameters
    ----------
    image : array-like
        uint8/uint16/int/float/bool image.
    lo, hi : float
        Intensity range, typically from :func:`percentile_range`.
    out : numpy.ndarray, optional
        float32 array of the same shape to write into.

    Returns
    -------
    numpy.ndarray
        float32 array (``out`` if given).
    """
    arr = np.asarray(image)
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"lo and hi must be finite, got lo={lo}, hi={hi}")
    if out is None:
        out = np.empty(arr.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != arr.shape:
        raise ValueError(
            f"out must be a float32 array of shape {arr.shape}, got {out.dtype} {out.shape}"
        )
    inv = float(inverse_span(lo, hi))
    if inv == 0.0:
        out[...] = 0.0
        return out
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if float32_keeps(arr.dtype, lo, hi, inv):
        np.subtract(arr, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
        out *= np.float32(inv)
    else:  # a range float32 cannot hold: in float64, clipped as the prediction's normaliser
        w = (arr.astype(np.float64) * 0.5 - lo * 0.5) * (2.0 * inv)  # halves: never inf
        out[...] = np.clip(w, -1e6, 1e6, out=w)
    return out


# ---------------------------------------------------------------------------
# Axes
