"""The run lock: one writer per run, a refusal that names the live holder, stale locks cleared."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.model.export import export_merged
from cpt_studio.engine.runs.lock import LOCK_FILE, RunBusy, RunLock, read_holder
from cpt_studio.engine.runs.store import Workspace

HOLD = """
import sys, time
from cpt_studio.engine.runs.lock import RunLock
lock = RunLock(sys.argv[1], "export").acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws")


@pytest.fixture
def run(ws):
    return ws.create_run(RunConfig(name="locked"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run, **fields) -> None:
    holder = {"pid": os.getpid(), "started_at": psutil.Process().create_time(), "host": "",
              "purpose": "train", "since": time.time(), "token": "abc"}
    holder.update(fields)
    if not holder["host"]:
        import socket
        holder["host"] = socket.gethostname()
    (run.path / LOCK_FILE).write_text(json.dumps(holder), encoding="utf-8")


def test_a_second_writer_is_refused_naming_the_holder_and_since_when(run):
    with RunLock(run, "train"):
        with pytest.raises(RunBusy) as refused:
            RunLock(run, "resume").acquire()
        message = refused.value.message
        assert run.id in message and f"pid {os.getpid()}" in message and "since" in message
        assert "training" in message
        assert refused.value.holder.pid == os.getpid()
        assert "stop" in refused.value.hint.lower()
    assert not (run.path / LOCK_FILE).exists()
    with RunLock(run, "resume"):          # free again
        assert read_holder(run).purpose == "resume"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_after_an_exception_or_an_interrupt(run, error):
    with pytest.raises(error):
        with RunLock(run, "train"):
            raise error("boom")
    assert not (run.path / LOCK_FILE).exists()
    RunLock(run, "train").acquire().release()


def test_a_lock_held_by_another_live_process_is_refused_until_it_is_sigkilled(run, tmp_path):
    holder = subprocess.Popen([sys.executable, "-P", "-c", HOLD, str(run.path)], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy) as refused:
            RunLock(run, "resume").acquire()
        assert f"pid {holder.pid}" in refused.value.message and "export" in refused.value.message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (run.path / LOCK_FILE).exists()            # SIGKILL leaves it behind ...
    with RunLock(run, "resume"):                       # ... and the next writer clears it as stale
        assert read_holder(run).pid == os.getpid()


@pytest.mark.parametrize("stale", ["dead pid", "reused pid"])
def test_a_stale_lock_is_cleared(run, stale):
    if stale == "dead pid":
        write_lock(run, pid=dead_pid())
    else:    # our pid, but the holder started long before this process: the pid was reused
        write_lock(run, started_at=1000.0)
    with RunLock(run, "train"):
        assert read_holder(run).purpose == "train" and read_holder(run).token != "abc"
    assert not list(run.path.glob(LOCK_FILE + "*"))       # nothing left beside it either


def test_an_unreadable_lock_is_busy_while_young_and_stale_when_old(run):
    lock = run.path / LOCK_FILE
    lock.write_bytes(b"")                      # a writer between creating the file and filling it
    with pytest.raises(RunBusy):
        RunLock(run, "train").acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))                 # ... or one killed there long ago
    RunLock(run, "train").acquire().release()


def test_a_lock_from_another_host_is_respected_and_the_hint_names_the_file(run):
    write_lock(run, host="elsewhere.example", pid=dead_pid())
    with pytest.raises(RunBusy) as refused:
        RunLock(run, "train").acquire()
    assert "elsewhere.example" in refused.value.message
    assert str(run.path / LOCK_FILE) in refused.value.hint


def test_racing_writers_on_a_stale_lock_get_exactly_one_lock(run):
    write_lock(run, pid=dead_pid())
    barrier, won, refused = threading.Barrier(8), [], []

    def writer(i):
        barrier.wait()
        try:
            won.append(RunLock(run, f"writer {i}").acquire())
        except RunBusy:
            refused.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert read_holder(run).token == won[0].holder.token
    won[0].release()
    assert not list(run.path.glob(LOCK_FILE + "*"))


def test_delete_rename_and_export_of_a_locked_run_are_refused(ws, run):
    (run.adapter_dir).mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    with RunLock(run, "train"):
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            ws.delete_run(run.id)
        with pytest.raises(RunBusy):
            ws.rename_run(run.id, "new name")
        with pytest.raises(RunBusy):
            export_merged(run.id, None, ws, dtype="fp32")
        assert run.path.is_dir() and run.name == "locked"
    ws.rename_run(run.id, "new name")
    assert run.name == "new name"
    ws.delete_run(run.id)
    assert not run.path.exists()
