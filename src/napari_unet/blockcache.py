"""Reading a lazy chunked image (dask, zarr) block by block, each block once.

:class:`BlockCache` keeps the decoded blocks the tiles of a prediction need, within a memory
budget, so that overlapping tiles do not read (and decompress) the same block again.
:func:`chunk_shape` tells the block shape of an array, or None for an in-memory one.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def chunk_shape(array: Any) -> tuple[int, ...] | None:
    """Storage block shape of a lazy array (dask ``chunksize``, zarr ``chunks``), else None.

    numpy arrays (and anything without a regular block grid) give None.
    """
    if isinstance(array, np.ndarray):
        return None
    ndim = len(getattr(array, "shape", ()))
    chunks = getattr(array, "chunksize", None)  # dask
    if chunks is None:
        chunks = getattr(array, "chunks", None)  # zarr, h5py
    if not isinstance(chunks, tuple) or len(chunks) != ndim:
        return None
    out = []
    for c in chunks:
        if isinstance(c, tuple):  # dask-style per-block sizes: the regular size is the largest
            c = max(c) if c else 1
        if not isinstance(c, (int, np.integer)) or c < 1:
            return None
        out.append(int(c))
    return tuple(out)


class BlockCache:
    """Read-through cache of a lazy array's storage blocks (chunks), least recently used out.

    Tiles overlap each other and straddle block borders, so reading tile regions straight from
    a dask or zarr array reads (decompresses, computes) most blocks several times. This wrapper
    reads whole blocks, each at most once as long as the blocks still needed fit in
    ``max_bytes``, and assembles any requested region from them. It has ``shape``, ``dtype``,
    ``ndim`` and numpy-style basic indexing (ints and step-1 slices), so it can be passed to
    :func:`tiled_inference` in place of the array.

    Parameters
    ----------
    array : array-like
        The lazy array (dask, zarr, anything with ``shape``, ``dtype`` and slicing).
    max_bytes : int
        Budget of the cache in bytes (at least one block is always kept).
    chunks : tuple of int, optional
        Block shape; default :func:`chunk_shape` of ``array`` (or the whole array).

    Attributes
    ----------
    block_reads : int
        Number of blocks read from ``array`` so far (a block evicted and read again counts
        twice).
    """

    def __init__(
        self, array: Any, max_bytes: int = 512 * 2**20, chunks=None, check_finite: bool = True
    ) -> None:
        self.array = array
        #: refuse NaN/inf, block by block as they are read (as numpy inputs are refused whole)
        self.check_finite = check_finite
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        chunks = chunks if chunks is not None else chunk_shape(array)
        self.chunks = tuple(int(c) for c in (chunks or self.shape))
        if len(self.chunks) != self.ndim or min(self.chunks, default=1) < 1:
            raise ValueError(f"chunks {self.chunks} do not fit an array of shape {self.shape}")
        self.max_bytes = int(max_bytes)
        self.block_reads = 0
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def _block(self, index: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
        key = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )
        try:
            block = np.asarray(self.array[key])
        except Exception as e:
            if type(self.array).__module__.split(".")[0] != "zarr":
                raise  # dask over an OME-Zarr names the damaged chunk itself (omezarr_read)
            from .omezarr_read import damaged_chunk_error, zarr_array_path

            err = damaged_chunk_error(self.array, zarr_array_path(self.array), key, e)
            if err is e:
                raise
            raise err from e
        if self.check_finite and block.dtype.kind in "fc":
            n_bad = block.size - int(np.count_nonzero(np.isfinite(block)))
            if n_bad:
                at = tuple(k.start for k in key)
                raise ValueError(
                    f"the image contains NaN or infinite values ({n_bad} in its block starting at "
                    f"(T, Z, C, Y, X) = {at}); replace them (e.g. with numpy.nan_to_num) before "
                    "segmenting"
                )
        with self._lock:
            self.block_reads += 1
            self._cache[index] = block
            self._bytes += block.nbytes
            while self._bytes > self.max_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
        return block

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"too many indices for an array of shape {self.shape}")
        starts, stops, drop = [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, (int, np.integer)):
                k = int(k) + n if k < 0 else int(k)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} of size {n}")
                starts.append(k)
                stops.append(k + 1)
                drop.append(axis)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("BlockCache supports only step-1 slices")
                starts.append(start)
                stops.append(max(start, stop))
            else:
                raise IndexError(f"BlockCache supports ints and slices, not {type(k).__name__}")
        out = np.empty([b - a for a, b in zip(starts, stops, strict=True)], self.dtype)
        if out.size:
            ranges = [
                range(a // c, (b - 1) // c + 1)
                for a, b, c in zip(starts, stops, self.chunks, strict=True)
            ]
            for index in itertools.product(*ranges):
                block = self._block(index)
                src, dst = [], []
                for i, a, b, c in zip(index, starts, stops, self.chunks, strict=True):
                    lo, hi = max(a, i * c), min(b, (i + 1) * c)
                    src.append(slice(lo - i * c, hi - i * c))
                    dst.append(slice(lo - a, hi - a))
                out[tuple(dst)] = block[tuple(src)]
        return out.squeeze(axis=tuple(drop)) if drop else out
