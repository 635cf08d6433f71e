"""The README's first line, as a new user meets it: open the studio, press Start, and the built-in
default (SmolLM2-135M on the sample corpus) trains, in the real worker, started from the repo root.

From the repo root on purpose: a worker whose sys.path began with the working directory imported
our kernels/ folder in place of the `kernels` package of transformers >= 5.25, and Start failed
with "cannot import name 'CUDAProperties' from 'kernels'". The settings are the app's own defaults,
untouched; the user lets it train a step, then presses "Stop and save".
About 3-4 minutes on 2 cores: the GGUF is converted into the test's workspace first, and the default
evaluates the base model before the first step.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402

from cpt_studio.engine.config import RunConfig  # noqa: E402
from cpt_studio.engine.runs.events import RunFinished, RunStarted, StepMetrics  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_MS = 600_000


def test_start_trains_the_builtin_default_through_the_real_worker_from_the_repo_root(
        qtbot, monkeypatch, window):
    monkeypatch.chdir(REPO_ROOT)           # the worker inherits it, as from `.venv/bin/cpt-studio`
    controller, run_page = window.controller, window.pages["run"]
    assert window.state.config == RunConfig()          # nothing set: the built-in default
    window.show()
    window.show_page("run")
    assert run_page.start_btn.isEnabled()
    qtbot.mouseClick(run_page.start_btn, Qt.MouseButton.LeftButton)
    assert controller.busy
    qtbot.waitUntil(lambda: _steps(window, controller) >= 1 or not controller.busy, timeout=WAIT_MS)
    assert controller.busy, _failure(window, controller)
    qtbot.mouseClick(run_page.stop_save_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not controller.busy, timeout=WAIT_MS)

    run = window.state.workspace.get_run(controller.run_id)
    events = run.read_events()
    started = next(e for e in events if isinstance(e, RunStarted))
    assert "SmolLM2" in started.model
    losses = [e.loss for e in events if isinstance(e, StepMetrics)]
    assert len(losses) >= 1 and all(loss == loss and 0 < loss < 20 for loss in losses)
    finished = events[-1]
    assert isinstance(finished, RunFinished), _failure(window, controller)
    assert (run.adapter_dir / "adapter_config.json").is_file()


def _steps(window, controller) -> int:
    if not controller.run_id:
        return 0
    run = window.state.workspace.get_run(controller.run_id)
    return sum(isinstance(e, StepMetrics) for e in run.read_events())


def _failure(window, controller) -> str:
    """What the run said about its end, for the assertion message."""
    if not controller.run_id:
        return "no run was created"
    run = window.state.workspace.get_run(controller.run_id)
    return "\n".join(repr(e) for e in run.read_events()[-3:])
