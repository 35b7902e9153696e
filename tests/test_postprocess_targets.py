from pathlib import Path

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


@pytest.mark.parametrize("small_flood", [None, 0])
def test_parallel_strips_equal_one_at_a_time(monkeypatch, small_flood):
    # strips post-processed in threads give exactly the objects of one strip after the other,
    # on a noise-like map where most of the foreground is flooded (skimage and own flood)
    import torch

    import napari_unet.postprocess as pp

    if small_flood is not None:
        monkeypatch.setattr(pp, "SMALL_FLOOD", small_flood)
    from scipy import ndimage

    rng = np.random.default_rng(3)
    inner = ndimage.gaussian_filter(rng.random((1100, 1000)), 2)
    inner = (inner - inner.min()) / np.ptp(inner)
    bg = np.clip(1.0 - 1.6 * inner, 0, 1)
    prob = np.stack([bg, inner * (1 - bg), (1 - inner) * (1 - bg)]).astype(np.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = instances_from_probabilities(prob, strip=64, margin=24)
        torch.set_num_threads(3)
        assert pp._strip_plan(1100, 1000, 64, 24)[1] == 3  # three strips in flight
        parallel = instances_from_probabilities(prob, strip=64, margin=24)
    finally:
        torch.set_num_threads(old)
    assert serial.max() > 500  # many touching objects, separated by the flood
    assert np.array_equal(serial, parallel)


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


# ---------------------------------------------------------------- fast flooding (issue 13)
@pytest.fixture(params=["numba", "numpy"])
def flood_version(request, monkeypatch):
    """Runs a test with the compiled flood (skipped without numba) and the numpy one."""
    import napari_unet.postprocess as pp

    if request.param == "numba":
        pytest.importorskip("numba")
        if pp._compiled_flood() is None:
            pytest.skip("numba is installed but could not compile here")
    monkeypatch.setattr(pp, "USE_NUMBA", request.param == "numba")
    return request.param


def test_flood_splits_touching_nuclei_at_the_valley_like_skimage(flood_version):
    from skimage.segmentation import watershed

    from napari_unet.postprocess import flood

    yy, xx = np.mgrid[:64, :96]
    a = np.hypot(yy - 32, xx - 30) < 18
    b = np.hypot(yy - 32, xx - 62) < 18
    interior = np.maximum(
        np.clip(1 - np.hypot(yy - 32, xx - 30) / 18, 0, 1),
        np.clip(1 - np.hypot(yy - 32, xx - 62) / 18, 0, 1),
    )
    markers = np.zeros((64, 96), np.int32)
    markers[30:34, 28:32], markers[30:34, 60:64] = 1, 2
    mask = (a | b) & (markers == 0)
    mask[0, 0] = True  # unreachable from any marker: stays 0
    got = flood(1 - interior, markers, mask)
    ref = watershed(1 - interior, markers=markers, mask=mask | (markers > 0))
    assert got[0, 0] == 0
    assert set(np.unique(got)) == {0, 1, 2}
    assert (got == ref).mean() > 0.99  # same split, up to ties on the valley
    assert (got[:, :40] == 2).sum() == 0 and (got[:, 56:] == 1).sum() == 0


def test_flood_works_in_3d(flood_version):
    from napari_unet.postprocess import flood

    markers = np.zeros((8, 16, 16), np.int32)
    markers[1, 8, 8], markers[6, 8, 8] = 1, 2
    elevation = np.zeros(markers.shape)
    elevation[4] = 0.9  # a ridge between the two
    got = flood(elevation, markers, markers == 0)
    assert (got[:4] == 1).all() and (got[5:] == 2).all()


def test_noise_probabilities_post_process_fast_and_every_object_grows_from_a_seed(flood_version):
    """Most of the image to flood (noise-like predictions): the fast path takes it."""
    import time

    from scipy import ndimage

    from napari_unet.postprocess import SMALL_FLOOD

    prob = _noise_probabilities(int(np.sqrt(4 * SMALL_FLOOD)) + 16)
    t = time.perf_counter()
    labels = instances_from_probabilities(prob, seed_threshold=0.5)
    assert time.perf_counter() - t < 20
    assert labels.max() > 50
    fg = prob[0] < 0.5
    assert (labels[~fg] == 0).all()
    ids = np.arange(1, labels.max() + 1)
    assert (ndimage.maximum(prob[1], labels, ids) > 0.5).all()  # each holds a seed pixel


def _noise_probabilities(n: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, n, n)).astype(np.float32), (0, 2, 2))
    logits *= 6
    return np.exp(logits) / np.exp(logits).sum(0)


def test_compiled_flood_finds_the_objects_of_the_numpy_flood(monkeypatch):
    """numba's flood and the numpy one: the same objects on a real DSB2018 image (every strip
    flooded) and on noise, where nearly every pixel is flooded and ties abound."""
    pytest.importorskip("numba")
    import tifffile

    import napari_unet.postprocess as pp
    from napari_unet import Segmenter

    if pp._compiled_flood() is None:
        pytest.skip("numba is installed but could not compile here")

    data = Path(__file__).parent / "data"
    image = tifffile.imread(data / "dsb2018_df9a4212ecb67bb4.tif")
    truth = tifffile.imread(data / "dsb2018_df9a4212ecb67bb4_masks.tif")
    monkeypatch.setattr(pp, "SMALL_FLOOD", 0)  # the flood even where skimage would take it
    seg = Segmenter.pretrained("nuclei")
    got = {}
    for version in (True, False):
        monkeypatch.setattr(pp, "USE_NUMBA", version)
        got[version] = seg.predict(image, engine="torch").labels
    assert got[True].max() > 20
    assert instance_f1(got[True], got[False]) == 1.0
    assert instance_f1(got[True], truth) == instance_f1(got[False], truth) > 0.9

    prob = _noise_probabilities(400)
    monkeypatch.setattr(pp, "USE_NUMBA", True)
    fast = instances_from_probabilities(prob, seed_threshold=0.5)
    monkeypatch.setattr(pp, "USE_NUMBA", False)
    slow = instances_from_probabilities(prob, seed_threshold=0.5)
    assert slow.max() > 100
    assert abs(int(fast.max()) - int(slow.max())) <= 0.01 * slow.max()
    assert instance_f1(fast, slow) > 0.98
    assert np.array_equal(fast > 0, slow > 0)  # the same foreground, only ties differ


def test_flood_without_numba_or_with_a_broken_numba_runs_the_numpy_version(monkeypatch):
    """numba missing or switched off (NUMBA_DISABLE_JIT): the numpy flood, silently; numba
    that cannot compile: the numpy flood and one warning that says so. The objects are right
    either way."""
    import sys
    import types

    import napari_unet.postprocess as pp

    markers = np.zeros((8, 16, 16), np.int32)
    markers[1, 8, 8], markers[6, 8, 8] = 1, 2
    elevation = np.zeros(markers.shape)
    elevation[4] = 0.9

    def right(got):
        assert (got[:4] == 1).all() and (got[5:] == 2).all()

    monkeypatch.setattr(pp, "USE_NUMBA", True)
    monkeypatch.setattr(pp, "_kernel", [])
    monkeypatch.setitem(sys.modules, "napari_unet._flood_jit", None)  # import fails
    assert pp._compiled_flood() is None
    right(pp.flood(elevation, markers, markers == 0))

    numba = pytest.importorskip("numba")
    monkeypatch.delitem(sys.modules, "napari_unet._flood_jit")
    monkeypatch.setattr(pp, "_kernel", [])
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)  # NUMBA_DISABLE_JIT=1
    assert pp._compiled_flood() is None  # not numba's pure-Python loops: the numpy version
    right(pp.flood(elevation, markers, markers == 0))
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)

    broken = types.ModuleType("napari_unet._flood_jit")

    def flood_flat(*args):
        raise TypeError("No matching definition for argument type(s)")

    broken.flood_flat = flood_flat
    monkeypatch.setattr(pp, "_kernel", [])
    monkeypatch.setitem(sys.modules, "napari_unet._flood_jit", broken)
    with pytest.warns(RuntimeWarning, match="numba could not compile the watershed"):
        right(pp.flood(elevation, markers, markers == 0))
    right(pp.flood(elevation, markers, markers == 0))  # warned once, still right
