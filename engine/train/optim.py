"""AdamW with two learning rates (embeddings vs the rest) and the warmup + decay schedule.

training.embedding_optimizer picks the embeddings group's optimizer: torch AdamW (one optimizer
for both groups), bitsandbytes' AdamW8bit (blockwise 8-bit states) or our fused8bit
(engine/train/fused_adamw.py: Triton, 8-bit states, stochastic rounding into bf16 weights) for that
group beside torch AdamW for the rest, joined in a `CombinedOptimizer` that the scheduler,
clipping, checkpoints and resume treat as one optimizer. Which optimizer each group gets (`auto`
included) is the Plan's decision (engine/train/plan.py); this module only builds it.
"""
from __future__ import annotations

import math

import torch

from ..config import RunConfig
from ..model.adapters import (EMBEDDINGS_GROUP, LORA_GROUP, describe_param_groups,
                              embedding_param_groups)
from .plan import Plan


BETAS, EPS = (0.9, 0.999), 1e-8


def build_optimizer(model, cfg: RunConfig, plan: Plan):
    """AdamW over the two parameter groups, each with the plan's optimizer; returns
    (optimizer, {group name: description})."""
    groups = embedding_param_groups(model, cfg.training.learning_rate, cfg.embedding_lr,
                                    cfg.training.weight_decay)
    groups = [g for g in groups if g["params"]]
    # fused AdamW is the fastest path on CUDA; on CPU the foreach path is the default.
    extra = {"fused": True} if plan.device == "cuda" else {}
    kind, other_kind = plan.embedding_optimizer, plan.lora_optimizer
    described = describe_param_groups(groups)
    for g in groups:
        described[g["name"]]["optimizer"] = kind if g["name"] == EMBEDDINGS_GROUP else other_kind
    embeddings = [g for g in groups if g["name"] == EMBEDDINGS_GROUP]
    other = [g for g in groups if g["name"] == LORA_GROUP]
    if other_kind == "adamw" and (kind == "adamw" or not embeddings):
        return torch.optim.AdamW(groups, betas=BETAS, eps=EPS, **extra), described
    if not embeddings:
        parts = []
    elif kind == "adamw":
        parts = [torch.optim.AdamW(embeddings, betas=BETAS, eps=EPS, **extra)]
    elif kind == "fused8bit":
        from .fused_adamw import FusedAdamW8bit

        parts = [FusedAdamW8bit(embeddings, betas=BETAS, eps=EPS, stochastic_rounding=True,
                                seed=cfg.training.seed)]
    else:
        import bitsandbytes as bnb   # the plan refused adamw8bit without it

        # Tensors under 4096 elements (bnb's min_8bit_size) keep 32-bit states inside bnb too.
        parts = [bnb.optim.AdamW8bit(embeddings, betas=BETAS, eps=EPS)]
    if other and other_kind == "fused8bit":
        from .fused_adamw import FusedAdamW8bit

        # its own rounding noise: another seed than the embeddings' optimizer
        parts.append(FusedAdamW8bit(other, betas=BETAS, eps=EPS, stochastic_rounding=True,
                                    seed=cfg.training.seed + 1))
    elif other:
        parts.append(torch.optim.AdamW(other, betas=BETAS, eps=EPS, **extra))
    return CombinedOptimizer(parts), described


# training.embedding_optimizer's value for the optimizer class of the embeddings group
_OPTION_OF = {"AdamW": "adamw", "AdamW8bit": "adamw8bit", "FusedAdamW8bit": "fused8bit"}


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one: param_groups (the parts' own dicts, so a scheduler's lr
    changes reach them), step, zero_grad, and a state_dict of the parts' state dicts (tensors,
    numbers and strings only: torch.load(weights_only=True) reads it).
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        # Optimizer.__init__ would re-register the groups; only its bookkeeping is needed here.
        self.parts = list(parts)
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts for p, s in part.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"combined": [type(p).__name__ for p in self.parts],
                "parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        names = [type(p).__name__ for p in self.parts]
        if not isinstance(state_dict, dict) or state_dict.get("combined") != names:
            saved = state_dict.get("combined", ["AdamW"]) if isinstance(state_dict, dict) else ["?"]
            part = 0 if saved[0] != names[0] else min(1, len(saved) - 1, len(names) - 1)
            was = _OPTION_OF.get(saved[part], saved[part])
            now = _OPTION_OF.get(names[part], names[part])
            field, group = (("embedding_optimizer", "embeddings") if part == 0 else
                            ("lora_optimizer", "LoRA weights"))
            raise ValueError(f"its {group} were trained with the {was} optimizer, this run uses "
                             f"{now}; set training.{field}: {was} to continue it")
        for part, sd in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(p).__name__ for p in self.parts)})"


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
