"""The History index: built from run folders, refreshed incrementally, rebuilt when lost or damaged."""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import (EvalMetrics, Log, RunFinished, RunStarted, StepMetrics,
                                           to_json)
from cpt_studio.engine.runs.index import RunIndex, RunSummary, describe_corpus
from cpt_studio.engine.runs.store import RunDir, Workspace


def step(n: int, loss: float) -> StepMetrics:
    return StepMetrics(step=n, epoch=0.0, loss=loss, lr=1e-4, embedding_lr=1e-5, grad_norm=0.5,
                       tokens_seen=64 * n, tokens_per_s=900.0, step_s=0.07, gpu_mem_allocated=1e9)


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws")


def finished_run(ws, name="wiki", losses=(3.0, 2.5, 2.0)):
    cfg = RunConfig(name=name)
    cfg.data.train_files = ["/data/eo/wiki.txt", "/data/eo/news.txt"]
    cfg.model.source = "HuggingFaceTB/SmolLM2-135M"
    run = ws.create_run(cfg)
    run.append_event(RunStarted(run_id=run.id, name=name, config={}, pid=os.getpid()))
    run.append_event(EvalMetrics(step=0, eval_set="heldout", eval_loss=3.2, perplexity=24.5))
    for i, loss in enumerate(losses, 1):
        run.append_event(step(i, loss))
    run.append_event(EvalMetrics(step=len(losses), eval_set="retention", eval_loss=2.9, perplexity=18.2))
    run.append_event(EvalMetrics(step=len(losses), eval_set="heldout", eval_loss=2.1, perplexity=8.2))
    run.append_event(RunFinished(step=len(losses), final_loss=losses[-1]))
    return run


def test_summary_and_metrics_come_from_the_run_folders(ws):
    run = finished_run(ws)
    ws.create_run(RunConfig(name="fresh"))
    index = RunIndex(ws)
    rows = {r.name: r for r in index.list_runs()}
    summary = rows["wiki"]
    assert isinstance(summary, RunSummary)
    assert (summary.id, summary.status, summary.steps, summary.final_loss, summary.eval_loss) == (
        run.id, "finished", 3, 2.0, 2.1)
    assert summary.model == "HuggingFaceTB/SmolLM2-135M" and summary.corpus == "wiki.txt + 1 more"
    assert (rows["fresh"].status, rows["fresh"].model, rows["fresh"].corpus) == (
        "created", "default", "sample corpus")
    metrics = index.step_metrics(run.id)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["loss"] == 2.0
    assert metrics[0]["embedding_lr"] == 1e-5 and metrics[0]["gpu_mem_allocated"] == 1e9
    evals = index.eval_metrics(run.id)
    assert [(e["step"], e["eval_set"]) for e in evals] == [(0, "heldout"), (3, "heldout"), (3, "retention")]
    assert evals[1]["perplexity"] == 8.2


def test_refresh_sees_new_events_of_a_running_run(ws):
    run = ws.create_run(RunConfig(name="live"))
    run.append_event(RunStarted(run_id=run.id, name="live", config={}, pid=os.getpid()))
    run.append_event(step(1, 3.0))
    index = RunIndex(ws)
    assert index.list_runs()[0].status == "running"
    assert len(index.step_metrics(run.id)) == 1
    run.append_event(step(2, 2.7))
    with open(run.events_path, "ab") as fh:        # the worker is half way through line 3
        fh.write(b'{"type":"StepMet')
    assert [m["loss"] for m in index.step_metrics(run.id)] == [3.0, 2.7]
    run.append_event(step(3, 2.4))                 # the fragment is replaced by the full line
    summary = index.list_runs()[0]
    assert (summary.steps, summary.final_loss) == (3, 2.4)
    run.append_event(RunFinished(step=3, final_loss=2.35))
    assert index.list_runs()[0].status == "finished" and index.list_runs()[0].final_loss == 2.35


def test_resumed_steps_replace_the_abandoned_ones(ws):
    run = finished_run(ws, losses=(3.0, 2.5))
    run.append_event(RunStarted(run_id=run.id, name="wiki", config={}, pid=os.getpid(), resumed_from_step=1))
    run.append_event(step(2, 2.2))
    index = RunIndex(ws)
    summary = index.list_runs()[0]
    assert summary.status == "running" and summary.final_loss == 2.2
    assert [m["loss"] for m in index.step_metrics(run.id)] == [3.0, 2.2]


def test_deleted_index_is_rebuilt_silently(ws):
    run = finished_run(ws)
    index = RunIndex(ws)
    before = index.list_runs()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{ws.index_path}{suffix}"):
            os.remove(f"{ws.index_path}{suffix}")
    assert RunIndex(ws).list_runs() == before
    assert len(RunIndex(ws).step_metrics(run.id)) == 3


def test_corrupt_index_is_rebuilt_silently(ws):
    finished_run(ws)
    ws.index_path.write_bytes(b"this is not a database" * 100)
    rows = RunIndex(ws).list_runs()
    assert [r.status for r in rows] == ["finished"]
    with sqlite3.connect(ws.index_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_deleted_and_renamed_runs_are_followed(ws):
    keep = finished_run(ws, name="keep")
    gone = finished_run(ws, name="gone")
    index = RunIndex(ws)
    assert len(index.list_runs()) == 2
    ws.delete_run(gone.id)
    ws.rename_run(keep.id, "kept")
    os.utime(keep.config_path, ns=(0, os.stat(keep.config_path).st_mtime_ns + 10**9))
    rows = index.list_runs()
    assert [r.name for r in rows] == ["kept"]
    assert index.step_metrics(gone.id) == []


def test_describe_corpus():
    assert describe_corpus([]) == "sample corpus"
    assert describe_corpus(["corpus/"]) == "corpus"
    assert describe_corpus(["a.txt", "b.txt", "c.txt"]) == "a.txt + 2 more"


def test_running_run_becomes_interrupted_when_its_worker_dies(ws):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        run = ws.create_run(RunConfig(name="doomed"))
        run.append_event(RunStarted(run_id=run.id, name="doomed", config={}, pid=worker.pid))
        index = RunIndex(ws)
        assert index.list_runs()[0].status == "running"
    finally:
        worker.kill()
        worker.wait()
    # No new event was written: the index must still notice the worker is gone.
    assert index.list_runs()[0].status == "interrupted"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_then_resumed(ws, name="wiki", garbage=b"not an event\n", index=None):
    """A worker killed after step 2, a damaged line, then a resume that finishes at step 4; with
    `index`, it reads the run once while the run is interrupted."""
    run = ws.create_run(RunConfig(name=name))
    first = dead_pid()
    run.append_event(RunStarted(run_id=run.id, name=name, config={}, pid=first))
    for n in (1, 2):
        run.append_event(dataclasses.replace(step(n, 3.0 - n / 10), pid=first))
    if index is not None:
        assert index.list_runs()[0].status == "interrupted"
    with open(run.events_path, "ab") as fh:
        fh.write(garbage)
    run.append_event(RunStarted(run_id=run.id, name=name, config={}, resumed_from_step=2))
    for n in (3, 4):
        run.append_event(step(n, 3.0 - n / 10))
    run.append_event(RunFinished(step=4, final_loss=2.6))
    return run


@pytest.mark.parametrize("read_before", [False, True], ids=["read-after", "read-while-interrupted"])
@pytest.mark.parametrize("garbage", [b"not an event\n", b'{"type":"StepMetrics","v":1,"st\x00\n',
                                     b'{"type":"Future","v":1}\n', b"\xff\xfe\n"],
                         ids=["text", "torn-write", "unknown-type", "not-utf8"])
def test_a_damaged_line_is_skipped_and_the_resumed_run_shows_finished(ws, read_before, garbage):
    index = RunIndex(ws)
    good = finished_run(ws, name="good")
    run = killed_then_resumed(ws, garbage=garbage, index=index if read_before else None)
    rows = {r.name: r for r in index.list_runs()}
    summary = rows["wiki"]
    assert (summary.status, summary.steps, summary.final_loss) == ("finished", 4, 2.6)
    assert summary.skipped_lines == 1
    assert [m["step"] for m in index.step_metrics(run.id)] == [1, 2, 3, 4]
    assert (rows["good"].status, rows["good"].skipped_lines) == ("finished", 0)
    # The count stays as it is on later refreshes (the line is not counted twice) ...
    run.append_event(Log(level="info", message="after"))
    assert {r.name: r.skipped_lines for r in index.list_runs()} == {"good": 0, "wiki": 1}
    # ... and goes back to 0 once the line is removed.
    lines = run.events_path.read_bytes().splitlines(keepends=True)
    run.events_path.write_bytes(b"".join(line for line in lines if line != garbage))
    assert {r.name: r.skipped_lines for r in index.list_runs()} == {"good": 0, "wiki": 0}
    assert good.status() == "finished"


def _write_over(path, data: bytes, *, same_inode: bool, mtime_ns: int | None = None) -> None:
    if same_inode:                      # `cp backup/events.jsonl run/` writes into the file
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.write(data)
    else:                               # `rsync`, `tar x`, `cp -a` of the folder: a new file
        tmp = path.with_name("restored.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    if mtime_ns is not None:            # `cp -p` / `rsync -t` keep the backup's times
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.parametrize("same_inode", [True, False], ids=["copied-into", "replaced"])
def test_a_restored_longer_events_file_is_read_anew(ws, same_inode):
    run = finished_run(ws, losses=(3.0, 2.5, 2.0))
    index = RunIndex(ws)
    assert index.list_runs()[0].steps == 3
    worker = dead_pid()                 # the backup holds another history, of six steps
    history = [RunStarted(run_id=run.id, name="wiki", config={}, pid=worker)]
    history += [dataclasses.replace(step(n, loss), pid=worker)
                for n, loss in enumerate((2.9, 2.7, 2.5, 2.3, 2.1, 1.9), 1)]
    history.append(RunFinished(step=6, final_loss=1.9, stopped_early=True, pid=worker))
    restored = "".join(to_json(e) + "\n" for e in history).encode()
    assert len(restored) > run.events_path.stat().st_size
    _write_over(run.events_path, restored, same_inode=same_inode)
    summary = index.list_runs()[0]
    assert (summary.status, summary.steps, summary.final_loss) == ("stopped", 6, 1.9)
    assert [m["loss"] for m in index.step_metrics(run.id)] == [2.9, 2.7, 2.5, 2.3, 2.1, 1.9]
    assert index.eval_metrics(run.id) == []             # the old run's evals are gone too


@pytest.mark.parametrize("same_inode", [True, False], ids=["copied-into", "replaced"])
def test_a_restored_file_of_the_same_size_and_time_is_read_anew(ws, same_inode):
    run = finished_run(ws, losses=(3.0, 2.5, 2.0))
    index = RunIndex(ws)
    assert index.list_runs()[0].final_loss == 2.0
    before = run.events_path.stat()
    # The backup differs in one digit of the last loss: same size, and its time set back.
    data = run.events_path.read_bytes()
    old_end = b'"final_loss":2.0'
    assert data.count(old_end) == 1
    time.sleep(0.05)                    # file times tick coarsely: let the write land on a new tick
    _write_over(run.events_path, data.replace(old_end, b'"final_loss":1.0'), same_inode=same_inode,
                mtime_ns=before.st_mtime_ns)
    after = run.events_path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert index.list_runs()[0].final_loss == 1.0


def test_appended_lines_are_read_on_from_where_the_index_stopped(ws, monkeypatch):
    """Telling a replaced file apart must not cost appends their incremental read."""
    run = finished_run(ws)
    index = RunIndex(ws)
    index.list_runs()
    read_from = []
    real_read = RunDir.read_events_since
    monkeypatch.setattr(RunDir, "read_events_since",
                        lambda self, offset=0, line=1: read_from.append(offset) or real_read(self, offset, line))
    size = run.events_path.stat().st_size
    with open(run.events_path, "ab") as fh:    # a writer killed half way through a line ...
        fh.write(b'{"type":"Log","v":1,"le')
    index.list_runs()
    run.append_event(step(4, 1.8))             # ... whose fragment the next one drops
    assert index.list_runs()[0].steps == 4
    assert read_from == [size, size]
