"""The Models widget's file operations: import a model file, export one (a file, a folder or a
bioimage.io package). A part of :class:`~.models.ModelManagerWidget`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from ..segmenter import Segmenter
from ..store import ModelFileError, ModelInfo, save_model
from . import _model_dialogs
from ._messages import user_message

__all__ = ["ModelFiles", "save_named"]


def save_named(registry: Any, seg: Segmenter, name: str) -> ModelInfo:
    """``seg`` saved in ``registry`` as the newest version of ``name`` (seg itself unchanged)."""
    return registry.save(name, seg.net.state_dict(), {**seg.config, "name": name})


class ModelFiles:
    """Import and export, for :class:`~.models.ModelManagerWidget` (which provides
    ``session``, ``registry``, ``entry``, ``selected_entry``, ``refresh``, ``select`` and
    ``_version_for``)."""

    _export_worker: Any = None

    def import_path(self, path: str | Path, name: str | None = None) -> ModelInfo | None:
        """Add a model file or folder to the registry (under a free name) without using it."""
        p = Path(path)
        try:
            seg = Segmenter.load(p)
            base = name or self._import_name(p, seg.model_config.name)
            final = base
            if name is None:
                k = 2
                while self.registry.exists(final):
                    final = f"{base} (imported)" if k == 2 else f"{base} (imported {k - 1})"
                    k += 1
            info = save_named(self.registry, seg, final)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return None
        show_info(f"imported {p.name} as {final!r} v{info.version}")
        self.refresh()
        self.select(final, info.version)
        return info

    def _import_name(self, p: Path, config_name: str) -> str:
        """A usable registry name for an imported model: its config name, else its file name."""
        from ..store import validate_name

        if p.name == "config.json" or p.name == "weights.safetensors":
            stem = p.parent.name
        elif p.is_dir():
            stem = p.name
        else:
            stem = p.stem
        for cand in (config_name, stem, "imported"):
            if not isinstance(cand, str) or cand in ("", "untitled"):
                continue
            try:
                return validate_name(cand)
            except ValueError:
                continue
        return "imported"

    def export_path(
        self, path: str | Path, name: str | None = None, version: int | None = None
    ) -> Path | None:
        """Save a model to ``path`` (a ``.safetensors`` file, else a folder).

        Exports the named (or selected) registry model version, or the starter; with nothing
        selected and no name, the model in use.
        """
        try:
            e = self.entry(name) if name is not None else self.selected_entry()
            if name is not None and e is None:
                raise ModelFileError(f"no model named {name!r} in {self.registry.root}")
            if e is None:
                seg = self.session.segmenter
                config = dict(seg.config)
                config["name"] = self.session.model_name
                out = save_model(path, seg.net.state_dict(), config)
                what = f"the model in use ({self.session.model_name!r})"
            elif e.starter:
                out = Segmenter.pretrained(e.name).save(path)
                what = f"the starter model {e.name!r}"
            else:
                version = self._version_for(e, name, version)
                state, config = self.registry.load(e.name, version)
                config = {k: v for k, v in config.items() if k not in ("format", "format_version")}
                config["name"] = e.name
                out = save_model(path, state, config)
                what = f"{e.name!r} " + (f"v{version}" if version is not None else "(latest)")
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return None
        show_info(f"exported {what} to {out}")
        return Path(out)

    def _ask_import(self, *_: Any) -> None:
        path = _model_dialogs.ask_open_path(self)
        if path:
            self.import_path(path)

    def _ask_export(self, *_: Any) -> None:
        e = self.selected_entry()
        suggested = (e.name if e is not None else self.session.model_name) + ".safetensors"
        path = _model_dialogs.ask_save_path(self, suggested)
        if path:
            self.export_path(path)

    def _ask_export_bioimageio(self, *_: Any) -> None:
        e = self.selected_entry()
        suggested = (e.name if e is not None else self.session.model_name) + ".zip"
        path, _ = QFileDialog.getSaveFileName(
            self, "Export to bioimage.io (a .zip package)", suggested, "bioimage.io package (*.zip)"
        )
        if path:
            self.export_bioimageio(path if path.lower().endswith(".zip") else path + ".zip")

    def export_bioimageio(self, path: str | Path, name: str | None = None, version=None):
        """Write a bioimage.io package in a thread worker (a progress bar per step).

        The file dialog has already asked before replacing a file, so ``path`` is overwritten.
        Returns the started worker, or None when the model cannot be read.
        """
        from napari.qt.threading import create_worker

        from .. import bioimageio

        try:
            e = self.entry(name) if name is not None else self.selected_entry()
            if e is None:
                seg = self.session.segmenter.copy()
                seg.config["name"] = self.session.model_name
            elif e.starter:
                seg = Segmenter.pretrained(e.name)
            else:
                found = self.registry.path(e.name, self._version_for(e, name, version))
                seg = Segmenter.load(found)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return None
        worker = create_worker(
            bioimageio.export_iter,
            seg,
            path,
            overwrite=True,
            _progress={"total": 6, "desc": "Export to bioimage.io"},
            _start_thread=False,
        )
        worker.returned.connect(_exported)
        worker.errored.connect(_export_failed)
        self._export_worker = worker
        worker.start()
        return worker


def _exported(path: Path) -> None:
    show_info(f"bioimage.io package written: {path} (check it with: bioimageio test {path})")


def _export_failed(err: BaseException) -> None:
    show_error(user_message(err))
