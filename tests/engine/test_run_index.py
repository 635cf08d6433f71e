"""The History index: built from run folders, refreshed incrementally, rebuilt when lost or damaged."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import EvalMetrics, RunFinished, RunStarted, StepMetrics
from cpt_studio.engine.runs.index import RunIndex, RunSummary, describe_corpus
from cpt_studio.engine.runs.store import Workspace


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


def test_a_damaged_log_does_not_hide_the_other_runs(ws):
    good = finished_run(ws, name="good")
    bad = finished_run(ws, name="bad")
    index = RunIndex(ws)
    index.list_runs()
    with open(bad.events_path, "ab") as fh:
        fh.write(b"not an event\n")
    bad.append_event(step(9, 1.0))
    rows = {r.name: r.status for r in index.list_runs()}
    assert rows == {"good": "finished", "bad": "failed"}
    # Once the bad line is removed, the run reads normally again.
    lines = bad.events_path.read_bytes().splitlines(keepends=True)
    bad.events_path.write_bytes(b"".join(line for line in lines if not line.startswith(b"not an")))
    assert {r.name: r.status for r in index.list_runs()}["bad"] == "finished"
    assert index.step_metrics(bad.id)[-1]["step"] == 9
