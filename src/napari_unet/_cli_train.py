"""``napari-unet train``: train or fine-tune a model on TIFF images and their labels.

The training itself is the core's :class:`~napari_unet.runs.TrainRun` (as in the Train
widget): it stops on Ctrl-C, saves once and sums up; this module reads the files, prints the
progress and says where the model went.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _outputs, data
from ._cli_common import (
    _MODEL_HELP,
    _REGISTRY,
    CLIError,
    _check_file,
    _check_output_target,
    _check_overwrite,
    _fmt,
    _image_axes,
    _model_words,
    _non_negative_float,
    _positive_int,
    _stem,
    _threads_words,
    _warn,
    axes_opt,
    device_opt,
    load_segmenter,
    read_tiff,
)
from .config import MAX_VAL_FRACTION
from .runs import VAL_FRACTION, summary
from .store import ModelRegistry

if TYPE_CHECKING:
    from .segmenter import Segmenter
    from .training import TrainProgress

_PRINT_EVERY_S = 2.0


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


def _check_args(args: argparse.Namespace) -> float | None:
    """Refuse unusable arguments before reading anything; returns the time limit."""
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
    return time_limit


def _model_and_data(args: argparse.Namespace) -> tuple[Segmenter, tuple]:
    """The model to train (``--from`` or a new one) and the files read for it."""
    from .segmenter import Segmenter

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
        return seg, _load_training_data(args, seg.ndim)
    task = args.task or "instance"
    files = _load_training_data(args, args.ndim)
    images, labels = files[0], files[1]
    classes = args.classes
    if task == "semantic" and classes is None:
        classes = max(2, 1 + max(int(lab.max(initial=0)) for lab in labels))
    elif task == "instance" and classes is not None:
        raise CLIError("--classes is for --task semantic (instance models need no classes)")
    arch = {k: v for k in ("base_channels", "depth") if (v := getattr(args, k)) is not None}
    seg = Segmenter.new(
        task,
        1 if args.channel is not None else int(images[0].shape[2]),
        num_classes=classes or 2,
        ndim=args.ndim,
        seed=args.seed,
        name=_stem(Path(args.output.removeprefix(_REGISTRY))) or "untitled",
        **arch,
    )
    return seg, files


def _budget_words(time_limit: float | None, steps: int | None) -> str:
    parts = [f"{time_limit:g} s" if time_limit else "", f"{steps} steps" if steps else ""]
    return " / ".join(x for x in parts if x)


class _Printer:
    """Prints a progress line every ``every`` seconds (and the last), warns of a busy CPU."""

    def __init__(self, every: float):
        self.every, self.printed = every, -math.inf
        self.monitor = _load_monitor()

    def __call__(self, ev: TrainProgress) -> None:
        warning = self.monitor.update(ev.step, ev.seconds)
        if warning:
            _warn(warning)
        now = time.monotonic()
        if ev.done or now - self.printed >= self.every:
            self.printed = now
            print(_progress_line(ev), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .runs import TrainRun

    time_limit = _check_args(args)
    seg, (images, labels, masks, names) = _model_and_data(args)
    print(
        f"training {_model_words(seg, args.from_model)} on {len(images)} image(s) with "
        f"{_threads_words()} for {_budget_words(time_limit, args.steps)} "
        "(Ctrl-C stops early and saves)",
        flush=True,
    )

    from . import cli  # cli._save_segmenter: the name tests and scripts replace

    def save(s: Segmenter) -> str:
        # on failure: the working, temporary or home folder, and the message says which
        return _outputs.save_or_rescue(
            lambda: cli._save_segmenter(s, args.output), s.save, "-o", args.output
        )

    run = TrainRun(
        seg,
        images,
        labels,
        masks,
        save=save,
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
    printer = _Printer(args.print_every)
    outcome = run.run(printer)
    if outcome.error is not None:
        raise outcome.error
    last = outcome.last
    if last is None:
        print("interrupted before the first training step; nothing saved", file=sys.stderr)
        return 130
    if outcome.stopped:
        print(
            f"\ninterrupted at step {last.step} ({last.seconds:.1f} s): the model is saved as "
            "it is after the last completed step",
            file=sys.stderr,
        )
    print(f"trained {summary(last, outcome.stopped)}")
    if printer.monitor.note:
        print(f"note: {printer.monitor.note}")
    if outcome.save_error is not None:
        raise outcome.save_error
    print(f"saved model to {outcome.saved}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``train`` on the command line's subparsers."""
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
    _add_training_options(p)
    p.set_defaults(func=cmd_train)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """A new model's task and shape; the training's budget and settings."""
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
        default=VAL_FRACTION,
        metavar="FRACTION",
        help="hold out this fraction of each image (a band at the bottom) to report a "
        f"validation F1 and keep the best weights; 0 disables (default: {VAL_FRACTION}, "
        "instance task)",
    )
    device_opt(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    axes_opt(p)
    p.add_argument("--base-channels", type=_positive_int, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=_positive_int, help=argparse.SUPPRESS)
    p.add_argument("--print-every", type=float, default=_PRINT_EVERY_S, help=argparse.SUPPRESS)
