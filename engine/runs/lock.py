"""One writer per run: `runs/<id>/.lock` names the process that writes the run.

    with RunLock(run, "resume"):      # raises RunBusy naming the holder: pid, what it does, since when
        ...                           # train / resume / export / delete / rename

The lock is a file created with O_CREAT | O_EXCL (atomic on local disks under Linux, macOS and
Windows) holding JSON: the holder's pid and process start time, host, purpose, since when, and a
random token. A lock whose process is gone, or whose pid now belongs to a younger process, is stale:
the next writer moves it aside, checks that what it moved is the lock it judged stale (else gives
it back) and takes the run. So a SIGKILLed holder never blocks a run for long. The holder removes
its lock when its `with` block ends, however it ends (return, exception, KeyboardInterrupt, a stop
signal); only SIGKILL, a crash of the machine or os._exit leave one behind, and those are stale.

A lock written on another host (a workspace on a network drive) cannot be checked: it is respected,
and the refusal names the file to delete once that host no longer uses the run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil

from ..errors import WorkspaceError
from .store import process_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# A lock file exists a moment before its content: younger than this and unreadable, it is being
# written; older, its writer died in between and it is stale.
_UNREADABLE_GRACE_S = 10.0
_DOING = {"train": "training", "resume": "training (resumed)", "export": "exporting a merged model",
          "delete": "deleting the run", "rename": "renaming the run", "record": "recording its end"}


class RunBusy(WorkspaceError):
    """Another live process writes the run; `holder` says which."""

    kind = "busy"

    def __init__(self, message: str, hint: str, holder: Optional["LockHolder"]):
        super().__init__(message, hint)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run's lock (the content of the lock file)."""
    pid: int
    started_at: float          # the holder process's start time (psutil create_time)
    host: str
    purpose: str               # train / resume / export / delete / rename / record
    since: float
    token: str

    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder still runs; a lock from another host counts as alive (cannot check)."""
        return not self.local() or process_alive(self.pid, self.started_at)

    def describe(self) -> str:
        """'training (resumed) in pid 1234 since 2025-01-01 12:03:04'."""
        doing = _DOING.get(self.purpose, self.purpose)
        where = "" if self.local() else f" on {self.host}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{doing} in pid {self.pid}{where} since {when}"


def lock_path(run) -> Path:
    """The lock file of a run (a RunDir or a run folder)."""
    return Path(getattr(run, "path", run)) / LOCK_FILE


def read_holder(run) -> Optional[LockHolder]:
    """The holder named in a run's lock file; None when there is none or it is unreadable."""
    try:
        data = json.loads(lock_path(run).read_text(encoding="utf-8"))
        return LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The one-writer lock of a run. `acquire()` or `with`; `release()` is safe to call twice."""

    def __init__(self, run, purpose: str):
        self.path = lock_path(run)
        self.run_id = self.path.parent.name
        self.purpose = purpose
        self.holder: Optional[LockHolder] = None     # our own entry while held
        self._identity = None

    def __enter__(self) -> "RunLock":
        return self if self.holder else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Take the run, clearing a stale lock; raises RunBusy when a live process holds it."""
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            except OSError as exc:
                raise WorkspaceError(f"Cannot create the lock file {self.path}: "
                                     f"{exc.strerror or exc}.",
                                     "Check that the run folder exists and is writable.") from None
            try:
                self._fill(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            return self
        raise RunBusy(f"Run {self.run_id} is changing hands between other processes right now.",
                      "Try again in a moment.", None)

    def _fill(self, fd: int) -> None:
        holder = LockHolder(pid=os.getpid(), started_at=psutil.Process().create_time(),
                            host=socket.gethostname(), purpose=self.purpose, since=time.time(),
                            token=secrets.token_hex(8))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(holder), fh)
            fh.flush()
            os.fsync(fh.fileno())
            self._identity = _identity(os.fstat(fh.fileno()))
        self.holder = holder

    def _clear_if_stale(self) -> None:
        """Raise RunBusy for a live holder; else move the stale lock away (the caller retries)."""
        try:
            seen = _identity(os.stat(self.path))
        except FileNotFoundError:
            return
        holder = read_holder(self.path.parent)
        if holder is None:
            if time.time() - seen[2] / 1e9 < _UNREADABLE_GRACE_S:
                raise RunBusy(f"Run {self.run_id} is being taken by another process right now.",
                              "Try again in a moment.", None)
        elif holder.alive():
            raise self._busy(holder)
        with _clearers_one_at_a_time(self.path.parent):
            try:
                if _identity(os.stat(self.path)) != seen:
                    return             # cleared and taken meanwhile: look again
            except FileNotFoundError:
                return
            grave = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.replace(self.path, grave)
            except FileNotFoundError:
                return
            except PermissionError:    # Windows: someone has it open this instant
                time.sleep(0.05)
                return
            if _identity(os.stat(grave)) != seen:
                # Only without flock (Windows): another writer took the run between our look and
                # our move. Give its lock back.
                try:
                    os.link(grave, self.path)
                except OSError:
                    log.warning("%s: a lock taken meanwhile could not be put back", self.path)
            else:
                log.warning("run %s: cleared a stale lock (%s)", self.run_id,
                            holder.describe() if holder else "unreadable")
            grave.unlink(missing_ok=True)

    def _busy(self, holder: LockHolder) -> RunBusy:
        message = f"Run {self.run_id} is in use: {holder.describe()}."
        if not holder.local():
            hint = (f"Wait for it to end. If no process on {holder.host} uses the run any more, "
                    f"delete {self.path} and try again.")
        elif holder.purpose in ("train", "resume"):
            hint = (f"Wait for it to end, or stop it first (Stop on the Run page, or `kill "
                    f"{holder.pid}`: it saves a checkpoint and the adapter, then stops).")
        else:
            hint = "Wait for it to end, then try again."
        return RunBusy(message, hint, holder)

    def release(self) -> None:
        """Remove our lock file (nothing happens when we hold none, or it is no longer ours)."""
        if self.holder is None:
            return
        self.holder = None
        try:
            if _identity(os.stat(self.path)) == self._identity:
                self.path.unlink()
        except FileNotFoundError:      # the run folder went away with it (delete_run)
            pass


@contextlib.contextmanager
def _clearers_one_at_a_time(folder: Path):
    """flock on the run folder where the OS has it: two writers never clear the same stale lock,
    so neither can move away the fresh lock the other just took. Elsewhere a no-op."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:                # e.g. some network filesystems
            pass
        yield
    finally:
        os.close(fd)                   # releases the flock


def _identity(st: os.stat_result) -> tuple:
    """Which file this is: the same inode (file index on Windows), size and mtime."""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size
