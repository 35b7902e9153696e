"""Open napari with the plugin's widgets docked as tabs and a real sample image loaded.

``python -m napari_unet`` calls :func:`launch`; :func:`open_viewer` builds the same window
without entering the event loop (tests, screenshots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

WIDGETS = ("U-Net Predict", "U-Net Train", "U-Net Models")
SAMPLE = "nuclei_real"


def dock_widgets(viewer: napari.Viewer) -> list:
    """Dock the three widgets on the right as tabs (Predict in front); returns the docks.

    One above the other they need ~1,640 px of height; as tabs the window fits 1366x768.
    """
    import napari

    docks = []
    for name in WIDGETS:
        try:
            dock, _ = viewer.window.add_plugin_dock_widget("napari-unet", name, tabify=False)
            docks.append(dock)
        except Exception as e:  # a widget that fails to build must not block the others
            napari.utils.notifications.show_warning(f"could not open {name}: {e}")
    qt_window = viewer.window._qt_window
    for dock in docks[1:]:
        qt_window.tabifyDockWidget(docks[0], dock)
    if docks:
        docks[0].show()
        docks[0].raise_()
    return docks


#: the objectName every plugin widget carries, for :func:`tab_with_siblings`
WIDGET_NAME = "napari-unet-widget"


def tab_with_siblings(widget) -> bool:
    """Put ``widget``'s dock in tabs with the plugin's other docks of the same side.

    The Plugins menu docks each widget one above the other: at 1366x768 that hid the Predict
    button and Train's options below scrollbars. Called when a widget is first shown; Qt's
    own ``QMainWindow.tabifyDockWidget``. Returns whether it tabified."""
    from qtpy.QtWidgets import QDockWidget, QMainWindow, QWidget

    dock = widget.parent()
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parent()
    main = dock.parent() if dock is not None else None
    if not isinstance(main, QMainWindow) or dock.isFloating():
        return False
    area = main.dockWidgetArea(dock)
    others = [
        d
        for d in main.findChildren(QDockWidget)
        if d is not dock
        and not d.isFloating()
        and main.dockWidgetArea(d) == area
        and d.findChild(QWidget, WIDGET_NAME) is not None
    ]
    if not others or any(d in main.tabifiedDockWidgets(dock) for d in others):
        return False
    main.tabifyDockWidget(others[0], dock)
    dock.show()
    dock.raise_()
    return True


class TabsWithSiblings:
    """Mixin of the plugin's dock widgets (before ``QWidget`` in the bases): at its first show
    a widget goes into tabs with the plugin's other docks (:func:`tab_with_siblings`)."""

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if not getattr(self, "_tabbed", False):  # once: the user may arrange the docks later
            self._tabbed = True
            self.setObjectName(WIDGET_NAME)  # how the next widget shown finds this one
            tab_with_siblings(self)


def fit_screen(viewer: napari.Viewer) -> None:
    """Shrink the window to the screen's free area (it never grows past it)."""
    qt_window = viewer.window._qt_window
    screen = qt_window.screen() if hasattr(qt_window, "screen") else None
    if screen is None:
        return
    free = screen.availableGeometry()
    width = min(qt_window.width(), free.width())
    height = min(qt_window.height(), free.height())
    qt_window.resize(width, height)


def open_viewer(sample: str = SAMPLE, show: bool = True) -> napari.Viewer:
    """A napari viewer with ``sample`` open, the image layer active and the widgets as tabs."""
    import napari

    viewer = napari.Viewer(title="napari-unet", show=show)
    prepare(viewer, sample)
    return viewer


def prepare(viewer: napari.Viewer, sample: str = SAMPLE) -> list:
    """Open ``sample`` in ``viewer``, make its image the active layer, dock the widgets.

    Returns the dock widgets (Predict, Train, Models)."""
    import napari

    try:
        viewer.open_sample("napari-unet", sample)
    except Exception as e:  # noqa: BLE001 - the widgets are still useful without the sample
        napari.utils.notifications.show_warning(f"could not open the sample {sample!r}: {e}")
    images = [ly for ly in viewer.layers if ly._type_string == "image"]
    if images:
        # the sample's hidden truth layer was added last: without this the brush paints on it
        viewer.layers.selection.active = images[0]
    docks = dock_widgets(viewer)
    fit_screen(viewer)
    return docks


def launch(sample: str = SAMPLE) -> int:
    import napari

    open_viewer(sample)
    napari.run()
    return 0
