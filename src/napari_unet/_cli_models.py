"""``napari-unet evaluate`` (scores of label images against ground truth) and
``napari-unet models`` (the registry: list, rm, mv)."""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _outputs
from ._cli_common import (
    PROG,
    CLIError,
    _check_file,
    _fmt,
    _positive_int,
    _table,
    read_tiff,
    starter_names,
)
from .store import ModelRegistry

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


def add_evaluate_parser(sub: Any) -> None:
    """Register ``evaluate`` on the command line's subparsers."""
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


def add_models_parser(sub: Any) -> None:
    """Register ``models`` on the command line's subparsers."""
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
