"""The Run page: start / stop a run and watch it live (charts, phase, ETA, samples, log, failures).

It only talks to a RunController; a past run is shown by replaying its events.jsonl through the same
`on_event` path. Redraws are throttled to about five per second whatever the event rate.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QProgressBar, QPushButton, QSizePolicy, QSplitter,
                               QTabWidget, QVBoxLayout, QWidget)

from cpt_studio.engine.errors import CptError
from cpt_studio.engine.runs.events import (CheckpointSaved, EvalMetrics, Log, Phase, RunFailed, RunFinished,
                                      RunStarted, Sample, StepMetrics)
from cpt_studio.engine.units import format_count, format_duration

from ..run_controller import IDLE, RUNNING, STARTING, STOPPING, RunController
from .run_plots import RunPlots
from .run_widgets import Banner, LogView, SamplesView

REFRESH_MS = 200        # labels and log
PLOT_TICK_MS = 40       # one chart per tick: each chart redraws about four times a second at most
PHASE_TEXT = {"loading_model": "Loading model", "tokenizing": "Tokenizing corpus", "training": "Training",
              "evaluating": "Evaluating", "saving": "Saving", "exporting": "Exporting"}


class RunPage(QWidget):
    title = "Run"
    icon_name = "run"
    uses_run_controller = True

    def __init__(self, state, controller: RunController | None = None, parent=None):
        super().__init__(parent)
        self.state = state
        self.controller = controller or RunController(state.workspace, parent=self)
        self._refresh_timer = QTimer(self, singleShot=True, interval=REFRESH_MS)
        self._refresh_timer.timeout.connect(self.refresh_labels)
        self._plot_timer = QTimer(self, interval=PLOT_TICK_MS)
        self._plot_timer.timeout.connect(self._plot_tick)
        self._build()
        self.reset()
        c = self.controller
        c.event_received.connect(self.on_event)
        c.state_changed.connect(self._on_state)
        c.run_ended.connect(self._on_run_ended)
        state.run_selected.connect(self.show_run)
        self._on_state(c.state)

    def _build(self) -> None:
        self.start_btn = QPushButton("Start", toolTip="Start training with the current settings (Ctrl+Return)")
        self.stop_btn = QPushButton("Stop", toolTip="Stop at the next step; the last checkpoint stays (Ctrl+.)")
        self.stop_save_btn = QPushButton("Stop and save", toolTip="Save a checkpoint and the adapter, then stop")
        self.save_btn = QPushButton("Save now", toolTip="Save a checkpoint now and go on training")
        self.start_btn.setObjectName("primary")
        self.start_btn.clicked.connect(self.start_run)
        self.stop_btn.clicked.connect(self.stop_run)
        self.stop_save_btn.clicked.connect(self.controller.stop_and_save)
        self.save_btn.clicked.connect(self.controller.save_now)
        self.run_label = QLabel(textInteractionFlags=Qt.TextInteractionFlag.TextSelectableByMouse)
        # A long run name must not widen the window: it is cut instead.
        self.run_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.device_label = QLabel(objectName="muted")
        self.kernels_badge = QLabel(objectName="badge")
        self.phase_label = QLabel()
        self.progress = QProgressBar(textVisible=True)
        self.stats_label = QLabel(objectName="muted")
        self.banner = Banner()
        self.plots = RunPlots()
        self.samples = SamplesView()
        self.log_view = LogView()

        top = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.stop_save_btn, self.save_btn):
            top.addWidget(b)
        top.addSpacing(12)
        top.addWidget(self.run_label, 1)
        top.addWidget(self.device_label)
        top.addWidget(self.kernels_badge)
        phase = QHBoxLayout()
        self.phase_label.setMinimumWidth(160)
        phase.addWidget(self.phase_label)
        phase.addWidget(self.progress, 1)
        phase.addWidget(self.stats_label)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.samples, "Samples")
        self.tabs.addTab(self.log_view, "Log")
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plots)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)
        # Room for a sample or two under the charts (their size hints alone leave the tabs 3 lines).
        split.setSizes([620, 180])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(phase)
        lay.addWidget(self.banner)
        lay.addWidget(split, 1)

    def set_dark(self, dark: bool) -> None:
        self.plots.set_dark(dark)

    # ---- actions --------------------------------------------------------------------------------
    def start_run(self) -> None:
        """Start training with the shared config (shows problems in the banner instead of raising)."""
        if self.controller.busy:
            return
        self.reset()
        try:
            self.controller.start(self.state.config)
        except CptError as exc:
            self.banner.show_message("error", "Cannot start the run", exc.message, exc.hint)

    def stop_run(self) -> None:
        """Stop; pressed again while stopping, end the worker at once."""
        if self.controller.state == STOPPING:
            self.controller.kill()
        else:
            self.controller.stop()

    def show_run(self, run_id: str) -> None:
        """Show a run: live (attach) when its worker still goes, else replay its recorded events."""
        c = self.controller
        if c.busy:
            if run_id != c.run_id:
                self.banner.show_message("info", "A run is going", "Its view stays here until it ends; "
                                         "past runs can be compared on the Runs page.")
            return
        try:
            run = self.state.workspace.get_run(run_id)
            if run.status() == "running":
                self.reset()
                c.attach(run.id)
            else:
                self.replay(run.read_events())
        except CptError as exc:
            self.banner.show_message("error", "Cannot show the run", exc.message, exc.hint)

    def replay(self, events) -> None:
        """Show recorded events (a past run) at once."""
        self.reset()
        for event in events:
            self.on_event(event)
        self.refresh()

    # ---- events ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.plots.clear()
        self.samples.clear()
        self.log_view.clear()
        self.banner.hide()
        self._started: RunStarted | None = None
        self._last: StepMetrics | None = None
        self._phase, self._phase_progress, self._phase_msg = "", 0.0, ""
        self._end_text = ""
        self.run_label.setText("No run yet: set up the model, corpus and training, then press Start.")
        self.device_label.setText("")
        self.kernels_badge.hide()
        self._update_labels()

    def on_event(self, ev) -> None:
        if isinstance(ev, StepMetrics):
            self.plots.add_step(ev)
            self._last = ev
        elif isinstance(ev, Phase):
            if ev.phase != self._phase or (ev.message and ev.message != self._phase_msg):
                text = PHASE_TEXT.get(ev.phase, ev.phase) + (f": {ev.message}" if ev.message else "")
                self.log_view.add(ev.time, "info", text)
            self._phase, self._phase_progress, self._phase_msg = ev.phase, ev.progress, ev.message
        elif isinstance(ev, EvalMetrics):
            self.plots.add_eval(ev)
            self.log_view.add(ev.time, "info", f"eval {ev.eval_set} at step {ev.step}: loss "
                              f"{ev.eval_loss:.4f}, perplexity {ev.perplexity:.2f}")
        elif isinstance(ev, Sample):
            self.samples.add_sample(ev.step, ev.prompt, ev.text)
        elif isinstance(ev, Log):
            self.log_view.add(ev.time, ev.level, ev.message)
        elif isinstance(ev, CheckpointSaved):
            what = "Adapter" if ev.kind == "adapter" else "Checkpoint"
            self.log_view.add(ev.time, "info", f"{what} saved at step {ev.step}: {ev.path}")
        elif isinstance(ev, RunStarted):
            self._on_run_started(ev)
        elif isinstance(ev, RunFinished):
            self._end_text = (f"Stopped at step {ev.step}" if ev.stopped_early else f"Finished at step {ev.step}")
            self.log_view.add(ev.time, "info", self._end_text + (f", adapter in {ev.adapter_path}"
                                                                 if ev.adapter_path else ""))
        elif isinstance(ev, RunFailed):
            self._end_text = f"Failed ({ev.kind})"
            self.log_view.add(ev.time, "error", ev.message)
            self.banner.show_message("error", f"The run failed ({ev.kind})", ev.message, ev.hint)
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()
        if not self._plot_timer.isActive():
            self._plot_timer.start()

    def _on_run_started(self, ev: RunStarted) -> None:
        self._started, self._end_text = ev, ""
        if ev.total_steps:
            self.plots.set_total_steps(ev.total_steps)
        resumed = f" · resumed from step {ev.resumed_from_step}" if ev.resumed_from_step else ""
        self.run_label.setText(f"<b>{ev.name}</b> · {ev.model or 'default model'}{resumed}")
        self.device_label.setText(ev.device)
        self.kernels_badge.setText("Kernels on" if ev.kernels else "Kernels off")
        self.kernels_badge.setProperty("on", bool(ev.kernels))
        self.kernels_badge.style().unpolish(self.kernels_badge)
        self.kernels_badge.style().polish(self.kernels_badge)
        self.kernels_badge.show()
        self.log_view.add(ev.time, "info", f"Run {ev.run_id} started on {ev.device or 'unknown device'}: "
                          f"{format_count(ev.trainable_params)} of {format_count(ev.total_params)} "
                          f"parameters trained{resumed}")

    def refresh(self) -> None:
        """Redraw everything now (after a replay, at the end of a run)."""
        self.plots.refresh()
        self._plot_timer.stop()
        self.refresh_labels()

    def refresh_labels(self) -> None:
        self.log_view.flush()
        self._update_labels()

    def _plot_tick(self) -> None:
        if not self.plots.refresh_next():
            self._plot_timer.stop()

    def _update_labels(self) -> None:
        total = self._started.total_steps if self._started else 0
        m = self._last
        if self._end_text:
            self.phase_label.setText(self._end_text)
        else:
            self.phase_label.setText(PHASE_TEXT.get(self._phase, self._phase.capitalize() or "Idle")
                                     + (f": {self._phase_msg}" if self._phase_msg else ""))
        if total and m and (self._phase == "training" or self._end_text):
            done = total if self._end_text.startswith("Finished") else min(m.step, total)
            self.progress.setRange(0, total)
            self.progress.setValue(done)
            self.progress.setFormat(f"step {m.step} / {total}")
        elif self._phase_progress < 0 and not self._end_text:
            self.progress.setRange(0, 0)                       # busy, length unknown
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * max(0.0, min(1.0, self._phase_progress))))
            self.progress.setFormat("%p%")
        if m is None:
            self.stats_label.setText("")
            return
        eta = m.eta_s if m.eta_s is not None else (max(0, total - m.step) * m.step_s if total else None)
        parts = [f"loss {m.loss:.4f}", f"{format_count(m.tokens_per_s)} tok/s",
                 f"{format_count(m.tokens_seen)} tokens"]
        if m.gpu_util is not None:
            parts.append(f"GPU {m.gpu_util:.0f}%")
        if not self._end_text:
            parts.append(f"ETA {format_duration(eta)}")
        self.stats_label.setText(" · ".join(parts))

    # ---- controller state -----------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        c = self.controller
        if state == STARTING:
            self.reset()
            if c.mode == "resume" and c.run_dir is not None:
                self._preload(c.run_dir)
            self._phase, self._phase_progress = "loading_model", -1
            self._update_labels()
        self.start_btn.setEnabled(state == IDLE)
        self.stop_btn.setEnabled(state != IDLE)
        self.stop_btn.setText("Kill" if state == STOPPING else "Stop")
        self.stop_btn.setToolTip("End the worker at once (checkpoints already saved stay)"
                                 if state == STOPPING else "Stop at the next step; the last checkpoint stays (Ctrl+.)")
        self.stop_save_btn.setEnabled(state in (STARTING, RUNNING))
        self.save_btn.setEnabled(state == RUNNING)

    def _preload(self, run_dir) -> None:
        """Before a resumed run goes on, draw what it did so far."""
        try:
            for ev in run_dir.read_events():
                if isinstance(ev, (StepMetrics, EvalMetrics, Sample)):
                    self.on_event(ev)
        except CptError:
            pass
        self.refresh()

    def _on_run_ended(self, status: str, message: str) -> None:
        if not self._end_text:
            self._end_text = status.capitalize()
        self.refresh_labels()       # charts catch up through the plot timer, one at a time


if __name__ == "__main__":      # python -P -m cpt_studio.studio.pages.run_page [runs/<id>/events.jsonl]
    import sys
    import tempfile
    from pathlib import Path

    from cpt_studio.engine.runs.events import from_json
    from cpt_studio.studio.preview import preview_page

    def _replayed(state):
        page = RunPage(state)
        if len(sys.argv) > 1:
            lines = Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()
            page.replay(from_json(line) for line in lines if line.strip())
        return page

    preview_page(_replayed, workspace=tempfile.mkdtemp(prefix="cpt-preview-"), size=(1280, 820))
