"""The sparse overlap of two label images, and the checks of label-image inputs.

Only the (pred, true) pairs that actually overlap are counted: the flattened pair image is
run-length compressed (objects are spatially coherent, so runs are long), then the runs are
sorted and counted with :func:`numpy.unique` and :func:`numpy.bincount`. The cost is close to
linear in the number of pixels and independent of the number of objects. The metrics built on
it are :mod:`napari_unet.metrics`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Overlap", "as_labels", "check_same_shape", "iou_matrix", "overlap"]

# Label values up to this bound are compacted with a lookup table (bincount), larger ones
# with a sort of the run-length compressed image.
_LUT_MAX = 1 << 22


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} "
            f"but {name_b} has shape {tuple(b.shape)}"
        )


def as_labels(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a non-negative integer array (no copy when already suitable).

    Booleans are accepted (one object / class 1). Floating arrays are accepted only when all
    values are finite whole numbers. Negative values are refused.
    """
    arr = np.asarray(x)
    kind = arr.dtype.kind
    if kind == "b":
        return arr.view(np.uint8)
    if kind == "u":
        if arr.dtype.itemsize == 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} contains labels larger than the int64 maximum")
        return arr
    if kind == "i":
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} contains negative labels (min {int(arr.min())})")
        return arr
    if kind == "f":
        if arr.size:
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} is a float array containing NaN or inf values")
            if np.any(arr != np.round(arr)):
                raise ValueError(
                    f"{name} is a float array with non-integer values; "
                    "a label image of integer ids is required"
                )
            if arr.min() < 0:
                raise ValueError(f"{name} contains negative labels (min {arr.min():g})")
            if arr.max() > 2**53:
                raise ValueError(f"{name} contains float labels too large to be exact")
        return arr.astype(np.int64)
    raise LabelsDtypeError(
        f"{name} must be an integer, boolean or float array, got dtype {arr.dtype}"
    )


class LabelsDtypeError(TypeError, ValueError):
    """A label image of a dtype that cannot hold ids (complex, strings ...): a ``TypeError``,
    and a ``ValueError`` too, so that the command line reports it as bad input (a complex
    TIFF given to ``napari-unet evaluate`` printed a traceback)."""


# --------------------------------------------------------------------------------------------
# sparse overlap of two label images
# --------------------------------------------------------------------------------------------


def _runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length encode a 1D array: (values, lengths)."""
    if x.size == 0:
        return x[:0], np.zeros(0, dtype=np.int64)
    change = np.empty(x.size, dtype=bool)
    change[0] = True
    np.not_equal(x[1:], x[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, x.size))
    return x[starts], lengths


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map label values to 1..n (0 stays 0).

    Returns ``(ids, areas, compact)`` where ``ids`` are the sorted nonzero label values,
    ``areas`` their pixel counts and ``compact`` the relabelled flat image (intp).
    """
    max_val = int(flat.max(initial=0))
    if max_val <= max(_LUT_MAX, 2 * flat.size):
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=max_val + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(max_val + 1, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), counts[ids].astype(np.int64), lut[flat]
    # huge label values: sort the run-length compressed image instead of a lookup table
    values, lengths = _runs(flat)
    uniq, inverse = np.unique(values, return_inverse=True)
    areas = np.bincount(inverse, weights=lengths).astype(np.int64)
    compact = np.repeat(inverse.astype(np.intp), lengths)
    if uniq[0] == 0:
        ids, areas = uniq[1:], areas[1:]
    else:
        compact += 1
        ids = uniq
    return ids.astype(np.int64), areas, compact


@dataclass(frozen=True, eq=False)
class Overlap:
    """Sparse overlap table between two label images."""

    pred_ids: np.ndarray  # (n_pred,) sorted label values
    true_ids: np.ndarray  # (n_true,)
    rows: np.ndarray  # (n_pairs,) index into pred_ids
    cols: np.ndarray  # (n_pairs,) index into true_ids
    ious: np.ndarray  # (n_pairs,) IoU of each overlapping pair

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)


def overlap(pred: Any, true: Any) -> Overlap:
    """The IoU of every overlapping (pred, true) pair of objects, as an :class:`Overlap`."""
    p = as_labels(pred, "pred")
    t = as_labels(true, "true")
    check_same_shape(p, t, "pred", "true")
    pred_ids, pred_area, pc = _compact(p.ravel())
    true_ids, true_area, tc = _compact(t.ravel())
    both = (pc > 0) & (tc > 0)
    keys = pc[both].astype(np.int64) * (true_ids.size + 1) + tc[both]
    # Objects are spatially coherent, so the flattened overlap consists of long runs of the
    # same pair: counting runs first makes the sort tiny.
    run_keys, run_len = _runs(keys)
    pair_keys, inverse = np.unique(run_keys, return_inverse=True)
    inter = np.bincount(inverse.ravel(), weights=run_len, minlength=pair_keys.size)
    rows = (pair_keys // (true_ids.size + 1) - 1).astype(np.intp)
    cols = (pair_keys % (true_ids.size + 1) - 1).astype(np.intp)
    union = pred_area[rows] + true_area[cols] - inter
    ious = inter / union if union.size else np.zeros(0, dtype=np.float64)
    return Overlap(pred_ids, true_ids, rows, cols, ious.astype(np.float64))


def iou_matrix(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every predicted and every true object.

    Overlaps are counted sparsely (only pairs that share pixels), then scattered into a
    dense matrix; the matrix itself needs ``8 * n_pred * n_true`` bytes.

    Parameters
    ----------
    pred, true : array_like
        Label images of identical shape (0 = background, ids need not be sequential).

    Returns
    -------
    ious : np.ndarray
        ``(n_pred, n_true)`` float64 matrix; ``ious[i, j]`` is the IoU of object
        ``pred_ids[i]`` with ``true_ids[j]``.
    pred_ids, true_ids : np.ndarray
        Sorted int64 label values of the objects in each image.

    Raises
    ------
    ValueError
        On shape mismatch, negative labels or non-integer float labels.
    """
    ov = overlap(pred, true)
    mat = np.zeros((ov.n_pred, ov.n_true), dtype=np.float64)
    mat[ov.rows, ov.cols] = ov.ious
    return mat, ov.pred_ids, ov.true_ids
