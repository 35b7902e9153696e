"""Random ellipse and ellipsoid objects for the generated nuclei: their shapes and placement.

:func:`sample_objects` draws sizes, axis ratios, orientations and a slightly wavy outline for
each object and places them in the image, a chosen fraction in clusters of touching
neighbours. Positions and sizes are physical (xy pixels; z is scaled by the anisotropy).
Rendering the objects into labels and an image is :mod:`napari_unet.synthetic_render`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_MODES = 3  # number of low-frequency modes of the boundary perturbation
_TARGET_COVERAGE = 0.33  # nominal area fraction before overlap/edge losses
_GAP = 1.5  # minimum gap (pixels) between objects that are not meant to touch

__all__ = [
    "N_MODES",
    "Objects",
    "default_n_objects",
    "radial_extent",
    "random_unit_vectors",
    "sample_objects",
]


@dataclass
class Objects:
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


def random_unit_vectors(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    """``n`` random directions, shape ``(n, ndim)``, each of length 1."""
    v = rng.standard_normal((n, ndim))
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return v / norm


def radial_extent(rotation: np.ndarray, semi_axes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Distance from the centre to the ellipse boundary along unit vectors ``u``.

    ``rotation`` (k, d, d), ``semi_axes`` (k, d) and ``u`` (k, d) describe k
    (object, direction) pairs.
    """
    q = np.einsum("ki,kij->kj", u, rotation) / semi_axes
    return 1.0 / np.maximum(np.linalg.norm(q, axis=1), 1e-12)


def default_n_objects(
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


def sample_objects(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    n_objects: int,
    radius: tuple[float, float],
    touching: float,
) -> Objects:
    """Draw object shapes and place them, a fraction ``touching`` in clusters."""
    ndim = len(shape)
    n = n_objects
    extent = np.asarray(shape, dtype=float) * spacing  # physical size of the image

    r = rng.uniform(radius[0], radius[1], size=n)
    ratios = rng.uniform(0.6, 1.0, size=(n, ndim - 1))
    semi_axes = np.concatenate([r[:, None], r[:, None] * ratios], axis=1)
    rotations = _random_rotations(rng, n, ndim)
    mode_dirs = random_unit_vectors(rng, n * N_MODES, ndim).reshape(n, N_MODES, ndim)
    mode_freq = rng.uniform(1.5, 3.5, size=(n, N_MODES))
    mode_phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, N_MODES))
    mode_amp = rng.uniform(0.01, 0.045, size=(n, N_MODES))
    brightness = rng.uniform(0.5, 1.5, size=n)
    objs = Objects(
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
    objs: Objects,
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
        u = random_unit_vectors(rng, obj.size, ndim)
        reach = radial_extent(objs.rotations[a], objs.semi_axes[a], u)
        reach = reach + radial_extent(objs.rotations[obj], objs.semi_axes[obj], u)
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
