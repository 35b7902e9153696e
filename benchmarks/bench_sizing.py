"""What object-size resizing costs in prediction: the same starter with and without it.

    python benchmarks/bench_sizing.py ../shared/data/real/dsb2018-stage1-fluo

Times ``Segmenter.predict`` end to end (first pass, resized pass, resizing back and
post-processing included) on every image of FOLDER/images and on a 2048x2048 generated image,
with the starter as shipped ("sized") and with its recorded diameter removed ("native": one
pass at the image's own size, as before the resizing existed). Best of 3 runs each; prints the
ratio sized / native per image and for all images together. No scores: see benchmarks/real.py.

    python benchmarks/bench_sizing.py ../shared/data/real/dsb2018-stage1-fluo \
        --factors 0.4,0.6,1,1.5,2,3,4

instead scores nuclei far from the trained size: every image and its labels resized by each
factor, predicted with default settings and scored at that size (F1 at IoU 0.5, pooled), with
the size estimate's look at half size (``inference._Sizer._coarse_look``) off and on. Scored on
the last 7 images by name (``--first`` adds the first 6, the starter's training images).

    python benchmarks/bench_sizing.py ../shared/data/real/dsb2018-stage1-fluo \
        --factors 0.7,1.5,2.5 --tiled-to 1500

resizes every image (all 13) by each factor and repeats it to at least 1500x1500 px (big
images: the first pass can stop early), then predicts each with the size measured on the
first pass's first rows (as shipped, ``inference.EARLY_PIXELS``) and on the whole first pass,
one after the other: zoom, F1 and seconds of both, pooled F1 and total time.
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
import napari_unet.inference as inference  # noqa: E402
from napari_unet.metrics import match_instances  # noqa: E402
from napari_unet.scale import resize_image, resize_labels, zoomed_shape  # noqa: E402
from napari_unet.synthetic import make_realistic_nuclei  # noqa: E402


def best(seg, img, n=3):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        pred = seg.predict(img)
        times.append(time.perf_counter() - t0)
    return min(times), pred.zoom


def pooled_f1(seg, pairs, factor: float) -> tuple[float, int, int, int]:
    tp = fp = fn = 0
    for img, lab in pairs:
        if factor != 1:
            shape = zoomed_shape(lab.shape, factor)
            img = resize_image(img.astype(np.float32), shape).astype(img.dtype)
            lab = resize_labels(lab, shape)
        m = match_instances(seg.predict(img).labels, lab, 0.5)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return 2 * tp / max(2 * tp + fp + fn, 1), tp, fp, fn


def factors(folder: str, values: list[float], first: bool) -> None:
    names = sorted(os.listdir(os.path.join(folder, "images")))
    sets = {"last 7": names[6:]} | ({"first 6": names[:6]} if first else {})
    seg = nu.Segmenter.pretrained("nuclei")
    look = inference._Sizer._coarse_look
    print(machine_line())
    print(f"load before: {load1():.2f}")
    print("| images | factor | F1, look off (matched/false/missed) | F1, look on (same) |")
    print("|---|---|---|---|")
    for label, sel in sets.items():
        pairs = [
            (
                tifffile.imread(os.path.join(folder, "images", n)),
                tifffile.imread(os.path.join(folder, "masks", n)).astype(np.int32),
            )
            for n in sel
        ]
        for f in values:
            cells = []
            for on in (False, True):
                inference._Sizer._coarse_look = look if on else (lambda *a, **k: None)
                try:
                    f1, tp, fp, fn = pooled_f1(seg, pairs, f)
                finally:
                    inference._Sizer._coarse_look = look
                cells.append(f"{f1:.3f} ({tp}/{fp}/{fn})")
            print(f"| {label} | {f:g}x | {cells[0]} | {cells[1]} |", flush=True)
    print(f"load after: {load1():.2f}")


def _tiled(img: np.ndarray, lab: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """``img`` repeated to at least ``side`` x ``side``, each copy's labels with ids of its own."""
    reps = (-(-side // img.shape[0]), -(-side // img.shape[1]))
    n = int(lab.max()) + 1
    copies = [
        [np.where(lab > 0, lab + n * (i * reps[1] + j), 0) for j in range(reps[1])]
        for i in range(reps[0])
    ]
    return np.tile(img, reps), np.block(copies).astype(np.int32)


def first_rows(folder: str, values: list[float], side: int) -> None:
    """Big images (every image resized by each factor, then repeated to ``side`` px or more)
    predicted with the first pass measured on its first rows (``inference.EARLY_PIXELS``, as
    shipped) and on the whole first pass, one after the other in this process."""
    names = sorted(os.listdir(os.path.join(folder, "images")))
    seg = nu.Segmenter.pretrained("nuclei")
    shipped = inference.EARLY_PIXELS
    print(machine_line())
    print(f"load before: {load1():.2f}")
    print("| image | factor | shape | zoom rows / whole | F1 rows / whole | s rows / whole |")
    print("|---|---|---|---|---|---|")
    sums = {True: [0, 0, 0, 0.0], False: [0, 0, 0, 0.0]}
    seg.predict(np.zeros((64, 64), np.float32))  # warm-up
    for n in names:
        img = tifffile.imread(os.path.join(folder, "images", n)).astype(np.float32)
        lab = tifffile.imread(os.path.join(folder, "masks", n)).astype(np.int32)
        for f in values:
            shape = zoomed_shape(lab.shape, f)
            big, truth = _tiled(resize_image(img, shape), resize_labels(lab, shape), side)
            cells = {}
            for early in (True, False):
                inference.EARLY_PIXELS = shipped if early else 1 << 62
                try:
                    t0 = time.perf_counter()
                    pred = seg.predict(big)
                    dt = time.perf_counter() - t0
                finally:
                    inference.EARLY_PIXELS = shipped
                m = match_instances(pred.labels, truth, 0.5)
                acc = sums[early]
                acc[0], acc[1], acc[2], acc[3] = (
                    acc[0] + m.tp,
                    acc[1] + m.fp,
                    acc[2] + m.fn,
                    acc[3] + dt,
                )
                cells[early] = (pred.zoom, m.f1, dt)
            (za, fa, ta), (zb, fb, tb) = cells[True], cells[False]
            print(
                f"| {n[:4]} | {f:g}x | {big.shape[0]}x{big.shape[1]} | {za:.2f} / {zb:.2f} "
                f"| {fa:.3f} / {fb:.3f} | {ta:.2f} / {tb:.2f} |",
                flush=True,
            )
    (tp, fp, fn, ta), (tq, fq, fnq, tb) = sums[True], sums[False]
    f1a, f1b = 2 * tp / max(2 * tp + fp + fn, 1), 2 * tq / max(2 * tq + fq + fnq, 1)
    print(f"| all, pooled | | | | {f1a:.4f} / {f1b:.4f} | {ta:.1f} / {tb:.1f} ({ta / tb:.2f}x) |")
    print(f"load after: {load1():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--factors", default=None, help="e.g. 0.4,1,3: score resized images instead")
    ap.add_argument("--first", action="store_true", help="also score the first 6 images")
    ap.add_argument(
        "--tiled-to", type=int, default=None,
        help="with --factors: images repeated to this many px, first rows against whole pass",
    )  # fmt: skip
    args = ap.parse_args()
    folder = args.folder
    if args.factors and args.tiled_to:
        torch.set_num_threads(int(os.environ.get("THREADS", "2")))
        first_rows(folder, [float(v) for v in args.factors.split(",")], args.tiled_to)
        return
    if args.factors:
        torch.set_num_threads(int(os.environ.get("THREADS", "2")))
        factors(folder, [float(v) for v in args.factors.split(",")], args.first)
        return
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sized = nu.Segmenter.pretrained("nuclei")
    native = sized.copy()
    native.config["diameter"] = None
    images = [
        (f, tifffile.imread(os.path.join(folder, "images", f)))
        for f in sorted(os.listdir(os.path.join(folder, "images")))
    ]
    images.append(("generated 2048x2048", make_realistic_nuclei((2048, 2048), seed=0)[0]))
    print(machine_line())
    print(f"load before: {load1():.2f}")
    print("| image | shape | zoom | native s | sized s | sized / native |")
    print("|---|---|---|---|---|---|")
    tn = ts = 0.0
    for name, img in images:
        a, _ = best(native, img)
        b, zoom = best(sized, img)
        tn, ts = tn + a, ts + b
        print(
            f"| {name[:16]} | {img.shape[0]}x{img.shape[1]} | {zoom:.2f} | {a:.2f} | {b:.2f} "
            f"| {b / a:.2f} |",
            flush=True,
        )
    print(f"| all | | | {tn:.2f} | {ts:.2f} | {ts / tn:.2f} |")
    print(f"load after: {load1():.2f}")


if __name__ == "__main__":
    main()
