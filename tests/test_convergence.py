"""Learning works: fine-tuning from scratch finds the nuclei of a *different* image."""

import numpy as np

import napari_unet as nu
from napari_unet.data import make_nuclei
from napari_unet.metrics import instance_f1


def test_from_scratch_learns_to_separate_touching_nuclei():
    img, lab = make_nuclei((128, 128), seed=1)
    test_img, test_lab = make_nuclei((128, 128), seed=99)  # a different image
    seg = nu.Segmenter.new(base_channels=8, depth=2, seed=0)
    before = instance_f1(seg.predict(test_img).labels, test_lab)
    events = list(
        seg.finetune(img, lab, steps=150, time_limit_s=None, patch_shape=(64, 64), lr=5e-3, seed=0)
    )
    assert events[-1].loss < events[0].loss
    pred = seg.predict(test_img).labels
    after = instance_f1(pred, test_lab)
    assert before < 0.2
    assert after >= 0.8, after
    # touching truth objects come out as separate objects, not merged
    assert pred.max() >= 0.75 * test_lab.max()


def test_partial_correction_improves_the_model():
    """Correct a region only (mask), train briefly: F1 on a held-out image goes up."""
    img, lab = make_nuclei((128, 128), seed=5)
    test_img, test_lab = make_nuclei((128, 128), seed=7)
    seg = nu.Segmenter.new(base_channels=8, depth=2, seed=0)
    list(seg.finetune(img, lab, steps=40, time_limit_s=None, patch_shape=(64, 64), lr=5e-3))
    f1_before = instance_f1(seg.predict(test_img).labels, test_lab)
    mask = np.zeros(lab.shape, bool)
    mask[:, :64] = True  # the user corrected the left half only
    list(seg.finetune(img, lab, mask, steps=80, time_limit_s=None, patch_shape=(64, 64), lr=3e-3))
    f1_after = instance_f1(seg.predict(test_img).labels, test_lab)
    assert f1_after > f1_before + 0.05, (f1_before, f1_after)
