"""How much of its change a volume round should keep (``finetune.VOLUME_BLEND``).

    python benchmarks/volume_blend.py \\
        --real ../shared/data/real/qcanet-mouse-embryo-3d:2.18,1,1 \\
        --real ../shared/data/real/gonuclear-arabidopsis-ovule-3d:0.2837,0.1268,0.1268

12 generated volumes (``make_nuclei_3d``, seeds 10-21, 31x61x57 / 24x96x96 / 40x80x80 in turn,
anisotropy 1-4, passed as ``scale=``) and every volume of the ``--real`` folders
(``images/`` + ``masks/``). Each is fine-tuned once from ``nuclei-volumes`` for ``--seconds``
on its top half (less every voxel of a bottom-half nucleus: the ``real_3d.py`` protocol) with
the whole change kept; the same trained weights are then blended with the starting ones at
each ``--shares`` value (``safeguard.blend_weights``) and the bottom half is scored (3D F1 at
IoU 0.5). The table: the starter, then each share; the last lines, the mean, the volumes
more than 0.01 below the starter, and the worst change. 2 torch threads.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
from real_3d import f1_bottom, read_volumes, spaced, top_half, volume_spec  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet import finetune as ft  # noqa: E402
from napari_unet.safeguard import blend_weights  # noqa: E402
from napari_unet.synthetic3d import make_nuclei_3d  # noqa: E402


def volumes(real: list[str], n_generated: int = 12):
    shapes = [(31, 61, 57), (24, 96, 96), (40, 80, 80)]
    for i, seed in enumerate(range(10, 10 + n_generated)):
        an = [1.0, 2.0, 3.0, 4.0][i % 4]
        img, gt = make_nuclei_3d(shapes[i % 3], anisotropy=an, seed=seed)
        yield f"generated {seed} {shapes[i % 3]} a{an:g}", img, gt.astype(np.int32), (an, 1, 1)
    for spec in real:
        yield from read_volumes(*volume_spec(spec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="append", default=[], metavar="FOLDER:Z,Y,X")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--generated", type=int, default=12, help="generated volumes (0-12)")
    ap.add_argument("--shares", default="0.25,0.5,0.75,1")
    ap.add_argument("--slices", type=int, default=0,
                    help="correct only the top half of this many Z slices (spread out), not the "
                         "whole top half: a small round")
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    ft.VOLUME_BLEND = ft.VOLUME_MIN = 1.0  # the round keeps all of its change; blended below
    rows = []
    for name, img, gt, vox in volumes(args.real, args.generated):
        C.say_load(name)
        half = img.shape[1] // 2
        top = top_half(gt)
        if args.slices:
            picked = np.zeros(gt.shape, bool)
            picked[spaced(0, img.shape[0], args.slices)] = True
            top &= picked
        n_corrected = len(np.unique(gt[top & (gt > 0)]))
        seg = nu.Segmenter.pretrained("nuclei-volumes")
        start = copy.deepcopy(seg.net.state_dict())
        f0 = f1_bottom(seg.predict(img, "ZYX", scale=vox, num_threads=2).labels, gt, half)
        tuned, steps = seg.copy(), 0
        for p in tuned.finetune(
            img, gt, masks=top, axes="ZYX", time_limit_s=args.seconds, num_threads=2
        ):
            steps = p.step
        new = copy.deepcopy(tuned.net.state_dict())
        row = [name, f"{steps} ({n_corrected})", f0]
        for share in shares:
            tuned.net.load_state_dict(new)
            if share < 1:
                blend_weights(tuned.net, start, share)
            pred = tuned.predict(img, "ZYX", scale=vox, num_threads=2).labels
            row.append(f1_bottom(pred, gt, half))
        rows.append(row)
        print(" | ".join([name, row[1]] + [f"{v:.3f}" for v in row[2:]]), flush=True)
    a = np.array([r[2:] for r in rows])
    body = [[r[0], r[1], *r[2:]] for r in rows]
    body.append(["mean", "", *a.mean(0)])
    body.append(["lower than the starter by > 0.01", "", "", *(a[:, 1:] < a[:, :1] - 0.01).sum(0)])
    body.append(["worst change", "", "", *(a[:, 1:] - a[:, :1]).min(0)])
    print(C.table(["volume", "steps (objects corrected)", "starter",
                   *[f"keep {s:g}" for s in shares]], body))


if __name__ == "__main__":
    main()
