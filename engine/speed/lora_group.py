"""4-bit LoRA projections that read the same input, run as one autograd function.

    group_projections(patch, model)   # engine.speed.patching, after the fused 4-bit LoRA forwards
    q = self.q_proj(x)                 # computes q, k and v (one function), returns q
    k = self.k_proj(x)                 # the k it computed, for the same x object
    v = self.v_proj(x)

An attention's q, k, v and an MLP's gate and up each read one x. Run apart (engine.speed.lora_forward's
LoRA4bitLinearFunction each), every projection reads x for its own x A^T, casts its own A, reads
x again for its dA, adds its own s t A into its own dx, and autograd then sums the dx of the three
(two full-size adds). As one function with A = [A_1; A_2; A_3] (rows stacked, [R, in]):
    forward:  h = x A^T                     [N, R]   one GEMM, x read once
              y_i = x W_i^T (+ b_i) + s h_i B_i^T    (h_i: h's columns of member i)
    backward: t_i = dy_i B_i, T = [t_1 | t_2 | t_3]  [N, R]
              dx = sum_i dy_i W_i + s T A             (addmm_ into one buffer, no adds)
              dA = s T^T x                  [R, in]  one GEMM, x read once; dA_i its rows
              dB_i = s dy_i^T h_i
Per Llama layer and step (forward, recompute, backward) that is 15 fewer kernel launches, 3 fewer
autograd nodes a pass, and (Llama-8B, 2 x 2048 tokens) ~0.8 GB less memory traffic.

The members keep their modules and forwards: the first member's forward computes all outputs and
keeps the others' with the x they were computed for; each other member returns its kept output
when it is called with that same x object (transformers' attention calls q, k, v in that order on
one hidden state; the patched MLP calls gate then up). A member called with another x, or twice,
drops what is kept and computes on its own, as before. A group
is used only when each member would take the fused 4-bit function now, all with one compute dtype
and one scaling, and not under lora_forward.value_unused. Only layers bound with the fused 4-bit
forward are grouped, so a layer whose peft or bitsandbytes code is not a version engine/speed/upstream.py
knows (left as peft's by engine/speed/patching.py) is never a member.
"""
from __future__ import annotations

import torch
from torch import nn

from . import lora_forward   # dequantize_4bit_weight through the module: one place to watch it
from .lora_forward import (GROUP_ATTR, _local, _scaled_product, falls_back, fused_4bit_call,
                           without_autocast)

ENABLED = True   # bench/engine_train.py --ungrouped-lora turns it off for an A/B
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
        if getattr(_local, "value_unused", False):
            return None
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
        dtype, scaling = first[6], first[5]
        flat = [t for c in calls for t in c[:5]]   # packed, quant_state, bias, lora_A, lora_B
        return LoRA4bitGroupFunction.apply(x, dtype, scaling, len(calls), *flat)


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


class LoRA4bitGroupFunction(torch.autograd.Function):
    """y_1..y_n = x W_i^T (+ b_i) + s (x A_i^T) B_i^T for n 4-bit LoRA projections of one x.

    Args of apply: x [..., in], dtype (compute), scaling (shared), n, then per member packed,
    quant_state, bias (frozen) or None, lora_A [r_i, in], lora_B [out_i, r_i]. Returns n tensors
    [..., out_i] in x's dtype. The math is in the module docstring; saved: x, h, A (stacked, in
    dtype) and the B_i in dtype, never a weight or an output.
    """

    @staticmethod
    def forward(ctx, x, dtype, scaling, n, *flat):
        members = [flat[5 * i:5 * i + 5] for i in range(n)]
        lead = x.shape[:-1]
        xc = x.reshape(-1, x.shape[-1]).to(dtype)                              # [N, in]
        a = torch.cat([m[3] for m in members]).to(dtype)                       # [R, in]
        bs = [m[4].to(dtype) for m in members]                                 # [out_i, r_i]
        h = torch.mm(xc, a.t())                                                # [N, R]
        outputs, start = [], 0
        for (packed, qs, bias, lora_a, _), b in zip(members, bs):
            w = lora_forward.dequantize_4bit_weight(packed, qs, dtype)                      # [out_i, in]
            y = torch.empty((*lead, w.shape[0]), dtype=dtype, device=x.device)
            y2 = y.view(-1, w.shape[0])
            if bias is None:
                torch.mm(xc, w.t(), out=y2)
            else:
                torch.addmm(bias.to(dtype), xc, w.t(), out=y2)
            del w
            r = lora_a.shape[0]
            y2.addmm_(h[:, start:start + r], b.t(), alpha=scaling)
            start += r
            outputs.append(y.to(x.dtype))
        ctx.members = [(packed, qs, lora_a.shape[0], lora_a.dtype, lora_b.dtype)
                       for packed, qs, _, lora_a, lora_b in members]
        ctx.scaling, ctx.x_meta = scaling, (x.dtype, x.shape)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xc, h, a, *bs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *douts):
        some = next((d for d in douts if d is not None), None)
        if some is None:   # no output carried a gradient
            return (None,) * (4 + 5 * len(ctx.members))
        return without_autocast(lambda c, _: _group_backward(c, douts), ctx, some)


def _group_backward(ctx, douts):
    xc, h, a, *bs = ctx.saved_tensors
    s, (x_dtype, x_shape) = ctx.scaling, ctx.x_meta
    needs = ctx.needs_input_grad
    n = len(ctx.members)
    need_x = needs[0]
    need_a = [needs[4 + 5 * i + 3] for i in range(n)]
    need_b = [needs[4 + 5 * i + 4] for i in range(n)]
    dys = [d.reshape(-1, d.shape[-1]).to(a.dtype) if d is not None else None for d in douts]
    ts = [torch.mm(dy, b) if dy is not None else h.new_zeros(h.shape[0], b.shape[1])
          for dy, b in zip(dys, bs)]
    t = torch.cat(ts, dim=1) if n > 1 else ts[0]                             # [N, R]
    dx = None
    if need_x:
        for dy, (packed, qs, *_rest) in zip(dys, ctx.members):
            if dy is None:
                continue
            w = lora_forward.dequantize_4bit_weight(packed, qs, a.dtype)
            dx = torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)
            del w
        if dx is None:
            dx = torch.zeros_like(xc)
        dx.addmm_(t, a, alpha=s)
        dx = dx.view(x_shape).to(x_dtype)
    grads_a = [None] * n
    if any(need_a):
        da = _scaled_product(t.t(), xc, s, ctx.members[0][3])                # [R, in]
        grads_a = list(da.split([m[2] for m in ctx.members]))
    grads, start = [], 0
    for i, (dy, member) in enumerate(zip(dys, ctx.members)):
        r = member[2]
        db = _scaled_product(dy.t(), h[:, start:start + r], s, member[4]) \
            if need_b[i] and dy is not None else None
        start += r
        grads += [None, None, None, grads_a[i] if need_a[i] else None, db]
    return (dx, None, None, None, *grads)
