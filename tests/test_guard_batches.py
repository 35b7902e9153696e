"""The round's judges predict their crops in batches and score what one-by-one scoring did."""

import numpy as np
import torch

from napari_unet import Segmenter
from napari_unet import safeguard as sg
from napari_unet.synthetic import make_nuclei


def _one_by_one(net, images):
    net.eval()
    with torch.inference_mode():
        return [net(torch.from_numpy(im[None])).float().softmax(1)[0].numpy() for im in images]


def test_batched_probabilities_equal_one_by_one_for_every_shape():
    torch.manual_seed(0)
    seg = Segmenter.new(base_channels=8, depth=2)
    rng = np.random.default_rng(0)
    # odd sizes pad differently; several share a padded shape, one is alone in its group
    shapes = [(37, 41), (40, 40), (33, 39), (40, 35), (64, 17), (40, 40), (9, 9)]
    images = [rng.normal(size=(1, *s)).astype(np.float32) for s in shapes]
    seg.net.train()
    got = sg._probabilities(seg.net, images)
    assert seg.net.training  # the mode it was in is restored
    want = _one_by_one(seg.net, images)
    for g, w, s in zip(got, want, shapes, strict=True):
        assert g.shape == (3, *s)
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_guard_scores_held_out_objects_as_before(monkeypatch):
    image, truth = make_nuclei((256, 256), seed=3)
    seg = Segmenter.pretrained("nuclei")

    class Sample:
        pass

    s = Sample()
    s.image = ((image - image.mean()) / image.std()).astype(np.float32)[None]
    s.target = np.zeros(image.shape, np.int64)
    guard = sg.Guard()
    guard.hold_out(s, truth, None, np.random.default_rng(0))
    assert len(guard) >= 10
    batched = guard.score(seg.net, {})
    # one crop per batch: what the guard computed before it batched
    monkeypatch.setattr(sg, "BATCH_PIXELS", 1)
    single = guard.score(seg.net, {})
    assert batched > 0.7  # the starter finds the held-out nuclei
    assert abs(batched - single) < 1e-3
