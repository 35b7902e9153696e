"""The command line of a new user's first hour (issue 11): no silent overwrite, names and
suggestions, option words in errors, thread counts that hold up on a busy CPU."""

from __future__ import annotations

import numpy as np
import pytest
import test_cli
import tifffile

from napari_unet import cli, cpu

TINY = test_cli.TINY
pair = test_cli.pair  # the shared fixtures: a 64x64 image/labels pair, a temporary registry
registry_home = test_cli.registry_home


def train(pair, out, *extra: str, threads: bool = True) -> int:
    img, lab = pair
    argv = ["train", str(img), "--labels", str(lab), "-o", str(out), "--steps", "2", *TINY]
    return cli.main([*(["--threads", "1"] if threads else []), *argv, "--val", "0", *extra])


# ----------------------------------------------------------------------------- item 6
def test_train_does_not_overwrite_a_model_without_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "model"
    assert train(pair, out) == 0
    before = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert train(pair, out) == 2
    err = capsys.readouterr().err
    assert "already holds a model" in err and "--overwrite" in err
    assert (out / "config.json").read_bytes() == before
    assert train(pair, out, "--overwrite") == 0


def test_train_names_the_model_in_words(pair, tmp_path, capsys):
    assert train(pair, tmp_path / "m") == 0
    text = capsys.readouterr().out
    assert "Segmenter(" not in text and "classes=" not in text
    assert "a new instance model (2D, 1 channel(s))" in text and "1 CPU thread" in text


def test_models_list_names_the_starter(capsys):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "nuclei" in out and "pretrained:NAME" in out


def test_predict_suggests_the_starter_and_help_lists_it(pair, tmp_path, capsys):
    assert cli.main(["predict", "nuclei", str(pair[0]), "-o", str(tmp_path / "o")]) == 2
    assert "did you mean pretrained:nuclei" in capsys.readouterr().err
    assert cli.main(["predict", "-h"]) == 0
    assert "shipped with the package: nuclei" in " ".join(capsys.readouterr().out.split())


def test_errors_use_the_options_words(tmp_path, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 32, 3), np.uint8))
    code = cli.main(
        ["--threads", "1", "predict", "pretrained:nuclei", str(rgb), "-o", str(tmp_path / "o"),
         "--axes", "YXC"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--channel C" in err and "channel=" not in err
    assert cli.cli_words("use device='auto' or 'cpu'") == "use --device auto or --device cpu"


def test_trained_on_list_keeps_items_whole():
    items = ["48 generated nuclei images (seed 0, 256x256)", "cells.tif"]
    text = cli._short_list(items, limit=40)
    assert "( (" not in text and text.endswith("(+1 more)")
    assert cli._short_list(["a.tif", "b.tif"]) == "a.tif, b.tif"


def test_demo_says_where_it_writes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--threads", "1", "demo", "-o", str(out), "--rounds", "1", "--seconds", "1",
            "--size", "64", "--steps", "2", *TINY]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"to {out} (choose with -o DIR)" in text.splitlines()[0]
    assert "real fluorescence image" in text


# ----------------------------------------------------------------------------- item 5
def test_threads_are_the_free_cores(monkeypatch):
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    # measured on 2 cores with one busy program: 2 threads 0.34 steps/s, 1 thread 5.7
    assert cpu.default_threads(busy=1.0) == 1
    assert cpu.default_threads(busy=0.0) == 2
    assert cpu.default_threads(gui=True, busy=0.0) == 1  # one core for the viewer
    monkeypatch.setattr(cpu, "_cores", lambda: 8)
    assert cpu.default_threads(busy=2.1) == 6  # 0.1 of a core is not taken
    assert cpu.default_threads(busy=2.3) == 5
    assert cpu.default_threads(gui=True, busy=0.1) == 7


def test_busy_watch_sees_another_busy_program_without_waiting():
    """The Train widget's auto threads read the CPU use of other programs from a watch polled
    in the background: the click never sleeps to measure it (it slept 0.2 s before)."""
    import subprocess
    import sys
    import time

    if cpu._busy_ticks() is None:
        pytest.skip("no /proc/stat here")
    watch = cpu.BusyWatch(min_s=0.2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        t0 = time.perf_counter()
        busy = watch.busy()
        took = time.perf_counter() - t0
    finally:
        hog.kill()
        hog.wait()
    assert took < 0.05, took  # two file reads, no sleep
    assert busy >= 0.5, busy  # the other program's core, over the last second


def test_cli_picks_threads_like_the_gui_and_reports_a_busy_cpu(pair, tmp_path, monkeypatch,
                                                                capsys):
    import torch

    asked = []
    monkeypatch.setattr(cpu, "default_threads", lambda gui=False: asked.append(gui) or 1)
    monkeypatch.setattr(cpu, "CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    monkeypatch.setattr(cpu._Sampler, "others", lambda self: 1.6)  # another program is busy
    before = torch.get_num_threads()
    assert train(pair, tmp_path / "m", threads=False) == 0
    assert asked == [False] and torch.get_num_threads() == before
    out = capsys.readouterr()
    assert "training is slowed by other programs" in out.err
    assert "note: the CPU was shared with other programs" in out.out


def test_load_monitor_is_quiet_on_an_idle_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    monkeypatch.setattr(cpu._Sampler, "others", lambda self: 0.1)
    mon = cpu.LoadMonitor(2, every_s=0.0)
    assert all(mon.update(k, k * 0.2) is None for k in range(1, 20))
    assert mon.note is None


# ----------------------------------------------------------------------------- item 3
def test_a_finetuned_model_lists_its_own_score_not_the_starters(pair, capsys):
    """Fine-tuned from the starter without a hold-out: no validation score of its own, so
    `models list` must not show the starter's (it did: 0.943 copied from the parent)."""
    img, lab = pair
    starter_score = f"{cli.load_segmenter('pretrained:nuclei').config['val_score']:.3f}"
    argv = ["train", str(img), "--labels", str(lab), "--from", "pretrained:nuclei"]
    argv += ["-o", "registry:mine", "--steps", "2", "--val", "0"]
    assert cli.main(["--threads", "1", *argv]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "mine" in line)
    assert starter_score not in row, row
