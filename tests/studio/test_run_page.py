"""The Run page driven by a fake worker that replays a recorded run (tests/studio/data/sample_events.jsonl)."""
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QTimer

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import EvalMetrics, RunFinished, Sample, StepMetrics, from_json
from cpt_studio.studio.pages.run_page import RunPage
from cpt_studio.studio.run_controller import RunController

SAMPLE_EVENTS = Path(__file__).parent / "data" / "sample_events.jsonl"

pytestmark = pytest.mark.usefixtures("no_leaked_widgets")
RECORDED = [from_json(l) for l in SAMPLE_EVENTS.read_text(encoding="utf-8").splitlines()]
STEPS = [e for e in RECORDED if isinstance(e, StepMetrics)]


@pytest.fixture
def make_page(qtbot, studio_state, fake_worker, end_runs):
    def make(*worker_args):
        controller = RunController(studio_state.workspace, make_worker=fake_worker(*worker_args))
        end_runs(controller)
        page = RunPage(studio_state, controller)
        qtbot.addWidget(page)
        page.show()
        return page
    return make


def finish(qtbot, page):
    qtbot.waitUntil(lambda: not page.controller.busy, timeout=15000)
    page.refresh()


def test_replay_draws_every_step_eval_and_sample(qtbot, make_page):
    page = make_page(SAMPLE_EVENTS)
    page.start_run()
    assert "train" in page.controller.last_argv and not page.start_btn.isEnabled()
    finish(qtbot, page)
    x, y = page.plots.curves["loss"].getOriginalDataset()
    assert len(x) == len(STEPS) == 30
    assert y[-1] == STEPS[-1].loss and x[-1] == STEPS[-1].step
    smooth = page.plots.curves["loss_ema"].getOriginalDataset()[1]
    assert len(smooth) == 30 and np.std(np.diff(smooth)) < np.std(np.diff(y))   # smoother than raw
    for name in ("heldout", "retention"):
        ex, ey = page.plots.curves[f"eval:{name}"].getOriginalDataset()
        recorded = [e for e in RECORDED if isinstance(e, EvalMetrics) and e.eval_set == name]
        assert list(ex) == [e.step for e in recorded] and ey[-1] == recorded[-1].eval_loss
        assert len(page.plots.curves[f"ppl:{name}"].getOriginalDataset()[0]) == len(recorded)
    lr = page.plots.curves["embedding_lr"].getOriginalDataset()[1]
    assert lr[-1] == pytest.approx(STEPS[-1].embedding_lr)
    assert page.plots._total_line.isVisible() and page.plots._total_line.value() == pytest.approx(140.0)
    assert page.samples.count == sum(isinstance(e, Sample) for e in RECORDED)
    assert page.phase_label.text() == "Finished at step 30"
    assert page.kernels_badge.text() == "Kernels on" and "H200" in page.device_label.text()
    assert "Adapter saved" in page.log_view.toPlainText()
    assert page.start_btn.isEnabled() and not page.stop_btn.isEnabled()
    assert not page.banner.isVisible()


def test_buttons_follow_the_run_and_steer_the_worker(qtbot, make_page):
    page = make_page(SAMPLE_EVENTS, "--hold")
    ended = []
    page.controller.run_ended.connect(lambda status, _msg: ended.append(status))   # GUI-thread signal
    page.start_run()
    qtbot.waitUntil(lambda: page.controller.state == "running" and page.plots.series["loss"].n == 30,
                    timeout=10000)
    assert not page.start_btn.isEnabled()
    assert page.stop_btn.isEnabled() and page.stop_save_btn.isEnabled() and page.save_btn.isEnabled()
    page.save_btn.click()
    qtbot.waitUntil(lambda: "Checkpoint saved at step 30" in (page.refresh() or page.log_view.toPlainText()))
    page.stop_save_btn.click()
    assert page.controller.state == "stopping" and page.stop_btn.text() == "Kill"
    finish(qtbot, page)
    assert ended == ["stopped"]
    assert page.phase_label.text() == "Stopped at step 30"
    assert "Adapter saved" in page.log_view.toPlainText()
    assert page.start_btn.isEnabled() and page.stop_btn.text() == "Stop"


def test_invalid_settings_show_in_the_banner_without_starting(qtbot, make_page, studio_state):
    page = make_page(SAMPLE_EVENTS)
    cfg = RunConfig()
    cfg.training.warmup_steps = 500
    studio_state.set_config(cfg)
    page.start_run()
    assert not page.controller.busy
    assert page.banner.isVisible() and "warmup_steps" in page.banner.text()


def test_a_past_run_is_replayed_from_its_folder(qtbot, make_page, workspace):
    run = workspace.create_run(RunConfig(name="past"))
    for e in RECORDED:
        run.append_event(e)
    page = make_page(SAMPLE_EVENTS)
    page.state.run_selected.emit(run.id)
    assert not page.controller.busy
    assert len(page.plots.curves["loss"].getOriginalDataset()[0]) == 30
    assert page.phase_label.text() == "Finished at step 30"


def test_a_run_still_going_is_watched_live_again(qtbot, make_page, workspace):
    run = workspace.create_run(RunConfig(name="live"))
    events = [dataclasses.replace(RECORDED[0], pid=os.getpid(), time=time.time()), *RECORDED[1:]]
    for e in events[:40]:
        run.append_event(e)
    page = make_page(SAMPLE_EVENTS)
    page.show_run(run.id)
    assert page.controller.mode == "attach"
    qtbot.waitUntil(lambda: page.controller.state == "running")
    page.controller.save_now()
    assert run.control_path.read_text().strip() == "save_now"
    for e in events[40:]:
        run.append_event(e)
    finish(qtbot, page)
    assert len(page.plots.curves["loss"].getOriginalDataset()[0]) == 30
    assert isinstance(events[-1], RunFinished) and page.phase_label.text() == "Finished at step 30"


def test_gui_stays_responsive_while_the_worker_floods_events(qtbot, make_page):
    # 10,000 step events at 5,000/s: ~500x what a real trainer sends, paced so that the test measures
    # the GUI and not a fake worker starving a 2-core machine.
    n = 10000
    page = make_page("--flood", n, "--rate", 5000)
    ticks = []
    timer = QTimer(page, interval=10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))   # a GUI-thread timer
    timer.start()
    page.start_run()
    qtbot.waitUntil(lambda: not page.controller.busy, timeout=30000)
    timer.stop()
    page.refresh()
    assert page.plots.series["loss"].n == n
    assert len(page.plots.curves["loss"].getOriginalDataset()[0]) == n
    late_ms = (np.diff(ticks) - 0.010) * 1000
    assert len(late_ms) > 50
    p99 = float(np.percentile(late_ms, 99))
    assert p99 < 50, f"event loop p99 latency {p99:.1f} ms (max {late_ms.max():.0f} ms)"


def test_a_refused_resume_writes_nothing_into_the_run_another_process_trains(
        qtbot, make_page, workspace, tmp_path):
    """`resume` of a run another live process writes ends with the worker's RunFailed (kind busy);
    the studio shows it, and must not record it in that run's events (the other writer owns them)."""
    from cpt_studio.engine.runs.events import RunFailed, RunStarted, to_json
    from cpt_studio.engine.runs.lock import RunLock

    run = workspace.create_run(RunConfig(name="busy"))
    run.append_event(RunStarted(run_id=run.id, name="busy", config={}, pid=os.getpid()))
    refusal = tmp_path / "refusal.jsonl"
    refusal.write_text(to_json(RunFailed(kind="busy", message=f"Run {run.id} is in use: training "
                                         f"in pid {os.getpid()} since 12:00:00.")) + "\n")
    page = make_page(refusal, "--exit-code", 2)
    ended = []
    page.controller.run_ended.connect(lambda status, message: ended.append((status, message)))
    with RunLock(run, "train"):                  # the other writer, alive
        page.controller.resume(run.id)
        finish(qtbot, page)
        assert ended and ended[0][0] == "failed" and "is in use" in ended[0][1]
        assert [type(e) for e in run.read_events()] == [RunStarted]


def test_a_resume_that_fails_before_training_leaves_the_run_as_it_was(
        qtbot, make_page, workspace, tmp_path):
    """The worker of a resume writes nothing into the run before training starts (a missing or
    damaged checkpoint ends it there); the studio must not record the failure in the run either,
    or an interrupted run would be relabelled failed for good."""
    import subprocess
    import sys

    from cpt_studio.engine.runs.events import RunFailed, RunStarted, to_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = workspace.create_run(RunConfig(name="killed"))
    run.append_event(RunStarted(run_id=run.id, name="killed", config={}, pid=dead.pid))
    before = run.events_path.read_bytes()
    assert run.status() == "interrupted"
    refusal = tmp_path / "refusal.jsonl"
    refusal.write_text(to_json(RunFailed(kind="checkpoint", message=f"Run {run.id} has no "
                                         "checkpoint step-6.", hint="Its checkpoints: step-4.")) + "\n")
    page = make_page(refusal, "--exit-code", 2)
    ended = []
    page.controller.run_ended.connect(lambda status, message: ended.append((status, message)))
    page.controller.resume(run.id)
    finish(qtbot, page)
    assert ended and ended[0][0] == "failed" and "has no checkpoint step-6" in ended[0][1]
    assert run.events_path.read_bytes() == before and run.status() == "interrupted"
