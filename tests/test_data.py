"""napari_unet.data is the old home of the synthetic, normalisation and axes helpers: its
imports keep working and give the very same functions (their tests are in test_synthetic.py,
test_normalize.py and test_axes.py)."""

from __future__ import annotations

import napari_unet
from napari_unet import axes, data, normalize, synthetic


def test_old_data_imports_are_the_new_functions():
    for name in ("make_nuclei", "make_nuclei_series"):
        assert getattr(data, name) is getattr(synthetic, name)
    for name in ("check_finite", "percentile_range", "normalize"):
        assert getattr(data, name) is getattr(normalize, name)
    for name in ("validate_axes", "guess_axes", "to_canonical", "from_canonical"):
        assert getattr(data, name) is getattr(axes, name)
    assert data.AXIS_LETTERS == axes.AXIS_LETTERS == "TZCYX"
    assert data.CANONICAL_AXES == axes.CANONICAL_AXES
    for name in data.__all__:
        assert hasattr(data, name)
    assert napari_unet.data is data
