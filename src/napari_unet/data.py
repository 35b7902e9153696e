"""Synthetic data, intensity normalisation and axis handling.

This module is pure numpy/scipy/scikit-image.  It never imports napari, Qt,
magicgui or torch; dask and zarr are only imported lazily inside functions.

Three groups of helpers live here:

* **Synthetic nuclei** -- :func:`make_nuclei` and :func:`make_nuclei_series`
  render fluorescence-like images together with their exact instance labels.
* **Normalisation** -- :func:`check_finite`, :func:`percentile_range` and
  :func:`normalize`.
* **Axes** -- :func:`validate_axes`, :func:`guess_axes`, :func:`to_canonical`
  and :func:`from_canonical`.  Axis letters are ``T`` (time), ``Z``, ``C``
  (channels; ``S`` is accepted as an alias), ``Y`` and ``X``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "AXIS_LETTERS",
    "CANONICAL_AXES",
    "check_finite",
    "from_canonical",
    "guess_axes",
    "make_nuclei",
    "make_nuclei_series",
    "normalize",
    "percentile_range",
    "to_canonical",
    "validate_axes",
]

#: Axis letters understood by the axis helpers, in canonical order.
AXIS_LETTERS = "TZCYX"
#: Canonical axis order used internally.
CANONICAL_AXES = "TZCYX"

# ---------------------------------------------------------------------------
# Synthetic nuclei
# ---------------------------------------------------------------------------

_N_MODES = 3  # number of low-frequency modes of the boundary perturbation
_TEXTURE_AMPLITUDE = 0.2  # +-20 % interior texture
_TARGET_COVERAGE = 0.33  # nominal area fraction before overlap/edge losses


@dataclass
class _Objects:
    """Parameters of a set of ellipse/ellipsoid objects in physical units.

    Physical units are xy pixels; the z coordinate is multiplied by the
    anisotropy (z spacing / xy spacing).
    """

    centers: np.ndarray  # (n, d)
    semi_axes: np.ndarray  # (n, d)
    rotations: np.ndarray  # (n, d, d); columns are the principal directions
    mode_dirs: np.ndarray  # (n, M, d) unit vectors of the boundary modes
    mode_freq: np.ndarray  # (n, M)
    mode_phase: np.ndarray  # (n, M)
    mode_amp: np.ndarray  # (n, M)
    brightness: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.centers)

    @property
    def bounding_radius(self) -> np.ndarray:
        """Radius of a sphere that contains each object, shape ``(n,)``."""
        return self.semi_axes.max(axis=1) * (1.0 + self.mode_amp.sum(axis=1))


def _random_rotations(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    """``n`` uniformly distributed random rotation matrices, shape ``(n, ndim, ndim)``."""
    if ndim == 2:
        angle = rng.uniform(0.0, np.pi, size=n)
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    q, r = np.linalg.qr(rng.standard_normal((n, ndim, ndim)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    flip = np.linalg.det(q) < 0
    q[flip, :, 0] *= -1.0
    return q


def _random_unit_vectors(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    v = rng.standard_normal((n, ndim))
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return v / norm


def _radial_extent(rotation: np.ndarray, semi_axes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Distance from the centre to the ellipse boundary along unit vectors ``u``.

    ``rotation`` (k, d, d), ``semi_axes`` (k, d) and ``u`` (k, d) describe k
    (object, direction) pairs.
    """
    q = np.einsum("ki,kij->kj", u, rotation) / semi_axes
    return 1.0 / np.maximum(np.linalg.norm(q, axis=1), 1e-12)


def _default_n_objects(
    shape: tuple[int, ...], spacing: np.ndarray, radius: tuple[float, float]
) -> int:
    """Number of objects that fills roughly 25-35 % of the image."""
    a, b = float(radius[0]), float(radius[1])
    ndim = len(shape)
    mean_ratio = 0.8  # mean of U(0.6, 1.0)
    if ndim == 2:
        mean_r2 = (a * a + a * b + b * b) / 3.0
        mean_size = math.pi * mean_r2 * mean_ratio
        mean_r = 0.5 * (a + b)
    else:
        mean_r3 = (b**4 - a**4) / (4.0 * (b - a)) if b > a else a**3
        mean_size = 4.0 / 3.0 * math.pi * mean_r3 * mean_ratio**2 / spacing[0]
        mean_r = 0.5 * (a + b)
    # Objects centred near a border are partly cut off: compensate roughly.
    edge_loss = 1.0
    for n, s in zip(shape, spacing, strict=True):
        edge_loss *= max(1.0 - 0.4 * mean_r / (n * s), 0.3)
    n_obj = _TARGET_COVERAGE * math.prod(shape) / (mean_size * edge_loss)
    return max(1, round(n_obj))


def _sample_objects(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    n_objects: int,
    radius: tuple[float, float],
    touching: float,
) -> _Objects:
    """Draw object shapes and place them, a fraction ``touching`` in clusters."""
    ndim = len(shape)
    n = n_objects
    extent = np.asarray(shape, dtype=float) * spacing  # physical size of the image

    r = rng.uniform(radius[0], radius[1], size=n)
    ratios = rng.uniform(0.6, 1.0, size=(n, ndim - 1))
    semi_axes = np.concatenate([r[:, None], r[:, None] * ratios], axis=1)
    rotations = _random_rotations(rng, n, ndim)
    mode_dirs = _random_unit_vectors(rng, n * _N_MODES, ndim).reshape(n, _N_MODES, ndim)
    mode_freq = rng.uniform(1.5, 3.5, size=(n, _N_MODES))
    mode_phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, _N_MODES))
    mode_amp = rng.uniform(0.01, 0.045, size=(n, _N_MODES))
    brightness = rng.uniform(0.5, 1.5, size=n)
    objs = _Objects(
        centers=np.zeros((n, ndim)),
        semi_axes=semi_axes,
        rotations=rotations,
        mode_dirs=mode_dirs,
        mode_freq=mode_freq,
        mode_phase=mode_phase,
        mode_amp=mode_amp,
        brightness=brightness,
    )
    if n == 0:
        return objs

    # Which objects are attached to an already placed neighbour.
    n_touch = int(round(np.clip(touching, 0.0, 1.0) * n))
    if touching > 0 and n >= 2:
        n_touch = max(n_touch, 1)
    n_touch = min(n_touch, n - 1)
    attach = np.zeros(n, dtype=bool)
    if n_touch > 0:
        attach[1 + rng.permutation(n - 1)[:n_touch]] = True

    _place_objects(rng, objs, extent, attach)
    return objs


_GAP = 1.5  # minimum gap (pixels) between objects that are not meant to touch


def _clearance(
    cand: np.ndarray,
    cand_rb: np.ndarray,
    placed: np.ndarray,
    placed_rb: np.ndarray,
    factor: float,
    gap: float,
    exclude: np.ndarray | None = None,
    mutual: bool = False,
) -> np.ndarray:
    """Smallest ``distance - factor * (rb_i + rb_j) - gap`` of each candidate to other objects.

    Objects are the ``placed`` ones (``exclude[i]`` is an index into ``placed``
    that candidate ``i`` may overlap, or -1) and, if ``mutual``, the
    candidates that precede it.  Negative values mean a conflict; ``inf``
    means no object within reach.  Returns shape ``(len(cand),)``.
    """
    from scipy.spatial import cKDTree

    clear = np.full(len(cand), np.inf)
    if len(cand) == 0:
        return clear
    rb_max = float(cand_rb.max())
    if len(placed):
        rb_max = max(rb_max, float(placed_rb.max()))
    reach = factor * 2.0 * rb_max + gap
    tree = cKDTree(cand)
    if len(placed):
        pairs = tree.sparse_distance_matrix(cKDTree(placed), reach, output_type="ndarray")
        i, j = pairs["i"], pairs["j"]
        val = pairs["v"] - factor * (cand_rb[i] + placed_rb[j]) - gap
        if exclude is not None:
            val[exclude[i] == j] = np.inf
        np.minimum.at(clear, i, val)
    if mutual:
        pairs = tree.query_pairs(reach, output_type="ndarray")
        if len(pairs):
            i, j = pairs.min(axis=1), pairs.max(axis=1)
            dist = np.sqrt(((cand[i] - cand[j]) ** 2).sum(axis=1))
            np.minimum.at(clear, j, dist - factor * (cand_rb[i] + cand_rb[j]) - gap)
    return clear


def _pick_candidates(clear: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For ``k`` candidates per object (rows), the first conflict-free one per row.

    Returns (column index, whether a conflict-free candidate exists).
    """
    ok = clear.reshape(-1, k) > 0
    return np.argmax(ok, axis=1), ok.any(axis=1)


def _place_objects(
    rng: np.random.Generator,
    objs: _Objects,
    extent: np.ndarray,
    attach: np.ndarray,
    max_rounds: int = 12,
) -> None:
    """Set ``objs.centers`` in place.

    Isolated objects are thrown at random positions that keep a small gap to
    every other object; objects flagged in ``attach`` are then placed so that
    they overlap an already placed object (forming clusters).  Placement runs
    in vectorised rounds: every round proposes several positions per unplaced
    object, keeps the first conflict-free one and accepts it unless it clashes
    with a proposal of another object.  Objects without a place after
    ``max_rounds`` go to the position with the most room among a few random
    ones (they may overlap a neighbour).
    """
    n, ndim = objs.centers.shape
    centers = objs.centers
    rb = objs.bounding_radius
    placed = np.zeros(n, dtype=bool)

    def accept(todo: np.ndarray, cand: np.ndarray, k: int, clear: np.ndarray) -> np.ndarray:
        col, found = _pick_candidates(clear, k)
        rows = np.flatnonzero(found)
        chosen = cand.reshape(todo.size, k, ndim)[rows, col[rows]]
        # proposals of different objects must not clash either
        ok = _clearance(chosen, rb[todo[rows]], chosen[:0], rb[:0], 1.0, 0.0, mutual=True) > 0
        centers[todo[rows[ok]]] = chosen[ok]
        placed[todo[rows[ok]]] = True
        return todo[~placed[todo]]

    todo = np.flatnonzero(~attach)
    for _ in range(max_rounds):
        if todo.size == 0:
            break
        k = int(np.clip(512 // todo.size, 1, 16))
        cand = rng.uniform(0.0, 1.0, size=(todo.size * k, ndim)) * extent
        pool = np.flatnonzero(placed)
        clear = _clearance(cand, np.repeat(rb[todo], k), centers[pool], rb[pool], 1.0, _GAP)
        todo = accept(todo, cand, k, clear)
    leftover = [todo]

    todo = np.flatnonzero(attach)
    if not placed.any() and todo.size:
        centers[todo[0]] = rng.uniform(0.0, 1.0, size=ndim) * extent
        placed[todo[0]] = True
        todo = todo[1:]
    for _ in range(max_rounds):
        if todo.size == 0:
            break
        k = int(np.clip(512 // todo.size, 1, 16))
        pool = np.flatnonzero(placed)
        obj = np.repeat(todo, k)
        anchor = rng.integers(pool.size, size=obj.size)  # index into pool
        a = pool[anchor]
        u = _random_unit_vectors(rng, obj.size, ndim)
        reach = _radial_extent(objs.rotations[a], objs.semi_axes[a], u)
        reach = reach + _radial_extent(objs.rotations[obj], objs.semi_axes[obj], u)
        cand = centers[a] + u * (reach * rng.uniform(0.78, 0.95, size=obj.size))[:, None]
        clear = _clearance(cand, rb[obj], centers[pool], rb[pool], 0.75, 0.0, exclude=anchor)
        clear[~np.all((cand >= 0) & (cand < extent), axis=1)] = -np.inf
        todo = accept(todo, cand, k, clear)
    leftover.append(todo)

    # crowded: put the rest where there is most room among a few random positions
    rest = np.concatenate(leftover)
    if rest.size:
        k = 16
        cand = rng.uniform(0.0, 1.0, size=(rest.size * k, ndim)) * extent
        pool = np.flatnonzero(placed)
        clear = _clearance(cand, np.repeat(rb[rest], k), centers[pool], rb[pool], 1.0, 0.0)
        best = np.argmax(clear.reshape(rest.size, k), axis=1)
        centers[rest] = cand.reshape(rest.size, k, ndim)[np.arange(rest.size), best]


def _render_labels(
    shape: tuple[int, ...],
    spacing: np.ndarray,
    objs: _Objects,
    centers: np.ndarray | None = None,
    batch_elements: int = 1 << 20,
) -> np.ndarray:
    """Rasterise the objects; overlapping pixels go to the object closest in elliptic distance.

    All objects are evaluated together on the pixels of their bounding boxes
    (flattened into one long vector, in batches of at most ``batch_elements``
    pixels), so the cost is proportional to the total bounding-box area.

    Returns int32 labels where object ``k`` has id ``k + 1`` (not yet cleaned).
    """
    ndim = len(shape)
    if centers is None:
        centers = objs.centers
    labels = np.zeros(shape, dtype=np.int32)
    n = len(objs)
    if n == 0:
        return labels
    flat_labels = labels.reshape(-1)
    best = np.full(labels.size, np.inf, dtype=np.float32)

    rot = objs.rotations
    grow = 1.0 + objs.mode_amp.sum(axis=1)
    # half extent of every (perturbed) object along each image axis, in pixels
    half = np.sqrt(((rot * objs.semi_axes[:, None, :]) ** 2).sum(axis=2))
    half = half * grow[:, None] / spacing + 1.0
    centre_px = centers / spacing
    lo = np.clip(np.floor(centre_px - half).astype(np.int64), 0, None)
    hi = np.minimum(np.ceil(centre_px + half).astype(np.int64) + 1, np.asarray(shape))
    sizes = np.clip(hi - lo, 0, None)
    totals = sizes.prod(axis=1)
    strides = np.cumprod((1,) + shape[:0:-1])[::-1]  # C-order strides in elements

    # per-object matrices mapping physical offsets to normalised principal coordinates
    to_frame = (rot / objs.semi_axes[:, None, :]).astype(np.float32)  # (n, i, j)
    mode_w = (objs.mode_dirs * objs.mode_freq[:, :, None]).astype(np.float32)  # (n, m, j)
    mode_phase = objs.mode_phase.astype(np.float32)
    mode_amp = objs.mode_amp.astype(np.float32)
    grow2 = (grow**2).astype(np.float32)
    ctr = centers.astype(np.float32)
    sp = spacing.astype(np.float32)

    # split the objects into batches of bounded total box size
    order = np.flatnonzero(totals > 0)
    cum = np.cumsum(totals[order])
    batch_id = cum // max(int(batch_elements), 1)
    for b in np.unique(batch_id):
        idx = order[batch_id == b]
        tot = totals[idx]
        count = int(tot.sum())
        obj = np.repeat(idx, tot)
        first = np.cumsum(tot) - tot
        local = np.arange(count, dtype=np.int64) - np.repeat(first, tot)
        # unravel the local index inside each object's box (C order)
        coords = [None] * ndim
        for i in range(ndim - 1, 0, -1):
            size_i = sizes[obj, i]
            coords[i] = local % size_i
            local //= size_i
        coords[0] = local
        lin = np.zeros(count, dtype=np.int64)
        diffs = []
        for i in range(ndim):
            p_i = coords[i] + lo[obj, i]
            lin += p_i * strides[i]
            diffs.append(p_i.astype(np.float32) * sp[i] - ctr[obj, i])
        q = []
        for j in range(ndim):
            acc = diffs[0] * to_frame[obj, 0, j]
            for i in range(1, ndim):
                acc += diffs[i] * to_frame[obj, i, j]
            q.append(acc)
        rho2 = q[0] * q[0]
        for j in range(1, ndim):
            rho2 += q[j] * q[j]
        near = rho2 < grow2[obj]
        obj, lin, rho2 = obj[near], lin[near], rho2[near]
        q = [qj[near] for qj in q]
        rho = np.sqrt(rho2)
        inv = 1.0 / np.maximum(rho, np.float32(1e-6))
        u = [qj * inv for qj in q]
        pert = np.zeros(obj.size, dtype=np.float32)
        for m in range(_N_MODES):
            arg = mode_phase[obj, m]
            for j in range(ndim):
                arg += u[j] * mode_w[obj, m, j]
            pert += mode_amp[obj, m] * np.sin(arg)
        dist = rho / (1.0 + pert)
        inside = dist < 1.0
        obj, lin, dist = obj[inside], lin[inside], dist[inside]
        np.minimum.at(best, lin, dist)
        win = dist <= best[lin]
        flat_labels[lin[win]] = (obj[win] + 1).astype(np.int32)
    return labels


def _clean_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Keep only the largest face-connected piece of each id and drop small objects.

    Ids are preserved (not made sequential).
    """
    from skimage.measure import label as cc_label

    comps, n_comp = cc_label(labels, background=0, connectivity=1, return_num=True)
    if n_comp == 0:
        return labels
    flat_c = comps.ravel()
    sizes = np.bincount(flat_c, minlength=n_comp + 1)
    comp_id = np.zeros(n_comp + 1, dtype=np.int64)
    comp_id[flat_c] = labels.ravel()
    idx = np.arange(1, n_comp + 1)
    # sort components by (id, -size): the first of each id is its largest piece
    order = idx[np.lexsort((-sizes[idx], comp_id[idx]))]
    _, first = np.unique(comp_id[order], return_index=True)
    keep = np.zeros(n_comp + 1, dtype=bool)
    keep[order[first]] = True
    keep &= sizes >= min_size
    keep[0] = False
    lut = np.where(keep, comp_id, 0).astype(np.int32)
    return lut[comps]


def _relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the ids present in ``labels`` to ``1..N``; returns (labels, old ids)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels], ids


def _smooth_background(
    rng: np.random.Generator, shape: tuple[int, ...], kind: str
) -> np.ndarray | float:
    """Illumination background in units of the mean object brightness."""
    if kind == "none":
        return 0.0
    if kind == "flat":
        return 0.1
    if kind != "uneven":
        raise ValueError(f"background must be 'uneven', 'flat' or 'none', got {kind!r}")
    ndim = len(shape)
    field = np.zeros(shape, dtype=np.float32)
    # a linear illumination gradient ...
    direction = _random_unit_vectors(rng, 1, ndim)[0]
    for i, n in enumerate(shape):
        ramp = np.linspace(-0.5, 0.5, n, dtype=np.float32) * np.float32(direction[i])
        field += ramp.reshape([n if j == i else 1 for j in range(ndim)])
    # ... plus a few broad blotches (separable gaussians, cheap to evaluate)
    for _ in range(int(rng.integers(3, 6))):
        blob = np.float32(rng.uniform(-1.0, 1.0))
        for i, n in enumerate(shape):
            c = rng.uniform(-0.1, 1.1) * n
            s = rng.uniform(0.15, 0.45) * max(shape[-2:]) if i >= ndim - 2 else n
            g = np.exp(-0.5 * ((np.arange(n, dtype=np.float32) - c) / s) ** 2)
            blob = blob * g.reshape([n if j == i else 1 for j in range(ndim)])
        field += blob
    field -= field.min()
    peak = field.max()
    if peak > 0:
        field *= np.float32(rng.uniform(0.2, 0.35) / peak)
    field += np.float32(0.05)
    return field


def _texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Smooth random texture with values in [-1, 1]."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    tex = ndi.gaussian_filter(noise, sigma=tuple(1.5 / spacing), mode="reflect")
    std = float(tex.std())
    if std > 0:
        tex *= np.float32(0.5 / std)
    np.clip(tex, -1.0, 1.0, out=tex)
    return tex


def _shot_noise(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Poisson-distributed photon counts with mean ``counts`` (float32 result).

    Exact Poisson sampling is used for low counts; above 50 expected photons
    the (much faster, visually indistinguishable) normal approximation
    ``N(lam, lam)`` is used.
    """
    out = np.empty(counts.shape, dtype=np.float32)
    low = counts < 50.0
    n_low = int(np.count_nonzero(low))
    if n_low == counts.size:
        out[...] = rng.poisson(counts)
        return out
    noise = rng.standard_normal(counts.shape, dtype=np.float32)
    np.sqrt(counts, out=out)
    out *= noise
    out += counts
    np.rint(out, out=out)
    np.maximum(out, 0.0, out=out)
    if n_low:
        out[low] = rng.poisson(counts[low])
    return out


def _output_scale(dtype: np.dtype) -> tuple[float, float, float | None, float | None]:
    """(offset, gain, min, max) that map object-brightness units to ``dtype``."""
    if dtype == np.bool_:
        raise ValueError("make_nuclei cannot produce a bool image; use uint8, uint16 or float32")
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if dtype.itemsize == 1:
            return 10.0, 100.0, float(max(info.min, 0)), float(info.max)
        return 100.0, 1000.0, float(max(info.min, 0)), float(info.max)
    if dtype.kind == "f":
        return 0.02, 0.4, None, None
    raise ValueError(f"unsupported dtype {dtype}; use uint8, uint16 or float32")


def _form_image(
    rng: np.random.Generator,
    labels: np.ndarray,
    brightness: np.ndarray,
    texture: np.ndarray,
    background: np.ndarray | float,
    spacing: np.ndarray,
    blur: float,
    snr: float | None,
    dtype: np.dtype,
) -> np.ndarray:
    """Render a noisy fluorescence image from ``labels`` (``brightness[id]`` per object)."""
    lut = np.zeros(len(brightness) + 1, dtype=np.float32)
    lut[1:] = brightness
    clean = lut[labels]
    clean *= 1.0 + np.float32(_TEXTURE_AMPLITUDE) * texture
    clean += background
    if blur and blur > 0:
        clean = ndi.gaussian_filter(clean, sigma=tuple(float(blur) / spacing), mode="nearest")
    np.maximum(clean, 0.0, out=clean)
    if snr is not None and np.isfinite(snr):
        if snr <= 0:
            raise ValueError(f"snr must be positive, got {snr}")
        # 90 % of the noise variance at unit brightness is shot noise, 10 % camera noise
        photons = snr * snr / 0.9
        img = _shot_noise(rng, clean * np.float32(photons))
        img *= np.float32(1.0 / photons)
        img += rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(0.1**0.5 / snr)
    else:
        img = clean
    offset, gain, vmin, vmax = _output_scale(dtype)
    img *= np.float32(gain)
    img += np.float32(offset)
    if vmin is not None:
        np.clip(img, vmin, vmax, out=img)
        np.rint(img, out=img)
    return img.astype(dtype, copy=False)


def _prepare(
    shape: tuple[int, ...],
    radius: tuple[float, float],
    anisotropy: float,
    dtype: Any,
    min_size: int | None,
) -> tuple[tuple[int, ...], np.ndarray, np.dtype, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 (YX) or 3 (ZYX) entries, got {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive, got {shape}")
    lo_r, hi_r = float(radius[0]), float(radius[1])
    if not (0 < lo_r <= hi_r):
        raise ValueError(f"radius must be (min, max) with 0 < min <= max, got {radius}")
    if not anisotropy > 0:
        raise ValueError(f"anisotropy must be positive, got {anisotropy}")
    spacing = np.ones(len(shape))
    if len(shape) == 3:
        spacing[0] = float(anisotropy)
    if min_size is None:
        min_size = 20 if len(shape) == 2 else 50
    return shape, spacing, np.dtype(dtype), int(min_size)


def make_nuclei(
    shape: tuple[int, ...] = (256, 256),
    *,
    n_objects: int | None = None,
    radius: tuple[float, float] = (5.0, 11.0),
    touching: float = 0.35,
    snr: float | None = 8.0,
    background: str = "uneven",
    blur: float = 1.0,
    dtype: Any = np.uint16,
    seed: int | np.random.Generator | None = 0,
    anisotropy: float = 1.0,
    min_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a synthetic fluorescence image of nuclei with exact instance labels.

    Objects are ellipses (2D) or ellipsoids (3D) with a random radius, axis
    ratio (0.6-1.0), orientation and a slightly irregular (low-frequency)
    boundary.  Their interior carries a smooth +-20 % texture and each object
    has its own brightness (0.5-1.5x).  Where objects overlap, each pixel
    belongs to the object whose normalised elliptic distance is smallest, so
    touching objects share a boundary and remain separate instances.  The
    image is rendered from the final labels, which are therefore exact.

    Parameters
    ----------
    shape : tuple of int
        ``(Y, X)`` for a 2D image or ``(Z, Y, X)`` for a volume.
    n_objects : int, optional
        Number of objects to draw.  ``None`` picks a density that covers about
        25-35 % of the image.  A few objects may be lost (cut by the border to
        fewer than ``min_size`` pixels, or swallowed by neighbours).
    radius : (float, float)
        Range of the largest semi-axis, in xy pixels.
    touching : float
        Fraction (0-1) of the objects placed so that they overlap/touch an
        already placed object, forming clusters.
    snr : float or None
        Approximate ratio of mean object intensity (above background) to the
        noise standard deviation.  Noise is Poisson shot noise plus gaussian
        camera noise.  ``None`` or ``inf`` gives a noiseless image.
    background : {"uneven", "flat", "none"}
        ``"uneven"``: smooth illumination gradient and blotches of up to
        ~40 % of the mean object brightness; ``"flat"``: constant 10 %;
        ``"none"``: no background.
    blur : float
        Gaussian PSF sigma in xy pixels (same physical width in z, i.e.
        ``blur / anisotropy`` z-slices).
    dtype : numpy dtype
        ``uint16`` (camera offset 100, objects at a few hundred to a few
        thousand counts), ``uint8`` (0-255) or a float type (about 0-1).
    seed : int, Generator or None
        Seed for :func:`numpy.random.default_rng`; the same seed gives the
        same output.
    anisotropy : float
        z spacing / xy spacing (3D only).  Objects are flattened in z by this
        factor.
    min_size : int, optional
        Objects smaller than this (in pixels/voxels) are removed; default 20
        in 2D and 50 in 3D.

    Returns
    -------
    image : numpy.ndarray
        Image of ``shape`` and ``dtype``.
    labels : numpy.ndarray
        int32 instance labels, 0 = background, ids ``1..N`` sequential; each
        object is a single face-connected component.
    """
    shape, spacing, dtype, min_size = _prepare(shape, radius, anisotropy, dtype, min_size)
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = _default_n_objects(shape, spacing, radius)
    objs = _sample_objects(rng, shape, spacing, int(n_objects), radius, touching)
    raw = _render_labels(shape, spacing, objs)
    labels, ids = _relabel_sequential(_clean_labels(raw, min_size))
    brightness = objs.brightness[ids - 1] if ids.size else np.zeros(0)
    texture = _texture(rng, shape, spacing)
    bg = _smooth_background(rng, shape, background)
    image = _form_image(rng, labels, brightness, texture, bg, spacing, blur, snr, dtype)
    return image, labels


def make_nuclei_series(
    n_frames: int,
    shape: tuple[int, ...] = (256, 256),
    *,
    seed: int | np.random.Generator | None = 0,
    drift: float = 0.7,
    **kw: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a time series of synthetic nuclei that drift slightly between frames.

    Each object performs a small random walk (step standard deviation
    ``drift`` pixels per axis and frame) on top of a common slow drift.
    Background illumination and object texture are static, noise is drawn
    anew for every frame.

    Parameters
    ----------
    n_frames : int
        Number of time points.
    shape : tuple of int
        Shape of one frame, ``(Y, X)`` or ``(Z, Y, X)``.
    seed : int, Generator or None
        Random seed.
    drift : float
        Per-frame random-walk step (pixels).
    **kw
        Any keyword of :func:`make_nuclei` (``n_objects``, ``radius``,
        ``touching``, ``snr``, ``background``, ``blur``, ``dtype``,
        ``anisotropy``, ``min_size``).

    Returns
    -------
    images : numpy.ndarray
        Shape ``(n_frames, *shape)``.
    labels : numpy.ndarray
        int32, same shape.  An object keeps its id in every frame; ids are
        ``1..N`` over the whole series (an object that leaves the field of
        view or is removed in a frame is simply absent there).
    """
    unknown = set(kw) - {
        "n_objects",
        "radius",
        "touching",
        "snr",
        "background",
        "blur",
        "dtype",
        "anisotropy",
        "min_size",
    }
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    n_frames = int(n_frames)
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    radius = kw.get("radius", (5.0, 11.0))
    shape, spacing, dtype, min_size = _prepare(
        shape, radius, kw.get("anisotropy", 1.0), kw.get("dtype", np.uint16), kw.get("min_size")
    )
    rng = np.random.default_rng(seed)
    n_objects = kw.get("n_objects")
    if n_objects is None:
        n_objects = _default_n_objects(shape, spacing, radius)
    objs = _sample_objects(rng, shape, spacing, int(n_objects), radius, kw.get("touching", 0.35))
    ndim = len(shape)
    common = rng.normal(0.0, 0.3 * drift, size=ndim)
    if ndim == 3:
        common[0] = 0.0
    raw = np.empty((n_frames, *shape), dtype=np.int32)
    centers = objs.centers.copy()
    for t in range(n_frames):
        if t > 0:
            step = rng.normal(0.0, drift, size=centers.shape) + common
            if ndim == 3:
                step[:, 0] *= 0.3
            centers += step
        raw[t] = _clean_labels(_render_labels(shape, spacing, objs, centers), min_size)
    labels, ids = _relabel_sequential(raw)
    brightness = objs.brightness[ids - 1] if ids.size else np.zeros(0)
    texture = _texture(rng, shape, spacing)
    bg = _smooth_background(rng, shape, kw.get("background", "uneven"))
    images = np.empty(labels.shape, dtype=dtype)
    for t in range(n_frames):
        images[t] = _form_image(
            rng,
            labels[t],
            brightness,
            texture,
            bg,
            spacing,
            kw.get("blur", 1.0),
            kw.get("snr", 8.0),
            dtype,
        )
    return images, labels


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _is_array_like(x: Any) -> bool:
    """True for lazy array-likes (dask, zarr, h5py, ...) that support slicing."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


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
        return np.asarray(image[...] if not _is_numpy(image) else image)
    steps = _subsample_steps(shape, max_samples)
    # offset each axis by half a step so the sample is centred, not biased to the top-left
    index = tuple(slice(min(s // 2, n - 1), None, s) for s, n in zip(steps, shape, strict=True))
    return np.asarray(image[index])


def _as_numpy_or_lazy(image: Any) -> tuple[Any, bool]:
    """Return (array, is_lazy)."""
    if _is_numpy(image):
        return image, False
    if _is_array_like(image):
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
    if lazy:
        sample = _strided_sample(arr, max_samples)
        n_bad = sample.size - int(np.count_nonzero(np.isfinite(sample)))
        if n_bad == 0:
            return
        if n_bad == sample.size:
            raise ValueError(f"{name} contains only NaN or infinite values")
        raise ValueError(
            f"{name} contains NaN or infinite pixels ({n_bad} in a sample of {sample.size}); "
            "replace them (e.g. with numpy.nan_to_num) before segmenting"
        )
    n_bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if n_bad == 0:
        return
    if n_bad == arr.size:
        raise ValueError(f"{name} contains only NaN or infinite values")
    raise ValueError(
        f"{name} contains {n_bad} NaN or infinite pixels; "
        "replace them (e.g. with numpy.nan_to_num) before segmenting"
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


def normalize(image: Any, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 1`` as float32: ``(image - lo) / (hi - lo)``.

    Values are not clipped.  If ``hi - lo < 1e-6`` (e.g. a constant image) the
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
    span = hi - lo
    if span < 1e-6:
        out[...] = 0.0
        return out
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    np.subtract(arr, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    out *= np.float32(1.0 / span)
    return out


# ---------------------------------------------------------------------------
# Axes
# ---------------------------------------------------------------------------

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
    if _is_numpy(array):
        return array
    if type(array).__module__.split(".")[0] == "dask":
        return array
    if _is_array_like(array):
        try:
            import dask.array as da
        except ImportError:
            return np.asarray(array)
        chunks = getattr(array, "chunks", None)
        ok = isinstance(chunks, tuple) and all(isinstance(c, (int, np.integer)) for c in chunks)
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
