"""Generated fluorescence nuclei with exact instance labels: samples, tests and training data.

* :func:`make_nuclei` and :func:`make_nuclei_series` draw smooth, evenly lit ellipses
  (ellipsoids in 3D), alone or drifting over time. They are quick and exact, for tests,
  demos and benchmarks.
* :func:`make_realistic_nuclei` keeps their object placement (clusters of touching
  objects, exact labels) and renders what real wide-field and confocal images show; a
  network trained on smooth blobs alone cuts real, textured nuclei into pieces. It is used
  to train the shipped starter together with real annotated images, with styles drawn by
  :func:`random_style`. It draws:

  - sizes from 3 to 60 px radius, elongated and non-convex outlines;
  - chromatin texture and spots, nucleoli (dark holes or bright dots), rims brighter or
    dimmer than the centre;
  - bright and dim nuclei side by side (a 10x range), small very bright mitotic figures;
  - touching nuclei of the same brightness, whose boundary is barely visible;
  - unlabelled clutter: out-of-focus halos, fibres, specks of debris;
  - uneven illumination, camera offset, Poisson-Gaussian noise, 8-bit, 12-bit-in-16 and
    float ranges.

Object shapes and placement live in :mod:`napari_unet.synthetic_objects`, rendering in
:mod:`napari_unet.synthetic_render`. Pure numpy/scipy/scikit-image.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .synthetic_objects import Objects, default_n_objects, sample_objects
from .synthetic_render import (
    clean_labels,
    form_image,
    random_texture,
    relabel_sequential,
    render_labels,
    smooth_background,
)

__all__ = ["make_nuclei", "make_nuclei_series", "make_realistic_nuclei", "random_style"]


def _prepare(
    shape: tuple[int, ...],
    radius: tuple[float, float],
    anisotropy: float,
    dtype: Any,
    min_size: int | None,
) -> tuple[tuple[int, ...], np.ndarray, np.dtype, int]:
    """Check the arguments shared by the generators.

    Returns (shape as ints, physical spacing per axis, dtype, min_size with its default).
    """
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


def _scene(shape, radius, anisotropy, dtype, min_size, seed, n_objects, touching):
    """Checked arguments, the random generator and the placed objects of one scene.

    Returns (shape, spacing, dtype, min_size, rng, objects).
    """
    shape, spacing, dtype, min_size = _prepare(shape, radius, anisotropy, dtype, min_size)
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = default_n_objects(shape, spacing, radius)
    objs = sample_objects(rng, shape, spacing, int(n_objects), radius, touching)
    return shape, spacing, dtype, min_size, rng, objs


def _appearance(
    rng: np.random.Generator,
    objs: Objects,
    ids: np.ndarray,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    background: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
    """Brightness of the objects that survived (old ``ids``), texture and background."""
    brightness = objs.brightness[ids - 1] if ids.size else np.zeros(0)
    texture = random_texture(rng, shape, spacing)
    return brightness, texture, smooth_background(rng, shape, background)


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
    shape, spacing, dtype, min_size, rng, objs = _scene(
        shape, radius, anisotropy, dtype, min_size, seed, n_objects, touching
    )
    labels, ids = relabel_sequential(clean_labels(render_labels(shape, spacing, objs), min_size))
    brightness, texture, bg = _appearance(rng, objs, ids, shape, spacing, background)
    image = form_image(rng, labels, brightness, texture, bg, spacing, blur, snr, dtype)
    return image, labels


#: The keywords of :func:`make_nuclei` that :func:`make_nuclei_series` passes on, with defaults.
_NUCLEI_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(make_nuclei).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"
}


def _drifting_labels(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    objs: Objects,
    n_frames: int,
    drift: float,
    min_size: int,
) -> np.ndarray:
    """Cleaned labels ``(n_frames, *shape)`` of the objects on a random walk plus a common drift
    (ids ``k + 1``, not yet sequential)."""
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
        raw[t] = clean_labels(render_labels(shape, spacing, objs, centers), min_size)
    return raw


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
    unknown = set(kw) - set(_NUCLEI_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    n_frames = int(n_frames)
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    o = {**_NUCLEI_OPTIONS, **kw}
    shape, spacing, dtype, min_size, rng, objs = _scene(
        shape,
        o["radius"],
        o["anisotropy"],
        o["dtype"],
        o["min_size"],
        seed,
        o["n_objects"],
        o["touching"],
    )
    raw = _drifting_labels(rng, shape, spacing, objs, n_frames, drift, min_size)
    labels, ids = relabel_sequential(raw)
    brightness, texture, bg = _appearance(rng, objs, ids, shape, spacing, o["background"])
    images = np.empty(labels.shape, dtype=dtype)
    for t in range(n_frames):
        images[t] = form_image(
            rng, labels[t], brightness, texture, bg, spacing, o["blur"], o["snr"], dtype
        )
    return images, labels


def random_style(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one image style (a microscope, a stain, a sample): keyword arguments of
    :func:`make_realistic_nuclei` other than shape, radius and seed."""
    return {
        "density": float(rng.uniform(0.05, 0.45)),
        "touching": float(rng.uniform(0.0, 0.7)),
        "snr": float(np.exp(rng.uniform(np.log(1.5), np.log(30.0)))),
        "blur": float(rng.uniform(0.4, 2.0)),
        "texture": float(rng.uniform(0.0, 0.6)),
        "brightness_range": float(np.exp(rng.uniform(0.0, np.log(10.0)))),
        "clutter": float(rng.uniform(0.0, 1.0)),
        "illumination": float(rng.uniform(0.0, 0.6)),
        "dtype": [np.uint8, np.uint16, np.float32][int(rng.integers(3))],
    }


def _object_profile(labels: np.ndarray, radius: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Per pixel, a radial profile in [0, 1] of its object: 1 at the centre (power > 0 makes
    the rim dimmer, power < 0 brighter)."""
    dist = ndi.distance_transform_edt(labels > 0).astype(np.float32)
    r = radius[labels].astype(np.float32)
    rel = np.clip(dist / np.maximum(r, 1.0), 0.0, 1.0)  # 0 at the edge, ~1 in the centre
    p = power[labels].astype(np.float32)
    prof = np.where(p >= 0, rel ** np.abs(p) * 0.6 + 0.4, 1.0 - 0.5 * rel ** np.abs(p))
    return np.where(labels > 0, prof, 0.0).astype(np.float32)


def _clutter(rng: np.random.Generator, shape: tuple[int, int], r_mean: float, amount: float):
    """Unlabelled signal: out-of-focus halos, fibres and specks, in object-brightness units."""
    out = np.zeros(shape, np.float32)
    if amount <= 0:
        return out
    area = shape[0] * shape[1]
    # out-of-focus nuclei: very blurred, dim discs
    n_halo = rng.poisson(amount * 0.3 * area / (np.pi * r_mean**2 * 8))
    halo = np.zeros(shape, np.float32)
    for _ in range(int(n_halo)):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        halo[y, x] += rng.uniform(0.5, 2.0) * r_mean**2
    if n_halo:
        out += ndi.gaussian_filter(halo, r_mean * rng.uniform(0.8, 1.5)) * 0.5
    # fibres: blurred random walks
    n_fib = rng.poisson(amount * 2.0)
    fib = np.zeros(shape, np.float32)
    for _ in range(int(n_fib)):
        pos = np.array([rng.uniform(0, shape[0]), rng.uniform(0, shape[1])])
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(20, 200))):
            ang += rng.normal(0, 0.25)
            pos += 2.0 * np.array([np.sin(ang), np.cos(ang)])
            y, x = int(pos[0]), int(pos[1])
            if 0 <= y < shape[0] and 0 <= x < shape[1]:
                fib[y, x] = rng.uniform(0.5, 1.5)
    if n_fib:
        out += ndi.gaussian_filter(fib, rng.uniform(0.8, 2.5)) * rng.uniform(1.5, 4.0)
    # specks of debris
    n_sp = rng.poisson(amount * area / 4000)
    ys, xs = rng.integers(0, shape[0], n_sp), rng.integers(0, shape[1], n_sp)
    sp = np.zeros(shape, np.float32)
    sp[ys, xs] = rng.uniform(1.0, 8.0, n_sp)
    out += ndi.gaussian_filter(sp, 0.8) * 3.0
    return out


def make_realistic_nuclei(
    shape: tuple[int, int] = (256, 256),
    *,
    radius: tuple[float, float] = (5.0, 11.0),
    density: float = 0.25,
    touching: float = 0.35,
    snr: float = 8.0,
    blur: float = 1.0,
    texture: float = 0.3,
    brightness_range: float = 3.0,
    clutter: float = 0.3,
    illumination: float = 0.3,
    dtype: Any = np.uint16,
    seed: int | np.random.Generator | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a realistic 2D fluorescence image of nuclei with exact instance labels.

    Parameters
    ----------
    shape
        ``(Y, X)``.
    radius
        Range of the objects' largest semi-axis, in pixels (3 to 60 is realistic).
    density
        Fraction of the image covered by objects (about).
    touching
        Fraction of the objects placed against an already placed one (clusters).
    snr
        Mean object signal over noise standard deviation, for a nucleus of median brightness.
    blur
        Gaussian PSF sigma in pixels.
    texture
        Strength of chromatin texture, spots and nucleoli (0 = smooth nuclei).
    brightness_range
        Ratio of the brightest to the dimmest nucleus (1 = all alike).
    clutter
        Amount of unlabelled signal: out-of-focus halos, fibres, debris (0 = none).
    illumination
        Strength of the uneven illumination (0 = flat).
    dtype
        ``uint8``, ``uint16`` (12-bit range over a camera offset) or a float type.
    seed
        Seed for :func:`numpy.random.default_rng`.

    Returns
    -------
    image, labels
        The image of ``shape`` and ``dtype``; int32 labels, 0 = background, ids ``1..N``.
    """
    if len(shape) != 2:
        raise ValueError(f"make_realistic_nuclei draws 2D images; got shape {shape}")
    shape_t, spacing, dt, min_size = _prepare(shape, radius, 1.0, dtype, None)
    rng = np.random.default_rng(seed)
    r_mean = 0.5 * (radius[0] + radius[1])
    objs = _realistic_objects(rng, shape_t, spacing, radius, density, touching)
    raw = render_labels(shape_t, spacing, objs)
    labels, ids = relabel_sequential(clean_labels(raw, min(min_size, 9)))
    img, bright = _stained(rng, labels, objs, ids, brightness_range)
    if texture > 0 and ids.size:
        _chromatin(rng, img, labels, r_mean, texture, ids.size)
    median = float(np.median(bright) if ids.size else 1.0)
    img += _clutter(rng, shape_t, r_mean, clutter) * median * 0.3
    if illumination > 0:
        img = _illuminate(rng, img, illumination)
    img = ndi.gaussian_filter(img.astype(np.float32), blur) if blur > 0 else img
    img = np.maximum(img, 0.0).astype(np.float32)
    return _camera(rng, img, snr, dt), labels.astype(np.int32)


def _realistic_objects(
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing: np.ndarray,
    radius: tuple[float, float],
    density: float,
    touching: float,
) -> Objects:
    """Placed objects that cover about ``density`` of the image; some elongated, some with
    rougher outlines (placement stays valid: they only shrink, or grow a little)."""
    r_mean = 0.5 * (radius[0] + radius[1])
    n = max(1, int(round(density * shape[0] * shape[1] / (np.pi * (0.8 * r_mean) ** 2))))
    objs = sample_objects(rng, shape, spacing, n, radius, touching)
    squash = np.where(rng.random(n) < 0.3, rng.uniform(0.45, 0.8, n), 1.0)
    objs.semi_axes[:, 1] *= squash
    objs.mode_amp *= np.where(rng.random(n) < 0.3, rng.uniform(1.5, 3.0, n), 1.0)[:, None]
    return objs


def _stained(
    rng: np.random.Generator,
    labels: np.ndarray,
    objs: Objects,
    ids: np.ndarray,
    brightness_range: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Each nucleus's brightness times its radial profile (rim dimmer or brighter).

    Brightness is log-uniform over ``brightness_range``; a few mitotic figures are much
    brighter. Returns (float32 image, brightness of ids ``1..N``).
    """
    m = len(ids)
    bright = np.exp(rng.uniform(-0.5, 0.5, m) * np.log(max(brightness_range, 1.0)))
    mitotic = rng.random(m) < 0.03
    bright[mitotic] *= rng.uniform(2.0, 4.0, mitotic.sum())
    lut_b = np.zeros(m + 1, np.float32)
    lut_b[1:] = bright
    radius_of = np.zeros(m + 1, np.float32)
    radius_of[1:] = objs.semi_axes[ids - 1, 1] if m else 0
    power = np.zeros(m + 1, np.float32)
    power[1:] = rng.uniform(-1.5, 1.5, m)
    return lut_b[labels] * _object_profile(labels, radius_of, power), bright


def _chromatin(
    rng: np.random.Generator,
    img: np.ndarray,
    labels: np.ndarray,
    r_mean: float,
    texture: float,
    n_objects: int,
) -> None:
    """Multiply ``img`` in place by a fine and coarse chromatin texture and by nucleoli:
    0-3 dark (or bright) spots per nucleus."""
    shape = labels.shape
    fine = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.9)
    coarse = ndi.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), max(1.0, r_mean / 5)
    )
    tex = fine / (fine.std() + 1e-6) * 0.5 + coarse / (coarse.std() + 1e-6)
    img *= np.clip(1.0 + texture * 0.35 * tex, 0.2, 2.0)
    spots = np.zeros(shape, np.float32)
    yy, xx = np.nonzero(labels)
    if yy.size:
        k = rng.poisson(texture * n_objects * 2)
        pick = rng.integers(0, yy.size, k)
        spots[yy[pick], xx[pick]] = rng.choice([-1.0, 1.0], k, p=[0.7, 0.3])
        spots = ndi.gaussian_filter(spots, max(0.8, r_mean / 6)) * (r_mean / 3) ** 2
        img *= np.clip(1.0 + texture * np.clip(spots, -0.8, 1.0), 0.1, 2.0)


def _illuminate(rng: np.random.Generator, img: np.ndarray, illumination: float) -> np.ndarray:
    """Uneven illumination of strength ``illumination``: a gain field plus stray light."""
    bg = smooth_background(rng, img.shape, "uneven")
    img = img * (1.0 - illumination * 0.5 + illumination * bg / max(float(np.max(bg)), 1e-6))
    img += illumination * 0.3 * bg
    return img


def _camera(rng: np.random.Generator, img: np.ndarray, snr: float, dt: np.dtype) -> np.ndarray:
    """Poisson-Gaussian noise at a photon count that gives ``snr`` at median brightness, then
    a random camera offset and gain into ``dt``'s range (8-bit, 12-bit-in-16, or float)."""
    photons = snr * snr / 0.9
    noisy = rng.poisson(img * photons).astype(np.float32) / photons
    noisy += rng.standard_normal(img.shape).astype(np.float32) * np.float32(0.1**0.5 / snr)
    if dt.kind not in "ui":
        return (noisy * 0.4 + 0.02).astype(dt)
    if dt.itemsize == 1:
        offset, gain, top = rng.uniform(0, 15), rng.uniform(40, 120), 255.0
    else:
        offset, gain, top = rng.uniform(90, 500), rng.uniform(200, 1500), 4095.0
    return np.clip(np.rint(noisy * gain + offset), 0, top).astype(dt)
