"""Corpus page: the training files (add, remove, drop), what is in each, block settings, eval and
retention files, and a token count with the chosen model's tokenizer.

Files are inspected and tokens counted in background threads; the table fills in as results come.
With no training files the embedded sample corpus is used, and shown as its own row.

    python -P -m cpt_studio.studio.pages.corpus_page      # preview this page on its own
"""
from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget)

from cpt_studio.engine.config import field_help
from cpt_studio.engine.errors import CptError
from cpt_studio.studio.background_tasks import BackgroundTasks
from cpt_studio.studio.config_form import ERROR_COLOR, ConfigForm
from cpt_studio.studio.pages.corpus_table import CorpusTable
from cpt_studio.studio.pages.corpus_widgets import (FILE_FILTER, EntrySummary, PathList,
                                                    corpus_totals, count_tokens, inspect_entry,
                                                    totals_text)

SAMPLE_KEY = "(sample corpus)"
SAMPLE_LABEL = "Sample corpus (Esperanto)"


def sample_corpus_paths() -> list[str]:
    """The sample corpus' training files (manifest.json), or its esperanto/ folder."""
    from cpt_studio.engine import demo
    try:
        return demo.sample_corpus_files()[0]
    except (CptError, KeyError, TypeError):
        return [str(demo.sample_corpus_dir() / "esperanto")]


class CorpusPage(QWidget):
    title = "Corpus"
    icon_name = "corpus"

    def __init__(self, state, parent=None):
        super().__init__(parent)
        self.state = state
        self.summaries: dict[str, tuple[str, object]] = {}    # key -> (text_column, EntrySummary)
        self.token_stats: dict | None = None
        self.setAcceptDrops(True)
        self.tasks = BackgroundTasks(self)
        self.tasks.finished.connect(self._on_task_finished)
        self.tasks.failed.connect(self._on_task_failed)
        self.tasks.progress_changed.connect(self._on_progress)
        self.form = ConfigForm(state, self)

        self.table = CorpusTable()
        self.table.itemSelectionChanged.connect(self._show_preview)
        self.table.text_column_chosen.connect(self._on_column_chosen)
        buttons = QHBoxLayout()
        for text, slot in (("Add files…", self._add_files), ("Add folder…", self._add_folder),
                           ("Remove", self.remove_selected)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        hint = QLabel("…or drop files and folders here")
        hint.setStyleSheet("color: palette(placeholder-text);")
        buttons.addWidget(hint)
        buttons.addStretch(1)
        files_box = QGroupBox("Training corpus")
        files_box.setToolTip(field_help("data", "train_files"))
        files_layout = QVBoxLayout(files_box)
        files_layout.addWidget(self.table)
        self.totals_label = QLabel("")
        self.totals_label.setWordWrap(True)
        files_layout.addWidget(self.totals_label)
        files_layout.addLayout(buttons)
        self.preview = QPlainTextEdit()
        self.preview.setReadOnly(True)
        self.preview.setPlaceholderText("Select a file to see the start of its first document.")
        preview_box = QGroupBox("Preview")
        QVBoxLayout(preview_box).addWidget(self.preview)

        blocks = QFormLayout()
        for name in ("data.seq_len", "data.eval_fraction", "data.max_eval_blocks"):
            self.form.add_field(name, blocks)
        blocks_box = QGroupBox("Blocks and eval split")
        blocks_box.setLayout(blocks)
        self.eval_list = PathList("Eval files (optional)", field_help("data", "eval_files"))
        self.retention_list = PathList("Retention files (optional)",
                                       field_help("data", "retention_files"))
        self.eval_list.paths_changed.connect(self._on_eval_paths)
        self.retention_list.paths_changed.connect(self._on_retention_paths)

        self.count_button = QPushButton("Count tokens")
        self.count_button.setToolTip("Tokenize the corpus with the model's tokenizer and pack it "
                                     "into blocks (cached: training reuses it).")
        self.count_button.clicked.connect(self.count_tokens)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop counting; counting again goes on from where it stopped.")
        self.stop_button.clicked.connect(self.stop_counting)
        self.stop_button.hide()
        self._count_stop = threading.Event()
        self.count_progress = QProgressBar()
        self.count_progress.setRange(0, 1000)
        self.count_progress.hide()
        self.count_label = QLabel("Tokens: not counted yet.")
        self.count_label.setWordWrap(True)
        self.count_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        count_box = QGroupBox("Tokens")
        count_layout = QVBoxLayout(count_box)
        count_buttons = QHBoxLayout()
        count_buttons.addWidget(self.count_button)
        count_buttons.addWidget(self.stop_button)
        count_buttons.addStretch(1)
        count_layout.addLayout(count_buttons)
        count_layout.addWidget(self.count_progress)
        count_layout.addWidget(self.count_label)

        left = QVBoxLayout()
        left.addWidget(files_box, 3)
        left.addWidget(preview_box, 2)
        right = QVBoxLayout()
        for w in (blocks_box, self.eval_list, self.retention_list, count_box):
            right.addWidget(w)
        right.addStretch(1)
        main = QHBoxLayout(self)
        main.addLayout(left, 3)
        main.addLayout(right, 2)

        state.config_changed.connect(self._on_config_changed)
        self._on_config_changed("")

    # ---- entries ------------------------------------------------------------------------
    def entries(self) -> list[tuple[str, str, list[str]]]:
        """(key, label, paths) per row: the configured files, or the sample corpus."""
        files = self.state.config.data.train_files
        if not files:
            return [(SAMPLE_KEY, SAMPLE_LABEL, sample_corpus_paths())]
        return [(p, _short_name(p), [p]) for p in files]

    def add_paths(self, paths: list[str]) -> None:
        """Add files/folders to data.train_files (the sample corpus row makes way)."""
        files = self.state.config.data.train_files
        new = files + [str(p) for p in paths if str(p) not in files]
        if new != files:
            self.state.set_field("data", "train_files", new)

    def remove_selected(self) -> None:
        rows = set(self.table.selected_rows())
        keys = [key for row, (key, _, _) in enumerate(self.entries()) if row in rows]
        files = [p for p in self.state.config.data.train_files if p not in keys]
        self.state.set_field("data", "train_files", files)

    def _add_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Add corpus files", "", FILE_FILTER)
        self.add_paths(files)

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a corpus folder")
        if folder:
            self.add_paths([folder])

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.add_paths(paths)
            event.acceptProposedAction()

    def _on_eval_paths(self, paths: list) -> None:
        self.state.set_field("data", "eval_files", list(paths))

    def _on_retention_paths(self, paths: list) -> None:
        self.state.set_field("data", "retention_files", list(paths))

    # ---- config -> view -----------------------------------------------------------------
    def _on_config_changed(self, section: str) -> None:
        if section not in ("", "data", "model"):
            return
        data = self.state.config.data
        self.eval_list.set_paths(data.eval_files)
        self.retention_list.set_paths(data.retention_files)
        for key, _label, paths in self.entries():
            known = self.summaries.get(key)
            if known is None or (known[0] != data.text_column and known[1] is not None
                                 and known[1].columns):
                self.summaries[key] = (data.text_column, None)
                self.tasks.submit(f"inspect:{key}", inspect_entry, paths, data.text_column)
        self._fill_table()
        if self.token_stats is not None and self.token_stats.get("_config") != self._count_key():
            self.count_label.setText(self._stats_text(self.token_stats) +
                                     "\n(settings changed since: count again)")

    def _fill_table(self) -> None:
        rows = [(label, paths, self.summaries.get(key, ("", None))[1])
                for key, label, paths in self.entries()]
        self.table.show_rows(rows, self.state.config.data.text_column)
        done = [summary for _label, _paths, summary in rows if summary is not None]
        waiting = len(rows) - len(done)
        ratio = (self.token_stats or {}).get("tokens_per_char")
        text = totals_text(corpus_totals(done), ratio) if done else ""
        self.totals_label.setText(text + (f" · inspecting {waiting} more…" if waiting else ""))

    def _on_column_chosen(self, column: str) -> None:
        self.state.set_field("data", "text_column", column)

    def _show_preview(self) -> None:
        rows = self.table.selected_rows()
        entries = self.entries()
        if not rows or rows[0] >= len(entries):
            self.preview.clear()
            return
        summary = self.summaries.get(entries[rows[0]][0], ("", None))[1]
        if summary is None:
            self.preview.setPlainText("Inspecting…")
        else:
            self.preview.setPlainText("\n\n".join(summary.errors) or summary.preview)

    # ---- background results -------------------------------------------------------------
    def _on_task_finished(self, tag: str, result) -> None:
        if tag.startswith("inspect:"):
            key = tag.split(":", 1)[1]
            if key in self.summaries:
                self.summaries[key] = (self.summaries[key][0], result)
            self._fill_table()
            self._show_preview()
        elif tag == "tokens":
            self._count_ended()
            self.count_label.setStyleSheet("")
            if result.get("stopped"):
                self.count_label.setText(f"Stopped at {result['fraction']:.0%}. Count again to go on "
                                         "from there (the tokens so far are kept).")
                return
            self.token_stats = dict(result, _config=self._count_key())
            self.count_label.setText(self._stats_text(result))
            self._fill_table()          # the estimate now uses this corpus's tokens per character

    def _on_task_failed(self, tag: str, exc) -> None:
        text = str(exc) if isinstance(exc, CptError) else f"{type(exc).__name__}: {exc}"
        if tag.startswith("inspect:"):
            key = tag.split(":", 1)[1]
            self._on_task_finished(tag, EntrySummary([key], error=text))
            return
        self._count_ended()
        self.token_stats = None
        self.count_label.setStyleSheet(f"color: {ERROR_COLOR};")
        self.count_label.setText(text)

    def _on_progress(self, tag: str, fraction: float, message: str) -> None:
        if tag == "tokens":
            self.count_progress.setValue(int(fraction * 1000))
            if message and not self._count_stop.is_set():
                self.count_label.setText(message)

    # ---- token count --------------------------------------------------------------------
    def _count_key(self) -> tuple:
        cfg = self.state.config
        return cfg.model.source, repr(cfg.data)

    def count_tokens(self) -> None:
        """Tokenize + pack the corpus in the background with the chosen model's tokenizer."""
        cfg = self.state.config
        resolved = getattr(self.state, "resolved_model", None)
        self.count_button.setEnabled(False)
        self._count_stop = threading.Event()
        self.stop_button.setEnabled(True)
        self.stop_button.show()
        self.count_progress.setValue(0)
        self.count_progress.show()
        self.count_label.setStyleSheet("")
        self.count_label.setText("Counting…")
        ws = self.state.workspace
        self.tasks.submit("tokens", count_tokens, cfg.data, cfg.model.source,
                          cfg.model.trust_remote_code, ws.models_dir, ws.cache_dir, resolved,
                          with_progress=True, stop=self._count_stop)

    def stop_counting(self) -> None:
        """Ask the running count to stop at its next progress report (within a batch)."""
        self._count_stop.set()
        self.stop_button.setEnabled(False)
        self.count_label.setText("Stopping…")

    def _count_ended(self) -> None:
        self.count_progress.hide()
        self.stop_button.hide()
        self.count_button.setEnabled(True)

    @staticmethod
    def _stats_text(stats: dict) -> str:
        tpc = stats.get("tokens_per_char")
        return (f"Tokens: {stats['tokens']:,}  ·  blocks of {stats.get('seq_len', '?')}: "
                f"{stats['train_blocks']:,} train + {stats['eval_blocks']:,} eval"
                + (f"  ·  tokens per character: {tpc:.3f}" if tpc is not None else ""))


def _short_name(path: str) -> str:
    """The file name (a folder gets a trailing '/'); the full path is in the tooltip."""
    p = Path(path)
    return (p.name or str(p)) + ("/" if p.is_dir() else "")


if __name__ == "__main__":
    from cpt_studio.studio.preview import preview_page
    preview_page(CorpusPage)
