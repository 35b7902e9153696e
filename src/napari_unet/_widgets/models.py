"""Models dock widget: list, load, save, rename, delete, roll back, import and export models.

Thin: every operation is one call into :class:`~napari_unet.store.ModelRegistry` or
:class:`~napari_unet.segmenter.Segmenter` (quick file operations, run on the GUI thread). The
model it loads becomes the current model of the viewer's :class:`~._session.Session`, shared with
the Predict and Train widgets.

Each button asks its question (name, confirmation, path) with a small modal dialog, then calls a
plain method (:meth:`ModelManagerWidget.save_as`, :meth:`~ModelManagerWidget.rename`,
:meth:`~ModelManagerWidget.delete`, :meth:`~ModelManagerWidget.import_path` ...) that tests and
scripts can call directly. Errors never escape: they become a napari error notification carrying
the core's plain message.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QGridLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..segmenter import TASKS
from ..store import ModelFileError, ModelInfo, read_config
from . import _layers, _model_dialogs
from ._launch import TabsWithSiblings
from ._messages import user_message
from ._model_actions import ModelActions
from ._model_dialogs import ask_open_path, ask_save_path, ask_text, ask_yes_no  # noqa: F401
from ._model_files import ModelFiles
from ._model_table import (  # noqa: F401 - the names of before the split
    MODEL_COLUMNS,
    VERSION_COLUMNS,
    Entry,
    _item,
    _table,
    fill_models,
    fill_versions,
    steps_trained,
)
from ._session import STARTERS, session_for

if TYPE_CHECKING:
    import napari

__all__ = ["ModelManagerWidget", "STARTER"]

logger = logging.getLogger(__name__)

#: Name of the 2D starter model shipped with the package (read-only); the one for volumes is
#: ``_session.STARTERS["volume"]``.
STARTER = STARTERS["image"]


def _starter_entries() -> list[Entry]:
    """The shipped starter models whose files are there and readable (no weights loaded)."""
    from importlib import resources

    out = []
    for name in dict.fromkeys(STARTERS.values()):
        try:
            root = resources.files("napari_unet") / "models" / name
            if not root.is_dir():
                continue
            with resources.as_file(root) as p:
                config = read_config(p)
        except Exception as e:  # noqa: BLE001 - a broken starter is simply not offered
            logger.debug("no usable starter model %r: %s", name, e)
            continue
        out.append(Entry(name, True, None, config))
    return out


# ----------------------------------------------------------------------------- widget
class ModelManagerWidget(TabsWithSiblings, ModelActions, ModelFiles, QWidget):
    """The viewer's saved models: pick one to use, manage names and versions, share files."""

    # emitted by the session listener; a queued delivery when the session emits off the GUI thread
    _refresh_requested = Signal()

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        viewer = _layers.unwrap_viewer(napari_viewer)
        # only a weak link to the viewer: this widget may be referenced after the viewer closed
        # (tests, scripts) and must not keep the viewer's Qt objects alive
        self._viewer_ref = weakref.ref(viewer)
        self.session = session_for(viewer)
        self._closed = False
        self._entries: list[Entry] = []
        self._versions: list[ModelInfo] = []

        self._build()
        self._lay_out()
        self.table.itemSelectionChanged.connect(self._on_model_selected)
        self.versions_table.itemSelectionChanged.connect(self._update_buttons)
        # bound methods only (no lambdas holding self): the widget must not outlive the viewer
        self.table.itemDoubleClicked.connect(self._load_clicked)
        self.load_button.clicked.connect(self._load_clicked)
        self.save_as_button.clicked.connect(self._ask_save_as)
        self.rename_button.clicked.connect(self._ask_rename)
        self.delete_button.clicked.connect(self._delete_clicked)
        self.rollback_button.clicked.connect(self._rollback_clicked)
        self.import_button.clicked.connect(self._ask_import)
        self.export_button.clicked.connect(self._ask_export)
        self.bioimageio_button.clicked.connect(self._ask_export_bioimageio)
        self.refresh_button.clicked.connect(self._refresh_clicked)
        self.new_button.clicked.connect(self._new_clicked)
        self.task_combo.currentTextChanged.connect(self._update_new_inputs)
        self._refresh_requested.connect(self.refresh)
        self.session.model_changed.connect(self._on_model_changed)
        self._update_new_inputs()
        self.refresh()

    def _build(self) -> None:
        self.in_use_label = QLabel()
        self.in_use_label.setWordWrap(True)
        self.table = _table(MODEL_COLUMNS)
        self.versions_label = QLabel("Versions")
        self.versions_table = _table(VERSION_COLUMNS)
        self.load_button = _button("Load", "use the selected model (version) in this viewer")
        self.save_as_button = _button(
            "Save as…", "save the model in use under a name (adds a version)"
        )
        self.rename_button = _button("Rename…")
        self.delete_button = _button("Delete", "delete the selected model and all its versions")
        self.rollback_button = _button(
            "Roll back",
            "copy the selected version as the newest version (history is kept) and use it",
        )
        self.import_button = _button(
            "Import file…",
            "add a model file to the list: a .safetensors file or the config.json of a model "
            "folder",
        )
        self.export_button = _button(
            "Export…",
            "save the selected model version (or the model in use when nothing is selected) "
            "to a file or folder",
        )
        self.bioimageio_button = _button(
            "Export to bioimage.io…",
            "write the selected model (or the model in use) as a bioimage.io package (.zip)",
        )
        self.refresh_button = _button("Refresh")
        self.new_button = _button(
            "New untrained", "start from an untrained model (not saved until trained)"
        )
        self.task_combo = QComboBox()
        self.task_combo.addItems(TASKS)
        self.task_combo.setToolTip(
            "instance: separate objects with ids; semantic: a class per pixel"
        )
        self.channels_spin = QSpinBox()
        self.channels_spin.setRange(1, 64)
        self.channels_spin.setToolTip("image channels the new model takes (1 = grey, 3 = RGB)")
        self.classes_spin = QSpinBox()
        self.classes_spin.setRange(2, 255)
        self.classes_spin.setToolTip("classes of a semantic model, background included")

    def _lay_out(self) -> None:
        grid = QGridLayout()
        buttons = (
            self.load_button,
            self.save_as_button,
            self.rename_button,
            self.delete_button,
            self.rollback_button,
            self.import_button,
            self.export_button,
            self.refresh_button,
        )
        for i, b in enumerate(buttons):
            grid.addWidget(b, i // 4, i % 4)
        new_row = QGridLayout()
        new_row.addWidget(self.new_button, 0, 0, 1, 2)
        new_row.addWidget(self.task_combo, 0, 2, 1, 2)
        new_row.addWidget(QLabel("channels"), 1, 0, Qt.AlignmentFlag.AlignRight)
        new_row.addWidget(self.channels_spin, 1, 1)
        new_row.addWidget(QLabel("classes"), 1, 2, Qt.AlignmentFlag.AlignRight)
        new_row.addWidget(self.classes_spin, 1, 3)
        layout = QVBoxLayout(self)
        layout.addWidget(self.in_use_label)
        layout.addWidget(self.table, 3)
        layout.addWidget(self.versions_label)
        layout.addWidget(self.versions_table, 2)
        layout.addLayout(grid)
        layout.addWidget(self.bioimageio_button)
        layout.addLayout(new_row)

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop listening to the session (widget closed).

        Not required for correctness: the session holds this widget only weakly, and a call
        after the Qt widget is gone is caught in :meth:`_on_model_changed`.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.session.model_changed.disconnect(self._on_model_changed)
        except Exception:  # noqa: BLE001 - already disconnected
            pass

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)

    def _on_model_changed(self, *_: Any) -> None:
        if self._closed:
            return
        try:
            self._refresh_requested.emit()
        except RuntimeError:  # the Qt widget is gone
            self._closed = True

    # ------------------------------------------------------------------ reading state
    @property
    def viewer(self) -> napari.Viewer | None:
        """The viewer this widget belongs to (None once it is gone)."""
        return self._viewer_ref()

    @property
    def registry(self):
        return self.session.registry

    def model_names(self) -> list[str]:
        """Names in the models table, in order (the starter is ``"starter: nuclei"``)."""
        return [f"starter: {e.name}" if e.starter else e.name for e in self._entries]

    def entry(self, name: str) -> Entry | None:
        """The registry row ``name`` (or the starter row for ``"starter: nuclei"``)."""
        for e in self._entries:
            if (not e.starter and e.name == name) or (e.starter and name == f"starter: {e.name}"):
                return e
        return None

    def selected_entry(self) -> Entry | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        r = rows[0].row()
        return self._entries[r] if 0 <= r < len(self._entries) else None

    def selected_version(self) -> int | None:
        """Version number selected in the versions list (None: the latest)."""
        rows = self.versions_table.selectionModel().selectedRows()
        if not rows:
            return None
        r = rows[0].row()
        return self._versions[r].version if 0 <= r < len(self._versions) else None

    def versions_shown(self) -> list[int]:
        return [i.version for i in self._versions]

    def _in_use_key(self) -> tuple[bool, str] | None:
        """Which row is the session's model: the shipped starter while the session holds the
        one it picked itself (a registry model may share its name: a new session marked the
        user's trained 'nuclei' v4 as in use while it predicted with the starter), else the
        registry model of that name, else the starter."""
        name = self.session.model_name
        if getattr(self.session, "_auto", False) and any(
            e.starter and e.name == name for e in self._entries
        ):
            return (True, name)
        if any(not e.starter and e.name == name for e in self._entries):
            return (False, name)
        if any(e.starter and e.name == name for e in self._entries):
            return (True, name)
        return None

    def _training(self) -> bool:
        lock = getattr(self.session, "training_lock", None)
        return lock is not None and lock.locked()

    def _refuse_while_training(self) -> bool:
        if self._training():
            show_error(
                "a training is running in this viewer: stop it (or let it finish) before "
                "changing the model in use"
            )
            return True
        return False

    # ------------------------------------------------------------------ refresh
    def select(self, name: str, version: int | None = None) -> bool:
        """Select the row ``name`` (and a version in the versions list); False if not listed."""
        for r, e in enumerate(self._entries):
            if (not e.starter and e.name == name) or (e.starter and name == f"starter: {e.name}"):
                self.table.selectRow(r)
                self._fill_versions()
                if version is not None:
                    for vr, info in enumerate(self._versions):
                        if info.version == version:
                            self.versions_table.selectRow(vr)
                self._update_buttons()
                return True
        return False

    def refresh(self) -> None:
        """Re-read the registry and redraw both lists, keeping the selection when possible."""
        if self._closed:
            return
        try:
            self._refresh()
        except RuntimeError as e:  # the Qt widget was deleted under us
            if "deleted" in str(e):
                self._closed = True
                return
            show_error(user_message(e))
        except Exception as e:  # noqa: BLE001 - never let a redraw raise into Qt
            logger.exception("refreshing the models list failed")
            show_error(user_message(e))

    def _refresh(self) -> None:
        prev = self.selected_entry()
        prev_key = prev.key if prev is not None else None
        prev_version = self.selected_version()

        entries: list[Entry] = _starter_entries()
        entries += [Entry(i.name, False, i, i.config) for i in self.registry.list()]
        self._entries = entries

        try:
            seg = self.session.segmenter  # creates the default model on first use
            seg_text = f" ({seg.task}, {seg.in_channels} channel(s), {seg.ndim}D network)"
        except Exception as e:  # noqa: BLE001 - shown, not raised
            seg_text = f" (cannot be built: {user_message(e)})"
        in_use = self._in_use_key()
        name = self.session.model_name
        saved = "" if in_use is not None else " – not saved"
        starter_tag = " (starter)" if in_use is not None and in_use[0] else ""
        if starter_tag and any(not e.starter and e.name == name for e in entries):
            starter_tag = (
                f" (the built-in starter; your trained '{name}' is not loaded: select it and "
                "press Load to go on from it)"
            )
        self.in_use_label.setText(f"in use: {name}{starter_tag}{seg_text}{saved}")

        kept = fill_models(self.table, entries, in_use, prev_key)
        self._fill_versions(prev_version if kept else None)
        self._update_buttons()

    def _on_model_selected(self) -> None:
        self._fill_versions()
        self._update_buttons()

    def _fill_versions(self, keep_version: int | None = None) -> None:
        e = self.selected_entry()
        self._versions = []
        if e is None:
            self.versions_label.setText("Versions (select a model)")
        elif e.starter:
            self.versions_label.setText(f"Versions of starter: {e.name} (built-in, read-only)")
        else:
            try:
                self._versions = list(reversed(self.registry.versions(e.name)))
            except (ModelFileError, OSError, ValueError) as err:
                logger.info("cannot list versions of %s: %s", e.name, err)
            self.versions_label.setText(f"Versions of {e.name} (newest first)")
        fill_versions(self.versions_table, self._versions, keep_version)

    def _update_buttons(self) -> None:
        if self._closed:
            return
        e = self.selected_entry()
        registry_row = e is not None and not e.starter
        self.load_button.setEnabled(e is not None)
        self.rename_button.setEnabled(registry_row)
        self.delete_button.setEnabled(registry_row)
        self.rollback_button.setEnabled(registry_row and self.selected_version() is not None)

    def _update_new_inputs(self, *_: Any) -> None:
        self.classes_spin.setEnabled(self.task_combo.currentText() == "semantic")

    # ------------------------------------------------------------------ button dialogs
    def _load_clicked(self, *_: Any) -> None:
        self.load()

    def _delete_clicked(self, *_: Any) -> None:
        self.delete(confirm=True)

    def _rollback_clicked(self, *_: Any) -> None:
        self.rollback()

    def _refresh_clicked(self, *_: Any) -> None:
        self.refresh()

    def _ask_save_as(self, *_: Any) -> None:
        current = self.session.model_name
        name = _model_dialogs.ask_text(self, "Save model as", "Model name:", current)
        if not name:
            return
        if (
            name != current
            and self.registry.exists(name)
            and not _model_dialogs.ask_yes_no(
                self,
                "Model exists",
                f"A model named {name!r} exists. Add the model in use as its newest version?",
            )
        ):
            return
        self.save_as(name)

    def _ask_rename(self, *_: Any) -> None:
        e = self.selected_entry()
        if e is None or e.starter:
            return
        new = _model_dialogs.ask_text(self, "Rename model", f"New name for {e.name!r}:", e.name)
        if new and new != e.name:
            self.rename(new)

    def _new_clicked(self, *_: Any) -> None:
        self.new_model()


def _button(text: str, tip: str | None = None) -> QPushButton:
    b = QPushButton(text)
    if tip:
        b.setToolTip(tip)
    return b
