"""The napari-unet model file: what it holds, how it is read, and how it is saved.

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

A safetensors file's header is checked by the safetensors library itself
(``safe_open(...).metadata()``); a file it refuses is reported as truncated or corrupt, or
as a pickle checkpoint when it looks like one.

All writes are atomic: data goes to a temporary file (or folder) next to the
target, is flushed and fsynced, then moved into place with ``os.replace`` /
``os.rename``. A crash mid-write leaves the previous model intact. A model folder is
replaced as a whole (:func:`napari_unet.fileio.replace_folder`: a new folder is written
next to it and swapped in); a crash between the two renames of the swap is undone on the
next load or save (:func:`napari_unet.fileio.recover`), and each save sweeps the hidden
temp files crashed saves left behind.

The named, versioned models are :mod:`napari_unet.registry`'s. The typed view of a config is
:class:`napari_unet.config.ModelConfig`; this module accepts any JSON object that carries the
format keys. torch and safetensors are imported lazily so that reading a config stays cheap.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import fileio
from .config import CURRENT_FORMAT_VERSION as FORMAT_VERSION
from .config import FORMAT

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_METADATA_KEY",
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "ModelFileError",
    "load_model",
    "read_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
#: Metadata key holding the config JSON in the single-file form.
CONFIG_METADATA_KEY = "napari_unet_config"

PathLike = Union[str, "os.PathLike[str]"]

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
#: A registry version folder's name: v0001, v0002...
VERSION_RE = re.compile(r"^v(\d+)$")


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, or not a napari-unet model.

    The message is plain English saying what is wrong and what to do.
    """


# --------------------------------------------------------------------------- reading


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


def _refused(path: Path, head: bytes, exc: Exception) -> ModelFileError:
    """The error for a file safetensors refused: a pickle checkpoint, or a damaged file."""
    if _looks_like_pickle(path, head):
        return ModelFileError(_pickle_message(path))
    why = str(exc).strip().removeprefix("Error while deserializing header: ")
    return _corrupt(path, f"safetensors: {why or type(exc).__name__}")


def _head(path: Path) -> bytes:
    """The first 8 bytes of a regular file (a named pipe would block ``open`` forever)."""
    try:
        fileio.check_regular_file(path)
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The string-to-string metadata of a safetensors file, without loading its tensors.

    safetensors checks the whole header (its length, JSON, every tensor's dtype, shape and
    offsets against the file's size) before it answers.

    Raises
    ------
    ModelFileError
        If the file is a pickle checkpoint, or is truncated or corrupt.
    """
    from safetensors import safe_open

    head = _head(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _refused(path, head, exc) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file (refused files as :func:`read_metadata`)."""
    from safetensors.torch import load

    head = _head(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc
    try:
        return load(data)
    except Exception as exc:  # safetensors raises SafetensorError and others
        raise _refused(path, head, exc) from None


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
        p = fileio.recover(p, is_model_folder) or p
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
            if (m := VERSION_RE.match(c.name)) and (c / CONFIG_NAME).is_file()
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
    metadata = read_metadata(res.weights)
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


def is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
