"""The loss without the [batch, seq, vocab] logits: the decoder body, then kernels' chunked lm_head +
cross-entropy with the head's weight, found through peft's wrappers.

    head = resolve_lm_head(causal_lm)             # LmHead: weight (+ LoRA factors), or UnsupportedHead
    loss = fused_causal_lm_loss(model, ids, labels, defer_head_grad=True)

The head may be a plain Linear, peft's modules_to_save copy (fully trained), a peft lora.Linear on
a frozen weight, or the tied-embedding LoRA head of engine.model.adapters. The registry's
"fused_loss" transform (engine/speed/registry.py) decides whether the trainer's loss goes this way:
only for the families of engine/speed/coverage.FUSED_LOSS, and when `loss_code_changed` finds the
causal LM's forward, its loss function and peft's model wrappers at versions engine/speed/upstream.py
knows (this path skips all of them) and no final logit soft-cap (Gemma-2's) in the config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import upstream


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


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def loss_code_changed(model: nn.Module, causal_lm: nn.Module) -> str | None:
    """Why the fused loss may not stand in for model(...).loss here (upstream.check), or None.

    It runs the causal LM's body and its own lm_head + cross-entropy, skipping the causal LM's
    forward, its loss function and peft's model wrappers (PeftModel[ForCausalLM], LoraModel). A
    forward that soft-caps the logits when its config says so (Gemma's) is one only without the cap.
    """
    forward = type(causal_lm).forward
    key = "ForCausalLM.forward"
    if upstream.fingerprint(forward) in upstream.KNOWN["SoftCappedForCausalLM.forward"].known:
        key = "SoftCappedForCausalLM.forward"
        cap = getattr(getattr(causal_lm, "config", None), "final_logit_softcapping", None)
        if cap is not None:
            return (f"fused lm_head + cross-entropy off: {type(causal_lm).__name__} soft-caps its logits "
                    f"(final_logit_softcapping={cap}); the fused kernel does not")
    loss_fn = getattr(causal_lm, "loss_function", None)
    checks = [(key, forward), ("ForCausalLMLoss", loss_fn)]
    if "fixed_cross_entropy" in getattr(getattr(loss_fn, "__code__", None), "co_names", ()):
        checks.append(("fixed_cross_entropy", loss_fn.__globals__.get("fixed_cross_entropy")))
    if model is not causal_lm:   # a PeftModel: its forward and its tuner's
        checks.append(("PeftModel.forward", type(model).forward))
        tuner = getattr(model, "base_model", None)
        if tuner is not None and tuner is not causal_lm:
            checks.append(("BaseTuner.forward", type(tuner).forward))
    return upstream.check_all(checks)


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

    causal_lm = causal_lm_of(model)
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
