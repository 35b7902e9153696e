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
    # 320x320: the top half holds enough changes (>= safeguard.BANK_OBJECTS) for a round that
    # may adapt away from the starter's own data; on 192x192 the round counts as small and the
    # replay-bank guard undoes it (the bank crops 0.930 -> 0.881: forgetting them)
    image, truth = make_nuclei((320, 320), seed=11, **kw)
    test_image, test_truth = make_nuclei((192, 192), seed=12, **kw)
    seg = nu.Segmenter.pretrained("nuclei")
    before = instance_f1(seg.predict(test_image).labels, test_truth)
    mask = np.zeros(truth.shape, bool)
    mask[:160] = True  # the user corrected the top half only
    corrected = np.where(mask, truth, 0)
    for _ in seg.finetune(
        image, corrected, mask, steps=30, time_limit_s=None, patch_shape=(64, 64), seed=0
    ):
        pass
    after = instance_f1(seg.predict(test_image).labels, test_truth)
    # measured: 0.794 -> 0.900 with the safe round (a guarded, anchored fine-tune)
    assert after >= before + 0.08, (before, after)


def test_strong_augmentation_prepares_a_model_for_blurrier_noisier_images():
    """``strong_augment`` (blur, contrast curve, noise; used to train the starter) lets a model
    trained on sharp, clean nuclei find blurry, noisy ones (another microscope). Measured with
    these settings, 100 steps, net seeds 0/1/2: F1 0.07/0.09/0.03 without, 0.40/0.43/0.22 with."""
    train = [make_nuclei((128, 128), seed=s, blur=0.5, snr=20.0) for s in range(4)]
    tests = [make_nuclei((128, 128), seed=100 + s, blur=2.5, snr=3.0) for s in range(3)]

    def f1_after(strong: bool) -> float:
        seg = nu.Segmenter.new(base_channels=8, depth=2, seed=1)
        imgs, labs = [i for i, _ in train], [lab for _, lab in train]
        for _ in seg.finetune(
            imgs, labs, steps=100, time_limit_s=None, seed=1, strong_augment=strong
        ):
            pass
        return float(
            np.mean([instance_f1(seg.predict(i, engine="torch").labels, t) for i, t in tests])
        )

    plain, strong = f1_after(False), f1_after(True)
    assert strong > plain + 0.15, (plain, strong)


def test_strong_augment_must_be_true_or_false():
    seg = nu.Segmenter.new(base_channels=4, depth=2)
    image, truth = make_nuclei((64, 64), seed=1)
    with pytest.raises(ValueError, match="strong_augment"):
        next(seg.finetune(image, truth, steps=1, strong_augment="yes"))


def test_starter_separates_touching_nuclei_and_volumes_keep_their_own_seed_threshold():
    """The starter's seeds (interior above 0.85) cut touching nuclei apart that seeds above
    0.7 merge; volumes keep the threshold their 3D assembly was tuned at
    (``seed_threshold_3d``)."""
    from napari_unet.postprocess import instances_from_probabilities
    from napari_unet.synthetic import make_realistic_nuclei
    from napari_unet.synthetic3d import make_stacked_pair

    seg = nu.Segmenter.pretrained("nuclei")
    pp = seg.config["postprocess"]
    assert (pp["seed_threshold"], pp["seed_threshold_3d"]) == (0.85, 0.7)
    img, lab = make_realistic_nuclei((384, 384), seed=7, density=0.45, touching=0.7)
    pred = seg.predict(img)
    merged = instances_from_probabilities(pred.probabilities, seed_threshold=0.7)
    assert instance_f1(pred.labels, lab) > instance_f1(merged, lab) + 0.01

    vol, vlab = make_stacked_pair((26, 40, 40), radius=8, anisotropy=2.0)
    pp["seed_threshold"] = 1.0  # no 2D seed can pass
    assert seg.predict(img).labels.max() == 0
    out = seg.predict(vol, "ZYX", scale=(2, 1, 1)).labels
    assert out.max() == 2 and instance_f1(out, vlab) == 1.0
    streamed = np.zeros(vlab.shape, np.int32)  # slices linked one at a time: planes of a volume
    seg.predict(vol, "ZYX", scale=(2, 1, 1), labels_out=streamed)
    assert streamed.max() == 2 and instance_f1(streamed, vlab) == 1.0
    pp["seed_threshold_3d"] = None  # then volumes follow the 2D threshold
    assert seg.predict(vol, "ZYX", scale=(2, 1, 1)).labels.max() == 0
