"""LoRA target-module checkboxes built from the described model's own Linear module names.

All boxes checked is written as `adapter.target_modules = []` (= every Linear in the decoder
layers), so a config stays valid for another model of the same family.
"""
from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QGridLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from cpt_studio.engine.config import field_help

COLUMNS = 3


class TargetModulesBox(QGroupBox):
    """Checkboxes for `adapter.target_modules`, from `state.model_info.linear_module_names`."""

    def __init__(self, state, parent=None):
        super().__init__("LoRA target modules", parent)
        self.state = state
        self.setToolTip(field_help("adapter", "target_modules"))
        self.boxes: dict[str, QCheckBox] = {}
        self._model_names: list[str] = []
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.grid_holder = QWidget()
        self.grid = QGridLayout(self.grid_holder)
        self.grid.setContentsMargins(0, 0, 0, 0)
        layout = QVBoxLayout(self)
        layout.addWidget(self.grid_holder)
        layout.addWidget(self.note)
        self.refresh()

    def checked(self) -> list[str]:
        return [name for name, box in self.boxes.items() if box.isChecked()]

    def refresh(self) -> None:
        """Rebuild the boxes when the model changed; re-check them from the config."""
        info = getattr(self.state, "model_info", None)
        model_names = [str(n) for n in (info.linear_module_names if info is not None else ())]
        config_names = list(self.state.config.adapter.target_modules)
        names = model_names + [n for n in config_names if n not in model_names]
        if model_names != self._model_names or list(self.boxes) != names:
            self._model_names = model_names
            self._rebuild(names)
        wanted = set(config_names) if config_names else set(model_names)
        for name, box in self.boxes.items():
            blocked = box.blockSignals(True)
            box.setChecked(name in wanted)
            box.blockSignals(blocked)
        self._update_note(config_names)

    def _rebuild(self, names: list[str]) -> None:
        for box in self.boxes.values():
            box.setParent(None)
            box.deleteLater()
        self.boxes = {}
        for i, name in enumerate(names):
            box = QCheckBox(name)
            if name not in self._model_names:
                box.setToolTip("Not a Linear module of the described model.")
                box.setStyleSheet("color: #c62828;")
            box.toggled.connect(self._on_toggled)
            self.grid.addWidget(box, i // COLUMNS, i % COLUMNS)
            self.boxes[name] = box

    def _on_toggled(self, _checked: bool) -> None:
        chosen = self.checked()
        if not chosen:               # an empty list would mean "all": keep at least one
            box = self.sender()
            if isinstance(box, QCheckBox):
                box.blockSignals(True)
                box.setChecked(True)
                box.blockSignals(False)
            self.note.setText("Keep at least one module (all checked = every Linear module).")
            return
        value = [] if self._model_names and set(chosen) == set(self._model_names) else chosen
        self.state.set_field("adapter", "target_modules", value)

    def _update_note(self, config_names: list[str]) -> None:
        if not self._model_names:
            current = ", ".join(config_names) if config_names else "every Linear module"
            self.note.setText("Describe a model on the Model page to list its Linear modules.\n"
                              f"Now: {current}.")
        elif not config_names:
            self.note.setText("All checked: LoRA on every Linear module of the decoder layers.")
        else:
            self.note.setText(f"LoRA on {len(config_names)} of {len(self._model_names)} module kinds.")
