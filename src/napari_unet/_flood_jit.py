"""Compiled kernel of :func:`napari_unet.postprocess.flood` (needs numba; imported lazily).

A hierarchical queue on quantised levels, with the same order as the numpy version: at level
``k`` the pixels that waited for ``k`` go first (in the order they were reached), then, breadth
first, the pixels they reach at or below ``k``; a pixel above the water waits for its own level.
A pixel takes the label of the first labelled neighbour that reaches it. Every queue is a
contiguous run of one array (sized from the histogram of the levels), so nothing is allocated
per pixel and the GIL is released while it runs (the strips of a prediction flood in threads).
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(**options):
    """numba's ``njit`` with its on-disk cache, or without it where numba finds no writable
    place for the cache (a read-only install and home): compiled again at every start then."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(fn)

    return wrap


@_compiled(inline="always")
def _visit(p, lab, todo, lev, offsets, k, fifo, w, store, fill):
    v = lab[p]
    for j in range(offsets.size):
        q = p + offsets[j]
        if todo[q]:
            todo[q] = False
            lab[q] = v
            lq = lev[q]
            if lq <= k:
                fifo[w] = q
                w += 1
            else:
                store[fill[lq]] = q
                fill[lq] += 1
    return w


@_compiled()
def flood_flat(lab, todo, lev, offsets, levels):
    """Flood in place: ``lab`` (int32, flat, 0 = to label), ``todo`` (bool, flat: the pixels
    that may be labelled), ``lev`` (uint8 levels ``< levels``), ``offsets`` (int64, the flat
    steps to the neighbours), fewer than 2**31 pixels. The arrays are padded by one pixel where
    ``todo`` is False, so no step leaves them."""
    n = lab.size
    hist = np.zeros(levels + 1, np.int64)
    for i in range(n):
        if todo[i]:
            hist[lev[i] + 1] += 1
    start = np.cumsum(hist)  # the pixels that wait for level l: store[start[l]:fill[l]]
    fill = start[:levels].copy()
    size = max(start[levels], 1)
    store = np.empty(size, np.int32)  # pixel indices: the caller keeps them under 2**31
    fifo = np.empty(size, np.int32)  # each pixel enters one queue once
    w = 0
    r = 0
    seeds = np.flatnonzero(lab)
    for b in range(seeds.size):
        w = _visit(seeds[b], lab, todo, lev, offsets, 0, fifo, w, store, fill)
    for k in range(levels):
        if k > 0:
            for b in range(start[k], fill[k]):
                w = _visit(store[b], lab, todo, lev, offsets, k, fifo, w, store, fill)
        while r < w:
            w = _visit(fifo[r], lab, todo, lev, offsets, k, fifo, w, store, fill)
            r += 1
