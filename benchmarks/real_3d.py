"""Real volumes: starter, fine-tuning on half a volume, and a simulated annotator, in 3D.

    python benchmarks/real_3d.py ../shared/data/real/qcanet-mouse-embryo-3d --voxel 2.18,1,1
    python benchmarks/real_3d.py ../shared/data/real/gonuclear-arabidopsis-ovule-3d \\
        --voxel 0.2837,0.1268,0.1268

FOLDER holds 3D ``images/NAME.tif`` + ``masks/NAME.tif`` (instance ids) pairs. For every volume
and every model (``--models``: shipped starter names or saved model folders):

* ``starter``: 3D instance F1 at IoU 0.5 (:func:`napari_unet.metrics.instance_f1`) of the
  untouched model on the whole volume;
* ``starter, bottom``: the same, on the bottom half only. The halves are the top (Y < Y/2, as
  napari shows a ZYX layer) and the bottom of every slice; an object belongs to the half that
  holds its centroid, and only the bottom half's objects (true and predicted) are scored, with
  their whole 3D extent;
* ``fine-tuned``: ``--seconds`` of fine-tuning on the top half (a mask: the top half of every
  slice, less the voxels of the bottom half's true objects, so no scored object is ever seen),
  scored on the bottom half;
* ``annotator k``: a simulated annotator corrects the top half of k Z slices (spread out: the
  middle slice first, then the quarters ...) and the model is fine-tuned on those only
  (``masks=``) for ``--round-seconds`` from the starter; scored on the bottom half.

The voxel size (``--voxel Z,Y,X``) is passed as ``scale=`` (what the Predict widget passes from
the layer's scale). One CPU thread. Prints a markdown table.

    python benchmarks/real_3d.py --speed

times the prediction of a generated 64x512x512 volume with the 3D assembly against the same
network output post-processed as before it (3D-connected seeds, ``instances_from_probabilities``).
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
from _common import load_model  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet.metrics import instance_f1  # noqa: E402


def spaced(lo: int, hi: int, n: int) -> list[int]:
    """n slice indices in [lo, hi), spread out: the middle first, then the quarters ..."""
    order: list[int] = []
    parts = 2
    while len(order) < min(n, hi - lo):
        for j in range(1, parts, 2):
            z = lo + (hi - lo) * j // parts
            if z not in order:
                order.append(z)
        parts *= 2
    return order[:n]


def centroid_half(labels: np.ndarray, half: int) -> np.ndarray:
    """Ids (bool per id) whose centroid lies in the bottom half (Y >= half)."""
    n = int(labels.max())
    y = np.arange(labels.shape[1])[None, :, None]
    cnt = np.bincount(labels.ravel(), minlength=n + 1)
    ys = np.bincount(
        labels.ravel(), weights=np.broadcast_to(y, labels.shape).ravel(), minlength=n + 1
    )
    bottom = ys >= half * np.maximum(cnt, 1)
    bottom[0] = False
    return bottom


def f1_bottom(pred: np.ndarray, gt: np.ndarray, half: int) -> float:
    """3D F1 at IoU 0.5 over the objects (true and predicted) of the bottom half."""
    return instance_f1(
        np.where(centroid_half(pred, half)[pred], pred, 0),
        np.where(centroid_half(gt, half)[gt], gt, 0),
    )


def volume_spec(spec: str) -> tuple[str, tuple[float, ...]]:
    """``FOLDER:Z,Y,X`` -> (folder, voxel size)."""
    folder, vox = spec.rsplit(":", 1)
    return folder, tuple(float(v) for v in vox.split(","))


def read_volumes(folder: str, voxel: tuple[float, ...] | None = None):
    """``(name, image, labels int32, voxel)`` for each 3D volume of ``folder`` (``images/`` +
    ``masks/`` TIFF pairs, sorted by name; the voxel size applies to all; other images are
    skipped with a line saying so)."""
    for f in sorted(os.listdir(os.path.join(folder, "images"))):
        img = tifffile.imread(os.path.join(folder, "images", f))
        if img.ndim != 3:
            print(f"skipping {f}: not a 3D volume ({img.shape})")
            continue
        gt = tifffile.imread(os.path.join(folder, "masks", f)).astype(np.int32)
        yield f"{os.path.basename(folder.rstrip('/'))}/{f}", img, gt, voxel


def top_half(gt: np.ndarray) -> np.ndarray:
    """The voxels a fine-tune on a volume may see: the top half of every slice (Y < Y/2), less
    the voxels of the objects scored in the bottom half (:func:`centroid_half`)."""
    half = gt.shape[1] // 2
    top = np.zeros(gt.shape, bool)
    top[:, :half] = True
    top &= ~centroid_half(gt, half)[gt]
    return top


def predict(seg: nu.Segmenter, img: np.ndarray, voxel) -> np.ndarray:
    return seg.predict(img, "ZYX", scale=voxel, num_threads=1).labels


def tune(seg, img, lab, mask, seconds: float) -> nu.Segmenter:
    s = seg.copy()
    for _ in s.finetune(img, lab, masks=mask, axes="ZYX", time_limit_s=seconds, num_threads=1):
        pass
    return s


def speed(model: str) -> None:
    from napari_unet.postprocess import instances_from_probabilities
    from napari_unet.synthetic3d import make_nuclei_3d

    block, _ = make_nuclei_3d((16, 128, 128), anisotropy=2.0, seed=0)
    vol = np.tile(block, (4, 4, 4))  # 64 x 512 x 512
    seg = load_model(model)
    t0 = time.perf_counter()
    pred = seg.predict(vol, "ZYX", scale=(2, 1, 1), num_threads=1, return_probabilities=True)
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    instances_from_probabilities(pred.probabilities, spacing=(2, 1, 1))
    old_pp = time.perf_counter() - t1
    forward = total - pred.postprocess_seconds
    print(
        f"| 64x512x512, {model} | network {forward:.1f} s | 3D assembly "
        f"{pred.postprocess_seconds:.1f} s | before (3D-connected seeds) {old_pp:.1f} s "
        f"| ratio of totals {total / (forward + old_pp):.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--speed", action="store_true", help="time a 64x512x512 volume and exit")
    ap.add_argument("--voxel", default=None, help="Z,Y,X voxel size (default isotropic)")
    ap.add_argument("--models", default="nuclei-volumes", help="comma-separated names or folders")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-seconds", type=float, default=15.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.speed:
        speed(args.models.split(",")[0])
        return
    voxel = tuple(float(v) for v in args.voxel.split(",")) if args.voxel else None
    rows = []
    for name, img, gt, _ in read_volumes(args.folder):
        f = os.path.basename(name)
        half = img.shape[1] // 2
        top = top_half(gt)
        for m in args.models.split(","):
            seg = load_model(m)
            t0 = time.time()
            pred = predict(seg, img, voxel)
            pred_s = time.time() - t0
            row = {
                "volume": f,
                "model": seg.config.get("name", m),
                "n_true": int(gt.max()),
                "n_pred": int(pred.max()),
                "predict_s": pred_s,
                "starter": instance_f1(pred, gt),
                "n_bottom": int(centroid_half(gt, half).sum()),
                "starter_bottom": f1_bottom(pred, gt, half),
            }
            tuned = tune(seg, img, gt, top, args.seconds)
            row["finetuned_bottom"] = f1_bottom(predict(tuned, img, voxel), gt, half)
            for k in range(1, args.rounds + 1):
                mask = np.zeros(gt.shape, bool)
                mask[spaced(0, img.shape[0], k)] = True
                mask &= top
                tuned = tune(seg, img, gt, mask, args.round_seconds)
                row[f"annot_{k}"] = f1_bottom(predict(tuned, img, voxel), gt, half)
            rows.append(row)
            print(row, flush=True)
    ks = [f"annot_{k}" for k in range(1, args.rounds + 1)]
    print()
    print(
        "| volume | model | objects (true / found / true in bottom half) | starter F1 (whole) "
        "| starter F1 (bottom) "
        f"| {args.seconds:g} s fine-tune on top half, F1 (bottom) | "
        + " | ".join(
            f"{k} slice(s) corrected, {args.round_seconds:g} s" for k in range(1, args.rounds + 1)
        )
        + " | predict s |"
    )
    print("|---" * (7 + args.rounds) + "|")
    for r in rows:
        print(
            f"| {r['volume']} | {r['model']} | {r['n_true']} / {r['n_pred']} / {r['n_bottom']} "
            f"| {r['starter']:.3f} "
            f"| {r['starter_bottom']:.3f} | {r['finetuned_bottom']:.3f} | "
            + " | ".join(f"{r[k]:.3f}" for k in ks)
            + f" | {r['predict_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
