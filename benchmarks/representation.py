"""Which instance representation: three classes + watershed, or a distance map + seeds?

    python benchmarks/representation.py ../shared/data/real/dsb2018-stage1-fluo --seconds 600

Issue 8 leaves the instance representation open. This trains two networks of the starter's
architecture (2D U-Net, base 16, depth 3) **from scratch, on the same data, with the same
budget, loop, patches and augmentation**, one per representation, and scores both the same way:

* ``3class`` (what the package ships): softmax over background / interior / boundary
  (:func:`napari_unet.targets.instance_targets`), trained with the package's weighted
  cross-entropy + Dice (``training._loss``); objects from interior seeds grown by watershed
  over the foreground (:func:`napari_unet.postprocess.instances_from_probabilities`).
* ``distance``: two outputs, the foreground (sigmoid, binary cross-entropy + Dice) and each
  object's distance to its border divided by the object's largest such distance (0 at the
  border, 1 at its centre; sigmoid, binary cross-entropy on the foreground pixels); objects
  from seeds where that map is above a threshold, grown by watershed of the inverted map over
  the foreground.

Data, as ``scripts/train_starter.py`` builds the starter's: the first ``--real-images`` (at
most 6) DSB2018 images by name, each resized to 4 object sizes around 18 px, and
``--generated`` images of :func:`napari_unet.synthetic.make_realistic_nuclei` around that size.
Scored: the last 7 DSB2018 images by name (never trained on) and 12 generated images of unseen
seeds, F1 at IoU 0.5 with objects pooled. To measure the representation and not the object-size
estimate, every scored image is resized so that its true objects have the trained size (the
zoom a perfect estimate would give) and the objects are scored at the original size. Each
representation's one post-processing threshold (seed threshold) is chosen on the **training**
images, from the same number of candidates.

The two trainings run at once, one CPU thread each (``--threads`` per run); the table gives,
per representation: steps, training seconds, the threshold chosen, F1 on the training images,
on the 7 scoring images and on the generated ones, and the post-processing time per scoring
image. ``--seeds 1,2`` repeats with other seeds (weights, patches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import watershed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import machine_line  # noqa: E402
from train_starter import at_size, generated_set, jitter, load_real  # noqa: E402

from napari_unet.metrics import match_instances  # noqa: E402
from napari_unet.model import UNet  # noqa: E402
from napari_unet.normalize import normalize, percentile_range  # noqa: E402
from napari_unet.postprocess import instances_from_probabilities  # noqa: E402
from napari_unet.scale import (  # noqa: E402
    diameter_of_labels,
    resize_image,
    resize_labels,
    zoomed_shape,
)
from napari_unet.targets import IGNORE, instance_targets  # noqa: E402
from napari_unet.training import _loss  # noqa: E402

DIAMETER = 18.0
PATCH, BATCH = 128, 8
SEED_THRESHOLDS = {"3class": (0.5, 0.6, 0.7, 0.8, 0.9), "distance": (0.1, 0.2, 0.3, 0.4, 0.5)}


def norm(img: np.ndarray) -> np.ndarray:
    lo, hi = percentile_range(img, 1.0, 99.8)
    return normalize(img.astype(np.float32), lo, hi).astype(np.float32)


def distance_target(lab: np.ndarray) -> np.ndarray:
    """Each object's distance to its border over its largest one (0..1), 0 outside."""
    out = np.zeros(lab.shape, np.float32)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        obj = lab[box] == i
        d = ndimage.distance_transform_edt(obj)
        if d.max() > 0:
            out[box][obj] = (d / d.max())[obj]
    return out


def targets(rep: str, lab: np.ndarray) -> np.ndarray:
    """(K, Y, X) float targets: 3class -> [class id]; distance -> [foreground, distance]."""
    if rep == "3class":
        return instance_targets(lab)[None].astype(np.float32)
    return np.stack([(lab > 0).astype(np.float32), distance_target(lab)])


def loss_of(rep: str, logits: torch.Tensor, y: torch.Tensor, weight) -> torch.Tensor:
    if rep == "3class":
        return _loss(logits, y[:, 0].long(), weight)
    fg, dist = y[:, 0], y[:, 1]
    p = torch.sigmoid(logits[:, 0])
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], fg)
    dice = 1 - (2 * (p * fg).sum() + 1) / ((p + fg).sum() + 1)
    inside = fg > 0
    dl = F.binary_cross_entropy_with_logits(logits[:, 1][inside], dist[inside]) if inside.any() \
        else logits.sum() * 0  # fmt: skip
    return bce + dice + dl


def instances(rep: str, out: np.ndarray, seed_t: float) -> np.ndarray:
    """Objects from one image's network output (logits ``(K, Y, X)``)."""
    if rep == "3class":
        prob = torch.from_numpy(out).softmax(0).numpy()
        return instances_from_probabilities(prob, seed_threshold=seed_t)
    fg = 1 / (1 + np.exp(-out[0])) > 0.5
    d = 1 / (1 + np.exp(-out[1]))
    seeds, _ = ndimage.label((d > seed_t) & fg)
    seeds = _drop_small(seeds, 3)
    lab = watershed(-d, seeds, mask=fg)
    return _drop_small(lab, 10)


def _drop_small(lab: np.ndarray, n: int) -> np.ndarray:
    sizes = np.bincount(lab.ravel())
    keep = sizes >= n
    keep[0] = False
    lut = np.zeros(sizes.size, np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1)
    return lut[lab]


def forward(net: UNet, x: np.ndarray) -> np.ndarray:
    """Logits of one whole normalised image (padded by reflection to the divisor)."""
    div = net.divisor
    h, w = x.shape
    ph, pw = (-h) % div, (-w) % div
    xp = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
    with torch.inference_mode():
        out = net(torch.from_numpy(xp[None, None].copy()))[0].numpy()
    return out[:, :h, :w]


def at_true_size(img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, float]:
    """The normalised image resized so its true objects are DIAMETER px; and the zoom."""
    f = DIAMETER / diameter_of_labels(lab)
    x = norm(img)
    if abs(f - 1) < 1e-3:
        return x, 1.0
    return resize_image(x, zoomed_shape(lab.shape, f, minimum=16)), f


def score(rep, net, pairs, seed_t) -> tuple[float, float]:
    """Pooled F1 at IoU 0.5 of ``pairs`` scored at their own size; post-processing s/image."""
    tp = fp = fn = 0
    pp = 0.0
    for img, lab in pairs:
        x, f = at_true_size(img, lab)
        out = forward(net, x)
        t = time.perf_counter()
        got = instances(rep, out, seed_t)
        pp += time.perf_counter() - t
        if f != 1.0:
            got = resize_labels(got, lab.shape)
        m = match_instances(got, lab, iou_threshold=0.5)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return 2 * tp / max(2 * tp + fp + fn, 1), pp / max(len(pairs), 1)


def one(rep: str, args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    names, r_imgs, r_labs = load_real(args.folder, args.real_images)
    imgs, tgts, train_pairs = [], [], list(zip(r_imgs, r_labs, strict=True))
    for img, lab in zip(r_imgs, r_labs, strict=True):
        for _ in range(4):
            i2, l2 = at_size(img, lab, DIAMETER * jitter(rng))
            imgs.append(norm(i2))
            tgts.append(targets(rep, l2))
    g_imgs, g_labs = generated_set(args.generated, DIAMETER, args.seed)
    for img, lab in zip(g_imgs, g_labs, strict=True):
        imgs.append(norm(img))
        tgts.append(targets(rep, lab))
    k = 3 if rep == "3class" else 2
    net = UNet(1, k, base_channels=16, depth=3, ndim=2)
    weight = None
    if rep == "3class":
        counts = np.zeros(3)
        for t in tgts:
            v = t[0].astype(np.int64).ravel()
            counts += np.bincount(v[v >= 0], minlength=3)[:3]
        freq = (counts + 1) / (counts.sum() + 3)
        w = freq**-0.5
        weight = torch.as_tensor(w / w.mean(), dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        xs, ys = [], []
        for _ in range(BATCH):
            i = int(rng.integers(len(imgs)))
            x, y = imgs[i], tgts[i]
            x, y = _pad_to(x, PATCH), _pad_to(y, PATCH, fill=IGNORE if rep == "3class" else 0)
            r0 = int(rng.integers(x.shape[-2] - PATCH + 1))
            c0 = int(rng.integers(x.shape[-1] - PATCH + 1))
            x = x[r0 : r0 + PATCH, c0 : c0 + PATCH]
            y = y[:, r0 : r0 + PATCH, c0 : c0 + PATCH]
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, :, ::-1]
            kk = int(rng.integers(4))
            x, y = np.rot90(x, kk), np.rot90(y, kk, axes=(1, 2))
            xs.append(np.ascontiguousarray(x)[None])
            ys.append(np.ascontiguousarray(y))
        xb, yb = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        frac = (time.perf_counter() - t0) / args.seconds
        for g in opt.param_groups:  # cosine decay over the budget
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        loss = loss_of(rep, net(xb), yb, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    train_s = time.perf_counter() - t0
    net.eval()
    scored = _scored(args.folder)
    gen = list(zip(*generated_set(12, DIAMETER, 10_000 + args.seed, size=256), strict=True))
    # the threshold: the best on the training images (at their own size)
    on_train = {t: score(rep, net, train_pairs, t)[0] for t in SEED_THRESHOLDS[rep]}
    best = max(on_train, key=on_train.get)
    f1_scored, pp_s = score(rep, net, scored, best)
    return {
        "rep": rep,
        "seed": args.seed,
        "steps": step,
        "train_s": round(train_s, 1),
        "seed_threshold": best,
        "f1_train": on_train[best],
        "f1_scored": f1_scored,
        "f1_generated": score(rep, net, gen, best)[0],
        "pp_s": pp_s,
    }


def _pad_to(a: np.ndarray, n: int, fill: float = 0.0) -> np.ndarray:
    """Pad the last two axes up to at least n (images reflect, targets ``fill``)."""
    h, w = a.shape[-2:]
    ph, pw = max(0, n - h), max(0, n - w)
    if not (ph or pw):
        return a
    widths = [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]
    if a.ndim == 2:
        return np.pad(a, widths, mode="reflect")
    return np.pad(a, widths, constant_values=fill)


def _scored(folder: str):
    import tifffile

    names = sorted(os.listdir(os.path.join(folder, "images")))[6:]
    return [
        (
            tifffile.imread(os.path.join(folder, "images", n)),
            tifffile.imread(os.path.join(folder, "masks", n)).astype(np.int32),
        )
        for n in names
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the DSB2018 folder (images/ + masks/)")
    ap.add_argument("--seconds", type=float, default=600.0, help="training budget per run")
    ap.add_argument("--real-images", type=int, default=6)
    ap.add_argument("--generated", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child run
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.real_images > 6:
        ap.error("--real-images: the DSB2018 images after the 6th by name are for scoring only")
    if args.one:
        print(json.dumps(one(args.one, args)), flush=True)
        return
    print(machine_line(), flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = [sys.executable, __file__, args.folder, "--seconds", str(args.seconds),
                "--real-images", str(args.real_images), "--generated", str(args.generated),
                "--threads", str(args.threads), "--seed", str(seed)]  # fmt: skip
        procs = [
            subprocess.Popen(base + ["--one", rep], stdout=subprocess.PIPE, text=True)
            for rep in ("3class", "distance")
        ]
        for p in procs:
            out, _ = p.communicate()
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(machine_line(), flush=True)
    print()
    print(
        "| representation | seed | steps | train s | seed threshold (chosen on training) "
        "| F1 training images | F1 7 scoring DSB2018 | F1 12 generated | post-processing s/image |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rep']} | {r['seed']} | {r['steps']} | {r['train_s']:.0f} | "
            f"{r['seed_threshold']} | {r['f1_train']:.3f} | {r['f1_scored']:.3f} | "
            f"{r['f1_generated']:.3f} | {r['pp_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
