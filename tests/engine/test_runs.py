"""The run store: run folders, the events file, status, commands, and names that must not escape."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import WorkspaceError
from cpt_studio.engine.runs.events import Log, Phase, RunFailed, RunFinished, RunStarted, StepMetrics
from cpt_studio.engine.runs.store import (RunDir, Workspace, default_workspace_root, send_command, slugify,
                                    take_command)


def started(pid: int = 0, **kw) -> RunStarted:
    return RunStarted(run_id="r", name="r", config={}, pid=pid, **kw)


def step(n: int, loss: float = 2.0, **kw) -> StepMetrics:
    return StepMetrics(step=n, epoch=0.1, loss=loss, lr=1e-4, embedding_lr=1e-5, grad_norm=1.0,
                       tokens_seen=100 * n, tokens_per_s=1000.0, step_s=0.1, **kw)


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_workspace_root_follows_argument_env_then_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_STUDIO_HOME", str(tmp_path / "env"))
    assert Workspace().root == (tmp_path / "env").resolve()
    assert Workspace(tmp_path / "arg").root == (tmp_path / "arg").resolve()
    monkeypatch.delenv("CPT_STUDIO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_workspace_root() == tmp_path / "xdg" / "cpt-studio"
    ws = Workspace(tmp_path / "lazy")
    assert not ws.root.exists()            # nothing is created until used
    assert ws.runs_dir.is_dir() and ws.models_dir.is_dir() and ws.cache_dir.is_dir()
    assert ws.index_path == ws.root / "index.sqlite"


def test_create_run_names_folder_after_time_and_slug(ws):
    run = ws.create_run(RunConfig(name="Esperanto r16: Wiki!"))
    assert run.id[:15] == time.strftime("%Y%m%d-%H%M%S", time.localtime(run.created_time()))
    assert run.id.endswith("-esperanto-r16-wiki")
    assert run.load_config().name == "Esperanto r16: Wiki!" and run.status() == "created"
    again = ws.create_run(RunConfig(name="esperanto r16 wiki"))
    assert again.id != run.id            # same second and slug -> a counter suffix
    assert len(slugify("x" * 100)) == 40 and slugify("***") == "run"


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc", "..", "a\\b", "nul\x00name", "  "])
def test_names_that_look_like_paths_are_rejected(ws, name):
    with pytest.raises(WorkspaceError) as info:
        ws.create_run(RunConfig(name=name))
    assert info.value.hint
    assert not any(ws.runs_dir.iterdir())


@pytest.mark.parametrize("run_id", ["../x", "..", "/etc", "nope", "a\x00b"])
def test_get_run_never_leaves_the_workspace(ws, run_id):
    ws.create_run(RunConfig(name="real"))
    with pytest.raises(WorkspaceError):
        ws.get_run(run_id)


def test_get_run_by_id_or_path(ws, tmp_path):
    run = ws.create_run(RunConfig(name="one"))
    assert ws.get_run(run.id) == run
    assert ws.get_run(str(run.path)) == run
    with pytest.raises(WorkspaceError, match="not a run folder"):
        ws.get_run(str(tmp_path))


def test_rename_duplicate_delete_and_list(ws):
    run = ws.create_run(RunConfig(name="first"))
    run.append_event(Log(level="info", message="x", pid=dead_pid()))   # a worker that is gone
    ws.rename_run(run.id, "better name")
    assert run.load_config().name == "better name" and run.path.is_dir()
    with pytest.raises(WorkspaceError):
        ws.rename_run(run.id, "../evil")
    copy = ws.duplicate_run(run.id, "copy")
    assert copy.load_config().training == run.load_config().training
    assert copy.load_config().name == "copy" and copy.read_events() == []
    assert [r.id for r in ws.list_runs()] == sorted([run.id, copy.id])
    ws.delete_run(run.id)
    assert not run.path.exists() and ws.list_runs() == [copy]


def test_running_run_cannot_be_deleted(ws):
    run = ws.create_run(RunConfig(name="busy"))
    run.append_event(started(pid=os.getpid()))
    with pytest.raises(WorkspaceError, match="still training"):
        ws.delete_run(run.id)


def test_events_round_trip_and_half_written_last_line_is_tolerated(ws):
    run = ws.create_run(RunConfig(name="ev"))
    run.append_event(started(pid=os.getpid()))
    run.append_event(step(1))
    with open(run.events_path, "ab") as fh:     # a kill in the middle of writing step 2
        fh.write(b'{"type":"StepMetrics","v":1,"step":2,"lo')
    events = run.read_events()
    assert [type(e).__name__ for e in events] == ["RunStarted", "StepMetrics"]
    assert (events[1].step, events[1].loss) == (1, 2.0)
    # The next writer (a resume) drops the fragment instead of gluing its line onto it.
    run.append_event(step(2, loss=1.5))
    assert [e.step for e in run.read_events()[1:]] == [1, 2]

    only_fragment = ws.create_run(RunConfig(name="frag"))
    only_fragment.events_path.write_bytes(b'{"type":"RunSta')
    assert only_fragment.read_events() == [] and only_fragment.status() == "created"
    only_fragment.append_event(step(1))
    assert len(only_fragment.read_events()) == 1


def test_a_bad_line_in_the_middle_is_skipped_and_reported(ws, caplog):
    """A stray line (an edit, bytes of a crashed write) costs that line only: the events around it,
    and the status they give (here: killed, then resumed to the end), stay readable."""
    run = ws.create_run(RunConfig(name="bad"))
    killed = dead_pid()
    run.append_event(started(pid=killed))
    run.append_event(step(1, pid=killed))
    with open(run.events_path, "ab") as fh:
        fh.write(b'{"type":"StepMetrics","v":1,"step":2,"lo\x00\xff\n')
    run.append_event(started(pid=os.getpid(), resumed_from_step=1))
    run.append_event(step(2, pid=os.getpid()))
    run.append_event(RunFinished(step=2, final_loss=1.5))
    with caplog.at_level(logging.WARNING, logger="cpt_studio.engine.runs.store"):
        batch = run.read_events_since(0)
    assert [type(e).__name__ for e in batch.events] == [
        "RunStarted", "StepMetrics", "RunStarted", "StepMetrics", "RunFinished"]
    assert [line for line, _reason in batch.skipped] == [3] and batch.next_line == 7
    assert f"{run.events_path}, line 3: not a valid event" in caplog.text and "skipped" in caplog.text
    assert run.status() == "finished" and len(run.read_events()) == 5


def test_status_follows_the_events(ws):
    run = ws.create_run(RunConfig(name="st"))
    assert run.status() == "created"
    run.append_event(started(pid=os.getpid()))
    assert run.status() == "running"
    run.append_event(RunFinished(step=5, final_loss=1.0))
    assert run.status() == "finished"
    run.append_event(started(pid=os.getpid(), resumed_from_step=5))   # a resume: alive again
    run.append_event(RunFinished(step=7, stopped_early=True))
    assert run.status() == "stopped"
    run.append_event(started(pid=os.getpid()))
    run.append_event(RunFailed(kind="oom", message="CUDA out of memory"))
    assert run.status() == "failed"

    killed = ws.create_run(RunConfig(name="killed"))
    worker = dead_pid()
    killed.append_event(started(pid=worker))
    killed.append_event(step(1, pid=worker))
    assert killed.status() == "interrupted"


def test_every_process_writing_the_run_is_told_apart_by_its_pid(ws):
    run = ws.create_run(RunConfig(name="lives"))
    worker = dead_pid()
    run.append_event(started(pid=worker))
    run.append_event(step(1, pid=worker))
    assert run.status() == "interrupted"
    # The GUI records why its worker died: an end written by another (live) process closes the
    # worker's life; it does not start a life of the GUI's own.
    run.append_event(RunFailed(kind="crash", message="worker exited", pid=os.getpid()))
    assert run.status() == "failed"
    # A resume loading its model has not sent RunStarted yet; its first event starts a new life.
    run.append_event(Phase(phase="loading_model", pid=os.getpid()))
    assert run.status() == "running"
    # A line from a log written before events carried pids reads as pid 0: no one new.
    with open(run.events_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": "Log", "v": 1, "time": time.time(), "level": "info",
                             "message": "old"}) + "\n")
    assert run.read_events()[-1].pid == 0 and run.status() == "running"


def test_reused_pid_is_not_mistaken_for_the_worker(ws):
    run = ws.create_run(RunConfig(name="old"))
    # Our pid, but the event claims the worker started long before this process existed.
    run.append_event(RunStarted(run_id="r", name="r", config={}, pid=os.getpid(), time=1000.0))
    assert run.status() == "interrupted"


def test_commands_via_control_file(ws):
    run = ws.create_run(RunConfig(name="ctl"))
    assert take_command(run) is None
    send_command(run, "save_now")
    send_command(run, "stop_and_save")          # the latest command wins
    assert take_command(run) == "stop_and_save"
    assert take_command(run) is None and not run.control_path.exists()
    with pytest.raises(WorkspaceError, match="Unknown run command"):
        send_command(run, "rm -rf")
    run.control_path.write_text("launch\n")
    assert take_command(run) is None            # garbage is dropped, never crashes the trainer
    assert not any(p.name.startswith(".control") for p in run.path.iterdir())


def test_rundir_layout(tmp_path):
    run = RunDir(tmp_path / "20250101-120000-x")
    assert run.id == "20250101-120000-x"
    assert [p.name for p in (run.config_path, run.events_path, run.control_path, run.checkpoints_dir,
                             run.adapter_dir, run.exports_dir)] == [
        "config.yaml", "events.jsonl", "control", "checkpoints", "adapter", "exports"]
    assert run.name == run.id                 # no config yet: the id is shown


def test_a_run_whose_config_cannot_be_written_leaves_no_folder(ws, monkeypatch):
    """A full disk under config.yaml: no run folder without its config (the runs list would show
    a run that can never be read or resumed)."""
    import errno

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(RunConfig, "save", full)
    with pytest.raises(OSError):
        ws.create_run(RunConfig(name="no room"))
    assert list(ws.runs_dir.iterdir()) == []
