"""Qt pickers of the widgets: a layer combo box that follows the viewer's layers, a list of
extra channel layers, and a scrolling body for the dock widgets."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFrame,
    QListWidget,
    QListWidgetItem,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari




# ----------------------------------------------------------------------------- scrolling body
class _Body(QWidget):
    """The content of a vertical scroll area; keeps the area as wide as it needs to be.

    A scroll area does not pass its content's size on: without this, the right edge of the
    combo boxes and buttons was cut off in a narrow dock.
    """

    def event(self, ev) -> bool:  # noqa: D401 - Qt API
        if ev.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show, QEvent.Type.Polish):
            scroll = self.parentWidget().parentWidget() if self.parentWidget() else None
            if isinstance(scroll, QScrollArea):
                width = self.minimumSizeHint().width()
                scroll.setMinimumWidth(width + scroll.verticalScrollBar().sizeHint().width())
        return super().event(ev)


def scrolling_body(owner: QWidget) -> QVBoxLayout:
    """Give ``owner`` a vertically scrolling body; returns the body's layout to fill.

    A dock widget's minimum height is its content's: without this the Train widget alone
    needs 775 px and pushes napari's window past a 768 px screen.
    """
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea(owner)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = _Body(scroll)
    scroll.setWidget(body)
    outer.addWidget(scroll)
    owner.scroll_area = scroll
    return QVBoxLayout(body)


# ----------------------------------------------------------------------------- layer combo box
class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types, kept up to date.

    ``none_label`` adds a first entry meaning "no layer". ``exclude`` filters layers out.

    The box follows the user's layers: a layer that is added (a new prediction, a Shapes layer
    the user draws in) or selected in the layer list becomes the choice when it fits. The first
    choice is the active layer when it fits, else the top-most visible fitting layer (a hidden
    ground-truth layer is chosen only when nothing else fits).
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        layer_types: tuple[type, ...],
        none_label: str | None = None,
        exclude=None,
        parent=None,
    ):
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        self._none = none_label
        self._exclude = exclude
        self._layers: list[weakref.ref] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        viewer.layers.selection.events.active.connect(self._on_active)
        self.refresh()
        first = self._first_choice()
        if first is not None:
            self.set_value(first)

    def _fits(self, layer) -> bool:
        return (
            layer is not None
            and isinstance(layer, self._types)
            and not (self._exclude is not None and self._exclude(layer))
        )

    def _first_choice(self):
        active = self._viewer.layers.selection.active
        if self._fits(active):
            return active
        layers = self._candidates()
        visible = [ly for ly in layers if ly.visible]
        return (visible or layers)[-1] if layers else None

    def _on_inserted(self, event=None) -> None:
        self.refresh()
        layer = getattr(event, "value", None)
        if self._fits(layer):
            self.set_value(layer)

    def _on_active(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if self._fits(layer) and layer is not self.value():
            try:
                self.set_value(layer)
            except ValueError:  # not listed yet (inserted handlers run later)
                pass

    def _candidates(self) -> list:
        out = []
        for layer in self._viewer.layers:
            if not isinstance(layer, self._types):
                continue
            if self._exclude is not None and self._exclude(layer):
                continue
            out.append(layer)
        return out

    def refresh(self, event=None) -> None:
        current = self.value()
        layers = self._candidates()
        for layer in layers:
            # keep names fresh (disconnect first so a layer is connected once)
            layer.events.name.disconnect(self.refresh)
            layer.events.name.connect(self.refresh)
        self.blockSignals(True)
        try:
            self.clear()
            self._layers = []
            if self._none is not None:
                self.addItem(self._none)
                self._layers.append(lambda: None)
            for layer in layers:
                self.addItem(layer.name)
                self._layers.append(weakref.ref(layer))
            pos = 0
            for i, layer in enumerate(layers):
                if layer is current:
                    pos = (1 if self._none is not None else 0) + i
            self.setCurrentIndex(pos if self.count() else -1)
        finally:
            self.blockSignals(False)
        if self.value() is not current:
            self.currentIndexChanged.emit(self.currentIndex())

    def value(self):
        i = self.currentIndex()
        if i < 0 or i >= len(self._layers):
            return None
        return self._layers[i]()

    def set_value(self, layer) -> None:
        for i, ref in enumerate(self._layers):
            if ref() is layer:
                self.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not a choice")

    def disconnect_viewer(self) -> None:
        events = self._viewer.layers.events
        events.inserted.disconnect(self._on_inserted)
        for em in (events.removed, events.moved):
            em.disconnect(self.refresh)
        self._viewer.layers.selection.events.active.disconnect(self._on_active)
        for layer in self._viewer.layers:
            layer.events.name.disconnect(self.refresh)


class ChannelList(QListWidget):
    """Checkable list of single-channel image layers to use as extra input channels.

    Shown by the widgets only for a model with more than one input channel. ``checked()``
    returns the ticked layers in the list's order (the main image layer comes first).
    """

    def __init__(self, viewer: napari.Viewer, exclude=None, parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._exclude = exclude
        self._layers: list[weakref.ref] = []
        self.setMaximumHeight(90)
        self.setToolTip(
            "for a model with several channels: the other channels, as separate image layers "
            "of the same shape (napari opens multichannel files that way)"
        )
        events = viewer.layers.events
        events.inserted.connect(self.refresh)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None) -> None:
        from napari.layers import Image

        ticked = {id(ly) for ly in self.checked()}
        self.clear()
        self._layers = []
        for layer in self._viewer.layers:
            if not isinstance(layer, Image) or getattr(layer, "rgb", False):
                continue
            if self._exclude is not None and self._exclude(layer):
                continue
            item = QListWidgetItem(layer.name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            state = Qt.CheckState.Checked if id(layer) in ticked else Qt.CheckState.Unchecked
            item.setCheckState(state)
            self.addItem(item)
            self._layers.append(weakref.ref(layer))

    def checked(self) -> list:
        out = []
        for i, ref in enumerate(self._layers):
            item = self.item(i)
            layer = ref()
            if (
                item is not None
                and layer is not None
                and item.checkState() == Qt.CheckState.Checked
            ):
                out.append(layer)
        return out

    def set_checked(self, layers: list) -> None:
        want = {id(ly) for ly in layers}
        for i, ref in enumerate(self._layers):
            layer = ref()
            state = Qt.CheckState.Checked if id(layer) in want else Qt.CheckState.Unchecked
            self.item(i).setCheckState(state)

    def disconnect_viewer(self) -> None:
        events = self._viewer.layers.events
        for em in (events.inserted, events.removed, events.moved):
            em.disconnect(self.refresh)
