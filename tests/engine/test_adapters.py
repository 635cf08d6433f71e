"""LoRA + embed_tokens/lm_head modes, the two learning-rate groups, ties, merges and reloads."""
from __future__ import annotations

import pytest
import torch

from tiny_models import build_tiny_model
from cpt_studio.engine.model.adapters import (attach_adapters, count_parameters, describe_param_groups,
                                        discover_target_modules, embedding_param_groups)
from cpt_studio.engine.config import AdapterConfig
from cpt_studio.engine.errors import CheckpointError, ConfigError

VOCAB = 384
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = ["llama", "mistral", "qwen2"]


def make(arch="llama", tied=False, mode="full", vocab=VOCAB, **adapter):
    base = build_tiny_model(arch, tied, vocab_size=vocab)
    torch.manual_seed(1)
    return attach_adapters(base, AdapterConfig(r=4, alpha=8, embed_tokens=mode, lm_head=mode,
                                               **adapter))


def batch(seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def train(model, steps=3, lr=1e-2, embedding_lr=1e-3):
    optimizer = torch.optim.AdamW(embedding_param_groups(model, lr, embedding_lr))
    model.train()
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def effective_matrices(model):
    """(input-side, output-side) vocab x hidden matrices, as the model computes them."""
    hidden = model.get_input_embeddings().weight.shape[1] if hasattr(
        model.get_input_embeddings(), "weight") else 32
    with torch.no_grad():
        inp = model.get_input_embeddings()(torch.arange(VOCAB))
        out = model.get_output_embeddings()(torch.eye(hidden)).T
    return inp, out


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery_lists_the_projections_of_each_architecture(arch):
    assert discover_target_modules(build_tiny_model(arch)) == PROJECTIONS


def test_a_bad_target_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        make(target_modules=["q_proj", "qkv_proj"])
    text = str(err.value)
    assert "qkv_proj" in text and all(name in text for name in PROJECTIONS)
    assert "adapter.target_modules" in err.value.problems


def test_chosen_targets_are_the_only_lora_layers():
    model = make(mode="off", target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_embedding_group_holds_exactly_the_embed_and_head_params(arch, tied, mode):
    model = make(arch, tied, mode)
    groups = embedding_param_groups(model, 1e-3, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    emb = [names[id(p)] for p in groups[0]["params"]]
    other = [names[id(p)] for p in groups[1]["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(emb + other) == sorted(trainable)          # every tensor exactly once
    assert all("embed_tokens" in n or "lm_head" in n for n in emb)
    assert not any("embed_tokens" in n or "lm_head" in n for n in other)
    assert len(other) == 2 * 2 * len(PROJECTIONS)              # LoRA A and B, 2 layers
    expected_tensors = {("full", False): 2, ("full", True): 1, ("lora", False): 4, ("lora", True): 2}
    assert len(emb) == expected_tensors[(mode, tied)]
    if mode == "full":
        assert sum(p.numel() for p in groups[0]["params"]) == (1 if tied else 2) * VOCAB * 32
    info = describe_param_groups(groups)
    assert info["embeddings"]["lr"] == 1e-4 and info["other"]["lr"] == 1e-3
    assert info["embeddings"]["tensors"] == len(emb)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_first_adamw_step_moves_embeddings_by_the_embedding_lr(mode):
    model = make("llama", False, mode)
    groups = embedding_param_groups(model, 1e-2, 1e-4)
    before = [[p.detach().clone() for p in g["params"]] for g in groups]
    ids = batch()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [[p.grad.clone() for p in g["params"]] for g in groups]
    torch.optim.AdamW(groups, weight_decay=0.0).step()
    for group, old, grad in zip(groups, before, grads):
        # Adam's first step is lr * g / (|g| + eps): about lr wherever the gradient is not tiny.
        moved = torch.cat([(p.detach() - o)[g.abs() > 1e-4].abs() for p, o, g in
                           zip(group["params"], old, grad)])
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, group["lr"]), rtol=0.02), group["name"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tied_embeddings_stay_tied_while_training(arch, mode):
    model = make(arch, True, mode)
    start, _ = effective_matrices(model)
    train(model)
    inp, out = effective_matrices(model)
    assert not torch.allclose(inp, start)                       # the embeddings did train
    assert torch.allclose(inp, out, atol=1e-6)                  # ... as one matrix


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_merged_model_gives_the_adapter_logits(tied, mode):
    model = make("llama", tied, mode)
    train(model)
    ids = batch(7)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    assert (adapted - merged_logits).abs().max().item() < 1e-5
    assert type(merged.lm_head) is torch.nn.Linear
    if tied:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


@pytest.mark.parametrize("tied, mode", [(False, "full"), (True, "lora"), (False, "lora")])
def test_saved_adapter_loads_back_trainable_with_equal_weights(tmp_path, tied, mode):
    model = make("llama", tied, mode)
    train(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loaded = attach_adapters(build_tiny_model("llama", tied, vocab_size=VOCAB), AdapterConfig(),
                             init_from=str(tmp_path / "adapter"))
    again = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[n], saved[n]) for n in saved)
    ids = batch(3)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)


def test_adapter_of_another_vocabulary_is_refused(tmp_path):
    make("llama", False, "full").save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError) as err:
        attach_adapters(build_tiny_model("llama", vocab_size=320), AdapterConfig(),
                        init_from=str(tmp_path / "adapter"))
    assert str(tmp_path / "adapter") in err.value.message and "320" in err.value.message


def test_adapter_of_another_architecture_is_refused(tmp_path):
    import transformers

    make("llama", False, "off").save_pretrained(tmp_path / "adapter")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    with pytest.raises(CheckpointError) as err:
        attach_adapters(transformers.LlamaForCausalLM(config), AdapterConfig(),
                        init_from=str(tmp_path / "adapter"))
    assert str(tmp_path / "adapter") in err.value.message


def test_init_from_a_folder_without_adapter_names_it(tmp_path):
    with pytest.raises(CheckpointError) as err:
        attach_adapters(build_tiny_model(), AdapterConfig(), init_from=str(tmp_path))
    assert str(tmp_path) in err.value.message


def test_count_parameters_counts_trainable_and_shared_tensors_once():
    base = build_tiny_model("llama", tied=True, vocab_size=VOCAB)
    total_base = sum(p.numel() for p in base.parameters())
    model = attach_adapters(base, AdapterConfig(r=4, embed_tokens="off", lm_head="off"))
    trainable, total = count_parameters(model)
    lora = 2 * sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64),
                                            (32, 64), (64, 32)])
    assert trainable == lora and total == total_base + lora
