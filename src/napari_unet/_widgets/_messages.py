"""What the widgets tell the user: plain failure messages and progress bars that repaint cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..runs import user_message

if TYPE_CHECKING:
    from qtpy.QtWidgets import QProgressBar, QWidget

__all__ = ["Failure", "user_message", "set_progress", "progress_bar"]


@dataclass
class Failure:
    """What a job returns instead of raising."""

    message: str


def set_progress(bar: QWidget, value: int) -> None:
    """``bar.setValue(value)`` without Qt's synchronous repaint.

    ``QProgressBar.setValue`` repaints at once, and in a window that holds napari's OpenGL
    canvas a synchronous repaint re-composes the whole window (~40 ms with software OpenGL).
    With updates off during the change, Qt schedules one ordinary (asynchronous) repaint.
    """
    bar.setUpdatesEnabled(False)
    try:
        bar.setValue(value)
    finally:
        bar.setUpdatesEnabled(True)


def progress_bar() -> QProgressBar:
    """A 0..1000 progress bar that shows its percentage."""
    from qtpy.QtWidgets import QProgressBar

    bar = QProgressBar()
    bar.setRange(0, 1000)
    bar.setValue(0)
    bar.setFormat("%p%")
    bar.setTextVisible(True)
    return bar
