"""Old home of the synthetic data, normalisation and axes helpers; kept so old imports work.

The helpers now live in modules with one job each:

* :mod:`napari_unet.synthetic` -- :func:`make_nuclei`, :func:`make_nuclei_series` (and
  :func:`~napari_unet.synthetic.make_realistic_nuclei`), built on
  :mod:`napari_unet.synthetic_objects` and :mod:`napari_unet.synthetic_render`;
* :mod:`napari_unet.normalize` -- :func:`check_finite`, :func:`percentile_range`,
  :func:`normalize`;
* :mod:`napari_unet.axes` -- :func:`validate_axes`, :func:`guess_axes`,
  :func:`to_canonical`, :func:`from_canonical`.

``from napari_unet.data import make_nuclei`` (and the other names in ``__all__``) keeps
working; new code imports from the modules above.
"""

from __future__ import annotations

from .axes import (
    AXIS_LETTERS,
    CANONICAL_AXES,
    from_canonical,
    guess_axes,
    to_canonical,
    validate_axes,
)
from .normalize import check_finite, normalize, percentile_range

# Private names that synthetic3d.py reads as ``data._x``; it can import them from synthetic,
# synthetic_objects and synthetic_render instead.
from .synthetic import (
    _prepare,  # noqa: F401
    make_nuclei,
    make_nuclei_series,
)
from .synthetic_objects import Objects as _Objects  # noqa: F401
from .synthetic_objects import default_n_objects as _default_n_objects  # noqa: F401
from .synthetic_objects import radial_extent as _radial_extent  # noqa: F401
from .synthetic_objects import sample_objects as _sample_objects  # noqa: F401
from .synthetic_render import clean_labels as _clean_labels  # noqa: F401
from .synthetic_render import form_image as _form_image  # noqa: F401
from .synthetic_render import random_texture as _texture  # noqa: F401
from .synthetic_render import relabel_sequential as _relabel_sequential  # noqa: F401
from .synthetic_render import render_labels as _render_labels  # noqa: F401
from .synthetic_render import smooth_background as _smooth_background  # noqa: F401

__all__ = [
    "AXIS_LETTERS",
    "CANONICAL_AXES",
    "check_finite",
    "from_canonical",
    "guess_axes",
    "make_nuclei",
    "make_nuclei_series",
    "normalize",
    "percentile_range",
    "to_canonical",
    "validate_axes",
]
