"""Typed, validated model config and training/prediction options.

A model's ``config.json`` (or the config in a single-file model's metadata) is read into a
:class:`ModelConfig` before anything else happens: before a tensor is allocated and before the
weights' shapes are matched against the architecture. Every field is type- and bound-checked,
unknown keys (typos) are refused, and every failure is a :class:`~napari_unet.format.ModelFileError`
that names the file and the field (``.../config.json: field 'postprocess.seed_threshold': must
be a number, not 'high'``).

``Segmenter.config`` stays a plain dict: the normalised ``ModelConfig.from_dict(raw).to_dict()``
(every field present, defaults filled in). ``Segmenter.model_config`` is the typed object.

Adding a field
--------------
One line in the dataclass that owns it, e.g. in :class:`Postprocess`::

    min_seed_size: int | None = opt(None, lo=0)

The annotation gives the type (``int``, ``float``, ``str``, ``bool``, ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict``, or another of these dataclasses), :func:`opt` gives
the default (the only place it is written) and the bounds (``lo``/``hi``, ``lo_open``/``hi_open``
for strict bounds, ``choices``). Conversion, checking, ``to_dict`` and the error messages follow.
Cross-field rules (tile shape against ``ndim``, ...) live in the ``_check`` method of the class.
The machinery (:func:`opt`, :class:`ConfigError`, conversion, ``to_dict``) is in
:mod:`napari_unet.schema`.
A change that old files cannot satisfy needs a ``format_version`` bump and an entry in
:data:`MIGRATIONS` (a function from the old dict to the new one).

Format versions
---------------
Files written today are ``format_version`` 1 (the shipped ``nuclei`` starter is one). Version 1
had no schema; reading one through :meth:`ModelConfig.from_dict` fills the optional fields it
lacks with their defaults. :data:`MIGRATIONS` maps a version to the function that lifts a dict
of that version to the next; it is empty while 1 is the current version.

History entries are the one lenient part: they are a log written by the program, so a key this
version does not know is kept as it is (and type-checked keys are still checked) rather than
refusing to open a model over a log line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .schema import ConfigError, Section, join, opt

__all__ = [
    "Architecture",
    "ConfigError",
    "HistoryEntry",
    "MAX_VAL_FRACTION",
    "MIGRATIONS",
    "ModelConfig",
    "Normalization",
    "Postprocess",
    "PredictOptions",
    "TrainOptions",
    "check_training_shapes",
    "opt",
]

CURRENT_FORMAT_VERSION = 1
FORMAT = "napari-unet"
#: Largest hold-out fraction for validation, shared by ``finetune`` and ``--val`` in the CLI.
MAX_VAL_FRACTION = 0.5
#: ``format_version`` -> function lifting a config dict of that version to the next one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


# --------------------------------------------------------------------------- model config


@dataclass(kw_only=True)
class Architecture(Section):
    """The U-Net's constructor arguments (:class:`napari_unet.model.UNet`)."""

    in_channels: int = opt(lo=1, hi=4096)
    out_channels: int = opt(lo=1, hi=4096)
    base_channels: int = opt(16, lo=1, hi=1024)
    depth: int = opt(3, lo=1, hi=10)
    ndim: int = opt(2, choices=(2, 3))
    up_mode: str = opt("transpose", choices=("transpose", "interp"))
    dropout: float = opt(0.0, lo=0.0, hi=1.0, hi_open=True)
    pad_mode: str = opt("reflect", choices=("reflect", "zeros"))

    @property
    def divisor(self) -> int:
        return 2**self.depth


@dataclass(kw_only=True)
class Normalization(Section):
    """Per-channel percentile normalisation of the input."""

    method: str = opt("percentile", choices=("percentile",))
    low: float = opt(1.0, lo=0.0, hi=100.0)
    high: float = opt(99.8, lo=0.0, hi=100.0)

    def _check(self, prefix: str) -> None:
        if self.low >= self.high:
            raise ConfigError(
                join(prefix, "low"), f"must be below 'high' ({self.high}), not {self.low}"
            )


@dataclass(kw_only=True)
class Postprocess(Section):
    """Probabilities -> labels."""

    seed_threshold: float = opt(0.5, lo=0.0, hi=1.0)
    #: the seed threshold of a volume's 3D assembly and of its planes linked one at a time
    #: (None: ``seed_threshold``); the assembly's rules were tuned at a threshold of their own
    seed_threshold_3d: float | None = opt(None, lo=0.0, hi=1.0)
    #: the 3D assembly's smoothing of the stacked probabilities, sigma in in-plane pixels
    #: (None: ``postprocess3d.SMOOTH``), and its seed height as a fraction of the median core
    #: radius (None: ``postprocess3d.H_FRACTION``): both depend on how the network's
    #: probabilities flicker from plane to plane, so a model carries its own
    smooth_3d: float | None = opt(None, lo=0.0, hi=10.0)
    h_fraction_3d: float | None = opt(None, lo=0.0, hi=2.0)
    foreground_threshold: float = opt(0.5, lo=0.0, hi=1.0)
    min_size: int | None = opt(None, lo=0)
    min_seed_size: int | None = opt(None, lo=0)
    assembly: str | None = opt(None, choices=("2d-linked", "3d"))


@dataclass(kw_only=True)
class HistoryEntry(Section):
    """One fine-tuning run (keys this version does not know are kept as they are)."""

    _lenient: ClassVar[bool] = True

    started: str | None = opt(None)
    finished: str | None = opt(None)
    steps: int = opt(0, lo=0)
    seconds: float = opt(0.0, lo=0.0)
    final_loss: float | None = opt(None)
    val_f1: float | None = opt(None, lo=0.0, hi=1.0)
    stopped: str | None = opt(None)
    trained_on: list[str] = opt([])
    objects: int | None = opt(None, lo=0)
    lr: float | None = opt(None, lo=0.0, lo_open=True)
    patch_shape: list[int] | None = opt(None, lo=1)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def default_tiles(ndim: int) -> tuple[list[int], int]:
    """Default ``(tile_shape, overlap)`` of a new model with ``ndim`` spatial axes."""
    return ([512, 512], 32) if ndim == 2 else ([32, 128, 128], 16)


@dataclass(kw_only=True)
class ModelConfig(Section):
    """A napari-unet model's config (``config.json``), checked field by field."""

    format: str = opt(FORMAT, choices=(FORMAT,))
    format_version: int = opt(CURRENT_FORMAT_VERSION, lo=1, hi=CURRENT_FORMAT_VERSION)
    name: str = opt("untitled")
    task: str = opt(choices=("instance", "semantic"))
    architecture: Architecture = opt()
    classes: list[str] | None = opt(None)
    normalization: Normalization = field(default_factory=Normalization)
    tile_shape: list[int] = opt(lo=1, hi=1_000_000)
    overlap: int = opt(lo=0)
    postprocess: Postprocess = field(default_factory=Postprocess)
    diameter: float | None = opt(None, lo=0.0, lo_open=True)
    #: the zoom the last round on volumes trained at (2D model); predict uses it for volumes
    volume_zoom: float | None = opt(None, lo=0.0, lo_open=True)
    #: how much larger than the truth the model measures objects (its estimate / the labels'
    #: diameter on its replay bank); predict divides its size estimate by it
    size_bias: float | None = opt(None, lo=0.0, lo_open=True)
    #: the same for volumes: predict divides the size measured on a volume's middle plane by
    #: it (None: 1.0); chosen on generated volumes, see docs/benchmarks.md
    volume_size_bias: float | None = opt(None, lo=0.0, lo_open=True)
    #: F1 on the held-out replay-bank crops before the first small round: later small rounds
    #: that score lower are undone (see safeguard.BANK_TOLERANCE)
    bank_reference: float | None = opt(None, lo=0.0, hi=1.0)
    created: str | None = opt(None)
    trained_on: list[str] = opt([])
    val_score: float | None = opt(None)
    history: list[HistoryEntry] = opt([])
    rolled_back_from: int | None = opt(None, lo=1)
    model_card: dict[str, Any] | None = opt(None)

    def _check(self, prefix: str) -> None:
        arch = self.architecture
        if self.task == "instance" and arch.out_channels != 3:
            raise ConfigError(
                "architecture.out_channels",
                f"an instance model has 3 outputs (background, interior, boundary), "
                f"not {arch.out_channels}",
            )
        if self.task == "semantic" and arch.out_channels < 2:
            raise ConfigError("architecture.out_channels", "a semantic model needs >= 2 classes")
        if self.classes is not None and len(self.classes) != arch.out_channels:
            raise ConfigError(
                "classes",
                f"has {len(self.classes)} names but the network has {arch.out_channels} outputs",
            )
        if len(self.tile_shape) != arch.ndim:
            raise ConfigError(
                "tile_shape",
                f"has {len(self.tile_shape)} values but the network is {arch.ndim}D",
            )
        small = [t for t in self.tile_shape if t < arch.divisor]
        if small:
            raise ConfigError(
                "tile_shape",
                f"{small[0]} is smaller than the network's divisor 2**depth = {arch.divisor}",
            )
        if self.overlap >= min(self.tile_shape):
            raise ConfigError(
                "overlap", f"{self.overlap} must be smaller than the tiles {self.tile_shape}"
            )

    # ---------------------------------------------------------------- conversions
    @classmethod
    def from_dict(cls, raw: Any, source: Any = None) -> ModelConfig:
        """Check and convert a parsed config; old format versions are migrated first.

        Raises
        ------
        ModelFileError
            Naming ``source`` (the file) and the field.
        """
        try:
            if isinstance(raw, dict):
                raw = _migrate(raw)
            return cls._from(raw)
        except ConfigError as e:
            from .format import ModelFileError

            where = f"{source}" if source is not None else "model config"
            raise ModelFileError(
                f"{where}: {e}. The model config is damaged or was edited by hand; fix that "
                "field or re-save the model with napari-unet."
            ) from None

    @classmethod
    def from_json(cls, text: str, source: Any = None) -> ModelConfig:
        """Parse JSON text (deep nesting is a ``ModelFileError``, not a ``RecursionError``)."""
        from .format import ModelFileError

        try:
            raw = json.loads(text)
        except RecursionError:
            raise ModelFileError(f"{source}: the config JSON is nested too deeply") from None
        except ValueError as e:
            raise ModelFileError(f"{source}: the config is not valid JSON ({e})") from None
        return cls.from_dict(raw, source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def new(cls, task: str, architecture: dict, classes: list[str], **fields: Any) -> ModelConfig:
        """The config of a new, untrained model (tile defaults from :func:`default_tiles`)."""
        tile, overlap = default_tiles(int(architecture.get("ndim", 2)))
        raw = {"task": task, "architecture": architecture, "classes": classes}
        raw.update(tile_shape=tile, overlap=overlap, **fields)
        try:
            return cls._from(raw)
        except ConfigError as e:
            raise ValueError(str(e)) from None


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    version = raw.get("format_version", CURRENT_FORMAT_VERSION)
    if isinstance(version, int) and not isinstance(version, bool):
        while version in MIGRATIONS:
            raw = MIGRATIONS[version](dict(raw))
            version += 1
            raw["format_version"] = version
    return raw


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the network ``arch`` describes, allocating nothing.

    The network is built on torch's ``meta`` device (no memory); the bounds checked by
    :class:`Architecture` keep that quick.
    """
    import torch

    from .model import UNet

    with torch.device("meta"):
        net = UNet(**dataclasses.asdict(arch))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_weights(arch: Architecture, state: dict[str, Any], source: Any) -> None:
    """Refuse weights whose names or shapes differ from the architecture (before building it),
    weights that are not floating point, and weights that are not finite."""
    from .format import ModelFileError

    want = expected_shapes(arch)
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and want[k] != have[k]]
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"tensor {k!r} has shape {have[k]}, the architecture needs {want[k]}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]!r})")
        raise ModelFileError(
            f"{source}: the weights do not fit field 'architecture' of its config: "
            + "; ".join(parts)
        )
    for k, v in state.items():  # a damaged file: loads, then predicts NaN everywhere
        counter = k.endswith("num_batches_tracked")
        if counter != (not v.is_floating_point()):
            raise ModelFileError(
                f"{source}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}; the network "
                f"needs {'an integer count' if counter else 'floating-point weights'} there"
            )
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise ModelFileError(
            f"{source}: tensor {bad!r} holds NaN or infinite values: the model file is "
            "damaged (or was saved from a diverged training); use another copy"
        )


def nonfinite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or inf, or None
    (checked at load, :func:`check_weights`, and before a save, ``Segmenter.save``)."""
    import torch

    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


# --------------------------------------------------------------------------- options


class _Options(Section):
    """Public-function parameters checked with the config machinery; errors name them."""

    _function: ClassVar[str] = ""

    @classmethod
    def _checked(cls, values: dict[str, Any], ndim: int):
        try:
            obj = cls._from({k: v for k, v in values.items() if v is not None})
            obj._check_ndim(ndim)
            return obj
        except ConfigError as e:
            raise ValueError(f"{cls._function}: {e.field} {e.reason}") from None

    def _check_ndim(self, ndim: int) -> None:
        """Rules that need the network's number of spatial axes."""


@dataclass(kw_only=True)
class TrainOptions(_Options):
    """The options of :meth:`Segmenter.finetune`, checked before any data is read."""

    _function: ClassVar[str] = "finetune"

    time_limit_s: float | None = opt(None, lo=0.0, lo_open=True)
    steps: int | None = opt(None, lo=1)
    lr: float | None = opt(None, lo=0.0, lo_open=True, hi=10.0)
    batch_size: int | None = opt(None, lo=1, hi=4096)
    patch_shape: tuple[int, ...] | None = opt(None, lo=1, hi=1_000_000)
    val_fraction: float = opt(0.0, lo=0.0, hi=MAX_VAL_FRACTION, hi_open=True)
    augment: bool = opt(True)
    strong_augment: bool = opt(False)
    seed: int | None = opt(None)
    num_threads: int | None = opt(None, lo=1)
    channel: int | None = opt(None, lo=0)

    def _check(self, prefix: str) -> None:
        if self.time_limit_s is None and self.steps is None:
            raise ConfigError(
                "time_limit_s", "or steps: give a time limit or a number of steps, or both"
            )

    def _check_ndim(self, ndim: int) -> None:
        if self.patch_shape is not None and len(self.patch_shape) != ndim:
            raise ConfigError(
                "patch_shape",
                f"must have {ndim} values for a {ndim}D model, not {self.patch_shape}",
            )

    @classmethod
    def checked(
        cls,
        ndim: int = 2,
        inputs: tuple[Any, Any, Any] | None = None,
        axes: str | None = None,
        **values: Any,
    ) -> TrainOptions:
        """Check ``finetune``'s parameters, and with ``inputs=(images, labels, masks)`` their
        shapes (from ``.shape`` only: nothing is read). Raises ``ValueError`` naming the
        parameter."""
        opts = cls._checked(values, ndim)
        if inputs is not None:
            check_training_shapes(*inputs, axes=axes, channel=opts.channel)
        return opts


@dataclass(kw_only=True)
class PredictOptions(_Options):
    """The tiling options of :meth:`Segmenter.predict`."""

    _function: ClassVar[str] = "predict"

    tile_shape: tuple[int, ...] = opt(lo=1, hi=1_000_000)
    #: None: the model's overlap, shrunk to fit tiles smaller than the model's own
    overlap: int | None = opt(None, lo=0)
    batch_size: int | None = opt(None, lo=1, hi=4096)
    channel: int | None = opt(None, lo=0)
    num_threads: int | None = opt(None, lo=1)
    return_probabilities: bool | None = opt(None)

    def _check_ndim(self, ndim: int) -> None:
        if len(self.tile_shape) != ndim:
            raise ConfigError(
                "tile_shape",
                f"must have {ndim} values for a {ndim}D model, not {self.tile_shape}",
            )
        if self.overlap is not None and self.overlap >= min(self.tile_shape):
            raise ConfigError(
                "overlap", f"({self.overlap}) must be smaller than the tiles {self.tile_shape}"
            )

    @classmethod
    def checked(cls, seg: Any, **values: Any) -> PredictOptions:
        """Check ``predict``'s parameters; the tile shape defaults to the model's."""
        if values.get("tile_shape") is None:
            values["tile_shape"] = seg.config["tile_shape"]
        return cls._checked(values, seg.ndim)


def _shape_of(x: Any) -> tuple[int, ...]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(int(s) for s in x.shape)
    import numpy as np

    return tuple(np.shape(x))


def check_training_shapes(
    images: Any, labels: Any, masks: Any = None, axes: str | None = None, channel=None
) -> None:
    """Refuse images, labels and masks whose shapes disagree, reading only ``.shape``.

    A huge lazy image with mismatched labels is refused before any of it is loaded.
    """
    from .axes import guess_axes, validate_axes

    def as_list(x: Any) -> list:
        return list(x) if isinstance(x, (list, tuple)) else [x]

    imgs, labs = as_list(images), as_list(labels)
    msks = as_list(masks) if masks is not None else [None] * len(imgs)
    if len(imgs) != len(labs) or len(msks) != len(imgs):
        return  # finetune reports the counts itself
    for i, (img, lab, msk) in enumerate(zip(imgs, labs, msks, strict=True)):
        shape = _shape_of(img)
        try:
            ax = validate_axes(axes, len(shape), shape) if axes else guess_axes(shape)
        except ValueError:
            continue  # finetune reports bad axes with its own message
        spatial = tuple(s for a, s in zip(ax, shape, strict=True) if a != "C")
        for what, arr in (("labels", lab), ("mask", msk)):
            if arr is not None and _shape_of(arr) != spatial:
                raise ValueError(
                    f"finetune: image {i} has spatial shape {spatial} (axes {ax!r}) but its "
                    f"{what} have shape {_shape_of(arr)}; they must match pixel for pixel"
                )


def source_name(path: Any) -> str:
    """How a model path is named in messages (its config file when there is one)."""
    p = Path(path)
    return str(p / "config.json") if p.is_dir() and (p / "config.json").is_file() else str(p)
