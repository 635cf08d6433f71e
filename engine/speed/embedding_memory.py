"""Memory and precision of the trained embed_tokens / lm_head copies while training.

    handle = keep_stream_in_compute_dtype(model)   # fp32 embedding output -> autocast dtype (bf16)
    freed = free_frozen_originals(model)           # bytes of peft's frozen duplicates released
    copies = trained_copies(model)                 # {"embed_tokens": module, "lm_head": module}
    sparse = use_sparse_embedding_grad(model)      # embed_tokens' gradient: rows of seen tokens

Each is a switch of `training` (stream_in_compute_dtype, free_frozen_embeddings,
embedding_weights, sparse_embedding_grad), decided in the Plan. The bf16 storage is set by
engine/train/setup.prepare_model; the other three are transforms of engine/speed/registry.py
(`apply_stream_cast`, `apply_free_originals`, `apply_sparse_grad`, each with its undo). Through the
registry the freed originals wait in host memory (not on the GPU) so that the undo can put them
back.

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


def free_frozen_originals(model: nn.Module, keep: list | None = None) -> int:
    """Replace the weights of peft's frozen `original_module` copies with one-element placeholders.

    Only wrappers whose adapter is active (the copy is what forward uses) are touched. `keep`, a
    list, receives (module, name, original weight on the host, placeholder, hook handle) for
    `restore_frozen_originals`. Returns the bytes released (a tensor shared by tied modules counts
    once).
    """
    from peft.utils.other import ModulesToSaveWrapper

    replaced: dict[int, nn.Parameter] = {}
    host: dict[int, torch.Tensor] = {}
    freed = 0
    for wrapper_name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or not wrapper.active_adapters:
            continue
        if any(a not in wrapper.modules_to_save for a in wrapper.active_adapters):
            continue
        original = wrapper.original_module
        touched = False
        for module in original.modules():
            for pname, param in list(module._parameters.items()):
                if (param is None or _is_placeholder(param) or type(param) is not nn.Parameter
                        or not param.is_floating_point()):
                    continue   # quantized (Params4bit, int8) weights are left alone
                if id(param) not in replaced:
                    freed += param.numel() * param.element_size()
                    replaced[id(param)] = nn.Parameter(_placeholder(param), requires_grad=False)
                    if keep is not None:
                        # The weights go to the host (no copy when they are there already) and
                        # the kept Parameter object lets go of its storage: keeping it as it was
                        # would hold the whole matrix on the GPU for the undo.
                        host[id(param)] = param.detach().to("cpu")
                        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
                module._parameters[pname] = replaced[id(param)]
                if keep is not None:
                    keep.append((module, pname, param, host[id(param)]))
                touched = True
        if touched:
            name = wrapper_name.rsplit(".", 1)[-1]
            handle = original.register_forward_pre_hook(_refuse(name))
            if keep is not None:
                keep.append(handle)
    if freed:
        log.info("freed %.2f GiB of frozen embed_tokens/lm_head originals", freed / 2**30)
    return freed


def restore_frozen_originals(kept: list) -> None:
    """Puts back what free_frozen_originals(model, keep=kept) replaced (the weights from the host
    copies, on their device again) and removes its refusing hooks."""
    back: dict[int, None] = {}
    for item in reversed(kept):
        if not isinstance(item, tuple):
            item.remove()
            continue
        module, pname, param, host = item
        if id(param) not in back:
            param.data = host.to(param.device)
            back[id(param)] = None
        module._parameters[pname] = param
    kept.clear()


def apply_stream_cast(model: nn.Module, surgery) -> None:
    """The registry's stream_in_compute_dtype transform (keep_stream_in_compute_dtype)."""
    surgery.on_undo(keep_stream_in_compute_dtype(model).remove)
    surgery.count(1)


def apply_free_originals(model: nn.Module, surgery) -> None:
    """The registry's free_frozen_embeddings transform: the originals wait in host memory, for
    the undo (disabling the adapter then works again)."""
    kept: list = []
    freed = free_frozen_originals(model, keep=kept)
    surgery.on_undo(lambda: restore_frozen_originals(kept))
    surgery.facts["freed_bytes"] = freed
    if freed:
        surgery.count(len({id(item[2]) for item in kept if isinstance(item, tuple)}))
        surgery.note(f"frozen embed_tokens/lm_head originals: {freed / 2**20:.1f} MiB moved to host memory")


def apply_sparse_grad(model: nn.Module, surgery) -> None:
    """The registry's sparse_embedding_grad transform (use_sparse_embedding_grad)."""
    embed = trained_copies(model).get("embed_tokens")
    if use_sparse_embedding_grad(model):
        surgery.on_undo(lambda: setattr(embed, "sparse", False))
        surgery.count(1)
    else:
        surgery.note("embed_tokens gradient stays dense (tied to lm_head, or no trained nn.Embedding copy)")


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
