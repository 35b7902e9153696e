import numpy as np
import pytest

from napari_unet.metrics import instance_f1
from napari_unet.postprocess import classes_from_probabilities, instances_from_probabilities
from napari_unet.targets import (
    BACKGROUND,
    BOUNDARY,
    IGNORE,
    INTERIOR,
    instance_targets,
    semantic_targets,
)


def two_touching_squares():
    lab = np.zeros((20, 30), np.int32)
    lab[5:15, 5:15] = 1
    lab[5:15, 15:25] = 2  # shares a border with object 1
    return lab


def test_instance_targets_mark_the_shared_border():
    lab = two_touching_squares()
    t = instance_targets(lab)
    assert t.dtype == np.int64
    assert t[0, 0] == BACKGROUND and t[10, 10] == INTERIOR
    # the two columns where the objects touch are boundary, so the objects are separable
    assert (t[6:14, 14] == BOUNDARY).all() and (t[6:14, 15] == BOUNDARY).all()
    assert (t[5, 5:25] == BOUNDARY).all()


def test_targets_mask_and_errors():
    lab = two_touching_squares()
    mask = np.zeros(lab.shape, bool)
    mask[:, :12] = True
    t = instance_targets(lab, mask)
    assert (t[:, 12:] == IGNORE).all() and (t[:, :12] != IGNORE).all()
    with pytest.raises(ValueError, match="mask shape"):
        instance_targets(lab, mask[:, :5])
    with pytest.raises(ValueError, match="negative"):
        instance_targets(-lab)
    with pytest.raises(ValueError, match="integer"):
        instance_targets(lab + 0.5)
    with pytest.raises(ValueError, match="class id 2"):
        semantic_targets(lab, num_classes=2)
    assert lab.max() == 2  # input untouched


def perfect_probabilities(lab):
    t = instance_targets(lab)
    return np.stack([(t == k).astype(np.float32) for k in range(3)])


def test_watershed_separates_touching_objects():
    lab = two_touching_squares()
    out = instances_from_probabilities(perfect_probabilities(lab), min_size=1)
    assert out.dtype == np.int32
    assert out.max() == 2
    assert instance_f1(out, lab) == 1.0


def test_strips_keep_objects_whole():
    # objects crossing strip borders keep one id when the watershed runs in strips
    rng = np.random.default_rng(0)
    lab = np.zeros((300, 200), np.int32)
    k = 0
    for y in range(10, 290, 40):
        for x in range(10, 190, 40):
            k += 1
            lab[y : y + 30 + rng.integers(0, 8), x : x + 30] = k
    prob = perfect_probabilities(lab)
    whole = instances_from_probabilities(prob, strip=10_000)
    strips = instances_from_probabilities(prob, strip=32, margin=48)
    assert whole.max() == k
    assert instance_f1(strips, lab) == 1.0
    assert np.array_equal(whole > 0, strips > 0)


def test_small_objects_removed_and_3d():
    lab = np.zeros((10, 20, 20), np.int32)
    lab[2:8, 3:12, 3:12] = 1
    prob = perfect_probabilities(lab)
    prob[:, 0, 18, 18] = [0, 1, 0]  # a one-voxel speck
    out = instances_from_probabilities(prob)
    assert out.max() == 1 and instance_f1(out, lab) == 1.0


def test_empty_and_bad_probabilities():
    prob = np.zeros((3, 16, 16), np.float32)
    prob[0] = 1
    assert instances_from_probabilities(prob).max() == 0
    with pytest.raises(ValueError, match=r"\(3, \*spatial\)"):
        instances_from_probabilities(np.zeros((2, 8, 8)))


def test_classes_argmax():
    prob = np.zeros((3, 4, 5), np.float32)
    prob[2, :, 3:] = 1
    prob[1, :, :3] = 1
    out = classes_from_probabilities(prob)
    assert (out[:, 3:] == 2).all() and (out[:, :3] == 1).all()
