"""Network probabilities -> label images.

Instances: seeds are the connected regions where the network is confident about object
*interior*; each seed then grows by watershed over the foreground (interior + boundary), so
touching nuclei separated by a predicted boundary stay separate objects.

The watershed runs in overlapping strips along the first spatial axis, with seeds labelled once
for the whole image, so working memory stays bounded on huge images while objects crossing a
strip border keep one id.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

__all__ = ["instances_from_probabilities", "classes_from_probabilities"]


def _relabel_sizes(labels: np.ndarray, min_size: int, strip: int) -> int:
    """Drop objects under ``min_size`` pixels and make ids 1..N, in place. Returns N."""
    sizes = np.bincount(labels.reshape(-1))
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(sizes.shape[0], dtype=labels.dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    for start in range(0, labels.shape[0], strip):
        part = labels[start : start + strip]
        part[...] = lut[part]
    return int(keep.sum())


def instances_from_probabilities(
    probabilities: np.ndarray,
    *,
    seed_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_size: int | None = None,
    min_seed_size: int | None = None,
    strip: int = 1024,
    margin: int = 96,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Instance labels from background / interior / boundary probabilities.

    Parameters
    ----------
    probabilities
        float ``(3, *S)``: background, interior, boundary (softmax output), ``S`` 2D or 3D.
    seed_threshold
        Interior probability above which a pixel belongs to a seed.
    foreground_threshold
        Pixels whose background probability is below ``1 - foreground_threshold`` are object.
    min_size
        Objects smaller than this (pixels/voxels) are removed. Default 10 (2D) / 40 (3D).
    min_seed_size
        Seeds smaller than this are dropped before growing (noise). Default 3 (2D) / 8 (3D).
    strip, margin
        Strip height (first spatial axis) and context for the bounded-memory watershed.
    out
        Optional int32 array ``(*S)`` to write into.

    Returns
    -------
    np.ndarray
        int32 ``(*S)``; 0 = background, objects 1..N.
    """
    prob = probabilities
    if prob.ndim not in (3, 4) or prob.shape[0] != 3:
        raise ValueError(
            "instance post-processing expects probabilities of shape (3, *spatial) "
            f"(background, interior, boundary), got {prob.shape}"
        )
    spatial = prob.shape[1:]
    nd = len(spatial)
    min_size = (10 if nd == 2 else 40) if min_size is None else min_size
    min_seed_size = (3 if nd == 2 else 8) if min_seed_size is None else min_seed_size
    labels = np.zeros(spatial, np.int32) if out is None else out
    if labels.shape != spatial:
        raise ValueError(f"out has shape {labels.shape}, expected {spatial}")

    seeds = np.empty(spatial, bool)
    for s in range(0, spatial[0], strip):
        np.greater(prob[1, s : s + strip], seed_threshold, out=seeds[s : s + strip])
    ndimage.label(seeds, output=labels)
    del seeds
    if labels.max() == 0:
        return labels
    _relabel_sizes(labels, min_seed_size, strip)

    bg_max = 1.0 - foreground_threshold
    n0 = spatial[0]
    for start in range(0, n0, strip):
        stop = min(start + strip, n0)
        lo, hi = max(0, start - margin), min(n0, stop + margin)
        fg = prob[0, lo:hi] < bg_max
        if not fg.any():
            continue
        markers = labels[lo:hi].copy()
        markers[~fg] = 0
        # grow over "1 - interior": seeds flood the interior first, meet at boundaries
        elevation = 1.0 - prob[1, lo:hi]
        grown = watershed(elevation, markers=markers, mask=fg)
        labels[start:stop] = grown[start - lo : stop - lo]
    _relabel_sizes(labels, min_size, strip)
    return labels


def classes_from_probabilities(probabilities: np.ndarray, strip: int = 1024) -> np.ndarray:
    """Class ids ``(*S)`` int32 by argmax over the class axis of ``(K, *S)`` probabilities."""
    prob = probabilities
    out = np.empty(prob.shape[1:], np.int32)
    for s in range(0, out.shape[0], strip):
        out[s : s + strip] = np.argmax(prob[:, s : s + strip], axis=0)
    return out
