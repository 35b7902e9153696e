"""The size bias of volumes: how much to shrink the object size measured on a volume's middle
plane before the zoom is picked, chosen on generated volumes.

    python benchmarks/volume_zoom.py
    python benchmarks/volume_zoom.py --real ../shared/data/real/qcanet-mouse-embryo-3d:2.18,1,1

The 2D model predicts every plane of a volume at one zoom, picked from the objects measured on
the middle plane (``scale.diameter_of_foreground`` of the native pass, divided by the model's
``volume_size_bias``). Each volume is predicted once with the bias switched off (1.0); its
measured diameter ``d`` is then given as ``diameter=d / m`` for each multiplier ``m``, so the
column ``m`` is what a bias of ``m`` gives. 3D instance F1 at IoU 0.5 per volume
(``metrics.match_instances``), default 3D assembly, the voxel size as ``scale=``.

Two sets of generated volumes (``synthetic3d.make_nuclei_3d``), 96x96 planes, anisotropy 1-5:
10 with random settings (seed 77: radii, SNR, stacking and touching drawn) and 7 with fixed
ones. ``--real FOLDER:Z,Y,X`` adds a folder of ``images/`` + ``masks/`` volumes (TIFF) with its
voxel size; those only show what a choice does.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, load_model, machine_line  # noqa: E402

from napari_unet.metrics import match_instances  # noqa: E402
from napari_unet.synthetic3d import make_nuclei_3d  # noqa: E402

FIXED = [  # anisotropy, radius, snr, stacked, seed
    (1.0, (5, 10), 6, 0.6, 100),
    (2.0, (5, 8), 5, 0.6, 104),
    (1.5, (6, 12), 4, 0.6, 106),
    (2.0, (8, 14), 4, 0.35, 300),
    (3.0, (6, 12), 5, 0.35, 301),
    (1.0, (7, 12), 5, 0.2, 302),
    (4.0, (8, 16), 6, 0.5, 303),
]


def generated():
    rng = np.random.default_rng(77)
    for s in range(10):
        a = float(rng.choice([1.0, 1.5, 2.0, 3.0, 4.0, 5.0]))
        r0 = float(rng.uniform(5, 10))
        r = (r0, r0 * float(rng.uniform(1.4, 2.0)))
        snr, st, tch = (float(rng.uniform(lo, hi)) for lo, hi in ((3, 7), (0.2, 0.6), (0.3, 0.7)))
        img, lab = make_nuclei_3d(
            (max(12, int(64 / a)), 96, 96), anisotropy=a, radius=r, snr=snr, stacked=st,
            touching=tch, seed=500 + s,
        )  # fmt: skip
        yield "random", f"a {a:g}, r {r0:.0f}-{r[1]:.0f}, snr {snr:.1f}", img, lab, (a, 1.0, 1.0)
    for a, r, snr, st, seed in FIXED:
        img, lab = make_nuclei_3d(
            (int(64 / a), 96, 96), anisotropy=a, radius=r, snr=snr, stacked=st, seed=seed
        )
        yield "fixed", f"a {a:g}, r {r[0]}-{r[1]}, snr {snr}", img, lab, (a, 1.0, 1.0)


def real(spec: str):
    from real_3d import read_volumes, volume_spec

    for name, img, lab, sp in read_volumes(*volume_spec(spec)):
        yield "real", name.split("/")[0], img, lab, sp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--multipliers", default="1,1.25,1.5,1.75,2")
    ap.add_argument("--model", default="nuclei", help="a starter's name or a model folder")
    ap.add_argument("--real", action="append", default=[], help="FOLDER:Z,Y,X (repeatable)")
    args = ap.parse_args()
    ms = [float(m) for m in args.multipliers.split(",")]
    print(machine_line())
    print(f"load average at start: {load1():.2f}\n")
    seg = load_model(args.model)
    seg.config["volume_size_bias"] = None
    print("| set | volume | measured d | " + " | ".join(f"m = {m:g}" for m in ms) + " |")
    print("|---|---|---|" + "---|" * len(ms))
    sums: dict[str, list] = {}
    vols = [v for spec in args.real for v in real(spec)]
    for kind, name, img, lab, sp in list(generated()) + vols:
        p = seg.predict(img, "ZYX", scale=sp)
        row = []
        for m in ms:
            q = p if m == 1.0 else seg.predict(img, "ZYX", scale=sp, diameter=p.diameter / m)
            row.append(match_instances(q.labels, lab).f1)
        sums.setdefault(kind, []).append(row)
        cells = " | ".join(f"{v:.3f}" for v in row)
        print(f"| {kind} | {name} | {p.diameter:.1f} | {cells} |", flush=True)
    for kind, rows in sums.items():
        mean = np.mean(rows, axis=0)
        print(f"| {kind}: mean of {len(rows)} | | | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    gen = sums.get("random", []) + sums.get("fixed", [])
    print(f"| generated: mean of {len(gen)} | | | "
          + " | ".join(f"{v:.3f}" for v in np.mean(gen, axis=0)) + " |")  # fmt: skip
    print(f"\nload average at the end: {load1():.2f}")


if __name__ == "__main__":
    main()
