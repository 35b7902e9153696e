"""The seed threshold of the 2D post-processing, chosen on images that are not scored.

    python benchmarks/seed_threshold.py ../shared/data/real/dsb2018-stage1-fluo --train 6

The model predicts every image once (default settings: object size estimated, the image
resized to the model's size and the probabilities brought back); the instance
post-processing then runs on those probabilities at each seed threshold (seeds: connected
regions where P(interior) is above it). F1 at IoU 0.5, objects pooled, for:

* the first ``--train`` images of FOLDER (sorted by name: the ones a threshold may be chosen on),
* the other images of FOLDER (scored only: never used to choose),
* generated nuclei of six kinds (``synthetic.make_realistic_nuclei``: default, dense and
  touching, small, big, noisy and blurry, textured with a wide brightness range), 5 images
  of 384x384 each, seeds that no training used.

The threshold picked is the one with the best sum of F1 over the training images and all the
generated ones; the scored images only show what that choice does.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, load_model, machine_line  # noqa: E402
from real import load  # noqa: E402

from napari_unet.metrics import match_instances  # noqa: E402
from napari_unet.postprocess import instances_from_probabilities  # noqa: E402
from napari_unet.synthetic import make_realistic_nuclei  # noqa: E402

KINDS = {
    "default": {},
    "dense touching": dict(density=0.45, touching=0.7),
    "small": dict(radius=(3.0, 7.0)),
    "big": dict(radius=(12.0, 30.0)),
    "noisy blurry": dict(snr=3.0, blur=2.0),
    "textured dim": dict(texture=0.7, brightness_range=6.0),
}


def pooled_f1(items, threshold: float) -> float:
    tp = fp = fn = 0
    for prob, truth in items:
        m = match_instances(instances_from_probabilities(prob, seed_threshold=threshold), truth)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return 2 * tp / max(2 * tp + fp + fn, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--train", type=int, default=None, help="first N images (default: half)")
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--per-kind", type=int, default=5)
    args = ap.parse_args()
    print(machine_line())
    print(f"load average at start: {load1():.2f}")
    seg = load_model(args.model)
    pairs = load(args.folder)
    n_train = len(pairs) // 2 if args.train is None else args.train
    probs = [(seg.predict(img).probabilities, lab) for _, img, lab in pairs]
    stem = os.path.basename(args.folder.rstrip("/"))
    sets = {
        f"{stem}: first {n_train} (may choose)": probs[:n_train],
        f"{stem}: last {len(pairs) - n_train} (scored only)": probs[n_train:],
    }
    generated = []
    for kind, kw in KINDS.items():
        items = []
        for s in range(args.per_kind):
            img, lab = make_realistic_nuclei((384, 384), seed=2000 + 17 * s + len(kind), **kw)
            items.append((seg.predict(img).probabilities, lab))
        sets[f"generated: {kind}"] = items
        generated += items
    sets["generated: all kinds"] = generated
    ths = [float(t) for t in args.thresholds.split(",")]
    table = {name: [pooled_f1(items, t) for t in ths] for name, items in sets.items()}
    choose = [table[list(sets)[0]][i] + table["generated: all kinds"][i] for i in range(len(ths))]
    best = ths[int(np.argmax(choose))]
    print(
        f"\nmodel {args.model}: its seed threshold now "
        f"{seg.config.get('postprocess', {}).get('seed_threshold')}; "
        f"load average at the end {load1():.2f}\n"
    )
    print("| images | " + " | ".join(f"{t:g}" for t in ths) + " |")
    print("|---|" + "---|" * len(ths))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    print("| sum used to choose | " + " | ".join(f"{v:.4f}" for v in choose) + " |")
    print(f"\nchosen (best sum over the first images and the generated ones): {best:g}")


if __name__ == "__main__":
    main()
