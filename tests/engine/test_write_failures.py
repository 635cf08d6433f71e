"""Writes that fail: a full disk is our error naming the folder, the earlier copy survives, and what
killed writers leave in a run folder is removed by the next writer (never a live process's)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from safetensors import SafetensorError

from cpt_studio.engine import atomic
from cpt_studio.engine.atomic import publish_dir_atomic, write_text_atomic
from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import DiskFullError, WorkspaceError, is_disk_full, write_error
from cpt_studio.engine.runs.events import Log, RunStarted
from cpt_studio.engine.runs.leftovers import remove_leftovers
from cpt_studio.engine.runs.sinks import FanOut, ListSink, RunFolderSink, UntilStarted
from cpt_studio.engine.runs.store import Workspace

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def run(tmp_path):
    return Workspace(tmp_path / "ws").create_run(RunConfig(name="writes"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_full_disk_is_recognised_however_a_library_wraps_it(tmp_path):
    assert is_disk_full(ENOSPC) and is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on "
                                        "device (os error 28)"))
    try:
        try:
            raise ENOSPC
        except OSError as exc:
            raise RuntimeError("saving failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    # torch.save's own text says nothing of the disk: only a nearly full folder makes it one.
    assert not is_disk_full(RuntimeError("PytorchStreamWriter failed writing file"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("no"))


def test_write_error_names_the_folder_and_the_next_step(tmp_path):
    error = write_error(ENOSPC, "the final adapter", tmp_path, lambda: "resume the run")
    assert isinstance(error, DiskFullError) and error.kind == "disk_full"
    assert error.message.startswith(f"Could not write the final adapter in {tmp_path}: no space "
                                    "left on device (")
    assert error.hint == f"Free space at {tmp_path}, then resume the run."
    quota = write_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "x", tmp_path)
    assert "disk quota exceeded" in quota.message
    denied = write_error(PermissionError(errno.EACCES, "Permission denied"), "x", tmp_path)
    assert type(denied) is WorkspaceError and "Permission denied" in denied.message
    assert f"Check that {tmp_path} exists and is writable" in denied.hint
    assert write_error(ValueError("a bug"), "x", tmp_path) is None
    assert write_error(KeyboardInterrupt(), "x", tmp_path) is None


def test_a_full_disk_under_the_event_log_is_said_and_the_console_still_sees_the_event(
        run, monkeypatch):
    def full(event):
        raise ENOSPC

    monkeypatch.setattr(run, "append_event", full)
    console = ListSink()
    event = Log(level="info", message="hello")
    with pytest.raises(DiskFullError, match="events.jsonl") as info:
        FanOut(RunFolderSink(run), console).emit(event)
    assert str(run.path) in info.value.message and f"Free space at {run.path}" in info.value.hint
    assert console.events == [event]


def test_until_started_writes_nothing_unless_training_starts(run):
    before = run.events_path.read_bytes() if run.events_path.exists() else b""
    sink = UntilStarted(RunFolderSink(run))
    sink.emit(Log(level="warning", message="checking checkpoints"))
    sink.close()                                      # failed before RunStarted: nothing written
    assert (run.events_path.read_bytes() if run.events_path.exists() else b"") == before

    sink = UntilStarted(RunFolderSink(run))
    sink.emit(Log(level="warning", message="first"))
    started = RunStarted(run_id=run.id, name="writes", config={})
    sink.emit(started)
    sink.emit(Log(level="info", message="after"))
    assert [getattr(e, "message", "") for e in run.read_events()] == ["first", "", "after"]


def test_leftovers_of_dead_writers_go_those_of_live_ones_stay(run):
    dead = dead_pid()
    adapter_tmp = run.path / f".adapter.tmp-{dead}"
    adapter_tmp.mkdir()
    (adapter_tmp / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    config_tmp = run.path / f".config.yaml.tmp-{dead}-k2j4"
    config_tmp.write_text("half")
    export_tmp = run.exports_dir / f".merged-bf16.tmp-{dead}-x8"
    export_tmp.mkdir(parents=True)
    ckpt_tmp = run.checkpoints_dir / f".step-3.tmp-{dead}-ab"
    ckpt_tmp.mkdir(parents=True)
    live = [run.path / ".adapter.tmp-1", run.checkpoints_dir / ".step-4.tmp-1-cd",
            run.path / f".adapter.tmp-{os.getpid()}"]    # pid 1 always runs; so do we
    for path in live:
        path.mkdir()

    removed = remove_leftovers(run)
    assert sorted(p.name for p in removed) == sorted(
        p.name for p in (adapter_tmp, config_tmp, export_tmp, ckpt_tmp))
    assert not any(p.exists() for p in (adapter_tmp, config_tmp, export_tmp, ckpt_tmp))
    assert all(p.exists() for p in live)
    assert (run.path / "config.yaml").is_file() and remove_leftovers(run) == []


def test_an_adapter_replace_cut_between_its_renames_is_settled(run):
    old = run.path / ".adapter.old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"earlier")
    remove_leftovers(run)                             # adapter/ missing: the old one is the only copy
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == b"earlier"
    assert not old.exists()
    old.mkdir()
    remove_leftovers(run)                             # adapter/ there: the new one was published
    assert not old.exists() and run.adapter_dir.is_dir()


def test_publish_puts_the_earlier_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "adapter", tmp_path / ".adapter.tmp-1"
    final.mkdir()
    (final / "w").write_text("earlier")
    tmp.mkdir()
    (tmp / "w").write_text("new")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise ENOSPC
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError):
        publish_dir_atomic(tmp, final)
    assert (final / "w").read_text() == "earlier" and not (tmp_path / ".adapter.old").exists()


def test_atomic_temp_files_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    real = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (seen.append(src), real(src, dst)))
    write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert os.path.basename(seen[0]).startswith(f".config.yaml.tmp-{os.getpid()}-")


def test_dead_writers_temp_folders_beside_a_model_or_export_are_removed(tmp_path):
    """The GGUF conversion and the merged export share the run folder's pid rule."""
    from cpt_studio.engine.runs.leftovers import remove_dead_temp_dirs

    dead = dead_pid()
    final = tmp_path / "merged-bf16"
    gone = tmp_path / f".merged-bf16.tmp-{dead}-x8"
    kept = [tmp_path / ".merged-bf16.tmp-1-ab", tmp_path / f".merged-bf16.tmp-{os.getpid()}-cd",
            tmp_path / ".other.tmp-99999999-ef"]       # a live writer, ours, another name
    for folder in (gone, *kept):
        folder.mkdir()
    (tmp_path / f".merged-bf16.tmp-{dead}-file").write_text("a file, not a folder")
    assert remove_dead_temp_dirs(final) == [gone]
    assert not gone.exists() and all(k.is_dir() for k in kept)
    assert (tmp_path / f".merged-bf16.tmp-{dead}-file").is_file()
