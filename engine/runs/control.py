"""Commands that steer a running worker: stop, stop_and_save, save_now.

They arrive on stdin (the GUI's pipe), in runs/<id>/control (a GUI that re-attached after a restart),
or from SIGINT (Ctrl-C in the CLI means stop and save). The trainer polls `ControlChannel.poll()`
once per optimizer step.
"""
from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
from typing import Callable, Optional

COMMANDS = ("stop", "stop_and_save", "save_now")

log = logging.getLogger(__name__)


class ControlChannel:
    """Collects commands from stdin, a control file reader and SIGINT; poll() returns the next one."""

    def __init__(self, read_file_command: Optional[Callable[[], Optional[str]]] = None):
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._read_file_command = read_file_command
        self._previous_sigint = None
        self._interrupted = False

    def put(self, command: str) -> None:
        if command in COMMANDS:
            self._queue.put(command)
        else:
            log.warning("ignored unknown command %r (known: %s)", command, ", ".join(COMMANDS))

    def listen_stdin(self) -> None:
        """Read commands from stdin on a daemon thread (one per line). EOF is not a command."""
        def reader():
            for line in sys.stdin:
                line = line.strip()
                if line:
                    self.put(line)

        threading.Thread(target=reader, name="cpt-control-stdin", daemon=True).start()

    def catch_sigint(self) -> None:
        """First Ctrl-C: stop and save. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            # Only a flag: the handler runs between two bytecodes of the main thread, possibly while
            # poll() holds the queue's lock, so taking that lock here could deadlock.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._interrupted = True

        self._previous_sigint = signal.signal(signal.SIGINT, handler)

    def restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def poll(self) -> Optional[str]:
        if self._interrupted:
            self._interrupted = False
            return "stop_and_save"
        if self._read_file_command is not None:
            command = self._read_file_command()
            if command:
                self.put(command.strip())
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None
