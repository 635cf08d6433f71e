"""Reviewed copies of transformers' attention forwards that rotate q and k with our RoPE kernel.

    forward = attention_forward("Qwen3Attention", release, modeling_qwen3, backend="auto")
    module.forward = types.MethodType(forward, module)   # engine/speed/patching.py binds it so

LlamaAttention, MistralAttention, Qwen2Attention and Qwen3Attention.forward, as transformers
5.17.0 - 5.25.0 write them, are one body with three differences, kept here as data (`_ARCHS`):
Qwen3 applies q_norm / k_norm over the head dimension before the transpose; Mistral passes
`sliding_window=getattr(self.config, "sliding_window", None)` to the attention function, Qwen2
and Qwen3 pass `sliding_window=self.sliding_window`; Llama passes none. Across those releases
the body changed once, in the KV cache, hence one copy per release semantics:

- PAST_KEY_VALUES (5.17.0 - 5.23.0): parameter `past_key_values`,
  `past_key_values.update(key_states, value_states, self.layer_idx)`;
- CACHE (5.24.0 - 5.25.0): parameter `cache` under `deprecate_kwarg("past_key_values", "5.40.0",
  new_name="cache")`, `cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)`.

Everything else is the upstream code, statement for statement, with the one changed line marked
`# ours`: apply_rotary_pos_emb(q, k, cos, sin) becomes kernels.apply_rope. The attention function
is looked up at each call, as upstream does, in the modeling module's ALL_ATTENTION_FUNCTIONS with
its eager_attention_forward as the default (eager, sdpa, flash, flex: the installed version's
code). engine/speed/rope.py picks the copy by the fingerprint of the class' forward and binds it
only when that fingerprint is one engine/speed/upstream.py lists (read for each release above).

Two deliberate differences: the forwards accept position_embeddings and attention_mask as
keywords with a None default for every class (Llama's signature; Mistral's and Qwen's make them
required, which only matters for a call that leaves them out), and the `kernels` package's
`use_kernelized_func` wrapper of the class forward is not reproduced: it routes the calls to
apply_rotary_pos_emb, which these forwards do not make.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn

PAST_KEY_VALUES = "past_key_values"   # transformers 5.17.0 - 5.23.0
CACHE = "cache"                       # transformers 5.24.0 - 5.25.0
RELEASES = (PAST_KEY_VALUES, CACHE)


@dataclass(frozen=True)
class _Arch:
    """What one class' forward does beyond LlamaAttention's."""

    qk_norm: bool = False   # q_norm(q_proj(x).view(...)) and k_norm(...) before the transpose
    sliding_window: Callable[[nn.Module], int | None] | None = None   # passed as sliding_window=


def _config_window(self: nn.Module) -> int | None:
    return getattr(self.config, "sliding_window", None)   # MistralAttention: every layer


def _layer_window(self: nn.Module) -> int | None:
    return self.sliding_window   # Qwen2/Qwen3Attention: set in __init__ from config.layer_types


_ARCHS = {
    "LlamaAttention": _Arch(),
    "MistralAttention": _Arch(sliding_window=_config_window),
    "Qwen2Attention": _Arch(sliding_window=_layer_window),
    "Qwen3Attention": _Arch(qk_norm=True, sliding_window=_layer_window),
}

# Each class' forward fingerprint (engine/speed/upstream.py KNOWN["<class>.forward"], read in the
# releases listed there) -> the copy written for it. tests/engine/test_rope.py checks both tables
# list the same fingerprints.
REVIEWED = {
    "LlamaAttention": {"f4518d89ab9c": PAST_KEY_VALUES, "84fe45a8b6e9": CACHE},
    "MistralAttention": {"cbce7b476a93": PAST_KEY_VALUES, "547f1d418967": CACHE},
    "Qwen2Attention": {"cd1cad25879d": PAST_KEY_VALUES, "ee2ddfb065ff": CACHE},
    "Qwen3Attention": {"7c3e2e6dc4cb": PAST_KEY_VALUES, "989ae25f4805": CACHE},
}


def attention_forward(class_name: str, release: str, modeling: ModuleType, backend: str) -> Callable:
    """Our copy of `class_name`.forward for one release semantics (PAST_KEY_VALUES or CACHE).

    modeling: the module the class is defined in (its ALL_ATTENTION_FUNCTIONS and
    eager_attention_forward are the ones called, looked up per call as upstream does).
    """
    arch = _ARCHS[class_name]

    if release == PAST_KEY_VALUES:
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                    past_key_values=None, **kwargs):
            query_states, key_states, value_states = _rotated_qkv(self, arch, backend, hidden_states,
                                                                  position_embeddings)
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            return _attend(self, arch, modeling, hidden_states.shape[:-1], query_states, key_states,
                           value_states, attention_mask, kwargs)
        return forward

    if release == CACHE:
        from transformers.utils.deprecation import deprecate_kwarg

        @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                    **kwargs):
            query_states, key_states, value_states = _rotated_qkv(self, arch, backend, hidden_states,
                                                                  position_embeddings)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx,
                                                        kwargs=kwargs)
            return _attend(self, arch, modeling, hidden_states.shape[:-1], query_states, key_states,
                           value_states, attention_mask, kwargs)
        return forward

    raise ValueError(f"release must be one of {RELEASES}, not {release!r}")


def _rotated_qkv(self, arch: _Arch, backend: str, hidden_states: torch.Tensor, position_embeddings):
    """q, k, v as [B, H, S, D], q and k rotated: upstream's lines up to apply_rotary_pos_emb."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    if arch.qk_norm:
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    else:
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    # ours: was `apply_rotary_pos_emb(query_states, key_states, cos, sin)` (unsqueeze_dim=1)
    query_states, key_states = rotate_qk(query_states, key_states, cos, sin, backend)
    return query_states, key_states, value_states


def _attend(self, arch: _Arch, modeling: ModuleType, input_shape, query_states, key_states, value_states,
            attention_mask, kwargs: dict):
    """Upstream's lines after the cache update: the attention function, then o_proj."""
    attention_interface: Callable = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    window = {} if arch.sliding_window is None else {"sliding_window": arch.sliding_window(self)}

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **window,
        **kwargs,
    )

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str):
    """kernels.apply_rope(q, k, cos, sin) with q, k as [B, H, S, D] and cos, sin as [B, S, D].

    The results have the dtype transformers' apply_rotary_pos_emb gives: q and k promoted with cos
    and sin (q * cos), e.g. fp32 for bf16 q with fp32 cos/sin under autocast when the residual
    stream stays fp32 (training.stream_in_compute_dtype off); so q and k are upcast before the
    kernel, which computes in its inputs' dtype.
    """
    from cpt_studio.kernels import apply_rope

    return apply_rope(_promoted(q, cos, sin), _promoted(k, cos, sin), cos, sin, unsqueeze_dim=1,
                      backend=backend)


def _promoted(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x in the dtype of transformers' x * cos + rotate_half(x) * sin."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x if x.dtype == dtype else x.to(dtype)
