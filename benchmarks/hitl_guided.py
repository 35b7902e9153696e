"""Where to correct next: uncertainty-guided vs. reading-order corrections, same object budget.

    python benchmarks/hitl_guided.py            # full run (~8 min on 1 CPU thread)
    python benchmarks/hitl_guided.py --quick    # smoke run

A simulated annotator as in ``benchmarks/hitl.py`` (same domains, working image, held-out images
and scores, imported from there). Each round the annotator may correct the same number of
objects (``--budget``, per domain) and walks the 128x128 regions of the working image in one of
two orders:

* reading order (rows, then columns), as in ``hitl.py``;
* guided: the order of :func:`napari_unet.uncertainty.rank_regions` on the current model's
  :func:`~napari_unet.uncertainty.uncertainty_map` (8 flips/rotations), recomputed every round.

In a region the annotator fixes every wrong object (truth objects the prediction missed or got
wrong at IoU 0.5, and false objects): the region is then trusted as a whole (mask = region). When
the budget ends inside a region, only the objects fixed so far are trusted (mask = their
footprints, two pixels around the truth and the wrong prediction). Objects already fixed are not
counted again. The model fine-tunes for a fixed time on the trusted pixels only; F1@0.5 and
AP@0.5:0.95 are measured on held-out images. Both orders start from the shipped starter model,
use the same seeds and the same fine-tuning time, and correct the same number of objects.
Prints a markdown table and writes ``docs/images/hitl_guided.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hitl import DOMAINS, REGION, heldout, regions, score  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.metrics import match_instances  # noqa: E402
from napari_unet.uncertainty import rank_regions, uncertainty_map  # noqa: E402

BUDGET = {"default": 4, "blurry": 20}  # objects per round: ~half / ~a quarter of the errors


def wrong_objects(pred: np.ndarray, truth: np.ndarray, region) -> list[np.ndarray]:
    """Footprints (bool, region-sized) of the objects to fix in ``region``, in reading order."""
    p, t = pred[region], truth[region]
    m = match_instances(p, t, iou_threshold=0.5)
    missed = np.setdiff1d(np.unique(t[t > 0]), m.pairs[:, 1])
    false = np.setdiff1d(np.unique(p[p > 0]), m.pairs[:, 0])
    out = []
    for obj in missed:
        own = t == obj
        out.append(own | np.isin(p, np.unique(p[own & (p > 0)])))
    out += [p == obj for obj in false]
    out = [ndi.binary_dilation(f, iterations=2) for f in out]
    return sorted(out, key=lambda f: tuple(np.argwhere(f)[0]))


def correct(pred, truth, mask, order, budget: int) -> tuple[int, int]:
    """Review ``order``'s regions until ``budget`` objects are fixed; updates ``mask``."""
    spent = reviewed = 0
    for reg in order:
        if spent >= budget:
            break
        if mask[reg].all():
            continue
        todo = [f for f in wrong_objects(pred, truth, reg) if not mask[reg][f].all()]
        if spent + len(todo) <= budget:
            mask[reg] = True
            spent += len(todo)
            reviewed += 1
            continue
        sub = mask[reg]
        for f in todo[: budget - spent]:
            sub |= f
        mask[reg] = sub
        spent = budget
    return spent, reviewed


def run(seg, image, truth, test, order: str, rounds, budget, seconds, threads) -> list[dict]:
    mask = np.zeros(truth.shape, bool)
    f1, ap = score(seg, test)
    rows = [dict(order=order, round=0, objects=0, regions=0, pixels=0.0, f1=f1, ap=ap, s=0.0)]
    objects = reviewed = 0
    for k in range(1, rounds + 1):
        t0 = time.perf_counter()
        pred = seg.predict(image, num_threads=threads).labels
        if order == "guided":
            u = uncertainty_map(seg, image, num_threads=threads)
            ranked = rank_regions(u, (REGION, REGION), labels=pred, exclude=mask)
            regs = [r.slices for r in ranked]
        else:
            regs = regions(truth.shape)
        t_rank = time.perf_counter() - t0
        spent, n = correct(pred, truth, mask, regs, budget)
        objects += spent
        reviewed += n
        labels = np.where(mask, truth, 0)
        gen = seg.finetune(image, labels, mask, time_limit_s=seconds, seed=k, num_threads=threads)
        deque(gen, maxlen=1)
        f1, ap = score(seg, test)
        s = time.perf_counter() - t0
        rows.append(
            dict(
                order=order,
                round=k,
                objects=objects,
                regions=reviewed,
                pixels=100 * mask.mean(),
                f1=f1,
                ap=ap,
                s=s,
            )
        )
        print(
            f"  {order:>8} round {k}: objects {objects:3d}  full regions {reviewed:2d}  "
            f"pixels {100 * mask.mean():4.1f} %  F1 {f1:.3f}  AP {ap:.3f}  "
            f"({s:.1f} s/round, ranking {t_rank:.1f} s)",
            flush=True,
        )
    return rows


def plot(rows: list[dict], domains: list[str], seconds: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axs = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.8), dpi=120)
    for ax, name in zip(np.atleast_1d(axs), domains, strict=True):
        for order, style in (("reading", "s--"), ("guided", "o-")):
            rs = [r for r in rows if r["domain"] == name and r["order"] == order]
            ax.plot([r["objects"] for r in rs], [r["f1"] for r in rs], style, label=order)
        ax.set_title(f"domain '{name}'")
        ax.set_xlabel("objects corrected (cumulative)")
        ax.set_ylabel("F1 @ IoU 0.5, held-out images")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(
        f"Uncertainty-guided vs. reading order: starter model, {seconds:.0f} s "
        "fine-tuning per round (CPU)"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print("wrote", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="fine-tuning per round")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--domains", nargs="+", choices=sorted(DOMAINS), default=["blurry", "default"])
    ap.add_argument("--budget", type=int, default=None, help="objects per round (all domains)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default=None, help="default docs/images/hitl_guided.png")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.size = 2, 3.0, 256
    if args.plot is None:  # a smoke run does not overwrite the documented figure
        args.plot = "/tmp/hitl_guided_quick.png" if args.quick else "docs/images/hitl_guided.png"
    torch.set_num_threads(args.threads)
    print(
        f"load average {np.round(os.getloadavg(), 2).tolist()}, torch threads {args.threads}, "
        f"{args.rounds} rounds x {args.seconds:.0f} s fine-tuning, image {args.size}^2"
    )

    rows = []
    for name in args.domains:
        domain = DOMAINS[name]
        budget = args.budget or BUDGET[name]
        image, truth = make_nuclei((args.size, args.size), seed=4242, **domain)
        test = heldout(3, 256, domain)
        print(f"domain {name}: {domain}, {budget} objects per round")
        for order in ("reading", "guided"):
            seg = nu.Segmenter.pretrained("nuclei")
            for r in run(
                seg, image, truth, test, order, args.rounds, budget, args.seconds, args.threads
            ):
                rows.append({"domain": name, **r})

    print()
    print(
        "| domain | order | round | objects corrected | full regions | pixels trusted % "
        "| F1@0.5 | AP@0.5:0.95 | s / round |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['domain']} | {r['order']} | {r['round']} | {r['objects']} | {r['regions']} | "
            f"{r['pixels']:.1f} | {r['f1']:.3f} | {r['ap']:.3f} | {r['s']:.1f} |"
        )

    plot(rows, args.domains, args.seconds, args.plot)


if __name__ == "__main__":
    main()
