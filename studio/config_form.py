"""Editors for RunConfig fields, generated from the fields' metadata (help, choices, min, max).

    form = ConfigForm(state, parent=self)
    layout = QFormLayout()
    form.add_section("training", layout, skip={"embedding_learning_rate"})
    form.add_field("data.seq_len", layout)

Every editor writes through `state.set_field` as soon as its value changes and is refreshed from
`state.config` on `config_changed` (only when it differs, so typing is never interrupted). After
each change the whole config is checked with `engine.config.validate`; a field with a problem gets
a red outline and the message under it.
"""
from __future__ import annotations

import math
import typing

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QFrame, QLabel,
                               QLineEdit, QPlainTextEdit, QSpinBox, QVBoxLayout, QWidget)

from cpt_studio.engine.config import iter_fields, validate

INT_MAX = 2 ** 31 - 1
ERROR_COLOR = "#d9534f"

LABELS = {
    "adapter.r": "LoRA rank (r)",
    "adapter.alpha": "LoRA alpha",
    "adapter.rslora": "rsLoRA scaling",
    "adapter.embed_tokens": "embed_tokens",
    "adapter.lm_head": "lm_head",
    "training.max_grad_norm": "Clip grad norm",
    "training.epochs": "Epochs (when max steps = 0)",
    "training.log_every_steps": "Log every N steps",
    "eval.every_steps": "Eval every N steps",
    "eval.sample_every_steps": "Samples every N steps",
    "eval.sample_max_new_tokens": "Sample length (tokens)",
    "checkpoint.every_steps": "Save every N steps",
    "training.grad_accum": "Gradient accumulation",
    "data.seq_len": "Sequence length",
    "data.eval_fraction": "Eval split fraction",
    "model.trust_remote_code": "Trust remote code",
    "training.lora_optimizer": "LoRA optimizer",
    "training.embedding_weights": "Embedding precision",
    "training.sparse_embedding_grad": "Sparse embed_tokens grad",
    "training.defer_head_grad": "Defer lm_head grad",
    "training.stream_in_compute_dtype": "bf16 residual stream",
    "training.free_frozen_embeddings": "Free frozen originals",
    "training.unchecked_layers": "Layers not checkpointed",
}


def field_label(dotted: str) -> str:
    return LABELS.get(dotted) or dotted.rsplit(".", 1)[-1].replace("_", " ").capitalize()


def field_tooltip(f) -> str:
    meta = f.metadata
    text = meta.get("help", "")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None or hi is not None:
        text += f"\nAllowed: {lo if lo is not None else '…'} to {hi if hi is not None else '…'}."
    return text


class FloatSpinBox(QDoubleSpinBox):
    """A spin box for floats from 1e-8 to 1e6, shown compactly ('2e-04', '0.05')."""

    def __init__(self, parent=None, log_steps: bool = False):
        super().__init__(parent)
        self.log_steps = log_steps      # arrows double / halve (learning rates)
        self.setDecimals(12)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}".replace("e-0", "e-")
        return f"{value:.6g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        stripped = text.strip()
        try:
            value = float(stripped)
        except ValueError:
            ok = stripped == "" or stripped[-1] in "eE+-." or stripped == self.specialValueText()
            return (QValidator.Intermediate if ok else QValidator.Invalid), text, pos
        if math.isfinite(value) and self.minimum() <= value <= self.maximum():
            return QValidator.Acceptable, text, pos
        return QValidator.Intermediate, text, pos

    def stepBy(self, steps: int) -> None:
        # Learning rates move by factors, not by fixed increments.
        if self.log_steps and self.value() > 0:
            self.setValue(self.value() * (2.0 ** steps))
        elif self.log_steps:
            self.setValue(1e-5)
        else:
            super().stepBy(steps)


class FieldEditor(QObject):
    """One config field's widget with get/set in config terms."""

    changed = Signal()

    def __init__(self, dotted: str, f, tp, parent=None):
        super().__init__(parent)
        self.dotted, self.field = dotted, f
        self.section, _, self.name = dotted.rpartition(".")
        meta = f.metadata
        origin = typing.get_origin(tp)
        self.optional = origin is typing.Union
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] if self.optional else tp
        self.kind = "list" if (base is list or typing.get_origin(base) is list) else base.__name__
        if meta.get("choices"):
            self.kind = "choice"
        self.widget = self._build(base, meta)
        self.widget.setObjectName(dotted.replace(".", "__"))
        self.widget.setToolTip(field_tooltip(f))

    def _build(self, base, meta) -> QWidget:
        if self.kind == "choice":
            w = QComboBox()
            w.addItems([str(c) for c in meta["choices"]])
            w.currentTextChanged.connect(self.changed)
        elif self.kind == "bool":
            w = QCheckBox()
            w.toggled.connect(self.changed)
        elif self.kind == "int":
            w = QSpinBox()
            w.setKeyboardTracking(False)
            w.setRange(int(meta.get("min") or 0) if meta.get("min") is not None else -INT_MAX,
                       int(min(meta["max"], INT_MAX)) if meta.get("max") is not None else INT_MAX)
            w.setGroupSeparatorShown(True)
            w.valueChanged.connect(self.changed)
        elif self.kind == "float":
            w = FloatSpinBox(log_steps="learning_rate" in self.name)
            w.setSingleStep(0.01 if (meta.get("max") or 2) <= 1 else 1.0)
            w.setRange(meta["min"] if meta.get("min") is not None else -1e9,
                       meta["max"] if meta.get("max") is not None else 1e9)
            if self.optional:
                w.setSpecialValueText("auto")
            w.valueChanged.connect(self.changed)
        elif self.kind == "list":
            w = QPlainTextEdit()
            w.setPlaceholderText("one per line")
            w.setFixedHeight(72)
            w.textChanged.connect(self.changed)
        else:
            w = QLineEdit()
            w.textChanged.connect(self.changed)
        return w

    def get(self):
        w = self.widget
        if self.kind == "choice":
            return w.currentText()
        if self.kind == "bool":
            return w.isChecked()
        if self.kind in ("int", "float"):
            value = w.value()
            if self.optional and value == w.minimum():
                return None
            return value
        if self.kind == "list":
            return [line.strip() for line in w.toPlainText().splitlines() if line.strip()]
        return w.text()

    def set(self, value) -> None:
        if value == self.get():
            return
        w = self.widget
        blocked = w.blockSignals(True)
        try:
            if self.kind == "choice":
                w.setCurrentText(str(value))
            elif self.kind == "bool":
                w.setChecked(bool(value))
            elif self.kind in ("int", "float"):
                w.setValue(w.minimum() if value is None else value)
            elif self.kind == "list":
                w.setPlainText("\n".join(str(v) for v in value))
            else:
                w.setText(str(value))
        finally:
            w.blockSignals(blocked)


class ConfigForm(QObject):
    """Generates and binds editors for config fields; shows validation problems inline."""

    problems_changed = Signal(dict)

    def __init__(self, state, parent: QObject | None = None):
        super().__init__(parent)
        self.state = state
        self.editors: dict[str, FieldEditor] = {}
        self._error_labels: dict[str, QLabel] = {}
        self._frames: dict[str, QFrame] = {}
        self._fields = {name: (f, tp) for name, f, tp in iter_fields()}
        state.config_changed.connect(self.refresh)

    def add_section(self, section: str, layout: QFormLayout, skip=()) -> list[FieldEditor]:
        prefix = f"{section}." if section else ""
        names = [n for n in self._fields if n.startswith(prefix) and n.count(".") == prefix.count(".")]
        return [self.add_field(n, layout) for n in names if n.rsplit(".", 1)[-1] not in skip]

    def add_field(self, dotted: str, layout: QFormLayout | None = None,
                  label: str | None = None) -> FieldEditor:
        f, tp = self._fields[dotted]
        editor = FieldEditor(dotted, f, tp, self)
        self.editors[dotted] = editor
        editor.set(self._value(dotted))
        editor.changed.connect(self._on_editor_changed)
        if layout is not None:
            self.add_row(layout, dotted, editor.widget, label)
        return editor

    def add_row(self, layout: QFormLayout, dotted: str, widget: QWidget, label: str | None = None):
        """Put `widget` in `layout` with a label and an error line for field `dotted`."""
        holder = QWidget()
        box = QVBoxLayout(holder)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        # The red outline goes on a frame around the editor: a border style on a spin box itself
        # switches Qt to style-sheet drawing and mangles its arrow buttons.
        frame = QFrame()
        frame.setObjectName(dotted.replace(".", "__") + "__frame")
        inner = QVBoxLayout(frame)
        inner.setContentsMargins(1, 1, 1, 1)
        inner.addWidget(widget)
        self._frames[dotted] = frame
        box.addWidget(frame)
        error = QLabel()
        error.setStyleSheet(f"color: {ERROR_COLOR};")
        error.setWordWrap(True)
        error.hide()
        box.addWidget(error)
        self._error_labels[dotted] = error
        text = QLabel(label or field_label(dotted))
        f = self._fields.get(dotted)
        if f is not None:
            text.setToolTip(field_tooltip(f[0]))
        layout.addRow(text, holder)

    def _value(self, dotted: str):
        obj = self.state.config
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def _on_editor_changed(self) -> None:
        editor = self.sender()
        if isinstance(editor, FieldEditor):
            self.state.set_field(editor.section, editor.name, editor.get())
        self.check()

    def refresh(self, _section: str = "") -> None:
        cfg = self.state.config
        for dotted, editor in self.editors.items():
            obj = cfg
            for part in dotted.split("."):
                obj = getattr(obj, part)
            editor.set(obj)
        self.check()

    def check(self) -> dict[str, str]:
        problems = validate(self.state.config)
        self.show_problems(problems)
        return problems

    def show_problems(self, problems: dict[str, str]) -> None:
        for dotted, label in self._error_labels.items():
            msg = problems.get(dotted, "")
            label.setText(msg)
            label.setVisible(bool(msg))
            frame = self._frames[dotted]
            frame.setStyleSheet(f"#{frame.objectName()} {{ border: 1px solid {ERROR_COLOR}; "
                                "border-radius: 3px; }" if msg else "")
        self.problems_changed.emit(problems)

    def is_marked(self, dotted: str) -> bool:
        """Whether field `dotted` has the red outline."""
        frame = self._frames.get(dotted)
        return frame is not None and "border" in frame.styleSheet()

    def error_text(self, dotted: str) -> str:
        label = self._error_labels.get(dotted)
        return label.text() if label is not None and not label.isHidden() else ""
