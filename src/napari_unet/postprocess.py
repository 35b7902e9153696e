"""Network probabilities -> label images.

Instances: seeds are the connected regions where the network is confident about object
*interior*; each seed then grows by watershed over the foreground (interior + boundary), so
touching nuclei separated by a predicted boundary stay separate objects.

The watershed runs in overlapping strips along the first spatial axis, with seeds labelled once
for the whole image, so working memory stays bounded on huge images while objects crossing a
strip border keep one id.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from . import _memory
from .metrics import _overlap

__all__ = [
    "instances_from_probabilities",
    "classes_from_probabilities",
    "link_to_previous",
    "voxel_volume",
]


def voxel_volume(spacing: tuple[float, ...] | None, ndim: int) -> float:
    """Volume of one voxel in units of an isotropic voxel at the in-plane (Y, X) resolution.

    ``spacing`` is ``(Z, Y, X)`` (or ``(Y, X)``) physical sizes; 2D and ``None`` give 1. With
    ``spacing=(4, 1, 1)`` one voxel is as big as four isotropic ones.
    """
    if spacing is None or ndim < 3:
        return 1.0
    sz, sy, sx = (float(v) for v in spacing[-3:])
    return sz / float(np.sqrt(sy * sx))


def _relabel_sizes(labels: np.ndarray, min_size: int, strip: int) -> int:
    """Drop objects under ``min_size`` pixels and make ids 1..N, in place. Returns N."""
    # counted in strips: bincount copies its input to int64 (512 MB for 8192x8192 at once)
    n = int(labels.max()) + 1
    sizes = np.zeros(n, np.int64)
    for start in range(0, labels.shape[0], strip):
        sizes += np.bincount(labels[start : start + strip].reshape(-1), minlength=n)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(sizes.shape[0], dtype=labels.dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)

    def one(start: int) -> None:
        part = labels[start : start + strip]
        part[...] = lut[part]

    _each(one, range(0, labels.shape[0], strip), _threads_for(labels.size))
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
    spacing: tuple[float, ...] | None = None,
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
    spacing
        Physical voxel size ``(Z, Y, X)`` of a 3D input. ``min_size`` and ``min_seed_size`` are
        then volumes in isotropic voxels at the Y/X resolution, so an object in a volume with
        thick slices is not dropped for having few voxels (see :func:`voxel_volume`).

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
    vv = voxel_volume(spacing, nd)
    if vv != 1.0:
        min_size = int(np.ceil(min_size / vv))
        min_seed_size = int(np.ceil(min_seed_size / vv))
    labels = _memory.zeros(spatial, np.int32) if out is None else out
    if labels.shape != spatial:
        raise ValueError(f"out has shape {labels.shape}, expected {spatial}")

    seeds = _memory.empty(spatial, bool)
    for s in range(0, spatial[0], strip):
        np.greater(prob[1, s : s + strip], seed_threshold, out=seeds[s : s + strip])
    ndimage.label(seeds, output=labels)
    if labels.max() == 0:
        return labels
    _relabel_sizes(labels, min_seed_size, strip)
    seeds = labels > 0  # seeds that survived the size filter
    _grow(prob, labels, seeds, 1.0 - foreground_threshold, strip, margin)
    _relabel_sizes(labels, min_size, strip)
    return labels


def _grow(prob, labels, seeds, bg_max: float, strip: int, margin: int) -> None:
    """Grow the seeds in ``labels`` over the foreground, in place.

    Equal to a watershed of ``1 - interior`` from the seeds within the foreground, done where
    it is needed only:

    * a connected piece of foreground holding no seed stays background, one holding a single
      seed becomes that object whole (most nuclei: no flooding at all);
    * pieces with several seeds are flooded, over the pixels that are not seed plus the seed
      pixels next to them (the inside of a seed can only pass on its own label), with the
      elevation quantised to 256 levels (ties go to the seed that got there first).

    On a 2048x2048 image of nuclei this floods about a third of the foreground pixels.
    """
    fg = prob[0] < bg_max
    comp = _memory.empty(labels.shape, np.int32)
    n = ndimage.label(fg, output=comp)
    del fg  # the components hold it (comp > 0); one image-sized array fewer at the peak
    if n == 0:
        labels[...] = 0
        return
    # the component of each seed, and the number of seeds per component
    seed_comp = np.zeros(int(labels.max()) + 1, np.int64)
    for start in range(0, labels.shape[0], strip):  # in strips: no image-sized index arrays
        sd = seeds[start : start + strip]
        seed_comp[labels[start : start + strip][sd]] = comp[start : start + strip][sd]
    per = np.bincount(seed_comp[1:], minlength=n + 1)
    per[0] = 0
    only = np.zeros(n + 1, labels.dtype)  # component -> its single seed's label
    ones = np.flatnonzero(seed_comp[1:] > 0) + 1
    single = per[seed_comp[ones]] == 1
    only[seed_comp[ones[single]]] = ones[single]
    many = per >= 2
    del seed_comp
    n0 = labels.shape[0]
    strip, workers = _strip_plan(n0, labels[0].size, strip, margin)

    def one(start: int) -> None:
        # Strips are independent: a strip reads its neighbours' rows (its margin) only at seed
        # pixels of components with several seeds, which every strip writes back unchanged.
        stop = min(start + strip, n0)
        lo, hi = max(0, start - margin), min(n0, stop + margin)
        c = comp[lo:hi]
        multi = many[c]
        grown = only[c]
        if multi.any():
            sd = seeds[lo:hi]
            # seed pixels that touch a pixel to flood pass their label on; the others cannot
            open_ = multi & ~sd
            edge = sd & multi & ndimage.binary_dilation(open_)
            markers = np.where(edge, labels[lo:hi], 0)
            if np.count_nonzero(open_) < SMALL_FLOOD:
                ws = watershed(1.0 - prob[1, lo:hi], markers=markers, mask=open_ | edge)
            else:
                ws = flood(1.0 - prob[1, lo:hi], markers, open_)
            inside = sd & multi
            grown = np.where(inside, labels[lo:hi], np.where(open_, ws, grown))
        labels[start:stop] = grown[start - lo : stop - lo]

    _each(one, range(0, n0, strip), workers)


def _strip_plan(n0: int, width: int, strip: int, margin: int) -> tuple[int, int]:
    """Rows per strip of the watershed and how many strips run at once.

    A strip holds at most ~4 Mpx (its working arrays stay ~150 MB however wide the image).
    With several threads (torch's count, which ``num_threads`` sets) and an image of 1 Mpx or
    more, strips get shorter so that every thread has one, down to ``4 * margin`` rows; the
    strips in flight hold at most :data:`IN_FLIGHT_PIXELS` together, and images over
    :data:`PARALLEL_MAX_PIXELS` run one strip at a time (an 8192x8192 image stays under 1 GB).
    """
    rows = max(4 * margin, min(strip, (1 << 22) // max(1, width)))
    threads = _threads_for(n0 * width)
    if threads <= 1:
        return rows, 1
    rows = max(4 * margin, min(rows, -(-n0 // threads)))
    workers = min(threads, -(-n0 // rows), max(1, IN_FLIGHT_PIXELS // (rows * width)))
    return rows, workers


def _threads_for(pixels: int) -> int:
    """Threads for post-processing an image: torch's count (which ``num_threads`` sets), or 1
    under 1 Mpx (threads cost more than the margins they add) and over
    :data:`PARALLEL_MAX_PIXELS` (memory)."""
    if pixels < 1 << 20 or pixels > PARALLEL_MAX_PIXELS:
        return 1
    return max(1, torch.get_num_threads())


def _each(fn, items, workers: int) -> None:
    """``fn(item)`` for every item, in ``workers`` threads (scikit-image's watershed, scipy's
    morphology and numpy's indexing release the GIL)."""
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):  # re-raises a strip's error here
            pass


#: Images up to this many pixels post-process strips in parallel (see :func:`_strip_plan`).
PARALLEL_MAX_PIXELS = 1 << 25
#: The pixels (margins left out) of the strips in flight at once, all threads together.
IN_FLIGHT_PIXELS = 1 << 23


#: Fewer pixels to flood than this go to skimage's watershed (faster on small areas, where the
#: per-level overhead of :func:`flood` dominates); more go to :func:`flood`.
SMALL_FLOOD = 1 << 17
#: Elevation levels of :func:`flood` (the valley between two touching nuclei is found to 1/64
#: of the interior probability).
LEVELS = 64


def flood(elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed: the pixels of ``mask`` take the label of the marker that floods them
    first as the water rises over ``elevation`` (0..1), neighbours by faces (4 in 2D, 6 in 3D).

    A priority flood on :data:`LEVELS` quantised levels: at each level a breadth-first front
    moves from the labelled pixels into the unlabelled ``mask`` pixels up to that level. Mask
    pixels no marker reaches stay 0. Compiled by numba when it is installed (the ``[all]``
    extra; :mod:`napari_unet._flood_jit`), else as whole numpy arrays of pixel indices (no
    per-pixel Python); both are several times faster than
    :func:`skimage.segmentation.watershed` where most of the image is to flood (noise-like
    predictions), with the same objects (measured on real images in ``docs/benchmarks.md``).
    Returns the labels (markers included) as a new array.
    """
    shape = markers.shape
    pad = [(1, 1)] * markers.ndim
    lab = np.pad(markers.astype(np.int32, copy=False), pad).reshape(-1)
    todo = np.pad(mask & (markers == 0), pad).reshape(-1)
    lev = np.pad(np.clip(elevation * LEVELS, 0, LEVELS - 1).astype(np.uint8), pad).reshape(-1)
    dims = tuple(s + 2 for s in shape)
    strides = np.cumprod((1,) + dims[::-1][:-1])[::-1]
    offsets = np.concatenate([strides, -strides]).astype(np.int64)
    kernel = _compiled_flood() if lab.size < 2**31 else None  # its queues are int32
    if kernel is not None:
        kernel(lab, todo, lev, offsets, LEVELS)
    else:
        _flood_numpy(lab, todo, lev, offsets)
    return lab.reshape(dims)[tuple(slice(1, -1) for _ in shape)].copy()


def _flood_numpy(lab: np.ndarray, todo: np.ndarray, lev: np.ndarray, offsets: np.ndarray) -> None:
    """:func:`flood` without numba, in place on its padded flat arrays: at each level a
    breadth-first front of whole numpy arrays of pixel indices (no per-pixel Python)."""
    buckets: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(LEVELS)]
    front = np.flatnonzero(lab)
    for k in range(LEVELS):
        if buckets[k]:  # pixels above the water until now, reached from labelled neighbours
            pix = np.concatenate([b[0] for b in buckets[k]])
            val = np.concatenate([b[1] for b in buckets[k]])
            buckets[k] = []
            free = todo[pix]
            pix, first = np.unique(pix[free], return_index=True)  # first come, first served
            lab[pix] = val[free][first]
            todo[pix] = False
            front = np.concatenate([front, pix])
        while front.size:
            reached = []
            for off in offsets:
                nb = front + off
                free = todo[nb]
                if not free.any():
                    continue
                nb, val = nb[free], lab[front[free]]
                level = lev[nb]
                low = level <= k
                if not low.all():  # wait in the bucket of their level
                    high = ~low
                    hn, hv, hl = nb[high], val[high], level[high]
                    order = np.argsort(hl, kind="stable")
                    hn, hv, hl = hn[order], hv[order], hl[order]
                    cuts = np.flatnonzero(np.diff(hl)) + 1
                    for a, b in zip(np.r_[0, cuts], np.r_[cuts, hl.size], strict=True):
                        buckets[int(hl[a])].append((hn[a:b], hv[a:b]))
                    nb, val = nb[low], val[low]
                lab[nb] = val
                todo[nb] = False
                reached.append(nb)
            front = np.unique(np.concatenate(reached)) if reached else np.empty(0, np.int64)


#: False: :func:`flood` always runs its numpy version (tests set it; without numba, or when it
#: cannot compile, :func:`_compiled_flood` gives None and the numpy version runs as well).
USE_NUMBA = True
_kernel_lock = threading.Lock()
_kernel: list = []  # [the compiled kernel or None], once looked for


def _compiled_flood():
    """numba's compiled :func:`flood` kernel, or None (numba not installed, or it failed to
    compile: then a ``RuntimeWarning`` says so once and the numpy version runs)."""
    if not USE_NUMBA:
        return None
    if _kernel:  # looked for already (every strip of every prediction asks)
        return _kernel[0]
    with _kernel_lock:
        if not _kernel:
            try:
                import numba

                if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: its loops would be Python
                    raise ImportError("numba's compiler is switched off")
                from ._flood_jit import flood_flat

                # compile (or load from numba's cache) now, on a tiny image, not mid-strip
                lab = np.array([0, 1, 0, 0], np.int32)
                todo = np.array([False, False, True, False])
                flood_flat(lab, todo, np.zeros(4, np.uint8), np.array([1, -1], np.int64), LEVELS)
                if lab[2] != 1:
                    raise RuntimeError("the compiled flood gave a wrong result")
                _kernel.append(flood_flat)
            except ImportError:
                _kernel.append(None)
            except Exception as e:  # a numba/numpy mismatch: slower, never wrong
                warnings.warn(
                    f"napari-unet: numba could not compile the watershed ({e}); "
                    "using the slower numpy version",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _kernel.append(None)
        return _kernel[0]


def classes_from_probabilities(probabilities: np.ndarray, strip: int = 1024) -> np.ndarray:
    """Class ids ``(*S)`` int32 by argmax over the class axis of ``(K, *S)`` probabilities."""
    prob = probabilities
    out = _memory.empty(prob.shape[1:], np.int32)
    for s in range(0, out.shape[0], strip):
        out[s : s + strip] = np.argmax(prob[:, s : s + strip], axis=0)
    return out


def link_to_previous(
    previous: np.ndarray | None,
    current: np.ndarray,
    next_id: int,
    *,
    min_iou: float = 0.2,
    strip: int = 1024,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Give the objects of a slice the ids of the objects they continue in the previous slice.

    Objects of ``current`` (ids 1..N of one slice) are matched one to one with objects of
    ``previous`` (the already final labels of the slice before) by overlap: pairs are taken
    greedily by decreasing intersection-over-union, down to ``min_iou``. A matched object takes
    the previous object's id, so a 3D object predicted slice by slice keeps one id; the others
    get new ids ``next_id, next_id + 1, ...``.

    Parameters
    ----------
    previous
        int labels of the previous slice (any ids), or None for the first slice.
    current
        int labels of this slice, same shape.
    next_id
        The first unused id.
    min_iou
        Smallest intersection-over-union of a match.
    out
        Optional int32 array to write into (may be ``current`` itself).

    Returns
    -------
    (np.ndarray, int)
        int32 labels of ``current`` with final ids, and the next unused id.
    """
    n = int(current.max()) if current.size else 0
    lut = np.zeros(n + 1, np.int64)
    if n == 0:
        if out is None:
            return np.zeros(current.shape, np.int32), next_id
        out[...] = 0
        return out, next_id
    sizes = np.bincount(current.reshape(-1), minlength=n + 1)
    present = np.flatnonzero(sizes)
    present = present[present > 0]
    if previous is not None and previous.shape != current.shape:
        raise ValueError(f"previous slice has shape {previous.shape}, this one {current.shape}")
    if previous is not None and previous.any():
        ov = _overlap(current, previous)  # IoU of every overlapping pair, sparse
        used_c: set[int] = set()
        used_p: set[int] = set()
        for j in np.argsort(-ov.ious, kind="stable"):
            if ov.ious[j] < min_iou:
                break
            c, pi = int(ov.rows[j]), int(ov.cols[j])
            if c in used_c or pi in used_p:
                continue
            used_c.add(c)
            used_p.add(pi)
            lut[ov.pred_ids[c]] = ov.true_ids[pi]
    fresh = present[lut[present] == 0]
    lut[fresh] = np.arange(next_id, next_id + len(fresh))
    if lut.max() > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31 objects: the labels do not fit in int32")
    lut32 = lut.astype(np.int32)
    if out is None:
        out = np.empty(current.shape, np.int32)
    for s in range(0, current.shape[0], strip):
        out[s : s + strip] = lut32[current[s : s + strip]]
    return out, next_id + len(fresh)
