"""The "Base model" box of the Model page: one row per kind of source (built in, local folder,
.gguf file, hub id, past run / adapter) and a list of this workspace's runs that saved an adapter.

It only picks a string for `model.source`; the Model page resolves it.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QComboBox, QFileDialog, QGridLayout, QGroupBox,
                               QLabel, QLineEdit, QPushButton, QRadioButton)

from cpt_studio.engine.config import field_help
from cpt_studio.engine.errors import CptError

BUILTIN_LABEL = "SmolLM2-135M (built in)"
KINDS = ("builtin", "folder", "gguf", "hub", "adapter")


def guess_kind(source: str) -> str:
    """Which picker row a config's model.source belongs to."""
    if not source:
        return "builtin"
    path = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        return "gguf"
    if path.is_dir():
        adapter = (path / "adapter_config.json").is_file() or (path / "adapter").is_dir() \
            or (path / "config.yaml").is_file()
        return "adapter" if adapter else "folder"
    return "hub" if not path.is_absolute() and source.count("/") == 1 else "folder"


class SourcePicker(QGroupBox):
    """Radio rows with their path / id fields; emits source_chosen(source) on a user's pick."""

    source_chosen = Signal(str)

    def __init__(self, parent=None):
        super().__init__("Base model", parent)
        self.setToolTip(field_help("model", "source"))
        self.workspace_root = ""
        self.radios: dict[str, QRadioButton] = {}
        self.edits: dict[str, QLineEdit] = {k: QLineEdit() for k in KINDS[1:]}
        self.edits["hub"].setPlaceholderText("e.g. HuggingFaceTB/SmolLM2-360M (needs a connection)")
        self.edits["adapter"].setPlaceholderText("a run, adapter or checkpoint folder")
        self.group = QButtonGroup(self)
        self.runs_combo = QComboBox()
        self.runs_combo.setToolTip("Past runs of this workspace that saved an adapter or checkpoint.")
        self.runs_combo.activated.connect(self._on_run_chosen)
        grid = QGridLayout(self)
        rows = [("builtin", BUILTIN_LABEL, None), ("folder", "Local folder", self._browse_folder),
                ("gguf", ".gguf file", self._browse_gguf), ("hub", "Hub id", None),
                ("adapter", "Past run / adapter", self._browse_adapter)]
        for row, (kind, text, browse) in enumerate(rows):
            radio = QRadioButton(text)
            self.radios[kind] = radio
            self.group.addButton(radio)
            radio.toggled.connect(self._emit_current)
            grid.addWidget(radio, row, 0)
            if kind in self.edits:
                self.edits[kind].editingFinished.connect(self._emit_current)
                grid.addWidget(self.edits[kind], row, 1)
            if browse is not None:
                button = QPushButton("Browse…")
                button.clicked.connect(browse)
                grid.addWidget(button, row, 2)
        grid.addWidget(QLabel("or a run:"), len(rows), 0, Qt.AlignRight)
        grid.addWidget(self.runs_combo, len(rows), 1, 1, 2)
        grid.setColumnStretch(1, 1)
        self.radios["builtin"].setChecked(True)

    def current_kind(self) -> str:
        return next((k for k, r in self.radios.items() if r.isChecked()), "builtin")

    def current_source(self) -> str | None:
        """The source of the checked row; None while that row has no path / id yet."""
        kind = self.current_kind()
        if kind == "builtin":
            return ""
        return self.edits[kind].text().strip() or None

    def choose(self, kind: str, source: str = "") -> None:
        """Check a row (with its path / id) and emit it, as a user's pick would."""
        if kind in self.edits and source:
            self.edits[kind].setText(source)
        self._check(kind)
        self._emit_current()

    def show_source(self, source: str) -> None:
        """Show a configured source (loaded config) without emitting."""
        kind = guess_kind(source)
        if kind in self.edits and self.edits[kind].text() != source:
            self.edits[kind].setText(source)
        self._check(kind)

    def _check(self, kind: str) -> None:
        for radio in self.radios.values():
            radio.blockSignals(True)
        self.radios[kind].setChecked(True)
        for radio in self.radios.values():
            radio.blockSignals(False)

    def _emit_current(self, *_args) -> None:
        source = self.current_source()
        if source is not None:
            self.source_chosen.emit(source)

    def refresh_runs(self, workspace) -> None:
        """List the workspace's runs that saved an adapter or a checkpoint (newest first)."""
        from cpt_studio.engine.model.source import latest_run_adapter
        self.workspace_root = str(workspace.root)
        self.runs_combo.clear()
        self.runs_combo.addItem("(pick a past run)", "")
        try:
            runs = workspace.list_runs()
        except (CptError, OSError):
            runs = []
        for run in reversed(runs):
            if latest_run_adapter(run.path) is not None:
                self.runs_combo.addItem(f"{run.name}  ({run.id})", str(run.path))
        self.runs_combo.setEnabled(self.runs_combo.count() > 1)

    def _on_run_chosen(self, index: int) -> None:
        path = self.runs_combo.itemData(index)
        if path:
            self.choose("adapter", path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Hugging Face model folder")
        if path:
            self.choose("folder", path)

    def _browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "GGUF model file", "", "GGUF (*.gguf)")
        if path:
            self.choose("gguf", path)

    def _browse_adapter(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Run, adapter or checkpoint folder",
                                                self.workspace_root)
        if path:
            self.choose("adapter", path)
