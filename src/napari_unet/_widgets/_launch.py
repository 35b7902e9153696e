"""Open napari with the plugin's widgets docked and the 2D sample loaded."""

from __future__ import annotations


def launch(sample: str = "nuclei_2d") -> int:
    import napari

    viewer = napari.Viewer(title="napari-unet")
    viewer.open_sample("napari-unet", sample)
    for name in ("U-Net Predict", "U-Net Train", "U-Net Models"):
        try:
            viewer.window.add_plugin_dock_widget("napari-unet", name)
        except Exception as e:  # a widget that fails to build must not block the others
            napari.utils.notifications.show_warning(f"could not open {name}: {e}")
    napari.run()
    return 0
