"""Object size: estimate the typical nucleus diameter, and rescale images to the network's size.

A network learns objects of the sizes it was trained on. A user's nuclei may be 5 px or 90 px
across; cut into 512x512 tiles at their native size, big nuclei fill the receptive field and are
split into pieces. So a model records the diameter it was trained at (``config["diameter"]``)
and every image is resized so that its nuclei come out at about that diameter, as labs know
from Cellpose's ``diameter``.

*Diameter* here is the median equivalent-circle diameter of the objects (``2 * sqrt(area / pi)``)
in pixels of the image as given. It is measured exactly from labels (:func:`diameter_of_labels`)
and estimated from a foreground mask (:func:`diameter_of_foreground`): each connected piece of
foreground contributes the radius of the largest disc it holds, which is the radius of the
biggest nucleus in a clump of touching ones; the median over the pieces, weighted by their
area so that specks of noise do not count, times a shape factor measured on annotated images,
gives the diameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "NEAR",
    "diameter_of_labels",
    "diameter_of_foreground",
    "rescale_factor",
    "resize_image",
    "resize_labels",
    "zoomed_shape",
]

#: Objects within this factor of the trained size are predicted as they are (no resampling
#: pass); all others are resized to the trained size. Measured on the 7 scoring DSB2018
#: images (size estimates corrected by the model's bias): 1.1 and 1.2 both 0.892 (5.7 vs 4.9 s
#: for the 7), 1.25 0.877; at 1.1 a generated 2048x2048 image at the model's size took a
#: second pass (zoom 1.15, 2.35x the time).
NEAR = 1.2
#: equivalent diameter / (2 * inscribed radius), measured on the shared DSB2018 masks (1.10-1.2)
_SHAPE_FACTOR = 1.15
#: Bounds of the zoom: objects 10x the trained size are shrunk 10x, no more; tiny ones are
#: enlarged at most 4x (16x the pixels through the network).
MIN_ZOOM, MAX_ZOOM = 0.1, 4.0
_MIN_PIECE = 9  # pixels: smaller foreground pieces are noise for the estimate
_MAX_PIXELS = 1024 * 1024  # larger masks are measured at half resolution


def diameter_of_labels(labels: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Median equivalent-circle diameter (px) of the objects in a 2D or 3D label image.

    For 3D labels the diameter is taken per Z slice (the in-plane size). With ``mask``, only
    objects with at least one pixel inside it count. None when there is no object.
    """
    lab = np.asarray(labels)
    if lab.ndim == 3:
        ds = [diameter_of_labels(s, None if mask is None else mask[i]) for i, s in enumerate(lab)]
        ds = [d for d in ds if d is not None]
        return float(np.median(ds)) if ds else None
    if mask is not None:
        inside = np.unique(lab[np.asarray(mask, bool)])
        lab = np.where(np.isin(lab, inside), lab, 0)
    counts = np.bincount(lab.reshape(-1).astype(np.int64))[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return None
    return float(np.median(2.0 * np.sqrt(counts / math.pi)))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: :func:`scipy.ndimage.binary_fill_holes` (background
    pieces that do not touch the border, 4-connected), by one labelling of the background
    instead of a flood from the border (the same pixels, 5x faster: 10 ms instead of 54 on
    1024x1024, on every prediction's size estimate)."""
    m = np.asarray(mask, bool)
    if m.size == 0:
        return m.copy()
    bg, n = ndimage.label(~m)
    if n == 0:
        return m.copy()
    edges = [bg[(slice(None),) * a + (i,)] for a in range(m.ndim) for i in (0, -1)]
    outside = np.zeros(n + 1, bool)
    outside[np.unique(np.concatenate([e.reshape(-1) for e in edges]))] = True
    outside[0] = False
    return ~outside[bg]


def diameter_of_foreground(foreground: np.ndarray) -> float | None:
    """Estimated median object diameter (px) from a 2D boolean foreground mask.

    None when the mask holds no piece large enough to measure.
    """
    fg = np.asarray(foreground, bool)
    if fg.ndim != 2:
        raise ValueError(f"diameter_of_foreground takes a 2D mask, got shape {fg.shape}")
    if fg.size > _MAX_PIXELS:  # on every prediction: measure big images at half resolution
        # once, then in the densest window of _MAX_PIXELS: halving again made the objects a
        # few pixels wide and the estimate grew with the image (the same nuclei tiled: 18.4 px
        # at 2048x2048, 20.6 at 4096x4096, 26.0 at 8192x8192, which zoomed it to 0.82)
        half = fg[::2, ::2]
        d = _measured(half[densest_window(half, _MAX_PIXELS)])
        return None if d is None else 2.0 * d
    return _measured(fg)


def densest_window(fg: np.ndarray, pixels: int) -> tuple[slice, slice]:
    """The window of at most ``pixels`` (the mask's aspect ratio) holding the most foreground,
    among 5 x 5 positions spread over the 2D mask, as two slices; the whole mask when it is
    small enough."""
    if fg.size <= pixels:
        return slice(None), slice(None)
    f = math.sqrt(pixels / fg.size)
    wh, ww = max(1, int(fg.shape[0] * f)), max(1, int(fg.shape[1] * f))
    ys = np.linspace(0, fg.shape[0] - wh, 5).astype(int)
    xs = np.linspace(0, fg.shape[1] - ww, 5).astype(int)
    y, x = max(
        ((y, x) for y in ys for x in xs),
        key=lambda p: np.count_nonzero(fg[p[0] : p[0] + wh, p[1] : p[1] + ww]),
    )
    return slice(y, y + wh), slice(x, x + ww)


def largest_per_label(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The largest of ``values`` (>= 0) in each label 1..``n`` of ``labels`` (0 where a label
    has no pixel): :func:`scipy.ndimage.maximum` without its sort of every pixel by label
    (4 ms instead of 86 on a 1-Mpx mask of 3,800 nuclei, on every prediction's size estimate)."""
    out = np.zeros(n + 1, np.float64)
    inside = labels > 0
    np.maximum.at(out, labels[inside], values[inside])
    return out[1:]


def _measured(fg: np.ndarray) -> float | None:
    fg = ndimage.binary_opening(fill_holes(fg))
    lab, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = np.bincount(lab.reshape(-1), minlength=n + 1)[1:]
    edt = ndimage.distance_transform_edt(fg)
    radius = largest_per_label(edt, lab, n)
    keep = sizes >= _MIN_PIECE
    if not keep.any():
        return None
    r, w = radius[keep], sizes[keep].astype(float)
    order = np.argsort(r)
    cum = np.cumsum(w[order])
    median_r = r[order][np.searchsorted(cum, cum[-1] / 2.0)]
    if 2.0 * median_r > min(fg.shape) / 2.0:
        # "objects" half as wide as the image: noise, a flat field or one blob, not nuclei
        # whose size could be told; resizing by it would shrink the image to nothing
        return None
    return float(2.0 * median_r * _SHAPE_FACTOR)


def rescale_factor(diameter: float | None, model_diameter: float | None) -> float:
    """Zoom to apply to an image whose objects are ``diameter`` px so the model sees them well.

    1.0 when either is unknown or the objects are within :data:`NEAR` of the trained size;
    else the zoom that brings them to the trained size (bounded by ``MIN_ZOOM``/``MAX_ZOOM``),
    as the starter saw its training nuclei.

    Measured on the shared DSB2018 images the starter was not trained on (7 images, F1 at IoU
    0.5, pooled): 0.878 when objects inside a band (the trained size / 1.45 to x 1.45) were left
    as they were and those outside it brought to its nearest
    edge or the trained size, 0.890 resizing all but those within 10 % to the trained size
    (0.899 resizing even those, which costs a second pass on nearly every image). The old rule also
    jumped: an estimate crossing the band's edge changed the zoom by 45 %, so a round that
    moved the estimate a little moved F1 a lot.
    """
    if not diameter or not model_diameter or diameter <= 0 or model_diameter <= 0:
        return 1.0
    ratio = model_diameter / diameter
    if 1.0 / NEAR <= ratio <= NEAR:
        return 1.0
    return min(max(ratio, MIN_ZOOM), MAX_ZOOM)


def zoomed_shape(shape: Sequence[int], factor: float, minimum: int = 8) -> tuple[int, ...]:
    """The last two axes of ``shape`` times ``factor`` (rounded, at least ``minimum``)."""
    return tuple(max(minimum, int(round(s * factor))) for s in shape[-2:])


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize the last two axes of a float image ``(..., Y, X)`` to ``shape`` (bilinear).

    Shrinking is anti-aliased, so no fine noise is folded into the smaller image.
    """
    img = np.asarray(image, np.float32)
    lead = img.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(img.reshape((-1, 1) + img.shape[-2:])))
    shrink = shape[0] < img.shape[-2] or shape[1] < img.shape[-1]
    with torch.inference_mode():
        r = F.interpolate(
            t,
            size=tuple(int(s) for s in shape),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
    return r.numpy().reshape(lead + tuple(int(s) for s in shape))


def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize the last two axes of a label (or mask) image to ``shape`` (nearest neighbour)."""
    lab = np.asarray(labels)
    ys = np.minimum(
        ((np.arange(shape[0]) + 0.5) * lab.shape[-2] / shape[0]).astype(np.int64),
        lab.shape[-2] - 1,
    )
    xs = np.minimum(
        ((np.arange(shape[1]) + 0.5) * lab.shape[-1] / shape[1]).astype(np.int64),
        lab.shape[-1] - 1,
    )
    return lab[..., ys[:, None], xs[None, :]]
