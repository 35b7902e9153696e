"""Labels (what the user paints in napari) -> training targets for the network.

Instance task: every pixel gets one of three classes, ``BACKGROUND`` (0), ``INTERIOR`` (1) or
``BOUNDARY`` (2). Boundary pixels are the object pixels that touch another label (background or a
different object): they are what lets the network separate touching nuclei. Semantic task: the
label value is the class id.

Pixels outside the optional ``mask`` (the part of the image the user actually corrected) get
``IGNORE`` (-1) and contribute nothing to the loss.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .synthetic_render import relabel_sequential

__all__ = [
    "BACKGROUND",
    "INTERIOR",
    "BOUNDARY",
    "IGNORE",
    "instance_targets",
    "semantic_targets",
    "check_labels",
    "compact_labels",
]

BACKGROUND, INTERIOR, BOUNDARY, IGNORE = 0, 1, 2, -1


def check_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as an integer array, refusing what cannot be a label image."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)):
            if np.all(labels == np.round(labels)):
                return labels.astype(np.int64)
        raise ValueError(
            f"{name} must hold integer label ids (0 = background), got dtype {labels.dtype} "
            "with non-integer values"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} contain negative values; label ids must be >= 0")
    return labels


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` with ids ``1..N`` when its largest id is more than it has pixels (or more than
    int32 holds): label images from other tools may number objects with huge ids (2**40 ...),
    and per-id tables (bincount, ``ndimage.sum_labels``) would need memory for every id. The
    objects, and which pixels form each, are unchanged; otherwise ``labels`` is returned as is.
    """
    labels = check_labels(labels)
    top = int(labels.max()) if labels.size else 0
    if top <= min(labels.size, np.iinfo(np.int32).max):
        return labels
    return relabel_sequential(labels)[0].astype(np.int32)


def _boundaries(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Object pixels with a face-neighbour of another value (background or another object).

    With a ``mask``, only neighbours inside the mask count: labels outside are not trusted.
    """
    edge = np.zeros(labels.shape, dtype=bool)
    for ax in range(labels.ndim):
        a = [slice(None)] * labels.ndim
        b = [slice(None)] * labels.ndim
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        diff = labels[tuple(a)] != labels[tuple(b)]
        if mask is not None:
            diff &= mask[tuple(a)] & mask[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    return edge & (labels > 0)


def instance_targets(
    labels: np.ndarray, mask: np.ndarray | None = None, thick: bool = False
) -> np.ndarray:
    """Three-class targets from an instance label image.

    Parameters
    ----------
    labels
        Integer array ``(*S)``: 0 = background, 1..N = objects.
    mask
        Optional bool array ``(*S)``: True where the labels are trustworthy. Elsewhere the
        target is ``IGNORE``.
    thick
        Also mark background pixels next to an object as boundary (thicker separation lines).

    Returns
    -------
    np.ndarray
        int64 ``(*S)`` with values in {IGNORE, BACKGROUND, INTERIOR, BOUNDARY}.
    """
    labels = check_labels(labels)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
    target = np.where(labels > 0, INTERIOR, BACKGROUND).astype(np.int64)
    edge = _boundaries(labels, mask)
    if thick:
        edge |= ndimage.binary_dilation(edge) & (labels == 0)
    target[edge] = BOUNDARY
    if mask is not None:
        target[~mask] = IGNORE
    return target


def semantic_targets(
    labels: np.ndarray, num_classes: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """Class-id targets ``(*S)`` int64; label values must be < ``num_classes``."""
    labels = check_labels(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"labels contain class id {int(labels.max())} but the model has {num_classes} "
            f"classes (0..{num_classes - 1}); create a model with more classes"
        )
    target = labels.astype(np.int64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
        target[~mask] = IGNORE
    return target
