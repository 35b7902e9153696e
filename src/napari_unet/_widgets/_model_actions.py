"""The Models widget's registry actions: load, save as, rename, delete, roll back, new.

Each is a plain method that tests and scripts call directly; errors become a napari error
notification carrying the core's plain message. A part of :class:`~.models.ModelManagerWidget`.
"""

from __future__ import annotations

from typing import Any

from napari.utils.notifications import show_error, show_info

from ..segmenter import Segmenter
from ..store import ModelInfo
from . import _model_dialogs
from ._messages import user_message
from ._model_files import save_named
from ._model_table import Entry

__all__ = ["ModelActions"]


class ModelActions:
    """For :class:`~.models.ModelManagerWidget` (which provides ``session``, ``registry``,
    ``entry``, ``selected_entry``, ``selected_version``, ``refresh``, ``select``, the new-model
    inputs and ``_refuse_while_training``)."""

    # ------------------------------------------------------------------ target resolution
    def _target(self, name: str | None) -> Entry | None:
        """The entry ``name`` (registry name or ``"starter: nuclei"``) or the selected one."""
        if name is None:
            e = self.selected_entry()
            if e is None:
                show_error("select a model in the list first")
            return e
        e = self.entry(name)
        if e is None:
            self.refresh()
            e = self.entry(name)
        if e is None:
            show_error(f"no model named {name!r} in {self.registry.root}")
        return e

    def _version_for(self, e: Entry, name: str | None, version: int | None) -> int | None:
        if version is None and name is None and self.selected_entry() is e:
            version = self.selected_version()
        return version

    # ------------------------------------------------------------------ actions
    def load(self, name: str | None = None, version: int | None = None) -> bool:
        """Make a model the viewer's current model.

        Parameters
        ----------
        name
            Registry name or ``"starter: nuclei"``; the selected row when omitted.
        version
            Version number; the selected version (else the latest) when omitted.
        """
        e = self._target(name)
        if e is None or self._refuse_while_training():
            return False
        version = self._version_for(e, name, version)
        try:
            if e.starter:
                seg = Segmenter.pretrained(e.name)
            else:
                seg = Segmenter.load(self.registry.path(e.name, version))
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            self.refresh()
            return False
        self.session.set_segmenter(seg, e.name)  # emits model_changed -> refresh
        which = "starter" if e.starter else f"v{version}" if version is not None else "latest"
        show_info(f"model {e.name!r} ({which}) loaded")
        self.select(e.name if not e.starter else f"starter: {e.name}", version)
        return True

    def save_as(self, name: str) -> ModelInfo | None:
        """Save the model in use under ``name`` (a new version if it exists) and use that name."""
        if self._refuse_while_training():
            return None
        try:
            seg = self.session.segmenter
            info = save_named(self.registry, seg, name)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return None
        self.session.set_segmenter(seg, name)  # renames it in the session, tells the widgets
        show_info(f"saved as {name!r} v{info.version}")
        self.refresh()
        self.select(name, info.version)
        return info

    def rename(self, new_name: str, old: str | None = None) -> bool:
        """Rename a registry model (the selected one by default), all its versions."""
        e = self._target(old)
        if e is None:
            return False
        if e.starter:
            show_error("the starter model cannot be renamed; load it and use 'Save as…'")
            return False
        in_use = self.session.model_name == e.name
        if in_use and self._refuse_while_training():
            return False
        try:
            self.registry.rename(e.name, new_name)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return False
        if in_use:
            self.session.set_segmenter(self.session.segmenter, new_name)
        self.refresh()
        self.select(new_name)
        return True

    def delete(self, name: str | None = None, *, confirm: bool = False) -> bool:
        """Delete a registry model and all its versions (the selected one by default).

        With ``confirm=True`` the user is asked first. The model in use stays loaded.
        """
        e = self._target(name)
        if e is None:
            return False
        if e.starter:
            show_error("the starter model ships with napari-unet and cannot be deleted")
            return False
        if confirm:
            try:
                n = len(self.registry.versions(e.name))
            except Exception as err:  # noqa: BLE001 - gone meanwhile
                show_error(user_message(err))
                self.refresh()
                return False
            if not _model_dialogs.ask_yes_no(
                self,
                "Delete model",
                f"Delete the model {e.name!r} and its {n} version(s) from disk? "
                "This cannot be undone.",
            ):
                return False
        try:
            self.registry.delete(e.name)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            self.refresh()
            return False
        extra = (
            " (it stays loaded in this viewer until you load another)"
            if (self.session.model_name == e.name)
            else ""
        )
        show_info(f"model {e.name!r} deleted{extra}")
        self.refresh()
        return True

    def rollback(self, version: int | None = None, name: str | None = None) -> ModelInfo | None:
        """Copy an older version as the newest one (history is kept) and load it."""
        e = self._target(name)
        if e is None:
            return None
        if e.starter:
            show_error("the starter model has no versions to roll back to")
            return None
        version = self._version_for(e, name, version)
        if version is None:
            show_error("select the version to roll back to in the versions list")
            return None
        if self._refuse_while_training():
            return None
        try:
            info = self.registry.rollback(e.name, version)
            seg = Segmenter.load(info.path)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            self.refresh()
            return None
        self.session.set_segmenter(seg, e.name)
        show_info(f"{e.name!r} rolled back to v{version} (saved as v{info.version}) and loaded")
        self.refresh()
        self.select(e.name, info.version)
        return info

    def new_model(
        self,
        task: str | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        name: str | None = None,
        **network: Any,
    ) -> Segmenter | None:
        """Use a new untrained model (not saved until trained or 'Save as…').

        ``task``/``channels``/``num_classes`` default to the widget's inputs; ``network`` goes to
        :meth:`Segmenter.new` (e.g. ``base_channels``, ``depth``, ``ndim``).
        """
        if self._refuse_while_training():
            return None
        task = task or self.task_combo.currentText()
        channels = channels or self.channels_spin.value()
        num_classes = num_classes or self.classes_spin.value()
        if name is None:
            name, k = "untitled", 2
            while self.registry.exists(name):
                name, k = f"untitled {k}", k + 1
        try:
            seg = Segmenter.new(task, channels, num_classes=num_classes, name=name, **network)
        except Exception as err:  # noqa: BLE001
            show_error(user_message(err))
            return None
        self.session.set_segmenter(seg, name)
        show_info(f"new untrained {task} model {name!r} ({channels} channel(s)) in use")
        return seg
