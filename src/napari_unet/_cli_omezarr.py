"""``napari-unet predict`` with OME-Zarr: ``-o OUT.ome.zarr``, or OME-Zarr folders as inputs.

Kept apart from :mod:`napari_unet.cli` (which calls :func:`cmd_predict` when :func:`wanted`):

- ``predict MODEL img.tif -o out.ome.zarr``: one image; ``out.ome.zarr`` holds the image (its
  pyramid) and the labels in ``labels/unet`` (a nearest-neighbour pyramid, ``image-label``).
- ``predict MODEL a.ome.zarr b.ome.zarr -o OUTDIR``: each input's level 0 is read lazily and
  predicted chunk by chunk into ``OUTDIR/<stem>_labels.ome.zarr``.

The labels go straight into the new store's level 0 (``labels_out``), so neither they nor the
image are ever whole in memory (apart from a TIFF input, which is read whole). Nothing existing
is replaced without ``--overwrite``; each store appears at its name only when complete.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from . import _outputs
from . import omezarr as oz

OME_ZARR_SUFFIX = ".ome.zarr"
LABEL_NAME = "unet"
#: images up to this many pixels are predicted in memory (probabilities ~12 bytes a pixel)
IN_MEMORY_PIXELS = 16 * 1024 * 1024


def _cli():
    from . import cli

    return cli


def is_zarr_input(path: str | Path) -> bool:
    """A folder named ``*.zarr`` or holding OME-Zarr metadata."""
    p = Path(path).expanduser()
    return p.is_dir() and (p.name.lower().rstrip("/").endswith(".zarr") or oz.is_ome_zarr(p))


def wanted(args: argparse.Namespace) -> bool:
    """Whether this predict run involves OME-Zarr (as output or as any input)."""
    out = str(args.output).rstrip("/\\").lower()
    return out.endswith(OME_ZARR_SUFFIX) or any(is_zarr_input(p) for p in args.images)


def zarr_stem(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (OME_ZARR_SUFFIX, ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return _cli()._stem(path)


def _targets(args: argparse.Namespace, paths: list[Path]) -> list[Path]:
    cli = _cli()
    out = Path(args.output).expanduser()
    if out.name.lower().endswith(OME_ZARR_SUFFIX):
        if len(paths) != 1:
            raise cli.CLIError(
                f"-o {out}: an .ome.zarr output takes one image, not {len(paths)}; give a folder "
                "-o to write <stem>_labels.ome.zarr for each OME-Zarr input"
            )
        return [out]
    tiffs = [p for p in paths if not is_zarr_input(p)]
    if tiffs:
        raise cli.CLIError(
            f"TIFF and OME-Zarr inputs mixed ({tiffs[0]} is not OME-Zarr): predict them in "
            "separate runs, or give '-o NAME.ome.zarr' for one TIFF"
        )
    targets: dict[str, Path] = {}
    for p in paths:
        t = out / f"{zarr_stem(p)}_labels{OME_ZARR_SUFFIX}"
        if t.name in targets:
            raise cli.CLIError(
                f"{targets[t.name]} and {p} would both be written as {t.name}; predict them "
                "into different output folders"
            )
        targets[t.name] = p
    return [out / n for n in targets]


def _read_input(path: Path, given_axes: str | None) -> tuple[Any, str, tuple[float, ...] | None]:
    """(image, axes, physical scale per axis or None) of a TIFF file or an OME-Zarr folder."""
    cli = _cli()
    if not is_zarr_input(path):
        image, meta_axes = cli.read_tiff(path, "image")
        return image, cli._image_axes(image, meta_axes, given_axes, path), None
    ome = oz.read(path)
    if ome.image is None:
        raise cli.CLIError(f"{path} holds label images but no image to segment")
    image, axes = ome.image.data, ome.image.axes
    if given_axes:
        if len(given_axes) != image.ndim or sorted(given_axes.upper()) != sorted(axes):
            raise cli.CLIError(
                f"{path}: --axes {given_axes} does not match its OME-Zarr axes {axes}; drop "
                "--axes (OME-Zarr names its axes)"
            )
    return image, axes, ome.image.scales[0]


def cmd_predict(args: argparse.Namespace) -> int:
    cli = _cli()
    paths = []
    for p in args.images:
        q = Path(p).expanduser()
        if not q.exists():
            raise FileNotFoundError(2, "image file or OME-Zarr folder not found", str(q))
        paths.append(q)
    if getattr(args, "scheduler", None) or getattr(args, "cluster", "auto") in ("local", "slurm"):
        raise cli.CLIError(
            "OME-Zarr prediction runs in this process (chunk by chunk); drop --cluster/--scheduler"
        )
    if args.probabilities:
        raise cli.CLIError(
            "--probabilities is written only as TIFF; drop it for an OME-Zarr output or input"
        )
    targets = _targets(args, paths)
    # before any work: never over an input, never over existing results without --overwrite
    _outputs.refuse_inputs(targets, [*paths, args.model], "-o")
    for t in targets:
        if t.exists() and not args.overwrite:
            raise cli.CLIError(
                f"-o: {t} exists already; add --overwrite to replace it, or choose another -o"
            )
    _outputs.check_writable(targets[0].parent, "-o")
    seg = cli.load_segmenter(args.model)
    tile = None
    if args.tile is not None:
        if args.tile < 16:
            raise cli.CLIError(f"--tile must be at least 16 pixels, not {args.tile}")
        tile = (
            [args.tile] * 2 if seg.ndim == 2 else [seg.model_config.tile_shape[0], *[args.tile] * 2]
        )
    show = cli._progress_enabled(args)
    t_start = time.perf_counter()
    for p, target in zip(paths, targets, strict=True):
        image, axes, scale = _read_input(p, args.axes)
        keep = [d for d, a in enumerate(axes) if a != "C"]
        laxes = "".join(axes[d] for d in keep)
        shape = tuple(int(image.shape[d]) for d in keep)
        lscale = None if scale is None else tuple(scale[d] for d in keep)
        label = p.name if len(p.name) <= 30 else p.name[:27] + "..."
        writer = oz.create_labels(
            target,
            shape,
            laxes,
            dtype="int32",
            scale=lscale,
            name=LABEL_NAME,
            image=image,
            image_axes=axes,
            image_scale=scale,
            overwrite=args.overwrite,
        )
        # an image that fits in memory is predicted whole, as from a TIFF (with the object-size
        # zoom, which the chunk-by-chunk path does not apply), then written
        whole = math.prod(shape) <= IN_MEMORY_PIXELS
        with writer:
            pred = cli._run_prediction(
                seg,
                image,
                axes,
                cli.ProgressBar(show, "tiles", label),
                device=args.device,
                tile_shape=tile,
                channel=args.channel,
                batch_size=args.batch_size,
                **({"return_probabilities": False} if whole else {"labels_out": writer.array}),
            )
            if whole:
                writer.array[...] = pred.labels
            writer.finish()
        print(
            f"{p.name}: {pred.seconds:.2f} s ({pred.device}) -> {target} "
            f"(labels/{LABEL_NAME}, OME-Zarr)",
            flush=True,
        )
    if len(paths) > 1:
        print(f"{len(paths)} images in {time.perf_counter() - t_start:.1f} s")
    return 0
