"""True 3D objects from a stack of probabilities (a 2D network slice by slice, or a 3D network).

A 2D network looks at one slice at a time. Between two nuclei stacked in Z the out-of-focus
haze looks like a dim nucleus, so every slice of the column is called "interior" and any
assembly that only follows the probabilities (3D connected seeds, or linking slices by overlap)
chains the nuclei into one column. The assembly here works on the stacked ``(Z, Y, X)``
probabilities with the voxel anisotropy, in three steps:

1. **Seeds.** The interior probability is smoothed with a Gaussian of the same physical width in
   every direction (``smooth`` in-plane pixels, ``smooth * Y / Z`` slices). Its confident core is
   measured by a Euclidean distance transform with ``sampling=spacing``, and every core region
   whose distance peak stands ``h`` pixels above its saddle with a neighbour is one seed
   (h-maxima), so two nuclei joined by a neck are two seeds.
2. **Growth.** Seeds grow by watershed over the smoothed foreground (``-distance`` inside the
   core, ``1 - interior`` outside).
3. **Where the signal ends.** A 2D network's interior flickers from slice to slice, so one
   nucleus can come out as two or three seeds stacked in Z. Objects that touch in Z over at
   least ``contact`` of the smaller one's largest cross-section are first joined
   (:func:`merge_stacked`); then every object's Z profile of the image signal (sum over the
   object's pixels of each slice of ``image - background``) is cut at each valley deeper than
   ``valley`` times the lower of the two peaks beside it (two stacked nuclei), and its slices
   under ``trim`` times the peak of their part are dropped (the haze above and below a
   nucleus). So the image, not the flicker of the network, decides whether a column is one
   nucleus or two.
4. **Faint objects.** An object whose mean signal above the background is under
   ``min_contrast`` times the median object's is dropped (:func:`drop_faint`): on noisy
   volumes a 2D network calls patches of background noise "interior".

The defaults were chosen on the stacked probabilities of the 2D starter over the two shared real
volumes (at three zooms of the ovule) and seven generated ones (``benchmarks/real_3d.py``,
``docs/benchmarks.md``).

For volumes too big to assemble at once the slices are linked one after the other by
:class:`SliceLinker`, which applies the Z-profile rules of step 3 as it goes (with its own
thresholds; it does not join stacked objects).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from .metrics import _overlap
from .postprocess import _each, _threads_for
from .scale import largest_per_label

__all__ = [
    "instances_3d_from_stack",
    "merge_stacked",
    "split_by_z_profile",
    "drop_faint",
    "SliceLinker",
    "relative_spacing",
]

#: Default seed height ``h`` as a fraction of the median core radius.
H_FRACTION = 0.3
#: Default smoothing of the stacked probabilities (Gaussian sigma, in-plane pixels).
SMOOTH = 2.0
#: Defaults of the Z rules (see :func:`instances_3d_from_stack`).
CONTACT, VALLEY, TRIM, MIN_CONTRAST = 0.65, 0.9, 0.2, 0.25


def relative_spacing(spacing: Any, ndim: int = 3) -> np.ndarray:
    """``(Z, Y, X)`` voxel size in units of the in-plane pixel (``None``: isotropic)."""
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray([float(v) for v in spacing][-ndim:], float)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (Z, Y, X), got {spacing!r}")
    return sp / np.sqrt(sp[-1] * sp[-2])


def _z_profiles(labels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """(N + 1, Z): per object and slice, the sum of ``weights`` (or the pixel count)."""
    Z = labels.shape[0]
    n = int(labels.max()) if labels.size else 0
    prof = np.zeros((n + 1, Z))
    for z in range(Z):
        lz = labels[z].ravel()
        w = None if weights is None else weights[z].ravel()
        prof[:, z] = np.bincount(lz, weights=w, minlength=n + 1)[: n + 1]
    prof[0] = 0
    return prof


def _cut_profile(s: np.ndarray, valley: float, trim: float) -> list[tuple[int, int, np.ndarray]]:
    """Parts ``(lo, hi, keep)`` of one Z profile: split at deep valleys, tails trimmed."""
    zs = np.flatnonzero(s > 0)
    if zs.size == 0:
        return []
    a, b = int(zs[0]), int(zs[-1]) + 1
    seg = s[a:b].astype(float)
    # a light [1, 2, 1] / 4 smoothing against noise; it must not fill the valley of short objects
    sm = ndimage.correlate1d(seg, [0.25, 0.5, 0.25], mode="nearest") if seg.size >= 5 else seg
    cuts = [0]
    for i in range(1, sm.size - 1):
        if sm[i] <= sm[i - 1] and sm[i] <= sm[i + 1]:
            left, right = sm[cuts[-1] : i].max(), sm[i + 1 :].max()
            if sm[i] < valley * min(left, right):
                cuts.append(i)
    cuts.append(sm.size)
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        peak = sm[lo:hi].max()
        parts.append((a + lo, a + hi, sm[lo:hi] >= trim * peak))
    return parts


def _background_level(image: np.ndarray, labels: np.ndarray) -> float:
    out = image[labels == 0]
    return float(np.median(out)) if out.size else float(np.min(image))


def split_by_z_profile(
    labels: np.ndarray,
    image: np.ndarray | None,
    *,
    valley: float = VALLEY,
    trim: float = TRIM,
) -> np.ndarray:
    """Split objects whose Z profile of signal has a deep valley; drop their faint end slices.

    Parameters
    ----------
    labels
        int ``(Z, Y, X)`` instance labels (changed in place and returned).
    image
        float ``(Z, Y, X)`` intensities (any scale), or None to use the objects' areas.
    valley
        A local minimum of the profile under ``valley`` times the smaller of the peaks on its
        two sides separates two objects (0 disables splitting).
    trim
        Slices whose signal is under ``trim`` times the peak of their object are background.

    Returns
    -------
    np.ndarray
        ``labels``, ids 1..N.
    """
    if labels.ndim != 3 or labels.shape[0] < 3 or labels.max() == 0:
        return labels
    w = None
    if image is not None:
        if image.shape != labels.shape:
            raise ValueError(f"image has shape {image.shape}, labels {labels.shape}")
        bg = _background_level(image, labels)
        w = np.clip(image.astype(np.float32) - np.float32(bg), 0, None)
    prof = _z_profiles(labels, w)
    n, Z = prof.shape[0] - 1, labels.shape[0]
    lut = np.zeros((n + 1, Z), np.int64)
    nxt = n + 1
    for k in range(1, n + 1):
        for j, (lo, hi, keep) in enumerate(_cut_profile(prof[k], valley, trim)):
            new = k if j == 0 else nxt
            nxt += j > 0
            lut[k, lo:hi] = np.where(keep, new, 0)
    ids = np.unique(lut)
    ids = ids[ids > 0]
    remap = np.zeros(nxt, np.int32)
    remap[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    lut32 = remap[lut]
    for z in range(Z):
        labels[z] = lut32[labels[z], z]
    return labels


def _keep(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Relabel in place: ids with ``keep[id]`` become 1..N in order, the others background."""
    keep = np.asarray(keep, bool).copy()
    keep[0] = False
    lut = np.zeros(keep.shape[0], np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels[...] = lut[labels]
    return labels


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    return _keep(labels, np.bincount(labels.ravel()) >= max(min_size, 1))


def merge_stacked(labels: np.ndarray, contact: float = CONTACT) -> np.ndarray:
    """Join objects that lie on top of each other in Z, face to face.

    Two objects are joined when the pixels where one sits right above the other (slice z and
    z + 1) number at least ``contact`` times the larger cross-section (pixels in one slice) of
    the smaller object. Side-by-side neighbours touch in Z only along their rim and stay apart.
    Meant to be followed by :func:`split_by_z_profile`, which cuts a column again where its
    signal has a valley (two real nuclei).

    Parameters
    ----------
    labels
        int ``(Z, Y, X)`` instance labels (changed in place and returned, ids 1..N).
    contact
        Fraction of the smaller object's largest cross-section (0 disables).
    """
    n = int(labels.max()) if labels.size else 0
    if contact <= 0 or labels.ndim != 3 or labels.shape[0] < 2 or n < 2:
        return labels
    area = _z_profiles(labels, None).max(axis=1)
    a, b = labels[:-1], labels[1:]
    face = (a > 0) & (b > 0) & (a != b)
    lo = np.minimum(a[face], b[face]).astype(np.int64)
    hi = np.maximum(a[face], b[face]).astype(np.int64)
    keys, counts = np.unique(lo * (n + 1) + hi, return_counts=True)
    pa, pb = keys // (n + 1), keys % (n + 1)
    ok = counts >= contact * np.minimum(area[pa], area[pb])
    if not ok.any():
        return labels
    parent = np.arange(n + 1)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(pa[ok].tolist(), pb[ok].tolist(), strict=True):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([root(i) for i in range(n + 1)])
    _, lut = np.unique(roots, return_inverse=True)  # root 0 (background) stays 0
    labels[...] = lut.astype(np.int32).ravel()[labels]
    return labels


def drop_faint(
    labels: np.ndarray, image: np.ndarray | None, min_contrast: float = MIN_CONTRAST
) -> np.ndarray:
    """Drop objects whose mean signal is barely above the background.

    The contrast of an object is its mean ``image`` minus the median of the background
    (``labels == 0``); objects under ``min_contrast`` times the median contrast of all objects
    become background. The rule is relative, so it does not depend on the image's scale or on
    how bright the nuclei are, only on how they compare with each other.

    Parameters
    ----------
    labels
        int instance labels (changed in place and returned, ids 1..N).
    image
        Intensities of the same shape (None: nothing is dropped).
    min_contrast
        Fraction of the median object contrast (0 disables).
    """
    n = int(labels.max()) if labels.size else 0
    if image is None or min_contrast <= 0 or n == 0:
        return labels
    if image.shape != labels.shape:
        raise ValueError(f"image has shape {image.shape}, labels {labels.shape}")
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=image.ravel(), minlength=n + 1)
    contrast = sums / np.maximum(counts, 1) - _background_level(image, labels)
    present = counts > 0
    present[0] = False
    ref = float(np.median(contrast[present])) if present.any() else 0.0
    if ref <= 0:
        return labels
    return _keep(labels, present & (contrast >= min_contrast * ref))


def instances_3d_from_stack(
    probabilities: np.ndarray,
    spacing: Any = None,
    *,
    image: np.ndarray | None = None,
    seed_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    smooth: float = SMOOTH,
    h: float | None = None,
    h_fraction: float = H_FRACTION,
    contact: float = CONTACT,
    valley: float = VALLEY,
    trim: float = TRIM,
    min_contrast: float = MIN_CONTRAST,
    min_size: int | None = None,
    min_seed_size: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """3D instance labels from stacked background / interior / boundary probabilities.

    Parameters
    ----------
    probabilities
        float ``(3, Z, Y, X)`` (softmax output of a 2D network slice by slice, or of a 3D one).
    spacing
        Physical voxel size ``(Z, Y, X)`` (e.g. a napari layer's scale); None: isotropic.
    image
        Optional ``(Z, Y, X)`` intensities of the same volume (normalised or raw): objects are cut
        where their signal ends in Z (see :func:`split_by_z_profile`). Without it the objects'
        areas are used.
    seed_threshold, foreground_threshold
        Smoothed interior probability of a seed core; foreground = smoothed
        ``1 - background`` above this.
    smooth
        Gaussian sigma in in-plane pixels (the same physical width along Z); 0 disables.
    h
        Height, in in-plane pixels of distance, a core's peak must stand above the saddle with
        a neighbour to be a seed of its own; larger merges more. Default: ``h_fraction`` times
        the median radius of the cores (so the rule does not depend on the nuclei's size).
    h_fraction
        See ``h`` (default ``H_FRACTION``).
    contact
        Objects stacked face to face in Z over this fraction of the smaller one's largest
        cross-section are joined before the Z-profile rules (:func:`merge_stacked`; 0 disables).
    valley, trim
        Z-profile rules, see :func:`split_by_z_profile` (``valley=0`` and ``trim=0`` disable).
    min_contrast
        Objects fainter than this fraction of the median object's contrast are dropped
        (:func:`drop_faint`; needs ``image``; 0 disables).
    min_size, min_seed_size
        Smallest object / seed in isotropic voxels at the in-plane resolution (default 40 / 8).
    out
        Optional int32 ``(Z, Y, X)`` array to write into.

    Returns
    -------
    np.ndarray
        int32 ``(Z, Y, X)``; 0 = background, objects 1..N.
    """
    prob = np.asarray(probabilities)
    if prob.ndim != 4 or prob.shape[0] != 3:
        raise ValueError(
            "3D instance assembly expects probabilities of shape (3, Z, Y, X) "
            f"(background, interior, boundary), got {prob.shape}"
        )
    spatial = prob.shape[1:]
    sp = relative_spacing(spacing)
    vox = float(sp[0] * sp[1] * sp[2])
    min_size = 40 if min_size is None else int(min_size)
    min_seed_size = 8 if min_seed_size is None else int(min_seed_size)
    sigma = tuple(float(smooth) / sp) if smooth and smooth > 0 else None

    def _smooth(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return ndimage.gaussian_filter(x, sigma, mode="nearest") if sigma else x

    interior = _smooth(prob[1])
    fg = _smooth(prob[0])
    fg_mask = fg < np.float32(1.0 - foreground_threshold)
    del fg
    core = (interior > seed_threshold) & fg_mask
    labels = np.zeros(spatial, np.int32) if out is None else out
    if labels.shape != spatial:
        raise ValueError(f"out has shape {labels.shape}, expected {spatial}")
    labels[...] = 0
    if not core.any():
        return labels
    # small cores are noise (their volume counted at the in-plane resolution)
    cores, _ = ndimage.label(core)
    _drop_small(cores, int(np.ceil(min_seed_size / vox)))
    core = cores > 0
    pieces, items = _pieces(core)
    dist = _edt_by_piece(pieces, items, sp)  # float64: h_maxima needs it
    if h is None:  # a fraction of the typical core radius: the same rule at every object size
        n_cores = int(cores.max())
        radii = largest_per_label(dist, cores, n_cores) if n_cores else [0.0]
        h = float(np.clip(h_fraction * np.median(radii), 1.0, None))
    del cores
    peaks = _h_maxima_by_piece(dist, pieces, items, float(h)) if h > 0 else core
    del pieces
    markers, n = ndimage.label(peaks, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return labels
    elevation = 1.0 - interior
    elevation[core] = -dist[core]
    del dist, interior
    _watershed_by_component(elevation, markers, fg_mask, labels)
    del elevation
    merge_stacked(labels, contact)
    if valley > 0 or trim > 0:
        split_by_z_profile(labels, image, valley=valley, trim=trim)
    drop_faint(labels, image, min_contrast)
    return _drop_small(labels, int(np.ceil(min_size / vox)))


def _pieces(core: np.ndarray) -> tuple[np.ndarray, list]:
    """The pieces of ``core`` connected by faces, edges or corners (the footprint of the
    h-maxima's reconstruction), and ``(id, bounding box with one voxel of margin)`` of each."""
    full = np.ones((3,) * core.ndim, bool)
    pieces, _ = ndimage.label(core, structure=full)
    items = [
        (i, tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl))
        for i, sl in enumerate(ndimage.find_objects(pieces), 1)
        if sl is not None
    ]
    return pieces, items


def _edt_by_piece(pieces: np.ndarray, items: list, sampling) -> np.ndarray:
    """:func:`scipy.ndimage.distance_transform_edt` of ``pieces > 0``, one piece at a time in
    its bounding box (one voxel of margin), 0 outside the pieces.

    The same distances as over the whole volume: from a voxel of a piece, the nearest voxel
    outside it lies in the box (the box's margin is outside the piece, and any voxel in the
    axis-aligned box between two voxels is no farther from the first than the second), and
    a voxel of another piece in the box is never nearer than a zero (pieces touch only through
    zeros). Over the whole volume the transform also measures every background voxel
    (64x512x512 under cProfile: 5.6 s; piece by piece 0.8 s).
    """
    dist = np.zeros(pieces.shape, np.float64)

    def one(item) -> None:
        i, box = item
        own = pieces[box] == i
        dist[box][own] = ndimage.distance_transform_edt(own, sampling=sampling)[own]

    _each(one, items, _threads_for(pieces.size))
    return dist


def _h_maxima_by_piece(dist: np.ndarray, pieces: np.ndarray, items: list, h: float) -> np.ndarray:
    """:func:`skimage.morphology.h_maxima` of ``dist`` (0 outside the pieces, > 0 inside),
    one piece of :func:`_pieces` at a time in its bounding box.

    The same maxima as over the whole volume: pieces touch only through zeros, and the
    reconstruction cannot carry a value above 0 across them, so each piece's maxima depend on
    that piece alone. Over the whole volume skimage sorts every voxel of it (64x512x512, under
    cProfile: 18.0 s of a 35.5 s assembly; 5.9 s piece by piece); the pieces hold a fraction
    of the voxels.
    """
    peaks = np.zeros(pieces.shape, np.uint8)

    def one(item) -> None:
        i, box = item
        own = pieces[box] == i
        d = np.where(own, dist[box], 0.0)
        if d.max() < h:
            return  # its highest point is under h above the zeros around it: no maximum
        found = (h_maxima(d, h) > 0) & own
        peaks[box][found] = 1  # only this piece's voxels: threads never write the same ones

    _each(one, items, _threads_for(pieces.size))
    return peaks


def _watershed_by_component(
    elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray, out: np.ndarray
) -> None:
    """``out[...] = skimage.segmentation.watershed(elevation, markers, mask=mask)``, flooded
    only where it has to be.

    A piece of ``mask`` (connected by faces, the watershed's neighbourhood) that holds no
    marker stays 0, one that holds a single marker's voxels becomes that marker whole, and only
    pieces shared by several markers are flooded, each in its bounding box. Water cannot leave
    a piece, so the result is the whole volume's wherever no two voxels are at the same height;
    among equal heights skimage breaks ties by the layout of its heap, which differs in a box
    (64x512x512: 0.017 % of the voxels, the same objects; ``docs/benchmarks.md``).
    """
    comp, n = ndimage.label(mask)
    if n == 0:
        out[...] = 0
        return
    at = markers > 0
    span = int(markers.max()) + 1
    pairs = np.unique(comp[at].astype(np.int64) * span + markers[at])
    pc, pm = np.divmod(pairs, span)
    pc, pm = pc[pc > 0], pm[pc > 0]
    per = np.bincount(pc, minlength=n + 1)
    only = np.zeros(n + 1, np.int32)
    one_marker = per[pc] == 1
    only[pc[one_marker]] = pm[one_marker]
    np.take(only, comp, out=out)  # no volume-sized temporary
    shared = np.flatnonzero(per >= 2)
    if shared.size == 0:
        return
    boxes = ndimage.find_objects(comp)

    def one(c: int) -> None:
        box = boxes[c - 1]
        own = comp[box] == c
        ws = watershed(elevation[box], markers=np.where(own, markers[box], 0), mask=own)
        out[box][own] = ws[own]

    _each(one, shared.tolist(), _threads_for(mask.size))


class SliceLinker:
    """Link the 2D objects of consecutive slices into 3D objects, one slice at a time.

    For volumes too big to assemble in 3D (prediction written plane by plane). An object of a
    slice takes the id of the object of the previous slice it overlaps most (greedy by IoU, at
    least ``min_iou``) unless that would chain two nuclei: a link is refused when the previous
    object's signal has already faded under ``valley`` times its peak and rises again in this
    slice, or when its IoU with the previous object drops under ``min_iou``. An object whose signal
    is under ``trim`` times the peak of the object it continues is background (the fading tail).

    Call it with each slice's labels (ids 1..N of that slice) and, optionally, that slice's
    intensities; it returns the slice with final ids, unique over the volume.
    """

    def __init__(
        self, *, min_iou: float = 0.2, valley: float = 0.7, trim: float = 0.15, start_id: int = 1
    ):
        self.min_iou, self.valley, self.trim = float(min_iou), float(valley), float(trim)
        self.next_id = int(start_id)
        self._prev: np.ndarray | None = None
        self._peak: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._background: float | None = None

    def __call__(self, current: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        current = np.asarray(current)
        n = int(current.max()) if current.size else 0
        if n == 0:
            self._prev = np.zeros(current.shape, np.int32)
            return self._prev
        if image is not None:
            if self._background is None:
                self._background = _background_level(image, current)
            w = np.clip(image.astype(np.float32) - np.float32(self._background), 0, None)
            signal = np.bincount(current.ravel(), weights=w.ravel(), minlength=n + 1)
        else:
            signal = np.bincount(current.ravel(), minlength=n + 1).astype(float)
        lut = np.zeros(n + 1, np.int64)
        prev = self._prev
        if prev is not None and prev.shape != current.shape:
            raise ValueError(f"previous slice has shape {prev.shape}, this one {current.shape}")
        drop = np.zeros(n + 1, bool)
        if prev is not None and prev.any():
            ov = _overlap(current, prev)
            used_c: set[int] = set()
            used_p: set[int] = set()
            for j in np.argsort(-ov.ious, kind="stable"):
                if ov.ious[j] < self.min_iou:
                    break
                c, pi = int(ov.rows[j]), int(ov.cols[j])
                if c in used_c or pi in used_p:
                    continue
                cid, pid = int(ov.pred_ids[c]), int(ov.true_ids[pi])
                peak, last, s = self._peak[pid], self._last[pid], float(signal[cid])
                if last < self.valley * peak and s > last:
                    continue  # faded and rising again: a new nucleus starts here
                used_c.add(c)
                used_p.add(pi)
                lut[cid] = pid
                if s < self.trim * peak:
                    drop[cid] = True
        present = np.flatnonzero(np.bincount(current.ravel(), minlength=n + 1))
        present = present[present > 0]
        fresh = present[(lut[present] == 0) & ~drop[present]]
        lut[fresh] = np.arange(self.next_id, self.next_id + len(fresh))
        self.next_id += len(fresh)
        if self.next_id > np.iinfo(np.int32).max:
            raise ValueError("more than 2**31 objects: the labels do not fit in int32")
        for cid in present:
            fid = int(lut[cid])
            s = float(signal[cid])
            self._peak[fid] = max(self._peak.get(fid, 0.0), s)
            self._last[fid] = s
        # the faded tail keeps its id for linking the next slice, but is background
        self._prev = lut.astype(np.int32)[current]
        lut[drop] = 0
        return lut.astype(np.int32)[current]
