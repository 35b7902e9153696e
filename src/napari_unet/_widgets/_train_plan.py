"""What a Train click trains on: the layers read (copies), checked, and turned into a run.

:func:`plan_training` reads the Train widget's forms and the viewer's layers and returns a
:class:`TrainPlan`; :meth:`TrainPlan.start` makes the core's
:class:`~napari_unet.runs.TrainRun` of it. Every refusal is a ``ValueError`` with a plain
message (a :class:`~._layers.LayerError` for the layers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runs import TrainRun, untrained_like
from . import _layers
from ._jobs import TrainPreview

if TYPE_CHECKING:
    import napari

    from ..segmenter import Segmenter
    from ._session import Session
    from ._train_form import TrainDataBox, TrainOptionsBox

__all__ = ["TrainPlan", "plan_training"]


@dataclass
class TrainPlan:
    """The model, the data (copies of the layers) and the options of one training."""

    pairs: list  # (Image, Labels) layers
    segmenter: Segmenter
    replace: bool  # a fresh model: it becomes the session's model at the end
    images: list[np.ndarray]
    labels: list[np.ndarray]
    masks: list | None
    options: dict
    note: str = ""
    preview: TrainPreview | None = None
    names: list[str] = field(default_factory=list)

    def start(self, session: Session, lock: threading.Lock | None) -> TrainRun:
        """The run (the lock taken): it saves into the registry under the model's current
        name (the name it had when training started)."""
        from ..engines import weights_digest

        name, registry = session.model_name, session.registry
        before = weights_digest(self.segmenter.net)

        def save(seg: Segmenter) -> Any:
            if weights_digest(seg.net) == before:  # the round kept the previous model
                return None  # a new version with the same weights only clutters the list
            return registry.save(name, seg.net.state_dict(), seg.config)

        return TrainRun(
            self.segmenter,
            self.images,
            self.labels,
            self.masks,
            save=save,
            lock=lock,
            interleave=self.preview,
            names=self.names,
            **self.options,
        )


def plan_training(
    viewer: napari.Viewer, session: Session, data: TrainDataBox, opts: TrainOptionsBox
) -> TrainPlan:
    """Read layers and options; raises ValueError with a plain message on bad input."""
    options = opts.options()
    pairs = data.pairs()
    axes = _common_axes(viewer, pairs)
    seg = session.segmenter_for("Z" in axes)
    replace = not opts.from_current_check.isChecked()
    if replace:
        seg = untrained_like(seg, session.model_name)
    channel, note = _layers.model_channel(pairs[0][0], seg)
    shapes = data.shapes_combo.value()
    _check_corrected(session, pairs, seg.ndim, regions=shapes is not None)
    masks = None
    if shapes is not None:
        masks = [_layers.shapes_to_mask(shapes, labels) for _, labels in pairs]
    elif opts.edited_check.isChecked():
        masks, parts = _edited_masks(session, pairs, seg.ndim)
        note = "; ".join([n for n in (note, *parts) if n])
    # copies: training reads these, the user may keep painting
    images = [np.array(_layers.image_array(im)) for im, _ in pairs]
    rgb = bool(getattr(pairs[0][0], "rgb", False))
    extra = [ly for ly in data.channel_list.checked() if ly is not pairs[0][0]]
    if seg.in_channels > 1 and extra:
        if len(pairs) > 1 or data.listed:
            raise _layers.LayerError(
                "extra channel layers work with the Image/Labels choice above, not with a "
                "list of pairs"
            )
        images = [np.array(_layers.stack_channels([pairs[0][0], *extra]))]
        axes, channel, rgb = axes + "C", None, True
        names = ", ".join(repr(ly.name) for ly in [pairs[0][0], *extra])
        note = f"{note}; channels: {names}" if note else f"channels: {names}"
    options.update(axes=axes, channel=channel)
    plan = TrainPlan(
        pairs, seg, replace, images, [np.array(lab.data) for _, lab in pairs], masks, options
    )
    plan.note, plan.names = note or "", [im.name for im, _ in pairs]
    every = float(opts.preview_spin.value())
    if every > 0 and seg.ndim == 2:
        region = _layers.plan_region(pairs[0][0], viewer, _layers.SCOPES[1], 2)
        plan.preview = TrainPreview(
            seg,
            images[0],
            region,
            every=every,
            rgb=rgb,
            device=options["device"],
            channel=channel,
            num_threads=options["num_threads"],
        )
    return plan


def _common_axes(viewer: napari.Viewer, pairs) -> str:
    """The axes all the images share; labels must match their image pixel for pixel."""
    axes = None
    for image, labels in pairs:
        ax = _layers.image_axes(image, viewer)
        if axes is None:
            axes = ax
        elif ax != axes:
            raise _layers.LayerError(
                f"all training images must have the same axes: {pairs[0][0].name!r} is "
                f"{axes}, {image.name!r} is {ax}"
            )
        want = _layers.spatial_shape(image)
        got = tuple(np.shape(labels.data))
        if got != want:
            raise _layers.LayerError(
                f"labels {labels.name!r} have shape {got} but image {image.name!r} has "
                f"shape {want}; they must match pixel for pixel"
            )
    return axes


def _check_corrected(session: Session, pairs, model_ndim: int, regions: bool = False) -> None:
    """Refuse 2D labels that are exactly the plugin's uncorrected prediction, or empty.

    (Stacks are checked slice by slice in :func:`_edited_masks`.) Training on a prediction
    nobody corrected teaches the model its own mistakes: measured, F1 0.70 -> 0.52. That
    holds inside corrected regions too (after 'Refresh prediction' Train follows the new
    prediction layer, while the rectangles still mark the corrections of the old one).
    Empty labels are fine inside corrected ``regions`` (an area with no object).
    """
    for _, labels in pairs:
        data = labels.data
        if not isinstance(data, np.ndarray) or data.ndim > model_ndim:
            continue
        if session.unchanged_since_prediction(labels):
            raise _layers.LayerError(
                f"nothing in {labels.name!r} was corrected since the prediction: fix some "
                "objects with the brush or the eraser first, or choose as Labels the layer "
                "that holds your corrections (training on an uncorrected prediction "
                "teaches the model its own mistakes)"
            )
        if not regions and not data.any():
            raise _layers.LayerError(
                f"{labels.name!r} is empty: paint some objects first (or predict, then "
                "correct the prediction)"
            )


def _edited_masks(session: Session, pairs, model_ndim: int) -> tuple[list | None, list[str]]:
    """Masks of whole corrected planes for the stacks among ``pairs`` (None for 2D)."""
    masks: list = []
    parts: list[str] = []
    for _, labels in pairs:
        data = np.asarray(labels.data)
        if data.ndim <= model_ndim:
            masks.append(None)
            continue
        ref = session.prediction_snapshot(labels)
        edited = _layers.edited_planes(data, ref, model_ndim)
        if not edited.any():
            what = "changed since the prediction" if ref is not None else "with labels"
            raise _layers.LayerError(
                f"no slice or frame of {labels.name!r} is {what}: correct at least one "
                "slice, or untick 'only the slices/frames I corrected' to train on all"
            )
        idx = [", ".join(map(str, i)) for i in np.argwhere(edited)[:8]]
        more = " ..." if edited.sum() > 8 else ""
        parts.append(
            f"training on {int(edited.sum())} of {edited.size} slices/frames of "
            f"{labels.name!r} ({'; '.join(idx)}{more}); the others are ignored"
        )
        masks.append(_layers.planes_mask(edited, data.shape))
    if all(m is None for m in masks):
        return None, []
    return masks, parts
