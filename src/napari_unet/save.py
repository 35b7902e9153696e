"""Saving a model atomically, as a folder or as one ``.safetensors`` file.

The file format itself (names, metadata keys, how a file is read and checked) is
:mod:`napari_unet.format`'s; the durable-write primitives (fsync, temp files, the folder swap,
sweeping crashed saves' leftovers) are :mod:`napari_unet.fileio`'s. A crash at any moment of a
save leaves the previous model whole.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fileio
from .format import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    PathLike,
)

if TYPE_CHECKING:
    import torch

__all__ = ["config_to_json", "prepare_config", "prepare_tensors", "save_model"]


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


def config_to_json(config: dict[str, Any]) -> str:
    """Serialise ``config`` (already containing the format keys) as indented JSON."""
    return json.dumps(config, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def prepare_config(config: dict[str, Any]) -> dict[str, Any]:
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


def prepare_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    from .config import nonfinite_tensor

    bad = nonfinite_tensor(out)
    if bad is not None:  # every save (Segmenter.save, the registry): load would refuse it
        raise ValueError(
            f"will not save weights holding NaN or infinite values (tensor {bad!r}; did the "
            "training diverge?): load the last saved version instead"
        )
    return out


def _write_weights_durable(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` as safetensors to ``path``, then fsync."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~fileio.umask())  # safetensors writes 0600; models are shareable
    fileio.fsync_file(path)


def write_folder_contents(
    folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> None:
    """Write both model files into an (empty, private) folder, durably."""
    _write_weights_durable(folder / WEIGHTS_NAME, tensors, {"format": FORMAT})
    fileio.write_text_durable(folder / CONFIG_NAME, config_to_json(cfg))
    fileio.fsync_dir(folder)


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
    if not str(path).strip():
        raise ValueError("save needs a path: a folder, or a file ending in .safetensors")
    target = Path(path).expanduser()
    tensors = prepare_tensors(state_dict)
    cfg = prepare_config(config)
    if target.suffix.lower() == ".safetensors":
        _save_single_file(target, tensors, cfg)
    else:
        _save_folder(target, tensors, cfg)
    return target


def _save_single_file(target: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    if target.is_dir():
        raise ValueError(f"cannot write the model file {target}: a folder with that name exists")
    if target.is_file() and _foreign(target):
        raise ValueError(
            f"will not overwrite {target}: it is a safetensors file of another tool, not a "
            "napari-unet model. Save the model under another name."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fileio.sweep(target)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        CONFIG_METADATA_KEY: json.dumps(cfg, ensure_ascii=False),
    }
    tmp = fileio.temp_file(target.parent, f".{target.name}.")
    try:
        _write_weights_durable(tmp, tensors, metadata)
        os.replace(tmp, target)
        tmp = None
        fileio.fsync_dir(target.parent)
    finally:
        fileio.unlink_quietly(tmp)


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
        tmpdir = fileio.temp_folder(target.parent, f".{target.name}.", ".tmp")
        try:
            write_folder_contents(tmpdir, tensors, cfg)
            os.rename(tmpdir, target)
            tmpdir = None
            fileio.fsync_dir(target.parent)
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return

    cfg_path, w_path = target / CONFIG_NAME, target / WEIGHTS_NAME
    if cfg_path.is_file():
        try:
            existing = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            # a damaged napari-unet config may be replaced (its weights say it was ours)
            existing = None if w_path.is_file() and _foreign(w_path) is False else []
        if existing is not None and (
            not isinstance(existing, dict) or existing.get("format") != FORMAT
        ):
            raise ValueError(
                f"will not overwrite {cfg_path}: it is not a napari-unet config. Save the model "
                "to another folder."
            )
    elif w_path.is_file() and _foreign(w_path):
        raise ValueError(
            f"will not overwrite {w_path}: it is the weights of another tool, not of a "
            "napari-unet model. Save the model to another folder."
        )
    if _swap_folder(target, tensors, cfg):
        return
    # a folder holding other files, or a parent we cannot write to: the two files are
    # replaced in place, each atomically, the old weights kept aside until both are in
    tmp_w = fileio.temp_file(target, ".weights.")
    tmp_c = fileio.temp_file(target, ".config.")
    backup: Path | None = None
    try:
        _write_weights_durable(tmp_w, tensors, {"format": FORMAT})
        fileio.write_text_durable(tmp_c, config_to_json(cfg))
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
                fileio.unlink_quietly(w_path)
            raise
        fileio.fsync_dir(target)
    finally:
        fileio.unlink_quietly(tmp_w)
        fileio.unlink_quietly(tmp_c)
        fileio.unlink_quietly(backup)


def _foreign(path: Path) -> bool | None:
    """Whether a safetensors file is some other tool's (its metadata lacks napari-unet's
    format); None when it cannot be read at all (a damaged file, which may be replaced)."""
    from .format import ModelFileError, read_metadata

    try:
        return read_metadata(path).get("format") != FORMAT
    except (ModelFileError, OSError):
        return None


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
        new = fileio.temp_folder(target.parent, f".{target.name}.new-", ".tmp")
    except OSError:
        return False
    try:
        write_folder_contents(new, tensors, cfg)
        fileio.replace_folder(target, new)
        new = None
    finally:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
    return True
