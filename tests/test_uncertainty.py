"""Uncertainty maps and the ranked list of regions to correct next (core, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_unet as nu
from napari_unet.synthetic import make_nuclei
from napari_unet.uncertainty import (
    _DIHEDRAL,
    Region,
    _forward,
    _inverse,
    rank_regions,
    uncertainty_iter,
    uncertainty_map,
)

BAD = (slice(64, 128), slice(0, 64))  # the corrupted quadrant (bottom left)


@pytest.fixture(scope="module")
def seg():
    return nu.Segmenter.pretrained("nuclei")


@pytest.fixture(scope="module")
def clean():
    img, _ = make_nuclei((128, 128), seed=3)
    return img


def corrupt(img: np.ndarray, kind: str) -> np.ndarray:
    x = img.astype(np.float32)
    if kind == "blur":
        x[BAD] = ndi.gaussian_filter(x, 4)[BAD]
    else:
        rng = np.random.default_rng(0)
        x[BAD] += rng.normal(0, 1.5 * x.std(), x[BAD].shape).astype(np.float32)
    return x


@pytest.mark.parametrize("mode", ["tta", "entropy", "disagreement"])
def test_map_shape_range_and_input_untouched(seg, clean, mode):
    img = clean.copy()
    u = uncertainty_map(seg, img, mode=mode)
    assert u.shape == img.shape and u.dtype == np.float32
    assert 0.0 <= u.min() and u.max() <= 1.0
    assert u.max() > 0.0
    np.testing.assert_array_equal(img, clean)


@pytest.mark.parametrize("kind", ["blur", "noise"])
@pytest.mark.parametrize("mode", ["tta", "entropy", "disagreement"])
def test_corrupted_quadrant_is_uncertain_and_ranked_first(seg, clean, kind, mode):
    x = corrupt(clean, kind)
    u = uncertainty_map(seg, x, mode=mode)
    bad = u[BAD].mean()
    good = [u[64:, 64:].mean(), u[:64, :64].mean(), u[:64, 64:].mean()]
    # the starter trained on noisy real and generated images disagrees less over noise:
    # measured 0.137 vs 0.089 (1.5x) for disagreement; it is still ranked first (below)
    # over noise the size estimate shrinks the image 0.85x (objects resized to the trained
    # size), which averages part of the noise out: measured 2.1 (tta) and 2.9 (entropy)
    factor = {"blur": 3, "noise": 1.3 if mode == "disagreement" else 1.8}[kind]
    assert bad > factor * max(good)
    ranked = rank_regions(u, (64, 64))
    assert len(ranked) == 4
    assert ranked[0].slices == BAD and ranked[0].index == (64, 0)
    assert ranked[0].centre == (95.5, 31.5)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    with_labels = rank_regions(u, (64, 64), labels=seg.predict(x).labels, top=1)
    assert [r.slices for r in with_labels] == [BAD]


def test_dihedral_views_invert_exactly():
    x = np.arange(2 * 6 * 6).reshape(2, 6, 6)
    for turns, flip in _DIHEDRAL:
        y = _forward(x, turns, flip, 1, 2)
        np.testing.assert_array_equal(_inverse(y, turns, flip, 1, 2), x)
    assert len(set(_forward(x, t, f, 1, 2).tobytes() for t, f in _DIHEDRAL)) == 8


def test_tta_map_is_equivariant(seg, clean):
    """Eight views form a group: the map of a flipped image is the flipped map."""
    u = uncertainty_map(seg, clean)
    u_t = uncertainty_map(seg, np.ascontiguousarray(clean.T))
    np.testing.assert_allclose(u_t, u.T, atol=1e-4)


def test_non_square_and_rgb_axes(seg, clean):
    u = uncertainty_map(seg, clean[:96])  # quarter turns would change the shape: flips only
    assert u.shape == (96, 128)
    yxc = np.repeat(clean[:, :, None], 3, axis=2)
    u = uncertainty_map(seg, yxc, "YXC", channel=0, mode="entropy")
    assert u.shape == (128, 128)


def test_thin_outlines_are_dropped(seg, clean):
    raw = uncertainty_map(seg, clean, mode="entropy", min_width=1)
    opened = uncertainty_map(seg, clean, mode="entropy")
    assert opened.mean() < 0.7 * raw.mean()
    assert np.all(opened <= raw + 1e-6)


@pytest.mark.parametrize("axes", ["ZYX", "TYX"])
def test_stack_ranks_the_corrupted_slice_first(seg, clean, axes):
    stack = np.stack([clean, corrupt(clean, "blur"), clean[::-1]]).astype(np.float32)
    before = stack.copy()
    u = uncertainty_map(seg, stack, axes, mode="entropy")
    assert u.shape == stack.shape
    np.testing.assert_array_equal(stack, before)
    slices = rank_regions(u)  # default for a stack: whole planes
    assert len(slices) == 3
    assert slices[0].index == (1, 0, 0) and slices[0].shape == (1, 128, 128)
    assert slices[0].centre[0] == 1.0
    tiles = rank_regions(u, (64, 64))  # YX tiles in every plane
    assert len(tiles) == 12
    assert tiles[0].slices == (slice(1, 2), *BAD)
    # TTA views are taken plane by plane: identical planes get identical maps
    twin = np.stack([stack[1], stack[1]])
    u_tta = uncertainty_map(seg, twin, axes, augmentations=4)
    np.testing.assert_allclose(u_tta[0], u_tta[1], atol=1e-6)
    assert u_tta[0][BAD].mean() > 3 * u_tta[0][64:, 64:].mean()


def test_3d_network():
    seg3 = nu.Segmenter.new(ndim=3, base_channels=4, depth=2, seed=0)
    vol, _ = make_nuclei((8, 32, 32), seed=1)
    u = uncertainty_map(seg3, vol, "ZYX", augmentations=4)
    assert u.shape == (8, 32, 32) and 0 <= u.min() and u.max() <= 1


def test_dask_input(seg, clean):
    da = pytest.importorskip("dask.array")
    u = uncertainty_map(seg, da.from_array(clean, chunks=64), mode="entropy")
    np.testing.assert_allclose(u, uncertainty_map(seg, clean, mode="entropy"), atol=1e-6)


def test_progress_and_cancel(seg, clean, monkeypatch):
    events = list(_progress(uncertainty_iter(seg, clean, augmentations=4)))
    done = [d for d, _ in events]
    assert done == sorted(done)
    assert events[-1][0] == events[-1][1] and len({t for _, t in events}) == 1

    started = []
    real = seg.predict_iter

    def counting(*a, **k):
        started.append(1)
        return real(*a, **k)

    monkeypatch.setattr(seg, "predict_iter", counting)
    gen = uncertainty_iter(seg, clean)
    assert next(gen)[0] < next(gen)[1]
    gen.close()  # the napari Stop button
    assert len(started) == 1
    with pytest.raises(StopIteration):
        next(gen)


def _progress(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_bad_input(seg, clean):
    with pytest.raises(ValueError, match="axes 'ZYX'"):
        uncertainty_map(seg, clean, "ZYX")
    with pytest.raises(ValueError, match="mode"):
        uncertainty_map(seg, clean, mode="variance")
    with pytest.raises(ValueError, match="augmentations"):
        uncertainty_map(seg, clean, augmentations=3)
    with pytest.raises(ValueError, match="at least 2"):
        uncertainty_map(seg, clean, mode="disagreement", augmentations=1)
    with pytest.raises(ValueError, match="min_width"):
        uncertainty_map(seg, clean, min_width=0)
    with pytest.raises(ValueError, match="channel"):
        uncertainty_map(seg, np.zeros((3, 64, 64), np.float32), "CYX")
    with pytest.raises(ValueError, match="no Z axis"):
        uncertainty_map(nu.Segmenter.new(ndim=3, base_channels=4, depth=1), clean, "YX")


def test_rank_regions_bad_input():
    u = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="at least 2 axes"):
        rank_regions(np.zeros(5))
    with pytest.raises(ValueError, match="3 values"):
        rank_regions(np.zeros((2, 64, 64)), (1, 2, 32, 32))
    with pytest.raises(ValueError, match="positive integers"):
        rank_regions(u, (0, 32))
    with pytest.raises(ValueError, match="labels have shape"):
        rank_regions(u, labels=np.zeros((32, 32), int))
    with pytest.raises(ValueError, match="NaN"):
        rank_regions(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="top"):
        rank_regions(u, top=0)


def test_rank_regions_labels_exclude_and_borders():
    u = np.zeros((100, 100), np.float32)
    u[:50, :50] = 0.4  # noisy but empty background
    u[50:, 50:] = 0.2  # doubtful objects
    labels = np.zeros((100, 100), np.int32)
    labels[60:90, 60:90] = 1
    labels[52:58, 92:98] = 2
    assert rank_regions(u, (50, 50))[0].index == (0, 0)
    assert rank_regions(u, (50, 50), labels=labels)[0].index == (50, 50)
    assert rank_regions(u, (50, 50), labels=labels, background_weight=1.0)[0].index == (0, 0)
    ex = np.zeros_like(labels, bool)
    ex[:50, :50] = True
    ranked = rank_regions(u, (50, 50), exclude=ex)
    assert len(ranked) == 3 and ranked[0].index == (50, 50)
    edge = rank_regions(u, (64, 64))  # border regions are smaller, none is lost
    assert sorted(r.shape for r in edge) == [(36, 36), (36, 64), (64, 36), (64, 64)]
    assert isinstance(edge[0], Region) and "score" in str(edge[0])
    # ties keep reading order
    flat = rank_regions(np.zeros((4, 64, 64)), top=2)
    assert [r.index for r in flat] == [(0, 0, 0), (1, 0, 0)]
