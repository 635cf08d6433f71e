"""AdamW with two learning rates (embeddings vs the rest) and the warmup + decay schedule."""
from __future__ import annotations

import math

import torch

from .adapters import describe_param_groups, embedding_param_groups
from .config import RunConfig


def build_optimizer(model, cfg: RunConfig, device: torch.device):
    """AdamW over the two parameter groups; returns (optimizer, {group name: description})."""
    groups = embedding_param_groups(model, cfg.training.learning_rate, cfg.embedding_lr,
                                    cfg.training.weight_decay)
    groups = [g for g in groups if g["params"]]
    # fused AdamW is the fastest path on CUDA; on CPU the foreach path is the default.
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **extra)
    return optimizer, describe_param_groups(groups)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then decay to 0.

    `step` counts completed steps, so the first update uses lr_factor(0) = 1/(warmup+1)-ish
    ramp values instead of a zero learning rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    """LambdaLR applying lr_factor to both groups (their ratio stays fixed)."""
    t = cfg.training

    def factor(step: int) -> float:
        return lr_factor(step, t.warmup_steps, total_steps, t.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
