"""What every command of the command line shares: errors, tables, progress bars, TIFF files,
MODEL arguments and where a trained model goes. Imports neither napari nor Qt, nor torch."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from . import data, store
from .store import ModelRegistry

if TYPE_CHECKING:
    from .segmenter import Segmenter

PROG = "napari-unet"
_REGISTRY = "registry:"
_PRETRAINED = "pretrained:"
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


class CLIError(ValueError):
    """A usage error detected by the command line itself (reported like the core's errors)."""


# ============================================================================ small helpers


def _err(stream: TextIO | None = None) -> TextIO:
    return stream if stream is not None else sys.stderr


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _message(exc: BaseException) -> str:
    """A one-line, human message for an exception (OSError: 'reason: file')."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return text or type(exc).__name__


def _stem(path: Path) -> str:
    """File name without its TIFF suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suffix in _TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(2, f"{what} file not found", str(p))
    if p.is_dir():
        raise CLIError(f"{what} {p} is a folder; expected a TIFF file")
    return p


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    v = float(value)
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> str:
    """Plain-text table; ``align`` has one letter per column (``l``/``r``), missing = ``r``."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.ljust(w) if align[i : i + 1] == "l" else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


class ProgressBar:
    """A progress bar on stderr (``tqdm``): ``label [#####     ] 12/40 tiles``.

    Drawn only when ``enabled`` (the CLI enables it when stderr is a terminal or with
    ``--progress``); redraws at most every ``min_interval`` seconds and erases itself on
    :meth:`close` so the per-file result lines printed afterwards stay clean.
    """

    def __init__(
        self,
        enabled: bool,
        unit: str = "tiles",
        label: str = "",
        stream: TextIO | None = None,
        width: int = 30,
        min_interval: float = 0.1,
    ) -> None:
        self.enabled = enabled
        self.unit, self.label, self.width = unit, label, width
        self.stream = _err(stream)
        self.min_interval = min_interval
        self._bar: Any = None

    def update(self, done: float, total: float, text: str | None = None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tail = "{n_fmt}/{total_fmt} {unit}" if text is None else _braces(text)
        label = f"{_braces(self.label)} " if self.label else ""
        fmt = f"{label}[{{bar:{self.width}}}] {tail}"
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                file=self.stream,
                unit=self.unit,
                leave=False,
                mininterval=self.min_interval,
                miniters=1,
                ascii=" #",
                bar_format=fmt,
                dynamic_ncols=False,
            )
        self._bar.bar_format, self._bar.total = fmt, total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _progress_enabled(args: argparse.Namespace) -> bool:
    if getattr(args, "progress", False):
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


# ============================================================================ files


def read_tiff(path: str | Path, what: str = "image") -> tuple[np.ndarray, str | None]:
    """Read the first series of a TIFF file.

    Returns
    -------
    array : numpy.ndarray
    axes : str or None
        The axes named by the file's metadata (ImageJ, OME, tifffile) when they are usable
        (letters of ``TZCYX``/``S``, Y and X present), else ``None``.
    """
    import tifffile

    p = _check_file(path, what)
    try:
        with tifffile.TiffFile(p) as tif:
            if not tif.series:
                raise CLIError(f"{what} {p} holds no image data")
            series = tif.series[0]
            arr = np.asarray(series.asarray())
            axes = str(series.axes).upper().replace("S", "C")
    except tifffile.TiffFileError as e:
        raise CLIError(f"cannot read {what} {p}: it is not a valid TIFF file ({e})") from None
    except (CLIError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - tifffile and its codecs raise many kinds
        raise CLIError(
            f"cannot read {what} {p}: the file is damaged (truncated or corrupt: {_message(e)}); "
            "copy it again or export it again"
        ) from None
    ok = (
        len(axes) == arr.ndim
        and set(axes) <= set(data.AXIS_LETTERS)
        and len(set(axes)) == len(axes)
        and "Y" in axes
        and "X" in axes
    )
    return arr, (axes if ok else None)


def _image_axes(arr: np.ndarray, meta_axes: str | None, given: str | None, path: Path) -> str:
    """``--axes`` if given, else the file's metadata axes, else a guess from the shape."""
    try:
        if given:
            return data.validate_axes(given, arr.ndim, arr.shape)
        if meta_axes:
            return meta_axes
        return data.guess_axes(arr.shape)
    except ValueError as e:
        raise CLIError(f"{path}: {e}") from None


def _label_dtype(labels: np.ndarray) -> type:
    if labels.size == 0 or (
        int(labels.min()) >= 0 and int(labels.max()) <= np.iinfo(np.uint16).max
    ):
        return np.uint16
    return np.int32


def write_tiff(path: Path, array: np.ndarray, axes: str, compress: bool = True) -> None:
    """Write ``array`` with its axes in the tifffile metadata (zlib-compressed by default)."""
    import tifffile

    tifffile.imwrite(
        path,
        array,
        metadata={"axes": axes},
        photometric="minisblack",
        compression="zlib" if compress else None,
    )


# ============================================================================ models


def _parse_registry_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@3`` / ``NAME@v3`` -> (name, version)."""
    name, sep, version = spec.rpartition("@")
    if sep and re.fullmatch(r"[vV]?\d+", version):
        return name, int(version.lstrip("vV"))
    return spec, None


def load_segmenter(spec: str) -> Segmenter:
    """Resolve a MODEL argument.

    ``new`` (an untrained model, for testing), ``registry:NAME`` or ``registry:NAME@VERSION``
    (the model registry), ``pretrained:NAME`` (a starter model shipped with the package) or a
    path to a saved model (folder or ``.safetensors`` file).
    """
    from .segmenter import Segmenter

    if spec == "new":
        _warn(
            "MODEL 'new' is an untrained network: its output is meaningless; use it only to "
            "test the pipeline"
        )
        return Segmenter.new()
    if spec.startswith(_REGISTRY):
        name, version = _parse_registry_spec(spec[len(_REGISTRY) :])
        if not name:
            raise CLIError("give a model name after 'registry:', e.g. registry:nuclei")
        return Segmenter.load(ModelRegistry().path(name, version))
    if spec.startswith(_PRETRAINED):
        return Segmenter.pretrained(spec[len(_PRETRAINED) :] or "nuclei")
    if not Path(spec).expanduser().exists():
        raise CLIError(_no_model_message(spec))
    return Segmenter.load(spec)


def starter_names() -> list[str]:
    """Names of the starter models shipped in the package (``pretrained:NAME``)."""
    from importlib import resources

    root = resources.files("napari_unet") / "models"
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _no_model_message(spec: str) -> str:
    """'no model at X' with what the user probably meant (a starter or a registry name)."""
    text = f"no model file or folder {spec!r}"
    name, _ = _parse_registry_spec(spec)
    if name in starter_names():
        return f"{text}; did you mean pretrained:{name} (the starter model shipped with {PROG})?"
    try:
        names = [i.name for i in ModelRegistry().list()]
    except (OSError, ValueError):
        names = []
    if name in names:
        return f"{text}; did you mean registry:{spec} (see '{PROG} models list')?"
    starters = ", ".join(f"pretrained:{n}" for n in starter_names()) or "none"
    return (
        f"{text}; give a saved model's path, registry:NAME ('{PROG} models list') or a starter "
        f"model ({starters})"
    )


def _model_words(seg: Segmenter, source: str | None) -> str:
    """A model as a user names it: 'a new instance model (2D, 1 channel)' (no repr)."""
    classes = f", {seg.net.out_channels} classes" if seg.task == "semantic" else ""
    what = f"{seg.task}, {seg.ndim}D, {seg.in_channels} channel{'s' if seg.in_channels > 1 else ''}"
    if source:
        return f"model {source} ({what}{classes})"
    return f"a new {seg.task} model ({seg.ndim}D, {seg.in_channels} channel(s){classes})"


def _threads_words() -> str:
    import torch

    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n != 1 else ''} (--threads N to choose)"


def _check_overwrite(target: str, overwrite: bool) -> None:
    """Refuse to replace a saved model at ``-o`` unless ``--overwrite`` is given."""
    if overwrite or target.startswith(_REGISTRY):
        return  # the registry keeps every version
    p = Path(target).expanduser()
    holds = p.is_file() or (
        p.is_dir() and ((p / "config.json").exists() or any(p.glob("*.safetensors")))
    )
    if holds:
        raise CLIError(
            f"{p} already holds a model: add --overwrite to replace it, or choose another -o "
            "(registry:NAME keeps every version)"
        )


# Python names in the core's messages -> the options a command-line user types
_CLI_WORDS = (
    (re.compile(r"\bchannel=\.\.\."), "--channel C"),
    (re.compile(r"\bchannel=(-?\d+)"), r"--channel \1"),
    (re.compile(r"\bdevice='([\w:]+)' or '([\w:]+)'"), r"--device \1 or --device \2"),
    (re.compile(r"\bdevice='([\w:]+)'"), r"--device \1"),
    (re.compile(r"\btile_shape\b"), "--tile"),
    (re.compile(r"\bbatch_size\b"), "--batch-size"),
    (re.compile(r"\btime_limit_s\b"), "--time"),
    (re.compile(r"\bval_fraction\b"), "--val"),
)


def cli_words(message: str) -> str:
    """Translate the core's Python words (``channel=...``, ``device='auto'``) into options."""
    for pattern, repl in _CLI_WORDS:
        message = pattern.sub(repl, message)
    return message


def _save_segmenter(seg: Segmenter, target: str) -> str:
    """Save to a path or to ``registry:NAME``; returns a description of where it went.

    The model's config ``name`` becomes the registry name or the file/folder name.
    """
    if target.startswith(_REGISTRY):
        name = target[len(_REGISTRY) :]
        seg.config["name"] = name
        info = ModelRegistry().save(name, seg.net.state_dict(), seg.config)
        return f"registry:{info.name} (version {info.version}, {info.path})"
    seg.config["name"] = _stem(Path(target)) or "untitled"
    return str(seg.save(target))


def _check_output_target(target: str) -> None:
    """Refuse an unusable ``-o`` before spending time on training."""
    if target.startswith(_REGISTRY):
        store.validate_name(target[len(_REGISTRY) :])
        return
    p = Path(target).expanduser()
    if p.exists() and p.is_file() and p.suffix.lower() != ".safetensors":
        raise CLIError(
            f"output {p} is an existing file; give a folder or a path ending in .safetensors"
        )


# ============================================================================ options


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return v


_MODEL_HELP = (
    "a saved model (folder or .safetensors file), registry:NAME[@VERSION] (see "
    "'napari-unet models list'), pretrained:NAME (a starter model shipped with the package: "
    + (", ".join(starter_names()) or "none")
    + ") "
    "or 'new' (an untrained model, for testing)"
)


def device_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )


def axes_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--axes",
        help="axes of the images, e.g. YX, ZYX, TYX, YXC, CYX (default: from the TIFF "
        "metadata, else guessed from the shape)",
    )
    p.add_argument(
        "--channel",
        type=int,
        metavar="C",
        help="use only this channel of multichannel images",
    )
