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
import math
import os
import re
import zipfile
import zlib
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
            # a link may lead anywhere: only files that really lie in the folder are read
            root = self.path.resolve()
            real = (self.path / name).resolve()
            if real != root and root not in real.parents:
                raise PackageError(
                    f"{self.path}: file {name!r} is a link that leads outside the package "
                    f"folder (to {real}); refused"
                )
            return real.read_bytes()
        except (KeyError, FileNotFoundError):
            raise PackageError(f"{self.path}: the package has no file {name!r}") from None
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
            raise PackageError(
                f"{self.path}: file {name!r} of the package is damaged or unreadable ({e})"
            ) from None
        except OSError as e:
            raise PackageError(f"{self.path}: cannot read {name!r} ({e.strerror or e})") from None

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


# ------------------------------------------------------------ typed reads of rdf.yaml
# A hand-edited or foreign rdf.yaml may hold anything where a mapping, list, string or
# number belongs: every field is read through these, so a wrong one is a PackageError
# naming the field and what it must be (never an AttributeError from deep inside).


def _kind(value: Any) -> str:
    """How a YAML value reads in an error message."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"a {type(value).__name__}"


def _at(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _bad(where: str, field: str, expected: str, value: Any) -> PackageError:
    return PackageError(f"{where}: rdf.yaml: {field!r} must be {expected}, got {_kind(value)}")


def _missing(where: str, field: str, expected: str) -> PackageError:
    return PackageError(f"{where}: rdf.yaml: {field!r} is missing (it must be {expected})")


def _typed(
    d: dict[str, Any], key: str, where: str, at: str, kind: type, expected: str, default: Any,
    required: bool,
) -> Any:  # fmt: skip
    """``d[key]`` if it is a ``kind``; ``default`` when absent or null, unless ``required``."""
    value = d.get(key)
    if value is None:
        if required:
            raise _missing(where, _at(at, key), expected)
        return default
    if not isinstance(value, kind):
        raise _bad(where, _at(at, key), expected, value)
    return value


def _mapping(
    d: dict[str, Any],
    key: str,
    where: str,
    at: str = "",
    *,
    required: bool = False,
    expected: str = "a mapping",
) -> dict[str, Any]:
    """``d[key]`` as a mapping (empty when absent or null, unless ``required``)."""
    return _typed(d, key, where, at, dict, expected, {}, required)


def _mappings(d: dict[str, Any], key: str, where: str, at: str = "") -> list[dict[str, Any]]:
    """``d[key]`` as a list of mappings (empty when absent or null)."""
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(where, _at(at, key), "a list of mappings", value)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(where, f"{_at(at, key)}[{i}]", "a mapping", item)
    return value


def _str(
    d: dict[str, Any],
    key: str,
    where: str,
    at: str = "",
    *,
    default: str | None = None,
    required: bool = False,
) -> str | None:
    """``d[key]`` as a string (``default`` when absent or null, unless ``required``)."""
    return _typed(d, key, where, at, str, "a string", default, required)


def _int(
    d: dict[str, Any],
    key: str,
    where: str,
    at: str = "",
    *,
    default: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> int:
    """``d[key]`` as a whole number in [lo, hi] (``default`` when absent; None: required)."""
    value = d.get(key)
    if lo is not None and hi is not None:
        expected = f"a whole number from {lo} to {hi}"
    elif lo is not None:
        expected = f"a whole number of at least {lo}"
    else:
        expected = "a whole number"
    if value is None:
        if default is None:
            raise _missing(where, _at(at, key), expected)
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (lo is not None and value < lo)
        or (hi is not None and value > hi)
    ):
        raise _bad(where, _at(at, key), expected, value)
    return value


def _number(d: dict[str, Any], key: str, where: str, at: str = "", *, default: float) -> float:
    """``d[key]`` as a finite number (``default`` when absent or null)."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(where, _at(at, key), "a number", value)
    return float(value)


# ------------------------------------------------------------------ files and weights


def _checked(reader: _Reader, entry: dict[str, Any], where: str, at: str) -> tuple[str, bytes]:
    """The file ``entry`` (a mapping with ``source`` and maybe ``sha256``) names, checked."""
    source = _str(entry, "source", where, at, required=True)
    want = _str(entry, "sha256", where, at)
    data = reader.read(source)
    if want and sha256(data) != want.lower():
        raise PackageError(
            f"{reader.path}: {source} does not match its sha256 in rdf.yaml "
            "(a damaged or altered package)"
        )
    return source, data


def _torch_reason(e: BaseException) -> str:
    """The telling line of a ``torch.load`` error (torch's own advice to unpickle omitted)."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if m:
        text = m.group(1).strip()
    first = text.splitlines()[0].strip() if text else ""
    first = re.split(r"(?<=\.)\s", first, maxsplit=1)[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _load_state_dict_pt(data: bytes, where: str, name: str = "the weights") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import pickle

    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses (code, or not a pickle)
        raise PackageError(
            f"{where}: refused to load {name}: it is not a plain state dict of tensors "
            f"(torch.load with weights_only=True said: {_torch_reason(e)}). napari-unet never "
            "unpickles code from a model file."
        ) from None
    except Exception as e:  # noqa: BLE001  junk bytes fail anywhere inside torch's unpickler
        raise PackageError(
            f"{where}: {name} is not a readable PyTorch state dict ({_torch_reason(e)})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackageError(f"{where}: {name} is not a state dict of tensors")
    return state


_PSD = "weights.pytorch_state_dict"
_KWARGS = f"{_PSD}.architecture.kwargs"


def _foreign_config(rdf: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map a package from elsewhere onto ``UNet`` when its architecture says it is one.

    Returns the napari-unet config and the ``pytorch_state_dict`` entry (its weights).
    """
    from .segmenter import Segmenter

    psd = _mapping(_mapping(rdf, "weights", where), "pytorch_state_dict", where, "weights")
    if not psd:
        raise PackageError(
            f"{where}: this package was not made by napari-unet and has no pytorch_state_dict "
            "weights; napari-unet cannot use it"
        )
    arch = _mapping(
        psd,
        "architecture",
        where,
        _PSD,
        expected="a mapping with 'callable' and 'kwargs' (bioimage.io spec 0.5)",
    )
    callable_ = _str(arch, "callable", where, f"{_PSD}.architecture", default="")
    kwargs = _mapping(arch, "kwargs", where, f"{_PSD}.architecture")
    known = set(Segmenter.new().net.config())
    if callable_ != "UNet" or not set(kwargs) <= known or "in_channels" not in kwargs:
        raise PackageError(
            f"{where}: this package was not made by napari-unet and its architecture "
            f"({callable_ or 'unknown'} with kwargs {sorted(map(str, kwargs))}) cannot be mapped "
            "onto napari-unet's UNet; use it with bioimageio.core or the software it came from"
        )
    _str(psd, "source", where, _PSD, required=True)
    # the bounds of config.Architecture: checked before any network is built
    in_channels = _int(kwargs, "in_channels", where, _KWARGS, lo=1, hi=4096)
    out = _int(kwargs, "out_channels", where, _KWARGS, default=1, lo=1, hi=4096)
    task = "instance" if out == 3 else "semantic"
    if task == "semantic" and out < 2:
        raise PackageError(
            f"{where}: a single-output network (out_channels 1) cannot be mapped onto "
            "napari-unet, which needs a background and at least one class"
        )
    ndim = _int(kwargs, "ndim", where, _KWARGS, default=2, lo=2, hi=3)
    seg = Segmenter.new(task, in_channels, num_classes=max(out, 2), ndim=ndim)
    cfg = seg.config
    full = seg.net.config()
    full.update(kwargs)
    cfg["architecture"] = full
    name = _str(rdf, "name", where, default="") or ""
    cfg["name"] = re.sub(r"[^0-9A-Za-z_-]+", "-", name).strip("-") or "imported"
    inputs = _mappings(rdf, "inputs", where)
    pre = _mappings(inputs[0], "preprocessing", where, "inputs[0]") if inputs else []
    for i, op in enumerate(pre):
        at = f"inputs[0].preprocessing[{i}]"
        if _str(op, "id", where, at) == "scale_range":
            kw = _mapping(op, "kwargs", where, at)
            cfg["normalization"] = {
                "method": "percentile",
                "low": _number(kw, "min_percentile", where, f"{at}.kwargs", default=0.0),
                "high": _number(kw, "max_percentile", where, f"{at}.kwargs", default=100.0),
            }
    cfg["trained_on"] = [f"imported from a bioimage.io package: {name or cfg['name']}"]
    return cfg, psd


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
        ours = _mapping(rdf, "config", where).get(CONFIG_KEY)
        if ours is not None and not isinstance(ours, dict):
            raise _bad(where, f"config.{CONFIG_KEY}", "a mapping", ours)
        if ours and ours.get("format") == CONFIG_FORMAT:
            cfg, state = _own_model(reader, rdf, ours, where)
            label = f"{where} (config.{CONFIG_KEY}.model)"
        else:
            cfg, psd = _foreign_config(rdf, where)
            name, data = _checked(reader, psd, where, _PSD)
            state = _load_state_dict_pt(data, where, name)
            label = f"{where} ({_KWARGS})"
    finally:
        reader.close()
    if not isinstance(cfg.get("architecture"), dict) or cfg.get("task") not in TASKS:
        raise PackageError(f"{where}: the package's model config has no usable architecture/task")
    # every field checked, and the weights' shapes against the architecture
    mc = ModelConfig.from_dict(cfg, label)
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

    at = f"config.{CONFIG_KEY}"
    version = _int(ours, "version", where, at, default=0, lo=0)
    if version > CONFIG_VERSION:
        raise PackageError(
            f"{where}: made by a newer napari-unet (package config version {version}); "
            "update napari-unet to read it"
        )
    cfg = _mapping(ours, "model", where, at, required=True)
    st_name = _str(ours, "weights", where, at, default=ST_FILE)
    attachments = _mappings(rdf, "attachments", where)
    i, entry = next(
        ((i, a) for i, a in enumerate(attachments) if a.get("source") == st_name),
        (None, {"source": st_name}),
    )
    entry_at = f"attachments[{i}]" if i is not None else f"{at}.weights"
    try:
        return cfg, st_load(_checked(reader, entry, where, entry_at)[1])
    except SafetensorError as e:
        raise PackageError(f"{where}: {st_name} is not valid safetensors ({e})") from None
