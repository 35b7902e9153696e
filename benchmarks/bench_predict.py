"""Prediction benchmarks on the CPU: tiling overhead, working memory, reference U-Net.

Command (full run, about 7 minutes on 2 idle cores)::

    python benchmarks/bench_predict.py

Smoke run (1-3 minutes)::

    python benchmarks/bench_predict.py --quick

Engine table (issue 13; about 6 minutes on 2 idle cores)::

    python benchmarks/bench_predict.py --parts e --real ../shared/data/real/dsb2018-stage1-fluo

Options: ``--parts eabc`` (any subset), ``--threads N`` (torch intra-op threads, default: torch's
default = all cores), ``--tiles 256,512,1024`` (part a), ``--ref-sizes 1024`` (part c),
``--train-steps N``, ``--max-tries K``, ``--wait-quiet S``, ``--noisy F``.

Parts
-----
e. End to end per inference engine vs the bare network, on generated nuclei and noise at
   2048^2 and 4096^2 (and a real image with ``--real FOLDER``), post-processing alone too: see
   ``benchmarks/_bench_engines.py``.
a. ``Segmenter.predict`` of a 4096x4096 uint16 image (a 1024x1024 ``make_nuclei`` image tiled
   4x4) with the default model (``Segmenter.new()``: base 16, depth 3), after a short training
   (``--train-steps``, default 60 steps of ``Segmenter.finetune`` with its defaults) on two
   256x256 ``make_nuclei`` images so that the probabilities look like nuclei and the
   post-processing has realistic work. Compared, in the same run, with the bare network
   forward: the same model in ``torch.inference_mode``, channels_last, the same tile size and
   batch size, over non-overlapping tiles covering the same pixels, inputs normalised and cut
   beforehand, no softmax, no stitching. Goal: (predict - post-processing) / bare <= 1.3.
   Tile sizes 256/512/1024 are compared (``--tiles 544`` adds the smallest multiple of 16 that
   covers 4096 with 8 tiles overlapping by 32; it has no bare run of its own).
b. Working memory of ``predict`` on 2048^2, 4096^2, 8192^2 images, each in a fresh subprocess:
   peak RSS (kernel high-water mark ``VmHWM``, cross-checked with a 5 ms sampling thread) minus
   the RSS after imports, model loading and creating the input, minus the returned arrays
   (probabilities ``(3, H, W)`` float32 when returned, labels int32). Goal: < 1 GB, not
   growing with the image. The smallest size is also run with ``return_probabilities=False``.
c. The reference U-Net (``UNet(1, 3)``, 31M parameters) run naively on the whole image at once
   vs wrapped in a Segmenter (tiled), and the default small model, on a 1024^2 image
   (``--ref-sizes 1024,2048`` adds 2048^2: about 6 more minutes with 1 thread): time and
   working memory side by side (each in a fresh subprocess).

Every measurement prints the 1-min load average first; the tables show how busy *other*
processes kept the CPUs during the measurement ("others %"). Before each measurement the script
waits up to ``--wait-quiet`` seconds for a quiet moment; a measurement disturbed by more than
``--noisy`` (default: 15 % of the CPUs, or the share of the cores torch does not use plus 5 %
when ``--threads`` is below the core count) is repeated up to ``--max-tries`` times and the
fastest try is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from napari_unet.data import make_nuclei, percentile_range  # noqa: E402
from napari_unet.metrics import average_precision, instance_f1  # noqa: E402
from napari_unet.model import UNet, count_parameters  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402
from napari_unet.tiling import plan_tiles  # noqa: E402

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ helpers
def big_image(base: np.ndarray, size: int) -> np.ndarray:
    """``base`` tiled to ``size x size`` (cropped)."""
    reps = -(-size // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps))[:size, :size])


def normalised(seg: Segmenter, image: np.ndarray) -> np.ndarray:
    norm = seg.config["normalization"]
    lo, hi = percentile_range(image, norm["low"], norm["high"])
    return ((image.astype(np.float32) - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def cut_tiles(x: np.ndarray, tile: int) -> np.ndarray:
    """(H, W) -> (n, 1, tile, tile) non-overlapping tiles (zero-padded to a multiple)."""
    h, w = x.shape
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    if (ph, pw) != (h, w):
        x = np.pad(x, ((0, ph - h), (0, pw - w)))
    t = x.reshape(ph // tile, tile, pw // tile, tile).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(-1, 1, tile, tile))


def bare_forward(net: torch.nn.Module, tiles: np.ndarray, batch_size: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            x = torch.from_numpy(tiles[i : i + batch_size])
            net(x.contiguous(memory_format=torch.channels_last))


def warm_up(net: torch.nn.Module, tile: int, batch_size: int) -> None:
    """Create the oneDNN primitives of every batch shape used below, outside the clock."""
    with torch.inference_mode():
        for b in sorted({batch_size, 1}):
            x = torch.zeros(b, 1, tile, tile).contiguous(memory_format=torch.channels_last)
            net(x)


def measure(fn, what: str, noisy: float, max_tries: int) -> C.Timed:
    """Run ``fn`` until a try is undisturbed (others < noisy) or max_tries; fastest try."""
    best: C.Timed | None = None
    for k in range(max_tries):
        C.say_load(what + (f" (try {k + 1})" if k else ""))
        r = C.timed(fn)
        if best is None or r.seconds < best.seconds:
            best = r
        if r.others < noisy:
            break
    assert best is not None
    return best


def run_child(spec: dict, timeout: float = 1200) -> dict:
    """Run this script in child mode in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, str(HERE), "--child", json.dumps(spec)]
    with C.Contention() as c:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res.setdefault("others", c.others)
            return res
    tail = (p.stdout + p.stderr)[-2000:]
    return {"error": f"child exited with {p.returncode}: {tail}"}


# ------------------------------------------------------------------------------ model
def train_default(steps: int, threads: int | None) -> tuple[Segmenter, dict]:
    """Default model trained on two 256^2 generated images; F1/AP on a held-out image."""
    seg = Segmenter.new()
    pairs = [make_nuclei((256, 256), seed=s) for s in (0, 1)]
    imgs, labs = [p[0] for p in pairs], [p[1] for p in pairs]
    C.say_load(f"training the default model for {steps} steps on two 256x256 images")
    last = None
    gen = seg.finetune(
        imgs, labs, time_limit_s=None, steps=steps, device="cpu", num_threads=threads
    )
    for event in gen:
        last = event
    test_img, test_lab = make_nuclei((256, 256), seed=100)
    pred = seg.predict(test_img, device="cpu").labels
    info = {
        "steps": last.step if last else 0,
        "seconds": last.seconds if last else 0.0,
        "f1": instance_f1(pred, test_lab),
        "ap": average_precision(pred, test_lab)[0],
    }
    return seg, info


# ------------------------------------------------------------------------------ part a
def part_a(seg: Segmenter, base: np.ndarray, args) -> str:
    size = 1024 if args.quick else 4096
    tiles_to_try = args.tiles
    image = big_image(base, size)
    bs = 2  # the Segmenter's CPU default batch size
    ov = seg.config["overlap"]
    div = seg.net.divisor
    net = seg.net.eval().to(memory_format=torch.channels_last)
    xn = normalised(seg, image)
    npix = size * size
    print(f"\n## a. tiled prediction of a {size}x{size} uint16 image, default model, batch {bs}")
    rows, bare_times = [], {}
    results = []
    for tile in tiles_to_try:
        warm_up(net, tile, bs)
        n_pred = len(plan_tiles((size, size), tile, ov, div))
        bare = None
        if size % tile == 0:
            tiles = cut_tiles(xn, tile)
            bare = measure(
                lambda tiles=tiles: bare_forward(net, tiles, bs),
                f"bare forward, tile {tile}, {len(tiles)} tiles",
                args.noisy,
                args.max_tries,
            )
            bare_times[tile] = bare
            n_bare = len(tiles)
            del tiles
        else:
            n_bare = None

        best = None
        for k in range(args.max_tries):
            again = "retry: " if k else ""
            C.say_load(f"{again}Segmenter.predict, tile {tile}, overlap {ov}, {n_pred} tiles")
            C.settle()
            r0 = C.rss()
            with C.PeakRSS() as mem, C.Contention() as c:
                t0 = time.perf_counter()
                p = seg.predict(image, device="cpu", tile_shape=(tile, tile), num_threads=None)
                wall = time.perf_counter() - t0
            cur = {
                "net": p.seconds - p.postprocess_seconds,
                "post": p.postprocess_seconds,
                "wall": wall,
                "others": c.others,
                "peak": (mem.peak - r0) / C.MiB,
                "objects": int(p.labels.max()),
            }
            del p
            if best is None or cur["net"] < best["net"]:
                best = cur
            if cur["others"] < args.noisy:
                break
        results.append((tile, n_pred, n_bare, bare, best))

    best_bare = min((b.seconds for b in bare_times.values()), default=math.nan)
    for tile, n_pred, n_bare, bare, r in results:
        rows.append(
            [
                f"{tile}" + ("" if size % tile == 0 else " (not a divisor: no bare run)"),
                f"{n_pred} / {n_bare if n_bare else '-'}",
                bare.seconds if bare else math.nan,
                r["net"],
                r["net"] / bare.seconds if bare else math.nan,
                r["net"] / best_bare,
                r["post"],
                npix / r["net"] / 1e6,
                r["peak"],
                r["objects"],
                f"{100 * max(r['others'], bare.others if bare else 0):.0f}",
            ]
        )
    hdr = [
        "tile",
        "tiles predict / bare",
        "bare net [s]",
        "predict - post [s]",
        "ratio (same tile)",
        "ratio vs best bare",
        "post-proc [s]",
        "Mpx/s",
        "peak RSS + [MiB]",
        "objects",
        "others %",
    ]
    out = C.table(hdr, rows, f"a. {size}x{size} uint16, default model (base 16, depth 3)")
    print(out, flush=True)
    return out


# ------------------------------------------------------------------------------ part b
def part_b(model_dir: Path, base_path: Path, args) -> str:
    sizes = (1024, 2048) if args.quick else (2048, 4096, 8192)
    runs = [(s, True) for s in sizes] + [(sizes[0], False)]
    print("\n## b. working memory of predict (fresh subprocess per size)")
    rows = []
    for size, rp in runs:
        C.say_load(f"predict {size}x{size} in a subprocess, return_probabilities={rp}")
        r = run_child(
            {
                "mode": "memory",
                "model": str(model_dir),
                "base": str(base_path),
                "size": size,
                "return_probabilities": rp,
                "threads": args.threads,
            }
        )
        if "error" in r:
            rows.append([f"{size}^2", rp, r["error"][:60]] + [math.nan] * 7)
            continue
        rows.append(
            [
                f"{size}x{size}",
                rp,
                r["returned_mib"],
                r["peak_maxrss_mib"] - r["base_mib"],
                r["working_maxrss_mib"],
                r["working_sampled_tiles_mib"],
                r["working_sampled_post_mib"],
                r["net_s"],
                r["post_s"],
                f"{100 * r['others']:.0f}",
            ]
        )
    hdr = [
        "image",
        "return probs",
        "returned arrays [MiB]",
        "peak - baseline [MiB]",
        "working memory [MiB]",
        "working, tiles phase (sampled)",
        "working, post-proc phase (sampled)",
        "net [s]",
        "post-proc [s]",
        "others %",
    ]
    out = C.table(hdr, rows, "b. predict working memory = peak RSS - baseline - returned arrays")
    print(out, flush=True)
    return out


def child_memory(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    seg = Segmenter.load(spec["model"])
    image = big_image(np.load(spec["base"]), spec["size"])
    C.settle()
    base = C.rss()
    rp = spec["return_probabilities"]
    with C.Contention() as c, C.PeakRSS() as mem:
        mem.mark("tiles")
        gen = seg.predict_iter(image, device="cpu", return_probabilities=rp)
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                pred = stop.value
                break
            if done == total - 1:
                mem.mark("post")
            elif done == total:
                mem.mark("finish")
    peak = C.maxrss()
    returned = pred.labels.nbytes + (pred.probabilities.nbytes if rp else 0)
    ph = mem.phases
    return {
        "base_mib": base / C.MiB,
        "image_mib": image.nbytes / C.MiB,
        "returned_mib": returned / C.MiB,
        "peak_maxrss_mib": peak / C.MiB,
        "working_maxrss_mib": (peak - base - returned) / C.MiB,
        # probabilities exist during both phases, labels only during post-processing
        "working_sampled_tiles_mib": (ph.get("tiles", 0) - base - pred.probabilities.nbytes * rp)
        / C.MiB
        if rp
        else (ph.get("tiles", 0) - base) / C.MiB,
        "working_sampled_post_mib": (max(ph.get("post", 0), ph.get("finish", 0)) - base - returned)
        / C.MiB,
        "net_s": pred.seconds - pred.postprocess_seconds,
        "post_s": pred.postprocess_seconds,
        "objects": int(pred.labels.max()),
        "others": c.others,
    }


# ------------------------------------------------------------------------------ part c
def part_c(model_dir: Path, base_path: Path, args) -> str:
    sizes = args.ref_sizes
    print("\n## c. reference U-Net (31M parameters): naive whole image vs tiled Segmenter")
    ref = UNet(1, 3)
    small = Segmenter.load(model_dir).net
    print(
        f"reference UNet(1, 3): {count_parameters(ref):,} parameters; "
        f"default Segmenter.new(): {count_parameters(small):,} parameters"
    )
    del ref
    rows = []
    for size in sizes:
        for model, how in (
            ("reference", "naive"),
            ("reference", "tiled"),
            ("default", "tiled"),
            ("default", "naive"),
        ):
            C.say_load(f"{model} network, {how}, {size}x{size}, subprocess")
            r = run_child(
                {
                    "mode": "reference",
                    "model": str(model_dir),
                    "base": str(base_path),
                    "size": size,
                    "net": model,
                    "how": how,
                    "threads": args.threads,
                }
            )
            if "error" in r:
                rows.append([f"{size}x{size}", model, how, r["error"][-80:]] + [math.nan] * 4)
                continue
            rows.append(
                [
                    f"{size}x{size}",
                    model,
                    "whole image at once" if how == "naive" else "Segmenter (tiles 512, ov 32)",
                    r["net_s"],
                    size * size / r["net_s"] / 1e6,
                    r["working_mib"],
                    r["peak_mib"],
                    f"{100 * r['others']:.0f}",
                ]
            )
    hdr = [
        "image",
        "network",
        "how",
        "time w/o post-proc [s]",
        "Mpx/s",
        "working memory [MiB]",
        "peak - baseline [MiB]",
        "others %",
    ]
    out = C.table(hdr, rows, "c. reference U-Net vs tiled Segmenter (fresh subprocess each)")
    print(out, flush=True)
    return out


def child_reference(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["net"] == "reference":
        torch.manual_seed(0)
        net = UNet(1, 3)  # reference defaults: base 64, depth 4
        config = Segmenter.new(base_channels=64, depth=4).config
        seg = Segmenter(net, config)
    else:
        seg = Segmenter.load(spec["model"])
    image = big_image(np.load(spec["base"]), spec["size"])
    C.settle()
    base = C.rss()
    try:
        with C.Contention() as c:
            if spec["how"] == "naive":
                t0 = time.perf_counter()
                x = torch.from_numpy(normalised(seg, image))[None, None]
                with torch.inference_mode():
                    prob = seg.net.eval()(x).softmax(1)[0].numpy()
                net_s = time.perf_counter() - t0
                returned = prob.nbytes
            else:
                pred = seg.predict(image, device="cpu")
                net_s = pred.seconds - pred.postprocess_seconds
                returned = pred.probabilities.nbytes + pred.labels.nbytes
    except (MemoryError, RuntimeError) as e:  # torch raises RuntimeError when malloc fails
        return {"error": f"out of memory: {str(e)[:100]}"}
    peak = C.maxrss()
    return {
        "net_s": net_s,
        "peak_mib": (peak - base) / C.MiB,
        "working_mib": (peak - base - returned) / C.MiB,
        "others": c.others,
    }


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each measurement wait up to S s for other processes to calm down "
        "(default 20, quick 0)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--parts", default="eabc")
    ap.add_argument("--real", default=None, help="part e: a folder of images/*.tif (DSB2018)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--train-steps", type=int, default=None, help="default 60 (quick: 3)")
    ap.add_argument("--tiles", default=None, help="part a tile sizes, default 256,512,1024")
    ap.add_argument("--ref-sizes", default=None, help="part c image sizes, default 1024")
    ap.add_argument("--noisy", type=float, default=None, help="others-busy share that is noise")
    ap.add_argument("--max-tries", type=int, default=None, help="default 2 (quick: 1)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        fn = child_memory if spec["mode"] == "memory" else child_reference
        print("RESULT " + json.dumps(fn(spec)), flush=True)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_tries is None:
        args.max_tries = 1 if args.quick else 2
    if args.train_steps is None:
        args.train_steps = 3 if args.quick else 60
    if args.tiles is None:
        args.tiles = "256,512" if args.quick else "256,512,1024"
    args.tiles = tuple(int(t) for t in args.tiles.split(","))
    if args.ref_sizes is None:
        args.ref_sizes = "512" if args.quick else "1024"
    args.ref_sizes = tuple(int(t) for t in args.ref_sizes.split(","))
    ncpu = os.cpu_count() or 1
    used = min(args.threads or torch.get_num_threads(), ncpu)
    if args.noisy is None:
        args.noisy = max(0.15, (ncpu - used) / ncpu + 0.05)
    C.QUIET = args.noisy
    C.WAIT_QUIET_S = (0.0 if args.quick else 20.0) if args.wait_quiet is None else args.wait_quiet
    C.header("bench_predict")
    t_start = time.perf_counter()

    outputs = []
    if "e" in args.parts:
        from _bench_engines import part_e

        outputs.append(part_e(args))
    if not set(args.parts) & set("abc"):
        print("\n".join(outputs))
        return
    seg, info = train_default(args.train_steps, args.threads)
    print(
        f"default model trained {info['seconds']:.0f} s ({info['steps']} steps) on two 256x256 "
        f"make_nuclei images (seeds 0, 1): held-out (seed 100) F1@0.5 {info['f1']:.2f}, "
        f"AP {info['ap']:.2f}",
        flush=True,
    )
    base, _ = make_nuclei((512, 512) if args.quick else (1024, 1024), seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = seg.save(Path(tmp) / "model")
        base_path = Path(tmp) / "base.npy"
        np.save(base_path, base)
        if "a" in args.parts:
            outputs.append(part_a(seg, base, args))
        if "b" in args.parts:
            outputs.append(part_b(model_dir, base_path, args))
        if "c" in args.parts:
            outputs.append(part_c(model_dir, base_path, args))
    print("\n# summary")
    print(
        f"model: default Segmenter.new() trained {info['seconds']:.0f} s ({info['steps']} "
        f"steps), held-out F1@0.5 {info['f1']:.2f}, AP {info['ap']:.2f}"
    )
    print("\n".join(outputs))
    print(
        f"\ntotal time {time.perf_counter() - t_start:.0f} s, load at end "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
