"""Which model families each kernel transform applies to, and why it leaves the others stock.

    RMSNORM.reason("gemma2")   # "architecture 'gemma2': its RMSNorm scales by (1 + weight) ..."
    RMSNORM.reason("phi3")     # None: applies

One table for the plan (engine/speed/registry.plan_transforms: the Plan's "why") and for the
transforms themselves (engine/speed/patching.py, the fused loss in registry.py: a model of a family
left out keeps transformers' modules, with the same reason in the surgery's notes). A family is
listed only once tests/engine/test_architectures.py compares the transform with that family's stock
forward (a tiny random model of it); the library code each replaces is still checked per version
by engine/speed/upstream.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch import nn

# transformers' model_type -> the class-name prefix of its modules
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
                "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
# model_type -> its folder in transformers.models, where the two differ
MODELING_FOLDER = {"gemma3_text": "gemma3"}


@dataclass(frozen=True)
class Coverage:
    """The model types a transform applies to, and why it leaves the families known not to fit."""

    types: tuple[str, ...]
    left: Mapping[str, str] = field(default_factory=dict)   # model_type -> why it stays stock

    def reason(self, model_type: str) -> str | None:
        """None when the transform applies to model_type; else why not, naming the architecture."""
        if model_type in self.types:
            return None
        if model_type in self.left:
            return f"architecture {model_type!r}: {self.left[model_type]}"
        return f"architecture {model_type!r} is not one of {', '.join(self.types)}"

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The class-name prefixes of the covered families' modules."""
        return tuple(CLASS_PREFIX[t] for t in self.types)


_GEMMA_NORM = "its RMSNorm scales by (1 + weight) in fp32; the kernel scales by weight in the input's dtype"
RMSNORM = Coverage(("llama", "mistral", "qwen2", "qwen3", "phi3"),
                   {"gemma2": _GEMMA_NORM, "gemma3_text": _GEMMA_NORM})

_GEGLU = "its MLP gates with tanh-GELU (GeGLU); the kernel gates with SiLU"
SWIGLU = Coverage(("llama", "mistral", "qwen2", "qwen3"), {
    "gemma2": _GEGLU, "gemma3_text": _GEGLU,
    "phi3": "its MLP has one fused gate_up_proj; the kernel takes gate_proj's and up_proj's outputs"})

ROPE = Coverage(("llama", "mistral", "qwen2", "qwen3"), {
    "gemma2": "no reviewed copy of its attention forward (query_pre_attn_scalar, soft-capped scores)",
    "gemma3_text": "no reviewed copy of its attention forward (query_pre_attn_scalar, q/k norms)",
    "phi3": "no reviewed copy of its attention forward (one fused qkv_proj; a partial rotary "
            "dimension in Phi-4-mini)"})

FUSED_LOSS = Coverage(("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"), {
    "gemma2": "its logits are soft-capped (final_logit_softcapping); the fused kernel does not soft-cap"})


def model_type_of(model: nn.Module) -> str:
    """transformers' model_type of a causal LM, or of the one inside a peft model ("" if none)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return str(getattr(getattr(base, "config", None), "model_type", "") or "")
