"""Build the starter's replay bank: crops of the data ``nuclei`` learned from.

    python scripts/make_replay_bank.py --real ../shared/data/real/dsb2018-stage1-fluo \
        --out src/napari_unet/models/nuclei/replay.npz

A correction round mixes these crops into its patches (``safeguard.replay_bank``) so that a
model fine-tuned on a few corrected nuclei keeps what it knew about other images: it replays
the images it was trained on, not only the user's own. The crops come from

* the first ``--real-images`` DSB2018 images by file name (the starter's real training
  images; the others are for scoring only), each resized so that its nuclei have the model's
  diameter times a random factor in [1/1.6, 1.6], as the starter saw them;
* generated realistic nuclei (:func:`napari_unet.synthetic.make_realistic_nuclei`) at the
  same sizes.

Each crop is normalised as the model normalises images (its percentiles over the whole resized
image) and stored as float16 with its uint16 instance labels. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_starter import at_size, generated_set, jitter, load_real  # noqa: E402

import napari_unet as nu  # noqa: E402
from napari_unet import fileio  # noqa: E402
from napari_unet.inference import _normalizer  # noqa: E402


def crops(img: np.ndarray, lab: np.ndarray, n: int, size: int, rng) -> list[tuple]:
    """``n`` crops of ``size`` px holding objects (the whole image, padded, when smaller)."""
    out = []
    pad = [(0, max(0, size - s)) for s in lab.shape]
    if any(p[1] for p in pad):
        img = np.pad(img, pad, mode="reflect")
        lab = np.pad(lab, pad)
    ys, xs = np.nonzero(lab)
    for _ in range(n):
        k = int(rng.integers(ys.size))
        y0 = int(np.clip(ys[k] - size // 2, 0, lab.shape[0] - size))
        x0 = int(np.clip(xs[k] - size // 2, 0, lab.shape[1] - size))
        out.append((img[y0 : y0 + size, x0 : x0 + size], lab[y0 : y0 + size, x0 : x0 + size]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default="../shared/data/real/dsb2018-stage1-fluo")
    ap.add_argument("--real-images", type=int, default=6)
    ap.add_argument("--sizes", type=int, default=3, help="object sizes per real image")
    ap.add_argument("--per-size", type=int, default=2, help="crops per image and size")
    ap.add_argument("--generated", type=int, default=12)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="pretrained:nuclei")
    ap.add_argument("--out", default="src/napari_unet/models/nuclei/replay.npz")
    args = ap.parse_args()
    if args.real_images > 6:
        ap.error("--real-images: the DSB2018 images after the 6th by name are for scoring only")
    seg = (
        nu.Segmenter.pretrained(args.model.split(":", 1)[1])
        if args.model.startswith("pretrained:")
        else nu.Segmenter.load(args.model)
    )
    d = float(seg.config["diameter"])
    rng = np.random.default_rng(args.seed)
    names, r_imgs, r_labs = load_real(args.real, args.real_images)
    pieces, sources = [], []
    for name, img, lab in zip(names, r_imgs, r_labs, strict=True):
        for _ in range(args.sizes):
            i2, l2 = at_size(img, lab, d * jitter(rng))
            pieces += [(i2, c) for c in crops(i2, l2, args.per_size, args.size, rng)]
        sources.append(f"DSB2018 stage1 {name} (Caicedo et al. 2019, CC0)")
    g_imgs, g_labs = generated_set(args.generated, d, 7000 + args.seed, size=args.size)
    pieces += [(i, (i, lb)) for i, lb in zip(g_imgs, g_labs, strict=True)]
    sources.append(f"{args.generated} generated realistic nuclei images (seed {7000 + args.seed})")
    images, labels = [], []
    for whole, (im, lb) in pieces:
        _, _, lo, hi = seg._prepare(np.asarray(whole, np.float32), "YX", None)
        x = _normalizer(lo, hi, channel_axis=0, ndim=2)(np.asarray(im, np.float32)[None])[0]
        images.append(np.clip(x, -10, 10).astype(np.float16))
        _, lab_c = np.unique(lb, return_inverse=True)
        labels.append(lab_c.reshape(lb.shape).astype(np.uint16))
    norm = seg.config["normalization"]
    out = Path(args.out)
    tmp = fileio.temp_file(out.parent, f".{out.name}.")  # the bank replaced whole, or not at all
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                images=np.stack(images),
                labels=np.stack(labels),
                sources=np.array(sources),
                diameter=np.float32(d),
                normalization=np.array([norm["method"], str(norm["low"]), str(norm["high"])]),
            )
        fileio.fsync_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        fileio.unlink_quietly(tmp)
        raise
    size = os.path.getsize(args.out) / 1e6
    print(f"{len(images)} crops of {args.size} px ({size:.1f} MB) -> {args.out}")


if __name__ == "__main__":
    main()
