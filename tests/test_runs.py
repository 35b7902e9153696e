"""The training run controller (napari_unet.runs) without Qt: stop, save, outcome, lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_unet.data import make_nuclei
from napari_unet.runs import RunBusy, RunState, TrainRun, summary
from napari_unet.segmenter import Segmenter
from napari_unet.training import TrainProgress


@pytest.fixture(scope="module")
def pair():
    return make_nuclei((64, 64), seed=5)


@pytest.fixture
def seg():
    return Segmenter.new(base_channels=4, depth=2, seed=0)


class Saves:
    """A save callable that counts its calls (and can fail)."""

    def __init__(self, fail: bool = False):
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, seg: Segmenter):
        self.calls.append(len(seg.config.get("history") or []))
        if self.fail:
            raise OSError(28, "No space left on device")
        return "saved-info"


def make_run(seg, pair, save=None, lock=None, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("time_limit_s", None)
    kw.setdefault("device", "cpu")
    kw.setdefault("num_threads", 1)
    return TrainRun(seg, pair[0], pair[1], save=save, lock=lock, **kw)


def states(run: TrainRun) -> list[RunState]:
    seen: list[RunState] = []
    run.status.events.state.connect(seen.append)
    return seen


def test_a_run_to_its_end_saves_once_and_sums_up(seg, pair):
    save, lock = Saves(), threading.Lock()
    run = make_run(seg, pair, save=save, lock=lock)
    assert lock.locked()  # held from the start
    seen = states(run)
    outcome = run.run()
    assert outcome.state is RunState.DONE and not outcome.stopped and outcome.trained
    assert outcome.last.step == 3 and outcome.last.done
    assert save.calls == [1]  # once, after the core recorded the round in the history
    assert outcome.saved == "saved-info" and outcome.error is None
    assert outcome.message == summary(outcome.last)
    assert outcome.message.startswith("3 steps in ") and "(step limit reached)" in outcome.message
    assert seen == [RunState.TRAINING, RunState.DONE]
    assert run.status.step == 3 and run.status.loss is not None
    assert run.status.fraction == 1.0 and run.status.message == outcome.message
    assert not lock.locked()
    assert run.finish() is outcome  # idempotent


def test_stop_within_one_step_still_saves(seg, pair):
    save = Saves()
    run = make_run(seg, pair, save=save, steps=None, time_limit_s=60)
    seen = states(run)
    steps: list[int] = []

    def on_event(p):
        steps.append(p.step)
        run.stop()

    t0 = time.perf_counter()
    outcome = run.run(on_event)
    assert time.perf_counter() - t0 < 20
    assert steps == [1] and outcome.last.step == 1
    assert outcome.stopped and outcome.state is RunState.DONE
    assert "stopped by the user" in outcome.message
    assert save.calls == [1]
    assert seg.config["history"][-1]["stopped"] == "stopped by the user"
    assert seen == [RunState.TRAINING, RunState.STOPPING, RunState.DONE]


def test_stop_from_another_thread(seg, pair):
    run = make_run(seg, pair, save=Saves(), steps=None, time_limit_s=60)
    seen_steps: list[int] = []
    first = threading.Event()

    def consume():
        for p in run.iterate():
            seen_steps.append(p.step)
            first.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(20)
    asked_at = run.status.step
    run.stop()
    worker.join(20)
    assert not worker.is_alive()
    assert run.outcome.stopped and run.outcome.last.step <= asked_at + 1


def test_closing_the_generator_is_a_stop(seg, pair):
    save, lock = Saves(), threading.Lock()
    run = make_run(seg, pair, save=save, lock=lock, steps=None, time_limit_s=60)
    gen = run.iterate()
    assert isinstance(next(gen), TrainProgress)
    gen.close()
    assert run.outcome.stopped and save.calls == [1] and not lock.locked()


def test_a_failing_training_releases_the_lock_and_saves_nothing(seg, pair):
    save, lock = Saves(), threading.Lock()
    run = make_run(seg, pair, save=save, lock=lock)
    run.labels = np.zeros_like(pair[1])  # refused by the core: nothing to learn from
    outcome = run.run()
    assert outcome.state is RunState.FAILED and isinstance(outcome.error, ValueError)
    assert "empty" in outcome.message and not save.calls and not lock.locked()
    assert run.status.state is RunState.FAILED


def test_an_error_mid_training_releases_the_lock(seg, pair, monkeypatch):
    original = Segmenter.finetune

    def breaks(self, *args, **kwargs):
        gen = original(self, *args, **kwargs)
        try:
            yield next(gen)
            raise RuntimeError("device lost")
        finally:
            gen.close()

    monkeypatch.setattr(Segmenter, "finetune", breaks)
    save, lock = Saves(), threading.Lock()
    outcome = make_run(seg, pair, save=save, lock=lock, steps=5).run()
    assert outcome.state is RunState.FAILED and outcome.message == "RuntimeError: device lost"
    assert outcome.last.step == 1 and not save.calls and not lock.locked()


def test_ctrl_c_stops_and_saves(seg, pair):
    save = Saves()
    run = make_run(seg, pair, save=save, steps=None, time_limit_s=60)

    def on_event(p):
        raise KeyboardInterrupt

    outcome = run.run(on_event)
    assert outcome.stopped and outcome.last.step == 1 and save.calls == [1]


def test_a_failed_save_is_told_and_the_lock_released(seg, pair):
    lock = threading.Lock()
    outcome = make_run(seg, pair, save=Saves(fail=True), lock=lock).run()
    assert outcome.state is RunState.DONE and isinstance(outcome.save_error, OSError)
    assert "not saved: " in outcome.message and not lock.locked()


def test_one_run_at_a_time(seg, pair):
    lock = threading.Lock()
    first = make_run(seg, pair, lock=lock)
    with pytest.raises(RunBusy, match="already running"):
        make_run(seg, pair, lock=lock)
    # a run that never started: finishing it releases its lock, and it cannot start later
    outcome = first.finish()
    assert outcome.state is RunState.DONE and outcome.last is None and not lock.locked()
    assert list(first.iterate()) == []
    assert make_run(seg, pair, lock=lock).run().trained


def test_interleaved_items_and_a_failing_extra(seg, pair):
    calls: list[int] = []

    def extra(p):
        calls.append(p.step)
        yield ("preview", p.step)
        if p.step == 2:
            raise ValueError("preview broke")

    items = list(make_run(seg, pair, interleave=extra, steps=4).iterate())
    previews = [i for i in items if isinstance(i, tuple)]
    assert previews == [("preview", 1), ("preview", 2), ("preview", 3)]
    assert [i.step for i in items if isinstance(i, TrainProgress)] == [1, 2, 3, 4]
    assert calls == [1, 2, 3]  # not after the last step
