"""A SwiGLU MLP's gate and up LoRA projections on a 4-bit base, and their product, as one function.

    product = gate_up_swiglu(mlp.gate_proj, mlp.up_proj, x)   # None: take the unfused path

Unfused (engine.lora_forward + kernels.swiglu), each projection adds its LoRA term into its own
bf16 output (y.addmm_(h, B^T): a read and a write of [N, I]), and SwiGLU reads both outputs
again. Here the two base outputs stay without their LoRA terms and kernels.lora_swiglu adds them
per tile while it computes silu(g) * u: on a Llama-8B step (4,096 tokens, I = 14,336) the two
full-size adds cost 11.5 ms of the forward and the checkpoint recompute on an H200. One autograd
node instead of three, with this backward (s = scaling, W = dequantized weight, a/b = LoRA A/B):
    dG, dU = lora_swiglu_backward(dp, ...)            [N, I] each (g and u recomputed per tile)
    tg = dG bg, tu = dU bu                             [N, r]
    dx = dG Wg + dU Wu + sg tg ag + su tu au          one [N, H] buffer, the GEMMs accumulate in it
    dAg = sg tg^T x,  dBg = sg dG^T hg  (and the same for up)
Saved: x, the base outputs yg, yu, the LoRA activations hg, hu and the cast LoRA weights: the
same bytes as the unfused path (which keeps g and u), never W. The weights are dequantized one
at a time, as the unfused backward does.

Used when ENABLED is set, both projections would run engine.lora_forward's fused 4-bit function
in this call (the same checks: one adapter, no dropout, a quant_state, no trained bias, one compute
dtype) and Triton runs (kernels.dispatch.use_triton); otherwise the caller takes the unfused path.

ENABLED is False: measured once on an H200 (bench/RESULTS.md, session 7, fifth call), a P1 step
with it took 400-430 ms (median 411) where the unfused path had taken 381-396 in the calls
before; the A/B in one call did not fit the device time left. Until a profile shows where the
time goes (the 2-D tile kernel against the 1-D SwiGLU), training uses the unfused path;
`bench/engine_train.py --fused-gate-up` turns it on for that measurement.
"""
from __future__ import annotations

import torch
from torch import nn

from cpt_studio.kernels.dispatch import use_triton
from cpt_studio.kernels.lora_swiglu import lora_swiglu_backward, lora_swiglu_forward

from . import lora_forward
from .lora_forward import _scaled_product, falls_back, fused_4bit_call, without_autocast

ENABLED = False   # see the module docstring


def _fused_call(module: nn.Module, x: torch.Tensor):
    """fused_4bit_call of a layer whose bound forward is lora_forward's fused 4-bit one, else None."""
    forward = module.__dict__.get("forward")
    name = getattr(getattr(forward, "__func__", None), "adapter_name", None)
    if name is None or falls_back(module, name, (), {}):
        return None
    return fused_4bit_call(module, name, x)


def gate_up_swiglu(gate_proj: nn.Module, up_proj: nn.Module, x: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor | None:
    """silu(gate_proj(x)) * up_proj(x) through GateUpSwiGLU4bitFunction, or None when it does not apply."""
    if not ENABLED or not use_triton(x, backend):
        return None
    gate, up = _fused_call(gate_proj, x), _fused_call(up_proj, x)
    if gate is None or up is None or gate[2] is not None or up[2] is not None or gate[6] != up[6]:
        return None   # not both fused 4-bit layers, a bias (never in Llama-style MLPs), two dtypes
    (pg, qsg, _, ag, bg, sg, dtype), (pu, qsu, _, au, bu, su, _) = gate, up
    return GateUpSwiGLU4bitFunction.apply(x, pg, qsg, ag, bg, sg, pu, qsu, au, bu, su, dtype)


class GateUpSwiGLU4bitFunction(torch.autograd.Function):
    """silu(x Wg^T + sg (x Ag^T) Bg^T) * (x Wu^T + su (x Au^T) Bu^T); math in the module docstring.

    Args of apply: x [..., H]; the gate's packed weight, quant_state, lora_A, lora_B, scaling; the
    same for up; dtype, the compute dtype. Returns [..., I] in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, pg, qsg, ag, bg, sg, pu, qsu, au, bu, su, dtype):
        lead = x.shape[:-1]
        xc = x.reshape(-1, x.shape[-1]).to(dtype)                              # [N, H]
        cast = [w.to(dtype).contiguous() for w in (ag, bg, au, bu)]
        yg, hg = _base_and_lora_a(xc, pg, qsg, cast[0], dtype)
        yu, hu = _base_and_lora_a(xc, pu, qsu, cast[2], dtype)
        p = lora_swiglu_forward(yg, hg, cast[1], sg, yu, hu, cast[3], su, out_dtype=x.dtype)
        ctx.save_for_backward(xc, yg, hg, yu, hu, *cast)
        ctx.weights, ctx.scalings = ((pg, qsg), (pu, qsu)), (sg, su)
        ctx.dtypes, ctx.x_shape = (x.dtype, ag.dtype, bg.dtype, au.dtype, bu.dtype), x.shape
        return p.view(*lead, p.shape[-1])

    @staticmethod
    def backward(ctx, dp):
        return without_autocast(_gate_up_backward, ctx, dp)


def _base_and_lora_a(xc, packed, quant_state, a, dtype):
    """(x W^T, x A^T): the base output without its LoRA term, and the LoRA activation."""
    w = lora_forward.dequantize_4bit_weight(packed, quant_state, dtype)
    y = torch.mm(xc, w.t())
    del w
    return y, torch.mm(xc, a.t())


def _gate_up_backward(ctx, dp):
    xc, yg, hg, yu, hu, ag, bg, au, bu = ctx.saved_tensors
    x_dtype, ag_dtype, bg_dtype, au_dtype, bu_dtype = ctx.dtypes
    sg, su = ctx.scalings
    need = ctx.needs_input_grad
    dg, du = lora_swiglu_backward(dp.reshape(-1, dp.shape[-1]), yg, hg, bg, sg, yu, hu, bu, su)
    tg = torch.mm(dg, bg) if need[0] or need[3] else None                       # [N, r]
    tu = torch.mm(du, bu) if need[0] or need[8] else None
    dx = None
    if need[0]:
        (pg, qsg), (pu, qsu) = ctx.weights
        dx = torch.mm(dg, lora_forward.dequantize_4bit_weight(pg, qsg, dg.dtype))            # [N, H]
        dx.addmm_(du, lora_forward.dequantize_4bit_weight(pu, qsu, du.dtype))
        dx.addmm_(tg, ag, alpha=sg)
        dx.addmm_(tu, au, alpha=su)
        dx = dx.view(ctx.x_shape).to(x_dtype)
    dag = _scaled_product(tg.t(), xc, sg, ag_dtype) if need[3] else None
    dbg = _scaled_product(dg.t(), hg, sg, bg_dtype) if need[4] else None
    dau = _scaled_product(tu.t(), xc, su, au_dtype) if need[8] else None
    dbu = _scaled_product(du.t(), hu, su, bu_dtype) if need[9] else None
    return dx, None, None, dag, dbg, None, None, None, dau, dbu, None, None
