"""Start and follow training workers without Qt: the GUI's side of the worker protocol.

    proc = WorkerProcess(worker_argv_train("run.yaml", workspace.root))
    proc.start()
    for event in proc.events():        # blocks; ends after the worker exits
        ...                            # RunStarted, StepMetrics, ..., RunFinished or RunFailed
    proc.send("stop_and_save")         # from any thread

A worker that dies without a RunFinished/RunFailed still ends with a RunFailed (kind "crash") that
names the exit code and the tail of its stderr. `attach(run_dir)` follows a run started by an earlier
GUI session: it tails events.jsonl and steers the worker through the run's control file.
"""
from __future__ import annotations

import codecs
import collections
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .events import Event, EventError, Log, RunFailed, RunFinished, RunStarted, from_json
from .store import COMMANDS, RunDir, default_workspace_root, process_alive, send_command

# The worker's Python runs this instead of `-m cpt_studio.engine.cli`: `-m` and `-c` put the working
# directory first on sys.path, and started from a source checkout our top-level kernels/ folder
# would then shadow the `kernels` package that transformers >= 5.25 imports. The first entry is
# dropped unless Python already left it out (-P / PYTHONSAFEPATH on 3.11+); 3.10 has no -P.
WORKER_BOOT = ("import sys\n"
               "if not getattr(sys.flags, 'safe_path', False):\n"
               "    del sys.path[0]\n"
               "from cpt_studio.engine.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
_EOF = object()
_RESUME_HINT = "Checkpoints saved so far are kept: resume the run from the Runs page."


def cli_argv(*args: str | Path, python: str | None = None) -> list[str]:
    """argv of a Python process that runs `cpt-studio ARGS...` headless, whatever its working
    directory (see WORKER_BOOT)."""
    return [python or sys.executable, "-c", WORKER_BOOT, *(str(a) for a in args)]


def worker_argv_train(config_path: str | Path, workspace: str | Path, *, python: str | None = None,
                      extra: Sequence[str] = ()) -> list[str]:
    """argv of a worker that trains a new run from a config file."""
    return cli_argv("train", config_path, "--workspace", workspace, "--events", "jsonl", *extra,
                    python=python)


def worker_argv_resume(run_id: str, workspace: str | Path, *, max_steps: int | None = None,
                       python: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """argv of a worker that resumes a run exactly from its last checkpoint."""
    steps = ["--max-steps", str(int(max_steps))] if max_steps is not None else []
    return cli_argv("resume", run_id, "--workspace", workspace, "--events", "jsonl", *steps, *extra,
                    python=python)


def cli_command_text(config_path: str | Path, workspace: str | Path | None = None) -> str:
    """The shell command a user can copy to run the same training headless.

    Args:
        config_path: the saved YAML config.
        workspace: the workspace root; `--workspace` is added only when it is not the default
            one (`default_workspace_root()`), which the CLI would pick by itself.
    """
    parts = ["cpt-studio", "train", str(config_path)]
    if workspace is not None and not _is_default_workspace(workspace):
        parts += ["--workspace", str(workspace)]
    if os.name == "nt":
        return subprocess.list2cmdline(parts)
    return shlex.join(parts)


def _is_default_workspace(root: str | Path) -> bool:
    default = default_workspace_root().expanduser().resolve()
    return Path(root).expanduser().resolve() == default


def _parse_line(line: str) -> Event:
    text = line.strip()
    try:
        return from_json(text)
    except EventError:
        return Log(level="info", message=text)   # stray output is shown, never fatal


def _is_end(event: Event) -> bool:
    return isinstance(event, (RunFinished, RunFailed))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = " (often the system's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by {name}{extra}"
    return f"exited with code {code}"


class WorkerProcess:
    """One worker subprocess: JSON-lines events on stdout, commands on stdin, stderr kept as a tail."""

    def __init__(self, argv: Sequence[str], *, cwd: str | Path | None = None,
                 env: dict | None = None, stderr_lines: int = 200):
        self.argv = [str(a) for a in argv]
        self.cwd = cwd
        self.env = env
        self._proc: Optional[subprocess.Popen] = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._queue: "queue.Queue" = queue.Queue()
        self._closed = threading.Event()
        self._send_lock = threading.Lock()
        self.run_started: Optional[RunStarted] = None
        self._last_step = 0

    # ---- process ----------------------------------------------------------------------------
    def start(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        # Own session / process group: Ctrl-C in the GUI's terminal or closing the GUI does not kill
        # the worker, so the run can be re-attached after a restart.
        extra = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self.cwd, env=env, bufsize=0, **extra)
        # Daemon threads: a GUI that quits while the worker goes on is never held up by a read.
        threading.Thread(target=self._drain_stderr, name="worker-stderr", daemon=True).start()
        threading.Thread(target=self._read_stdout, name="worker-stdout", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the worker has exited (negative = killed by that signal), else None."""
        return self._proc.poll() if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def _drain_stderr(self) -> None:
        for line in self._proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip("\r\n"))

    def _read_stdout(self) -> None:
        # Whole chunks, not line by line: a worker that floods events costs this thread one wake-up
        # (and the GUI thread one GIL hand-over) per chunk instead of per event.
        fd = self._proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        rest = ""
        while chunk := os.read(fd, 1 << 16):
            *lines, rest = (rest + decoder.decode(chunk)).split("\n")
            batch = [_parse_line(l) for l in lines if l.strip()]
            if batch:
                self._queue.put(batch)
        rest += decoder.decode(b"", final=True)
        if rest.strip():
            self._queue.put([_parse_line(rest)])
        self._queue.put(_EOF)

    # ---- events -----------------------------------------------------------------------------
    def events(self, poll_s: float = 0.2) -> Iterator[Event]:
        """Yield events until the worker has exited (or close() is called).

        The last event is always a RunFinished or RunFailed: a worker that exits without one gets a
        RunFailed(kind="crash") naming its exit code and the last lines of its stderr.
        """
        ended = False
        while not self._closed.is_set():
            try:
                item = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if item is _EOF:
                break
            for event in item:
                if isinstance(event, RunStarted):
                    self.run_started = event
                self._last_step = getattr(event, "step", self._last_step)
                ended = ended or _is_end(event)
                yield event
        else:   # close() was called: the worker goes on unwatched
            return
        try:
            code = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:   # stdout closed but the process lingers
            code = None
        time.sleep(0.05)                    # let the stderr thread take the last lines
        if not ended:
            yield self.failure_event(code)

    def failure_event(self, code: int | None) -> RunFailed:
        tail = self.stderr_tail(15)
        message = f"The training worker {_exit_text(code)} without reporting an error."
        if tail:
            message += f"\n\nLast lines it printed:\n{tail}"
        hint = _RESUME_HINT if self.run_started else (
            f"The worker did not start. Check that cpt-studio is installed for {self.argv[0]}.")
        return RunFailed(kind="crash", message=message, hint=hint, step=self._last_step)

    # ---- commands ---------------------------------------------------------------------------
    def send(self, command: str) -> bool:
        """Send stop / stop_and_save / save_now on stdin; False when the worker cannot hear it."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
        if not self.running():
            return False
        with self._send_lock:
            try:
                self._proc.stdin.write(f"{command}\n".encode())
                self._proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def stop(self) -> None:
        """Ask the worker to stop at the next step; terminate it when it cannot be asked."""
        if not self.send("stop") and self.running():
            self._proc.terminate()

    def kill(self) -> None:
        """End the worker at once (checkpoints already written stay valid)."""
        if self.running():
            self._proc.kill()

    def close(self) -> None:
        """Stop following (events() returns); the worker itself goes on."""
        self._closed.set()


class AttachedRun:
    """A run started by an earlier GUI session: tail its events.jsonl, steer it via its control file."""

    def __init__(self, run_dir: RunDir, poll_s: float = 0.2, grace_s: float = 3.0):
        self.run_dir = run_dir
        self.poll_s = poll_s
        self.grace_s = grace_s          # how long a run without RunStarted may stay silent
        self._closed = threading.Event()
        self.run_started: Optional[RunStarted] = None

    returncode = None
    pid = property(lambda self: self.run_started.pid if self.run_started else None)

    def stderr_tail(self, lines: int = 40) -> str:
        return ""

    def events(self) -> Iterator[Event]:
        """Every event already in the file, then new ones as they are appended, until the run ends."""
        offset, line = 0, 1
        quiet_since = time.monotonic()
        while not self._closed.is_set():
            batch = self.run_dir.read_events_since(offset, line)
            offset, line = batch.next_offset, batch.next_line
            for event in batch.events:
                if isinstance(event, RunStarted):
                    self.run_started = event
                yield event
                if _is_end(event):
                    return
            if batch.events:
                quiet_since = time.monotonic()
                continue
            if not self._worker_alive(quiet_since):
                # One more read: the worker may have written its last lines just before exiting.
                last = self.run_dir.read_events_since(offset, line).events
                yield from last
                if not any(_is_end(e) for e in last):
                    yield RunFailed(kind="interrupted", message=(
                        f"The worker of run {self.run_dir.id} is gone without finishing."),
                        hint=_RESUME_HINT)
                return
            self._closed.wait(self.poll_s)

    def _worker_alive(self, quiet_since: float) -> bool:
        if self.run_started is None:
            return time.monotonic() - quiet_since < self.grace_s
        return process_alive(self.run_started.pid, self.run_started.time)

    def send(self, command: str) -> bool:
        send_command(self.run_dir, command)
        return True

    def stop(self) -> None:
        self.send("stop")

    def kill(self) -> None:
        if self.run_started and process_alive(self.run_started.pid, self.run_started.time):
            try:
                os.kill(self.run_started.pid, signal.SIGKILL if hasattr(signal, "SIGKILL")
                        else signal.SIGTERM)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()


def attach(run_dir: RunDir) -> AttachedRun:
    """Follow a run that is already going (after a GUI restart)."""
    return AttachedRun(run_dir)
