"""``python -m napari_unet``: napari with the plugin's widgets and a sample image, or, on a
machine without a display, the headless demo (``napari-unet demo``)."""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m napari_unet [--headless] [DEMO OPTIONS]

Opens napari with the napari-unet widgets and a sample image. Without a display (or with
--headless) it runs the headless demo instead: `napari-unet demo --help` lists its options.
Every command of the plugin (predict, train, evaluate, export ...): `napari-unet --help`."""


def _has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):  # was the demo's help alone, without a display
        print(USAGE)
        return 0
    if "--headless" in argv or not _has_display():
        from .cli import main as cli_main

        argv = [a for a in argv if a != "--headless"]
        print("no display found: running the headless demo (napari-unet demo)", file=sys.stderr)
        return cli_main(["demo", *argv])
    from ._widgets._launch import launch

    return launch()


if __name__ == "__main__":
    sys.exit(main())
