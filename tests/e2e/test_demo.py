"""`cpt-studio demo`: the embedded default (real SmolLM2-135M + the sample Esperanto corpus) learns."""
from __future__ import annotations

import json
import subprocess

from peft import PeftModel
from transformers import AutoModelForCausalLM

from cpt_studio.engine.runs.events import EvalMetrics, RunFinished, RunStarted, Sample, from_json
from cpt_studio.engine.runs.runner import cli_argv


def test_demo_lowers_heldout_perplexity_and_leaves_a_loadable_adapter(tmp_path):
    ws = tmp_path / "ws"
    out = subprocess.run(cli_argv("demo", "--max-steps", "6", "--workspace", ws, "--events", "jsonl"),
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [from_json(line) for line in out.stdout.splitlines()]
    started = next(e for e in events if isinstance(e, RunStarted))
    assert "SmolLM2" in started.model
    heldout = [e for e in events if isinstance(e, EvalMetrics) and e.eval_set == "heldout"]
    retention = [e for e in events if isinstance(e, EvalMetrics) and e.eval_set == "retention"]
    assert heldout[0].step == 0 and heldout[-1].step == 6 and len(retention) == 2
    assert heldout[-1].perplexity < heldout[0].perplexity * 0.8
    assert any(isinstance(e, Sample) and e.prompt for e in events)

    finished = events[-1]
    assert isinstance(finished, RunFinished) and finished.step == 6
    config = json.loads((ws / "runs" / started.run_id / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, finished.adapter_path)
    assert model.active_adapter == "default"

    # The default export (bf16) passes its own check against the adapter.
    exported = subprocess.run(cli_argv("export", started.run_id, "--workspace", ws),
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "merged-bf16" in exported.stdout and "verified" in exported.stdout
