"""Where events go: a small protocol with a few sinks (stdout JSON lines, the run folder, a list)."""
from __future__ import annotations

import logging
import sys
from typing import Protocol

from ..errors import write_error
from .events import Event, RunStarted, to_json

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """One JSON event per line on a text stream (stdout for the GUI's worker)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.closed_by_reader = False

    def emit(self, event: Event) -> None:
        if self.closed_by_reader:
            return
        try:
            self.stream.write(to_json(event) + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # The GUI that read us went away (closed with "keep training"): the run goes on and
            # the run folder's events.jsonl still records everything.
            self.closed_by_reader = True

    def close(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


class RunFolderSink:
    """Appends every event to runs/<id>/events.jsonl (the truth the History page replays)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def emit(self, event: Event) -> None:
        try:
            self.run_dir.append_event(event)
        except OSError as exc:      # a full disk: said as such, naming the folder
            error = write_error(exc, "the event log events.jsonl", self.run_dir.path,
                                "resume the run (its checkpoints are kept)")
            if error is None:
                raise
            raise error from exc

    def close(self) -> None:
        pass


class UntilStarted:
    """Holds events back from `sink` until a RunStarted passes, then sends them all, in order.

    A resume writes its run folder this way: one that fails, or is stopped, before training
    starts (a missing or damaged checkpoint, a model or corpus gone) leaves the run's events,
    and so its status, as they were. The other sinks (console, the studio's pipe) see everything
    at once.
    """

    def __init__(self, sink: EventSink):
        self.sink = sink
        self.held: list[Event] | None = []

    def emit(self, event: Event) -> None:
        if self.held is None:
            self.sink.emit(event)
            return
        self.held.append(event)
        if isinstance(event, RunStarted):
            held, self.held = self.held, None
            for earlier in held:
                self.sink.emit(earlier)

    def close(self) -> None:
        if self.held:
            log.info("training never started: %d event(s) not written to the run folder",
                     len(self.held))
        self.sink.close()


class ListSink:
    """Keeps events in memory (tests, the demo summary)."""

    def __init__(self):
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class FanOut:
    """Sends each event to several sinks, in order."""

    def __init__(self, *sinks: EventSink):
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, event: Event) -> None:
        """Every sink gets the event even when an earlier one fails; then the first failure is
        raised (a full disk under the run folder must not hide the event from the console)."""
        failure = None
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
