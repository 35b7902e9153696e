"""Reading bioimage.io model packages (zip or folder) back into a :class:`Segmenter`.

Packages written by :func:`napari_unet.bioimageio.export_package` come back exactly: the
weights from the safetensors attachment, the full napari-unet config from
``config.napari_unet`` of ``rdf.yaml``. A package from elsewhere is taken when its
``pytorch_state_dict`` architecture maps onto napari-unet's ``UNet``. Nothing in a package is
ever executed or unpickled (``torch.load(weights_only=True)`` for foreign weights).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .format import ModelFileError

if TYPE_CHECKING:
    from .segmenter import Segmenter

__all__ = ["PackageError", "import_package", "is_package", "read_description"]

#: Where and how the napari-unet config travels in ``rdf.yaml``'s ``config``.
CONFIG_KEY = "napari_unet"
CONFIG_FORMAT = "napari-unet-bioimageio"
CONFIG_VERSION = 1
#: The safetensors attachment holding the weights napari-unet reads.
ST_FILE = "weights.safetensors"


class PackageError(ModelFileError):
    """A bioimage.io package that cannot be written or read (a clear, user-facing message)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    if want and sha256(data) != want:
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

    from .config import ModelConfig, check_weights
    from .model import UNet
    from .segmenter import TASKS, Segmenter

    reader = _open(path)
    where = str(Path(path))
    try:
        rdf = _rdf(reader)
        ours = ((rdf.get("config") or {}).get(CONFIG_KEY)) or None
        if isinstance(ours, dict) and ours.get("format") == CONFIG_FORMAT:
            cfg, state = _own_model(reader, rdf, ours, where)
        else:
            cfg = _foreign_config(rdf, where)
            psd = rdf["weights"]["pytorch_state_dict"]
            state = _load_state_dict_pt(_checked(reader, psd), where)
    finally:
        reader.close()
    if not isinstance(cfg.get("architecture"), dict) or cfg.get("task") not in TASKS:
        raise PackageError(f"{where}: the package's model config has no usable architecture/task")
    # every field checked, and the weights' shapes against the architecture
    mc = ModelConfig.from_dict(cfg, f"{where} (config.napari_unet.model)")
    check_weights(mc.architecture, state, where)
    try:
        net = UNet(**mc.architecture.to_dict())
        net.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError, ValueError) as e:
        raise PackageError(
            f"{where}: the weights do not fit the architecture in the package ({e})"
        ) from None
    net.to(torch.float32)
    return Segmenter(net, mc.to_dict())


def _own_model(
    reader: _Reader, rdf: dict[str, Any], ours: dict[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and the safetensors weights of a package napari-unet wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    if int(ours.get("version", 0)) > CONFIG_VERSION:
        raise PackageError(
            f"{where}: made by a newer napari-unet (package config version "
            f"{ours.get('version')}); update napari-unet to read it"
        )
    cfg = ours.get("model")
    if not isinstance(cfg, dict):
        raise PackageError(f"{where}: config.napari_unet.model is missing")
    st_name = ours.get("weights", ST_FILE)
    entry = next(
        (a for a in rdf.get("attachments") or [] if a.get("source") == st_name),
        {"source": st_name},
    )
    try:
        return cfg, st_load(_checked(reader, entry))
    except SafetensorError as e:
        raise PackageError(f"{where}: {st_name} is not valid safetensors ({e})") from None
