"""Sample data for napari's File > Open Sample menu: generated nuclei with exact labels, and
one real fluorescence image of the 2018 Data Science Bowl (CC0, see ``samples/README.md``).

Returns napari layer-data tuples; imports nothing from napari.
"""

from __future__ import annotations

from pathlib import Path

from .data import make_nuclei

SAMPLES = Path(__file__).parent / "samples"
DSB_ID = "a6515d7307786680"
DSB_CITATION = (
    "image a6515d73 of the 2018 Data Science Bowl (BBBC038v1, CC0); cite Caicedo et al., "
    "Nature Methods 16:1247 (2019), doi:10.1038/s41592-019-0612-7"
)


def nuclei_real() -> list[tuple]:
    """A real 256x320 uint8 fluorescence image (15 nuclei, DSB2018) and its expert labels."""
    import tifffile

    image = tifffile.imread(SAMPLES / f"dsb2018_{DSB_ID}.tif")
    labels = tifffile.imread(SAMPLES / f"dsb2018_{DSB_ID}_masks.tif")
    meta = {"source": DSB_CITATION}
    return [
        (image, {"name": "dsb2018", "colormap": "gray", "metadata": meta}, "image"),
        (labels, {"name": "dsb2018 truth", "visible": False, "metadata": meta}, "labels"),
    ]


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
