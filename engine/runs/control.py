"""Commands that steer a running worker: stop, stop_and_save, save_now.

They arrive on stdin (the GUI's pipe), in runs/<id>/control (a GUI that re-attached after a restart),
or as a stop signal. The trainer polls `ControlChannel.poll()` once per optimizer step.

Stop signals (`catch_signals`, main thread only): SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`,
`docker stop`, systemd, Slurm), SIGHUP (the terminal or ssh session went away), SIGBREAK (Windows).
- During training (`begin_training` to `end_training`) the first one is `stop_and_save` at the next
  poll: the step in progress ends, a checkpoint and the adapter are saved, RunFinished is sent.
- Before training (loading, tokenizing: nothing to save yet) and at a second signal, `StopNow` is
  raised in the main thread: the run ends at once without saving. A write it interrupts is lost
  whole: checkpoints and adapters are written into temp folders and renamed into place.
- Bounded time: a first signal the loop has not taken up after `grace_s` (a step or an evaluation
  that goes on and on; default 300 s, `$CPT_STUDIO_STOP_GRACE_S`) counts as a second one. The save
  after a stop is not cut short by it, only by a second signal.
- A main thread stuck in native code (a hung GPU call) cannot raise: a watcher thread, woken by
  every signal through `signal.set_wakeup_fd`, ends the process with exit code 128 + signal
  `hard_exit_s` after a StopNow was due. Its run lock is then stale; the next writer clears it.
"""
from __future__ import annotations

import _thread
import logging
import os
import queue
import signal
import socket
import sys
import threading
from typing import Callable, Optional

COMMANDS = ("stop", "stop_and_save", "save_now")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
                     if hasattr(signal, name))
DEFAULT_GRACE_S = 300.0

log = logging.getLogger(__name__)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(KeyboardInterrupt):
    """A stop signal that ends the run at once, without saving (see the module docstring)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal_name(signum)
        self.exit_code = 128 + signum
        super().__init__(f"{self.name}: stopped at once, without saving")


class ControlChannel:
    """Collects commands from stdin, a control file reader and stop signals; poll() returns the next one."""

    def __init__(self, read_file_command: Optional[Callable[[], Optional[str]]] = None):
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._read_file_command = read_file_command
        self._phase = "setup"                  # setup -> training -> finishing
        self.stop_signal: Optional[str] = None  # the signal that asked for stop-and-save
        self._stop_taken = False
        self._previous: dict = {}
        self._wakeup = None                    # (reader, writer, previous wakeup fd)
        self._deliveries = 0
        self._closed = threading.Event()
        self._grace_s, self._hard_exit_s = DEFAULT_GRACE_S, 5.0

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

    # ---- the training loop's phases ------------------------------------------------------------
    def begin_training(self) -> None:
        """From now on a first stop signal means stop and save (there is something to save)."""
        self._phase = "training"

    def end_training(self) -> None:
        """No more steps: the final evaluation and saves run to their end (a second signal aside)."""
        self._phase = "finishing"

    def poll(self) -> Optional[str]:
        if self.stop_signal is not None and not self._stop_taken:
            self._stop_taken = True
            return "stop_and_save"
        if self._read_file_command is not None:
            command = self._read_file_command()
            if command:
                self.put(command.strip())
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    # ---- stop signals --------------------------------------------------------------------------
    def catch_signals(self, grace_s: float | None = None, hard_exit_s: float = 5.0) -> None:
        """Make SIGINT, SIGTERM, SIGHUP (SIGBREAK) stop the run as the module docstring says."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        if grace_s is None:
            grace_s = float(os.environ.get("CPT_STUDIO_STOP_GRACE_S") or DEFAULT_GRACE_S)
        self._grace_s, self._hard_exit_s = grace_s, hard_exit_s
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        reader, writer = socket.socketpair()   # a socket: what set_wakeup_fd takes on Windows too
        writer.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            log.debug("no signal watcher: %s", exc)
            reader.close()
            writer.close()
            return
        self._wakeup = (reader, writer, previous)
        threading.Thread(target=self._watch, args=(reader,), name="cpt-stop-signals",
                         daemon=True).start()

    def restore_signals(self) -> None:
        """Put the previous handlers back; the watcher and its timers stand down."""
        self._closed.set()
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if self._wakeup is not None:
            reader, writer, previous = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            writer.close()                     # the watcher reads EOF and closes the reader

    def _on_signal(self, signum, frame) -> None:
        # Only a flag, or a raise: the handler runs between two bytecodes of the main thread,
        # possibly while poll() holds the queue's lock, so taking that lock here could deadlock.
        if self._phase == "setup" or self.stop_signal is not None:
            raise StopNow(signum)
        self.stop_signal = signal_name(signum)

    def _watch(self, reader: socket.socket) -> None:
        """Count stop signals as they arrive, even while the main thread is in native code."""
        with reader:
            while True:
                try:
                    data = reader.recv(64)     # one byte per signal delivered
                except OSError:
                    return
                if not data:
                    return
                for signum in data:
                    if signum not in STOP_SIGNALS:
                        continue
                    self._deliveries += 1
                    if self._phase == "setup" or self._deliveries > 1:
                        self._after(self._hard_exit_s, self._hard_exit, signum)
                    else:
                        self._after(self._grace_s, self._deadline, signum)

    def _after(self, seconds: float, action, signum: int) -> None:
        timer = threading.Timer(seconds, action, args=(signum,))
        timer.daemon = True
        timer.start()

    def _deadline(self, signum: int) -> None:
        if self._closed.is_set() or self._stop_taken or self._phase != "training":
            return
        log.warning("%s: the step in progress did not end within %.0f s; stopping without saving",
                    signal_name(signum), self._grace_s)
        _thread.interrupt_main(signum)         # our handler raises StopNow in the main thread
        self._after(self._hard_exit_s, self._hard_exit, signum)

    def _hard_exit(self, signum: int) -> None:
        if self._closed.is_set():
            return
        log.error("%s: the main thread did not stop within %.0f s (stuck in native code); "
                  "exiting now. Checkpoints already written stay valid.",
                  signal_name(signum), self._hard_exit_s)
        os._exit(128 + signum)
