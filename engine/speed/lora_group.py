"""4-bit LoRA projections that read the same input, run as one autograd function.

    group_projections(model, bind)    # engine.speed.patching, after the fused 4-bit LoRA forwards
    q = self.q_proj(x)                 # computes q, k and v (one function), returns q
    k = self.k_proj(x)                 # the k it computed, for the same x object
    v = self.v_proj(x)

An attention's q, k, v and an MLP's gate and up each read one x; kernels.lora_4bit_group
(kernels/lora_4bit_group.py: the math and what it saves) computes them as one function: x read once
for the stacked LoRA A GEMMs and for dA, one dx buffer instead of autograd's adds.

The members keep their modules and forwards: the first member's forward computes all outputs and
keeps the others' with the x they were computed for; each other member returns its kept output
when it is called with that same x object (transformers' attention calls q, k, v in that order on
one hidden state; the patched MLP calls gate then up). A member called with another x, or twice,
drops what is kept and computes on its own, as before. A group is used only when each member
would take the fused 4-bit function now, all with one compute dtype, one scaling and LoRA factors
of one dtype. Only layers bound with the fused 4-bit forward are grouped, so a layer whose peft or
bitsandbytes code is not a version engine/speed/upstream.py knows (left as peft's by
engine/speed/patching.py) is never a member. Whether grouping runs at all is the registry's
`lora_groups` transform (engine/speed/registry.py).
"""
from __future__ import annotations

import torch
from torch import nn

from cpt_studio.kernels import lora_4bit_group

from .lora_forward import GROUP_ATTR, falls_back, fused_4bit_call

GROUPS = {"Attention": ("q_proj", "k_proj", "v_proj"), "MLP": ("gate_proj", "up_proj")}
LABEL = "LoRA Linear4bit in groups (q/k/v, gate/up: one function each)"


class ProjectionGroup:
    """The members (modules, adapter names) of one group and the outputs kept for the others."""

    def __init__(self, members: list[nn.Module], names: list[str]):
        self.members, self.names = members, names
        self._x = None
        self._kept: list = []

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s output for x, or None when it must compute on its own."""
        if index == 0:
            self._x, self._kept = None, []
            outputs = self._compute(x)
            if outputs is None:
                return None
            self._x, self._kept = x, [None, *outputs[1:]]
            return outputs[0]
        if self._x is not x or index >= len(self._kept) or self._kept[index] is None:
            self._x, self._kept = None, []   # out of the expected order: keep nothing
            return None
        out, self._kept[index] = self._kept[index], None
        if all(k is None for k in self._kept):
            self._x, self._kept = None, []
        return out

    def _compute(self, x: torch.Tensor):
        calls = []
        for module, name in zip(self.members, self.names):
            if falls_back(module, name, (), {}):
                return None
            call = fused_4bit_call(module, name, x)
            if call is None:
                return None
            calls.append(call)
        first = calls[0]   # one compute dtype, scaling, and A / B dtype (dA is one tensor)
        if any(c[6] != first[6] or c[5] != first[5] or c[3].dtype != first[3].dtype
               or c[4].dtype != first[4].dtype for c in calls):
            return None
        # (packed, quant_state, bias, lora_A, lora_B) each
        return lora_4bit_group(x, [c[:5] for c in calls], scaling=first[5], dtype=first[6])


def group_projections(model: nn.Module, bind) -> int:
    """Groups the fused 4-bit LoRA projections of every attention / MLP module of `model`.

    `bind(module, group, index)` records one member (engine.speed.patching keeps the undo). Returns the
    number of projections grouped (5 a Llama layer).
    """
    made = 0
    for module in model.modules():
        kind = next((k for k in GROUPS if type(module).__name__.endswith(k)), None)
        if kind is None:
            continue
        members = [getattr(module, name, None) for name in GROUPS[kind]]
        names = [getattr(m.__dict__.get("forward"), "adapter_name", None) if m is not None else None
                 for m in members]
        if any(n is None for n in names) or any(GROUP_ATTR in m.__dict__ for m in members):
            continue
        group = ProjectionGroup(members, names)
        for index, member in enumerate(members):
            bind(member, group, index)
        made += len(members)
    return made
