"""What a round's setup does not do twice."""

from __future__ import annotations

import pytest

from napari_unet import Segmenter
from napari_unet.synthetic import make_nuclei


def test_a_round_reuses_the_zoom_the_prediction_of_its_image_picked(monkeypatch):
    """The round's setup predicted the whole image again to learn its zoom."""
    import torch

    from napari_unet import inference

    seg = Segmenter.pretrained("nuclei")
    image, _ = make_nuclei((128, 128), seed=0)
    plane = image[None]  # (C, Y, X), as a round sees it
    fresh = seg._zoom_for(plane, "CYX")
    pred = seg.predict(image)
    assert (pred.zoom, pred.diameter) == pytest.approx(fresh, rel=1e-3)
    calls = []
    real = inference._Sizer.tiles

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(inference._Sizer, "tiles", counted)
    assert seg._zoom_for(plane, "CYX") == (pred.zoom, pred.diameter)
    assert not calls  # reused
    seg._zoom_for(plane[:, :64], "CYX")  # another image: measured
    assert len(calls) == 1
    with torch.no_grad():
        next(seg.net.parameters()).mul_(1.01)  # new weights: measured again
    seg._zoom_for(plane, "CYX")
    assert len(calls) == 2
