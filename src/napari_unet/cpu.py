"""CPU threads for torch, chosen from what the machine has free, and a busy-CPU monitor.

Measured on 2 cores (``benchmarks/bench_threads.py``, docs/benchmarks.md): fine-tuning the starter
model does 6.3 steps/s with 1 thread and 11.7 with 2 on an idle machine, but with one other busy
program 1 thread still does 5.7 steps/s while 2 threads collapse to 0.34 steps/s (torch's
threads wait for each other at every operation, and one of them is always descheduled). More
threads than free cores is the costly mistake, so the default is the number of *free* cores,
less one for the viewer in napari. The command line and the widgets use the same rule.

Linux reads ``/proc/stat`` (0.2 s sample); elsewhere the load average, else all cores are free.
Imports neither torch nor Qt.
"""

from __future__ import annotations

import math
import os
import time

__all__ = ["busy_cores", "BusyWatch", "default_threads", "LoadMonitor"]

CHECK_EVERY_S = 5.0  # how often a LoadMonitor measures (tests set it to 0)


def _cores() -> int:
    return max(1, os.cpu_count() or 1)


def _busy_ticks() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [float(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
    hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class _Sampler:
    """CPU used by *other* programs between two readings, in cores."""

    def __init__(self) -> None:
        self.t, self.machine, self.own = time.monotonic(), _busy_ticks(), _own_cpu()

    def others(self) -> float | None:
        t, machine, own = time.monotonic(), _busy_ticks(), _own_cpu()
        wall = t - self.t
        if machine is None or self.machine is None or wall <= 0:
            return None
        busy = machine[0] - self.machine[0]
        self.t, self.machine, self.own, own_used = t, machine, own, own - self.own
        return max(0.0, (busy - own_used) / wall)


def _load_average() -> float:
    """The 1-minute load average (0 .. cpu_count) where /proc/stat cannot tell; 0 if unknown."""
    try:
        return min(float(_cores()), max(0.0, os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0.0


def busy_cores(sample_s: float = 0.2) -> float:
    """Cores kept busy by other programs now (0 .. cpu_count)."""
    s = _Sampler()
    if s.machine is not None:
        time.sleep(sample_s)
        others = s.others()
        if others is not None:
            return min(float(_cores()), others)
    return _load_average()


class BusyWatch:
    """:func:`busy_cores` without the wait, for a GUI thread: the cores other programs used
    between the previous reading and this one (readings at least ``min_s`` apart; a closer one
    returns the last value).

    Call :meth:`busy` every second or so (a Qt timer: two file reads, no sleep) and at the
    moment the value is needed. ``busy_cores`` sleeps 0.2 s to sample; on the GUI thread at a
    Train click it held the viewer (``benchmarks/bench_gui.py --diagnose``: 48-50 stack
    samples in it), and without it the next round's click went from 288-319 ms to 104-132.
    """

    def __init__(self, min_s: float = 0.2) -> None:
        self.min_s = min_s
        self._sampler = _Sampler()
        self._last: float | None = None

    def busy(self) -> float:
        if time.monotonic() - self._sampler.t >= self.min_s:
            others = self._sampler.others()
            if others is not None:
                self._last = min(float(_cores()), others)
        if self._last is not None:
            return self._last
        return _load_average()  # no two readings yet (or no /proc/stat)


def default_threads(gui: bool = False, busy: float | None = None) -> int:
    """torch CPU threads for a training or a prediction: the free cores (one less in napari).

    ``busy`` is the cores other programs use (measured with :func:`busy_cores` when None).
    A core counts as taken when another program uses more than a quarter of it.
    """
    cores = _cores()
    busy = busy_cores() if busy is None else busy
    free = cores - math.ceil(max(0.0, busy) - 0.25)
    if gui:
        free = min(free, cores - 1)
    return max(1, min(cores, free))


class LoadMonitor:
    """Watches a training for a CPU shared with other programs.

    Call :meth:`update` with every progress event (cheap: it measures every ``every_s``
    seconds). It returns a warning once, when the steps per second fall below
    ``slow_fraction`` of the best rate seen while other programs hold cores that the
    training's threads need. :attr:`note` is a sentence for the summary (None on a quiet CPU).
    """

    def __init__(self, threads: int, every_s: float | None = None, slow_fraction: float = 0.5):
        self.threads = max(1, int(threads))
        self.every_s = CHECK_EVERY_S if every_s is None else every_s
        self.slow_fraction = slow_fraction
        self._sampler = _Sampler()
        self._last = (0, 0.0)  # (step, seconds) at the last measurement
        self.best: float | None = None  # best steps/s over a window
        self.worst: float | None = None
        self.max_busy = 0.0
        self.warned = False
        self.note: str | None = None

    def restart(self) -> None:
        """A new training run (its steps and seconds count from 0 again); the best rate stays."""
        self._last = (0, 0.0)
        self._sampler = _Sampler()

    def update(self, step: int, seconds: float) -> str | None:
        s0, t0 = self._last
        if seconds - t0 < self.every_s or step <= s0 or seconds <= t0:
            return None
        rate = (step - s0) / (seconds - t0)
        self._last = (step, seconds)
        others = self._sampler.others()
        if others is None:
            return None
        self.max_busy = max(self.max_busy, others)
        self.best = rate if self.best is None else max(self.best, rate)
        self.worst = rate if self.worst is None else min(self.worst, rate)
        crowded = others + self.threads > _cores() + 0.25
        if not crowded or self.warned:
            return None
        slow = rate < self.slow_fraction * self.best
        if not slow and others < 0.75:
            return None
        self.warned = True
        self.note = (
            f"the CPU was shared with other programs (they used about {others:.1f} of "
            f"{_cores()} cores): {rate:.2f} steps/s"
            + (f" against {self.best:.2f} at best" if slow else "")
            + "; fewer steps than on an idle machine, so the model may be weaker"
        )
        return (
            f"training is slowed by other programs using the CPU ({others:.1f} of {_cores()} "
            f"cores busy, {rate:.2f} steps/s): close them, or train with fewer CPU threads "
            f"(now {self.threads})"
        )
