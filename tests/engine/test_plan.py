"""The Plan: one place decides what `auto` becomes; the run setup and the VRAM estimate both follow it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import ConfigError
from cpt_studio.engine.model.adapters import EMBEDDINGS_GROUP, LORA_GROUP
from cpt_studio.engine.model.source import describe_model, resolve_model_source
from cpt_studio.engine.runs.events import RunStarted, from_json
from cpt_studio.engine.runs.index import RunIndex
from cpt_studio.engine.runs.sinks import FanOut, ListSink, RunFolderSink
from cpt_studio.engine.runs.store import Workspace
from cpt_studio.engine.speed.offload_checkpoint import offload_stats
from cpt_studio.engine.train import plan as plan_module
from cpt_studio.engine.train.estimate import estimate_vram
from cpt_studio.engine.train.loop import run_training
from cpt_studio.engine.train.plan import RULES, Facts, Plan, resolve
from cpt_studio.engine.train.setup import setup_training

GPU = Facts(triton=True, bitsandbytes=True, cuda_bf16=True, gpu_here=True)
CPU = torch.device("cpu")
DECISIONS = [f.name for f in dataclasses.fields(Plan)
             if f.name not in ("device", "model_type", "why", "transforms")]


@pytest.fixture
def tiny(tmp_path, tiny_model_dir):
    """Factory: a RunConfig for the tiny llama (fp32, CPU-sized) on a few lines of text."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)

    def make(tied: bool = False, **training) -> RunConfig:
        cfg = RunConfig(name="plan")
        cfg.model.source, cfg.model.precision = str(tiny_model_dir("llama", tied)), "fp32"
        cfg.adapter.r, cfg.adapter.alpha = 4, 8
        cfg.data.train_files, cfg.data.seq_len, cfg.data.eval_fraction = [str(corpus)], 32, 0.1
        cfg.training.max_steps, cfg.training.batch_size, cfg.training.warmup_steps = 2, 2, 0
        cfg.eval.every_steps = cfg.checkpoint.every_steps = 0
        for key, value in training.items():
            setattr(cfg.training, key, value)
        return cfg

    return make


def info_of(cfg: RunConfig):
    return describe_model(resolve_model_source(cfg.model.source, cfg.model.source))


def test_every_decision_is_a_rule_with_a_reason():
    assert list(RULES) == DECISIONS
    plan = resolve(RunConfig(), "cpu")
    assert set(plan.why) == set(DECISIONS) and all(plan.why.values())
    assert len(plan.lines()) == 2 + len(DECISIONS) and plan.lines()[0] == "Device: CPU"
    # on CPU the kernels are off: the only transforms are the embedding-memory ones it asks for
    assert plan.lines()[-1] == "Speed transforms: free_frozen_embeddings"


def test_cpu_plan_is_plain_fp32_torch():
    plan = resolve(RunConfig(), CPU)
    assert (plan.device, plan.precision, plan.autocast, plan.autocast_dtype) == ("cpu", "fp32", "", None)
    assert not plan.kernels and plan.why["kernels"] == "auto: on only with CUDA"
    assert (plan.embedding_optimizer, plan.embedding_weights) == ("adamw", "fp32")
    assert not (plan.sparse_embedding_grad or plan.offload_checkpoints or plan.defer_head_grad
                or plan.stream_in_compute_dtype)
    assert plan.gradient_checkpointing and plan.free_frozen_embeddings   # RunConfig's defaults


def test_cuda_plan_takes_every_gpu_default(monkeypatch):
    from cpt_studio.engine.speed.registry import TRANSFORMS, plan_transforms

    # the libraries the transforms' checks read, imported before CUDA is faked (bitsandbytes would
    # look for its CUDA library)
    plan_transforms("llama", {t.switch: True for t in TRANSFORMS})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = resolve(RunConfig(), "cuda:0")
    assert (plan.device, plan.precision, plan.autocast_dtype) == ("cuda", "4bit", torch.bfloat16)
    assert plan.kernels and plan.embedding_optimizer == "fused8bit"   # Triton is installed here
    assert plan.why["embedding_optimizer"] == "auto: CUDA with Triton"
    assert plan.embedding_weights == "bf16" and plan.sparse_embedding_grad
    assert plan.offload_checkpoints and plan.defer_head_grad and plan.stream_in_compute_dtype
    assert "Kernels: on — auto: CUDA with Triton" in plan.lines()
    # A GPU without bf16: no autocast, so fp32 copies and a residual stream in the weights' dtype.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    old = resolve(RunConfig(), "cuda")
    assert old.autocast == "" and old.embedding_weights == "fp32" and not old.stream_in_compute_dtype


def test_auto_embedding_optimizer_falls_back_with_its_reason():
    cfg = RunConfig()
    cfg.training.kernels = "off"
    plan = resolve(cfg, "cuda", facts=GPU)
    assert (plan.embedding_optimizer, plan.why["embedding_optimizer"]) == ("adamw8bit", "auto: CUDA, kernels off")
    assert not plan.defer_head_grad and plan.embedding_weights == "fp32"
    bare = dataclasses.replace(GPU, triton=False, bitsandbytes=False)
    assert resolve(RunConfig(), "cuda", facts=bare).embedding_optimizer == "adamw"


def test_tied_embeddings_never_get_a_sparse_gradient(tiny):
    cfg = tiny(tied=True)
    plan = resolve(cfg, "cuda", info_of(cfg), facts=GPU)
    assert plan.model_type == "llama" and plan.embedding_optimizer == "fused8bit"
    assert not plan.sparse_embedding_grad and "tied" in plan.why["sparse_embedding_grad"]
    assert resolve(tiny(), "cuda", info_of(tiny()), facts=GPU).sparse_embedding_grad


def test_an_explicit_setting_that_cannot_hold_is_a_config_error(tmp_path, tiny):
    cfg = RunConfig()
    cfg.training.embedding_weights = "bf16"
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "cpu")
    assert err.value.problems == {"training.embedding_weights": "bf16 needs embedding_optimizer "
                                  "fused8bit, and it resolved to adamw here; use fp32 or auto"}
    cfg.training.embedding_optimizer = "fused8bit"
    with pytest.raises(ConfigError, match="bf16 needs bf16 autocast"):
        resolve(cfg, "cpu")
    assert resolve(cfg, "cuda", facts=GPU).embedding_weights == "bf16"
    cfg.training.embedding_optimizer = "adamw"          # the estimate says so before Start ...
    with pytest.raises(ConfigError, match="training.embedding_weights"):
        estimate_vram(info_of(tiny()), cfg)
    run = tiny(embedding_weights="bf16")                # ... and the run fails the same way
    events, ws = ListSink(), Workspace(tmp_path / "ws")
    result = run_training(run, ws, ws.create_run(run), events)
    failed = events.events[-1]
    assert result.exit_code == 2 and failed.kind == "config" and "embedding_weights" in failed.message


def test_to_dict_is_json_and_round_trips():
    plan = resolve(RunConfig(), "cuda", facts=GPU)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["lines"] == plan.lines() and data["why"]["kernels"] == plan.why["kernels"]
    assert Plan.from_dict(data) == plan
    from cpt_studio.engine.speed.registry import TransformChoice

    assert plan.transforms and all(isinstance(t, TransformChoice) for t in plan.transforms)
    later = dataclasses.replace(plan, transforms=(TransformChoice("rmsnorm", False, "off: a reason"),))
    assert Plan.from_dict(json.loads(json.dumps(later.to_dict()))) == later
    assert "rmsnorm: off: a reason" in later.lines() and "Speed transforms: none" in later.lines()
    with pytest.raises(ValueError, match="precision"):
        Plan.from_dict({k: v for k, v in data.items() if k != "precision"})


def test_run_started_carries_the_plan_and_old_events_still_load(tmp_path, tiny):
    cfg = tiny()
    ws = Workspace(tmp_path / "ws")
    run_dir, events = ws.create_run(cfg), ListSink()
    assert run_training(cfg, ws, run_dir, FanOut(RunFolderSink(run_dir), events)).exit_code == 0
    started = next(e for e in events.events if isinstance(e, RunStarted))
    plan = Plan.from_dict(started.plan)
    assert plan == resolve(cfg, CPU, info_of(cfg))
    assert set(started.param_groups) == {EMBEDDINGS_GROUP, LORA_GROUP} == {"embeddings", "other"}
    logged = [e.message for e in events.events if getattr(e, "message", "").startswith("plan:")]
    assert logged and "Embeddings optimizer: adamw — auto: torch AdamW on CPU" in logged[0]
    # Written to disk and read back; a RunStarted from before the plan existed loads with {}.
    on_disk = [from_json(line) for line in run_dir.events_path.read_text().splitlines()]
    assert next(e for e in on_disk if isinstance(e, RunStarted)).plan == started.plan
    lines = []
    for line in run_dir.events_path.read_text().splitlines():
        data = json.loads(line)
        data.pop("plan", None)
        lines.append(json.dumps(data))
    run_dir.events_path.write_text("\n".join(lines) + "\n")
    old = next(e for e in run_dir.read_events() if isinstance(e, RunStarted))
    assert old.plan == {} and old.param_groups == started.param_groups
    rows = RunIndex(ws).list_runs()
    assert [(r.id, r.status, r.steps) for r in rows] == [(run_dir.id, "finished", 2)]


# ---- the key property: swap one rule, and both the estimate and the run follow ---------------------
def test_one_offload_rule_drives_the_estimate_and_the_setup(tmp_path, tiny, monkeypatch):
    cfg = tiny(gradient_checkpointing=True)
    info = info_of(cfg)
    before = estimate_vram(info, cfg)
    ws = Workspace(tmp_path / "ws")
    assert not setup_training(cfg, ws, lambda e: None, CPU).plan.offload_checkpoints   # auto: CPU off

    # Inverted: offload on CPU, keep the layer inputs on a GPU.
    monkeypatch.setitem(RULES, "offload_checkpoints", lambda i, d: (i.device != "cuda", "test: inverted"))
    after = estimate_vram(info, cfg)
    layers, hidden, tokens = info.n_layers, info.hidden_size, 2 * 32
    assert after.activations - before.activations == (layers - 1) * hidden * tokens * 4   # fp32
    setup = setup_training(cfg, ws, lambda e: None, CPU)
    assert setup.plan.offload_checkpoints and setup.plan.why["offload_checkpoints"] == "test: inverted"
    assert offload_stats(setup.model) is not None
    assert f"checkpointed layer inputs in CPU memory ({layers} layers)" in setup.memory_summary


def test_one_embedding_optimizer_rule_drives_the_estimate_and_the_optimizer(tmp_path, tiny, monkeypatch):
    import bitsandbytes as bnb

    cfg = tiny()
    info = info_of(cfg)
    before = estimate_vram(info, cfg)                      # a GPU: fused8bit, bf16 copies
    monkeypatch.setitem(plan_module.RULES, "embedding_optimizer", lambda i, d: ("adamw8bit", "test"))
    after = estimate_vram(info, cfg)                       # adamw8bit: fp32 copies, dense gradient
    full = info.vocab_size * info.hidden_size
    assert after.embeddings == 2 * full * (4 + 4 + 2) and before.embeddings < after.embeddings
    setup = setup_training(cfg, Workspace(tmp_path / "ws"), lambda e: None, CPU)
    assert setup.param_groups[EMBEDDINGS_GROUP]["optimizer"] == "adamw8bit"
    assert isinstance(setup.optimizer.parts[0], bnb.optim.AdamW8bit)


@pytest.mark.gpu
def test_on_a_gpu_the_run_does_what_the_estimate_counted(tmp_path, tiny):
    """The estimate's plan (resolved for "cuda" from the model description) is the plan the run
    on this GPU acts on: bf16 copies with fused8bit, the sparse gradient, offload, the kernels."""
    from cpt_studio.engine.train.fused_adamw import FusedAdamW8bit

    cfg = tiny(gradient_checkpointing=True)
    counted = resolve(cfg, "cuda", info_of(cfg))
    setup = setup_training(cfg, Workspace(tmp_path / "ws"), lambda e: None, torch.device("cuda"))
    assert setup.plan == counted
    assert (counted.embedding_optimizer, counted.embedding_weights) == ("fused8bit", "bf16")
    assert counted.kernels and counted.sparse_embedding_grad and counted.offload_checkpoints
    assert isinstance(setup.optimizer.parts[0], FusedAdamW8bit)
    copy = setup.model.get_base_model().model.embed_tokens.modules_to_save["default"]
    assert copy.weight.dtype == torch.bfloat16 and copy.sparse
    assert offload_stats(setup.model) is not None and setup.loss_fn.patch is not None
    loss = setup.loss_fn(setup.train_blocks[:2].cuda())
    loss.backward()
    assert torch.isfinite(loss) and copy.weight.grad.is_sparse


def test_unchecked_layers_are_the_last_ones_and_train_the_same(tmp_path, tiny):
    """training.unchecked_layers: the plan says how many and why, setup turns checkpointing off for
    the last N decoder layers only, and a step gives the same loss and gradients (recompute or not,
    the math is the same)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    ws = Workspace(tmp_path / "ws")
    results = {}
    for n in (0, 1):
        setup = setup_training(tiny(unchecked_layers=n), ws, lambda e: None, CPU)
        assert setup.plan.unchecked_layers == n
        flags = [m.gradient_checkpointing for m in setup.model.modules()
                 if isinstance(m, GradientCheckpointingLayer)]
        assert flags == [True] * (len(flags) - n) + [False] * n
        torch.manual_seed(0)
        ids = torch.randint(0, 100, (2, 16))
        setup.model.train()                  # checkpointing only runs in training mode
        setup.model.zero_grad(set_to_none=True)
        loss = setup.model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[n] = (loss.item(), {k: p.grad.clone() for k, p in setup.model.named_parameters()
                                    if p.grad is not None})
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert "the last 1 layers not checkpointed (no recompute)" in setup.memory_summary
    lines = resolve(tiny(unchecked_layers=1), CPU, info_of(tiny())).lines()
    assert "Layers not checkpointed: 1 — the last layers keep their activations (no recompute in " \
           "the backward)" in lines


def test_unchecked_layers_without_checkpointing_or_past_the_last_layer(tiny):
    info = info_of(tiny())
    off = resolve(tiny(gradient_checkpointing=False, unchecked_layers=3), CPU, info)
    assert off.unchecked_layers == 0 and "checkpointing is off" in off.why["unchecked_layers"]
    every = resolve(tiny(unchecked_layers=1000), CPU, info)
    assert every.unchecked_layers == info.n_layers and "as good as" in every.why["unchecked_layers"]
    # a plan saved before the setting existed still loads (0)
    data = resolve(tiny(), CPU, info).to_dict()
    del data["unchecked_layers"]
    assert Plan.from_dict(data).unchecked_layers == 0
