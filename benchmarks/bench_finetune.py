"""Fine-tuning benchmarks on the CPU: throughput, and time to a usable model from scratch.

Command (full run, about 6 minutes on 2 idle cores)::

    python benchmarks/bench_finetune.py

Smoke run (1-3 minutes)::

    python benchmarks/bench_finetune.py --quick

The settings sweep that decides the defaults (about 14 minutes; not part of the full run)::

    python benchmarks/bench_finetune.py --parts b --sweep

Options: ``--parts ab``, ``--budget S`` (training budget of part b, default 60 s),
``--threads N`` (part b; default: torch's default = all cores), ``--eval-every S`` (5 s).

Parts
-----
a. Throughput of ``Segmenter.finetune`` (patches 128x128, batch 8) for the default model
   (base 16, depth 3) and a small one (base 8, depth 2) with 1 and 2 torch threads, against a
   bare PyTorch training step measured in the same run (same network, channels_last, random
   tensors already in memory, plain cross-entropy, AdamW: no patch sampling, augmentation,
   Dice term or bookkeeping). The first 3 steps (oneDNN warm-up) are not counted. Each row runs
   in a fresh subprocess; its peak memory is the peak RSS during ``finetune`` minus the RSS
   before it (after imports and data generation).
b. From scratch on generated nuclei (``make_nuclei`` 256x256, touching objects, noise, uneven
   background), 4 training images (seeds 0-3), 2 held-out images (seeds 100, 101): mean
   instance F1 at IoU 0.5 and AP (mean over IoU 0.5:0.95) on the held-out images every
   ``--eval-every`` seconds of training. The clock of the training loop is paused during
   evaluation (``napari_unet.training.time`` is replaced by a pausable clock for the run), so
   the budget and the learning-rate schedule see training time only. Reported: training time
   to F1@0.5 >= 0.8 and >= 0.9, F1 and AP after the budget. Goal: F1 >= 0.9 within 60 s.
   Rows: the core defaults (patch 128x128, batch 8, lr 3e-3 for a fresh model) for both model
   sizes, the best settings found by ``--sweep`` (patch 64/96/128 x lr 3e-3/5e-3), and a naive
   PyTorch loop (uniform random crops, no augmentation, cross-entropy, Adam at a constant 1e-3)
   with the default model and the same budget and evaluation.

Every measurement prints the 1-min load average first; "others %" is how busy *other*
processes kept the CPUs during it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import napari_unet.training as training  # noqa: E402
from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.metrics import average_precision, instance_f1  # noqa: E402
from napari_unet.model import UNet, count_parameters  # noqa: E402
from napari_unet.segmenter import Segmenter  # noqa: E402
from napari_unet.targets import instance_targets  # noqa: E402

MODELS = {"default": (16, 3), "small": (8, 2)}
TRAIN_SEEDS = (0, 1, 2, 3)
TEST_SEEDS = (100, 101)
# best settings of the sweep (patch, lr) per model, see docs/benchmarks.md
TUNED = {"default": ((64, 64), 3e-3), "small": ((64, 64), 5e-3)}


def dataset(seeds, size=256):
    pairs = [make_nuclei((size, size), seed=s) for s in seeds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ------------------------------------------------------------------------------ part a
def quiet_share(threads: int) -> float:
    """Share of the CPUs other processes may use without disturbing ``threads`` threads."""
    ncpu = os.cpu_count() or 1
    return max(0.15, (ncpu - min(threads, ncpu)) / ncpu + 0.05)


def bare_steps(net: torch.nn.Module, seconds: float, patch: int, batch: int) -> tuple[float, int]:
    """Patches/s of a plain training step on tensors already in memory (after 3 warm-up)."""
    net.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, patch, patch, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 3, (batch, patch, patch), generator=g)
    n, t_start = 0, None
    while True:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += 1
        if n == 3:
            t_start = time.perf_counter()
        elif n > 3 and time.perf_counter() - t_start >= seconds:
            return (n - 3) * batch / (time.perf_counter() - t_start), n


def finetune_steps(seg: Segmenter, imgs, labs, seconds: float, threads: int, patch, batch):
    """Patches/s of Segmenter.finetune after 3 warm-up steps, and the core's own figure."""
    t3, last, t_last = None, None, None
    gen = seg.finetune(
        imgs,
        labs,
        time_limit_s=None,
        steps=10**6,
        patch_shape=patch,
        batch_size=batch,
        device="cpu",
        num_threads=threads,
    )
    try:
        for ev in gen:
            now = time.perf_counter()
            if ev.step == 3:
                t3 = now
            last, t_last = ev, now
            if t3 is not None and now - t3 >= seconds:
                break
    finally:
        gen.close()
    return (last.step - 3) * batch / (t_last - t3), last.patches_per_s, last.step


def child_a(spec: dict) -> dict:
    """One throughput row in a fresh process: finetune first (its peak RSS), then the bare loop."""
    name, threads, seconds = spec["model"], spec["threads"], spec["seconds"]
    patch, batch = spec["patch"], spec["batch"]
    base, depth = MODELS[name]
    imgs, labs = dataset(TRAIN_SEEDS)
    seg = Segmenter.new(base_channels=base, depth=depth)
    C.settle()
    r0 = C.rss()
    with C.Contention() as c2:
        ours, core_figure, steps = finetune_steps(
            seg, imgs, labs, seconds, threads, (patch, patch), batch
        )
    peak = C.maxrss() - r0
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with C.Contention() as c1:
        bare, _ = bare_steps(UNet(1, 3, base, depth), seconds, patch, batch)
    return {
        "params": count_parameters(seg.net),
        "bare": bare,
        "ours": ours,
        "core": core_figure,
        "steps": steps,
        "peak_mib": peak / C.MiB,
        "others": max(c1.others, c2.others),
    }


def part_a(args) -> str:
    seconds = 2.0 if args.quick else 6.0
    patch, batch = 128, 8
    threads_list = (1, 2) if (os.cpu_count() or 1) >= 2 else (1,)
    print(f"\n## a. fine-tuning throughput, patch {patch}x{patch}, batch {batch}")
    rows = []
    for name, (base, depth) in MODELS.items():
        for threads in threads_list:
            C.QUIET = quiet_share(threads)
            C.say_load(
                f"{name} model, {threads} thread(s): Segmenter.finetune then a bare training "
                f"loop, {seconds:.0f} s each, fresh subprocess"
            )
            spec = {
                "model": name,
                "threads": threads,
                "seconds": seconds,
                "patch": patch,
                "batch": batch,
            }
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            res = next(
                (json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")),
                None,
            )
            if res is None:
                rows.append([name, threads, (p.stdout + p.stderr)[-80:]] + [math.nan] * 6)
                continue
            rows.append(
                [
                    f"{name} (base {base}, depth {depth}, {res['params']:,} params)",
                    threads,
                    res["bare"],
                    res["ours"],
                    res["ours"] / res["bare"],
                    res["core"],
                    res["steps"],
                    res["peak_mib"],
                    f"{100 * res['others']:.0f}",
                ]
            )
    hdr = [
        "model",
        "threads",
        "bare step [patches/s]",
        "finetune [patches/s]",
        "finetune / bare",
        "TrainProgress.patches_per_s",
        "steps",
        "finetune peak RSS - baseline [MiB]",
        "others %",
    ]
    out = C.table(hdr, rows, f"a. fine-tuning throughput (patch {patch}x{patch}, batch {batch})")
    print(out, flush=True)
    return out


# ------------------------------------------------------------------------------ part b
class PausableClock:
    """Stands in for the ``time`` module inside ``napari_unet.training``."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.paused_at: float | None = None

    def perf_counter(self) -> float:
        now = time.perf_counter() if self.paused_at is None else self.paused_at
        return now - self.offset

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        self.offset += time.perf_counter() - self.paused_at
        self.paused_at = None

    def __getattr__(self, name):
        return getattr(time, name)


def evaluate(seg: Segmenter, tests) -> tuple[float, float]:
    f1s, aps = [], []
    for img, lab in zip(*tests, strict=True):
        pred = seg.predict(img, device="cpu").labels
        f1s.append(instance_f1(pred, lab, iou_threshold=0.5))
        aps.append(average_precision(pred, lab)[0])
    return float(np.mean(f1s)), float(np.mean(aps))


def _trace_summary(trace, budget):
    """trace: list of (train_seconds, f1, ap)."""
    t08 = next((t for t, f, _ in trace if f >= 0.8), math.nan)
    t09 = next((t for t, f, _ in trace if f >= 0.9), math.nan)
    return t08, t09


def run_core(name, base, depth, patch, lr, data, tests, args) -> dict:
    """Segmenter.finetune from scratch with the clock paused during evaluations."""
    seg = Segmenter.new(base_channels=base, depth=depth, seed=0)
    clock = PausableClock()
    saved = training.time
    training.time = clock
    trace, last = [], None
    next_eval = args.eval_every
    try:
        with C.Contention() as c:
            gen = seg.finetune(
                data[0],
                data[1],
                time_limit_s=args.budget,
                patch_shape=patch,
                lr=lr,
                device="cpu",
                seed=0,
                num_threads=args.threads,
            )
            for ev in gen:
                last = ev
                if ev.done:
                    break
                if ev.seconds >= next_eval:
                    clock.pause()
                    trace.append((ev.seconds, *evaluate(seg, tests)))
                    clock.resume()
                    next_eval += args.eval_every
    finally:
        training.time = saved
    f1, ap = evaluate(seg, tests)
    trace.append((last.seconds, f1, ap))
    return {
        "trace": trace,
        "f1": f1,
        "ap": ap,
        "steps": last.step,
        "seconds": last.seconds,
        "pps": last.patches_per_s,
        "others": c.others,
    }


def run_naive(base, depth, patch, data, tests, args) -> dict:
    """Plain PyTorch loop on the same data: uniform crops, CE, Adam 1e-3, no augmentation."""
    seg = Segmenter.new(base_channels=base, depth=depth, seed=0)
    net = seg.net
    norm = []
    for img in data[0]:
        lo, hi = np.percentile(img, [1.0, 99.8])
        norm.append(((img - lo) / (hi - lo)).astype(np.float32))
    targets = [instance_targets(lab) for lab in data[1]]
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ph, pw = patch
    trace, steps, train_s = [], 0, 0.0
    next_eval = args.eval_every
    with training.thread_limit(args.threads), C.Contention() as c:
        t0 = time.perf_counter()
        while train_s < args.budget:
            xs, ys = [], []
            for _ in range(8):
                i = int(rng.integers(len(norm)))
                h, w = norm[i].shape
                y0, x0 = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
                xs.append(norm[i][None, y0 : y0 + ph, x0 : x0 + pw])
                ys.append(targets[i][y0 : y0 + ph, x0 : x0 + pw])
            x = torch.from_numpy(np.stack(xs))
            y = torch.from_numpy(np.stack(ys)).long()
            net.train()
            loss = F.cross_entropy(net(x), y, ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            train_s = time.perf_counter() - t0
            if train_s >= next_eval and train_s < args.budget:
                t_pause = time.perf_counter()
                trace.append((train_s, *evaluate(seg, tests)))
                t0 += time.perf_counter() - t_pause
                next_eval += args.eval_every
    net.eval()
    f1, ap = evaluate(seg, tests)
    trace.append((train_s, f1, ap))
    return {
        "trace": trace,
        "f1": f1,
        "ap": ap,
        "steps": steps,
        "seconds": train_s,
        "pps": steps * 8 / train_s,
        "others": c.others,
    }


def part_b(args) -> str:
    C.QUIET = quiet_share(args.threads or torch.get_num_threads())
    data = dataset(TRAIN_SEEDS)
    tests = dataset(TEST_SEEDS)
    n_obj = sum(int(lab.max()) for lab in tests[1])
    print(
        f"\n## b. from scratch: {len(TRAIN_SEEDS)} training images 256x256 (seeds "
        f"{TRAIN_SEEDS}), held-out seeds {TEST_SEEDS} ({n_obj} objects), budget "
        f"{args.budget:.0f} s, evaluation every {args.eval_every:.0f} s (clock paused)"
    )
    runs = []  # (label, kind, model, patch, lr)
    for name in MODELS:
        runs.append(("core defaults", "core", name, None, None))
    if args.sweep:
        for name in MODELS:
            for patch in ((64, 64), (96, 96), (128, 128)):
                for lr in (3e-3, 5e-3):
                    if patch == (128, 128) and lr == 3e-3:
                        continue  # = the core defaults, already above
                    runs.append(("sweep", "core", name, patch, lr))
    else:
        for name in MODELS:
            patch, lr = TUNED[name]
            if (patch, lr) != ((128, 128), 3e-3):
                runs.append(("best of sweep", "core", name, patch, lr))
    runs.append(("naive PyTorch loop", "naive", "default", (128, 128), 1e-3))

    rows, traces = [], []
    for label, kind, name, patch, lr in runs:
        base, depth = MODELS[name]
        shown_patch = patch or (128, 128)
        shown_lr = lr or 3e-3
        C.say_load(
            f"{label}: {name} model, patch {shown_patch[0]}, lr {shown_lr:g}, {args.budget:.0f} s"
        )
        if kind == "core":
            r = run_core(name, base, depth, patch, lr, data, tests, args)
        else:
            r = run_naive(base, depth, patch, data, tests, args)
        t08, t09 = _trace_summary(r["trace"], args.budget)
        rows.append(
            [
                label,
                name,
                f"{shown_patch[0]}x{shown_patch[1]}",
                f"{shown_lr:g}",
                r["steps"],
                r["pps"],
                t08,
                t09,
                r["f1"],
                r["ap"],
                "yes" if r["f1"] >= 0.9 else "no",
                f"{100 * r['others']:.0f}",
            ]
        )
        traces.append(
            f"{label}, {name}, patch {shown_patch[0]}, lr {shown_lr:g}: "
            + " ".join(f"{t:.0f}s:{f:.2f}" for t, f, _ in r["trace"])
        )
        print("   F1@0.5 trace: " + traces[-1].split(": ", 1)[1], flush=True)
    hdr = [
        "run",
        "model",
        "patch",
        "lr",
        "steps",
        "patches/s",
        "time to F1 0.8 [s]",
        "time to F1 0.9 [s]",
        f"F1@0.5 after {args.budget:.0f} s",
        "AP",
        "F1 >= 0.9",
        "others %",
    ]
    out = C.table(hdr, rows, f"b. from scratch, budget {args.budget:.0f} s of training")
    out += "\n\nF1@0.5 over training time (held-out mean):\n" + "\n".join(traces)
    print(out, flush=True)
    return out


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
    ap.add_argument("--quick", action="store_true", help="short budgets, a smoke run")
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--budget", type=float, default=None, help="part b budget, default 60 s")
    ap.add_argument("--eval-every", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="part b torch threads")
    ap.add_argument("--sweep", action="store_true", help="part b: patch x lr grid")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child_a(json.loads(args.child))), flush=True)
        return
    if args.budget is None:
        args.budget = 6.0 if args.quick else 60.0
    if args.quick:
        args.eval_every = min(args.eval_every, 2.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.WAIT_QUIET_S = (0.0 if args.quick else 20.0) if args.wait_quiet is None else args.wait_quiet
    C.header("bench_finetune")
    t_start = time.perf_counter()
    outputs = []
    if "a" in args.parts:
        outputs.append(part_a(args))
    if "b" in args.parts:
        outputs.append(part_b(args))
    print("\n# summary")
    print("\n".join(outputs))
    print(
        f"\ntotal time {time.perf_counter() - t_start:.0f} s, load at end "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
