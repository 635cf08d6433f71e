"""Run plain engine functions off the GUI thread; results come back as signals in the GUI thread.

    tasks = BackgroundTasks(self)                    # owned by a page (a QObject in the GUI thread)
    tasks.finished.connect(self._on_finished)        # (tag, result) -- a bound method, never a lambda
    tasks.failed.connect(self._on_failed)            # (tag, exception)
    tasks.submit("describe", describe_model, resolved)

Only the latest job of each tag reports back: picking another model while the first one still
resolves drops the stale answer. A job gets a `progress(fraction, message)` callable (the
engine's Progress) when it asks for one (`submit(tag, fn, ..., with_progress=True)`), and
`progress_changed(tag, fraction, message)` follows it.
"""
from __future__ import annotations

import itertools
import logging
import traceback

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

log = logging.getLogger(__name__)


class _Job(QRunnable):
    def __init__(self, tasks: "BackgroundTasks", tag: str, token: int, fn, args, kwargs):
        super().__init__()
        self.setAutoDelete(True)
        self._tasks, self._tag, self._token = tasks, tag, token
        self._fn, self._args, self._kwargs = fn, args, kwargs

    def run(self) -> None:
        try:
            result, error = self._fn(*self._args, **self._kwargs), None
        except Exception as exc:  # every failure goes back to the page, never up the thread
            log.debug("background job %s failed:\n%s", self._tag, traceback.format_exc())
            result, error = None, exc
        try:
            self._tasks._done.emit(self._tag, self._token, result, error)
        except RuntimeError:      # the page was closed while the job ran
            pass


class BackgroundTasks(QObject):
    """A small thread pool whose results are delivered as queued signals to the owner's thread."""

    finished = Signal(str, object)          # tag, result
    failed = Signal(str, object)            # tag, exception
    progress_changed = Signal(str, float, str)   # tag, 0..1, message
    busy_changed = Signal(bool)
    _done = Signal(str, int, object, object)
    _progress = Signal(str, int, float, str)

    def __init__(self, parent: QObject | None = None, max_threads: int = 2):
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max_threads)
        self._latest: dict[str, int] = {}
        self._running: dict[int, str] = {}
        self._tokens = itertools.count(1)
        # Emitted from pool threads, received here: Qt queues them into this object's thread.
        self._done.connect(self._deliver)
        self._progress.connect(self._deliver_progress)

    def submit(self, tag: str, fn, *args, with_progress: bool = False, **kwargs) -> int:
        """Run fn(*args, **kwargs) in the pool; returns a token identifying this job."""
        token = next(self._tokens)
        self._latest[tag] = token
        if with_progress:
            kwargs["progress"] = _ProgressRelay(self, tag, token)
        was_busy = self.is_busy()
        self._running[token] = tag
        self._pool.start(_Job(self, tag, token, fn, args, kwargs))
        if not was_busy:
            self.busy_changed.emit(True)
        return token

    def cancel(self, tag: str) -> None:
        """Forget the pending job of `tag`: its result will be dropped (the thread still ends)."""
        self._latest.pop(tag, None)

    def is_busy(self, tag: str | None = None) -> bool:
        if tag is None:
            return bool(self._running)
        return tag in self._running.values()

    def wait(self, msecs: int = -1) -> bool:
        """Block until every job is done (tests and shutdown only)."""
        return self._pool.waitForDone(msecs)

    @Slot(str, int, object, object)
    def _deliver(self, tag: str, token: int, result, error) -> None:
        self._running.pop(token, None)
        if self._latest.get(tag) == token:
            del self._latest[tag]
            if error is None:
                self.finished.emit(tag, result)
            else:
                self.failed.emit(tag, error)
        if not self._running:
            self.busy_changed.emit(False)

    @Slot(str, int, float, str)
    def _deliver_progress(self, tag: str, token: int, fraction: float, message: str) -> None:
        if self._latest.get(tag) == token:
            self.progress_changed.emit(tag, fraction, message)


class _ProgressRelay:
    """Callable handed to a job: progress(fraction 0..1, message="")."""

    def __init__(self, tasks: BackgroundTasks, tag: str, token: int):
        self._tasks, self._tag, self._token = tasks, tag, token

    def __call__(self, fraction, message="") -> None:
        try:
            value = max(0.0, min(1.0, float(fraction)))
            self._tasks._progress.emit(self._tag, self._token, value, str(message or ""))
        except (TypeError, ValueError, RuntimeError):   # bad value, or the page was closed
            pass
