"""Rendering of the generated nuclei: objects -> exact labels -> a noisy fluorescence image.

:func:`render_labels` rasterises the objects of :mod:`napari_unet.synthetic_objects` (touching
objects share a boundary and stay separate), :func:`clean_labels` and
:func:`relabel_sequential` make each id one connected piece numbered ``1..N``, and
:func:`form_image` turns the labels into an image: per-object brightness and texture, an
illumination background, blur, Poisson-Gaussian noise and the output dtype's range.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential as _skimage_relabel

from .synthetic_objects import N_MODES, Objects, random_unit_vectors

__all__ = [
    "clean_labels",
    "form_image",
    "relabel_sequential",
    "render_labels",
    "smooth_background",
    "random_texture",
]

_TEXTURE_AMPLITUDE = 0.2  # +-20 % interior texture


class _Frames(NamedTuple):
    """Per-object float32 arrays that give a pixel's distance to the object's wavy outline."""

    to_frame: np.ndarray  # (n, i, j): physical offset -> principal coordinates / semi-axes
    mode_w: np.ndarray  # (n, m, j): direction times frequency of each outline mode
    mode_phase: np.ndarray  # (n, m)
    mode_amp: np.ndarray  # (n, m)
    grow2: np.ndarray  # (n,): squared largest outline radius, in semi-axis units
    centers: np.ndarray  # (n, d), physical
    spacing: np.ndarray  # (d,)

    @classmethod
    def of(cls, objs: Objects, centers: np.ndarray, spacing: np.ndarray) -> _Frames:
        grow = 1.0 + objs.mode_amp.sum(axis=1)
        return cls(
            to_frame=(objs.rotations / objs.semi_axes[:, None, :]).astype(np.float32),
            mode_w=(objs.mode_dirs * objs.mode_freq[:, :, None]).astype(np.float32),
            mode_phase=objs.mode_phase.astype(np.float32),
            mode_amp=objs.mode_amp.astype(np.float32),
            grow2=(grow**2).astype(np.float32),
            centers=centers.astype(np.float32),
            spacing=spacing.astype(np.float32),
        )


def _bounding_boxes(
    shape: tuple[int, ...], spacing: np.ndarray, objs: Objects, centers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First pixel and size of every object's box, clipped to the image; each ``(n, d)``."""
    grow = 1.0 + objs.mode_amp.sum(axis=1)
    # half extent of every (perturbed) object along each image axis, in pixels
    half = np.sqrt(((objs.rotations * objs.semi_axes[:, None, :]) ** 2).sum(axis=2))
    half = half * grow[:, None] / spacing + 1.0
    centre_px = centers / spacing
    lo = np.clip(np.floor(centre_px - half).astype(np.int64), 0, None)
    hi = np.minimum(np.ceil(centre_px + half).astype(np.int64) + 1, np.asarray(shape))
    return lo, np.clip(hi - lo, 0, None)


def _box_pixels(
    idx: np.ndarray, lo: np.ndarray, sizes: np.ndarray, strides: np.ndarray, f: _Frames
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Every pixel in the boxes of objects ``idx``, as one long vector.

    Returns (object of each pixel, flat index into the image, physical offset from the
    object's centre along each axis).
    """
    ndim = lo.shape[1]
    tot = sizes[idx].prod(axis=1)
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
        diffs.append(p_i.astype(np.float32) * f.spacing[i] - f.centers[obj, i])
    return obj, lin, diffs


def _outline_distance(
    obj: np.ndarray, diffs: list[np.ndarray], f: _Frames
) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic distance of each pixel from its object's centre, over the outline's radius
    in that direction (< 1 inside the object).

    Pixels beyond the outline's largest radius are dropped first: returns (mask of the pixels
    kept, their distances).
    """
    ndim = len(diffs)
    q = []  # principal coordinates in units of the semi-axes
    for j in range(ndim):
        acc = diffs[0] * f.to_frame[obj, 0, j]
        for i in range(1, ndim):
            acc += diffs[i] * f.to_frame[obj, i, j]
        q.append(acc)
    rho2 = q[0] * q[0]
    for j in range(1, ndim):
        rho2 += q[j] * q[j]
    near = rho2 < f.grow2[obj]
    obj, rho2 = obj[near], rho2[near]
    q = [qj[near] for qj in q]
    rho = np.sqrt(rho2)
    inv = 1.0 / np.maximum(rho, np.float32(1e-6))
    u = [qj * inv for qj in q]
    pert = np.zeros(obj.size, dtype=np.float32)
    for m in range(N_MODES):
        arg = f.mode_phase[obj, m]
        for j in range(ndim):
            arg += u[j] * f.mode_w[obj, m, j]
        pert += f.mode_amp[obj, m] * np.sin(arg)
    return near, rho / (1.0 + pert)


def render_labels(
    shape: tuple[int, ...],
    spacing: np.ndarray,
    objs: Objects,
    centers: np.ndarray | None = None,
    batch_elements: int = 1 << 20,
) -> np.ndarray:
    """Rasterise the objects; overlapping pixels go to the object closest in elliptic distance.

    All objects are evaluated together on the pixels of their bounding boxes
    (flattened into one long vector, in batches of at most ``batch_elements``
    pixels), so the cost is proportional to the total bounding-box area.
    ``centers`` (physical, ``(n, d)``) replaces ``objs.centers`` when given.

    Returns int32 labels where object ``k`` has id ``k + 1`` (not yet cleaned).
    """
    if centers is None:
        centers = objs.centers
    labels = np.zeros(shape, dtype=np.int32)
    if len(objs) == 0:
        return labels
    flat_labels = labels.reshape(-1)
    best = np.full(labels.size, np.inf, dtype=np.float32)
    lo, sizes = _bounding_boxes(shape, spacing, objs, centers)
    totals = sizes.prod(axis=1)
    strides = np.cumprod((1,) + shape[:0:-1])[::-1]  # C-order strides in elements
    frames = _Frames.of(objs, centers, spacing)

    # split the objects into batches of bounded total box size
    order = np.flatnonzero(totals > 0)
    batch_id = np.cumsum(totals[order]) // max(int(batch_elements), 1)
    for b in np.unique(batch_id):
        obj, lin, diffs = _box_pixels(order[batch_id == b], lo, sizes, strides, frames)
        near, dist = _outline_distance(obj, diffs, frames)
        obj, lin = obj[near], lin[near]
        inside = dist < 1.0
        obj, lin, dist = obj[inside], lin[inside], dist[inside]
        np.minimum.at(best, lin, dist)
        win = dist <= best[lin]
        flat_labels[lin[win]] = (obj[win] + 1).astype(np.int32)
    return labels


def clean_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
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


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the ids present in ``labels`` to ``1..N`` in increasing order.

    Returns (labels of the same dtype, the old id of each new id ``1..N``).
    """
    relabelled, _, inverse = _skimage_relabel(labels)
    old = inverse.out_values
    return relabelled, old[old != 0]


def smooth_background(
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
    direction = random_unit_vectors(rng, 1, ndim)[0]
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


def random_texture(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray
) -> np.ndarray:
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


def form_image(
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
