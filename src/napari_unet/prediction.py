"""What a prediction returns (:class:`Prediction`) and where it runs (:func:`resolve_device`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Prediction", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then MPS, then CPU. An unavailable device is a clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='auto' or 'cpu', or install a CUDA build"
        )
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' was asked for but is not available on this machine")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'")
    return torch.device(name)


@dataclass
class Prediction:
    """Result of :meth:`Segmenter.predict`.

    Attributes
    ----------
    probabilities
        float32 ``(K, *spatial)``: per-class probabilities (instance: background, interior,
        boundary), ``None`` when not requested.
    labels
        int32 ``(*spatial)``: instance ids (0 = background) or class ids.
    axes
        The spatial axes of ``labels``, in the input's order (e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``).
    seconds
        Wall time of the prediction, post-processing included.
    postprocess_seconds
        Wall time of the post-processing alone.
    device
        The device that ran the network (the last one, after any fallback).
    notes
        What happened that the user should know: out-of-memory retries with smaller batches
        or tiles, a fall back to the CPU, blocks read more than once. Empty when all went to
        plan; each note was also issued as a ``RuntimeWarning``.
    scale
        The ``scale`` given to :meth:`Segmenter.predict` (one value per axis of ``labels``),
        or None.
    diameter
        The typical object diameter in pixels of the input: the one given, or the one
        estimated from the image (2D models that record the diameter they were trained at);
        None when not used.
    zoom
        The factor by which the image was resized for the network (1.0: as it is).
    engine
        The inference engine that ran the network (``"torch"``, ``"openvino"``,
        ``"onnxruntime"``; see :mod:`napari_unet.engines`).
    """

    probabilities: np.ndarray | None
    labels: Any
    axes: str
    seconds: float
    postprocess_seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    scale: tuple[float, ...] | None = None
    diameter: float | None = None
    zoom: float = 1.0
    engine: str = "torch"
