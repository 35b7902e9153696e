"""Command-line interface: ``napari-unet predict | train | evaluate | demo | models``.

This is the headless entry point: it imports neither napari, Qt nor magicgui, so it runs on a
server or a cluster node without a display. torch is imported only by the subcommands that
need it, so ``napari-unet --version`` and ``napari-unet models list`` start quickly.

Every subcommand returns an exit code: 0 on success, 2 for a usage or data error (missing file,
bad axes, shapes that do not match, a corrupt model file ...; the message is printed as
``napari-unet: error: <message>`` without a traceback) and 130 when interrupted with Ctrl-C
(except ``train``, where Ctrl-C is the normal way to stop early: the model is saved, exit 0).

See ``docs/cli.md`` for a worked example of every subcommand.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from . import __version__, _cli_ecosystem, _cli_omezarr, _outputs, data, store
from .config import MAX_VAL_FRACTION
from .store import ModelRegistry

if TYPE_CHECKING:
    from .segmenter import Prediction, Segmenter
    from .training import TrainProgress

__all__ = ["main", "build_parser", "load_segmenter", "read_tiff", "ProgressBar"]

PROG = "napari-unet"
_REGISTRY = "registry:"
_PRETRAINED = "pretrained:"
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
_PRINT_EVERY_S = 2.0


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
    """A plain-text progress bar on stderr: ``\\r[#####.....] 12/40 tiles``.

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
        self.unit = unit
        self.label = label
        self.stream = _err(stream)
        self.width = width
        self.min_interval = min_interval
        self._last = -math.inf
        self._shown = 0

    def update(self, done: float, total: float, text: str | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        frac = min(1.0, max(0.0, done / total)) if total else 1.0
        n = int(round(frac * self.width))
        bar = "#" * n + "." * (self.width - n)
        if text is None:
            text = f"{int(done)}/{int(total)} {self.unit}"
        line = f"{self.label} [{bar}] {text}" if self.label else f"[{bar}] {text}"
        pad = max(0, self._shown - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
        self._shown = 0


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


# ============================================================================ predict


def _describe(seg: Segmenter, labels: np.ndarray) -> str:
    if seg.task == "instance":
        ids = np.unique(labels)
        n = int(ids.size - (1 if ids.size and ids[0] == 0 else 0))
        return f"{n} object{'s' if n != 1 else ''}"
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=1)
    total = max(1, labels.size)
    parts = [f"class {k}: {100 * c / total:.1f} %" for k, c in enumerate(counts) if k and c]
    return "classes " + (", ".join(parts) if parts else "none (all background)")


def _run_prediction(
    seg: Segmenter, image: np.ndarray, axes: str, bar: ProgressBar, **kwargs: Any
) -> Prediction:
    gen = seg.predict_iter(image, axes, **kwargs)
    try:
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                return stop.value
            bar.update(done, total)
    finally:
        gen.close()
        bar.close()


def cmd_predict(args: argparse.Namespace) -> int:
    if _cli_omezarr.wanted(args):  # -o OUT.ome.zarr or OME-Zarr inputs (docs/cli.md)
        return _cli_omezarr.cmd_predict(args)
    paths = [_check_file(p, "image") for p in args.images]
    stems: dict[str, Path] = {}
    for p in paths:
        s = _stem(p)
        if s in stems:
            raise CLIError(
                f"{stems[s]} and {p} would both be written as {s}_labels.tif; "
                "predict them into different output folders"
            )
        stems[s] = p
    # before any work: no output may be an input, and the output folder must take files
    outs = _outputs.predict_outputs(Path(args.output).expanduser(), list(stems), args.probabilities)
    _outputs.refuse_inputs(outs, [*paths, args.model], "-o")
    _outputs.check_writable(args.output, "-o")
    if _cli_ecosystem.batch_wanted(args, len(paths)):  # a dask cluster (docs/cluster.md)
        return _cli_ecosystem.cmd_predict_batch(args, paths)
    seg = load_segmenter(args.model)
    tile = None
    if args.tile is not None:
        if args.tile < 16:
            raise CLIError(f"--tile must be at least 16 pixels, not {args.tile}")
        tile = [args.tile] * 2 if seg.ndim == 2 else [seg.config["tile_shape"][0], *[args.tile] * 2]
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    show = _progress_enabled(args)
    t_start = time.perf_counter()
    for p in paths:
        image, meta_axes = read_tiff(p, "image")
        axes = _image_axes(image, meta_axes, args.axes, p)
        label = p.name if len(p.name) <= 30 else p.name[:27] + "..."
        pred = _run_prediction(
            seg,
            image,
            axes,
            ProgressBar(show, "tiles", label),
            device=args.device,
            tile_shape=tile,
            channel=args.channel,
            batch_size=args.batch_size,
            return_probabilities=args.probabilities,
        )
        labels_path = out / f"{_stem(p)}_labels.tif"
        write_tiff(labels_path, pred.labels.astype(_label_dtype(pred.labels)), pred.axes)
        written = [labels_path.name]
        if args.probabilities and pred.probabilities is not None:
            prob_path = out / f"{_stem(p)}_probabilities.tif"
            write_tiff(prob_path, pred.probabilities.astype(np.float32), "C" + pred.axes)
            written.append(prob_path.name)
        print(
            f"{p.name}: {_describe(seg, pred.labels)}, {pred.seconds:.2f} s "
            f"({pred.device}) -> {', '.join(written)}",
            flush=True,
        )
    if len(paths) > 1:
        print(f"{len(paths)} images in {time.perf_counter() - t_start:.1f} s; results in {out}")
    return 0


# ============================================================================ train


def _match_spatial(
    arr: np.ndarray, spatial: tuple[int, ...], axes: str, what: str, image: Path
) -> np.ndarray:
    """Check labels/mask against the image's spatial shape (extra length-1 axes are fine)."""
    if arr.shape == spatial:
        return arr
    if tuple(s for s in arr.shape if s != 1) == tuple(s for s in spatial if s != 1):
        return arr.reshape(spatial)
    raise CLIError(
        f"shape mismatch: {what} has shape {tuple(arr.shape)} but image {image} has spatial "
        f"shape {spatial} (axes {axes!r}); they must match pixel for pixel"
    )


def _load_training_data(
    args: argparse.Namespace, ndim: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None, list[str]]:
    """Read image/labels/mask files; returns them in canonical TZCYX / TZYX order."""
    images, labels, masks, names = [], [], [], []
    mask_paths = args.masks or [None] * len(args.images)
    for img_p, lab_p, msk_p in zip(args.images, args.labels, mask_paths, strict=True):
        img, meta_axes = read_tiff(img_p, "image")
        path = Path(img_p)
        axes = _image_axes(img, meta_axes, args.axes, path)
        if ndim == 3 and "Z" not in axes:
            raise CLIError(
                f"{path}: a 3D model needs images with a Z axis, but its axes are {axes!r}; "
                "pass --axes (e.g. ZYX) or train a 2D model"
            )
        spatial_axes = axes.replace("C", "")
        spatial = tuple(s for a, s in zip(axes, img.shape, strict=True) if a != "C")
        lab = _match_spatial(read_tiff(lab_p, "labels")[0], spatial, axes, f"labels {lab_p}", path)
        images.append(data.to_canonical(img, axes, "TZCYX"))
        labels.append(data.to_canonical(lab, spatial_axes, "TZYX"))
        if msk_p is not None:
            msk = _match_spatial(read_tiff(msk_p, "mask")[0], spatial, axes, f"mask {msk_p}", path)
            masks.append(data.to_canonical(msk.astype(bool), spatial_axes, "TZYX"))
        names.append(path.name)
    return images, labels, (masks if args.masks else None), names


def _progress_line(ev: TrainProgress) -> str:
    parts = [
        f"step {ev.step:>6}",
        f"{ev.seconds:7.1f} s",
        f"loss {_fmt(ev.loss, 4)}",
        f"{ev.patches_per_s:7.1f} patches/s",
    ]
    if ev.val_f1 is not None:
        parts.append(f"val F1 {ev.val_f1:.3f}")
    return "  ".join(parts)


def _load_monitor():
    """A :class:`~napari_unet.cpu.LoadMonitor` for torch's current thread count."""
    import torch

    from .cpu import LoadMonitor

    return LoadMonitor(torch.get_num_threads())


def _consume_training(
    gen: Iterator[TrainProgress],
    on_event: Callable[[TrainProgress], None],
) -> tuple[TrainProgress | None, bool]:
    """Run a finetune generator; Ctrl-C closes it cleanly. Returns (last event, interrupted)."""
    last = None
    interrupted = False
    try:
        for ev in gen:
            last = ev
            on_event(ev)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()  # the model keeps the weights of the last completed step
    return last, interrupted


def cmd_train(args: argparse.Namespace) -> int:
    from .segmenter import Segmenter

    n = len(args.images)
    if len(args.labels) != n:
        raise CLIError(
            f"got {n} image(s) but {len(args.labels)} --labels file(s); give one label image "
            "per image, in the same order"
        )
    if args.masks is not None and len(args.masks) != n:
        raise CLIError(f"got {n} image(s) but {len(args.masks)} --masks file(s)")
    time_limit = args.time if args.time and args.time > 0 else None
    if time_limit is None and args.steps is None:
        raise CLIError("give a time budget (--time SECONDS) or a number of steps (--steps N)")
    if not 0 <= args.val < MAX_VAL_FRACTION:  # the rule of finetune's val_fraction
        raise CLIError(f"--val must be between 0 and {MAX_VAL_FRACTION}, not {args.val}")
    for p in [*args.images, *args.labels, *(args.masks or [])]:
        _check_file(p, "input")
    _check_output_target(args.output)
    _check_overwrite(args.output, args.overwrite)
    _outputs.refuse_inputs([args.output], [*args.images, *args.labels, *(args.masks or [])], "-o")
    registry = ModelRegistry().root if args.output.startswith(_REGISTRY) else None
    _outputs.check_writable_target(args.output, "-o", registry)

    if args.from_model:
        seg = load_segmenter(args.from_model)
        if args.task and args.task != seg.task:
            raise CLIError(
                f"--task {args.task} but the model {args.from_model} is a {seg.task} model"
            )
        if args.classes and seg.task == "semantic" and args.classes != seg.net.out_channels:
            raise CLIError(
                f"--classes {args.classes} but the model {args.from_model} has "
                f"{seg.net.out_channels} classes"
            )
        images, labels, masks, names = _load_training_data(args, seg.ndim)
    else:
        task = args.task or "instance"
        images, labels, masks, names = _load_training_data(args, args.ndim)
        channels = 1 if args.channel is not None else int(images[0].shape[2])
        classes = args.classes
        if task == "semantic" and classes is None:
            classes = max(2, 1 + max(int(lab.max(initial=0)) for lab in labels))
        elif task == "instance" and classes is not None:
            raise CLIError("--classes is for --task semantic (instance models need no classes)")
        name = _stem(Path(args.output.removeprefix(_REGISTRY))) or "untitled"
        seg = Segmenter.new(
            task,
            channels,
            num_classes=classes or 2,
            ndim=args.ndim,
            base_channels=args.base_channels,
            depth=args.depth,
            seed=args.seed,
            name=name,
        )
    print(
        f"training {_model_words(seg, args.from_model)} on {n} image(s) with "
        f"{_threads_words()} for "
        + " / ".join(
            x
            for x in (
                f"{time_limit:g} s" if time_limit else "",
                f"{args.steps} steps" if args.steps else "",
            )
            if x
        )
        + " (Ctrl-C stops early and saves)",
        flush=True,
    )
    gen = seg.finetune(
        images,
        labels,
        masks,
        axes="TZCYX",
        time_limit_s=time_limit,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        val_fraction=args.val,
        device=args.device,
        seed=args.seed,
        channel=args.channel,
        names=names,
    )
    state = {"printed": -math.inf}
    monitor = _load_monitor()

    def report(ev: TrainProgress) -> None:
        warning = monitor.update(ev.step, ev.seconds)
        if warning:
            _warn(warning)
        now = time.monotonic()
        if ev.done or now - state["printed"] >= args.print_every:
            state["printed"] = now
            print(_progress_line(ev), flush=True)

    last, interrupted = _consume_training(gen, report)
    if last is None:
        print("interrupted before the first training step; nothing saved", file=sys.stderr)
        return 130
    if interrupted:
        print(
            f"\ninterrupted at step {last.step} ({last.seconds:.1f} s): saving the model as it "
            "is after the last completed step",
            file=sys.stderr,
        )
    reason = "stopped by the user" if interrupted else (last.reason or "done")
    summary = (
        f"trained {last.step} steps in {last.seconds:.1f} s ({reason}); "
        f"loss {_fmt(last.loss, 4)}, {last.patches_per_s:.1f} patches/s"
    )
    if last.val_f1 is not None:
        summary += f", validation F1@0.5 {last.val_f1:.3f}"
    print(summary)
    if monitor.note:
        print(f"note: {monitor.note}")
    # on failure: the working, temporary or home folder, and the message says which
    where = _outputs.save_or_rescue(
        lambda: _save_segmenter(seg, args.output), seg.save, "-o", args.output
    )
    print(f"saved model to {where}")
    return 0


# ============================================================================ evaluate

_EVAL_KEYS = ("n_pred", "n_true", "precision", "recall", "f1", "ap50", "ap75", "map")
_EVAL_HEADERS = ("n_pred", "n_true", "precision", "recall", "f1@0.5", "AP50", "AP75", "mAP")
_CSV_KEYS = (
    "n_pred",
    "n_true",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "ap50",
    "ap75",
    "map",
    "mean_matched_iou",
)


def _mean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate

    if len(args.pred) != len(args.truth):
        raise CLIError(
            f"got {len(args.pred)} prediction(s) but {len(args.truth)} --truth file(s); "
            "give them in matching order"
        )
    for p in [*args.pred, *args.truth]:
        _check_file(p, "label")
    if args.csv:  # before reading: the CSV never replaces an input, and can be written
        _outputs.refuse_inputs([args.csv], [*args.pred, *args.truth], "--csv")
        _outputs.check_writable(Path(args.csv).expanduser().parent, "--csv")
    results: list[tuple[Path, Path, dict[str, Any]]] = []
    for pred_p, true_p in zip(args.pred, args.truth, strict=True):
        pred, _ = read_tiff(pred_p, "prediction")
        true, _ = read_tiff(true_p, "truth")
        if pred.shape != true.shape:
            raise CLIError(
                f"shape mismatch: prediction {pred_p} has shape {tuple(pred.shape)} but truth "
                f"{true_p} has shape {tuple(true.shape)}"
            )
        results.append((Path(pred_p), Path(true_p), evaluate(pred, true)))

    means = {k: _mean([r[k] for _, _, r in results]) for k in _CSV_KEYS}
    rows = [[p.name, *(_fmt(r[k]) for k in _EVAL_KEYS)] for p, _, r in results]
    rows.append(["mean", *(_fmt(means[k], 1 if k.startswith("n_") else 3) for k in _EVAL_KEYS)])
    print(_table(["prediction", *_EVAL_HEADERS], rows))
    if args.csv:
        csv_path = Path(args.csv).expanduser()
        if csv_path.parent != Path(""):
            csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["prediction", "truth", *_CSV_KEYS])
            for p, t, r in results:
                w.writerow([str(p), str(t), *(_csv_value(r[k]) for k in _CSV_KEYS)])
            w.writerow(["mean", "", *(_csv_value(means[k]) for k in _CSV_KEYS)])
        print(f"wrote {csv_path}")
    return 0


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.6g}"


# ============================================================================ demo

_DEMO_WIDTHS = (5, 8, 7, 9, 6, 11)


def _fixed_row(cells: Sequence[str]) -> str:
    """A demo table row: fixed widths, so rows can be printed as the rounds finish."""
    return "  ".join(c.rjust(w) for c, w in zip(cells, _DEMO_WIDTHS, strict=True))


def cmd_demo(args: argparse.Namespace) -> int:
    from .metrics import evaluate
    from .segmenter import Segmenter

    if args.size < 32:
        raise CLIError(f"--size must be at least 32 pixels, not {args.size}")
    if args.rounds < 1:
        raise CLIError("--rounds must be at least 1")
    if args.seconds <= 0:
        raise CLIError("--seconds must be positive")
    out = Path(args.output).expanduser()
    print(f"writing the demo's images, predictions and model to {out} (choose with -o DIR)")
    out.mkdir(parents=True, exist_ok=True)
    shape = (args.size, args.size)
    train_img, train_lab = data.make_nuclei(shape, seed=args.seed)
    test_img, test_lab = data.make_nuclei(shape, seed=args.seed + 1)
    write_tiff(out / "train_image.tif", train_img, "YX")
    write_tiff(out / "train_labels.tif", train_lab.astype(_label_dtype(train_lab)), "YX")
    write_tiff(out / "test_image.tif", test_img, "YX")
    write_tiff(out / "test_labels.tif", test_lab.astype(_label_dtype(test_lab)), "YX")
    seg = Segmenter.new(base_channels=args.base_channels, depth=args.depth, name="demo")
    n_train = int(train_lab.max())
    n_test = int(test_lab.max())
    print(
        f"napari-unet demo: synthetic nuclei, {args.size}x{args.size} pixels; training image "
        f"with {n_train} nuclei, held-out test image with {n_test}.\n"
        f"Each round fine-tunes the same {seg.config['architecture']['base_channels']}-channel "
        f"U-Net for {args.seconds:g} s more, then segments the held-out image.\n",
        flush=True,
    )
    headers = ["round", "train s", "steps", "objects", "F1@0.5", "AP@0.5:0.95"]
    rows: list[list[str]] = []
    show = _progress_enabled(args)
    total_s, total_steps = 0.0, 0
    interrupted = False
    monitor = _load_monitor()
    for k in range(1, args.rounds + 1):
        monitor.restart()
        bar = ProgressBar(show, label=f"round {k}")

        def on_event(ev: TrainProgress, bar: ProgressBar = bar) -> None:
            bar.update(ev.fraction, 1.0, f"{ev.seconds:.0f}/{args.seconds:g} s, step {ev.step}")
            warning = monitor.update(ev.step, ev.seconds)
            if warning:
                _warn(warning)

        gen = seg.finetune(
            train_img,
            train_lab,
            axes="YX",
            time_limit_s=args.seconds,
            steps=args.steps,
            device=args.device,
            seed=args.seed + k,
            names=["train_image.tif"],
        )
        last, interrupted = _consume_training(gen, on_event)
        bar.close()
        if last is None:
            break
        total_s += last.seconds
        total_steps += last.step
        pred = seg.predict(test_img, "YX", device=args.device, return_probabilities=False)
        write_tiff(out / f"prediction_round{k}.tif", pred.labels.astype(np.uint16), "YX")
        r = evaluate(pred.labels, test_lab)
        rows.append(
            [
                str(k),
                f"{total_s:.1f}",
                str(total_steps),
                f"{r['n_pred']}/{r['n_true']}",
                f"{r['f1']:.3f}",
                f"{r['map']:.3f}",
            ]
        )
        if k == 1:
            print(_fixed_row(headers))
            print(_fixed_row(["-" * w for w in _DEMO_WIDTHS]))
        print(_fixed_row(rows[-1]), flush=True)
        if interrupted:
            break
    if rows:
        seg.save(out / "model")
    print(
        f"\nfiles in {out}: train_image.tif, train_labels.tif, test_image.tif, test_labels.tif, "
        f"prediction_round1..{len(rows)}.tif, model/"
        if rows
        else f"\nfiles in {out}: the images only (interrupted before the first round)"
    )
    if rows:
        last_pred = out / f"prediction_round{len(rows)}.tif"
        if monitor.note:
            print(f"\nnote: {monitor.note}")
        print("next:")
        print(f"  napari-unet predict {out / 'model'} YOUR_IMAGE.tif -o results/")
        print(f"  napari-unet evaluate {last_pred} --truth {out / 'test_labels.tif'}")
        print(
            "  python -m napari_unet   # napari with a real fluorescence image (DSB2018, CC0) "
            "to correct and train on"
        )
    if interrupted:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


# ============================================================================ models


def _short_list(items: Sequence[str], limit: int = 40) -> str:
    """Whole items, joined by ', ', as many as fit in ``limit`` characters, then '(+N more)'.

    Items are never cut (one may hold commas or brackets: '48 generated nuclei images (...)').
    """
    if not items:
        return "-"
    text = ", ".join(items)
    if len(text) <= limit:
        return text
    shown: list[str] = []
    for item in items:
        if shown and len(", ".join([*shown, item])) > limit - 12:
            break
        shown.append(item)
    if len(shown) == 1 and len(shown[0]) > limit - 12:
        shown = [shown[0][: limit - 15].rstrip() + "..."]
    rest = len(items) - len(shown)
    return ", ".join(shown) + (f" (+{rest} more)" if rest else "")


def cmd_models(args: argparse.Namespace) -> int:
    reg = ModelRegistry()
    if args.models_command == "list":
        infos = reg.list()
        starters = starter_names()
        if starters:
            print(
                "starter models shipped with the package (use as pretrained:NAME): "
                + ", ".join(starters)
            )
        if not infos:
            print(
                f"no saved models yet in {reg.root} (train one with '{PROG} train ... "
                "-o registry:NAME', or in napari's U-Net Train widget)"
            )
            return 0
        rows = [
            [
                i.name,
                str(i.version),
                i.task or "-",
                _short_list(i.trained_on),
                _fmt(i.val_score),
            ]
            for i in infos
        ]
        print(f"models in {reg.root}:")
        print(_table(["name", "version", "task", "trained_on", "val_score"], rows, align="lrll"))
        return 0
    if args.models_command == "rm":
        reg.delete(args.name, args.version)
        what = f"version {args.version} of " if args.version is not None else ""
        print(f"deleted {what}model {args.name!r}")
        return 0
    if args.models_command == "mv":
        reg.rename(args.old, args.new)
        print(f"renamed model {args.old!r} to {args.new!r}")
        return 0
    raise CLIError("usage: napari-unet models list | rm NAME | mv OLD NEW")


# ============================================================================ parser


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``napari-unet`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Human-in-the-loop U-Net segmentation of microscopy images (headless).",
        epilog="Run 'napari-unet COMMAND -h' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for torch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    # predict
    p = sub.add_parser(
        "predict",
        help="segment TIFF images with a model",
        description="Segment TIFF images; writes <stem>_labels.tif (and optionally "
        "<stem>_probabilities.tif) into OUTDIR.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument(
        "images", metavar="IMAGE", nargs="+", help="TIFF image(s) or OME-Zarr folder(s)"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="output folder, or OUT.ome.zarr (one image: image + labels as OME-Zarr)",
    )
    axes_opt(p)
    device_opt(p)
    p.add_argument(
        "--tile",
        type=int,
        metavar="PIXELS",
        help="tile size in Y and X (default: the model's, usually 512)",
    )
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="tiles per batch")
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <stem>_probabilities.tif (float32, one plane per class)",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="draw a progress bar on stderr even when it is not a terminal",
    )
    _cli_ecosystem.add_predict_options(p)
    p.set_defaults(func=cmd_predict)

    # train
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model on images and their labels",
        description="Train a new model (or fine-tune --from MODEL) on TIFF images and their "
        "label images, then save it. Ctrl-C stops early and still saves the model.",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="training TIFF image(s)")
    p.add_argument(
        "--labels",
        nargs="+",
        required=True,
        metavar="LABELS",
        help="label TIFFs, one per image in the same order (0 = background; object ids for "
        "--task instance, class ids for --task semantic)",
    )
    p.add_argument(
        "--masks",
        nargs="+",
        metavar="MASK",
        help="optional TIFFs, one per image: nonzero where the labels can be trusted "
        "(other pixels are ignored)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MODEL_DIR",
        help="where to save the model: a folder, a .safetensors file or registry:NAME",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model already saved at -o (without it, an existing model is kept)",
    )
    p.add_argument(
        "--from",
        dest="from_model",
        metavar="MODEL",
        help="start from this model; "
        + _MODEL_HELP.replace(" or 'new' (an untrained model, for testing)", ""),
    )
    p.add_argument(
        "--task", choices=("instance", "semantic"), help="for a new model (default: instance)"
    )
    p.add_argument(
        "--classes",
        type=int,
        metavar="K",
        help="classes of a new semantic model, background included (default: from the labels)",
    )
    p.add_argument(
        "--ndim", type=int, choices=(2, 3), default=2, help="2D or 3D network for a new model"
    )
    p.add_argument(
        "--time",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="training time budget (default: 60; 0 = no limit, needs --steps)",
    )
    p.add_argument("--steps", type=_positive_int, metavar="N", help="stop after N steps")
    p.add_argument("--lr", type=float, help="learning rate (default: 3e-3 new, 1e-3 fine-tuning)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="patches per step")
    p.add_argument(
        "--val",
        type=_non_negative_float,
        default=0.1,
        metavar="FRACTION",
        help="hold out this fraction of each image (a band at the bottom) to report a "
        "validation F1 and keep the best weights; 0 disables (default: 0.1, instance task)",
    )
    device_opt(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    axes_opt(p)
    p.add_argument("--base-channels", type=_positive_int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=_positive_int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--print-every", type=float, default=_PRINT_EVERY_S, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    # evaluate
    p = sub.add_parser(
        "evaluate",
        help="compare predicted label images with ground truth",
        description="Instance segmentation scores (matching at IoU 0.5; AP at 0.5, 0.75 and "
        "averaged over 0.5:0.95) for pairs of label TIFFs.",
    )
    p.add_argument("pred", metavar="PRED", nargs="+", help="predicted label TIFF(s)")
    p.add_argument(
        "--truth", nargs="+", required=True, metavar="TRUE", help="ground-truth label TIFF(s)"
    )
    p.add_argument("--csv", metavar="FILE", help="also write the scores to a CSV file")
    p.set_defaults(func=cmd_evaluate)

    # demo
    p = sub.add_parser(
        "demo",
        help="headless showcase on synthetic nuclei",
        description="Generate synthetic nuclei, fine-tune a fresh model in rounds and score "
        "it on a held-out image after each round.",
    )
    p.add_argument(
        "-o",
        "--output",
        default="napari-unet-demo",
        metavar="OUTDIR",
        help="output folder (default: ./napari-unet-demo)",
    )
    p.add_argument("--rounds", type=_positive_int, default=3, help="training rounds (default: 3)")
    p.add_argument(
        "--seconds",
        type=_non_negative_float,
        default=20.0,
        help="training seconds per round (default: 20)",
    )
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    device_opt(p)
    p.add_argument("--progress", action="store_true", help="progress bar even without a terminal")
    p.add_argument("--base-channels", type=_positive_int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=_positive_int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=_positive_int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    # models
    p = sub.add_parser(
        "models",
        help="list, delete or rename models in the registry",
        description="Manage the named models of the registry (NAPARI_UNET_HOME, or the user "
        "data folder).",
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    msub.add_parser("list", help="list the models (latest version of each)")
    q = msub.add_parser("rm", help="delete a model (all versions, or --version N)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--version", type=_positive_int, help="delete only this version")
    q = msub.add_parser("mv", help="rename a model")
    q.add_argument("old", metavar="OLD")
    q.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_models)
    _cli_ecosystem.add_commands(sub, _MODEL_HELP)  # export, import (bioimage.io)
    return parser


# ============================================================================ main


_TORCH_COMMANDS = ("predict", "train", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    old_threads = None
    try:
        if args.threads or args.command in _TORCH_COMMANDS:
            import torch

            from .cpu import default_threads

            old_threads = torch.get_num_threads()
            # the free cores, measured (as the widgets do, less the viewer's core): more
            # threads than free cores made training 17x slower (docs/benchmarks.md)
            torch.set_num_threads(args.threads or default_threads(gui=False))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # CLIError, ModelFileError, TiffFileError, missing files
        print(f"{PROG}: error: {cli_words(_message(e))}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(
            f"{PROG}: error: out of memory ({_message(e).splitlines()[0]}); try a smaller "
            "--tile or --batch-size, or --device cpu",
            file=sys.stderr,
        )
        return 2
    finally:
        if old_threads is not None:  # main() may run in-process (tests, notebooks): restore
            import torch

            torch.set_num_threads(old_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
