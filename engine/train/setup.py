"""Everything a run needs before its first step: device, model + adapters, data, optimizer, schedule.

`setup_training(...)` is the one place that turns a RunConfig into live objects; the loop in
trainer.py only consumes the resulting `TrainingSetup`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..model.adapters import attach_adapters, count_parameters
from ..data.batches import BlockSampler
from ..config import RunConfig
from ..runs.events import Phase
from ..model.loading import load_base_model
from ..model.source import resolve_model_source
from .optim import build_optimizer, build_scheduler
from ..data.packing import build_packed_data

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class TrainingSetup:
    config: RunConfig
    device: torch.device
    model: object
    tokenizer: object
    model_name: str
    train_blocks: torch.Tensor
    eval_sets: dict
    data_stats: dict
    sampler: BlockSampler
    optimizer: torch.optim.Optimizer
    scheduler: object
    param_groups: dict
    base_step: int            # steps already taken by the adapter this run continues from
    total_steps: int          # last global step number of this run
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    kernel_summary: list = field(default_factory=list)
    memory_summary: list = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def read_trainer_state(folder: str | Path) -> dict:
    """The trainer_state.json saved beside an adapter or in a checkpoint ({} if none)."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def setup_training(cfg: RunConfig, workspace, emit: Callable, device: Optional[torch.device] = None
                   ) -> TrainingSetup:
    """Resolve and load the model, attach adapters, pack the data, build optimizer and schedule."""
    device = device or pick_device()
    seed_everything(cfg.training.seed)

    emit(Phase(phase="loading_model", progress=0.0, message="Resolving the model", pid=os.getpid()))
    resolved = resolve_model_source(cfg.model.source, workspace.models_dir)
    init_from = cfg.init_from or resolved.adapter_path
    emit(Phase(phase="loading_model", progress=0.3, message=f"Loading {resolved.display_name}"))
    model, tokenizer = load_base_model(resolved, cfg.model.precision, device.type,
                                       cfg.model.trust_remote_code)
    model = attach_adapters(model, cfg.adapter, init_from)
    memory = prepare_embeddings(model, cfg, device)
    memory["offloaded_layers"] = enable_checkpointing(model, cfg, device)
    trainable, total = count_parameters(model)
    emit(Phase(phase="loading_model", progress=1.0, message=f"{resolved.display_name} ready"))

    emit(Phase(phase="tokenizing", progress=0.0, message="Reading the corpus"))
    packed = build_packed_data(
        cfg.data, tokenizer, workspace.cache_dir, seed=cfg.training.seed,
        progress=lambda frac, msg: emit(Phase(phase="tokenizing", progress=float(frac), message=msg)))

    sampler = BlockSampler(packed.train.shape[0], cfg.training.batch_size, cfg.training.seed)
    t = cfg.training
    local_steps = t.max_steps or max(1, math.ceil(t.epochs * sampler.batches_per_epoch / t.grad_accum))
    base_step = int(read_trainer_state(init_from).get("step", 0)) if init_from else 0

    optimizer, groups = build_optimizer(model, cfg, device)
    if init_from and cfg.init_optimizer_state:
        _load_optimizer_state(optimizer, Path(init_from))
    scheduler = build_scheduler(optimizer, cfg, local_steps)

    loss_fn, kernel_summary = _make_loss_fn(model, cfg, device)
    patch = getattr(loss_fn, "patch", None)
    memory["defer_head_grad"] = bool(patch is not None and patch.fused_loss and patch.defer_head_grad)
    return TrainingSetup(
        config=cfg, device=device, model=model, tokenizer=tokenizer,
        model_name=resolved.display_name, train_blocks=packed.train, eval_sets=packed.eval_sets,
        data_stats=packed.stats, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
        param_groups=groups, base_step=base_step, total_steps=base_step + local_steps,
        loss_fn=loss_fn, kernel_summary=kernel_summary,
        memory_summary=describe_memory_setup(memory), trainable_params=trainable,
        total_params=total)


def _trainable_to_fp32(model, keep=()) -> None:
    """Keep fp32 master copies of trainable weights (half-precision Adam updates underflow),
    except the tensors in `keep` (bf16 embedding copies that fused8bit rounds stochastically)."""
    kept = {id(p) for p in keep}
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16) and id(param) not in kept:
            param.data = param.data.float()


def prepare_embeddings(model, cfg: RunConfig, device: torch.device) -> dict:
    """The trainable weights' precision and the training.* embedding switches, on an adapted model:
    fp32 masters (or bf16 trained embed_tokens/lm_head copies), peft's frozen originals freed,
    the residual stream kept in the autocast dtype, a row-sparse embed_tokens gradient. Returns
    what was done, for the logs and the bench."""
    from ..speed.embedding_memory import (copy_weights, free_frozen_originals,
                                   keep_stream_in_compute_dtype, use_sparse_embedding_grad)
    from .optim import resolve_embedding_optimizer, resolve_embedding_weights

    t = cfg.training
    dtype = resolve_embedding_weights(cfg, device)
    copies = copy_weights(model) if dtype == torch.bfloat16 else []
    for weight in copies:
        weight.data = weight.data.to(dtype)
    _trainable_to_fp32(model, keep=copies)
    optimizer = resolve_embedding_optimizer(t.embedding_optimizer, device, t.kernels)
    done = {"freed_bytes": free_frozen_originals(model) if t.free_frozen_embeddings else 0,
            "stream_in_compute_dtype": bool(t.stream_in_compute_dtype),
            "embedding_weights": "bf16" if copies else "fp32",
            "embedding_optimizer": optimizer,
            "sparse_embedding_grad": bool(t.sparse_embedding_grad and optimizer == "fused8bit"
                                          and use_sparse_embedding_grad(model))}
    if t.stream_in_compute_dtype:
        keep_stream_in_compute_dtype(model)
    return done


def enable_checkpointing(model, cfg: RunConfig, device: torch.device) -> int:
    """Gradient checkpointing (non-reentrant) when training.gradient_checkpointing is on, its layer
    inputs offloaded to pinned CPU memory per training.offload_checkpoints; returns the number of
    offloaded layers."""
    model.config.use_cache = False
    if not cfg.training.gradient_checkpointing:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mode = cfg.training.offload_checkpoints
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return 0
    from ..speed.offload_checkpoint import enable_offloaded_checkpointing

    return enable_offloaded_checkpointing(model)


def describe_memory_setup(memory: dict) -> list[str]:
    """Log lines for the memory switches that are on (beside the kernels' lines)."""
    lines = [f"embed_tokens/lm_head copies in {memory['embedding_weights']}, "
             f"{memory['embedding_optimizer']} optimizer"]
    if memory.get("sparse_embedding_grad"):
        lines.append("embed_tokens gradient: rows of the batch's tokens only")
    if memory.get("defer_head_grad"):
        lines.append("a trained lm_head's gradient computed after the layers' backward")
    if memory.get("offloaded_layers"):
        lines.append(f"checkpointed layer inputs in CPU memory ({memory['offloaded_layers']} layers)")
    return lines


def _load_optimizer_state(optimizer, folder: Path) -> None:
    """Adam moments from a checkpoint; the learning rates stay those of the new config."""
    from ..errors import CheckpointError

    path = folder / "optimizer.pt"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no optimizer state (optimizer.pt)",
                              "Pick a checkpoint folder (runs/<id>/checkpoints/step-N), or continue "
                              "with a fresh optimizer.")
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"The optimizer state in {path} does not fit this model/adapter: {exc}",
                              "Continue with a fresh optimizer instead.") from None
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = lr


def _make_loss_fn(model, cfg: RunConfig, device: torch.device):
    """Mean next-token loss of a batch of blocks; through the Triton kernels when they are on."""
    mode = cfg.training.kernels
    use_kernels = mode == "on" or (mode == "auto" and device.type == "cuda")
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    summary: list = []
    patch = None
    if use_kernels:
        from ..speed.patching import apply_kernels

        patch = apply_kernels(model, True, defer_head_grad=cfg.training.defer_head_grad)
        summary = list(patch.summary())

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if patch is not None:
                return patch.loss(model, input_ids, input_ids)
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    loss_fn.patch = patch
    return loss_fn, summary
