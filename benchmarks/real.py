"""Real images: the starter, a fine-tune and a simulated annotator on any folder of TIFF pairs.

    python benchmarks/real.py ../shared/data/real/dsb2018-stage1-fluo
    python benchmarks/real.py FOLDER --train 6 --rounds 6 --round-seconds 15 --model PATH

FOLDER holds ``images/NAME.tif`` and ``masks/NAME.tif`` (instance labels, 0 = background), 2D.
The images are sorted by name; the first ``--train`` (default: the first half) may be trained
on, the others are only scored (F1 at IoU 0.5 with objects pooled over the images, and the
mean per image). Measured, each against the starter in the same run:

1. the starter, no training;
2. fine-tuning on the training images, fully annotated, for 15 s and 60 s;
3. a simulated annotator: each round it corrects two more 128x128 regions of the training
   images (in reading order, skipping empty ones; the truth inside, the model's prediction
   outside and masked out), then the model fine-tunes ``--round-seconds`` on them;
4. the wait of one round on a 512x512 image: predict, 20 s of training, predict again.

The load of the machine is printed: on a busy machine fewer steps fit in a round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tifffile
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, machine_line  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet.metrics import match_instances  # noqa: E402

REGION = 128
VERBOSE = False  # --verbose: object size and F1 of each scored image


def load(folder: str):
    names = sorted(f for f in os.listdir(os.path.join(folder, "images")) if f.endswith(".tif"))
    pairs = []
    for n in names:
        img = tifffile.imread(os.path.join(folder, "images", n))
        lab = tifffile.imread(os.path.join(folder, "masks", n)).astype(np.int32)
        if img.ndim != 2:
            raise SystemExit(f"{n}: a 2D image is expected (got shape {img.shape}); see real_3d")
        pairs.append((n, img, lab))
    return pairs


def score(seg, pairs) -> tuple[float, float, int, int, int]:
    """Pooled F1, mean per-image F1, and the pooled TP, FP, FN."""
    tp = fp = fn = 0
    per = []
    for _, img, lab in pairs:
        pred = seg.predict(img)
        if VERBOSE:
            print(f"    {_[:8]} zoom {pred.zoom:.2f} diameter {pred.diameter or 0:.1f}", end="")
        m = match_instances(pred.labels, lab, iou_threshold=0.5)
        if VERBOSE:
            print(f" F1 {2 * m.tp / max(2 * m.tp + m.fp + m.fn, 1):.3f}")
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        per.append(2 * m.tp / max(2 * m.tp + m.fp + m.fn, 1))
    return 2 * tp / max(2 * tp + fp + fn, 1), float(np.mean(per)), tp, fp, fn


def finetune(seg, imgs, labs, masks, seconds, threads):
    last = None
    for last in seg.finetune(  # noqa: B007 - the last event is returned
        imgs, labs, masks, time_limit_s=seconds, num_threads=threads
    ):
        pass
    return last


def regions(pairs):
    """Candidate correction regions in reading order over the training images."""
    out = []
    for i, (_, _, lab) in enumerate(pairs):
        for y in range(0, lab.shape[0], REGION):
            for x in range(0, lab.shape[1], REGION):
                sl = (slice(y, y + REGION), slice(x, x + REGION))
                if lab[sl].any():
                    out.append((i, sl))
    return out


def annotator(start, train, test, rounds, seconds, threads, base):
    seg = start.copy()
    todo = regions(train)
    masks = [np.zeros(lab.shape, bool) for _, _, lab in train]
    corrected = 0
    rows = []
    for r in range(1, rounds + 1):
        preds = [seg.predict(img).labels for _, img, _ in train]
        for _ in range(2):
            if not todo:
                break
            i, sl = todo.pop(0)
            m = match_instances(preds[i][sl], train[i][2][sl], iou_threshold=0.5)
            corrected += int(m.fn + m.fp)
            masks[i][sl] = True
        use = [k for k in range(len(train)) if masks[k].any()]
        labs = [np.where(masks[k], train[k][2], preds[k]) for k in use]
        t0 = time.perf_counter()
        last = finetune(
            seg, [train[k][1] for k in use], labs, [masks[k] for k in use], seconds, threads
        )
        dt = time.perf_counter() - t0
        f1, mean_f1, *_ = score(seg, test)
        kept = "kept previous" if "kept the previous" in last.reason else ""
        rows.append((r, corrected, last.step, dt, f1, f1 - base, mean_f1, kept))
        print(
            f"  round {r}: {corrected:3d} corrected objects, {last.step:4d} steps, "
            f"F1 {f1:.3f} ({f1 - base:+.3f}) {kept}",
            flush=True,
        )
    return rows


def round_wait(start, img, lab, threads):
    seg = start.copy()
    crop = (slice(0, min(512, img.shape[0])), slice(0, min(512, img.shape[1])))
    im, lb = img[crop], lab[crop]
    t0 = time.perf_counter()
    pred = seg.predict(im).labels
    # the user corrects the 128x128 region where the prediction is most wrong
    cells = [
        (slice(y, y + REGION), slice(x, x + REGION))
        for y in range(0, lb.shape[0] - REGION + 1, REGION)
        for x in range(0, lb.shape[1] - REGION + 1, REGION)
    ]
    worst = max(cells, key=lambda sl: (lambda m: m.fp + m.fn)(match_instances(pred[sl], lb[sl])))
    mask = np.zeros(lb.shape, bool)
    mask[worst] = True
    finetune(seg, im, np.where(mask, lb, pred), mask, 20, threads)
    seg.predict(im)
    return time.perf_counter() - t0, im.shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--train", type=int, default=None, help="images trained on (default: half)")
    ap.add_argument("--model", default="pretrained:nuclei")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--round-seconds", type=float, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 5 s budgets")
    ap.add_argument("--only-annotator", action="store_true", help="skip the whole-image runs")
    ap.add_argument("--verbose", action="store_true", help="size and F1 of each scored image")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    torch.set_num_threads(args.threads)
    pairs = load(args.folder)
    n_train = len(pairs) // 2 if args.train is None else args.train
    train, test = pairs[:n_train], pairs[n_train:]
    if args.model.startswith("pretrained:"):
        start = nu.Segmenter.pretrained(args.model.split(":", 1)[1])
    else:
        start = nu.Segmenter.load(args.model)
    print(machine_line())
    print(f"load before: {load1():.2f}")
    print(f"trained on: {', '.join(n for n, *_ in train)}")
    print(f"scored on:  {', '.join(n for n, *_ in test)}")
    budgets = (5, 5) if args.quick else (15, 60)
    rounds = 2 if args.quick else args.rounds
    secs = 5 if args.quick else args.round_seconds

    f1, mean_f1, tp, fp, fn = score(start, test)
    print(f"\nstarter: F1 {f1:.3f} (mean per image {mean_f1:.3f}; {tp} TP, {fp} FP, {fn} FN)")
    table = [("starter, no training", "-", f1, 0.0, mean_f1)]
    for b in () if args.only_annotator else budgets:
        seg = start.copy()
        last = finetune(seg, [p[1] for p in train], [p[2] for p in train], None, b, args.threads)
        g, mg, *_ = score(seg, test)
        table.append((f"fine-tune {b:.0f} s on the training images", last.step, g, g - f1, mg))
        print(f"fine-tune {b} s: {last.step} steps, F1 {g:.3f} ({g - f1:+.3f}); {last.reason}")
    print("\nsimulated annotator:")
    rows = annotator(start, train, test, rounds, secs, args.threads, f1)
    # a 512x512 crop of the training image the starter gets most wrong
    big = [p for p in train if min(p[1].shape) >= 512] or train

    def errors(p):
        crop = (slice(0, 512), slice(0, 512))
        m = match_instances(start.predict(p[1][crop]).labels, p[2][crop])
        return m.fp + m.fn

    big = max(big, key=errors)
    wait, shape = round_wait(start, *big[1:], args.threads)

    print(f"\nload after: {load1():.2f}")
    print("\n| measure | steps | F1 (pooled) | vs starter | mean per image |")
    print("|---|---|---|---|---|")
    for name, steps, g, d, mg in table:
        print(f"| {name} | {steps} | {g:.3f} | {d:+.3f} | {mg:.3f} |")
    for r, c, steps, _dt, g, d, mg, kept in rows:
        note = f" ({kept})" if kept else ""
        print(
            f"| annotator round {r}: {c} corrected objects{note} | {steps} | {g:.3f} | "
            f"{d:+.3f} | {mg:.3f} |"
        )
    print(f"\none round on {shape[0]}x{shape[1]} (predict, 20 s training, predict): {wait:.1f} s")


if __name__ == "__main__":
    main()
