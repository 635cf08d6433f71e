"""The main window: pages, settings, shortcuts, run notifications, a crashing worker, closing mid-run."""
import os
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QLabel

from cpt_studio.engine.config import RunConfig
from cpt_studio.studio import main_window
from cpt_studio.studio.main_window import MainWindow
from cpt_studio.studio.pages.run_page import RunPage
from cpt_studio.studio.pages.runs_page import RunsPage
from cpt_studio.studio.run_controller import RunController

pytestmark = pytest.mark.usefixtures("no_leaked_widgets")
SAMPLE = Path(__file__).parent / "data" / "sample_events.jsonl"


def placeholder_page(title: str, icon_name: str) -> type:
    """A stand-in page: a label with the page's title and icon name."""
    class Placeholder(QLabel):
        def __init__(self, state, parent=None):
            super().__init__(title, parent)

    Placeholder.title, Placeholder.icon_name = title, icon_name
    return Placeholder


@pytest.fixture(autouse=True)
def light_pages(monkeypatch):
    """The Model/Corpus/Training pages have their own tests (and the Model page starts converting
    the default model when built): stand-ins keep these window tests fast."""
    monkeypatch.setattr(main_window, "page_classes", lambda: [
        placeholder_page("Model", "model"), placeholder_page("Corpus", "corpus"),
        placeholder_page("Training", "training"), RunPage, RunsPage])


@pytest.fixture
def make_window(qtbot, studio_state, fake_worker, end_runs):
    def make(*worker_args):
        controller = RunController(studio_state.workspace, make_worker=fake_worker(*worker_args))
        end_runs(controller)
        window = MainWindow(studio_state, controller)
        qtbot.addWidget(window)
        window.show()
        return window
    return make


def test_side_bar_lists_the_five_pages_and_switches_between_them(make_window):
    window = make_window(SAMPLE)
    titles = [window.sidebar.item(i).text() for i in range(window.sidebar.count())]
    assert titles == ["Model", "Corpus", "Training", "Run", "Runs"]
    assert all(not window.sidebar.item(i).icon().isNull() for i in range(5))
    window.sidebar.setCurrentRow(4)
    assert window.stack.currentWidget() is window.pages["runs"]


def test_last_page_and_geometry_are_remembered(qtbot, make_window, studio_state):
    window = make_window(SAMPLE)
    window.resize(700, 500)          # within the offscreen screen (800x600), so it is kept
    window.show_page("runs")
    window.close()
    assert QSettings().value("window/page") == "runs"
    again = MainWindow(studio_state, RunController(studio_state.workspace))
    qtbot.addWidget(again)
    assert again.current_page_key() == "runs" and again.width() == 700


def test_ctrl_return_starts_and_the_end_is_announced(qtbot, make_window):
    window = make_window(SAMPLE)
    assert QKeySequence("Ctrl+Return") in window.start_action.shortcuts()
    assert window.stop_action.shortcut() == QKeySequence("Ctrl+.")
    window.show_page("model")
    window.start_action.trigger()
    assert window.current_page_key() == "run" and window.controller.busy
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=10000)
    assert "Run finished" in window.statusBar().currentMessage()


def test_a_crashing_worker_shows_the_error_and_leaves_the_window_usable(qtbot, make_window, workspace):
    # The run folder the fake worker "trains" (its RunStarted names 20240101-000000-sample).
    run_dir = workspace.runs_dir / "20240101-000000-sample"
    run_dir.mkdir()
    RunConfig(name="sample").save(run_dir / "config.yaml")
    window = make_window(SAMPLE, "--stop-after", 30, "--exit-code", 1,
                         "--stderr", "Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access")
    page = window.pages["run"]
    window.start_run()
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=10000)
    assert page.banner.isVisible() and page.banner.level == "error"
    assert "exited with code 1" in page.banner.text() and "illegal memory access" in page.banner.text()
    assert page.start_btn.isEnabled() and not page.stop_btn.isEnabled() and not page.save_btn.isEnabled()
    assert "Run failed" in window.statusBar().currentMessage()
    assert workspace.get_run(run_dir.name).status() == "failed"      # recorded in its events.jsonl
    window.show_page("runs")                                          # still usable
    assert window.pages["runs"].table.rowCount() == 1
    window.controller._make_worker = lambda argv: __import__(
        "cpt_studio.engine.runs.runner", fromlist=["WorkerProcess"]).WorkerProcess(
        [os.sys.executable, str(Path(__file__).with_name("fake_worker.py")), str(SAMPLE)])
    window.start_run()
    assert not page.banner.isVisible()
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=10000)
    assert page.phase_label.text() == "Finished at step 30"


def test_closing_mid_run_can_leave_the_worker_training(qtbot, make_window, monkeypatch):
    window = make_window(SAMPLE, "--hold")
    window.start_run()
    qtbot.waitUntil(lambda: window.controller.state == "running", timeout=10000)
    worker = window.controller._source
    monkeypatch.setattr(window, "ask_about_running_run", lambda: "keep")
    window.close()
    assert not window.isVisible() and not window.controller.busy
    assert worker.running()                      # it goes on; a later session can attach
    worker.kill()


def test_closing_mid_run_can_be_cancelled(qtbot, make_window, monkeypatch):
    window = make_window(SAMPLE, "--hold")
    window.start_run()
    qtbot.waitUntil(lambda: window.controller.state == "running", timeout=10000)
    monkeypatch.setattr(window, "ask_about_running_run", lambda: "cancel")
    window.close()
    assert window.isVisible() and window.controller.busy
    window.pages["run"].stop_run()
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=10000)
    assert window.pages["run"].phase_label.text().startswith("Stopped")
