"""The plugin's output layers: the ``"<image> [unet]"`` labels (and probabilities), the
``"unet preview"`` layer, and how a result is merged into the part of a layer it was predicted for.

Only the plugin's own layers (``metadata["napari_unet"]``) are ever replaced or removed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer

    from ..segmenter import Prediction

from ._layers import (
    PLUGIN_KEY,
    PREVIEW_NAME,
    PredictRequest,
    Region,
    labels_digest,
    spatial_shape,
)


# ----------------------------------------------------------------------------- output layers
def _is_own(layer: Layer, source: str, kind: str, klass: int | None = None) -> bool:
    md = getattr(layer, "metadata", None) or {}
    if md.get(PLUGIN_KEY) is not True or md.get("source") != source:
        return False
    if md.get("kind", "labels") != kind:
        return False
    return klass is None or md.get("class") == klass


def find_own_layer(
    viewer: napari.Viewer, source: str, kind: str = "labels", klass: int | None = None
) -> Layer | None:
    """The plugin's output layer for image ``source`` (never a layer the user made)."""
    from napari.layers import Image, Labels

    want = Labels if kind in ("labels", "view") else Image
    for layer in viewer.layers:
        if isinstance(layer, want) and _is_own(layer, source, kind, klass):
            return layer
    return None


def _merge(
    existing: np.ndarray | None,
    new: np.ndarray,
    region: Region,
    dtype: Any,
    relabel: bool,
) -> np.ndarray:
    """Full-size array with ``new`` written into ``region`` (the rest kept from ``existing``)."""
    if region.is_whole:
        return np.asarray(new, dtype=dtype)
    if existing is not None and tuple(existing.shape) == tuple(region.full_shape):
        full = np.array(existing, dtype=dtype)  # a copy: the layer changes only on assignment
    else:
        full = np.zeros(region.full_shape, dtype=dtype)
    full[region.index] = 0
    new = np.asarray(new, dtype=dtype)
    if relabel:
        # keep instance ids unique in the whole layer
        offset = full.max(initial=0)
        if offset:
            new = np.where(new > 0, new + offset, 0).astype(dtype, copy=False)
    full[region.index] = new
    return full


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """uint16 when the ids fit (0..65534), else int32.

    napari uploads uint8/uint16 labels to the GPU as they are but maps every pixel of a wider
    integer type through a lookup table on the GUI thread: measured on a 4096x4096 layer under
    Xvfb, ``add_labels`` 0.09 s (uint16) vs 0.29-0.60 s (int32), ``layer.data = ...`` 0.016 s vs
    0.27-0.32 s. A new label painted by the user takes the next free id, which fits as long
    as the layer holds fewer than 65535 objects (more ids than that keep int32).
    """
    labels = np.asarray(labels)
    if labels.dtype in (np.uint8, np.uint16):
        return labels  # compact already (the workers compact before the GUI sees it)
    if labels.size == 0 or (labels.min() >= 0 and labels.max() < 65535):
        return labels.astype(np.uint16, copy=False)
    return labels.astype(np.int32, copy=False)


def _put_layer(
    viewer: napari.Viewer,
    kind: str,
    data: np.ndarray,
    name: str,
    metadata: dict,
    scale: tuple,
    translate: tuple,
    existing: Layer | None,
    **kwargs: Any,
) -> Layer:
    if existing is not None:
        if existing.ndim == data.ndim:
            existing.data = data
            existing.scale = scale
            existing.translate = translate
            return existing
        viewer.layers.remove(existing)  # our own layer, of an older shape of the image
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=name, metadata=metadata, scale=scale, translate=translate, **kwargs)


def write_prediction(
    viewer: napari.Viewer,
    request: PredictRequest,
    prediction: Prediction,
    segmenter_task: str = "instance",
    classes: list[str] | None = None,
    probabilities: bool = False,
    base: np.ndarray | None = None,
) -> Labels:
    """Create or update the plugin's labels (and probability) layers for ``request``.

    The labels layer is ``"<image> [unet]"``; only the plugin's own layer for that image is
    ever replaced, and for a partial region only that region changes. ``base``: what the rest
    of a partial region's new layer holds when there is no own layer (the labels of the
    layer the user's edits were kept in).
    """
    src = request.source
    region = request.region
    if region.view:
        own = find_own_layer(viewer, src, "view")
        return _put_layer(
            viewer,
            "labels",
            compact_labels(prediction.labels),
            f"{src} [unet view]",
            {PLUGIN_KEY: True, "source": src, "kind": "view"},
            request.scale,
            request.translate,
            own,
        )
    own = find_own_layer(viewer, src, "labels")
    if region.to_disk:  # labels in a zarr store on disk (too big for memory), shown lazily
        if own is not None:
            viewer.layers.remove(own)  # the plugin's own older result (its store stays on disk)
        return viewer.add_labels(
            prediction.labels,
            name=f"{src} [unet]",
            metadata={PLUGIN_KEY: True, "source": src, "kind": "labels", "path": request.out_path},
            scale=request.scale,
            translate=request.translate,
        )
    if region.is_whole:  # as the worker compacted it: no copy on the GUI thread
        labels = compact_labels(prediction.labels)
    else:
        labels = compact_labels(
            _merge(
                base if own is None else np.asarray(own.data),
                prediction.labels,
                region,
                np.int32,
                relabel=segmenter_task == "instance",
            )
        )
    layer = _put_layer(
        viewer,
        "labels",
        labels,
        f"{src} [unet]",
        {PLUGIN_KEY: True, "source": src, "kind": "labels"},
        request.scale,
        request.translate,
        own,
    )
    if probabilities and prediction.probabilities is not None:
        _write_probabilities(viewer, request, prediction.probabilities, segmenter_task, classes)
    return layer


def _write_probabilities(viewer, request: PredictRequest, probs, segmenter_task, classes) -> None:
    """The plugin's probability layers of ``request`` (interior only for an instance model)."""
    src, region = request.source, request.region
    if segmenter_task == "instance":
        channels = [(1, f"{src} [unet prob]")]
    else:
        names = classes or [f"class {k}" for k in range(probs.shape[0])]
        channels = [(k, f"{src} [unet prob] {names[k]}") for k in range(probs.shape[0])]
    for k, name in channels:
        prev = find_own_layer(viewer, src, "probabilities", k)
        data = _merge(
            None if prev is None else np.asarray(prev.data),
            probs[k],
            region,
            np.float32,
            relabel=False,
        )
        _put_layer(
            viewer,
            "image",
            data,
            name,
            {PLUGIN_KEY: True, "source": src, "kind": "probabilities", "class": k},
            request.scale,
            request.translate,
            prev,
            colormap="magma",
            contrast_limits=(0.0, 1.0),
            blending="additive",
        )


def write_preview(viewer: napari.Viewer, labels: np.ndarray, image: Image | None) -> Labels:
    """Create or update the 2D ``"unet preview"`` labels layer (placed like the image's YX)."""
    scale = translate = None
    if image is not None and image in viewer.layers:
        scale = tuple(float(s) for s in image.scale[-2:])
        translate = tuple(float(t) for t in image.translate[-2:])
    new = compact_labels(labels)
    if np.may_share_memory(new, labels):  # the layer owns its array: previews write into it
        new = new.copy()
    layer = _find_preview(viewer)
    if layer is not None:
        if scale is not None:
            layer.scale, layer.translate = scale, translate
        old = layer.data
        if isinstance(old, np.ndarray) and old.shape == new.shape and old.dtype == new.dtype:
            # in place, then one refresh (the extent is the same): 6-8 ms (+ 27-36 ms paint)
            # for 1024x1024 alone, where `layer.data =` took 31-45 ms (+ 39-58); during a
            # training (bench_gui) 39-42 ms mean per preview against 48-56
            old[...] = new
            layer.refresh(extent=False, highlight=False)
        else:
            layer.data = new
        return layer
    kwargs = {} if scale is None else {"scale": scale, "translate": translate}
    with keep_selection(viewer):  # the preview must not take the user's brush
        return viewer.add_labels(
            new,
            name=PREVIEW_NAME,
            metadata={PLUGIN_KEY: True, "kind": "preview"},
            opacity=0.5,
            **kwargs,
        )


def hide_preview(viewer: napari.Viewer) -> bool:
    """Hide the ``"unet preview"`` layer at the end of a training, kept for the next one; True
    when there was one.

    Measured (napari 0.9.2, Xvfb, a 1024x1024 image): creating the layer holds the GUI
    175-320 ms (+ 57-91 ms to paint it) and removing it 76-88 ms (+ 35-43); hiding it takes
    6-8 ms (+ 29-34) and showing it again cleared at the next Train click 21-23 ms (+ 47-57).
    """
    layer = _find_preview(viewer)
    if layer is None:
        return False
    layer.visible = False
    return True


@contextlib.contextmanager
def keep_selection(viewer: napari.Viewer):
    """Add or remove layers without changing the user's active layer and selection.

    napari makes a new layer the active one; for the plugin's helper layers (the training
    preview) that would send the next brush stroke into them.
    """
    selection = viewer.layers.selection
    active, selected = selection.active, list(selection)
    try:
        yield
    finally:
        alive = [ly for ly in selected if ly in viewer.layers]
        if alive or active is not None:
            selection.clear()
            selection.update(alive)
            if active is not None and active in viewer.layers:
                selection.active = active


def _find_preview(viewer: napari.Viewer) -> Labels | None:
    from napari.layers import Labels

    for layer in viewer.layers:
        md = layer.metadata or {}
        if isinstance(layer, Labels) and md.get(PLUGIN_KEY) is True and md.get("kind") == "preview":
            return layer
    return None


def ensure_preview(viewer: napari.Viewer, image: Image) -> Labels:
    """The ``"unet preview"`` layer, empty (the image's YX shape) and shown: the one a previous
    training left hidden when there is one (see :func:`hide_preview`), else a new one."""
    layer = _find_preview(viewer)
    shape = spatial_shape(image)[-2:]
    if layer is not None and tuple(layer.data.shape) == tuple(shape):
        if np.asarray(layer.data).any():  # the last training's preview: not this one's
            write_preview(viewer, np.zeros(shape, np.uint16), image)
        layer.visible = True
        return layer
    layer = write_preview(viewer, np.zeros(shape, np.uint16), image)
    layer.visible = True
    return layer


def adopt_layer(layer: Labels) -> bool:
    """Make a plugin output layer the user's own (it now holds their corrections).

    Returns True when ``layer`` was a plugin layer: it is renamed ``"<image> [corrected]"`` and
    later predictions go to a new ``"<image> [unet]"`` layer instead of overwriting it.
    """
    md = layer.metadata or {}
    if md.get(PLUGIN_KEY) is not True or md.get("kind", "labels") != "labels":
        return False
    src = md.get("source", layer.name)
    layer.metadata = {**md, PLUGIN_KEY: False, "adopted_from": "napari-unet prediction"}
    layer.name = f"{src} [corrected]"
    return True


def carry_corrections(session, layer, corrected, mask) -> bool:
    """Put the user's corrections (``corrected``'s labels inside ``mask``, the corrected
    regions a round trained on) into ``layer``, the refreshed prediction of the same image:
    the prediction's objects that reach into the regions give way there, the corrections
    take new ids. Returns whether it did (numpy layers of one shape only)."""
    if corrected is None or corrected is layer or mask is None:
        return False
    new, old = layer.data, getattr(corrected, "data", None)
    if not (isinstance(new, np.ndarray) and isinstance(old, np.ndarray)):
        return False
    if new.shape != old.shape or np.shape(mask) != new.shape:
        return False
    merged = np.array(new, dtype=np.int64)
    merged[mask] = 0
    inside = np.asarray(old)[mask].astype(np.int64)
    top = int(merged.max())
    merged[mask] = np.where(inside > 0, inside + top, 0)
    layer.data = compact_labels(merged.astype(np.int32))
    # what the plugin wrote: a Train with nothing corrected since is refused as before
    session.remember_digest(layer, labels_digest(layer.data))
    if layer.data.ndim >= 3:
        session.remember_prediction(layer, layer.data)
    return True
