"""cpt_studio.kernels: Triton kernels for training, each with a pure-PyTorch reference.

Imports only torch and (optionally) triton; importing this package never needs Triton. Each op
takes `backend="auto" | "triton" | "torch"` (see dispatch.use_triton):

- rmsnorm(x, weight, eps)                       RMSNorm, fwd + bwd (dX, dW)
- apply_rope(q, k, cos, sin, unsqueeze_dim)     rotary embedding of q and k in one launch
- swiglu(gate, up)                              silu(gate) * up, silu recomputed in the bwd
- fused_linear_cross_entropy(hidden, weight, labels, lora_A=, lora_B=, ...)
                                                 chunked lm_head + CE, no [N, V] logits
- adamw8bit_step(param, grad, state, step=, lr=, ...)
                                                 AdamW step, 8-bit moments, bf16 stochastic rounding
- nf4_dequant(packed, code, absmax, blocksize, shape, dtype, nested)
                                                 bitsandbytes' NF4 (double-quant) weight in one launch
- lora_4bit_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dtype, skip_value=False)
                                                 LoRA on a bnb 4-bit weight: one autograd function
- lora_4bit_group(x, members, scaling, dtype)   several of those on one x (q/k/v, gate/up) as one
- dequantize_4bit_weight(packed, quant_state, dtype)
                                                 a bnb 4-bit weight (NF4 / FP4, double-quant) in dtype
"""
from .adamw8bit import adamw8bit_step, init_adamw8bit_state
from .dispatch import triton_available, use_triton
from .fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from .lora_4bit import dequantize_4bit_weight, lora_4bit_linear, lora_4bit_linear_reference
from .lora_4bit_group import lora_4bit_group, lora_4bit_group_reference
from .nf4_dequant import nf4_dequant, nf4_dequant_reference
from .rmsnorm import rmsnorm, rmsnorm_reference
from .rope import apply_rope, rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "adamw8bit_step",
    "apply_rope",
    "dequantize_4bit_weight",
    "fused_linear_cross_entropy",
    "init_adamw8bit_state",
    "linear_cross_entropy_reference",
    "lora_4bit_group",
    "lora_4bit_group_reference",
    "lora_4bit_linear",
    "lora_4bit_linear_reference",
    "nf4_dequant",
    "nf4_dequant_reference",
    "rmsnorm",
    "rmsnorm_reference",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "triton_available",
    "use_triton",
]
