"""``napari-unet demo``: the human-in-the-loop cycle headless, on synthetic nuclei.

A fresh model is fine-tuned in rounds (each a :class:`~napari_unet.runs.TrainRun`) and scored on
a held-out image after each round.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import data
from ._cli_common import (
    PROG,
    CLIError,
    ProgressBar,
    _label_dtype,
    _non_negative_float,
    _positive_int,
    _progress_enabled,
    _warn,
    device_opt,
    write_tiff,
)

_DEMO_WIDTHS = (5, 8, 7, 9, 6, 11)
_HEADERS = ("round", "train s", "steps", "objects", "F1@0.5", "AP@0.5:0.95")


def _fixed_row(cells: Sequence[str]) -> str:
    """A demo table row: fixed widths, so rows can be printed as the rounds finish."""
    return "  ".join(c.rjust(w) for c, w in zip(cells, _DEMO_WIDTHS, strict=True))


def _check_args(args: argparse.Namespace) -> None:
    if args.size < 32:
        raise CLIError(f"--size must be at least 32 pixels, not {args.size}")
    if args.rounds < 1:
        raise CLIError("--rounds must be at least 1")
    if args.seconds <= 0:
        raise CLIError("--seconds must be positive")


def _write_images(out: Path, args: argparse.Namespace):
    """The training and the held-out test image (and their labels), written into ``out``."""
    shape = (args.size, args.size)
    train = data.make_nuclei(shape, seed=args.seed)
    test = data.make_nuclei(shape, seed=args.seed + 1)
    for name, (img, lab) in (("train", train), ("test", test)):
        write_tiff(out / f"{name}_image.tif", img, "YX")
        write_tiff(out / f"{name}_labels.tif", lab.astype(_label_dtype(lab)), "YX")
    return train, test


class _Rounds:
    """The rounds of the demo: train, predict the test image, score, print a row."""

    def __init__(self, args: argparse.Namespace, out: Path, seg: Any, train, test):
        from ._cli_train import _load_monitor

        self.args, self.out, self.seg = args, out, seg
        self.train, self.test = train, test
        self.rows: list[list[str]] = []
        self.seconds, self.steps = 0.0, 0
        self.monitor = _load_monitor()

    def one(self, k: int) -> bool:
        """Round ``k``; False when it was interrupted (Ctrl-C)."""
        from .runs import TrainRun

        args = self.args
        self.monitor.restart()
        bar = ProgressBar(_progress_enabled(args), label=f"round {k}")

        def on_event(ev) -> None:
            bar.update(ev.fraction, 1.0, f"{ev.seconds:.0f}/{args.seconds:g} s, step {ev.step}")
            warning = self.monitor.update(ev.step, ev.seconds)
            if warning:
                _warn(warning)

        run = TrainRun(
            self.seg,
            self.train[0],
            self.train[1],
            axes="YX",
            time_limit_s=args.seconds,
            steps=args.steps,
            device=args.device,
            seed=args.seed + k,
            names=["train_image.tif"],
        )
        outcome = run.run(on_event)
        bar.close()
        if outcome.error is not None:
            raise outcome.error
        if outcome.last is not None:
            self._score(k, outcome.last)
        return not outcome.stopped

    def _score(self, k: int, last) -> None:
        from .metrics import evaluate

        self.seconds += last.seconds
        self.steps += last.step
        pred = self.seg.predict(
            self.test[0], "YX", device=self.args.device, return_probabilities=False
        )
        write_tiff(self.out / f"prediction_round{k}.tif", pred.labels.astype(np.uint16), "YX")
        r = evaluate(pred.labels, self.test[1])
        self.rows.append(
            [
                str(k),
                f"{self.seconds:.1f}",
                str(self.steps),
                f"{r['n_pred']}/{r['n_true']}",
                f"{r['f1']:.3f}",
                f"{r['map']:.3f}",
            ]
        )
        if k == 1:
            print(_fixed_row(_HEADERS))
            print(_fixed_row(["-" * w for w in _DEMO_WIDTHS]))
        print(_fixed_row(self.rows[-1]), flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from .segmenter import Segmenter

    _check_args(args)
    out = Path(args.output).expanduser()
    print(f"writing the demo's images, predictions and model to {out} (choose with -o DIR)")
    out.mkdir(parents=True, exist_ok=True)
    train, test = _write_images(out, args)
    arch = {k: v for k in ("base_channels", "depth") if (v := getattr(args, k)) is not None}
    seg = Segmenter.new(name="demo", **arch)
    print(
        f"napari-unet demo: synthetic nuclei, {args.size}x{args.size} pixels; training image "
        f"with {int(train[1].max())} nuclei, held-out test image with {int(test[1].max())}.\n"
        f"Each round fine-tunes the same {seg.model_config.architecture.base_channels}-channel "
        f"U-Net for {args.seconds:g} s more, then segments the held-out image.\n",
        flush=True,
    )
    rounds = _Rounds(args, out, seg, train, test)
    interrupted = False
    for k in range(1, args.rounds + 1):
        if not rounds.one(k):
            interrupted = True
            break
    if rounds.rows:
        seg.save(out / "model")
    _print_files(out, rounds)
    if interrupted:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _print_files(out: Path, rounds: _Rounds) -> None:
    """What the demo wrote, and what to do next."""
    n = len(rounds.rows)
    if not n:
        print(f"\nfiles in {out}: the images only (interrupted before the first round)")
        return
    print(
        f"\nfiles in {out}: train_image.tif, train_labels.tif, test_image.tif, test_labels.tif, "
        f"prediction_round1..{n}.tif, model/"
    )
    if rounds.monitor.note:
        print(f"\nnote: {rounds.monitor.note}")
    print("next:")
    print(f"  napari-unet predict {out / 'model'} YOUR_IMAGE.tif -o results/")
    print(
        f"  napari-unet evaluate {out / f'prediction_round{n}.tif'} --truth "
        f"{out / 'test_labels.tif'}"
    )
    print(
        "  python -m napari_unet   # napari with a real fluorescence image (DSB2018, CC0) "
        "to correct and train on"
    )


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the command line's subparsers."""
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
    p.add_argument("--base-channels", type=_positive_int, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=_positive_int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=_positive_int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
