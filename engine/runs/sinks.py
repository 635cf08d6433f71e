"""Where events go: a small protocol with a few sinks (stdout JSON lines, the run folder, a list)."""
from __future__ import annotations

import sys
from typing import Protocol

from .events import Event, to_json


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
        self.run_dir.append_event(event)

    def close(self) -> None:
        pass


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
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
