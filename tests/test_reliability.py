"""Nothing lost, nothing hangs (issue 10): one case per row of the hostile-input table, and a
kill between every pair of file operations of a model save."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_unet as nu
from napari_unet import cli, store
from napari_unet.format import ModelFileError, load_model
from napari_unet.metrics import semantic_iou
from napari_unet.save import save_model
from napari_unet.synthetic import make_nuclei

TINY = ["--base-channels", "4", "--depth", "2"]


@pytest.fixture(autouse=True)
def registry_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's model registry."""
    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "registry"))
    return tmp_path / "registry"


class Hung(Exception):  # noqa: N818 - not an OSError: "except OSError" must not swallow it
    """Raised by :func:`deadline`."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (:class:`Hung`) instead of hanging: the rows that used to hang must not."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows
        yield
        return

    def on_alarm(*_):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run(*argv: str) -> int:
    return cli.main(["--threads", "1", *argv])


def tiny() -> nu.Segmenter:
    return nu.Segmenter.new(base_channels=4, depth=2)


@pytest.fixture
def image() -> np.ndarray:
    return make_nuclei((64, 64), seed=1)[0].astype(np.float32)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tiny().save(tmp_path / "model")


def edit_config(folder: Path, change) -> Path:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    change(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path


def refused(folder: Path, *needles: str) -> str:
    with deadline(20), pytest.raises(ModelFileError) as e:
        nu.Segmenter.load(folder)
    msg = str(e.value)
    for n in (str(folder), *needles):
        assert n in msg, (n, msg)
    return msg


# ------------------------------------------------------------------ 1, 2: CLI inputs kept


def test_row01_evaluate_csv_never_overwrites_its_input(tmp_path, capsys):
    labels = make_nuclei((32, 32), seed=2)[1]
    pred = tmp_path / "pred.tif"
    tifffile.imwrite(pred, labels)
    before = pred.read_bytes()
    alias = tmp_path / "sub" / ".." / "pred.tif"  # another spelling of the same file
    (tmp_path / "sub").mkdir()
    for csv_name in (str(pred), str(alias)):
        code = run("evaluate", str(pred), "--truth", str(pred), "--csv", csv_name)
        assert code == 2 and "--csv" in capsys.readouterr().err
    os.link(pred, tmp_path / "hardlink.csv")
    code = run("evaluate", str(pred), "--truth", str(pred), "--csv", str(tmp_path / "hardlink.csv"))
    assert code == 2
    assert pred.read_bytes() == before


def test_row02_predict_output_never_overwrites_an_input(tmp_path, model_dir, capsys):
    d = tmp_path / "d"
    d.mkdir()
    a, a_labels = d / "a.tif", d / "a_labels.tif"
    tifffile.imwrite(a, make_nuclei((32, 32), seed=3)[0])
    tifffile.imwrite(a_labels, make_nuclei((32, 32), seed=4)[0])
    before = a_labels.read_bytes()
    code = run("predict", str(model_dir), str(a), str(a_labels), "-o", str(d))
    err = capsys.readouterr().err
    assert code == 2 and "-o" in err and "a_labels.tif" in err
    assert a_labels.read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["a.tif", "a_labels.tif"]  # nothing written


# ------------------------------------------------------------------ 3: folder saves


class Killed(BaseException):
    """The process dies here: no handler, no finally block may touch the disk any more."""


_FILE_OPS = [
    (os, "replace"),
    (os, "rename"),
    (os, "unlink"),
    (os, "link"),
    (os, "mkdir"),
    (os, "fsync"),
    (shutil, "rmtree"),
]


@contextlib.contextmanager
def kill_at(n: int):
    """Every file operation counts; the n-th and all after it raise :class:`Killed`."""
    count = {"n": 0}
    saved = [(mod, name, getattr(mod, name)) for mod, name in _FILE_OPS]

    def wrap(real):
        def op(*args, **kwargs):
            count["n"] += 1
            if count["n"] >= n:
                raise Killed(f"killed at file operation {n}")
            return real(*args, **kwargs)

        return op

    for mod, name, real in saved:
        setattr(mod, name, wrap(real))
    try:
        yield count
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


def _model(v: float) -> tuple[dict, dict]:
    return {"w": torch.full((4,), v)}, {"v": v}


def _hidden(tmp_path: Path, target: Path) -> list[str]:
    names = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if target.is_dir():
        names += [
            p.name for p in target.iterdir() if p.name not in ("config.json", "weights.safetensors")
        ]
    return names


@pytest.mark.parametrize("form", ["folder", "file"])
def test_row03_kill_between_every_pair_of_file_operations(tmp_path, form):
    target = tmp_path / ("m" if form == "folder" else "m.safetensors")
    save_model(target, *_model(1.0))
    save_model(target, *_model(2.0))  # the second save replaces an existing model
    n, completed = 1, False
    while not completed:
        assert n < 200, "a save should need far fewer file operations"
        with kill_at(n):
            try:
                save_model(target, *_model(3.0))
                completed = True
            except Killed:
                pass
        sd, cfg = load_model(target)  # the previous model, or the new one, never a mix
        assert cfg["v"] in (2.0, 3.0) and torch.all(sd["w"] == cfg["v"]), n
        if not completed:
            save_model(target, *_model(2.0))  # the next save sweeps what the kill left
            assert _hidden(tmp_path, target) == [], n
            assert load_model(target)[1]["v"] == 2.0
        n += 1
    assert n > 4  # the kill really landed between operations


def test_row03_load_recovers_a_swap_killed_between_its_renames(tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_model(target, *_model(1.0))
    real, calls = os.replace, {"n": 0}

    def die_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(os, "replace", die_on_second)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Killed):
        save_model(target, *_model(2.0))
    monkeypatch.undo()
    sd, cfg = load_model(target)  # recovered on load, not on the next save
    assert cfg["v"] == 1.0 and torch.all(sd["w"] == 1.0)


def test_stale_temp_files_swept_on_next_save(tmp_path):
    target = tmp_path / "m"
    save_model(target, *_model(1.0))
    stale = [
        tmp_path / ".m.abc123.tmp",
        tmp_path / ".m.new-0123456789ab.tmp",
        target / ".weights.xyz.tmp",
        target / ".config.xyz.tmp",
        target / ".weights.0123.bak",
    ]
    for p in stale:
        p.write_bytes(b"left by a kill")
    (tmp_path / ".m.old-0123456789ab.tmp").mkdir()
    (tmp_path / "user-file.txt").write_text("not ours")
    save_model(target, *_model(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "user-file.txt"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.safetensors"]


def test_folder_with_other_files_keeps_them(tmp_path):
    target = tmp_path / "m"
    save_model(target, *_model(1.0))
    (target / "notes.txt").write_text("mine")
    save_model(target, *_model(2.0))
    assert (target / "notes.txt").read_text() == "mine"
    assert load_model(target)[1]["v"] == 2.0


# ------------------------------------------------------------------ 4: train -o


def _train_args(tmp_path: Path, out: str) -> list[str]:
    image, labels = make_nuclei((32, 32), seed=1)
    img_p, lab_p = tmp_path / "cells.tif", tmp_path / "cells_true.tif"
    tifffile.imwrite(img_p, image)
    tifffile.imwrite(lab_p, labels)
    return ["train", str(img_p), "--labels", str(lab_p), "-o", out, "--steps", "1", *TINY]


def _unwritable_cwd(monkeypatch, tmp_path: Path) -> None:
    """Saving into the working folder fails (as in a read-only folder, even for root)."""
    real = nu.Segmenter.save
    monkeypatch.chdir(tmp_path)

    def save(self, path):
        if Path(path).parent.resolve() == Path.cwd().resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real(self, path)

    monkeypatch.setattr(nu.Segmenter, "save", save)


def test_row04_train_output_checked_before_training(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, str(tmp_path / "cells.tif" / "model"))  # under a file
    _unwritable_cwd(monkeypatch, tmp_path)
    code = run(*args)
    out, err = capsys.readouterr()
    assert code == 2 and "-o" in err and "Traceback" not in err
    assert "trained" not in out  # refused before any training
    assert not list(tmp_path.glob("napari-unet-rescued-*"))


def test_row04_model_not_saved_at_output_is_rescued_and_located(tmp_path, monkeypatch, capsys):
    args = _train_args(tmp_path, str(tmp_path / "model"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    _unwritable_cwd(monkeypatch, tmp_path)

    def disk_full(seg, target):
        raise OSError(28, "No space left on device", target)

    monkeypatch.setattr(cli, "_save_segmenter", disk_full)
    code = run(*args)
    err = capsys.readouterr().err
    assert code == 2 and "-o" in err and "No space left" in err
    rescued = list((tmp_path / "tmp").glob("napari-unet-rescued-*"))
    assert len(rescued) == 1 and str(rescued[0]) in err
    nu.Segmenter.load(rescued[0])


# ------------------------------------------------------------------ 5-10: model files


def test_row05_huge_depth_refused_at_once(model_dir):
    edit_config(model_dir, lambda c: c["architecture"].update(depth=1_000_000))
    refused(model_dir, "architecture.depth", "config.json")


def test_weights_shapes_checked_against_the_architecture(model_dir):
    edit_config(model_dir, lambda c: c["architecture"].update(base_channels=8))
    refused(model_dir, "architecture", "shape")


@pytest.mark.parametrize("key", ["tile_shape", "overlap"])
def test_row06_missing_key_named(model_dir, key):
    edit_config(model_dir, lambda c: c.pop(key))
    refused(model_dir, f"'{key}'", "missing")


def test_row07_normalization_must_be_an_object(model_dir):
    edit_config(model_dir, lambda c: c.update(normalization="percentile"))
    refused(model_dir, "'normalization'")


def test_row08_wrong_type_named(model_dir):
    edit_config(model_dir, lambda c: c["postprocess"].update(seed_threshold="high"))
    refused(model_dir, "postprocess.seed_threshold", "number")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["postprocess"].update(seed_threshold_3d=1.5), "postprocess.seed_threshold_3d"),
        (lambda c: c.update(volume_size_bias=-1.0), "volume_size_bias"),
        (lambda c: c["postprocess"].update(smooth_3d=-0.5), "postprocess.smooth_3d"),
        (lambda c: c["postprocess"].update(h_fraction_3d=5.0), "postprocess.h_fraction_3d"),
    ],
)
def test_volume_settings_out_of_range_named(model_dir, edit, field):
    edit_config(model_dir, edit)
    refused(model_dir, field)


def test_unknown_key_is_a_typo(model_dir):
    edit_config(model_dir, lambda c: c["postprocess"].update(seed_treshold=0.4))
    refused(model_dir, "postprocess.seed_treshold", "not a known field")


def test_row09_deeply_nested_json(model_dir):
    (model_dir / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ModelFileError, match="nested too deeply"):
        nu.Segmenter.load(model_dir)
    with pytest.raises(ModelFileError):
        store.read_config(model_dir)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_row10_named_pipe_refused(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(ModelFileError, match="named pipe"):
        nu.Segmenter.load(fifo)


# ------------------------------------------------------------------ 11-13: predict inputs


def test_row11_nan_in_dask_and_zarr_inputs(image):
    import dask.array as da
    import zarr

    seg = tiny()
    bad = image.copy()
    bad[40, 50] = np.nan
    z = zarr.zeros(bad.shape, chunks=(16, 16), dtype="f4")
    z[:] = bad
    for lazy in (da.from_array(bad, chunks=16), z):
        with pytest.raises(ValueError, match="NaN"):
            seg.predict(lazy, device="cpu")
    seg.predict(da.from_array(image, chunks=16), device="cpu")  # a clean one is fine


def test_row12_float64_beyond_float32_range():
    seg = nu.Segmenter.pretrained("nuclei")
    img = make_nuclei((96, 96), seed=5)[0].astype(np.float64)
    ref = seg.predict(img, device="cpu")
    big = seg.predict(img * 1e300, device="cpu")
    assert np.isfinite(big.probabilities).all()
    assert big.labels.max() > 0 and np.mean(big.labels == ref.labels) > 0.99


def test_row13_overlap_not_smaller_than_tile_refused(image):
    with pytest.raises(ValueError, match="overlap"):
        tiny().predict(image, tile_shape=(32, 32), overlap=10**6, device="cpu")


# ------------------------------------------------------------------ 14-17, 20: finetune


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"time_limit_s": float("nan"), "steps": None}, "time_limit_s"),
        ({"batch_size": 0}, "batch_size"),
        ({"patch_shape": (0, 0)}, "patch_shape"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"lr": -1.0}, "lr"),
        ({"steps": 2.5}, "steps"),
    ],
    ids=["row14-nan-budget", "row15-batch", "row16-patch", "row17-val", "lr", "steps"],
)
def test_rows14_17_finetune_arguments_named(image, kwargs, name):
    labels = make_nuclei((64, 64), seed=1)[1]
    with deadline(20), pytest.raises(ValueError, match=name):
        next(tiny().finetune(image, labels, **{"steps": 1, "device": "cpu", **kwargs}))


def test_row17_same_rule_in_cli_and_api():
    from napari_unet.config import TrainOptions

    TrainOptions.checked(steps=1, val_fraction=0.49)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainOptions.checked(steps=1, val_fraction=0.5)
    assert cli.main(["train", "a.tif", "--labels", "b.tif", "-o", "m", "--val", "0.5"]) == 2


class Untouchable:
    """A huge lazy image whose data must not be read (only its shape)."""

    shape = (200_000, 200_000)
    dtype = np.dtype("float32")
    ndim = 2

    def __getitem__(self, key):
        raise AssertionError("the image was read before its shape was checked")

    def __array__(self, *a, **k):
        raise AssertionError("the image was read before its shape was checked")


def test_row20_shapes_checked_before_reading_data():
    with pytest.raises(ValueError, match="labels have shape"):
        next(tiny().finetune(Untouchable(), np.zeros((64, 64), np.int32), steps=1))


# ------------------------------------------------------------------ 18, 19


def test_row18_truncated_tiff_named_as_damaged(tmp_path, capsys):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, (np.arange(256 * 256) % 999).reshape(256, 256).astype(np.uint16))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    code = run("evaluate", str(cut), "--truth", str(full))
    err = capsys.readouterr().err
    assert code == 2 and "cut.tif" in err and "damaged" in err


def test_row19_semantic_iou_with_instance_ids():
    a = np.zeros((8, 8), np.int64)
    a[0, 0] = 2**31 - 1
    with pytest.raises(ValueError, match="class id too large: instance labels?"):
        semantic_iou(a, a)
    b = np.array([[0, 1], [2, 2]])
    assert semantic_iou(b, b) == {0: 1.0, 1: 1.0, 2: 1.0}


# ------------------------------------------------------------------ the typed config


def test_config_round_trip_and_todays_files():
    from napari_unet.config import ModelConfig

    raw = json.loads((Path(nu.__file__).parent / "models" / "nuclei" / "config.json").read_text())
    assert raw["format_version"] == 1
    cfg = ModelConfig.from_dict(raw)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    seg = nu.Segmenter.pretrained("nuclei")
    assert isinstance(seg.config, dict) and seg.model_config == cfg
    assert seg.config == cfg.to_dict()


def test_config_accepts_the_new_fields(model_dir):
    def add(c):
        c.update(diameter=17.5, model_card={"what": "test", "nested": {"a": [1, 2]}})
        c["postprocess"].update(min_seed_size=3, assembly="3d")

    edit_config(model_dir, add)
    seg = nu.Segmenter.load(model_dir)
    assert seg.config["diameter"] == 17.5 and seg.config["postprocess"]["assembly"] == "3d"
    edit_config(model_dir, lambda c: c.update(diameter=0))
    refused(model_dir, "'diameter'")
    edit_config(model_dir, lambda c: c.update(diameter=None, model_card=[1]))
    refused(model_dir, "'model_card'")


def test_history_entries_keep_unknown_log_keys(model_dir):
    entry = {"steps": 3, "seconds": 1.5, "new_log_key": [1, 2]}
    edit_config(model_dir, lambda c: c.update(history=[entry]))
    h = nu.Segmenter.load(model_dir).config["history"][0]
    assert h["steps"] == 3 and h["new_log_key"] == [1, 2]
    edit_config(model_dir, lambda c: c.update(history=[{"steps": -1}]))
    refused(model_dir, "history[0].steps")


def test_migration_table(monkeypatch):
    from napari_unet import config as config_mod
    from napari_unet.config import ModelConfig

    raw = nu.Segmenter.new().config
    old = {**raw, "format_version": 0, "tiles": raw["tile_shape"]}
    del old["tile_shape"]

    def v0_to_v1(d):
        d["tile_shape"] = d.pop("tiles")
        return d

    monkeypatch.setitem(config_mod.MIGRATIONS, 0, v0_to_v1)
    assert ModelConfig.from_dict(old).tile_shape == raw["tile_shape"]


def test_non_finite_numbers_in_config(model_dir):
    edit_config(model_dir, lambda c: c["normalization"].update(high=math.inf))
    refused(model_dir, "normalization.high", "finite")
