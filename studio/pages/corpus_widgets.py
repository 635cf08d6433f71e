"""Pieces of the Corpus page: background jobs (inspect an entry, count tokens) and a path list.

The jobs only call engine functions (`engine.data.corpus`, `engine.data.packing`, `engine.model.source`)
and add up their results for one table row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QFileDialog, QGroupBox, QHBoxLayout, QListWidget, QPushButton,
                               QVBoxLayout)

from cpt_studio.engine.data.corpus import SUPPORTED_SUFFIXES, expand_corpus_paths, inspect_corpus_file
from cpt_studio.engine.errors import CptError

FILE_FILTER = ("Corpus files (" + " ".join(f"*{s}" for s in SUPPORTED_SUFFIXES) + ");;All files (*)")


@dataclass
class EntrySummary:
    """One row of the corpus table: a file, a folder or the sample corpus, added up."""

    paths: list
    files: list = field(default_factory=list)      # CorpusFileInfo per file
    error: str = ""                                # a problem with the entry itself

    @property
    def format(self) -> str:
        formats = sorted({f.format for f in self.files})
        if len(self.files) == 1 and not Path(self.paths[0]).is_dir():
            return formats[0]
        return f"{'/'.join(formats) or 'folder'} · {len(self.files)} files"

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files)

    @property
    def characters(self) -> int:
        return sum(f.characters for f in self.files)

    @property
    def columns(self) -> list:
        seen: dict[str, None] = {}
        for f in self.files:
            seen.update(dict.fromkeys(str(c) for c in f.columns))
        return list(seen)

    @property
    def text_column(self) -> str:
        return next((f.text_column for f in self.files if f.text_column), "")

    @property
    def errors(self) -> list[str]:
        found = [self.error] if self.error else []
        return found + [f.error for f in self.files if f.error]

    @property
    def preview(self) -> str:
        return next((f.preview for f in self.files if f.preview), "")


def inspect_entry(paths: list[str], text_column: str = "") -> EntrySummary:
    """Worker job: inspect every corpus file under `paths` (files and/or folders)."""
    summary = EntrySummary(list(paths))
    try:
        files = expand_corpus_paths(list(paths))
    except CptError as exc:
        summary.error = str(exc)
        return summary
    summary.files = [inspect_corpus_file(p, text_column) for p in files]
    return summary


class CountStopped(KeyboardInterrupt):
    """Raised inside the tokenizing when the user stops a count: the token file keeps its last
    checkpoint (engine/data/token_store.py), so counting again goes on from there."""


def count_tokens(data_cfg, source: str, trust_remote_code: bool, models_dir: Path,
                 cache_dir: Path, resolved=None, progress=None, stop=None) -> dict:
    """Worker job: tokenize and pack the corpus with the model's tokenizer; returns the stats,
    or {"stopped": True, "fraction": ...} when `stop` (a threading.Event) was set meanwhile.

    The packed result is cached, so a training run on the same corpus and settings reuses it.
    """
    from transformers import AutoTokenizer

    from cpt_studio.engine.data.packing import build_packed_data

    if resolved is None:
        from cpt_studio.engine.model.source import resolve_model_source
        if progress:
            progress(0.0, "Resolving the model for its tokenizer…")
        resolved = resolve_model_source(source, models_dir, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.model_path,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        from cpt_studio.engine.errors import ModelSourceError
        raise ModelSourceError(f"Cannot load the tokenizer of {resolved.model_path}: {exc}",
                               "Pick a model folder that holds its tokenizer files.") from None
    reached = [0.0]

    def report(fraction, message=""):
        reached[0] = fraction
        if stop is not None and stop.is_set():
            raise CountStopped()
        if progress:
            progress(fraction, message)
    try:
        data = build_packed_data(data_cfg, tokenizer, cache_dir, report)
    except CountStopped:
        return {"stopped": True, "fraction": reached[0]}
    return dict(data.stats)


CHARS_PER_TOKEN = 4.0   # a rough figure for BPE tokenizers on prose (about 0.25 tokens a character)


def corpus_totals(summaries: list) -> dict:
    """Files, bytes, documents and characters over the inspected entries (EntrySummary each)."""
    files = [f for s in summaries for f in s.files if not f.error]
    return {"files": len(files), "bytes": sum(f.size_bytes for f in files),
            "documents": sum(f.documents for f in files),
            "characters": sum(f.characters for f in files)}


def totals_text(totals: dict, tokens_per_char: float | None = None) -> str:
    """"22 files · 74.3 KB · 22 documents · 73,512 characters · about 18,000 tokens (estimate)"."""
    ratio, how = (tokens_per_char, "at the last count's ratio") if tokens_per_char else \
        (1 / CHARS_PER_TOKEN, f"at ~{CHARS_PER_TOKEN:.0f} characters a token")
    tokens = totals["characters"] * ratio
    rounded = int(float(f"{tokens:.2g}")) if tokens >= 100 else round(tokens)
    return (f"{totals['files']:,} file{'s' if totals['files'] != 1 else ''} · "
            f"{format_size(totals['bytes'])} · {totals['documents']:,} documents · "
            f"{totals['characters']:,} characters · about {rounded:,} tokens ({how})")


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class PathList(QGroupBox):
    """A titled list of files/folders with Add files…, Add folder… and Remove."""

    paths_changed = Signal(list)

    def __init__(self, title: str, tooltip: str, parent=None):
        super().__init__(title, parent)
        self.setToolTip(tooltip)
        self.list = QListWidget()
        self.list.setMaximumHeight(90)
        self.list.setSelectionMode(QListWidget.ExtendedSelection)
        buttons = QHBoxLayout()
        for text, slot in (("Add files…", self._add_files), ("Add folder…", self._add_folder),
                           ("Remove", self._remove)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        buttons.addStretch(1)
        box = QVBoxLayout(self)
        box.addWidget(self.list)
        box.addLayout(buttons)

    def paths(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def set_paths(self, paths: list[str]) -> None:
        if paths != self.paths():
            self.list.clear()
            self.list.addItems([str(p) for p in paths])

    def add_paths(self, paths: list[str]) -> None:
        current = self.paths()
        new = current + [p for p in paths if p not in current]
        if new != current:
            self.set_paths(new)
            self.paths_changed.emit(new)

    def _add_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, self.title(), "", FILE_FILTER)
        self.add_paths(files)

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, self.title())
        if folder:
            self.add_paths([folder])

    def _remove(self) -> None:
        rows = sorted({i.row() for i in self.list.selectedIndexes()}, reverse=True)
        if rows:
            for row in rows:
                self.list.takeItem(row)
            self.paths_changed.emit(self.paths())
