"""Events round-trip through JSON lines; unknown types and fields are refused."""
import json

import pytest

from cpt_studio.engine.runs.events import (EVENT_TYPES, EvalMetrics, EventError, RunFailed, StepMetrics,
                                      from_json, to_json)


def test_every_event_type_round_trips():
    samples = {
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
    assert set(samples) == set(EVENT_TYPES)
    for name, fields in samples.items():
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
