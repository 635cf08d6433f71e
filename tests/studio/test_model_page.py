"""Model page: pick a source, see what it is and whether it fits; errors stay inline."""
from __future__ import annotations

import pytest

from cpt_studio.engine.runs.store import Workspace
from cpt_studio.studio.pages.model_page import ModelPage, format_params, guess_kind
from cpt_studio.studio.state import StudioState


@pytest.fixture
def page(qtbot, tmp_path):
    state = StudioState(Workspace(tmp_path / "ws"))
    page = ModelPage(state, auto_resolve=False)
    qtbot.addWidget(page)
    yield page
    page.tasks.wait(30_000)


def wait_idle(qtbot, page):
    qtbot.waitUntil(lambda: not page.tasks.is_busy(), timeout=60_000)


def test_builtin_default_is_preselected(page):
    assert page.radios["builtin"].isChecked()
    assert page.radios["builtin"].text() == "SmolLM2-135M (built in)"
    assert page.state.config.model.source == ""


def test_picking_a_folder_shows_architecture_params_and_badge(qtbot, page, tiny_model_dir):
    folder = tiny_model_dir("llama")
    with qtbot.waitSignal(page.model_described, timeout=60_000) as blocker:
        page.choose_source("folder", str(folder))
    info = blocker.args[0]
    assert info is not None and page.state.model_info is info
    assert page.state.config.model.source == str(folder)
    assert page.info_labels["Architecture"].text() == "LlamaForCausalLM"
    assert page.info_labels["Parameters"].text() == format_params(info.n_params)
    assert page.info_labels["Parameters"].text().endswith(" K")
    assert page.info_labels["Tied embeddings"].text() == "no"
    assert "q_proj" in page.info_labels["Linear modules"].text()
    assert page.vram.badge_text() == "fits"
    assert not page.error_label.isVisibleTo(page)


def test_bad_folder_shows_error_inline_and_page_stays_usable(qtbot, page, tmp_path, tiny_model_dir):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")
    page.choose_source("folder", str(bad))
    wait_idle(qtbot, page)
    qtbot.waitUntil(lambda: page.error_label.isVisibleTo(page), timeout=5_000)
    assert str(bad) in page.error_label.text()
    assert "Hint:" in page.error_label.text()
    assert page.info_labels["Architecture"].text() == "—"
    assert page.state.model_info is None
    # the same page then takes a good model
    with qtbot.waitSignal(page.model_described, timeout=60_000):
        page.choose_source("folder", str(tiny_model_dir("llama")))
    assert not page.error_label.isVisibleTo(page)
    assert page.info_labels["Architecture"].text() == "LlamaForCausalLM"


def test_estimate_follows_precision_and_gpu(qtbot, page, tiny_model_dir):
    with qtbot.waitSignal(page.model_described, timeout=60_000):
        page.choose_source("folder", str(tiny_model_dir("llama", tied=True)))
    assert page.info_labels["Tied embeddings"].text() == "yes"
    page.state.set_field("model", "precision", "fp32")
    assert page.form.editors["model.precision"].widget.currentText() == "fp32"
    fp32_text = page.vram.total_label.text()
    page.form.editors["model.precision"].widget.setCurrentText("4bit")
    assert page.state.config.model.precision == "4bit"
    assert page.vram.total_label.text() != fp32_text
    # a bigger batch x seq_len on the smallest card eventually does not fit
    page.state.set_field("data", "seq_len", 1_048_576)
    page.state.set_field("training", "batch_size", 64)
    page.vram.gpu_combo.setCurrentIndex(0 if page.vram.gpu_combo.count() == 8 else 1)
    assert page.vram.badge_text() == "won't fit"


def test_trust_remote_code_shows_a_warning(page):
    assert not page.trust_warning.isVisibleTo(page)
    page.form.editors["model.trust_remote_code"].widget.setChecked(True)
    assert page.state.config.model.trust_remote_code is True
    assert page.trust_warning.isVisibleTo(page)
    assert not page.tasks.is_busy()           # trusting alone does not re-read a good model
    assert "trust" in page.form.editors["model.trust_remote_code"].widget.toolTip().lower()


def test_loaded_config_selects_the_matching_row(qtbot, page, tiny_model_dir):
    cfg = page.state.config
    cfg.model.source = "HuggingFaceTB/SmolLM2-360M"
    page.state.set_config(cfg)
    assert page.radios["hub"].isChecked()
    assert page.picker.edits["hub"].text() == "HuggingFaceTB/SmolLM2-360M"
    wait_idle(qtbot, page)          # offline in tests: an inline error, no crash
    assert page.error_label.isVisibleTo(page)


def test_guess_kind(tmp_path):
    assert guess_kind("") == "builtin"
    assert guess_kind("/x/model.Q4.gguf") == "gguf"
    assert guess_kind("org/name") == "hub"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert guess_kind(str(tmp_path)) == "adapter"
