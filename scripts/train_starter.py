"""Reproduce the shipped starter model ``nuclei`` from scratch, with the project's own code.

    python scripts/train_starter.py --seconds 900 --out src/napari_unet/models/nuclei

Trains a small 2D instance U-Net on generated fluorescence-like nuclei images of varied size,
density, brightness, blur, noise, background and bit depth (``napari_unet.data.make_nuclei``),
then evaluates it on held-out generated images whose seeds (and parameter draws) it never saw.
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.metrics import average_precision, instance_f1


def varied_params(rng: np.random.Generator) -> dict:
    r0 = rng.uniform(3.5, 9.0)
    return {
        "radius": (r0, r0 * rng.uniform(1.3, 2.0)),
        "touching": float(rng.uniform(0.1, 0.6)),
        "snr": float(rng.choice([2.5, 4.0, 6.0, 10.0, 20.0])),
        "background": str(rng.choice(["uneven", "uneven", "flat", "none"])),
        "blur": float(rng.uniform(0.5, 2.0)),
        "dtype": [np.uint8, np.uint16, np.float32][int(rng.integers(3))],
    }


def make_set(n: int, seed: int, size: int = 256) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    imgs, labs, params = [], [], []
    for i in range(n):
        p = varied_params(rng)
        img, lab = make_nuclei((size, size), seed=seed * 1000 + i, **p)
        imgs.append(img)
        labs.append(lab)
        params.append(p)
    return imgs, labs, params


def evaluate(seg: nu.Segmenter, imgs, labs) -> tuple[float, float]:
    f1s, aps = [], []
    for img, lab in zip(imgs, labs, strict=True):
        pred = seg.predict(img).labels
        f1s.append(instance_f1(pred, lab))
        aps.append(average_precision(pred, lab)[0])
    return float(np.mean(f1s)), float(np.mean(aps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=900)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--out", default="src/napari_unet/models/nuclei")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    imgs, labs, _ = make_set(args.images, args.seed)
    test_imgs, test_labs, _ = make_set(12, seed=10_000 + args.seed)
    seg = nu.Segmenter.new(
        base_channels=args.base_channels, depth=args.depth, seed=args.seed, name="nuclei"
    )
    t0 = time.perf_counter()
    last_print = 0.0
    for p in seg.finetune(
        imgs,
        labs,
        time_limit_s=args.seconds,
        lr=3e-3,
        batch_size=8,
        patch_shape=(128, 128),
        seed=args.seed,
        names=[f"generated nuclei seed {args.seed * 1000 + i}" for i in range(args.images)],
    ):
        if p.seconds - last_print > 30 or p.done:
            last_print = p.seconds
            print(
                f"{p.seconds:7.0f} s  step {p.step:6d}  loss {p.loss:.4f}  "
                f"{p.patches_per_s:.1f} patches/s",
                flush=True,
            )
    f1, mean_ap = evaluate(seg, test_imgs, test_labs)
    print(
        f"held-out (12 generated images, unseen seeds): F1@0.5 {f1:.3f}  AP@0.5:0.95 {mean_ap:.3f}"
    )
    # the training history names 48 generated images; keep the card short
    seg.config["trained_on"] = [f"{args.images} generated nuclei images (seed {args.seed})"]
    seg.config["history"][-1]["trained_on"] = seg.config["trained_on"]
    seg.config["val_score"] = round(f1, 4)
    seg.config["model_card"] = {
        "what": "2D instance segmentation of fluorescent nuclei (one channel)",
        "trained_by": "scripts/train_starter.py",
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
        "heldout_f1_at_0.5": round(f1, 4),
        "heldout_ap_0.5_0.95": round(mean_ap, 4),
    }
    seg.save(args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
