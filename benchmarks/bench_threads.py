"""Training steps per second by torch thread count, on an idle CPU and under load.

Fine-tunes the starter model on a generated 256x256 image for a fixed number of steps with
1..N threads, first alone, then with ``--load K`` busy processes (pure Python spin loops, the
way another program competes for the cores). Prints one table; not a test.

    python benchmarks/bench_threads.py --steps 12 --load 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _spin(stop) -> None:  # a busy competitor
    x = 0
    while not stop.is_set():
        x += 1


def _steps_per_s(seg, image, labels, threads: int, steps: int) -> float:
    last = None
    t0 = time.perf_counter()
    for ev in seg.finetune(
        image, labels, axes="YX", steps=steps, time_limit_s=None, val_fraction=0.0,
        num_threads=threads, seed=0,
    ):
        last = ev
    wall = time.perf_counter() - t0
    return last.step / max(last.seconds, 1e-9), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--load", type=int, default=1, help="busy processes in the loaded runs")
    args = ap.parse_args()
    import numpy as np

    import napari_unet as nu
    from napari_unet.data import make_nuclei

    image, labels = make_nuclei((256, 256), seed=0)
    cores = os.cpu_count() or 1
    rows = []
    for load in (0, args.load):
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,)) for _ in range(load)]
        for p in procs:
            p.start()
        try:
            for threads in range(1, cores + 1):
                seg = nu.Segmenter.pretrained("nuclei")
                _steps_per_s(seg, image, labels, threads, 2)  # warm-up
                sps, wall = _steps_per_s(seg, image, labels, threads, args.steps)
                rows.append((load, threads, sps, os.getloadavg()[0]))
                print(f"load {load}  threads {threads}  {sps:.2f} steps/s", flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join()
    print(f"\n{cores} cores, {args.steps} steps of batch 8 x 64x64, starter model")
    print("busy procs | threads | steps/s | loadavg(1 min)")
    for load, threads, sps, la in rows:
        print(f"{load:>10} | {threads:>7} | {sps:7.2f} | {la:.2f}")
    _ = np


if __name__ == "__main__":
    main()
