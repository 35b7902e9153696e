"""Tests for the command line interface (napari_unet.cli), run in-process through ``main``.

Everything is tiny (64x64 synthetic images, a 4-channel depth-2 U-Net, 2 training steps) so
the whole file runs in a few seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet import cli
from napari_unet.data import make_nuclei
from napari_unet.segmenter import Segmenter

TINY = ["--base-channels", "4", "--depth", "2"]


def run(*argv: str) -> int:
    """``napari-unet --threads 1 ...``: one torch thread avoids oversubscribing a busy CPU."""
    return cli.main(["--threads", "1", *argv])


@pytest.fixture(autouse=True)
def registry_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's model registry."""
    home = tmp_path / "registry"
    monkeypatch.setenv("NAPARI_UNET_HOME", str(home))
    return home


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A 64x64 synthetic nuclei image and its labels, as TIFF files."""
    image, labels = make_nuclei((64, 64), seed=1)
    img_p, lab_p = tmp_path / "cells.tif", tmp_path / "cells_true.tif"
    tifffile.imwrite(img_p, image)
    tifffile.imwrite(lab_p, labels)
    return img_p, lab_p


def _train(pair: tuple[Path, Path], out: Path | str, *extra: str) -> int:
    img, lab = pair
    argv = ["train", str(img), "--labels", str(lab), "-o", str(out), "--steps", "2", *TINY]
    return run(*argv, "--print-every", "0", *extra)


def _assert_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("napari-unet: error:") or "\nnapari-unet: error:" in err
    assert "Traceback" not in err
    for n in needles:
        assert n in err


# ----------------------------------------------------------------------------- basics


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert "0.1.0" in capsys.readouterr().out


def test_no_command_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert cli.main(["predict"]) == 2  # argparse: missing MODEL/IMAGE/-o
    assert "required" in capsys.readouterr().err


def test_headless_import() -> None:
    code = (
        "import sys, napari_unet.cli\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
        "'magicgui', 'torch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_bar() -> None:
    buf = io.StringIO()
    bar = cli.ProgressBar(True, "tiles", stream=buf, width=10, min_interval=0)
    bar.update(12, 40)
    assert buf.getvalue().split("\r")[-1].rstrip() == "[###       ] 12/40 tiles"  # by tqdm
    bar.update(20, 40, "half way")
    assert buf.getvalue().split("\r")[-1].rstrip() == "[#####     ] half way"
    bar.close()
    assert buf.getvalue().endswith("\r")  # erased: the result lines stay clean
    off = io.StringIO()
    cli.ProgressBar(False, stream=off).update(1, 2)
    assert off.getvalue() == ""


def test_label_dtype() -> None:
    assert cli._label_dtype(np.array([0, 65535], np.int32)) is np.uint16
    assert cli._label_dtype(np.array([0, 65536], np.int32)) is np.int32


# ----------------------------------------------------------------------------- predict


def test_predict_new_model(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img, _ = pair
    out = tmp_path / "out"
    code = run("predict", "new", str(img), "-o", str(out), "--probabilities", "--progress")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    labels = tifffile.imread(out / "cells_labels.tif")
    assert labels.shape == (64, 64) and labels.dtype == np.uint16
    probs = tifffile.imread(out / "cells_probabilities.tif")
    assert probs.shape == (3, 64, 64) and probs.dtype == np.float32
    assert "cells.tif:" in captured.out and "objects" in captured.out
    assert "untrained" in captured.err  # warning for MODEL 'new'
    assert "tiles" in captured.err  # progress bar forced with --progress


def test_predict_engine_option_names_the_engine_and_refuses_unknown_ones(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img, _ = pair
    code = run("predict", "new", str(img), "-o", str(tmp_path / "a"), "--engine", "torch")
    assert code == 0
    assert "(cpu, torch)" in capsys.readouterr().out
    code = run("predict", "new", str(img), "-o", str(tmp_path / "b"), "--engine", "tensorrt")
    assert code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_predict_never_replaces_existing_results_without_overwrite(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A cells_labels.tif already in OUTDIR may be someone's hand-made truth: one image or
    several, in-process (no cluster), it is kept unless --overwrite."""
    img, truth = pair
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, tifffile.imread(img))
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "cells_labels.tif"
    mine.write_bytes(truth.read_bytes())
    before = mine.read_bytes()
    for argv in (["predict", "new", str(img)], ["predict", "new", str(img), str(other)]):
        code = run(*argv, "-o", str(out), "--cluster", "none")
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert mine.read_bytes() == before
        assert "cells.tif: skipped, cells_labels.tif exists (--overwrite replaces it)" in (
            captured.out
        )
    assert (out / "other_labels.tif").exists()  # the other image was predicted
    assert "1 images" in captured.out and "1 skipped" in captured.out
    # --probabilities: an existing probabilities file alone is kept too
    (out / "other_labels.tif").unlink()
    (out / "other_probabilities.tif").write_bytes(b"mine")
    run("predict", "new", str(other), "-o", str(out), "--probabilities")
    assert (out / "other_probabilities.tif").read_bytes() == b"mine"
    assert not (out / "other_labels.tif").exists()
    code = run("predict", "new", str(img), "-o", str(out), "--overwrite")
    assert code == 0
    assert mine.read_bytes() != before  # asked for: replaced


# ----------------------------------------------------------------------------- train


def test_train_then_predict(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    threads = torch.get_num_threads()
    model = tmp_path / "model"
    assert _train(pair, model) == 0
    assert torch.get_num_threads() == threads  # --threads is undone after the command
    out = capsys.readouterr().out
    assert "step      2" in out and "saved model to" in out
    config = json.loads((model / "config.json").read_text())
    assert config["trained_on"] == ["cells.tif"]
    assert config["architecture"]["base_channels"] == 4
    assert len(config["history"]) == 1

    res = tmp_path / "res"
    assert run("predict", str(model), str(pair[0]), "-o", str(res), "--tile", "32") == 0
    labels = tifffile.imread(res / "cells_labels.tif")
    assert labels.shape == (64, 64) and labels.dtype == np.uint16


def test_train_into_registry_and_models(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "list"]) == 0
    assert "no saved models" in capsys.readouterr().out

    assert _train(pair, "registry:tiny", "--val", "0") == 0
    capsys.readouterr()
    assert cli.main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny" in listing and "instance" in listing and "cells.tif" in listing

    assert cli.main(["models", "mv", "tiny", "small"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "rm", "tiny"]) == 2  # gone after the rename
    _assert_error(2, capsys.readouterr().err, "tiny")
    assert cli.main(["models", "rm", "small"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list"]) == 0
    assert "no saved models" in capsys.readouterr().out


def test_train_ctrl_c_still_saves(
    tmp_path: Path,
    pair: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = Segmenter.finetune

    def interrupted(self, *args, **kwargs):  # Ctrl-C right after the first step
        gen = original(self, *args, **kwargs)
        try:
            yield next(gen)
            raise KeyboardInterrupt
        finally:
            gen.close()

    monkeypatch.setattr(Segmenter, "finetune", interrupted)
    model = tmp_path / "model"
    assert _train(pair, model) == 0
    captured = capsys.readouterr()
    assert "interrupted at step 1" in captured.err
    assert "stopped by the user" in captured.out
    config = json.loads((model / "config.json").read_text())
    assert config["history"][-1]["steps"] == 1


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_identical(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, lab = pair
    table = tmp_path / "scores.csv"
    assert (
        cli.main(
            ["evaluate", str(lab), str(lab), "--truth", str(lab), str(lab)] + ["--csv", str(table)]
        )
        == 0
    )
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    f1 = header.index("f1@0.5")
    rows = [line.split() for line in out.splitlines()[2:5]]
    assert [r[0] for r in rows] == ["cells_true.tif", "cells_true.tif", "mean"]
    assert all(r[f1] == "1.000" for r in rows)
    with open(table, newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 3 and records[-1]["prediction"] == "mean"
    assert all(float(r["f1"]) == 1.0 and float(r["map"]) == 1.0 for r in records)


# ----------------------------------------------------------------------------- demo


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "-o", str(out), "--rounds", "1", "--seconds", "2", "--size", "64", *TINY]
    assert run(*argv) == 0
    text = capsys.readouterr().out
    for name in ("train_image.tif", "train_labels.tif", "test_image.tif", "test_labels.tif"):
        assert tifffile.imread(out / name).shape == (64, 64)
    assert tifffile.imread(out / "prediction_round1.tif").shape == (64, 64)
    assert (out / "model" / "config.json").is_file()
    assert "F1@0.5" in text and "AP@0.5:0.95" in text
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("1 "))
    assert len(row) == 6 and 0.0 <= float(row[4]) <= 1.0


# ----------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["predict", "new", str(tmp_path / "nope.tif"), "-o", str(tmp_path)])
    _assert_error(code, capsys.readouterr().err, "nope.tif", "not found")


def test_error_shape_mismatch(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img, _ = pair
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((60, 64), np.uint16))
    code = cli.main(["train", str(img), "--labels", str(small), "-o", str(tmp_path / "m")])
    _assert_error(code, capsys.readouterr().err, "shape mismatch", "(60, 64)")
    assert not (tmp_path / "m").exists()
    code = cli.main(["evaluate", str(small), "--truth", str(pair[1])])
    _assert_error(code, capsys.readouterr().err, "shape mismatch")


def test_error_corrupt_model(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(600))
    code = cli.main(["predict", str(bad), str(pair[0]), "-o", str(tmp_path / "o")])
    _assert_error(code, capsys.readouterr().err, "model.safetensors")


def test_error_bad_axes_and_not_a_tiff(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["predict", "new", str(pair[0]), "-o", str(tmp_path), "--axes", "ZYX"])
    _assert_error(code, capsys.readouterr().err, "axes")
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    code = cli.main(["evaluate", str(text), "--truth", str(pair[1])])
    _assert_error(code, capsys.readouterr().err, "not a valid TIFF")
