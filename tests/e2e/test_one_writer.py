"""One writer per run, with real processes: a run still training refuses `resume` and `export`, names
the process that trains it, and is free again once that process is gone, even after a SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from cpt_studio.engine.runs.checkpoints import latest_checkpoint
from cpt_studio.engine.runs.events import RunFailed, RunFinished, RunStarted, StepMetrics, from_json
from cpt_studio.engine.runs.lock import LOCK_FILE, RunBusy
from cpt_studio.engine.runs.runner import cli_argv
from cpt_studio.engine.runs.store import Workspace

CLI = cli_argv()


def _run(args, tmp_path, timeout=300):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)


def test_resume_and_export_of_a_run_still_training_are_refused_until_its_worker_is_gone(
        tmp_path, tiny_config):
    cfg = tiny_config(max_steps=100_000, checkpoint={"every_steps": 2}, eval={"every_steps": 0})
    cfg.save(tmp_path / "run.yaml")
    ws = str(tmp_path / "ws")
    trainer = subprocess.Popen(CLI + ["train", str(tmp_path / "run.yaml"), "--workspace", ws,
                                      "--events", "jsonl"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        run_id = None
        for line in trainer.stdout:
            event = from_json(line)
            run_id = run_id or getattr(event, "run_id", None)
            if isinstance(event, StepMetrics) and event.step == 3:   # step-2 checkpoint written
                break
        run = Workspace(ws).get_run(run_id)

        resume = _run(["resume", run_id, "--workspace", ws, "--events", "jsonl", "--max-steps", "3"],
                      tmp_path)
        assert resume.returncode == 2, resume.stderr[-2000:]
        assert f"pid {trainer.pid}" in resume.stderr and "since" in resume.stderr
        refusal = from_json(resume.stdout.splitlines()[-1])        # what the studio shows
        assert isinstance(refusal, RunFailed) and refusal.kind == "busy"
        assert f"pid {trainer.pid}" in refusal.message

        export = _run(["export", run_id, "--dtype", "fp32", "--workspace", ws], tmp_path)
        assert export.returncode == 2 and f"pid {trainer.pid}" in export.stderr
        assert not (run.path / "exports").exists()
        with pytest.raises(RunBusy):
            Workspace(ws).delete_run(run_id)

        assert sum(isinstance(e, RunStarted) for e in run.read_events()) == 1   # nobody else wrote
        assert not any(isinstance(e, (RunFailed, RunFinished)) for e in run.read_events())
        assert run.load_config().training.max_steps == 100_000
    finally:
        trainer.kill()                          # SIGKILL: the lock stays behind, stale
        trainer.wait(timeout=60)
    assert trainer.returncode == -signal.SIGKILL and (run.path / LOCK_FILE).exists()

    last = int(latest_checkpoint(run).name.split("-")[1])   # the trainer went on until the kill
    resume = _run(["resume", run_id, "--workspace", ws, "--events", "jsonl",
                   "--max-steps", str(last + 2)], tmp_path)
    assert resume.returncode == 0, resume.stderr[-2000:]
    events = [from_json(line) for line in resume.stdout.splitlines()]
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [last + 1, last + 2]
    assert isinstance(events[-1], RunFinished)
    assert not (run.path / LOCK_FILE).exists() and run.status() == "finished"
