"""GUI responsiveness of the napari-unet widgets in a real napari viewer.

    xvfb-run -a python benchmarks/bench_gui.py            # full run (~8 min on 2 CPU cores)
    xvfb-run -a python benchmarks/bench_gui.py --quick    # smoke run (~2 min)

A napari viewer is shown (under Xvfb: software OpenGL) with the three plugin widgets docked and
the ``nuclei_2d`` sample open; everything is driven through the widgets' buttons, as a user would.

a. **Event-loop stalls.** A 10 ms ``QTimer`` heartbeat on the GUI thread records the time between
   its ticks; a gap much longer than 10 ms is a time the window could not repaint or react.
   Measured idle (baseline), while training through the Train widget (starter model, the 512x512
   sample and its truth labels, 20 s, default options: 1 CPU thread, preview every 5 s) and while
   predicting a 4096x4096 image through the Predict widget (whole layer, default options). Every
   GUI-thread callback of the plugin (progress handler, loss-curve draw, preview and result layer
   writes, end-of-job handlers) and napari's canvas draw are timed; a gap over 100 ms is explained
   by the callbacks that overlap it and, with ``--diagnose`` (default when a goal is missed), by
   stack samples of the GUI thread taken while the gap is open.
b. **Training throughput**: the same run (starter model, sample, seed, steps, thread count) in the
   napari thread worker (Train widget) and in the main thread (``Segmenter.finetune``); steps/s of
   the training loop and the ratio worker/main.
c. **Stop latency**: time from pressing Stop to the worker thread leaving the job, and to the
   widget showing "stopped" (model saved), 5 presses at different moments of a training.
d. **One human-in-the-loop round** on the 512x512 sample: Predict, fine-tune 20 s on the corrected
   labels (here: the truth), Refresh prediction; wall time of each step and F1@0.5 before/after.

Options ``--fix-...`` monkeypatch candidate fixes to measure them (see ``--help``).
``--md FILE`` writes the tables as markdown.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
# this checkout's package first (an editable install may point at another clone)
sys.path.insert(0, str(_HERE.parent / "src"))
sys.path.insert(0, str(_HERE))
import _common as C  # noqa: E402

GAP_GOAL_MS = 100.0
BUCKETS_MS = (15, 30, 50, 100, 250, 1000)
LONG_MS = 100.0


# ============================================================================ instrumentation
@dataclass
class Span:
    name: str
    t0: float
    t1: float
    main: bool


class CallTimer:
    """Wrap functions/methods so that every call records a :class:`Span` (name, start, stop).

    Wrappers are installed before the viewer exists, so methods napari connects as bound methods
    (vispy layer callbacks, timers) are the wrapped ones.
    """

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._main = threading.main_thread().ident
        self._patched: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, name: str | None = None) -> None:
        if isinstance(owner, type):
            orig = inspect.getattr_static(owner, attr)
            if isinstance(orig, (staticmethod, classmethod, property)):
                return
        else:
            orig = getattr(owner, attr)
        label = name or f"{getattr(owner, '__name__', owner)}.{attr}"
        spans, main = self.spans, self._main

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                spans.append(Span(label, t0, time.perf_counter(), threading.get_ident() == main))

        wrapper.__wrapped__ = orig
        wrapper.__name__ = getattr(orig, "__name__", attr)
        setattr(owner, attr, wrapper)
        self._patched.append((owner, attr, orig))

    def between(self, t0: float, t1: float, main_only: bool = True) -> list[Span]:
        return [s for s in self.spans if s.t1 >= t0 and s.t0 <= t1 and (s.main or not main_only)]


def install_timers(ct: CallTimer) -> None:
    import matplotlib.backends.backend_agg as agg
    from napari._vispy.canvas import VispyCanvas
    from napari._vispy.layers import image as vimage
    from napari._vispy.layers import labels as vlabels
    from napari.components.viewer_model import ViewerModel

    from napari_unet._widgets import _layers, _workers, train

    ct.wrap(train.TrainWidget, "_on_yield", "TrainWidget._on_yield (progress/status/curve.add)")
    ct.wrap(train.LossCurve, "draw_now", "LossCurve.draw_now (cla+plot)")
    ct.wrap(agg.FigureCanvasAgg, "draw", "matplotlib FigureCanvasAgg.draw (loss curve render)")
    ct.wrap(train.TrainRun, "finish", "TrainRun.finish (close job, save model)")
    ct.wrap(train.TrainWidget, "_on_train_finished", "TrainWidget._on_train_finished")
    ct.wrap(_workers.Task, "_on_finished", "Task._on_finished")
    ct.wrap(_layers, "write_preview", "write_preview (preview layer)")
    ct.wrap(_layers, "write_prediction", "write_prediction (result layer)")
    ct.wrap(_layers, "make_request", "make_request (read layer)")
    ct.wrap(ViewerModel, "add_labels", "viewer.add_labels")
    ct.wrap(VispyCanvas, "on_draw", "napari canvas draw (vispy/OpenGL)")
    ct.wrap(vlabels.VispyLabelsLayer, "_on_data_change", "vispy labels layer: data -> texture")
    ct.wrap(vimage.VispyImageLayer, "_on_data_change", "vispy image layer: data -> texture")
    # worker side (not GUI thread): long C calls that might hold the GIL
    from napari_unet import postprocess

    ct.wrap(postprocess, "instances_from_probabilities", "[worker] instances_from_probabilities")
    from napari_unet.segmenter import Segmenter
    from napari_unet.store import ModelRegistry

    ct.wrap(Segmenter, "copy", "Segmenter.copy (model snapshot)")
    ct.wrap(ModelRegistry, "save", "ModelRegistry.save (write model files)")


class Heartbeat:
    """A 10 ms QTimer on the GUI thread; ``ticks`` are the times it fired."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import Qt, QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.last = 0.0

    def _tick(self) -> None:
        self.last = time.perf_counter()
        self.ticks.append(self.last)

    def start(self) -> None:
        self.ticks.clear()
        self.last = time.perf_counter()
        self.ticks.append(self.last)
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()
        self.ticks.append(time.perf_counter())  # close the last gap

    def gaps(self) -> tuple[np.ndarray, np.ndarray]:
        """(gap lengths in ms, start times) of the last recording."""
        t = np.asarray(self.ticks)
        return np.diff(t) * 1000.0, t[:-1]


class StallSampler:
    """While a heartbeat gap is open (> ``after_ms``), sample the GUI thread's Python stack.

    A sample can only be taken when this thread gets the GIL; if the GUI thread itself holds it
    in a long C call, no sample is taken until that call returns, which is evidence too.
    """

    def __init__(self, hb: Heartbeat, after_ms: float = 40.0, every_s: float = 0.003):
        self.hb, self.after, self.every = hb, after_ms / 1000.0, every_s
        self.samples: list[tuple[float, float, tuple[str, ...]]] = []  # (t, gap start, stack)
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(self.every)
            last = self.hb.last
            now = time.perf_counter()
            if last and now - last > self.after:
                frame = sys._current_frames().get(self._main)
                stack = []
                while frame is not None and len(stack) < 40:
                    co = frame.f_code
                    stack.append(f"{_short(co.co_filename)}:{frame.f_lineno} {co.co_name}")
                    frame = frame.f_back
                self.samples.append((now, last, tuple(stack)))

    def __enter__(self) -> StallSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _short(path: str) -> str:
    for key in ("site-packages/", "/src/", "/benchmarks/"):
        if key in path:
            return path.split(key, 1)[1]
    return os.path.basename(path)


_BORING = ("bench_gui.py", "threading.py", "qtpy/", "superqt/")


def top_frames(stacks: list[tuple[str, ...]], n: int = 3) -> list[tuple[str, int]]:
    """Most frequent 'interesting' innermost frames of the sampled stacks."""
    count: collections.Counter = collections.Counter()
    for st in stacks:
        inner = [f for f in st if not any(b in f for b in _BORING)]
        key = " < ".join(inner[:3]) if inner else "(GUI thread in Qt/C code or waiting for the GIL)"
        count[key] += 1
    return count.most_common(n)


class GilProbe:
    """Detect times when no other Python thread could run, and dump every thread's stack then.

    A probe thread sleeps 2 ms in a loop and re-arms ``faulthandler.dump_traceback_later`` each
    time. If it cannot get the GIL back for ``after_s`` (someone holds it in a C call that does
    not release it, or the OS starved the process), faulthandler's C watchdog (which needs no
    GIL) writes the Python stacks of all threads. Late wake-ups are matched to the dumps in order.
    """

    def __init__(self, after_s: float = 0.08):
        self.after = after_s
        self.late: list[tuple[float, float]] = []  # (start, seconds late)
        self.dumps: list[dict[str, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gil-probe")
        self._file = tempfile.TemporaryFile("w+")

    def _run(self) -> None:
        import faulthandler

        while not self._stop.is_set():
            faulthandler.dump_traceback_later(self.after, repeat=False, file=self._file)
            t0 = time.perf_counter()
            time.sleep(0.002)
            late = time.perf_counter() - t0 - 0.002
            if late > self.after - 0.01:
                self.late.append((t0, late))
        faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> GilProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._file.seek(0)
        self._parse(self._file.read())
        self._file.close()

    def _parse(self, text: str) -> None:
        main = threading.main_thread().ident
        for block in text.split("Timeout (")[1:]:
            threads: dict[str, list[str]] = {}
            cur = None
            for line in block.splitlines():
                line = line.strip()
                if line.startswith(("Thread 0x", "Current thread 0x")):
                    tid = int(line.split("0x", 1)[1].split()[0], 16)
                    cur = "GUI" if tid == main else f"..{tid % 100000:05d}"
                    threads[cur] = []
                elif line.startswith("File ") and cur is not None:
                    # File "path", line N in func
                    try:
                        path = line.split('"')[1]
                        rest = line.rsplit(", line ", 1)[1]
                        lineno, func = rest.split(" in ", 1)
                        threads[cur].append(f"{func} ({_short(path)}:{lineno})")
                    except IndexError:
                        threads[cur].append(line)
            self.dumps.append(threads)

    def stalls(self) -> list[tuple[float, float, dict[str, list[str]]]]:
        out = []
        for k, (t0, late) in enumerate(self.late):
            out.append((t0, late, self.dumps[k] if k < len(self.dumps) else {}))
        return out


_SKIP = ("gil-probe", "bench_gui.py", "threading.py", "_bootstrap", "superqt/", "qtpy/")


def describe_stack(frames: list[str], n: int = 3) -> str:
    """The innermost ``n`` frames, plus the innermost napari-unet frame (the plugin's call)."""
    keep = [f for f in frames if not any(k in f for k in _SKIP)]
    if not keep:
        return "(no Python frame: in Qt/C code or idle)"
    text = " < ".join(keep[:n])
    own = [f for f in keep[n:] if "napari_unet/" in f]
    if own:
        text += f" < ... < {own[0]}"
    return text


# ============================================================================ Qt helpers
def wait_until(cond, timeout: float, poll_ms: int = 10) -> bool:
    """Run the Qt event loop until ``cond()`` is true (no busy loop)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    t_end = time.perf_counter() + timeout
    ok = [False]

    def check() -> None:
        if cond():
            ok[0] = True
            loop.quit()
        elif time.perf_counter() > t_end:
            loop.quit()

    timer = QTimer()
    timer.setInterval(poll_ms)
    timer.timeout.connect(check)
    timer.start()
    check()
    if not ok[0]:
        loop.exec()
    timer.stop()
    return ok[0]


def pump(seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    wait_until(lambda: time.perf_counter() >= t_end, seconds + 1.0)


# ============================================================================ stats
def gap_stats(gaps: np.ndarray, starts: np.ndarray | None = None) -> dict:
    if gaps.size == 0:
        return {"n": 0}
    later = gaps
    if starts is not None and starts.size:
        later = gaps[starts - starts[0] >= 0.5]
    return {
        "max_later": float(later.max()) if later.size else float("nan"),
        "n": int(gaps.size),
        "median": float(np.median(gaps)),
        "p99": float(np.percentile(gaps, 99)),
        "max": float(gaps.max()),
        "over": int((gaps > GAP_GOAL_MS).sum()),
        "hist": np.histogram(gaps, bins=(0, *BUCKETS_MS, np.inf))[0].tolist(),
    }


@dataclass
class Phase:
    name: str
    seconds: float
    gaps: np.ndarray
    starts: np.ndarray
    others: float
    load: float
    notes: list[str] = field(default_factory=list)
    samples: list = field(default_factory=list)
    gil: GilProbe | None = None


def record_phase(hb: Heartbeat, name: str, body, diagnose: bool = False) -> Phase:
    """Run ``body()`` (which pumps the event loop) with the heartbeat on.

    ``diagnose``: also sample the GUI thread's stack during gaps and trace the GIL with py-spy.
    """
    gil = GilProbe() if diagnose else None
    if gil is not None:
        gil.__enter__()
    load = C.load1()
    with C.Contention() as c:
        hb.start()
        t0 = time.perf_counter()
        if diagnose:
            with StallSampler(hb) as s:
                notes = body() or []
            samples = s.samples
        else:
            notes, samples = body() or [], []
        seconds = time.perf_counter() - t0
        hb.stop()
    if gil is not None:
        gil.__exit__(None, None, None)
    gaps, starts = hb.gaps()
    return Phase(name, seconds, gaps, starts, c.others, load, list(notes), samples, gil)


def explain_gaps(ph: Phase, ct: CallTimer, limit: int = 12) -> list[str]:
    """One line per gap over LONG_MS: what the GUI thread did meanwhile."""
    out = []
    idx = np.flatnonzero(ph.gaps > LONG_MS)
    order = idx[np.argsort(-ph.gaps[idx])][:limit]
    t_phase = ph.starts[0] if ph.starts.size else 0.0
    for i in sorted(order):
        g0, g = ph.starts[i], ph.gaps[i]
        g1 = g0 + g / 1000.0
        spans = ct.between(g0, g1, main_only=True)
        # the callbacks with the most time inside the gap
        inside: dict[str, float] = collections.defaultdict(float)
        for s in spans:
            inside[s.name] += (min(s.t1, g1) - max(s.t0, g0)) * 1000.0
        worker = [
            f"{s.name} {1000 * (min(s.t1, g1) - max(s.t0, g0)):.0f} ms"
            for s in ct.between(g0, g1, main_only=False)
            if not s.main
        ]
        parts = [f"{k} {v:.0f} ms" for k, v in sorted(inside.items(), key=lambda kv: -kv[1])]
        line = f"  gap {g:6.0f} ms at t={g0 - t_phase:6.2f} s: " + ("; ".join(parts) or "-")
        if worker:
            line += " | worker: " + "; ".join(worker)
        if ph.gil is not None:
            for t0, late, dump in ph.gil.stalls():
                if t0 + late < g0 or t0 > g1:
                    continue
                line += f"\n      no thread could take the GIL for {1000 * late:.0f} ms; stacks then:"
                for who, frames in sorted(dump.items()):
                    if who.startswith("..") and not any("napari_unet" in f or "torch" in f
                                                        or "napari" in f for f in frames):
                        continue
                    line += f"\n        {who}: {describe_stack(frames)}"
        stacks = [st for (_, start, st) in ph.samples if abs(start - g0) < 0.002]
        if stacks:
            tops = top_frames(stacks, 2)
            line += "\n      GUI-thread stack samples: " + " || ".join(
                f"{n}x {k}" for k, n in tops
            )
        out.append(line)
    return out


def callback_summary(ph: Phase, ct: CallTimer) -> list[list]:
    t0, t1 = ph.starts[0], ph.starts[0] + ph.seconds
    acc: dict[str, list[float]] = collections.defaultdict(list)
    for s in ct.between(t0, t1, main_only=False):
        acc[s.name].append((s.t1 - s.t0) * 1000.0)
    rows = []
    for name, d in sorted(acc.items(), key=lambda kv: -max(kv[1])):
        rows.append([ph.name, name, len(d), float(np.sum(d)), float(np.max(d))])
    return rows


# ============================================================================ the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.ct = CallTimer()
        self.out: list[str] = []  # markdown

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import napari

        from napari_unet._widgets._session import session_for

        install_timers(self.ct)
        self.apply_fixes()
        self.viewer = v = napari.Viewer(show=True, title="napari-unet bench")
        v.window._qt_window.resize(1400, 900)
        v.open_sample("napari-unet", "nuclei_2d")
        self.widgets = {}
        docks = []
        for name in ("U-Net Predict", "U-Net Train", "U-Net Models"):
            dock, w = v.window.add_plugin_dock_widget("napari-unet", name)
            self.widgets[name] = w
            docks.append(dock)
        win = v.window._qt_window
        win.tabifyDockWidget(docks[0], docks[2])
        docks[0].raise_()
        self.session = session_for(v)
        self.default_threads = self.tw.threads_spin.value()  # the widget's default
        self.hb = Heartbeat()
        pump(1.0)

    def apply_fixes(self) -> None:
        a = self.args
        if a.fix_all:
            a.fix_curve = a.fix_curve or "mpl"
            a.fix_import = a.fix_labels = a.fix_preview = a.fix_progress = True
        for name in ("progress", "preview", "labels"):
            if getattr(a, f"fix_{name}"):
                # measured with these patches first; the plugin does all three itself now
                # (batched repaints, preview layer made at the click, uint16 labels)
                print(f"  [fix-{name}] built into the plugin now: nothing to patch")
        if a.switchinterval:
            sys.setswitchinterval(a.switchinterval / 1000.0)
        if a.fix_import:
            # what the plugin would do when its widgets are created: import the part of torch
            # that torch.optim imports lazily on the first optimizer (torch._dynamo, ~800
            # modules), on the GUI thread while the widgets open, not in the training worker
            t0 = time.perf_counter()
            import torch._dynamo  # noqa: F401

            print(f"  [fix-import] import torch._dynamo: {time.perf_counter() - t0:.2f} s")
        if a.fix_curve == "mpl":
            # the matplotlib loss curve made cheaper: persistent artists updated with set_data
            # (no cla/plot), fixed margins instead of constrained layout (re-solved at every
            # draw), at most one redraw a second (was 4)
            from napari_unet._widgets import train

            def draw_now(self) -> None:
                self._timer.stop()
                if self.canvas is None:
                    return
                self.draws += 1
                self._line.set_data(self.steps, self.losses)
                self._points.set_data(self.val_steps, self.vals)
                self.ax.relim()
                self.ax.autoscale_view()
                self.canvas.draw_idle()

            orig_init = train.LossCurve.__init__

            def init(self, *args, **kwargs):
                orig_init(self, *args, **kwargs)
                self._timer.setInterval(1000)
                if self.canvas is not None:
                    fig = self.canvas.figure
                    fig.set_layout_engine("none")
                    fig.subplots_adjust(left=0.2, right=0.84, bottom=0.24, top=0.95)
                    (self._line,) = self.ax.plot([], [], lw=1, color="tab:blue")
                    (self._points,) = self.ax2.plot([], [], "o", ms=3, color="tab:orange")

            train.LossCurve.__init__ = init
            train.LossCurve.draw_now = draw_now
            self.ct.wrap(train.LossCurve, "draw_now", "LossCurve.draw_now (set_data)")

    def reset_model(self) -> None:
        from napari_unet.segmenter import Segmenter

        self.session.set_segmenter(Segmenter.pretrained("nuclei"), name="nuclei")

    @property
    def pw(self):
        return self.widgets["U-Net Predict"]

    @property
    def tw(self):
        return self.widgets["U-Net Train"]

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.out.append(text)

    # ---------------------------------------------------------------- helpers
    def train_through_widget(
        self, seconds: float, steps: int = 0, threads: int | None = None, preview: float = 5.0
    ):
        """Press Train on 'nuclei' / 'nuclei truth'; returns the task (not waited for)."""
        tw, v = self.tw, self.viewer
        tw.image_combo.set_value(v.layers["nuclei"])
        tw.labels_combo.set_value(v.layers["nuclei truth"])
        tw.shapes_combo.set_value(None)
        tw.seconds_spin.setValue(int(seconds))
        tw.steps_spin.setValue(int(steps))
        tw.preview_spin.setValue(preview)
        tw.device_combo.setCurrentText("cpu")
        tw.threads_spin.setValue(threads if threads is not None else self.default_threads)
        tw.train_button.click()
        task = tw._task if tw._run is not None else None
        if task is None:
            raise RuntimeError(f"training refused: {tw.status_label.text()}")
        return task

    def wait_train_done(self, timeout: float) -> None:
        from napari_unet._widgets._workers import State

        ok = wait_until(
            lambda: self.tw.state.value in (State.DONE, State.FAILED) and self.tw._run is None,
            timeout,
        )
        if not ok or self.tw.state.value == State.FAILED:
            raise RuntimeError(f"training did not finish: {self.tw.status_label.text()}")

    def predict_through_widget(self, layer_name: str, timeout: float) -> float:
        pw = self.pw
        pw.image_combo.set_value(self.viewer.layers[layer_name])
        pw.scope_combo.setCurrentText("whole layer")
        pw.device_combo.setCurrentText("auto")
        pw.probs_check.setChecked(False)
        t0 = time.perf_counter()
        pw.predict_button.click()
        if not pw.running:
            raise RuntimeError("prediction refused")
        if not wait_until(lambda: not pw.running, timeout):
            raise RuntimeError("prediction did not finish")
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- a. stalls
    def part_a(self) -> list[Phase]:
        import torch

        self.emit("\n## a. GUI event-loop stalls (10 ms heartbeat)\n")
        phases = []
        C.say_load("idle baseline")
        phases.append(record_phase(self.hb, "idle (viewer shown, nothing running)", lambda: pump(5)))

        self.reset_model()
        secs = 8 if self.quick else 20
        C.say_load(f"training {secs} s through the Train widget")

        def training():
            self.train_through_widget(secs)
            self.wait_train_done(secs + 120)
            pump(1.0)
            lp = self.tw.last_progress
            return [
                f"{lp.step} steps, {lp.patches_per_s:.1f} patches/s, "
                f"{self.tw.threads_spin.value()} torch thread(s)"
            ]

        phases.append(
            record_phase(self.hb, f"training {secs} s (Train widget)", training, self.args.diagnose)
        )
        # the next round: the preview layer the first one left hidden is shown again, not made
        C.say_load(f"training {secs} s again (the next round)")
        phases.append(
            record_phase(
                self.hb, f"training {secs} s again (next round)", training, self.args.diagnose
            )
        )

        size = 1024 if self.quick else 4096
        self.add_big(size)
        self.reset_model()
        C.say_load(f"predicting {size}x{size} through the Predict widget")

        def predicting():
            dt = self.predict_through_widget("big", 900)
            pump(1.5)
            return [f"prediction {dt:.1f} s, torch {torch.get_num_threads()} threads"]

        phases.append(
            record_phase(
                self.hb, f"predict {size}x{size} (Predict widget)", predicting, self.args.diagnose
            )
        )
        self.report_a(phases)
        return phases

    def add_big(self, size: int) -> None:
        if "big" in self.viewer.layers:
            self.viewer.layers.remove("big")
        for ly in list(self.viewer.layers):
            if (ly.metadata or {}).get("source") == "big":
                self.viewer.layers.remove(ly)
        img = np.asarray(self.viewer.layers["nuclei"].data)
        reps = -(-size // img.shape[0])
        big = np.tile(img, (reps, reps))[:size, :size].copy()
        self.viewer.add_image(big, name="big", colormap="gray", visible=False)
        pump(1.0)

    def report_a(self, phases: list[Phase]) -> None:
        rows = []
        for ph in phases:
            st = gap_stats(ph.gaps, ph.starts)
            rows.append(
                [
                    ph.name,
                    round(ph.seconds, 1),
                    st["n"],
                    st["median"],
                    st["p99"],
                    st["max"],
                    st["max_later"],
                    st["over"],
                    "yes" if st["max"] < GAP_GOAL_MS else "NO",
                    f"{ph.load:.2f} / {100 * ph.others:.0f}%",
                ]
            )
        self.emit(
            C.table(
                [
                    "phase",
                    "s",
                    "ticks",
                    "median gap ms",
                    "p99 ms",
                    "max ms",
                    "max ms after the click",
                    "gaps >100 ms",
                    "max < 100 ms",
                    "load1 / others busy",
                ],
                rows,
            )
        )
        hist_rows = []
        labels = [f"<={BUCKETS_MS[0]}"] + [
            f"{a}-{b}" for a, b in zip(BUCKETS_MS[:-1], BUCKETS_MS[1:], strict=True)
        ]
        labels.append(f">{BUCKETS_MS[-1]}")
        for ph in phases:
            hist_rows.append([ph.name, *gap_stats(ph.gaps)["hist"]])
        self.emit("\nGap distribution (number of heartbeat gaps per bucket, ms):\n")
        self.emit(C.table(["phase", *labels], hist_rows))
        for ph in phases:
            for n in ph.notes:
                self.emit(f"\n* {ph.name}: {n}")
        rows = []
        for ph in phases[1:]:
            rows.extend(callback_summary(ph, self.ct))
        self.emit("\nTimed callbacks (GUI thread unless marked [worker]):\n")
        self.emit(C.table(["phase", "callback", "calls", "total ms", "max ms"], rows))
        for ph in phases:
            lines = explain_gaps(ph, self.ct)
            if lines:
                self.emit(f"\nGaps over {LONG_MS:.0f} ms during '{ph.name}':\n")
                self.emit("```\n" + "\n".join(lines) + "\n```")

    # ---------------------------------------------------------------- b. throughput
    def part_b(self) -> None:
        from napari_unet.segmenter import Segmenter

        self.emit("\n## b. Training throughput: napari thread worker vs main thread\n")
        steps = 10 if self.quick else 40
        threads = [1] if self.quick else [1, 2]
        repeats = 1 if self.quick else 2
        img = np.asarray(self.viewer.layers["nuclei"].data)
        lab = np.asarray(self.viewer.layers["nuclei truth"].data)
        rows, runs = [], []
        for nt in threads:
            res: dict[str, list[tuple[float, float, float]]] = {"worker": [], "main": []}
            for _ in range(repeats):
                # main thread: the core generator, nothing else running
                seg = Segmenter.pretrained("nuclei")
                C.say_load(f"main thread, {steps} steps, {nt} thread(s)")
                with C.Contention() as c:
                    t0 = time.perf_counter()
                    last = None
                    for last in seg.finetune(
                        img,
                        lab,
                        axes="YX",
                        time_limit_s=None,
                        steps=steps,
                        device="cpu",
                        num_threads=nt,
                        names=["nuclei"],
                    ):
                        pass
                    wall = time.perf_counter() - t0
                res["main"].append((last.step / last.seconds, wall, c.others))
                runs.append([nt, "main thread", last.step / last.seconds, wall, c.others])
                # napari thread worker, through the Train widget (preview off: same work)
                self.reset_model()
                C.say_load(f"Train widget worker, {steps} steps, {nt} thread(s)")
                with C.Contention() as c:
                    t0 = time.perf_counter()
                    self.train_through_widget(0, steps=steps, threads=nt, preview=0)
                    self.wait_train_done(600)
                    wall = time.perf_counter() - t0
                lp = self.tw.last_progress
                res["worker"].append((lp.step / lp.seconds, wall, c.others))
                runs.append([nt, "napari worker", lp.step / lp.seconds, wall, c.others])
            m = max(r[0] for r in res["main"])
            w = max(r[0] for r in res["worker"])
            rows.append(
                [
                    nt,
                    steps,
                    m,
                    w,
                    w / m,
                    float(np.mean([r[1] for r in res["main"]])),
                    float(np.mean([r[1] for r in res["worker"]])),
                    "yes" if w / m >= 0.9 else "NO",
                    f"{100 * max(r[2] for v in res.values() for r in v):.0f}%",
                ]
            )
        self.emit(
            C.table(
                ["torch threads", "where", "steps/s", "wall s", "others busy"],
                [[a, b, c, d, f"{100 * e:.0f}%"] for a, b, c, d, e in runs],
            )
        )
        self.emit("")
        self.emit(
            C.table(
                [
                    "torch threads",
                    "steps",
                    "main steps/s",
                    "worker steps/s",
                    "ratio",
                    "main wall s",
                    "worker wall s",
                    ">= 0.9",
                    "others busy (max)",
                ],
                rows,
            )
        )
        self.emit(
            "\nsteps/s = steps / training-loop seconds (best of the repeats); wall = from the call "
            "(or the Train click) to the end, model preparation and the registry save included."
        )

    # ---------------------------------------------------------------- c. stop latency
    def part_c(self) -> None:
        from napari_unet._widgets._workers import Preview, State

        self.emit("\n## c. Stop latency (Train widget, 60 s budget, preview every 5 s)\n")
        delays = [1.5, 3.0] if self.quick else [1.5, 3.0, 5.2, 6.1, 8.4]
        rows = []
        for d in delays:
            self.reset_model()
            C.say_load(f"stop after {d} s")
            task = self.train_through_widget(60, steps=0)
            marks: dict[str, float] = {}
            step_t: list[float] = []
            last_kind = ["-"]

            def on_left() -> None:
                marks.setdefault("left", time.perf_counter())

            def on_yield(item) -> None:
                if isinstance(item, Preview):
                    last_kind[0] = "preview shown"
                elif item is None:
                    last_kind[0] = "preview running"
                else:
                    step_t.append(time.perf_counter())
                    last_kind[0] = "training step"

            def on_state(s) -> None:
                if s == State.DONE:
                    marks.setdefault("done", time.perf_counter())

            from qtpy.QtCore import Qt

            task.worker.signals.finished.connect(
                on_left, type=Qt.ConnectionType.DirectConnection
            )
            task.worker.yielded.connect(on_yield)
            self.tw.state.changed.connect(on_state)
            pump(d)
            steps_before = len(step_t)
            kind_before = last_kind[0]
            t_click = time.perf_counter()
            self.tw.stop_button.click()
            self.wait_train_done(60)
            self.tw.state.changed.disconnect(on_state)
            dt = np.diff(step_t) if len(step_t) > 2 else np.array([np.nan])
            rows.append(
                [
                    d,
                    steps_before,
                    kind_before,
                    1000 * float(np.median(dt)),
                    1000 * (marks.get("left", np.nan) - t_click),
                    1000 * (marks.get("done", np.nan) - t_click),
                    self.tw.status_label.text()[:60],
                ]
            )
        self.emit(
            C.table(
                [
                    "pressed after s",
                    "steps before",
                    "last event before Stop",
                    "median step interval ms",
                    "Stop -> worker left ms",
                    "Stop -> 'stopped' shown ms",
                    "status",
                ],
                rows,
            )
        )
        worst = max(max(r[4], r[5]) for r in rows)
        self.emit(
            f"\nmax Stop -> done: {worst:.0f} ms (goal < 1000 ms: "
            f"{'met' if worst < 1000 else 'MISSED'})"
        )

    # ---------------------------------------------------------------- d. one HITL round
    def part_d(self) -> None:
        from napari_unet._widgets import _layers
        from napari_unet.metrics import instance_f1

        self.emit("\n## d. One human-in-the-loop round on the 512x512 sample (CPU)\n")
        v = self.viewer
        for ly in list(v.layers):
            if (ly.metadata or {}).get("source") == "nuclei":
                v.layers.remove(ly)
        self.reset_model()
        truth = np.asarray(v.layers["nuclei truth"].data)
        secs = 8 if self.quick else 20
        rows = []
        C.say_load("HITL round")
        with C.Contention() as c:
            t_round = time.perf_counter()
            t = self.predict_through_widget("nuclei", 300)
            f1a = instance_f1(np.asarray(_layers.find_own_layer(v, "nuclei").data), truth)
            rows.append(["Predict (starter model)", t, f"F1@0.5 {f1a:.3f}"])
            t0 = time.perf_counter()
            self.train_through_widget(secs)
            self.wait_train_done(secs + 120)
            lp = self.tw.last_progress
            rows.append(
                [
                    f"Train {secs} s on the corrected labels",
                    time.perf_counter() - t0,
                    f"{lp.step} steps, {self.tw.threads_spin.value()} thread(s)",
                ]
            )
            t0 = time.perf_counter()
            self.tw.refresh_button.click()
            if not wait_until(lambda: not self.tw.refreshing, 300):
                raise RuntimeError("refresh did not finish")
            f1b = instance_f1(np.asarray(_layers.find_own_layer(v, "nuclei").data), truth)
            rows.append(["Refresh prediction", time.perf_counter() - t0, f"F1@0.5 {f1b:.3f}"])
            total = time.perf_counter() - t_round
        rows.append(["round (wall)", total, f"others busy {100 * c.others:.0f}%"])
        self.emit(C.table(["step", "wall s", "result"], rows))
        self.emit(
            "\nF1 is measured against the truth of the same image the model was fine-tuned on "
            "(the simulated user corrected all of it): it shows the round works, not held-out "
            "accuracy (see the human-in-the-loop benchmark for that)."
        )

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        C.WAIT_QUIET_S = self.args.wait_quiet
        C.header("napari-unet GUI responsiveness")
        import torch

        import napari_unet

        print(f"napari_unet from {Path(napari_unet.__file__).parent}", flush=True)

        print(
            f"torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}, "
            f"switch interval {1000 * sys.getswitchinterval():.1f} ms",
            flush=True,
        )
        self.setup()
        parts = self.args.parts
        try:
            if "a" in parts:
                self.part_a()
            if "b" in parts:
                self.part_b()
            if "c" in parts:
                self.part_c()
            if "d" in parts:
                self.part_d()
        finally:
            self.viewer.close()
        fixed = self.args.fix_all or any(
            (
                self.args.fix_curve,
                self.args.fix_import,
                self.args.fix_labels,
                self.args.fix_preview,
                self.args.fix_progress,
            )
        )
        if "a" in parts and not fixed and not self.args.quick and not self.args.no_fixes_run:
            self.run_fixed()
        if self.args.md:
            Path(self.args.md).write_text("\n".join(self.out) + "\n")
        return 0

    def run_fixed(self) -> None:
        """Part a again with every candidate fix monkeypatched, in a fresh process."""
        import subprocess

        md = os.path.join(tempfile.mkdtemp(prefix="bench-gui-"), "fixed.md")
        cmd = [sys.executable, __file__, "--parts", "a", "--fix-all", "--md", md]
        cmd += ["--wait-quiet", str(self.args.wait_quiet)]
        if self.args.diagnose:
            cmd.append("--diagnose")
        print(f"\n# part a again with the fixes: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=False)
        if os.path.exists(md):
            text = Path(md).read_text().replace(
                "## a. GUI event-loop stalls (10 ms heartbeat)",
                "## a'. The same with the candidate fixes (--fix-all)",
            )
            self.out.append(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: shorter, smaller")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'a' or 'bc'")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="sample the GUI thread's stack during long gaps (part a)",
    )
    p.add_argument("--switchinterval", type=float, default=0.0, help="sys.setswitchinterval, ms")
    p.add_argument(
        "--fix-curve",
        choices=("mpl",),
        help="monkeypatch the loss curve: 'mpl' = matplotlib, artists reused, fixed margins, "
        "1 redraw/s",
    )
    p.add_argument(
        "--fix-import",
        action="store_true",
        help="monkeypatch: import torch._dynamo before training (not in the worker)",
    )
    p.add_argument(
        "--fix-labels",
        action="store_true",
        help="monkeypatch: result labels as uint16 when the ids fit (no hashing in napari)",
    )
    p.add_argument(
        "--fix-preview",
        action="store_true",
        help="monkeypatch: create the empty preview layer when Train is pressed",
    )
    p.add_argument(
        "--fix-progress",
        action="store_true",
        help="monkeypatch: progress bar/status updates as one asynchronous repaint",
    )
    p.add_argument("--fix-all", action="store_true", help="all the --fix-... options")
    p.add_argument(
        "--no-fixes-run",
        action="store_true",
        help="full run only: do not repeat part a with --fix-all in a child process",
    )
    p.add_argument("--wait-quiet", type=float, default=180.0, help="wait for a quiet CPU, s")
    p.add_argument("--md", help="write the tables as markdown to this file")
    args = p.parse_args(argv)
    home = tempfile.mkdtemp(prefix="napari-unet-bench-")
    os.environ["NAPARI_UNET_HOME"] = home  # never touch the user's models
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
