"""Applies the Triton kernels to one loaded model instance, reversibly.

Usage (engine/train/setup.py):
    patch = apply_kernels(model, enabled=True)       # a PeftModel or a plain causal LM
    loss = patch.loss(model, input_ids, labels)      # fused lm_head + CE where it applies
    patch.summary()                                  # lines for the Run page / log
    patch.revert()                                   # the original forwards, bit for bit

What is patched, per module instance (a new `forward` bound on the instance; classes inside
transformers are never touched, nothing happens at import time):
- every RMSNorm of a Llama / Mistral / Qwen2 / Qwen3 model -> kernels.rmsnorm
- every MLP of those models with a SiLU gate: down(swiglu(gate(x), up(x))); gate/up/down stay
  the modules they are (LoRA-wrapped or 4-bit), only the activation product is fused; in an
  offloaded checkpoint's recompute (engine.speed.offload_checkpoint.in_recompute) down_proj runs under
  lora_forward.value_unused: the MLP output only feeds the layer output, which the recompute
  never reads, so a fused 4-bit down_proj skips its dequantize and GEMMs there
- every peft LoRA Linear (nn.Linear or bnb Linear4bit base) with one active adapter, no DoRA, no
  dropout (p=0), not merged -> engine.speed.lora_forward: base(x) then one in-place addmm of the LoRA
  product with the scaling folded in (no clone, no full-size mul/add); a 4-bit base runs the whole
  projection as one autograd function (dequantize, GEMMs, hand-written backward); other LoRA
  layers stay peft's; an attention's q/k/v and an MLP's gate/up, when all take that function, run
  as one (engine/speed/lora_group.py: x read once for the LoRA A GEMMs, one dx buffer)
- every attention module of those models -> kernels.apply_rope for q and k: a copy of transformers'
  own attention forward whose globals hold our `apply_rotary_pos_emb` (engine/speed/rope.py); a
  forward it cannot take is left as it is, with a note why
- the loss: `patch.loss` runs the decoder body, then the chunked fused lm_head + cross-entropy
  with the head's weight: a plain Linear, peft's modules_to_save copy (fully trained), a peft
  lora.Linear on a frozen weight, or the tied-embedding LoRA head of engine.model.adapters.

Each replaced library function is first checked against the versions it was written for
(engine/speed/upstream.py: the RMSNorm / MLP / SiLU forwards, apply_rotary_pos_emb and rotate_half, the
causal LM forward and its loss function, peft's model, modules_to_save and LoRA forwards,
bitsandbytes' Linear4bit forward). One that changed leaves its modules on the library's code, with
one warning in the log and the same line in `summary()`.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import upstream

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_CLASS_PREFIXES = ("Llama", "Mistral", "Qwen2", "Qwen3")
_SILU_CLASSES = ("SiLU", "SiLUActivation")
_MARK = "__cpt_kernel__"  # set on our bound forwards, to refuse patching twice


@dataclass
class LmHead:
    """The matrices the fused loss needs: logits = x W^T + scaling * (dropout(x) A^T) B^T."""

    weight: torch.Tensor
    kind: str  # "trained copy", "frozen", "LoRA on frozen weight", ...
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout: nn.Module | None = None


class UnsupportedHead(Exception):
    """The output head has a form the fused loss does not handle (the plain loss is used)."""


class HeadCodeChanged(UnsupportedHead):
    """peft's code for the head's wrapper is not a version resolve_lm_head was written for; the
    message is upstream.check's reason."""


@dataclass
class KernelPatch:
    """What apply_kernels did to one model; `loss` and `revert` are what the trainer calls."""

    enabled: bool
    backend: str = "auto"
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fused_loss: bool = False
    defer_head_grad: bool = False
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def loss(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss (labels shifted inside, -100 ignored), as model(...).loss."""
        if self.enabled and self.fused_loss:
            try:
                return fused_causal_lm_loss(model, input_ids, labels, attention_mask, backend=self.backend,
                                            defer_head_grad=self.defer_head_grad)
            except UnsupportedHead as exc:  # the head changed since apply_kernels (adapter switched)
                log.info("fused loss skipped: %s", exc)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss

    def revert(self) -> None:
        """Restores every patched forward; safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.counts.clear()
        self.fused_loss = False

    def summary(self) -> list[str]:
        """One line per op, for the Run page and the log."""
        if not self.enabled:
            return ["kernels off: transformers' own forward and loss"]
        lines = [f"{op}: {n} modules" for op, n in self.counts.items()]
        return lines + self.notes


def apply_kernels(model: nn.Module, enabled: bool = True, backend: str = "auto",
                  defer_head_grad: bool = False) -> KernelPatch:
    """Patches one model instance (see the module docstring); enabled=False patches nothing.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        enabled: False gives a no-op patch whose loss() is model(...).loss.
        backend: "auto" (Triton on CUDA), "triton" or "torch" (see kernels.dispatch).
        defer_head_grad: the fused loss computes a trained lm_head's gradient at the end of the
            backward, not in its forward (training.defer_head_grad; see fused_causal_lm_loss).
    """
    patch = KernelPatch(enabled=enabled, backend=backend, defer_head_grad=defer_head_grad)
    if not enabled:
        return patch
    from cpt_studio.kernels import rmsnorm, swiglu, triton_available  # lazy: no import-time cost

    from .lora_forward import value_unused
    from .offload_checkpoint import in_recompute

    causal_lm = _causal_lm(model)
    model_type = getattr(getattr(causal_lm, "config", None), "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        patch.enabled = False
        patch.notes.append(f"kernels off: architecture {model_type or type(causal_lm).__name__!r} "
                           f"is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        return patch
    impl = "Triton" if triton_available() and backend != "torch" else "PyTorch"

    def rmsnorm_forward(self, hidden_states):
        return rmsnorm(hidden_states, self.weight, self.variance_epsilon, backend=backend)

    def mlp_forward(self, x):
        product = swiglu(self.gate_proj(x), self.up_proj(x), backend=backend)
        if in_recompute():   # the layer's output only carries the gradient back: no down GEMM
            with value_unused():
                return self.down_proj(product)
        return self.down_proj(product)

    for module in model.modules():
        name = type(module).__name__
        if not name.startswith(_CLASS_PREFIXES):
            continue
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            changed = upstream.check("RMSNorm.forward", type(module).forward)
            if not _noted(patch, changed):
                _bind(patch, module, rmsnorm_forward, f"RMSNorm ({impl})")
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            act = getattr(module, "act_fn", None)
            if type(act).__name__ in _SILU_CLASSES:
                checks = [("MLP.forward", type(module).forward)]
                if type(act) is not nn.SiLU:   # transformers' SiLUActivation
                    checks.append(("SiLUActivation.forward", type(act).forward))
                if not _noted(patch, upstream.check_all(checks)):
                    _bind(patch, module, mlp_forward, f"SwiGLU MLP ({impl})")
    _patch_rope(patch, model, backend, f"RoPE ({impl})")
    _patch_lora_layers(patch, model)
    _group_lora_layers(patch, model)
    if not _noted(patch, _loss_code_changed(model, causal_lm)):
        try:
            head = resolve_lm_head(causal_lm)
            patch.fused_loss = True
            patch.notes.append(f"lm_head + cross-entropy: fused and chunked ({head.kind} head)")
        except HeadCodeChanged as exc:
            _noted(patch, str(exc))
        except UnsupportedHead as exc:
            patch.notes.append(f"lm_head + cross-entropy: not fused ({exc})")
    log.info("kernels: %s", "; ".join(patch.summary()))
    return patch


def _noted(patch: KernelPatch, reason: str | None) -> bool:
    """Adds an upstream.check reason to the patch's notes once; True when there was one."""
    if reason and reason not in patch.notes:
        patch.notes.append(reason)
    return bool(reason)


def _loss_code_changed(model: nn.Module, causal_lm: nn.Module) -> str | None:
    """Why the fused loss may not stand in for model(...).loss here (upstream.check), or None.

    It runs the causal LM's body and its own lm_head + cross-entropy, skipping the causal LM's
    forward, its loss function and peft's model wrappers (PeftModel[ForCausalLM], LoraModel).
    """
    loss_fn = getattr(causal_lm, "loss_function", None)
    checks = [("ForCausalLM.forward", type(causal_lm).forward), ("ForCausalLMLoss", loss_fn)]
    if "fixed_cross_entropy" in getattr(getattr(loss_fn, "__code__", None), "co_names", ()):
        checks.append(("fixed_cross_entropy", loss_fn.__globals__.get("fixed_cross_entropy")))
    if model is not causal_lm:   # a PeftModel: its forward and its tuner's
        checks.append(("PeftModel.forward", type(model).forward))
        tuner = getattr(model, "base_model", None)
        if tuner is not None and tuner is not causal_lm:
            checks.append(("BaseTuner.forward", type(tuner).forward))
    return upstream.check_all(checks)


def _patch_rope(patch: KernelPatch, model: nn.Module, backend: str, label: str) -> None:
    """Binds on every attention module a copy of its class's forward that runs kernels.apply_rope
    (engine/speed/rope.py); modules whose forward cannot take it are counted in a note (an
    upstream.check reason is noted as it is)."""
    from .rope import ROPE_OFF, rope_forwards

    forwards, left = rope_forwards(model, _CLASS_PREFIXES, backend)
    for module, forward in forwards:
        _bind(patch, module, forward, label)
    for reason, n in left.items():
        if reason.startswith(ROPE_OFF):
            _noted(patch, reason)
        else:
            patch.notes.append(f"RoPE left as transformers': {n} attention modules ({reason})")


def _patch_lora_layers(patch: KernelPatch, model: nn.Module) -> None:
    from .lora_forward import (LEAN_LABELS, lean_adapter, library_code_changed, lora_layer_kind,
                               make_lean_forward)

    left = 0
    for module in model.modules():
        kind = lora_layer_kind(module)
        if kind is None:
            continue
        name = lean_adapter(module)
        if name is None:
            left += 1
            continue
        if _noted(patch, library_code_changed(module)):   # not the code our forwards reproduce
            continue
        current = module.__dict__.get("forward")
        fallback = current if current is not None else types.MethodType(type(module).forward, module)
        _bind(patch, module, make_lean_forward(module, name, fallback), LEAN_LABELS[kind])
    if left:
        patch.notes.append(f"LoRA layers left as peft's: {left} (dropout > 0, DoRA, a LoRA bias, "
                           "several or no active adapters, or merged)")


def _group_lora_layers(patch: KernelPatch, model: nn.Module) -> None:
    """q/k/v and gate/up of each layer as one function (engine/speed/lora_group.py), where all members
    took the fused 4-bit forward above; off with lora_group.ENABLED = False (bench A/B)."""
    from . import lora_group
    from .lora_forward import GROUP_ATTR

    if not lora_group.ENABLED:
        return

    def bind(member: nn.Module, group, index: int) -> None:
        member.__dict__[GROUP_ATTR] = (group, index)
        patch._undo.append(lambda: member.__dict__.pop(GROUP_ATTR, None))

    made = lora_group.group_projections(model, bind)
    if made:
        patch.counts[lora_group.LABEL] = made


def _bind(patch: KernelPatch, module: nn.Module, forward, label: str) -> None:
    current = module.__dict__.get("forward")
    if current is not None and getattr(current, _MARK, False):
        raise RuntimeError("Kernels are already applied to this model; revert() the earlier patch first")
    bound = types.MethodType(forward, module)
    setattr(bound.__func__, _MARK, True)
    module.forward = bound

    def undo():
        if current is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = current

    patch._undo.append(undo)
    patch.counts[label] = patch.counts.get(label, 0) + 1


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_lm_head(causal_lm: nn.Module) -> LmHead:
    """The weight (and LoRA factors) the output head applies now, following peft's wrappers.

    Raises:
        UnsupportedHead: a quantized head, a bias, DoRA or another LoRA variant, several active
            adapters, or a module kind not listed in the module docstring.
        HeadCodeChanged: peft's modules_to_save or LoRA Linear forward is not a known version.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from ..model.adapters import TiedLoraHead

    head = causal_lm.get_output_embeddings()
    kind = ""
    if isinstance(head, ModulesToSaveWrapper):
        _check_head_code([("AuxiliaryTrainingWrapper.forward", type(head).forward),
                          ("ModulesToSaveWrapper._forward_wrapped", type(head)._forward_wrapped)])
        active = head.active_adapters
        if head.disable_adapters or not active or any(a not in head._adapters for a in active):
            head = head.original_module
        else:
            head, kind = head.modules_to_save[active[0]], "trained copy"
    if isinstance(head, TiedLoraHead):
        base, emb = head.base_layer, head._embedding[0]
        names = [] if emb.disable_adapters or emb.merged else [
            n for n in emb.active_adapters if n in emb.lora_embedding_A]
        weight = _plain_weight(base)
        if not names:
            return LmHead(weight, "tied")
        if len(names) > 1:
            raise UnsupportedHead("several active adapters on the tied head")
        n = names[0]  # head(x) = x W^T + s (x B_emb) A_emb, so A = B_emb^T, B = A_emb^T
        return LmHead(weight, "tied, LoRA", emb.lora_embedding_B[n].t(), emb.lora_embedding_A[n].t(),
                      float(emb.scaling[n]), emb.lora_dropout[n] if n in emb.lora_dropout else None)
    if isinstance(head, LoraLayer):
        _check_head_code([("lora.Linear.forward", type(head).forward),
                          ("BaseTunerLayer._cast_input_dtype", type(head)._cast_input_dtype)])
        weight = _plain_weight(head.get_base_layer())
        if head.disable_adapters or head.merged:
            return LmHead(weight, "frozen")
        names = [n for n in head.active_adapters if n in head.lora_A]
        if len(names) > 1:
            raise UnsupportedHead("several active LoRA adapters on lm_head")
        if not names:
            return LmHead(weight, "frozen")
        n = names[0]
        if n in getattr(head, "lora_variant", {}) or head.lora_B[n].bias is not None:
            raise UnsupportedHead("a LoRA variant (DoRA) or a LoRA bias on lm_head")
        return LmHead(weight, "LoRA on frozen weight", head.lora_A[n].weight, head.lora_B[n].weight,
                      float(head.scaling[n]), head.lora_dropout[n])
    weight = _plain_weight(head)
    return LmHead(weight, kind or ("trained" if weight.requires_grad else "frozen"))


def _check_head_code(checks) -> None:
    reason = upstream.check_all(checks, off="fused lm_head + cross-entropy")
    if reason:
        raise HeadCodeChanged(reason)


def _plain_weight(module) -> torch.Tensor:
    if type(module) is not nn.Linear or module.bias is not None:
        raise UnsupportedHead(f"lm_head is a {type(module).__name__}"
                              f"{' with a bias' if getattr(module, 'bias', None) is not None else ''}")
    if not module.weight.dtype.is_floating_point:
        raise UnsupportedHead("lm_head is quantized")
    return module.weight


def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, backend: str = "auto",
                         chunk_rows: int | None = None, defer_head_grad: bool = False) -> torch.Tensor:
    """model(input_ids, labels=labels).loss without the [B, S, V] logits.

    Runs the decoder body (the causal LM's base model, inside peft's wrappers), then the fused
    chunked lm_head + cross-entropy. Labels are shifted as transformers' ForCausalLMLoss does:
    position t predicts labels[t + 1]; the last position and -100 labels are ignored.

    defer_head_grad: with a trained lm_head (no LoRA on it) and an embedding output that requires
    grad, the body runs on inputs_embeds carrying a kernels DeferredWeightGrad node, so the head's
    [V, H] gradient is computed after the layers' backward instead of living through it (P1:
    -0.98 GiB at the peak for one more lm_head GEMM). Otherwise the gradient comes as usual.

    Raises:
        UnsupportedHead: see resolve_lm_head.
    """
    from cpt_studio.kernels import fused_linear_cross_entropy
    from cpt_studio.kernels.deferred_weight_grad import DeferredWeightGrad

    causal_lm = _causal_lm(model)
    head = resolve_lm_head(causal_lm)
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    deferred = None
    if (defer_head_grad and torch.is_grad_enabled() and head.lora_A is None
            and head.weight.requires_grad):
        embeds = body.get_input_embeddings()(input_ids)
        if embeds.requires_grad:
            deferred = DeferredWeightGrad()
            embeds = deferred.attach(embeds)
        out = body(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    else:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return fused_linear_cross_entropy(
        hidden, head.weight, shift_labels, lora_A=head.lora_A, lora_B=head.lora_B,
        lora_scaling=head.scaling, lora_dropout=head.dropout, chunk_rows=chunk_rows, backend=backend,
        deferred=deferred)
