"""Stop signals to a real training process: SIGTERM / SIGHUP stop and save, a second one stops at once.

`kill`, `timeout`, `docker stop`, systemd and Slurm send SIGTERM; a closed terminal sends SIGHUP.
Each must end the run like Ctrl-C does: the step in progress ends, a checkpoint and the adapter are
saved, a stop event is written, and `resume` goes on from there.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpt_studio.engine import cli
from cpt_studio.engine.runs.checkpoints import latest_checkpoint
from cpt_studio.engine.runs.events import (CheckpointSaved, Log, RunFinished, RunStarted, StepMetrics,
                                           from_json)
from cpt_studio.engine.runs.runner import WorkerProcess, cli_argv, worker_argv_train
from cpt_studio.engine.runs.store import Workspace
from cpt_studio.engine.train import loop as train_loop
from cpt_studio.studio.run_controller import _describe_end

CLI = cli_argv()


def _long_run(tiny_config, tmp_path, **sections) -> Path:
    """A run far longer than any test waits for; no checkpoint or eval of its own."""
    cfg = tiny_config(max_steps=100_000, checkpoint={"every_steps": 0}, eval={"every_steps": 0},
                      **sections)
    path = tmp_path / "run.yaml"
    cfg.save(path)
    return path


def _leftovers(run_path: Path) -> list[str]:
    """Lock files and temp folders a clean end must not leave."""
    hidden = [p for p in run_path.rglob(".*") if p.name != ".gitkeep"]
    return sorted(str(p.relative_to(run_path)) for p in hidden)


def test_sigterm_to_the_gui_worker_saves_checkpoint_and_adapter_then_resume_goes_on(
        tmp_path, tiny_config):
    cfg_path = _long_run(tiny_config, tmp_path)
    ws = tmp_path / "ws"
    worker = WorkerProcess(worker_argv_train(cfg_path, ws), cwd=tmp_path)   # what the studio starts
    worker.start()
    events = []
    for event in worker.events():
        events.append(event)
        if isinstance(event, StepMetrics) and event.step == 2:
            os.kill(worker.pid, signal.SIGTERM)      # from outside, as `kill` or `docker stop` would
    assert worker.returncode == 0, worker.stderr_tail()
    end = events[-1]
    assert isinstance(end, RunFinished) and end.stopped_early, end
    run = Workspace(ws).get_run(next(e for e in events if isinstance(e, RunStarted)).run_id)
    step = end.step
    assert step >= 2 and end.adapter_path == str(run.adapter_dir)
    assert (run.adapter_dir / "adapter_config.json").is_file()
    saved = {(e.kind, e.step) for e in events if isinstance(e, CheckpointSaved)}
    assert saved == {("checkpoint", step), ("adapter", step)}
    assert latest_checkpoint(run).name == f"step-{step}"
    assert any(isinstance(e, Log) and "SIGTERM" in e.message for e in events)
    assert run.status() == "stopped" and _leftovers(run.path) == []
    assert _describe_end(end) == ("stopped", f"Stopped at step {step}.")   # what the studio shows

    out = subprocess.run(CLI + ["resume", run.id, "--workspace", str(ws), "--events", "jsonl",
                                "--max-steps", str(step + 2)],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    resumed = [from_json(line) for line in out.stdout.splitlines()]
    assert [e.step for e in resumed if isinstance(e, StepMetrics)] == [step + 1, step + 2]
    assert next(e for e in resumed if isinstance(e, RunStarted)).resumed_from_step == step
    assert isinstance(resumed[-1], RunFinished) and not resumed[-1].stopped_early
    assert run.status() == "finished" and _leftovers(run.path) == []


def test_sighup_to_the_console_cli_stops_and_saves(tmp_path, tiny_config):
    cfg_path = _long_run(tiny_config, tmp_path)
    proc = subprocess.Popen(CLI + ["train", str(cfg_path), "--workspace", str(tmp_path / "ws")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    seen = ""
    while "/100000 [" not in seen:               # the first step line: training has begun
        chunk = proc.stdout.read(1)
        assert chunk, "the CLI ended before training: " + proc.stderr.read()
        seen += chunk
    proc.send_signal(signal.SIGHUP)              # the terminal (or ssh session) went away
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Run stopped at step" in rest and "Adapter:" in rest
    adapter = Path(next(l for l in rest.splitlines() if l.startswith("Adapter:")).split(": ", 1)[1])
    assert (adapter / "adapter_config.json").is_file()
    assert _leftovers(adapter.parent) == []


def test_a_second_signal_during_the_checkpoint_write_stops_at_once_and_resume_takes_the_last_one(
        tmp_path, tiny_config, monkeypatch, capsys):
    """In this process (the signals are real, their timing is pinned): SIGTERM after step 3, and a
    second one while the stop's checkpoint of step 3 is half written."""
    cfg = tiny_config(max_steps=100_000, checkpoint={"every_steps": 2}, eval={"every_steps": 0})
    cfg_path = tmp_path / "run.yaml"
    cfg.save(cfg_path)
    ws = tmp_path / "ws"
    train_step, save = train_loop.TrainingLoop._train_step, torch.save

    def train_step_then_sigterm(self):
        loss = train_step(self)
        if self.step == 2:                           # this call makes step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    def save_then_sigterm(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if str(f).endswith("optimizer.pt") and ".step-3." in str(f):
            os.kill(os.getpid(), signal.SIGTERM)     # the checkpoint's other files are not written yet
            time.sleep(1)

    def uncaught(signum, frame):                     # the CLI left SIGTERM to pytest: fail, not die
        raise AssertionError("SIGTERM reached the test: the CLI does not catch it")

    monkeypatch.setattr(sys, "stdin", io.StringIO())      # no GUI pipe: the command reader ends at once
    monkeypatch.setattr(train_loop.TrainingLoop, "_train_step", train_step_then_sigterm)
    monkeypatch.setattr(torch, "save", save_then_sigterm)
    previous = signal.signal(signal.SIGTERM, uncaught)
    try:
        code = cli.main(["train", str(cfg_path), "--workspace", str(ws), "--events", "jsonl"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train_loop.TrainingLoop, "_train_step", train_step)

    assert code == 128 + signal.SIGTERM
    events = [from_json(line) for line in capsys.readouterr().out.splitlines()]
    end = events[-1]
    assert isinstance(end, RunFinished) and end.stopped_early and end.step == 3
    assert end.adapter_path == ""                    # stopped at once: nothing saved after step 2
    run = Workspace(ws).get_run(next(e for e in events if isinstance(e, RunStarted)).run_id)
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-2"]   # no half step-3
    assert not run.adapter_dir.exists()
    assert _leftovers(run.path) == []                # no lock, no temp folder
    assert run.status() == "stopped"

    code = cli.main(["resume", run.id, "--workspace", str(ws), "--events", "jsonl", "--max-steps", "4"])
    assert code == 0
    resumed = [from_json(line) for line in capsys.readouterr().out.splitlines()]
    assert [e.step for e in resumed if isinstance(e, StepMetrics)] == [3, 4]
    assert isinstance(resumed[-1], RunFinished) and resumed[-1].adapter_path
