"""Small pieces of the Run page: the failure banner, the sample-generations view and the log view."""
from __future__ import annotations

import html
import time

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QTextEdit, QToolButton,
                               QVBoxLayout)


class Banner(QFrame):
    """A coloured strip above the charts: errors (message + hint) or notes; the user can close it."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("banner")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        row = QHBoxLayout(self)
        row.setContentsMargins(10, 6, 6, 6)
        col = QVBoxLayout()
        self.title = QLabel()
        self.title.setObjectName("bannerTitle")
        self.message = QLabel()
        self.hint = QLabel()
        for label in (self.title, self.message, self.hint):
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            col.addWidget(label)
        row.addLayout(col, 1)
        close = QToolButton(text="✕", autoRaise=True, toolTip="Hide this message")
        close.clicked.connect(self.hide)
        row.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.level = ""
        self.hide()

    def show_message(self, level: str, title: str, message: str = "", hint: str = "") -> None:
        """level: "error" (red) or "info"."""
        self.level = level
        self.setProperty("level", level)
        self.style().unpolish(self)
        self.style().polish(self)
        self.title.setText(title)
        self.message.setText(message)
        self.message.setVisible(bool(message))
        self.hint.setText(f"Hint: {hint}" if hint else "")
        self.hint.setVisible(bool(hint))
        self.show()

    def text(self) -> str:
        return "\n".join(l.text() for l in (self.title, self.message, self.hint) if l.text())


class SamplesView(QTextEdit):
    """Sample generations as they come: step, prompt (bold) and the model's continuation."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setPlaceholderText("Sample generations appear here at each eval (set prompts on the "
                                "Training page).")
        self.count = 0

    def add_sample(self, step: int, prompt: str, text: str) -> None:
        rest = text[len(prompt):] if text.startswith(prompt) else text
        self.append(f"<p><span style='color:gray'>step {step}</span><br><b>{html.escape(prompt)}</b>"
                    f"{html.escape(rest).replace(chr(10), '<br>')}</p>")
        self.count += 1
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def clear(self) -> None:
        super().clear()
        self.count = 0


class LogView(QPlainTextEdit):
    """The run's log; lines are buffered and written in one go by flush() (called by the page's timer)."""

    def __init__(self, max_lines: int = 5000, parent=None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(max_lines)
        self.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self._pending: list[str] = []

    def add(self, when: float, level: str, message: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        tag = "" if level == "info" else f"[{level}] "
        self._pending.append(f"{stamp}  {tag}{message}")

    def flush(self) -> None:
        if self._pending:
            self.appendPlainText("\n".join(self._pending))
            self._pending.clear()

    def clear(self) -> None:
        super().clear()
        self._pending.clear()
