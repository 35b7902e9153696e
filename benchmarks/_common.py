"""Shared helpers of the benchmark scripts (not a benchmark itself).

* machine description (CPU model, cores, torch threads, load),
* a CPU-contention meter: how busy *other* processes kept the CPUs during a measurement
  (``/proc/stat`` busy time minus this process's own CPU time), because the benchmark machine
  may be shared and torch with all cores slows down many-fold when another process is busy,
* a peak-RSS meter (5 ms sampling thread plus the kernel's high-water mark ``VmHWM``),
* plain-text tables,
* :func:`load_model`: a shipped starter by name, or a model folder.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch

MiB = 1024**2


def load_model(name: str):
    """A model folder (``Segmenter.load``) or a shipped starter's name (``pretrained``)."""
    import napari_unet as nu

    return nu.Segmenter.load(name) if os.path.isdir(name) else nu.Segmenter.pretrained(name)


# ------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load1() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    mem = psutil.virtual_memory().total / 1024**3
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"Python {platform.python_version()}"
    )


def others_busy_now(seconds: float = 0.5) -> float:
    """Fraction of all CPUs used by other processes over a short idle window."""
    with Contention() as c:
        time.sleep(seconds)
    return c.others


#: ``say_load`` waits up to this many seconds for the other processes to calm down
WAIT_QUIET_S = 0.0
#: share of all CPUs used by others below which the machine counts as quiet
QUIET = 0.15


def say_load(what: str) -> None:
    """Print the 1-min load average (and current use by others) before a measurement.

    With ``WAIT_QUIET_S > 0`` first wait (up to that long) for a quiet half second.
    """
    busy = others_busy_now(0.3)
    waited, t0 = "", time.perf_counter()
    if WAIT_QUIET_S > 0 and busy >= QUIET:
        while busy >= QUIET and time.perf_counter() - t0 < WAIT_QUIET_S:
            busy = others_busy_now(0.5)
        waited = f", waited {time.perf_counter() - t0:.0f} s"
    print(f"  [load1 {load1():.2f}, others busy {100 * busy:.0f}%{waited}] {what}", flush=True)


# ------------------------------------------------------------------------------ contention
def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already included in user
    return (total - idle) / hz, total / hz


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime


class Contention:
    """Context manager: ``.others`` = share of all CPUs used by other processes inside it.

    Only children that have been waited for count as "own"; run subprocesses to completion
    inside the block.
    """

    others: float = float("nan")
    own: float = float("nan")

    def __enter__(self) -> Contention:
        self._b0, self._t0 = _proc_stat()
        self._o0 = _own_cpu()
        return self

    def __exit__(self, *exc) -> None:
        b1, t1 = _proc_stat()
        own = _own_cpu() - self._o0
        total = max(t1 - self._t0, 1e-9)
        self.own = own / total
        self.others = min(1.0, max(0.0, (b1 - self._b0 - own) / total))


# ------------------------------------------------------------------------------ memory
def rss() -> int:
    return psutil.Process().memory_info().rss


def maxrss() -> int:
    """Peak RSS of this process so far, bytes.

    ``VmHWM`` from ``/proc/self/status``, not ``getrusage().ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``execve``, so a subprocess would report its parent's RSS at fork time
    as its own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Sample this process's RSS every ``interval`` s in a thread; ``mark()`` starts a phase."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.phases: dict[str, int] = {}
        self._phase = "start"
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self._proc.memory_info().rss
            p = self._phase
            if r > self.phases.get(p, 0):
                self.phases[p] = r
            time.sleep(self.interval)

    def mark(self, phase: str) -> None:
        r = self._proc.memory_info().rss
        self.phases[phase] = max(self.phases.get(phase, 0), r)
        self._phase = phase

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.phases.values(), default=0)


def settle() -> None:
    gc.collect()
    time.sleep(0.05)


# ------------------------------------------------------------------------------ timing
@dataclass
class Timed:
    seconds: float
    others: float
    value: object = None


def timed(fn, *args, **kwargs) -> Timed:
    with Contention() as c:
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
    return Timed(dt, c.others, value)


# ------------------------------------------------------------------------------ tables
def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    for k, r in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return "-" if v is None else str(v)


def header(title: str, argv: Sequence[str] | None = None) -> None:
    print(f"# {title}")
    print(f"command: python {' '.join(argv if argv is not None else sys.argv)}")
    print(f"machine: {machine_line()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"others busy at start: {100 * others_busy_now(1.0):.0f}% of the CPUs", flush=True)
