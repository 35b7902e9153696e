"""The shipped starter model: loads offline, finds nuclei, and improves with a short round."""

import socket
from importlib import resources

import numpy as np
import pytest

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.metrics import instance_f1


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_starter_ships_inside_the_package_as_safetensors():
    folder = resources.files("napari_unet") / "models" / "nuclei"
    weights = folder / "weights.safetensors"
    assert weights.is_file() and (folder / "config.json").is_file()
    assert weights.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    assert len(weights.read_bytes()) < 5_000_000  # small enough for a CPU


def test_starter_loads_offline_and_counts_nuclei(no_network):
    seg = nu.Segmenter.pretrained("nuclei")
    assert seg.task == "instance" and seg.in_channels == 1
    image, truth = make_nuclei((256, 256), seed=2024)  # a seed it was not trained on
    pred = seg.predict(image)
    n_true, n_pred = int(truth.max()), int(pred.labels.max())
    assert abs(n_pred - n_true) <= 0.1 * n_true, (n_pred, n_true)
    assert instance_f1(pred.labels, truth) >= 0.9


def test_one_short_round_on_corrected_regions_improves_heldout_f1():
    kw = {"blur": 3.0, "touching": 0.7}  # blurrier and denser than anything it was trained on
    image, truth = make_nuclei((192, 192), seed=11, **kw)
    test_image, test_truth = make_nuclei((192, 192), seed=12, **kw)
    seg = nu.Segmenter.pretrained("nuclei")
    before = instance_f1(seg.predict(test_image).labels, test_truth)
    mask = np.zeros(truth.shape, bool)
    mask[:96] = True  # the user corrected the top half only
    corrected = np.where(mask, truth, 0)
    for _ in seg.finetune(
        image, corrected, mask, steps=30, time_limit_s=None, patch_shape=(64, 64), seed=0
    ):
        pass
    after = instance_f1(seg.predict(test_image).labels, test_truth)
    # measured: 0.677 -> 0.766 with the safe round (a guarded, anchored fine-tune)
    assert after >= before + 0.08, (before, after)
