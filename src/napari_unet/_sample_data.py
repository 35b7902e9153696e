"""Sample data for napari's File > Open Sample menu: generated nuclei with exact labels.

Returns napari layer-data tuples; imports nothing from napari.
"""

from __future__ import annotations

from .data import make_nuclei


def nuclei_2d(seed: int = 0) -> list[tuple]:
    """A 512x512 uint16 nuclei image and its ground-truth instance labels."""
    image, labels = make_nuclei((512, 512), seed=seed)
    return [
        (image, {"name": "nuclei", "colormap": "gray"}, "image"),
        (labels, {"name": "nuclei truth", "visible": False}, "labels"),
    ]


def nuclei_3d(seed: int = 0) -> list[tuple]:
    """A 24x128x128 uint16 nuclei stack (z-spacing 2) and its ground-truth labels."""
    image, labels = make_nuclei((24, 128, 128), seed=seed, anisotropy=2.0)
    scale = (2.0, 1.0, 1.0)
    return [
        (image, {"name": "nuclei 3d", "colormap": "gray", "scale": scale}, "image"),
        (labels, {"name": "nuclei 3d truth", "visible": False, "scale": scale}, "labels"),
    ]
