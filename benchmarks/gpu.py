"""Prediction throughput on a GPU: megapixels per second, end to end and network alone.

Command, on a machine with CUDA (about 5 minutes on one GPU)::

    python benchmarks/gpu.py
    python benchmarks/gpu.py --device cpu --quick      # smoke run of the script itself

For the shipped starter (``nuclei``, base 16, depth 3) and the reference U-Net (``UNet(1, 3)``,
31M parameters) on a generated 4096x4096 image of nuclei (``--size``), each variant of the
forward pass is timed over 512x512 tiles (batch ``--batch``):

* fp32, contiguous memory;
* fp32, channels_last;
* autocast bf16 (or fp16 where bf16 is not supported), channels_last;
* the same under ``torch.compile`` (``--no-compile`` skips it; compile time is reported apart);

then ``Segmenter.predict`` end to end (tiles, blending, post-processing on the CPU) with the
starter, and the post-processing alone, so that it shows whether the post-processing is the
bottleneck once the network runs on the GPU. Every row gives megapixels per second and the peak
device memory (``torch.cuda.max_memory_allocated``). The load average is printed first; each
measurement is repeated (``--repeats``) and the fastest kept.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="image side (default 4096)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
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
    base = make_realistic_nuclei((1024, 1024), seed=3, radius=(6.0, 12.0))[0]
    reps = -(-size // 1024)
    image = np.ascontiguousarray(np.tile(base, (reps, reps))[:size, :size])
    tiles = _tiles(image, 512)
    half = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    rows = []
    starter = Segmenter.pretrained("nuclei")
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
        for label, fmt, amp in variants:
            model = net.to(memory_format=fmt)
            C.say_load(f"{name}: {label}")
            rate, peak = _forward_rate(model, tiles, dev, args.batch, fmt, amp, args.repeats)
            rows.append([name, label, rate, peak, None])
            if not args.no_compile and not args.quick:
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
    # end to end with the starter: tiles, blending, post-processing (CPU)
    starter.predict(image[:1024, :1024], device=dev)
    _reset_peak(dev)
    C.say_load("starter: Segmenter.predict end to end")
    pred = min((C.timed(lambda: starter.predict(image, device=dev)) for _ in range(args.repeats)),
               key=lambda r: r.seconds)
    p = pred.value
    rows.append(["starter", f"Segmenter.predict end to end ({p.engine})",
                 image.size / 1e6 / pred.seconds, _peak_mb(dev), None])
    rows.append(["starter", "of which post-processing (CPU)",
                 image.size / 1e6 / max(p.postprocess_seconds, 1e-9), None, None])
    print(C.table(["network", "variant", "Mpx/s", "peak MB", "compile s"], rows,
                  title=f"{size}x{size}, 512x512 tiles, batch {args.batch}, {dev}"))
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
