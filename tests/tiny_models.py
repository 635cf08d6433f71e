"""Tiny random models and a tiny tokenizer built in code (no network, no hub), for tests and fixtures."""
from __future__ import annotations

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "La rapida bruna vulpo saltas super la maldiligenta hundo.",
    "Continued pretraining teaches a model a new language or domain.",
    "Ĉiuj homoj estas denaske liberaj kaj egalaj laŭ digno kaj rajtoj.",
    "0123456789 , . ; : ! ? ( ) [ ] { } \" ' - _ / \\ @ # $ % & * + = < > |",
] * 20


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences; every byte is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def build_tiny_model(arch: str = "llama", tied: bool | None = None, vocab_size: int = 320, seed: int = 0,
                     **config):
    """A 2-layer random causal LM of the given architecture (hidden 32, 4 heads of 8, 2 kv heads).

    arch: one of ARCHS ("gemma3" is the text-only Gemma3ForCausalLM, model_type "gemma3_text");
    tied: tie lm_head to embed_tokens (None: the family's default, tied for Gemma only);
    config: further config fields (they win), e.g. sliding_window=4, attention_dropout=0.1,
    attn_implementation="eager".

    What each family brings that Llama does not: Qwen2 q/k/v biases; Qwen3 q/k norms; Gemma-2
    (1 + weight) norms, a GeGLU MLP, scaled embeddings, sliding and global layers, attention and
    final logit soft-capping; Gemma-3 the same without the final soft-cap, with q/k norms; Phi-3
    fused qkv_proj and gate_up_proj.
    """
    import torch
    import transformers

    if tied is None:
        tied = arch.startswith("gemma")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    if arch in ("qwen3", "gemma2", "gemma3"):
        common["head_dim"] = 8   # their configs' default is 128 or 256, not hidden_size // heads
    if arch.startswith("gemma"):   # one sliding and one global layer; a window shorter than the tests' rows
        common.update(query_pre_attn_scalar=8, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"])
    common.update(config)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**common))
