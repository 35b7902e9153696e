"""Generated 3D nuclei volumes whose nuclei touch in Z as well as in XY.

:func:`napari_unet.data.make_nuclei` places touching neighbours in random directions, so in an
anisotropic volume nuclei are rarely stacked on top of each other, and its point-spread function
is as wide in Z as in XY. Real confocal and light-sheet volumes are different: nuclei sit on top
of each other, the axial blur is 2-4 times the lateral one, and the haze between two stacked
nuclei looks like a dim nucleus to a network that sees one slice at a time. This module renders
such volumes (with exact labels) for training and testing the 3D assembly and the 3D starter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from . import data as _d

__all__ = ["make_nuclei_3d", "make_stacked_pair"]


def _stack_on(
    rng: np.random.Generator, objs: _d._Objects, n_new: int, extent: np.ndarray
) -> _d._Objects:
    """``n_new`` more objects, each placed right above or below a random existing one."""
    if n_new <= 0 or len(objs) == 0:
        return objs
    n, ndim = objs.centers.shape
    r = objs.semi_axes.max(axis=1)
    fresh = _d._sample_objects(
        rng,
        tuple(int(v) for v in extent),
        np.ones(ndim),
        n_new,
        (float(r.min()), float(r.max())),
        0.0,
    )
    anchor = rng.integers(n, size=n_new)
    u = np.zeros((n_new, ndim))
    u[:, 0] = rng.choice([-1.0, 1.0], size=n_new)
    u[:, 1:] = rng.normal(0.0, 0.25, size=(n_new, ndim - 1))  # mostly along Z
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    reach = _d._radial_extent(objs.rotations[anchor], objs.semi_axes[anchor], u)
    reach = reach + _d._radial_extent(fresh.rotations, fresh.semi_axes, u)
    centers = objs.centers[anchor] + u * (reach * rng.uniform(0.8, 0.97, size=n_new))[:, None]
    fresh = replace(fresh, centers=centers)
    return _d._Objects(
        *(
            np.concatenate([getattr(objs, f), getattr(fresh, f)])
            for f in (
                "centers",
                "semi_axes",
                "rotations",
                "mode_dirs",
                "mode_freq",
                "mode_phase",
                "mode_amp",
                "brightness",
            )
        )
    )


def make_nuclei_3d(
    shape: tuple[int, int, int] = (32, 96, 96),
    *,
    anisotropy: float = 2.0,
    radius: tuple[float, float] = (6.0, 12.0),
    n_objects: int | None = None,
    touching: float = 0.5,
    stacked: float = 0.35,
    snr: float | None = 6.0,
    blur: float = 1.0,
    axial_blur: float = 3.0,
    background: str = "uneven",
    dtype: Any = np.uint16,
    seed: int | np.random.Generator | None = 0,
    min_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence volume ``(Z, Y, X)`` of nuclei with exact instance labels.

    Like :func:`napari_unet.data.make_nuclei` in 3D, with two differences: a fraction
    ``stacked`` of extra nuclei sit right on top of (or under) another one, touching it, and the
    blur is ``axial_blur`` times wider in Z than in XY (in physical units).

    Parameters
    ----------
    shape
        ``(Z, Y, X)`` in voxels.
    anisotropy
        Z spacing / XY spacing (1 to 5 in the starter's training set).
    radius
        Range of the largest semi-axis, in XY pixels.
    n_objects
        Objects before stacking; ``None``: the density of ``make_nuclei``.
    touching
        Fraction of the objects placed touching a neighbour in any direction.
    stacked
        Extra objects, as a fraction of ``n_objects``, stacked in Z on an existing one.
    snr, background, dtype, seed, min_size
        As in :func:`napari_unet.data.make_nuclei`.
    blur, axial_blur
        Gaussian PSF sigma in XY pixels, and how many times wider it is along Z.

    Returns
    -------
    image, labels
        ``shape`` volume of ``dtype``; int32 labels 0 = background, ``1..N``.
    """
    if len(tuple(shape)) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {shape}")
    shape, spacing, dtype, min_size = _d._prepare(shape, radius, anisotropy, dtype, min_size)
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = max(1, round(_d._default_n_objects(shape, spacing, radius) / (1 + stacked)))
    extent = np.asarray(shape, float) * spacing
    objs = _d._sample_objects(rng, shape, spacing, int(n_objects), radius, touching)
    objs = _stack_on(rng, objs, int(round(stacked * n_objects)), extent)
    raw = _d._render_labels(shape, spacing, objs)
    labels, ids = _d._relabel_sequential(_d._clean_labels(raw, min_size))
    brightness = objs.brightness[ids - 1] if ids.size else np.zeros(0)
    texture = _d._texture(rng, shape, spacing)
    bg = _d._smooth_background(rng, shape, background)
    psf_spacing = spacing / np.array([float(axial_blur), 1.0, 1.0])  # sigma_z = axial * blur
    image = _d._form_image(rng, labels, brightness, texture, bg, psf_spacing, blur, snr, dtype)
    return image, labels


def make_stacked_pair(
    shape: tuple[int, int, int] = (24, 40, 40),
    *,
    radius: float = 7.0,
    anisotropy: float = 2.0,
    gap: float = 0.0,
    snr: float | None = 20.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Two spheres of ``radius`` (XY pixels) on top of each other in Z, centred in XY.

    ``gap`` is the physical distance between their surfaces (0: touching). For tests of the 3D
    assembly: the right answer is two objects.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    z = z * anisotropy
    cz = shape[0] * anisotropy / 2.0
    cy, cx = shape[1] / 2.0, shape[2] / 2.0
    labels = np.zeros(shape, np.int32)
    for i, dz in enumerate((-(radius + gap / 2), radius + gap / 2)):
        inside = (z - cz - dz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        labels[inside & (labels == 0)] = i + 1
    bright = np.array([0.0, 1.0, 0.8], np.float32)
    tex = _d._texture(rng, shape, np.array([anisotropy, 1.0, 1.0]))
    spacing = np.array([anisotropy / 3.0, 1.0, 1.0])
    image = _d._form_image(rng, labels, bright[1:], tex, 0.1, spacing, 1.0, snr, np.dtype("uint16"))
    return image, labels
