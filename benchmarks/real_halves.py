"""Real 2D images the model never saw: correct the top half, score the bottom half.

    python benchmarks/real_halves.py ../shared/data/real/dsb2018-stage1-fluo --skip 6
    python benchmarks/real_halves.py FOLDER --min-objects 20 --rounds 6 --model PATH

What a lab does with its first image: the starter predicts, the user corrects part of the
image, trains, and looks at the rest. For every image of FOLDER (``images/NAME.tif`` +
``masks/NAME.tif``, 2D, sorted by name; the first ``--skip`` are left out, e.g. the starter's
own training images) with at least ``--min-objects`` objects:

* the halves: the top (Y < H/2) and the bottom; an object belongs to the half that holds its
  centroid; only the bottom half's objects (true and predicted) are scored, F1 at IoU 0.5;
  training sees the top half less every pixel of a scored object, so no scored object is ever
  trained on;
* ``starter``: the untouched model, bottom half;
* ``fine-tune N s``: the top half, fully corrected (truth, masked as above), ``--seconds``
  (default 15 and 60) from the starter;
* ``annotator``: a corrected square that grows round by round at the middle of the top half
  (truth inside, the model's current prediction outside and masked out), each round fine-tuning
  the previous round's model ``--round-seconds``; the corrected objects are the true objects of
  the square the prediction got wrong, counted over the rounds (as an annotator would fix
  them).

Pooled over the images: F1 from the summed TP / FP / FN. The load of the machine is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, load_model, machine_line  # noqa: E402
from real import finetune, load  # noqa: E402
from real_3d import centroid_half  # noqa: E402

from napari_unet.metrics import match_instances  # noqa: E402

#: the annotator's square, as a fraction of the top half's height, round by round
SIDES = (0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.0, 1.0)


def bottom_ids(labels: np.ndarray, half: int) -> np.ndarray:
    """Bool per id: its centroid lies in the bottom half (Y >= half)."""
    return centroid_half(labels[None], half)  # the 3D rule, on a volume of one plane


def bottom(labels: np.ndarray, half: int) -> np.ndarray:
    return np.where(bottom_ids(labels, half)[labels], labels, 0)


def counts(pred: np.ndarray, gt: np.ndarray, half: int) -> tuple[int, int, int]:
    m = match_instances(bottom(pred, half), bottom(gt, half), iou_threshold=0.5)
    return int(m.tp), int(m.fp), int(m.fn)


def f1(c) -> float:
    tp, fp, fn = c
    return 2 * tp / max(2 * tp + fp + fn, 1)


def tune(seg, img, lab, mask, seconds, threads):
    s = seg.copy()
    return s, finetune(s, img, lab, mask, seconds, threads)


def square(shape, half: int, frac: float) -> tuple[slice, slice]:
    """A square of side ``frac * half`` centred in the top half (clipped to it)."""
    side = max(8, int(round(frac * half)))
    cy, cx = half // 2, shape[1] // 2
    y0 = max(0, cy - side // 2)
    x0 = max(0, cx - side // 2)
    return slice(y0, min(half, y0 + side)), slice(x0, min(shape[1], x0 + side))


def wrong_in(pred: np.ndarray, gt: np.ndarray, sl) -> set[int]:
    """True ids inside ``sl`` that the prediction does not match at IoU 0.5 (whole objects)."""
    ids = set(np.unique(gt[sl]).tolist()) - {0}
    m = match_instances(pred, gt, iou_threshold=0.5)
    return ids - {int(t) for _, t in m.pairs}


def parser(doc: str) -> argparse.ArgumentParser:
    """The options of the benchmarks on half-corrected images (this one and round_blend)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N images by name")
    ap.add_argument("--min-objects", type=int, default=20)
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def top_half(gt: np.ndarray, half: int) -> np.ndarray:
    """The corrected pixels: the top half less every pixel of a scored (bottom) object."""
    top = np.zeros(gt.shape, bool)
    top[:half] = True
    return top & ~bottom_ids(gt, half)[gt]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seconds", default="15,60", help="comma-separated budgets of the fine-tunes")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--round-seconds", type=float, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(s) for s in args.seconds.split(",") if s]
    pairs = [p for p in load(args.folder)[args.skip :] if p[2].max() >= args.min_objects]
    start = load_model(args.model)
    print(machine_line())
    print(f"load before: {load1():.2f}; model {args.model}")
    print(f"scored (bottom halves) and corrected (top halves): {', '.join(n for n, *_ in pairs)}")
    cols = ["starter"] + [f"fine-tune {b:g} s" for b in budgets]
    cols += [f"round {r}" for r in range(1, args.rounds + 1)]
    pooled = {c: np.zeros(3, int) for c in cols}
    rows = []
    for name, img, gt in pairs:
        half = gt.shape[0] // 2
        scored = bottom_ids(gt, half)[gt]
        top = top_half(gt, half)
        res: dict[str, tuple] = {}
        pred0 = start.predict(img).labels
        res["starter"] = (counts(pred0, gt, half), "")
        for b in budgets:
            s, last = tune(start, img, gt, top, b, args.threads)
            kept = "kept" if "kept the previous" in last.reason else f"{last.step} steps"
            res[f"fine-tune {b:g} s"] = (counts(s.predict(img).labels, gt, half), kept)
        seg, pred, fixed = start.copy(), pred0, set()
        for r in range(1, args.rounds + 1):
            sl = square(gt.shape, half, SIDES[min(r, len(SIDES)) - 1])
            fixed |= wrong_in(pred, gt, sl)
            mask = np.zeros(gt.shape, bool)
            mask[sl] = True
            mask &= ~scored
            lab = np.where(mask, gt, pred)
            seg, last = tune(seg, img, lab, mask, args.round_seconds, args.threads)
            pred = seg.predict(img).labels
            kept = " kept" if "kept the previous" in last.reason else ""
            res[f"round {r}"] = (counts(pred, gt, half), f"{len(fixed)} obj{kept}")
        for c in cols:
            pooled[c] += res[c][0]
        n_b = int(bottom_ids(gt, half).sum())
        rows.append((name, n_b, res))
        print(
            f"{name[:16]} ({n_b} scored): "
            + "; ".join(f"{c} {f1(v[0]):.3f} {v[1]}".rstrip() for c, v in res.items()),
            flush=True,
        )
    print(f"\nload after: {load1():.2f}\n")
    print("| image | objects scored | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for name, n_b, res in rows:
        cells = [f"{f1(res[c][0]):.3f}" + (f" ({res[c][1]})" if res[c][1] else "") for c in cols]
        print(f"| {name[:16]} | {n_b} | " + " | ".join(cells) + " |")
    n_all = sum(r[1] for r in rows)
    print(f"| pooled | {n_all} | " + " | ".join(f"{f1(pooled[c]):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n{time.time() - t0:.0f} s")
