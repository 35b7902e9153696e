"""``napari-unet predict``: segment TIFF images (OME-Zarr in :mod:`._cli_omezarr`, a dask
cluster in :mod:`._cli_ecosystem`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _cli_ecosystem, _cli_omezarr, _outputs
from ._cli_common import (
    _MODEL_HELP,
    CLIError,
    ProgressBar,
    _check_file,
    _image_axes,
    _label_dtype,
    _positive_int,
    _progress_enabled,
    _stem,
    axes_opt,
    device_opt,
    load_segmenter,
    read_tiff,
    write_tiff,
)

if TYPE_CHECKING:
    from .segmenter import Prediction, Segmenter


#: ``napari_unet.engines.ENGINES``, written out: importing ``engines`` imports torch, and the
#: command line starts without it (``--help`` stays instant; tests check the two agree)
ENGINE_CHOICES = ("auto", "torch", "openvino", "onnxruntime")

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
    """``seg.predict_iter`` to its end, its ``(done, total)`` tiles drawn on ``bar``."""
    result: list[Prediction] = []

    def predict():
        result.append((yield from seg.predict_iter(image, axes, **kwargs)))

    gen = predict()
    try:
        for done, total in gen:
            bar.update(done, total)
    finally:
        gen.close()
        bar.close()
    return result[0]


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
        depth = seg.model_config.tile_shape[0]  # a 3D model keeps its Z tile
        tile = [args.tile] * 2 if seg.ndim == 2 else [depth, *[args.tile] * 2]
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    show = _progress_enabled(args)
    t_start = time.perf_counter()
    todo = paths
    if not getattr(args, "overwrite", False):  # results there may be someone's truth labels
        todo = []
        for p in paths:
            there = [
                f.name for f in _outputs.predict_outputs(out, [_stem(p)], args.probabilities)
                if f.exists()
            ]  # fmt: skip
            if there:
                print(f"{p.name}: skipped, {', '.join(there)} exists (--overwrite replaces it)")
            else:
                todo.append(p)
    for p in todo:
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
            engine=args.engine,
        )
        for note in pred.notes:
            print(f"note: {note}", file=sys.stderr)
        labels_path = out / f"{_stem(p)}_labels.tif"
        write_tiff(labels_path, pred.labels.astype(_label_dtype(pred.labels)), pred.axes)
        written = [labels_path.name]
        if args.probabilities and pred.probabilities is not None:
            prob_path = out / f"{_stem(p)}_probabilities.tif"
            write_tiff(prob_path, pred.probabilities.astype(np.float32), "C" + pred.axes)
            written.append(prob_path.name)
        print(
            f"{p.name}: {_describe(seg, pred.labels)}, {pred.seconds:.2f} s "
            f"({pred.device}, {pred.engine}) -> {', '.join(written)}",
            flush=True,
        )
    if len(paths) > 1:
        skipped = f", {len(paths) - len(todo)} skipped" if len(todo) < len(paths) else ""
        print(
            f"{len(todo)} images in {time.perf_counter() - t_start:.1f} s{skipped}; "
            f"results in {out}"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``predict`` on the command line's subparsers."""
    p = sub.add_parser(
        "predict",
        help="segment TIFF images with a model",
        description="Segment TIFF images; writes <stem>_labels.tif (and optionally "
        "<stem>_probabilities.tif) into OUTDIR.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("images", metavar="IMAGE", nargs="+", help="TIFF image(s) or OME-Zarr folder(s)")
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
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help="who runs the network: auto (OpenVINO or ONNX Runtime on the CPU when installed, "
        "else torch), torch, openvino, onnxruntime (default: auto)",
    )
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
