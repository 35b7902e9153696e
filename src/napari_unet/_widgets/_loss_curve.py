"""The Train widget's loss curve: loss per step and validation F1, painted with QPainter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QWidget

if TYPE_CHECKING:
    from ..training import TrainProgress

__all__ = ["LossCurve"]


class LossCurve(QWidget):
    """Loss per step (blue line, left scale) and validation F1 (orange dots, 0..1 right scale).

    Painted with QPainter: a repaint of 1,000 steps costs ~2.7 ms, so the curve never stalls
    the event loop (a matplotlib canvas took ~180 ms per redraw here, the largest GUI stall
    while training). :meth:`add` only records; the owner calls :meth:`draw_now` (the Train
    widget does, with the progress bar, every ``UPDATE_MS``).
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.vals: list[float] = []
        self.setMinimumHeight(120)
        self.draws = 0
        self.show_val = False  # a hold-out gives validation F1 points (set by the owner)

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.val_steps.clear()
        self.vals.clear()
        self.draw_now()

    def add(self, p: TrainProgress) -> None:
        if p.loss is not None and np.isfinite(p.loss):
            self.steps.append(p.step)
            self.losses.append(float(p.loss))
        if p.val_f1 is not None and (not self.vals or p.val_f1 != self.vals[-1] or p.done):
            self.val_steps.append(p.step)
            self.vals.append(float(p.val_f1))

    def caption(self, x_max: int) -> str:
        """The line under the plot: names only the curves that are drawn."""
        text = f"step {x_max}   loss (blue)"
        if self.show_val or self.vals:
            text += "   val F1 (orange, 0..1)"
        return text

    def draw_now(self) -> None:
        self.draws += 1
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        from qtpy.QtCore import QPointF, QRectF, Qt
        from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF

        qp = QPainter(self)
        try:
            qp.setRenderHint(QPainter.RenderHint.Antialiasing)
            fg = self.palette().color(self.foregroundRole())
            left, right, top, bottom = 40, 34, 8, 18
            plot = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
            qp.setPen(QPen(fg, 1))
            qp.drawRect(plot)
            font = qp.font()
            font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
            qp.setFont(font)
            if not self.steps and not self.vals:
                qp.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss curve (during training)")
                return
            x_max = max(self.steps[-1] if self.steps else 1, self.val_steps[-1] if self.vals else 1)
            lo, hi = (min(self.losses), max(self.losses)) if self.losses else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1.0

            def px(step: float) -> float:
                return plot.left() + plot.width() * step / max(x_max, 1)

            def py(value: float, v0: float, v1: float) -> float:
                return plot.bottom() - plot.height() * (value - v0) / (v1 - v0)

            qp.drawText(QRectF(0, top - 6, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{hi:.3g}")
            qp.drawText(
                QRectF(0, plot.bottom() - 8, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{lo:.3g}"
            )
            qp.drawText(
                QRectF(plot.left(), plot.bottom() + 2, plot.width(), 14),
                Qt.AlignmentFlag.AlignCenter,
                self.caption(x_max),
            )
            if len(self.steps) > 1:
                # at most ~2 points per pixel column: drawing stays cheap on long runs
                stride = max(1, len(self.steps) // max(1, int(plot.width()) * 2))
                poly = QPolygonF(
                    [
                        QPointF(px(st), py(v, lo, hi))
                        for st, v in zip(self.steps[::stride], self.losses[::stride], strict=True)
                    ]
                )
                qp.setPen(QPen(QColor(31, 119, 180), 1.5))
                qp.drawPolyline(poly)
            if self.vals:
                qp.setPen(QPen(QColor(255, 127, 14), 1))
                qp.setBrush(QColor(255, 127, 14))
                for st, v in zip(self.val_steps, self.vals, strict=True):
                    qp.drawEllipse(QPointF(px(st), py(v, 0.0, 1.0)), 2.5, 2.5)
                qp.drawText(
                    QRectF(plot.right() + 3, top - 6, right, 14), Qt.AlignmentFlag.AlignLeft, "1"
                )
                qp.drawText(
                    QRectF(plot.right() + 3, plot.bottom() - 8, right, 14),
                    Qt.AlignmentFlag.AlignLeft,
                    "0",
                )
        finally:
            qp.end()
