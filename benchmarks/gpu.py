"""Prediction and training on a GPU: megapixels per second, end to end and network alone.

Command, on a machine with CUDA (about 5 minutes on one GPU, 3 more with part f)::

    python benchmarks/gpu.py --profile-out profile.txt \\
        --real-2d ../shared/data/real/dsb2018-stage1-fluo \\
        --real-3d ../shared/data/real/gonuclear-arabidopsis-ovule-3d:0.2837,0.1268,0.1268
    python benchmarks/gpu.py --device cpu --quick      # smoke run of the script itself

The real-data folders are not in the repository: on another machine, copy them there and
give their paths.

Parts (``--parts``, default all; printed in this order, each in its own table, and one part
failing does not lose the others):

b. ``Segmenter.predict`` end to end with default settings (object size estimated, tiles,
   blending, post-processing on the CPU) on generated nuclei at 2048x2048 and 4096x4096
   (``--size``) and on uniform noise, against the bare bf16 forward of the starter
   (channels_last, BatchNorm folded, batch 8) over the same pixels, with the post-processing
   apart: whether it is the bottleneck once the network runs on the GPU. On CUDA, the same
   2048x2048 prediction on the machine's CPU cores too (the GPU's speed-up).
c. A generated 64x512x512 volume, ``nuclei-volumes`` with the 3D assembly, end to end.
d. Fine-tuning throughput: ``Segmenter.finetune`` with its defaults (batch 8 of 64x64) and,
   on CUDA, batch 64 of 128x128, each against a bare training step of the same network with
   the data already on the device (``--train-seconds``).
e. cProfile of one 2048x2048 prediction (the main thread, by own time; ``--profile-out`` keeps
   the whole listing).
f. Real data, with ``--real-2d FOLDER`` (DSB2018-like ``images/`` + ``masks/``: the first 6 by
   name trained on, the others scored) and ``--real-3d FOLDER:Z,Y,X`` (volumes: 30 s on the
   top half, the bottom half scored, ``benchmarks/real_3d.py``'s protocol): what the same
   budgets buy on the GPU (steps and F1 after 15 s and 60 s; after 30 s for volumes).
a. Each variant of the forward pass for the shipped starter (``nuclei``, base 16, depth 3) and
   the reference U-Net (``UNet(1, 3)``, 31M parameters) over 512x512 tiles (``--batch``):
   fp32 contiguous, fp32 channels_last, autocast bf16 (fp16 where bf16 is not supported)
   channels_last, and that last one under ``torch.compile`` (``--no-compile`` skips it; the
   compile time is reported apart). Last, because compiling takes minutes.

Every row gives its peak device memory (``torch.cuda.max_memory_allocated``). The load average
is printed before each measurement; each is repeated (``--repeats``) and the fastest kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from napari_unet.engines import fused_copy  # noqa: E402
from napari_unet.model import UNet  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402
from napari_unet.synthetic import make_realistic_nuclei  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _tiles(image: np.ndarray, tile: int) -> np.ndarray:
    x = image.astype(np.float32)
    x = (x - x.mean()) / max(float(x.std()), 1e-6)
    n = image.shape[0] // tile
    t = x[: n * tile, : n * tile].reshape(n, tile, n, tile).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(-1, 1, tile, tile))


def _forward_rate(net, tiles, dev, batch, fmt, amp, repeats) -> tuple[float, float | None]:
    """Megapixels per second of ``net`` over ``tiles`` (host to device copies included)."""
    x_all = torch.from_numpy(tiles)

    def run():
        with torch.inference_mode(), amp():
            for i in range(0, len(x_all), batch):
                x = x_all[i : i + batch].to(dev, non_blocking=True)
                net(x.contiguous(memory_format=fmt)).float().softmax(1).cpu()
        _sync(dev)

    run()  # warm-up: kernels chosen, compiled graphs built
    _reset_peak(dev)
    best = min(C.timed(run).seconds for _ in range(repeats))
    return tiles.size / 1e6 / best, _peak_mb(dev)


def _bare_seconds(net, image: np.ndarray, dev, batch: int, amp) -> float:
    """Seconds of the bare forward (the predictor's own settings) over ``image``'s pixels."""
    tiles = _tiles(image, 512)
    fmt = torch.channels_last
    rate, _ = _forward_rate(net.to(memory_format=fmt), tiles, dev, batch, fmt, amp, 3)
    return image.size / 1e6 / rate


def _end_to_end(starter, dev, amp, size: int, repeats: int) -> list[list]:
    """Part b: ``Segmenter.predict`` end to end against the bare forward over the same pixels,
    on generated nuclei and on uniform noise, with the post-processing apart."""
    base = make_realistic_nuclei((1024, 1024), seed=3, radius=(6.0, 12.0))[0]
    net = fused_copy(starter.net).to(dev)
    rows = []
    sides = [s for s in (2048, 4096) if s <= size] or [size]
    images = [(f"nuclei {s}x{s}", _tiled(base, s)) for s in sides]
    noise = np.random.default_rng(0).random((size, size), dtype=np.float32)
    images.append((f"noise {size}x{size}", noise))
    for name, image in images:
        bare = _bare_seconds(net, image, dev, 8, amp)
        starter.predict(image[:1024, :1024], device=dev)  # warm-up
        _reset_peak(dev)
        C.say_load(f"predict end to end: {name} on {dev}")
        best = min((C.timed(lambda im=image: starter.predict(im, device=dev))
                    for _ in range(repeats)), key=lambda r: r.seconds)
        p = best.value
        rows.append([name, f"{dev}", p.engine, bare, best.seconds, p.postprocess_seconds,
                     best.seconds - p.postprocess_seconds, best.seconds / bare,
                     int(p.labels.max()), _peak_mb(dev)])
    if dev.type == "cuda":  # the same machine's CPU cores, the fastest CPU engine: the speedup
        image = images[0][1]
        C.say_load(f"predict end to end: {images[0][0]} on this machine's CPU")
        starter.predict(image[:1024, :1024], device="cpu")
        r = C.timed(lambda: starter.predict(image, device="cpu"))
        p = r.value
        rows.append([images[0][0], f"cpu ({torch.get_num_threads()} threads)", p.engine, None,
                     r.seconds, p.postprocess_seconds, r.seconds - p.postprocess_seconds, None,
                     int(p.labels.max()), None])
    return rows


def _tiled(base: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps))[:size, :size])


def _volume(dev, repeats: int) -> list[list]:
    """Part c: a generated 64x512x512 volume, the 2D volume starter with the 3D assembly."""
    from napari_unet.synthetic3d import make_nuclei_3d

    block, _ = make_nuclei_3d((16, 128, 128), anisotropy=2.0, seed=0)
    vol = np.tile(block, (4, 4, 4))
    seg = Segmenter.pretrained("nuclei-volumes")
    seg.predict(vol[:8], "ZYX", scale=(2, 1, 1), device=dev)
    _reset_peak(dev)
    C.say_load(f"volume 64x512x512 on {dev}")
    best = min((C.timed(lambda: seg.predict(vol, "ZYX", scale=(2, 1, 1), device=dev))
                for _ in range(repeats)), key=lambda r: r.seconds)
    p = best.value
    return [["64x512x512", "nuclei-volumes", best.seconds, p.postprocess_seconds,
             best.seconds - p.postprocess_seconds, vol.size / 1e6 / best.seconds,
             int(p.labels.max()), _peak_mb(dev)]]


def _training(dev, seconds: float) -> list[list]:
    """Part d: ``Segmenter.finetune`` throughput (its defaults, then bigger batches where a GPU
    has room) against a bare training step of the same network on ``dev``."""
    from napari_unet.finetune import BATCH_2D, PATCH_2D
    from napari_unet.synthetic import make_nuclei

    imgs, labs = zip(*(make_nuclei((256, 256), seed=s)[:2] for s in range(4)), strict=True)
    rows = []
    settings = [(BATCH_2D, PATCH_2D)]
    if dev.type == "cuda":
        settings.append((64, (128, 128)))
    for batch, patch in settings:
        seg = Segmenter.pretrained("nuclei")
        _reset_peak(dev)
        label = f"Segmenter.finetune, batch {batch}, patches {patch[0]}x{patch[1]}"
        C.say_load(f"{label}, {seconds:.0f} s on {dev}")
        last = None
        for ev in seg.finetune(list(imgs), list(labs), time_limit_s=seconds, device=dev,
                               batch_size=batch, patch_shape=patch):
            last = ev
        rows.append([label, last.step, last.step / max(last.seconds, 1e-9), last.patches_per_s,
                     _peak_mb(dev)])
        n, dt = _bare_train_steps(dev, batch, patch, min(seconds, 5.0))
        rows.append([f"bare step, batch {batch}, {patch[0]}x{patch[1]}, data on the device", n,
                     n / dt, batch * n / dt, _peak_mb(dev)])
    return rows


def _bare_train_steps(dev, batch: int, patch, seconds: float) -> tuple[int, float]:
    """(steps, seconds) of a bare training loop of the starter's network: random tensors
    already on ``dev``, channels_last, plain cross-entropy, AdamW."""
    net = Segmenter.pretrained("nuclei").net.to(dev).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randn(batch, 1, *patch, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch, *patch), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    _sync(dev)
    return n, time.perf_counter() - t0


def _real(dev, real_2d: str | None, real_3d: list[str], quick: bool = False) -> list[list]:
    """Part f: the starter, then fine-tunes of the usual budgets on ``dev``, on real data
    (``quick``: 3 s budgets, a smoke run)."""
    import real as R2
    import real_3d as R3

    rows = []
    if real_2d:
        pairs = R2.load(real_2d)
        train, test = pairs[:6], pairs[6:]
        start = Segmenter.pretrained("nuclei")
        f0 = R2.score(start, test)[0]
        name = Path(real_2d).name
        rows.append([f"{name}: starter (scored: the last {len(test)})", "-", f0, None])
        for budget in (3.0,) if quick else (15.0, 60.0):
            seg = start.copy()
            C.say_load(f"{name}: fine-tune {budget:.0f} s on {dev}")
            last = None
            for last in seg.finetune(  # noqa: B007 - the last event is kept
                [p[1] for p in train], [p[2] for p in train], time_limit_s=budget, device=dev
            ):
                pass
            f1 = R2.score(seg, test)[0]
            rows.append([f"{name}: fine-tune {budget:.0f} s on the first 6",
                         last.step, f1, f1 - f0])
    for spec in real_3d:
        for f, img, gt, voxel in R3.read_volumes(*R3.volume_spec(spec)):
            half = gt.shape[1] // 2
            seg = Segmenter.pretrained("nuclei-volumes")
            b0 = R3.f1_bottom(seg.predict(img, "ZYX", scale=voxel, device=dev).labels, gt, half)
            budget = 3.0 if quick else 30.0
            C.say_load(f"{f}: {budget:.0f} s on the top half on {dev}")
            last = None
            for last in seg.finetune(  # noqa: B007 - the last event is kept
                img, gt, masks=R3.top_half(gt), axes="ZYX", time_limit_s=budget, device=dev
            ):
                pass
            b1 = R3.f1_bottom(seg.predict(img, "ZYX", scale=voxel, device=dev).labels, gt, half)
            rows.append([f"{f}: bottom half, untrained", "-", b0, None])
            rows.append([f"{f}: bottom half after {budget:.0f} s on the top half", last.step, b1,
                         b1 - b0])
    return rows


def _profile(starter, dev, size: int, out: str | None) -> None:
    """Part e: where the end-to-end time goes (the main thread's cProfile, by own time)."""
    import cProfile
    import io
    import pstats

    image = _tiled(make_realistic_nuclei((1024, 1024), seed=3, radius=(6.0, 12.0))[0], size)
    starter.predict(image, device=dev)
    prof = cProfile.Profile()
    prof.enable()
    starter.predict(image, device=dev)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    text = buf.getvalue()
    if out:  # atomically: a reader never sees half a profile
        tmp = Path(out).with_name(Path(out).name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, out)
    print(f"\nprofile of one {size}x{size} prediction on {dev} (own time, top 25):")
    print("\n".join(text.splitlines()[:45]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="image side (default 4096)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="abcdef")
    ap.add_argument("--train-seconds", type=float, default=15.0)
    ap.add_argument("--profile-out", default=None, help="write part e's whole profile here")
    ap.add_argument("--real-2d", default=None, metavar="FOLDER", help="part f: 2D TIFF pairs")
    ap.add_argument("--real-3d", action="append", default=[], metavar="FOLDER:Z,Y,X",
                    help="part f: volumes and their voxel size (repeatable)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (use --device cpu for a smoke run)")
        return
    size = args.size or (1024 if args.quick else 4096)
    C.header("gpu")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    half = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    amp = (lambda: torch.autocast("cuda", dtype=half)) if dev.type == "cuda" else nullcontext
    starter = Segmenter.pretrained("nuclei")
    tables = []
    parts = [
        ("b", lambda: C.table(
            ["image", "device", "engine", "bare forward s", "end to end s", "post-processing s",
             "rest s", "vs bare", "objects", "peak MB"],
            _end_to_end(starter, dev, amp, size, args.repeats),
            title="b. Segmenter.predict end to end (default settings) vs the bare bf16 forward "
                  "(channels_last, batch 8) over the same pixels")),
        ("c", lambda: C.table(
            ["volume", "model", "end to end s", "3D assembly s", "rest s", "Mvoxel/s",
             "objects", "peak MB"], _volume(dev, args.repeats),
            title="c. a volume, end to end")),
        ("d", lambda: C.table(
            ["training", "steps", "steps/s", "patches/s", "peak MB"],
            _training(dev, 3.0 if args.quick else args.train_seconds),
            title="d. fine-tuning throughput")),
        ("e", lambda: _profile(starter, dev, min(size, 2048), args.profile_out)),
        ("f", lambda: C.table(
            ["real data", "steps", "F1", "vs untrained"],
            [[n, st, f"{f:.3f}", None if d is None else f"{d:+.3f}"]
             for n, st, f, d in _real(dev, args.real_2d, args.real_3d, args.quick)],
            title=f"f. real data: fine-tuning budgets on {dev}",
        ) if args.real_2d or args.real_3d else ""),
        ("a", lambda: _forwards(starter, dev, half, size, args)),  # last: compiles take long
    ]
    for key, fn in parts:
        if key not in args.parts:
            continue
        try:
            text = fn()
        except Exception:  # noqa: BLE001 - one part failing must not lose the others' numbers
            import traceback

            text = f"part {key} failed:\n{traceback.format_exc()}"
        if text:
            tables.append(text)
            print(text, flush=True)
    print("\n\n".join(["", *tables]))
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _forwards(starter, dev, half, size: int, args) -> str:
    """Part a: each variant of the forward pass, for the starter and the reference U-Net."""
    base = make_realistic_nuclei((1024, 1024), seed=3, radius=(6.0, 12.0))[0]
    tiles = _tiles(_tiled(base, size), 512)
    rows = []
    nets = {"starter": starter.net, "reference UNet(1, 3)": UNet(1, 3)}
    for name, raw in nets.items():
        net = fused_copy(raw).to(dev)
        variants = [
            ("fp32", torch.contiguous_format, nullcontext),
            ("fp32 channels_last", torch.channels_last, nullcontext),
        ]
        if dev.type == "cuda":
            variants.append((f"{str(half)[6:]} autocast channels_last", torch.channels_last,
                             lambda: torch.autocast("cuda", dtype=half)))
        for i, (label, fmt, amp) in enumerate(variants):
            model = net.to(memory_format=fmt)
            C.say_load(f"{name}: {label}")
            rate, peak = _forward_rate(model, tiles, dev, args.batch, fmt, amp, args.repeats)
            rows.append([name, label, rate, peak, None])
            # torch.compile of the fastest variant only (the last): each compile takes minutes
            if not args.no_compile and not args.quick and i == len(variants) - 1:
                t0 = time.perf_counter()
                compiled = torch.compile(model)
                try:
                    rate, peak = _forward_rate(
                        compiled, tiles, dev, args.batch, fmt, amp, args.repeats
                    )
                    rows.append([name, label + " + torch.compile", rate, peak,
                                 time.perf_counter() - t0])
                except Exception as e:  # noqa: BLE001 - no compiler toolchain: say so
                    rows.append([name, f"{label} + torch.compile failed: {type(e).__name__}",
                                 None, None, None])
        del net
    return C.table(["network", "variant", "Mpx/s", "peak MB", "compile s"], rows,
                   title=f"a. the forward pass, {size}x{size}, 512x512 tiles, batch {args.batch}, "
                         f"{dev}")


if __name__ == "__main__":
    main()
