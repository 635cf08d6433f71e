"""RunController: owns the one run the GUI is watching (a worker it started, or one it re-attached).

    controller = RunController(workspace)
    controller.event_received.connect(page.on_event)      # every engine event, in the GUI thread
    controller.run_ended.connect(page.on_run_ended)       # ("finished" | "stopped" | "failed" ..., message)
    controller.start(config)                              # or resume(run_id), continue_from(path), attach(run_id)

A QThread reads the worker's events and queues them; the GUI thread drains the queue in slices of a
few milliseconds, so a worker flooding events never freezes the window. A worker that dies without a
RunFailed is reported as failed (exit code + stderr tail) and marked failed in its events.jsonl.
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QObject, QThread, QTimer, Signal

from cpt_studio.engine.config import RunConfig, validate
from cpt_studio.engine.errors import ConfigError, CptError, write_error
from cpt_studio.engine.runs.events import RunFailed, RunFinished, RunStarted
from cpt_studio.engine.runs.lock import RunLock
from cpt_studio.engine.runs.runner import AttachedRun, WorkerProcess, worker_argv_resume, worker_argv_train
from cpt_studio.engine.runs.store import RunDir, Workspace

log = logging.getLogger(__name__)

IDLE, STARTING, RUNNING, STOPPING = "idle", "starting", "running", "stopping"
_SLICE_S = 0.012        # longest stretch the GUI thread spends on queued events before it breathes


class _ReaderThread(QThread):
    """Iterates a source's events() off the GUI thread and hands each to `push` (thread-safe)."""

    def __init__(self, source, push: Callable, parent=None):
        super().__init__(parent)
        self._source, self._push = source, push

    def run(self) -> None:
        try:
            for event in self._source.events():
                self._push(event)
        except Exception as exc:   # a damaged events file, a vanished pipe: report, never crash
            log.exception("reading worker events failed")
            self._push(RunFailed(kind="crash", message=f"Reading the run's events failed: {exc}",
                                 hint=getattr(exc, "hint", "")))


class RunController(QObject):
    """Start / resume / continue / attach one run and turn its events into Qt signals."""

    event_received = Signal(object)     # an engine.runs.events.Event
    run_started = Signal(str)           # run id (from RunStarted)
    run_ended = Signal(str, str)        # status (finished / stopped / failed / interrupted), message
    state_changed = Signal(str)         # idle / starting / running / stopping
    _wake = Signal()                    # reader thread -> GUI thread: events are waiting

    def __init__(self, workspace: Workspace, make_worker: Optional[Callable] = None, parent=None):
        """`make_worker(argv) -> WorkerProcess` (tests pass a fake worker)."""
        super().__init__(parent)
        self.workspace = workspace
        self._make_worker = make_worker or WorkerProcess
        self.state = IDLE
        self.run_id: str = ""
        self.run_dir: Optional[RunDir] = None
        self.last_argv: list[str] = []
        self.mode = ""                  # train / resume / attach: what the current run is
        self._source = None
        self._thread: Optional[_ReaderThread] = None
        self._end_event = None
        self._temp_config: Optional[Path] = None
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._pending = False
        self._drain_timer = QTimer(self, singleShot=True, interval=1)
        self._drain_timer.timeout.connect(self._drain)
        self._wake.connect(self._drain)

    # ---- starting -------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.state != IDLE

    def start(self, config: RunConfig) -> None:
        """Train a new run from `config` (raises ConfigError before starting anything)."""
        self._check_idle()
        problems = validate(config)
        if problems:
            raise ConfigError(problems, "the current settings")
        try:          # the worker reads the settings from a file: a full /tmp stops it here
            fd, name = tempfile.mkstemp(prefix="cpt-studio-config-", suffix=".yaml")
            os.close(fd)
            self._temp_config = Path(name)
            config.save(self._temp_config)
        except OSError as exc:
            error = write_error(exc, "the run's settings", tempfile.gettempdir(), "start the run again")
            raise (error or CptError(f"Could not write the run's settings: {exc}",
                                     "Start the run again.")) from exc
        self.mode, self.run_id, self.run_dir = "train", "", None
        self._launch(worker_argv_train(self._temp_config, self.workspace.root))

    def resume(self, run_id: str, max_steps: int | None = None) -> None:
        """Resume a run exactly from its last checkpoint (optionally to a new max_steps)."""
        self._check_idle()
        run = self.workspace.get_run(run_id)
        self.run_dir, self.run_id, self.mode = run, run.id, "resume"
        self._launch(worker_argv_resume(run.id, self.workspace.root, max_steps=max_steps))

    def continue_from(self, source: str | Path, with_optimizer: bool = False,
                      config: RunConfig | None = None, name: str | None = None) -> None:
        """A new run initialised from an adapter or checkpoint folder (its own run's config by default)."""
        source = Path(source)
        if config is None:
            config = _owning_run(source).load_config()
        config.init_from = str(source)
        config.init_optimizer_state = bool(with_optimizer)
        config.name = name or f"{config.name} (continued)"
        self.start(config)

    def attach(self, run_id: str) -> None:
        """Follow a run that is still going (started before the GUI restarted)."""
        self._check_idle()
        run = self.workspace.get_run(run_id)
        self.run_dir, self.run_id, self.mode = run, run.id, "attach"
        self._begin(AttachedRun(run), STARTING)

    def _check_idle(self) -> None:
        if self.busy:
            raise CptError("A run is already going.", "Stop it before starting another one.")

    def _launch(self, argv: list[str]) -> None:
        self.last_argv = list(argv)
        worker = self._make_worker(argv)
        try:
            worker.start()
        except OSError as exc:
            self._cleanup_temp()
            raise CptError(f"Could not start the training worker: {exc}.",
                           "Check that Python and cpt-studio are installed correctly.") from None
        self._begin(worker, STARTING)

    def _begin(self, source, state: str) -> None:
        self._source, self._end_event = source, None
        self._queue.clear()
        self._pending = False
        self._thread = _ReaderThread(source, self._push, self)
        self._thread.finished.connect(self._on_reader_finished)
        self._set_state(state)
        self._thread.start()

    # ---- steering -------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._source is not None and self.busy:
            self._source.stop()
            self._set_state(STOPPING)

    def stop_and_save(self) -> None:
        if self._source is not None and self.busy:
            self._source.send("stop_and_save")
            self._set_state(STOPPING)

    def save_now(self) -> None:
        if self._source is not None and self.state == RUNNING:
            self._source.send("save_now")

    def kill(self) -> None:
        if self._source is not None:
            self._source.kill()

    def detach(self, wait_ms: int = 2000) -> None:
        """Stop watching (the worker goes on; a later session can attach). Used when the GUI quits."""
        if self._source is not None:
            self._source.close()
        if self._thread is not None:
            self._thread.finished.disconnect(self._on_reader_finished)
            self._thread.wait(wait_ms)
            self._thread = None
        self._source = None
        self._cleanup_temp()
        self._set_state(IDLE)

    # ---- events (GUI thread) --------------------------------------------------------------------
    def _push(self, event) -> None:
        """Called on the reader thread."""
        with self._lock:
            self._queue.append(event)
            wake, self._pending = not self._pending, True
        if wake:
            self._wake.emit()

    def _drain(self, budget_s: float | None = _SLICE_S) -> None:
        deadline = time.monotonic() + budget_s if budget_s else None
        while True:
            with self._lock:
                if not self._queue:
                    self._pending = False
                    return
                event = self._queue.popleft()
            self._handle(event)
            if deadline is not None and time.monotonic() > deadline:
                self._drain_timer.start()      # let timers and paint events in, then go on
                return

    def _handle(self, event) -> None:
        if isinstance(event, RunStarted):
            self.run_id = event.run_id
            try:
                self.run_dir = self.workspace.get_run(event.run_id)
            except CptError:
                self.run_dir = None
            if self.state == STARTING:
                self._set_state(RUNNING)
            self.event_received.emit(event)
            self.run_started.emit(event.run_id)
            return
        if isinstance(event, (RunFinished, RunFailed)):
            self._end_event = event
        self.event_received.emit(event)

    def _on_reader_finished(self) -> None:
        self._drain_timer.stop()
        self._drain(budget_s=None)
        end, source = self._end_event, self._source
        self._thread, self._source = None, None
        # A resume that failed before training started left the run as it was (the worker writes
        # nothing into it until then): recording the failure would relabel the run.
        started = not (self.mode == "resume" and getattr(source, "run_started", None) is None)
        if isinstance(end, RunFailed) and isinstance(source, WorkerProcess) and started:
            self._mark_failed(end)
        self._cleanup_temp()
        self._set_state(IDLE)
        status, message = _describe_end(end)
        self.run_ended.emit(status, message)

    def _mark_failed(self, event: RunFailed) -> None:
        """A worker that died silently left a run that looks interrupted: record why it ended."""
        if self.run_dir is None:
            return
        try:
            # Under the run's lock: a worker refused because another process writes this run
            # (RunBusy) must not write into it either; then this raises RunBusy and nothing is written.
            with RunLock(self.run_dir, "record"):
                if self.run_dir.lifecycle().end is None:
                    self.run_dir.append_event(event)
        except (OSError, CptError) as exc:
            log.warning("could not mark run %s failed: %s", self.run_id, exc)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.state_changed.emit(state)

    def _cleanup_temp(self) -> None:
        if self._temp_config is not None:
            self._temp_config.unlink(missing_ok=True)
            self._temp_config = None


def _describe_end(event) -> tuple[str, str]:
    if isinstance(event, RunFinished):
        if event.stopped_early:
            return "stopped", f"Stopped at step {event.step}."
        loss = f", final loss {event.final_loss:.4f}" if event.final_loss is not None else ""
        return "finished", f"Finished at step {event.step}{loss}."
    if isinstance(event, RunFailed):
        status = "interrupted" if event.kind == "interrupted" else "failed"
        return status, event.message
    return "stopped", "Stopped watching the run."


def _owning_run(path: Path) -> RunDir:
    """The run folder an adapter / checkpoint folder belongs to."""
    for folder in (path, *path.parents):
        if (folder / "config.yaml").is_file():
            return RunDir(folder)
    raise CptError(f"{path} is not inside a run folder, so its settings are unknown.",
                   "Pick an adapter or checkpoint from the Runs page, or set the model on the Model page.")
