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
``bioimageio test PACKAGE.zip`` validates the result.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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

from . import store

if TYPE_CHECKING:
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
_CONFIG_KEY = "napari_unet"
_CONFIG_FORMAT = "napari-unet-bioimageio"
_CONFIG_VERSION = 1
_ARCH_FILE = "unet_architecture.py"
_STATE_FILE = "weights.pt"
_TS_FILE = "weights_torchscript.pt"
_ST_FILE = "weights.safetensors"
_EPS = 1e-6  # scale_range's eps: (x - lo) / (hi - lo + eps)
_MAX_TEST_SIDE = 256
_MAX_TEST_DEPTH = 32

Progress = Callable[[int, int, str], None]


class PackageError(store.ModelFileError):
    """A bioimage.io package that cannot be written or read (a clear, user-facing message)."""


# ============================================================================ helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _channel_names(config: dict, n: int) -> list[str]:
    names = [str(c) for c in config.get("classes", [])][:n]
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
    from . import data

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
        img, _ = data.make_nuclei(shape, seed=7)
        raw = img.astype(np.float32)[None]
    else:
        arr = np.asarray(image)
        if axes is None:
            axes = data.guess_axes(arr.shape)
        axes = data.validate_axes(axes, arr.ndim, tuple(arr.shape))
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


def _postprocess_text(config: dict) -> str:
    pp = config.get("postprocess", {}) or {}
    if config.get("task") == "semantic":
        return (
            "Each pixel gets the class of highest probability (argmax over the output channels "
            f"{', '.join(config.get('classes', []))}); 0 is background."
        )
    return (
        "The network predicts three probabilities per pixel: background, object interior and "
        "object boundary. napari-unet turns them into instance labels (0 = background, 1..N = "
        "objects) like this:\n\n"
        f"1. seeds: connected components of `interior > {pp.get('seed_threshold', 0.5)}` "
        "(seeds of fewer than 3 pixels, 8 voxels in 3D, are dropped as noise);\n"
        f"2. foreground: pixels with `background < 1 - {pp.get('foreground_threshold', 0.5)}`;\n"
        "3. a watershed grows the seeds over the foreground;\n"
        f"4. objects smaller than `min_size` ({pp.get('min_size')}; null = 10 pixels in 2D, "
        "40 voxels in 3D) are removed.\n\n"
        "These thresholds are stored in `config.napari_unet.model.postprocess` of `rdf.yaml`; "
        "`napari-unet import` restores them exactly."
    )


def _readme(seg: Segmenter, size: tuple[int, ...]) -> str:
    cfg = seg.config
    card = cfg.get("model_card") or {}
    scores = [f"- held-out validation score (instance F1 at IoU 0.5): {cfg.get('val_score')}"]
    for k, v in card.items():
        if k.startswith("heldout") or "f1" in k or "ap" in k.split("_"):
            scores.append(f"- {k}: {v}")
    trained = cfg.get("trained_on") or []
    trained_txt = "\n".join(f"- {t}" for t in trained) or "- (not recorded: an untrained model)"
    hist = cfg.get("history") or []
    steps = sum(int(h.get("steps", 0) or 0) for h in hist)
    norm = cfg.get("normalization", {})
    a = cfg["architecture"]
    return f"""# napari-unet model: {cfg.get("name", "untitled")}

A {a["ndim"]}D U-Net ({cfg["task"]} segmentation, {a["in_channels"]} input channel(s),
{a["out_channels"]} output classes: {", ".join(cfg.get("classes", []))}), exported by
napari-unet. Architecture: `{_ARCH_FILE}` (`UNet`, base width {a["base_channels"]},
depth {a["depth"]}, up-sampling `{a["up_mode"]}`).

## Training data

{trained_txt}

{len(hist)} training run(s), {steps} optimiser steps in all.

## Input and preprocessing

Each channel is scaled per image from its {norm.get("low", 1.0)}th percentile (0) to its
{norm.get("high", 99.8)}th percentile (1) (`scale_range`). Spatial sizes are multiples of
{seg.net.divisor}; napari-unet itself tiles larger images (tile {cfg.get("tile_shape")},
overlap {cfg.get("overlap")}).

## Output and post-processing

The output is the softmax probability of each class. {_postprocess_text(cfg)}

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
    norm = cfg.get("normalization") or {}
    low, high = float(norm.get("low", 1.0)), float(norm.get("high", 99.8))
    if norm.get("method", "percentile") != "percentile":
        raise PackageError(
            f"the model's normalisation {norm.get('method')!r} has no bioimage.io equivalent"
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
        _ST_FILE: st_save(state),
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

    sha = {k: _sha256(v) for k, v in files.items()}
    rdf = _description(seg, cfg, sha, raw.shape, low, high, torchscript, authors, license)
    import yaml

    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()
    yield steps - 1, steps, "description"
    _write_zip(out, files)
    yield steps, steps, "written"
    return out


def _description(
    seg: Segmenter,
    cfg: dict,
    sha: dict[str, str],
    test_shape: tuple[int, ...],
    low: float,
    high: float,
    torchscript: bool,
    authors: Sequence[str] | None,
    license: str,
) -> dict[str, Any]:
    import torch

    nd = seg.ndim
    d = seg.net.divisor
    ids = _spatial_ids(nd)
    torch_version = torch.__version__.split("+")[0]
    in_names = [f"channel{c}" for c in range(seg.in_channels)]
    out_names = _channel_names(cfg, seg.net.out_channels)
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
    name = cfg.get("name") or "untitled"
    people = [{"name": a} for a in (authors or ["napari-unet user"])]
    created = cfg.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat()
    trained = "; ".join(cfg.get("trained_on") or []) or "untrained"
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
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": re.sub(r"[^0-9A-Za-z _()\-]+", "-", f"napari-unet {name}")[:128],
        "description": (
            f"{nd}D U-Net for {cfg['task']} segmentation ({seg.in_channels} channel(s)) "
            f"trained with napari-unet on: {trained}"
        )[:1024],
        "authors": people,
        "cite": [
            {
                "text": "Ronneberger, O., Fischer, P., Brox, T. U-Net: Convolutional Networks "
                "for Biomedical Image Segmentation. MICCAI 2015.",
                "doi": "10.1007/978-3-319-24574-4_28",
            }
        ],
        "license": license,
        "tags": ["unet", f"{nd}d", "pytorch", "napari-unet", cfg["task"], "segmentation"],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "attachments": [{"source": _ST_FILE, "sha256": sha[_ST_FILE]}],
        "timestamp": created,
        "inputs": [
            {
                "id": "raw",
                "description": "raw image, scaled per channel by percentiles",
                "axes": in_axes,
                "test_tensor": {"source": "test_input.npy", "sha256": sha["test_input.npy"]},
                "data": {"type": "float32"},
                "preprocessing": [
                    {
                        "id": "scale_range",
                        "kwargs": {
                            "axes": ids,
                            "min_percentile": low,
                            "max_percentile": high,
                            "eps": _EPS,
                        },
                    }
                ],
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
        "weights": weights,
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": [
                    {
                        "relative_tolerance": 1e-3,
                        "absolute_tolerance": 1e-4,
                        "mismatched_elements_per_million": 100,
                    }
                ]
            },
            _CONFIG_KEY: {
                "format": _CONFIG_FORMAT,
                "version": _CONFIG_VERSION,
                "weights": _ST_FILE,
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ============================================================================ import


def is_package(path: str | os.PathLike) -> bool:
    """True for a zip file or a folder holding an ``rdf.yaml`` / ``bioimageio.yaml``."""
    p = Path(path).expanduser()
    if p.is_dir():
        return (p / "rdf.yaml").is_file() or (p / "bioimageio.yaml").is_file()
    return p.suffix.lower() == ".zip" and p.is_file()


class _Reader:
    """Files of a package: a zip archive or an unpacked folder; names must stay inside."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise PackageError(f"{path} is not a zip archive (a bioimage.io package)") from None

    def read(self, name: str) -> bytes:
        if not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise PackageError(f"{self.path}: file {name!r} is outside the package")
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (KeyError, FileNotFoundError):
            raise PackageError(f"{self.path}: the package has no file {name!r}") from None

    def has(self, name: str) -> bool:
        if self._zip is not None:
            return name in self._zip.namelist()
        return (self.path / name).is_file()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _open(path: str | os.PathLike) -> _Reader:
    p = Path(path).expanduser()
    if not p.exists():
        raise PackageError(f"{p} does not exist")
    return _Reader(p)


def _rdf(reader: _Reader) -> dict[str, Any]:
    import yaml

    name = "rdf.yaml" if reader.has("rdf.yaml") else "bioimageio.yaml"
    try:
        rdf = yaml.safe_load(reader.read(name))
    except yaml.YAMLError as e:
        raise PackageError(f"{reader.path}: {name} is not valid YAML ({e})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise PackageError(f"{reader.path}: not a bioimage.io model description")
    return rdf


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rdf.yaml`` of a package, as a dict (read safely, nothing executed)."""
    reader = _open(path)
    try:
        return _rdf(reader)
    finally:
        reader.close()


def _checked(reader: _Reader, entry: dict[str, Any]) -> bytes:
    data = reader.read(entry["source"])
    want = entry.get("sha256")
    if want and _sha256(data) != want:
        raise PackageError(
            f"{reader.path}: {entry['source']} does not match its sha256 in rdf.yaml "
            "(a damaged or altered package)"
        )
    return data


def _load_state_dict_pt(data: bytes, where: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import pickle

    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(
            f"{where}: refused to load the weights: they are not a plain state dict of tensors "
            f"(torch.load with weights_only=True said: {first}). napari-unet never unpickles "
            "code from a model file."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackageError(f"{where}: the weights are not a state dict of tensors")
    return state


def _foreign_config(rdf: dict[str, Any], where: str) -> dict[str, Any]:
    """Map a package from elsewhere onto ``UNet`` when its architecture says it is one."""
    from .segmenter import Segmenter

    psd = (rdf.get("weights") or {}).get("pytorch_state_dict")
    if not isinstance(psd, dict):
        raise PackageError(
            f"{where}: this package was not made by napari-unet and has no pytorch_state_dict "
            "weights; napari-unet cannot use it"
        )
    arch = psd.get("architecture") or {}
    callable_ = arch.get("callable") or ""
    kwargs = arch.get("kwargs") or {}
    known = set(Segmenter.new().net.config())
    if callable_ != "UNet" or not set(kwargs) <= known or "in_channels" not in kwargs:
        raise PackageError(
            f"{where}: this package was not made by napari-unet and its architecture "
            f"({callable_ or 'unknown'} with kwargs {sorted(kwargs)}) cannot be mapped onto "
            "napari-unet's UNet; use it with bioimageio.core or the software it came from"
        )
    out = int(kwargs.get("out_channels", 1))
    task = "instance" if out == 3 else "semantic"
    if task == "semantic" and out < 2:
        raise PackageError(f"{where}: a single-output network cannot be mapped onto napari-unet")
    seg = Segmenter.new(task, int(kwargs["in_channels"]), num_classes=max(out, 2))
    cfg = seg.config
    full = seg.net.config()
    full.update(kwargs)
    cfg["architecture"] = full
    cfg["name"] = re.sub(r"[^0-9A-Za-z_-]+", "-", str(rdf.get("name", "imported"))).strip("-")
    pre = ((rdf.get("inputs") or [{}])[0] or {}).get("preprocessing") or []
    for op in pre:
        if isinstance(op, dict) and op.get("id") == "scale_range":
            kw = op.get("kwargs") or {}
            cfg["normalization"] = {
                "method": "percentile",
                "low": float(kw.get("min_percentile", 0.0)),
                "high": float(kw.get("max_percentile", 100.0)),
            }
    cfg["trained_on"] = [f"imported from a bioimage.io package: {rdf.get('name')}"]
    return cfg


def import_package(path: str | os.PathLike) -> Segmenter:
    """Read a bioimage.io package (zip or folder) into a :class:`Segmenter`.

    Packages written by :func:`export_package` come back exactly (weights from the
    safetensors attachment, the full config from ``config.napari_unet``). Packages from
    elsewhere are accepted only if their ``pytorch_state_dict`` architecture is a ``UNet``
    whose kwargs napari-unet's ``UNet`` takes; their weights are read with
    ``torch.load(weights_only=True)``. Nothing in a package is ever executed or unpickled.
    """
    import torch

    from .model import UNet
    from .segmenter import TASKS, Segmenter

    reader = _open(path)
    where = str(Path(path))
    try:
        rdf = _rdf(reader)
        ours = ((rdf.get("config") or {}).get(_CONFIG_KEY)) or None
        if isinstance(ours, dict) and ours.get("format") == _CONFIG_FORMAT:
            if int(ours.get("version", 0)) > _CONFIG_VERSION:
                raise PackageError(
                    f"{where}: made by a newer napari-unet (package config version "
                    f"{ours.get('version')}); update napari-unet to read it"
                )
            cfg = ours.get("model")
            if not isinstance(cfg, dict):
                raise PackageError(f"{where}: config.napari_unet.model is missing")
            st_name = ours.get("weights", _ST_FILE)
            entry = next(
                (a for a in rdf.get("attachments") or [] if a.get("source") == st_name),
                {"source": st_name},
            )
            from safetensors import SafetensorError
            from safetensors.torch import load as st_load

            try:
                state = st_load(_checked(reader, entry))
            except SafetensorError as e:
                raise PackageError(f"{where}: {st_name} is not valid safetensors ({e})") from None
        else:
            cfg = _foreign_config(rdf, where)
            psd = rdf["weights"]["pytorch_state_dict"]
            state = _load_state_dict_pt(_checked(reader, psd), where)
    finally:
        reader.close()
    arch = cfg.get("architecture")
    if not isinstance(arch, dict) or cfg.get("task") not in TASKS:
        raise PackageError(f"{where}: the package's model config has no usable architecture/task")
    try:  # the config module checks each field and the weights' shapes (when present)
        from .config import ModelConfig, check_weights
    except ImportError:  # pragma: no cover - older layout
        pass
    else:
        mc = ModelConfig.from_dict(cfg, f"{where} (config.napari_unet.model)")
        check_weights(mc.architecture, state, where)
        cfg = mc.to_dict()
        arch = cfg["architecture"]
    try:
        net = UNet(**arch)
        net.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError, ValueError) as e:
        raise PackageError(
            f"{where}: the weights do not fit the architecture in the package ({e})"
        ) from None
    net.to(torch.float32)
    return Segmenter(net, cfg)
