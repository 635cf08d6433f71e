"""Corpus page: files in, what is in them, errors in red, drops, block settings, token count."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QComboBox

from cpt_studio.engine.runs.store import Workspace
from cpt_studio.studio.config_form import ERROR_COLOR
from cpt_studio.studio.pages.corpus_page import SAMPLE_LABEL, CorpusPage
from cpt_studio.studio.state import StudioState


@pytest.fixture
def page(qtbot, tmp_path):
    state = StudioState(Workspace(tmp_path / "ws"))
    page = CorpusPage(state)
    qtbot.addWidget(page)
    yield page
    page.tasks.wait(30_000)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": i, "content": f"Dokumento numero {i}. " * 20} for i in range(7)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def cell(page, row, col):
    item = page.table.item(row, col)
    return item.text() if item else ""


def wait_inspected(qtbot, page):
    qtbot.waitUntil(lambda: not page.tasks.is_busy() and all(
        cell(page, r, 5) != "inspecting…" for r in range(page.table.rowCount())), timeout=30_000)


def test_sample_corpus_is_preselected(qtbot, page):
    assert page.state.config.data.train_files == []
    assert page.table.rowCount() == 1
    assert cell(page, 0, 0) == SAMPLE_LABEL
    wait_inspected(qtbot, page)
    assert int(cell(page, 0, 4).replace(",", "")) > 0
    assert cell(page, 0, 5).startswith("ok")


def test_adding_a_jsonl_file_shows_documents_and_column(qtbot, page, jsonl):
    page.add_paths([str(jsonl)])
    assert page.state.config.data.train_files == [str(jsonl)]
    assert cell(page, 0, 0) == "docs.jsonl"           # the sample row made way
    assert page.table.item(0, 0).toolTip() == str(jsonl)
    wait_inspected(qtbot, page)
    assert cell(page, 0, 1) == "jsonl"
    assert cell(page, 0, 4) == "7"
    combo = page.table.cellWidget(0, 3)
    assert isinstance(combo, QComboBox)
    assert combo.currentText() == "auto (content)"
    assert [combo.itemText(i) for i in range(combo.count())][1:] == ["id", "content"]
    page.table.selectRow(0)
    assert page.preview.toPlainText().startswith("Dokumento numero 0.")
    # choosing a column writes data.text_column and re-inspects with it
    combo.setCurrentIndex(combo.findData("id"))
    assert page.state.config.data.text_column == "id"
    wait_inspected(qtbot, page)
    assert "id" in cell(page, 0, 5)                   # numbers are not text: the error names it
    assert page.table.item(0, 5).foreground().color().name() == ERROR_COLOR


def test_binary_file_shows_error_in_red(qtbot, page, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    page.add_paths([str(binary)])
    wait_inspected(qtbot, page)
    assert "not text" in cell(page, 0, 5)
    assert page.table.item(0, 5).foreground().color().name() == ERROR_COLOR
    page.table.selectRow(0)
    assert "weights.txt" in page.preview.toPlainText()


def test_drop_adds_files_and_folders(qtbot, page, jsonl, tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "a.txt").write_text("Saluton mondo.\n", encoding="utf-8")
    (folder / "b.md").write_text("# Titolo\nTeksto.\n", encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(jsonl)), QUrl.fromLocalFile(str(folder))])
    event = QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    page.dropEvent(event)
    assert page.state.config.data.train_files == [str(jsonl), str(folder)]
    wait_inspected(qtbot, page)
    assert cell(page, 1, 1).endswith("2 files")
    assert cell(page, 1, 4) == "2"
    page.table.selectRow(0)
    page.remove_selected()
    assert page.state.config.data.train_files == [str(folder)]


def test_block_settings_and_eval_lists_write_the_config(page, jsonl):
    page.form.editors["data.seq_len"].widget.setValue(256)
    assert page.state.config.data.seq_len == 256
    page.form.editors["data.eval_fraction"].widget.setValue(0.1)
    assert page.state.config.data.eval_fraction == pytest.approx(0.1)
    page.eval_list.add_paths([str(jsonl)])
    assert page.state.config.data.eval_files == [str(jsonl)]
    page.retention_list.add_paths([str(jsonl)])
    assert page.state.config.data.retention_files == [str(jsonl)]


def test_count_tokens_uses_the_model_tokenizer(qtbot, page, tiny_model_dir):
    page.state.resolved_model = SimpleNamespace(model_path=str(tiny_model_dir("llama")))
    page.state.set_field("data", "seq_len", 64)
    page.count_tokens()
    qtbot.waitUntil(lambda: page.count_button.isEnabled(), timeout=60_000)
    text = page.count_label.text()
    assert text.startswith("Tokens: "), text
    assert "blocks of 64" in text and "tokens per character" in text
    assert page.token_stats["tokens"] > 0
    page.state.set_field("data", "seq_len", 128)
    assert "count again" in page.count_label.text()


def test_totals_give_size_documents_and_a_token_estimate(qtbot, page, jsonl, tmp_path):
    page.add_paths([str(jsonl)])
    wait_inspected(qtbot, page)
    chars = sum(len(f"Dokumento numero {i}. " * 20) - 1 for i in range(7))   # trailing space cleaned
    text = page.totals_label.text()
    assert text.startswith(f"1 file · {jsonl.stat().st_size / 1024:.1f} KB · 7 documents · "
                           f"{chars:,} characters · about "), text
    assert "characters a token" in text                    # not counted: the rough ratio


def test_a_count_can_be_stopped_and_started_again(qtbot, page, tiny_model_dir):
    page.state.resolved_model = SimpleNamespace(model_path=str(tiny_model_dir("llama")))
    page.state.set_field("data", "seq_len", 64)
    page.count_tokens()
    assert not page.stop_button.isHidden() and not page.count_button.isEnabled()
    page.stop_counting()                              # before the tokenizer has even loaded
    qtbot.waitUntil(lambda: page.count_button.isEnabled(), timeout=60_000)
    assert page.count_label.text().startswith("Stopped at "), page.count_label.text()
    assert page.token_stats is None and page.stop_button.isHidden()
    page.count_tokens()        # again, to the end (resuming a stopped tokenizing: test_tokenize_resume)
    qtbot.waitUntil(lambda: page.count_button.isEnabled(), timeout=60_000)
    assert page.count_label.text().startswith("Tokens: ") and page.token_stats["tokens"] > 0
    assert "at the last count's ratio" in page.totals_label.text()
