"""Train the 3D starter candidate ``nuclei3d`` on generated volumes only.

    python scripts/train_starter_3d.py --seconds 720 --out /tmp/nuclei3d

A small 3D instance U-Net (``ndim=3``) trained on volumes of
:func:`napari_unet.synthetic3d.make_nuclei_3d`: nuclei that touch in Z as well as in XY,
anisotropy (Z spacing / XY spacing) drawn from 1 to 5, axial blur 1.5-4x the lateral one, SNR
3-12, uint8 and uint16. No real volume is trained on, so every shared volume can be scored.
One CPU thread; deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import napari_unet as nu
from napari_unet.synthetic3d import make_nuclei_3d


def generated(n: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs, labs, names = [], [], []
    for i in range(n):
        a = float(rng.uniform(1.0, 5.0))
        z = int(np.clip(round(72 / a), 16, 48))
        img, lab = make_nuclei_3d(
            (z, 96, 96),
            anisotropy=a,
            radius=(float(rng.uniform(5, 8)), float(rng.uniform(10, 15))),
            touching=float(rng.uniform(0.3, 0.8)),
            stacked=float(rng.uniform(0.2, 0.6)),
            snr=float(rng.uniform(3, 12)),
            axial_blur=float(rng.uniform(1.5, 4.0)),
            dtype=np.uint8 if i % 2 else np.uint16,
            seed=int(rng.integers(1 << 31)),
        )
        imgs.append(img)
        labs.append(lab)
        names.append(f"generated 3D nuclei volume {i} (anisotropy {a:.1f})")
    return imgs, labs, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=720)
    ap.add_argument("--volumes", type=int, default=24)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/nuclei3d")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    imgs, labs, names = generated(args.volumes, args.seed)
    print(f"generated {len(imgs)} volumes in {time.time() - t0:.0f} s", flush=True)
    seg = nu.Segmenter.new("instance", 1, ndim=3, base_channels=args.base, depth=3, name="nuclei3d")
    last = None
    for p in seg.finetune(
        imgs,
        labs,
        axes="ZYX",
        time_limit_s=args.seconds,
        patch_shape=(16, 64, 64),
        batch_size=2,
        lr=3e-3,
        num_threads=1,
        names=names,
        seed=args.seed,
    ):
        last = p
        if p.step % 50 == 0:
            print(f"step {p.step} loss {p.loss:.4f} {p.seconds:.0f}s", flush=True)
            seg.save(args.out)
    print("final", last.step, last.loss, flush=True)
    seg.config["postprocess"]["assembly"] = "3d"
    seg.save(args.out)


if __name__ == "__main__":
    main()
