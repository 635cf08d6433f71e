"""Events round-trip through JSON lines; unknown types and fields are refused."""
import json
import os
import subprocess
import sys

import pytest

from cpt_studio.engine.runs.events import (EVENT_TYPES, EvalMetrics, EventError, RunFailed, StepMetrics,
                                      from_json, to_json)

SAMPLES = {
    "RunStarted": dict(run_id="r", name="n", config={"a": 1}, param_groups={"embeddings": {"lr": 1e-5}}),
    "Phase": dict(phase="tokenizing", progress=0.5, message="file 1/2"),
    "StepMetrics": dict(step=1, epoch=0.1, loss=2.5, lr=1e-4, embedding_lr=1e-5, grad_norm=0.7,
                        tokens_seen=512, tokens_per_s=100.0, step_s=5.1, ram=1e9),
    "EvalMetrics": dict(step=0, eval_set="heldout", eval_loss=3.0, perplexity=20.1),
    "Sample": dict(step=10, prompt="La", text=" vetero ŝanĝiĝas"),
    "CheckpointSaved": dict(step=10, path="/x/step-10"),
    "Log": dict(level="info", message="hi"),
    "RunFinished": dict(step=30, final_loss=1.5, adapter_path="/x/adapter"),
    "RunFailed": dict(kind="oom", message="out of memory", hint="lower batch_size"),
}


def test_every_event_type_round_trips():
    assert set(SAMPLES) == set(EVENT_TYPES)
    for name, fields in SAMPLES.items():
        event = EVENT_TYPES[name](**fields)
        line = to_json(event)
        assert "\n" not in line
        assert from_json(line) == event


def test_unknown_type_field_or_version_is_an_error():
    line = to_json(EvalMetrics(step=1, eval_set="heldout", eval_loss=1.0, perplexity=2.7))
    data = json.loads(line)
    with pytest.raises(EventError, match="unknown event type"):
        from_json(json.dumps({**data, "type": "Bogus"}))
    with pytest.raises(EventError, match="no field"):
        from_json(json.dumps({**data, "colour": "red"}))
    with pytest.raises(EventError, match="version"):
        from_json(json.dumps({**data, "v": 2}))
    with pytest.raises(EventError, match="not JSON"):
        from_json("{half")


def test_nan_loss_survives():
    event = StepMetrics(step=1, epoch=0, loss=float("nan"), lr=0, embedding_lr=0, grad_norm=0,
                        tokens_seen=0, tokens_per_s=0, step_s=0)
    assert from_json(to_json(event)).loss != from_json(to_json(event)).loss  # NaN stays NaN
    assert from_json(to_json(RunFailed(kind="crash", message="x"))).hint == ""


def test_every_event_carries_the_pid_of_the_process_that_made_it(tmp_path):
    """Not only the first: a resume is told apart from the run it continues by the pid of each line."""
    script = tmp_path / "make_events.py"
    script.write_text(
        "import os\n"
        "from cpt_studio.engine.runs.events import EVENT_TYPES, to_json\n"
        f"samples = {SAMPLES!r}\n"
        "print(os.getpid())\n"
        "for name, fields in samples.items():\n"
        "    print(to_json(EVENT_TYPES[name](**fields)))\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    maker_pid, *lines = out.stdout.splitlines()
    events = [from_json(line) for line in lines]
    assert [type(e).__name__ for e in events] == list(SAMPLES)
    assert {e.pid for e in events} == {int(maker_pid)} and int(maker_pid) != os.getpid()
    # Made here, an event carries this process's pid; a line from before pids were recorded reads
    # back as 0 ("unknown"), never as the pid of whoever reads it.
    assert all(EVENT_TYPES[name](**fields).pid == os.getpid() for name, fields in SAMPLES.items())
    old_line = json.loads(lines[0])
    del old_line["pid"]
    assert from_json(json.dumps(old_line)).pid == 0
