"""Large arrays whose memory is mapped up front.

A prediction writes every pixel of its image-sized buffers (the blended probabilities, the
labels, the post-processing's masks). ``np.zeros`` and ``np.empty`` map those pages one fault
at a time as they are first written; in a virtual machine each such fault can cost far more
than the write itself (measured on the project's 2-core VM: 0.02 to 1.9 s to touch a fresh
200 MB array, from run to run, against 0.08-0.12 s when the same memory is mapped in one call
with ``MAP_POPULATE``; docs/benchmarks.md). So buffers of at least :data:`POPULATE_BYTES`
are taken from an anonymous mapping populated at once (Linux); elsewhere, or when the mapping
fails, they come from numpy as before. The memory is returned to the system when the array is
freed, as with numpy's own large allocations.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

POPULATE_BYTES = 16 * 2**20
_FLAGS = getattr(mmap, "MAP_POPULATE", 0)


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)


def _mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    nbytes = math.prod(shape) * dtype.itemsize
    if not _FLAGS or nbytes < POPULATE_BYTES:
        return None
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _FLAGS)
    except (OSError, ValueError, OverflowError):  # pragma: no cover - no such memory: numpy's
        return None
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def zeros(shape, dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)``, its pages mapped at once when it is large (anonymous
    memory is zero-filled)."""
    shape, dtype = _shape(shape), np.dtype(dtype)
    arr = _mapped(shape, dtype)
    return np.zeros(shape, dtype) if arr is None else arr


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, its pages mapped at once when it is large."""
    shape, dtype = _shape(shape), np.dtype(dtype)
    arr = _mapped(shape, dtype)
    return np.empty(shape, dtype) if arr is None else arr
