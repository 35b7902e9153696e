"""Human-in-the-loop benchmark: a simulated annotator on generated nuclei with known truth.

    python benchmarks/hitl.py                 # full run (~6 min on 2 CPU cores)
    python benchmarks/hitl.py --quick         # smoke run

Round k: predict the working image; the annotator corrects one more region (128x128, in reading
order): inside it the prediction is replaced by the truth, and the objects they had to touch are
counted (truth objects the prediction missed or got wrong at IoU 0.5, plus false objects to
erase); the model fine-tunes for a fixed time on the corrected regions only (pixels outside are
ignored by the loss); F1@0.5 and AP@0.5:0.95 are measured on held-out images.

Three starts are compared: the shipped starter model, an untrained model (from scratch), and the
ceiling: from scratch trained on the *whole* truth of the working image for the same total time.
Prints a table and writes ``docs/images/hitl.png``.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.metrics import average_precision, instance_f1, match_instances

REGION = 128


DOMAINS = {
    # unlike the starter's training seeds: denser, dimmer and noisier than the generator default
    "default": {"snr": 5.0, "touching": 0.5, "radius": (5.0, 12.0)},
    # outside what the starter was trained on: strong blur (sigma 3) and dense clusters
    "blurry": {"snr": 5.0, "touching": 0.7, "radius": (5.0, 12.0), "blur": 3.0},
}


def heldout(n: int, size: int, domain: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_nuclei((size, size), seed=50_000 + i, **domain) for i in range(n)]


def score(seg: nu.Segmenter, test) -> tuple[float, float]:
    f1, ap = [], []
    for img, lab in test:
        pred = seg.predict(img).labels
        f1.append(instance_f1(pred, lab))
        ap.append(average_precision(pred, lab)[0])
    return float(np.mean(f1)), float(np.mean(ap))


def objects_to_correct(pred: np.ndarray, truth: np.ndarray, region: tuple[slice, slice]) -> int:
    """Objects an annotator touches to make ``pred`` equal ``truth`` inside ``region``."""
    p, t = pred[region], truth[region]
    m = match_instances(p, t, iou_threshold=0.5)
    return int(m.fn + m.fp)


def regions(shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    return [
        (slice(y, y + REGION), slice(x, x + REGION))
        for y in range(0, shape[0] - REGION + 1, REGION)
        for x in range(0, shape[1] - REGION + 1, REGION)
    ]


def run_loop(seg, image, truth, test, rounds: int, seconds: float, label: str) -> list[dict]:
    mask = np.zeros(truth.shape, bool)
    rows = []
    corrected = 0
    train_s = 0.0
    f1, ap = score(seg, test)
    rows.append(
        {
            "start": label,
            "round": 0,
            "objects": 0,
            "train_s": 0.0,
            "f1": f1,
            "ap": ap,
            "round_s": 0.0,
        }
    )
    for k, reg in enumerate(regions(truth.shape)[:rounds], start=1):
        t0 = time.perf_counter()
        pred = seg.predict(image).labels
        corrected += objects_to_correct(pred, truth, reg)
        mask[reg] = True
        labels = np.where(mask, truth, 0)
        p = deque(seg.finetune(image, labels, mask, time_limit_s=seconds, seed=k), maxlen=1)[0]
        train_s += p.seconds
        round_s = time.perf_counter() - t0
        f1, ap = score(seg, test)
        rows.append(
            {
                "start": label,
                "round": k,
                "objects": corrected,
                "train_s": train_s,
                "f1": f1,
                "ap": ap,
                "round_s": round_s,
            }
        )
        print(
            f"{label:>10} round {k}: objects corrected {corrected:3d}  train {train_s:5.0f} s  "
            f"F1 {f1:.3f}  AP {ap:.3f}  ({round_s:.1f} s/round)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0, help="fine-tuning per round")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--domain", choices=sorted(DOMAINS), default="default")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default="docs/images/hitl.png")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.size = 2, 5.0, 256
    torch.set_num_threads(args.threads)
    print(
        f"load average {np.round(__import__('os').getloadavg(), 2).tolist()}, "
        f"torch threads {torch.get_num_threads()}"
    )

    domain = DOMAINS[args.domain]
    print(f"domain {args.domain}: {domain}")
    image, truth = make_nuclei((args.size, args.size), seed=4242, **domain)
    test = heldout(3, 256, domain)
    rows = []
    try:
        starter = nu.Segmenter.pretrained("nuclei")
        rows += run_loop(starter, image, truth, test, args.rounds, args.seconds, "starter")
    except nu.store.ModelFileError as e:
        print("no starter model:", e)
    scratch = nu.Segmenter.new(seed=0)
    rows += run_loop(scratch, image, truth, test, args.rounds, args.seconds, "scratch")

    ceiling = nu.Segmenter.new(seed=0)
    budget = args.rounds * args.seconds
    p = deque(ceiling.finetune(image, truth, time_limit_s=budget, seed=0), maxlen=1)[0]
    f1, ap_ = score(ceiling, test)
    n_all = int(truth.max())
    rows.append(
        {
            "start": "ceiling",
            "round": args.rounds,
            "objects": n_all,
            "train_s": p.seconds,
            "f1": f1,
            "ap": ap_,
            "round_s": p.seconds,
        }
    )

    print()
    print(
        "| start | round | objects corrected | fine-tuning s (total) | F1@0.5 | AP@0.5:0.95 "
        "| s / round |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['start']} | {r['round']} | {r['objects']} | {r['train_s']:.0f} | "
            f"{r['f1']:.3f} | {r['ap']:.3f} | {r['round_s']:.1f} |"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for start, style in (("starter", "o-"), ("scratch", "s-")):
        rs = [r for r in rows if r["start"] == start]
        if rs:
            ax.plot([r["objects"] for r in rs], [r["f1"] for r in rs], style, label=start)
    ax.axhline(f1, color="gray", ls="--", label=f"ceiling (all {n_all} objects)")
    ax.set_xlabel("objects corrected (cumulative)")
    ax.set_ylabel("F1 @ IoU 0.5 on held-out images")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"Human-in-the-loop: {args.seconds:.0f} s fine-tuning per round (CPU)")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print("wrote", args.plot)


if __name__ == "__main__":
    main()
