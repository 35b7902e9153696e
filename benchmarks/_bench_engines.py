"""Part e of bench_predict.py: end-to-end prediction per engine against the bare network.

For each image (generated realistic nuclei and uniform noise, 2048^2 and 4096^2; a real DSB2018
image reflected to 2048^2 when the shared folder is given), in one run:

* **bare torch**: the shipped starter's network as it is (eval, channels_last,
  ``torch.inference_mode``), over non-overlapping 512x512 tiles covering the image, inputs
  normalised and cut beforehand, batch 2, no softmax, no stitching, no post-processing: the
  baseline of every ratio;
* **bare torch, BatchNorm folded**: the same with :func:`napari_unet.engines.fused_copy`
  (for reference: what the torch engine runs);
* **predict, engine X**: ``Segmenter.predict(image, engine=X)`` end to end with default settings
  (object size estimated, tiles, blending, post-processing), after one warm-up call (the engine's
  export is cached);
* **post-processing alone**: ``Segmenter._postprocess`` on the probabilities of that prediction;
* **bare torch at predict's zoom**, when ``predict`` resized the image for its object size
  (``Prediction.zoom``; small nuclei are enlarged, so the network sees zoom^2 times the
  pixels): the bare forward over the resized image. The last column gives every row's time
  against it: the ratio over the pixels the network was given.
"""

from __future__ import annotations

import os
from pathlib import Path

import _common as C
import numpy as np
import torch

from napari_unet import engines
from napari_unet.segmenter import Segmenter
from napari_unet.synthetic import make_realistic_nuclei


def _images(sizes, real_folder: str | None):
    rng = np.random.default_rng(0)
    base = make_realistic_nuclei((1024, 1024), seed=3, radius=(6.0, 12.0))[0]
    for size in sizes:
        reps = -(-size // 1024)
        yield f"generated nuclei {size}^2", np.ascontiguousarray(np.tile(base, (reps, reps))[
            :size, :size
        ])
        yield f"uniform noise {size}^2", rng.integers(0, 4000, (size, size)).astype(np.uint16)
    if real_folder:
        import tifffile

        files = sorted((Path(real_folder) / "images").glob("*.tif"))
        if files:
            img = tifffile.imread(files[-1])
            if img.ndim == 3:
                img = img[..., 0]
            n = 2048
            reps = [-(-n // s) for s in img.shape]
            widths = [(0, r * s - s) for r, s in zip(reps, img.shape, strict=True)]
            big = np.pad(img, widths, mode="reflect")
            yield f"real {files[-1].stem} reflected to {n}^2", np.ascontiguousarray(
                big[:n, :n]
            )


def _bare(net, xn: np.ndarray, tile: int = 512, batch: int = 2):
    from bench_predict import bare_forward, cut_tiles

    tiles = cut_tiles(xn, tile)
    return lambda: bare_forward(net, tiles, batch)


def part_e(args) -> str:
    seg = Segmenter.pretrained("nuclei")
    sizes = (1024,) if args.quick else (2048, 4096)
    names = ["torch"] + engines.available_engines()
    print(f"\n## e. end to end per engine (starter model; engines here: {', '.join(names)})")
    net = seg.net.eval().to(memory_format=torch.channels_last)
    fused = engines.fused_copy(seg.net).to(memory_format=torch.channels_last)
    rows = []
    from bench_predict import measure, normalised, warm_up

    warm_up(net, 512, 2)
    warm_up(fused, 512, 2)
    for what, image in _images(sizes, getattr(args, "real", None)):
        first = len(rows)
        xn = normalised(seg, image)
        bare = measure(_bare(net, xn), f"bare torch, {what}", args.noisy, args.max_tries)
        rows.append([what, "bare torch (baseline)", bare.seconds, 1.0, None, None, bare.others])
        f = measure(_bare(fused, xn), f"bare torch folded, {what}", args.noisy, args.max_tries)
        rows.append([what, "bare torch, BN folded", f.seconds, f.seconds / bare.seconds, None,
                     None, f.others])
        del xn
        for e in names:
            seg.predict(image[:1024, :1024], engine=e)  # export + compile outside the clock
            r = measure(lambda e=e, im=image: seg.predict(im, engine=e), f"predict {e}, {what}",
                        args.noisy, args.max_tries)
            p = r.value
            if p.engine != e:
                print(f"   (engine {e} fell back to {p.engine}: {p.notes})")
            rows.append([what, f"predict, {e}", r.seconds, r.seconds / bare.seconds,
                         int(p.labels.max()), p.postprocess_seconds, r.others])
        probs = p.probabilities[:, None, None] if p.probabilities.ndim == 3 else None
        if probs is not None:
            pp = measure(lambda pr=probs: seg._postprocess(pr), f"post-processing, {what}",
                         args.noisy, args.max_tries)
            rows.append([what, "post-processing alone", pp.seconds, pp.seconds / bare.seconds,
                         int(pp.value.max()), None, pp.others])
        at_zoom = bare
        if abs(p.zoom - 1.0) > 1e-3:
            from napari_unet.scale import resize_image, zoomed_shape

            xz = resize_image(normalised(seg, image), zoomed_shape(image.shape, p.zoom))
            at_zoom = measure(_bare(net, xz), f"bare torch at zoom {p.zoom:.2f}, {what}",
                              args.noisy, args.max_tries)
            del xz
            rows.append([what, f"bare torch at predict's zoom {p.zoom:.2f}", at_zoom.seconds,
                         at_zoom.seconds / bare.seconds, None, None, at_zoom.others])
        for r in rows[first:]:
            r.append(r[2] / at_zoom.seconds)
        del p, probs
    print(f"load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out = C.table(
        ["image", "what", "seconds", "x bare torch", "objects", "of it post", "others %",
         "x bare at predict's zoom"],
        [r[:6] + [round(100 * r[6]), r[7]] for r in rows],
        title=f"e. prediction end to end vs the bare network (torch threads "
        f"{torch.get_num_threads()}, 512x512 tiles, batch 2)",
    )
    print(out, flush=True)
    return out
