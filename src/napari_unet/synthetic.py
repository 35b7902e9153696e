"""Generated 2D fluorescence nuclei that look like real ones, with exact instance labels.

:func:`napari_unet.data.make_nuclei` draws smooth, evenly lit ellipses: a network trained on
them alone learns that a nucleus is a bright smooth blob and cuts real, textured nuclei into
pieces. :func:`make_realistic_nuclei` keeps its object placement (clusters of touching objects,
exact labels) and renders what real wide-field and confocal images show:

* sizes from 3 to 60 px radius, elongated and non-convex outlines;
* chromatin texture and spots, nucleoli (dark holes or bright dots), rims brighter or dimmer
  than the centre;
* bright and dim nuclei side by side (a 10x range), small very bright mitotic figures;
* touching nuclei of the same brightness, whose boundary is barely visible;
* unlabelled clutter: out-of-focus halos, fibres, specks of debris;
* uneven illumination, camera offset, Poisson-Gaussian noise, 8-bit, 12-bit-in-16 and float
  ranges.

Used to train the shipped starter together with real annotated images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import data as _d

__all__ = ["make_realistic_nuclei", "random_style"]


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
    shape_t, spacing, dt, min_size = _d._prepare(shape, radius, 1.0, dtype, None)
    rng = np.random.default_rng(seed)
    r_mean = 0.5 * (radius[0] + radius[1])
    n = max(1, int(round(density * shape_t[0] * shape_t[1] / (np.pi * (0.8 * r_mean) ** 2))))
    objs = _d._sample_objects(rng, shape_t, spacing, n, radius, touching)
    # elongate some objects and roughen outlines (placement stays valid: shrink only / a little)
    squash = np.where(rng.random(n) < 0.3, rng.uniform(0.45, 0.8, n), 1.0)
    objs.semi_axes[:, 1] *= squash
    objs.mode_amp *= np.where(rng.random(n) < 0.3, rng.uniform(1.5, 3.0, n), 1.0)[:, None]
    raw = _d._render_labels(shape_t, spacing, objs)
    labels, ids = _d._relabel_sequential(_d._clean_labels(raw, min(min_size, 9)))
    m = len(ids)
    # brightness: log-uniform over the range; a few mitotic figures much brighter
    bright = np.exp(rng.uniform(-0.5, 0.5, m) * np.log(max(brightness_range, 1.0)))
    mitotic = rng.random(m) < 0.03
    bright[mitotic] *= rng.uniform(2.0, 4.0, mitotic.sum())
    lut_b = np.zeros(m + 1, np.float32)
    lut_b[1:] = bright
    radius_of = np.zeros(m + 1, np.float32)
    radius_of[1:] = objs.semi_axes[ids - 1, 1] if m else 0
    power = np.zeros(m + 1, np.float32)
    power[1:] = rng.uniform(-1.5, 1.5, m)
    img = lut_b[labels] * _object_profile(labels, radius_of, power)
    if texture > 0 and m:
        fine = ndi.gaussian_filter(rng.standard_normal(shape_t).astype(np.float32), 0.9)
        coarse = ndi.gaussian_filter(
            rng.standard_normal(shape_t).astype(np.float32), max(1.0, r_mean / 5)
        )
        tex = fine / (fine.std() + 1e-6) * 0.5 + coarse / (coarse.std() + 1e-6)
        img *= np.clip(1.0 + texture * 0.35 * tex, 0.2, 2.0)
        # nucleoli: 0-3 dark (or bright) spots per nucleus
        spots = np.zeros(shape_t, np.float32)
        yy, xx = np.nonzero(labels)
        if yy.size:
            k = rng.poisson(texture * m * 2)
            pick = rng.integers(0, yy.size, k)
            spots[yy[pick], xx[pick]] = rng.choice([-1.0, 1.0], k, p=[0.7, 0.3])
            spots = ndi.gaussian_filter(spots, max(0.8, r_mean / 6)) * (r_mean / 3) ** 2
            img *= np.clip(1.0 + texture * np.clip(spots, -0.8, 1.0), 0.1, 2.0)
    img += _clutter(rng, shape_t, r_mean, clutter) * float(np.median(bright) if m else 1.0) * 0.3
    if illumination > 0:
        bg = _d._smooth_background(rng, shape_t, "uneven")
        img = img * (1.0 - illumination * 0.5 + illumination * bg / max(float(np.max(bg)), 1e-6))
        img += illumination * 0.3 * bg
    img = ndi.gaussian_filter(img.astype(np.float32), blur) if blur > 0 else img
    img = np.maximum(img, 0.0).astype(np.float32)
    # Poisson-Gaussian noise at a photon count that gives the asked SNR at median brightness
    photons = snr * snr / 0.9
    noisy = rng.poisson(img * photons).astype(np.float32) / photons
    noisy += rng.standard_normal(shape_t).astype(np.float32) * np.float32(0.1**0.5 / snr)
    if dt.kind in "ui":
        if dt.itemsize == 1:
            offset, gain, top = rng.uniform(0, 15), rng.uniform(40, 120), 255.0
        else:
            offset, gain, top = rng.uniform(90, 500), rng.uniform(200, 1500), 4095.0
        out = np.clip(np.rint(noisy * gain + offset), 0, top).astype(dt)
    else:
        out = (noisy * 0.4 + 0.02).astype(dt)
    return out, labels.astype(np.int32)
