"""Memory and precision of the trained embed_tokens / lm_head copies while training.

    handle = keep_stream_in_compute_dtype(model)   # fp32 embedding output -> autocast dtype (bf16)
    freed = free_frozen_originals(model)           # bytes of peft's frozen duplicates released
    copies = trained_copies(model)                 # {"embed_tokens": module, "lm_head": module}
    sparse = use_sparse_embedding_grad(model)      # embed_tokens' gradient: rows of seen tokens

Each is a switch of `training` (stream_in_compute_dtype, free_frozen_embeddings,
embedding_weights, sparse_embedding_grad), applied by training_setup.prepare_embeddings once the
adapters are attached.

bf16 copies (embedding_weights) halve the weights and their gradients; they are only sound with
the fused8bit optimizer, which rounds each update stochastically into bf16 (engine/train/optim.py
decides). A sparse embed_tokens gradient (`nn.Embedding(sparse=True)` on the trained copy) holds
only the rows of the batch's tokens (P1: at most 4,096 of 128,256 rows) instead of a dense
vocab x hidden matrix; trainer's clipping and fused8bit read it, torch AdamW cannot, so it is
only turned on with fused8bit, and never for tied embeddings (the head's gradient is dense).

Why: a fully trained embed_tokens is an fp32 master copy, so its output is fp32, and under bf16
autocast nothing brings the residual stream back down (4-bit linears return their input's dtype,
residual adds and RMSNorm keep fp32): every hidden state, checkpointed layer input and elementwise
op would run at fp32. Casting the embedding output to the autocast dtype gives the stream the
baseline's precision while the fp32 weights still receive fp32 gradients (the cast's backward
upcasts the bf16 gradient before the embedding's backward accumulates it).

peft's modules_to_save keeps the base matrix as `original_module` beside the trained copy. It is
read only when the adapter is disabled or inactive (`disable_adapter()`, a non-active adapter,
`unload()` without an active adapter): none of which a training run does. The step-0 eval runs
with the adapter active on the untouched copy (equal to the base at that point), checkpoints and
the final adapter save only the copies (modules_to_save.*), resume loads into the copies, and
merge_and_unload returns the active copy. So each original's weight becomes a placeholder: the same
shape, dtype and device, backed by one element of storage (a zero broadcast with stride 0), and a
forward through the original raises a clear error instead of computing garbage. Not `meta`
tensors: code that asks the model for its device (`model.device`, the first parameter's device, as
transformers' hub-kernel integration did) must keep getting the real one.
With tied embeddings the base embed_tokens and lm_head share one original: it is freed once.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..model.adapters import embedding_modules

log = logging.getLogger(__name__)

FREED_MESSAGE = ("The frozen original of {name} was freed to save memory while training "
                 "(training.free_frozen_embeddings). Disabling the adapter needs it: load the base "
                 "model again, or train with free_frozen_embeddings off.")


def _cast_to_autocast_dtype(module: nn.Module, args, output):
    if not (torch.is_tensor(output) and output.dtype == torch.float32):
        return output
    device_type = output.device.type
    if not torch.is_autocast_enabled(device_type):
        return output
    dtype = torch.get_autocast_dtype(device_type)
    return output.to(dtype) if dtype in (torch.bfloat16, torch.float16) else output


def keep_stream_in_compute_dtype(model: nn.Module):
    """Cast the input embedding's fp32 output to the autocast dtype whenever autocast is on.

    A forward hook on the model's input embedding module (peft's wrapper when there is one), so
    it covers full, lora and frozen embeddings alike; outside autocast (generation, CPU without
    autocast) it does nothing. Returns the hook handle (`handle.remove()` undoes it).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    return embedding.register_forward_hook(_cast_to_autocast_dtype)


def free_frozen_originals(model: nn.Module) -> int:
    """Replace the weights of peft's frozen `original_module` copies with one-element placeholders.

    Only wrappers whose adapter is active (the copy is what forward uses) are touched. Returns the
    bytes released (a tensor shared by tied modules counts once).
    """
    from peft.utils.other import ModulesToSaveWrapper

    replaced: dict[int, nn.Parameter] = {}
    freed = 0
    for wrapper_name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or not wrapper.active_adapters:
            continue
        if any(a not in wrapper.modules_to_save for a in wrapper.active_adapters):
            continue
        original = wrapper.original_module
        for module in original.modules():
            for pname, param in list(module._parameters.items()):
                if (param is None or _is_placeholder(param) or type(param) is not nn.Parameter
                        or not param.is_floating_point()):
                    continue   # quantized (Params4bit, int8) weights are left alone
                if id(param) not in replaced:
                    freed += param.numel() * param.element_size()
                    replaced[id(param)] = nn.Parameter(_placeholder(param), requires_grad=False)
                module._parameters[pname] = replaced[id(param)]
        if not getattr(original, "_cpt_freed", False):
            name = wrapper_name.rsplit(".", 1)[-1]
            original.register_forward_pre_hook(_refuse(name))
            original._cpt_freed = True
    if freed:
        log.info("freed %.2f GiB of frozen embed_tokens/lm_head originals", freed / 2**30)
    return freed


def _placeholder(param: torch.Tensor) -> torch.Tensor:
    """A zero of param's dtype on param's device, broadcast to its shape: one element of memory."""
    return torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)


def _is_placeholder(param: torch.Tensor) -> bool:
    """True for a weight that free_frozen_originals replaced, or one with no storage at all (`meta`)."""
    if param.device.type == "meta":
        return True
    return param.numel() > 1 and all(stride == 0 for stride in param.stride())


def _refuse(name: str):
    def hook(module, args):
        raise RuntimeError(FREED_MESSAGE.format(name=name))
    return hook


def trained_copies(model: nn.Module) -> dict[str, nn.Module]:
    """The active fully trained copies (peft modules_to_save) of the input and output embeddings."""
    from peft.utils.other import ModulesToSaveWrapper

    found: dict[str, nn.Module] = {}
    for name, wrapper in zip(("embed_tokens", "lm_head"), embedding_modules(model)):
        if not isinstance(wrapper, ModulesToSaveWrapper) or len(wrapper.active_adapters) != 1:
            continue
        adapter = wrapper.active_adapters[0]
        if adapter in wrapper.modules_to_save:
            found[name] = wrapper.modules_to_save[adapter]
    return found


def copy_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight tensors of the trained copies, each once (tied copies share one)."""
    seen: dict[int, nn.Parameter] = {}
    for module in trained_copies(model).values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            seen.setdefault(id(weight), weight)
    return list(seen.values())


def use_sparse_embedding_grad(model: nn.Module) -> bool:
    """Make the trained embed_tokens copy produce a row-sparse gradient; False where it cannot
    (no trained copy, not an nn.Embedding, or tied to lm_head, whose gradient is dense)."""
    copies = trained_copies(model)
    embed, head = copies.get("embed_tokens"), copies.get("lm_head")
    if type(embed) is not nn.Embedding:
        return False
    head_weight = getattr(head, "weight", None)
    out_weight = getattr(embedding_modules(model)[1], "weight", None)
    if embed.weight is head_weight or embed.weight is out_weight:
        return False
    embed.sparse = True
    return True
