"""The Runs page's Export… action: a dialog, a background export, the outcome in the banner."""
from __future__ import annotations

import pytest
import torch
from PySide6.QtWidgets import QDialogButtonBox
from transformers import AutoModelForCausalLM

from cpt_studio.engine.model.adapters import attach_adapters
from cpt_studio.engine.config import AdapterConfig, RunConfig
from cpt_studio.studio.pages.runs_page import RunsPage
from cpt_studio.studio.pages.runs_widgets import ExportDialog
from cpt_studio.studio.run_controller import RunController

pytestmark = pytest.mark.usefixtures("no_leaked_widgets")


@pytest.fixture
def runs(workspace, tiny_model_dir):
    """(a run with a saved, non-identity adapter; a run with nothing saved yet)."""
    model_dir = tiny_model_dir("llama", True)
    cfg = RunConfig(name="tied lora")
    cfg.model.source = str(model_dir)
    trained = workspace.create_run(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    model = attach_adapters(base, AdapterConfig(r=4, alpha=8, embed_tokens="lora", lm_head="lora"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(trained.adapter_dir))
    empty = workspace.create_run(RunConfig(name="nothing yet"))
    return trained, empty


@pytest.fixture
def page(qtbot, studio_state, end_runs, runs):
    controller = RunController(studio_state.workspace)
    end_runs(controller)
    p = RunsPage(studio_state, controller)
    qtbot.addWidget(p)
    p.show()
    yield p
    p.tasks.wait(60_000)


def answer_export_dialog(monkeypatch, dtype: str, out=None, overwrite=False) -> list[str]:
    """Answer the Export dialog through its widgets (its modal exec() is replaced by this user);
    returns the output folder it proposed for `dtype`."""
    proposed: list[str] = []

    def user(dialog) -> int:
        dialog.dtype.setCurrentIndex(dialog.dtype.findData(dtype))
        proposed.append(dialog.out.text())
        if out is not None:
            dialog.out.setText(str(out))
        dialog.overwrite.setChecked(overwrite)
        dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
        return dialog.result()

    monkeypatch.setattr(ExportDialog, "exec", user)
    return proposed


def test_export_action_exports_and_the_banner_says_where(page, runs, qtbot, monkeypatch):
    trained, empty = runs
    page.select([empty.id])
    assert not page.buttons["export"].isEnabled()          # nothing saved yet
    page.select([trained.id])
    assert page.buttons["export"].isEnabled()
    proposed = answer_export_dialog(monkeypatch, "fp32")
    page.buttons["export"].trigger()
    expected = trained.exports_dir / "merged-fp32"
    assert proposed == [str(expected)]
    assert page.export_row.isVisibleTo(page) and not page.buttons["export"].isEnabled()   # busy
    qtbot.waitUntil(lambda: page.banner.isVisible(), timeout=60_000)
    assert page.banner.level == "info", page.banner.text()
    assert str(expected) in page.banner.text() and "verified" in page.banner.text()
    assert (expected / "model.safetensors").is_file()
    qtbot.waitUntil(lambda: not page.export_row.isVisibleTo(page), timeout=5_000)
    assert page.buttons["export"].isEnabled()

    # The same folder again without Overwrite: refused in the banner, no dialog, no crash.
    answer_export_dialog(monkeypatch, "fp32")
    page.buttons["export"].trigger()
    qtbot.waitUntil(lambda: page.banner.isVisible() and page.banner.level == "error", timeout=60_000)
    assert "already exists" in page.banner.text() and "Overwrite" in page.banner.text()


def test_export_dialog_offers_the_engines_dtypes(qtbot, tmp_path):
    """The dialog's precisions are engine.model.export.DTYPES (the CLI's --dtype choices), in order."""
    from cpt_studio.engine.cli import build_parser
    from cpt_studio.engine.model.export import DTYPES
    dialog = ExportDialog(tmp_path / "run", "run")
    qtbot.addWidget(dialog)
    assert tuple(dialog.dtype.itemData(i) for i in range(dialog.dtype.count())) == DTYPES
    assert dialog.result_values()[0] == DTYPES[0]
    assert dialog.out.text().endswith(f"merged-{DTYPES[0]}")
    assert build_parser().parse_args(["export", "r", "--dtype", DTYPES[-1]]).dtype == DTYPES[-1]
