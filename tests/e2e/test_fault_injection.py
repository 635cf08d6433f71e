"""Fault injection on real worker processes (tiny model, CPU): nothing a kill or a full disk does may
lose a trained step, pick a damaged checkpoint or leave temp files behind.

- Kills: 20 SIGKILLs of one run, half at random moments chosen by this test, half inside a write
  (checkpoint weights, optimizer state, manifest, adapter, events line, config, index, corpus cache),
  each followed by `resume`; then one last resume to the end. Steps trained again after a kill are
  counted, not lost: a step is lost when the final curve lacks it or any process got another loss. Every step's loss, wherever it was
  trained (again), equals the loss of the same step in every other process, and the final curve has
  every step once: no step is lost and the curve after a resume is the same curve.
- Full disk: ENOSPC at each write site in turn, on a run that already has a checkpoint: the worker
  exits with status 2 and a message that names the disk, no traceback; the checkpoint and adapter
  written before are intact; the half-written copy is gone; `resume` then goes on.

The counts are printed at the end of the pytest run (tests/e2e/conftest.py's terminal summary, so
they show in CI's log on a pass too), and the promised zeros are asserted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt_studio.engine.runs.checkpoints import list_checkpoints, verify_checkpoint
from cpt_studio.engine.runs.events import (CheckpointSaved, RunFinished, RunStarted, StepMetrics,
                                           from_json)

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fault_worker.py")
FAR = 100_000         # a run that never ends by itself: each process is ended by its fault
# (call, path part, n): the n-th such write in one process gets the fault.
START_SITES = [                            # written by `train` only, before the first step
    ("fsync", "config.yaml", 1),           # the run's config
    ("fsync", "/cache/", 1),               # the token file of the corpus
]
TRAINING_SITES = [
    ("safetensors", "checkpoints", 2),     # checkpoint weights
    ("torch_save", "optimizer.pt", 1),     # optimizer state
    ("fsync", "manifest.json", 2),         # the checkpoint's manifest, its last file
    ("fsync", "/checkpoints/", 3),         # a checkpoint file being published
    ("fsync", "events.jsonl", 6),          # one events line
]
END_SITES = [                              # written when the run ends
    ("safetensors", ".adapter.tmp", 1),    # the final adapter's weights
    ("fsync", ".adapter.tmp", 1),          # an adapter file being published
    ("sqlite", "index.sqlite", 1),         # the run index
]
WRITE_SITES = START_SITES + TRAINING_SITES + END_SITES
# The run index is a cache: a full disk while writing it costs nothing but a warning.
SURVIVABLE_SITES = [("sqlite", "index.sqlite", 1)]
TEMP_NAME = re.compile(r"(\.tmp|tmp-|\.trash|\.partial)")


def _start(args, tmp_path, fault: str | None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CPT_FAULT", None)
    if fault:
        env["CPT_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-P", str(WORKER), *args, "--events", "jsonl"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=env)


def _events(stdout: str) -> list:
    out = []
    for line in stdout.splitlines():
        try:
            out.append(from_json(line))
        except Exception:        # a line cut by the kill
            pass
    return out


def _newest_valid_step(run: Path) -> int:
    for folder in reversed(list_checkpoints(run)):
        try:
            verify_checkpoint(folder, full=True)
            return int(folder.name.split("-")[1])
        except Exception:
            continue
    return 0


def _temp_files(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if TEMP_NAME.search(p.name))


class Ledger:
    """Every step's loss as each process reported it, and what the test saw."""

    def __init__(self):
        self.losses: dict[int, set[float]] = {}
        self.counts = dict(kills=0, kills_in_writes=0, kills_at_random=0, resumes_started=0, resumes_trained=0,
                           steps_trained_again=0, steps_lost=0, corrupt_checkpoints_chosen=0,
                           temp_files_left=0)

    def add(self, events) -> None:
        for e in events:
            if isinstance(e, StepMetrics):
                if e.step in self.losses:
                    self.counts["steps_trained_again"] += 1
                self.losses.setdefault(e.step, set()).add(round(e.loss, 6))


def report(request, line: str) -> None:
    """A line for the end-of-run summary (see tests/e2e/conftest.py)."""
    print(line)
    request.config.__dict__.setdefault("cpt_fault_report", []).append(line)


def test_twenty_kills_each_followed_by_resume_lose_no_step(tmp_path, tiny_config, request):
    """The schedule is constant after warmup, so a run ended early with `--max-steps` trains each
    step exactly as a longer one would, and every process's losses can be compared step by step."""
    rng = random.Random(13)
    cfg = tiny_config(max_steps=FAR, checkpoint={"every_steps": 2, "keep_last": 3},
                      eval={"every_steps": 10})
    cfg.training.schedule = "constant"
    cfg.save(tmp_path / "run.yaml")
    ws = tmp_path / "ws"
    ledger = Ledger()
    later = [("site", site) for site in TRAINING_SITES + END_SITES] + [("random", None)] * 10
    rng.shuffle(later)
    plan = [("site", site) for site in START_SITES] + later
    run: Path | None = None
    for kind, site in plan:
        expected = _newest_valid_step(run) if run is not None else 0
        ends = kind == "site" and site in END_SITES          # let this one reach its end
        if run is None:
            args = ["train", str(tmp_path / "run.yaml"), "--set", f"training.max_steps={FAR}"]
        else:
            args = ["resume", str(run), "--max-steps", str(expected + 4 if ends else FAR)]
        fault = f"{site[0]}:{site[1]}:{site[2]}:kill" if kind == "site" else None
        proc = _start(args + ["--workspace", str(ws)], tmp_path, fault)
        if kind == "random":     # while it loads, or while it trains (steps, evals, checkpoints)
            while_training = ledger.counts["kills_at_random"] % 2 == 1
            read = []
            for line in proc.stdout:
                read.append(line)
                if not while_training or '"type":"StepMetrics"' in line:
                    break
            time.sleep(rng.uniform(0.0, 1.0 if while_training else 3.0))
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        if kind == "random":
            out = "".join(read) + out
        events = _events(out)
        if run is None:          # killed before the run folder was written: train again
            started_runs = [r for r in (ws / "runs").glob("*") if (r / "config.yaml").is_file()]
            run = started_runs[0] if started_runs else None
        started = [e for e in events if isinstance(e, RunStarted)]
        ledger.counts["resumes_started"] += args[0] == "resume"
        if args[0] == "resume" and started:
            ledger.counts["resumes_trained"] += 1
            if started[0].resumed_from_step != expected:
                ledger.counts["corrupt_checkpoints_chosen"] += 1
        ledger.add(events)
        assert proc.returncode == -signal.SIGKILL, (
            f"{kind} {site}: exit {proc.returncode}, the fault never came\n{err[-3000:]}")
        ledger.counts["kills"] += 1
        ledger.counts["kills_in_writes" if kind == "site" else "kills_at_random"] += 1
    assert run is not None, "no process got as far as writing its run folder"
    last = _newest_valid_step(run)
    proc = _start(["resume", str(run), "--max-steps", str(last + 4), "--workspace", str(ws)],
                  tmp_path, None)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    events = _events(out)
    ledger.counts["resumes_started"] += 1
    ledger.counts["resumes_trained"] += 1
    ledger.add(events)
    assert any(isinstance(e, RunFinished) and e.step == last + 4 for e in events), err[-3000:]
    differing = {s: v for s, v in ledger.losses.items() if len(v) > 1}
    missing = [s for s in range(1, last + 5) if s not in ledger.losses]
    ledger.counts["steps_lost"] = len(missing) + len(differing)
    ledger.counts["temp_files_left"] = len(_temp_files(run))
    report(request, f"kills: {json.dumps(ledger.counts)}")
    assert ledger.counts["kills"] == 20 and ledger.counts["kills_at_random"] == 10
    assert ledger.counts["steps_lost"] == 0, (missing, differing)
    assert ledger.counts["corrupt_checkpoints_chosen"] == 0
    assert ledger.counts["temp_files_left"] == 0, _temp_files(run)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def _digest(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): hash(p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("site", WRITE_SITES, ids=lambda s: f"{s[0]}-{s[1].strip('/')}-{s[2]}")
def test_a_full_disk_at_each_write_site_is_a_clean_stop_and_resume_goes_on(site, tmp_path,
                                                                            earlier_run, request):
    call, part, nth = site
    ws = tmp_path / "ws"
    shutil.copytree(earlier_run[0], ws, symlinks=True)   # 4 steps trained: step-2, step-4, adapter
    (run,) = (ws / "runs").iterdir()
    step4 = run / "checkpoints" / "step-4"
    kept = {"checkpoint": _digest(step4), "adapter": _digest(run / "adapter")}
    if part == "/cache/":
        shutil.rmtree(ws / "cache")                    # so that the resume tokenizes again
    proc = _start(["resume", str(run), "--workspace", str(ws), "--max-steps", "8"], tmp_path,
                  f"{call}:{part}:{nth}:enospc")
    out, err = proc.communicate(timeout=300)
    fired = "FAULT" in err
    report(request, f"ENOSPC at {call} {part} #{nth}: fired={fired}, exit {proc.returncode}")
    assert fired, err[-3000:]
    if site in SURVIVABLE_SITES:        # a cache: the run goes on without it, and says so
        assert proc.returncode == 0, err[-3000:]
        assert any(isinstance(e, RunFinished) and e.step == 8 for e in _events(out))
        assert "space" in (err + out).lower(), (err + out)[-3000:]
    else:
        shown = err + out
        assert proc.returncode == 2, f"exit {proc.returncode}\n{shown[-4000:]}"
        assert "Traceback" not in shown, shown[-3000:]
        assert "space" in shown.lower(), shown[-3000:]
        assert _digest(step4) == kept["checkpoint"], "the checkpoint written before changed"
        if "adapter" in part:
            assert _digest(run / "adapter") == kept["adapter"], "the adapter written before changed"
        assert _temp_files(run) == [], _temp_files(run)
    again = _start(["resume", str(run), "--workspace", str(ws), "--max-steps", "8"], tmp_path, None)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert any(isinstance(e, RunFinished) and e.step == 8 for e in _events(out))
    assert _temp_files(run) == []
