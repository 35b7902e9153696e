"""The command line's ecosystem commands: ``export``, ``import`` and ``predict`` on a cluster.

Kept apart from ``cli.py`` (which only registers them); like the rest of the command line it
imports neither napari nor Qt, and torch only inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "add_predict_options", "batch_wanted", "cmd_predict_batch"]


def _cli():
    from . import cli

    return cli


def _resolve_model(spec: str):
    """MODEL as in ``predict``, plus a bare registry NAME when no such path exists."""
    cli = _cli()
    if (
        not spec.startswith((cli._REGISTRY, cli._PRETRAINED))
        and spec != "new"
        and not Path(spec).expanduser().exists()
    ):
        name, version = cli._parse_registry_spec(spec)
        reg = cli.ModelRegistry()
        try:
            path = reg.path(name, version)
        except (ValueError, OSError):
            path = None
        if path is not None:
            from .segmenter import Segmenter

            return Segmenter.load(path)
    return cli.load_segmenter(spec)


# ============================================================================ export / import


def cmd_export(args: argparse.Namespace) -> int:
    from . import bioimageio

    cli = _cli()
    seg = _resolve_model(args.model)
    test_image, axes = None, args.axes
    if args.test_image:
        test_image, meta_axes = cli.read_tiff(args.test_image, "test image")
        axes = cli._image_axes(test_image, meta_axes, args.axes, Path(args.test_image))
    bar = cli.ProgressBar(cli._progress_enabled(args), "steps", "export")
    try:
        out = bioimageio.export_package(
            seg,
            args.output,
            test_image=test_image,
            axes=axes,
            overwrite=args.overwrite,
            torchscript=not args.no_torchscript,
            authors=args.author or None,
            license=args.license,
            progress=lambda done, total, what: bar.update(done, total, what),
        )
    finally:
        bar.close()
    size = out.stat().st_size / 2**20
    print(f"{out}: bioimage.io package of {seg.model_config.name!r} ({size:.1f} MiB)")
    print(f"check it with: bioimageio test {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import bioimageio

    cli = _cli()
    seg = bioimageio.import_package(args.package)
    target = args.output or f"{cli._REGISTRY}{args.name or seg.model_config.name or 'imported'}"
    if not target.startswith(cli._REGISTRY):
        cli._check_output_target(target)
    where = cli._save_segmenter(seg, target)
    print(f"{args.package}: imported {seg!r} -> {where}")
    return 0


# ============================================================================ predict on a cluster


def add_predict_options(p: argparse.ArgumentParser) -> None:
    """``--cluster``, ``--scheduler``, workers, Slurm options and ``--overwrite`` for predict."""
    g = p.add_argument_group("cluster (dask.distributed; see docs/cluster.md)")
    g.add_argument(
        "--cluster",
        choices=("auto", "none", "local", "slurm"),
        default="auto",
        help="where to run: 'local' (a LocalCluster of worker processes), 'slurm' "
        "(dask-jobqueue), 'none' (this process); 'auto' (default): local when there are "
        "several images and more than one core",
    )
    g.add_argument(
        "--scheduler", metavar="ADDRESS", help="join a running dask scheduler, e.g. tcp://HOST:8786"
    )
    g.add_argument("--workers", type=int, metavar="N", help="local workers / Slurm jobs")
    g.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        metavar="N",
        help="torch threads per worker (default: 1)",
    )
    g.add_argument("--queue", help="Slurm partition")
    g.add_argument("--cores", type=int, help="cores per Slurm job")
    g.add_argument("--memory", help="memory per Slurm job (e.g. 16GB) or per local worker")
    g.add_argument("--walltime", help="Slurm walltime (e.g. 01:00:00)")
    g.add_argument(
        "--scheduler-timeout", type=float, default=10.0, metavar="S", help=argparse.SUPPRESS
    )
    if not any("--overwrite" in a.option_strings for a in p._actions):
        p.add_argument(
            "--overwrite", action="store_true", help="replace existing results in OUTDIR"
        )


def batch_wanted(args: argparse.Namespace, n_images: int) -> bool:
    if getattr(args, "scheduler", None):
        return True
    mode = getattr(args, "cluster", "none")
    if mode in ("local", "slurm"):
        return True
    if mode == "auto":
        return n_images > 1 and (os.cpu_count() or 1) > 1 and not args.probabilities
    return False


def cmd_predict_batch(args: argparse.Namespace, paths: list[Path]) -> int:
    from . import batch

    cli = _cli()
    if args.probabilities:
        raise cli.CLIError("--probabilities is not available on a cluster; use --cluster none")
    seg = cli.load_segmenter(args.model)
    mode = "local" if args.cluster in ("auto", "none") else args.cluster
    kwargs: dict[str, Any] = {"device": args.device, "channel": args.channel}
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.tile is not None:
        if args.tile < 16:
            raise cli.CLIError(f"--tile must be at least 16 pixels, not {args.tile}")
        t = args.tile
        kwargs["tile_shape"] = [t, t] if seg.ndim == 2 else [seg.model_config.tile_shape[0], t, t]
    slurm = {
        "queue": args.queue,
        "cores": args.cores,
        "memory": args.memory,
        "walltime": args.walltime,
        "jobs": args.workers,
    }
    per_core = max(1, (os.cpu_count() or 2) // max(1, args.threads_per_worker))
    n_workers = args.workers or min(len(paths), per_core)
    t0 = time.perf_counter()
    with batch.connect(
        args.scheduler,
        cluster=mode,
        n_workers=n_workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory if mode == "local" else None,
        slurm=slurm,
        timeout=args.scheduler_timeout,
    ) as client:
        where = args.scheduler or f"a {mode} cluster"
        workers = len(client.scheduler_info().get("workers", {}))
        print(f"predicting {len(paths)} image(s) on {where} ({workers} worker(s))", flush=True)
        bar = cli.ProgressBar(cli._progress_enabled(args), "images", "cluster")
        try:
            res = batch.predict_files(
                seg,
                paths,
                args.output,
                client=client,
                axes=args.axes,
                overwrite=args.overwrite,
                threads_per_worker=args.threads_per_worker,
                progress=lambda d, t, name: bar.update(d, t, name),
                **kwargs,
            )
        finally:
            bar.close()
    for name, summary in sorted(res.summaries.items()):
        print(f"{name}: {summary}")
    for p in res.skipped:
        print(
            f"{p.name}: skipped, {batch.output_path(Path(args.output), p).name} exists "
            "(--overwrite replaces it)"
        )
    for p, why in res.failed.items():
        print(f"{cli.PROG}: error: {p} failed twice and was skipped: {why}", file=sys.stderr)
    print(
        f"{len(res.written)} written, {len(res.skipped)} skipped, {len(res.failed)} failed in "
        f"{time.perf_counter() - t0:.1f} s; results in {Path(args.output).expanduser()}"
    )
    return 2 if res.failed else 0


# ============================================================================ registration


def add_commands(sub: Any, model_help: str) -> None:
    """Register ``export`` and ``import`` on the command line's subparsers."""
    p = sub.add_parser(
        "export",
        help="export a model as a bioimage.io package (.zip)",
        description="Write a bioimage.io model package (spec 0.5) that 'bioimageio test' "
        "passes and that 'napari-unet import' reads back exactly.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help + "; or a registry NAME")
    p.add_argument("output", metavar="OUT.zip", help="the package to write")
    p.add_argument(
        "--test-image",
        metavar="TIFF",
        help="image for the test tensors and the cover (default: a generated nuclei image, "
        "1-channel models only)",
    )
    p.add_argument("--axes", help="axes of the test image, e.g. YX, CYX, ZYX")
    p.add_argument("--author", action="append", metavar="NAME", help="an author (repeatable)")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX license id (CC-BY-4.0)")
    p.add_argument("--no-torchscript", action="store_true", help="only pytorch_state_dict weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zip")
    p.add_argument("--progress", action="store_true", help="progress bar even without a terminal")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="import a bioimage.io package into the model registry",
        description="Read a bioimage.io package made by napari-unet (or one whose "
        "architecture maps onto napari-unet's UNet) and save it as a napari-unet model.",
    )
    p.add_argument("package", metavar="PACKAGE", help="the .zip package (or its folder)")
    p.add_argument("--name", help="registry name (default: the model's name)")
    p.add_argument(
        "-o", "--output", metavar="TARGET", help="a folder, .safetensors file or registry:NAME"
    )
    p.set_defaults(func=cmd_import)
