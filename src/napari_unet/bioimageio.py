"""Export and import of bioimage.io model packages (model description spec 0.5).

An exported package is a zip archive that any bioimage.io consumer can run, and that
``napari-unet import`` / :meth:`Segmenter.load` turn back into the very same ``Segmenter``:

``rdf.yaml``
    The model description (``format_version`` 0.5). Inputs ``(batch, channel, [z,] y, x)``
    with ``scale_range`` percentile preprocessing equal to the model's normalisation; outputs
    the per-class probabilities (``softmax`` over the channel axis).
``weights.pt``, ``unet_architecture.py``
    ``pytorch_state_dict`` weights (a state dict of tensors only) and the architecture source
    file with its kwargs; ``weights_torchscript.pt`` a traced TorchScript module (``parent``:
    the state dict).
``weights.safetensors``
    The same tensors as safetensors (an attachment); napari-unet reads these, never a pickle.
``test_input.npy``, ``test_output.npy``, ``cover.png``, ``README.md``
    Test tensors, a cover made from a prediction, and the documentation (training data,
    measured scores, how the probabilities become labels).

The model's full napari-unet config (task, classes, normalisation, tiles and the instance
post-processing thresholds) travels in ``config.napari_unet`` of ``rdf.yaml``, so an import
restores predictions exactly. Exporting needs neither bioimageio.spec nor bioimageio.core;
``bioimageio test PACKAGE.zip`` validates the result. Reading a package back is
:mod:`napari_unet.bioimageio_read`'s job (its functions are importable from here too).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import fileio
from .bioimageio_read import (
    CONFIG_FORMAT,
    CONFIG_KEY,
    CONFIG_VERSION,
    ST_FILE,
    PackageError,
    import_package,
    is_package,
    read_description,
    sha256,
)

if TYPE_CHECKING:
    from .config import ModelConfig
    from .segmenter import Segmenter

__all__ = [
    "PackageError",
    "export_iter",
    "export_package",
    "import_package",
    "is_package",
    "read_description",
]

FORMAT_VERSION = "0.5.4"
_ARCH_FILE = "unet_architecture.py"
_STATE_FILE = "weights.pt"
_TS_FILE = "weights_torchscript.pt"
_EPS = 1e-6  # scale_range's eps: (x - lo) / (hi - lo + eps)
_MAX_TEST_SIDE = 256
_MAX_TEST_DEPTH = 32

Progress = Callable[[int, int, str], None]


# ============================================================================ helpers


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", rgb, extension=".png")


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _spatial_ids(ndim: int) -> list[str]:
    return ["z", "y", "x"] if ndim == 3 else ["y", "x"]


def _channel_names(mc: ModelConfig, n: int) -> list[str]:
    names = [str(c) for c in mc.classes or []][:n]
    names += [f"class{k}" for k in range(len(names), n)]
    return [
        re.sub(r"[^0-9A-Za-z_]+", "_", s).strip("_") or f"class{k}" for k, s in enumerate(names)
    ]


def _architecture_source() -> bytes:
    """The source of ``napari_unet.model``: pure torch, importable on its own."""
    from . import model

    return Path(model.__file__).read_bytes()


def _check_target(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise PackageError(f"a bioimage.io package is a .zip file; {out} does not end in .zip")
    if out.is_dir():
        raise PackageError(f"{out} is a folder; give a file name ending in .zip")
    if out.exists() and not overwrite:
        raise PackageError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        raise PackageError(f"the folder {out.parent} does not exist")
    return out


def _test_image(seg: Segmenter, image: Any, axes: str | None) -> np.ndarray:
    """(C, *spatial) float32 raw test image, cropped to multiples of the network divisor."""
    from .axes import guess_axes, validate_axes
    from .synthetic import make_nuclei

    d = seg.net.divisor
    nd = seg.ndim
    if image is None:
        if seg.in_channels != 1:
            raise PackageError(
                f"no test image: this model takes {seg.in_channels} channels, so napari-unet "
                "cannot generate one; give a test image (--test-image IMAGE) with "
                f"{seg.in_channels} channels"
            )
        shape = (16, 64, 64) if nd == 3 else (128, 128)
        shape = tuple(max(d, s // d * d) for s in shape)
        img, _ = make_nuclei(shape, seed=7)
        raw = img.astype(np.float32)[None]
    else:
        arr = np.asarray(image)
        if axes is None:
            axes = guess_axes(arr.shape)
        axes = validate_axes(axes, arr.ndim, tuple(arr.shape))
        if "T" in axes:
            arr = np.take(arr, 0, axis=axes.index("T"))
            axes = axes.replace("T", "")
        if nd == 2 and "Z" in axes:
            z = axes.index("Z")
            arr = np.take(arr, arr.shape[z] // 2, axis=z)
            axes = axes.replace("Z", "")
        if nd == 3 and "Z" not in axes:
            raise PackageError("the test image of a 3D model needs a Z axis")
        target = ("C" if "C" in axes else "") + ("ZYX" if nd == 3 else "YX")
        if sorted(axes) != sorted(target):
            raise PackageError(f"the test image has axes {axes!r}; expected {target!r}")
        arr = np.transpose(arr, [axes.index(a) for a in target])
        if "C" not in axes:
            arr = arr[None]
        if arr.shape[0] != seg.in_channels:
            raise PackageError(
                f"the test image has {arr.shape[0]} channel(s) but the model takes "
                f"{seg.in_channels}"
            )
        raw = arr.astype(np.float32)
    limits = [_MAX_TEST_DEPTH, _MAX_TEST_SIDE, _MAX_TEST_SIDE][-nd:]
    crop = [slice(None)]
    for s, lim in zip(raw.shape[1:], limits, strict=True):
        n = min(s, lim) // d * d
        if n < d:
            raise PackageError(
                f"the test image is too small: each spatial side needs at least {d} pixels "
                f"(shape {raw.shape[1:]})"
            )
        start = (s - n) // 2
        crop.append(slice(start, start + n))
    raw = np.ascontiguousarray(raw[tuple(crop)])
    if not np.isfinite(raw).all():
        raise PackageError("the test image holds NaN or infinite values")
    return raw


def _scale_range(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """The spec's ``scale_range`` per channel and sample: ``(x - p_lo) / (p_hi - p_lo + eps)``."""
    axes = tuple(range(1, raw.ndim))
    lo = np.percentile(raw, low, axis=axes, keepdims=True)
    hi = np.percentile(raw, high, axis=axes, keepdims=True)
    return ((raw - lo) / (hi - lo + _EPS)).astype(np.float32)


def _forward(seg: Segmenter, x: np.ndarray) -> np.ndarray:
    import torch

    net = seg.net.eval().to("cpu")
    with torch.inference_mode():
        out = net(torch.from_numpy(x)).float().softmax(1)
    return out.numpy().astype(np.float32)


def _colour_labels(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(3)
    n = int(labels.max()) + 1
    lut = rng.integers(60, 256, size=(max(n, 1), 3), dtype=np.uint8)
    lut[0] = 0
    return lut[labels]


def _cover(raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Image | labels side by side (2:1), grey image from the first channel, 8-bit RGB."""
    img = raw[0]
    lab = labels
    if img.ndim == 3:  # 3D: the middle slice
        img, lab = img[img.shape[0] // 2], lab[lab.shape[0] // 2]
    lo, hi = np.percentile(img, (1, 99.8))
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    grey = (grey * 255).astype(np.uint8)
    left = np.repeat(grey[..., None], 3, axis=-1)
    right = _colour_labels(lab.astype(np.int64))
    side = max(img.shape)
    canvas = np.zeros((side, 2 * side, 3), np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = left
    canvas[: lab.shape[0], side : side + lab.shape[1]] = right
    if side < 256:  # covers look better a little larger
        k = math.ceil(256 / side)
        canvas = canvas.repeat(k, 0).repeat(k, 1)
    return canvas


def _postprocess_text(mc: ModelConfig) -> str:
    pp = mc.postprocess
    if mc.task == "semantic":
        return (
            "Each pixel gets the class of highest probability (argmax over the output channels "
            f"{', '.join(mc.classes or [])}); 0 is background."
        )
    return (
        "The network predicts three probabilities per pixel: background, object interior and "
        "object boundary. napari-unet turns them into instance labels (0 = background, 1..N = "
        "objects) like this:\n\n"
        f"1. seeds: connected components of `interior > {pp.seed_threshold}` "
        "(seeds of fewer than 3 pixels, 8 voxels in 3D, are dropped as noise);\n"
        f"2. foreground: pixels with `background < 1 - {pp.foreground_threshold}`;\n"
        "3. a watershed grows the seeds over the foreground;\n"
        f"4. objects smaller than `min_size` ({pp.min_size}; null = 10 pixels in 2D, "
        "40 voxels in 3D) are removed.\n\n"
        "These thresholds are stored in `config.napari_unet.model.postprocess` of `rdf.yaml`; "
        "`napari-unet import` restores them exactly."
    )


def _readme(seg: Segmenter, size: tuple[int, ...]) -> str:
    mc = seg.model_config
    scores = [f"- held-out validation score (instance F1 at IoU 0.5): {mc.val_score}"]
    for k, v in (mc.model_card or {}).items():
        if k.startswith("heldout") or "f1" in k or "ap" in k.split("_"):
            scores.append(f"- {k}: {v}")
    trained_txt = "\n".join(f"- {t}" for t in mc.trained_on)
    trained_txt = trained_txt or "- (not recorded: an untrained model)"
    steps = sum(h.steps for h in mc.history)
    a = mc.architecture
    return f"""# napari-unet model: {mc.name}

A {a.ndim}D U-Net ({mc.task} segmentation, {a.in_channels} input channel(s),
{a.out_channels} output classes: {", ".join(mc.classes or [])}), exported by
napari-unet. Architecture: `{_ARCH_FILE}` (`UNet`, base width {a.base_channels},
depth {a.depth}, up-sampling `{a.up_mode}`).

## Training data

{trained_txt}

{len(mc.history)} training run(s), {steps} optimiser steps in all.

## Input and preprocessing

Each channel is scaled per image from its {mc.normalization.low}th percentile (0) to its
{mc.normalization.high}th percentile (1) (`scale_range`). Spatial sizes are multiples of
{seg.net.divisor}; napari-unet itself tiles larger images (tile {mc.tile_shape},
overlap {mc.overlap}).

## Output and post-processing

The output is the softmax probability of each class. {_postprocess_text(mc)}

## Validation

{chr(10).join(scores)}

The test tensors are {"x".join(map(str, size))} pixels: a generated image unless a test
image was given at export. napari-unet's own `evaluate` command measures F1 and average
precision on labelled images of yours:
`napari-unet evaluate PRED_labels.tif --truth TRUTH.tif`.
"""


# ============================================================================ export


def export_package(
    model: Segmenter | str | os.PathLike,
    out: str | os.PathLike,
    *,
    test_image: Any = None,
    axes: str | None = None,
    overwrite: bool = False,
    torchscript: bool = True,
    authors: Sequence[str] | None = None,
    license: str = "CC-BY-4.0",
    progress: Progress | None = None,
) -> Path:
    """Write a bioimage.io model package (spec 0.5) of a napari-unet model.

    Parameters
    ----------
    model
        A :class:`Segmenter` or a path that :meth:`Segmenter.load` reads.
    out
        The ``.zip`` to write (atomically: a half-written package never appears).
    test_image
        An image for the test tensors and the cover (numpy; ``axes`` as in ``predict``). Without
        one a synthetic nuclei image is used, which needs a 1-channel model.
    overwrite
        Replace an existing ``out`` (otherwise refused).
    torchscript
        Also add TorchScript weights (traced; a few seconds).
    authors
        Author names for the description (default: ``["napari-unet user"]``).
    progress
        Called as ``progress(done, total, what)`` after each step.

    Returns
    -------
    Path of the package.
    """
    gen = export_iter(
        model,
        out,
        test_image=test_image,
        axes=axes,
        overwrite=overwrite,
        torchscript=torchscript,
        authors=authors,
        license=license,
    )
    while True:
        try:
            done, total, what = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total, what)


def export_iter(
    model: Segmenter | str | os.PathLike,
    out: str | os.PathLike,
    *,
    test_image: Any = None,
    axes: str | None = None,
    overwrite: bool = False,
    torchscript: bool = True,
    authors: Sequence[str] | None = None,
    license: str = "CC-BY-4.0",
):
    """Like :func:`export_package` (same parameters, without ``progress``), as a generator of
    ``(done, total, step)``; returns the path of the package.

    Used by the napari widget (a thread worker that shows the steps as a progress bar).
    """
    from .segmenter import Segmenter

    seg = model if isinstance(model, Segmenter) else Segmenter.load(model)
    out = _check_target(Path(out), overwrite)
    steps = 6 if torchscript else 5

    import torch
    from safetensors.torch import save as st_save

    cfg = json.loads(json.dumps(seg.config, default=str))  # plain JSON (also a deep copy)
    norm = seg.model_config.normalization
    low, high = norm.low, norm.high
    if norm.method != "percentile":  # pragma: no cover - the only method today
        raise PackageError(
            f"the model's normalisation {norm.method!r} has no bioimage.io equivalent"
        )
    raw = _test_image(seg, test_image, axes)
    x = _scale_range(raw, low, high)[None]
    probs = _forward(seg, x)
    yield 1, steps, "test tensors"
    spatial_axes = "ZYX" if seg.ndim == 3 else "YX"
    pred = seg.predict(raw, axes="C" + spatial_axes, device="cpu")
    cover = _cover(raw, pred.labels)
    yield 2, steps, "cover"

    state = {k: v.detach().cpu().contiguous() for k, v in seg.net.state_dict().items()}
    files: dict[str, bytes] = {
        _ARCH_FILE: _architecture_source(),
        _STATE_FILE: _torch_bytes(state),
        ST_FILE: st_save(state),
        "test_input.npy": _npy_bytes(raw[None]),
        "test_output.npy": _npy_bytes(probs),
        "cover.png": _png_bytes(cover),
        "README.md": _readme(seg, raw.shape[1:]).encode(),
    }
    yield 3, steps, "weights"
    if torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = seg.net.eval().to("cpu")
            with torch.no_grad():
                traced = torch.jit.trace(net, torch.from_numpy(x), check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        files[_TS_FILE] = buf.getvalue()
        yield 4, steps, "torchscript"

    sha = {k: sha256(v) for k, v in files.items()}
    rdf = _description(seg, cfg, sha, low, high, torchscript, authors, license)
    import yaml

    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()
    yield steps - 1, steps, "description"
    _write_zip(out, files)
    yield steps, steps, "written"
    return out


def _axes(seg: Segmenter, out_names: list[str]) -> tuple[list[dict], list[dict]]:
    """The input and output axes: batch, channel, then space (the output sized as the input)."""
    ids = _spatial_ids(seg.ndim)
    d = seg.net.divisor
    in_names = [f"channel{c}" for c in range(seg.in_channels)]
    in_axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {"type": "channel", "channel_names": in_names},
    ]
    in_axes += [{"type": "space", "id": a, "size": {"min": d, "step": d}} for a in ids]
    out_axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {"type": "channel", "channel_names": out_names},
    ]
    out_axes += [
        {"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}} for a in ids
    ]
    return in_axes, out_axes


def _weights(cfg: dict, sha: dict[str, str], torchscript: bool) -> dict[str, Any]:
    """The ``weights`` entry: the state dict with its architecture, and TorchScript."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    weights: dict[str, Any] = {
        "pytorch_state_dict": {
            "source": _STATE_FILE,
            "sha256": sha[_STATE_FILE],
            "architecture": {
                "source": _ARCH_FILE,
                "sha256": sha[_ARCH_FILE],
                "callable": "UNet",
                "kwargs": dict(cfg["architecture"]),
            },
            "pytorch_version": torch_version,
        }
    }
    if torchscript:
        weights["torchscript"] = {
            "source": _TS_FILE,
            "sha256": sha[_TS_FILE],
            "parent": "pytorch_state_dict",
            "pytorch_version": torch_version,
            "comment": "traced with torch.jit.trace by napari-unet",
        }
    return weights


def _tensors(
    seg: Segmenter, sha: dict[str, str], low: float, high: float, out_names: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """The ``inputs`` (with ``scale_range``) and ``outputs`` (with ``softmax``) entries."""
    in_axes, out_axes = _axes(seg, out_names)
    scale_range = {
        "id": "scale_range",
        "kwargs": {
            "axes": _spatial_ids(seg.ndim),
            "min_percentile": low,
            "max_percentile": high,
            "eps": _EPS,
        },
    }
    return {
        "inputs": [
            {
                "id": "raw",
                "description": "raw image, scaled per channel by percentiles",
                "axes": in_axes,
                "test_tensor": {"source": "test_input.npy", "sha256": sha["test_input.npy"]},
                "data": {"type": "float32"},
                "preprocessing": [scale_range],
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "description": f"class probabilities ({', '.join(out_names)})",
                "axes": out_axes,
                "test_tensor": {"source": "test_output.npy", "sha256": sha["test_output.npy"]},
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "softmax", "kwargs": {"axis": "channel"}}],
            }
        ],
    }


_CITE_UNET = {
    "text": "Ronneberger, O., Fischer, P., Brox, T. U-Net: Convolutional Networks "
    "for Biomedical Image Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
_TOLERANCE = {
    "relative_tolerance": 1e-3,
    "absolute_tolerance": 1e-4,
    "mismatched_elements_per_million": 100,
}


def _description(
    seg: Segmenter,
    cfg: dict,
    sha: dict[str, str],
    low: float,
    high: float,
    torchscript: bool,
    authors: Sequence[str] | None,
    license: str,
) -> dict[str, Any]:
    """The ``rdf.yaml`` of the package; ``cfg`` (plain JSON) travels in ``config.napari_unet``."""
    mc = seg.model_config
    nd = seg.ndim
    out_names = _channel_names(mc, seg.net.out_channels)
    trained = "; ".join(mc.trained_on) or "untrained"
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": re.sub(r"[^0-9A-Za-z _()\-]+", "-", f"napari-unet {mc.name or 'untitled'}")[:128],
        "description": (
            f"{nd}D U-Net for {mc.task} segmentation ({seg.in_channels} channel(s)) "
            f"trained with napari-unet on: {trained}"
        )[:1024],
        "authors": [{"name": a} for a in (authors or ["napari-unet user"])],
        "cite": [dict(_CITE_UNET)],
        "license": license,
        "tags": ["unet", f"{nd}d", "pytorch", "napari-unet", mc.task, "segmentation"],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "attachments": [{"source": ST_FILE, "sha256": sha[ST_FILE]}],
        "timestamp": mc.created or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **_tensors(seg, sha, low, high, out_names),
        "weights": _weights(cfg, sha, torchscript),
        "config": {
            "bioimageio": {"reproducibility_tolerance": [dict(_TOLERANCE)]},
            CONFIG_KEY: {
                "format": CONFIG_FORMAT,
                "version": CONFIG_VERSION,
                "weights": ST_FILE,
                "model": cfg,
            },
        },
    }


def _write_zip(out: Path, files: dict[str, bytes]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in ["rdf.yaml", *sorted(k for k in files if k != "rdf.yaml")]:
                    zf.writestr(name, files[name])
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~fileio.umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
