"""engine.runs.runner: the GUI's Qt-free side of the worker protocol, driven by a fake worker script."""
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import (CheckpointSaved, Log, RunFailed, RunFinished, RunStarted,
                                      StepMetrics, from_json)
from cpt_studio.engine.runs.runner import (WORKER_BOOT, AttachedRun, WorkerProcess, cli_command_text,
                                      worker_argv_resume, worker_argv_train)
from cpt_studio.engine.runs.store import Workspace

HERE = Path(__file__).parent
FAKE = HERE / "fake_worker.py"
SAMPLE = HERE / "data" / "sample_events.jsonl"


def fake(*args) -> WorkerProcess:
    proc = WorkerProcess([sys.executable, str(FAKE), *map(str, args)])
    proc.start()
    return proc


def test_replays_every_event_and_exits_cleanly():
    proc = fake(SAMPLE)
    events = list(proc.events())
    recorded = [from_json(l) for l in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert [type(e) for e in events] == [type(e) for e in recorded]
    assert [e.loss for e in events if isinstance(e, StepMetrics)] == \
        [e.loss for e in recorded if isinstance(e, StepMetrics)]
    assert isinstance(events[-1], RunFinished) and proc.returncode == 0
    assert proc.run_started is not None and proc.run_started.pid == proc.pid


def test_worker_dying_without_run_failed_reports_exit_code_and_stderr():
    proc = fake(SAMPLE, "--stop-after", 12, "--exit-code", 1,
                "--stderr", "Traceback (most recent call last):\nZeroDivisionError: boom")
    events = list(proc.events())
    last = events[-1]
    assert isinstance(last, RunFailed) and last.kind == "crash"
    assert "exited with code 1" in last.message and "ZeroDivisionError: boom" in last.message
    assert "resume" in last.hint.lower()
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr_tail()


def test_worker_killed_by_a_signal_is_named():
    proc = fake(SAMPLE, "--hold")
    events = proc.events()
    assert isinstance(next(events), RunStarted)
    proc.kill()
    last = list(events)[-1]
    assert isinstance(last, RunFailed) and "SIGKILL" in last.message


def test_a_line_that_is_not_an_event_becomes_a_log_event():
    proc = fake(SAMPLE, "--garbage", "--stop-after", 1)
    events = list(proc.events())
    assert isinstance(events[0], Log) and events[0].message == "this line is not an event"
    assert isinstance(events[1], RunStarted)


def test_stop_and_save_on_stdin_saves_and_finishes_early():
    proc = fake(SAMPLE, "--hold")
    seen = []
    for event in proc.events():
        seen.append(event)
        if isinstance(event, RunStarted):
            assert proc.send("stop_and_save")
    kinds = [e.kind for e in seen if isinstance(e, CheckpointSaved)]
    assert "adapter" in kinds
    assert isinstance(seen[-1], RunFinished) and seen[-1].stopped_early
    assert not proc.send("stop")        # gone: nobody hears it, and nothing raises


def test_a_missing_worker_program_fails_with_a_hint():
    proc = WorkerProcess([sys.executable, "-c", "import sys; sys.exit('no module cpt_studio.x')"])
    proc.start()
    last = list(proc.events())[-1]
    assert isinstance(last, RunFailed) and "no module cpt_studio.x" in last.message
    assert "did not start" in last.hint


def test_argv_helpers_and_the_copyable_command(tmp_path):
    argv = worker_argv_train(tmp_path / "a b.yaml", tmp_path)
    assert argv[:4] == [sys.executable, "-c", WORKER_BOOT, "train"]
    assert argv[-2:] == ["--events", "jsonl"]
    resume = worker_argv_resume("20240101-000000-x", tmp_path, max_steps=50)
    assert resume[3:5] == ["resume", "20240101-000000-x"] and resume[-2:] == ["--max-steps", "50"]
    text = cli_command_text(tmp_path / "a b.yaml", tmp_path)
    assert text.startswith("cpt-studio train ") and "'" in text   # the space is quoted
    assert "--workspace" in text


def test_the_copyable_command_leaves_out_the_default_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_STUDIO_HOME", str(tmp_path / "home"))
    config = tmp_path / "run.yaml"
    assert cli_command_text(config, tmp_path / "home") == f"cpt-studio train {config}"
    assert cli_command_text(config) == f"cpt-studio train {config}"
    assert cli_command_text(config, tmp_path / "other").endswith(f"--workspace {tmp_path / 'other'}")


def _sample_events():
    return [from_json(l) for l in SAMPLE.read_text(encoding="utf-8").splitlines()]


def test_attach_follows_a_growing_events_file_until_the_end(tmp_path):
    run = Workspace(tmp_path).create_run(RunConfig(name="attached"))
    events = _sample_events()
    events[0] = dataclasses.replace(events[0], pid=os.getpid(), time=time.time())  # "alive"
    for e in events[:10]:
        run.append_event(e)

    def writer():
        for e in events[10:]:
            time.sleep(0.002)
            run.append_event(e)

    follower = AttachedRun(run, poll_s=0.02)
    t = threading.Thread(target=writer)
    t.start()
    got = list(follower.events())
    t.join()
    assert len(got) == len(events) and isinstance(got[-1], RunFinished)
    follower.send("save_now")
    assert run.control_path.read_text().strip() == "save_now"


def test_attach_to_a_run_whose_worker_is_gone_ends_interrupted(tmp_path):
    run = Workspace(tmp_path).create_run(RunConfig(name="orphan"))
    for e in _sample_events()[:20]:       # pid 4242 at a time long past: not this worker
        run.append_event(e)
    got = list(AttachedRun(run, poll_s=0.02).events())
    assert len(got) == 21 and isinstance(got[-1], RunFailed) and got[-1].kind == "interrupted"


def test_close_ends_the_event_stream_while_the_worker_goes_on():
    proc = fake(SAMPLE, "--hold")
    events = proc.events(poll_s=0.02)
    next(events)
    proc.close()
    list(events)                # returns instead of blocking
    assert proc.running()
    proc.kill()
