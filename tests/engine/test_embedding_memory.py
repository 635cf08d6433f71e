"""The embedding switches: bf16 residual stream, freed frozen originals, 8-bit embedding states."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from tiny_models import build_tiny_model
from cpt_studio.engine.model.adapters import attach_adapters
from cpt_studio.engine.runs.checkpoints import _load_state
from cpt_studio.engine.config import AdapterConfig, RunConfig, validate
from cpt_studio.engine.speed.embedding_memory import free_frozen_originals, keep_stream_in_compute_dtype
from cpt_studio.engine.speed.registry import apply_transforms
from cpt_studio.engine.errors import CheckpointError
from cpt_studio.engine.train import optim
from cpt_studio.engine.train.optim import CombinedOptimizer, build_scheduler
from cpt_studio.engine.train.plan import Facts, resolve
from cpt_studio.engine.train.setup import _trainable_to_fp32, prepare_model

VOCAB = 384
CPU = torch.device("cpu")


def build_optimizer(model, cfg: RunConfig, device: torch.device = CPU):
    """optim.build_optimizer with the plan setup_training would resolve for `device`."""
    return optim.build_optimizer(model, cfg, resolve(cfg, device))


def adapted(tied=False, mode="full", bf16_base=True, seed=0):
    """Adapted tiny llama as setup_training leaves it on CUDA: a bf16 frozen base (what the 4-bit
    load keeps unquantized), fp32 trained copies."""
    base = build_tiny_model("llama", tied, vocab_size=VOCAB, seed=seed)
    if bf16_base:
        base = base.to(torch.bfloat16)
    torch.manual_seed(1)
    model = attach_adapters(base, AdapterConfig(r=4, alpha=8, embed_tokens=mode, lm_head=mode))
    _trainable_to_fp32(model)
    return model


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def layer_input_dtypes(model, run):
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).dtype),
        with_kwargs=True) for layer in model.get_base_model().model.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- 1. residual stream in the compute dtype ------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora", "off"])
def test_hidden_states_follow_the_autocast_dtype_and_gradients_reach_the_embeddings(mode):
    model = adapted(mode=mode)
    batch = ids()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=batch, labels=batch).loss

    if mode == "full":   # the problem: an fp32 trained copy carries the whole stream in fp32
        assert set(layer_input_dtypes(model, loss)) == {torch.float32}
    keep_stream_in_compute_dtype(model)
    assert set(layer_input_dtypes(model, loss)) == {torch.bfloat16}
    out = loss()
    out.backward()
    emb = model.get_input_embeddings()
    trained = [p for p in emb.parameters() if p.requires_grad]
    if mode == "off":
        assert not trained
    else:
        assert trained and all(p.dtype == torch.float32 for p in trained)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
        assert any(p.grad.abs().sum() > 0 for p in trained)
    # Outside autocast the hook does nothing (generation, CPU training without autocast).
    if mode == "full":
        with torch.no_grad():
            assert emb(batch).dtype == torch.float32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert emb(batch).dtype == torch.bfloat16


def test_the_bf16_stream_keeps_the_loss_of_the_fp32_stream():
    batch = ids(3)
    losses = []
    for cast in (False, True):
        model = adapted()
        if cast:
            keep_stream_in_compute_dtype(model)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            losses.append(float(model(input_ids=batch, labels=batch).loss))
    assert abs(losses[1] - losses[0]) / losses[0] < 0.01


# ---- 2. frozen originals freed ---------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_freeing_releases_the_frozen_originals_and_changes_no_output(tied):
    model = adapted(tied=tied)
    base = model.get_base_model()
    originals = {id(w): weakref.ref(w) for w in (
        base.model.embed_tokens.original_module.weight, base.lm_head.original_module.weight)}
    batch = ids()
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)   # a bf16 base mixed with fp32 copies
    with torch.no_grad(), autocast:
        before = model(input_ids=batch).logits
    freed = free_frozen_originals(model)
    assert freed == (1 if tied else 2) * VOCAB * 32 * 2   # bf16, a tied matrix once
    gc.collect()
    assert all(ref() is None for ref in originals.values())
    # Nothing is left on `meta` for other code to trip on: every parameter, the placeholders too,
    # is on the model's device, and a placeholder holds one element.
    assert {p.device.type for p in model.parameters()} == {"cpu"} and base.device.type == "cpu"
    placeholder = base.model.embed_tokens.original_module.weight
    assert placeholder.shape == (VOCAB, 32) and placeholder.untyped_storage().nbytes() == 2
    with torch.no_grad(), autocast:
        assert torch.equal(model(input_ids=batch).logits, before)
    assert free_frozen_originals(model) == 0                      # twice is harmless
    with pytest.raises(RuntimeError, match="free_frozen_embeddings"), model.disable_adapter():
        model(input_ids=batch)


@pytest.mark.parametrize("tied", [False, True])
def test_the_undoable_free_keeps_the_originals_on_the_host_only(tied):
    """The registry's free keeps the weights for its undo in host memory; the original Parameter
    objects it restores into must hold nothing meanwhile, or the GPU keeps every matrix."""
    model = adapted(tied=tied)
    base = model.get_base_model()
    originals = [base.model.embed_tokens.original_module.weight, base.lm_head.original_module.weight]
    values = [w.detach().clone() for w in originals]
    surgery = apply_transforms(model, ["free_frozen_embeddings"], backend="torch")
    assert surgery.facts["freed_bytes"] == (1 if tied else 2) * VOCAB * 32 * 2
    assert all(w.untyped_storage().nbytes() == 0 for w in originals)
    surgery.revert()
    restored = [base.model.embed_tokens.original_module.weight, base.lm_head.original_module.weight]
    assert all(a is b for a, b in zip(restored, originals))
    assert all(torch.equal(w, v) for w, v in zip(restored, values))
    assert (restored[0] is restored[1]) == tied


@pytest.mark.parametrize("tied", [False, True])
def test_a_freed_model_trains_saves_reloads_and_merges(tmp_path, tied):
    model = adapted(tied=tied, bf16_base=False)
    free_frozen_originals(model)
    cfg = RunConfig()
    optimizer, _ = build_optimizer(model, cfg, CPU)
    model.train()
    for step in range(3):
        batch = ids(step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    batch = ids(9)
    with torch.no_grad():
        trained = model(input_ids=batch).logits
    model.save_pretrained(str(tmp_path))          # what checkpoints and the final adapter do
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("original_module" in k for k in saved)
    assert all(t.device.type == "cpu" for t in saved.values())

    # A fresh base + the saved adapter gives the trained model (plain peft, as users load it).
    fresh = PeftModel.from_pretrained(build_tiny_model("llama", tied, vocab_size=VOCAB),
                                      str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=batch).logits, trained, atol=1e-5)

    # Resume: the state dict loads into another freed model (checkpoints.load_checkpoint's call).
    other = adapted(tied=tied, bf16_base=False)   # the same base, untrained adapter
    free_frozen_originals(other)
    result = set_peft_model_state_dict(other, saved)
    assert not result.unexpected_keys
    other.eval()
    with torch.no_grad():
        assert torch.allclose(other(input_ids=batch).logits, trained, atol=1e-5)

    merged = model.merge_and_unload()
    assert not [n for n, p in merged.named_parameters() if p.device.type == "meta"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=batch).logits, trained, atol=1e-5)
    if tied:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_lora_embeddings_have_no_originals_to_free():
    assert free_frozen_originals(adapted(mode="lora")) == 0


def _prepared(model, plan) -> dict:
    surgery, done = prepare_model(model, plan)
    return done


def test_prepare_model_follows_the_switches():
    cfg = RunConfig()
    assert cfg.training.free_frozen_embeddings and cfg.training.stream_in_compute_dtype
    done = _prepared(adapted(), resolve(cfg, CPU))
    # On CPU: fp32 masters and torch AdamW, so no sparse gradient (only fused8bit reads one), and
    # no autocast, so no bf16 stream to keep.
    assert done == {"freed_bytes": 2 * VOCAB * 32 * 2, "stream_in_compute_dtype": False,
                    "embedding_weights": "fp32", "embedding_optimizer": "adamw",
                    "sparse_embedding_grad": False, "offloaded_layers": 0, "defer_head_grad": False, "unchecked_layers": 0}
    # With fused8bit the untied embed_tokens copy gets its row-sparse gradient.
    cfg.training.embedding_optimizer = "fused8bit"
    model = adapted()
    assert _prepared(model, resolve(cfg, CPU))["sparse_embedding_grad"]
    assert model.get_base_model().model.embed_tokens.modules_to_save["default"].sparse
    cfg.training.embedding_optimizer = "auto"
    cfg.training.free_frozen_embeddings = cfg.training.stream_in_compute_dtype = False
    model = adapted()
    done = _prepared(model, resolve(cfg, CPU))
    assert (done["freed_bytes"], done["stream_in_compute_dtype"]) == (0, False)
    assert model.get_base_model().model.embed_tokens.original_module.weight.device.type == "cpu"


# ---- 3. 8-bit states for the embeddings group --------------------------------------------------------
def config(kind: str) -> RunConfig:
    cfg = RunConfig()
    cfg.training.embedding_optimizer = kind
    cfg.training.warmup_steps = 2
    assert not validate(cfg)
    return cfg


def test_auto_is_8bit_on_cuda_only():
    def chosen(device, kernels="auto", choice="auto"):
        cfg = RunConfig()
        cfg.training.kernels, cfg.training.embedding_optimizer = kernels, choice
        return resolve(cfg, device, facts=Facts(True, True, True, True)).embedding_optimizer

    assert chosen("cpu") == "adamw"
    assert chosen("cuda") == "fused8bit"
    assert chosen("cuda", kernels="off") == "adamw8bit"
    assert chosen("cpu", choice="adamw8bit") == "adamw8bit"
    cfg = RunConfig()
    cfg.training.embedding_optimizer = "sgd"
    assert "training.embedding_optimizer" in validate(cfg)


def _steps(model, optimizer, scheduler, seeds):
    model.train()
    for seed in seeds:
        batch = ids(seed)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_8bit_embedding_states_combine_with_adamw_and_resume_exactly(tmp_path):
    import bitsandbytes as bnb

    cfg = config("adamw8bit")
    model = adapted(bf16_base=False)
    optimizer, groups = build_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, CombinedOptimizer)
    assert [type(p) for p in optimizer.parts] == [bnb.optim.AdamW8bit, torch.optim.AdamW]
    assert [g["name"] for g in optimizer.param_groups] == ["embeddings", "other"]
    assert groups["embeddings"]["optimizer"] == "adamw8bit" and groups["other"]["optimizer"] == "adamw"
    scheduler = build_scheduler(optimizer, cfg, 10)
    _steps(model, optimizer, scheduler, [0, 1, 2])
    # The scheduler's lr reaches the parts; the ratio of the two groups holds.
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(cfg.training.learning_rate / cfg.embedding_lr)
    emb = optimizer.parts[0]
    big = [p for p in emb.param_groups[0]["params"] if p.numel() >= 4096]
    assert big and all(emb.state[p]["state1"].dtype == torch.uint8 for p in big)

    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    _steps(model, optimizer, scheduler, [3, 4])

    again = adapted(bf16_base=False, seed=7)
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    optimizer2, _ = build_optimizer(again, cfg, CPU)
    scheduler2 = build_scheduler(optimizer2, cfg, 10)
    _load_state(optimizer2, tmp_path / "optimizer.pt", "")      # torch.load(weights_only=True)
    _load_state(scheduler2, tmp_path / "scheduler.pt", "")
    _steps(again, optimizer2, scheduler2, [3, 4])
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name

    # A state saved by the other optimizer kind is refused with a checkpoint error.
    plain, _ = build_optimizer(adapted(bf16_base=False), config("adamw"), CPU)
    with pytest.raises(CheckpointError):
        _load_state(plain, tmp_path / "optimizer.pt", "")
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="trained with the adamw optimizer, this run uses "
                                              "adamw8bit; set training.embedding_optimizer: adamw"):
        _load_state(optimizer2, tmp_path / "plain.pt", "")
    fused, _ = build_optimizer(adapted(bf16_base=False), config("fused8bit"), CPU)
    with pytest.raises(CheckpointError, match="set training.embedding_optimizer: adamw8bit"):
        _load_state(fused, tmp_path / "optimizer.pt", "")   # an older run's default, resumed today
    lora8 = config("adamw8bit")
    lora8.training.lora_optimizer = "fused8bit"
    other, _ = build_optimizer(adapted(bf16_base=False), lora8, CPU)
    with pytest.raises(CheckpointError, match="its LoRA weights were trained with the adamw "
                                              "optimizer.*set training.lora_optimizer: adamw"):
        _load_state(other, tmp_path / "optimizer.pt", "")


def test_8bit_embedding_states_learn_what_fp32_states_learn():
    losses = {}
    # (embeddings group, other group): bnb's and our 8-bit states, ours on the LoRA group too
    for kinds in (("adamw", "adamw"), ("adamw8bit", "adamw"), ("fused8bit", "adamw"),
                  ("fused8bit", "fused8bit")):
        cfg = config(kinds[0])
        cfg.training.lora_optimizer = kinds[1]
        cfg.training.learning_rate, cfg.training.embedding_learning_rate = 1e-2, 1e-3
        model = adapted(bf16_base=False)
        optimizer, described = build_optimizer(model, cfg, CPU)
        assert (described["embeddings"]["optimizer"], described["other"]["optimizer"]) == kinds
        scheduler = build_scheduler(optimizer, cfg, 20)
        _steps(model, optimizer, scheduler, [0, 1] * 10)
        model.eval()
        with torch.no_grad():
            losses[kinds] = float(model(input_ids=ids(0), labels=ids(0)).loss)
    reference = losses[("adamw", "adamw")]
    for kinds, loss in losses.items():
        assert abs(loss - reference) / reference < 0.01, (kinds, loss, reference)
