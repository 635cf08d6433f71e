"""The engine end to end on a tiny model: loss falls, resume is exact, adapters load and continue."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cpt_studio.engine.control import ControlChannel
from cpt_studio.engine.events import (CheckpointSaved, EvalMetrics, RunFinished, RunStarted,
                                      StepMetrics)
from cpt_studio.engine.runs import Workspace
from cpt_studio.engine.sinks import FanOut, ListSink, RunFolderSink
from cpt_studio.engine.trainer import run_training


class StopAfterCheckpoint(ControlChannel):
    """Sends `stop` (no save) right after the checkpoint of a given step: a kill, minus the signal."""

    def __init__(self, sink: ListSink, step: int):
        super().__init__()
        self.sink, self.step = sink, step

    def poll(self):
        saved = [e.step for e in self.sink.events if isinstance(e, CheckpointSaved)]
        return "stop" if self.step in saved else None


def _train(workspace, cfg, control=None, resume_run=None):
    run_dir = workspace.get_run(resume_run) if resume_run else workspace.create_run(cfg)
    events = ListSink()
    if control is not None and hasattr(control, "sink"):
        control.sink = events
    result = run_training(cfg, workspace, run_dir, FanOut(RunFolderSink(run_dir), events), control,
                          resume=resume_run is not None)
    return run_dir, events.events, result


def _losses(events):
    return {e.step: e.loss for e in events if isinstance(e, StepMetrics)}


def test_loss_falls_and_adapter_loads(tmp_path, tiny_config):
    workspace = Workspace(tmp_path / "ws")
    cfg = tiny_config(max_steps=12)
    run_dir, events, result = _train(workspace, cfg)
    assert result.status == "finished" and result.exit_code == 0
    losses = _losses(events)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.3          # a tiny random model: ln(384) = 5.95 at start
    heldout = {e.step: e.eval_loss for e in events if isinstance(e, EvalMetrics) and e.eval_set == "heldout"}
    assert heldout[12] < heldout[0] - 0.2
    started = next(e for e in events if isinstance(e, RunStarted))
    assert set(started.param_groups) == {"embeddings", "other"}
    assert started.param_groups["embeddings"]["lr"] == cfg.embedding_lr

    # The saved adapter loads with plain peft and gives the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(cfg.model.source)
    loaded = PeftModel.from_pretrained(base, str(run_dir.adapter_dir)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    finished = next(e for e in events if isinstance(e, RunFinished))
    assert finished.adapter_path == str(run_dir.adapter_dir)
    # Same logits as a second independent load: the adapter is complete and deterministic.
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.source),
                                      str(run_dir.adapter_dir)).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)
    plain = AutoModelForCausalLM.from_pretrained(cfg.model.source).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, logits)


@pytest.mark.parametrize("embedding_optimizer", ["auto", "adamw8bit"])
def test_resume_continues_the_same_curve_bitwise(tmp_path, tiny_config, embedding_optimizer):
    # auto = torch AdamW on CPU; adamw8bit = bitsandbytes' 8-bit states for the embeddings group.
    cfg = tiny_config(max_steps=8, adapter={"dropout": 0.1},
                      training={"embedding_optimizer": embedding_optimizer})
    _, full_events, _ = _train(Workspace(tmp_path / "a"), cfg)

    workspace = Workspace(tmp_path / "b")
    run_dir, first, result = _train(workspace, cfg, control=StopAfterCheckpoint(None, 4))
    assert result.status == "stopped" and max(_losses(first)) == 4
    _, second, result = _train(workspace, cfg, resume_run=run_dir.id)
    assert result.status == "finished"
    started = next(e for e in second if isinstance(e, RunStarted))
    assert started.resumed_from_step == 4
    full, resumed = _losses(full_events), _losses(second)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]}"


def test_continue_from_adapter_goes_on_counting(tmp_path, tiny_config):
    workspace = Workspace(tmp_path / "ws")
    cfg = tiny_config(max_steps=8)
    run_dir, events, _ = _train(workspace, cfg)
    final_eval = [e for e in events if isinstance(e, EvalMetrics) and e.eval_set == "heldout"][-1]

    more = tiny_config(max_steps=4)
    more.init_from = str(run_dir.checkpoints_dir / "step-8")
    more.init_optimizer_state = True
    _, cont, result = _train(workspace, more)
    assert result.status == "finished"
    assert sorted(_losses(cont)) == [9, 10, 11, 12]
    first_eval = next(e for e in cont if isinstance(e, EvalMetrics) and e.eval_set == "heldout")
    assert first_eval.step == 8
    assert abs(first_eval.eval_loss - final_eval.eval_loss) < 1e-5   # same weights it left with
