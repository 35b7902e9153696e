"""3D human-in-the-loop: F1 of 3D objects against the number of corrected Z slices.

    python benchmarks/hitl_3d.py            # full run (~5 min on 1 CPU thread)
    python benchmarks/hitl_3d.py --quick    # smoke run

A generated anisotropic volume with exact 3D labels (32 x 128 x 128, z spacing 2x the xy
spacing) is the working volume; two more volumes are held out. Round k: the annotator corrects
``--per-round`` more Z slices (inside them the labels become the truth; every other voxel is
ignored by the loss through ``masks=``), the model fine-tunes for a fixed time, and the 3D
instance F1@0.5 and AP@0.5:0.95 are measured on the held-out volumes.

Runs compared:

* ``2D starter, spaced``: the shipped 2D starter predicts slice by slice (the segmenter links
  the slices into 3D objects); slices are picked spread out (middle, then quarters, ...).
* ``2D starter, guided``: the same, slices picked by
  :func:`napari_unet.uncertainty.rank_regions` on the current model's uncertainty map.
* ``3D scratch, spaced``: a 3D U-Net (``Segmenter.new(ndim=3)``) from scratch, same slices.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque

import numpy as np
import torch

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.metrics import average_precision, instance_f1
from napari_unet.uncertainty import rank_regions, uncertainty_map

DOMAIN = {"snr": 5.0, "touching": 0.5, "radius": (5.0, 12.0), "anisotropy": 2.0}


def spaced(n: int) -> list[int]:
    """Slice indices 0..n-1, spread out: the middle first, then the quarters, and so on."""
    order: list[int] = []
    parts = 2
    while len(order) < n:
        for z in (n * j // parts for j in range(1, parts, 2)):
            if z not in order:
                order.append(z)
        parts *= 2
        if parts > 4 * n:
            order += [z for z in range(n) if z not in order]
    return order


def score(seg: nu.Segmenter, test, threads: int) -> tuple[float, float]:
    f1, ap = [], []
    for vol, lab in test:
        pred = seg.predict(vol, "ZYX", num_threads=threads).labels
        f1.append(instance_f1(pred, lab))
        ap.append(average_precision(pred, lab)[0])
    return float(np.mean(f1)), float(np.mean(ap))


def run(seg, vol, truth, test, label, order, rounds, per_round, seconds, threads) -> list[dict]:
    mask = np.zeros(truth.shape, bool)
    chosen: list[int] = []
    f1, ap = score(seg, test, threads)
    rows = [dict(run=label, round=0, slices=0, f1=f1, ap=ap, train_s=0.0, s=0.0, picked=[])]
    train_s = 0.0
    print(f"  {label:>20} round 0: slices  0  3D F1 {f1:.3f}  AP {ap:.3f}", flush=True)
    for k in range(1, rounds + 1):
        t0 = time.perf_counter()
        if order == "guided":
            u = uncertainty_map(seg, vol, "ZYX", num_threads=threads)
            ranked = rank_regions(u, exclude=mask)  # whole Z slices, most uncertain first
            new = [r.index[0] for r in ranked[:per_round]]
        else:
            new = [z for z in spaced(truth.shape[0]) if z not in chosen][:per_round]
        chosen += new
        mask[new] = True
        labels = np.where(mask, truth, 0)
        gen = seg.finetune(
            vol, labels, mask, axes="ZYX", time_limit_s=seconds, seed=k, num_threads=threads
        )
        last = deque(gen, maxlen=1)[0]
        train_s += last.seconds
        f1, ap = score(seg, test, threads)
        s = time.perf_counter() - t0
        rows.append(
            dict(
                run=label,
                round=k,
                slices=len(chosen),
                f1=f1,
                ap=ap,
                train_s=train_s,
                s=s,
                picked=sorted(new),
            )
        )
        print(
            f"  {label:>20} round {k}: slices {len(chosen):2d} (+{sorted(new)})  3D F1 {f1:.3f}  "
            f"AP {ap:.3f}  ({last.step} steps, {s:.1f} s/round)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 128, 128], metavar=("Z", "Y", "X"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=1, help="Z slices corrected per round")
    ap.add_argument("--seconds", type=float, default=20.0, help="fine-tuning per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-3d", action="store_true", help="skip the 3D network from scratch")
    ap.add_argument("--seed", type=int, default=0, help="another working/held-out volume set")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.rounds, args.seconds = [16, 64, 64], 2, 3.0
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    print(
        f"load average {np.round(os.getloadavg(), 2).tolist()}, torch threads {args.threads}; "
        f"volume {shape} {DOMAIN}; {args.rounds} rounds x {args.per_round} slice(s), "
        f"{args.seconds:.0f} s fine-tuning per round"
    )
    vol, truth = make_nuclei(shape, seed=4242 + args.seed, **DOMAIN)
    test = [make_nuclei(shape, seed=60_000 + 10 * args.seed + i, **DOMAIN) for i in range(2)]
    print(
        f"working volume: {int(truth.max())} objects; held out: {[int(t.max()) for _, t in test]}"
    )

    common = (vol, truth, test)
    opts = (args.rounds, args.per_round, args.seconds, args.threads)
    rows = []
    rows += run(nu.Segmenter.pretrained("nuclei"), *common, "2D starter, spaced", "spaced", *opts)
    rows += run(nu.Segmenter.pretrained("nuclei"), *common, "2D starter, guided", "guided", *opts)
    if not args.no_3d:
        seg3 = nu.Segmenter.new(ndim=3, seed=0, name="3d")
        rows += run(seg3, *common, "3D scratch, spaced", "spaced", *opts)

    print()
    print(
        "| model, slice order | round | corrected slices | 3D F1@0.5 | AP@0.5:0.95 "
        "| fine-tuning s (total) | s / round |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['round']} | {r['slices']} of {shape[0]} | {r['f1']:.3f} | "
            f"{r['ap']:.3f} | {r['train_s']:.0f} | {r['s']:.1f} |"
        )


if __name__ == "__main__":
    main()
