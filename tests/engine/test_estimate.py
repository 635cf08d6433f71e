"""VRAM estimate: the ordering a user relies on when picking precision and settings."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.train.estimate import GIB, estimate_vram, fit_badge, format_bytes, gpu_total_memory

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Info:
    """A ModelInfo-shaped stand-in (Llama-3.1-8B numbers)."""
    architecture: str = "LlamaForCausalLM"
    n_params: int = 8_030_261_248
    vocab_size: int = 128_256
    hidden_size: int = 4096
    n_layers: int = 32
    tied_embeddings: bool = False
    linear_module_names: list = field(default_factory=lambda: list(LLAMA_LINEARS))
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    dtype: str = "bfloat16"


def p1_config(**training) -> RunConfig:
    cfg = RunConfig()
    cfg.model.precision = "4bit"
    cfg.data.seq_len = 2048
    cfg.training.batch_size = 2
    cfg.training.gradient_checkpointing = True
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


def test_4bit_is_smaller_than_bf16_and_base_sizes_are_plausible():
    cfg = p1_config()
    est4 = estimate_vram(Info(), cfg)
    cfg.model.precision = "bf16"
    est16 = estimate_vram(Info(), cfg)
    assert est4.total < est16.total
    # 8B in bf16 is ~15 GiB, less the ~2 GiB of freed frozen embed_tokens/lm_head originals.
    assert 12.5 * GIB < est16.base_weights < 14 * GIB
    # NF4 body ~3.4 GiB; the frozen bf16 originals of the trained embed_tokens/lm_head are freed.
    assert 3.0 * GIB < est4.base_weights < 4.0 * GIB
    cfg = p1_config(free_frozen_embeddings=False)
    kept = estimate_vram(Info(), cfg)
    assert kept.base_weights - est4.base_weights == 2 * 128_256 * 4096 * 2
    assert 4.5 * GIB < kept.base_weights < 6.5 * GIB
    # The whole P1 run lands near what bench/RESULTS.md measured on an H200 (not more precise
    # than that): ~15 GiB with fp32 copies and dense gradients, ~9-11 with the GPU defaults.
    assert 8 * GIB < est4.total < 16 * GIB
    fp32 = p1_config(embedding_weights="fp32", embedding_optimizer="adamw8bit",
                     offload_checkpoints="off")
    assert 13 * GIB < estimate_vram(Info(), fp32).total < 20 * GIB


def test_precisions_are_ordered():
    totals = []
    for precision in ("4bit", "8bit", "bf16", "fp32"):
        cfg = p1_config()
        cfg.model.precision = precision
        totals.append(estimate_vram(Info(), cfg).base_weights)
    assert totals == sorted(totals)
    cfg = p1_config()
    cfg.model.precision = "auto"
    assert estimate_vram(Info(), cfg).precision == "4bit"


def test_gradient_checkpointing_lowers_activations():
    on = estimate_vram(Info(), p1_config(gradient_checkpointing=True))
    off = estimate_vram(Info(), p1_config(gradient_checkpointing=False))
    assert on.activations * 5 < off.activations
    assert on.total < off.total
    # Offloaded checkpoints (auto on a GPU) take the layers' inputs off, but for the one prefetched
    # back during a layer's backward: 31 x 4,096 tokens x 4,096 x 2 B.
    kept = estimate_vram(Info(), p1_config(offload_checkpoints="off"))
    assert kept.activations - on.activations == 31 * 4096 * 4096 * 2


def test_each_unchecked_layer_adds_its_full_activations():
    """training.unchecked_layers: the last N layers keep their whole set instead of their input."""
    tokens, hidden = 4096, 4096
    per_layer = 8 * hidden + 2 * 1024 + 4 * 14336           # values a token, Llama-8B shape
    for offload in ("on", "off"):
        base = estimate_vram(Info(), p1_config(offload_checkpoints=offload))
        eight = estimate_vram(Info(), p1_config(offload_checkpoints=offload, unchecked_layers=8))
        input_kept = 0 if offload == "on" else hidden         # an offloaded input costs no VRAM
        assert eight.activations - base.activations == 8 * tokens * (per_layer - input_kept) * 2
    every = estimate_vram(Info(), p1_config(unchecked_layers=99))
    off = estimate_vram(Info(), p1_config(gradient_checkpointing=False))
    assert every.activations == off.activations                # clamped to the 32 layers


def test_batch_and_sequence_scale_activations_and_logits():
    small = estimate_vram(Info(), p1_config(batch_size=1, kernels="off"))
    big = estimate_vram(Info(), p1_config(batch_size=4, kernels="off"))
    assert big.activations == 4 * small.activations
    assert big.logits == 4 * small.logits
    # logits for the full vocabulary: B x T x V x 4 bytes, x2 for the gradient
    assert small.logits == 2048 * 128_256 * 4 * 2
    # The fused loss (kernels on) holds one 2048-row bf16 chunk and its gradient, whatever the batch.
    fused = estimate_vram(Info(), p1_config(batch_size=4, kernels="auto"))
    assert fused.logits == 2048 * 128_256 * 2 * 2 < big.logits / 7


def test_trained_embeddings_counted_once_when_tied():
    cfg = p1_config()
    untied = estimate_vram(Info(), cfg).embeddings
    tied = estimate_vram(Info(tied_embeddings=True, n_params=7_500_000_000), cfg).embeddings
    # GPU default: bf16 weight + bf16 gradient + 8-bit AdamW states = 6 B/param; untied,
    # embed_tokens' gradient holds only the batch's 4,096 rows.
    assert tied == 128_256 * 4096 * 6
    assert untied == 2 * tied - (128_256 - 2 * 2048) * 4096 * 2
    cfg.training.sparse_embedding_grad = False
    assert estimate_vram(Info(), cfg).embeddings == 2 * tied
    cfg.training.embedding_optimizer = "adamw8bit"     # fp32 masters: 4 + 4 + 2
    assert estimate_vram(Info(), cfg).embeddings == 2 * 128_256 * 4096 * 10
    cfg.training.embedding_optimizer = "adamw"
    assert estimate_vram(Info(), cfg).embeddings == 2 * 128_256 * 4096 * 16
    cfg.adapter.embed_tokens = cfg.adapter.lm_head = "off"
    assert estimate_vram(Info(), cfg).embeddings == 0
    cfg.adapter.embed_tokens = "lora"
    assert 0 < estimate_vram(Info(), cfg).embeddings < tied


def test_lora_grows_with_rank_and_targets():
    cfg = p1_config()
    r16 = estimate_vram(Info(), cfg).lora
    # Llama-8B r16 on all 7 projections is ~42M params.
    assert 40e6 * 16 < r16 < 44e6 * 16
    cfg.adapter.r = 32
    assert estimate_vram(Info(), cfg).lora == 2 * r16
    cfg.training.lora_optimizer = "fused8bit"       # 8-bit moments: 10 instead of 16 B/param
    assert estimate_vram(Info(), cfg).lora == 2 * r16 * 10 // 16
    cfg.adapter.r = 16
    cfg.adapter.target_modules = ["q_proj", "v_proj"]
    assert estimate_vram(Info(), cfg).lora < r16 / 5


def test_missing_optional_shape_fields_fall_back():
    @dataclass
    class Bare:
        n_params: int = 135_000_000
        vocab_size: int = 49152
        hidden_size: int = 576
        n_layers: int = 30
        tied_embeddings: bool = True
        linear_module_names: list = field(default_factory=lambda: list(LLAMA_LINEARS))

    est = estimate_vram(Bare(), RunConfig())
    assert 0 < est.total < 24 * GIB
    assert [label for label, _ in est.parts()][0].startswith("Base weights")
    assert sum(b for _, b in est.parts()) == est.total


@pytest.mark.parametrize("total,badge", [(10, "fits"), (85, "fits"), (86, "tight"), (100, "tight"),
                                         (101, "won't fit")])
def test_fit_badge(total, badge):
    assert fit_badge(total * GIB, 100 * GIB) == badge


def test_gpu_total_memory_and_format():
    mem = gpu_total_memory()
    assert mem is None or mem > 0
    assert format_bytes(5.84 * GIB) == "5.8 GB"
    assert format_bytes(500 * 1024 ** 2) == "500 MB"
