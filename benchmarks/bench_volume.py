"""Huge lazy inputs: a volume predicted into a zarr store, and field-of-view latency.

Command (full run, about 10 minutes on 2 idle cores)::

    python benchmarks/bench_volume.py

Smoke run (under a minute)::

    python benchmarks/bench_volume.py --quick

Options: ``--size N`` and ``--depth D`` (part a volume: D x N x N), ``--fov-size N`` (part b
image: N x N), ``--crops 1024,512``, ``--parts ab``, ``--threads N``, ``--tile T`` (part a tile
side; default: the smallest multiple of 16 covering N with tiles 1024 apart overlapping by 32).

Parts
-----
a. A ``depth x size x size`` uint16 volume as a dask array (blocks of 8 x 512 x 512, each one
   of four ``make_nuclei`` volumes rendered beforehand, so the array is lazy and cheap to read),
   predicted slice by slice with the default model ``Segmenter.pretrained("nuclei")`` into a
   zarr store on disk (``labels_out=``, chunks 1 x 1024 x 1024). Reported: wall time,
   throughput, peak RSS minus the RSS before the call (5 ms sampling thread), blocks read
   (each block once is the goal), and the bare network forward over the same voxels in the
   same run: the same model in ``torch.inference_mode``, channels_last, 1024 x 1024
   non-overlapping tiles, batch 1 (predict's CPU default for tiles over 512 x 512), inputs
   prepared beforehand, no softmax, no stitching, no post-processing. Goals: peak within
   1 GB; (predict - post-processing) / bare <= 1.3.
b. Field-of-view latency on a ``fov-size x fov-size`` lazy (dask, 1024 x 1024 blocks) image:
   ``seg.predict(image[y:y+s, x:x+s])`` for crops of side ``s`` at a location that straddles
   block borders: lazy read + normalisation + network + post-processing. Median of 3 after
   one warm-up call.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import Contention, MiB, PeakRSS, header, rss, say_load, settle, table  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402


def lazy_volume(depth: int, size: int, block=(8, 512, 512)):
    """A dask uint16 volume whose blocks are four pre-rendered make_nuclei volumes."""
    import dask.array as da

    bases = [make_nuclei(block, seed=s, anisotropy=2.0)[0] for s in range(4)]

    def fill(block_info=None):
        info = block_info[None]
        loc = info["chunk-location"]
        (z0, z1), (y0, y1), (x0, x1) = info["array-location"]
        base = bases[(loc[0] * 7 + loc[1] * 3 + loc[2]) % len(bases)]
        return base[: z1 - z0, : y1 - y0, : x1 - x0]

    chunks = tuple(min(b, n) for b, n in zip(block, (depth, size, size), strict=True))
    return da.map_blocks(
        fill, dtype=np.uint16, chunks=da.core.normalize_chunks(chunks, (depth, size, size))
    )


def lazy_plane(size: int, block: int = 1024):
    import dask.array as da

    bases = [make_nuclei((block, block), seed=s)[0] for s in range(4)]

    def fill(block_info=None):
        info = block_info[None]
        loc = info["chunk-location"]
        (y0, y1), (x0, x1) = info["array-location"]
        return bases[(loc[0] * 3 + loc[1]) % len(bases)][: y1 - y0, : x1 - x0]

    return da.map_blocks(
        fill, dtype=np.uint16, chunks=da.core.normalize_chunks((block, block), (size, size))
    )


class CountingArray:
    """Wraps a dask array; counts the blocks computed through it (one ``__getitem__`` each)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.chunks = arr.chunksize
        self.reads = 0

    def __getitem__(self, key):
        out = np.asarray(self.arr[key])
        if out.size:
            self.reads += 1
        return out


def bare_forward(seg, planes: int, size: int, tile: int = 1024, batch: int = 1) -> float:
    """Seconds of the bare network over ``planes`` planes of ``size^2`` in ``tile^2`` tiles."""
    net = seg.net.eval().to("cpu").to(memory_format=torch.channels_last)
    per_plane = math.ceil(size / tile) ** 2
    n_tiles = planes * per_plane
    side = min(tile, size)
    x = torch.rand(batch, 1, side, side).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(x[:1])  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n_tiles:
            b = min(batch, n_tiles - done)
            net(x[:b])
            done += b
        return time.perf_counter() - t0


def part_a(seg, depth: int, size: int, tile: int | None) -> list[list]:
    import zarr

    if tile is None:
        n = math.ceil(size / 1024)
        tile = 16 * math.ceil((size + (n - 1) * 32) / n / 16)
    vol = CountingArray(lazy_volume(depth, size))
    n_blocks = math.prod(len(c) for c in vol.arr.chunks)
    voxels = depth * size * size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = zarr.open_array(
            Path(tmp) / "labels.zarr",
            mode="w",
            shape=(depth, size, size),
            chunks=(1, min(size, 1024), min(size, 1024)),
            dtype="int32",
        )
        settle()
        base = rss()
        say_load(f"predict {depth}x{size}x{size} into zarr (tile {tile})")
        with PeakRSS() as peak, Contention() as c:
            t0 = time.perf_counter()
            pred = seg.predict(
                vol, axes="ZYX", device="cpu", labels_out=out, tile_shape=(tile, tile)
            )
            wall = time.perf_counter() - t0
        n_obj = int(out[depth // 2].max())
        rows.append(
            [
                f"predict -> zarr ({depth}x{size}x{size}, tile {tile})",
                wall,
                voxels / wall / 1e6,
                pred.postprocess_seconds,
                (peak.peak - base) / MiB,
                f"{vol.reads}/{n_blocks}",
                100 * c.others,
            ]
        )
        print(f"  ids up to {n_obj} in the middle slice; notes: {pred.notes or 'none'}")
    say_load("bare network forward over the same voxels")
    with Contention() as c:
        bare = bare_forward(seg, depth, size)
    rows.append(
        ["bare forward (1024^2 tiles, batch 1)", bare, voxels / bare / 1e6, None, None, None]
        + [100 * c.others]
    )
    ratio = (wall - pred.postprocess_seconds) / bare
    print(f"  (predict - post-processing) / bare = {ratio:.2f}; predict / bare = {wall / bare:.2f}")
    return rows


def part_b(seg, fov: int, crops: list[int]) -> list[list]:
    img = lazy_plane(fov)
    rows = []
    for s in crops:
        y, x = fov // 2 - s // 2 + 300, fov // 2 - s // 2 + 500  # straddles block borders
        tile = (16 * math.ceil(s / 16),) * 2

        def once(y=y, x=x, s=s, tile=tile):
            t0 = time.perf_counter()
            crop = img[y : y + s, x : x + s]
            pred = seg.predict(crop, axes="YX", device="cpu", tile_shape=tile)
            return time.perf_counter() - t0, pred

        once()  # warm-up
        say_load(f"field of view {s}x{s} of {fov}x{fov}")
        times, pps = [], []
        with Contention() as c:
            for _ in range(3):
                dt, pred = once()
                times.append(dt)
                pps.append(pred.postprocess_seconds)
        rows.append(
            [
                f"{s}x{s} at ({y}, {x}) of {fov}x{fov}",
                1000 * statistics.median(times),
                1000 * statistics.median(pps),
                int(pred.labels.max()),
                100 * c.others,
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024x8 volume, 4096^2 image")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--fov-size", type=int, default=None)
    ap.add_argument("--crops", default="1024,512")
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tile", type=int, default=None)
    args = ap.parse_args(argv)
    size = args.size or (1024 if args.quick else 2048)
    depth = args.depth or (8 if args.quick else 64)
    fov = args.fov_size or (4096 if args.quick else 16384)
    if args.threads:
        torch.set_num_threads(args.threads)
    header(
        "bench_volume: huge lazy inputs", ["benchmarks/bench_volume.py", *(argv or sys.argv[1:])]
    )
    seg = nu.Segmenter.pretrained("nuclei")
    if "a" in args.parts:
        rows = part_a(seg, depth, size, args.tile)
        print(
            table(
                [
                    "run",
                    "seconds",
                    "Mvoxel/s",
                    "post-proc s",
                    "peak RSS MiB",
                    "blocks read",
                    "others %",
                ],
                rows,
                title="a. volume predicted slice by slice into a zarr store",
            )
        )
    if "b" in args.parts:
        rows = part_b(seg, fov, [int(c) for c in args.crops.split(",")])
        print(
            table(
                ["field of view", "latency ms", "post-proc ms", "objects", "others %"],
                rows,
                title="b. field-of-view prediction on a lazy image (median of 3)",
            )
        )


if __name__ == "__main__":
    main()
