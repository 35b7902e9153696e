"""The Models widget's questions: small modal dialogs, each returning None when cancelled.

Module-level functions so that tests (and the buttons) can replace them.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QInputDialog, QMessageBox, QWidget

__all__ = ["ask_text", "ask_yes_no", "ask_open_path", "ask_save_path"]

_IMPORT_FILTER = "napari-unet models (*.safetensors config.json);;All files (*)"
_EXPORT_FILE_FILTER = "Single model file (*.safetensors)"
_EXPORT_FOLDER_FILTER = "Model folder (any name)"


def ask_text(parent: QWidget, title: str, label: str, text: str = "") -> str | None:
    value, ok = QInputDialog.getText(parent, title, label, text=text)
    return value.strip() if ok else None


def ask_yes_no(parent: QWidget, title: str, text: str) -> bool:
    yes, no = QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.No
    return QMessageBox.question(parent, title, text, yes | no, no) == yes


def ask_open_path(parent: QWidget) -> str | None:
    path, _ = QFileDialog.getOpenFileName(
        parent,
        "Import a model: a .safetensors file, or the config.json inside a model folder",
        "",
        _IMPORT_FILTER,
    )
    return path or None


def ask_save_path(parent: QWidget, suggested: str) -> str | None:
    path, chosen = QFileDialog.getSaveFileName(
        parent,
        "Export the model (a .safetensors file, or a folder with the folder filter)",
        suggested,
        f"{_EXPORT_FILE_FILTER};;{_EXPORT_FOLDER_FILTER}",
    )
    if not path:
        return None
    if chosen == _EXPORT_FILE_FILTER and Path(path).suffix.lower() != ".safetensors":
        path += ".safetensors"
    return path
