"""Segmentation quality metrics.

Two families of metrics are provided:

* **Pixel metrics** on binary masks (:func:`iou`, :func:`dice`) and on class-id images
  (:func:`semantic_iou`).
* **Instance metrics** on label images, where ``0`` is background and every other integer is
  one object (:func:`iou_matrix`, :func:`match_instances`, :func:`instance_f1`,
  :func:`average_precision`, :func:`evaluate`). Ids need not be sequential, images may be 2D
  or 3D and of any integer dtype.

Instance matching is a one-to-one assignment between predicted and true objects. A pair can
only be matched if its IoU is at least the threshold; among all such matchings the one with
the largest number of pairs is chosen, ties broken by the largest summed IoU (the same
objective as Cellpose / StarDist). The average precision at a threshold is
``TP / (TP + FP + FN)``, the definition used by the 2018 Data Science Bowl and Cellpose.

The overlap between two label images is computed sparsely: only the (pred, true) pairs that
actually overlap are counted, using run-length compression of the flattened overlap followed
by :func:`numpy.unique` and :func:`numpy.bincount`, so the cost is close to linear in the
number of pixels and independent of the number of objects (:mod:`napari_unet.overlap`).
Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .overlap import Overlap as _Overlap
from .overlap import as_labels as _as_labels
from .overlap import check_same_shape as _check_same_shape
from .overlap import iou_matrix
from .overlap import overlap as _overlap

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MatchResult",
    "average_precision",
    "dice",
    "evaluate",
    "instance_f1",
    "iou",
    "iou_matrix",
    "match_instances",
    "semantic_iou",
]

#: IoU thresholds 0.50, 0.55, ..., 0.95 (COCO / Data Science Bowl style).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

# Absolute tolerance applied when comparing an IoU with a threshold, so that thresholds such
# as ``0.1 + 0.2`` or values produced by ``np.arange`` still accept IoUs that equal them
# exactly as fractions. Far below the resolution of any realistic image.
_IOU_TOL = 1e-10


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_mask(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    return arr != 0


# --------------------------------------------------------------------------------------------
# pixel metrics
# --------------------------------------------------------------------------------------------


def iou(a: Any, b: Any) -> float:
    """Intersection over union of two binary masks.

    Parameters
    ----------
    a, b : array_like
        Masks of identical shape; any nonzero value counts as foreground.

    Returns
    -------
    float
        ``|a & b| / |a | b|``; ``1.0`` when both masks are empty.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    a = _as_mask(a)
    b = _as_mask(b)
    _check_same_shape(a, b, "a", "b")
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else inter / union


def dice(a: Any, b: Any) -> float:
    """Dice coefficient (F1 score of pixels) of two binary masks.

    Parameters
    ----------
    a, b : array_like
        Masks of identical shape; any nonzero value counts as foreground.

    Returns
    -------
    float
        ``2 |a & b| / (|a| + |b|)``; ``1.0`` when both masks are empty.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    a = _as_mask(a)
    b = _as_mask(b)
    _check_same_shape(a, b, "a", "b")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    inter = int(np.count_nonzero(a & b))
    return 1.0 if total == 0 else 2.0 * inter / total


#: semantic_iou refuses class ids from here on (they are object ids, not classes)
_MAX_CLASS_ID = 65536


def semantic_iou(
    pred: Any,
    true: Any,
    num_classes: int | None = None,
    ignore_background: bool = False,
) -> dict[int, float]:
    """Per-class IoU of two class-id images.

    Parameters
    ----------
    pred, true : array_like
        Images of identical shape holding non-negative integer class ids.
    num_classes : int, optional
        Number of classes; class ids must be ``< num_classes``. Defaults to one more than the
        largest id present in either image.
    ignore_background : bool, default False
        Leave class 0 out of the result.

    Returns
    -------
    dict[int, float]
        ``{class_id: IoU}`` for every class ``0 .. num_classes - 1`` (from 1 when
        ``ignore_background``). A class absent from both images has IoU ``nan`` so that
        ``np.nanmean`` over the values gives the usual mean IoU.

    Raises
    ------
    ValueError
        On shape mismatch, negative or non-integer ids, or ids ``>= num_classes``.
    """
    p = _as_labels(pred, "pred")
    t = _as_labels(true, "true")
    _check_same_shape(p, t, "pred", "true")
    max_id = int(max(p.max(initial=0), t.max(initial=0)))
    if max_id >= _MAX_CLASS_ID or (num_classes is not None and int(num_classes) > _MAX_CLASS_ID):
        raise ValueError(
            f"class id too large: instance labels? (largest id {max_id}; semantic_iou takes "
            f"class ids below {_MAX_CLASS_ID}; for objects use instance_f1 or evaluate)"
        )
    if num_classes is None:
        num_classes = max_id + 1
    else:
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if max_id >= num_classes:
            raise ValueError(f"class id {max_id} found but num_classes is {num_classes}")
    k = num_classes
    p_flat = p.ravel().astype(np.intp, copy=False)
    t_flat = t.ravel().astype(np.intp, copy=False)
    # per-class counts, O(pixels + classes): no k x k confusion matrix
    inter = np.bincount(t_flat[t_flat == p_flat], minlength=k).astype(np.int64)
    union = np.bincount(p_flat, minlength=k) + np.bincount(t_flat, minlength=k) - inter
    start = 1 if ignore_background else 0
    result: dict[int, float] = {}
    for c in range(start, k):
        result[c] = float("nan") if union[c] == 0 else float(inter[c] / union[c])
    return result


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Result of matching predicted to true instances at one IoU threshold.

    Attributes
    ----------
    threshold : float
        IoU threshold used.
    tp, fp, fn : int
        Matched pairs, unmatched predictions, unmatched true objects.
    precision, recall, f1 : float
        ``tp / n_pred``, ``tp / n_true`` and ``2 tp / (n_pred + n_true)``; all ``1.0`` when
        both images are empty, ``0.0`` when exactly one is.
    mean_matched_iou : float
        Mean IoU of the matched pairs (``0.0`` if there are none).
    n_pred, n_true : int
        Number of objects in each image.
    pairs : np.ndarray
        ``(tp, 2)`` int64 array of ``(pred_id, true_id)`` label values, sorted by pred id.
        Read-only.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float
    n_pred: int
    n_true: int
    pairs: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        pairs = np.array(self.pairs, dtype=np.int64).reshape(-1, 2)
        pairs.setflags(write=False)
        object.__setattr__(self, "pairs", pairs)


def _check_threshold(threshold: float) -> float:
    thr = float(threshold)
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"IoU threshold must be in (0, 1], got {threshold!r}")
    return thr


def _assign(ov: _Overlap, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matching among pairs with IoU >= thr.

    Returns ``(rows, cols, ious)`` of the matched pairs. The matching maximises the number of
    pairs, then the summed IoU. The candidate graph is split into connected components; the
    (usual) components made of a single pair are matched directly and only the rest go
    through :func:`scipy.optimize.linear_sum_assignment`.
    """
    valid = ov.ious >= thr - _IOU_TOL
    rows, cols, vals = ov.rows[valid], ov.cols[valid], ov.ious[valid]
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0, dtype=np.float64)
    n_nodes = ov.n_pred + ov.n_true
    graph = coo_matrix(
        (np.ones(rows.size, dtype=np.int8), (rows, cols + ov.n_pred)), shape=(n_nodes, n_nodes)
    )
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[rows]
    edges_per_comp = np.bincount(edge_comp)
    single = edges_per_comp[edge_comp] == 1
    out_r = [rows[single]]
    out_c = [cols[single]]
    out_v = [vals[single]]
    multi = np.flatnonzero(~single)
    if multi.size:
        order = multi[np.argsort(edge_comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
        for group in np.split(order, bounds):
            r_ids, r_loc = np.unique(rows[group], return_inverse=True)
            c_ids, c_loc = np.unique(cols[group], return_inverse=True)
            k = min(r_ids.size, c_ids.size)
            # each match is worth 1 + iou/(k+1): any matching with more pairs wins, and among
            # equally large matchings the summed IoU decides (it adds less than 1 in total)
            cost = np.zeros((r_ids.size, c_ids.size), dtype=np.float64)
            cost[r_loc, c_loc] = -(1.0 + vals[group] / (k + 1))
            iou_sub = np.zeros_like(cost)
            iou_sub[r_loc, c_loc] = vals[group]
            ri, ci = linear_sum_assignment(cost)
            keep = cost[ri, ci] < 0  # drop forced assignments of non-candidate pairs
            ri, ci = ri[keep], ci[keep]
            out_r.append(r_ids[ri])
            out_c.append(c_ids[ci])
            out_v.append(iou_sub[ri, ci])
    m_rows = np.concatenate(out_r)
    m_cols = np.concatenate(out_c)
    m_vals = np.concatenate(out_v)
    order = np.argsort(m_rows, kind="stable")
    return m_rows[order], m_cols[order], m_vals[order]


def _match(ov: _Overlap, threshold: float) -> MatchResult:
    thr = _check_threshold(threshold)
    rows, cols, vals = _assign(ov, thr)
    tp = int(rows.size)
    n_pred, n_true = ov.n_pred, ov.n_true
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2.0 * tp / (n_pred + n_true)
    pairs = np.stack([ov.pred_ids[rows], ov.true_ids[cols]], axis=1)
    return MatchResult(
        threshold=thr,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        mean_matched_iou=float(vals.mean()) if tp else 0.0,
        n_pred=n_pred,
        n_true=n_true,
        pairs=pairs,
    )


def _ap(m: MatchResult) -> float:
    denom = m.tp + m.fp + m.fn
    return 1.0 if denom == 0 else m.tp / denom


def match_instances(pred: Any, true: Any, iou_threshold: float = 0.5) -> MatchResult:
    """Match predicted to true instances one-to-one at an IoU threshold.

    A pair can be matched only if its IoU is ``>= iou_threshold``; among such matchings the
    one with the most pairs (then the largest summed IoU) is chosen with
    :func:`scipy.optimize.linear_sum_assignment`.

    Parameters
    ----------
    pred, true : array_like
        Label images of identical shape (2D or 3D, any integer dtype, 0 = background).
    iou_threshold : float, default 0.5
        Minimum IoU of a true positive, in ``(0, 1]``.

    Returns
    -------
    MatchResult
        Counts, precision / recall / F1 and the matched id pairs.

    Raises
    ------
    ValueError
        On shape mismatch, negative or non-integer labels, or a threshold outside (0, 1].
    """
    return _match(_overlap(pred, true), iou_threshold)


def instance_f1(pred: Any, true: Any, iou_threshold: float = 0.5) -> float:
    """Object-level F1 score at an IoU threshold.

    Parameters
    ----------
    pred, true : array_like
        Label images of identical shape.
    iou_threshold : float, default 0.5
        Minimum IoU of a true positive.

    Returns
    -------
    float
        ``2 TP / (n_pred + n_true)``; ``1.0`` if both images are empty.
    """
    return match_instances(pred, true, iou_threshold).f1


def _thresholds(thresholds: Iterable[float]) -> list[float]:
    values = [thresholds] if np.isscalar(thresholds) else list(thresholds)
    thr = [_check_threshold(t) for t in values]
    if not thr:
        raise ValueError("at least one IoU threshold is required")
    return thr


def average_precision(
    pred: Any, true: Any, thresholds: Iterable[float] = DEFAULT_THRESHOLDS
) -> tuple[float, dict[float, float]]:
    """Average precision ``TP / (TP + FP + FN)`` over IoU thresholds.

    This is the Data Science Bowl 2018 / Cellpose definition. The overlap table is computed
    once and reused for every threshold.

    Parameters
    ----------
    pred, true : array_like
        Label images of identical shape.
    thresholds : iterable of float, default 0.5, 0.55, ..., 0.95
        IoU thresholds in ``(0, 1]``.

    Returns
    -------
    mean_ap : float
        Mean of the per-threshold values.
    per_threshold : dict[float, float]
        ``{threshold: AP}``. AP is ``1.0`` when both images are empty and ``0.0`` when only
        one is.
    """
    ov = _overlap(pred, true)
    per = {t: _ap(_match(ov, t)) for t in _thresholds(thresholds)}
    return float(np.mean(list(per.values()))), per


def evaluate(
    pred: Any, true: Any, thresholds: Iterable[float] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """Summary of instance segmentation quality (used by the command line interface).

    Parameters
    ----------
    pred, true : array_like
        Label images of identical shape.
    thresholds : iterable of float, default 0.5, 0.55, ..., 0.95
        Thresholds averaged into ``map``.

    Returns
    -------
    dict
        Plain Python values (JSON serialisable):

        - ``n_pred``, ``n_true``: object counts.
        - ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``: at IoU 0.5.
        - ``ap50``, ``ap75``: AP at IoU 0.5 and 0.75.
        - ``map``: mean AP over ``thresholds``.
        - ``mean_matched_iou``: mean IoU of the pairs matched at 0.5.
    """
    ov = _overlap(pred, true)
    thr = _thresholds(thresholds)
    m50 = _match(ov, 0.5)
    m75 = _match(ov, 0.75)
    aps = [_ap(_match(ov, t)) for t in thr]
    return {
        "n_pred": ov.n_pred,
        "n_true": ov.n_true,
        "tp": m50.tp,
        "fp": m50.fp,
        "fn": m50.fn,
        "precision": m50.precision,
        "recall": m50.recall,
        "f1": m50.f1,
        "ap50": _ap(m50),
        "ap75": _ap(m75),
        "map": float(np.mean(aps)),
        "mean_matched_iou": m50.mean_matched_iou,
    }
