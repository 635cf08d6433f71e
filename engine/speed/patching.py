"""Our kernels bound as `forward` on module instances: the registry's module transforms.

Each `apply_*` below is one entry of engine/speed/registry.py (which decides whether it runs and
in what order) and binds through `surgery.bind`, which keeps the undo. Classes inside transformers
are never touched and nothing happens at import time.

- rmsnorm: every RMSNorm of a Llama / Mistral / Qwen2 / Qwen3 / Phi-3 model -> kernels.rmsnorm
- swiglu_mlp: every MLP of a Llama / Mistral / Qwen2 / Qwen3 model with a SiLU gate:
  down(swiglu(gate(x), up(x))); gate, up
  and down stay the modules they are (LoRA-wrapped or 4-bit), only the activation product is
  fused. While an offloaded checkpoint re-runs the layer for its backward (`surgery.recompute`,
  shared with engine/speed/offload_checkpoint.py), down_proj is called through
  lora_forward.project_value_unused: the MLP output only carries the gradient there, so a fused
  4-bit down_proj skips its dequantize and GEMMs
- rope: every attention module of a Llama / Mistral / Qwen2 / Qwen3 model runs our RoPE kernel
  (engine/speed/rope.py)
- lora_forwards: every peft LoRA Linear (nn.Linear or bnb Linear4bit base) with one active
  adapter, no DoRA, no dropout, not merged -> engine/speed/lora_forward.py (base(x) then one
  in-place addmm; a 4-bit base as one autograd function from kernels/)
- lora_groups: an attention's q/k/v and an MLP's gate/up, when all took the fused 4-bit function,
  as one function (engine/speed/lora_group.py)

The families each kernel transform applies to, and why it leaves the others, are its Coverage in
engine/speed/coverage.py (the registry's plan reads the same): a model of another family keeps
its modules on transformers' code, with the reason in the surgery's notes. Each replaced library
function is then checked against the versions it was written for (engine/speed/upstream.py). One
that changed leaves its modules on the library's code, with one warning in the log and the same
line in the surgery's summary.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING

from torch import nn

from . import upstream
from .coverage import RMSNORM, ROPE, SWIGLU, Coverage, model_type_of

if TYPE_CHECKING:
    from .registry import Surgery

_SILU_CLASSES = ("SiLU", "SiLUActivation")


def _covered(model: nn.Module, coverage: Coverage, kernel: str, surgery: Surgery) -> tuple[str, ...] | None:
    """The class-name prefixes of the modules to change, or None (the reason noted) when the model's
    family is not covered."""
    reason = coverage.reason(model_type_of(model))
    if reason:
        surgery.note(f"{kernel} off: {reason}")
        return None
    return coverage.prefixes


def _modules(model: nn.Module, suffix: str, prefixes: tuple[str, ...]):
    for module in model.modules():
        name = type(module).__name__
        if name.startswith(prefixes) and name.endswith(suffix):
            yield module


def apply_rmsnorm(model: nn.Module, surgery: Surgery) -> None:
    from cpt_studio.kernels import rmsnorm

    backend = surgery.backend

    def rmsnorm_forward(self, hidden_states):
        return rmsnorm(hidden_states, self.weight, self.variance_epsilon, backend=backend)

    prefixes = _covered(model, RMSNORM, "RMSNorm kernel", surgery)
    if prefixes is None:
        return
    for module in _modules(model, "RMSNorm", prefixes):
        if not hasattr(module, "variance_epsilon"):
            continue
        if not surgery.noted(upstream.check("RMSNorm.forward", type(module).forward)):
            surgery.bind(module, rmsnorm_forward)


def apply_swiglu_mlp(model: nn.Module, surgery: Surgery) -> None:
    from cpt_studio.kernels import swiglu

    from .lora_forward import project_value_unused

    backend, recompute = surgery.backend, surgery.recompute

    def mlp_forward(self, x):
        product = swiglu(self.gate_proj(x), self.up_proj(x), backend=backend)
        if recompute.active:   # the layer's output only carries the gradient back: no down GEMM
            return project_value_unused(self.down_proj, product)
        return self.down_proj(product)

    prefixes = _covered(model, SWIGLU, "SwiGLU kernel", surgery)
    if prefixes is None:
        return
    left = 0
    for module in _modules(model, "MLP", prefixes):
        act = getattr(module, "act_fn", None)
        if (not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
                or type(act).__name__ not in _SILU_CLASSES):
            left += 1
            continue
        checks = [("MLP.forward", type(module).forward)]
        if type(act) is not nn.SiLU:   # transformers' SiLUActivation
            checks.append(("SiLUActivation.forward", type(act).forward))
        if not surgery.noted(upstream.check_all(checks)):
            surgery.bind(module, mlp_forward)
    if left:
        surgery.note(f"SwiGLU MLP left as transformers': {left} MLP modules (not gate_proj, up_proj and "
                     "down_proj with a SiLU act_fn)")


def apply_rope(model: nn.Module, surgery: Surgery) -> None:
    """Binds on every attention module our forward running kernels.apply_rope (engine/speed/rope.py);
    modules whose forward cannot take it are counted in a note (an upstream.check reason is noted
    as it is)."""
    from .rope import ROPE_OFF, rope_forwards

    prefixes = _covered(model, ROPE, "RoPE kernel", surgery)
    if prefixes is None:
        return
    forwards, left = rope_forwards(model, prefixes, surgery.backend)
    for module, forward in forwards:
        surgery.bind(module, forward)
    for reason, n in left.items():
        if reason.startswith(ROPE_OFF):
            surgery.noted(reason)
        else:
            surgery.note(f"RoPE left as transformers': {n} attention modules ({reason})")


def apply_lora_forwards(model: nn.Module, surgery: Surgery) -> None:
    from .lora_forward import LEAN_LABELS, lean_adapter, library_code_changed, lora_layer_kind, make_lean_forward

    left = 0
    for module in model.modules():
        kind = lora_layer_kind(module)
        if kind is None:
            continue
        name = lean_adapter(module)
        if name is None:
            left += 1
            continue
        if surgery.noted(library_code_changed(module)):   # not the code our forwards reproduce
            continue
        current = module.__dict__.get("forward")
        fallback = current if current is not None else types.MethodType(type(module).forward, module)
        surgery.bind(module, make_lean_forward(module, name, fallback), LEAN_LABELS[kind])
    if left:
        surgery.note(f"LoRA layers left as peft's: {left} (dropout > 0, DoRA, a LoRA bias, "
                     "several or no active adapters, or merged)")


def apply_lora_groups(model: nn.Module, surgery: Surgery) -> None:
    """q/k/v and gate/up of each layer as one function (engine/speed/lora_group.py), where all
    members took the fused 4-bit forward (the lora_forwards transform, applied before)."""
    from . import lora_group
    from .lora_forward import GROUP_ATTR

    def bind(member: nn.Module, group, index: int) -> None:
        member.__dict__[GROUP_ATTR] = (group, index)
        surgery.on_undo(lambda: member.__dict__.pop(GROUP_ATTR, None))

    surgery.count(lora_group.group_projections(model, bind))
