"""Overhead of napari_unet.tiling.predict_tiled over calling the predictor on bare tiles.

Runs a 2048x2048 single-channel image through ``predict_tiled`` with a cheap numpy predictor
and compares with the same predictor applied to non-overlapping tiles (no reading, padding,
blending or accumulation). The difference is what tiling itself costs.

Usage::

    python benchmarks/bench_tiling_overhead.py [--size 2048] [--tile 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from napari_unet.tiling import plan_tiles, predict_tiled


def cheap_predictor(batch: np.ndarray) -> np.ndarray:
    """A few elementwise ops standing in for a network: ``(B, 1, *t) -> (B, 2, *t)``."""
    fg = batch[:, :1] * 0.5 + 0.25
    return np.concatenate([fg, 1.0 - fg], axis=1)


def bare(image: np.ndarray, tile: int, batch_size: int) -> np.ndarray:
    """Predictor over non-overlapping tiles (image size a multiple of ``tile``)."""
    _, h, w = image.shape
    out = np.empty((2, h, w), dtype=np.float32)
    starts = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        batch = np.stack([image[:, y : y + tile, x : x + tile] for y, x in chunk])
        pred = cheap_predictor(batch)
        for p, (y, x) in zip(pred, chunk, strict=True):
            out[:, y : y + tile, x : x + tile] = p
    return out


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.random((1, args.size, args.size), dtype=np.float32)
    n_pix = args.size * args.size

    rows = [
        (
            "bare, no overlap",
            len(plan_tiles((args.size,) * 2, args.tile, 0, 16)),
            best_of(lambda: bare(image, args.tile, args.batch), args.repeats),
        )
    ]
    for overlap in (0, 32, 64):
        n_tiles = len(plan_tiles((args.size,) * 2, args.tile, overlap, 16))
        seconds = best_of(
            lambda overlap=overlap: predict_tiled(
                cheap_predictor,
                image,
                out_channels=2,
                tile_shape=args.tile,
                overlap=overlap,
                batch_size=args.batch,
                divisor=16,
            ),
            args.repeats,
        )
        rows.append((f"predict_tiled, overlap {overlap}", n_tiles, seconds))

    try:
        import dask.array as da

        lazy = da.from_array(image, chunks=(1, 512, 512))
        n_tiles = len(plan_tiles((args.size,) * 2, args.tile, 32, 16))
        seconds = best_of(
            lambda: predict_tiled(
                cheap_predictor,
                lazy,
                out_channels=2,
                tile_shape=args.tile,
                overlap=32,
                batch_size=args.batch,
                divisor=16,
            ),
            args.repeats,
        )
        rows.append(("predict_tiled, overlap 32, dask", n_tiles, seconds))
    except ImportError:
        pass

    base = rows[0][2]
    print(
        f"image {args.size}x{args.size}, tile {args.tile}, batch {args.batch}, "
        f"best of {args.repeats}"
    )
    print(f"{'method':<34}{'tiles':>6}{'time [ms]':>11}{'ns/pixel':>10}{'x bare':>8}")
    for name, n_tiles, seconds in rows:
        print(
            f"{name:<34}{n_tiles:>6}{seconds * 1e3:>11.1f}{seconds / n_pix * 1e9:>10.1f}"
            f"{seconds / base:>8.2f}"
        )


if __name__ == "__main__":
    main()
