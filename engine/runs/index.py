"""A SQLite index of runs and their per-step metrics, so History opens fast on hundreds of runs.

The run folders are the truth: `refresh()` re-reads only the events that were appended since the
last refresh, drops rows of deleted folders, and a missing, corrupt or outdated index.sqlite is
rebuilt silently. An events.jsonl that was replaced rather than appended to (a folder restored from
a backup, a file copied over) is read anew: it is known by its inode, or by a changed head or end
of the part already read. A damaged line is skipped and counted (`RunSummary.skipped_lines`); the
status and steps come from the valid events around it.

    index = RunIndex(workspace)
    for run in index.list_runs():               # refreshes first
        print(run.id, run.status, run.final_loss)
    index.step_metrics(run_id)                  # [{"step": 1, "loss": 2.3, "lr": ...}, ...]
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from ..errors import DiskFullError, WorkspaceError
from .events import EvalMetrics, RunFinished, RunStarted, StepMetrics
from .store import Lifecycle, RunDir, Workspace

log = logging.getLogger(__name__)

METRIC_COLUMNS = tuple(f.name for f in dataclasses.fields(StepMetrics) if f.name not in ("step", "pid"))
EVAL_COLUMNS = ("eval_loss", "perplexity", "time")
_SUMMARY_COLUMNS = ("id", "name", "status", "model", "corpus", "created", "steps", "final_loss",
                    "eval_loss", "updated", "skipped_lines")
_RUN_COLUMNS = (*_SUMMARY_COLUMNS, "events_mtime_ns", "events_size", "events_ino", "events_ctime_ns",
                "events_offset", "events_line", "events_sig", "config_mtime_ns", "has_events", "pid",
                "started_at", "end_status", "finish_loss", "last_loss")
_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT, status TEXT, model TEXT, corpus TEXT,
    created REAL, steps INTEGER, final_loss REAL, eval_loss REAL, updated REAL, skipped_lines INTEGER,
    events_mtime_ns INTEGER, events_size INTEGER, events_ino INTEGER, events_ctime_ns INTEGER,
    events_offset INTEGER, events_line INTEGER, events_sig TEXT,
    config_mtime_ns INTEGER, has_events INTEGER, pid INTEGER, started_at REAL, end_status TEXT,
    finish_loss REAL, last_loss REAL);
CREATE TABLE metrics (run_id TEXT, step INTEGER, {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    PRIMARY KEY (run_id, step));
CREATE TABLE eval (run_id TEXT, step INTEGER, eval_set TEXT, eval_loss REAL, perplexity REAL,
    time REAL, PRIMARY KEY (run_id, step, eval_set));
"""
# Any change of the schema (e.g. a new StepMetrics field) changes this and triggers a rebuild.
SCHEMA_ID = hashlib.sha256(_SCHEMA.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSummary:
    """One History row."""
    id: str
    name: str
    status: str
    model: str
    corpus: str
    created: float
    steps: int
    final_loss: Optional[float]
    eval_loss: Optional[float]
    updated: float
    skipped_lines: int = 0      # damaged lines of events.jsonl left out (each logged as a warning)


def describe_corpus(train_files: list) -> str:
    """A short label for data.train_files: 'sample corpus', 'wiki.txt' or 'wiki.txt + 2 more'."""
    files = [str(f) for f in (train_files or []) if str(f).strip()]
    if not files:
        return "sample corpus"
    first = Path(files[0].rstrip("/\\")).name or files[0]
    return first if len(files) == 1 else f"{first} + {len(files) - 1} more"


class RunIndex:
    """SQLite (WAL) index at workspace.index_path; every call opens and closes its own connection."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.path = workspace.index_path

    # ---- connection ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self):
        """A connection to a usable index; a corrupt or outdated file is deleted and recreated."""
        for attempt in (1, 2):
            conn = sqlite3.connect(self.path, timeout=10)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                row = None
                with contextlib.suppress(sqlite3.OperationalError):   # no meta table: a fresh file
                    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None or row[0] != SCHEMA_ID:
                    self._create_schema(conn)
                break
            except sqlite3.DatabaseError as exc:
                conn.close()
                if attempt == 2 or _disk_full(exc):
                    raise self._unusable(exc) from None
                log.info("rebuilding the run index %s (%s)", self.path, exc)
                self._delete_files()
        try:
            yield conn
            conn.commit()
        finally:
            conn.close()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.executescript(_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_ID,))
        conn.commit()

    def _delete_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{self.path}{suffix}")

    # ---- refresh --------------------------------------------------------------------------------
    def refresh(self, run_id: str | None = None) -> None:
        """Bring the index up to date with the run folders (only `run_id` when given)."""
        try:
            self._refresh(run_id)
        except sqlite3.DatabaseError as exc:
            if _disk_full(exc):
                raise self._unusable(exc) from None
            # Damage found mid-query (not at open): start from scratch, the folders hold everything.
            log.info("run index %s is damaged (%s); rebuilding", self.path, exc)
            self._delete_files()
            try:
                self._refresh(run_id)
            except sqlite3.DatabaseError as again:
                raise self._unusable(again) from None

    def _unusable(self, exc: sqlite3.DatabaseError) -> WorkspaceError:
        """The error a user sees when the index cannot be written (the runs themselves are safe)."""
        folder = self.path.parent
        if _disk_full(exc):
            return DiskFullError(f"Could not update the run index {self.path}: the disk is full "
                                 f"({exc}).", f"Free space at {folder}; the runs themselves are "
                                 "safe, and the list comes back once there is space.")
        return WorkspaceError(f"Could not update the run index {self.path}: {exc}.",
                              f"Check that {folder} is writable and has free space; the runs "
                              "themselves are safe. Deleting index.sqlite is harmless: it is "
                              "rebuilt from the run folders.")

    def _refresh(self, run_id: str | None) -> None:
        runs = {r.id: r for r in self.workspace.list_runs()}
        if run_id is not None:
            runs = {run_id: runs[run_id]} if run_id in runs else {}
        with self._connect() as conn:
            cols = ("id", "events_mtime_ns", "events_size", "events_ino", "events_ctime_ns",
                    "config_mtime_ns", "status", "events_offset", "events_sig")
            where, args = ("WHERE id = ?", (run_id,)) if run_id is not None else ("", ())
            query = f"SELECT {', '.join(cols)} FROM runs {where}"
            known = {row[0]: row for row in conn.execute(query, args)}
            for gone in set(known) - set(runs):
                self._drop(conn, gone)
            for rid, run in runs.items():
                ev, cfg = _stat(run.events_path), _stat(run.config_path)
                row = known.get(rid)
                if row and row[1:6] == (*ev, cfg.mtime_ns) and row[6] != "running":
                    continue        # unchanged; a "running" run is rechecked: its worker may have died
                if row and not _still_appended(run.events_path, ev, read_ino=row[3], offset=row[7],
                                               signature=row[8]):
                    log.info("run index: %s was replaced, not appended to; reading it anew",
                             run.events_path)
                    self._drop(conn, rid)
                    row = None
                self._update(conn, run, ev, cfg, fresh=row is None)

    def _drop(self, conn: sqlite3.Connection, run_id: str) -> None:
        for table, key in (("runs", "id"), ("metrics", "run_id"), ("eval", "run_id")):
            conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (run_id,))

    def _update(self, conn, run: RunDir, ev: _FileStat, cfg: _FileStat, fresh: bool) -> None:
        prev = None if fresh else conn.execute(
            "SELECT events_offset, events_line, has_events, pid, started_at, end_status, steps,"
            " finish_loss, last_loss, skipped_lines FROM runs WHERE id = ?", (run.id,)).fetchone()
        offset, line, has_events, pid, started_at, end, steps, finish_loss, last_loss, skipped = (
            prev or (0, 1, 0, 0, 0.0, None, 0, None, None, 0))
        life = Lifecycle(bool(has_events), pid or 0, started_at or 0.0, end)
        # A damaged line is skipped (and logged) by the reader: the events around it still count.
        batch = run.read_events_since(offset, line)
        skipped = (skipped or 0) + len(batch.skipped)
        metric_rows, eval_rows = [], []
        for event in batch.events:
            life.feed(event)
            if isinstance(event, StepMetrics):
                metric_rows.append((run.id, event.step, *(getattr(event, c) for c in METRIC_COLUMNS)))
                steps, last_loss = max(steps, event.step), event.loss
            elif isinstance(event, EvalMetrics):
                eval_rows.append((run.id, event.step, event.eval_set, event.eval_loss,
                                  event.perplexity, event.time))
            elif isinstance(event, RunFinished):
                steps, finish_loss = max(steps, event.step), event.final_loss
            elif isinstance(event, RunStarted):
                finish_loss = None      # a resumed run is not finished any more
        if metric_rows:
            marks = ", ".join("?" * (2 + len(METRIC_COLUMNS)))
            # A resumed run logs some steps twice; the later value (the timeline that went on) wins.
            conn.executemany(f"INSERT OR REPLACE INTO metrics VALUES ({marks})", metric_rows)
        if eval_rows:
            conn.executemany("INSERT OR REPLACE INTO eval VALUES (?, ?, ?, ?, ?, ?)", eval_rows)
        # History shows the latest held-out loss; without a held-out set, the latest of any set.
        row = conn.execute("SELECT eval_loss FROM eval WHERE run_id = ? "
                           "ORDER BY (eval_set = 'heldout') DESC, step DESC LIMIT 1", (run.id,)).fetchone()
        config = run.raw_config()
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        values = dict(
            id=run.id, name=str(config.get("name") or run.id), status=life.status(),
            model=str(model.get("source") or "default"), corpus=describe_corpus(data.get("train_files")),
            created=run.created_time(), steps=steps,
            final_loss=finish_loss if finish_loss is not None else last_loss,
            eval_loss=row[0] if row else None, updated=max(ev.mtime_ns, cfg.mtime_ns) / 1e9,
            skipped_lines=skipped, events_mtime_ns=ev.mtime_ns, events_size=ev.size,
            events_ino=ev.ino, events_ctime_ns=ev.ctime_ns, events_offset=batch.next_offset,
            events_line=batch.next_line, events_sig=_signature(run.events_path, batch.next_offset),
            config_mtime_ns=cfg.mtime_ns, has_events=int(life.has_events), pid=life.pid,
            started_at=life.started_at, end_status=life.end, finish_loss=finish_loss,
            last_loss=last_loss)
        conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_RUN_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(_RUN_COLUMNS))})",
                     tuple(values[c] for c in _RUN_COLUMNS))

    # ---- queries --------------------------------------------------------------------------------
    def list_runs(self, refresh: bool = True) -> list[RunSummary]:
        """Every run, newest first."""
        if refresh:
            self.refresh()
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM runs "
                                "ORDER BY created DESC, id DESC")
            return [RunSummary(*row) for row in rows]

    def step_metrics(self, run_id: str, refresh: bool = True) -> list[dict]:
        """One dict per logged step (step, loss, lr, embedding_lr, grad_norm, ...), by step."""
        if refresh:
            self.refresh(run_id)
        with self._connect() as conn:
            rows = conn.execute(f"SELECT step, {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run_id = ? "
                                "ORDER BY step", (run_id,))
            return [dict(zip(("step", *METRIC_COLUMNS), row)) for row in rows]

    def eval_metrics(self, run_id: str, refresh: bool = True) -> list[dict]:
        """One dict per (step, eval_set): step, eval_set, eval_loss, perplexity, time."""
        if refresh:
            self.refresh(run_id)
        with self._connect() as conn:
            rows = conn.execute("SELECT step, eval_set, eval_loss, perplexity, time FROM eval "
                                "WHERE run_id = ? ORDER BY step, eval_set", (run_id,))
            return [dict(zip(("step", "eval_set", *EVAL_COLUMNS), row)) for row in rows]


class _FileStat(NamedTuple):
    """What tells a file's versions apart without reading it; all 0 when it does not exist."""
    mtime_ns: int
    size: int
    ino: int
    ctime_ns: int       # POSIX: changes on every write, and no copy tool can set it back


def _stat(path: Path) -> _FileStat:
    try:
        st = path.stat()
    except FileNotFoundError:
        return _FileStat(0, 0, 0, 0)
    return _FileStat(st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


_SIGNATURE_BYTES = 4096


def _signature(path: Path, end: int) -> str:
    """A hash of the first and the last 4 KiB of the bytes [0, end) of a file: appending to the
    file never changes it; replacing the file by other content almost always does."""
    digest = hashlib.sha256(str(end).encode())
    try:
        with open(path, "rb") as fh:
            digest.update(fh.read(min(end, _SIGNATURE_BYTES)))
            tail_start = max(_SIGNATURE_BYTES, end - _SIGNATURE_BYTES)
            if tail_start < end:
                fh.seek(tail_start)
                digest.update(fh.read(end - tail_start))
    except FileNotFoundError:
        pass
    return digest.hexdigest()[:32]


def _still_appended(path: Path, now: _FileStat, read_ino: int, offset: int, signature: str) -> bool:
    """Whether `path` is the file the index read up to `offset`, possibly with lines appended since.
    (Dropping an unfinished last line only cuts bytes beyond the read offset.)"""
    if now.size < offset or (read_ino and now.ino != read_ino):
        return False
    return _signature(path, offset) == signature


def _disk_full(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's words for a full disk ("database or disk is full", SQLITE_FULL)."""
    return "full" in str(exc).lower()
