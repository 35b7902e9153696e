"""What object-size resizing costs in prediction: the same starter with and without it.

    python benchmarks/bench_sizing.py ../shared/data/real/dsb2018-stage1-fluo

Times ``Segmenter.predict`` end to end (first pass, resized pass, resizing back and
post-processing included) on every image of FOLDER/images and on a 2048x2048 generated image,
with the starter as shipped ("sized") and with its recorded diameter removed ("native": one
pass at the image's own size, as before the resizing existed). Best of 3 runs each; prints the
ratio sized / native per image and for all images together. No scores: see benchmarks/real.py.
"""

from __future__ import annotations

import os
import sys
import time

import tifffile
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, machine_line  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet.synthetic import make_realistic_nuclei  # noqa: E402


def best(seg, img, n=3):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        pred = seg.predict(img)
        times.append(time.perf_counter() - t0)
    return min(times), pred.zoom


def main() -> None:
    folder = sys.argv[1]
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
