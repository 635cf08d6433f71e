"""Model page: pick the base model (built-in, folder, .gguf, hub id, past run/adapter), its
precision, and see what it is and whether training it fits the GPU.

Resolving and describing run in a background thread (a .gguf is converted once, 10-30 s on CPU).
The result lands on the shared state as `state.resolved_model` / `state.model_info` (followed by
`state.config_changed.emit("model")`) and is emitted as `model_described(info)`.

    python -P -m cpt_studio.studio.pages.model_page      # preview this page on its own
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFormLayout, QGroupBox, QHBoxLayout, QLabel, QProgressBar,
                               QVBoxLayout, QWidget)

from cpt_studio.engine.errors import CptError
from cpt_studio.studio.background_tasks import BackgroundTasks
from cpt_studio.studio.config_form import ERROR_COLOR, ConfigForm
from cpt_studio.studio.pages.model_source_picker import BUILTIN_LABEL, SourcePicker, guess_kind
from cpt_studio.studio.pages.vram_panel import VramPanel

__all__ = ["ModelPage", "format_params", "guess_kind", "resolve_and_describe"]

INFO_ROWS = ("Architecture", "Parameters", "Vocabulary", "Hidden size", "Layers",
             "Tied embeddings", "Linear modules", "Resolved to")


def resolve_and_describe(source: str, models_dir: Path, trust_remote_code: bool = False,
                         progress=None):
    """Worker job: (ResolvedModel, ModelInfo) for a model source."""
    from cpt_studio.engine.model.source import describe_model, resolve_model_source
    resolved = resolve_model_source(source, models_dir, progress)
    return resolved, describe_model(resolved, trust_remote_code=trust_remote_code)


def format_params(n: int) -> str:
    """134_515_008 -> '134.5 M'; 8_030_261_248 -> '8.03 B'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} K"


class ModelPage(QWidget):
    title = "Model"
    icon_name = "model"
    model_described = Signal(object)      # ModelInfo, or None when the source failed

    def __init__(self, state, parent=None, auto_resolve: bool = True):
        super().__init__(parent)
        self.state = state
        self.info = None
        self.resolved = None
        self._requested: tuple | None = None     # _wanted() of the last resolve
        self._auto_resolve = auto_resolve
        self.tasks = BackgroundTasks(self, max_threads=1)
        self.tasks.finished.connect(self._on_resolved)
        self.tasks.failed.connect(self._on_failed)
        self.tasks.busy_changed.connect(self._on_busy)
        self.tasks.progress_changed.connect(self._on_progress)
        self.form = ConfigForm(state, self)

        self.picker = SourcePicker()
        self.radios = self.picker.radios
        self.picker.source_chosen.connect(self._on_source_chosen)

        options = QFormLayout()
        self.form.add_field("model.precision", options)
        self.form.add_field("model.trust_remote_code", options)
        self.trust_warning = QLabel("Trusting remote code runs Python files shipped with the model "
                                    "with your rights. Only for models whose code you have read.")
        self.trust_warning.setWordWrap(True)
        self.trust_warning.setStyleSheet("color: #ef6c00;")
        options.addRow("", self.trust_warning)
        options_box = QGroupBox("Loading")
        options_box.setLayout(options)

        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumHeight(14)
        self.busy.setTextVisible(False)
        self.busy.hide()
        self.status = QLabel()
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(f"color: {ERROR_COLOR};")
        self.error_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error_label.hide()

        self.info_labels = {name: QLabel("—") for name in INFO_ROWS}
        info_form = QFormLayout()
        for name, label in self.info_labels.items():
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            label.setWordWrap(True)
            info_form.addRow(name + ":", label)
        info_box = QGroupBox("Model")
        info_box.setLayout(info_form)
        self.vram = VramPanel()

        left = QVBoxLayout()
        for w in (self.picker, options_box, self.busy, self.status, self.error_label):
            left.addWidget(w)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addWidget(info_box)
        right.addWidget(self.vram)
        right.addStretch(1)
        main = QHBoxLayout(self)
        main.addLayout(left, 3)
        main.addLayout(right, 2)

        state.config_changed.connect(self._on_config_changed)
        self.refresh_runs()
        self._sync_from_config()
        # The first show (auto_resolve) or a change of model.source starts the work.
        self._requested = self._wanted()

    # ---- source <-> config ------------------------------------------------------------------
    def choose_source(self, kind: str, source: str = "") -> None:
        """Pick a source row (with its path / id), as a user would; resolving follows."""
        self.picker.choose(kind, source)

    def refresh_runs(self) -> None:
        self.picker.refresh_runs(self.state.workspace)

    def _on_source_chosen(self, source: str) -> None:
        if source != self.state.config.model.source:
            self.state.set_field("model", "source", source)   # -> _on_config_changed resolves
        elif self._needs_resolve():
            self.resolve()

    def _sync_from_config(self) -> None:
        model = self.state.config.model
        self.picker.show_source(model.source)
        self.trust_warning.setVisible(model.trust_remote_code)

    def _on_config_changed(self, section: str) -> None:
        if section in ("", "model"):
            self._sync_from_config()
            if self._needs_resolve():
                self.resolve()
        self.vram.set_estimate_inputs(self.info, self.state.config)

    # ---- background resolve -----------------------------------------------------------------
    def _wanted(self) -> tuple:
        model = self.state.config.model
        return model.source, model.trust_remote_code

    def _needs_resolve(self) -> bool:
        """A new source, or a new trust_remote_code after a failure (a model needing its own code
        fails to describe until the user trusts it); trust alone never re-reads a good model."""
        source, trust = self._wanted()
        last_source, last_trust = self._requested
        return source != last_source or (trust != last_trust and not self.error_label.isHidden())

    def resolve(self) -> None:
        """Resolve and describe the configured source in the background."""
        source = self.state.config.model.source
        self._requested = self._wanted()
        self._set_model(None, None, notify=self.info is not None)
        self.error_label.hide()
        self.status.setText(f"Reading {source or BUILTIN_LABEL}… (a .gguf is converted once, "
                            "which takes 10-30 s)")
        self.busy.setRange(0, 0)
        self.tasks.submit("model", resolve_and_describe, source, self.state.workspace.models_dir,
                          self.state.config.model.trust_remote_code, with_progress=True)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._auto_resolve:
            self._auto_resolve = False
            self.refresh_runs()
            if self.info is None and not self.tasks.is_busy():
                self.resolve()

    def _on_busy(self, busy: bool) -> None:
        self.busy.setVisible(busy)

    def _on_progress(self, _tag: str, fraction: float, message: str) -> None:
        self.busy.setRange(0, 1000)
        self.busy.setValue(int(fraction * 1000))
        if message:
            self.status.setText(message)

    def _on_resolved(self, _tag: str, result) -> None:
        resolved, info = result
        self.status.setText("")
        self._set_model(resolved, info)

    def _on_failed(self, _tag: str, exc) -> None:
        self.status.setText("")
        if isinstance(exc, CptError):
            text = exc.message + (f"\nHint: {exc.hint}" if exc.hint else "")
        else:
            text = f"Could not read this model: {type(exc).__name__}: {exc}"
        self.error_label.setText(text)
        self.error_label.show()
        self._set_model(None, None)

    def _set_model(self, resolved, info, notify: bool = True) -> None:
        self.resolved, self.info = resolved, info
        self.state.resolved_model, self.state.model_info = resolved, info
        values = dict.fromkeys(INFO_ROWS, "—")
        if info is not None:
            names = list(info.linear_module_names)
            values.update({
                "Architecture": str(info.architecture),
                "Parameters": format_params(int(info.n_params)),
                "Vocabulary": f"{int(info.vocab_size):,}",
                "Hidden size": f"{int(info.hidden_size):,}",
                "Layers": str(info.n_layers),
                "Tied embeddings": "yes" if info.tied_embeddings else "no",
                "Linear modules": ", ".join(names) or "none found",
                "Resolved to": _describe_resolved(resolved),
            })
        for name, label in self.info_labels.items():
            label.setText(values[name])
        self.vram.set_estimate_inputs(info, self.state.config)
        if notify:
            self.model_described.emit(info)
            self.state.config_changed.emit("model")


def _describe_resolved(resolved) -> str:
    text = f"{resolved.display_name or resolved.model_path} ({resolved.kind})"
    if resolved.adapter_path:
        text += f"\nadapter: {resolved.adapter_path}"
    return text + f"\nbase: {resolved.model_path}"


if __name__ == "__main__":
    from cpt_studio.studio.preview import preview_page
    preview_page(ModelPage)
