"""Training page: LoRA, optimisation, eval and checkpoint settings, generated from the config
fields' metadata, plus the target modules of the chosen model and the two learning rates.

Save config… / Load config… read and write the same YAML as `cpt-studio train CONFIG.yaml`;
Copy CLI command puts that command (for the current settings) on the clipboard.

    python -P -m cpt_studio.studio.pages.training_page    # preview this page on its own
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPushButton, QScrollArea, QVBoxLayout, QWidget)

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import ConfigError
from cpt_studio.engine.runs.runner import cli_command_text
from cpt_studio.engine.runs.store import slugify
from cpt_studio.studio.config_form import ERROR_COLOR, ConfigForm
from cpt_studio.studio.pages.target_modules import TargetModulesBox

YAML_FILTER = "YAML config (*.yaml *.yml);;All files (*)"
# training.* fields shown in their own "Memory and speed" group, in this order
MEMORY_FIELDS = ("gradient_checkpointing", "unchecked_layers", "offload_checkpoints", "kernels",
                 "embedding_optimizer", "embedding_weights", "lora_optimizer", "sparse_embedding_grad",
                 "defer_head_grad", "stream_in_compute_dtype", "free_frozen_embeddings",
                 "disabled_transforms")


class TrainingPage(QWidget):
    title = "Training"
    icon_name = "training"

    def __init__(self, state, parent=None):
        super().__init__(parent)
        self.state = state
        self.saved_path: Path | None = None
        self.form = ConfigForm(state, self)

        adapter = QFormLayout()
        self.form.add_section("adapter", adapter, skip={"target_modules"})
        self.tied_note = QLabel("Tied embeddings: lm_head is the same matrix as embed_tokens and "
                                "follows it.")
        self.tied_note.setWordWrap(True)
        self.tied_note.hide()
        adapter.addRow("", self.tied_note)
        self.targets = TargetModulesBox(state)

        training = QFormLayout()
        self.form.add_field("training.learning_rate", training)
        # range, default and tooltip come from the field's metadata (config_form), as for every
        # other editor; only the step is chosen here
        self.ratio = self.form.add_field("training.embedding_lr_ratio").widget
        self.ratio.setSingleStep(1.0)
        self.ratio.setMinimumWidth(70)
        self.embedding_lr_label = QLabel()
        self.embedding_lr_label.setStyleSheet("font-weight: 600;")
        ratio_row = QWidget()
        row = QHBoxLayout(ratio_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.ratio)
        row.addWidget(QLabel("× smaller →"))
        row.addWidget(self.embedding_lr_label, 1)
        self.form.add_row(training, "training.embedding_lr_ratio", ratio_row, "Embedding lr ratio")
        self.direct_lr = self.form.add_field("training.embedding_learning_rate", training,
                                             "Embedding lr (direct)").widget
        self.direct_lr.setToolTip(self.direct_lr.toolTip() + "\n'auto' = learning rate / ratio.")
        self.form.add_section("training", training, skip={
            "learning_rate", "embedding_lr_ratio", "embedding_learning_rate", *MEMORY_FIELDS})
        memory = QFormLayout()   # speed and memory switches: each "auto" picks the GPU default
        for name in MEMORY_FIELDS:
            self.form.add_field(f"training.{name}", memory)

        evaluation = QFormLayout()
        self.form.add_section("eval", evaluation)
        self.form.editors["eval.sample_prompts"].widget.setPlaceholderText(
            "One prompt per line, e.g.\nLa vetero hodiaŭ estas")
        checkpoints = QFormLayout()
        self.form.add_section("checkpoint", checkpoints)

        columns = QHBoxLayout()
        col1 = QVBoxLayout()
        col1.addWidget(_group("LoRA adapter", adapter))
        col1.addWidget(self.targets)
        col1.addStretch(1)
        col2 = QVBoxLayout()
        col2.addWidget(_group("Optimisation", training))
        col2.addStretch(1)
        col3 = QVBoxLayout()
        col3.addWidget(_group("Memory and speed", memory))
        col3.addWidget(_group("Evaluation and samples", evaluation))
        col3.addWidget(_group("Checkpoints", checkpoints))
        col3.addStretch(1)
        for col in (col1, col2, col3):
            columns.addLayout(col, 1)
        body = QWidget()
        body.setLayout(columns)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)

        buttons = QHBoxLayout()
        for text, slot in (("Save config…", self._save_dialog), ("Load config…", self._load_dialog),
                           ("Copy CLI command", self.copy_cli_command)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        self.message = QLabel()
        self.message.setWordWrap(True)
        buttons.addWidget(self.message, 1)
        self.problems_label = QLabel()
        self.problems_label.setWordWrap(True)
        self.problems_label.setStyleSheet(f"color: {ERROR_COLOR};")
        main = QVBoxLayout(self)
        main.addLayout(buttons)
        main.addWidget(self.problems_label)
        main.addWidget(scroll, 1)

        self.form.problems_changed.connect(self._show_problem_summary)
        state.config_changed.connect(self._on_config_changed)
        self._on_config_changed("")
        self.form.check()

    # ---- live parts ---------------------------------------------------------------------
    def _on_config_changed(self, section: str) -> None:
        cfg = self.state.config
        t = cfg.training
        direct = t.embedding_learning_rate is not None
        self.ratio.setEnabled(not direct)
        # Short, so the Optimisation column stays narrow enough for three columns at 1300 px;
        # how it is derived is in the tooltip.
        how = "set directly" if direct else f"{t.learning_rate:.1e} / {t.embedding_lr_ratio:g}"
        self.embedding_lr_label.setText(f"embedding lr = {cfg.embedding_lr:.1e}"
                                        + ("  (set directly)" if direct else ""))
        self.embedding_lr_label.setToolTip(f"Embedding learning rate: {cfg.embedding_lr:.2e} ({how}).")
        info = getattr(self.state, "model_info", None)
        tied = bool(info is not None and info.tied_embeddings)
        self.tied_note.setVisible(tied)
        self.form.editors["adapter.lm_head"].widget.setEnabled(not tied)
        if section in ("", "model", "adapter"):
            self.targets.refresh()

    def _show_problem_summary(self, problems: dict) -> None:
        lines = [f"{name}: {msg}" for name, msg in problems.items()]
        self.problems_label.setText("Fix before training — " + "; ".join(lines) if lines else "")
        self.problems_label.setVisible(bool(lines))

    def _say(self, text: str, error: bool = False) -> None:
        self.message.setStyleSheet(f"color: {ERROR_COLOR};" if error else "")
        self.message.setText(text)

    # ---- save / load / CLI --------------------------------------------------------------
    def save_config_to(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() not in (".yaml", ".yml"):
            path = path.with_suffix(".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state.config.save(path)
        self.saved_path = path
        self._say(f"Saved {path}")
        return path

    def load_config_from(self, path: str | Path) -> bool:
        """Load a YAML config into the editor; problems are shown inline, naming each field."""
        try:
            cfg = RunConfig.load(path)
        except ConfigError as exc:
            lines = "\n".join(f"{name}: {msg}" for name, msg in exc.problems.items())
            self._say(f"Could not load {path}:\n{lines}", error=True)
            return False
        self.state.set_config(cfg)
        self.saved_path = Path(path)
        self._say(f"Loaded {path}")
        return True

    def cli_command(self) -> str:
        """`cpt-studio train <yaml>` for the current settings, saving them first if needed."""
        path = self.saved_path
        current = self.state.config.to_yaml()
        if path is None or not path.is_file() or path.read_text(encoding="utf-8") != current:
            name = slugify(self.state.config.name) or "run"
            path = self.save_config_to(self.state.workspace.root / "configs" / f"{name}.yaml")
        return cli_command_text(path, self.state.workspace.root)

    def copy_cli_command(self) -> str:
        try:
            command = self.cli_command()
        except OSError as exc:
            self._say(f"Could not save the config for the command: {exc.strerror or exc}", error=True)
            return ""
        QGuiApplication.clipboard().setText(command)
        self._say(f"Copied: {command}")
        return command

    def _save_dialog(self) -> None:
        start = str(self.saved_path or self.state.workspace.root / "configs" / "run.yaml")
        path, _ = QFileDialog.getSaveFileName(self, "Save config", start, YAML_FILTER)
        if path:
            try:
                self.save_config_to(path)
            except OSError as exc:
                self._say(f"Could not save {path}: {exc.strerror or exc}", error=True)

    def _load_dialog(self) -> None:
        start = str(self.saved_path.parent if self.saved_path else self.state.workspace.root)
        path, _ = QFileDialog.getOpenFileName(self, "Load config", start, YAML_FILTER)
        if path:
            self.load_config_from(path)


def _group(title: str, layout) -> QGroupBox:
    box = QGroupBox(title)
    box.setLayout(layout)
    return box


if __name__ == "__main__":
    from cpt_studio.studio.preview import preview_page
    preview_page(TrainingPage)
