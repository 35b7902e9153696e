"""Reading napari layers for the U-Net widgets, and writing results back as layers.

Everything here is bookkeeping between napari and the core: which axes a layer has, which part of
it to predict (whole layer, current slice, field of view), where the plugin's own output layers
are, how Shapes become a bool mask. No model arithmetic happens here.

Problems with the user's input raise :class:`LayerError` (a ``ValueError``) with a plain message;
the widgets turn it into a napari notification.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Layer, Shapes

    from ..segmenter import Segmenter

__all__ = [
    "ChannelList",
    "stack_channels",
    "edited_planes",
    "planes_mask",
    "LayerError",
    "LayerCombo",
    "PLUGIN_KEY",
    "PredictRequest",
    "Region",
    "unwrap_viewer",
    "image_array",
    "spatial_shape",
    "image_axes",
    "model_channel",
    "plan_region",
    "make_request",
    "find_own_layer",
    "write_prediction",
    "write_preview",
    "hide_preview",
    "keep_selection",
    "labels_digest",
    "shapes_to_mask",
    "visible_world_corners",
    "adopt_layer",
    "carry_corrections",
]

PLUGIN_KEY = "napari_unet"
PREVIEW_NAME = "unet preview"
SCOPES = ("whole layer", "current slice", "current field of view")


class LayerError(ValueError):
    """A problem with the user's layers, explained in plain words."""


def unwrap_viewer(viewer: Any) -> napari.Viewer:
    """The real viewer behind napari's ``PublicOnlyProxy`` (given to plugin widgets).

    The widgets keep their own references to layers and key the shared session by the viewer;
    both need the real objects, not per-widget proxies.
    """
    return getattr(viewer, "__wrapped__", viewer)


# ----------------------------------------------------------------------------- reading layers
def image_array(layer: Layer) -> Any:
    """The layer's full-resolution array (level 0 of a multiscale layer); not copied."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def spatial_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of the layer without the colour axis of an RGB(A) layer."""
    shape = tuple(int(s) for s in np.shape(image_array(layer)))
    if getattr(layer, "rgb", False):
        shape = shape[:-1]
    return shape


def _first_axis_is_time(layer: Layer, viewer: napari.Viewer | None) -> bool:
    labels: list[str] = []
    own = getattr(layer, "axis_labels", None)
    if own:
        labels.append(str(own[0]))
    if viewer is not None:
        world = tuple(viewer.dims.axis_labels)
        nd = len(spatial_shape(layer))
        if len(world) >= nd:
            labels.append(str(world[-nd]))
    return any(lab.strip().lower().startswith("t") for lab in labels)


def is_volume(layer: Image, viewer: napari.Viewer | None = None) -> bool:
    """True for a layer read as a Z stack (ZYX or TZYX), False for images and time-lapses, and
    for a layer of a shape napari-unet does not handle (its error comes later)."""
    try:
        return "Z" in image_axes(layer, viewer)
    except LayerError:
        return False


def image_axes(layer: Image, viewer: napari.Viewer | None = None) -> str:
    """Axes of an image layer for the core: YX, ZYX (or TYX), TZYX, with C for RGB."""
    nd = len(spatial_shape(layer))
    if nd == 2:
        axes = "YX"
    elif nd == 3:
        axes = "TYX" if _first_axis_is_time(layer, viewer) else "ZYX"
    elif nd == 4:
        axes = "TZYX"
    else:
        raise LayerError(
            f"layer {layer.name!r} has {nd} dimensions; napari-unet handles 2D (YX), 3D (ZYX or "
            "TYX) and 4D (TZYX) images, plus RGB"
        )
    if getattr(layer, "rgb", False):
        axes += "C"
    return axes


def model_channel(layer: Image, segmenter: Segmenter) -> tuple[int | None, str | None]:
    """``channel`` argument for the core, and a message for the user when one is chosen.

    An RGB layer given to a 1-channel model is segmented on its green channel.
    """
    if getattr(layer, "rgb", False) and segmenter.in_channels == 1:
        return 1, (
            f"{layer.name!r} is RGB and the model takes one channel: using the green channel. "
            "Use a 3-channel model to segment on all colours."
        )
    return None, None


def stack_channels(layers: list) -> Any:
    """The arrays of several single-channel image layers as one ``(..., C)`` array.

    For a model with several input channels when napari shows the channels as separate layers
    (``channel_axis``). Lazy (dask) when any layer is lazy; refuses RGB layers and layers of
    different shapes with a plain message.
    """
    names = [ly.name for ly in layers]
    for ly in layers:
        if getattr(ly, "rgb", False):
            raise LayerError(f"{ly.name!r} is RGB: channels must be single-channel layers")
    shapes = {tuple(spatial_shape(ly)) for ly in layers}
    if len(shapes) != 1:
        raise LayerError(
            f"the channel layers {names} have different shapes "
            f"({', '.join(str(spatial_shape(ly)) for ly in layers)}); they must match"
        )
    arrays = [image_array(ly) for ly in layers]
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays, axis=-1)
    import dask.array as da

    return da.stack([da.asarray(a) for a in arrays], axis=-1)


# ----------------------------------------------------------------------------- regions
@dataclass
class Region:
    """Part of a layer to predict.

    ``index`` indexes the layer's spatial dimensions (ints drop a dimension, slices keep it);
    ``axes`` are the axes of the cropped array (C included for RGB); ``full_shape`` is the
    layer's spatial shape.
    """

    index: tuple
    axes: str
    full_shape: tuple[int, ...]
    level: int = 0  # multiscale level the index refers to (0 = full resolution)
    factor: tuple[float, ...] | None = None  # level-0 pixels per level pixel, per spatial axis
    view: bool = False  # a field of view written as its own positioned layer (big layers)
    to_disk: bool = False  # the whole of a big layer: labels written into a zarr store on disk

    @property
    def is_whole(self) -> bool:
        return all(
            isinstance(i, slice) and i.start in (None, 0) and i.stop in (None, n) and i.step is None
            for i, n in zip(self.index, self.full_shape, strict=True)
        )

    def crop(self, array: Any, rgb: bool) -> Any:
        key = self.index + ((slice(None),) if rgb else ())
        return array[key]

    def crop_layer(self, layer: Layer) -> Any:
        """This region of the layer's data (of level :attr:`level` when multiscale)."""
        data = layer.data[self.level] if getattr(layer, "multiscale", False) else layer.data
        return self.crop(data, getattr(layer, "rgb", False))


def current_data_index(layer: Layer, viewer: napari.Viewer) -> tuple[int, ...]:
    """The viewer's current position as integer indices into the layer's dimensions."""
    pos = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
    shape = spatial_shape(layer)
    pos = pos[-len(shape) :]
    return tuple(int(np.clip(np.round(p), 0, n - 1)) for p, n in zip(pos, shape, strict=True))


def visible_world_corners(viewer: napari.Viewer) -> np.ndarray:
    """Top-left and bottom-right corners of the canvas in world coordinates, ``(2, ndim)``.

    Uses the Qt canvas (private napari API, checked for napari 0.5 - 0.9); raises
    :class:`LayerError` when it cannot be read.
    """
    try:
        canvas = viewer.window._qt_viewer.canvas
        corners = np.asarray(canvas._viewbox_corners_in_world, dtype=float)
    except Exception as e:  # noqa: BLE001 - any failure means "unknown"
        raise LayerError(f"cannot read the field of view of this viewer ({e})") from None
    if corners.shape != (2, viewer.dims.ndim) or not np.all(np.isfinite(corners)):
        raise LayerError("cannot read the field of view of this viewer")
    return corners


def plan_region(
    layer: Image,
    viewer: napari.Viewer,
    scope: str,
    model_ndim: int = 2,
    corners: np.ndarray | None = None,
) -> Region:
    """The part of ``layer`` to predict for ``scope`` (one of :data:`SCOPES`).

    ``current slice`` fixes the non-YX axes (a 3D model keeps Z) at the viewer's position;
    ``current field of view`` additionally crops Y and X to the visible canvas rectangle.
    """
    axes = image_axes(layer, viewer)
    spatial_axes = axes.replace("C", "")
    shape = spatial_shape(layer)
    index: list[Any] = [slice(None)] * len(shape)
    if scope == SCOPES[0]:
        return Region(tuple(index), axes, shape, to_disk=int(np.prod(shape)) > BIG_LAYER_PIXELS)
    if scope not in SCOPES:
        raise LayerError(f"unknown scope {scope!r}")
    keep = "ZYX" if model_ndim == 3 else "YX"
    here = current_data_index(layer, viewer)
    for d, a in enumerate(spatial_axes):
        if a not in keep:
            index[d] = here[d]
    if scope == SCOPES[2]:
        if viewer.dims.ndisplay != 2:
            raise LayerError("switch the viewer to 2D to predict the field of view")
        nw = viewer.dims.ndim
        if sorted(viewer.dims.displayed) != [nw - 2, nw - 1]:
            raise LayerError(
                "the field of view can only be predicted when Y and X (the last two axes) are "
                "displayed; use 'whole layer' or 'current slice'"
            )
        if corners is None:
            corners = visible_world_corners(viewer)
        data_corners = np.array([layer.world_to_data(c) for c in corners], dtype=float)
        yx = data_corners[:, -2:]
        level, factor, lshape = _view_level(layer, shape)
        lo = np.floor(yx.min(axis=0) / factor[-2:]).astype(int)
        hi = np.ceil(yx.max(axis=0) / factor[-2:]).astype(int) + 1
        for k, d in enumerate((len(shape) - 2, len(shape) - 1)):
            a, b = int(np.clip(lo[k], 0, lshape[d])), int(np.clip(hi[k], 0, lshape[d]))
            if b - a < 1:
                raise LayerError(f"{layer.name!r} is not in the field of view")
            index[d] = slice(a, b)
        if level > 0:  # the other axes of a coarser level
            for d in range(len(shape) - 2):
                if not isinstance(index[d], slice):
                    index[d] = min(int(index[d] / factor[d]), lshape[d] - 1)
    else:
        level, factor, lshape = 0, np.ones(len(shape)), shape
    kept = "".join(a for d, a in enumerate(spatial_axes) if isinstance(index[d], slice))
    if "C" in axes:
        kept += "C"
    # a big layer (or a coarser level): the part goes to its own positioned layer
    view = level > 0 or int(np.prod(shape)) > BIG_LAYER_PIXELS
    if view:
        kept_sizes = [
            len(range(*i.indices(n)))
            for i, n in zip(index, lshape, strict=True)
            if isinstance(i, slice)
        ]
        npx = int(np.prod(kept_sizes))
        if npx > MAX_VIEW_PIXELS:
            what = "field of view covers" if scope == SCOPES[2] else "current slice has"
            raise LayerError(
                f"the {what} {npx / 1e6:.0f} megapixels of {layer.name!r} at this scale (at "
                f"most {MAX_VIEW_PIXELS / 1e6:.0f} at once): zoom in and predict the field of "
                "view, or predict the whole layer (written to disk)"
            )
    return Region(tuple(index), kept, lshape, level, tuple(factor), view)


def prediction_store_path(source: str) -> Path:
    """A new OME-Zarr path for the labels of ``source``, next to the model registry."""
    from ..store import default_root

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source)[:60] or "image"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = default_root().parent / "predictions"
    path = folder / f"{safe}-{stamp}.ome.zarr"
    k = 1
    while path.exists():
        k += 1
        path = folder / f"{safe}-{stamp}-{k}.ome.zarr"
    return path


#: A field of view of a layer with more pixels than this goes to its own positioned layer
#: (``"<image> [unet view]"``) instead of a full-size labels layer (which would not fit).
BIG_LAYER_PIXELS = 8192 * 8192
#: The largest field of view predicted at once (pixels, at the level shown).
MAX_VIEW_PIXELS = 4096 * 4096


def _view_level(layer: Layer, shape: tuple[int, ...]):
    """(level napari shows, level-0 pixels per level pixel, level shape) for a field of view."""
    if not getattr(layer, "multiscale", False):
        return 0, np.ones(len(shape)), shape
    level = int(getattr(layer, "data_level", 0) or 0)
    lshape = tuple(int(s) for s in np.shape(layer.data[level]))
    if getattr(layer, "rgb", False):
        lshape = lshape[:-1]
    factor = np.asarray(shape, float) / np.maximum(np.asarray(lshape, float), 1.0)
    return level, factor, lshape


# ----------------------------------------------------------------------------- requests
@dataclass
class PredictRequest:
    """One prediction to run in a worker and write back as layers."""

    source: str  # name of the image layer
    data: Any  # the cropped image (a view or lazy array; not modified)
    axes: str
    channel: int | None
    region: Region
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    notes: list[str] = field(default_factory=list)
    data_scale: tuple[float, ...] | None = None  # physical size of each spatial axis of data
    out_path: str | None = None  # where the labels of a big layer are written (zarr store)
    diameter: float | None = None  # typical object diameter in pixels of data (None: estimate)
    engine: str = "auto"  # who runs the network (napari_unet.engines)


def make_request(
    viewer: napari.Viewer,
    layer: Image,
    segmenter: Segmenter,
    scope: str = SCOPES[0],
    corners: np.ndarray | None = None,
    channels: list | None = None,
) -> PredictRequest:
    """Read ``layer`` for a prediction of ``scope``; raises :class:`LayerError` on bad input.

    ``channels``: more single-channel image layers, stacked after ``layer`` as the model's
    input channels.
    """
    region = plan_region(layer, viewer, scope, segmenter.ndim, corners)
    channel, note = model_channel(layer, segmenter)
    if channels:  # several single-channel layers as the model's channels
        stacked = stack_channels([layer, *channels])
        if region.level:
            raise LayerError("extra channel layers work at full resolution: zoom in further")
        data = region.crop(stacked, True)
        region = dataclasses.replace(region, axes=region.axes + "C")
        channel = None
        note = "channels: " + ", ".join(repr(ly.name) for ly in [layer, *channels])
    else:
        data = region.crop_layer(layer)
    factor = np.asarray(region.factor if region.factor is not None else [1.0] * len(region.index))
    # physical sizes of the cropped array's spatial axes (anisotropic voxels: layer.scale)
    kept = [d for d, i in enumerate(region.index) if isinstance(i, slice)]
    data_scale = tuple(float(layer.scale[d] * factor[d]) for d in kept)
    scale = tuple(float(s) for s in layer.scale)
    translate = tuple(float(t) for t in layer.translate)
    notes = [note] if note else []
    if region.view:
        # the labels of the view alone, placed over the image: YX of the level shown
        scale = data_scale[-2:]
        origin = [region.index[d].start or 0 for d in (-2, -1)]
        # level pixel j covers level-0 pixels [j f, (j + 1) f): its centre is at j f + (f - 1) / 2
        translate = tuple(
            float(layer.translate[d] + layer.scale[d] * (factor[d] * (o + 0.5) - 0.5))
            for d, o in zip((-2, -1), origin, strict=True)
        )
        what = f"level {region.level} (1/{factor[-1]:.0f} resolution)" if region.level else "full"
        notes.append(
            f"{layer.name!r} is large: the field of view goes to its own layer "
            f"{layer.name + ' [unet view]'!r}, predicted at {what}"
        )
    out_path = None
    if region.to_disk:
        out_path = str(prediction_store_path(layer.name))
        notes.append(
            f"{layer.name!r} is large: its labels are written to disk ({out_path}) and shown "
            "from there"
        )
    return PredictRequest(
        source=layer.name,
        data=data,
        data_scale=data_scale,
        out_path=out_path,
        axes=region.axes,
        channel=channel,
        region=region,
        scale=scale,
        translate=translate,
        notes=notes,
    )


# ----------------------------------------------------------------------------- edited planes
def labels_digest(labels: Any) -> str | None:
    """A fingerprint of a labels array held in memory (None for lazy, on-disk arrays).

    Kept instead of a copy for 2D predictions: Train compares it with the layer's data to see
    whether the user changed anything since the prediction (blake2b: ~0.2 s for 8192x8192).
    """
    from ..engines import array_digest

    return array_digest(labels) if isinstance(labels, np.ndarray) else None


def edited_planes(labels: np.ndarray, reference: np.ndarray | None, plane_ndim: int = 2):
    """Which planes of a stack the user corrected: a bool array over the leading axes.

    ``reference`` is what the plugin predicted into the layer (see
    :meth:`Session.prediction_snapshot`); without one (a layer the user made) a plane counts as
    annotated when it holds any label. ``plane_ndim`` is 2 for a 2D model (YX planes of ZYX,
    TYX, TZYX) and 3 for a 3D model (ZYX volumes of TZYX).
    """
    labels = np.asarray(labels)
    lead = labels.ndim - plane_ndim
    if lead < 1:
        raise LayerError("edited planes need a stack (Z or T axes before the plane)")
    axes = tuple(range(lead, labels.ndim))
    if reference is None or tuple(reference.shape) != tuple(labels.shape):
        return np.any(labels != 0, axis=axes)
    return np.any(labels != reference, axis=axes)


def planes_mask(edited: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A training mask of ``shape``: whole planes where ``edited`` is True."""
    lead = edited.ndim
    return np.broadcast_to(edited.reshape(edited.shape + (1,) * (len(shape) - lead)), shape).copy()


# ----------------------------------------------------------------------------- shapes -> mask
_AREA_SHAPES = ("rectangle", "polygon", "ellipse")


def _ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """Polygon approximating the ellipse inscribed in napari's 4 bounding-box corners."""
    c = corners.mean(axis=0)
    a = (corners[1] - corners[0]) / 2
    b = (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(t) * a + np.sin(t) * b


def shapes_to_mask(shapes: Shapes, target: Layer, shape: tuple[int, ...] | None = None):
    """Bool mask (the spatial shape of ``target``): True inside the rectangles, polygons and
    ellipses of ``shapes``.

    Vertices go from the Shapes layer's data coordinates to the target's through world
    coordinates using both layers' ``scale`` and ``translate`` (trailing axes aligned, as napari
    does). A 2D shape over a stack marks that region in every plane; a shape drawn on one plane
    of a stack marks that plane only. Raises :class:`LayerError` for a shape entirely outside
    the target, or when there is no area shape at all.
    """
    from skimage.draw import polygon2mask

    shape = tuple(shape) if shape is not None else spatial_shape(target)
    nd = len(shape)
    mask = np.zeros(shape, dtype=bool)
    s_scale, s_trans = np.asarray(shapes.scale, float), np.asarray(shapes.translate, float)
    t_scale, t_trans = np.asarray(target.scale, float), np.asarray(target.translate, float)
    t_scale, t_trans = t_scale[-nd:], t_trans[-nd:]
    n_area = 0
    for i, (verts, kind) in enumerate(zip(shapes.data, shapes.shape_type, strict=True)):
        if kind not in _AREA_SHAPES:
            continue
        n_area += 1
        v = np.asarray(verts, dtype=float)
        world = v * s_scale + s_trans
        k = min(world.shape[1], nd)
        pts = (world[:, -k:] - t_trans[-k:]) / t_scale[-k:]
        yx = pts[:, -2:]
        if kind == "ellipse" and len(yx) == 4:
            yx = _ellipse_polygon(yx)
        plane = polygon2mask(shape[-2:], yx)
        if not plane.any():
            raise LayerError(
                f"shape {i + 1} ({kind}) of {shapes.name!r} lies outside {target.name!r} "
                "(or covers no pixel); move it onto the image or delete it"
            )
        key: list[Any] = [slice(None)] * nd
        for j in range(k - 2):
            d = nd - k + j
            idx = int(np.round(pts[:, j].mean()))
            if not 0 <= idx < shape[d]:
                raise LayerError(
                    f"shape {i + 1} ({kind}) of {shapes.name!r} is on a plane outside "
                    f"{target.name!r} (index {idx} along axis {d}, size {shape[d]})"
                )
            key[d] = idx
        mask[tuple(key)] |= plane
    if n_area == 0:
        raise LayerError(
            f"{shapes.name!r} has no rectangle, ellipse or polygon: draw the corrected regions "
            "with those tools (lines and paths mark no area)"
        )
    return mask


# the output layers and the pickers live in their own modules; their names stay importable here
from ._layer_outputs import (  # noqa: E402, F401
    _find_preview,
    _is_own,
    _merge,
    _put_layer,
    adopt_layer,
    carry_corrections,
    compact_labels,
    ensure_preview,
    find_own_layer,
    hide_preview,
    keep_selection,
    write_prediction,
    write_preview,
)
from ._pickers import (  # noqa: E402, F401
    ChannelList,
    LayerCombo,
    _Body,
    scrolling_body,
)
