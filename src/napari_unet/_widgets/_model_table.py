"""The Models widget's two tables (models, versions of one model): their rows and cells."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ..config import ModelConfig
from ..store import ModelFileError

if TYPE_CHECKING:
    from ..store import ModelInfo

__all__ = ["Entry", "MODEL_COLUMNS", "VERSION_COLUMNS", "fill_models", "fill_versions"]

MODEL_COLUMNS = ("Name", "Version", "Task", "Val score", "Created", "Trained on")
VERSION_COLUMNS = ("Version", "Created", "Steps", "Val score", "Trained on")


def _short_time(iso: str | None) -> str:
    """``2024-05-01T12:34:56+02:00`` -> ``2024-05-01 12:34`` in local time; odd text as is."""
    if not iso:
        return "–"
    try:
        t = _dt.datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    if t.tzinfo is not None:
        t = t.astimezone()
    return t.strftime("%Y-%m-%d %H:%M")


def _short_list(names: list[str], keep: int = 2) -> str:
    if not names:
        return "–"
    shown = ", ".join(names[:keep])
    return shown if len(names) <= keep else f"{shown} +{len(names) - keep}"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _typed(config: dict[str, Any]) -> ModelConfig | None:
    """The typed config of a row (None for one this version cannot read)."""
    try:
        return ModelConfig.from_dict(config)
    except (ModelFileError, ValueError, TypeError):
        return None


def steps_trained(config: dict[str, Any]) -> int:
    """Total training steps recorded in a config's history."""
    typed = _typed(config)
    return sum(h.steps for h in typed.history) if typed is not None else 0


@dataclass
class Entry:
    """One row of the models table: a registry model (latest version) or the starter model."""

    name: str
    starter: bool
    info: ModelInfo | None  # latest version (registry) or None (starter)
    config: dict[str, Any]

    @property
    def key(self) -> tuple[bool, str]:
        return (self.starter, self.name)


def _item(text: str, tip: str | None = None) -> QTableWidgetItem:
    it = QTableWidgetItem(text)
    it.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
    if tip:
        it.setToolTip(tip)
    return it


def _table(columns: tuple[str, ...]) -> QTableWidget:
    t = QTableWidget(0, len(columns))
    t.setHorizontalHeaderLabels(list(columns))
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.verticalHeader().setVisible(False)
    t.setWordWrap(False)
    header = t.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    # "Trained on" comes last, takes the width that is left and elides its text (the whole
    # list is its tooltip): sized to its contents in the middle, it pushed the scores and
    # dates behind a horizontal scrollbar
    header.setSectionResizeMode(len(columns) - 1, QHeaderView.ResizeMode.Stretch)
    header.setMinimumSectionSize(40)
    t.setTextElideMode(Qt.TextElideMode.ElideRight)
    return t


def _bold(item: QTableWidgetItem) -> QTableWidgetItem:
    font = item.font()
    font.setBold(True)
    item.setFont(font)
    return item


def _model_cells(e: Entry, using: bool) -> list[QTableWidgetItem]:
    """The cells of a models row: name, version, task, score, created, trained on."""
    if e.starter:
        cfg = _typed(e.config)
        label, version = f"starter: {e.name}", "built-in"
        created = cfg.created if cfg is not None else None
        task = cfg.task if cfg is not None else None
        trained = list(cfg.trained_on) if cfg is not None else []
        score = cfg.val_score if cfg is not None else None
    else:
        assert e.info is not None
        label, version, created = e.name, f"v{e.info.version}", e.info.created
        task, trained, score = e.info.task, e.info.trained_on, e.info.val_score
    tip = "in use in this viewer" if using else None
    return [
        _item(("\u25cf " if using else "") + label, tip or label),
        _item(version),
        _item(str(task or "\u2013")),
        _item(_score(score)),
        _item(_short_time(created), str(created or "") or None),
        _item(_short_list(trained), "\n".join(trained) or None),
    ]


def fill_models(t: QTableWidget, entries: list[Entry], in_use, keep_key) -> bool:
    """One row per entry, the model in use in bold; the row of ``keep_key`` selected (True
    when it is still there)."""
    t.blockSignals(True)
    try:
        t.clearSelection()
        t.setRowCount(len(entries))
        select_row = None
        for r, e in enumerate(entries):
            using = in_use == e.key
            for c, it in enumerate(_model_cells(e, using)):
                t.setItem(r, c, _bold(it) if using else it)
            if e.key == keep_key:
                select_row = r
        if select_row is not None:
            t.selectRow(select_row)
    finally:
        t.blockSignals(False)
    return select_row is not None


def _version_cells(info: ModelInfo) -> list[QTableWidgetItem]:
    vtext = f"v{info.version}"
    cfg = _typed(info.config)
    if cfg is not None and cfg.rolled_back_from is not None:
        vtext += f" (copy of v{cfg.rolled_back_from})"
    return [
        _item(vtext),
        _item(_short_time(info.created), info.created or None),
        _item(str(steps_trained(info.config))),
        _item(_score(info.val_score)),
        _item(_short_list(info.trained_on, 3), "\n".join(info.trained_on) or None),
    ]


def fill_versions(vt: QTableWidget, versions: list[ModelInfo], keep_version: int | None) -> None:
    """One row per version (newest first); the row of ``keep_version`` selected."""
    vt.blockSignals(True)
    try:
        vt.clearSelection()
        vt.setRowCount(len(versions))
        for r, info in enumerate(versions):
            for c, it in enumerate(_version_cells(info)):
                vt.setItem(r, c, it)
            if info.version == keep_version:
                vt.selectRow(r)
    finally:
        vt.blockSignals(False)
