"""Saving, loading and versioning napari-unet models.

Model files are *data, not code*: weights are stored as safetensors and the
configuration as JSON. Nothing in this module ever unpickles a file (no
``torch.load``, no ``pickle``), so opening a model from an untrusted source
cannot run code.

On-disk formats
---------------
Folder form (default)
    A folder holding ``weights.safetensors`` (tensors, metadata
    ``{"format": "napari-unet"}``) and ``config.json`` (a JSON object with
    ``"format": "napari-unet"`` and ``"format_version": 1`` plus anything the
    caller stored: architecture, task, normalisation, training history...).
Single-file form (for sharing)
    One ``.safetensors`` file whose metadata holds the config JSON under the
    key ``"napari_unet_config"``.

All writes are atomic: data goes to a temporary file (or folder) next to the
target, is flushed and fsynced, then moved into place with ``os.replace`` /
``os.rename``. A crash mid-write leaves the previous model intact. A model folder is
replaced as a whole (:func:`napari_unet.fileio.replace_folder`: a new folder is written
next to it and swapped in); a crash between the two renames of the swap is undone on the
next load or save (:func:`napari_unet.fileio.recover`), and each save sweeps the hidden
temp files crashed saves left behind.

The :class:`ModelRegistry` keeps named, versioned models under a root folder
(``<root>/<name>/v0001``, ``v0002``...); see :func:`default_root`.

This module imports torch and safetensors lazily so that listing models
(:func:`read_config`, :meth:`ModelRegistry.list`) stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import fileio

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ModelFileError",
    "ModelInfo",
    "ModelRegistry",
    "default_root",
    "load_model",
    "read_config",
    "save_model",
    "validate_name",
]

logger = logging.getLogger(__name__)

FORMAT = "napari-unet"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
#: Metadata key holding the config JSON in the single-file form.
CONFIG_METADATA_KEY = "napari_unet_config"

PathLike = Union[str, "os.PathLike[str]"]

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
# safetensors refuses headers above 100 MB; we do the same before reading one.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "C64": 8,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_VERSION_RE = re.compile(r"^v(\d+)$")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}
_FORBIDDEN_NAME_CHARS = set('<>:"/\\|?*')
_MAX_NAME_LENGTH = 100
#: A registry's half-written version older than this is a crashed save's, and is swept.
_STALE_PARTIAL_S = 600.0


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, or not a napari-unet model.

    The message is plain English saying what is wrong and what to do.
    """


# --------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    """Return the current local time as an ISO 8601 string with UTC offset."""
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays and paths for ``json.dumps``."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    tolist = getattr(obj, "tolist", None)  # numpy arrays/scalars, torch tensors
    if callable(tolist):
        return tolist()
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    raise TypeError(
        f"the model config contains a value of type {type(obj).__name__} that cannot be "
        "stored as JSON; use numbers, strings, lists and dicts only"
    )


def _config_to_json(config: dict[str, Any]) -> str:
    """Serialise ``config`` (already containing the format keys) as indented JSON."""
    return json.dumps(config, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def _prepare_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a JSON-clean deep copy of ``config`` with the format keys set first."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    try:
        clean = json.loads(json.dumps(config, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the model config cannot be stored as JSON: {exc}") from exc
    clean.pop("format", None)
    clean.pop("format_version", None)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **clean}


def _prepare_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return detached, contiguous CPU copies of the tensors in ``state_dict``.

    Copies never share memory with each other or with the caller's tensors, so
    safetensors accepts them and the caller's state dict is left untouched.
    """
    import torch

    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, not {type(state_dict).__name__}")
    if not state_dict:
        raise ValueError("state_dict is empty; there are no weights to save")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor; "
                "only tensors can be saved as weights (put other values in the config)"
            )
        if value.is_sparse or value.layout != torch.strided:
            value = value.to_dense()
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def _fsync_path(path: Path) -> None:
    """Flush a file that was written by another library to stable storage."""
    with open(path, "r+b") as fh:
        fh.flush()
        os.fsync(fh.fileno())


_fsync_dir = fileio.fsync_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkstemp_path(folder: Path, prefix: str) -> Path:
    """Create an empty temporary file in ``folder`` and return its path.

    The file gets the ordinary permissions of a new file (0666 minus the umask), not
    mkstemp's private 0600, so a saved model can be shared like any other file.
    """
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _mkdtemp_path(folder: Path, prefix: str, suffix: str) -> Path:
    """A temporary folder in ``folder`` with ordinary permissions (0777 minus the umask)."""
    name = tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=suffix)
    os.chmod(name, 0o777 & ~_umask())
    return Path(name)


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_text_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), then flush and fsync."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _write_weights_durable(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` as safetensors to ``path``, then fsync."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; models are shareable files
    _fsync_path(path)


def _pickle_message(path: Path) -> str:
    return (
        f"{path} looks like a PyTorch pickle checkpoint (.pt/.pth/.ckpt); napari-unet never "
        "unpickles files because they can run code. Convert it with "
        "napari_unet.store.save_model(folder, state_dict, config) after loading it yourself "
        "with torch.load(..., weights_only=True) if you trust its source, or save the model "
        "from napari-unet with Segmenter.save."
    )


def _looks_like_pickle(path: Path, head: bytes) -> bool:
    """Guess from suffix or leading bytes whether ``path`` is a pickle/torch checkpoint."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return True
    if head.startswith(b"PK\x03\x04"):  # torch.save zip archive
        return True
    # pickle protocol 2-5 starts with PROTO opcode 0x80 followed by the version
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _corrupt(path: Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"{path} is not a valid safetensors file: it is truncated or corrupt ({why}). "
        "Copy or download the model again, or re-save it."
    )


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and check the JSON header of a safetensors file without loading tensors.

    Parameters
    ----------
    path : Path
        File to inspect.

    Returns
    -------
    dict
        The parsed header (tensor entries plus optional ``"__metadata__"``).

    Raises
    ------
    ModelFileError
        If the file is a pickle checkpoint, or is truncated or corrupt.
    """
    try:
        fileio.check_regular_file(path)  # a named pipe would block open() forever
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                if _looks_like_pickle(path, head):
                    raise ModelFileError(_pickle_message(path))
                raise _corrupt(path, f"the file is only {size} bytes long")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
                if _looks_like_pickle(path, head):
                    raise ModelFileError(_pickle_message(path))
                raise _corrupt(
                    path, f"the header says {n} bytes follow but the file has only {size - 8}"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        if _looks_like_pickle(path, head):
            raise ModelFileError(_pickle_message(path)) from None
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_len = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            ):
                raise _corrupt(path, "its metadata is not a string-to-string mapping")
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"tensor {key!r} has no valid description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {key!r} has an invalid shape or offsets")
        if offsets[1] > data_len:
            raise _corrupt(
                path,
                f"tensor {key!r} needs {offsets[1]} bytes of data but the file holds {data_len}",
            )
        itemsize = _DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise _corrupt(path, f"tensor {key!r} has a size that does not match its shape")
        end_max = max(end_max, offsets[1])
    if end_max != data_len:
        raise _corrupt(path, f"{data_len - end_max} unexpected bytes follow the tensor data")
    return header


def _header_metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else {}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file (header checked first)."""
    _read_safetensors_header(path)
    from safetensors.torch import load

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        return load(data)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # safetensors raises SafetensorError and others
        raise _corrupt(path, str(exc).strip() or type(exc).__name__) from exc


def _check_config(config: Any, source: Path) -> dict[str, Any]:
    """Validate a parsed config object; return it or raise :class:`ModelFileError`."""
    if not isinstance(config, dict):
        raise ModelFileError(
            f"{source} is not a napari-unet model (its config is a JSON "
            f"{type(config).__name__}, not a JSON object)."
        )
    if config.get("format") != FORMAT:
        hint = ""
        if "architectures" in config or "model_type" in config or "_name_or_path" in config:
            hint = " It looks like a Hugging Face model config."
        raise ModelFileError(
            f"{source} is not a napari-unet model (config.json has no 'format': "
            f"'{FORMAT}').{hint} Open a folder or .safetensors file saved by napari-unet."
        )
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(
            f"{source} has an invalid or missing 'format_version' ({version!r}); "
            "the model config is damaged. Re-save the model with napari-unet."
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{source} was saved by a newer napari-unet (model format version {version}; this "
            f"version reads up to {FORMAT_VERSION}). Upgrade napari-unet "
            "(pip install -U napari-unet) to open it."
        )
    return config


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        fileio.check_regular_file(path)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ModelFileError(
            f"{path} is not valid JSON (it is not even UTF-8 text); the model config is "
            "corrupt. Copy the model again or re-save it."
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ModelFileError(
            f"{path} is not valid JSON ({why}); the model config is corrupt. Copy the model "
            "again or re-save it."
        ) from None
    return _check_config(config, path)


def _config_from_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        raise ModelFileError(
            f"{path} is not a napari-unet model (the safetensors file carries no "
            f"'{CONFIG_METADATA_KEY}' metadata; it may come from another tool, e.g. Hugging "
            "Face). Open a folder or .safetensors file saved by napari-unet."
        )
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(
            f"{path} has a napari-unet config that is not valid JSON ({exc}); the file is "
            "corrupt. Copy the model again or re-save it."
        ) from None
    return _check_config(config, path)


@dataclass(frozen=True)
class _Resolved:
    """Where a model's parts live: folder form or single file."""

    kind: str  # "folder" or "file"
    config: Path | None  # config.json (folder form)
    weights: Path  # weights.safetensors or the single file


def _resolve(path: PathLike) -> _Resolved:
    """Work out which model a user-given path refers to, refusing bad inputs early."""
    p = Path(path).expanduser()
    if not p.exists():
        # a save killed between the two renames of its folder swap: the old model is whole
        p = fileio.recover(p, _is_model_folder) or p
    if not p.exists():
        raise ModelFileError(
            f"no model at {p}: the path does not exist. Check the spelling or pick the "
            "model folder (with config.json and weights.safetensors) or a .safetensors file."
        )
    if p.is_dir():
        cfg, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if cfg.is_file():
            if not weights.is_file():
                _read_config_json(cfg)  # refuse foreign configs with the clearer message first
                raise ModelFileError(
                    f"the model folder {p} has a {CONFIG_NAME} but its weights "
                    f"({WEIGHTS_NAME}) are missing. Copy the whole folder again or re-save "
                    "the model."
                )
            return _Resolved("folder", cfg, weights)
        # a registry model folder (<root>/<name>) holding v0001, v0002...: take the latest
        versions = sorted(
            (int(m.group(1)), c)
            for c in p.iterdir()
            if (m := _VERSION_RE.match(c.name)) and (c / CONFIG_NAME).is_file()
        )
        if versions:
            return _resolve(versions[-1][1])
        if weights.is_file():
            return _Resolved("file", None, weights)  # maybe a single-file model; checked later
        pickles = sorted(c.name for c in p.iterdir() if c.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelFileError(
                f"{p} holds no napari-unet model, only {', '.join(pickles)}. "
                + _pickle_message(p / pickles[0])
            )
        raise ModelFileError(
            f"no model at {p}: the folder has no {CONFIG_NAME} and {WEIGHTS_NAME}. Pick a "
            "folder saved by napari-unet or a .safetensors model file."
        )
    if p.name == CONFIG_NAME:
        folder = p.parent
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            # refuse foreign configs with the clearer message first
            _read_config_json(p)
            raise ModelFileError(
                f"the model folder {folder} has a {CONFIG_NAME} but its weights "
                f"({WEIGHTS_NAME}) are missing. Copy the whole folder again or re-save the model."
            )
        return _Resolved("folder", p, weights)
    if p.name == WEIGHTS_NAME and (p.parent / CONFIG_NAME).is_file():
        return _Resolved("folder", p.parent / CONFIG_NAME, p)
    if p.suffix.lower() == ".json":
        raise ModelFileError(
            f"{p} is not a napari-unet model (a model's config file is named {CONFIG_NAME} and "
            f"sits next to {WEIGHTS_NAME})."
        )
    return _Resolved("file", None, p)


def _resolved_config(res: _Resolved) -> dict[str, Any]:
    if res.kind == "folder":
        assert res.config is not None
        return _read_config_json(res.config)
    header = _read_safetensors_header(res.weights)
    metadata = _header_metadata(header)
    if CONFIG_METADATA_KEY not in metadata and res.weights.name == WEIGHTS_NAME:
        raise ModelFileError(
            f"the model folder {res.weights.parent} has {WEIGHTS_NAME} but its {CONFIG_NAME} is "
            "missing. Copy the whole folder again or re-save the model."
        )
    return _config_from_metadata(res.weights, metadata)


# --------------------------------------------------------------------------- public API


def read_config(path: PathLike) -> dict[str, Any]:
    """Read only the config of a model (cheap: no tensors are loaded).

    Parameters
    ----------
    path : str or os.PathLike
        A model folder, its ``config.json`` or ``weights.safetensors``, a single-file
        ``.safetensors`` model, or a registry model folder (latest version is used).

    Returns
    -------
    dict
        The config, including ``"format"`` and ``"format_version"``.

    Raises
    ------
    ModelFileError
        If the model is missing, corrupt, a pickle checkpoint, not a napari-unet model or
        from a newer format version.
    """
    return _resolved_config(_resolve(path))


def load_model(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a model's weights and config without ever unpickling anything.

    Parameters
    ----------
    path : str or os.PathLike
        A model folder, its ``config.json`` or ``weights.safetensors``, a single-file
        ``.safetensors`` model, or a registry model folder (latest version is used).

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        The weights, on CPU.
    config : dict
        The config, including ``"format"`` and ``"format_version"``.

    Raises
    ------
    ModelFileError
        If the model is missing, corrupt, a pickle checkpoint, not a napari-unet model or
        from a newer format version.
    """
    res = _resolve(path)
    config = _resolved_config(res)
    state_dict = _load_safetensors(res.weights)
    return state_dict, config


def save_model(path: PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save a model atomically as a folder, or as one file if ``path`` ends in ``.safetensors``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination folder (created if needed; an existing napari-unet model there is
        replaced) or ``*.safetensors`` file for the single-file form.
    state_dict : dict of str to torch.Tensor
        Weights. They are copied to contiguous CPU tensors; the caller's dict and tensors
        are not modified.
    config : dict
        JSON-serialisable configuration. ``"format"`` and ``"format_version"`` are added
        (caller values for those keys are replaced); the caller's dict is not modified.

    Returns
    -------
    Path
        The folder or file written.

    Raises
    ------
    TypeError
        If ``state_dict`` or ``config`` has unsupported contents.
    ValueError
        If ``state_dict`` is empty or ``path`` is unsuitable (e.g. a folder form target that
        is a file, or a folder holding some other tool's ``config.json``).
    """
    target = Path(path).expanduser()
    tensors = _prepare_tensors(state_dict)
    cfg = _prepare_config(config)
    if target.suffix.lower() == ".safetensors":
        _save_single_file(target, tensors, cfg)
    else:
        _save_folder(target, tensors, cfg)
    return target


def _is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _save_single_file(target: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    if target.is_dir():
        raise ValueError(f"cannot write the model file {target}: a folder with that name exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    fileio.sweep(target)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        CONFIG_METADATA_KEY: json.dumps(cfg, ensure_ascii=False),
    }
    tmp = _mkstemp_path(target.parent, f".{target.name}.")
    try:
        _write_weights_durable(tmp, tensors, metadata)
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    finally:
        _unlink_quietly(tmp)


def _write_folder_contents(
    folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> None:
    """Write both model files into an (empty, private) folder, durably."""
    _write_weights_durable(folder / WEIGHTS_NAME, tensors, {"format": FORMAT})
    _write_text_durable(folder / CONFIG_NAME, _config_to_json(cfg))
    _fsync_dir(folder)


def _save_folder(target: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"cannot write a model folder at {target}: a file with that name exists. To write a "
            "single-file model give a path ending in .safetensors."
        )
    if target.is_symlink():
        target = target.resolve()  # swap the folder the link points to, keep the link
    if target.parent.is_dir():
        fileio.sweep(target)  # first puts back a model a crashed swap left aside
    if not target.exists():
        # fresh target: build the whole folder privately, then rename it into place
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = _mkdtemp_path(target.parent, f".{target.name}.", ".tmp")
        try:
            _write_folder_contents(tmpdir, tensors, cfg)
            os.rename(tmpdir, target)
            tmpdir = None
            _fsync_dir(target.parent)
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return

    cfg_path, w_path = target / CONFIG_NAME, target / WEIGHTS_NAME
    if cfg_path.is_file():
        try:
            existing = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            existing = None  # a damaged napari-unet config may be replaced
        if existing is not None and (
            not isinstance(existing, dict) or existing.get("format") != FORMAT
        ):
            raise ValueError(
                f"will not overwrite {cfg_path}: it is not a napari-unet config. Save the model "
                "to another folder."
            )
    if _swap_folder(target, tensors, cfg):
        return
    # a folder holding other files, or a parent we cannot write to: the two files are
    # replaced in place, each atomically, the old weights kept aside until both are in
    tmp_w = _mkstemp_path(target, ".weights.")
    tmp_c = _mkstemp_path(target, ".config.")
    backup: Path | None = None
    try:
        _write_weights_durable(tmp_w, tensors, {"format": FORMAT})
        _write_text_durable(tmp_c, _config_to_json(cfg))
        if w_path.is_file():
            # keep the old weights reachable so a failure between the two renames can be undone
            backup = target / f".weights.{uuid.uuid4().hex}.bak"
            try:
                os.link(w_path, backup)
            except OSError:
                shutil.copy2(w_path, backup)
        os.replace(tmp_w, w_path)
        tmp_w = None
        try:
            os.replace(tmp_c, cfg_path)
            tmp_c = None
        except BaseException:
            if backup is not None:
                os.replace(backup, w_path)
                backup = None
            else:
                _unlink_quietly(w_path)
            raise
        _fsync_dir(target)
    finally:
        _unlink_quietly(tmp_w)
        _unlink_quietly(tmp_c)
        _unlink_quietly(backup)


def _swap_folder(target: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> bool:
    """Write the model into a new folder next to ``target`` and swap it in as a whole.

    Returns False (nothing done) when ``target`` holds files other than a model's, which a
    swap would move away, or when its parent cannot be written to.
    """
    try:
        others = [e.name for e in target.iterdir() if e.name not in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        return False
    if others:
        return False
    try:
        new = _mkdtemp_path(target.parent, f".{target.name}.new-", ".tmp")
    except OSError:
        return False
    try:
        _write_folder_contents(new, tensors, cfg)
        fileio.replace_folder(target, new)
        new = None
    finally:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- registry


def default_root() -> Path:
    """Return the folder holding the registry of named models.

    ``$NAPARI_UNET_HOME`` if set (used as the root itself), else the platform's user data
    folder: ``~/.local/share/napari-unet/models`` on Linux (``$XDG_DATA_HOME`` respected),
    ``~/Library/Application Support/napari-unet/models`` on macOS and
    ``%LOCALAPPDATA%\\napari-unet\\models`` on Windows. The folder is not created.

    Returns
    -------
    Path
        The registry root.
    """
    env = os.environ.get("NAPARI_UNET_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        data = Path(base) if base else Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        data = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        data = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return data / "napari-unet" / "models"


def validate_name(name: Any) -> str:
    """Return ``name`` if it is a usable model name, else raise ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(f"a model name must be text, not {type(name).__name__}")
    if not name.strip():
        raise ValueError("a model name cannot be empty")
    if len(name) > _MAX_NAME_LENGTH:
        raise ValueError(
            f"a model name can have at most {_MAX_NAME_LENGTH} characters "
            f"(this one has {len(name)})"
        )
    bad = sorted({c for c in name if c in _FORBIDDEN_NAME_CHARS or ord(c) < 32 or c == "\x7f"})
    if bad or os.sep in name or (os.altsep and os.altsep in name):
        shown = " ".join(repr(c) for c in bad) or repr(os.sep)
        raise ValueError(
            f"the model name {name!r} contains characters that are not allowed ({shown}); "
            "use letters, digits, spaces, '-', '_' or '.'"
        )
    if name.startswith("."):
        raise ValueError(f"the model name {name!r} cannot start with '.'")
    if name != name.strip() or name.endswith("."):
        raise ValueError(
            f"the model name {name!r} cannot start or end with a space or end with '.'"
        )
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise ValueError(f"the model name {name!r} is reserved on Windows; choose another")
    return name


@dataclass
class ModelInfo:
    """Summary of one saved version of a named model.

    Attributes
    ----------
    name : str
        Model name (folder name in the registry).
    version : int
        Version number (1, 2, ...).
    path : Path
        The version folder (``<root>/<name>/v0001``).
    created : str
        ISO 8601 time of creation (config ``"created"`` or the folder's mtime).
    task : str or None
        Config ``"task"``.
    trained_on : list of str
        Config ``"trained_on"`` (image names), empty if absent.
    val_score : float or None
        Config ``"val_score"``.
    config : dict
        The full config.
    """

    name: str
    version: int
    path: Path
    created: str
    task: str | None = None
    trained_on: list[str] = field(default_factory=list)
    val_score: float | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, name: str, version: int, path: Path, config: dict[str, Any]) -> ModelInfo:
        """Build a :class:`ModelInfo` from a version folder's config, tolerating odd values.

        Parameters
        ----------
        name, version, path
            Identity of the version.
        config : dict
            Its config.

        Returns
        -------
        ModelInfo
        """
        created = config.get("created")
        if not isinstance(created, str) or not created:
            try:
                mtime = path.stat().st_mtime
                created = (
                    _dt.datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds")
                )
            except OSError:
                created = ""
        task = config.get("task")
        trained = config.get("trained_on")
        if isinstance(trained, str):
            trained_on = [trained]
        elif isinstance(trained, (list, tuple)):
            trained_on = [str(t) for t in trained]
        else:
            trained_on = []
        score = config.get("val_score")
        val_score = (
            float(score)
            if isinstance(score, (int, float)) and not isinstance(score, bool)
            else None
        )
        return cls(
            name=name,
            version=version,
            path=path,
            created=created,
            task=task if isinstance(task, str) else None,
            trained_on=trained_on,
            val_score=val_score,
            config=config,
        )


class ModelRegistry:
    """Named, versioned models stored as ``<root>/<name>/v0001``, ``v0002``...

    Every :meth:`save` adds a new version; older versions are never overwritten. Each
    version folder is a regular model folder readable by :func:`load_model`.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Registry folder; :func:`default_root` if omitted. Created on first save.
    """

    def __init__(self, root: PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelRegistry(root={str(self.root)!r})"

    # ---------------------------------------------------------------- internals

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    @staticmethod
    def _version_dirs(model_dir: Path) -> list[tuple[int, Path]]:
        """All ``vNNNN`` folders (readable or not), ascending."""
        try:
            entries = list(model_dir.iterdir())
        except OSError:
            return []
        out = [
            (int(m.group(1)), e) for e in entries if (m := _VERSION_RE.match(e.name)) and e.is_dir()
        ]
        return sorted(out)

    def _require(self, name: str) -> Path:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            known = ", ".join(repr(i.name) for i in self.list()) or "none"
            raise ModelFileError(f"no model named {name!r} in {self.root} (available: {known}).")
        return model_dir

    def _read_versions(self, name: str, model_dir: Path) -> list[ModelInfo]:
        infos = []
        for version, vdir in self._version_dirs(model_dir):
            try:
                infos.append(ModelInfo.from_config(name, version, vdir, read_config(vdir)))
            except (ModelFileError, OSError) as exc:
                logger.warning("skipping unreadable model version %s: %s", vdir, exc)
        return infos

    # ---------------------------------------------------------------- public

    def exists(self, name: str) -> bool:
        """Return whether a model called ``name`` exists (invalid names do not)."""
        try:
            return self._model_dir(name).is_dir()
        except ValueError:
            return False

    def save(
        self, name: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> ModelInfo:
        """Save a new version of model ``name`` (atomically; older versions are kept).

        Parameters
        ----------
        name : str
            Model name: not empty, at most 100 characters, no path separators.
        state_dict : dict of str to torch.Tensor
            Weights.
        config : dict
            Config; ``"created"`` is set to the current time.

        Returns
        -------
        ModelInfo
            The new version.
        """
        model_dir = self._model_dir(name)
        tensors = _prepare_tensors(state_dict)
        cfg = _prepare_config(config)
        cfg["created"] = _now_iso()
        model_dir.mkdir(parents=True, exist_ok=True)
        # versions half-written by crashed saves (old enough not to be another writer's)
        fileio.sweep_older(model_dir.glob(".tmp-*.partial"), _STALE_PARTIAL_S)
        tmpdir = _mkdtemp_path(model_dir, ".tmp-", ".partial")
        try:
            _write_folder_contents(tmpdir, tensors, cfg)
            existing = self._version_dirs(model_dir)
            version = (existing[-1][0] if existing else 0) + 1
            for _ in range(1000):
                vdir = model_dir / f"v{version:04d}"
                if not vdir.exists():
                    try:
                        os.rename(tmpdir, vdir)
                        break
                    except FileExistsError:
                        pass
                    except OSError:
                        if not vdir.exists():
                            raise
                version += 1  # another writer took this number
            else:  # pragma: no cover - would need 1000 concurrent writers
                raise OSError(f"could not find a free version number in {model_dir}")
            tmpdir = None
            _fsync_dir(model_dir)
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return ModelInfo.from_config(name, version, vdir, cfg)

    def list(self) -> list[ModelInfo]:
        """Return the latest readable version of every model, sorted by name.

        Broken folders are skipped (and logged), never raised.

        Returns
        -------
        list of ModelInfo
        """
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        out = []
        for entry in entries:
            try:
                name = validate_name(entry.name)
            except ValueError:
                continue
            if not entry.is_dir():
                continue
            infos = self._read_versions(name, entry)
            if infos:
                out.append(infos[-1])
        return sorted(out, key=lambda i: (i.name.casefold(), i.name))

    def versions(self, name: str) -> list[ModelInfo]:
        """Return the readable versions of ``name``, oldest first.

        Raises
        ------
        ModelFileError
            If there is no such model.
        """
        return self._read_versions(name, self._require(name))

    def path(self, name: str, version: int | None = None) -> Path:
        """Return the folder of a version of ``name`` (latest readable one by default).

        Raises
        ------
        ModelFileError
            If the model or version does not exist.
        """
        model_dir = self._require(name)
        if version is None:
            infos = self._read_versions(name, model_dir)
            if not infos:
                raise ModelFileError(
                    f"the model {name!r} in {self.root} has no readable version; its files are "
                    "damaged. Delete it or restore it from a copy."
                )
            return infos[-1].path
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"a version must be a whole number, not {version!r}")
        for number, vdir in self._version_dirs(model_dir):
            if number == version:
                return vdir
        have = ", ".join(str(n) for n, _ in self._version_dirs(model_dir)) or "none"
        raise ModelFileError(f"the model {name!r} has no version {version} (versions: {have}).")

    def load(
        self, name: str, version: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load a version of ``name`` (latest readable one by default).

        Returns
        -------
        state_dict : dict of str to torch.Tensor
        config : dict
        """
        return load_model(self.path(name, version))

    def info(self, name: str, version: int | None = None) -> ModelInfo:
        """Return the :class:`ModelInfo` of a version of ``name`` (latest by default)."""
        vdir = self.path(name, version)
        number = int(_VERSION_RE.match(vdir.name).group(1))  # type: ignore[union-attr]
        return ModelInfo.from_config(name, number, vdir, read_config(vdir))

    def rename(self, old: str, new: str) -> None:
        """Rename model ``old`` (all versions) to ``new``.

        Raises
        ------
        ValueError
            If ``new`` is invalid or already taken.
        ModelFileError
            If ``old`` does not exist.
        """
        src = self._require(old)
        dst = self._model_dir(new)
        if old == new:
            return
        if dst.exists():
            same = False
            with contextlib.suppress(OSError):
                same = os.path.samefile(src, dst)
            if not same:
                raise ValueError(
                    f"a model named {new!r} already exists; choose another name or delete it first"
                )
            # case-only rename on a case-insensitive file system: go through a temporary name
            tmp = self.root / f".renaming-{uuid.uuid4().hex}"
            os.rename(src, tmp)
            os.rename(tmp, dst)
        else:
            os.rename(src, dst)
        _fsync_dir(self.root)

    def delete(self, name: str, version: int | None = None) -> None:
        """Delete a whole model, or one version of it.

        Deleting the last remaining version deletes the model.

        Raises
        ------
        ModelFileError
            If the model or version does not exist.
        """
        model_dir = self._require(name)
        if version is None:
            self._remove_tree(model_dir, self.root)
            return
        vdir = self.path(name, version)
        self._remove_tree(vdir, model_dir)
        if not self._version_dirs(model_dir):
            self._remove_tree(model_dir, self.root)

    @staticmethod
    def _remove_tree(path: Path, parent: Path) -> None:
        """Move ``path`` out of sight (hidden name) first, then delete it."""
        trash = parent / f".deleting-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def rollback(self, name: str, version: int) -> ModelInfo:
        """Make a copy of an older version the newest version (history is kept).

        Parameters
        ----------
        name : str
            Model name.
        version : int
            Version to restore.

        Returns
        -------
        ModelInfo
            The new version; its config has ``"rolled_back_from": version``.
        """
        state_dict, config = self.load(name, version)
        config = {k: v for k, v in config.items() if k not in ("format", "format_version")}
        config["rolled_back_from"] = version
        return self.save(name, state_dict, config)
