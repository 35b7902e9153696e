"""The registry of named, versioned models: ``<root>/<name>/v0001``, ``v0002``...

Every save adds a version and never overwrites one; a version folder is an ordinary model
folder (:mod:`napari_unet.format`). :func:`default_root` says where the registry lives,
:func:`validate_name` which names it accepts, :class:`ModelInfo` what the model list shows.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fileio
from .config import ModelConfig
from .format import VERSION_RE, ModelFileError, PathLike, load_model, read_config
from .save import prepare_config, prepare_tensors, write_folder_contents

if TYPE_CHECKING:
    import torch

__all__ = ["ModelInfo", "ModelRegistry", "default_root", "validate_name"]

logger = logging.getLogger(__name__)

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}
_FORBIDDEN_NAME_CHARS = set('<>:"/\\|?*')
_MAX_NAME_LENGTH = 100
#: A registry's half-written version older than this is a crashed save's, and is swept.
_STALE_PARTIAL_S = 600.0


def _now_iso() -> str:
    """Return the current local time as an ISO 8601 string with UTC offset."""
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


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

        The fields are read as :class:`~napari_unet.config.ModelConfig` types them
        (:meth:`~napari_unet.schema.Section.peek`); a missing or mistyped one gets its
        default there. ``created`` falls back to the folder's modification time.
        """
        f = ModelConfig.peek(config, "created", "task", "trained_on", "val_score")
        return cls(
            name=name,
            version=version,
            path=path,
            created=f["created"] or _mtime_iso(path),
            task=f["task"],
            trained_on=f["trained_on"],
            val_score=f["val_score"],
            config=config,
        )


def _mtime_iso(path: Path) -> str:
    """The modification time of ``path`` as local ISO 8601, or "" when it cannot be read."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return ""
    return _dt.datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds")


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
            (int(m.group(1)), e) for e in entries if (m := VERSION_RE.match(e.name)) and e.is_dir()
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
        tensors = prepare_tensors(state_dict)
        cfg = prepare_config(config)
        cfg["created"] = _now_iso()
        model_dir.mkdir(parents=True, exist_ok=True)
        # versions half-written by crashed saves (old enough not to be another writer's)
        fileio.sweep_older(model_dir.glob(".tmp-*.partial"), _STALE_PARTIAL_S)
        tmpdir = fileio.temp_folder(model_dir, ".tmp-", ".partial")
        try:
            write_folder_contents(tmpdir, tensors, cfg)
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
            fileio.fsync_dir(model_dir)
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
        number = int(VERSION_RE.match(vdir.name).group(1))  # type: ignore[union-attr]
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
        fileio.fsync_dir(self.root)

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
