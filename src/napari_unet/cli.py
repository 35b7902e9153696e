"""Command-line interface: ``napari-unet predict | train | evaluate | demo | models``.

This is the headless entry point: it imports neither napari, Qt nor magicgui, so it runs on a
server or a cluster node without a display. torch is imported only by the subcommands that
need it, so ``napari-unet --version`` and ``napari-unet models list`` start quickly.

Every subcommand returns an exit code: 0 on success, 2 for a usage or data error (missing file,
bad axes, shapes that do not match, a corrupt model file ...; the message is printed as
``napari-unet: error: <message>`` without a traceback) and 130 when interrupted with Ctrl-C
(except ``train``, where Ctrl-C is the normal way to stop early: the model is saved, exit 0).

See ``docs/cli.md`` for a worked example of every subcommand.

The commands live apart (one module each, the Python names of before kept here):
:mod:`._cli_common` (what they share: errors, TIFF files, MODEL arguments, progress bars),
:mod:`._cli_predict`, :mod:`._cli_train`, :mod:`._cli_demo`, :mod:`._cli_models` (evaluate and
the registry), :mod:`._cli_ecosystem` (export, import, a cluster) and :mod:`._cli_omezarr`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, _cli_demo, _cli_ecosystem, _cli_models, _cli_predict, _cli_train
from ._cli_common import (  # noqa: F401 - the names of before the split
    _MODEL_HELP,
    _PRETRAINED,
    _REGISTRY,
    _TIFF_SUFFIXES,
    PROG,
    CLIError,
    ProgressBar,
    _check_file,
    _check_output_target,
    _check_overwrite,
    _err,
    _fmt,
    _image_axes,
    _label_dtype,
    _message,
    _model_words,
    _no_model_message,
    _non_negative_float,
    _parse_registry_spec,
    _positive_int,
    _progress_enabled,
    _save_segmenter,
    _stem,
    _table,
    _threads_words,
    _warn,
    cli_words,
    load_segmenter,
    read_tiff,
    starter_names,
    write_tiff,
)
from ._cli_demo import cmd_demo  # noqa: F401
from ._cli_models import _short_list, cmd_evaluate, cmd_models  # noqa: F401
from ._cli_predict import _describe, _run_prediction, cmd_predict  # noqa: F401
from ._cli_train import _load_monitor, _load_training_data, cmd_train  # noqa: F401
from .store import ModelRegistry  # noqa: F401 - cli.ModelRegistry (the ecosystem commands)

__all__ = ["main", "build_parser", "load_segmenter", "read_tiff", "ProgressBar"]


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
    _cli_predict.add_parser(sub)
    _cli_train.add_parser(sub)
    _cli_models.add_evaluate_parser(sub)
    _cli_demo.add_parser(sub)
    _cli_models.add_models_parser(sub)
    _cli_ecosystem.add_commands(sub, _MODEL_HELP)  # export, import (bioimage.io)
    return parser


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
