"""The Runs page over a workspace holding two recorded runs (one finished, one failed)."""
import dataclasses
import os
import time
from pathlib import Path

import pytest
import yaml
from PySide6.QtWidgets import QInputDialog, QMessageBox

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import RunFailed, RunStarted, StepMetrics, from_json
from cpt_studio.studio.pages.run_page import RunPage
from cpt_studio.studio.pages.runs_page import RunsPage
from cpt_studio.studio.pages.runs_widgets import ContinueDialog, config_diff
from cpt_studio.studio.run_controller import RunController

pytestmark = pytest.mark.usefixtures("no_leaked_widgets")
SAMPLE = Path(__file__).parent / "data" / "sample_events.jsonl"
RECORDED = [from_json(l) for l in SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def two_runs(workspace):
    good = workspace.create_run(RunConfig(name="esperanto r16"))
    for e in RECORDED:
        good.append_event(e)
    cfg = RunConfig(name="esperanto lr1e-4")
    cfg.training.learning_rate = 1e-4
    bad = workspace.create_run(cfg)
    for e in RECORDED[:40]:
        bad.append_event(e)
    bad.append_event(RunFailed(kind="oom", message="CUDA out of memory", hint="Lower batch_size."))
    (bad.checkpoints_dir / "step-10").mkdir(parents=True)
    return good, bad


@pytest.fixture
def page(qtbot, studio_state, fake_worker, end_runs, two_runs):
    controller = RunController(studio_state.workspace, make_worker=fake_worker(SAMPLE, "--hold"))
    end_runs(controller)
    p = RunsPage(studio_state, controller)
    qtbot.addWidget(p)
    p.show()
    return p


def rows(page):
    return {page.table.item(r, 1).text(): page.table.item(r, 0).text() for r in range(page.table.rowCount())}


def test_lists_every_run_with_its_status_and_numbers(page, two_runs):
    assert rows(page) == {"esperanto r16": "finished", "esperanto lr1e-4": "failed"}
    good_row = [r for r in range(2) if page.table.item(r, 1).text() == "esperanto r16"][0]
    assert page.table.item(good_row, 4).text() == "30"
    assert page.table.item(good_row, 5).text() == f"{[e for e in RECORDED if isinstance(e, StepMetrics)][-1].loss:.4f}"


def test_a_damaged_events_line_is_skipped_and_named_in_the_status_tooltip(page, workspace):
    mended = workspace.create_run(RunConfig(name="mended"))
    for e in RECORDED[:20]:
        mended.append_event(e)
    with open(mended.events_path, "ab") as fh:
        fh.write(b"garbage\n")
    for e in RECORDED[20:]:
        mended.append_event(e)
    page.refresh()
    row = [r for r in range(page.table.rowCount()) if page.table.item(r, 1).text() == "mended"][0]
    assert (page.table.item(row, 0).text(), page.table.item(row, 4).text()) == ("finished", "30")
    assert "events.jsonl has 1 damaged line" in page.table.item(row, 0).toolTip()
    others = [page.table.item(r, 0).toolTip() for r in range(page.table.rowCount()) if r != row]
    assert len(others) == 2 and not any("damaged" in tip for tip in others)


def test_rename_and_delete(page, two_runs, monkeypatch):
    good, bad = two_runs
    page.select([good.id])
    monkeypatch.setattr(QInputDialog, "getText", staticmethod(lambda *a, **k: ("Esperanto final", True)))
    page.rename_selected()
    assert "Esperanto final" in rows(page)
    page.select([bad.id])
    asked = []
    monkeypatch.setattr(QMessageBox, "question", staticmethod(
        lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes))
    page.delete_selected()
    assert asked and "esperanto lr1e-4" in asked[0]
    assert rows(page) == {"Esperanto final": "finished"} and not bad.path.exists()


def test_delete_is_not_done_without_confirmation(page, two_runs, monkeypatch):
    page.select([two_runs[1].id])
    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: QMessageBox.StandardButton.No))
    page.delete_selected()
    assert len(rows(page)) == 2


def test_selected_runs_are_overlaid_and_their_configs_diffed(page, two_runs):
    good, bad = two_runs
    page.select([good.id, bad.id])
    assert set(page.overlay.curves) == {good.id, bad.id}
    assert len(page.overlay.curves[good.id].getOriginalDataset()[0]) == 30
    assert len(page.overlay.curves[bad.id].getOriginalDataset()[0]) == sum(isinstance(e, StepMetrics) for e in RECORDED[:40])
    dialog = page.diff_selected()
    fields = {row[0]: row[1:] for row in dialog.rows}
    assert set(fields) == {"name", "training.learning_rate"}
    assert sorted(fields["training.learning_rate"]) == [0.0001, 0.0002]
    assert dialog.table.rowCount() == 2
    dialog.close()


def test_config_diff_lists_only_changed_fields():
    a = RunConfig().to_dict()
    b = RunConfig().to_dict()
    b["adapter"]["r"] = 64
    assert config_diff(a, b) == [("adapter.r", 16, 64)]


def test_duplicate_puts_the_settings_on_the_training_page(page, two_runs, studio_state):
    pages = []
    page.open_page.connect(pages.append)
    page.select([two_runs[1].id])
    page.duplicate_selected()
    assert studio_state.config.name == "esperanto lr1e-4 copy"
    assert studio_state.config.training.learning_rate == 1e-4 and pages == ["training"]


def test_resume_restarts_the_run_from_its_checkpoint(qtbot, page, two_runs):
    bad = two_runs[1]
    page.select([bad.id])
    assert page.buttons["resume"].isEnabled()
    page.resume_selected()
    argv = page.controller.last_argv
    assert argv[3:5] == ["resume", bad.id] and page.controller.busy
    page.controller.stop()
    qtbot.waitUntil(lambda: not page.controller.busy, timeout=10000)


def test_resume_without_a_checkpoint_explains_why(page, two_runs):
    page.select([two_runs[0].id])
    page.resume_selected()        # finished but no checkpoints/: nothing to resume from
    assert not page.controller.busy and "no checkpoint" in page.banner.text()


def test_continue_from_a_checkpoint_with_its_optimizer(qtbot, page, two_runs, monkeypatch):
    bad = two_runs[1]
    page.select([bad.id])
    monkeypatch.setattr(ContinueDialog, "exec", lambda self: (
        self.source.setCurrentIndex(self.source.findText("Checkpoint step-10")),
        self.with_optimizer.setChecked(True), ContinueDialog.DialogCode.Accepted)[-1])
    page.continue_selected()
    config = yaml.safe_load(Path(page.controller.last_argv[4]).read_text())   # the temp config
    assert config["init_from"] == str(bad.checkpoints_dir / "step-10")
    assert config["init_optimizer_state"] is True
    assert config["name"] == "esperanto lr1e-4 (continued)" and config["training"]["learning_rate"] == 1e-4
    page.controller.stop()
    qtbot.waitUntil(lambda: not page.controller.busy, timeout=10000)
    assert not Path(page.controller.last_argv[4]).exists()     # the temp config is cleaned up


def test_a_run_still_going_is_shown_live_on_the_run_page(qtbot, page, workspace, studio_state):
    live = workspace.create_run(RunConfig(name="still going"))
    live.append_event(dataclasses.replace(RECORDED[0], pid=os.getpid(), time=time.time()))
    for e in RECORDED[1:30]:
        live.append_event(e)
    run_page = RunPage(studio_state, page.controller)
    qtbot.addWidget(run_page)
    page.refresh()
    assert rows(page)["still going"] == "running"
    page.select([live.id])
    assert not page.buttons["delete"].isEnabled()
    page.show_in_run_page()
    assert page.controller.mode == "attach"
    qtbot.waitUntil(lambda: page.controller.state == "running", timeout=5000)
    for e in RECORDED[30:]:
        live.append_event(e)
    qtbot.waitUntil(lambda: not page.controller.busy, timeout=10000)
    run_page.refresh()
    assert len(run_page.plots.curves["loss"].getOriginalDataset()[0]) == 30
    assert rows(page)["still going"] == "finished"
    assert isinstance(RECORDED[0], RunStarted)
