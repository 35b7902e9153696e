"""Old home of the model file and registry helpers; kept so old imports work.

They now live in modules with one job each:

* :mod:`napari_unet.format` -- the model file: names, :class:`ModelFileError`,
  :func:`read_config`, :func:`load_model`;
* :mod:`napari_unet.save` -- :func:`save_model` (atomic, as a folder or one file);
* :mod:`napari_unet.registry` -- :class:`ModelRegistry`, :class:`ModelInfo`,
  :func:`default_root`, :func:`validate_name`;
* :mod:`napari_unet.fileio` -- durable writes, folder swaps, crash recovery.

Scripts that say ``from napari_unet.store import ModelRegistry`` (or any name in
``__all__``) run unchanged. New code imports from the modules above.
"""

from __future__ import annotations

from .format import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    ModelFileError,
    load_model,
    read_config,
)
from .registry import ModelInfo, ModelRegistry, default_root, validate_name
from .save import save_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "CONFIG_METADATA_KEY",
    "WEIGHTS_NAME",
    "ModelFileError",
    "ModelInfo",
    "ModelRegistry",
    "default_root",
    "load_model",
    "read_config",
    "save_model",
    "validate_name",
]
