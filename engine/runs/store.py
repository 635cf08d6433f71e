"""The run store: one folder per run under `<workspace>/runs/`, and the events file that is its truth.

    ws = Workspace()                          # --workspace DIR, else $CPT_STUDIO_HOME, else user data
    run = ws.create_run(RunConfig(name="esperanto r16"))   # runs/20250101-120000-esperanto-r16/
    run.append_event(Log(level="info", message="hello"))
    run.status()                              # "created" | "running" | "finished" | "stopped" | ...
    send_command(run, "save_now")             # the trainer picks it up with take_command(run)

Folder layout: config.yaml, events.jsonl, control, checkpoints/step-<N>/, adapter/, exports/.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import psutil
import yaml

from ..atomic import fsync_dir, write_text_atomic
from ..config import RunConfig, validate
from ..errors import ConfigError, WorkspaceError
from .events import Event, EventError, RunFailed, RunFinished, RunStarted, from_json, to_json

log = logging.getLogger(__name__)

COMMANDS = ("stop", "stop_and_save", "save_now")
STATUSES = ("created", "running", "finished", "stopped", "failed", "interrupted")
_SLUG_MAX = 40
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_BAD_NAME_RE = re.compile(r"[\x00-\x1f\x7f/\\]")
_NAME_HINT = "Use a plain name such as 'esperanto-r16' (no '/', '\\', '..' or control characters)."


def default_workspace_root() -> Path:
    """$CPT_STUDIO_HOME, else the platform's per-user data folder."""
    if os.environ.get("CPT_STUDIO_HOME"):
        return Path(os.environ["CPT_STUDIO_HOME"]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "cpt-studio"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "cpt-studio"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "cpt-studio"


def process_alive(pid: int, started_at: float | None = None) -> bool:
    """Whether process `pid` runs; with `started_at`, a process created later (reused pid) is not it."""
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # The worker exists before it writes RunStarted; a younger process merely got the same pid.
        return started_at is None or proc.create_time() <= started_at + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def check_run_name(name: str) -> str:
    """Return a usable display name, or raise WorkspaceError (names must never look like paths)."""
    if not isinstance(name, str) or not name.strip():
        raise WorkspaceError("The run name is empty.", _NAME_HINT)
    if _BAD_NAME_RE.search(name) or ".." in name or os.path.isabs(name) or len(name) > 200:
        raise WorkspaceError(f"The run name {name!r} is not allowed.", _NAME_HINT)
    return name.strip()


def slugify(name: str) -> str:
    """Lowercase letters, digits and '-', at most 40 characters ('run' when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:_SLUG_MAX].rstrip("-") or "run"


class EventBatch(NamedTuple):
    """Events read from `offset`; `next_offset`/`next_line` say where the next read starts;
    `skipped` lists the damaged lines that were left out, as (line number, reason)."""
    events: list
    next_offset: int
    next_line: int
    skipped: tuple = ()


@dataclass
class Lifecycle:
    """What the events say about a run's life; fed one event at a time so it can be stored."""
    has_events: bool = False
    pid: int = 0
    started_at: float = 0.0
    end: Optional[str] = None      # "finished" | "stopped" | "failed" after the last RunStarted

    def feed(self, event: Event) -> None:
        self.has_events = True
        ends = isinstance(event, (RunFinished, RunFailed))
        if isinstance(event, RunStarted) or (event.pid and event.pid != self.pid and not ends):
            # Each worker (the first, then each resume) starts a new life in the same file, from
            # its first event (a loading Phase comes before RunStarted). An end written by another
            # process (the GUI recording why its worker died) closes the current life instead;
            # pid 0 (a line from before events carried pids) is no one new.
            self.pid, self.started_at, self.end = event.pid, event.time, None
        if isinstance(event, RunFinished):
            self.end = "stopped" if event.stopped_early else "finished"
        elif isinstance(event, RunFailed):
            self.end = "failed"

    def status(self) -> str:
        if self.end:
            return self.end
        if not self.has_events:
            return "created"
        # No RunStarted yet means no pid to ask: a worker killed while loading counts as interrupted.
        return "running" if process_alive(self.pid, self.started_at) else "interrupted"


class RunDir:
    """One run folder. The folder name is the run id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.id = self.path.name
        self.config_path = self.path / "config.yaml"
        self.events_path = self.path / "events.jsonl"
        self.control_path = self.path / "control"
        self.checkpoints_dir = self.path / "checkpoints"
        self.adapter_dir = self.path / "adapter"
        self.exports_dir = self.path / "exports"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def load_config(self) -> RunConfig:
        return RunConfig.load(self.config_path)

    def raw_config(self) -> dict:
        """config.yaml as a plain mapping ({} when unreadable): for listings that must not fail."""
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def name(self) -> str:
        name = self.raw_config().get("name")
        return str(name) if name else self.id

    def created_time(self) -> float:
        """Creation time from the id (YYYYMMDD-HHMMSS), else the folder's mtime."""
        try:
            return time.mktime(time.strptime(self.id[:15], "%Y%m%d-%H%M%S"))
        except ValueError:
            return self.path.stat().st_mtime

    # ---- events -------------------------------------------------------------------------------
    def append_event(self, event: Event) -> None:
        """Append one JSON line and fsync: after a kill the file holds at most one half last line."""
        data = (to_json(event) + "\n").encode("utf-8")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "ab") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end:
                self._drop_unterminated_tail(fh, end)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_unterminated_tail(self, fh, end: int) -> None:
        # A writer killed mid-line left a fragment; appending after it would corrupt the next line.
        with open(self.events_path, "rb") as rd:
            rd.seek(max(0, end - 65536))
            tail = rd.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        if cut < 0 and end > len(tail):
            raise WorkspaceError(f"{self.events_path}: the last line is longer than 64 KiB and unfinished.",
                                 "The file is damaged; move it away to start the event log afresh.")
        keep = end - len(tail) + cut + 1      # just after the last newline (0 when there is none)
        log.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted writer",
                    self.events_path, end - keep)
        fh.truncate(keep)

    def read_events(self) -> list[Event]:
        """All valid events. An unfinished last line (writer killed or still writing) is left for
        later; a damaged line elsewhere is skipped with a warning (see read_events_since)."""
        return self.read_events_since(0).events

    def read_events_since(self, offset: int = 0, line: int = 1) -> EventBatch:
        """Complete events from byte `offset` (which is line number `line`) to the end of the file.

        A line that is not a valid event (a stray edit, bytes of a crashed write, a type from a
        newer version) is skipped, logged as a warning and listed in `skipped`: one bad line must
        not hide the events around it, nor the run's status and steps.
        """
        try:
            with open(self.events_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return EventBatch([], offset, line)
        events, skipped = [], []
        complete = data[: data.rfind(b"\n") + 1]
        for raw in complete.split(b"\n")[:-1]:
            if raw.strip():
                try:
                    events.append(from_json(raw.decode("utf-8")))
                except (EventError, UnicodeDecodeError) as exc:
                    skipped.append((line, str(exc)))
                    log.warning("%s, line %d: not a valid event (%s); skipped, the other events are "
                                "read as usual. Delete that line to silence this warning.",
                                self.events_path, line, exc)
            line += 1
        return EventBatch(events, offset + len(complete), line, tuple(skipped))

    def lifecycle(self) -> Lifecycle:
        state = Lifecycle()
        for event in self.read_events():
            state.feed(event)
        return state

    def status(self) -> str:
        """One of STATUSES, derived from the events (and whether the worker process still lives)."""
        return self.lifecycle().status()


class Workspace:
    """The folder holding runs/, models/, cache/ and index.sqlite. Folders are created on first use."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_workspace_root()
        self.root = self.root.resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def _dir(self, name: str) -> Path:
        path = self.root / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"Cannot create {path}: {exc.strerror or exc}.",
                                 "Pick a workspace folder you can write to (--workspace DIR).") from None
        return path

    @property
    def runs_dir(self) -> Path:
        return self._dir("runs")

    @property
    def models_dir(self) -> Path:
        return self._dir("models")

    @property
    def cache_dir(self) -> Path:
        return self._dir("cache")

    @property
    def index_path(self) -> Path:
        self._dir("")
        return self.root / "index.sqlite"

    def create_run(self, config: RunConfig) -> RunDir:
        """Make `runs/<YYYYMMDD-HHMMSS>-<slug>/` with config.yaml; a counter suffix when it is taken."""
        check_run_name(config.name)
        problems = validate(config)
        if problems:
            raise ConfigError(problems, f"run {config.name!r}")
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slugify(config.name)}"
        runs = self.runs_dir
        for n in range(1, 10_000):
            path = runs / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()             # atomic: two processes never get the same folder
                break
            except FileExistsError:
                continue
        else:
            raise WorkspaceError(f"Too many runs named {base} in {runs}.", "Pick another run name.")
        run = RunDir(path)
        try:
            config.save(run.config_path)
        except BaseException:    # a full disk, a kill signal: no run folder without its config
            shutil.rmtree(path, ignore_errors=True)
            raise
        fsync_dir(runs)
        log.info("created run %s", run.id)
        return run

    def get_run(self, run_id_or_path: str | Path) -> RunDir:
        """A run by id, or by a path to its folder inside this workspace."""
        text = str(run_id_or_path)
        runs = self.runs_dir
        if "\x00" in text:
            raise WorkspaceError(f"{text!r} is not a run id.", "Run ids look like 20250101-120000-name.")
        if _ID_RE.match(text) and ".." not in text:
            path = runs / text
        else:
            path = Path(text).expanduser().resolve()
            if path.parent != runs:
                raise WorkspaceError(f"{text} is not a run folder inside {runs}.",
                                     "Give a run id (see `cpt-studio runs`) or a folder under runs/.")
        if not path.is_dir() or path.name.startswith("."):
            raise WorkspaceError(f"There is no run {path.name!r} in {runs}.",
                                 "List the runs with `cpt-studio runs`.")
        return RunDir(path)

    def list_runs(self) -> list[RunDir]:
        """Every run folder holding a config.yaml, oldest first."""
        runs = [RunDir(p) for p in self.runs_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / "config.yaml").is_file()]
        return sorted(runs, key=lambda r: r.id)

    def rename_run(self, run_id: str, new_name: str) -> RunDir:
        """Change the display name in config.yaml; the folder (and id) stays."""
        from .lock import RunLock
        run = self.get_run(run_id)
        name = check_run_name(new_name)
        with RunLock(run, "rename"):     # raises RunBusy while a worker or an export writes the run
            data = run.raw_config()
            if not data:
                raise WorkspaceError(f"{run.config_path} is missing or unreadable.",
                                     "Restore the file, or delete the run.")
            data["name"] = name
            write_text_atomic(run.config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return run

    def delete_run(self, run_id: str) -> None:
        """Remove a run folder (refused while its worker or an export writes it: RunBusy)."""
        from .lock import RunLock
        run = self.get_run(run_id)
        with RunLock(run, "delete"):
            if run.status() == "running":   # a worker of a version without the run lock
                raise WorkspaceError(f"Run {run.id} is still training.", "Stop it first, then delete it.")
            # Rename first so a half-deleted folder never shows up as a run.
            trash = run.path.with_name(f".deleting-{run.id}-{os.getpid()}")
            try:
                os.replace(run.path, trash)
            except OSError as exc:      # e.g. Windows: a file inside is open in another program
                raise WorkspaceError(f"Cannot delete {run.path}: {exc.strerror or exc}.",
                                     "Close programs using files of this run and try again.") from None
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted run %s", run.id)

    def duplicate_run(self, run_id: str, new_name: str) -> RunDir:
        """A new run with the same config under `new_name`, and no events."""
        config = self.get_run(run_id).load_config()
        return self.create_run(dataclasses.replace(config, name=check_run_name(new_name)))


def send_command(run: RunDir, command: str) -> None:
    """Ask a (possibly re-attached) worker to stop / stop_and_save / save_now via the control file."""
    if command not in COMMANDS:
        raise WorkspaceError(f"Unknown run command {command!r}.", f"Use one of: {', '.join(COMMANDS)}.")
    write_text_atomic(run.control_path, command + "\n")


def take_command(run: RunDir) -> str | None:
    """Read and remove the pending command, if any (the trainer calls this every step)."""
    taken = run.control_path.with_name(f".control.taken-{os.getpid()}")
    try:
        # Rename before reading: a command written meanwhile lands in a new file, it is not lost.
        os.replace(run.control_path, taken)
    except FileNotFoundError:
        return None
    try:
        command = taken.read_text(encoding="utf-8", errors="replace").strip()
    finally:
        taken.unlink(missing_ok=True)
    if command not in COMMANDS:
        log.warning("%s: ignoring unknown command %r", run.control_path, command)
        return None
    return command
