"""How much of a correction round's change to keep: the weights blended at several shares.

    python benchmarks/round_blend.py ../shared/data/real/dsb2018-stage1-fluo --skip 6
    python benchmarks/round_blend.py FOLDER --seconds 15 --shares 0.25,0.5,1

``real_halves.py``' protocol (the top half of each image corrected with the truth, less every
pixel of a scored nucleus; the bottom half scored, F1 at IoU 0.5): one round of ``--seconds``
from the starter with every check that could undo it switched off and no blend, then the
weights ``start + share * (round - start)`` for each share, the size bias measured again for
each, scored on the bottom half, on the round's held-out corrected objects (mean IoU) and on
the replay-bank crops a small round keeps out of training (F1). Share 0 is the starter, 1 the
round's own weights. Pooled over the images from the summed TP / FP / FN.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load1, load_model, machine_line  # noqa: E402
from real import load  # noqa: E402
from real_halves import counts, f1, parser, top_half  # noqa: E402

import napari_unet.finetune as ft  # noqa: E402
from napari_unet.safeguard import BANK_HOLD_EVERY, Guard, bank_score, replay_bank, size_bias  # noqa: E402


def unchecked() -> None:
    """The round's own weights: no check undoes it, no blend (in this process only)."""
    ft._keep_better = lambda *a, **k: ""
    ft._kept_bank = lambda *a, **k: ""
    ft.blend_weights = lambda *a, **k: ""


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--shares", default="0,0.25,0.5,0.75,1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shares = [float(a) for a in args.shares.split(",")]
    pairs = [p for p in load(args.folder)[args.skip :] if p[2].max() >= args.min_objects]
    start = load_model(args.model)
    unchecked()
    print(machine_line())
    print(f"load before: {load1():.2f}; model {args.model}; {args.seconds:g} s per round")
    pooled = {a: np.zeros(3, int) for a in shares}
    print(
        "| image | steps | "
        + " | ".join(f"share {a:g}: bottom / held / bank" for a in shares)
        + " |"
    )
    print("|---" * (len(shares) + 2) + "|")
    for name, img, gt in pairs:
        half = gt.shape[0] // 2
        top = top_half(gt, half)
        seg = start.copy()
        s0 = copy.deepcopy(seg.net.state_dict())
        last = None
        for last in seg.finetune(img, gt, top, time_limit_s=args.seconds, num_threads=args.threads):  # noqa: B007
            pass
        s1 = copy.deepcopy(seg.net.state_dict())
        guard = Guard(items=getattr(seg, "_guard_bank", []))
        pp = seg.model_config.postprocess.to_dict()
        held = replay_bank(seg)[::BANK_HOLD_EVERY]
        cells = []
        for a in shares:
            seg.net.load_state_dict(
                {k: s0[k] + a * (s1[k] - s0[k]) if s0[k].is_floating_point() else s1[k] for k in s0}
            )
            seg.config["size_bias"] = start.config.get("size_bias") if a == 0 else size_bias(seg)
            c = counts(seg.predict(img).labels, gt, half)
            pooled[a] += c
            g = guard.score(seg.net, pp)
            b = bank_score(seg.net, held, pp)
            cells.append(f"{f1(c):.3f} / {'-' if g is None else f'{g:.3f}'} / {b:.3f}")
        print(f"| {name[:16]} | {last.step} | " + " | ".join(cells) + " |", flush=True)
    print("| **pooled** | | " + " | ".join(f"**{f1(pooled[a]):.3f}**" for a in shares) + " |")
    print(f"\nload after: {load1():.2f}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"{time.time() - t0:.0f} s")
