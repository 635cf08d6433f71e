"""Everything a run needs before its first step: device, model + adapters, data, optimizer, schedule.

`setup_training(...)` is the one place that turns a RunConfig into live objects; the loop in
loop.py only consumes the resulting `TrainingSetup`. It resolves the run's Plan (plan.py) once,
before loading, and each step below reads its decision from that Plan: the precision the base is
loaded at, the trainable weights' precision, checkpointing and the speed transforms the Plan
turned on (`prepare_model`, through engine/speed/registry.py), the optimizers
(`optim.build_optimizer`) and the loss function's autocast (`make_loss_fn`).
"""
from __future__ import annotations

import json
import logging
import math
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
from ..errors import ModelSourceError, exception_text
from ..model.loading import load_base_model
from ..model.source import describe_model, resolve_model_source
from . import estimate
from .optim import build_optimizer, build_scheduler
from .plan import Plan, resolve
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
    plan: Plan                # every decision the config's `auto` settings led to, with reasons
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

    emit(Phase(phase="loading_model", progress=0.0, message="Resolving the model"))
    resolved = resolve_model_source(cfg.model.source, workspace.models_dir)
    init_from = cfg.init_from or resolved.adapter_path
    info = _model_info(resolved, cfg)
    plan = resolve(cfg, device, info)
    emit(Phase(phase="loading_model", progress=0.3, message=f"Loading {resolved.display_name}"))
    model, tokenizer = load_base_model(resolved, plan.precision, device.type,
                                       cfg.model.trust_remote_code)
    model = attach_adapters(model, cfg.adapter, init_from)
    surgery, memory = prepare_model(model, plan)
    trainable, total = count_parameters(model)
    emit(Phase(phase="loading_model", progress=1.0, message=f"{resolved.display_name} ready"))

    emit(Phase(phase="tokenizing", progress=0.0, message="Reading the corpus"))
    packed = build_packed_data(
        cfg.data, tokenizer, workspace.cache_dir, seed=cfg.training.seed,
        progress=lambda frac, msg: emit(Phase(phase="tokenizing", progress=float(frac), message=msg)))

    sampler = BlockSampler(packed.train.shape[0], cfg.training.batch_size, cfg.training.seed)
    if info is not None:       # refuse a step that cannot fit before it is killed for memory
        estimate.check_step_memory(info, cfg, plan, sampler.batch_size, device,
                                   sum(p.numel() * p.element_size() for p in model.parameters()
                                       if p.requires_grad))
    t = cfg.training
    local_steps = t.max_steps or max(1, math.ceil(t.epochs * sampler.batches_per_epoch / t.grad_accum))
    base_step = int(read_trainer_state(init_from).get("step", 0)) if init_from else 0

    optimizer, groups = build_optimizer(model, cfg, plan)
    if init_from and cfg.init_optimizer_state:
        _load_optimizer_state(optimizer, Path(init_from))
    scheduler = build_scheduler(optimizer, cfg, local_steps)

    loss_fn, kernel_summary = make_loss_fn(model, plan, surgery)
    return TrainingSetup(
        config=cfg, device=device, model=model, tokenizer=tokenizer,
        model_name=resolved.display_name, train_blocks=packed.train, eval_sets=packed.eval_sets,
        data_stats=packed.stats, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
        param_groups=groups, base_step=base_step, total_steps=base_step + local_steps,
        loss_fn=loss_fn, plan=plan, kernel_summary=kernel_summary,
        memory_summary=describe_memory_setup(memory), trainable_params=trainable,
        total_params=total)


def _model_info(resolved, cfg: RunConfig):
    """The base model's description (built on the meta device: no weights read), the same input
    the VRAM estimate gets; None when it cannot be read, and load_base_model then reports why."""
    try:
        return describe_model(resolved, cfg.model.trust_remote_code)
    except ModelSourceError as exc:
        log.debug("no model description for the plan: %s", exc.message)
        return None


def _trainable_to_fp32(model, keep=()) -> None:
    """Keep fp32 master copies of trainable weights (half-precision Adam updates underflow),
    except the tensors in `keep` (bf16 embedding copies that fused8bit rounds stochastically)."""
    kept = {id(p) for p in keep}
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16) and id(param) not in kept:
            param.data = param.data.float()


def prepare_model(model, plan: Plan):
    """An adapted model made ready as the plan says: the trainable weights' precision (fp32 masters,
    or bf16 trained embed_tokens/lm_head copies), gradient checkpointing, then every speed
    transform the plan turned on (engine/speed/registry.py, in its order: embedding memory,
    offloaded checkpoints, kernels). Returns (the Surgery, what was done for the logs and bench)."""
    from ..speed.embedding_memory import copy_weights
    from ..speed.registry import apply_transforms

    copies = copy_weights(model) if plan.embedding_weights == "bf16" else []
    for weight in copies:
        weight.data = weight.data.to(torch.bfloat16)
    _trainable_to_fp32(model, keep=copies)
    model.config.use_cache = False
    unchecked = []
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        unchecked = uncheck_last_layers(model, plan.unchecked_layers)
    surgery = apply_transforms(model, plan.transforms, defer_head_grad=plan.defer_head_grad)
    counts: dict[str, int] = {}
    for applied in surgery.applied:
        counts[applied.name] = counts.get(applied.name, 0) + applied.count
    if plan.sparse_embedding_grad and not counts.get("sparse_embedding_grad"):
        log.warning("embed_tokens' gradient stays dense: the loaded model has no untied, fully "
                    "trained nn.Embedding copy")
    done = {"freed_bytes": surgery.facts.get("freed_bytes", 0),
            "stream_in_compute_dtype": bool(counts.get("stream_in_compute_dtype")),
            "embedding_weights": "bf16" if copies else "fp32",
            "embedding_optimizer": plan.embedding_optimizer,
            "sparse_embedding_grad": bool(counts.get("sparse_embedding_grad")),
            "offloaded_layers": counts.get("offload_checkpoints", 0),
            "unchecked_layers": len(unchecked),
            "defer_head_grad": bool(surgery.fused_loss and plan.defer_head_grad)}
    return surgery, done


def uncheck_last_layers(model, n: int) -> list[str]:
    """Gradient checkpointing off for the last `n` checkpointed decoder layers (transformers'
    GradientCheckpointingLayer runs its plain forward when the flag is off), before the speed
    transforms, so offloaded checkpointing leaves them alone. The last ones, because the backward
    reaches them first: their activations are freed earliest. Returns their module names."""
    if n <= 0:
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing]
    for _name, module in layers[-n:]:
        module.gradient_checkpointing = False
    return [name for name, _module in layers[-n:]]


def describe_memory_setup(memory: dict) -> list[str]:
    """Log lines for the memory switches that are on (beside the kernels' lines)."""
    lines = [f"embed_tokens/lm_head copies in {memory['embedding_weights']}, "
             f"{memory['embedding_optimizer']} optimizer"]
    if memory.get("sparse_embedding_grad"):
        lines.append("embed_tokens gradient: rows of the batch's tokens only")
    if memory.get("defer_head_grad"):
        lines.append("a trained lm_head's gradient computed after the layers' backward")
    if memory.get("unchecked_layers"):
        lines.append(f"the last {memory['unchecked_layers']} layers not checkpointed (no recompute)")
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # unpickling errors come in many types; all mean a bad file
        raise CheckpointError(f"Cannot read the optimizer state {path}: {exception_text(exc)}",
                              "Pick another checkpoint, or continue with a fresh optimizer "
                              "(init_optimizer_state off).") from None
    try:
        optimizer.load_state_dict(state)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"The optimizer state in {path} does not fit this model/adapter: {exc}",
                              "Continue with a fresh optimizer instead.") from None
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = lr


def make_loss_fn(model, plan: Plan, surgery):
    """Mean next-token loss of a batch of blocks, under autocast as the plan says, through the
    surgery's fused loss where it applies. Returns (loss_fn, the kernel lines for the log)."""
    from ..speed.registry import KERNEL_TRANSFORMS

    dtype = plan.autocast_dtype
    summary = surgery.summary(only=KERNEL_TRANSFORMS) if plan.kernels else []

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(plan.device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return surgery.loss(model, input_ids, input_ids)

    loss_fn.patch = surgery
    return loss_fn, summary
