"""The model shared by the widgets of one viewer.

Predict, Train and Models widgets docked in the same viewer work on the same ``Segmenter``:
Train fine-tunes the model Predict uses, Models loads or saves it. The session is keyed by the
viewer (weakly, so closing the viewer frees it); it is not a process-wide singleton.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal

from ..postprocess import _compiled_flood
from ..segmenter import Segmenter
from ..store import ModelFileError, ModelRegistry

if TYPE_CHECKING:
    import napari

__all__ = ["Session", "session_for", "STARTERS"]

#: The starter a session picks for a layer: planes of volumes have their own 2D network
#: (trained on the planes of generated volumes as well: the haze of the nuclei above and below).
STARTERS = {"image": "nuclei", "volume": "nuclei-volumes"}


class Session:
    """Current model of a viewer plus the model registry on disk.

    Signals
    -------
    model_changed(Segmenter)
        Emitted when another model is loaded, created or fine-tuned.
    """

    model_changed = Signal(object)

    def __init__(self, registry: ModelRegistry | None = None):
        self.registry = registry if registry is not None else ModelRegistry()
        self._segmenter: Segmenter | None = None
        self.model_name: str = "untitled"
        # True while the model is a shipped starter the session picked itself, untrained: the
        # first volume (or image) it meets then gets the starter for its kind
        self._auto = False
        # one training at a time per viewer; widgets acquire it without blocking
        self.training_lock = threading.Lock()
        # id(layer) -> (weak ref to the layer, copy of the labels the plugin wrote into it)
        self._snapshots: dict[int, tuple[weakref.ref, Any]] = {}
        # id(layer) -> (weak ref, labels_digest of what the plugin wrote): 2D layers, no copy
        self._digests: dict[int, tuple[weakref.ref, str]] = {}
        # id(layer) -> (weak ref, whether napari reported an edit since the plugin wrote it)
        self._edited: dict[int, tuple[weakref.ref, bool]] = {}

    @property
    def segmenter(self) -> Segmenter:
        """The current model: at first the 2D starter ``nuclei`` if shipped (else a new one);
        :meth:`segmenter_for` swaps in the starter for volumes while no model was chosen."""
        if self._segmenter is None:
            try:
                self._segmenter = Segmenter.pretrained(STARTERS["image"])
                self.model_name = STARTERS["image"]
                self._auto = True
            except ModelFileError:
                self._segmenter = Segmenter.new(name="untitled")
                self.model_name = "untitled"
        return self._segmenter

    def segmenter_for(self, volume: bool) -> Segmenter:
        """The current model for an image (``volume=False``) or the planes of a ZYX volume.

        While the model is still the starter the session picked (nothing loaded, chosen or
        trained), a volume gets the volume starter and an image the 2D one, and the widgets
        are told (``model_changed``); any other model is used as it is.
        """
        seg = self.segmenter
        want = STARTERS["volume" if volume else "image"]
        if not self._auto or self.model_name == want or self.training_lock.locked():
            return seg
        try:
            seg = Segmenter.pretrained(want)
        except ModelFileError:  # not shipped: keep the one there is
            return self._segmenter
        self._segmenter, self.model_name = seg, want
        self.model_changed.emit(seg)
        return seg

    def set_segmenter(self, segmenter: Segmenter, name: str | None = None) -> None:
        self._auto = False
        self._segmenter = segmenter
        if name is not None:
            self.model_name = name
            segmenter.config["name"] = name
        self.model_changed.emit(segmenter)

    def remember_prediction(self, layer, labels) -> None:
        """Keep a copy of what the plugin wrote into ``layer``, to find the user's edits later.

        Held by the layer's id next to a weak reference to the layer: a removed layer frees it.
        """
        self._snapshots = {k: v for k, v in self._snapshots.items() if v[0]() is not None}
        self._snapshots[id(layer)] = (weakref.ref(layer), np.array(labels, copy=True))
        self._watch(layer)

    def prediction_snapshot(self, layer):
        """What the plugin last wrote into ``layer`` (None when it did not write it)."""
        entry = self._snapshots.get(id(layer))
        if entry is None or entry[0]() is not layer:
            return None
        return entry[1]

    def remember_digest(self, layer, digest: str | None) -> None:
        """Keep the fingerprint of what the plugin wrote into a 2D ``layer`` (no copy)."""
        self._digests = {k: v for k, v in self._digests.items() if v[0]() is not None}
        if digest is not None:
            self._digests[id(layer)] = (weakref.ref(layer), digest)
        self._watch(layer)

    def _watch(self, layer) -> None:
        """From now on, napari's edit events on ``layer`` (the brush, fill and eraser:
        ``paint``; a new array: ``data``) mark it edited; what the plugin just wrote is not."""
        self._edited = {k: v for k, v in self._edited.items() if v[0]() is not None}
        known = self._edited.get(id(layer))
        self._edited[id(layer)] = (weakref.ref(layer), False)
        if known is not None and known[0]() is layer:
            return  # connected already
        ref, key = weakref.ref(layer), id(layer)

        def edited(event=None) -> None:
            if key in self._edited and self._edited[key][0]() is ref():
                self._edited[key] = (ref, True)

        for name in ("paint", "data"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                emitter.connect(edited)

    def unchanged_since_prediction(self, layer) -> bool:
        """True when ``layer`` holds exactly what the plugin's last prediction wrote into it.

        A layer napari says was edited is not; a big one (over :data:`HASH_PIXELS`) napari
        says nothing of is taken as unchanged without reading it (hashing 8192x8192 labels
        took 0.15 s on the GUI thread at every prediction); smaller ones are compared."""
        from ._layers import labels_digest

        flag = self._edited.get(id(layer))
        if flag is not None and flag[0]() is layer:
            if flag[1]:
                return False
            if getattr(layer.data, "size", 0) > HASH_PIXELS:
                return True
        entry = self._digests.get(id(layer))
        if entry is None or entry[0]() is not layer:
            ref = self.prediction_snapshot(layer)
            if ref is None or not isinstance(layer.data, np.ndarray):
                return False
            return bool(np.array_equal(np.asarray(layer.data), ref))
        return labels_digest(layer.data) == entry[1]

    def notify_trained(self) -> None:
        """Tell listeners that the current model's weights changed."""
        self._auto = False
        if self._segmenter is not None:
            self.model_changed.emit(self._segmenter)


#: labels layers up to this many pixels are compared with what the plugin wrote (37 ms at
#: 4096x4096); bigger ones are taken as edited only when napari said so (paint, new data)
HASH_PIXELS = 1 << 24

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer: napari.Viewer) -> Session:
    """The session of ``viewer`` (created on first use).

    napari hands each plugin widget its own proxy of the viewer; the session is keyed by the
    real viewer behind it, so all widgets of one viewer share one model.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)
    try:
        return _SESSIONS[viewer]
    except KeyError:
        s = _SESSIONS[viewer] = Session()
        _freeze_startup_objects()
        return s


_FROZEN = False


def _freeze_startup_objects() -> None:
    """Move everything alive when the plugin starts (napari, Qt, torch, the modules) out of the
    cyclic garbage collector's reach, once.

    napari runs a full ``gc.collect()`` each time a layer is removed; over a heap holding torch
    and napari it took 370 of the 415 ms that removing the preview layer froze the window at
    the end of a training (Xvfb, 2 cores); after the freeze the removal takes 44 ms. Only
    objects of the start are frozen: what the plugin creates later (runs, images, models) is
    collected as before.

    numba's compiled watershed (:func:`napari_unet.postprocess.flood`, when numba is installed)
    is loaded first, so that its 77,000 objects are frozen with the rest (loaded later, they
    added 28 ms to every such collection) and the first big prediction does not import numba
    on its way (that import froze the window for 155-181 ms). It costs the plugin's start,
    on the thread that opens its first widget, 0.38-0.40 s (this function: 0.48-0.50 s
    instead of 0.10 s; 1-4 s more once after installing, to compile).
    """
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        _compiled_flood()
        gc.collect()
        gc.freeze()
