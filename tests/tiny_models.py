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


def build_tiny_model(arch: str = "llama", tied: bool = False, vocab_size: int = 320, seed: int = 0,
                     **config):
    """A 2-layer random causal LM of the given architecture (hidden 32, 4 heads, 2 kv heads).

    arch: "llama", "mistral", "qwen2" or "qwen3"; config: further config fields (they win), e.g.
    sliding_window=4, attention_dropout=0.1, attn_implementation="eager".
    """
    import torch
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    if arch == "qwen3":
        common["head_dim"] = 8   # Qwen3Config's default is 128, not hidden_size // heads
    common.update(config)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**common))
