"""The engine end to end on a tiny model: loss falls, resume is exact, adapters load and continue."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from cpt_studio.engine.runs.checkpoints import list_checkpoints, verify_checkpoint
from cpt_studio.engine.runs.control import ControlChannel
from cpt_studio.engine.runs.events import (CheckpointSaved, EvalMetrics, Log, Phase, RunFailed,
                                      RunFinished, RunStarted, StepMetrics, from_json)
from cpt_studio.engine.runs.store import Workspace
from cpt_studio.engine.runs.sinks import FanOut, ListSink, RunFolderSink
from cpt_studio.engine.train.loop import first_step_note, run_training


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


RESUME_CASES = {
    "adamw": {"embedding_optimizer": "auto"},                 # torch AdamW on CPU
    "adamw8bit": {"embedding_optimizer": "adamw8bit"},        # bitsandbytes' 8-bit states
    # our fused 8-bit step (stochastic codes), embed_tokens' sparse gradient, checkpointed layer
    # inputs offloaded (on CPU a clone: the same code path as pinned memory on CUDA), and the
    # kernels (interpreted Triton) with the lm_head gradient deferred to the end of the backward,
    # and 8-bit states for the LoRA group too. Not the RoPE kernel: stateless, and interpreted it
    # took 70% of this test's time (one program per position); tests/kernels and test_patching
    # train through it.
    "fused8bit-sparse-offload": {"embedding_optimizer": "fused8bit", "gradient_checkpointing": True,
                                 "offload_checkpoints": "on", "kernels": "on",
                                 "lora_optimizer": "fused8bit", "disabled_transforms": ["rope"]},
}


def _memory_log(events) -> str:
    return next((e.message for e in events if isinstance(e, Log) and e.message.startswith("memory:")), "")


def _stopped_and_resumed(tmp_path, cfg, stop_at=4):
    _, full_events, _ = _train(Workspace(tmp_path / "a"), cfg)
    workspace = Workspace(tmp_path / "b")
    run_dir, first, result = _train(workspace, cfg, control=StopAfterCheckpoint(None, stop_at))
    assert result.status == "stopped" and max(_losses(first)) == stop_at
    _, second, result = _train(workspace, cfg, resume_run=run_dir.id)
    assert result.status == "finished"
    started = next(e for e in second if isinstance(e, RunStarted))
    assert started.resumed_from_step == stop_at
    return full_events, second


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_continues_the_same_curve_bitwise(tmp_path, tiny_config, case):
    cfg = tiny_config(max_steps=8, adapter={"dropout": 0.1}, training=RESUME_CASES[case],
                      # every kernel interpreted on CPU: 2 held-out blocks keep each eval short
                      data={"max_eval_blocks": 2 if case.startswith("fused8bit") else 64})
    full_events, second = _stopped_and_resumed(tmp_path, cfg)
    full, resumed = _losses(full_events), _losses(second)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]}"
    if case.startswith("fused8bit"):
        memory = _memory_log(full_events)
        assert "fused8bit optimizer" in memory and "rows of the batch's tokens only" in memory
        assert "checkpointed layer inputs in CPU memory (2 layers)" in memory
        assert "lm_head's gradient computed after the layers' backward" in memory
        groups = next(e for e in full_events if isinstance(e, RunStarted)).param_groups
        assert groups["embeddings"]["optimizer"] == groups["other"]["optimizer"] == "fused8bit"


@pytest.mark.gpu
def test_gpu_defaults_train_and_resume_within_tolerance(tmp_path, tiny_config):
    """On CUDA with every default on: kernels, bf16 embedding copies, fused8bit, the sparse
    embed_tokens gradient, offloaded checkpoints. The loss falls and a resume continues the curve
    (GPU: within 1e-3, GOALS.md)."""
    cfg = tiny_config(max_steps=12, training={"kernels": "auto", "gradient_checkpointing": True})
    cfg.model.precision = "bf16"
    cfg.checkpoint.every_steps = 6
    full_events, second = _stopped_and_resumed(tmp_path, cfg, stop_at=6)
    memory = _memory_log(full_events)
    assert "copies in bf16, fused8bit optimizer" in memory, memory
    assert "rows of the batch's tokens only" in memory and "in CPU memory" in memory
    full, resumed = _losses(full_events), _losses(second)
    assert full[12] < full[1] - 0.3
    assert sorted(resumed) == list(range(7, 13))
    for step in resumed:
        assert abs(resumed[step] - full[step]) < 1e-3 * max(1.0, abs(full[step])), step


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


def test_the_first_step_note_says_the_kernels_compile_only_with_kernels_on_a_gpu():
    summary = ["RMSNorm (Triton): 5 modules"]
    assert "compiling GPU kernels" in first_step_note(summary, torch.device("cuda"))
    assert first_step_note(summary, torch.device("cpu")) == ""
    assert first_step_note([], torch.device("cuda")) == ""


def test_the_first_training_step_shows_its_note_then_clears_it(tmp_path, tiny_config, monkeypatch):
    """The Run page's phase line during the first step (Triton compiling on a GPU), gone after it."""
    from cpt_studio.engine.train import loop as trainer

    monkeypatch.setattr(trainer, "first_step_note", lambda summary, device: "first step note")
    _, events, result = _train(Workspace(tmp_path / "ws"), tiny_config(max_steps=3))
    assert result.status == "finished"
    kinds = [(type(e).__name__, getattr(e, "message", None)) for e in events
             if isinstance(e, (Phase, StepMetrics))]
    first_step = kinds.index(("StepMetrics", None))
    shown = kinds.index(("Phase", "first step note"))
    assert shown < first_step and ("Phase", "") in kinds[shown + 1:first_step]
    assert kinds.count(("Phase", "first step note")) == 1


# ---- issue 13, defects 4 and 5: full disks and damaged checkpoints, through the CLI ------------

def _cli(args, capsys, monkeypatch):
    """`cpt-studio ARGS` in this process: (exit code, stdout events or text, stderr)."""
    from cpt_studio.engine import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO())     # no GUI pipe: the command reader ends at once
    code = cli.main(args)
    out, err = capsys.readouterr()
    if "--events" in args:
        return code, [from_json(line) for line in out.splitlines()], err
    return code, out, err


def _finished_run(tmp_path, cfg, capsys, monkeypatch):
    ws = tmp_path / "ws"
    cfg_path = tmp_path / "run.yaml"
    cfg.save(cfg_path)
    code, events, err = _cli(["train", str(cfg_path), "--workspace", str(ws), "--events", "jsonl"],
                             capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run = Workspace(ws).get_run(next(e for e in events if isinstance(e, RunStarted)).run_id)
    assert run.status() == "finished"
    return ws, run


def _flip_a_byte(path):
    """Damage a file without changing its size: only its sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _untouched(run):
    """What a resume that never starts training must leave as it was."""
    return run.events_path.read_bytes(), run.config_path.read_bytes(), run.status()


def test_resume_passes_over_a_damaged_latest_checkpoint_and_takes_an_explicit_one(
        tmp_path, tiny_config, capsys, monkeypatch):
    """A latest checkpoint damaged without changing its size: resume used to pick it (sizes
    only), fail on its sha256 and relabel the run failed for good."""
    cfg = tiny_config(max_steps=8, eval={"every_steps": 0})          # checkpoints at 4 and 8
    ws, run = _finished_run(tmp_path, cfg, capsys, monkeypatch)
    step4, step8 = run.checkpoints_dir / "step-4", run.checkpoints_dir / "step-8"
    _flip_a_byte(step8 / "adapter_model.safetensors")
    before = _untouched(run)
    resume = ["resume", run.id, "--workspace", str(ws), "--max-steps", "10"]

    # An explicit choice that is missing, then one that is damaged: refused, naming the others,
    # and the run stays as it was (events, config.yaml with its max_steps, status).
    code, events, _ = _cli(resume + ["--checkpoint", "step-6", "--events", "jsonl"], capsys, monkeypatch)
    failed = events[-1]
    assert code == 2 and isinstance(failed, RunFailed) and failed.kind == "checkpoint"
    assert f"Run {run.id} has no checkpoint step-6" in failed.message
    assert "step-4, step-8" in failed.hint
    assert _untouched(run) == before
    code, events, _ = _cli(resume + ["--checkpoint", "step-8", "--events", "jsonl"], capsys, monkeypatch)
    failed = events[-1]
    assert code == 2 and "step-8" in failed.message and "is damaged" in failed.message
    assert "adapter_model.safetensors is corrupt" in failed.message and "step-4." in failed.hint
    assert _untouched(run) == before

    # Every checkpoint damaged: refused, and still nothing relabelled.
    pristine = (step4 / "optimizer.pt").read_bytes()
    _flip_a_byte(step4 / "optimizer.pt")
    code, out, err = _cli(resume, capsys, monkeypatch)
    assert code == 2 and "No checkpoint of run" in out + err and "is intact" in out + err
    assert _untouched(run) == before and run.status() == "finished"
    (step4 / "optimizer.pt").write_bytes(pristine)

    # No choice: the newest intact one, with a warning on the console and in the run's log.
    code, out, err = _cli(resume, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "warning: Checkpoint step-8 is damaged: " in out
    assert "warning: Resuming from step-4 instead, the newest intact checkpoint." in out
    assert "resumed at step 4" in out and "step 10/10" in out
    logged = [e.message for e in run.read_events() if isinstance(e, Log)]
    assert any(m.startswith("Checkpoint step-8 is damaged") for m in logged)
    started = [e for e in run.read_events() if isinstance(e, RunStarted)]
    assert started[-1].resumed_from_step == 4
    assert run.status() == "finished" and run.load_config().training.max_steps == 10
    assert [p.name for p in list_checkpoints(run)] == ["step-4", "step-8", "step-10"]
    verify_checkpoint(step8)


def test_a_full_disk_while_the_adapter_is_written_keeps_the_earlier_one_and_resume_writes_it(
        tmp_path, tiny_config, capsys, monkeypatch):
    """The final adapter's write used to end in a raw SafetensorError crash (exit 1, "resume from
    the last checkpoint") and leave runs/<id>/.adapter.tmp-<pid>/ that nothing removed."""
    from peft import peft_model

    cfg = tiny_config(max_steps=4, checkpoint={"every_steps": 2}, eval={"every_steps": 0})
    ws, run = _finished_run(tmp_path, cfg, capsys, monkeypatch)
    earlier = {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()}
    # What killed writers left: removed by the next writer; a live process's files stay.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = [run.path / f".adapter.tmp-{dead.pid}", run.checkpoints_dir / f".step-3.tmp-{dead.pid}-x"]
    for path in killed:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 65536)
    live = run.path / ".adapter.tmp-1"                 # pid 1 always runs
    live.mkdir()

    real_save = peft_model.safe_save_file

    def disk_fills_in_the_adapter(tensors, filename, *args, **kwargs):
        if ".adapter.tmp-" not in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        with open(filename, "wb") as fh:               # a part was written, then the disk was full
            fh.write(b"\0" * 1024)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft_model, "safe_save_file", disk_fills_in_the_adapter)
    resume = ["resume", run.id, "--workspace", str(ws), "--events", "jsonl", "--max-steps", "6"]
    code, events, _ = _cli(resume, capsys, monkeypatch)
    failed = events[-1]
    assert code == 2 and isinstance(failed, RunFailed) and failed.kind == "disk_full"
    assert failed.message.startswith(f"Could not write the final adapter in {run.path}: no space "
                                     "left on device")
    assert failed.hint.startswith(f"Free space at {run.path}, then resume the run")
    assert "it goes on from step-6" in failed.hint and "last checkpoint" not in failed.hint
    assert {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()} == earlier
    assert not any(p.exists() for p in killed) and live.is_dir()
    assert sorted(p.name for p in run.path.glob(".adapter.tmp-*")) == [live.name]
    assert verify_checkpoint(run.checkpoints_dir / "step-6")["step"] == 6

    monkeypatch.setattr(peft_model, "safe_save_file", real_save)      # space freed
    code, events, _ = _cli(resume, capsys, monkeypatch)
    assert code == 0 and isinstance(events[-1], RunFinished) and events[-1].step == 6
    assert json.loads((run.adapter_dir / "trainer_state.json").read_text())["step"] == 6
    assert run.status() == "finished"


def test_a_crash_before_any_checkpoint_does_not_point_to_one(tmp_path, tiny_config, monkeypatch):
    from cpt_studio.engine.train import loop as trainer

    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer.TrainingLoop, "_train_step", boom)
    _, events, result = _train(Workspace(tmp_path / "ws"), tiny_config(max_steps=4))
    failed = events[-1]
    assert result.exit_code == 1 and isinstance(failed, RunFailed) and failed.kind == "crash"
    assert "last checkpoint" not in failed.hint
    assert "it has no checkpoint yet, so it starts again from the beginning" in failed.hint
