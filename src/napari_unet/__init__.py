"""napari-unet: human-in-the-loop U-Net segmentation of microscopy images.

The core (everything outside ``_widgets``) is pure numpy/torch and runs without a display.
Heavy submodules are imported lazily so ``import napari_unet`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UNet": ("napari_unet.model", "UNet"),
    "Segmenter": ("napari_unet.segmenter", "Segmenter"),
    "Prediction": ("napari_unet.segmenter", "Prediction"),
    "make_nuclei": ("napari_unet.synthetic", "make_nuclei"),
}
_SUBMODULES = {
    "model",
    "tiling",
    "postprocess",
    "targets",
    "training",
    "segmenter",
    "store",
    "format",
    "save",
    "registry",
    "fileio",
    "config",
    "metrics",
    "uncertainty",
    "data",
    "synthetic",
    "normalize",
    "axes",
    "cli",
}

__all__ = ["UNet", "Segmenter", "Prediction", "make_nuclei", "metrics", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"napari_unet.{name}")
    raise AttributeError(f"module 'napari_unet' has no attribute {name!r}")
