"""The corpus table of the Corpus page: one row per configured entry (file, folder or the sample
corpus) with format, size, text column (a combo of the file's columns), documents and status."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHeaderView, QLabel, QTableWidget,
                               QTableWidgetItem, QWidget)

from cpt_studio.engine.config import field_help
from cpt_studio.studio.config_form import ERROR_COLOR
from cpt_studio.studio.pages.corpus_widgets import format_size

COLUMNS = ("File", "Format", "Size", "Text column", "Documents", "Status")
WIDTHS = (180, 95, 70, 135, 80)
INSPECTING = "inspecting…"


class CorpusTable(QTableWidget):
    """Shows EntrySummary rows; emits text_column_chosen("" = detect) from a row's combo."""

    text_column_chosen = Signal(str)

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setTextElideMode(Qt.ElideRight)
        self.setWordWrap(False)
        self.verticalHeader().hide()
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Interactive)
        for col, width in enumerate(WIDTHS):
            self.setColumnWidth(col, width)
        header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.Stretch)

    def selected_rows(self) -> list[int]:
        return sorted({i.row() for i in self.selectedIndexes()})

    def show_rows(self, rows: list[tuple[str, list[str], object]], text_column: str) -> None:
        """rows: (label, paths, EntrySummary or None while inspecting); keeps the selection."""
        selected = self.selected_rows()
        self.setRowCount(len(rows))
        for row, (label, paths, summary) in enumerate(rows):
            name = QTableWidgetItem(label)
            name.setToolTip("\n".join(paths))
            self.setItem(row, 0, name)
            if summary is None:
                cells = ["…", "", "", INSPECTING]
            else:
                errors = summary.errors
                if errors:
                    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
                    status = f"✗ {errors[0].splitlines()[0]}{more}"
                else:
                    status = f"ok · {summary.characters:,} characters"
                cells = [summary.format, format_size(summary.size_bytes),
                         f"{summary.documents:,}", status]
            for col, text in zip((1, 2, 4, 5), cells):
                item = QTableWidgetItem(text)
                if col == 5 and summary is not None and summary.errors:
                    item.setForeground(QColor(ERROR_COLOR))
                    item.setToolTip("\n\n".join(summary.errors))
                self.setItem(row, col, item)
            self.setCellWidget(row, 3, self._column_combo(summary, text_column))
        for row in selected:
            if row < len(rows):
                self.selectRow(row)

    def _column_combo(self, summary, text_column: str) -> QWidget:
        if summary is None or not summary.columns:
            return QLabel(" —")
        combo = QComboBox()
        combo.setToolTip(field_help("data", "text_column") + "\nOne column name for all files.")
        detected = summary.text_column if not text_column else ""
        combo.addItem(f"auto ({detected})" if detected else "auto", "")
        for column in summary.columns:
            combo.addItem(column, column)
        index = combo.findData(text_column)
        if index < 0 and text_column:
            combo.addItem(f"{text_column} (missing)", text_column)
            index = combo.count() - 1
        combo.setCurrentIndex(max(index, 0))
        combo.currentIndexChanged.connect(self._on_column_chosen)
        return combo

    def _on_column_chosen(self, _index: int) -> None:
        combo = self.sender()
        if isinstance(combo, QComboBox):
            self.text_column_chosen.emit(combo.currentData() or "")
