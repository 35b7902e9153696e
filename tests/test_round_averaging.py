"""A correction round keeps a share of its change: the new weights averaged with the old."""

from __future__ import annotations

import copy

import pytest
import torch

from napari_unet.model import UNet
from napari_unet.safeguard import blend_weights


def _net() -> UNet:
    torch.manual_seed(0)
    return UNet(1, 3, base_channels=4, depth=2)


def test_a_blend_keeps_the_given_share_of_the_change_and_leaves_counters_alone():
    net = _net()
    start = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    counters = {k: v.clone() for k, v in net.state_dict().items() if not v.is_floating_point()}
    said = blend_weights(net, start, 0.5)
    assert "50%" in said
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            moved = k in dict(net.named_parameters())
            assert torch.allclose(v, start[k] + (0.5 if moved else 0.0), atol=1e-6), k
        else:
            assert torch.equal(v, counters[k]), k


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan")])
def test_a_blend_refuses_a_share_outside_zero_to_one(share):
    net = _net()
    with pytest.raises(ValueError, match="share"):
        blend_weights(net, copy.deepcopy(net.state_dict()), share)


def test_a_round_on_a_trained_model_keeps_a_quarter_of_its_change(monkeypatch):
    import napari_unet as nu
    import napari_unet.finetune as ft
    from napari_unet.data import make_nuclei
    from napari_unet.safeguard import BLEND

    seg = nu.Segmenter.pretrained("nuclei")
    start = copy.deepcopy(seg.net.state_dict())
    trained = {}
    real_blend = ft.blend_weights

    def spy(net, start_state, share=BLEND):
        trained.update(copy.deepcopy(net.state_dict()))  # the round's own weights
        return real_blend(net, start_state, share)

    monkeypatch.setattr(ft, "blend_weights", spy)
    img, lab = make_nuclei((128, 128), seed=4)
    last = None
    for last in seg.finetune(img, lab, steps=4, time_limit_s=None, num_threads=2):  # noqa: B007
        pass
    assert trained, "the round was not blended"
    assert f"kept {BLEND:.0%} of the change" in last.reason, last.reason
    assert "kept the previous" not in last.reason, last.reason
    moved = 0
    for k, v in seg.net.state_dict().items():
        if v.is_floating_point():
            want = start[k] + BLEND * (trained[k] - start[k])
            assert torch.allclose(v, want, atol=1e-6), k
            moved += int(not torch.equal(trained[k], start[k]))
    assert moved  # the round did change weights, and a quarter of that change stays


def test_a_round_of_few_corrected_objects_keeps_less_of_its_change():
    from napari_unet.safeguard import BLEND, FEW_OBJECTS, blend_share

    assert blend_share(1) == pytest.approx(BLEND / FEW_OBJECTS)
    assert blend_share(0) == blend_share(1)  # never nothing: a round that trained keeps a bit
    assert blend_share(FEW_OBJECTS // 2) == pytest.approx(BLEND / 2)
    assert blend_share(FEW_OBJECTS) == blend_share(500) == pytest.approx(BLEND)
